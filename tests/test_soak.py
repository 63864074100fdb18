"""Extremes: thousands of steps through gradient phases of 1e-30, 1e-20, 1, 1e20 and all zeros, subnormal
parameters, a learning rate of 0, and the index and counter arithmetic of tensors beyond 2**31 elements (without
allocating them). Every run stays finite, the quantized runs stay within budget of the fp32-state run of the same
sequence, and a huge-gradient phase behaves as it does with fp32 state (steps of a few learning rates)."""

from __future__ import annotations

import math

import pytest
import torch
from tensordict import TensorDict

import lowbit_fn
from lowbit_fn.kernels import Item, StepConfig, moment_step
from lowbit_fn.kernels.rules import Adam

SHAPES = {"w": (64, 320), "v": (3, 300), "b": (320,)}
PHASES = [1.0, 1e-30, 1e-20, 1.0, 1e20, 0.0, 1.0]  # the gradient's scale, phase by phase
STEPS = 400  # per phase: 2800 steps in all
LR = 1e-3
# largest ||p - p_fp32|| / ||p_fp32 - p_0|| at the end, per format: measured 2026-12-01 (400 steps per phase) 8bit
# 0.023, 4bit 0.44, fp8 0.071; random gradients have no loss to pull a run back, so rounding errors add up freely.
# Budgets about 2x.
BUDGET = {"8bit": 0.05, "4bit": 0.8, "fp8": 0.15}


def start(scale: float = 0.1) -> TensorDict:
    gen = torch.Generator().manual_seed(0)
    return TensorDict({k: torch.randn(s, generator=gen) * scale for k, s in SHAPES.items()}, batch_size=[])


def phase_grads(seed: int, scale: float) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=gen) * scale for k, s in SHAPES.items()}


def finite(td: TensorDict) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in td.values(include_nested=True, leaves_only=True)
               if t.is_floating_point())


def soak(opt, params: TensorDict, phases=PHASES, steps=STEPS):
    """Runs the phases; returns the params after each phase and the largest parameter change of one step in each."""
    state = opt.init(params)
    ends, largest = [], []
    for k, scale in enumerate(phases):
        biggest = 0.0
        for i in range(steps):
            before = params["w"].clone() if i % 25 == 0 else None
            params, state = lowbit_fn.apply_gradients(opt, phase_grads(1000 * k + i, scale), state, params)
            if before is not None:
                biggest = max(biggest, float((params["w"] - before).abs().max()))
        assert finite(params) and finite(state), f"phase {k} (gradients x {scale:g}): non-finite params or state"
        ends.append(params.clone())
        largest.append(biggest)
    return ends, largest


@pytest.mark.slow
def test_adamw_soak_stays_finite_and_within_budget_of_fp32():
    runs = {}
    for fmt in ("fp32", "8bit", "4bit", "fp8"):
        opt = lowbit_fn.adamw(LR, weight_decay=1e-2, state_format=fmt, min_quant_size=0)
        runs[fmt] = soak(opt, start())
    p0 = start()
    ref_ends, ref_largest = runs["fp32"]
    huge = PHASES.index(1e20)
    for fmt, budget in BUDGET.items():
        ends, largest = runs[fmt]
        # a phase of 1e20 gradients (v ~ 1e40 saturates at float32's max in every format): steps of a few lr, as
        # with fp32 state (measured 5.0 lr in each), never a jump
        assert ref_largest[huge] <= 10 * LR and largest[huge] <= 1.5 * ref_largest[huge], (fmt, largest, ref_largest)
        for key in SHAPES:
            moved = float((ref_ends[-1][key] - p0[key]).norm())
            off = float((ends[-1][key] - ref_ends[-1][key]).norm())
            assert off <= budget * moved, f"{fmt} {key}: {off / moved:.3g} of the distance moved, budget {budget}"


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["8bit", "4bit", "fp8"])
def test_every_family_soak_stays_finite(fmt):
    """The other families through the same phases (shorter), quantized: finite params and state throughout."""
    factories = {
        "lion": lambda: lowbit_fn.lion(1e-4, weight_decay=1e-2, state_format=fmt, min_quant_size=0),
        "sgd": lambda: lowbit_fn.sgd(1e-3, momentum=0.9, nesterov=True, state_format=fmt, min_quant_size=0),
        "rmsprop": lambda: lowbit_fn.rmsprop(1e-4, momentum=0.9, centered=True, state_format=fmt, min_quant_size=0),
        "ademamix": lambda: lowbit_fn.ademamix(1e-3, t_alpha=50, t_beta3=50, state_format=fmt, min_quant_size=0),
        "adam_amsgrad": lambda: lowbit_fn.adam(1e-3, amsgrad=True, state_format=fmt, min_quant_size=0),
    }
    for name, make in factories.items():
        soak(make(), start(), steps=100)
    muon = lowbit_fn.muon(1e-3, state_format=fmt, min_quant_size=0)
    params = TensorDict({"w": start()["w"]}, batch_size=[])
    state = muon.init(params)
    for k, scale in enumerate(PHASES):
        for i in range(30):
            params, state = lowbit_fn.apply_gradients(muon, {"w": phase_grads(1000 * k + i, scale)["w"]}, state, params)
        assert finite(params) and finite(state), f"muon phase {k}"


