"""8-bit block-wise state with the dynamic-tree ("DE") maps of bitsandbytes / torchao, block 256.

References:
  Dettmers et al., "8-bit Optimizers via Block-wise Quantization", arXiv:2110.02861.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._base import CodebookFormat


UNSIGNED_BOTTOM = 1e-7  # the unsigned map's smallest entry: the bottom of its smallest decade, 1e-7 .. 1e-6


def dynamic_tree_map(signed: bool) -> Tensor:
    """The 256-entry dynamic-tree map, sorted, float32.

    Decade ``i`` (0..6, magnitude ``10**(i-6)``) holds the midpoints of ``linspace(0.1, 1, n + 1)`` with
    ``n = 2**i`` (signed, mirrored to negative values) or ``n = 2**(i+1)`` (unsigned); 1.0 and, for the signed
    map, 0 complete it. The signed map therefore has +1.0 but not -1.0 (range -0.99296875 .. 1.0).

    The unsigned map (second moments) has no zero: its first entry is ``1e-7`` (:data:`UNSIGNED_BOTTOM`) where
    bitsandbytes' map has 0. A second moment stored as 0 although it is not makes the next step
    ``m / eps`` for that element (the "zero-point problem" of the 4-bit paper): with the map's bottom at 1e-7 of
    the block's absmax a small ``v`` is stored too large, never as 0, and its step is smaller than exact, not
    huge. A block of zeros still decodes to 0 (its scale is 0).

    State written with the zero entry needs no conversion: codes 1..255 decode to the same values as before, and
    code 0 (0 before) is what the encoder gives for an old decoded 0 (1e-7 is the entry nearest to 0, and a
    block's largest value keeps code 255, hence its scale). Re-quantizing an old state's decoded values therefore
    gives back its own codes and scales, wherever the decoded values are normal float32 numbers (tested in
    ``tests/test_formats.py`` for scales from 1e-30 to 1e30).
    """
    values = [1.0] + ([0.0] if signed else [UNSIGNED_BOTTOM])
    for i in range(7):
        n = 2 ** (i if signed else i + 1)
        edges = torch.linspace(0.1, 1.0, n + 1, dtype=torch.float32)
        mids = ((edges[:-1] + edges[1:]) / 2) * (10.0 ** (i - 6))
        values += mids.tolist()
        if signed:
            values += (-mids).tolist()
    table = torch.tensor(values, dtype=torch.float32).sort().values
    assert table.numel() == 256
    return table


class Dynamic8(CodebookFormat):
    name = "8bit"
    default_block_size = 256
    bits = 8

    def __init__(self) -> None:
        super().__init__()
        self._maps = {True: dynamic_tree_map(True), False: dynamic_tree_map(False)}
