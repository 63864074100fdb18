"""Block-wise quantized state formats: ``"8bit"``, ``"4bit"`` and ``"fp8"``.

All formats split the flattened tensor into blocks of ``block_size`` contiguous elements (the last block padded
with zeros, so any size is quantized) and keep one float32 scale per block. Codes are stored as ``uint8``
(two 4-bit codes per byte; FP8 codes as their bit patterns) so tensordict memmap and consolidate work on them.

Non-finite values: a NaN or Inf anywhere in a block makes that block's scale NaN, so the whole block
dequantizes to NaN; other blocks are unaffected. The 8-bit unsigned map and the 4-bit linear map have no
negative entries: negative inputs with ``signed=False`` map to the smallest entry.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._compile import compiled
from .._random import stream_key, uniform
from ._base import BlockFormat
from .dynamic8 import Dynamic8, dynamic_tree_map
from .fourbit import FourBit
from .fp8 import Fp8

__all__ = [
    "FORMATS", "ROUNDINGS", "BlockFormat", "get_format", "quantize", "dequantize", "codebook", "dynamic_tree_map",
    "block_noise",
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


def block_noise(nb: int, block_size: int, offset: int, seed: int, stream: int, step: Tensor) -> Tensor:
    """Stochastic-rounding noise for ``[nb, block_size]`` blocks whose first element has global index ``offset``.

    Element ``i`` of a tensor (``offset + position``) draws from ``(seed, stream, step, i)`` only, so a tensor
    quantized whole or in block-aligned pieces (each with its own ``offset``) gets the same codes."""
    index = torch.arange(nb * block_size, device=step.device, dtype=torch.int64).view(nb, block_size) + offset
    return uniform(index, stream_key(seed, stream, step))


@compiled
def _encode(
    flat: Tensor, fmt: BlockFormat, block_size: int, table: Tensor | None, stochastic: bool, offset: int, seed: int,
    stream: int, step: Tensor,
) -> tuple[Tensor, Tensor]:
    nb = fmt.num_blocks(flat.shape[0], block_size)
    blocks = torch.nn.functional.pad(flat, (0, nb * block_size - flat.shape[0])).view(nb, block_size)
    noise = block_noise(nb, block_size, offset, seed, stream, step) if stochastic else None
    codes, scale = fmt.encode(blocks, table, noise)
    return codes.reshape(-1), scale


@compiled
def _decode(codes: Tensor, scale: Tensor, fmt: BlockFormat, block_size: int, table: Tensor | None) -> Tensor:
    nb = scale.shape[0]
    return fmt.decode(codes.view(nb, -1), scale, table).reshape(-1)


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
) -> tuple[Tensor, Tensor]:
    """Quantize ``x`` block-wise; returns ``(codes, scale)``.

    With ``rounding="stochastic"`` each value goes to one of the two representable values around it, the upper
    one with probability proportional to the distance from the lower, so the dequantized result equals ``x`` in
    expectation. The random numbers come from a hash of ``(seed, signed, step, offset + element index)``:
    deterministic, different every step, and the same whether ``x`` is quantized whole or in block-aligned pieces.

    Args:
      x: a floating tensor of any shape (float32, bfloat16, float16 or float64; computed in float32).
      state_format: ``"8bit"`` (dynamic-tree map), ``"4bit"`` (16-entry maps, two codes per byte) or ``"fp8"``.
      signed: the signed map (first moment) or the unsigned one (second moment).
      block_size: elements per block; defaults to 256 / 128 / 256.
      rounding: ``"nearest"`` or ``"stochastic"``.
      seed, step: select the random numbers of stochastic rounding (``step`` may be a 0-d integer tensor).
      offset: the global index of ``x``'s first element (a multiple of ``block_size``), for pieces of a tensor.

    Returns:
      ``codes``: 1-D uint8 of ``num_blocks * block_size`` (4-bit: half that) entries, the last block padded;
      ``scale``: 1-D float32 of ``num_blocks`` block scales (absmax, or absmax / 448 for FP8).

    Example:
        >>> import torch, lowbit_fn
        >>> x = torch.randn(1000)
        >>> codes, scale = lowbit_fn.quantize(x, "8bit", signed=True)
        >>> codes.dtype, codes.shape, scale.shape
        (torch.uint8, torch.Size([1024]), torch.Size([4]))
        >>> y = lowbit_fn.dequantize(codes, scale, "8bit", signed=True, shape=x.shape)
        >>> bool((y - x).norm() / x.norm() < 0.02)
        True
    """
    fmt = get_format(state_format)
    block_size = fmt.check_block_size(block_size)
    if rounding not in ROUNDINGS:
        raise ValueError(f"quantize: rounding must be one of {list(ROUNDINGS)}, got {rounding!r}")
    for label, value in (("seed", seed), ("offset", offset)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"quantize: {label} must be an int >= 0, got {value!r}")
    if offset % block_size:
        raise ValueError(f"quantize: offset must be a multiple of block_size={block_size}, got {offset}")
    if not isinstance(x, Tensor):
        raise TypeError(f"quantize: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_INPUTS:
        raise TypeError(f"quantize: x must be float32, bfloat16, float16 or float64, got {x.dtype}")
    if x.layout != torch.strided:
        raise TypeError(f"quantize: x must be a dense (strided) tensor, got layout {x.layout}")
    flat = x.detach().reshape(-1).to(torch.float32)  # one graph for every input dtype
    if flat.numel() == 0:
        return torch.empty(0, dtype=torch.uint8, device=x.device), torch.empty(0, dtype=torch.float32, device=x.device)
    step_t = torch.as_tensor(step, dtype=torch.int64, device=x.device)
    return _encode(
        flat, fmt, block_size, fmt.codebook(signed, x.device), rounding == "stochastic", offset, seed, int(not signed), step_t
    )


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
        >>> lowbit_fn.dequantize(c, s, "4bit", signed=False, shape=(3, 5)).shape
        torch.Size([3, 5])
    """
    fmt = get_format(state_format)
    block_size = fmt.check_block_size(block_size)
    shape = torch.Size(shape)
    numel = shape.numel()
    nb = fmt.num_blocks(numel, block_size)
    if not isinstance(codes, Tensor) or codes.dtype != torch.uint8 or codes.dim() != 1:
        raise TypeError(f"dequantize: codes must be a 1-D uint8 tensor, got {getattr(codes, 'dtype', type(codes))}")
    if not isinstance(scale, Tensor) or scale.dtype != torch.float32 or scale.dim() != 1:
        raise TypeError(f"dequantize: scale must be a 1-D float32 tensor, got {getattr(scale, 'dtype', type(scale))}")
    if codes.numel() != fmt.code_bytes(nb, block_size) or scale.numel() != nb:
        raise ValueError(
            f"dequantize: shape {tuple(shape)} with state_format={state_format!r}, block_size={block_size} needs "
            f"{fmt.code_bytes(nb, block_size)} code bytes and {nb} scales, got {codes.numel()} and {scale.numel()}"
        )
    if nb == 0:
        return torch.empty(shape, dtype=torch.float32, device=codes.device)
    return _decode(codes, scale, fmt, block_size, fmt.codebook(signed, codes.device))[:numel].view(shape)
