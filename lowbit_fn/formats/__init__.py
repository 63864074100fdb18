"""Block-wise quantized state formats: ``"8bit"``, ``"4bit"`` and ``"fp8"``.

A tensor is quantized row by row (``shape[0]`` rows of ``prod(shape[1:])`` elements; fewer dimensions: one row),
each row in blocks of ``block_size`` contiguous elements, the last block of a row shorter when the block size does
not divide the row. Every block keeps one float32 scale. The codes keep the tensor's shape (``uint8``; two 4-bit
codes per byte, packed within a row: ``(rows, ceil(R / 2))``; FP8 codes as their bit patterns), the scales are
``(rows, blocks per row)``: a slice of rows of the codes and scales is the quantized slice of rows of the tensor.
Codes are ``uint8`` so tensordict memmap and consolidate work on them.

Unsigned moments (``signed=False``: second moments) have no code of 0: the 8-bit unsigned map starts at 1e-7,
the 4-bit one at 1/16, and FP8 floors them at ``2**-9`` (each times the block's scale), so a nonnegative value in a
block with a positive scale never dequantizes to 0 (a second moment stored as 0 would make the next step
``m / eps``). Only an all-zero block (scale 0) decodes to 0. Negative inputs with ``signed=False`` map to the
smallest entry (the floor).

Non-finite values (NaN, +-Inf) are stored as the code nearest to 0 (0 for signed moments, the smallest entry or
the floor for unsigned ones) and take no part in their block's scale: each costs its own element only (an
optimizer step makes that element's parameter NaN, as torch.optim does, and nothing else).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .._compile import compiled
from .._random import stream_key, tensor_key, uniform
from ._base import BlockFormat, row_split
from .dynamic8 import Dynamic8, dynamic_tree_map
from .fourbit import FourBit
from .fp8 import Fp8

__all__ = [
    "FORMATS", "ROUNDINGS", "BlockFormat", "get_format", "quantize", "dequantize", "codebook", "dynamic_tree_map",
    "row_noise", "encode_rows", "decode_rows", "row_split", "canonical_codes",
]

FORMATS: dict[str, BlockFormat] = {f.name: f for f in (Dynamic8(), FourBit(), Fp8())}

_FLOAT_INPUTS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def get_format(state_format: str) -> BlockFormat:
    """The format object for a name, or ``ValueError`` listing the valid names."""
    fmt = FORMATS.get(state_format) if isinstance(state_format, str) else None
    if fmt is None:
        raise ValueError(f"state_format must be one of {sorted(FORMATS)}, got {state_format!r}")
    return fmt


def codebook(state_format: str, *, signed: bool) -> Tensor:
    """The sorted float32 map of normalized values used by ``"8bit"`` or ``"4bit"``.

    Example:
        >>> import lowbit_fn
        >>> m = lowbit_fn.codebook("8bit", signed=True)
        >>> m.shape, float(m[-1]), bool((m == -1.0).any())
        (torch.Size([256]), 1.0, False)
    """
    fmt = get_format(state_format)
    table = fmt.codebook(signed)
    if table is None:
        raise ValueError(f"state_format={state_format!r} has no codebook (FP8 codes are float8_e4m3fn values)")
    return table.clone()


ROUNDINGS = ("nearest", "stochastic")


def row_noise(rows: int, length: int, block_size: int, base: Tensor, key: Tensor, blocks_per_row: int | None = None) -> Tensor:
    """Stochastic-rounding noise for the ``[rows, blocks per row, block_size]`` blocks of ``rows`` rows of
    ``length`` elements: element ``c`` of row ``r`` (padding included) draws from ``(key, base + r * length + c)``.

    ``base`` (int64 0-d) is the index of the first row's first element in the whole tensor, so a tensor quantized
    whole or in pieces of rows (each with its own ``base``) gets the same codes."""
    nb = -(-length // block_size) if blocks_per_row is None else blocks_per_row
    col = torch.arange(nb * block_size, device=key.device, dtype=torch.int64).view(nb, block_size)
    row = torch.arange(rows, device=key.device, dtype=torch.int64) * length
    return uniform(row.view(rows, 1, 1) + col + base, key)


def encode_rows(
    x: Tensor, fmt: BlockFormat, block_size: int, table: Tensor | None, key: Tensor | None, base: Tensor,
    blocks_per_row: int | None = None, *, signed: bool,
) -> tuple[Tensor, Tensor]:
    """``[rows, R]`` float32 -> (uint8 codes ``[rows, ceil(R / codes_per_byte)]``, float32 scales ``[rows, blocks
    per row]``). Each row is zero-padded to whole blocks (a pad of width 0 where the block size divides ``R``), seen
    as ``[rows, blocks per row, block_size]``; ``key`` (a stream key) selects stochastic rounding with
    :func:`row_noise`, ``None`` rounds to nearest; ``signed`` is the moment's kind (``table`` its map). Traced
    into the compiled step: no data-dependent control flow and no branch on sizes, so one graph serves every shape
    (``blocks_per_row``, ``ceil(R / block_size)``, may be given as the size of a tensor: one symbol fewer to
    derive)."""
    rows, length = x.shape
    nb = -(-length // block_size) if blocks_per_row is None else blocks_per_row
    blocks = torch.nn.functional.pad(x, (0, nb * block_size - length)).view(rows, nb, block_size)
    noise = row_noise(rows, length, block_size, base, key, nb) if key is not None else None
    codes, scale = fmt.encode(blocks, table, noise, signed=signed)
    per_row = -(-length // fmt.codes_per_byte)
    return codes.view(rows, nb * (block_size // fmt.codes_per_byte)).narrow(1, 0, per_row), scale


def decode_rows(codes: Tensor, scale: Tensor, fmt: BlockFormat, block_size: int, table: Tensor | None, length: int) -> Tensor:
    """Inverse of :func:`encode_rows`: float32 ``[rows, length]`` from codes ``[rows, ceil(length /
    codes_per_byte)]`` and scales ``[rows, blocks per row]`` (the codes zero-padded to whole blocks, the padding
    decoded and dropped)."""
    rows, nb = scale.shape
    width = block_size // fmt.codes_per_byte
    full = torch.nn.functional.pad(codes, (0, nb * width - codes.shape[1])).view(rows, nb, width)
    return fmt.decode(full, scale, table).view(rows, nb * block_size).narrow(1, 0, length)


def canonical_codes(codes: Tensor, scale: Tensor, fmt: BlockFormat, block_size: int, *, signed: bool) -> Tensor:
    """Codes ``[rows, ceil(R / codes_per_byte)]`` of the row layout (scales ``[rows, blocks per row]``) as the
    encoder writes them for the values they decode to (:meth:`BlockFormat.canonical`), for a checkpoint whose
    encoder may have differed: for unsigned FP8 moments a 0 in a block with a positive scale (an encoder without
    the floor wrote it) becomes the floor's code; other codes, and every code of the other formats, stay. The
    encoder's own codes come back unchanged."""
    rows, nb = scale.shape
    width = block_size // fmt.codes_per_byte
    full = torch.nn.functional.pad(codes, (0, nb * width - codes.shape[1])).view(rows, nb, width)
    return fmt.canonical(full, scale, signed=signed).reshape(rows, nb * width)[:, : codes.shape[1]]


