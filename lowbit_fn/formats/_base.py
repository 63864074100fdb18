"""What every block-wise state format shares: the row layout, block scales, the nearest-code search, the format
interface.

A tensor of two or more dimensions is seen as ``rows = shape[0]`` rows of ``R = prod(shape[1:])`` elements (a
tensor of fewer dimensions as one row). Each row is cut into ``ceil(R / block_size)`` blocks of contiguous
elements, the last one shorter when ``block_size`` does not divide ``R``: no block crosses a row, so any range
of rows of a tensor (an FSDP shard) has the state of those rows and nothing else. Each block keeps one float32
scale. A non-finite value (NaN, +-Inf) costs its own element only: it is stored as the code nearest to 0 (0 in
the signed maps and FP8; for unsigned moments, which have no code of 0 in a block with a positive scale, the
smallest: the 8-bit map's 1e-7, the 4-bit map's 1/16, FP8's floor ``2**-9``, each times the block's scale) and
takes no part in its block's scale, so the block's other elements keep their values. An optimizer's step computes
each element's direction before quantizing, so a non-finite gradient still makes that element's parameter NaN,
as in ``torch.optim``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


FLOAT32_MAX = torch.finfo(torch.float32).max


def finite_or_zero(blocks: Tensor) -> Tensor:
    """``blocks`` with every NaN and +-Inf replaced by 0 (``|x| <= max`` is false for both)."""
    return torch.where(blocks.abs() <= FLOAT32_MAX, blocks, torch.zeros_like(blocks))


def block_absmax(blocks: Tensor) -> Tensor:
    """Per-block max |x| of the finite values of ``[..., block_size]`` float32 blocks (the last dimension); 0 for a
    block without any."""
    return finite_or_zero(blocks).abs().amax(dim=-1)


def normalize(blocks: Tensor, scale: Tensor) -> Tensor:
    """``blocks / scale`` per block, non-finite values as 0; all-zero blocks (scale 0) divide by 1 instead of 0. No
    other floor."""
    return finite_or_zero(blocks) / torch.where(scale > 0, scale, torch.ones_like(scale)).unsqueeze(-1)


def nearest_code(y: Tensor, codebook: Tensor) -> Tensor:
    """Index (uint8) of the codebook entry nearest to each ``y``; ``codebook`` is sorted, its length a power of 2.

    A branch-free binary search (log2(n) gathers) followed by one comparison with the lower neighbour, so the
    result equals ``argmin |y - codebook|`` (an exact tie may go either way). NaN maps to code 0.
    """
    n = codebook.shape[0]
    idx = torch.zeros_like(y, dtype=torch.int32)
    step = n // 2
    while step >= 1:  # idx becomes the number of entries < y, capped at n - 1
        cand = idx + step
        idx = torch.where(codebook[cand - 1] < y, cand, idx)
        step //= 2
    lower = (idx - 1).clamp(min=0)
    take_upper = (codebook[idx] - y).abs() < (y - codebook[lower]).abs()
    return torch.where(take_upper, idx, lower).to(torch.uint8)


def stochastic_code(y: Tensor, codebook: Tensor, noise: Tensor) -> Tensor:
    """Index (uint8) of one of the two codebook entries around each ``y``, the upper one with probability
    ``(y - lower) / (upper - lower)``, decided by ``noise`` (uniform in [0, 1)): unbiased within the map's range.
    Values outside the range take the end entry; NaN maps to code 0."""
    n = codebook.shape[0]
    idx = torch.zeros_like(y, dtype=torch.int32)
    step = n // 2
    while step >= 1:
        cand = idx + step
        idx = torch.where(codebook[cand - 1] < y, cand, idx)
        step //= 2
    lower = (idx - 1).clamp(min=0)
    lo, hi = codebook[lower], codebook[idx]
    up = noise * (hi - lo) < (y - lo)  # P(up) = (y - lo) / (hi - lo); never up when y == lo, always when y == hi
    return torch.where(up | (y >= hi), idx, lower).to(torch.uint8)


def row_split(shape: torch.Size | tuple[int, ...]) -> tuple[int, int]:
    """``(rows, R)``: ``(shape[0], prod(shape[1:]))`` for two or more dimensions, one row of every element else."""
    shape = tuple(shape)
    if len(shape) >= 2:
        return shape[0], math.prod(shape[1:])
    return 1, math.prod(shape)


class BlockFormat:
    """A quantized state format. Subclasses define the codebook (if any), ``encode`` and ``decode``.

    ``encode``/``decode`` are pure tensor functions on ``[..., block_size]`` float32 blocks (the last dimension;
    any leading dimensions, e.g. ``[rows, blocks per row]``), traced into
    the compiled optimizer step, so they must stay free of Python-side data-dependent control flow.
    """

    name: str
    default_block_size: int
    codes_per_byte: int = 1
    bits: int = 8

    def check_block_size(self, block_size: int | None) -> int:
        """Return the effective block size, raising ``ValueError`` for a bad one."""
        if block_size is None:
            return self.default_block_size
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
            raise ValueError(f"block_size must be a positive int for state_format={self.name!r}, got {block_size!r}")
        if block_size % self.codes_per_byte:
            raise ValueError(
                f"block_size must be a positive multiple of {self.codes_per_byte} for state_format={self.name!r} "
                f"(two codes share a byte), got {block_size}"
            )
        return block_size

    def num_blocks(self, numel: int, block_size: int) -> int:
        """Blocks of one row of ``numel`` elements."""
        return -(-numel // block_size)

    def code_bytes(self, num_blocks: int, block_size: int) -> int:
        return num_blocks * block_size // self.codes_per_byte

    def code_shape(self, shape: torch.Size | tuple[int, ...]) -> torch.Size:
        """Shape of the uint8 codes of a tensor of ``shape``: the tensor's own shape (two codes per byte: ``(rows,
        ceil(R / 2))``, the pairs packed within a row); a tensor of fewer than two dimensions gives a 1-D shape."""
        rows, length = row_split(shape)
        per_row = -(-length // self.codes_per_byte)
        if len(shape) < 2:
            return torch.Size([per_row])
        return torch.Size(shape) if self.codes_per_byte == 1 else torch.Size([rows, per_row])

    def scale_shape(self, shape: torch.Size | tuple[int, ...], block_size: int) -> torch.Size:
        """Shape of the float32 block scales of a tensor of ``shape``: ``(rows, blocks per row)`` (1-D below two
        dimensions)."""
        rows, length = row_split(shape)
        nb = self.num_blocks(length, block_size)
        return torch.Size([nb]) if len(shape) < 2 else torch.Size([rows, nb])

    def codebook(self, signed: bool, device: torch.device | str | None = None) -> Tensor | None:
        """The sorted float32 map of normalized values, or ``None`` for formats without one (FP8)."""
        return None

    def encode(
        self, blocks: Tensor, codebook: Tensor | None, noise: Tensor | None = None, *, signed: bool,
    ) -> tuple[Tensor, Tensor]:
        """``[..., bs]`` float32 -> (uint8 codes ``[..., bs // codes_per_byte]``, float32 scale ``[...]``).

        ``noise`` (uniform in [0, 1), shaped like ``blocks``) selects stochastic rounding; ``None``, nearest.
        ``signed``: a signed moment or an unsigned one (``codebook`` is already that moment's map; FP8, which has
        none, floors unsigned moments above 0)."""
        raise NotImplementedError

    def decode(self, codes: Tensor, scale: Tensor, codebook: Tensor | None) -> Tensor:
        """Inverse of ``encode``: float32 ``[..., bs]``."""
        raise NotImplementedError

    def canonical(self, codes: Tensor, scale: Tensor, *, signed: bool) -> Tensor:
        """``[..., bs // codes_per_byte]`` codes of blocks with scales ``[...]`` as ``encode`` gives them for the
        values they decode to, for codes a different encoder may have written. Here: the codes as they are
        (the codebook formats' codes need no conversion, see :func:`~lowbit_fn.formats.dynamic_tree_map`)."""
        return codes


class CodebookFormat(BlockFormat):
    """Scale = block absmax, code = nearest entry of a sorted map (signed map for m, unsigned for v)."""

    _maps: dict[bool, Tensor]

    def __init__(self) -> None:
        self._on_device: dict[tuple[bool, torch.device], Tensor] = {}

    def codebook(self, signed: bool, device: torch.device | str | None = None) -> Tensor:
        key = (bool(signed), torch.device(device if device is not None else "cpu"))
        if key not in self._on_device:
            self._on_device[key] = self._maps[key[0]].to(key[1])
        return self._on_device[key]

    def encode(
        self, blocks: Tensor, codebook: Tensor | None, noise: Tensor | None = None, *, signed: bool,
    ) -> tuple[Tensor, Tensor]:
        scale = block_absmax(blocks)
        y = normalize(blocks, scale)
        codes = nearest_code(y, codebook) if noise is None else stochastic_code(y, codebook, noise)
        return self.pack(codes), scale

    def decode(self, codes: Tensor, scale: Tensor, codebook: Tensor | None) -> Tensor:
        return codebook[self.unpack(codes).long()] * scale.unsqueeze(-1)

    def pack(self, codes: Tensor) -> Tensor:
        return codes

    def unpack(self, codes: Tensor) -> Tensor:
        return codes
