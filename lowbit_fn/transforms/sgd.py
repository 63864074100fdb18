"""SGD with momentum: ``trace`` (the momentum buffer on the state codec) and the ``sgd`` alias, with
``torch.optim.SGD``'s semantics."""

from __future__ import annotations

from ..kernels.rules import Trace
from ._moments import MomentTransformation, Scalar, as_scalar, check_nonnegative, is_zero, moment_transform
from .alias import FusedChain, fused_chain
from .basic import Schedule, add_decayed_weights, scale_by_learning_rate

__all__ = ["trace", "sgd"]


def trace(
    decay: Scalar = 0.9,
    nesterov: bool = False,
    dampening: Scalar = 0.0,
    *,
    state_format: str = "8bit",
    block_size: int | None = None,
    min_quant_size: int = 4096,
    rounding: str | None = None,
    seed: int = 0,
) -> MomentTransformation:
    """Momentum with ``torch.optim.SGD``'s semantics, the buffer ``trace`` stored block-wise quantized (the
    formats and options of :func:`~lowbit_fn.scale_by_adam`).

    The first update sets ``trace = g`` (as torch does); later ones ``trace = decay * trace + (1 - dampening) * g``.
    The update is ``trace``, or ``g + decay * trace`` with ``nesterov``. (optax's ``trace`` has no dampening and
    starts from zero: ``decay * 0 + g`` is the same first step.)

    Example:
        >>> import torch, lowbit_fn
        >>> params = {"w": torch.zeros(64, 128)}
        >>> t = lowbit_fn.trace(0.9, state_format="fp32")
        >>> state = t.init(params)
        >>> updates, state = t.update({"w": torch.ones(64, 128)}, state)
        >>> updates, state = t.update({"w": torch.ones(64, 128)}, state)
        >>> float(updates["w"][0, 0])
        1.899999976158142
    """
    if not isinstance(nesterov, bool):
        raise TypeError(f"nesterov must be a bool, got {type(nesterov).__name__}")
    check_nonnegative(decay, "decay")
    if nesterov and not is_zero(dampening):
        raise ValueError(f"nesterov momentum requires dampening=0, got {dampening}")
    return _trace(decay, nesterov, dampening, True, state_format, block_size, min_quant_size, rounding, seed)


def _trace(decay, nesterov, dampening, momentum, state_format, block_size, min_quant_size, rounding, seed):
    return moment_transform(
        "trace", Trace(nesterov, momentum), ("trace",) if momentum else (), ("momentum_buffer",) if momentum else (),
        (as_scalar(decay, "momentum"), as_scalar(dampening, "dampening")), state_format=state_format,
        block_size=block_size, min_quant_size=min_quant_size, rounding=rounding, seed=seed,
    )


def sgd(
    learning_rate: float | Scalar | Schedule = 1e-3,
    momentum: Scalar = 0.0,
    dampening: Scalar = 0.0,
    weight_decay: float | Scalar = 0.0,
    nesterov: bool = False,
    *,
    state_format: str = "8bit",
    block_size: int | None = None,
    min_quant_size: int = 4096,
    rounding: str | None = None,
    seed: int = 0,
) -> FusedChain:
    """SGD like ``torch.optim.SGD``: L2 weight decay added to the gradient, then momentum (:func:`trace`), then
    the learning rate, in one fused pass (:class:`~lowbit_fn.FusedChain`).

    ``momentum`` 0 when the optimizer is built means no momentum and no state (the parameters' state holds only
    the step count); any other value (a 0-d tensor may be changed later) keeps the momentum buffer in
    ``state_format``.

    Example:
        >>> import torch, lowbit_fn
        >>> params = {"w": torch.ones(3)}
        >>> opt = lowbit_fn.sgd(learning_rate=0.1, momentum=0.9, state_format="fp32")
        >>> state = opt.init(params)
        >>> params, state = lowbit_fn.apply_gradients(opt, {"w": torch.tensor([1.0, 0.0, -1.0])}, state, params)
        >>> params["w"]
        tensor([0.9000, 1.0000, 1.1000])
    """
    if not isinstance(nesterov, bool):
        raise TypeError(f"nesterov must be a bool, got {type(nesterov).__name__}")
    check_nonnegative(momentum, "momentum")
    if nesterov and (is_zero(momentum) or not is_zero(dampening)):
        raise ValueError("nesterov momentum requires a momentum and zero dampening")
    core = _trace(momentum, nesterov, dampening, not is_zero(momentum), state_format, block_size, min_quant_size,
                  rounding, seed)
    return fused_chain((add_decayed_weights(weight_decay), core, scale_by_learning_rate(learning_rate)),
                       1, 2, learning_rate, weight_decay, decoupled=False)
