"""FP8 block-wise state: ``float8_e4m3fn`` codes (stored as their uint8 bit patterns) with a per-block scale
``absmax / 448``, round-to-nearest-even cast. Block 256.

References:
  Micikevicius et al., "FP8 Formats for Deep Learning", arXiv:2209.05433.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._base import BlockFormat, block_absmax, normalize

E4M3_MAX = 448.0


class Fp8(BlockFormat):
    name = "fp8"
    default_block_size = 256
    bits = 8

    def encode(self, blocks: Tensor, codebook: Tensor | None) -> tuple[Tensor, Tensor]:
        scale = block_absmax(blocks) / E4M3_MAX
        y = normalize(blocks, scale).clamp(-E4M3_MAX, E4M3_MAX)
        return y.to(torch.float8_e4m3fn).view(torch.uint8), scale

    def decode(self, codes: Tensor, scale: Tensor, codebook: Tensor | None) -> Tensor:
        return codes.view(torch.float8_e4m3fn).to(torch.float32) * scale.unsqueeze(1)
