"""The reference step of one tensor, written once: :func:`tensor_step` (decode the moments, the rule's math, encode
them, weight decay, learning rate and the parameter's update), for every rule of :mod:`lowbit_fn.kernels.rules`.

:func:`tensor_step` is the reference the native kernel (``native.c``) reproduces bit for bit, and the path
that runs where the native kernel does not (GPUs, float64, ``LOWBIT_FN_NATIVE=0``). It is compiled exactly once
per rule, format, block size, rounding, dtypes and epilogue, with sizes that stay symbols (no branch on a size, no
0/1 specialization), so the graph count does not depend on how many tensors or which shapes a model has.
The rule's scalars arrive as 0-d tensors, so changing a hyperparameter or the step never recompiles.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .._compile import compiled
from .._random import mix, stream_key, tensor_key
from ..formats import decode_rows, encode_rows
from .rules import sqrt

if TYPE_CHECKING:
    from .step import StepConfig

__all__ = ["tensor_step", "round_to", "add_rounded", "PARAM_STREAM"]

PARAM_STREAM = 3  # random stream of a parameter's stochastic rounding (0, 1, 2: the moments, in the rule's order)


def round_to(x: Tensor, dtype: torch.dtype, key: Tensor | None, base: Tensor) -> Tensor:
    """float32 ``x`` (a flat tensor, or ``[rows, R]`` rows of a flat tensor) in ``dtype``: rounded to nearest, or,
    with a stream ``key`` and ``dtype`` bfloat16, stochastically: 16 random bits (from ``key`` and ``base`` + each
    element's index in the flat tensor) are added below the bfloat16 mantissa and the sum truncated, so the result
    is ``x`` in expectation. NaN stays NaN, infinities stay infinite; values within one bfloat16 step of the
    largest finite value may round to infinity."""
    if key is None or dtype != torch.bfloat16:
        return x.to(dtype)
    index = torch.arange(x.shape[-1], device=x.device, dtype=torch.int64) + base
    if x.dim() == 2:  # the rows as they are (flattening them in a graph would store a copy of x)
        index = torch.arange(x.shape[0], device=x.device, dtype=torch.int64).unsqueeze(1) * x.shape[1] + index
    bits = x.view(torch.int32).to(torch.int64) + (mix(index, key) & 0xFFFF)  # carries raise the magnitude
    rounded = (bits & -0x10000).to(torch.int32).view(torch.float32)
    return torch.where(torch.isnan(x), x, rounded).to(torch.bfloat16)


@compiled
def add_rounded(p: Tensor, u: Tensor, key: Tensor, base: Tensor) -> Tensor:
    """``p + u`` computed in float32 and rounded to ``p``'s dtype by :func:`round_to` with the stream ``key``
    (stochastically for bfloat16): the parameter write-back of :func:`tensor_step`, for ``apply_updates``."""
    return round_to((p.float() + u.float()).reshape(-1), p.dtype, key, base).view(p.shape)


@compiled
def tensor_step(
    g: Tensor,
    p: Tensor | None,
    moments: list[Tensor],
    scalars: list[Tensor],
    ident: Tensor,
    base: Tensor,
    step: Tensor,
    config: "StepConfig",
    maps: list[Tensor] | None,
    mode: tuple[bool, bool, bool, bool],
    param_sr: bool,
) -> Tensor | None:
    """One step of one tensor by ``config.rule``, its moments updated in place.

    ``g`` is the ``[rows, R]`` view of the gradient, ``p`` the parameter in the same sizes (any floating dtypes;
    the math runs in float32, float64 for float64 params with full-precision state). ``moments`` holds, flattened,
    per moment of the rule, the state tensor of full precision (``fmt=None``) or the ``codes`` (``[rows, bytes
    per row]``) and ``scale`` (``[rows, blocks per row]``) of the row layout (:func:`lowbit_fn.formats.encode_rows`):
    the graph views them all in the gradient's sizes, so the kernel indexes them without divisions. ``scalars``
    are the rule's scalars (:meth:`~lowbit_fn.kernels.rules.Rule.scalars`, in the math dtype), then
    ``weight_decay`` and ``factor``; ``mode`` is ``(l2, decoupled, scale, apply)``: L2 adds ``p * weight_decay``
    to the gradient, decoupled adds it to the direction, scale multiplies by ``factor`` (the signed learning rate)
    and apply adds the result to ``p`` in place (rounded to ``p``'s dtype; stochastically for bfloat16 with
    ``param_sr``) instead of returning it. These are exactly the float32 operations of ``add_decayed_weights``,
    ``scale_by_learning_rate`` and ``apply_updates``. ``maps`` are the format's signed and unsigned codebooks
    (``None`` for FP8).

    ``config`` (rule, format, block size, rounding, seed) is a constant of the graph. With stochastic rounding the
    unsigned (second) moments are stored as their square roots and every moment is stochastically rounded, with
    random numbers from ``(seed, moment, step, ident, base + element index)``.
    """
    fmt, block_size, stochastic, seed, rule = config.fmt, config.block_size, config.stochastic, config.seed, config.rule
    l2, decoupled, scale, apply = mode
    *rule_scalars, weight_decay, factor = scalars
    signed = rule.signed()
    work = weight_decay.dtype
    rows, length = g.shape
    # every tensor seen in the gradient's sizes (each input has its own symbols): plain indexing in the kernel
    if fmt is None:
        moments = [m.view(rows, length) for m in moments]
    else:
        widths = (-(-length // fmt.codes_per_byte), -(-length // block_size))
        moments = [t.view(rows, widths[j % 2]) for j, t in enumerate(moments)]
    gw = g.to(work)
    pw = p.to(work) if p is not None else None
    if l2:
        gw = gw + pw * weight_decay
    n = len(signed)
    tables = [None if maps is None else maps[0 if s else 1] for s in signed]
    if fmt is None:
        old = list(moments)
    else:
        old = [decode_rows(moments[2 * i], moments[2 * i + 1], fmt, block_size, tables[i], length) for i in range(n)]
        if stochastic:
            old = [x if signed[i] else x * x for i, x in enumerate(old)]
    direction, new = rule.math(gw, old, tuple(rule_scalars))
    for i in range(n):
        value = new[i]
        if fmt is None:
            moments[i].copy_(value)
            continue
        key = None
        if stochastic:
            value = value if signed[i] else sqrt(value)
            key = tensor_key(stream_key(seed, i, step), ident)
        codes, sc = encode_rows(value, fmt, block_size, tables[i], key, base, moments[2 * i + 1].shape[1], signed=signed[i])
        moments[2 * i].copy_(codes)
        moments[2 * i + 1].copy_(sc)
    u = direction
    if decoupled:
        u = u + pw * weight_decay
    if scale:
        u = u * factor
    if not apply:
        return u
    key = tensor_key(stream_key(seed, PARAM_STREAM, step), ident) if param_sr else None
    p.copy_(round_to(pw + u, p.dtype, key, base))
    return None
