"""The torch.optim front end against torch.optim.Adam/AdamW: trajectories, torch.optim behaviours, checkpoints."""

import copy
import io

import pytest
import torch
from torch import nn

import lowbit_fn
from helpers import batches, mlp
from test_equivalence import TRAJECTORY_BUDGET

LOWBIT = [lowbit_fn.Adam8bit, lowbit_fn.AdamW8bit, lowbit_fn.Adam4bit, lowbit_fn.AdamW4bit, lowbit_fn.AdamFp8, lowbit_fn.AdamWFp8]
CLASSES = LOWBIT + [lowbit_fn.AdamW]
FORMAT_OF = {cls: cls._state_format for cls in LOWBIT}


def two_groups(model, **second):
    ps = list(model.parameters())
    return [{"params": ps[:2], "lr": 3e-3}, {"params": ps[2:], **second}]


def train(model, opt, data, sched=None, hook=None):
    for x, y in data:
        opt.zero_grad()
        ((model(x).float() - y.float()) ** 2).mean().backward()
        if hook is not None:
            hook(model)
        opt.step()
        if sched is not None:
            sched.step()


def rel(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def max_rel(m1, m2):
    return max(rel(a.detach(), b.detach()) for a, b in zip(m1.parameters(), m2.parameters()))


SCHEDULERS = {
    "cosine": lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=20),
    "onecycle": lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=1e-2, total_steps=25),
    "lambda": lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: 0.9**s),
}


@pytest.mark.parametrize("scheduler", sorted(SCHEDULERS))
@pytest.mark.parametrize("amsgrad", [False, True])
def test_adamw_matches_torch_in_float64_with_scheduler_and_two_groups(scheduler, amsgrad):
    model = mlp(torch.float64)
    reference = copy.deepcopy(model)
    ours = lowbit_fn.AdamW(two_groups(model, weight_decay=0.1), lr=1e-2, weight_decay=0.01, amsgrad=amsgrad)
    theirs = torch.optim.AdamW(two_groups(reference, weight_decay=0.1), lr=1e-2, weight_decay=0.01, amsgrad=amsgrad)
    data = batches(20, torch.float64)
    train(model, ours, data, SCHEDULERS[scheduler](ours))
    train(reference, theirs, data, SCHEDULERS[scheduler](theirs))
    assert max_rel(model, reference) < 1e-12
    assert ours.param_groups[0]["lr"] == theirs.param_groups[0]["lr"]
    assert ours.param_groups[1]["betas"] == theirs.param_groups[1]["betas"]  # OneCycleLR cycles beta1


def test_adam_factory_matches_torch_adam_l2_in_float64():
    model = mlp(torch.float64)
    reference = copy.deepcopy(model)
    ours = lowbit_fn.as_torch_optimizer(lowbit_fn.adam, model.parameters(), learning_rate=1e-2, weight_decay=0.1, state_format="fp32")
    theirs = torch.optim.Adam(reference.parameters(), lr=1e-2, weight_decay=0.1)
    data = batches(20, torch.float64)
    train(model, ours, data)
    train(reference, theirs, data)
    assert max_rel(model, reference) < 1e-12


def test_adamw_float32_close_to_torch():
    model = mlp()
    reference = copy.deepcopy(model)
    data = batches(20)
    train(model, lowbit_fn.AdamW(model.parameters(), lr=1e-3), data)
    train(reference, torch.optim.AdamW(reference.parameters(), lr=1e-3), data)
    for a, b in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cls", LOWBIT, ids=lambda c: c.__name__)
def test_lowbit_classes_track_fp32_adamw(cls):
    model = mlp()
    start = copy.deepcopy(model)
    reference = copy.deepcopy(model)
    data = batches(20)
    fp32 = torch.optim.AdamW if cls.__name__.startswith("AdamW") else torch.optim.Adam
    train(reference, fp32(reference.parameters(), lr=1e-3, weight_decay=0.01), data)
    opt = cls(model.parameters(), lr=1e-3, weight_decay=0.01, min_quant_size=0)
    train(model, opt, data)
    assert opt.state[model[0].weight]["state_format"] == FORMAT_OF[cls]
    for p, ref, p0 in zip(model.parameters(), reference.parameters(), start.parameters()):
        deviation = (p - ref).detach().norm() / (ref - p0).detach().norm()
        assert float(deviation) < TRAJECTORY_BUDGET[FORMAT_OF[cls]]


