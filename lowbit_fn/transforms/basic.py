"""Element-wise transforms: weight decay, learning rate (constant, tensor or schedule), global-norm clipping.

Each works on all leaves at once with ``torch._foreach_*`` ops (one call per step, not one per parameter) and
returns new update tensors: incoming updates may be the caller's gradients and are not modified, unless
``update(..., inplace=True)`` is asked for (then the results are written into them).
"""

from __future__ import annotations

from typing import Callable, Union

import torch
from tensordict import TensorDict, TensorDictBase
from torch import Tensor

from ._tree import Tree, as_tensordict, build, check_leaf, check_like, leaves, signature
from .base import CheckedTransformation

__all__ = ["add_decayed_weights", "scale_by_learning_rate", "clip_by_global_norm", "Schedule"]

Schedule = Callable[[Tensor], Union[float, Tensor]]


def _empty() -> TensorDict:
    return TensorDict({}, batch_size=[])


def _mul(u: list[Tensor], factor: Tensor, inplace: bool = False) -> list[Tensor]:
    """Every leaf times a 0-d tensor (cast to the leaf's dtype); one foreach call when the dtypes agree."""
    if not u:
        return []
    if len({x.dtype for x in u}) == 1:
        if inplace:
            torch._foreach_mul_(u, factor.to(u[0].dtype))
            return u
        return torch._foreach_mul(u, factor.to(u[0].dtype))
    return [x.mul_(factor.to(x.dtype)) if inplace else x * factor.to(x.dtype) for x in u]


def _stateless(
    name: str, fn: Callable[[list[Tensor], list[Tensor] | None, bool], list[Tensor]], needs_params: bool = False
) -> CheckedTransformation:
    def check(updates: TensorDictBase, state: TensorDictBase, params: TensorDictBase | None) -> None:
        if params is None:
            if needs_params:
                raise ValueError(f"{name} needs params: call update(updates, state, params)")
            for key, value in zip(*leaves(updates)):
                check_leaf(key, value, "updates")
        else:
            check_like(updates, signature(params), "updates", "params", same_dtype=False)

    def step(updates: TensorDictBase, state: TensorDictBase, params: TensorDictBase | None, inplace: bool):
        keys, u = leaves(updates)
        p = leaves(params)[1] if params is not None else None
        with torch.no_grad():
            return build(keys, fn(u, p, inplace)), state

    return CheckedTransformation(lambda params: _empty(), step, check)


def add_decayed_weights(weight_decay: float | Tensor = 0.0) -> CheckedTransformation:
    """Add ``weight_decay * params`` to the updates (decoupled decay when placed after the adaptive scaling).

    References:
      Loshchilov, Hutter, "Decoupled Weight Decay Regularization", arXiv:1711.05101.

    Example:
        >>> import torch, lowbit_fn
        >>> t = lowbit_fn.add_decayed_weights(0.1)
        >>> params = {"w": torch.ones(2)}
        >>> t.update({"w": torch.zeros(2)}, t.init(params), params)[0]["w"]
        tensor([0.1000, 0.1000])
    """
    if isinstance(weight_decay, Tensor):
        if weight_decay.dim() != 0:
            raise ValueError(f"weight_decay must be a float or a 0-d tensor, got shape {tuple(weight_decay.shape)}")
    elif isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)) or weight_decay < 0:
        raise ValueError(f"weight_decay must be a float >= 0, got {weight_decay!r}")

    if not isinstance(weight_decay, Tensor) and weight_decay == 0:
        return _stateless("add_decayed_weights", lambda u, p, inplace: u)  # no decay: no params, no pass

    def fn(u: list[Tensor], p: list[Tensor] | None, inplace: bool) -> list[Tensor]:
        if not u:
            return []
        p = [x.to(y.dtype) for x, y in zip(p, u)]  # a product rounded, then a sum (no fused multiply-add)
        factor = weight_decay if isinstance(weight_decay, Tensor) else float(weight_decay)
        if inplace:
            torch._foreach_add_(u, torch._foreach_mul(p, factor))
            return u
        return torch._foreach_add(u, torch._foreach_mul(p, factor))

    return _stateless("add_decayed_weights", fn, needs_params=True)


