"""AdEMAMix: ``scale_by_ademamix`` (the fast and slow EMAs ``m1``, ``m2`` and ``nu`` on the state codec) and the
``ademamix`` alias."""

from __future__ import annotations

from ..kernels.rules import AdEMAMix
from ._moments import MomentTransformation, Scalar, as_scalar, check_nonnegative, check_unit, moment_transform
from .alias import FusedChain, fused_chain
from .basic import Schedule, add_decayed_weights, scale_by_learning_rate

__all__ = ["scale_by_ademamix", "ademamix"]


def _warmup(value: int | None, what: str) -> int | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
        raise ValueError(f"{what} must be None or an int > 0 (steps of warm-up), got {value!r}")
    return value


def scale_by_ademamix(
    b1: Scalar = 0.9,
    b2: Scalar = 0.999,
    b3: Scalar = 0.9999,
    alpha: Scalar = 5.0,
    t_alpha: int | None = None,
    t_beta3: int | None = None,
    eps: Scalar = 1e-8,
    *,
    state_format: str = "8bit",
    block_size: int | None = None,
    min_quant_size: int = 4096,
    rounding: str | None = None,
    seed: int = 0,
) -> MomentTransformation:
    """Rescale updates by AdEMAMix's mixture of a fast and a slow EMA, with the moments stored block-wise
    quantized (the formats and options of :func:`~lowbit_fn.scale_by_adam`).

    ``m1`` (decay ``b1``, bias-corrected) and ``m2`` (decay ``b3``, not corrected) are EMAs of the gradient,
    ``nu`` (``b2``) of its square; the update is ``(m1_hat + alpha * m2) / (sqrt(nu_hat) + eps)``. With
    ``t_alpha`` / ``t_beta3``, ``alpha`` and ``b3`` warm up over that many steps with the paper's schedulers
    (``alpha`` linearly, ``b3`` so that the slow EMA's half-life grows linearly).

    References:
      Pagliardini, Ablin, Grangier, "The AdEMAMix Optimizer: Better, Faster, Older", arXiv:2409.03137.

    Example:
        >>> import torch, lowbit_fn
        >>> params = {"w": torch.zeros(64, 128)}
        >>> t = lowbit_fn.scale_by_ademamix(t_alpha=1000, t_beta3=1000, state_format="8bit", min_quant_size=0)
        >>> state = t.init(params)
        >>> sorted(state["8bit_block256"].keys())
        ['m1', 'm2', 'nu']
    """
    for what, value in (("b1", b1), ("b2", b2), ("b3", b3)):
        check_unit(value, what)
    check_nonnegative(alpha, "alpha")
    check_nonnegative(eps, "eps")
    return moment_transform(
        "scale_by_ademamix", AdEMAMix(_warmup(t_alpha, "t_alpha"), _warmup(t_beta3, "t_beta3")), ("m1", "m2", "nu"),
        ("exp_avg", "exp_avg_slow", "exp_avg_sq"),
        tuple(as_scalar(v, n) for n, v in (("b1", b1), ("b2", b2), ("b3", b3), ("alpha", alpha), ("eps", eps))),
        state_format=state_format, block_size=block_size, min_quant_size=min_quant_size, rounding=rounding, seed=seed,
    )


def ademamix(
    learning_rate: float | Scalar | Schedule = 1e-3,
    b1: Scalar = 0.9,
    b2: Scalar = 0.999,
    b3: Scalar = 0.9999,
    alpha: Scalar = 5.0,
    t_alpha: int | None = None,
    t_beta3: int | None = None,
    eps: Scalar = 1e-8,
    weight_decay: float | Scalar = 0.0,
    *,
    state_format: str = "8bit",
    block_size: int | None = None,
    min_quant_size: int = 4096,
    rounding: str | None = None,
    seed: int = 0,
) -> FusedChain:
    """AdEMAMix with decoupled weight decay, the paper's Algorithm 1: ``p -= lr * (update + weight_decay * p)``,
    in one fused pass (:class:`~lowbit_fn.FusedChain`).

    Example:
        >>> import torch, lowbit_fn
        >>> params = {"w": torch.zeros(2)}
        >>> opt = lowbit_fn.ademamix(learning_rate=0.1, alpha=0.0, state_format="fp32")
        >>> state = opt.init(params)
        >>> params, state = lowbit_fn.apply_gradients(opt, {"w": torch.tensor([1.0, -1.0])}, state, params)
        >>> params["w"]
        tensor([-0.1000,  0.1000])
    """
    core = scale_by_ademamix(
        b1, b2, b3, alpha, t_alpha, t_beta3, eps, state_format=state_format, block_size=block_size,
        min_quant_size=min_quant_size, rounding=rounding, seed=seed,
    )
    return fused_chain((core, add_decayed_weights(weight_decay), scale_by_learning_rate(learning_rate)),
                       0, 2, learning_rate, weight_decay, decoupled=True)