def test_adam_classes_use_l2_and_adamw_classes_decouple():
    """With a zero gradient, Adam's L2 decay goes through the moments (a step of ~lr), AdamW's is lr*wd*p."""
    for cls, expected in ((lowbit_fn.Adam8bit, 0.1), (lowbit_fn.AdamW8bit, 0.1 * 0.5 * 2.0)):
        p = nn.Parameter(torch.full((64,), 2.0))
        opt = cls([p], lr=0.1, weight_decay=0.5)
        p.grad = torch.zeros_like(p)
        opt.step()
        assert torch.allclose(2.0 - p.detach(), torch.full((64,), expected), rtol=1e-4), cls.__name__


# --------------------------------------------------------------------------------------------------------------
# checkpoints


def checkpoint_roundtrip(state_dict):
    buf = io.BytesIO()
    torch.save(state_dict, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True, map_location="cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_save_load_resume_is_bit_exact(cls, dtype):
    model = mlp(dtype)
    kw = {"bf16_stochastic_round": dtype == torch.bfloat16}
    if cls is not lowbit_fn.AdamW:
        kw["min_quant_size"] = 1024
    opt = cls(two_groups(model), lr=1e-3, **kw)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
    data = batches(7, dtype)
    train(model, opt, data[:4], sched)
    saved = checkpoint_roundtrip(opt.state_dict())
    clone = copy.deepcopy(model)
    fresh = cls(two_groups(clone), lr=1e-3, **kw)
    fresh_sched = torch.optim.lr_scheduler.CosineAnnealingLR(fresh, T_max=10)
    fresh_sched.load_state_dict(sched.state_dict())
    fresh.load_state_dict(saved)
    for p, q in zip(model.parameters(), clone.parameters()):
        a, b = opt.state[p], fresh.state[q]
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a)
    train(model, opt, data[4:], sched)
    train(clone, fresh, data[4:], fresh_sched)
    for p, q in zip(model.parameters(), clone.parameters()):
        assert p.dtype == dtype and torch.equal(p, q)


def test_state_dict_layout_and_metadata():
    model = mlp()
    opt = lowbit_fn.AdamW4bit(model.parameters(), min_quant_size=1000, amsgrad=True)
    train(model, opt, batches(2))
    sd = opt.state_dict()
    assert sorted(sd) == ["param_groups", "state"] and sorted(sd["state"]) == list(range(6))
    big = sd["state"][2]  # the 96x96 weight: quantized
    ids = lowbit_fn.torch_optim
    assert big["state_format"] == ids.STATE_FORMAT_IDS["4bit"] and big["rounding"] == ids.ROUNDING_IDS["stochastic"]
    assert big["block_size"] == 128 and int(big["step"]) == 2
    assert not any(isinstance(v, str) for e in sd["state"].values() for v in e.values()), "numbers and tensors only"
    assert big["exp_avg_codes"].dtype == torch.uint8 and big["exp_avg_codes"].shape == (96, 48)
    assert big["max_exp_avg_sq_scale"].shape == (96, 1), "one block per row of 96"
    small = sd["state"][1]  # the 96-element bias: float32, exactly torch's keys
    assert sorted(small) == ["exp_avg", "exp_avg_sq", "max_exp_avg_sq", "step"]
    assert small["exp_avg"].shape == (96,) and small["exp_avg"].dtype == torch.float32
    assert sd["param_groups"][0]["state_format"] == "4bit" and sd["param_groups"][0]["betas"] == (0.9, 0.999)


def test_load_keeps_the_codes_exact_after_a_bf16_model():
    """torch's own load_state_dict would cast the uint8 codes and the float32 moments to the params' bfloat16."""
    model = mlp(torch.bfloat16)
    opt = lowbit_fn.AdamW8bit(model.parameters(), min_quant_size=0)
    train(model, opt, batches(3, torch.bfloat16))
    fresh = lowbit_fn.AdamW8bit(copy.deepcopy(model).parameters(), min_quant_size=0)
    fresh.load_state_dict(checkpoint_roundtrip(opt.state_dict()))
    for p, entry in fresh.state.items():
        if p.dim() < 2:  # 1-D parameters keep float32 moments, which torch would have cast to bfloat16
            assert entry["exp_avg"].dtype == torch.float32
            continue
        assert entry["exp_avg_codes"].dtype == torch.uint8 and entry["exp_avg_scale"].dtype == torch.float32


