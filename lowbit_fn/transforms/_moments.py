"""The state codec every moment-based transform shares: one state per parameter, its moments quantized in blocks
inside rows or kept in full precision, stepped by the rule's kernel (:func:`lowbit_fn.kernels.moment_step`).

A transform declares its rule (:mod:`lowbit_fn.kernels.rules`: the moments, signed or not, and their math), the
moments' names (optax's) and torch.optim's names for them, and its hyperparameters; :func:`moment_transform`
gives it the layout, the checks, the native/compiled step and what the torch.optim front end and checkpoint
conversion need.

State layout (one TensorDict; the torch.optim front end's ``optimizer.state[p]`` holds the same tensors):

``count``
    int64 0-d tensor, the number of updates done.
``layout``
    keyed like the params; each leaf is an empty tensor of shape ``(0, *param.shape)`` and the param's dtype.
    It costs no memory and makes the state self-describing (shapes, dtypes, keys) for checks and conversions.
``"<format>_block<N>"`` (e.g. ``"8bit_block256"``; ``"4bit_sr_block128"`` with stochastic rounding)
    the quantized parameters: those of two or more dimensions with at least ``min_quant_size`` elements.
    Each moment (``mu``/``nu`` for Adam, ...) is keyed like the params; each leaf holds ``codes`` (uint8, the
    parameter's shape; 4-bit ``(rows, ceil(R / 2))``) and ``scale`` (float32 ``(rows, blocks per row)``), rows
    being ``shape[0]`` and ``R = prod(shape[1:])``. A block never crosses a row, so a range of rows of every
    state tensor is the state of that range of rows of the parameter (an FSDP shard), whatever the world size.
``"fp32"`` / ``"fp64"``
    the other parameters (1-D ones always: a range of their elements has no rows to keep blocks in), with each
    moment of the parameter's shape in float32 (float64 for float64 params).

A parameter's state depends on its own shape and dtype only: adding, removing or freezing another parameter leaves
it as it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import torch
from tensordict import TensorDict, TensorDictBase
from torch import Tensor

from .._random import tensor_id
from ..formats import FORMATS, ROUNDINGS, BlockFormat, get_format
from ..kernels import Epilogue, Item, StepConfig, moment_step
from ..kernels.rules import Rule
from ._tree import Key, Tree, as_tensordict, build, check_leaf, check_like, leaves, name
from .base import CheckedTransformation

__all__ = ["moment_transform", "MomentTransformation", "STATE_FORMATS", "as_scalar", "check_unit", "check_nonnegative", "is_zero"]

STATE_FORMATS = ("8bit", "4bit", "fp8", "fp32")
DEFAULT_ROUNDING = {"8bit": "nearest", "fp8": "nearest", "4bit": "stochastic"}
Scalar = Union[float, Tensor]


def group_name(fmt: BlockFormat, block_size: int, rounding: str) -> str:
    """``"8bit_block256"`` (nearest rounding) or ``"4bit_sr_block128"`` (stochastic rounding, sqrt-domain v)."""
    return f"{fmt.name}{'_sr' if rounding == 'stochastic' else ''}_block{block_size}"


def parse_group_name(name: str) -> tuple[str, int, str] | None:
    """Inverse of :func:`group_name`: ``(state_format, block_size, rounding)``; ``None`` for full precision."""
    head, _, block = name.rpartition("_block")
    rounding = "stochastic" if head.endswith("_sr") else "nearest"
    fmt = head[: -len("_sr")] if rounding == "stochastic" else head
    return (fmt, int(block), rounding) if fmt in FORMATS and block.isdigit() else None


@dataclass(frozen=True)
class _Place:
    """Where one parameter's state is: its group and, per moment, the state tensors' paths, shapes and dtypes."""

    key: Key
    group: str
    paths: tuple[tuple[Key, torch.Size, torch.dtype], ...]  # per moment: (codes, scale) or the full tensor
    ident: int


def as_scalar(value: Scalar, what: str) -> Tensor:
    if isinstance(value, Tensor):
        if value.dim() != 0 or not value.is_floating_point():
            raise ValueError(f"{what} must be a float or a 0-d floating tensor, got shape {tuple(value.shape)}, {value.dtype}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{what} must be a float or a 0-d tensor, got {type(value).__name__}")
    return torch.tensor(float(value), dtype=torch.float64)


def check_unit(value: Scalar, what: str, *, closed: bool = False) -> None:
    """A decay rate: in ``[0, 1)`` (``[0, 1]`` when ``closed``); 0-d tensors are the caller's to keep in range."""
    if not isinstance(value, Tensor) and not (0.0 <= value < 1.0 or (closed and value == 1.0)):
        raise ValueError(f"{what} must be in [0, 1{']' if closed else ')'}, got {value}")


