"""4-bit block-wise state, block 128, two codes per byte.

m uses the signed 16-entry dynamic-exponent map; v uses the linear map (i + 1) / 16 **without zero**, since a
zero in the v map makes ``1 / (sqrt(v) + eps)`` explode (the "zero-point problem").

References:
  Li, Chen, Zhu, "Memory Efficient Optimizers with 4-bit States", arXiv:2309.01507.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._base import CodebookFormat

SIGNED_MAP = (
    -0.8875, -0.6625, -0.4375, -0.2125, -0.0775, -0.0325, -0.0055, 0.0,
    0.0055, 0.0325, 0.0775, 0.2125, 0.4375, 0.6625, 0.8875, 1.0,
)


class FourBit(CodebookFormat):
    name = "4bit"
    default_block_size = 128
    codes_per_byte = 2
    bits = 4

    def __init__(self) -> None:
        super().__init__()
        self._maps = {
            True: torch.tensor(SIGNED_MAP, dtype=torch.float32),
            False: torch.arange(1, 17, dtype=torch.float32) / 16,
        }

    def pack(self, codes: Tensor) -> Tensor:
        """``[..., bs]`` codes < 16 -> ``[..., bs // 2]`` bytes, the even element in the high nibble."""
        return (codes[..., 0::2] << 4) | codes[..., 1::2]

    def unpack(self, codes: Tensor) -> Tensor:
        """``[..., bs // 2]`` bytes -> ``[..., bs]`` codes (a broadcast shift, no stack: one pointwise kernel)."""
        shifts = torch.tensor([4, 0], dtype=torch.uint8, device=codes.device)
        return ((codes.unsqueeze(-1) >> shifts) & 15).view(*codes.shape[:-1], codes.shape[-1] * 2)