def test_torch_checkpoint_to_8bit_and_back_to_torch():
    model = mlp()
    reference = torch.optim.AdamW(model.parameters(), lr=1e-3)
    train(model, reference, batches(5))
    saved = checkpoint_roundtrip(reference.state_dict())
    opt = lowbit_fn.AdamW8bit(model.parameters(), min_quant_size=0)
    opt.load_state_dict(saved)
    back = torch.optim.AdamW(model.parameters(), lr=1e-3)
    back.load_state_dict(checkpoint_roundtrip(lowbit_fn.to_torch_state_dict(opt)))
    for p in model.parameters():
        want, got = reference.state[p], back.state[p]
        assert float(got["step"]) == float(want["step"]) == 5.0
        for name, signed in (("exp_avg", True), ("exp_avg_sq", False)):
            if p.dim() < 2:  # 1-D parameters keep float32 state
                assert torch.equal(got[name], want[name])
                continue
            codes, scale = lowbit_fn.quantize(want[name], "8bit", signed=signed)
            bound = lowbit_fn.dequantize(codes, scale, "8bit", signed=signed, shape=p.shape)
            assert torch.equal(got[name], bound)  # exactly the 8-bit round trip of torch's moments
            assert rel(got[name], want[name]) < 0.05
    assert back.param_groups[0]["decoupled_weight_decay"] is True
    # and the resumed torch optimizer trains on
    train(model, back, batches(2))


@pytest.mark.parametrize("source,target", [("8bit", "4bit"), ("4bit", "fp8"), ("fp8", "8bit"), ("8bit", "fp32"), ("fp32", "4bit")])
def test_checkpoints_convert_between_formats(source, target):
    cls_of = {"8bit": lowbit_fn.AdamW8bit, "4bit": lowbit_fn.AdamW4bit, "fp8": lowbit_fn.AdamWFp8}
    make = lambda fmt, m: (cls_of[fmt](m.parameters(), min_quant_size=0) if fmt != "fp32" else lowbit_fn.AdamW(m.parameters()))  # noqa: E731
    model = mlp()
    opt = make(source, model)
    train(model, opt, batches(4))
    expected = lowbit_fn.to_torch_state_dict(opt)["state"]
    converted = make(target, copy.deepcopy(model))
    converted.load_state_dict(checkpoint_roundtrip(opt.state_dict()))
    got = lowbit_fn.to_torch_state_dict(converted)["state"]
    shapes = [p.shape for p in model.parameters()]
    for index, want in expected.items():
        for name, signed in (("exp_avg", True), ("exp_avg_sq", False)):
            if target == "fp32" or len(shapes[index]) < 2:  # full precision (1-D parameters always)
                assert torch.equal(got[index][name], want[name])
            else:  # the target's own scheme: 4-bit rounds stochastically and keeps sqrt(v)
                stochastic = target == "4bit"
                value = want[name] if signed or not stochastic else want[name].sqrt()
                codes, scale = lowbit_fn.quantize(value, target, signed=signed, rounding="stochastic" if stochastic else "nearest", step=4)
                back = lowbit_fn.dequantize(codes, scale, target, signed=signed, shape=value.shape)
                assert torch.equal(got[index][name], back if signed or not stochastic else back * back)
        assert int(got[index]["step"]) == 4
    train(model, converted, batches(1))  # trains on in its own format