def check_nonnegative(value: Scalar, what: str) -> None:
    if not isinstance(value, Tensor) and value < 0:
        raise ValueError(f"{what} must be >= 0, got {value}")


def is_zero(value: Scalar) -> bool:
    """Whether a hyperparameter is 0 when the transform is built (momentum 0: no buffer), a 0-d tensor included."""
    return float(value.detach().cpu()) == 0.0 if isinstance(value, Tensor) else value == 0.0


class MomentTransformation(CheckedTransformation):
    """What :func:`moment_transform` returns (and so :func:`~lowbit_fn.scale_by_adam`, ``scale_by_lion``,
    ``trace``, ``scale_by_rms``, ``scale_by_ademamix``): a :class:`CheckedTransformation` that also names its
    kernel configuration (``config``: rule, format, block size, rounding, seed; ``hyper``: the hyperparameters'
    0-d tensors), its moments (``moments``, with torch.optim's names ``torch_names`` and signedness ``signed``),
    the state group of a parameter (``group_of``), the state tensors of one parameter (``tensor_state``), and
    steps prepared tensors (``prepared``/``run``), so that the fused aliases, the torch.optim front end and
    checkpoint conversion call the kernel entry point (:func:`lowbit_fn.kernels.moment_step`) on the same state
    layout."""


