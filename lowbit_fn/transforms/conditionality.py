"""``apply_if_finite``: skip a whole step whose gradients hold a NaN or an Inf, with optax's name and contract.

References:
  optax: ``optax.apply_if_finite`` (``optax/transforms/_conditionality.py``).
"""

from __future__ import annotations

import torch
from tensordict import TensorDict, TensorDictBase
from torch import Tensor

from ._tree import Tree, as_tensordict, build, leaves
from .base import CheckedTransformation, GradientTransformation

__all__ = ["apply_if_finite", "ApplyIfFinite", "all_finite"]

COUNTERS = ("notfinite_count", "last_finite", "total_notfinite")


class ApplyIfFinite(CheckedTransformation):
    """What :func:`apply_if_finite` returns: a :class:`~lowbit_fn.CheckedTransformation` that names the transform
    it guards (``inner``), ``max_consecutive_errors``, and ``count_step(updates, state) -> bool`` (counts the step
    in the state's counters; whether ``inner`` runs it), so that :func:`lowbit_fn.apply_gradients` can run the
    inner transform's one-pass step when it does."""

    inner: GradientTransformation
    max_consecutive_errors: int


def all_finite(tensors: list[Tensor]) -> bool:
    """Whether every element of ``tensors`` is finite: one read of each (its largest ``|x|``, NaN or Inf exactly
    when one of its elements is) and one host synchronization per device."""
    per_device: dict[torch.device, list[Tensor]] = {}
    for norm in torch._foreach_norm(tensors, float("inf")) if tensors else []:
        per_device.setdefault(norm.device, []).append(norm.float())
    return all(bool(torch.stack(norms).isfinite().all()) for norms in per_device.values())


def apply_if_finite(inner: GradientTransformation, max_consecutive_errors: int) -> ApplyIfFinite:
    """Apply ``inner``'s update only when every incoming update (gradient) is finite.

    A step whose updates hold a NaN or an Inf returns zero updates and leaves ``inner``'s state as it was (the
    check runs before ``inner`` writes a byte of its donated state), unless it is more than
    ``max_consecutive_errors`` such steps in a row: then the step is applied anyway, as optax does, so that a run
    that only produces non-finite gradients does not go on silently. The state counts them: ``notfinite_count``
    (the current run of non-finite steps), ``last_finite`` (whether the last step's updates were finite),
    ``total_notfinite`` (all of them), and ``inner_state``. The check costs one read of the updates and one host
    synchronization per step.

    Default behaviour without this wrapper: a non-finite gradient element costs that element only (its parameter
    goes NaN, as in torch.optim), not its block.

    References:
      optax: ``optax.apply_if_finite``.

    Example:
        >>> import math, torch, lowbit_fn
        >>> opt = lowbit_fn.apply_if_finite(lowbit_fn.adamw(1e-2, state_format="fp32"), max_consecutive_errors=3)
        >>> params = {"w": torch.ones(3)}
        >>> state = opt.init(params)
        >>> params, state = lowbit_fn.apply_gradients(opt, {"w": torch.tensor([1.0, math.nan, 1.0])}, state, params)
        >>> params["w"], int(state["total_notfinite"]), bool(state["last_finite"])
        (tensor([1., 1., 1.]), 1, False)
    """
    if not isinstance(inner, GradientTransformation):
        raise TypeError(f"apply_if_finite: inner must be a GradientTransformation, got {type(inner).__name__}")
    if isinstance(max_consecutive_errors, bool) or not isinstance(max_consecutive_errors, int) or max_consecutive_errors < 0:
        raise ValueError(f"apply_if_finite: max_consecutive_errors must be an int >= 0, got {max_consecutive_errors!r}")

    def init(params: Tree) -> TensorDictBase:
        params = as_tensordict(params, "params")
        zero = torch.zeros((), dtype=torch.int64)
        return TensorDict(
            {"notfinite_count": zero, "last_finite": torch.ones((), dtype=torch.bool), "total_notfinite": zero.clone(),
             "inner_state": inner.init(params)},
            batch_size=[],
        )

    def check(updates: TensorDictBase, state: TensorDictBase, params: TensorDictBase | None) -> None:
        expected = {*COUNTERS, "inner_state"}
        if not isinstance(state, TensorDictBase) or set(state.keys()) != expected:
            got = sorted(state.keys()) if isinstance(state, TensorDictBase) else type(state).__name__
            raise ValueError(f"apply_if_finite: the state has entries {got}, expected {sorted(expected)}")
        for key, dtype in zip(COUNTERS, (torch.int64, torch.bool, torch.int64)):
            if state[key].shape != () or state[key].dtype != dtype:
                raise ValueError(f"apply_if_finite: state[{key!r}] must be a 0-d {dtype} tensor, got "
                                 f"{tuple(state[key].shape)} {state[key].dtype}")
        if isinstance(inner, CheckedTransformation):
            inner.check(updates, state["inner_state"], params)

    def step(updates: TensorDictBase, state: TensorDictBase, params: TensorDictBase | None, inplace: bool):
        if count_step(updates, state):
            if isinstance(inner, CheckedTransformation):
                updates, new = inner.step(updates, state["inner_state"], params, inplace)
            else:
                updates, new = inner.update(updates, state["inner_state"], params)
            if new is not state["inner_state"]:
                state["inner_state"] = new
            return updates, state
        keys, values = leaves(updates)
        return build(keys, [v.zero_() if inplace else torch.zeros_like(v) for v in values]), state

    def count_step(updates: TensorDictBase, state: TensorDictBase) -> bool:
        """Counts the step in ``state``; whether ``inner`` runs it (finite, or too many non-finite in a row)."""
        finite = all_finite(leaves(updates)[1])
        with torch.no_grad():
            if finite:
                state["notfinite_count"].zero_()
            else:
                state["notfinite_count"].add_(1)
                state["total_notfinite"].add_(1)
            state["last_finite"].fill_(finite)
        return finite or int(state["notfinite_count"]) > max_consecutive_errors

    return ApplyIfFinite(
        init, step, check, inner=inner, max_consecutive_errors=max_consecutive_errors, count_step=count_step,
    )
