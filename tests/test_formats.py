"""Quantization formats: golden maps, nearest-code equality, the row layout, property tests, non-finite input, bad
input."""

import math
import re

import pytest
import torch
from hypothesis import settings, assume, example, given
from hypothesis import strategies as st

import lowbit_fn
from lowbit_fn.formats import FORMATS, ROUNDINGS, row_split

FORMAT_NAMES = ["8bit", "4bit", "fp8"]
# Round-trip relative L2 bounds (REFERENCE §1 measured 0.0108 / 0.00642, 0.148 / 0.181, 0.0261 / 0.0248 on 4.2M values)
BOUNDS = {("8bit", True): 0.012, ("8bit", False): 0.0075, ("4bit", True): 0.16, ("4bit", False): 0.19,
          ("fp8", True): 0.028, ("fp8", False): 0.027}


def rel_l2(a, b):
    return float((a - b).norm() / b.norm())


# --- the row layout, written out here independently of the library ---------------------------------------------

def rows_of(shape):
    """``(rows, R)``: ``shape[0]`` rows of ``prod(shape[1:])`` elements; fewer than two dimensions, one row."""
    shape = tuple(shape)
    return (shape[0], math.prod(shape[1:])) if len(shape) >= 2 else (1, math.prod(shape))


def layout(shape, name, block_size=None):
    """``(code shape, scale shape)`` of a tensor of ``shape``: codes of the tensor's shape (4-bit: ``(rows, ceil(R /
    2))``), scales ``(rows, ceil(R / block_size))``; below two dimensions both are 1-D."""
    fmt = FORMATS[name]
    bs = fmt.check_block_size(block_size)
    rows, length = rows_of(shape)
    nb, per_row = -(-length // bs), -(-length // fmt.codes_per_byte)
    if len(shape) < 2:
        return (per_row,), (nb,)
    return (tuple(shape) if fmt.codes_per_byte == 1 else (rows, per_row)), (rows, nb)


def row_blocks(x, bs):
    """``x`` as float32 ``[rows, blocks per row, bs]``: each row cut into blocks, its last block zero-padded."""
    rows, length = rows_of(x.shape)
    nb = -(-length // bs)
    return torch.nn.functional.pad(x.reshape(rows, length).float(), (0, nb * bs - length)).view(rows, nb, bs)


def per_element(values, length, bs):
    """``[rows, blocks per row]`` -> ``[rows, length]``: element ``(r, c)`` gets the value of its block ``(r, c // bs)``."""
    return values.repeat_interleave(bs, dim=1)[:, :length]


def unpack_4bit(codes, length):
    """4-bit codes ``[rows, ceil(length / 2)]`` -> ``[rows, length]`` (even element in the high nibble; a row's
    padding nibble dropped)."""
    return torch.stack((codes >> 4, codes & 15), dim=-1).reshape(codes.shape[0], -1)[:, :length]


@pytest.mark.parametrize("name", FORMAT_NAMES)
def test_layout_shapes(name):
    fmt = FORMATS[name]
    for shape in [(), (1,), (5,), (300,), (4, 300), (2, 3, 100), (7, 1), (1, 1000), (0, 5), (5, 0), (0,), (3, 2, 0)]:
        assert row_split(shape) == rows_of(shape)
        for block in (None, 2, 64, 100, 1000):
            code_shape, scale_shape = layout(shape, name, block)
            assert fmt.code_shape(shape) == code_shape
            assert fmt.scale_shape(shape, fmt.check_block_size(block)) == scale_shape
        for block in (None, 64):
            codes, scale = lowbit_fn.quantize(torch.randn(shape), name, signed=True, block_size=block)
            assert codes.dtype == torch.uint8 and scale.dtype == torch.float32
            assert (codes.shape, scale.shape) == layout(shape, name, block), shape


# --- golden values -----------------------------------------------------------------------------------------------

def test_signed_8bit_map_golden():
    m = lowbit_fn.codebook("8bit", signed=True)
    assert m.dtype == torch.float32 and m.shape == (256,)
    assert torch.all(m[1:] > m[:-1]), "sorted and distinct"
    assert m[255] == 1.0 and not bool((m == -1.0).any()), "+1.0 present, -1.0 absent"
    assert m[0].item() == pytest.approx(-0.99296875, abs=1e-7)
    assert m[127] == 0.0
    assert m[128].item() == pytest.approx(5.5e-7, rel=1e-5)
    assert m[126].item() == pytest.approx(-5.5e-7, rel=1e-5)
    assert m[254].item() == pytest.approx(0.99296875, abs=1e-7)
    assert torch.equal(m[128:255], -m[:127].flip(0)), "mirrored around zero"
    assert bool(torch.isfinite(m).all())


def test_unsigned_8bit_map_golden():
    m = lowbit_fn.codebook("8bit", signed=False)
    assert torch.all(m[1:] > m[:-1]) and m[255] == 1.0
    # no zero: the first entry is 1e-7, the bottom of the smallest decade (bitsandbytes' map has 0 there)
    assert m[0] == torch.tensor(1e-7, dtype=torch.float32) and not bool((m == 0).any())
    assert m[1].item() == pytest.approx(3.25e-7, rel=1e-5)
    assert m[128].item() == pytest.approx(0.110547, abs=1e-6)
    assert m[254].item() == pytest.approx(0.996484, abs=1e-6)
    assert bool((m >= 0).all())


def test_4bit_maps_golden():
    m = lowbit_fn.codebook("4bit", signed=True)
    expected = [-0.8875, -0.6625, -0.4375, -0.2125, -0.0775, -0.0325, -0.0055, 0.0,
                0.0055, 0.0325, 0.0775, 0.2125, 0.4375, 0.6625, 0.8875, 1.0]
    assert torch.equal(m, torch.tensor(expected, dtype=torch.float32))
    v = lowbit_fn.codebook("4bit", signed=False)
    assert torch.equal(v, torch.arange(1, 17, dtype=torch.float32) / 16)
    assert not bool((v == 0).any()), "the v map has no zero (zero-point problem)"


def test_codebook_is_a_copy_and_fp8_has_none():
    m = lowbit_fn.codebook("8bit", signed=True)
    m.zero_()
    assert lowbit_fn.codebook("8bit", signed=True)[255] == 1.0
    with pytest.raises(ValueError, match="no codebook"):
        lowbit_fn.codebook("fp8", signed=True)


# --- nearest code ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["8bit", "4bit"])
@pytest.mark.parametrize("signed", [True, False])
def test_codes_are_nearest_codebook_entries(name, signed):
    # 64 rows of 301 elements, magnitudes 1e-3 .. 1: no block size divides 301, so every row ends in a short block
    rows, length = 64, 301
    x = torch.randn(rows, length) * torch.logspace(-3, 0, rows)[:, None]
    if not signed:
        x = x.abs()
    bs = FORMATS[name].default_block_size
    codes, scale = lowbit_fn.quantize(x, name, signed=signed)
    blocks = row_blocks(x, bs)
    assert scale.shape == (rows, -(-length // bs))
    assert torch.equal(scale, blocks.abs().amax(-1)), "one scale per block of a row: its absmax"
    table = lowbit_fn.codebook(name, signed=signed)
    if name == "4bit":
        assert codes.shape == (rows, (length + 1) // 2)
        codes = unpack_4bit(codes, length)
    assert codes.shape == (rows, length)
    codes = codes.reshape(-1)
    y = (blocks / scale[:, :, None]).reshape(rows, -1)[:, :length].reshape(-1)  # normalized by its own block's scale
    dist = (y[:, None] - table[None, :]).abs()
    chosen = dist.gather(1, codes.long()[:, None]).squeeze(1)
    assert torch.equal(chosen, dist.min(dim=1).values), "every code is an argmin (ties either way)"
    assert (codes.long() == dist.argmin(dim=1)).float().mean() > 0.999


def test_fp8_codes_are_e4m3_round_to_nearest():
    x = torch.randn(4, 600)  # each row: two blocks of 256 and a short one of 88
    x[0, :10] = 0.0  # zeros of a signed moment stay 0
    codes, scale = lowbit_fn.quantize(x, "fp8", signed=True)
    assert codes.shape == (4, 600) and scale.shape == (4, 3)
    blocks = row_blocks(x, 256)
    assert torch.allclose(scale, blocks.abs().amax(-1) / 448)
    expected = (blocks / scale[:, :, None]).to(torch.float8_e4m3fn).view(torch.uint8).reshape(4, -1)[:, :600]
    assert torch.equal(codes, expected)
    assert bool((codes[0, :10] == 0).all())


def test_fp8_unsigned_codes_are_floored_at_the_smallest_subnormal():
    """Unsigned FP8 moments: e4m3 round-to-nearest of max(x / scale, 2**-9) in blocks with a positive scale (the
    plain cast would give 0 below 2**-10), code 0 in an all-zero block."""
    x = torch.randn(4, 600) ** 2 * torch.logspace(-9, 0, 600)  # down to far below the floor of each block
    x[0, :10] = 0.0
    x[3, 512:] = 0.0  # an all-zero short block
    codes, scale = lowbit_fn.quantize(x, "fp8", signed=False)
    blocks = row_blocks(x, 256)
    y = blocks / torch.where(scale > 0, scale, 1)[:, :, None]
    floored = torch.where(scale[:, :, None] > 0, y.clamp(min=2.0**-9), y)
    expected = floored.to(torch.float8_e4m3fn).view(torch.uint8).reshape(4, -1)[:, :600]
    assert torch.equal(codes, expected)
    plain = y.to(torch.float8_e4m3fn).view(torch.uint8).reshape(4, -1)[:, :600]
    assert bool((plain == 0).sum() > 100), "the plain cast stores many of these values as 0"
    assert bool((codes[:, :512] != 0).all()) and bool((codes[3, 512:] == 0).all()) and scale[3, 2] == 0


def test_4bit_packs_even_element_in_high_nibble():
    x = torch.zeros(128)
    x[0], x[1] = 1.0, -0.8875  # codes 15 and 0
    codes, _ = lowbit_fn.quantize(x, "4bit", signed=True)
    assert codes.shape == (64,) and codes[0].item() == (15 << 4) | 0
    assert codes[1].item() == (7 << 4) | 7, "zeros map to code 7 (0.0)"
    # pairs are packed within a row: a row of odd length ends in half a byte (its padding, a zero: code 7), and
    # the next row starts a new byte
    x = torch.tensor([[1.0, -0.8875, 0.0], [0.0, 1.0, -0.8875]])
    codes, scale = lowbit_fn.quantize(x, "4bit", signed=True)
    assert codes.shape == (2, 2) and scale.shape == (2, 1)
    assert codes.tolist() == [[(15 << 4) | 0, (7 << 4) | 7], [(7 << 4) | 15, (0 << 4) | 7]]
    assert torch.equal(lowbit_fn.dequantize(codes, scale, "4bit", signed=True, shape=x.shape), x)


# --- properties --------------------------------------------------------------------------------------------------

shapes = st.one_of(
    st.just(()),
    st.lists(st.sampled_from([1, 2, 3, 7, 31, 127, 128, 129, 255, 256, 257, 1000]), min_size=1, max_size=3)
    .filter(lambda dims: math.prod(dims) <= 100_000),  # small: memory and time
)


@given(name=st.sampled_from(FORMAT_NAMES), signed=st.booleans(), shape=shapes,
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
       log_mag=st.integers(-30, 30), block=st.sampled_from([None, 2, 64, 100]), seed=st.integers(0, 2**16))
def test_round_trip_property(name, signed, shape, dtype, log_mag, block, seed):
    fmt = FORMATS[name]
    g = torch.Generator().manual_seed(seed)
    x32 = torch.randn(shape, generator=g)
    if not signed:
        x32 = x32 * x32
    bs = fmt.check_block_size(block)
    finite_in_dtype = 1e30 if dtype == torch.float32 else (3e38 if dtype == torch.bfloat16 else None)
    if dtype == torch.float16:
        log_mag = max(min(log_mag, 3), -4)  # float16's normal range
    x = (x32 * 10.0**log_mag).to(dtype)
    assert finite_in_dtype is None or bool(torch.isfinite(x).all())
    codes, scale = lowbit_fn.quantize(x, name, signed=signed, block_size=block)
    code_shape, scale_shape = layout(x.shape, name, block)
    assert codes.dtype == torch.uint8 and codes.shape == code_shape
    assert scale.dtype == torch.float32 and scale.shape == scale_shape
    y = lowbit_fn.dequantize(codes, scale, name, signed=signed, shape=x.shape, block_size=block)
    assert y.dtype == torch.float32 and y.shape == x.shape
    rows, length = rows_of(x.shape)
    xf = x.float().reshape(rows, length)
    assert bool(torch.isfinite(y).all())
    # every block of every row has its own scale: its absmax (FP8: absmax / 448)
    absmax = row_blocks(xf, bs).abs().amax(-1)
    assert torch.equal(scale.reshape(rows, -1), absmax / 448 if name == "fp8" else absmax)
    # element-wise: codebook formats err by at most half the widest gap of the map times the absmax of the element's
    # own block (row r, block c // bs of the row); e4m3 by half an ulp (2^-4 relative) or half its smallest
    # subnormal step (2^-10 of absmax / 448)
    per_elem_max = per_element(absmax, length, bs)
    err = (y.reshape(rows, length) - xf).abs()
    if name == "fp8":  # (unsigned: values below the floor 2^-9 of absmax / 448 read the floor)
        bound = xf.abs() * 2.0**-4 + per_elem_max / 448 * (2.0**-10 if signed else 2.0**-9)
    else:
        worst_gap = {("8bit", True): 0.1 / 2, ("8bit", False): 0.1 / 2, ("4bit", True): 0.225 / 2,
                     ("4bit", False): 1 / 16}[(name, signed)]  # 4-bit v map: zeros read absmax / 16
        bound = worst_gap * per_elem_max
    assert bool((err <= bound * (1 + 1e-5) + 1e-45).all())
    # the largest magnitude survives exactly (scale = absmax, 1.0 in every map, 448 in e4m3), except a negative
    # maximum under the signed maps, which have no -1.0 (8-bit: -0.99296875, 4-bit: -0.8875 of it)
    if x.numel() and not bool(xf.abs().max() > 0):  # all zeros (e.g. underflowed to float16 zero) stay zeros
        assert not bool(y.any())
    elif x.numel():
        low = {("8bit", True): 0.99296875, ("4bit", True): 0.8875}.get((name, signed), 1.0)
        ratio = float(y.abs().max() / xf.abs().max())
        assert low * (1 - 1e-6) <= ratio <= 1 + 1e-6


@pytest.mark.parametrize("name", FORMAT_NAMES)
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("shape", [(1 << 20,), (1024, 1000)], ids=["one-row", "rows"])
def test_round_trip_error_bound(name, signed, shape):
    x = torch.randn(shape)
    if not signed:
        x = x * x
    codes, scale = lowbit_fn.quantize(x, name, signed=signed)
    y = lowbit_fn.dequantize(codes, scale, name, signed=signed, shape=x.shape)
    assert rel_l2(y, x) < BOUNDS[(name, signed)]


@given(name=st.sampled_from(FORMAT_NAMES), signed=st.booleans(), exponent=st.integers(-30, 30), seed=st.integers(0, 999))
def test_scale_invariance(name, signed, exponent, seed):
    """Multiplying by a power of two leaves the codes unchanged over the float32 normal range (no scale floor)."""
    x = torch.randn(3, 256 + 5, generator=torch.Generator().manual_seed(seed))
    if not signed:
        x = x * x
    c1, s1 = lowbit_fn.quantize(x, name, signed=signed)
    factor = 2.0 ** round(exponent * math.log2(10))
    c2, s2 = lowbit_fn.quantize(x * factor, name, signed=signed)
    assert torch.equal(c1, c2)
    assert torch.equal(s2, s1 * factor)


@pytest.mark.parametrize("name", FORMAT_NAMES)
@pytest.mark.parametrize("shape", [(1000,), (3, 1000), (3, 10, 100)])
def test_all_zero_blocks(name, shape):
    rows, length = rows_of(shape)
    x = torch.zeros(shape)
    x.view(rows, length)[rows - 1, 600] = 3.0  # one nonzero block (in the last row) among zero ones
    bs = FORMATS[name].default_block_size
    nonzero_block = torch.zeros(rows, -(-length // bs), dtype=torch.bool)
    nonzero_block[rows - 1, 600 // bs] = True
    outside = ~per_element(nonzero_block, length, bs)
    for signed in (True, False):
        codes, scale = lowbit_fn.quantize(x, name, signed=signed)
        y = lowbit_fn.dequantize(codes, scale, name, signed=signed, shape=x.shape).reshape(rows, length)
        assert bool(torch.isfinite(y).all())
        scale = scale.reshape(rows, -1)
        assert bool((scale[~nonzero_block] == 0).all()) and bool((scale[nonzero_block] > 0).all())
        assert bool((y[outside] == 0).all()), "every element outside the nonzero block reads 0"
        assert y[rows - 1, 600].item() == pytest.approx(3.0, rel=1e-6)


# --- no zero in unsigned moments ---------------------------------------------------------------------------------

# a block whose absmax is at least this keeps the floor times its scale above float32's smallest subnormal (8-bit:
# 1e-7 * absmax, FP8: 2**-9 * absmax / 448), so the floor cannot underflow to 0 on decoding
TINY_ABSMAX = 1e-37


@settings(max_examples=80, deadline=None)
@given(name=st.sampled_from(["8bit", "fp8"]), rounding=st.sampled_from(ROUNDINGS),
       shape=shapes.filter(lambda dims: math.prod(dims) > 0), block=st.sampled_from([None, 2, 64, 100]),
       top=st.floats(-2, 38), zeros=st.floats(0, 0.9), seed=st.integers(0, 2**16), step=st.integers(0, 2**31))
@example(name="fp8", rounding="nearest", shape=[3, 300], block=None, top=0.0, zeros=0.1, seed=0, step=0)
@example(name="8bit", rounding="nearest", shape=[1000], block=None, top=0.0, zeros=0.1, seed=0, step=0)
def test_unsigned_moments_never_dequantize_to_zero(name, rounding, shape, block, top, zeros, seed, step):
    """A finite nonnegative value (0 and -0.0 included) of an unsigned moment in a block with a positive scale
    never dequantizes to 0, nor to a negative value: values spanning 40 decades in every block (down to subnormals),
    rows ending in short blocks; an all-zero block reads 0. Eager: the same functions the compiled graphs run
    (one graph per format, block size and rounding would be 24 compilations here)."""
    g = torch.Generator().manual_seed(seed)
    x = 10.0 ** (top - 40 * torch.rand(shape, generator=g, dtype=torch.float64))
    x = x.float()
    kind = torch.rand(shape, generator=g)
    x = torch.where(kind < zeros, torch.zeros_like(x), x)
    x = torch.where(kind < zeros / 4, torch.full_like(x, -0.0), x)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LOWBIT_FN_COMPILE", "0")
        codes, scale = lowbit_fn.quantize(x, name, signed=False, block_size=block, rounding=rounding, step=step)
        y = lowbit_fn.dequantize(codes, scale, name, signed=False, shape=x.shape, block_size=block)
    rows, length = rows_of(x.shape)
    bs = FORMATS[name].check_block_size(block)
    absmax = per_element(row_blocks(x, bs).abs().amax(-1), length, bs)
    y = y.reshape(rows, length)
    assert bool((y >= 0).all())
    assert bool((y[absmax >= TINY_ABSMAX] > 0).all()), "a second moment stored as 0"
    assert bool((y[absmax == 0] == 0).all()), "an all-zero block reads 0"


@pytest.mark.parametrize("name", FORMAT_NAMES)
def test_signed_moments_keep_zero(name):
    """The signed maps keep their 0 (a first moment may be exactly 0): zeros among other values read 0."""
    x = torch.randn(3, 700, generator=torch.Generator().manual_seed(0))
    x[:, ::7] = 0.0
    for rounding in ROUNDINGS:
        codes, scale = lowbit_fn.quantize(x, name, signed=True, rounding=rounding, step=1)
        y = lowbit_fn.dequantize(codes, scale, name, signed=True, shape=x.shape)
        assert bool((y[:, ::7] == 0).all())


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 4), length=st.integers(1, 700), block=st.sampled_from([None, 2, 64, 100]),
       zero_codes=st.floats(0, 1), zero_blocks=st.floats(0, 0.5), log_scale=st.floats(-30, 30), seed=st.integers(0, 2**16))
def test_8bit_unsigned_states_with_the_old_zero_entry_need_no_conversion(rows, length, block, zero_codes, zero_blocks,
                                                                         log_scale, seed):
    """The unsigned map's first entry was 0 (bitsandbytes' map), now 1e-7; the other 255 are unchanged. A state
    written with the old map converts to itself: decoding it with the old map and quantizing the values with
    today's gives back its codes and scales, bit for bit. Old states here: random codes (code 0 as often as
    ``zero_codes``) with code 255 somewhere in every block with a positive scale (a block's absmax is always
    stored as 1.0, by either rounding), and all-zero blocks (scale 0, codes 0)."""
    old_map = lowbit_fn.codebook("8bit", signed=False)
    assert old_map[0] > 0
    old_map[0] = 0.0  # (codebook returns a copy)
    bs = FORMATS["8bit"].check_block_size(block)
    nb = -(-length // bs)
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 256, (rows, nb * bs), generator=g)
    codes = torch.where(torch.rand(rows, nb * bs, generator=g) < zero_codes, 0, codes).view(rows, nb, bs)
    width = torch.full((rows, nb), bs)
    width[:, -1] = length - (nb - 1) * bs  # the last block of a row may be short
    top = (torch.rand(rows, nb, generator=g) * width).long()  # where each block's absmax is
    codes.scatter_(2, top.unsqueeze(-1), 255)
    scale = (10.0 ** (log_scale + torch.rand(rows, nb, generator=g, dtype=torch.float64) - 0.5)).float()
    empty = torch.rand(rows, nb, generator=g) < zero_blocks
    scale = torch.where(empty, 0.0, scale)
    codes = torch.where(empty.unsqueeze(-1), 0, codes)
    codes = codes.view(rows, nb * bs)[:, :length]
    old_values = old_map[codes] * per_element(scale, length, bs)
    new_codes, new_scale = lowbit_fn.quantize(old_values, "8bit", signed=False, block_size=block)
    assert torch.equal(new_scale, scale)
    assert torch.equal(new_codes, codes.to(torch.uint8))
    # and the old state reads as before except its zeros in blocks with a positive scale, now 1e-7 of the scale
    today = lowbit_fn.dequantize(codes.to(torch.uint8), scale, "8bit", signed=False, shape=(rows, length), block_size=block)
    changed = (codes == 0) & (per_element(scale, length, bs) > 0)
    assert torch.equal(today[~changed], old_values[~changed])
    assert bool((today[changed] > 0).all())


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 4), length=st.integers(1, 700), block=st.sampled_from([None, 2, 64, 100]),
       zeros=st.floats(0, 0.5), seed=st.integers(0, 2**16))
def test_fp8_unsigned_codes_from_before_the_floor_become_todays(rows, length, block, zeros, seed):
    """FP8 second moments written before the floor (plain round-to-nearest cast: 0 below 2**-10 of absmax / 448)
    become the codes today's encoder writes for the same values through ``canonical_codes``; it leaves today's
    codes, and signed moments' codes, as they are."""
    from lowbit_fn.formats import canonical_codes

    fmt = FORMATS["fp8"]
    bs = fmt.check_block_size(block)
    g = torch.Generator().manual_seed(seed)
    x = (10.0 ** (-12 * torch.rand(rows, length, generator=g, dtype=torch.float64))).float()
    x = torch.where(torch.rand(rows, length, generator=g) < zeros, 0.0, x)
    if rows > 1:
        x[-1] = 0.0  # a row of all-zero blocks
    blocks = row_blocks(x, bs)
    scale = blocks.abs().amax(-1) / 448
    old = (blocks / torch.where(scale > 0, scale, 1)[:, :, None]).to(torch.float8_e4m3fn).view(torch.uint8)
    old = old.reshape(rows, -1)[:, :length]
    codes, new_scale = lowbit_fn.quantize(x, "fp8", signed=False, block_size=block)
    assert torch.equal(new_scale, scale)
    assert torch.equal(canonical_codes(old, scale, fmt, bs, signed=False), codes)
    assert torch.equal(canonical_codes(codes, scale, fmt, bs, signed=False), codes)
    assert torch.equal(canonical_codes(old, scale, fmt, bs, signed=True), old)


@pytest.mark.parametrize("name", FORMAT_NAMES)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_non_finite_input_costs_only_its_element(name, bad, rounding):
    """A NaN or Inf is stored as a 0 would be (the code nearest to 0: 0 for signed moments, the smallest entry or the
    floor for unsigned ones) and takes no part in its block's scale: the codes and scales equal those of the
    same tensor with 0 in its place, bit for bit (so the block's other elements keep their values), in whole
    blocks and in a row's short last block."""
    bs = FORMATS[name].default_block_size
    length = 2 * bs + 7  # rows of two full blocks and a short one
    x = torch.randn(3, length, generator=torch.Generator().manual_seed(0)) * 5
    bad_at = [(1, bs + 5), (2, 2 * bs + 3), (0, 0)]
    for signed in (True, False):
        poisoned, zeroed = x.clone(), x.clone()
        for r, c in bad_at:
            poisoned[r, c], zeroed[r, c] = bad, 0.0
        codes, scale = lowbit_fn.quantize(poisoned, name, signed=signed, rounding=rounding, step=3)
        ref_codes, ref_scale = lowbit_fn.quantize(zeroed, name, signed=signed, rounding=rounding, step=3)
        assert torch.equal(scale, ref_scale) and torch.equal(codes, ref_codes)
        assert bool(torch.isfinite(scale).all() and (scale > 0).all())
        y = lowbit_fn.dequantize(codes, scale, name, signed=signed, shape=x.shape)
        assert bool(torch.isfinite(y).all())
    # a block of nothing but non-finite values: scale 0, every element reads the map's value nearest to 0
    codes, scale = lowbit_fn.quantize(torch.full((bs,), bad), name, signed=True, rounding=rounding)
    assert scale.tolist() == [0.0]
    assert bool((lowbit_fn.dequantize(codes, scale, name, signed=True, shape=(bs,)) == 0).all())


def test_empty_and_scalar_inputs():
    for name in FORMAT_NAMES:
        for shape in [(0, 5), (5, 0), (0,), (2, 0, 3)]:
            c, s = lowbit_fn.quantize(torch.zeros(shape), name, signed=True)
            assert c.numel() == 0 and s.numel() == 0 and (c.shape, s.shape) == layout(shape, name)
            assert lowbit_fn.dequantize(c, s, name, signed=True, shape=shape).shape == shape
        c, s = lowbit_fn.quantize(torch.tensor(-2.5), name, signed=True)
        assert c.shape == (1,) and s.shape == (1,)
        y = lowbit_fn.dequantize(c, s, name, signed=True, shape=())
        most_negative = {"8bit": -0.99296875, "4bit": -0.8875, "fp8": -1.0}[name]  # signed maps lack -1.0
        assert y.shape == () and y.item() == pytest.approx(2.5 * most_negative, rel=1e-6)


# --- bad input ---------------------------------------------------------------------------------------------------

def test_bad_format_and_block_size():
    x = torch.randn(10)
    with pytest.raises(ValueError, match="state_format must be one of"):
        lowbit_fn.quantize(x, "3bit", signed=True)
    with pytest.raises(ValueError, match="block_size must be a positive multiple of 2"):
        lowbit_fn.quantize(x, "4bit", signed=True, block_size=7)
    for bad in (0, -4, 2.5, True):
        with pytest.raises(ValueError, match="block_size"):
            lowbit_fn.quantize(x, "8bit", signed=True, block_size=bad)


def test_bad_dtypes_and_sizes():
    with pytest.raises(TypeError, match="float32, bfloat16"):
        lowbit_fn.quantize(torch.arange(10), "8bit", signed=True)
    with pytest.raises(TypeError, match="dense"):
        lowbit_fn.quantize(torch.randn(4, 4).to_sparse(), "8bit", signed=True)
    codes, scale = lowbit_fn.quantize(torch.randn(300), "8bit", signed=True)
    with pytest.raises(ValueError, match=re.escape("needs codes of shape (600,) and scales of shape (3,), got (300,) and (2,)")):
        lowbit_fn.dequantize(codes, scale, "8bit", signed=True, shape=(600,))
    with pytest.raises(TypeError, match="uint8"):
        lowbit_fn.dequantize(codes.float(), scale, "8bit", signed=True, shape=(300,))
    with pytest.raises(TypeError, match="float32"):
        lowbit_fn.dequantize(codes, scale.double(), "8bit", signed=True, shape=(300,))
    with pytest.raises(ValueError, match=re.escape("needs codes of shape (150,) and scales of shape (3,)")):
        lowbit_fn.dequantize(codes, scale, "4bit", signed=True, shape=(300,))
    # the row layout: the state of a (4, 300) tensor reads back as (4, 300) only, not transposed nor flattened
    codes, scale = lowbit_fn.quantize(torch.randn(4, 300), "8bit", signed=True)
    assert lowbit_fn.dequantize(codes, scale, "8bit", signed=True, shape=(4, 300)).shape == (4, 300)
    with pytest.raises(ValueError, match=re.escape("needs codes of shape (300, 4) and scales of shape (300, 1), got (4, 300) and (4, 2)")):
        lowbit_fn.dequantize(codes, scale, "8bit", signed=True, shape=(300, 4))
    with pytest.raises(ValueError, match=re.escape("needs codes of shape (1200,) and scales of shape (5,)")):
        lowbit_fn.dequantize(codes, scale, "8bit", signed=True, shape=(1200,))
    with pytest.raises(ValueError, match=re.escape("scales of shape (4, 2), got (1200,) and (8,)")):
        lowbit_fn.dequantize(codes.reshape(-1), scale.reshape(-1), "8bit", signed=True, shape=(4, 300))
    codes, scale = lowbit_fn.quantize(torch.randn(4, 301), "4bit", signed=True)
    assert codes.shape == (4, 151) and scale.shape == (4, 3)
    with pytest.raises(ValueError, match=re.escape("needs codes of shape (4, 151) and scales of shape (4, 5)")):
        lowbit_fn.dequantize(codes, scale, "4bit", signed=True, shape=(4, 301), block_size=64)


@pytest.mark.parametrize("fmt", ["8bit", "4bit", "fp8"])
def test_quantize_and_dequantize_compile_one_graph_for_every_shape(fmt, monkeypatch):
    """quantize and dequantize are one graph each per format and rounding, compiled by their first call with no
    warm-up: sizes of 1 (one row, rows of one element or of one block), rows of whole blocks or ragged, odd 4-bit
    rows, and views of differently shaped tensors (quantize views its input as [rows, R]; dynamo would guard on the
    view's base shape without _unview) all reuse it. Fresh compiled wrappers, so that graphs other tests compiled
    cannot hide a recompile."""
    from torch._dynamo.utils import counters

    import lowbit_fn.formats as formats
    from lowbit_fn._compile import compiled

    monkeypatch.setattr(formats, "_encode", compiled(formats._encode.fn))
    monkeypatch.setattr(formats, "_decode", compiled(formats._decode.fn))
    shapes = [
        (3, 5000), (1, 5000), (5000, 1), (4, 100), (2, 512), (1, 3000), (3000, 1), (2, 3000), (7, 1, 900),
        (1, 1, 4000), (3, 3, 3, 300), (1, 2, 3, 4, 500), (9, 999), (5, 7), (1,), (1, 1), (7,), (4, 1024), (8, 301),
    ]
    for rounding in ROUNDINGS:
        for i, shape in enumerate(shapes):
            before = counters["stats"]["unique_graphs"]
            x = torch.randn(shape)
            codes, scale = lowbit_fn.quantize(x, fmt, signed=True, rounding=rounding)
            y = lowbit_fn.dequantize(codes, scale, fmt, signed=True, shape=shape)
            rows, length = rows_of(shape)
            assert scale.numel() == rows * -(-length // lowbit_fn.formats.get_format(fmt).default_block_size)
            assert y.shape == x.shape
            # the first shape compiles quantize's and dequantize's graphs (nearest; stochastic: quantize's)
            expected = (2 if rounding == "nearest" else 1) if i == 0 else 0
            assert counters["stats"]["unique_graphs"] - before == expected, f"{fmt} {rounding} {shape}"


# --- stochastic rounding ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMAT_NAMES)
@given(
    data=st.lists(st.floats(-1e6, 1e6, allow_nan=False, width=32), min_size=1, max_size=700),
    rows=st.integers(1, 4),
    step=st.integers(0, 2**31),
    signed=st.booleans(),
)
def test_stochastic_codes_are_one_of_the_two_neighbours(fmt, data, rows, step, signed):
    rows = min(rows, len(data))
    x = torch.tensor(data[: len(data) // rows * rows])
    x = x.view(rows, -1) if rows > 1 else x  # one row (1-D) or several
    x = x if signed else x.abs()
    rows, length = rows_of(x.shape)
    kw = {"signed": signed, "shape": x.shape}
    c_sr, s_sr = lowbit_fn.quantize(x, fmt, signed=signed, rounding="stochastic", step=step)
    c_nn, s_nn = lowbit_fn.quantize(x, fmt, signed=signed)
    assert torch.equal(s_sr, s_nn)  # same block scales
    got = lowbit_fn.dequantize(c_sr, s_sr, fmt, **kw).reshape(rows, length)
    x = x.reshape(rows, length)
    scale = per_element(s_sr.reshape(rows, -1), length, FORMATS[fmt].default_block_size)  # each element's block
    y = torch.where(scale > 0, x / torch.where(scale > 0, scale, 1), x)
    if fmt == "fp8":  # codes are e4m3 values: the neighbours of y = x / scale on the e4m3 grid
        grid = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
        grid = grid[torch.isfinite(grid)].unique()
        if not signed:  # unsigned moments are floored at the smallest subnormal
            grid = grid[grid >= 2.0**-9]
    else:
        grid = lowbit_fn.codebook(fmt, signed=signed)
    code_y = torch.where(scale > 0, got / torch.where(scale > 0, scale, 1), got)
    below = grid[(torch.searchsorted(grid, y, right=True) - 1).clamp(0, grid.numel() - 1)]
    above = grid[torch.searchsorted(grid, y).clamp(0, grid.numel() - 1)]
    # decoding rounds map[c] * scale once: relative 2**-24, or absolute 2**-149 when the product is subnormal
    tol = 1e-6 * (1 + y.abs()) + torch.where(scale > 0, 2.0**-149 / torch.where(scale > 0, scale, 1), 0)
    ok = ((code_y - below).abs() <= tol) | ((code_y - above).abs() <= tol) | ((scale == 0) & (got == 0))
    assert bool(ok.all()), (y[~ok][:5], code_y[~ok][:5])


@pytest.mark.parametrize("fmt", FORMAT_NAMES)
@pytest.mark.parametrize("signed", [True, False])
def test_stochastic_rounding_is_unbiased(fmt, signed):
    """Mean of dequantized SR codes over many steps converges to x (within 5 standard errors of a level gap)."""
    gen = torch.Generator().manual_seed(0)
    rows, length = 8, 260  # rows of whole blocks and a short one (4 elements)
    x = (torch.randn(rows * length, generator=gen) * torch.logspace(-3, 0, rows * length)).view(rows, length)
    x = x if signed else x.abs()
    n = 600
    total = torch.zeros(rows, length, dtype=torch.float64)
    for step in range(n):
        codes, scale = lowbit_fn.quantize(x, fmt, signed=signed, rounding="stochastic", step=step, seed=3)
        total += lowbit_fn.dequantize(codes, scale, fmt, signed=signed, shape=x.shape).double()
    mean = total / n
    codes, scale = lowbit_fn.quantize(x, fmt, signed=signed)
    nearest = lowbit_fn.dequantize(codes, scale, fmt, signed=signed, shape=x.shape).double()
    bs = {"8bit": 256, "4bit": 128, "fp8": 256}[fmt]
    blockmax = per_element(row_blocks(x, bs).abs().amax(-1), length, bs).double()
    # the unsigned maps start above 0 (4-bit 1/16, 8-bit 1e-7, FP8's floor 2**-9 of absmax / 448): below, clamped
    lowest = 0.0 if signed else {"4bit": 1 / 16, "8bit": 1e-7, "fp8": 2.0**-9 / 448}[fmt]
    # the signed maps have no -1: the most negative entries are -0.8875 (4-bit) and -0.99296875 (8-bit)
    highest = {"4bit": 0.8875, "8bit": 0.99296875}.get(fmt, 1.0) if signed else 1.0
    inside = (x.abs().double() >= lowest * blockmax) & (x.abs().double() <= highest * blockmax)
    err = (mean - x.double())[inside].abs() / blockmax[inside]
    err_nearest = (nearest - x.double())[inside].abs() / blockmax[inside]
    # the largest level gap relative to the block max: 4-bit 0.225, 8-bit 0.9 / 64, fp8 2**-4 of the value
    gap = {"4bit": 0.225, "8bit": 0.0141, "fp8": 0.0625}[fmt]
    assert float(err.max()) < 5 * 0.5 * gap / n**0.5
    assert float(err.mean()) < 0.25 * float(err_nearest.mean())  # far below nearest rounding's fixed error


@pytest.mark.parametrize("fmt", FORMAT_NAMES)
def test_stochastic_codes_are_deterministic_fresh_per_step_and_split_independent(fmt):
    x = torch.randn(7, 5 * 64 + 17)  # R = 337: no block size divides it, and odd (4-bit rows end in half a byte)
    length = x.shape[1]
    kw = {"signed": True, "rounding": "stochastic"}
    a = lowbit_fn.quantize(x, fmt, step=7, seed=1, **kw)
    assert all(torch.equal(u, v) for u, v in zip(a, lowbit_fn.quantize(x.clone(), fmt, step=torch.tensor(7), seed=1, **kw)))
    assert not torch.equal(a[0], lowbit_fn.quantize(x, fmt, step=8, seed=1, **kw)[0])  # fresh every step
    assert not torch.equal(a[0], lowbit_fn.quantize(x, fmt, step=7, seed=2, **kw)[0])  # and per seed
    assert not torch.equal(a[0], lowbit_fn.quantize(x, fmt, step=7, seed=1, tensor_id=5, **kw)[0])  # and per tensor
    # pieces of rows, each quantized with the index of its first element, are the rows of the whole
    pieces = [lowbit_fn.quantize(x[lo:hi], fmt, step=7, seed=1, offset=lo * length, **kw) for lo, hi in ((0, 2), (2, 3), (3, 7))]
    assert torch.equal(a[0], torch.cat([p[0] for p in pieces])) and torch.equal(a[1], torch.cat([p[1] for p in pieces]))
    assert not torch.equal(a[0][3:], lowbit_fn.quantize(x[3:], fmt, step=7, seed=1, **kw)[0]), "the offset selects the noise"
    # a 1-D tensor is one row: pieces cut at a block boundary are its blocks
    flat = x.reshape(-1)
    whole = lowbit_fn.quantize(flat, fmt, step=7, seed=1, **kw)
    cut = 2 * 256  # a multiple of every default block size
    head = lowbit_fn.quantize(flat[:cut], fmt, step=7, seed=1, **kw)
    tail = lowbit_fn.quantize(flat[cut:], fmt, step=7, seed=1, offset=cut, **kw)
    assert torch.equal(whole[0], torch.cat([head[0], tail[0]])) and torch.equal(whole[1], torch.cat([head[1], tail[1]]))
    from lowbit_fn._random import stream_key, tensor_key
    from lowbit_fn.formats import encode_rows

    fmt_obj = lowbit_fn.FORMATS[fmt]
    key = tensor_key(stream_key(1, 0, torch.tensor(7)), 0)  # seed 1, stream 0 (signed), step 7, tensor_id 0
    eager = encode_rows(x, fmt_obj, fmt_obj.default_block_size, fmt_obj.codebook(True), key, torch.tensor(0), signed=True)
    assert torch.equal(eager[0], a[0].reshape(7, -1)) and torch.equal(eager[1], a[1])  # compiled == eager, bit for bit


SLICE_DIMS = [1, 2, 3, 5, 64, 100, 127, 128, 129, 256, 257, 300]


@settings(max_examples=12)  # each format, rounding and block size compiles a graph: the cost is there
@given(
    name=st.sampled_from(FORMAT_NAMES), signed=st.booleans(), rounding=st.sampled_from(ROUNDINGS),
    rows=st.integers(1, 9), inner=st.lists(st.sampled_from(SLICE_DIMS), min_size=1, max_size=2),
    start=st.integers(0, 8), count=st.integers(1, 9), block=st.sampled_from([None, 2, 64, 100]),
    step=st.integers(0, 2**31), seed=st.integers(0, 2**16), tensor_id=st.integers(0, 2**32 - 1),
)
# a single row; rows shorter than the block; rows that end in a short block (and 4-bit rows in half a byte); 3-D
@example(name="4bit", signed=True, rounding="stochastic", rows=1, inner=[257], start=0, count=1, block=None,
         step=3, seed=1, tensor_id=5)
@example(name="8bit", signed=True, rounding="stochastic", rows=5, inner=[3, 7], start=1, count=3, block=None,
         step=11, seed=0, tensor_id=0)
@example(name="fp8", signed=False, rounding="stochastic", rows=6, inner=[300], start=2, count=9, block=None,
         step=0, seed=2, tensor_id=1)
@example(name="4bit", signed=False, rounding="nearest", rows=4, inner=[129], start=3, count=1, block=None,
         step=0, seed=0, tensor_id=0)
@example(name="8bit", signed=False, rounding="nearest", rows=3, inner=[5, 64], start=1, count=1, block=100,
         step=5, seed=4, tensor_id=7)
def test_rows_of_a_piece_are_the_rows_of_the_whole(name, signed, rounding, rows, inner, start, count, block, step,
                                                   seed, tensor_id):
    """Quantizing rows a:b with offset a * R gives rows a:b of the whole tensor's codes and scales."""
    shape = (rows, *inner)
    assume(math.prod(shape) <= 100_000)
    length = math.prod(inner)
    a = start % rows
    b = min(rows, a + count)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    x = x if signed else x * x
    kw = {"signed": signed, "block_size": block, "rounding": rounding, "seed": seed, "step": step, "tensor_id": tensor_id}
    codes, scale = lowbit_fn.quantize(x, name, **kw)
    assert (codes.shape, scale.shape) == layout(shape, name, block)
    piece_codes, piece_scale = lowbit_fn.quantize(x[a:b], name, offset=a * length, **kw)
    assert (piece_codes.shape, piece_scale.shape) == layout(x[a:b].shape, name, block)
    assert torch.equal(piece_codes, codes[a:b]) and torch.equal(piece_scale, scale[a:b])
    dq = {"signed": signed, "block_size": block}
    whole = lowbit_fn.dequantize(codes, scale, name, shape=shape, **dq)
    assert torch.equal(lowbit_fn.dequantize(piece_codes, piece_scale, name, shape=x[a:b].shape, **dq), whole[a:b])


def test_stochastic_rounding_bad_arguments():
    x = torch.randn(300)
    with pytest.raises(ValueError, match="rounding"):
        lowbit_fn.quantize(x, "8bit", signed=True, rounding="up")
    for label, bad in (("offset", {"offset": -1}), ("offset", {"offset": 1.5}), ("seed", {"seed": -1}),
                       ("tensor_id", {"tensor_id": -1}), ("tensor_id", {"tensor_id": 2**32})):
        with pytest.raises(ValueError, match=label):
            lowbit_fn.quantize(x, "8bit", signed=True, rounding="stochastic", **bad)
    # blocks start at every row, not at global multiples of the block size: any offset >= 0 is a valid one
    codes, scale = lowbit_fn.quantize(x, "8bit", signed=True, rounding="stochastic", offset=100)
    assert codes.shape == (300,) and scale.shape == (2,)
    assert not torch.equal(codes, lowbit_fn.quantize(x, "8bit", signed=True, rounding="stochastic")[0])