@dataclass(frozen=True)
class _Blocks:
    """A format and its block size: one constant of a compiled graph (a plain int would be a symbolic size)."""

    fmt: BlockFormat
    size: int


@compiled
def _encode(
    x: Tensor, blocks: _Blocks, table: Tensor | None, key: Tensor | None, base: Tensor, signed: bool,
) -> tuple[Tensor, Tensor]:
    return encode_rows(x, blocks.fmt, blocks.size, table, key, base, signed=signed)


@compiled
def _decode(codes: Tensor, scale: Tensor, blocks: _Blocks, table: Tensor | None, out: Tensor) -> Tensor:
    """Decode into ``out`` (``[rows, R]``: its size is the row length, a symbol of the graph, not a constant)."""
    return out.copy_(decode_rows(codes, scale, blocks.fmt, blocks.size, table, out.shape[1]))


def quantize(
    x: Tensor,
    state_format: str,
    *,
    signed: bool,
    block_size: int | None = None,
    rounding: str = "nearest",
    seed: int = 0,
    step: int | Tensor = 0,
    offset: int = 0,
    tensor_id: int = 0,
) -> tuple[Tensor, Tensor]:
    """Quantize ``x`` row by row, block-wise; returns ``(codes, scale)``.

    With ``rounding="stochastic"`` each value goes to one of the two representable values around it, the upper
    one with probability proportional to the distance from the lower, so the dequantized result equals ``x`` in
    expectation. The random numbers come from a hash of ``(seed, signed, step, tensor_id, offset + element
    index)``: deterministic, different every step, and the same whether ``x`` is quantized whole or in pieces of
    rows.

    Args:
      x: a floating tensor of any shape (float32, bfloat16, float16 or float64; computed in float32).
      state_format: ``"8bit"`` (dynamic-tree map), ``"4bit"`` (16-entry maps, two codes per byte) or ``"fp8"``.
      signed: the signed map (first moment) or the unsigned one (second moment).
      block_size: elements per block; defaults to 256 / 128 / 256.
      rounding: ``"nearest"`` or ``"stochastic"``.
      seed, step, tensor_id: select the random numbers of stochastic rounding (``step`` may be a 0-d integer
        tensor; ``tensor_id`` is a 32-bit identity of the tensor, see :func:`lowbit_fn.scale_by_adam`).
      offset: the index of ``x``'s first element in the whole tensor, for a piece of rows of a tensor.

    Returns:
      ``codes``: uint8 of ``x``'s shape (4-bit: ``(rows, ceil(R / 2))``; below two dimensions, 1-D);
      ``scale``: float32 ``(rows, blocks per row)`` block scales (absmax, or absmax / 448 for FP8; 1-D below two
      dimensions).

    Example:
        >>> import torch, lowbit_fn
        >>> x = torch.randn(4, 300)
        >>> codes, scale = lowbit_fn.quantize(x, "8bit", signed=True)
        >>> codes.dtype, codes.shape, scale.shape
        (torch.uint8, torch.Size([4, 300]), torch.Size([4, 2]))
        >>> y = lowbit_fn.dequantize(codes, scale, "8bit", signed=True, shape=x.shape)
        >>> bool((y - x).norm() / x.norm() < 0.02)
        True
    """
    fmt = get_format(state_format)
    block_size = fmt.check_block_size(block_size)
    if rounding not in ROUNDINGS:
        raise ValueError(f"quantize: rounding must be one of {list(ROUNDINGS)}, got {rounding!r}")
    for label, value in (("seed", seed), ("offset", offset), ("tensor_id", tensor_id)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"quantize: {label} must be an int >= 0, got {value!r}")
    if tensor_id >= 2**32:
        raise ValueError(f"quantize: tensor_id must be below 2**32, got {tensor_id}")
    if not isinstance(x, Tensor):
        raise TypeError(f"quantize: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_INPUTS:
        raise TypeError(f"quantize: x must be float32, bfloat16, float16 or float64, got {x.dtype}")
    if x.layout != torch.strided:
        raise TypeError(f"quantize: x must be a dense (strided) tensor, got layout {x.layout}")
    code_shape, scale_shape = fmt.code_shape(x.shape), fmt.scale_shape(x.shape, block_size)
    if x.numel() == 0:
        return (torch.empty(code_shape, dtype=torch.uint8, device=x.device),
                torch.empty(scale_shape, dtype=torch.float32, device=x.device))
    rows, length = row_split(x.shape)
    flat = x.detach().reshape(rows, length).to(torch.float32)  # one graph for every input dtype
    step_t = torch.as_tensor(step, dtype=torch.int64, device=x.device)
    key = None
    if rounding == "stochastic":
        key = tensor_key(stream_key(seed, int(not signed), step_t), tensor_id)
    base = torch.tensor(offset, dtype=torch.int64, device=x.device)
    # a codebook format takes the moment's kind from the map it is given: one graph serves both kinds (only FP8,
    # which has no map, needs it as a constant of its graph)
    kind = bool(signed) if fmt.codebook(True) is None else True
    codes, scale = _encode(flat, _Blocks(fmt, block_size), fmt.codebook(signed, x.device), key, base, kind)
    # contiguous whatever layout the graph chose for its outputs (a row-padded buffer or not): one layout for
    # dequantize's graph to see
    return codes.reshape(code_shape).contiguous(), scale.reshape(scale_shape).contiguous()


def dequantize(
    codes: Tensor,
    scale: Tensor,
    state_format: str,
    *,
    signed: bool,
    shape: torch.Size | tuple[int, ...],
    block_size: int | None = None,
) -> Tensor:
    """Inverse of :func:`quantize`: a float32 tensor of ``shape``.

    Example:
        >>> import torch, lowbit_fn
        >>> v = torch.rand(3, 5) ** 2
        >>> c, s = lowbit_fn.quantize(v, "4bit", signed=False)
        >>> c.shape, s.shape
        (torch.Size([3, 3]), torch.Size([3, 1]))
        >>> lowbit_fn.dequantize(c, s, "4bit", signed=False, shape=(3, 5)).shape
        torch.Size([3, 5])
    """
    fmt = get_format(state_format)
    block_size = fmt.check_block_size(block_size)
    shape = torch.Size(shape)
    if not isinstance(codes, Tensor) or codes.dtype != torch.uint8:
        raise TypeError(f"dequantize: codes must be a uint8 tensor, got {getattr(codes, 'dtype', type(codes))}")
    if not isinstance(scale, Tensor) or scale.dtype != torch.float32:
        raise TypeError(f"dequantize: scale must be a float32 tensor, got {getattr(scale, 'dtype', type(scale))}")
    code_shape, scale_shape = fmt.code_shape(shape), fmt.scale_shape(shape, block_size)
    if codes.shape != code_shape or scale.shape != scale_shape:
        raise ValueError(
            f"dequantize: shape {tuple(shape)} with state_format={state_format!r}, block_size={block_size} needs "
            f"codes of shape {tuple(code_shape)} and scales of shape {tuple(scale_shape)}, got {tuple(codes.shape)} "
            f"and {tuple(scale.shape)}"
        )
    if shape.numel() == 0:
        return torch.empty(shape, dtype=torch.float32, device=codes.device)
    rows, length = row_split(shape)
    out = torch.empty((rows, length), dtype=torch.float32, device=codes.device)
    _decode(codes.reshape(rows, -1), scale.reshape(rows, -1), _Blocks(fmt, block_size), fmt.codebook(signed, codes.device), out)
    return out.reshape(shape)
