"""torch.optim front end: any transform factory as a ``torch.optim.Optimizer`` (the drop-in classes of
:mod:`lowbit_fn.optimizers` are built on it), and checkpoints that move between state formats and to and from
``torch.optim``'s Adam, AdamW, SGD, RMSprop and Muon.

How it maps onto the functional core:

- Each param group builds its own transform from the factory. The group's ``lr``, ``betas``, ``eps`` and
  ``weight_decay`` are copied into 0-d tensors that the transform holds, before every step: schedulers and hand
  edits take effect at the next step and never recompile. Other factory arguments (``state_format``,
  ``block_size``, ``amsgrad``, ...) may differ per group; changing one rebuilds the group's transform and converts
  its states at the next step.
- Each parameter has its own core state (the same TensorDict layout as the functional API, for one tensor), as
  torch.optim keeps per-parameter state: a parameter without a gradient is skipped and its step count does not
  advance. ``optimizer.state[p]`` is that state under torch's names, sharing its storage:
  ``step``; ``exp_avg``/``exp_avg_sq``/``max_exp_avg_sq`` for full-precision moments (exactly torch's keys);
  ``exp_avg_codes``/``exp_avg_scale``/... plus ``state_format`` and ``block_size`` for quantized ones.
- bfloat16 and float16 parameters are updated in float32 and written back rounded to nearest, or stochastically
  (bfloat16, ``bf16_stochastic_round=True``) with counter-based random bits: reproducible and resumable.
- DTensor parameters sharded by rows (FSDP2's ``Shard(0)``): each rank steps its local rows, with the layout
  decided from the global shape and random bits drawn by global element index; ``optimizer.state[p]`` holds
  DTensors of the global sizes (see :mod:`lowbit_fn._sharding`), which ``torch.distributed.checkpoint`` saves and
  reshards. ``state_dict()`` writes ``state_format`` and ``rounding`` as ids, so checkpoints hold only tensors
  and numbers.
"""

from __future__ import annotations

import inspect
import math
from collections import defaultdict
from copy import deepcopy
from dataclasses import replace
from typing import Any, Callable, Iterable

import torch
from tensordict import TensorDictBase
from torch import Tensor

from ._random import stream_key, tensor_key
from ._sharding import Sharding, as_dtensor, is_dtensor, local, local_entry, sharding_of
from .formats import FORMATS, ROUNDINGS, canonical_codes, dequantize, quantize, row_split
from .kernels import Epilogue, Item, moment_step
from .kernels.reference import PARAM_STREAM, round_to
from .transforms import (Chain, GradientTransformation, MomentTransformation, adam, adamw, ademamix, lion, muon,
                         rmsprop, sgd)
from .transforms.muon import MuonTransformation
from .transforms._moments import parse_group_name
from .transforms.alias import FusedChain
from .transforms.conditionality import all_finite

__all__ = ["TransformOptimizer", "as_torch_optimizer", "to_torch_state_dict"]

# factory argument -> torch param-group key; these become 0-d tensors refreshed from the group before each step
_TORCH_NAMES = {"learning_rate": "lr", "eps": "eps", "weight_decay": "weight_decay", "momentum": "momentum",
                "dampening": "dampening", "alpha": "alpha"}
_BETAS = ("b1", "b2", "b3")
# whether a moment (by its torch.optim name, the same meaning in every optimizer) takes negative values; unsigned
# ones are second moments, stored as their square roots with stochastic rounding
_SIGNED = {"exp_avg": True, "exp_avg_slow": True, "momentum_buffer": True, "grad_avg": True, "exp_avg_sq": False,
           "max_exp_avg_sq": False, "square_avg": False, "grad_var": False}
# centered RMSprop keeps the variance grad_var where torch keeps square_avg = grad_var + grad_avg**2: one moment
# under two names, converted on load (either way) and by to_torch_state_dict
_SAME_MOMENT = {"grad_var": "square_avg"}
# hyperparameters whose zero value means "no such state" (momentum: no buffer): a change to or from 0 rebuilds
_ZERO_IS_STRUCTURAL = ("momentum",)
_META = ("state_format", "block_size", "rounding")
# how state_dict() writes the two string-valued entries of a quantized parameter's state: checkpoints hold only
# tensors and numbers (torch.distributed.checkpoint's flatten_optimizer_state_dict=True, which torchtitan uses,
# refuses strings); load_state_dict reads both forms
STATE_FORMAT_IDS = {"8bit": 1, "4bit": 2, "fp8": 3}
ROUNDING_IDS = {"nearest": 0, "stochastic": 1}
_CODES = {"state_format": STATE_FORMAT_IDS, "rounding": ROUNDING_IDS}
_NAMES = {key: {v: k for k, v in ids.items()} for key, ids in _CODES.items()}


def _encoded(entry: dict[str, Any]) -> dict[str, Any]:
    """A state entry as state_dict() saves it: ``state_format`` and ``rounding`` as their ids."""
    if not any(isinstance(entry.get(k), str) for k in _CODES):
        return entry
    return {k: _CODES[k].get(v, v) if k in _CODES and isinstance(v, str) else v for k, v in entry.items()}


