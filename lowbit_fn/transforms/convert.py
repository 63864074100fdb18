"""``convert_state``: a functional state of lowbit_fn 0.1.0's flat layout as a state of today's row layout."""

from __future__ import annotations

import torch
from tensordict import TensorDictBase
from torch import Tensor

from .._random import tensor_id
from ..formats import FORMATS, dequantize, quantize
from ._tree import Key, build, leaves, name
from ._moments import parse_group_name
from .base import GradientTransformation

__all__ = ["convert_state"]

_SIGNED = {"mu": True, "nu": False, "nu_max": False}


def _adam_prefixes(state: TensorDictBase) -> list[Key]:
    keys = [k if isinstance(k, tuple) else (k,) for k in state.keys(include_nested=True, leaves_only=True)]
    return sorted({k[: k.index("layout")] for k in keys if "layout" in k})


def _old_moments(old: TensorDictBase, keys: list[Key], layout: list[Tensor]) -> dict[Key, dict[str, Tensor]]:
    """Every parameter's moments (float32 or float64, its shape) from a 0.1.0 Adam state: each group's flat
    buffers hold its parameters end to end in key order, those of a quantized group padded to whole blocks; the
    quantized group held the parameters with at least ``min_quant_size`` elements, found from the buffer sizes."""
    groups = [g for g in old.keys() if g not in ("count", "layout")]
    quant = [g for g in groups if parse_group_name(g) is not None]
    shapes = [t.shape[1:] for t in layout]
    numels = [s.numel() for s in shapes]
    threshold: float = float("inf")
    if quant:
        fmt_name, block, _ = parse_group_name(quant[0])
        blocks = old[quant[0], "mu", "scale"].numel()
        for threshold in sorted(set(numels)) + [float("inf")]:
            if sum(FORMATS[fmt_name].num_blocks(n, block) for n in numels if n >= threshold) == blocks:
                break
        else:
            raise ValueError("convert_state: the quantized group's size fits no split of the parameters")
    members: dict[str, list[int]] = {g: [] for g in groups}
    for i, n in enumerate(numels):
        group = quant[0] if n >= threshold else ("fp64" if layout[i].dtype == torch.float64 else "fp32")
        if group not in members:
            raise ValueError(f"convert_state: no state group {group!r} for parameter {name(keys[i])!r}")
        members[group].append(i)
    out: dict[Key, dict[str, Tensor]] = {}
    for group, idx in members.items():
        parsed = parse_group_name(group)
        offset = 0
        for i in idx:
            n, values = numels[i], {}
            for moment in old[group].keys():
                if parsed is None:
                    values[moment] = old[group, moment][offset : offset + n].view(shapes[i])
                    continue
                fmt_name, block, rounding = parsed
                fmt = FORMATS[fmt_name]
                nb, first = fmt.num_blocks(n, block), offset // block
                codes = old[group, moment, "codes"][first * block // fmt.codes_per_byte:][: -(-n // fmt.codes_per_byte)]
                value = dequantize(codes.contiguous(), old[group, moment, "scale"][first : first + nb].contiguous(), fmt_name,
                                   signed=_SIGNED[moment], shape=(n,), block_size=block).view(shapes[i])
                values[moment] = value * value if rounding == "stochastic" and moment != "mu" else value
            out[keys[i]] = values
            offset += n if parsed is None else fmt.num_blocks(n, parsed[1]) * parsed[1]
    return out


def convert_state(state: TensorDictBase, transform: GradientTransformation) -> TensorDictBase:
    """A state made by lowbit_fn 0.1.0 (moments in flat buffers, blocks over the flattened tensors) as the state
    ``transform`` (the transform that will continue with it) makes today: every moment dequantized from the old
    layout and quantized into ``transform``'s format and row layout. Other entries (schedule counts, step counts)
    are kept. A state already in today's layout is returned as it is.

    Example:
        >>> import torch, lowbit_fn
        >>> opt = lowbit_fn.adamw(1e-3)
        >>> state = opt.init({"w": torch.zeros(64, 64)})
        >>> lowbit_fn.convert_state(state, opt) is state  # already today's layout
        True
    """
    old_prefixes = _adam_prefixes(state)
    if not old_prefixes:
        raise ValueError("convert_state: the state holds no scale_by_adam state (no 'layout' entry)")
    old_adam = state[old_prefixes[0]] if old_prefixes[0] else state
    groups = [old_adam[g] for g in old_adam.keys() if g not in ("count", "layout")]
    if not any(isinstance(g["mu"], Tensor) or isinstance(g["mu"].get("codes", None), Tensor) for g in groups):
        return state  # already the row layout
    keys, layout = leaves(old_adam["layout"])
    new = transform.init(build(keys, [torch.zeros(t.shape[1:], dtype=t.dtype, device=t.device) for t in layout]))
    new_prefixes = _adam_prefixes(new)
    if new_prefixes != old_prefixes:
        raise ValueError(f"convert_state: the state's Adam part is at {old_prefixes}, the transform's at {new_prefixes}")
    new_adam = new[new_prefixes[0]] if new_prefixes[0] else new
    count = old_adam["count"]
    moments = _old_moments(old_adam, keys, layout)
    for key, values in moments.items():  # a NaN scale (or value) would carry over into the new codes
        for moment, value in values.items():
            if not bool(torch.isfinite(value).all()) or (not _SIGNED[moment] and bool((value < 0).any())):
                bad = "NaN or infinite" if not bool(torch.isfinite(value).all()) else "negative"
                raise ValueError(f"convert_state: the {moment} of parameter {name(key)!r} holds {bad} values (corrupt state)")
    for group in [g for g in new_adam.keys() if g not in ("count", "layout")]:
        parsed = parse_group_name(group)
        for moment in new_adam[group].keys():
            for path, _ in new_adam[group, moment].items(include_nested=True, leaves_only=True):
                path = path if isinstance(path, tuple) else (path,)
                key = path if parsed is None else path[:-1]
                if parsed is not None and path[-1] != "codes":
                    continue
                value = moments[key].get(moment, moments[key]["nu"])  # amsgrad added: the max starts at v
                if parsed is None:
                    new_adam[(group, moment) + key].copy_(value)
                    continue
                fmt_name, block, rounding = parsed
                stochastic = rounding == "stochastic"
                value = value.sqrt() if stochastic and moment != "mu" else value
                codes, scale = quantize(value.float(), fmt_name, signed=_SIGNED[moment], block_size=block, rounding=rounding,
                                        step=int(count), tensor_id=tensor_id(name(key)))
                new_adam[(group, moment) + key + ("codes",)].copy_(codes)
                new_adam[(group, moment) + key + ("scale",)].copy_(scale)
    new_adam["count"].copy_(count)
    prefix = old_prefixes[0]
    targets = {k if isinstance(k, tuple) else (k,): v for k, v in new.items(include_nested=True, leaves_only=True)}
    for path, value in state.items(include_nested=True, leaves_only=True):  # the other members' entries
        path = path if isinstance(path, tuple) else (path,)
        if path[: len(prefix)] != prefix and path in targets and targets[path].shape == value.shape:
            targets[path].copy_(value)
    return new
