"""The Adam step, written once, and the two compiled group kernels that run it over flat buffers.

A *group* is every parameter sharing one state layout (quantized with a format, or full precision of one dtype),
laid end to end in one flat buffer. Each kernel is compiled once with dynamic sizes, so the graph count and the
compile time do not depend on how many parameters or shapes a model has, and one step is one kernel call per group.
Scalars (step, betas, eps) arrive as 0-d tensors, so changing them never recompiles.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._compile import compiled
from ..formats import BlockFormat, block_noise


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


@compiled
def full_step(
    g: Tensor, mu: Tensor, nu: Tensor, nu_max: Tensor | None, step: Tensor, b1: Tensor, b2: Tensor, eps: Tensor
) -> Tensor:
    """Full-precision moments, updated in place; returns the direction (same dtype as the state)."""
    direction, m, v, vmax = adam_math(g, mu, nu, nu_max, step, b1, b2, eps)
    mu.copy_(m)
    nu.copy_(v)
    if nu_max is not None:
        nu_max.copy_(vmax)
    return direction


@compiled
def quant_step(
    g: Tensor,
    moments: list[Tensor],
    step: Tensor,
    b1: Tensor,
    b2: Tensor,
    eps: Tensor,
    fmt: BlockFormat,
    block_size: int,
    signed_map: Tensor | None,
    unsigned_map: Tensor | None,
    stochastic: bool,
    seed: int,
) -> Tensor:
    """Quantized moments ``[m_codes, m_scale, v_codes, v_scale(, vmax_codes, vmax_scale)]`` updated in place.

    ``g`` is float32 and padded to whole blocks. Old moments are dequantized, the direction is computed from this
    step's unquantized moments, then the moments are re-quantized into their own buffers. With ``stochastic``
    the second moments are stored as ``sqrt(v)`` and every moment is stochastically rounded, with random numbers
    from ``(seed, moment, step, index in the buffer)`` (streams 0, 1, 2 for m, v, vmax).
    """
    blocks = g.view(-1, block_size)
    nb = blocks.shape[0]
    maps = (signed_map, unsigned_map, unsigned_map)
    old = [fmt.decode(moments[2 * i].view(nb, -1), moments[2 * i + 1], maps[i]) for i in range(len(moments) // 2)]
    if stochastic:
        old = [old[0]] + [x * x for x in old[1:]]
    direction, *new = adam_math(blocks, old[0], old[1], old[2] if len(old) > 2 else None, step, b1, b2, eps)
    for i, value in enumerate(new[: len(old)]):
        noise = None
        if stochastic:
            value = value if i == 0 else _sqrt(value)
            noise = block_noise(nb, block_size, 0, seed, i, step)
        codes, scale = fmt.encode(value, maps[i], noise)
        moments[2 * i].copy_(codes.view(-1))
        moments[2 * i + 1].copy_(scale)
    return direction.view(-1)
