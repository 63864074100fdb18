"""Non-finite gradients: a NaN or +-Inf gradient element costs that element only, as in torch.optim.

The element's parameter becomes NaN (torch's AdamW does the same); its quantized moments are stored as a 0 would
be (the code nearest to 0) and take no part in their block's scale, so the state equals, bit for bit, the state of
the same run with a 0 in that gradient element, and every other parameter equals that run's. Every format, both front ends, the native kernel and the
torch path (eager here; ``test_compiled_path_contains_a_non_finite_element`` compiles it once), every elementwise
family. The opt-in skip of a whole step (``apply_if_finite``) is in ``test_apply_if_finite.py``.
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch

import lowbit_fn

SHAPE = (3, 600)  # rows of two whole 256-blocks (four 128-blocks) and a short last block
BAD_AT = (1, 300)
FORMATS = ["8bit", "4bit", "fp8", "fp32"]
BAD = [math.nan, math.inf, -math.inf]


def gradients(first: float | None, steps: int = 3) -> list[torch.Tensor]:
    """``steps`` seeded gradients; the first one's ``BAD_AT`` element set to ``first`` (all of it when ``first`` is
    given as a 1-tuple)."""
    gen = torch.Generator().manual_seed(1)
    out = [torch.randn(SHAPE, generator=gen) for _ in range(steps)]
    if isinstance(first, tuple):
        out[0].fill_(first[0])
    elif first is not None:
        out[0][BAD_AT] = first
    return out


def start() -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))


def run_functional(factory, fmt: str, grads: list[torch.Tensor]):
    opt = factory(state_format=fmt, min_quant_size=0)
    params = {"w": start()}
    state = opt.init(params)
    for g in grads:
        params, state = lowbit_fn.apply_gradients(opt, {"w": g}, state, params)
    return params["w"], {k: v.clone() for k, v in state.items(include_nested=True, leaves_only=True)}


def run_torch_optim(cls, grads: list[torch.Tensor], **kw):
    p = torch.nn.Parameter(start())
    quantized = "min_quant_size" in inspect.signature(cls).parameters  # the low-bit classes: quantize this small one
    opt = cls([p], min_quant_size=0, **kw) if quantized else cls([p], **kw)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    state = {k: v.clone() for k, v in opt.state[p].items() if isinstance(v, torch.Tensor)}
    return p.detach().clone(), state


def assert_costs_only_its_element(got, zero_run, fmt, full=None):
    """``got`` (param, state) after a bad first gradient against ``zero_run``, the run with 0 in its place. The
    element's parameter is NaN (AdamW's, as torch's), or, given ``full`` (the same run's parameter with fp32
    state), NaN only where that one is: an Inf leaves a sign update (Lion) finite, and then full precision's
    moment goes NaN at the next step (``inf + w * (g - inf)``) while the quantized one, stored as a 0 would be, does not."""
    (p, state), (p0, state0) = got, zero_run
    others = torch.ones(SHAPE, dtype=torch.bool)
    others[BAD_AT] = False
    if full is None:
        assert math.isnan(p[BAD_AT].item()), "the element's parameter is NaN, as in torch.optim"
    else:
        assert not math.isnan(p[BAD_AT].item()) or math.isnan(full[BAD_AT].item()), "no more damage than fp32 state"
    assert torch.equal(p[others], p0[others]), "every other parameter is untouched by the bad element"
    if fmt != "fp32":  # full-precision moments keep the NaN/Inf, as torch's do
        assert state.keys() == state0.keys()
        for key in state:
            assert torch.equal(state[key], state0[key]), f"state {key} equals the run with 0 in the element"


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("native", ["1", "0"])
def test_functional_adamw(fmt, native, monkeypatch):
    monkeypatch.setenv("LOWBIT_FN_NATIVE", native)
    monkeypatch.setenv("LOWBIT_FN_COMPILE", "0")
    factory = lambda **kw: lowbit_fn.adamw(1e-2, weight_decay=0.1, **kw)  # noqa: E731
    zero = run_functional(factory, fmt, gradients(0.0))
    for bad in BAD:
        assert_costs_only_its_element(run_functional(factory, fmt, gradients(bad)), zero, fmt)


CLASSES = {
    "8bit": lowbit_fn.AdamW8bit, "4bit": lowbit_fn.AdamW4bit, "fp8": lowbit_fn.AdamWFp8, "fp32": lowbit_fn.AdamW,
}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("native", ["1", "0"])
def test_torch_optim_adamw_like_torch(fmt, native, monkeypatch):
    monkeypatch.setenv("LOWBIT_FN_NATIVE", native)
    monkeypatch.setenv("LOWBIT_FN_COMPILE", "0")
    zero = run_torch_optim(CLASSES[fmt], gradients(0.0), lr=1e-2)
    for bad in BAD:
        got = run_torch_optim(CLASSES[fmt], gradients(bad), lr=1e-2)
        assert_costs_only_its_element(got, zero, fmt)
        torch_p, _ = run_torch_optim(torch.optim.AdamW, gradients(bad), lr=1e-2)
        assert torch.equal(torch.isnan(got[0]), torch.isnan(torch_p)), "the same NaN parameters as torch.optim.AdamW"


@pytest.mark.parametrize("fmt", ["8bit", "4bit", "fp8"])
def test_an_all_non_finite_gradient(fmt, monkeypatch):
    """Every element NaN (or Inf): every parameter NaN, as torch's, and the state that of an all-zero gradient (the
    moments' scales 0), from which the next finite steps go on as from that state."""
    monkeypatch.setenv("LOWBIT_FN_COMPILE", "0")
    zero = run_torch_optim(CLASSES[fmt], gradients((0.0,)), lr=1e-2)
    for bad in BAD:
        p, state = run_torch_optim(CLASSES[fmt], gradients((bad,)), lr=1e-2)
        torch_p, _ = run_torch_optim(torch.optim.AdamW, gradients((bad,)), lr=1e-2)
        assert bool(torch.isnan(p).all() and torch.isnan(torch_p).all())
        for key in state:
            assert torch.equal(state[key], zero[1][key]), key


