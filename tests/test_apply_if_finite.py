"""``apply_if_finite``: a step whose gradients hold a NaN or an Inf is skipped before any state byte is written
(params and state bit-identical to before), counted, and applied anyway after ``max_consecutive_errors`` of them in
a row; the finite steps equal a run that never saw the bad ones, bit for bit."""

from __future__ import annotations

import math

import pytest
import torch
from tensordict import TensorDict

import lowbit_fn
from helpers import same, snapshot

SHAPES = {"w": (3, 600), "b": (600,)}


def grads(kind: str, seed: int):
    gen = torch.Generator().manual_seed(seed)
    out = {k: torch.randn(s, generator=gen) for k, s in SHAPES.items()}
    if kind == "nan":
        out["w"][1, 7] = math.nan
    elif kind == "inf":
        out["b"][5] = math.inf
    elif kind == "-inf":
        out["w"][2, 599] = -math.inf
    elif kind == "all_nan":
        out["w"].fill_(math.nan)
        out["b"].fill_(math.nan)
    return out


def start():
    gen = torch.Generator().manual_seed(0)
    return {k: torch.randn(s, generator=gen) for k, s in SHAPES.items()}


SEQUENCE = ["ok", "nan", "inf", "ok", "-inf", "all_nan", "ok"]


def inner(fmt):
    return lowbit_fn.chain(lowbit_fn.clip_by_global_norm(10.0), lowbit_fn.adamw(1e-2, weight_decay=0.1, state_format=fmt, min_quant_size=0))


def step(opt, g, state, params, how):
    if how == "update":
        updates, state = opt.update(g, state, params)
        return lowbit_fn.apply_updates(params, updates), state
    return lowbit_fn.apply_gradients(opt, g, state, params, inplace=how == "inplace")


@pytest.mark.parametrize("fmt", ["8bit", "4bit", "fp8", "fp32"])
@pytest.mark.parametrize("how", ["update", "apply_gradients", "inplace"])
@pytest.mark.parametrize("native", ["1", "0"])
def test_skips_non_finite_steps_and_counts_them(fmt, how, native, monkeypatch):
    monkeypatch.setenv("LOWBIT_FN_NATIVE", native)
    monkeypatch.setenv("LOWBIT_FN_COMPILE", "0")
    opt = lowbit_fn.apply_if_finite(inner(fmt), max_consecutive_errors=5)
    params = TensorDict(start(), batch_size=[])
    state = opt.init(params)
    ref_opt = inner(fmt)
    ref_params, ref_state = params.clone(), ref_opt.init(params)
    run, total = 0, 0
    for i, kind in enumerate(SEQUENCE):
        g = grads(kind, seed=10 + i)
        before_p, before_s = snapshot(params), snapshot(state["inner_state"])
        params, state = step(opt, g, state, params, how)
        if kind == "ok":
            run = 0
            ref_params, ref_state = step(ref_opt, g, ref_state, ref_params, "update")
        else:
            run, total = run + 1, total + 1
            assert same(params, before_p), f"step {i} ({kind}) left the params as they were"
            assert same(state["inner_state"], before_s), f"step {i} ({kind}) left the state as it was"
        assert int(state["notfinite_count"]) == run and int(state["total_notfinite"]) == total
        assert bool(state["last_finite"]) == (kind == "ok")
        for key in SHAPES:
            assert torch.equal(params[key], ref_params[key]), f"step {i}: the run without the bad steps"
    assert same(state["inner_state"], snapshot(ref_state))


def test_update_returns_zero_updates_when_it_skips():
    opt = lowbit_fn.apply_if_finite(inner("8bit"), max_consecutive_errors=2)
    params = start()
    state = opt.init(params)
    g = grads("nan", 1)
    updates, state = opt.update(g, state, params)
    assert all(bool((updates[k] == 0).all()) for k in SHAPES)
    assert math.isnan(g["w"][1, 7].item()), "inplace=False leaves the gradients alone"
    updates, state = opt.update(g, state, params, inplace=True)
    assert updates["w"] is g["w"] and bool((g["w"] == 0).all()), "inplace=True zeroes them in their buffers"


@pytest.mark.parametrize("limit", [0, 1, 3])
def test_applied_anyway_after_max_consecutive_errors(limit):
    """As optax: the (limit + 1)-th non-finite step in a row is applied, so a run that only produces non-finite
    gradients does not go on silently; a finite step resets the run."""
    opt = lowbit_fn.apply_if_finite(lowbit_fn.adamw(1e-2, state_format="8bit", min_quant_size=0), limit)
    params = start()
    state = opt.init(params)
    for i in range(limit):
        params, state = lowbit_fn.apply_gradients(opt, grads("nan", i), state, params)
        assert bool(torch.isfinite(params["w"]).all()), f"skipped {i + 1} of {limit}"
    params, state = lowbit_fn.apply_gradients(opt, grads("nan", 99), state, params)
    assert math.isnan(params["w"][1, 7].item()), "applied: the element's parameter NaN (and only it)"
    assert int(torch.isnan(params["w"]).sum()) == 1
    assert int(state["notfinite_count"]) == limit + 1 and int(state["total_notfinite"]) == limit + 1
    params, state = lowbit_fn.apply_gradients(opt, grads("ok", 5), state, params)
    assert int(state["notfinite_count"]) == 0 and bool(state["last_finite"])