@pytest.mark.parametrize("fmt", ["8bit", "4bit", "fp8", "fp32"])
def test_learning_rate_zero_and_subnormal_params(fmt):
    """Subnormal parameters (|p| ~ 1e-40) through every phase: with lr 0 (and weight decay) not one bit changes and
    the state stays finite; with lr 1e-3 they train, finite."""
    tiny = start(scale=1e-40)
    assert bool((tiny["w"] != 0).any()) and float(tiny["w"].abs().max()) < torch.finfo(torch.float32).tiny
    frozen = lowbit_fn.adamw(0.0, weight_decay=0.1, state_format=fmt, min_quant_size=0)
    ends, _ = soak(frozen, tiny.clone(), steps=20)
    for key in SHAPES:
        assert torch.equal(ends[-1][key], tiny[key]), key
    ends, _ = soak(lowbit_fn.adamw(1e-3, state_format=fmt, min_quant_size=0), tiny.clone(), steps=20)
    assert not torch.equal(ends[-1]["w"], tiny["w"])


def test_huge_gradients_keep_the_second_moment_finite():
    """Gradients up to sqrt(float32 max / (1 - b2)) ~ 5.8e20 keep v finite (it adds (g * sqrt(1 - b2))**2, not
    g * g * (1 - b2), which overflows from 1.8e19): the step is Adam's ~lr, as in float64."""
    for fmt in ("fp32", "8bit", "4bit", "fp8"):
        opt = lowbit_fn.adam(1e-3, state_format=fmt, min_quant_size=0)
        params = TensorDict({"w": torch.zeros(4, 256)}, batch_size=[])
        state = opt.init(params)
        g = torch.full((4, 256), 5e20)
        g[0, 0] = -5e20
        params, state = lowbit_fn.apply_gradients(opt, {"w": g}, state, params)
        assert finite(state), fmt
        step = params["w"]
        assert torch.allclose(step, -1e-3 * torch.sign(g), rtol=0.05), fmt  # first step: -lr * sign(g)


# --- beyond 2**31 elements ----------------------------------------------------------------------------------------

BIG = (2**16 + 3, 2**15 + 1)  # 2.15e9 elements, more than 2**31


