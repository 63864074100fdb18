"""Adam and AdamW as chains of building blocks (no maths here), with torch.optim's semantics, and
:class:`FusedChain`, the one-pass form every elementwise alias of the family (``lion``, ``sgd``, ``rmsprop``,
``ademamix``) shares."""

from __future__ import annotations

from dataclasses import replace

from tensordict import TensorDictBase

from ..kernels import Epilogue
from ._tree import build
from ._moments import MomentTransformation, Scalar
from .adam import scale_by_adam
from .base import CheckedTransformation, chain
from .basic import Schedule, add_decayed_weights, advance_schedule, learning_rate_factor, scale_by_learning_rate

__all__ = ["adam", "adamw", "FusedChain", "fused_chain"]


def adam(
    learning_rate: float | Scalar | Schedule = 1e-3,
    b1: Scalar = 0.9,
    b2: Scalar = 0.999,
    eps: Scalar = 1e-8,
    weight_decay: float | Scalar = 0.0,
    *,
    amsgrad: bool = False,
    state_format: str = "8bit",
    block_size: int | None = None,
    min_quant_size: int = 4096,
    rounding: str | None = None,
    seed: int = 0,
) -> "FusedChain":
    """Adam with L2 weight decay added to the gradient, like ``torch.optim.Adam`` (not bitsandbytes' decoupled).

    ``chain(add_decayed_weights(weight_decay), scale_by_adam(...), scale_by_learning_rate(learning_rate))``, run as
    one fused pass (:class:`FusedChain`). See :func:`scale_by_adam` for the state formats; ``state_format="fp32"``
    is plain Adam. With ``weight_decay=0`` (the default) ``update`` needs no params.

    Example:
        >>> import torch, lowbit_fn
        >>> params = {"w": torch.zeros(3)}
        >>> opt = lowbit_fn.adam(learning_rate=0.1, state_format="fp32")
        >>> state = opt.init(params)
        >>> updates, state = opt.update({"w": torch.tensor([1.0, -2.0, 0.0])}, state, params)
        >>> lowbit_fn.apply_updates(params, updates)["w"]
        tensor([-0.1000,  0.1000,  0.0000])
    """
    core = scale_by_adam(
        b1, b2, eps, amsgrad=amsgrad, state_format=state_format, block_size=block_size,
        min_quant_size=min_quant_size, rounding=rounding, seed=seed,
    )
    return fused_chain((add_decayed_weights(weight_decay), core, scale_by_learning_rate(learning_rate)),
                  1, 2, learning_rate, weight_decay, decoupled=False)


def adamw(
    learning_rate: float | Scalar | Schedule = 1e-3,
    b1: Scalar = 0.9,
    b2: Scalar = 0.999,
    eps: Scalar = 1e-8,
    weight_decay: float | Scalar = 1e-2,
    *,
    amsgrad: bool = False,
    state_format: str = "8bit",
    block_size: int | None = None,
    min_quant_size: int = 4096,
    rounding: str | None = None,
    seed: int = 0,
) -> "FusedChain":
    """AdamW (decoupled weight decay, scaled by the learning rate), like ``torch.optim.AdamW``.

    ``chain(scale_by_adam(...), add_decayed_weights(weight_decay), scale_by_learning_rate(learning_rate))``, run as
    one fused pass (:class:`FusedChain`). Decay, learning rate and (for bfloat16/float16 params) the rounding of
    the update to the params' dtype happen in float32 in that pass.

    References:
      Loshchilov, Hutter, "Decoupled Weight Decay Regularization", arXiv:1711.05101.

    Example:
        >>> import torch, lowbit_fn
        >>> model = torch.nn.Linear(128, 64)
        >>> params = lowbit_fn.params_from_module(model)
        >>> opt = lowbit_fn.adamw(learning_rate=1e-3, state_format="4bit")
        >>> state = opt.init(params)
        >>> grads = {k: torch.ones_like(v) for k, v in params.items()}
        >>> updates, state = opt.update(grads, state, params)
        >>> params = lowbit_fn.apply_updates(params, updates)
        >>> # the same step without new tensors: updates written into the gradients, added into the params
        >>> updates, state = opt.update(grads, state, params, inplace=True)
        >>> params = lowbit_fn.apply_updates(params, updates, inplace=True)
    """
    core = scale_by_adam(
        b1, b2, eps, amsgrad=amsgrad, state_format=state_format, block_size=block_size,
        min_quant_size=min_quant_size, rounding=rounding, seed=seed,
    )
    return fused_chain((core, add_decayed_weights(weight_decay), scale_by_learning_rate(learning_rate)),
                  0, 2, learning_rate, weight_decay, decoupled=True)


class FusedChain(CheckedTransformation):
    """What :func:`adam`, :func:`adamw`, ``lion``, ``sgd``, ``rmsprop`` and ``ademamix`` return: the chain's
    :class:`CheckedTransformation` (same state, same results bit for bit) whose update runs weight decay and the
    learning rate inside the core's step, in one pass.

    It names its parts for the torch.optim front end, which calls the same kernel entry point on per-parameter
    states: ``core`` (the :class:`~lowbit_fn.transforms.MomentTransformation`), ``weight_decay``, ``decoupled``,
    ``learning_rate``, and the chain positions ``core_index`` and ``lr_index``. ``apply(updates, state, params, param_sr)`` is the step of
    :func:`lowbit_fn.apply_gradients`: checked input, the update added into ``params`` in place within the same
    pass (rounded once to each param's dtype, stochastically for bfloat16 with ``param_sr``); returns the state."""


def fused_chain(
    members: tuple[CheckedTransformation, ...], core_index: int, lr_index: int,
    learning_rate: float | Scalar | Schedule, weight_decay: float | Scalar, decoupled: bool,
) -> FusedChain:
    """``chain(*members)`` with one fused update: the decay and the learning rate run inside the core's step (in
    the native kernel, one pass over memory), with the same float32 operations, so the results are the chain's
    bit for bit. The state is the chain's. ``members[core_index]`` is a :class:`MomentTransformation`, the
    member at ``lr_index`` a ``scale_by_learning_rate``, and the others ``add_decayed_weights`` (before the
    core: L2, ``decoupled=False``; after it: decoupled)."""
    chained, core = chain(*members), members[core_index]
    assert isinstance(core, MomentTransformation)

    def epilogue(state: TensorDictBase) -> Epilogue:  # the schedule's count advances after the step
        factor = learning_rate_factor(learning_rate, state[str(lr_index)], advance=False)
        return Epilogue(weight_decay, l2=not decoupled, decoupled=decoupled, factor=factor)

    def step(updates: TensorDictBase, state: TensorDictBase, params: TensorDictBase | None, inplace: bool):
        places, flat, grads, param_leaves = core.prepared(updates, state[str(core_index)], params)
        results = core.run(places, flat, grads, param_leaves, epilogue(state), inplace)
        advance_schedule(learning_rate, state[str(lr_index)])
        return build([p.key for p in places], results), state

    def apply(updates: TensorDictBase, state: TensorDictBase, params: TensorDictBase, param_sr: bool) -> TensorDictBase:
        places, flat, grads, param_leaves = core.prepared(updates, state[str(core_index)], params)
        core.run(places, flat, grads, param_leaves, replace(epilogue(state), apply=True, param_sr=param_sr), False)
        advance_schedule(learning_rate, state[str(lr_index)])
        return state

    return FusedChain(
        chained.init, step, chained.check, core=core, weight_decay=weight_decay, decoupled=decoupled,
        learning_rate=learning_rate, core_index=core_index, lr_index=lr_index, apply=apply,
    )
