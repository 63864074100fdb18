"""The optax contract on TensorDicts: ``GradientTransformation``, ``chain``, ``apply_updates``.

References:
  optax: https://github.com/google-deepmind/optax (``optax/_src/base.py``, ``combine.py``, ``update.py``).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import torch
from tensordict import TensorDict, TensorDictBase
from torch import Tensor

from .._random import stream_key, tensor_id, tensor_key
from ..kernels.reference import PARAM_STREAM, add_rounded
from ._tree import Tree, as_tensordict, build, check_like, leaves, name, signature

__all__ = ["GradientTransformation", "CheckedTransformation", "Chain", "chain", "apply_updates", "identity"]

InitFn = Callable[[Tree], TensorDictBase]
UpdateFn = Callable[..., tuple[TensorDictBase, TensorDictBase]]
CheckFn = Callable[[TensorDictBase, TensorDictBase, Optional[TensorDictBase]], None]
StepFn = Callable[[TensorDictBase, TensorDictBase, Optional[TensorDictBase], bool], tuple[TensorDictBase, TensorDictBase]]


class GradientTransformation(NamedTuple):
    """A pair of pure functions ``init(params) -> state`` and ``update(updates, state, params=None) -> (updates,
    state)``, as in optax: ``init, update = lowbit_fn.adamw()`` works.

    States are TensorDicts. lowbit_fn's ``update`` functions treat the incoming state as **donated**: they update
    its tensors in place and return them, so a step never holds two copies of the optimizer state. Keep no
    reference to an old state expecting it to stay unchanged (clone it first if you need to). They also take
    ``inplace=False``: with ``inplace=True`` the returned updates may reuse the incoming updates' buffers (the
    caller's gradients), as in torchopt.
    """

    init: InitFn
    update: UpdateFn


class CheckedTransformation(GradientTransformation):
    """A :class:`GradientTransformation` that also validates without side effects (the way optax extends the
    pair, by subclassing).

    ``check(updates, state, params)`` raises ``ValueError``/``TypeError`` for bad input and modifies nothing;
    ``step(updates, state, params, inplace)`` is the update without that validation. ``update`` runs both.
    :func:`chain` checks every member before any member steps, so a failed step leaves the whole state as it was,
    and validates each input once. Every transform of lowbit_fn is one; a plain ``GradientTransformation`` (a
    user's own) can still be chained, it validates itself.
    """

    check: CheckFn
    step: StepFn

    def __new__(cls, init: InitFn, step: StepFn, check: CheckFn, **attributes: Any) -> "CheckedTransformation":
        def update(updates: Tree, state: TensorDictBase, params: Tree | None = None, *, inplace: bool = False):
            updates = as_tensordict(updates)
            params = None if params is None else as_tensordict(params, "params")
            check(updates, state, params)
            return step(updates, state, params, inplace)

        update.__doc__ = "update(updates, state, params=None, *, inplace=False) -> (updates, state)"
        self = super().__new__(cls, init, update)
        self.__dict__.update(check=check, step=step, **attributes)
        return self

    def __getnewargs_ex__(self) -> tuple[tuple, dict]:  # copy and pickle rebuild through __new__
        extra = {k: v for k, v in self.__dict__.items() if k not in ("check", "step")}
        return (self.init, self.step, self.check), extra


def identity() -> CheckedTransformation:
    """A stateless transform that returns its updates unchanged."""

    def check(updates: TensorDictBase, state: TensorDictBase, params: TensorDictBase | None) -> None:
        return None

    return CheckedTransformation(lambda params: TensorDict({}, batch_size=[]), lambda u, s, p, inplace: (u, s), check)


class Chain(CheckedTransformation):
    """What :func:`chain` returns: a :class:`CheckedTransformation` that names its members (``transforms``), so
    that :func:`lowbit_fn.apply_gradients` can fuse the parameter update into the last one."""

    transforms: tuple[GradientTransformation, ...]


def chain(*transforms: GradientTransformation) -> Chain:
    """Apply ``transforms`` in sequence; the state is a TensorDict with one entry per member (``"0"``, ``"1"``, ...).

    Every member that can check (:class:`CheckedTransformation`) is checked before any member updates, so a bad
    input leaves the whole state as it was; ``inplace`` is passed to every member.

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
        if not isinstance(state, TensorDictBase) or set(state.keys()) != expected:
            got = sorted(state.keys()) if isinstance(state, TensorDictBase) else type(state).__name__
            raise ValueError(f"chain: the state has entries {got}, expected {sorted(expected)}")
        for i, t in enumerate(transforms):
            if isinstance(t, CheckedTransformation):
                t.check(updates, state[str(i)], params)

    def step(updates: TensorDictBase, state: TensorDictBase, params: TensorDictBase | None, inplace: bool):
        for i, t in enumerate(transforms):
            updates = step_member(t, updates, state, str(i), params, inplace)
        return updates, state

    return Chain(init, step, check, transforms=tuple(transforms))


def step_member(
    transform: GradientTransformation, updates: TensorDictBase, state: TensorDictBase, key: str | tuple[str, ...],
    params: TensorDictBase | None, inplace: bool,
) -> TensorDictBase:
    """One member's update on input its container has checked (a :class:`CheckedTransformation` steps without
    checking again; a plain one runs its own ``update``), with its state at ``state[key]``, replaced there when the
    member returns a new one. Returns the updates."""
    if isinstance(transform, CheckedTransformation):
        updates, new = transform.step(updates, state[key], params, inplace)
    else:
        updates, new = transform.update(updates, state[key], params)
    if new is not state[key]:
        state[key] = new
    return updates


def apply_updates(
    params: Tree, updates: Tree, *, inplace: bool = False, bf16_stochastic_round: bool = False,
    step: int | Tensor | None = None, seed: int = 0,
) -> TensorDictBase:
    """``params + updates`` leaf by leaf (updates cast to each param's dtype).

    Returns a new TensorDict; with ``inplace=True`` the updates are added into ``params``' own tensors and
    ``params`` is returned (torchopt's name; its default is True, ours False so that the plain call stays pure).
    Both give the same bits.

    With ``bf16_stochastic_round=True`` every bfloat16 parameter becomes ``p + u`` computed in float32 and rounded
    stochastically (unbiased), with the random bits of the torch.optim front end's write-back: a hash of
    ``(seed, step, the parameter's identity (a CRC-32 of its key path), element index)``. ``step`` (an int or a
    0-d tensor, e.g. the optimizer state's count) makes them fresh every step and is required then.

    Example:
        >>> import torch, lowbit_fn
        >>> lowbit_fn.apply_updates({"w": torch.ones(2)}, {"w": torch.tensor([0.5, -1.0])})["w"]
        tensor([1.5000, 0.0000])
        >>> p = {"w": torch.ones(4, dtype=torch.bfloat16)}
        >>> new = lowbit_fn.apply_updates(p, {"w": torch.full((4,), 1e-3, dtype=torch.bfloat16)},
        ...                               bf16_stochastic_round=True, step=1)
        >>> new["w"].dtype
        torch.bfloat16
    """
    params = as_tensordict(params, "params")
    updates = as_tensordict(updates)
    keys, p = leaves(params)
    _, u = check_like(updates, signature(params), "updates", "params", same_dtype=False)
    if bf16_stochastic_round and step is None:
        raise ValueError("apply_updates: bf16_stochastic_round=True needs step= (e.g. the optimizer state's count)")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"apply_updates: seed must be an int >= 0, got {seed!r}")
    rounded = [bf16_stochastic_round and x.dtype == torch.bfloat16 for x in p]
    u = [x if x.dtype == y.dtype or r else x.to(y.dtype) for x, y, r in zip(u, p, rounded)]
    with torch.no_grad():
        new = [None] * len(p)
        if any(rounded):
            step_t = torch.as_tensor(step, dtype=torch.int64)
            for i, (k, x, y) in enumerate(zip(keys, p, u)):
                if rounded[i]:
                    key = tensor_key(stream_key(seed, PARAM_STREAM, step_t.to(x.device)), tensor_id(name(k)))
                    new[i] = add_rounded(x, y, key, torch.zeros((), dtype=torch.int64, device=x.device))
        plain = [i for i, r in enumerate(rounded) if not r]
        if inplace:
            if plain:
                torch._foreach_add_([p[i] for i in plain], [u[i] for i in plain])
            for x, y in zip(p, new):
                if y is not None:
                    x.copy_(y)
            return params
        if plain:
            for i, y in zip(plain, torch._foreach_add([p[i] for i in plain], [u[i] for i in plain])):
                new[i] = y
    return build(keys, new)
