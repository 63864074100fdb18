"""FP8 block-wise state: ``float8_e4m3fn`` codes (stored as their uint8 bit patterns) with a per-block scale
``absmax / 448``, round-to-nearest-even cast (or stochastic rounding between the two neighbouring e4m3 values).
Block 256.

References:
  Micikevicius et al., "FP8 Formats for Deep Learning", arXiv:2209.05433.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._base import BlockFormat, block_absmax, normalize

E4M3_MAX = 448.0


def _stochastic_e4m3(y: Tensor, noise: Tensor) -> Tensor:
    """Round ``|y| <= 448`` to a neighbouring e4m3 value, up with probability equal to the dropped fraction.

    The e4m3 spacing around ``y`` is ``2**(max(e, -6) - 3)`` for ``2**e <= |y| < 2**(e+1)`` (subnormals below
    ``2**-6``); ``|y| / spacing`` is exact in float32, so ``floor(|y| / spacing + noise) * spacing`` is exactly
    representable and the cast that follows does not round again."""
    exponent = ((y.view(torch.int32) >> 23) & 0xFF) - 127
    spacing_bits = ((exponent.clamp(min=-6) - 3 + 127) << 23).to(torch.int32)
    spacing = spacing_bits.view(torch.float32)
    rounded = torch.floor(y.abs() / spacing + noise) * spacing
    return torch.copysign(rounded.clamp(max=E4M3_MAX), y)


class Fp8(BlockFormat):
    name = "fp8"
    default_block_size = 256
    bits = 8

    def encode(self, blocks: Tensor, codebook: Tensor | None, noise: Tensor | None = None) -> tuple[Tensor, Tensor]:
        scale = block_absmax(blocks) / E4M3_MAX
        y = normalize(blocks, scale).clamp(-E4M3_MAX, E4M3_MAX)
        if noise is not None:
            y = _stochastic_e4m3(y, noise)
        return y.to(torch.float8_e4m3fn).view(torch.uint8), scale

    def decode(self, codes: Tensor, scale: Tensor, codebook: Tensor | None) -> Tensor:
        return codes.view(torch.float8_e4m3fn).to(torch.float32) * scale.unsqueeze(-1)
