"""The optax contract on TensorDicts: ``GradientTransformation``, ``chain``, ``apply_updates``.

References:
  optax: https://github.com/google-deepmind/optax (``optax/_src/base.py``, ``combine.py``, ``update.py``).
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch
from tensordict import TensorDict, TensorDictBase

from ._tree import Tree, as_tensordict, build, check_like, leaves, signature

__all__ = ["GradientTransformation", "chain", "apply_updates", "identity"]

InitFn = Callable[[Tree], TensorDictBase]
UpdateFn = Callable[..., tuple[TensorDictBase, TensorDictBase]]
CheckFn = Callable[[TensorDictBase, TensorDictBase, Optional[TensorDictBase]], None]


def _no_check(updates: TensorDictBase, state: TensorDictBase, params: TensorDictBase | None) -> None:
    return None


class GradientTransformation(NamedTuple):
    """A pair of pure functions ``init(params) -> state`` and ``update(updates, state, params=None) -> (updates, state)``.

    States are TensorDicts. ``update`` treats the incoming state as **donated**: it may update its tensors in
    place and return them, so a step never holds two copies of the optimizer state. Keep no reference to an old
    state expecting it to stay unchanged (clone it first if you need to).

    ``check(updates, state, params)`` raises ``ValueError``/``TypeError`` for bad input without modifying
    anything; ``chain`` runs every member's check before any member updates, so a failed step leaves the whole
    state as it was. Transforms written by users may leave it at its default.
    """

    init: InitFn
    update: UpdateFn
    check: CheckFn = _no_check


def identity() -> GradientTransformation:
    """A stateless transform that returns its updates unchanged."""
    return GradientTransformation(lambda params: TensorDict({}, batch_size=[]), lambda u, s, p=None: (as_tensordict(u), s))


def chain(*transforms: GradientTransformation) -> GradientTransformation:
    """Apply ``transforms`` in sequence; the state is a TensorDict with one entry per member (``"0"``, ``"1"``, ...).

    Example:
        >>> import torch, lowbit_fn
        >>> opt = lowbit_fn.chain(lowbit_fn.clip_by_global_norm(1.0), lowbit_fn.scale_by_learning_rate(0.1))
        >>> params = {"w": torch.ones(3)}
        >>> state = opt.init(params)
        >>> updates, state = opt.update({"w": torch.full((3,), 2.0)}, state, params)
        >>> updates["w"]
        tensor([-0.0577, -0.0577, -0.0577])
    """
    for i, t in enumerate(transforms):
        if not isinstance(t, GradientTransformation):
            raise TypeError(f"chain: argument {i} must be a GradientTransformation, got {type(t).__name__}")

    def init(params: Tree) -> TensorDictBase:
        params = as_tensordict(params, "params")
        return TensorDict({str(i): t.init(params) for i, t in enumerate(transforms)}, batch_size=[])

    def check(updates: TensorDictBase, state: TensorDictBase, params: TensorDictBase | None) -> None:
        expected = {str(i) for i in range(len(transforms))}
        if set(state.keys()) != expected:
            raise ValueError(f"chain: the state has entries {sorted(state.keys())}, expected {sorted(expected)}")
        for i, t in enumerate(transforms):
            t.check(updates, state[str(i)], params)

    def update(updates: Tree, state: TensorDictBase, params: Tree | None = None):
        updates = as_tensordict(updates)
        params = None if params is None else as_tensordict(params, "params")
        check(updates, state, params)  # everything is validated before any member touches its state
        for i, t in enumerate(transforms):
            updates, new = t.update(updates, state[str(i)], params)
            if new is not state[str(i)]:
                state[str(i)] = new
        return updates, state

    return GradientTransformation(init, update, check)


def apply_updates(params: Tree, updates: Tree) -> TensorDict:
    """``params + updates`` leaf by leaf (updates cast to each param's dtype); returns a new TensorDict.

    Example:
        >>> import torch, lowbit_fn
        >>> lowbit_fn.apply_updates({"w": torch.ones(2)}, {"w": torch.tensor([0.5, -1.0])})["w"]
        tensor([1.5000, 0.0000])
    """
    params = as_tensordict(params, "params")
    updates = as_tensordict(updates)
    keys, p = leaves(params)
    _, u = check_like(updates, signature(params), "updates", "params", same_dtype=False)
    with torch.no_grad():
        new = torch._foreach_add(p, [x.to(y.dtype) for x, y in zip(u, p)]) if p else []
    return build(keys, new)
