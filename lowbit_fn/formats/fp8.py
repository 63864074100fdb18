"""FP8 block-wise state: ``float8_e4m3fn`` codes (stored as their uint8 bit patterns) with a per-block scale
``absmax / 448``, round-to-nearest-even cast (or stochastic rounding between the two neighbouring e4m3 values).
Block 256.

Unsigned moments (second moments) never decode to 0 in a block with a positive scale: their normalized values are
floored at e4m3's smallest positive subnormal, ``2**-9`` (:data:`UNSIGNED_FLOOR`; ``2**-9 / 448`` of the block's
absmax), before the cast, so a small ``v`` is stored too large rather than as 0 (a stored 0 would make the next
step ``m / eps``, the "zero-point problem" of the 4-bit paper). An all-zero block (scale 0) keeps code 0.

References:
  Micikevicius et al., "FP8 Formats for Deep Learning", arXiv:2209.05433.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._base import BlockFormat, block_absmax, normalize

E4M3_MAX = 448.0
UNSIGNED_FLOOR = 2.0**-9  # e4m3's smallest positive subnormal: the least normalized value of an unsigned moment
FLOOR_CODE = 1  # its bit pattern


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

    def encode(
        self, blocks: Tensor, codebook: Tensor | None, noise: Tensor | None = None, *, signed: bool,
    ) -> tuple[Tensor, Tensor]:
        scale = block_absmax(blocks) / E4M3_MAX
        y = normalize(blocks, scale)
        if signed:
            y = y.clamp(-E4M3_MAX, E4M3_MAX)
        else:  # floored where the scale is positive (an all-zero block stays 0)
            low = torch.where(scale > 0, UNSIGNED_FLOOR, -E4M3_MAX).unsqueeze(-1)
            y = torch.maximum(y, low).clamp(max=E4M3_MAX)
        if noise is not None:
            y = _stochastic_e4m3(y, noise)
        return y.to(torch.float8_e4m3fn).view(torch.uint8), scale

    def decode(self, codes: Tensor, scale: Tensor, codebook: Tensor | None) -> Tensor:
        return codes.view(torch.float8_e4m3fn).to(torch.float32) * scale.unsqueeze(-1)

    def canonical(self, codes: Tensor, scale: Tensor, *, signed: bool) -> Tensor:
        """Unsigned moments: a code of 0 or -0 in a block with a positive scale (an encoder without the floor wrote
        it) as :data:`FLOOR_CODE`, what :meth:`encode` gives for the value it decodes to; every other code as it
        is."""
        if signed:
            return codes
        zero = (codes & 0x7F) == 0
        return torch.where(zero & (scale > 0).unsqueeze(-1), torch.full_like(codes, FLOOR_CODE), codes)
