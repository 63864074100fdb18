"""The one entry point of an optimizer step over codec state: :func:`moment_step`, called by the functional
transforms, the torch.optim front end and offload alike, for every rule of :mod:`lowbit_fn.kernels.rules`.

It takes the tensors of a step (gradients, moments, parameters, outputs), the rule's hyperparameters and the
epilogue, and chooses how each tensor runs: the native CPU kernel (all the CPU tensors that share a step count in
one call, float32, bfloat16 or float16 parameters read and written in the kernel's own pass) or the compiled
torch step (:func:`lowbit_fn.kernels.reference.tensor_step`, one call per tensor, exactly one graph per rule,
format, block size, rounding, dtypes and epilogue, whatever the number and shapes of the tensors). Both compute
the same bits.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from ..formats import BlockFormat, row_split
from .native import EPILOGUE_APPLY, EPILOGUE_DECOUPLED, EPILOGUE_L2, EPILOGUE_SCALE, NATIVE_DTYPES, native_available, native_serves_rule, native_step
from .reference import tensor_step
from .rules import RULES_MAX_SCALARS, Rule

__all__ = ["StepConfig", "Epilogue", "Item", "moment_step"]

Scalar = float | Tensor


@dataclass(frozen=True)
class StepConfig:
    """What a state is: its rule (the moments and their math), format (``None``: full precision), block size,
    rounding and seed."""

    rule: Rule
    fmt: BlockFormat | None
    block_size: int
    stochastic: bool
    seed: int


@dataclass(frozen=True)
class Epilogue:
    """What follows the rule's direction ``d`` in the same pass: ``l2`` (``g += p * weight_decay`` first, Adam) or
    ``decoupled`` (``d += p * weight_decay``, AdamW), then ``d *= factor`` (the signed learning rate, unless
    ``None``), then with ``apply`` ``p += d`` in place (rounded to ``p``'s dtype; stochastically for bfloat16 with
    ``param_sr``) instead of returning ``d``. The float32 operations of ``add_decayed_weights``,
    ``scale_by_learning_rate`` and ``apply_updates``."""

    weight_decay: Scalar = 0.0
    l2: bool = False
    decoupled: bool = False
    factor: Scalar | None = None
    apply: bool = False
    param_sr: bool = False

    @property
    def needs_params(self) -> bool:
        return self.apply or self.l2 or self.decoupled


@dataclass
class Item:
    """One tensor of a step.

    ``moments``: per moment of the rule, its full-precision tensor (the parameter's shape), or its
    ``codes`` and ``scale`` (:mod:`lowbit_fn.formats`' row layout). ``step``: the step count of this update (int64
    0-d, 1 on the first). ``ident`` (32-bit) and ``base`` (the index of the tensor's first element in the whole
    parameter, for a shard) select its stochastic rounding. ``out``: where the update goes (e.g. the gradient's own
    buffer); ``None``: a new tensor of the gradient's dtype."""

    grad: Tensor
    moments: list[Tensor]
    step: Tensor
    ident: int
    param: Tensor | None = None
    out: Tensor | None = None
    base: int = 0


def moment_step(
    config: StepConfig, items: list[Item], hyper: tuple[Tensor, ...], epilogue: Epilogue = Epilogue()
) -> list[Tensor | None]:
    """One step of every item by ``config.rule`` with its hyperparameters ``hyper`` (0-d tensors); returns each
    item's update (``None`` where it was applied to the parameter).

    The caller has validated shapes, dtypes and devices. Items the native kernel serves (CPU, float32 state,
    float32/bfloat16/float16 tensors) run in one native call per distinct step count; the others one compiled
    call each. Moments are updated in place.
    """
    wd = epilogue.weight_decay
    if (float(wd) if not isinstance(wd, Tensor) else (wd.device.type == "cpu" and float(wd))) == 0.0:
        epilogue = replace(epilogue, l2=False, decoupled=False)  # no decay: no pass over the parameters for it
    for i, item in enumerate(items):  # the front ends check first, with the parameter's name; never a foreign pointer
        tensors = [item.grad, *item.moments] + [t for t in (item.param, item.out) if t is not None]
        if any(t.device != item.grad.device for t in tensors):
            raise ValueError(f"moment_step: item {i} has tensors on {sorted({str(t.device) for t in tensors})}, not one device")
    results: list[Tensor | None] = [None] * len(items)
    largest = max((item.grad.numel() for item in items), default=0)
    native: dict[int, list[int]] = {}
    on: dict[torch.device, bool] = {}
    scalars: dict[tuple, list[Tensor]] = {}  # per step count (CPU) or step tensor, dtype and device
    for i, item in enumerate(items):
        device = item.grad.device
        if device not in on:
            on[device] = native_available(device)
        work = _work_dtype(config, item)
        if on[device] and native_serves_rule(config.rule) and work == torch.float32 and _native_serves(item, epilogue):
            native.setdefault(int(item.step), []).append(i)
        else:
            key = (int(item.step) if item.step.device.type == "cpu" else id(item.step), work, device)
            if key not in scalars:
                scalars[key] = _scalars(config.rule, item.step, hyper, epilogue, work, device)
            results[i] = _compiled(config, item, scalars[key], epilogue, largest)
    for step, members in native.items():
        for i, out in zip(members, _native(config, [items[i] for i in members], step, hyper, epilogue)):
            results[i] = out
    return results


def _work_dtype(config: StepConfig, item: Item) -> torch.dtype:
    """The math dtype: float64 for float64 gradients with full-precision state, else float32."""
    return torch.float64 if config.fmt is None and item.grad.dtype == torch.float64 else torch.float32


def _scalars(
    rule: Rule, step: Tensor, hyper: tuple[Tensor, ...], epilogue: Epilogue, dtype: torch.dtype, device: torch.device
) -> list[Tensor]:
    """The rule's scalars, the weight decay and the learning rate factor, as 0-d ``dtype`` tensors on ``device``
    (computed in float64 where the step and hyperparameters are, rounded once)."""
    values = list(rule.scalars(step, tuple(_scalar(h, step.device) for h in hyper), dtype))
    values.append(_scalar(epilogue.weight_decay, step.device).to(dtype))
    values.append(_scalar(epilogue.factor if epilogue.factor is not None else 0.0, step.device).to(dtype))
    return [v.to(device) for v in values]


def _native_serves(item: Item, epilogue: Epilogue) -> bool:
    """Float32, bfloat16 or float16 tensors; the ones the kernel writes contiguous (a strided gradient or
    parameter that is only read is copied)."""
    tensors = [item.grad] + ([item.param] if epilogue.needs_params else []) + ([item.out] if item.out is not None else [])
    if any(t.dtype not in NATIVE_DTYPES for t in tensors):
        return False
    if item.out is not None and not item.out.is_contiguous():
        return False
    return not epilogue.apply or item.param.is_contiguous()


@torch.compiler.disable  # inside a user's torch.compile: a graph break, run eagerly on the real tensors
def _native(
    config: StepConfig, items: list[Item], step: int, hyper: tuple[Tensor, ...], epilogue: Epilogue
) -> list[Tensor | None]:
    mode = (EPILOGUE_L2 if epilogue.l2 else 0) | (EPILOGUE_DECOUPLED if epilogue.decoupled else 0)
    mode |= (EPILOGUE_SCALE if epilogue.factor is not None else 0) | (EPILOGUE_APPLY if epilogue.apply else 0)
    cpu = torch.device("cpu")
    *rule_scalars, wd, factor = _scalars(config.rule, torch.tensor(step, dtype=torch.int64), hyper, epilogue, torch.float32, cpu)
    unused = [torch.zeros((), dtype=torch.float32)] * (RULES_MAX_SCALARS - len(rule_scalars))
    scalars = torch.stack([*rule_scalars, *unused, wd, factor])  # the kernel's layout: its rule slots, then the epilogue
    grads, moments, rows, params, outs, results = [], [], [], [], [], []
    with_params = epilogue.needs_params
    for item in items:
        grads.append(item.grad.contiguous())
        moments.append(item.moments)
        rows.append(row_split(item.grad.shape)[1] if config.fmt is not None else max(item.grad.numel(), 1))
        if with_params:
            params.append(item.param if epilogue.apply else item.param.contiguous())
        if not epilogue.apply:
            out = item.out if item.out is not None else torch.empty_like(item.grad, memory_format=torch.contiguous_format)
            outs.append(out)
        results.append(None if epilogue.apply else outs[-1])
    native_step(
        grads, moments, rows, [it.base for it in items], [it.ident for it in items], step, scalars, config,
        params=params or None, outs=outs or None, mode=mode, param_sr=epilogue.param_sr,
    )
    return results


def _scalar(x: Scalar, device: torch.device) -> Tensor:
    if isinstance(x, Tensor):
        return x.detach().to(device=device).reshape(())
    return torch.tensor(float(x), dtype=torch.float64, device=device)


# the compiled graphs keep temporaries between their loops (the new moments, the code search's indices, the random
# bits' indices): per element of the tensor they step, measured on the CPU backend, up to 37 B (8-bit with
# stochastic rounding; 16 B 8-bit, 26 B 4-bit, 6 B FP8 with their default rounding, none for full precision). So a
# quantized tensor is stepped in pieces of whole rows of at most an eighth of the step's largest tensor (and at
# least _MIN_PIECE elements): a step's extra memory stays under 8 B per element of its largest tensor
_PIECES = 8
_MIN_PIECE = 1 << 14


def _compiled(config: StepConfig, item: Item, scalars: list[Tensor], epilogue: Epilogue, largest: int) -> Tensor | None:
    g, p, shape = item.grad, item.param, item.grad.shape
    device = g.device
    # quantized state: the row layout; full precision: one flat row. Sizes are symbols of the graph, so neither
    # choice adds a graph
    rows, length = row_split(shape) if config.fmt is not None else (1, g.numel())
    if g.numel() == 0:
        return None if epilogue.apply else (item.out if item.out is not None else torch.empty_like(g))
    # the gradient and the parameter carry the sizes (the parameter is written in place: a flat one, viewed in the
    # graph, would be written through a copy); the moments go in flat, and the graph views them in the gradient's
    # sizes (tensors of independent sizes would cost the kernel a division per element)
    moments = [t.reshape(rows, -1) for t in item.moments]
    target = p.contiguous() if (epilogue.apply and not p.is_contiguous()) else p
    p2 = target.reshape(rows, length) if epilogue.needs_params else None
    g2 = g.reshape(rows, length)
    maps = None
    if config.fmt is not None and config.fmt.codebook(True) is not None:
        maps = [config.fmt.codebook(True, device), config.fmt.codebook(False, device)]
    mode = (epilogue.l2, epilogue.decoupled, epilogue.factor is not None, epilogue.apply)
    step, ident = item.step.to(device), torch.tensor(item.ident, dtype=torch.int64, device=device)
    per_piece = rows if config.fmt is None else max(1, max(largest // _PIECES, _MIN_PIECE) // length)
    out = item.out
    if out is None and not epilogue.apply and per_piece < rows:
        out = torch.empty(shape, dtype=g.dtype, device=device)
    for start in range(0, rows, per_piece):
        stop = min(rows, start + per_piece)
        u = tensor_step(
            g2[start:stop], None if p2 is None else p2[start:stop], [m[start:stop].reshape(-1) for m in moments],
            scalars, ident, torch.tensor(item.base + start * length, dtype=torch.int64, device=device), step,
            config, maps, mode, epilogue.param_sr and epilogue.apply,
        )
        if epilogue.apply:
            continue
        if out is None:  # one piece: its result is the update
            return u.view(shape).to(g.dtype)
        out.view(rows, length)[start:stop].copy_(u)
    if epilogue.apply and target is not p:
        p.copy_(target)
    return None if epilogue.apply else out
