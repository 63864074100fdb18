"""8-bit block-wise state with the dynamic-tree ("DE") maps of bitsandbytes / torchao, block 256.

References:
  Dettmers et al., "8-bit Optimizers via Block-wise Quantization", arXiv:2110.02861.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._base import CodebookFormat


def dynamic_tree_map(signed: bool) -> Tensor:
    """The 256-entry dynamic-tree map, sorted, float32.

    Decade ``i`` (0..6, magnitude ``10**(i-6)``) holds the midpoints of ``linspace(0.1, 1, n + 1)`` with
    ``n = 2**i`` (signed, mirrored to negative values) or ``n = 2**(i+1)`` (unsigned); 0 and 1.0 complete the map.
    The signed map therefore has +1.0 but not -1.0 (range -0.99296875 .. 1.0).
    """
    values = [0.0, 1.0]
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
