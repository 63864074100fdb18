"""Checkpoints of the family's drop-in classes (Lion, SGD, RMSprop, AdEMAMix in 8-bit, 4-bit, FP8 and fp32 state):
bit-exact resume, to and from torch.optim.SGD / RMSprop, conversion between formats, and refusal of checkpoints
that do not fit.

What these tests check is the front end's state handling. On the CPU the native kernel runs the low-bit steps;
where it is unavailable they run the eager step (``LOWBIT_FN_COMPILE=0``), which spares a compilation per class
and format (tests/test_native.py ties the native, eager and compiled steps together, bit for bit). The float64
comparisons with torch.optim run the default (compiled) path.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lowbit_fn
from helpers import as_torch, batches, mlp
from test_family import max_rel, train
from test_torch_optim import checkpoint_roundtrip, same_optimizer, snapshot_optimizer

FAMILIES = {  # the drop-in classes, and arguments that give every moment of the family
    "SGD": ((lowbit_fn.SGD8bit, lowbit_fn.SGD4bit, lowbit_fn.SGDFp8, lowbit_fn.SGD), dict(lr=0.05, momentum=0.9)),
    "RMSprop": ((lowbit_fn.RMSprop8bit, lowbit_fn.RMSprop4bit, lowbit_fn.RMSpropFp8, lowbit_fn.RMSprop),
                dict(lr=1e-3, momentum=0.5, centered=True)),
    "Lion": ((lowbit_fn.Lion8bit, lowbit_fn.Lion4bit, lowbit_fn.LionFp8, lowbit_fn.Lion), dict(lr=3e-4, weight_decay=0.1)),
    "AdEMAMix": ((lowbit_fn.AdEMAMix8bit, lowbit_fn.AdEMAMix4bit, lowbit_fn.AdEMAMixFp8, lowbit_fn.AdEMAMix),
                 dict(lr=1e-3, betas=(0.9, 0.999, 0.999), t_alpha=10, t_beta3=10)),  # warm-ups still running at the save
}
CLASSES = [cls for classes, _ in FAMILIES.values() for cls in classes]
FAMILY_OF = {cls: family for family, (classes, _) in FAMILIES.items() for cls in classes}
BY_FORMAT = {(family, cls._state_format): cls for family, (classes, _) in FAMILIES.items() for cls in classes}
MOMENTS = {"SGD": ("momentum_buffer",), "RMSprop": ("grad_var", "grad_avg", "momentum_buffer"), "Lion": ("exp_avg",),
           "AdEMAMix": ("exp_avg", "exp_avg_slow", "exp_avg_sq")}
UNSIGNED = ("square_avg", "exp_avg_sq", "grad_var")


@pytest.fixture
def eager(monkeypatch):
    monkeypatch.setenv("LOWBIT_FN_COMPILE", "0")


def make(cls, model_or_groups, **extra):
    """``cls`` with its family's arguments; low-bit classes quantize the two large weights (48x96, 96x96), the
    others (the 1x96 weight, the biases) keep float32 state."""
    kw = dict(FAMILIES[FAMILY_OF[cls]][1], **extra)
    if cls._state_format != "fp32":
        kw.setdefault("min_quant_size", 1024)
    params = model_or_groups.parameters() if isinstance(model_or_groups, nn.Module) else model_or_groups
    return cls(params, **kw)


def moments_of(opt, p):
    """A parameter's moments as float32/float64 values, dequantized with the public codec (sqrt-domain second
    moments squared back for stochastic rounding)."""
    entry, out = opt.state[p], {}
    for name in ("exp_avg", "exp_avg_slow", "exp_avg_sq", "momentum_buffer", "grad_avg", "square_avg", "grad_var"):
        if name in entry:
            out[name] = entry[name]
        elif f"{name}_codes" in entry:
            signed = name not in UNSIGNED
            value = lowbit_fn.dequantize(entry[f"{name}_codes"], entry[f"{name}_scale"], entry["state_format"],
                                         signed=signed, shape=p.shape, block_size=entry["block_size"])
            out[name] = value * value if entry["rounding"] == "stochastic" and not signed else value
    return out


def from_torch(moments):
    """torch's moments under ours: centered RMSprop's ``grad_var = max(square_avg - grad_avg**2, 0)``, the
    conversion of ``load_state_dict``."""
    out = {k: v for k, v in moments.items() if k != "step"}
    if "grad_avg" in out:
        out["grad_var"] = torch.clamp_min(out.pop("square_avg") - out["grad_avg"] * out["grad_avg"], 0.0)
    return out


def same_state(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a)


# --------------------------------------------------------------------------------------------------------------
# save / load / resume, bit for bit


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_save_load_resume_is_bit_exact(cls, dtype, eager):
    model = mlp(dtype)
    start = copy.deepcopy(model)
    sr = dict(bf16_stochastic_round=dtype == torch.bfloat16)
    ps = list(model.parameters())

    def groups(m):  # two param groups, the first at twice the family's lr
        params = list(m.parameters())
        return [{"params": params[:3], "lr": FAMILIES[FAMILY_OF[cls]][1]["lr"] * 2}, {"params": params[3:]}]

    opt = make(cls, groups(model), **sr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
    data = [(x.to(dtype), y.to(dtype)) for x, y in batches(7)]
    train(model, opt, data[:4], sched)
    if cls._state_format != "fp32":
        assert opt.state[ps[0]]["state_format"] == cls._state_format and "state_format" not in opt.state[ps[4]]
    saved = checkpoint_roundtrip(opt.state_dict())
    assert not any(isinstance(v, str) for e in saved["state"].values() for v in e.values()), "numbers and tensors only"
    clone = copy.deepcopy(model)
    fresh = make(cls, groups(clone), **sr)
    fresh_sched = torch.optim.lr_scheduler.CosineAnnealingLR(fresh, T_max=10)
    fresh_sched.load_state_dict(sched.state_dict())
    fresh.load_state_dict(saved)
    for p, q in zip(model.parameters(), clone.parameters()):
        assert same_state(opt.state[p], fresh.state[q])
        assert int(fresh.state[q]["step"]) == 4
    assert fresh.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    train(model, opt, data[4:], sched)
    train(clone, fresh, data[4:], fresh_sched)
    for p, q in zip(model.parameters(), clone.parameters()):
        assert p.dtype == dtype and torch.equal(p, q)
        assert same_state(opt.state[p], fresh.state[q])
    assert not torch.equal(ps[0].detach(), start[0].weight.detach()), "the model trained"


# --------------------------------------------------------------------------------------------------------------
# to torch.optim.SGD / RMSprop


TO_TORCH = {
    "sgd": (lowbit_fn.SGD, torch.optim.SGD, dict(lr=0.05, momentum=0.9)),
    "sgd_nesterov_wd": (lowbit_fn.SGD, torch.optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.05)),
    "rmsprop": (lowbit_fn.RMSprop, torch.optim.RMSprop, dict(lr=1e-3)),
    "rmsprop_centered_momentum": (lowbit_fn.RMSprop, torch.optim.RMSprop, dict(lr=1e-3, momentum=0.9, centered=True)),
}


@pytest.mark.parametrize("case", sorted(TO_TORCH))
def test_to_torch_state_dict_continues_in_torch_as_in_lowbit_fn(case):
    ours_cls, torch_cls, kw = TO_TORCH[case]
    model = mlp(torch.float64)
    opt = ours_cls(model.parameters(), **kw)
    data = batches(10, torch.float64)
    train(model, opt, data[:5])
    reference = copy.deepcopy(model)
    theirs = torch_cls(reference.parameters(), **kw)
    theirs.load_state_dict(checkpoint_roundtrip(lowbit_fn.to_torch_state_dict(opt)))
    for p, q in zip(model.parameters(), reference.parameters()):
        mine, loaded = opt.state[p], theirs.state[q]
        expected = as_torch(mine)
        names = [k for k in expected if k != "step"]
        assert names and sorted(names) == sorted(k for k in loaded if k != "step")
        assert all(loaded[k].dtype == torch.float64 and torch.equal(loaded[k], expected[k]) for k in names)
        if "step" in loaded:  # RMSprop keeps a step count, SGD none
            assert float(loaded["step"]) == 5.0
    for key in ("lr", "momentum", "weight_decay"):
        assert theirs.param_groups[0][key] == opt.param_groups[0][key]
    train(model, opt, data[5:])
    train(reference, theirs, data[5:])
    assert max_rel(model, reference) < 1e-10


@pytest.mark.parametrize("cls", [lowbit_fn.SGD8bit, lowbit_fn.SGD4bit, lowbit_fn.SGDFp8, lowbit_fn.RMSprop8bit,
                                 lowbit_fn.RMSprop4bit, lowbit_fn.RMSpropFp8], ids=lambda c: c.__name__)
def test_low_bit_to_torch_state_dict_holds_the_dequantized_moments(cls, eager):
    model = mlp()
    opt = make(cls, model)
    train(model, opt, batches(4))
    torch_cls = torch.optim.SGD if FAMILY_OF[cls] == "SGD" else torch.optim.RMSprop
    kw = FAMILIES[FAMILY_OF[cls]][1]
    theirs = torch_cls(model.parameters(), **kw)
    theirs.load_state_dict(checkpoint_roundtrip(lowbit_fn.to_torch_state_dict(opt)))
    for p in model.parameters():
        stored = moments_of(opt, p)
        assert sorted(stored) == sorted(MOMENTS[FAMILY_OF[cls]])
        for name, value in as_torch(stored).items():
            assert theirs.state[p][name].dtype == torch.float32 and torch.equal(theirs.state[p][name], value)
    before = [p.detach().clone() for p in model.parameters()]
    train(model, theirs, batches(2, seed=1))  # torch trains on
    assert all(torch.isfinite(p).all() and not torch.equal(p, b) for p, b in zip(model.parameters(), before))


# --------------------------------------------------------------------------------------------------------------
# from torch.optim.SGD / RMSprop


FROM_TORCH = {  # torch's class and arguments; the arguments of ours that the checkpoint does not set (centered is
    # the state's structure, like amsgrad: it stays the loading optimizer's; lr, momentum, ... come from the groups)
    "SGD": (torch.optim.SGD, dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=0.05), {}),
    "RMSprop": (torch.optim.RMSprop, dict(lr=1e-3, momentum=0.5, centered=True, weight_decay=0.05), dict(centered=True)),
}


@pytest.mark.parametrize("family", sorted(FROM_TORCH))
def test_torch_checkpoint_loads_into_the_fp32_class_exactly(family):
    torch_cls, kw, structure = FROM_TORCH[family]
    model = mlp(torch.float64)
    theirs = torch_cls(model.parameters(), **kw)
    data = batches(10, torch.float64)
    train(model, theirs, data[:5])
    clone = copy.deepcopy(model)
    ours = BY_FORMAT[family, "fp32"](clone.parameters(), lr=0.5, **structure)  # lr and the rest: the checkpoint's
    ours.load_state_dict(checkpoint_roundtrip(theirs.state_dict()))
    assert ours.param_groups[0]["lr"] == kw["lr"] and ours.param_groups[0]["momentum"] == kw["momentum"]
    for p, q in zip(model.parameters(), clone.parameters()):
        want = from_torch(theirs.state[p])
        got = moments_of(ours, q)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
        # torch's SGD keeps no step count: its buffer is past the first update, which is what step 1 says
        assert int(ours.state[q]["step"]) == (5 if family == "RMSprop" else 1)
    train(model, theirs, data[5:])
    train(clone, ours, data[5:])
    assert max_rel(clone, model) < 1e-10


@pytest.mark.parametrize("state_format", ["8bit", "4bit", "fp8"])
@pytest.mark.parametrize("family", sorted(FROM_TORCH))
def test_torch_checkpoint_converts_into_the_low_bit_classes(family, state_format, eager):
    torch_cls, kw, structure = FROM_TORCH[family]
    model = mlp()
    theirs = torch_cls(model.parameters(), **kw)
    train(model, theirs, batches(5))
    cls = BY_FORMAT[family, state_format]
    ours = cls(copy.deepcopy(model).parameters(), min_quant_size=1024, **structure)
    ours.load_state_dict(checkpoint_roundtrip(theirs.state_dict()))
    step = 5 if family == "RMSprop" else 1
    for p, q in zip(model.parameters(), ours.param_groups[0]["params"]):
        got, theirs_as_ours = moments_of(ours, q), from_torch(theirs.state[p])
        assert sorted(got) == sorted(MOMENTS[family])
        for name, value in got.items():
            want = theirs_as_ours[name]
            if p.numel() < 1024 or p.dim() < 2:  # float32 state: exactly torch's
                assert torch.equal(value, want)
                continue
            entry = ours.state[q]
            stochastic, signed = entry["rounding"] == "stochastic", name not in UNSIGNED
            source = want.sqrt() if stochastic and not signed else want
            codes, scale = lowbit_fn.quantize(source, state_format, signed=signed,
                                              rounding="stochastic" if stochastic else "nearest", step=step)
            assert torch.equal(entry[f"{name}_codes"], codes) and torch.equal(entry[f"{name}_scale"], scale), name
            # (bounds: 4-bit's largest map gap 0.225 of a block's max, rounded stochastically; 8-bit/FP8 well below;
            # FP8 stochastic in sqrt(v): up to one e4m3 step (1/8 of the root) away, so 2/8 of v once squared)
            bound = 0.23 if state_format == "4bit" else (0.25 if stochastic and state_format == "fp8" else 0.05)
            assert max_rel([value], [want]) < bound
    train(copy.deepcopy(model), ours, batches(1))  # and trains on (its params are the clone's)


def test_torch_sgd_without_momentum_checkpoint_has_no_state_to_load(eager):
    model = mlp()
    theirs = torch.optim.SGD(model.parameters(), lr=0.1)
    train(model, theirs, batches(2))
    ours = lowbit_fn.SGD8bit(copy.deepcopy(model).parameters(), lr=0.5, momentum=0.9)
    ours.load_state_dict(theirs.state_dict())
    assert ours.param_groups[0]["momentum"] == 0 and ours.param_groups[0]["lr"] == 0.1 and len(ours.state) == 0
    p = ours.param_groups[0]["params"][0]
    p.grad = torch.ones_like(p)
    ours.step()
    assert set(ours.state[p]) == {"step"}, "momentum 0 from the checkpoint: no buffer"


# --------------------------------------------------------------------------------------------------------------
# second moments saved as 0 (before the unsigned maps lost their zero)


@pytest.mark.parametrize("cls", [lowbit_fn.AdamWFp8, lowbit_fn.RMSpropFp8, lowbit_fn.AdEMAMixFp8, lowbit_fn.AdamW8bit,
                                 lowbit_fn.RMSprop8bit], ids=lambda c: c.__name__)
def test_second_moments_saved_as_zero_load_as_todays_codes(cls, eager):
    """A checkpoint whose second-moment codes hold 0 in blocks with a positive scale, as the encoders wrote them
    before the floor: FP8 loads each such 0 as the floor's code 1 (what today's encoder writes for the value it
    decoded to), every other code and scale as saved; 8-bit codes load as saved (code 0 now reads 1e-7 of the
    scale, and today's encoder writes code 0 for an old 0)."""
    torch.manual_seed(0)
    model = mlp()
    kw = dict(FAMILIES[FAMILY_OF[cls]][1]) if cls in FAMILY_OF else {"lr": 1e-3}  # AdamW: not in FAMILIES

    def build(m):
        return cls(m.parameters(), min_quant_size=1024, **kw)

    opt = build(model)
    train(model, opt, batches(2))
    saved = checkpoint_roundtrip(opt.state_dict())
    old, zeroed = copy.deepcopy(saved), {}
    for i, entry in old["state"].items():
        for name in UNSIGNED:
            if f"{name}_codes" in entry:
                codes = entry[f"{name}_codes"]
                flat = codes.view(-1)
                flat[::5] = 0  # as the old encoder stored the smallest values (all blocks here have positive scales)
                assert bool((entry[f"{name}_scale"] > 0).all())
                zeroed[i, name] = codes.clone()
    assert zeroed
    clone = copy.deepcopy(model)
    fresh = build(clone)
    fresh.load_state_dict(old)
    loaded = fresh.state_dict()
    for (i, name), codes in zeroed.items():
        got = loaded["state"][i][f"{name}_codes"]
        if cls._state_format == "fp8":
            assert torch.equal(got, torch.where(codes == 0, 1, codes).to(torch.uint8))
        else:
            assert torch.equal(got, codes)
        assert torch.equal(loaded["state"][i][f"{name}_scale"], saved["state"][i][f"{name}_scale"])
    for i, entry in saved["state"].items():  # everything else as saved
        for key, value in entry.items():
            if not (key.endswith("_codes") and (i, key[: -len("_codes")]) in zeroed):
                assert torch.equal(torch.as_tensor(loaded["state"][i][key]), torch.as_tensor(value)), (i, key)
    train(clone, fresh, batches(2))
    assert all(bool(torch.isfinite(p).all()) for p in clone.parameters())


# --------------------------------------------------------------------------------------------------------------
# between formats


@pytest.mark.parametrize("source,target", [("8bit", "4bit"), ("4bit", "fp8"), ("fp8", "fp32"), ("fp32", "8bit")])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_checkpoints_convert_between_formats(family, source, target, eager):
    model = mlp()
    opt = make(BY_FORMAT[family, source], model)
    train(model, opt, batches(4))
    clone = copy.deepcopy(model)
    converted = make(BY_FORMAT[family, target], clone)
    converted.load_state_dict(checkpoint_roundtrip(opt.state_dict()))
    for p, q in zip(model.parameters(), clone.parameters()):
        want, got, entry = moments_of(opt, p), moments_of(converted, q), converted.state[q]
        assert sorted(got) == sorted(want) == sorted(MOMENTS[family])
        assert int(entry["step"]) == 4
        for name in want:
            if "state_format" not in entry:  # full precision (fp32 target; small params always)
                assert torch.equal(got[name], want[name].float())
                continue
            assert entry["state_format"] == target
            stochastic, signed = entry["rounding"] == "stochastic", name not in UNSIGNED
            value = want[name].float()
            codes, scale = lowbit_fn.quantize(value.sqrt() if stochastic and not signed else value, target, signed=signed,
                                              rounding="stochastic" if stochastic else "nearest", step=4)
            assert torch.equal(entry[f"{name}_codes"], codes) and torch.equal(entry[f"{name}_scale"], scale), name
    train(clone, converted, batches(1))  # trains on in its own format
    assert int(converted.state[list(clone.parameters())[0]]["step"]) == 5


# --------------------------------------------------------------------------------------------------------------
# checkpoints that do not fit


def foreign_checkpoints():
    """Checkpoints of 8-bit optimizers of every family (and AdamW) after 2 steps on the MLP."""
    out = {}
    for name, make_opt in {
        "SGD": lambda m: make(lowbit_fn.SGD8bit, m), "RMSprop": lambda m: make(lowbit_fn.RMSprop8bit, m),
        "RMSprop_plain": lambda m: lowbit_fn.RMSprop8bit(m.parameters(), min_quant_size=1024),
        "Lion": lambda m: make(lowbit_fn.Lion8bit, m), "AdEMAMix": lambda m: make(lowbit_fn.AdEMAMix8bit, m),
        "AdamW": lambda m: lowbit_fn.AdamW8bit(m.parameters(), min_quant_size=1024),
        "torch_Adam": lambda m: torch.optim.Adam(m.parameters()),
        "torch_RMSprop": lambda m: torch.optim.RMSprop(m.parameters()),
    }.items():
        model = mlp()
        opt = make_opt(model)
        train(model, opt, batches(2))
        out[name] = checkpoint_roundtrip(opt.state_dict())
    return out


@pytest.fixture(scope="module")
def checkpoints():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LOWBIT_FN_COMPILE", "0")
        return foreign_checkpoints()


FOREIGN = {  # target family -> the checkpoints of other optimizers it must refuse
    "SGD": ["RMSprop", "RMSprop_plain", "Lion", "AdEMAMix", "AdamW", "torch_Adam", "torch_RMSprop"],
    "RMSprop": ["SGD", "Lion", "AdEMAMix", "AdamW", "torch_Adam"],
    "Lion": ["SGD", "RMSprop", "RMSprop_plain", "AdEMAMix", "AdamW", "torch_Adam", "torch_RMSprop"],
    "AdEMAMix": ["SGD", "RMSprop", "Lion", "AdamW", "torch_Adam", "torch_RMSprop"],
}


@pytest.mark.parametrize("family", sorted(FOREIGN))
def test_checkpoint_of_another_optimizer_raises_and_leaves_the_optimizer_unchanged(family, checkpoints, eager):
    model = mlp()
    opt = make(BY_FORMAT[family, "8bit"], model)
    train(model, opt, batches(3, seed=1))
    snap = snapshot_optimizer(opt)
    for source in FOREIGN[family]:
        with pytest.raises(ValueError) as err:
            opt.load_state_dict(copy.deepcopy(checkpoints[source]))
        message = str(err.value)
        assert "checkpoint" in message and ("parameter param_groups[" in message or "param_groups[0] of the checkpoint" in message), (source, message)
        assert same_optimizer(opt, snap), source
    train(model, opt, batches(1, seed=2))  # still trains
    assert int(opt.state[model[0].weight]["step"]) == 4


def test_foreign_checkpoints_name_what_does_not_fit(checkpoints, eager):
    """The messages say what is wrong: moments this optimizer does not keep, ones it needs, betas it has not."""
    cases = [
        (lowbit_fn.Lion8bit, "AdamW", r"holds \['exp_avg_sq'\], which this optimizer does not keep .*another optimizer"),
        (lowbit_fn.SGD8bit, "RMSprop", r"holds \['grad_avg', 'grad_var'\], which this optimizer does not keep"),
        (lowbit_fn.SGD8bit, "torch_RMSprop", r"holds \['square_avg'\], which this optimizer does not keep"),
        (lowbit_fn.SGD8bit, "Lion", r"betas=\(0\.9, 0\.99\), but this optimizer has no betas"),
        (lowbit_fn.RMSprop8bit, "SGD", r"the checkpoint has no 'grad_var' \(nor torch's 'square_avg' and 'grad_avg'\)"),
        (lowbit_fn.AdEMAMix8bit, "AdamW", r"betas must be a tuple of 3"),
        (lowbit_fn.Lion8bit, "AdEMAMix", r"betas must be a pair"),
    ]
    for cls, source, match in cases:
        opt = make(cls, mlp())
        with pytest.raises(ValueError, match=match):
            opt.load_state_dict(copy.deepcopy(checkpoints[source]))


def test_same_family_checkpoints_with_fewer_features_still_load(checkpoints, eager):
    """Not every difference is foreign: a centered RMSprop checkpoint loads into a plain RMSprop (grad_avg dropped,
    as Adam drops amsgrad's max), a momentum-free SGD checkpoint (only step counts) into SGD8bit."""
    plain = lowbit_fn.RMSprop8bit(mlp().parameters(), min_quant_size=1024)
    plain.load_state_dict(copy.deepcopy(checkpoints["RMSprop"]))
    entry = plain.state[plain.param_groups[0]["params"][0]]
    assert "grad_avg_codes" not in entry and "momentum_buffer_codes" in entry  # momentum 0.5 came with the groups
    model = mlp()
    sgd = lowbit_fn.SGD8bit(model.parameters())
    train(model, sgd, batches(2))
    target = make(lowbit_fn.SGD8bit, mlp())
    target.load_state_dict(sgd.state_dict())
    assert target.param_groups[0]["momentum"] == 0 and all(set(e) == {"step"} for e in target.state.values())


@pytest.mark.parametrize("cls", [lowbit_fn.SGD8bit, lowbit_fn.RMSprop4bit, lowbit_fn.LionFp8, lowbit_fn.AdEMAMix],
                         ids=lambda c: c.__name__)
def test_checkpoint_of_other_shapes_raises_and_leaves_the_optimizer_unchanged(cls, eager):
    other = mlp(width=64)
    source = make(cls, other)
    train(other, source, batches(2))
    saved = checkpoint_roundtrip(source.state_dict())
    model = mlp()
    opt = make(cls, model)
    train(model, opt, batches(2, seed=1))
    snap = snapshot_optimizer(opt)
    with pytest.raises(ValueError, match=r"parameter param_groups\[0\]\['params'\]\[0\] of shape \[96, 48\]"):
        opt.load_state_dict(saved)
    assert same_optimizer(opt, snap)
    train(model, opt, batches(1, seed=2))
    assert int(opt.state[model[0].weight]["step"]) == 3
