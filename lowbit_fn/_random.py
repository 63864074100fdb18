"""Counter-based random numbers: a hash of ``(seed, stream, step, tensor identity, element index)``.

Fresh every step, no generator state to save in a checkpoint, the same bits whatever the threading, chunking or
sharding, and a resumed run stays bit-exact. The mixer is Chris Wellons' "lowbias32" integer hash, computed in
int64 so that every backend (eager, inductor's C++, GPUs) gives the same bits: products are formed from 16-bit
halves and never overflow.

References:
  Wellons, "Prospecting for Hash Functions", https://nullprogram.com/blog/2018/07/31/.
  Salmon et al., "Parallel Random Numbers: As Easy as 1, 2, 3" (counter-based generators), SC 2011.
"""

from __future__ import annotations

import zlib

import torch
from torch import Tensor

__all__ = ["hash32", "stream_key", "stream_key_int", "tensor_key", "tensor_key_int", "tensor_id", "mix", "uniform"]

_M32 = 0xFFFFFFFF


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


def _hash32_int(x: int) -> int:
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def stream_key_int(seed: int, salt: int, step: int) -> int:
    """:func:`stream_key` with Python ints (for the native kernel's arguments): the same value, no tensor ops."""
    base = _hash32_int((seed * 0x9E3779B9 + salt) & _M32)
    return _hash32_int((step ^ base) & _M32)


def tensor_key(key: Tensor, ident: int | Tensor) -> Tensor:
    """The key of one tensor's stream: ``key`` (:func:`stream_key`) mixed with the tensor's 32-bit identity."""
    return hash32((key ^ ident) & _M32)


def tensor_key_int(key: int, ident: int) -> int:
    """:func:`tensor_key` with Python ints."""
    return _hash32_int((key ^ ident) & _M32)


def tensor_id(name: str) -> int:
    """A tensor's 32-bit identity from its name (a parameter's key path): stable across processes and runs."""
    return zlib.crc32(name.encode())


def mix(index: Tensor, key: Tensor) -> Tensor:
    """32 random bits for each int64 element ``index`` (any value below 2**63: no wrap at 2**32) of stream ``key``:
    ``hash32(low32(index) ^ hash32(high32(index) ^ key))``."""
    high = hash32(((index >> 32) ^ key) & _M32)
    return hash32((index & _M32) ^ high)


def uniform(index: Tensor, key: Tensor) -> Tensor:
    """float32 noise in [0, 1) (24 random bits) for each int64 ``index`` of the stream ``key``."""
    return (mix(index, key) >> 8).to(torch.float32) * (1.0 / (1 << 24))