@pytest.mark.parametrize("fmt", ["8bit", "4bit", "fp8"])
def test_state_layout_of_a_tensor_beyond_2_31_elements(fmt):
    """The state of a 2.15e9-element parameter, made on the meta device (no memory): its codes and scales have the
    shapes the row layout gives, computed in Python ints (no 32-bit wrap)."""
    assert math.prod(BIG) > 2**31
    params = {"w": torch.empty(BIG, device="meta")}
    state = lowbit_fn.scale_by_adam(state_format=fmt).init(params)
    f = lowbit_fn.FORMATS[fmt]
    group = f"{fmt}{'_sr' if fmt == '4bit' else ''}_block{f.default_block_size}"
    codes, scale = state[group, "mu", "w", "codes"], state[group, "mu", "w", "scale"]
    rows, cols = BIG
    assert codes.shape == (rows, -(-cols // f.codes_per_byte)) and codes.device.type == "meta"
    assert scale.shape == (rows, -(-cols // f.default_block_size))
    assert lowbit_fn.formats.get_format(fmt).code_bytes(f.num_blocks(math.prod(BIG), f.default_block_size),
                                                          f.default_block_size) >= math.prod(BIG) // f.codes_per_byte


def test_random_numbers_and_native_offsets_past_2_31_and_2_32():
    """Stochastic rounding's element index is int64 end to end: a piece of rows whose first element is at 2**31 - 100
    or 2**32 - 100 of its tensor (an FSDP shard of a 2**32-element parameter) gets the same codes from the native
    kernel and the torch path, and other codes than the same piece at index 0 (no wrap)."""
    fmt = lowbit_fn.FORMATS["4bit"]
    config = StepConfig(Adam(), fmt, fmt.default_block_size, True, 0)
    hyper = tuple(torch.tensor(h, dtype=torch.float64) for h in (0.9, 0.999, 1e-8))
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(4, 300, generator=gen)
    results = {}
    for base in (0, 2**31 - 100, 2**32 - 100, 2**40 + 7):
        for native in ("1", "0"):
            with pytest.MonkeyPatch.context() as mp:
                mp.setenv("LOWBIT_FN_NATIVE", native)
                mp.setenv("LOWBIT_FN_COMPILE", "0")
                moments = [*lowbit_fn.quantize(torch.zeros(4, 300), "4bit", signed=True),
                           *lowbit_fn.quantize(torch.zeros(4, 300), "4bit", signed=False)]
                (d,) = moment_step(config, [Item(g, moments, torch.tensor(1), 77, base=base)], hyper)
                results[base, native] = (d, moments)
        (d1, m1), (d0, m0) = results[base, "1"], results[base, "0"]
        assert torch.equal(d1, d0) and all(torch.equal(a, b) for a, b in zip(m1, m0)), base
    assert not torch.equal(results[0, "1"][1][0], results[2**32 - 100, "1"][1][0]), "the index does not wrap at 2**32"
    assert not torch.equal(results[0, "1"][1][0], results[2**40 + 7, "1"][1][0])


def test_step_counts_past_2_31():
    """A state whose count is past 2**31 (and 2**32) steps: the bias corrections are computed in float64 from the
    int64 count, so the step is the plain one (corrections ~1), finite, native == torch path."""
    for count in (2**31 - 1, 2**31 + 5, 2**32 + 3):
        outs = []
        for native in ("1", "0"):
            with pytest.MonkeyPatch.context() as mp:
                mp.setenv("LOWBIT_FN_NATIVE", native)
                mp.setenv("LOWBIT_FN_COMPILE", "0")
                opt = lowbit_fn.adamw(1e-3, weight_decay=0.0, state_format="8bit", min_quant_size=0)
                params = TensorDict({"w": torch.ones(2, 256)}, batch_size=[])
                state = opt.init(params)
                for key in state.keys(True, True):
                    if key[-1] == "count":
                        state[key].fill_(count)
                params, state = lowbit_fn.apply_gradients(opt, {"w": torch.ones(2, 256)}, state, params)
                outs.append(params["w"])
                counts = [int(state[k]) for k in state.keys(True, True) if k[-1] == "count"]
                assert counts == [count + 1], counts
        assert torch.equal(outs[0], outs[1]) and bool(torch.isfinite(outs[0]).all())
        # fresh moments, corrections ~1 at this count: m = 0.1, v = 0.001 -> step lr * 0.1 / sqrt(0.001) = 3.16 lr
        assert torch.allclose(1 - outs[0], torch.full_like(outs[0], 1e-3 * 0.1 / math.sqrt(1e-3)), rtol=0.02)