def snapshot_optimizer(opt):
    state = {id(p): {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in s.items()} for p, s in opt.state.items()}
    return state, copy.deepcopy([{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups])


def same_optimizer(opt, snap):
    state, groups = snap
    now = {id(p): s for p, s in opt.state.items()}
    if now.keys() != state.keys():
        return False
    for pid, entry in state.items():
        cur = now[pid]
        if cur.keys() != entry.keys():
            return False
        for k, v in entry.items():
            if isinstance(v, torch.Tensor) and not torch.equal(cur[k], v) or not isinstance(v, torch.Tensor) and cur[k] != v:
                return False
    return groups == [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]


def corrupt(sd, what):
    sd = copy.deepcopy(sd)
    entry = sd["state"][2]
    if what == "groups":
        sd["param_groups"].append(dict(sd["param_groups"][0], params=[]))
    elif what == "params":
        sd["param_groups"][0]["params"] = sd["param_groups"][0]["params"][:-1]
    elif what == "shape":
        entry["exp_avg_codes"] = entry["exp_avg_codes"][:-256]
    elif what == "missing":
        del entry["exp_avg_sq_scale"]
        del entry["exp_avg_sq_codes"]
    elif what == "codes_dtype":
        entry["exp_avg_codes"] = entry["exp_avg_codes"].float()
    elif what == "scale":
        entry["exp_avg_sq_scale"][0] = -1.0
    elif what == "fp32_shape":
        sd["state"][1]["exp_avg"] = torch.zeros(5)
    elif what == "step":
        entry["step"] = torch.tensor(-3.0)
    elif what == "format":
        entry["state_format"] = "3bit"
    return sd


@pytest.mark.parametrize("what", ["groups", "params", "shape", "missing", "codes_dtype", "scale", "fp32_shape", "step", "format"])
def test_bad_checkpoint_raises_and_leaves_optimizer_unchanged(what):
    model = mlp()
    opt = lowbit_fn.AdamW8bit(model.parameters(), min_quant_size=1000)
    train(model, opt, batches(2))
    good = opt.state_dict()
    other = lowbit_fn.AdamW8bit(copy.deepcopy(model).parameters(), min_quant_size=1000)
    train(model, opt, batches(1, seed=1))
    snap = snapshot_optimizer(opt)
    with pytest.raises(ValueError) as err:
        opt.load_state_dict(corrupt(good, what))
    if what not in ("groups", "params"):
        assert "parameter" in str(err.value) and "shape [" in str(err.value)
    assert same_optimizer(opt, snap)
    other.load_state_dict(good)  # the uncorrupted checkpoint loads
    train(model, opt, batches(1, seed=2))  # and the optimizer still trains


def test_checkpoint_error_names_named_parameters():
    model = mlp()
    opt = lowbit_fn.AdamW8bit(model.named_parameters(), min_quant_size=1000)
    train(model, opt, batches(1))
    with pytest.raises(ValueError, match="'2.weight'"):
        opt.load_state_dict(corrupt(opt.state_dict(), "shape"))


# --------------------------------------------------------------------------------------------------------------
# torch.optim behaviours, each against torch.optim.AdamW


def both(dtype=torch.float64, **kw):
    model = mlp(dtype)
    reference = copy.deepcopy(model)
    return model, lowbit_fn.AdamW(model.parameters(), **kw), reference, torch.optim.AdamW(reference.parameters(), **kw)


def test_closure_returns_loss_and_params_without_grad_are_skipped():
    model, ours, reference, theirs = both(lr=1e-2)
    x, y = batches(1, torch.float64)[0]
    for m, opt in ((model, ours), (reference, theirs)):
        for step in range(4):
            def closure():
                opt.zero_grad()
                loss = ((m(x) - y) ** 2).mean()
                loss.backward()
                if step % 2:
                    m[2].weight.grad = None  # skipped on odd steps
                seen.append(loss)
                return loss
            seen = []
            assert opt.step(closure) is seen[0]
    assert max_rel(model, reference) < 1e-12
    assert int(ours.state[model[2].weight]["step"]) == int(theirs.state[reference[2].weight]["step"]) == 2
    assert int(ours.state[model[0].weight]["step"]) == 4


def test_requires_grad_false_and_tied_weights():
    model = nn.Sequential(nn.Embedding(50, 16), nn.Linear(16, 16), nn.Linear(16, 50)).double()
    model[2].weight = model[0].weight  # tied: listed once by parameters()
    model[1].bias.requires_grad_(False)
    reference = copy.deepcopy(model)
    ours = lowbit_fn.AdamW(model.parameters(), lr=1e-2)
    theirs = torch.optim.AdamW(reference.parameters(), lr=1e-2)
    tokens = torch.randint(0, 50, (8, 4))
    for m, opt in ((model, ours), (reference, theirs)):
        for _ in range(5):
            opt.zero_grad()
            m(tokens).logsumexp(-1).mean().backward()
            opt.step()
    assert len(list(model.parameters())) == 4
    assert max_rel(model, reference) < 1e-12
    assert model[1].bias not in ours.state


def test_lr_set_by_hand_add_param_group_and_clip_grad_norm():
    model, ours, reference, theirs = both(lr=1e-2)
    extra = nn.Parameter(torch.randn(7, dtype=torch.float64))
    extra_ref = nn.Parameter(extra.detach().clone())
    data = batches(6, torch.float64)
    for i, (x, y) in enumerate(data):
        for m, opt, e in ((model, ours, extra), (reference, theirs, extra_ref)):
            if i == 2:
                opt.param_groups[0]["lr"] = 3e-3
                opt.param_groups[0]["weight_decay"] = 0.2
                opt.param_groups[0]["eps"] = 1e-3
                opt.add_param_group({"params": [e], "lr": 1e-1, "weight_decay": 0.0})
            opt.zero_grad()
            (((m(x) - y) ** 2).mean() + (e**2).sum()).backward()
            torch.nn.utils.clip_grad_norm_(list(m.parameters()) + [e], max_norm=0.5)
            opt.step()
    assert max_rel(model, reference) < 1e-12 and rel(extra.detach(), extra_ref.detach()) < 1e-12
    assert len(ours.param_groups) == 2 and ours.param_groups[1]["betas"] == (0.9, 0.999)
    assert isinstance(ours, torch.optim.Optimizer)


def test_hooks_run():
    model = mlp()
    opt = lowbit_fn.AdamW8bit(model.parameters())
    calls = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append("pre"))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append("post"))
    opt.register_state_dict_pre_hook(lambda o: calls.append("sd_pre"))
    opt.register_state_dict_post_hook(lambda o, sd: calls.append("sd_post"))
    opt.register_load_state_dict_pre_hook(lambda o, sd: calls.append("load_pre"))
    opt.register_load_state_dict_post_hook(lambda o: calls.append("load_post"))
    train(model, opt, batches(1))
    opt.load_state_dict(opt.state_dict())
    assert calls == ["pre", "post", "sd_pre", "sd_post", "load_pre", "load_post"]


