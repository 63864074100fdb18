"""``scale_by_adam``: Adam's moments kept in flat, block-aligned buffers, quantized or full precision.

State layout (one TensorDict, the same for every consumer):

``count``
    int64 0-d tensor, the number of updates done.
``layout``
    keyed like the params; each leaf is an empty tensor of shape ``(0, *param.shape)`` and the param's dtype.
    It costs no memory and makes the state self-describing (shapes, dtypes, keys) for checks and conversions.
``"<format>_block<N>"`` (e.g. ``"8bit_block256"``; ``"4bit_sr_block128"`` with stochastic rounding)
    the quantized group: parameters with at least ``min_quant_size`` elements, laid end to end in sorted key
    order, each padded to whole blocks. ``mu``/``nu`` (and ``nu_max`` with amsgrad) each hold ``codes`` (uint8)
    and ``scale`` (float32, one per block).
``"fp32"`` / ``"fp64"``
    the full-precision group(s): the remaining parameters, flat, with float32 state (float64 for float64 params).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Callable, Union

import torch
from tensordict import TensorDict, TensorDictBase
from torch import Tensor

from ..formats import FORMATS, ROUNDINGS, BlockFormat, get_format
from ..kernels import full_step, quant_step
from ..kernels.native import EPILOGUE_APPLY, EPILOGUE_DECOUPLED, EPILOGUE_L2, EPILOGUE_SCALE, native_adam_step, native_available
from ._tree import Key, Signature, Tree, as_tensordict, build, check_leaf, check_like, leaves
from .base import GradientTransformation
from .basic import decayed, scaled

__all__ = ["scale_by_adam", "STATE_FORMATS"]

STATE_FORMATS = ("8bit", "4bit", "fp8", "fp32")
DEFAULT_ROUNDING = {"8bit": "nearest", "fp8": "nearest", "4bit": "stochastic"}
Scalar = Union[float, Tensor]


@dataclass(frozen=True)
class _Slot:
    key: Key
    shape: torch.Size
    dtype: torch.dtype
    offset: int
    numel: int
    padded: int


@dataclass(frozen=True)
class _Group:
    name: str
    fmt: BlockFormat | None  # None: full precision
    dtype: torch.dtype  # dtype of the math and, for full precision, of the state
    slots: tuple[_Slot, ...]
    size: int  # elements in the flat buffer, padding included
    block_size: int = 0

    @property
    def num_blocks(self) -> int:
        return self.size // self.block_size if self.fmt is not None else 0


def group_name(fmt: BlockFormat, block_size: int, rounding: str) -> str:
    """``"8bit_block256"`` (nearest rounding) or ``"4bit_sr_block128"`` (stochastic rounding, sqrt-domain v)."""
    return f"{fmt.name}{'_sr' if rounding == 'stochastic' else ''}_block{block_size}"


def parse_group_name(name: str) -> tuple[str, int, str] | None:
    """Inverse of :func:`group_name`: ``(state_format, block_size, rounding)``; ``None`` for full precision."""
    head, _, block = name.rpartition("_block")
    rounding = "stochastic" if head.endswith("_sr") else "nearest"
    fmt = head[: -len("_sr")] if rounding == "stochastic" else head
    return (fmt, int(block), rounding) if fmt in FORMATS and block.isdigit() else None


def _make_plan(
    signature: tuple[tuple[Key, torch.Size, torch.dtype], ...],
    fmt: BlockFormat | None,
    block_size: int,
    min_quant_size: int,
    rounding: str,
) -> tuple[_Group, ...]:
    """Split the params into groups (quantized / fp32 / fp64) and place each in its group's flat buffer."""
    members: dict[tuple[str, BlockFormat | None, torch.dtype], list[tuple[Key, torch.Size, torch.dtype]]] = {}
    for key, shape, dtype in signature:
        if fmt is not None and shape.numel() >= min_quant_size:
            gkey = (group_name(fmt, block_size, rounding), fmt, torch.float32)
        elif dtype == torch.float64:
            gkey = ("fp64", None, torch.float64)
        else:
            gkey = ("fp32", None, torch.float32)
        members.setdefault(gkey, []).append((key, shape, dtype))
    groups = []
    for (gname, gfmt, gdtype), entries in members.items():
        slots, offset = [], 0
        for key, shape, dtype in entries:
            numel = shape.numel()
            padded = -(-numel // block_size) * block_size if gfmt is not None else numel
            slots.append(_Slot(key, shape, dtype, offset, numel, padded))
            offset += padded
        groups.append(_Group(gname, gfmt, gdtype, tuple(slots), offset, block_size if gfmt is not None else 0))
    return tuple(groups)


def _moment(group: _Group, device: torch.device) -> TensorDictBase | Tensor:
    if group.fmt is None:
        return torch.zeros(group.size, dtype=group.dtype, device=device)
    nb = group.num_blocks
    return TensorDict(
        {
            "codes": torch.zeros(group.fmt.code_bytes(nb, group.block_size), dtype=torch.uint8, device=device),
            "scale": torch.zeros(nb, dtype=torch.float32, device=device),
        },
        batch_size=[],
    )


def _as_scalar(value: Scalar, what: str) -> Tensor:
    if isinstance(value, Tensor):
        if value.dim() != 0 or not value.is_floating_point():
            raise ValueError(f"{what} must be a float or a 0-d floating tensor, got shape {tuple(value.shape)}, {value.dtype}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{what} must be a float or a 0-d tensor, got {type(value).__name__}")
    return torch.tensor(float(value), dtype=torch.float64)


def scale_by_adam(
    b1: Scalar = 0.9,
    b2: Scalar = 0.999,
    eps: Scalar = 1e-8,
    *,
    amsgrad: bool = False,
    state_format: str = "8bit",
    block_size: int | None = None,
    min_quant_size: int = 4096,
    rounding: str | None = None,
    seed: int = 0,
) -> GradientTransformation:
    """Rescale updates by Adam's bias-corrected moments, with the moments stored block-wise quantized.

    The returned updates are ``m_hat / (sqrt(v_hat) + eps)`` (torch's placement of the bias corrections).
    The step's math runs in float32 (float64 for float64 params with full-precision state) on this step's
    unquantized moments; the moments are then re-quantized in place. Every group of parameters is one call of a
    kernel: the native CPU kernel (``lowbit_fn/kernels/native_adam.c``) on the CPU, a compiled torch graph reused
    for any model elsewhere; both give the same bits. ``b1``/``b2``/``eps`` may be 0-d tensors that you change in
    place without recompiling. The state is donated (see :class:`GradientTransformation`).

    References:
      Kingma, Ba, "Adam: A Method for Stochastic Optimization", arXiv:1412.6980.
      Reddi, Kale, Kumar, "On the Convergence of Adam and Beyond" (amsgrad), arXiv:1904.09237.
      Dettmers et al., "8-bit Optimizers via Block-wise Quantization", arXiv:2110.02861.

    Args:
      b1, b2: exponential decay rates of the first and second moments.
      eps: added to the denominator.
      amsgrad: keep the running maximum of the second moment (stored in the same format).
      state_format: ``"8bit"``, ``"4bit"``, ``"fp8"`` or ``"fp32"`` (plain Adam state).
      block_size: elements per quantization block (default 256 / 128 / 256).
      min_quant_size: tensors with fewer elements keep full-precision state (0 quantizes everything).
      rounding: how moments are re-quantized: ``"nearest"``, or ``"stochastic"`` (m and ``sqrt(v)`` stochastically
        rounded, v stored as ``sqrt(v)``: the 4-bit scheme that trains like fp32). Default: ``"stochastic"`` for
        ``"4bit"``, ``"nearest"`` for ``"8bit"`` and ``"fp8"`` (where stochastic rounding did not measurably help).
      seed: selects the random numbers of stochastic rounding, drawn from a hash of (seed, moment, step, element
        index): no generator state, so resumed training is bit-exact.

    Returns:
      A :class:`GradientTransformation`.

    Example:
        >>> import torch, lowbit_fn
        >>> params = {"w": torch.randn(64, 128)}
        >>> adam = lowbit_fn.scale_by_adam(state_format="8bit", min_quant_size=0)
        >>> state = adam.init(params)
        >>> updates, state = adam.update({"w": torch.randn(64, 128)}, state, params)
        >>> state["8bit_block256", "mu", "codes"].dtype, int(state["count"])
        (torch.uint8, 1)
    """
    if state_format not in STATE_FORMATS:
        raise ValueError(f"state_format must be one of {list(STATE_FORMATS)}, got {state_format!r}")
    fmt = None if state_format == "fp32" else get_format(state_format)
    block = fmt.check_block_size(block_size) if fmt is not None else 0
    if fmt is None and block_size is not None:
        raise ValueError(f"block_size applies to quantized formats; state_format='fp32' got block_size={block_size!r}")
    if rounding is None:
        rounding = DEFAULT_ROUNDING.get(state_format, "nearest")
    elif fmt is None:
        raise ValueError(f"rounding applies to quantized formats; state_format='fp32' got rounding={rounding!r}")
    elif rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {list(ROUNDINGS)}, got {rounding!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    if isinstance(min_quant_size, bool) or not isinstance(min_quant_size, int) or min_quant_size < 0:
        raise ValueError(f"min_quant_size must be an int >= 0, got {min_quant_size!r}")
    if not isinstance(amsgrad, bool):
        raise TypeError(f"amsgrad must be a bool, got {type(amsgrad).__name__}")
    b1_t, b2_t, eps_t = _as_scalar(b1, "b1"), _as_scalar(b2, "b2"), _as_scalar(eps, "eps")
    for label, value in (("b1", b1), ("b2", b2)):
        if not isinstance(value, Tensor) and not 0.0 <= value < 1.0:
            raise ValueError(f"{label} must be in [0, 1), got {value}")
    if not isinstance(eps, Tensor) and eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    moments = ("mu", "nu", "nu_max") if amsgrad else ("mu", "nu")
    plans: dict[tuple, tuple[_Group, ...]] = {}

    def plan_of(layout: TensorDictBase) -> tuple[Signature, tuple[_Group, ...]]:
        """The params' signature recorded in the layout, and the (cached) flat groups for it."""
        keys, shapes = leaves(layout)
        sig = tuple((k, s.shape[1:], s.dtype) for k, s in zip(keys, shapes))
        if sig not in plans:
            plans[sig] = _make_plan(sig, fmt, block, min_quant_size, rounding)
        return list(sig), plans[sig]

    def init(params: Tree) -> TensorDictBase:
        params = as_tensordict(params, "params")
        keys, values = leaves(params)
        devices = {v.device for v in values}
        if len(devices) > 1:
            raise ValueError(f"scale_by_adam: all params must be on one device, got {sorted(map(str, devices))}")
        for key, value in zip(keys, values):
            check_leaf(key, value, "params")
        layout = build(keys, [torch.empty((0, *v.shape), dtype=v.dtype, device=v.device) for v in values])
        _, groups = plan_of(layout)
        device = values[0].device if values else torch.device("cpu")
        state = {"count": torch.zeros((), dtype=torch.int64, device=device), "layout": layout}
        for group in groups:
            state[group.name] = {m: _moment(group, device) for m in moments}
        return TensorDict(state, batch_size=[])

    def validate(
        updates: TensorDictBase, state: TensorDictBase, params: TensorDictBase | None
    ) -> tuple[list[Key], tuple[_Group, ...], list[Tensor], list[Tensor]]:
        """Raise for bad input; return the sorted keys, the groups, and the updates' and params' leaves in key
        order (no params: an empty list)."""
        if not isinstance(state, TensorDictBase) or "layout" not in state.keys() or "count" not in state.keys():
            raise ValueError("scale_by_adam: the state is not a scale_by_adam state (no 'layout'/'count' entries)")
        sig, groups = plan_of(state["layout"])
        keys, grads = check_like(updates, sig, "updates", "params the state was built for")
        param_leaves = [] if params is None else check_like(params, sig, "params", "params the state was built for")[1]
        expected = {"count", "layout"} | {g.name for g in groups}
        if set(state.keys()) != expected:
            raise ValueError(
                f"scale_by_adam(state_format={state_format!r}, block_size={block or None}, rounding={rounding!r}): the state holds "
                f"{sorted(set(state.keys()) - {'count', 'layout'})}, this transform expects "
                f"{sorted(expected - {'count', 'layout'})} (a state from another format, rounding or amsgrad setting?)"
            )
        for group in groups:
            got = state[group.name]
            if set(got.keys()) != set(moments):
                raise ValueError(f"scale_by_adam: state[{group.name!r}] holds {sorted(got.keys())}, expected {list(moments)}")
            for m in moments:
                pairs = [(got[m], group.size, group.dtype)] if group.fmt is None else [
                    (got[m, "codes"], group.fmt.code_bytes(group.num_blocks, group.block_size), torch.uint8),
                    (got[m, "scale"], group.num_blocks, torch.float32),
                ]
                for tensor, size, dtype in pairs:
                    if tensor.shape != (size,) or tensor.dtype != dtype:
                        raise ValueError(
                            f"scale_by_adam: state[{group.name!r}][{m!r}] has {tensor.dtype}{list(tensor.shape)}, the "
                            f"layout needs {dtype}[{size}] (corrupt or foreign state)"
                        )
        return keys, groups, grads, param_leaves

    def check(updates: TensorDictBase, state: TensorDictBase, params: TensorDictBase | None) -> None:
        validate(updates, state, params)

    betas_eps = (b1_t, b2_t, eps_t)

    def reference_group(group: _Group, st: TensorDictBase, grads: list[Tensor], params: list[Tensor], step: Tensor,
                        epilogue: Epilogue | None) -> list[Tensor] | None:
        """The compiled torch path for one group: the results per slot (``None`` when applied to the params)."""
        if epilogue is not None and not epilogue.decoupled:  # L2: the decay joins the gradient first
            grads = decayed(grads, params, epilogue.weight_decay)
        flat = _gather(group, grads)
        if group.fmt is None:
            direction = full_step(flat, st["mu"], st["nu"], st.get("nu_max"), step, *betas_eps)
        else:
            buffers = [t for m in moments for t in (st[m, "codes"], st[m, "scale"])]
            direction = quant_step(
                flat, buffers, step, *betas_eps, group.fmt, group.block_size, group.fmt.codebook(True, flat.device),
                group.fmt.codebook(False, flat.device), rounding == "stochastic", seed,
            )
        result = [direction[s.offset : s.offset + s.numel].view(s.shape).to(s.dtype) for s in group.slots]
        if epilogue is None:
            return result
        if epilogue.decoupled:
            result = decayed(result, params, epilogue.weight_decay)
        result = scaled(result, epilogue.factor)
        if not epilogue.apply:
            return result
        torch._foreach_add_(params, result)
        return None

    def run(
        items: list[tuple[TensorDictBase, TensorDictBase, TensorDictBase | None, Epilogue | None]]
    ) -> list[tuple[list[Key], dict[Key, Tensor]]]:
        """Validate every ``(updates, state, params, epilogue)``, then step them all: the groups the native kernel
        serves in one call per distinct (layout, step, scalars), the others on the compiled path. Returns each
        item's sorted keys and results (none for parameters updated in place)."""
        checked = [(validate(u, st, p), st, p, ep) for u, st, p, ep in items]
        batch = _NativeBatch()
        native_on: dict[torch.device, bool] = {}  # native_available, asked once per device and call
        outs: list[tuple[list[Key], dict[Key, Tensor]]] = []
        with torch.no_grad():
            for (keys, groups, grads, param_leaves), state, params, epilogue in checked:
                by_key = dict(zip(keys, grads))
                by_param = dict(zip(keys, param_leaves))
                step = state["count"] + 1
                out: dict[Key, Tensor] = {}
                for group in groups:
                    st = state[group.name]
                    device = by_key[group.slots[0].key].device
                    if device not in native_on:
                        native_on[device] = native_available(device)
                    if native_on[device] and _native_serves(group, by_key, by_param, epilogue):
                        batch.add(group, st, moments, by_key, by_param, step, betas_eps, rounding, seed, epilogue, out)
                        continue
                    result = reference_group(
                        group, st, [by_key[s.key] for s in group.slots],
                        [by_param[s.key] for s in group.slots] if epilogue is not None else [], step, epilogue,
                    )
                    if result is not None:
                        out.update(zip((s.key for s in group.slots), result))
                outs.append((keys, out))
            batch.run()
            for _, state, _, _ in checked:
                state["count"].add_(1)
        return outs

    def update(updates: Tree, state: TensorDictBase, params: Tree | None = None, *, epilogue: Epilogue | None = None):
        updates = as_tensordict(updates)
        params = None if params is None else as_tensordict(params, "params")
        if epilogue is not None and params is None:
            raise ValueError("scale_by_adam: a fused epilogue (weight decay, learning rate) needs params")
        ((keys, out),) = run([(updates, state, params, epilogue)])
        if epilogue is not None and epilogue.apply:
            return None, state
        return build(keys, [out[k] for k in keys]), state

    def apply_many(items: list[tuple[TensorDictBase, TensorDictBase, TensorDictBase, Epilogue]]) -> None:
        """``update(updates, state, params, epilogue=e)`` with ``e.apply`` for many states at once (the torch.optim
        front end's per-parameter states): one native call for all that share a step and scalars."""
        assert all(e.apply for _, _, _, e in items)
        run(items)

    update.apply_many = apply_many  # type: ignore[attr-defined]
    return GradientTransformation(init, update, check)


def _gather(group: _Group, grads: list[Tensor]) -> Tensor:
    """The group's gradients (one per slot) as one flat buffer in the group's dtype, zero padding between blocks."""
    pieces = []
    for slot, g in zip(group.slots, grads):
        pieces.append(g.reshape(-1).to(group.dtype))
        if slot.padded > slot.numel:
            pieces.append(g.new_zeros(slot.padded - slot.numel, dtype=group.dtype))
    return torch.cat(pieces) if len(pieces) > 1 else pieces[0]


@dataclass(frozen=True)
class Epilogue:
    """The rest of an Adam/AdamW chain, fused into :func:`scale_by_adam`'s update (see :func:`lowbit_fn.adamw`):
    ``decoupled`` (AdamW): ``(direction + p * weight_decay) * factor``; otherwise (Adam, L2): the gradient becomes
    ``g + p * weight_decay`` first and the result is ``direction * factor``. ``factor`` is the signed learning rate.
    The same float32 operations as ``add_decayed_weights`` and ``scale_by_learning_rate``. With ``apply`` the
    result is added to the params in place (``apply_updates``' operation) and no updates are returned."""

    weight_decay: float | Tensor
    factor: float | Tensor
    decoupled: bool
    apply: bool = False


def _native_serves(group: _Group, grads: dict[Key, Tensor], params: dict[Key, Tensor], epilogue: Epilogue | None) -> bool:
    """Whether the native kernel (available on the group's device) runs this group: quantized or float32 state,
    and float32 throughout when fused."""
    if group.dtype != torch.float32:
        return False
    if epilogue is None:
        return True
    return all(
        grads[s.key].dtype == torch.float32 and params[s.key].dtype == torch.float32
        and (params[s.key].is_contiguous() or not epilogue.apply)
        for s in group.slots
    )


class _NativeBatch:
    """Native-kernel work collected from any number of states: :meth:`add` registers one group's parameters as
    segments, :meth:`run` makes one call per distinct (format, block size, rounding, step, scalars, epilogue) and
    puts the results into the dicts given to :meth:`add`."""

    def __init__(self) -> None:
        self.calls: dict[tuple, dict[str, list]] = {}
        self.results: list[tuple[dict[Key, Tensor], Key, Tensor, torch.Size, torch.dtype]] = []  # made after the run
        self.floats: dict[tuple[int, bool], float] = {}  # scalar tensors seen (alive until the run: ids are stable)

    @torch.compiler.disable  # inside a user's torch.compile: a graph break, run eagerly on the real tensors
    def add(
        self, group: _Group, st: TensorDictBase, moments: tuple[str, ...], grads: dict[Key, Tensor],
        params: dict[Key, Tensor], step: Tensor, betas_eps: tuple[Tensor, Tensor, Tensor], rounding: str, seed: int,
        epilogue: Epilogue | None, out: dict[Key, Tensor],
    ) -> None:
        """Register the group's slots; :meth:`run` puts their results (unless applied in place) into ``out``."""
        fmt = group.fmt
        bs = group.block_size if fmt is not None else 256  # full precision: blocks only divide the work
        apply = epilogue is not None and epilogue.apply
        mode, wd, factor = 0, 0.0, 0.0
        if epilogue is not None:
            mode = (EPILOGUE_DECOUPLED if epilogue.decoupled else EPILOGUE_L2) | EPILOGUE_SCALE | (EPILOGUE_APPLY if apply else 0)
            wd, factor = self.f32(epilogue.weight_decay), self.f32(epilogue.factor)
        key = (fmt.name if fmt is not None else None, bs, rounding, seed, len(moments), mode, int(step),
               *(self.exact(x) for x in betas_eps), wd, factor)
        call = self.calls.get(key)
        if call is None:
            scalars = (torch.tensor(wd, dtype=torch.float32), torch.tensor(factor, dtype=torch.float32))
            args = (step, betas_eps, fmt, bs, rounding == "stochastic", seed, mode, *scalars)
            call = self.calls[key] = {"grads": [], "moments": [], "params": [], "outs": [], "index": [], "args": args}
        code_bytes = fmt.code_bytes(1, bs) if fmt is not None else 0
        for slot in group.slots:
            call["grads"].append(grads[slot.key].reshape(-1).to(torch.float32).contiguous())
            call["index"].append(slot.offset)
            if fmt is None:
                call["moments"].append([st[m][slot.offset : slot.offset + slot.numel] for m in moments])
            else:
                first, nblocks = slot.offset // bs, slot.padded // bs
                call["moments"].append([
                    t for m in moments for t in (
                        st[m, "codes"][first * code_bytes : (first + nblocks) * code_bytes], st[m, "scale"][first : first + nblocks]
                    )
                ])
            if epilogue is not None:
                call["params"].append(params[slot.key].reshape(-1) if apply else params[slot.key].reshape(-1).contiguous())
            if not apply:
                call["outs"].append(torch.empty(slot.numel, dtype=torch.float32, device=call["grads"][-1].device))
                self.results.append((out, slot.key, call["outs"][-1], slot.shape, slot.dtype))

    def f32(self, x: float | Tensor) -> float:
        """``_f32(x)``, once per tensor."""
        if not isinstance(x, Tensor):
            return _f32(x)
        if (id(x), True) not in self.floats:
            self.floats[id(x), True] = _f32(x)
        return self.floats[id(x), True]

    def exact(self, x: Tensor) -> float:
        """``float(x)``, once per tensor."""
        if (id(x), False) not in self.floats:
            self.floats[id(x), False] = float(x)
        return self.floats[id(x), False]

    @torch.compiler.disable
    def run(self) -> None:
        for call in self.calls.values():
            step, betas_eps, fmt, bs, stochastic, seed, mode, wd, factor = call["args"]
            native_adam_step(
                call["grads"], call["moments"], call["index"], step, *betas_eps, fmt, bs, stochastic, seed,
                params=call["params"], outs=call["outs"], mode=mode, weight_decay=wd, neg_lr=factor,
            )
        for out, key, flat, shape, dtype in self.results:  # views taken after the kernel wrote (also when traced)
            out[key] = flat.view(shape).to(dtype)


def _f32(x: float | Tensor) -> float:
    """``x`` rounded to float32 (as torch rounds a scalar factor for float32 tensors), as a Python float."""
    if isinstance(x, Tensor):
        return x.item() if x.dtype == torch.float32 else float(x.detach().to(dtype=torch.float32))
    try:
        return struct.unpack("f", struct.pack("f", x))[0]
    except OverflowError:  # beyond float32's range: torch rounds it to +-inf
        return float(torch.tensor(x, dtype=torch.float32))