def clip_by_global_norm(max_norm: float) -> CheckedTransformation:
    """Scale the updates so that their global L2 norm is at most ``max_norm`` (optax's formula).

    ``g_norm = sqrt(sum ||u||^2)`` (computed in float32 or wider); updates are left as they are when
    ``g_norm < max_norm`` and become ``u / g_norm * max_norm`` otherwise.

    References:
      Pascanu, Mikolov, Bengio, "On the difficulty of training recurrent neural networks", arXiv:1211.5063.

    Example:
        >>> import torch, lowbit_fn
        >>> t = lowbit_fn.clip_by_global_norm(1.0)
        >>> t.update({"w": torch.tensor([3.0, 4.0])}, t.init({}))[0]["w"]
        tensor([0.6000, 0.8000])
    """
    if isinstance(max_norm, bool) or not isinstance(max_norm, (int, float)) or not max_norm > 0:
        raise ValueError(f"max_norm must be a float > 0, got {max_norm!r}")

    def fn(u: list[Tensor], p: list[Tensor] | None, inplace: bool) -> list[Tensor]:
        if not u:
            return []
        norms = torch._foreach_norm([x if x.dtype == torch.float64 else x.float() for x in u])
        g_norm = torch.linalg.vector_norm(torch.stack([n.to(torch.float64) for n in norms]))
        factor = torch.where(g_norm < max_norm, torch.ones_like(g_norm), max_norm / g_norm)
        return _mul(u, factor, inplace)

    return _stateless("clip_by_global_norm", fn)


def scale_by_learning_rate(learning_rate: float | Tensor | Schedule, *, flip_sign: bool = True) -> CheckedTransformation:
    """Multiply the updates by ``-learning_rate`` (by ``learning_rate`` with ``flip_sign=False``).

    ``learning_rate`` is a float, a 0-d tensor (change it in place, e.g. ``lr.fill_(1e-4)``, between steps) or a
    schedule ``count -> lr`` called with the number of updates done before this one (0 on the first), as in
    optax. A schedule's step count is kept in this transform's state. Nothing here is compiled, so no value or
    schedule ever triggers a recompile.

    Example:
        >>> import torch, lowbit_fn
        >>> t = lowbit_fn.scale_by_learning_rate(lambda count: 0.1 / (1 + count))
        >>> state = t.init({"w": torch.ones(1)})
        >>> [float(t.update({"w": torch.ones(1)}, state)[0]["w"]) for _ in range(2)]
        [-0.10000000149011612, -0.05000000074505806]
    """
    is_schedule = _is_schedule(learning_rate)
    if isinstance(learning_rate, Tensor):
        if learning_rate.dim() != 0 or not learning_rate.is_floating_point():
            raise ValueError(f"learning_rate must be a float, a 0-d floating tensor or a schedule, got {learning_rate!r}")
    elif not is_schedule and (isinstance(learning_rate, bool) or not isinstance(learning_rate, (int, float))):
        raise TypeError(f"learning_rate must be a float, a 0-d tensor or a callable schedule, got {type(learning_rate).__name__}")

    def init(params: Tree) -> TensorDictBase:
        if not is_schedule:
            return _empty()
        values = leaves(as_tensordict(params, "params"))[1]
        device = values[0].device if values else torch.device("cpu")
        return TensorDict({"count": torch.zeros((), dtype=torch.int64, device=device)}, batch_size=[])

    def check(updates: TensorDictBase, state: TensorDictBase, params: TensorDictBase | None) -> None:
        if is_schedule and "count" not in state.keys():
            raise ValueError("scale_by_learning_rate(schedule): the state has no 'count' entry")

    def step(updates: TensorDictBase, state: TensorDictBase, params: TensorDictBase | None, inplace: bool):
        keys, u = leaves(updates)
        with torch.no_grad():
            return build(keys, scaled(u, learning_rate_factor(learning_rate, state, flip_sign), inplace)), state

    return CheckedTransformation(init, step, check)


def learning_rate_factor(
    learning_rate: float | Tensor | Schedule, state: TensorDictBase, flip_sign: bool = True, *, advance: bool = True
) -> float | Tensor:
    """This step's factor of :func:`scale_by_learning_rate` (``-lr``, or ``lr`` without ``flip_sign``) given its
    ``state``; advances a schedule's count unless ``advance=False`` (then call :func:`advance_schedule` after)."""
    sign = -1.0 if flip_sign else 1.0
    lr = learning_rate(state["count"].clone()) if _is_schedule(learning_rate) else learning_rate
    if advance:
        advance_schedule(learning_rate, state)
    return sign * lr if isinstance(lr, Tensor) else sign * float(lr)


def advance_schedule(learning_rate: float | Tensor | Schedule, state: TensorDictBase) -> None:
    """Count one update in :func:`scale_by_learning_rate`'s state (only schedules keep a count)."""
    if _is_schedule(learning_rate):
        state["count"].add_(1)


def _is_schedule(learning_rate: object) -> bool:
    return callable(learning_rate) and not isinstance(learning_rate, Tensor)


def scaled(u: list[Tensor], factor: float | Tensor, inplace: bool = False) -> list[Tensor]:
    """Every leaf times ``factor`` (a float, or a 0-d tensor cast to each leaf's dtype)."""
    if isinstance(factor, Tensor):
        return _mul(u, factor, inplace)
    if not u:
        return []
    if inplace:
        torch._foreach_mul_(u, factor)
        return u
    return torch._foreach_mul(u, factor)
