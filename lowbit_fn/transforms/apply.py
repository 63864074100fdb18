"""``apply_gradients``: one whole optimizer step of the functional API, the parameter update fused into the
codec step's own pass where the transform allows it.

``update`` followed by ``apply_updates`` makes two passes over memory: the second reads every parameter and update
again and writes the parameter (12 B per float32 element; ``benchmarks/step_speed.py`` measures the two calls at
1.15-2x the torch.optim step on this project's CPU). ``apply_gradients`` does the step in one pass for the fused
elementwise aliases (:class:`~lowbit_fn.FusedChain`: ``adam``, ``adamw``, ``lion``, ``sgd``, ``rmsprop``,
``ademamix``), alone or as the last member of a :func:`lowbit_fn.chain`, as the torch.optim front end does (flax's ``TrainState.apply_gradients`` is the same idea).
"""

from __future__ import annotations

from tensordict import TensorDictBase

from ._tree import Tree, as_tensordict
from .alias import FusedChain
from .base import Chain, GradientTransformation, apply_updates, step_member
from .conditionality import ApplyIfFinite

__all__ = ["apply_gradients"]


Path = tuple[str, ...]


def _fused_tail(transform: GradientTransformation) -> tuple[list[tuple[Path, GradientTransformation]], Path, FusedChain] | None:
    """When the update of ``transform`` ends with a :class:`FusedChain` (itself, or the last member of a chain,
    nested chains included): the members before it and the fused alias, each with the path of its state inside
    ``transform``'s state; else ``None``."""
    head: list[tuple[Path, GradientTransformation]] = []
    path: Path = ()
    while isinstance(transform, Chain) and transform.transforms:
        *members, transform = transform.transforms
        head += [(path + (str(i),), m) for i, m in enumerate(members)]
        path += (str(len(members)),)
    return (head, path, transform) if isinstance(transform, FusedChain) else None


def apply_gradients(
    transform: GradientTransformation,
    grads: Tree,
    state: TensorDictBase,
    params: Tree,
    *,
    inplace: bool = False,
    bf16_stochastic_round: bool = False,
) -> tuple[TensorDictBase, TensorDictBase]:
    """One optimizer step: ``(new params, new state)``.

    The same as ``updates, state = transform.update(grads, state, params, inplace=inplace)`` followed by
    ``params = apply_updates(params, updates, inplace=inplace)``, in one pass over memory when the transform's
    update ends with a fused alias (:class:`~lowbit_fn.FusedChain`: ``adam``, ``adamw``, ``lion``, ``sgd``,
    ``rmsprop``, ``ademamix``; alone or last in a :func:`chain`): the update is added to each parameter inside
    the codec step, in float32, and rounded once to the parameter's dtype
    (stochastically for bfloat16 with ``bf16_stochastic_round=True``, with the random bits of
    ``apply_updates(..., bf16_stochastic_round=True)`` under the transform's seed). For float32 and float64 params
    the results are the two calls' bit for bit; for half-precision ones the two calls round the update to the
    gradients' dtype first, and this rounds once, as the torch.optim front end does. Any other transform runs the
    two calls (``bf16_stochastic_round`` needs the fused form there: pass ``step=`` to :func:`apply_updates`).

    :func:`~lowbit_fn.apply_if_finite` around such a transform keeps the one pass: a finite step runs it, a
    skipped one returns the params unchanged.

    Input is checked before anything changes: a bad gradient, state or parameter raises and leaves all of them as
    they were. With ``inplace=False`` the params and grads are not modified (the state is donated, as always);
    with ``inplace=True`` the params are updated in their own tensors and returned, and the gradients' buffers may
    be overwritten (they are, by the chain members before the fused step).

    Example:
        >>> import torch, lowbit_fn
        >>> params = {"w": torch.zeros(64, 128)}
        >>> opt = lowbit_fn.chain(lowbit_fn.clip_by_global_norm(1.0), lowbit_fn.adamw(1e-3, state_format="8bit"))
        >>> state = opt.init(params)
        >>> grads = {"w": torch.randn(64, 128)}
        >>> params, state = lowbit_fn.apply_gradients(opt, grads, state, params, inplace=True)
        >>> bool(params["w"].abs().max() <= 1.001e-3)
        True
    """
    if not isinstance(transform, GradientTransformation):
        raise TypeError(f"apply_gradients: transform must be a GradientTransformation, got {type(transform).__name__}")
    if not isinstance(inplace, bool) or not isinstance(bf16_stochastic_round, bool):
        raise TypeError("apply_gradients: inplace and bf16_stochastic_round must be bools")
    if isinstance(transform, ApplyIfFinite):  # the check first; then the inner transform's own (fused) step
        grads = as_tensordict(grads)
        params = as_tensordict(params, "params")
        transform.check(grads, state, params)
        if not transform.count_step(grads, state):
            return (params if inplace else params.clone()), state
        params, state["inner_state"] = apply_gradients(
            transform.inner, grads, state["inner_state"], params, inplace=inplace,
            bf16_stochastic_round=bf16_stochastic_round,
        )
        return params, state
    tail = _fused_tail(transform)
    if tail is None:
        if bf16_stochastic_round:
            raise ValueError(
                "apply_gradients: bf16_stochastic_round=True needs a transform ending with a fused alias (adam, adamw, "
                "lion, sgd, rmsprop, ademamix); "
                "for others call update, then apply_updates(..., bf16_stochastic_round=True, step=...)"
            )
        updates, state = transform.update(grads, state, params, inplace=inplace)
        return apply_updates(params, updates, inplace=inplace), state
    head, fused_path, fused = tail
    grads = as_tensordict(grads)
    params = as_tensordict(params, "params")
    transform.check(grads, state, params)  # a Chain or a FusedChain: every member, before any of them steps
    for path, member in head:
        grads = step_member(member, grads, state, path, params, inplace)
    targets = params if inplace else params.clone()
    fused.apply(grads, state[fused_path] if fused_path else state, targets, bf16_stochastic_round)
    return targets, state
