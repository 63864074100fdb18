"""Shared test helpers: a small MLP, its gradients through torch.func, state snapshots."""

from __future__ import annotations

import torch
from tensordict import TensorDictBase
from torch import nn

import lowbit_fn


def mlp(dtype=torch.float32, width: int = 96) -> nn.Module:
    return nn.Sequential(nn.Linear(48, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 1)).to(dtype)


def as_torch(moments: dict) -> dict:
    """A state entry's moments under torch's names: centered RMSprop's variance ``grad_var`` as torch's
    ``square_avg = grad_var + grad_avg**2``, the conversion ``lowbit_fn.to_torch_state_dict`` makes."""
    out = dict(moments)
    if "grad_var" in out:
        out["square_avg"] = out.pop("grad_var") + out["grad_avg"] * out["grad_avg"]
    return out


def batches(n: int, dtype=torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(32, 48, generator=g).to(dtype), torch.randn(32, 1, generator=g).to(dtype)) for _ in range(n)]


def loss_fn(model: nn.Module):
    def loss(params, x, y):
        out = torch.func.functional_call(model, params.flatten_keys(".").to_dict(), (x,))
        return ((out - y) ** 2).mean()

    return loss


def run_functional(model, opt, data, params=None, state=None):
    """Train with a torch.func loop; returns (params, state)."""
    params = lowbit_fn.params_from_module(model) if params is None else params
    state = opt.init(params) if state is None else state
    grad = torch.func.grad(loss_fn(model))
    for x, y in data:
        updates, state = opt.update(grad(params, x, y), state, params)
        params = lowbit_fn.apply_updates(params, updates)
    return params, state


def snapshot(td: TensorDictBase) -> dict:
    return {k: v.clone() for k, v in td.items(include_nested=True, leaves_only=True)}


def same(td: TensorDictBase, snap: dict) -> bool:
    items = dict(td.items(include_nested=True, leaves_only=True))
    return items.keys() == snap.keys() and all(torch.equal(items[k], snap[k]) for k in snap)


def group_key(fmt: str, rounding: str | None = None) -> str:
    """The state group name of a format with its default block size (and its default rounding)."""
    from lowbit_fn.transforms._moments import DEFAULT_ROUNDING, group_name

    f = lowbit_fn.FORMATS[fmt]
    return group_name(f, f.default_block_size, rounding or DEFAULT_ROUNDING[fmt])
