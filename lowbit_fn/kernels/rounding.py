"""Counter-based random bits and stochastic rounding to bfloat16.

Random numbers come from a hash of ``(seed, step, salt, element index)``: fresh every step, no generator state to
save in a checkpoint, the same bits whatever the threading or chunking, and a resumed run stays bit-exact.
The mixer is Chris Wellons' "lowbias32" integer hash, computed in int64 so that every backend (eager, inductor's
C++, GPUs) gives the same bits: products are formed from 16-bit halves and never overflow.

References:
  Wellons, "Prospecting for Hash Functions", https://nullprogram.com/blog/2018/07/31/.
  Salmon et al., "Parallel Random Numbers: As Easy as 1, 2, 3" (counter-based generators), SC 2011.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._compile import compiled

__all__ = ["hash32", "stream_key", "stochastic_round_bf16", "BF16_SR_SEED"]

_M32 = 0xFFFFFFFF
BF16_SR_SEED = 0x5EED_B16  # fixed: resumed runs and reruns draw the same bits


def _mul32(x: Tensor, c: int) -> Tensor:
    """``(x * c) mod 2**32`` for int64 ``x`` in ``[0, 2**32)``, without int64 overflow."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _M32


def hash32(x: Tensor) -> Tensor:
    """A bijective mix of 32-bit values held in int64 (``x`` in ``[0, 2**32)``; the result too)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def stream_key(seed: int, salt: int, step: Tensor) -> Tensor:
    """The 32-bit key of one random stream (one tensor at one step), as an int64 0-d tensor on ``step``'s device."""
    base = hash32(torch.tensor((seed * 0x9E3779B9 + salt) & _M32, dtype=torch.int64, device=step.device))
    return hash32((step.to(torch.int64) ^ base) & _M32)


@compiled
def stochastic_round_bf16(x: Tensor, key: Tensor) -> Tensor:
    """Round float32 ``x`` to bfloat16, up with probability equal to the dropped fraction (unbiased).

    Adds 16 random bits (from ``key`` and each element's index) below the bfloat16 mantissa and truncates. NaN
    stays NaN, infinities stay infinite; values within one bfloat16 step of the largest finite value may round
    to infinity, as they would with nearest rounding.
    """
    flat = x.reshape(-1)
    index = torch.arange(flat.shape[0], device=x.device, dtype=torch.int64)
    noise = hash32((index ^ key) & _M32) & 0xFFFF
    bits = flat.view(torch.int32).to(torch.int64) + noise
    rounded = (bits & -0x10000).to(torch.int32).view(torch.float32)
    return torch.where(torch.isnan(flat), flat, rounded).to(torch.bfloat16).view(x.shape)
