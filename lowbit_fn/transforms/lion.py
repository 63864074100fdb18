"""Lion: ``scale_by_lion`` (its one moment ``mu`` on the state codec) and the ``lion`` alias."""

from __future__ import annotations

from ..kernels.rules import Lion
from ._moments import MomentTransformation, Scalar, as_scalar, check_unit, moment_transform
from .alias import FusedChain, fused_chain
from .basic import Schedule, add_decayed_weights, scale_by_learning_rate

__all__ = ["scale_by_lion", "lion"]


def scale_by_lion(
    b1: Scalar = 0.9,
    b2: Scalar = 0.99,
    *,
    state_format: str = "8bit",
    block_size: int | None = None,
    min_quant_size: int = 4096,
    rounding: str | None = None,
    seed: int = 0,
) -> MomentTransformation:
    """Rescale updates to Lion's direction ``sign(b1 * mu + (1 - b1) * g)``, then ``mu = b2 * mu + (1 - b2) * g``,
    with ``mu`` stored block-wise quantized (the formats and options of :func:`~lowbit_fn.scale_by_adam`).

    The direction is exactly -1, 0 or +1 (NaN where the moment is NaN); a bfloat16 or float16 gradient gets a
    direction of its dtype.

    References:
      Chen et al., "Symbolic Discovery of Optimization Algorithms", arXiv:2302.06675.

    Example:
        >>> import torch, lowbit_fn
        >>> params = {"w": torch.randn(64, 128)}
        >>> t = lowbit_fn.scale_by_lion(state_format="8bit", min_quant_size=0)
        >>> state = t.init(params)
        >>> updates, state = t.update({"w": torch.randn(64, 128)}, state, params)
        >>> sorted(set(updates["w"].unique().tolist()) - {-1.0, 1.0})
        []
    """
    check_unit(b1, "b1", closed=True)
    check_unit(b2, "b2", closed=True)
    return moment_transform(
        "scale_by_lion", Lion(), ("mu",), ("exp_avg",), (as_scalar(b1, "b1"), as_scalar(b2, "b2")),
        state_format=state_format, block_size=block_size, min_quant_size=min_quant_size, rounding=rounding, seed=seed,
    )


def lion(
    learning_rate: float | Scalar | Schedule = 1e-4,
    b1: Scalar = 0.9,
    b2: Scalar = 0.99,
    weight_decay: float | Scalar = 0.0,
    *,
    state_format: str = "8bit",
    block_size: int | None = None,
    min_quant_size: int = 4096,
    rounding: str | None = None,
    seed: int = 0,
) -> FusedChain:
    """Lion with decoupled weight decay, as in the paper and optax: ``p -= lr * (sign(...) + weight_decay * p)``.

    ``chain(scale_by_lion(...), add_decayed_weights(weight_decay), scale_by_learning_rate(learning_rate))``, run
    as one fused pass (:class:`~lowbit_fn.FusedChain`). Lion's updates are larger than Adam's: its learning rate
    is typically 3-10x smaller, its weight decay 3-10x larger.

    Example:
        >>> import torch, lowbit_fn
        >>> params = {"w": torch.zeros(2)}
        >>> opt = lowbit_fn.lion(learning_rate=0.1, state_format="fp32")
        >>> state = opt.init(params)
        >>> params, state = lowbit_fn.apply_gradients(opt, {"w": torch.tensor([3.0, -0.5])}, state, params)
        >>> params["w"]
        tensor([-0.1000,  0.1000])
    """
    core = scale_by_lion(
        b1, b2, state_format=state_format, block_size=block_size, min_quant_size=min_quant_size, rounding=rounding,
        seed=seed,
    )
    return fused_chain((core, add_decayed_weights(weight_decay), scale_by_learning_rate(learning_rate)),
                       0, 2, learning_rate, weight_decay, decoupled=True)