def test_load_state_dict_pre_hook_can_rewrite_the_checkpoint():
    model = mlp()
    opt = lowbit_fn.AdamW8bit(model.parameters())
    train(model, opt, batches(1))
    sd = opt.state_dict()
    sd["param_groups"][0]["lr"] = 123.0
    opt.register_load_state_dict_pre_hook(lambda o, s: {**s, "param_groups": [dict(s["param_groups"][0], lr=0.5)]})
    opt.load_state_dict(sd)
    assert opt.param_groups[0]["lr"] == 0.5


def test_grad_scaler_skips_steps_with_inf_grads():
    model, ours, reference, theirs = both(torch.float32, lr=1e-2)
    data = batches(4)
    for m, opt in ((model, ours), (reference, theirs)):
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        for i, (x, y) in enumerate(data):
            opt.zero_grad()
            scaler.scale(((m(x) - y) ** 2).mean()).backward()
            if i == 1:
                m[0].weight.grad[0, 0] = float("inf")
            scaler.step(opt)
            scaler.update()
    assert int(ours.state[model[0].weight]["step"]) == 3
    for a, b in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_changing_lr_and_betas_never_recompiles():
    from torch._dynamo.utils import counters

    model = mlp()
    opt = lowbit_fn.AdamW8bit(model.parameters(), min_quant_size=1000)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=10)
    train(model, opt, batches(2), sched)
    before = sum(counters["stats"].values()), dict(counters["inductor"])
    opt.param_groups[0]["eps"] = 1e-6
    opt.param_groups[0]["weight_decay"] = 0.3
    train(model, opt, batches(5), sched)
    assert opt.param_groups[0]["betas"][0] != 0.95  # OneCycleLR moved beta1
    assert (sum(counters["stats"].values()), dict(counters["inductor"])) == before


def test_state_format_per_group_and_changed_between_steps():
    model = mlp()
    ps = list(model.parameters())
    opt = lowbit_fn.as_torch_optimizer(
        lowbit_fn.adamw, [{"params": ps[:2], "state_format": "fp32"}, {"params": ps[2:]}], state_format="4bit", min_quant_size=0
    )
    train(model, opt, batches(2))
    assert "exp_avg" in opt.state[ps[0]] and opt.state[ps[2]]["state_format"] == "4bit"
    before = lowbit_fn.to_torch_state_dict(opt)["state"][2]["exp_avg"]
    opt.param_groups[1]["state_format"] = "8bit"
    train(model, opt, batches(1))  # converted to 8-bit, then stepped
    assert opt.state[ps[2]]["state_format"] == "8bit" and int(opt.state[ps[2]]["step"]) == 3
    assert not torch.equal(lowbit_fn.to_torch_state_dict(opt)["state"][2]["exp_avg"], before)