def _decoded(entry: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint entry with ``state_format`` and ``rounding`` as names (ids, also as 0-d tensors, are mapped;
    unknown ids stay as they are and are refused by the checks that read them)."""
    out = dict(entry)
    for key, names in _NAMES.items():
        value = out.get(key)
        if isinstance(value, Tensor) and value.numel() == 1 and not value.is_floating_point():
            value = int(value)
        if isinstance(value, int) and not isinstance(value, bool):
            out[key] = names.get(value, value)
    return out
# torch.optim.Adam/AdamW group flags: accepted in a loaded checkpoint (at their defaults), never stored here
_TORCH_FLAGS = {"foreach": None, "maximize": False, "capturable": False, "differentiable": False, "fused": None}
_KEY = "param"  # the single leaf of a per-parameter core state


class _Spec:
    """How a factory's keyword arguments map onto param-group keys."""

    def __init__(self, factory: Callable[..., GradientTransformation]):
        if not callable(factory):
            raise TypeError(f"factory must be a transform factory such as lowbit_fn.adamw, got {type(factory).__name__}")
        sig = inspect.signature(factory)
        kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        self.args = {n: p.default for n, p in sig.parameters.items() if p.kind in kinds}
        self.betas = tuple(n for n in _BETAS if n in self.args) if "b1" in self.args and "b2" in self.args else ()
        self.scalars = [n for n in self.args if n in _TORCH_NAMES or n in self.betas]
        self.structural = [n for n in self.args if n not in self.scalars]

    def defaults(self, hyperparams: dict[str, Any]) -> dict[str, Any]:
        """torch-style defaults from the factory's keyword arguments (its own defaults filled in)."""
        unknown = sorted(set(hyperparams) - set(self.args))
        if unknown:
            hint = {"lr": "learning_rate", "betas": ", ".join(self.betas) or "b1, b2"}
            extra = "; ".join(f"use {hint[n]!r} instead of {n!r}" for n in unknown if n in hint)
            raise TypeError(
                f"unknown hyperparameter(s) {unknown} for this factory; it accepts {sorted(self.args)}"
                + (f" ({extra})" if extra else "")
            )
        values = {**self.args, **hyperparams}
        missing = [n for n, v in values.items() if v is inspect.Parameter.empty]
        if missing:
            raise TypeError(f"missing required hyperparameter(s) {missing}")
        out: dict[str, Any] = {}
        for name, value in values.items():
            if name in self.betas:
                continue
            if name in self.scalars and callable(value):
                raise TypeError(f"{name} must be a number here; for a schedule use a torch.optim.lr_scheduler")
            out[_TORCH_NAMES.get(name, name) if name in self.scalars else name] = value
        if self.betas:
            out["betas"] = tuple(values[n] for n in self.betas)
        return out


def _check_group(group: dict[str, Any], where: str, nbetas: int = 2) -> None:
    """torch's validation of the hyperparameters, with the value in the message."""
    def number(key: str, value: Any) -> float:
        if isinstance(value, Tensor):
            if value.numel() != 1:
                raise ValueError(f"{where}: {key} must be a number or a 1-element tensor, got shape {tuple(value.shape)}")
            return float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{where}: {key} must be a number, got {type(value).__name__}")
        return float(value)

    for key in ("lr", "eps", "weight_decay", "momentum", "dampening", "alpha"):
        if key in group and not number(key, group[key]) >= 0.0:
            raise ValueError(f"{where}: invalid {key} {group[key]!r} (must be >= 0)")
    if "betas" in group:
        betas, n = group["betas"], nbetas
        if n == 0:
            raise ValueError(f"{where}: betas={betas!r}, but this optimizer has no betas (the settings of another optimizer?)")
        if not isinstance(betas, (tuple, list)) or len(betas) != n:
            what = "a pair (beta1, beta2)" if n == 2 else f"a tuple of {n} (beta1, ..., beta{n})"
            raise ValueError(f"{where}: betas must be {what}, got {betas!r}")
        for i, b in enumerate(betas):
            if not 0.0 <= number(f"betas[{i}]", b) < 1.0:
                raise ValueError(f"{where}: invalid beta parameter at index {i}: {b!r} (must be in [0, 1))")


class _Built:
    """A param group's transform and the 0-d tensors it reads its hyperparameters from."""

    def __init__(self, spec: _Spec, factory: Callable[..., GradientTransformation], group: dict[str, Any]):
        self.key = _structural_key(spec, group)
        self.scalars = {n: torch.zeros((), dtype=torch.float64) for n in spec.scalars}
        self.refresh(group)  # the factory sees the group's values (momentum 0: no buffer)
        self.transform = factory(**self.scalars, **{n: group[n] for n in spec.structural})
        if not isinstance(self.transform, GradientTransformation):
            raise TypeError(f"the factory returned {type(self.transform).__name__}, not a GradientTransformation")

    def refresh(self, group: dict[str, Any]) -> None:
        values = dict(group)
        if "betas" in group:
            values.update(zip(_BETAS, group["betas"]))
        for name, tensor in self.scalars.items():
            value = values[_TORCH_NAMES.get(name, name)]
            if isinstance(value, Tensor):
                tensor.copy_(value.detach().reshape(()))
            else:
                tensor.fill_(value)


def _structural_key(spec: _Spec, group: dict[str, Any]) -> tuple:
    zero = tuple(float(group[_TORCH_NAMES[n]]) == 0.0 for n in _ZERO_IS_STRUCTURAL if n in spec.scalars)
    return tuple(repr(group[n]) for n in spec.structural) + zero


# --------------------------------------------------------------------------------------------------------------
# one parameter's core state <-> torch's names


def moment_core(transform: GradientTransformation) -> MomentTransformation | None:
    """The transform's state codec core (a :class:`MomentTransformation`: its own, a fused alias's, or a chain's
    member's), whose moments ``optimizer.state`` shows under torch's names; ``None`` if it has none."""
    if isinstance(transform, MomentTransformation):
        return transform
    if isinstance(transform, (FusedChain, MuonTransformation)):
        return transform.core
    if isinstance(transform, Chain):
        found = [c for c in map(moment_core, transform.transforms) if c is not None]
        return found[0] if found else None
    return None


def _state_prefix(core: TensorDictBase) -> tuple[str, ...] | None:
    """Where the codec state (the sub-TensorDict with ``layout`` and ``count``) sits in a chain's state."""
    found = set()
    for path in core.keys(include_nested=True, leaves_only=True):
        path = path if isinstance(path, tuple) else (path,)
        if "layout" in path:
            found.add(path[: path.index("layout")])
    if len(found) > 1:
        raise ValueError("as_torch_optimizer supports transforms with at most one moment transform (scale_by_adam, ...) in them")
    return next(iter(found), None)


def _entries(core: TensorDictBase, shape: torch.Size, names: dict[str, str]) -> dict[str, Any]:
    """The torch-named view of one parameter's core state: ``{name: tensor}`` sharing storage, plus metadata
    (``names``: the moments' torch names by their functional ones)."""
    prefix = _state_prefix(core)
    out: dict[str, Any] = {}
    for path, value in core.items(include_nested=True, leaves_only=True):
        path = path if isinstance(path, tuple) else (path,)
        if prefix is not None and path[: len(prefix)] == prefix:
            rest = path[len(prefix):]
            if rest[0] == "layout":
                continue
            if rest == ("count",):
                out["step"] = value
                continue
            group, moment, part = rest[0], names[rest[1]], rest[3:]  # rest[2] is the parameter's key
            quant = parse_group_name(group)
            if quant is None:
                out[moment] = value
            else:
                out[f"{moment}_{part[0]}"] = value
                out["state_format"], out["block_size"], out["rounding"] = quant
            continue
        out[".".join(path)] = value
    return out


def _label(group_index: int, index: int, group: dict[str, Any], param: Tensor) -> str:
    names = group.get("param_names")
    where = f"param_groups[{group_index}]['params'][{index}]"
    if names is not None and index < len(names):
        where = f"{names[index]!r} ({where})"
    return f"parameter {where} of shape {list(param.shape)}"


# the largest step count a checkpoint may hold: int64 counters, with room for the steps still to come
_MAX_STEP = 2**62


def _step_value(entry: dict[str, Any], label: str) -> int:
    """The checkpoint entry's step count: a whole number >= 0 (an int, an integral float, or a 1-element tensor
    of either; a bool is refused, as it is no count)."""
    if "step" not in entry and isinstance(entry.get("momentum_buffer"), Tensor) and not any(
        _holds(entry, n) for n in _SIGNED if n != "momentum_buffer"
    ):
        return 1  # torch.optim.SGD and Muon keep no step count: their buffers are past the first update
    if "step" not in entry:
        raise ValueError(f"{label}: the checkpoint has no 'step' (keys: {sorted(entry)})")
    step = value = entry["step"]
    if isinstance(step, Tensor):
        value = step.item() if step.numel() == 1 and step.dtype != torch.bool and not step.is_complex() else None
    whole = isinstance(value, int) and not isinstance(value, bool) or (
        isinstance(value, float) and math.isfinite(value) and value == int(value)
    )
    if not whole or not 0 <= value < _MAX_STEP:
        got = f"a {step.dtype} tensor of shape {list(step.shape)}" if isinstance(step, Tensor) and value is None else repr(step)
        raise ValueError(f"{label}: 'step' must be a whole number >= 0 (below 2**62), got {got}")
    return int(value)


def _check_values(value: Tensor, name: str, signed: bool, label: str, what: str) -> None:
    """Raise for a moment from a checkpoint that holds NaN or infinite values, or negative ones where it is a
    second moment (never negative; stored as its square root under stochastic rounding, equally never negative):
    training from it would go NaN at the next step."""
    if not bool(torch.isfinite(value).all()):
        kinds = [k for k, bad in (("NaN", torch.isnan(value)), ("infinite", torch.isinf(value))) if bool(bad.any())]
        raise ValueError(f"{label}: {what} holds {' and '.join(kinds)} values (corrupt checkpoint)")
    if not signed and bool((value < 0).any()):
        raise ValueError(f"{label}: {what} holds negative values, but {name!r} is a second moment, never negative (corrupt checkpoint)")


def _check_meta(entry: dict[str, Any], label: str) -> None:
    """Raise for a quantized entry's ``state_format``, ``block_size`` or ``rounding`` of the wrong kind (after
    :func:`_decoded`): the name of a format, a positive int that the format accepts, the name of a rounding.
    Checked before anything reads them (a block size of 0 would divide by zero, a list would not hash)."""
    fmt, block, rounding = entry.get("state_format"), entry.get("block_size"), entry.get("rounding")
    if "state_format" in entry and not (isinstance(fmt, str) and fmt in FORMATS):
        raise ValueError(f"{label}: unknown state_format {fmt!r} in the checkpoint (expected one of {list(FORMATS)})")
    if "block_size" in entry:
        if isinstance(block, bool) or not isinstance(block, int) or block <= 0:
            raise ValueError(f"{label}: block_size in the checkpoint must be a positive int, got {block!r}")
        if isinstance(fmt, str):
            try:
                FORMATS[fmt].check_block_size(block)
            except ValueError as err:
                raise ValueError(f"{label}: the checkpoint's {err}") from None
    if "rounding" in entry and not (isinstance(rounding, str) and rounding in ROUNDINGS):
        raise ValueError(f"{label}: unknown rounding {rounding!r} in the checkpoint (expected one of {list(ROUNDINGS)})")


def _moment(entry: dict[str, Any], name: str, shape: torch.Size, label: str) -> Tensor:
    """A moment from a checkpoint entry as a float tensor of ``shape`` (dequantized when stored quantized)."""
    if name in entry:
        value = entry[name]
        if not isinstance(value, Tensor) or not value.is_floating_point() or value.numel() != shape.numel():
            got = f"{value.dtype}{list(value.shape)}" if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(f"{label}: {name!r} in the checkpoint is {got}, expected {shape.numel()} floating values")
        _check_values(value, name, _SIGNED[name], label, f"{name!r} in the checkpoint")
        return value.reshape(shape)  # another float dtype (float16, bfloat16, float64) is cast by the caller
    if f"{name}_codes" in entry:
        codes, scale = entry[f"{name}_codes"], entry.get(f"{name}_scale")
        fmt, block = entry.get("state_format"), entry.get("block_size")
        _check_meta(entry, label)
        if fmt is None or block is None:
            raise ValueError(f"{label}: quantized {name!r} without a valid state_format/block_size ({fmt!r}, {block!r})")
        if not isinstance(scale, Tensor):
            raise ValueError(f"{label}: the checkpoint has {name}_codes but no {name}_scale tensor")
        if scale.dtype == torch.float32:  # (another dtype is refused by dequantize below)
            # a block's scale is its largest magnitude: >= 0 and finite (exactly 0 for an all-zero block)
            kinds = [k for k, bad in (("NaN", torch.isnan(scale)), ("negative", scale < 0), ("infinite", torch.isinf(scale)))
                     if bool(bad.any())]
            if kinds:
                raise ValueError(f"{label}: {name}_scale holds {' and '.join(kinds)} block scales (corrupt checkpoint)")
        rounding = entry.get("rounding", "nearest")  # checkpoints from before stochastic rounding hold nearest codes
        try:
            if isinstance(codes, Tensor) and _is_flat_v010(codes, scale, fmt, block, shape):
                per = FORMATS[fmt].codes_per_byte  # 0.1.0: one padded row of every element (blocks over the flat tensor)
                flat = dequantize(codes[: -(-shape.numel() // per)], scale, fmt, signed=_SIGNED[name], shape=(shape.numel(),), block_size=block)
                value = flat.view(shape)
            else:
                value = dequantize(codes, scale, fmt, signed=_SIGNED[name], shape=shape, block_size=block)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{label}: corrupt {name} in the checkpoint: {err}") from None
        _check_values(value, name, _SIGNED[name], label, f"{name}_codes (decoded)")  # FP8 has NaN and negative codes
        return value * value if rounding == "stochastic" and not _SIGNED[name] else value  # v stored as sqrt(v)
    if name == "max_exp_avg_sq":  # saved without amsgrad: the running max starts at the current second moment
        return _moment(entry, "exp_avg_sq", shape, label)
    if name in ("square_avg", "grad_var") and _holds(entry, "grad_avg"):
        avg = _moment(entry, "grad_avg", shape, label)
        if name == "square_avg" and _holds(entry, "grad_var"):  # a centered checkpoint of ours
            return _moment(entry, "grad_var", shape, label) + avg * avg
        if name == "grad_var" and _holds(entry, "square_avg"):  # torch's centered RMSprop
            return torch.clamp_min(_moment(entry, "square_avg", shape, label) - avg * avg, 0.0)
    torch_form = " (nor torch's 'square_avg' and 'grad_avg')" if name == "grad_var" else ""
    raise ValueError(f"{label}: the checkpoint has no {name!r}{torch_form} (keys: {sorted(entry)})")


def _droppable(mine: set[str]) -> set[str]:
    """Moments that a checkpoint of the same optimizer with a feature on may hold and this one, with it off, does
    not keep (``mine``: the moments it keeps, under torch's names): Adam's ``max_exp_avg_sq`` (amsgrad), RMSprop's
    ``grad_avg`` (centered) and ``momentum_buffer`` (momentum), SGD's ``momentum_buffer`` (momentum). They are
    dropped on load; any other moment this optimizer lacks means a checkpoint of another optimizer."""
    out = set()
    if "exp_avg_sq" in mine and "exp_avg_slow" not in mine:  # Adam (AdEMAMix has no amsgrad)
        out.add("max_exp_avg_sq")
    if "square_avg" in mine:  # RMSprop
        out |= {"grad_avg", "momentum_buffer"}
    if mine <= {"momentum_buffer"}:  # SGD (none kept without momentum)
        out.add("momentum_buffer")
    return out


def _holds(entry: dict[str, Any], name: str) -> bool:
    return name in entry or f"{name}_codes" in entry


def _check_moments(entry: dict[str, Any], transform: GradientTransformation, label: str) -> None:
    """Raise for a checkpoint entry holding moments of another optimizer (e.g. Adam's ``exp_avg_sq`` for Lion)."""
    core = moment_core(transform)
    kept = set(core.torch_names) if core is not None else set()
    mine = {_SAME_MOMENT.get(n, n) for n in kept}  # grad_var and torch's square_avg: one moment
    allowed = mine | _droppable(mine)
    foreign = sorted(n for n in _SIGNED if _holds(entry, n) and _SAME_MOMENT.get(n, n) not in allowed)
    if foreign:  # named as the checkpoint names them
        raise ValueError(
            f"{label}: the checkpoint holds {foreign}, which this optimizer does not keep (it keeps {sorted(kept)}): "
            "a checkpoint of another optimizer?"
        )


def _is_flat_v010(codes: Tensor, scale: Any, fmt: str, block: int, shape: torch.Size) -> bool:
    """Whether quantized codes are in lowbit_fn 0.1.0's layout (flat, blocks over the flattened tensor, the last
    one padded) for a parameter of ``shape`` whose row layout differs."""
    f = FORMATS[fmt]
    nb = f.num_blocks(shape.numel(), block)
    return (codes.dim() == 1 and isinstance(scale, Tensor) and scale.shape == (nb,)
            and codes.numel() == f.code_bytes(nb, block) and codes.shape != f.code_shape(shape))


def _aligned_v010(entry: dict[str, Any], moment: str, shape: torch.Size) -> bool:
    """Whether a moment's 0.1.0 flat codes have exactly today's blocks: rows of a whole number of blocks (then the
    flat codes and scales are today's, reshaped)."""
    fmt, block = entry.get("state_format"), entry.get("block_size")
    return (len(shape) >= 2 and fmt in FORMATS and isinstance(block, int) and (shape.numel() // shape[0]) % block == 0
            and _is_flat_v010(entry[f"{moment}_codes"], entry.get(f"{moment}_scale"), fmt, block, shape))


def _restore(core: TensorDictBase, entry: dict[str, Any], shape: torch.Size, names: dict[str, str], label: str) -> None:
    """Fill a freshly initialized core state from a checkpoint entry of any format (bit-exact when it matches)."""
    target = _entries(core, shape, names)
    _check_meta(entry, label)
    # what a checkpoint entry may hold: this state's keys, and any moment of the family under torch's names, full
    # precision or quantized (converted, or dropped as _droppable), with its step count and quantization metadata
    known = set(target) | {"step", *_META} | {f"{n}{part}" for n in _SIGNED for part in ("", "_codes", "_scale")}
    unknown = sorted(map(str, set(entry) - known))
    if unknown:
        raise ValueError(f"{label}: the checkpoint's state holds unknown entries {unknown} (keys this optimizer reads: "
                         f"{sorted(k for k in target if k not in _META)}); a corrupt or foreign checkpoint?")
    done = set()
    for name, dest in target.items():
        if name in _META or name in done:
            continue
        if name == "step":
            dest.fill_(_step_value(entry, label))
        elif name in _SIGNED:
            dest.copy_(_moment(entry, name, shape, label))
        elif name.endswith("_codes"):
            moment = name[: -len("_codes")]
            codes, scale = target[name], target[f"{moment}_scale"]
            same = all(entry.get(k) == target[k] for k in _META) and f"{moment}_codes" in entry
            src = entry.get(name)
            if same and isinstance(src, Tensor) and src.shape != codes.shape and _aligned_v010(entry, moment, shape):
                entry = {**entry, name: src.view(codes.shape), f"{moment}_scale": entry[f"{moment}_scale"].view(scale.shape)}
            same = same and isinstance(entry[name], Tensor) and entry[name].shape == codes.shape
            if same:
                src_c, src_s = entry[name], entry.get(f"{moment}_scale")
                _moment(entry, moment, shape, label)  # validates sizes, dtypes and scales
                # as the encoder writes them (an FP8 second moment saved as 0 in a block with a positive scale, by
                # an encoder without the floor: the floor's code)
                if codes.numel():  # (an empty shard, e.g. a rank without rows, has no codes to look at)
                    rows, _ = row_split(shape)
                    src_c = canonical_codes(src_c.reshape(rows, -1), src_s.reshape(rows, -1),
                                            FORMATS[target["state_format"]], target["block_size"], signed=_SIGNED[moment])
                codes.copy_(src_c.reshape(codes.shape))
                scale.copy_(src_s)
            else:  # convert: dequantize the checkpoint's moment, quantize it with this state's scheme
                value = _moment(entry, moment, shape, label)
                stochastic = target["rounding"] == "stochastic"
                if stochastic and not _SIGNED[moment]:
                    value = value.float().sqrt()
                c, s = quantize(
                    value, target["state_format"], signed=_SIGNED[moment], block_size=target["block_size"],
                    rounding=target["rounding"], step=_step_value(entry, label) if stochastic else 0,
                )
                codes.copy_(c)
                scale.copy_(s)
            done.add(f"{moment}_scale")
        else:
            src = entry.get(name)
            if not isinstance(src, Tensor) or src.shape != dest.shape:
                raise ValueError(f"{label}: the checkpoint has no tensor {name!r} of shape {list(dest.shape)}")
            dest.copy_(src)


def _check_sharded(param: Tensor, grad: Tensor, transform: GradientTransformation, label: str) -> Sharding | None:
    """The sharding of a DTensor parameter (``None`` for a plain one), after checking that its gradient is sharded
    the same way and that the transform steps sharded parameters (the fused elementwise aliases: row-local
    state)."""
    sharding = sharding_of(param, label)
    if sharding is None:
        if is_dtensor(grad):
            raise ValueError(f"{label}: the gradient is a DTensor, the parameter a plain tensor")
        return None
    if is_dtensor(grad) and grad.device_mesh != param.device_mesh:
        raise ValueError(
            f"{label}: the gradient is a DTensor on another device mesh (ranks {grad.device_mesh.mesh.tolist()}) than "
            f"the parameter (ranks {param.device_mesh.mesh.tolist()})"
        )
    if not is_dtensor(grad) or tuple(grad.placements) != sharding.placements:
        got = f"placements {list(grad.placements)}" if is_dtensor(grad) else "a plain tensor"
        raise ValueError(f"{label}: the gradient is {got}, not sharded like the parameter ({list(sharding.placements)} on its mesh)")
    if not isinstance(transform, FusedChain):
        raise TypeError(
            f"{label}: DTensor (sharded) parameters are stepped by the elementwise factories (adam, adamw, lion, sgd, "
            "rmsprop, ademamix and their drop-in classes); other factories step one parameter at a time through "
            "their own update, which does not see shards (Muon needs whole matrices: keep its parameters unsharded)"
        )
    return sharding


def evaluate_closure(closure: Callable[[], Any] | None) -> Any:
    """``closure()`` with gradients enabled (``step`` itself runs under ``no_grad``), or ``None``."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def load_pre_hooks(optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
    """A shallow copy of ``state_dict`` passed through the optimizer's load-state-dict pre-hooks, as torch does."""
    state_dict = state_dict.copy()
    for hook in optimizer._optimizer_load_state_dict_pre_hooks.values():
        result = hook(optimizer, state_dict)
        if result is not None:
            state_dict = result
    return state_dict


def _work_dtype(param: Tensor) -> torch.dtype:
    return param.dtype if param.dtype in (torch.float32, torch.float64) else torch.float32


def _record(param: Tensor, transform: GradientTransformation, entry: dict | None, label: str) -> tuple:
    """A new core state for ``param`` (restored from ``entry`` when given) and its torch-named view.

    For a parameter sharded by rows (a DTensor, see :mod:`lowbit_fn._sharding`) the core state holds the local
    rows, laid out as decided from the global shape (so every rank agrees), and the view shows them as DTensors of
    the global sizes."""
    sharding = sharding_of(param, label)
    if sharding is None:
        template = torch.empty((), dtype=_work_dtype(param), device=param.device).expand(param.shape)
        core = transform.init({_KEY: template})
        shape = param.shape
    else:
        core, shape = _local_core(param, transform, sharding), param.to_local().shape
        entry = local_entry(entry, sharding, label) if entry else entry
    mc = moment_core(transform)
    names = dict(zip(mc.moments, mc.torch_names)) if mc is not None else {}
    if entry:
        _restore(core, entry, shape, names, label)
    fresh = _entries(core, shape, names)
    if sharding is not None:
        fresh = {k: as_dtensor(v, sharding) if isinstance(v, Tensor) else v for k, v in fresh.items()}
    return fresh, tuple((k, v) for k, v in fresh.items() if isinstance(v, Tensor)), transform, core


def _local_core(param: Tensor, transform: GradientTransformation, sharding: Sharding) -> TensorDictBase:
    """The core state of a sharded parameter's local rows: initialized for the global shape on the meta device
    (no memory), then each state tensor made with the local rows (every state tensor's first dimension is the
    parameter's rows; a fresh Adam state is all zeros)."""
    device = param.to_local().device
    template = torch.empty((), dtype=_work_dtype(param), device="meta").expand(param.shape)
    rows = param.shape[0]

    def made(t: Tensor) -> Tensor:
        if t.dim() >= 1 and t.shape[0] == rows and t.numel():
            return torch.zeros((sharding.rows, *t.shape[1:]), dtype=t.dtype, device=device)
        return torch.zeros(t.shape, dtype=t.dtype, device=device)

    return transform.init({_KEY: template}).apply(made)


_QUANT_PARTS = ("codes", "scale")


def _fused_step(transform: FusedChain, jobs: list[tuple[Tensor, Tensor, dict[str, Any], bool, int, int]]) -> None:
    """``p += update(p.grad)`` in place for ``(param, grad, state entry, stochastic rounding, identity, base)``
    jobs (local tensors of sharded parameters, ``base`` the global index of their first element): one
    :func:`lowbit_fn.kernels.moment_step` call per state kind (quantized or not) and rounding, on the tensors of
    ``optimizer.state``; the step counts advance after it."""
    core = transform.core
    lr = transform.learning_rate
    factor = -lr if isinstance(lr, Tensor) else -float(lr)
    calls: dict[tuple[bool, bool], list[Item]] = {}
    for p, g, entry, rounding, ident, base in jobs:
        quantized = "state_format" in entry
        names = [f"{m}_{part}" for m in core.torch_names for part in _QUANT_PARTS] if quantized else list(core.torch_names)
        moments = [local(entry[n]) for n in names]
        calls.setdefault((quantized, rounding), []).append(Item(g, moments, entry["step"] + 1, ident, p, base=base))
    for (quantized, rounding), items in calls.items():
        config = core.config if quantized else replace(core.config, fmt=None, block_size=0, stochastic=False)
        epilogue = Epilogue(transform.weight_decay, l2=not transform.decoupled, decoupled=transform.decoupled,
                            factor=factor, apply=True, param_sr=rounding)
        moment_step(config, items, core.hyper, epilogue)
    for _, _, entry, _, _, _ in jobs:
        entry["step"].add_(1)


def _check_saved_params(saved_groups: list[Any], groups: list[dict[str, Any]]) -> None:
    """Raise for checkpoint param groups that are not dicts, lack ``params``, or whose ``params`` do not name this
    optimizer's parameters: lists as long as its groups' of parameter ids, each an int in ``range(number of
    parameters)`` (what ``state_dict()`` writes) or a str (a parameter's name, what torch.distributed.checkpoint
    writes), none twice."""
    total = sum(len(g["params"]) for g in groups)
    seen: dict[int | str, int] = {}
    for gi, (group, saved) in enumerate(zip(groups, saved_groups)):
        where = f"param_groups[{gi}] of the checkpoint"
        if not isinstance(saved, dict):
            raise ValueError(f"{where} is a {type(saved).__name__}, not a dict")
        if "params" not in saved:
            raise ValueError(f"{where} has no 'params' (the parameters' indices; its keys: {sorted(map(str, saved))})")
        params = saved["params"]
        if not isinstance(params, (list, tuple)) or any(
            isinstance(i, bool) or not isinstance(i, (int, str)) for i in params
        ):
            raise ValueError(
                f"{where}: 'params' must be a list of parameter indices (ints, or names as torch.distributed.checkpoint "
                f"writes), got {params!r}"
            )
        if len(params) != len(group["params"]):
            raise ValueError(f"param_groups[{gi}] has {len(group['params'])} parameters, the checkpoint's {len(params)}")
        for i in params:
            if isinstance(i, int) and not 0 <= i < total:
                raise ValueError(f"{where}: parameter index {i} is out of range (this optimizer has {total} parameters)")
            if i in seen:
                raise ValueError(f"{where}: parameter {i!r} is listed twice (also in param_groups[{seen[i]}])")
            seen[i] = gi


_ELSEWHERE: set[str] = set()


def _group_keys_elsewhere() -> set[str]:
    """The param-group keys of the other optimizers a checkpoint may come from: lowbit_fn's factories (under
    torch's names) and torch.optim's Adam, AdamW, SGD, RMSprop and Muon. A checkpoint group holding one that this
    optimizer lacks (``ns_steps`` for SGD, ``dampening`` for Muon) is another optimizer's, even where the states
    look alike (SGD's and Muon's are both one momentum buffer). Keys of no optimizer (a scheduler's
    ``initial_lr``, a user's own) are kept, as torch.optim keeps them."""
    if not _ELSEWHERE:
        for factory in (adam, adamw, lion, sgd, rmsprop, ademamix, muon):
            spec = _Spec(factory)
            _ELSEWHERE.update(_TORCH_NAMES.get(n, n) for n in spec.args if n not in spec.betas)
            _ELSEWHERE.update(["betas"] if spec.betas else [])
        for cls in (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD, torch.optim.RMSprop, torch.optim.Muon):
            _ELSEWHERE.update(n for n in inspect.signature(cls.__init__).parameters if n not in ("self", "params"))
        _ELSEWHERE.difference_update(_TORCH_FLAGS, {"decoupled_weight_decay"})
    return _ELSEWHERE


class TransformOptimizer(torch.optim.Optimizer):
    """A ``torch.optim.Optimizer`` that runs a lowbit_fn transform factory (see :func:`as_torch_optimizer`)."""

    def __init__(
        self,
        factory: Callable[..., GradientTransformation],
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        *,
        bf16_stochastic_round: bool = False,
        max_consecutive_errors: int | None = None,
        **hyperparams: Any,
    ):
        if not isinstance(bf16_stochastic_round, bool):
            raise TypeError(f"bf16_stochastic_round must be a bool, got {type(bf16_stochastic_round).__name__}")
        if max_consecutive_errors is not None and (
            isinstance(max_consecutive_errors, bool) or not isinstance(max_consecutive_errors, int) or max_consecutive_errors < 0
        ):
            raise ValueError(f"max_consecutive_errors must be None or an int >= 0, got {max_consecutive_errors!r}")
        self.max_consecutive_errors = max_consecutive_errors
        # apply_if_finite's counters (optax's names): the current run of skipped steps, the last step's finiteness,
        # all skipped steps; saved in state_dict() under "apply_if_finite" when max_consecutive_errors is set
        self.apply_if_finite_state = {"notfinite_count": 0, "last_finite": True, "total_notfinite": 0}
        self._factory = factory
        self._spec = _Spec(factory)
        defaults = self._spec.defaults(hyperparams)
        defaults["bf16_stochastic_round"] = bf16_stochastic_round
        _check_group(defaults, type(self).__name__, len(self._spec.betas))
        self._reset_caches()
        super().__init__(params, defaults)

    def _reset_caches(self) -> None:
        self._built: dict[int, _Built] = {}
        # param -> (its state entry, the entry's tensors, the transform it was built for, the core state)
        self._cores: dict[Tensor, tuple[dict, tuple, GradientTransformation, TensorDictBase]] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), "_factory": self._factory, "max_consecutive_errors": self.max_consecutive_errors,
                "apply_if_finite_state": dict(self.apply_if_finite_state)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._spec = _Spec(self._factory)
        self._reset_caches()

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch's ``add_param_group``, plus a check of the group's hyperparameters and parameter dtypes."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        where = f"param_groups[{len(self.param_groups) - 1}]"
        try:
            _check_group(group, where, len(self._spec.betas))
            for i, p in enumerate(group["params"]):
                if p.dtype not in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
                    raise TypeError(f"{_label(len(self.param_groups) - 1, i, group, p)} has unsupported dtype {p.dtype}")
                if p.layout != torch.strided:
                    raise TypeError(f"{_label(len(self.param_groups) - 1, i, group, p)} is not a dense tensor")
            _Built(self._spec, self._factory, group)  # the factory accepts the group's arguments
        except Exception:
            self.param_groups.pop()
            raise

    def _built_for(self, index: int, group: dict[str, Any]) -> _Built:
        built = self._built.get(index)
        if built is None or built.key != _structural_key(self._spec, group):
            built = self._built[index] = _Built(self._spec, self._factory, group)
        return built

    def _core(self, param: Tensor, transform: GradientTransformation, gi: int, i: int, group: dict[str, Any]) -> tuple[tuple, bool]:
        """The parameter's cache record ``(entry, entry tensors, transform, core state)`` and whether it is new:
        rebuilt (converting the state) when its entry or its group's transform changed. Nothing is installed."""
        entry = self.state.get(param)
        cached = self._cores.get(param)
        if cached is not None and cached[0] is entry and cached[2] is transform and all(
            entry.get(k) is v for k, v in cached[1]
        ):
            return cached, False
        return _record(param, transform, entry, _label(gi, i, group, param)), True

    def _install(self, param: Tensor, record: tuple) -> None:
        self.state[param] = record[0]
        self._cores[param] = record

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One update of every parameter that has a gradient; returns the closure's loss (if given)."""
        loss = evaluate_closure(closure)
        jobs = []
        position = -1  # the parameter's index in state_dict(): its identity for stochastic rounding
        for gi, group in enumerate(self.param_groups):
            built = self._built_for(gi, group)
            built.refresh(group)
            for i, p in enumerate(group["params"]):
                position += 1
                if p.grad is None:
                    continue
                g = p.grad
                if g.layout != torch.strided:
                    raise TypeError(f"{_label(gi, i, group, p)}: sparse gradients are not supported")
                if g.shape != p.shape or g.dtype != p.dtype:
                    raise ValueError(
                        f"{_label(gi, i, group, p)}: gradient is {g.dtype}{list(g.shape)}, the parameter {p.dtype}{list(p.shape)}"
                    )
                if g.device != p.device:
                    raise ValueError(f"{_label(gi, i, group, p)}: gradient on {g.device}, the parameter on {p.device}")
                sharding = _check_sharded(p, g, built.transform, _label(gi, i, group, p))
                record, new = self._core(p, built.transform, gi, i, group)
                rounding = group["bf16_stochastic_round"] and p.dtype == torch.bfloat16
                if rounding and "step" not in record[0]:
                    raise ValueError(
                        f"{_label(gi, i, group, p)}: bf16_stochastic_round needs a transform with a step count (a moment transform such as scale_by_adam)"
                    )
                state_device = record[0]["step"].device if "step" in record[0] else p.device
                if state_device != p.device:
                    raise ValueError(f"{_label(gi, i, group, p)}: its state is on {state_device}, the parameter on {p.device}")
                jobs.append((p, g, built.transform, record, new, rounding, position, sharding))
        if self.max_consecutive_errors is not None and not self._count_step([job[1] for job in jobs]):
            return loss  # skipped before any state is made or written
        for p, _, _, record, new, _, _, _ in jobs:  # everything checked: from here on nothing raises for bad input
            if new:
                self._install(p, record)
        for transform in dict.fromkeys(job[2] for job in jobs):
            mine = [job for job in jobs if job[2] is transform]
            if isinstance(transform, FusedChain):  # the elementwise aliases: the kernel entry point, in place
                _fused_step(transform, [
                    (local(p), local(g), record[0], rounding, position, 0 if sharding is None else sharding.base)
                    for p, g, _, record, _, rounding, position, sharding in mine
                ])
                continue
            for p, g, _, record, _, rounding, position, _ in mine:  # any other transform, one parameter at a time
                work = p if _work_dtype(p) == p.dtype else p.to(_work_dtype(p))
                updates, _ = transform.update({_KEY: g.to(work.dtype)}, record[3], {_KEY: work}, inplace=True)
                work.add_(updates[_KEY])
                if work is not p:
                    key = tensor_key(stream_key(0, PARAM_STREAM, record[0]["step"]), position) if rounding else None
                    p.copy_(round_to(work.reshape(-1), p.dtype, key, torch.zeros((), dtype=torch.int64)).view(p.shape))
        return loss

    def _count_step(self, grads: list[Tensor]) -> bool:
        """apply_if_finite for the whole optimizer: counts the step; whether it runs (every gradient finite, or more
        than ``max_consecutive_errors`` non-finite steps in a row). Sharded gradients decide together: each rank
        checks its shard and the verdict is the minimum over each mesh, so all ranks skip or step alike."""
        finite = all_finite([local(g) for g in grads])
        meshes = {id(g.device_mesh): g.device_mesh for g in grads if is_dtensor(g)}
        if meshes:
            import torch.distributed as dist

            flag = torch.tensor([int(finite)], device=local(next(g for g in grads if is_dtensor(g))).device)
            for mesh in meshes.values():
                dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=mesh.get_group())
            finite = bool(flag.item())
        counts = self.apply_if_finite_state
        counts["notfinite_count"] = 0 if finite else counts["notfinite_count"] + 1
        counts["total_notfinite"] += 0 if finite else 1
        counts["last_finite"] = finite
        return finite or counts["notfinite_count"] > self.max_consecutive_errors

    def state_dict(self) -> dict[str, Any]:
        """torch's ``state_dict``, with each quantized parameter's ``state_format`` and ``rounding`` saved as ids
        (:data:`STATE_FORMAT_IDS`, :data:`ROUNDING_IDS`) so that a checkpoint holds only tensors and numbers; with
        ``max_consecutive_errors`` set, also ``"apply_if_finite"``: the skip counters."""
        saved = super().state_dict()
        saved["state"] = {k: _encoded(v) for k, v in saved["state"].items()}
        if self.max_consecutive_errors is not None:
            saved["apply_if_finite"] = dict(self.apply_if_finite_state)
        return saved

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a checkpoint of this optimizer, of another lowbit_fn format, or of ``torch.optim.Adam``/``AdamW``.

        Moments in the same format and block size are restored bit-exactly; others are converted (dequantized,
        then quantized into this optimizer's format). The group hyperparameters (``lr``, ``betas``, ...) come from
        the checkpoint, the state layout (``state_format``, ``block_size``, ``amsgrad``, ...) stays this
        optimizer's. Raises ``ValueError`` naming the parameter (or the param group) and the problem for a
        checkpoint that does not fit (other shapes; another optimizer's moments, betas or hyperparameters) or is
        corrupt (NaN, negative or infinite block scales, non-finite moments, tensors of another dtype or size, a
        bad ``step``/``state_format``/``block_size``/``rounding``, missing or unknown keys, param groups without
        valid ``params``), and then leaves the optimizer exactly as it was: everything is checked before
        anything is written. The README's checkpoint section lists what is accepted.
        """
        if not isinstance(state_dict, dict):
            raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
        state_dict = load_pre_hooks(self, state_dict)
        # everything is checked and built into new objects first; the optimizer is written only at the end, so
        # that a checkpoint refused at any point leaves it exactly as it was
        if not {"state", "param_groups"} <= set(state_dict):
            raise ValueError(f"not an optimizer state_dict: expected 'state' and 'param_groups', got {sorted(state_dict)}")
        if not isinstance(state_dict["param_groups"], (list, tuple)) or not isinstance(state_dict["state"], dict):
            got = {k: type(state_dict[k]).__name__ for k in ("state", "param_groups")}
            raise ValueError(f"not an optimizer state_dict: 'state' must be a dict and 'param_groups' a list, got {got}")
        saved_groups = deepcopy(list(state_dict["param_groups"]))
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"the checkpoint has {len(saved_groups)} parameter group(s), this optimizer {len(self.param_groups)}"
            )
        _check_saved_params(saved_groups, self.param_groups)
        groups, id_map = [], {}
        for gi, (group, saved) in enumerate(zip(self.param_groups, saved_groups)):
            if saved.get("maximize"):
                raise ValueError(f"param_groups[{gi}]: the checkpoint was saved with maximize=True, not supported")
            new = dict(group)
            keep = set(self._spec.structural) | {"params", "bf16_stochastic_round"}
            new.update({k: v for k, v in saved.items() if k not in keep and k not in _TORCH_FLAGS and k != "decoupled_weight_decay"})
            try:
                _check_group(new, f"param_groups[{gi}] of the checkpoint", len(self._spec.betas))
            except TypeError as err:  # a hyperparameter of the wrong type: in a checkpoint, a checkpoint that does not fit
                raise ValueError(str(err)) from None
            groups.append(new)
            id_map.update(zip(saved["params"], ((gi, i) for i in range(len(group["params"])))))
        state: defaultdict[Tensor, dict] = defaultdict(dict)
        cores = {}
        built = {}
        for gi, g in enumerate(groups):
            try:
                built[gi] = _Built(self._spec, self._factory, g)
            except (TypeError, ValueError) as err:
                raise ValueError(f"param_groups[{gi}] of the checkpoint: its hyperparameters do not build the transform: {err}") from None
        for key, entry in state_dict["state"].items():
            if isinstance(key, bool) or key not in id_map:
                raise ValueError(f"the checkpoint has state for parameter index {key!r}, which no param group lists")
            gi, i = id_map[key]
            p = groups[gi]["params"][i]
            if not isinstance(entry, dict):
                raise ValueError(f"{_label(gi, i, groups[gi], p)}: its state is a {type(entry).__name__}, not a dict")
            if not entry:
                continue
            _check_moments(entry, built[gi].transform, _label(gi, i, groups[gi], p))
            record = _record(p, built[gi].transform, _decoded(entry), _label(gi, i, groups[gi], p))
            state[p] = record[0]
            cores[p] = record
        for gi, (group, saved) in enumerate(zip(self.param_groups, saved_groups)):
            foreign = sorted(set(saved) & (_group_keys_elsewhere() - set(group)))
            if foreign:  # after the states: their messages (the moments another optimizer keeps) say more
                raise ValueError(
                    f"param_groups[{gi}] of the checkpoint has {foreign}, hyperparameters that this optimizer does not "
                    "have (those of another lowbit_fn or torch.optim optimizer): a checkpoint of another optimizer?"
                )
        counts = _finite_counts(state_dict.get("apply_if_finite"))
        self.param_groups[:] = groups
        self.state = state
        self._built = built
        self._cores = cores
        self.apply_if_finite_state = counts
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)


def _finite_counts(saved: Any) -> dict[str, Any]:
    """The apply_if_finite counters of a checkpoint (fresh ones when it has none), or ``ValueError``."""
    if saved is None:
        return {"notfinite_count": 0, "last_finite": True, "total_notfinite": 0}
    keys = {"notfinite_count", "last_finite", "total_notfinite"}
    if not isinstance(saved, dict) or set(saved) != keys:
        got = sorted(saved) if isinstance(saved, dict) else type(saved).__name__
        raise ValueError(f"the checkpoint's 'apply_if_finite' must hold {sorted(keys)}, got {got}")
    counts = {}
    for key in ("notfinite_count", "total_notfinite"):
        value = saved[key]
        value = value.item() if isinstance(value, Tensor) and value.numel() == 1 else value
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"the checkpoint's apply_if_finite[{key!r}] must be an int >= 0, got {saved[key]!r}")
        counts[key] = value
    last = saved["last_finite"]
    last = last.item() if isinstance(last, Tensor) and last.numel() == 1 else last
    if not isinstance(last, bool):
        raise ValueError(f"the checkpoint's apply_if_finite['last_finite'] must be a bool, got {saved['last_finite']!r}")
    counts["last_finite"] = last
    return counts


def as_torch_optimizer(
    factory: Callable[..., GradientTransformation],
    params: Iterable[Tensor] | Iterable[dict[str, Any]],
    *,
    bf16_stochastic_round: bool = False,
    max_consecutive_errors: int | None = None,
    **hyperparams: Any,
) -> TransformOptimizer:
    """Wrap a transform factory as a ``torch.optim.Optimizer``.

    ``hyperparams`` are the factory's keyword arguments. In the param groups, ``learning_rate`` appears under
    torch's name ``lr`` and ``b1``/``b2`` (``b3``) as ``betas``; ``momentum``, ``dampening`` and ``alpha`` keep
    their names, so LR schedulers (including ``OneCycleLR``'s momentum cycling), per-group settings and
    ``add_param_group`` work as with ``torch.optim``'s classes. The step runs the same transforms and kernels as
    the functional API on torch.optim's per-parameter state: for the fused elementwise factories (``adam``,
    ``adamw``, ``lion``, ``sgd``, ``rmsprop``, ``ademamix``) on the CPU, one native call per param group updates
    the parameters in place; other factories (``muon``, chains of your own) run one parameter at a time (transforms that couple parameters, such as ``clip_by_global_norm``, see one
    parameter here; clip with ``torch.nn.utils.clip_grad_norm_`` before ``step()`` instead).

    Args:
      factory: a transform factory, e.g. :func:`lowbit_fn.adamw`.
      params: parameters or param-group dicts, as for any ``torch.optim`` optimizer.
      bf16_stochastic_round: write bfloat16 parameters back with stochastic rounding (unbiased) instead of
        rounding to nearest. The update itself is always computed in float32.
      max_consecutive_errors: ``None`` (default): every step is applied, and a non-finite gradient element costs
        that element only (its parameter goes NaN, as in torch.optim). An int: :func:`lowbit_fn.apply_if_finite`
        for the whole optimizer: a ``step()`` where any gradient holds a NaN or Inf changes nothing (checked before
        any state is written), unless it is more than ``max_consecutive_errors`` such steps in a row; the counts
        are in ``optimizer.apply_if_finite_state`` (optax's names) and in ``state_dict()["apply_if_finite"]``. Costs
        one read of the gradients and one host synchronization per step; sharded gradients decide together.
      **hyperparams: the factory's keyword arguments.

    Returns:
      A :class:`TransformOptimizer`.

    Example:
        >>> import torch, lowbit_fn
        >>> model = torch.nn.Linear(128, 64)
        >>> opt = lowbit_fn.as_torch_optimizer(lowbit_fn.adamw, model.parameters(), learning_rate=1e-3,
        ...                                    weight_decay=0.01, state_format="4bit", min_quant_size=0)
        >>> model(torch.randn(8, 128)).square().mean().backward()
        >>> opt.step()
        >>> sorted(opt.state[model.weight])
        ['block_size', 'exp_avg_codes', 'exp_avg_scale', 'exp_avg_sq_codes', 'exp_avg_sq_scale', 'rounding', 'state_format', 'step']
    """
    return TransformOptimizer(
        factory, params, bf16_stochastic_round=bf16_stochastic_round, max_consecutive_errors=max_consecutive_errors,
        **hyperparams,
    )


# the torch.optim class each factory's checkpoints load into, and whether that class keeps a step count
_TORCH_CLASSES: dict[Callable[..., GradientTransformation], tuple[type[torch.optim.Optimizer], bool]] = {
    adam: (torch.optim.Adam, True), adamw: (torch.optim.AdamW, True), sgd: (torch.optim.SGD, False),
    rmsprop: (torch.optim.RMSprop, True), muon: (torch.optim.Muon, False),
}


def to_torch_state_dict(optimizer: TransformOptimizer) -> dict[str, Any]:
    """The optimizer's ``state_dict`` as the matching ``torch.optim`` optimizer would save it (``Adam``, ``AdamW``,
    ``SGD``, ``RMSprop``, ``Muon`` for the factories of those names and their drop-in classes): float32 moments
    under torch's names (dequantized; the float64 moments of float64 parameters as they are), a float32 ``step``
    where torch keeps one, and torch's group keys (ours, then torch's defaults for the flags we do not have), ready
    for that class's ``load_state_dict``.

    Example:
        >>> import torch, lowbit_fn
        >>> model = torch.nn.Linear(128, 64)
        >>> opt = lowbit_fn.AdamW8bit(model.parameters(), min_quant_size=0)
        >>> model(torch.randn(8, 128)).square().mean().backward()
        >>> opt.step()
        >>> reference = torch.optim.AdamW(model.parameters())
        >>> reference.load_state_dict(lowbit_fn.to_torch_state_dict(opt))
        >>> reference.state[model.weight]["exp_avg"].dtype
        torch.float32
    """
    known = _TORCH_CLASSES.get(optimizer._factory) if isinstance(optimizer, TransformOptimizer) else None
    if known is None:
        names = ", ".join(f"lowbit_fn.{f.__name__}" for f in _TORCH_CLASSES)
        raise ValueError(f"to_torch_state_dict needs an optimizer built from {names}")
    torch_class, keeps_step = known
    saved = optimizer.state_dict()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if any(is_dtensor(p) for p in params):
        raise ValueError(
            "to_torch_state_dict needs unsharded parameters; for DTensor (FSDP2) ones use torch.distributed.checkpoint's "
            "get_optimizer_state_dict(..., options=StateDictOptions(full_state_dict=True)) and load that instead"
        )
    state = {}
    for index, entry in saved["state"].items():
        if not entry:
            continue
        entry = _decoded(entry)
        p = params[index]
        label = f"parameter {index} of shape {list(p.shape)}"
        out = {"step": torch.tensor(float(_step_value(entry, label)), dtype=torch.float32)} if keeps_step else {}
        for name in _SIGNED:
            if _holds(entry, name):
                name = _SAME_MOMENT.get(name, name)  # torch's square_avg from centered RMSprop's variance
                value = _moment(entry, name, p.shape, label)  # float64 stays float64 (float64 params' full state)
                out[name] = value.to(torch.float64 if value.dtype == torch.float64 else torch.float32, copy=True)
        if out:
            state[index] = out
    torch_defaults = torch_class([torch.zeros(1, 1)]).param_groups[0]  # a 2-D placeholder (Muon takes no other)
    drop = (set(optimizer._spec.structural) - set(torch_defaults)) | {"bf16_stochastic_round"}
    groups = []
    for group in saved["param_groups"]:
        new = {k: v for k, v in group.items() if k not in drop}  # ours (and a scheduler's initial_lr), then torch's flags
        new.update({k: v for k, v in torch_defaults.items() if k not in new and k != "params"})
        groups.append(new)
    return {"state": state, "param_groups": groups}