def test_bad_arguments_and_state_raise():
    with pytest.raises(TypeError, match="inner must be a GradientTransformation"):
        lowbit_fn.apply_if_finite(lambda p: p, 3)
    for bad in (-1, 1.5, True, None):
        with pytest.raises(ValueError, match="max_consecutive_errors must be an int >= 0"):
            lowbit_fn.apply_if_finite(inner("8bit"), bad)
    opt = lowbit_fn.apply_if_finite(inner("8bit"), 3)
    params = start()
    state = opt.init(params)
    del state["total_notfinite"]
    with pytest.raises(ValueError, match="apply_if_finite: the state has entries"):
        opt.update(grads("ok", 0), state, params)
    state = opt.init(params)
    state["notfinite_count"] = torch.zeros(2, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"state\['notfinite_count'\] must be a 0-d torch.int64 tensor"):
        lowbit_fn.apply_gradients(opt, grads("ok", 0), state, params)
    state = opt.init(params)
    before = snapshot(state)
    with pytest.raises(ValueError, match="w"):  # the inner transform's own check, before any counting
        opt.update({"w": torch.zeros(3, 601), "b": torch.zeros(600)}, state, params)
    assert same(state, before)


# --- the torch.optim option ----------------------------------------------------------------------------------------

CLASSES = [
    lowbit_fn.AdamW8bit, lowbit_fn.Adam4bit, lowbit_fn.AdamWFp8, lowbit_fn.AdamW, lowbit_fn.Lion8bit,
    lowbit_fn.SGD4bit, lowbit_fn.RMSpropFp8, lowbit_fn.AdEMAMix8bit, lowbit_fn.Muon8bit,
]


def torch_run(cls, kinds, **kw):
    """(params, optimizer) after a step per kind (a NaN / Inf / all-NaN gradient, or a finite one)."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(v) for v in start().values()]
    if cls.__name__.startswith("Muon"):
        params = params[:1]  # 2-D only
    extra = {"momentum": 0.9} if cls.__name__.startswith(("SGD", "RMSprop")) else {}
    opt = cls(params, lr=1e-2, min_quant_size=0, **extra, **kw) if cls is not lowbit_fn.AdamW else cls(params, lr=1e-2, **kw)
    for i, kind in enumerate(kinds):
        g = grads(kind, seed=10 + i)
        for p, v in zip(params, g.values()):
            p.grad = v
        opt.step()
    return params, opt


def same_state_dict(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    assert sa["state"].keys() == sb["state"].keys()
    for k in sa["state"]:
        for name, v in sa["state"][k].items():
            w = sb["state"][k][name]
            assert torch.equal(v, w) if isinstance(v, torch.Tensor) else v == w, (k, name)


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("native", ["1", "0"])
def test_torch_optim_skips_non_finite_steps(cls, native, monkeypatch):
    monkeypatch.setenv("LOWBIT_FN_NATIVE", native)
    monkeypatch.setenv("LOWBIT_FN_COMPILE", "0")
    kinds = ["nan", "ok", "inf", "-inf", "ok", "all_nan", "ok"]
    params, opt = torch_run(cls, kinds, max_consecutive_errors=2)
    ref_params, ref = torch_run(cls, [], max_consecutive_errors=None)
    skipped = 0
    for i, kind in enumerate(kinds):  # the reference steps the finite gradients only
        given = list(zip(ref_params, grads(kind, seed=10 + i).values()))
        if not all(bool(v.isfinite().all()) for _, v in given):
            skipped += 1  # (Muon's single matrix never sees the Inf put in the bias)
            continue
        for p, v in given:
            p.grad = v
        ref.step()
    for p, q in zip(params, ref_params):
        assert torch.equal(p, q)
    same_state_dict(opt, ref)
    assert opt.apply_if_finite_state == {"notfinite_count": 0, "last_finite": True, "total_notfinite": skipped}
    saved = opt.state_dict()
    assert saved["apply_if_finite"] == opt.apply_if_finite_state and "apply_if_finite" not in ref.state_dict()


def test_torch_optim_first_step_skipped_makes_no_state_and_counts_survive_a_checkpoint():
    params, opt = torch_run(lowbit_fn.AdamW8bit, ["nan", "inf"], max_consecutive_errors=3)
    assert len(opt.state) == 0, "no state is made by a skipped step"
    assert opt.apply_if_finite_state == {"notfinite_count": 2, "last_finite": False, "total_notfinite": 2}
    saved = opt.state_dict()
    _, fresh = torch_run(lowbit_fn.AdamW8bit, [], max_consecutive_errors=3)
    fresh.load_state_dict(saved)
    assert fresh.apply_if_finite_state == opt.apply_if_finite_state
    for bad in ({"notfinite_count": -1, "last_finite": True, "total_notfinite": 0},
                {"notfinite_count": 0, "last_finite": 1.0, "total_notfinite": 0}, {"notfinite_count": 0}, [1, 2]):
        before = dict(fresh.apply_if_finite_state)
        with pytest.raises(ValueError, match="apply_if_finite"):
            fresh.load_state_dict({**saved, "apply_if_finite": bad})
        assert fresh.apply_if_finite_state == before
    # applied anyway after max_consecutive_errors in a row
    params, opt = torch_run(lowbit_fn.AdamW8bit, ["nan", "nan"], max_consecutive_errors=1)
    assert int(torch.isnan(params[0]).sum()) == 1 and opt.apply_if_finite_state["notfinite_count"] == 2


def test_torch_optim_option_is_checked():
    p = torch.nn.Parameter(torch.zeros(3))
    for bad in (-1, 2.0, True, "3"):
        with pytest.raises(ValueError, match="max_consecutive_errors must be None or an int >= 0"):
            lowbit_fn.AdamW8bit([p], max_consecutive_errors=bad)
    opt = lowbit_fn.as_torch_optimizer(lowbit_fn.lion, [p], learning_rate=1e-3, max_consecutive_errors=0)
    assert opt.max_consecutive_errors == 0