def test_deepcopy_of_the_optimizer_is_independent():
    model = mlp()
    opt = lowbit_fn.AdamW8bit(model.parameters())
    train(model, opt, batches(2))
    twin = copy.deepcopy(opt)
    assert twin.param_groups[0]["state_format"] == "8bit"
    p = twin.param_groups[0]["params"][2]
    assert torch.equal(twin.state[p]["exp_avg_codes"], opt.state[model[2].weight]["exp_avg_codes"])
    p.grad = torch.ones_like(p)
    twin.step()
    assert int(twin.state[p]["step"]) == 3 and int(opt.state[model[2].weight]["step"]) == 2


def test_any_factory_works_for_example_plain_sgd():
    def sgd(learning_rate: float = 0.1):
        return lowbit_fn.scale_by_learning_rate(learning_rate)

    model, _, reference, _ = both()
    ours = lowbit_fn.as_torch_optimizer(sgd, model.parameters(), learning_rate=0.05)
    theirs = torch.optim.SGD(reference.parameters(), lr=0.05)
    sched = [torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5) for o in (ours, theirs)]
    data = batches(5, torch.float64)
    train(model, ours, data, sched[0])
    train(reference, theirs, data, sched[1])
    assert max_rel(model, reference) < 1e-12
    assert ours.state_dict()["param_groups"][0]["lr"] == 0.05 * 0.5**2


# --------------------------------------------------------------------------------------------------------------
# bad input


def test_bad_construction_arguments():
    params = [nn.Parameter(torch.randn(4))]
    with pytest.raises(TypeError, match="learning_rate"):
        lowbit_fn.as_torch_optimizer(lowbit_fn.adamw, params, lr=1e-3)
    with pytest.raises(TypeError, match="bogus"):
        lowbit_fn.as_torch_optimizer(lowbit_fn.adamw, params, bogus=1)
    with pytest.raises(TypeError, match="schedule"):
        lowbit_fn.as_torch_optimizer(lowbit_fn.adamw, params, learning_rate=lambda c: 1e-3)
    with pytest.raises(ValueError, match="lr"):
        lowbit_fn.AdamW8bit(params, lr=-1.0)
    with pytest.raises(ValueError, match="beta"):
        lowbit_fn.AdamW8bit(params, betas=(0.9, 1.5))
    with pytest.raises(ValueError, match="state_format"):
        lowbit_fn.AdamW8bit([{"params": params, "state_format": "3bit"}])
    with pytest.raises(TypeError, match="unsupported dtype"):
        lowbit_fn.AdamW8bit([torch.zeros(3, dtype=torch.complex64, requires_grad=True)])
    opt = lowbit_fn.AdamW8bit(params)
    with pytest.raises(ValueError, match="weight_decay"):
        opt.add_param_group({"params": [nn.Parameter(torch.randn(2))], "weight_decay": -1.0})
    assert len(opt.param_groups) == 1


def test_sparse_grad_raises_and_leaves_everything_unchanged():
    emb = nn.Embedding(100, 8, sparse=True)
    dense = nn.Linear(8, 8)
    opt = lowbit_fn.AdamW8bit(list(dense.parameters()) + list(emb.parameters()), min_quant_size=0)
    for p in dense.parameters():
        p.grad = torch.randn_like(p)
    emb(torch.tensor([1, 2])).sum().backward()
    before = [p.detach().clone() for p in dense.parameters()]
    with pytest.raises(TypeError, match=r"params'\]\[2\].*sparse"):
        opt.step()
    assert len(opt.state) == 0 and all(torch.equal(a, b) for a, b in zip(before, dense.parameters()))


# --------------------------------------------------------------------------------------------------------------
# bfloat16 parameters


def test_bf16_updates_below_half_an_ulp_move_only_with_stochastic_rounding():
    """lr 1e-4 on values near 1 (bfloat16 spacing 2**-7): nearest rounding never moves, SR moves by lr per step."""
    steps, lr = 60, 1e-4
    out = {}
    for sr in (False, True):
        p = nn.Parameter(torch.ones(20000, dtype=torch.bfloat16))
        opt = lowbit_fn.AdamW([p], lr=lr, weight_decay=0.0, bf16_stochastic_round=sr)
        for _ in range(steps):
            p.grad = torch.ones_like(p)
            opt.step()
        out[sr] = p.detach().float()
    assert torch.equal(out[False], torch.ones(20000))
    moved = float(1.0 - out[True].double().mean())
    assert abs(moved - steps * lr) < 0.05 * steps * lr  # Adam's step is ~lr per step for a constant gradient


