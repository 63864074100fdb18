"""RMSprop: ``scale_by_rms`` (``nu``, and ``mu``/``trace`` when centered / with momentum, on the state codec) and
the ``rmsprop`` alias, with ``torch.optim.RMSprop``'s semantics."""

from __future__ import annotations

from ..kernels.rules import RMS
from ._moments import MomentTransformation, Scalar, as_scalar, check_nonnegative, check_unit, is_zero, moment_transform
from .alias import FusedChain, fused_chain
from .basic import Schedule, add_decayed_weights, scale_by_learning_rate

__all__ = ["scale_by_rms", "rmsprop"]


def scale_by_rms(
    alpha: Scalar = 0.99,
    eps: Scalar = 1e-8,
    momentum: Scalar = 0.0,
    centered: bool = False,
    *,
    state_format: str = "8bit",
    block_size: int | None = None,
    min_quant_size: int = 4096,
    rounding: str | None = None,
    seed: int = 0,
) -> MomentTransformation:
    """Rescale updates by the root of a running mean of squared gradients, as ``torch.optim.RMSprop`` does, with
    the moments stored block-wise quantized (the formats and options of :func:`~lowbit_fn.scale_by_adam`).

    ``nu = alpha * nu + (1 - alpha) * g**2``; ``centered``: ``mu`` is the running mean of ``g`` and the state
    keeps the variance ``var`` (torch's ``square_avg - grad_avg**2``) instead of ``nu``, updated in Welford's form
    ``var = alpha * var + alpha * (1 - alpha) * (g - mu_old)**2``, so that quantization never has to resolve a
    small difference of two large stored values (see :class:`~lowbit_fn.kernels.rules.RMS`); the update is
    ``g / (sqrt(.) + eps)`` (eps outside the root, unlike optax's ``scale_by_rms``), or with ``momentum`` the
    buffer ``trace = momentum * trace + g / (sqrt(.) + eps)``. ``momentum`` 0 at construction means no buffer.
    The torch.optim front end names the variance ``grad_var`` in its state dicts; ``to_torch_state_dict`` and
    loading torch's checkpoints convert it to and from torch's ``square_avg``.

    Every format rounds stochastically by default (``nu`` or ``var`` stored as its square root): RMSprop divides by its second
    moment without a smoothed numerator, and nearest rounding's repeated error showed in training: on
    ``benchmarks/mlp_quality.py`` (3 seeds) FP8 ended at 1.06-1.09x the fp32-state loss at lr 3e-4 and 1.06-1.26x
    at 1e-3, 8-bit at 1.03-1.14x at 1e-3, where stochastic rounding ends within 1% (``rounding="nearest"``
    selects the other).

    References:
      Hinton, "Lecture 6e: rmsprop", Coursera: Neural Networks for Machine Learning (2012).
      Graves, "Generating Sequences With Recurrent Neural Networks" (centered), arXiv:1308.0850.

    Example:
        >>> import torch, lowbit_fn
        >>> params = {"w": torch.zeros(64, 128)}
        >>> t = lowbit_fn.scale_by_rms(centered=True, state_format="8bit", min_quant_size=0)
        >>> state = t.init(params)
        >>> sorted(state["8bit_sr_block256"].keys())
        ['mu', 'var']
    """
    if not isinstance(centered, bool):
        raise TypeError(f"centered must be a bool, got {type(centered).__name__}")
    check_unit(alpha, "alpha", closed=True)
    check_nonnegative(eps, "eps")
    check_nonnegative(momentum, "momentum")
    with_momentum = not is_zero(momentum)
    names = [("var", "grad_var"), ("mu", "grad_avg")] if centered else [("nu", "square_avg")]
    names += [("trace", "momentum_buffer")] * with_momentum
    return moment_transform(
        "scale_by_rms", RMS(centered, with_momentum), tuple(n for n, _ in names), tuple(t for _, t in names),
        (as_scalar(alpha, "alpha"), as_scalar(eps, "eps"), as_scalar(momentum, "momentum")),
        state_format=state_format, block_size=block_size, min_quant_size=min_quant_size, rounding=rounding, seed=seed,
        roundings={"8bit": "stochastic", "fp8": "stochastic"},
    )


def rmsprop(
    learning_rate: float | Scalar | Schedule = 1e-2,
    alpha: Scalar = 0.99,
    eps: Scalar = 1e-8,
    weight_decay: float | Scalar = 0.0,
    momentum: Scalar = 0.0,
    centered: bool = False,
    *,
    state_format: str = "8bit",
    block_size: int | None = None,
    min_quant_size: int = 4096,
    rounding: str | None = None,
    seed: int = 0,
) -> FusedChain:
    """RMSprop like ``torch.optim.RMSprop``: L2 weight decay added to the gradient, :func:`scale_by_rms`, the
    learning rate, in one fused pass (:class:`~lowbit_fn.FusedChain`).

    Example:
        >>> import torch, lowbit_fn
        >>> params = {"w": torch.zeros(2)}
        >>> opt = lowbit_fn.rmsprop(learning_rate=0.01, state_format="fp32")
        >>> state = opt.init(params)
        >>> params, state = lowbit_fn.apply_gradients(opt, {"w": torch.tensor([2.0, -2.0])}, state, params)
        >>> params["w"]
        tensor([-0.1000,  0.1000])
    """
    core = scale_by_rms(
        alpha, eps, momentum, centered, state_format=state_format, block_size=block_size,
        min_quant_size=min_quant_size, rounding=rounding, seed=seed,
    )
    return fused_chain((add_decayed_weights(weight_decay), core, scale_by_learning_rate(learning_rate)),
                       1, 2, learning_rate, weight_decay, decoupled=False)
