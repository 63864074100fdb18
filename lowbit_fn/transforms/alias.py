"""Adam and AdamW as chains of building blocks (no maths here), with torch.optim's semantics."""

from __future__ import annotations

from tensordict import TensorDictBase

from ._tree import Tree, as_tensordict, flat_or_tensordict
from .adam import Epilogue, Scalar, scale_by_adam
from .base import GradientTransformation, chain
from .basic import Schedule, add_decayed_weights, advance_schedule, learning_rate_factor, scale_by_learning_rate

__all__ = ["adam", "adamw"]


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
) -> GradientTransformation:
    """Adam with L2 weight decay added to the gradient, like ``torch.optim.Adam`` (not bitsandbytes' decoupled).

    ``chain(add_decayed_weights(weight_decay), scale_by_adam(...), scale_by_learning_rate(learning_rate))``.
    See :func:`scale_by_adam` for the state formats; ``state_format="fp32"`` is plain Adam.

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
    return _fused((add_decayed_weights(weight_decay), core, scale_by_learning_rate(learning_rate)),
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
) -> GradientTransformation:
    """AdamW (decoupled weight decay, scaled by the learning rate), like ``torch.optim.AdamW``.

    ``chain(scale_by_adam(...), add_decayed_weights(weight_decay), scale_by_learning_rate(learning_rate))``.

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
    """
    core = scale_by_adam(
        b1, b2, eps, amsgrad=amsgrad, state_format=state_format, block_size=block_size,
        min_quant_size=min_quant_size, rounding=rounding, seed=seed,
    )
    return _fused((core, add_decayed_weights(weight_decay), scale_by_learning_rate(learning_rate)),
                  0, 2, learning_rate, weight_decay, decoupled=True)


def _fused(
    members: tuple[GradientTransformation, ...], core_index: int, lr_index: int,
    learning_rate: float | Scalar | Schedule, weight_decay: float | Scalar, decoupled: bool,
) -> GradientTransformation:
    """``chain(*members)`` with one fused update: the decay and the learning rate run inside the core's step (in
    the native kernel, one pass over memory), with the same float32 operations, so the results are the chain's
    bit for bit. The state is the chain's."""
    chained, core = chain(*members), members[core_index]

    def check_others(updates: TensorDictBase, state: TensorDictBase, params: TensorDictBase) -> None:
        """The chain's check, less what the core's validation covers (updates and params against its layout)."""
        expected = {str(i) for i in range(len(members))}
        if set(state.keys()) != expected:
            raise ValueError(f"chain: the state has entries {sorted(state.keys())}, expected {sorted(expected)}")
        members[lr_index].check(updates, state[str(lr_index)], params)

    def epilogue(state: TensorDictBase, apply: bool) -> Epilogue:  # the schedule's count advances after the step
        return Epilogue(weight_decay, learning_rate_factor(learning_rate, state[str(lr_index)], advance=False), decoupled, apply)

    def update(updates: Tree, state: TensorDictBase, params: Tree | None = None):
        if params is None:
            return chained.update(updates, state, params)  # raises: weight decay needs params
        updates, params = as_tensordict(updates), as_tensordict(params, "params")
        chained.check(updates, state, params)  # (the members' messages, in the chain's order)
        updates, new = core.update(updates, state[str(core_index)], params, epilogue=epilogue(state, False))
        if new is not state[str(core_index)]:
            state[str(core_index)] = new
        advance_schedule(learning_rate, state[str(lr_index)])
        return updates, state

    def apply_many(items: list[tuple[Tree, TensorDictBase, Tree]]) -> None:
        """``params += update(updates, state, params)`` (the float32 sum ``apply_updates`` computes) in place, for
        many ``(updates, state, params)`` at once: the torch.optim front end's per-parameter states. Everything is
        checked before anything changes; one native call serves all the states that share a step and scalars."""
        prepared = [(flat_or_tensordict(u), st, flat_or_tensordict(p, "params")) for u, st, p in items]
        for u, st, p in prepared:
            check_others(u, st, p)
        core.update.apply_many([(u, st[str(core_index)], p, epilogue(st, True)) for u, st, p in prepared])  # type: ignore[attr-defined]
        for _, st, _ in prepared:
            advance_schedule(learning_rate, st[str(lr_index)])

    update.apply_many = apply_many  # type: ignore[attr-defined]  # read by the torch.optim front end
    return GradientTransformation(chained.init, update, chained.check)
