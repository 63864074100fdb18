"""The Adam step, written once: :func:`adam_math` (the moment update), and :func:`tensor_step`, the compiled step of
one tensor (decode the moments, the math, encode them, weight decay, learning rate and the parameter's update).

:func:`tensor_step` is the reference the native kernel (``native_adam.c``) reproduces bit for bit, and the path
that runs where the native kernel does not (GPUs, float64, ``LOWBIT_FN_NATIVE=0``). It is compiled exactly once
per format, block size, rounding, dtypes and epilogue, with sizes that stay symbols (no branch on a size, no
0/1 specialization), so the graph count does not depend on how many tensors or which shapes a model has.
Scalars (step, betas, eps, weight decay, learning rate) arrive as 0-d tensors, so changing them never recompiles.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .._compile import compiled
from .._random import mix, stream_key, tensor_key
from ..formats import decode_rows, encode_rows

if TYPE_CHECKING:
    from .step import AdamConfig

__all__ = ["adam_math", "adam_scalars", "tensor_step", "round_to", "add_rounded", "PARAM_STREAM"]

PARAM_STREAM = 3  # random stream of a parameter's stochastic rounding (0, 1, 2: the moments m, v, vmax)


def adam_math(
    g: Tensor, m: Tensor, v: Tensor, vmax: Tensor | None, step: Tensor, b1: Tensor, b2: Tensor, eps: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """One Adam moment update with torch.optim semantics; returns ``(direction, m, v, vmax)``.

    ``direction = m_hat / (sqrt(v_hat) + eps)`` with torch's placement of the bias corrections, as multiplications
    by their reciprocals (one division per element instead of three): ``(m * (1 / (1 - b1**t))) / (sqrt(v) *
    (1 / sqrt(1 - b2**t)) + eps)``. Scalars are float64 0-d tensors; the math runs in the dtype of ``g``
    (float32, or float64 for float64 parameters).
    """
    one_minus_b1, b2_, one_minus_b2, inv_bc1, inv_bc2_sqrt, eps_ = adam_scalars(step, b1, b2, eps, g.dtype)
    m = m + one_minus_b1 * (g - m)  # torch's lerp for weights < 0.5, spelled out so eager == compiled
    v = v * b2_ + (g * g) * one_minus_b2
    if vmax is not None:
        vmax = torch.maximum(vmax, v)
    denom = _sqrt(v if vmax is None else vmax) * inv_bc2_sqrt + eps_
    return (m * inv_bc1) / denom, m, v, vmax


def adam_scalars(step: Tensor, b1: Tensor, b2: Tensor, eps: Tensor, dtype: torch.dtype) -> tuple[Tensor, ...]:
    """The step's scalars in the math dtype: ``1 - b1, b2, 1 - b2, 1 / (1 - b1**t), 1 / sqrt(1 - b2**t), eps``
    (computed in float64, then rounded once). The native kernel receives exactly these."""
    b1 = b1.to(torch.float64)
    b2 = b2.to(torch.float64)
    inv_bc1 = (1 / (1 - b1**step)).to(dtype)
    inv_bc2_sqrt = (1 / torch.sqrt(1 - b2**step)).to(dtype)
    return (1 - b1).to(dtype), b2.to(dtype), (1 - b2).to(dtype), inv_bc1, inv_bc2_sqrt, eps.to(dtype)


def _sqrt(x: Tensor) -> Tensor:
    """Correctly rounded float32 sqrt in eager and compiled code alike.

    Eager ``torch.sqrt`` on CPU is not always correctly rounded (vectorized math library), inductor's is, so
    float32 goes through float64: a float64 sqrt within 1 ulp, rounded to float32, is the correctly rounded result.
    """
    return torch.sqrt(x.double()).to(x.dtype) if x.dtype != torch.float64 else torch.sqrt(x)


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


def _table(maps: list[Tensor] | None, moment: int) -> Tensor | None:
    """The codebook of a moment: signed for m, unsigned for v and vmax (``None`` for FP8)."""
    return None if maps is None else maps[min(moment, 1)]


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
    step: Tensor,
    scalars: list[Tensor],
    ident: Tensor,
    base: Tensor,
    config: "AdamConfig",
    maps: list[Tensor] | None,
    mode: tuple[bool, bool, bool, bool],
    param_sr: bool,
) -> Tensor | None:
    """One Adam step of one tensor, its moments updated in place.

    ``g`` is the ``[rows, R]`` view of the gradient, ``p`` the parameter in the same sizes (any floating dtypes;
    the math runs in float32, float64 for float64 state). ``moments`` holds, flattened, per moment (m, v, and vmax
    with amsgrad), the state tensor of full precision (``fmt=None``) or the ``codes`` (``[rows, bytes per row]``)
    and ``scale`` (``[rows, blocks per row]``) of the row layout (:func:`lowbit_fn.formats.encode_rows`): the
    graph views them all in the gradient's sizes, so the kernel indexes them without divisions. ``scalars`` are
    ``b1, b2, eps, weight_decay, factor`` (0-d tensors), ``mode`` is ``(l2, decoupled, scale, apply)``: L2 adds
    ``p * weight_decay`` to the gradient, decoupled adds it to the direction, scale multiplies by ``factor`` (the
    signed learning rate) and apply adds the result to ``p`` in place (rounded to ``p``'s dtype; stochastically
    for bfloat16 with ``param_sr``) instead of returning it.
    These are exactly the float32 operations of ``add_decayed_weights``, ``scale_by_learning_rate`` and
    ``apply_updates``.

    ``config`` (format, block size, rounding, seed) is a constant of the graph. With stochastic rounding the
    second moments are stored as ``sqrt(v)`` and every moment is stochastically rounded, with random numbers from
    ``(seed, moment, step, ident, base + element index)``.
    """
    fmt, block_size, stochastic, seed = config.fmt, config.block_size, config.stochastic, config.seed
    l2, decoupled, scale, apply = mode
    b1, b2, eps, weight_decay, factor = scalars
    work = torch.float64 if (fmt is None and moments[0].dtype == torch.float64) else torch.float32
    rows, length = g.shape
    # every tensor seen in the gradient's sizes (each input has its own symbols): plain indexing in the kernel
    if fmt is None:
        moments = [m.view(rows, length) for m in moments]
    else:
        widths = (-(-length // fmt.codes_per_byte), -(-length // block_size))
        moments = [t.view(rows, widths[j % 2]) for j, t in enumerate(moments)]
    gw = g.to(work)
    pw = p.to(work) if p is not None else None
    wd = weight_decay.to(work)
    if l2:
        gw = gw + pw * wd
    n = len(moments) // 2 if fmt is not None else len(moments)
    if fmt is None:
        old = list(moments)
    else:
        old = [decode_rows(moments[2 * i], moments[2 * i + 1], fmt, block_size, _table(maps, i), length) for i in range(n)]
        if stochastic:
            old = [old[0]] + [x * x for x in old[1:]]
    direction, *new = adam_math(gw, old[0], old[1], old[2] if n > 2 else None, step, b1, b2, eps)
    for i in range(n):
        value = new[i]
        if fmt is None:
            moments[i].copy_(value)
            continue
        key = None
        if stochastic:
            value = value if i == 0 else _sqrt(value)
            key = tensor_key(stream_key(seed, i, step), ident)
        codes, sc = encode_rows(value, fmt, block_size, _table(maps, i), key, base, moments[2 * i + 1].shape[1])
        moments[2 * i].copy_(codes)
        moments[2 * i + 1].copy_(sc)
    u = direction
    if decoupled:
        u = u + pw * wd
    if scale:
        u = u * factor.to(work)
    if not apply:
        return u
    key = tensor_key(stream_key(seed, PARAM_STREAM, step), ident) if param_sr else None
    p.copy_(round_to(pw + u, p.dtype, key, base))
    return None