def test_bf16_math_is_float32():
    """One step on a bf16 param equals the float32 step rounded to nearest once."""
    torch.manual_seed(0)
    p32 = nn.Parameter(torch.randn(300))
    p16 = nn.Parameter(p32.detach().to(torch.bfloat16))
    g = torch.randn(300)
    o32 = lowbit_fn.AdamW([p32], lr=1e-2)
    o16 = lowbit_fn.AdamW([p16], lr=1e-2)
    p32.data = p16.detach().float()
    p32.grad, p16.grad = g.to(torch.bfloat16).float(), g.to(torch.bfloat16)
    o32.step()
    o16.step()
    assert torch.equal(p16.detach(), p32.detach().to(torch.bfloat16))
    assert o16.state[p16]["exp_avg"].dtype == torch.float32


def test_4bit_rounding_schemes_convert_and_old_checkpoints_read_as_nearest():
    model = mlp()
    nearest = lowbit_fn.as_torch_optimizer(lowbit_fn.adamw, model.parameters(), state_format="4bit", rounding="nearest", min_quant_size=0)
    train(model, nearest, batches(3))
    saved = checkpoint_roundtrip(nearest.state_dict())
    # checkpoints hold ids, not strings (torch.distributed.checkpoint's flattening refuses strings)
    assert saved["state"][0]["rounding"] == lowbit_fn.torch_optim.ROUNDING_IDS["nearest"] == 0
    assert saved["state"][0]["state_format"] == lowbit_fn.torch_optim.STATE_FORMAT_IDS["4bit"]
    assert nearest.state[model[0].weight]["rounding"] == "nearest", "the live state keeps the names"
    legacy = copy.deepcopy(saved)  # a checkpoint written before the rounding key existed
    for entry in legacy["state"].values():
        entry.pop("rounding", None)  # (1-D parameters have float32 state, no rounding)
    again = lowbit_fn.as_torch_optimizer(lowbit_fn.adamw, copy.deepcopy(model).parameters(), state_format="4bit", rounding="nearest", min_quant_size=0)
    again.load_state_dict(legacy)
    for i, p in enumerate(again.param_groups[0]["params"]):
        name = "exp_avg_sq_codes" if p.dim() >= 2 else "exp_avg_sq"
        assert torch.equal(again.state[p][name], saved["state"][i][name])  # bit-exact
    sr = lowbit_fn.AdamW4bit(copy.deepcopy(model).parameters(), min_quant_size=0)  # the default: stochastic
    sr.load_state_dict(saved)
    want = lowbit_fn.to_torch_state_dict(nearest)["state"]
    got = lowbit_fn.to_torch_state_dict(sr)["state"]
    for i, p in enumerate(sr.param_groups[0]["params"]):
        if p.dim() < 2:  # 1-D parameters keep float32 state
            assert torch.equal(got[i]["exp_avg_sq"], want[i]["exp_avg_sq"])
            continue
        assert sr.state[p]["rounding"] == "stochastic"
        v = want[i]["exp_avg_sq"]
        codes, scale = lowbit_fn.quantize(v.sqrt(), "4bit", signed=False, rounding="stochastic", step=3)
        back = lowbit_fn.dequantize(codes, scale, "4bit", signed=False, shape=v.shape)
        assert torch.equal(got[i]["exp_avg_sq"], back * back)  # v kept as sqrt(v), stochastically rounded
    train(model, sr, batches(1))


def test_functional_state_of_another_rounding_is_refused_clearly():
    params = {"w": torch.randn(64, 64)}
    state = lowbit_fn.scale_by_adam(state_format="4bit", rounding="nearest", min_quant_size=0).init(params)
    with pytest.raises(ValueError, match="rounding='stochastic'.*4bit_block128"):
        lowbit_fn.scale_by_adam(state_format="4bit", min_quant_size=0).update(params, state, params)
    with pytest.raises(ValueError, match="rounding applies to quantized"):
        lowbit_fn.scale_by_adam(state_format="fp32", rounding="nearest")
