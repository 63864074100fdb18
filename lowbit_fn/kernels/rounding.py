"""Stochastic rounding of float32 to bfloat16 with counter-based random bits (see :mod:`lowbit_fn._random`)."""

from __future__ import annotations

import torch
from torch import Tensor

from .._compile import compiled
from .._random import _M32, hash32, stream_key, uniform

__all__ = ["hash32", "stream_key", "uniform", "stochastic_round_bf16", "BF16_SR_SEED"]

BF16_SR_SEED = 0x5EED_B16  # fixed: resumed runs and reruns draw the same bits


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