FAMILIES = {  # class per format, keyword arguments: every elementwise family of the drop-in classes
    "lion": (
        {"8bit": lowbit_fn.Lion8bit, "4bit": lowbit_fn.Lion4bit, "fp8": lowbit_fn.LionFp8, "fp32": lowbit_fn.Lion},
        {"weight_decay": 0.1},
    ),
    "sgd": (
        {"8bit": lowbit_fn.SGD8bit, "4bit": lowbit_fn.SGD4bit, "fp8": lowbit_fn.SGDFp8, "fp32": lowbit_fn.SGD},
        {"momentum": 0.9},
    ),
    "rmsprop": (
        {"8bit": lowbit_fn.RMSprop8bit, "4bit": lowbit_fn.RMSprop4bit, "fp8": lowbit_fn.RMSpropFp8,
         "fp32": lowbit_fn.RMSprop},
        {"momentum": 0.9, "centered": True},
    ),
    "ademamix": (
        {"8bit": lowbit_fn.AdEMAMix8bit, "4bit": lowbit_fn.AdEMAMix4bit, "fp8": lowbit_fn.AdEMAMixFp8,
         "fp32": lowbit_fn.AdEMAMix},
        {},
    ),
    "adam": (
        {"8bit": lowbit_fn.Adam8bit, "4bit": lowbit_fn.Adam4bit, "fp8": lowbit_fn.AdamFp8, "fp32": lowbit_fn.AdamW},
        {"amsgrad": True},
    ),
}


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("fmt", ["8bit", "4bit", "fp8"])
def test_every_elementwise_family(family, fmt):
    """Each family's quantized class against the run with 0 in the element, and the element's parameter NaN
    exactly where the family's fp32-state class makes it NaN."""
    classes, kw = FAMILIES[family]
    if family == "adam":
        kw = dict(kw, weight_decay=0.0)  # AdamW with no decay is Adam: the fp32 class of the comparison
    zero = run_torch_optim(classes[fmt], gradients(0.0), lr=1e-3, **kw)
    for bad in BAD:
        full, _ = run_torch_optim(classes["fp32"], gradients(bad), lr=1e-3, **kw)
        got = run_torch_optim(classes[fmt], gradients(bad), lr=1e-3, **kw)
        assert_costs_only_its_element(got, zero, fmt, full)


@pytest.mark.parametrize("fmt", ["8bit", "4bit", "fp8"])
def test_muon_state_costs_only_the_element(fmt):
    """Muon's Newton-Schulz mixes the whole matrix, so torch.optim.Muon turns every parameter of it NaN; ours does
    the same, and its stored momentum still loses only the element (equal to the run with 0 there)."""
    classes = {"8bit": lowbit_fn.Muon8bit, "4bit": lowbit_fn.Muon4bit, "fp8": lowbit_fn.MuonFp8}
    _, zero_state = run_torch_optim(classes[fmt], gradients(0.0, steps=1), lr=1e-2)
    p, state = run_torch_optim(classes[fmt], gradients(math.nan, steps=1), lr=1e-2)
    torch_p, _ = run_torch_optim(torch.optim.Muon, gradients(math.nan, steps=1), lr=1e-2)
    assert torch.equal(torch.isnan(p), torch.isnan(torch_p))
    for key in state:
        assert torch.equal(state[key], zero_state[key]), key


def test_compiled_path_contains_a_non_finite_element(monkeypatch):
    """The compiled torch step (no native kernel), one graph: the same containment, and ``apply_if_finite``
    around it skips the bad step (the run equals the one without it)."""
    monkeypatch.setenv("LOWBIT_FN_NATIVE", "0")
    factory = lambda **kw: lowbit_fn.adamw(1e-2, weight_decay=0.1, **kw)  # noqa: E731
    zero = run_functional(factory, "8bit", gradients(0.0))
    for bad in BAD:
        assert_costs_only_its_element(run_functional(factory, "8bit", gradients(bad)), zero, "8bit")
    guarded = lambda **kw: lowbit_fn.apply_if_finite(factory(**kw), max_consecutive_errors=3)  # noqa: E731
    skipped, state = run_functional(guarded, "8bit", gradients(math.nan))
    without, ref_state = run_functional(factory, "8bit", gradients(math.nan)[1:])
    assert torch.equal(skipped, without) and int(state["total_notfinite"]) == 1
    for key, value in ref_state.items():
        assert torch.equal(state["inner_state", *key] if isinstance(key, tuple) else state["inner_state", key], value)
