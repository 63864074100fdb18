"""Counter-based random bits and stochastic rounding to bfloat16."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit_fn._compile import compiled
from lowbit_fn._random import hash32, mix, stream_key, tensor_key, tensor_key_int
from lowbit_fn.kernels.reference import round_to

_ZERO = torch.zeros((), dtype=torch.int64)


@compiled
def _round(x, key, base):
    return round_to(x, torch.bfloat16, key, base)


def stochastic_round_bf16(x, key, base=_ZERO):
    """The stochastic rounding of the step's parameter write-back (compiled, as the step runs it)."""
    return _round(x, key, base)


stochastic_round_bf16.fn = lambda x, key, base=_ZERO: round_to(x, torch.bfloat16, key, base)


def neighbours(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The bfloat16 values just below and above each float32 (in magnitude: truncation and the next step)."""
    down = (x.view(torch.int32) & -0x10000).view(torch.float32)
    up = ((x.view(torch.int32) & -0x10000) + 0x10000).view(torch.float32)
    return down, up


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(width=32, allow_nan=False, allow_infinity=False), min_size=1, max_size=300), st.integers(0, 2**40))
def test_rounds_to_one_of_the_two_neighbours(values, step):
    x = torch.tensor(values, dtype=torch.float32)
    r = stochastic_round_bf16(x, stream_key(7, 3, torch.tensor(step))).float()
    down, up = neighbours(x)
    exact = x == down
    assert bool(((r == down) | (r == up) | (exact & (r == x))).all())


def test_unbiased_deterministic_and_eager_equals_compiled():
    torch.manual_seed(0)
    x = torch.randn(4096) * torch.logspace(-20, 20, 4096)
    total = torch.zeros(4096, dtype=torch.float64)
    n = 2000
    for step in range(n):
        key = stream_key(1, 0, torch.tensor(step))
        r = stochastic_round_bf16(x, key)
        if step < 3:
            assert torch.equal(r.view(torch.int16), stochastic_round_bf16.fn(x, key).view(torch.int16))
            assert torch.equal(r.view(torch.int16), stochastic_round_bf16(x, key).view(torch.int16))
        total += r.double()
    down, up = neighbours(x)
    spacing = (up - down).double()
    # each mean is within 5 standard deviations (spacing * 0.5 / sqrt(n)) of x, and the average bias is tiny
    err = (total / n - x.double()) / spacing
    assert float(err.abs().max()) < 5 * 0.5 / n**0.5
    assert abs(float(err.mean())) < 0.01
    nearest_bias = ((x.to(torch.bfloat16).double() - x.double()) / spacing).abs().mean()
    assert float(nearest_bias) > 0.2  # nearest rounding's per-element error is ~0.25 spacing: SR removes it


def test_special_values():
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1.0, -2.0])
    r = stochastic_round_bf16(x, stream_key(0, 0, torch.tensor(5)))
    assert torch.isnan(r[0]) and r[1] == float("inf") and r[2] == -float("inf")
    assert torch.equal(r[3:].float(), x[3:]) and bool(torch.signbit(r[4]))


def test_hash_bits_are_uniform_and_uncorrelated():
    index = torch.arange(1 << 16, dtype=torch.int64)
    a = hash32((index ^ stream_key(0, 0, torch.tensor(0))) & 0xFFFFFFFF)
    b = hash32((index ^ stream_key(0, 0, torch.tensor(1))) & 0xFFFFFFFF)
    assert int(a.min()) >= 0 and int(a.max()) < 2**32 and a.unique().numel() == a.numel()  # a bijection
    for bit in (0, 7, 15, 31):  # each bit is set half of the time
        assert abs(float(((a >> bit) & 1).double().mean()) - 0.5) < 0.01
    u, v = a.double() / 2**32, b.double() / 2**32
    corr = lambda s, t: float(torch.corrcoef(torch.stack([s, t]))[0, 1])  # noqa: E731
    assert abs(corr(u[1:], u[:-1])) < 0.02  # neighbouring elements
    assert abs(corr(u, v)) < 0.02  # consecutive steps
    assert abs(float(u.mean()) - 0.5) < 0.01


def test_stream_key_in_python_ints_equals_the_tensor_version():
    from lowbit_fn._random import stream_key_int

    for seed, salt, step in [(0, 0, 0), (1, 2, 3), (2**31 - 1, 7, 2**40 + 5), (12345, 1, 999)]:
        assert stream_key_int(seed, salt, step) == int(stream_key(seed, salt, torch.tensor(step)))
        for ident in (0, 1, 2**32 - 1):
            assert tensor_key_int(stream_key_int(seed, salt, step), ident) == int(tensor_key(stream_key(seed, salt, torch.tensor(step)), ident))


def test_the_counter_does_not_wrap_at_2_32_elements():
    """Element i and element i + 2**32 of one stream draw different bits (the high half of the index is mixed)."""
    key = stream_key(0, 0, torch.tensor(1))
    index = torch.arange(4096, dtype=torch.int64)
    low, high = mix(index, key), mix(index + 2**32, key)
    assert float((low == high).double().mean()) < 0.01
    assert torch.equal(mix(index + 2**33, key), mix(index + 2**33, key)), "deterministic"


def test_base_offsets_the_element_index():
    """A piece of a tensor rounded with base b draws the bits of the whole tensor's elements b, b + 1, ..."""
    x = torch.randn(1000) * 1e-3 + 1.0
    key = stream_key(3, 3, torch.tensor(2))
    whole = stochastic_round_bf16(x, key)
    piece = stochastic_round_bf16(x[300:].contiguous(), key, torch.tensor(300, dtype=torch.int64))
    assert torch.equal(whole[300:].view(torch.int16), piece.view(torch.int16))
