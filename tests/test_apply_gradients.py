"""``apply_gradients``: a whole functional step, the parameter update fused into the Adam pass; the same bits as
``update`` + ``apply_updates`` for float32 params, torch.optim's for half-precision ones."""

import pytest
import torch
from tensordict import TensorDict

import lowbit_fn
from helpers import same, snapshot

SHAPES = {"w": (96, 300), "v": (33, 256), "t": (4, 5, 130), "b": (300,)}


def make(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {k: (torch.randn(s, generator=g) * 0.1).to(dtype) for k, s in SHAPES.items()}


def transforms(fmt):
    """Fused ones (adam/adamw alone, last in a chain, last in a nested chain) and a chain that is not fused."""
    kw = dict(state_format=fmt, min_quant_size=0)
    return {
        "adamw": lowbit_fn.adamw(1e-2, weight_decay=0.1, **kw),
        "adam_l2": lowbit_fn.adam(1e-2, weight_decay=0.1, **kw),
        "clip_adamw": lowbit_fn.chain(lowbit_fn.clip_by_global_norm(0.5), lowbit_fn.adamw(1e-2, **kw)),
        "nested": lowbit_fn.chain(
            lowbit_fn.identity(),
            lowbit_fn.chain(lowbit_fn.clip_by_global_norm(0.5), lowbit_fn.adam(lambda n: 1e-2 / (1 + n), **kw)),
        ),
        "unfused": lowbit_fn.chain(lowbit_fn.scale_by_adam(state_format=fmt, min_quant_size=0),
                                   lowbit_fn.scale_by_learning_rate(1e-2)),
    }


@pytest.mark.parametrize("fmt", ["fp32", "8bit", "4bit", "fp8"])
def test_same_bits_as_update_then_apply_updates(fmt):
    for label, opt in transforms(fmt).items():
        runs = []
        for mode in ("two_calls", "pure", "inplace"):
            params = TensorDict(make(), batch_size=[])
            state = opt.init(params)
            for step in range(3):
                grads = TensorDict(make(seed=10 + step), batch_size=[])
                if mode == "two_calls":
                    updates, state = opt.update(grads, state, params)
                    params = lowbit_fn.apply_updates(params, updates)
                    continue
                before_p, before_g = snapshot(params), snapshot(grads)
                new, state = lowbit_fn.apply_gradients(opt, grads, state, params, inplace=mode == "inplace")
                if mode == "pure":
                    assert new is not params and same(params, before_p), "params are not modified"
                    assert same(grads, before_g), "grads are not modified"
                else:
                    assert new is params
                params = new
            runs.append((params, state))
        (p0, s0), *others = runs
        for p, s in others:
            for k in SHAPES:
                assert torch.equal(p0[k], p[k]), (label, k)
            assert bool((s0 == s).all()), label


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("fmt", ["8bit", "fp8", "fp32"])
def test_half_precision_params_match_the_torch_optim_front_end_bit_for_bit(fmt, dtype):
    """One rounding of the float32 update into the param, as ``AdamW8bit.step()`` does (nearest-rounding formats:
    stochastic moment rounding keys its noise by each front end's identity of a parameter)."""
    params = make(dtype)
    keys = sorted(SHAPES)
    leaves = [torch.nn.Parameter(params[k].clone()) for k in keys]
    cls = {"8bit": lowbit_fn.AdamW8bit, "fp8": lowbit_fn.AdamWFp8, "fp32": lowbit_fn.AdamW}[fmt]
    torch_opt = cls(leaves, lr=1e-2, min_quant_size=0) if fmt != "fp32" else cls(leaves, lr=1e-2)
    opt = lowbit_fn.adamw(1e-2, state_format=fmt, min_quant_size=0)
    state = opt.init(params)
    for step in range(3):
        grads = make(dtype, seed=20 + step)
        for leaf, k in zip(leaves, keys):
            leaf.grad = grads[k].clone()
        torch_opt.step()
        params, state = lowbit_fn.apply_gradients(opt, grads, state, params, inplace=True)
    for leaf, k in zip(leaves, keys):
        assert params[k].dtype == dtype and torch.equal(leaf.detach(), params[k]), k


def test_bf16_stochastic_rounding_moves_parameters_in_expectation():
    """Updates of 1e-3 on params of 1.0 (a bfloat16 ulp below 1 is 2**-8): nearest rounding keeps every param at 1,
    stochastic rounding moves them by the update on average, deterministically for a step."""
    opt = lowbit_fn.adam(1e-3, state_format="8bit")
    grads = {"w": torch.ones(64, 128, dtype=torch.bfloat16)}  # Adam's first direction is 1: the update is -1e-3
    results = []
    for sr in (False, True, True):
        params = {"w": torch.ones(64, 128, dtype=torch.bfloat16)}
        new, _ = lowbit_fn.apply_gradients(opt, grads, opt.init(params), params, bf16_stochastic_round=sr)
        results.append(new["w"])
    nearest, sr, again = results
    assert torch.equal(nearest, torch.ones_like(nearest))
    assert abs(float(sr.float().mean()) - (1 - 1e-3)) < 1e-4
    assert 0.1 < float((sr != 1).float().mean()) < 0.5
    assert torch.equal(sr, again)
    with pytest.raises(ValueError, match="bf16_stochastic_round=True needs a transform ending with"):
        unfused = transforms("8bit")["unfused"]
        p = make(torch.bfloat16)
        lowbit_fn.apply_gradients(unfused, make(torch.bfloat16, 1), unfused.init(p), p, bf16_stochastic_round=True)


def test_a_bad_step_changes_nothing():
    opt = transforms("8bit")["clip_adamw"]
    params = TensorDict(make(), batch_size=[])
    state = opt.init(params)
    params, state = lowbit_fn.apply_gradients(opt, make(seed=1), state, params, inplace=True)
    grads = TensorDict(make(seed=2), batch_size=[])
    grads["v"] = torch.randn(33, 255)
    before_p, before_s, before_g = snapshot(params), snapshot(state), snapshot(grads)
    with pytest.raises(ValueError, match=r"updates\['v'\]"):
        lowbit_fn.apply_gradients(opt, grads, state, params, inplace=True)
    assert same(params, before_p) and same(state, before_s)
    assert same(grads, before_g), "the clip did not run"
    with pytest.raises(TypeError, match="transform must be a GradientTransformation"):
        lowbit_fn.apply_gradients(lambda g: g, grads, state, params)


def test_the_compiled_path_gives_the_native_bits(monkeypatch):
    runs = []
    for native in ("1", "0"):
        monkeypatch.setenv("LOWBIT_FN_NATIVE", native)
        opt = lowbit_fn.adamw(1e-2, state_format="4bit", min_quant_size=0)
        params = make(torch.bfloat16)
        state = opt.init(params)
        for step in range(2):
            params, state = lowbit_fn.apply_gradients(opt, make(torch.bfloat16, 30 + step), state, params,
                                                      inplace=True, bf16_stochastic_round=True)
        runs.append((params, state))
    (p1, s1), (p2, s2) = runs
    assert all(torch.equal(p1[k], p2[k]) for k in SHAPES)
    assert bool((s1 == s2).all())
