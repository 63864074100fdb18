"""``offload``: run another transform with its state in host memory (ZeRO-Offload style).

References:
  Ren et al., "ZeRO-Offload: Democratizing Billion-Scale Model Training", arXiv:2101.06840.
"""

from __future__ import annotations

import torch
from tensordict import TensorDict, TensorDictBase
from torch import Tensor

from ._tree import Key, Tree, as_tensordict, build, check_like, leaves, signature
from .base import CheckedTransformation, GradientTransformation, step_member

__all__ = ["offload"]


def is_accelerator(device: torch.device) -> bool:
    return device.type not in ("cpu", "meta")


def to_host(tensors: list[Tensor], host: torch.device, pin_memory: bool) -> list[Tensor]:
    """Copies on ``host`` of the tensors that are elsewhere (the others as they are). Copies from an accelerator
    go through pinned memory without blocking when ``pin_memory``; the source devices are then synchronized once,
    before the host reads them."""
    out, waited = [], set()
    for t in tensors:
        if t.device == host:
            out.append(t)
            continue
        asynchronous = pin_memory and is_accelerator(t.device)
        out.append(t.to(host, non_blocking=asynchronous))
        if asynchronous:
            waited.add(t.device)
    for device in waited:
        torch.accelerator.synchronize(device)
    return out


def offload(
    inner: GradientTransformation, *, host: str | torch.device = "cpu", min_numel: int = 4096, pin_memory: bool = True
) -> CheckedTransformation:
    """Keep ``inner``'s state in host memory and run its update there; small tensors stay on their device.

    Tensors with at least ``min_numel`` elements are moved to ``host`` (their updates, and their params when
    ``update`` gets them), updated there by ``inner`` with its state kept on the host, and their new updates are
    sent back to each tensor's own device. The others run through a second instance of ``inner``'s state on their
    device. Where a tensor is already on ``host`` (e.g. CPU training) nothing is copied. The state is
    ``{"host": inner_state, "device": inner_state}``.

    ``inner`` sees the two sets separately, so put transforms that couple parameters outside:
    ``chain(clip_by_global_norm(1.0), offload(adamw(...)))``.

    Args:
      inner: any transform, e.g. ``lowbit_fn.adamw(1e-3, state_format="8bit")``.
      host: where the state lives and ``inner`` runs.
      min_numel: tensors with fewer elements stay on their device with their own state.
      pin_memory: copy from accelerators through pinned memory, without blocking.

    Example:
        >>> import torch, lowbit_fn
        >>> params = {"w": torch.randn(128, 64), "b": torch.zeros(64)}
        >>> opt = lowbit_fn.offload(lowbit_fn.adamw(1e-3, state_format="8bit"), min_numel=1024)
        >>> state = opt.init(params)
        >>> updates, state = opt.update({"w": torch.randn(128, 64), "b": torch.randn(64)}, state, params)
        >>> state["host", "0", "8bit_block256", "mu", "w", "codes"].device, sorted(state["device", "0", "layout"].keys())
        (device(type='cpu'), ['b'])
    """
    if not isinstance(inner, GradientTransformation):
        raise TypeError(f"offload: inner must be a GradientTransformation, got {type(inner).__name__}")
    if isinstance(min_numel, bool) or not isinstance(min_numel, int) or min_numel < 0:
        raise ValueError(f"offload: min_numel must be an int >= 0, got {min_numel!r}")
    host = torch.device(host)

    def split(tree: TensorDictBase) -> tuple[list[Key], list[Tensor], list[Key], list[Tensor]]:
        keys, values = leaves(tree)
        big = [i for i, v in enumerate(values) if v.numel() >= min_numel]
        small = [i for i in range(len(keys)) if i not in set(big)]
        return [keys[i] for i in big], [values[i] for i in big], [keys[i] for i in small], [values[i] for i in small]

    def parts(updates: TensorDictBase, params: TensorDictBase | None):
        """``(keys, updates, params)`` for the host part and for the device part."""
        hk, hu, dk, du = split(updates)
        if params is None:
            return (hk, hu, None), (dk, du, None)
        check_like(params, signature(updates), "params", "updates", same_dtype=False)
        by_key = dict(zip(*leaves(params)))
        return (hk, hu, [by_key[k] for k in hk]), (dk, du, [by_key[k] for k in dk])

    def init(params: Tree) -> TensorDictBase:
        params = as_tensordict(params, "params")
        hk, hv, dk, dv = split(params)
        return TensorDict(
            {"host": inner.init(build(hk, to_host(hv, host, False))), "device": inner.init(build(dk, dv))}, batch_size=[]
        )

    def check(updates: TensorDictBase, state: TensorDictBase, params: TensorDictBase | None) -> None:
        if not isinstance(state, TensorDictBase) or set(state.keys()) != {"host", "device"}:
            raise ValueError("offload: the state is not an offload state (expected entries 'host' and 'device')")
        if not isinstance(inner, CheckedTransformation):
            return
        for (keys, u, p), name in zip(parts(updates, params), ("host", "device")):
            inner.check(build(keys, u), state[name], None if p is None else build(keys, p))

    def step(updates: TensorDictBase, state: TensorDictBase, params: TensorDictBase | None, inplace: bool):
        (hk, hu, hp), (dk, du, dp) = parts(updates, params)
        devices = [u.device for u in hu]
        moved = to_host(hu + (hp or []), host, pin_memory)
        # on the host the updates may always reuse the copies' buffers; on the device only when asked to
        new_h = step_member(inner, build(hk, moved[: len(hu)]), state, "host", None if hp is None else build(hk, moved[len(hu):]),
                            inplace or (bool(hu) and all(m is not u for m, u in zip(moved, hu))))
        new_d = step_member(inner, build(dk, du), state, "device", None if dp is None else build(dk, dp), inplace)
        _, back = leaves(new_h)
        back = [u if u.device == d else u.to(d, non_blocking=pin_memory) for u, d in zip(back, devices)]
        _, rest = leaves(new_d)
        return build(hk + dk, back + rest), state

    return CheckedTransformation(init, step, check)