def moment_transform(
    label: str,
    rule: Rule,
    moments: tuple[str, ...],
    torch_names: tuple[str, ...],
    hyper: tuple[Tensor, ...],
    *,
    state_format: str,
    block_size: int | None,
    min_quant_size: int,
    rounding: str | None,
    seed: int,
    roundings: dict[str, str] | None = None,
) -> MomentTransformation:
    """A transform over codec state: ``rule``'s moments (named ``moments``; ``torch_names`` in torch.optim's
    checkpoints), stepped with the hyperparameters ``hyper`` (0-d tensors that may be changed in place), in
    ``state_format`` (see :func:`~lowbit_fn.scale_by_adam` for the options). ``label`` names the transform in
    error messages. ``roundings`` is the rounding that suits the rule's moments per format, where it differs from
    the codec's default (:data:`DEFAULT_ROUNDING`); ``rounding`` overrides both."""
    if len(moments) != len(rule.signed()) or len(torch_names) != len(moments):
        raise ValueError(f"{label}: {len(rule.signed())} moments, named {moments} / {torch_names}")
    if state_format not in STATE_FORMATS:
        raise ValueError(f"state_format must be one of {list(STATE_FORMATS)}, got {state_format!r}")
    fmt = None if state_format == "fp32" else get_format(state_format)
    block = fmt.check_block_size(block_size) if fmt is not None else 0
    if fmt is None and block_size is not None:
        raise ValueError(f"block_size applies to quantized formats; state_format='fp32' got block_size={block_size!r}")
    if rounding is None:
        rounding = {**DEFAULT_ROUNDING, **(roundings or {})}.get(state_format, "nearest")
    elif fmt is None:
        raise ValueError(f"rounding applies to quantized formats; state_format='fp32' got rounding={rounding!r}")
    elif rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {list(ROUNDINGS)}, got {rounding!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    if isinstance(min_quant_size, bool) or not isinstance(min_quant_size, int) or min_quant_size < 0:
        raise ValueError(f"min_quant_size must be an int >= 0, got {min_quant_size!r}")
    config = StepConfig(rule, fmt, block, rounding == "stochastic", seed)
    full_config = StepConfig(rule, None, 0, False, seed)
    quant_name = group_name(fmt, block, rounding) if fmt is not None and moments else None  # no moments: no groups
    plans: dict[tuple, tuple[_Place, ...]] = {}

    def group_of(shape: torch.Size, dtype: torch.dtype) -> str:
        """The state group of a parameter: decided from its (global) shape and dtype alone."""
        if quant_name is not None and len(shape) >= 2 and shape.numel() >= min_quant_size:
            return quant_name
        return "fp64" if dtype == torch.float64 else "fp32"

    def shapes_of(group: str, shape: torch.Size) -> list[tuple[tuple[str, ...], torch.Size, torch.dtype]]:
        """The state tensors of one moment of a parameter: (path suffix, shape, dtype)."""
        if group == quant_name:
            return [(("codes",), fmt.code_shape(shape), torch.uint8), (("scale",), fmt.scale_shape(shape, block), torch.float32)]
        return [((), shape, torch.float64 if group == "fp64" else torch.float32)]

    def tensor_state(shape: torch.Size, dtype: torch.dtype, device: torch.device) -> tuple[str, dict[str, dict[str, Tensor] | Tensor]]:
        """A fresh state for one parameter: its group and ``{moment: {"codes", "scale"} or tensor}``."""
        group = group_of(shape, dtype)
        out: dict[str, dict[str, Tensor] | Tensor] = {}
        for m in moments:
            parts = {s[0] if s else "": torch.zeros(size, dtype=dt, device=device) for s, size, dt in shapes_of(group, shape)}
            out[m] = parts[""] if "" in parts else parts
        return group, out

    def plan_of(signature: tuple[tuple[Key, torch.Size, torch.dtype], ...]) -> tuple[_Place, ...]:
        if signature not in plans:
            places = []
            for key, shape, dtype in signature:
                group = group_of(shape, dtype)
                paths = tuple((((group, m) + key + suffix), size, dt) for m in moments for suffix, size, dt in shapes_of(group, shape))
                places.append(_Place(key, group, paths, tensor_id(name(key))))
            plans[signature] = tuple(places)
        return plans[signature]

    def init(params: Tree) -> TensorDictBase:
        params = as_tensordict(params, "params")
        keys, values = leaves(params)
        devices = {v.device for v in values}
        if len(devices) > 1:
            raise ValueError(f"{label}: all params must be on one device, got {sorted(map(str, devices))}")
        for key, value in zip(keys, values):
            check_leaf(key, value, "params")
        device = values[0].device if values else torch.device("cpu")
        layout = build(keys, [torch.empty((0, *v.shape), dtype=v.dtype, device=v.device) for v in values])
        places = plan_of(tuple((k, v.shape, v.dtype) for k, v in zip(keys, values)))
        paths = [path for place in places for path, _, _ in place.paths]
        tensors = [torch.zeros(size, dtype=dt, device=device) for place in places for _, size, dt in place.paths]
        state = build(paths, tensors) if paths else TensorDict({}, batch_size=[])
        state["count"] = torch.zeros((), dtype=torch.int64, device=device)
        state["layout"] = layout
        return state

    def parse(state: TensorDictBase) -> tuple[tuple[_Place, ...], dict[Key, Tensor]]:
        """The params' places (from the layout) and the state's leaves by path, unchecked."""
        flat = {k if isinstance(k, tuple) else (k,): v for k, v in state.items(include_nested=True, leaves_only=True)}
        signature = tuple((k[1:], v.shape[1:], v.dtype) for k, v in flat.items() if k[0] == "layout")
        return plan_of(tuple(sorted(signature, key=lambda s: s[0]))), flat

    def parse_checked(state: TensorDictBase) -> tuple[tuple[_Place, ...], dict[Key, Tensor]]:
        """:func:`parse`, raising for a state of another kind, format, rounding or set of moments."""
        if not isinstance(state, TensorDictBase) or "layout" not in state.keys() or "count" not in state.keys():
            raise ValueError(
                f"{label}: the state is not a {label} state (no 'layout'/'count' entries)"
            )
        places, flat = parse(state)
        expected = {"count", "layout"} | {p.group for p in places if p.paths}
        if set(state.keys()) != expected:
            hint = ""
            if any(v.dim() == 1 and k[-1] == "codes" and len(k) == 3 for k, v in flat.items()):
                hint = " It holds lowbit_fn 0.1.0's flat layout: convert it with lowbit_fn.convert_state(state, transform)."
            raise ValueError(
                f"{label}(state_format={state_format!r}, block_size={block or None}, rounding={rounding!r}): the state "
                f"holds {sorted(set(state.keys()) - {'count', 'layout'})}, this transform expects "
                f"{sorted(expected - {'count', 'layout'})} (a state from another format, rounding or set of moments?)" + hint
            )
        count = flat[("count",)]
        if count.dtype != torch.int64 or count.dim() != 0:  # the step count: bias corrections and random bits read it
            raise ValueError(
                f"{label}: state['count'] holds {count.dtype}{list(count.shape)}, the step count is an int64 scalar "
                "(corrupt or foreign state)"
            )
        for place in places:
            for path, size, dt in place.paths:
                tensor = flat.get(path)
                if tensor is not None and tensor.device != flat[("count",)].device:
                    where = "".join(f"[{p!r}]" for p in path)
                    raise ValueError(
                        f"{label}: state{where} is on {tensor.device}, the state's count on {flat[('count',)].device} "
                        "(move the whole state to one device)"
                    )
                if tensor is None or tensor.shape != size or tensor.dtype != dt:
                    got = "nothing" if tensor is None else f"{tensor.dtype}{list(tensor.shape)}"
                    where = "".join(f"[{p!r}]" for p in path)
                    hint = " (lowbit_fn 0.1.0's flat layout: convert it with lowbit_fn.convert_state(state, transform))" if (
                        tensor is None and any(len(k) == 3 and k[-1] == "codes" for k in flat)) else ""
                    raise ValueError(
                        f"{label}: state{where} holds {got}, the layout needs {dt}{list(size)} (corrupt or foreign state)"
                        + hint
                    )
        state_paths = sum(len(p.paths) for p in places) + len(places) + 1
        if len(flat) != state_paths:
            known = {path for p in places for path, _, _ in p.paths} | {("count",)} | {("layout",) + p.key for p in places}
            extra = sorted(".".join(k) for k in flat if k not in known)
            raise ValueError(f"{label}: the state has unexpected entries {extra[:5]} (corrupt or foreign state)")
        return places, flat

    def validate(
        updates: TensorDictBase, state: TensorDictBase, params: TensorDictBase | None
    ) -> tuple[tuple[_Place, ...], dict[Key, Tensor], list[Tensor], list[Tensor]]:
        """Raise for bad input; return the places, the state's leaves, and the updates' and params' leaves in key
        order (no params: an empty list)."""
        places, flat = parse_checked(state)
        signature = [(p.key, flat[("layout",) + p.key].shape[1:], flat[("layout",) + p.key].dtype) for p in places]
        _, grads = check_like(updates, signature, "updates", "params the state was built for")
        param_leaves = [] if params is None else check_like(params, signature, "params", "params the state was built for")[1]
        count = flat[("count",)]
        for place, g, p in zip(places, grads, param_leaves or grads):
            for what, t in (("updates", g), ("params", p)):
                if t.device != count.device:
                    raise ValueError(f"{label}: {what}[{name(place.key)!r}] is on {t.device}, the state on {count.device}")
        return places, flat, grads, param_leaves

    def run(
        places: tuple[_Place, ...], flat: dict[Key, Tensor], grads: list[Tensor], params: list[Tensor],
        epilogue: Epilogue, inplace: bool,
    ) -> list[Tensor | None]:
        """One step of prepared tensors: the results in key order (``None`` where applied to the params)."""
        count = flat[("count",)]
        step = count + 1
        by_group: dict[bool, list[int]] = {}
        items = []
        for i, (place, g) in enumerate(zip(places, grads)):
            out = g if inplace and g.is_contiguous() else None
            items.append(Item(g, [flat[path] for path, _, _ in place.paths], step, place.ident, params[i] if params else None, out))
            by_group.setdefault(place.group == quant_name, []).append(i)
        results: list[Tensor | None] = [None] * len(items)
        with torch.no_grad():
            for quantized, members in by_group.items():
                outs = moment_step(config if quantized else full_config, [items[i] for i in members], hyper, epilogue)
                for i, out in zip(members, outs):
                    results[i] = out
            count.add_(1)
        return results

    def check(updates: TensorDictBase, state: TensorDictBase, params: TensorDictBase | None) -> None:
        validate(updates, state, params)

    def prepared(
        updates: TensorDictBase, state: TensorDictBase, params: TensorDictBase | None
    ) -> tuple[tuple[_Place, ...], dict[Key, Tensor], list[Tensor], list[Tensor]]:
        """What :func:`validate` returns, for input that :func:`check` has accepted (no checks)."""
        places, flat = parse(state)
        return places, flat, leaves(updates)[1], [] if params is None else leaves(params)[1]

    def step(updates: TensorDictBase, state: TensorDictBase, params: TensorDictBase | None, inplace: bool):
        places, flat, grads, _ = prepared(updates, state, params)
        results = run(places, flat, grads, [], Epilogue(), inplace)
        return build([p.key for p in places], results), state

    return MomentTransformation(
        init, step, check, config=config, hyper=hyper, moments=moments, torch_names=torch_names,
        signed=rule.signed(), group_of=group_of, tensor_state=tensor_state, prepared=prepared, run=run,
    )
