"""Host offload: the functional ``offload`` transform and ``CPUOffloadOptimizer`` against the plain optimizers.

On this CPU-only machine device and host are one; ``copies=True`` makes CPUOffloadOptimizer keep separate host
copies anyway (as it does for accelerator parameters), so its copy, hook, accumulation and refresh paths run.
"""

import copy
import io

import pytest
import torch

import lowbit_fn
import lowbit_fn.cpu_offload as cpu_offload
from helpers import batches, loss_fn, mlp, run_functional


@pytest.fixture(params=[False, True], ids=["in-place", "copies"])
def copies(request, monkeypatch):
    if request.param:
        monkeypatch.setattr(cpu_offload, "_needs_copy", lambda param: True)
    return request.param


def roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def groups(model):
    ps = list(model.parameters())
    return [{"params": ps[:2], "lr": 2e-3}, {"params": ps[2:]}]


def run(model, opt, data, sched, accumulation, clip):
    """Train with ``accumulation`` micro-batches per step and the given clipping ("torch", "opt" or None)."""
    for i in range(0, len(data), accumulation):
        opt.zero_grad()
        for x, y in data[i : i + accumulation]:
            (((model(x) - y) ** 2).mean() / accumulation).backward()
        if clip == "torch":
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
        elif clip == "opt":
            opt.clip_grad_norm_(0.05)
        opt.step()
        sched.step()


CASES = [  # (accumulation, offload_gradients, clip)
    (1, False, None), (2, False, None), (1, True, None), (2, True, None),
    (1, False, "torch"), (2, False, "opt"), (2, True, "opt"),
]


@pytest.mark.parametrize("accumulation,offload_gradients,clip", CASES)
@pytest.mark.parametrize("cls", [torch.optim.AdamW, lowbit_fn.AdamW8bit], ids=lambda c: c.__name__)
def test_offload_optimizer_matches_plain(cls, accumulation, offload_gradients, clip, copies):
    kw = {"lr": 1e-3, "weight_decay": 0.01} | ({"min_quant_size": 1000} if cls is lowbit_fn.AdamW8bit else {})
    model = mlp()
    reference = copy.deepcopy(model)
    opt = lowbit_fn.CPUOffloadOptimizer(groups(model), cls, offload_gradients=offload_gradients, **kw)
    plain = cls(groups(reference), **kw)
    assert isinstance(opt, torch.optim.Optimizer) and len(opt.param_groups) == 2
    assert opt.param_groups[0]["params"][0] is model[0].weight and opt.param_groups[0]["lr"] == 2e-3
    scheds = [torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=8) for o in (opt, plain)]
    data = batches(4 * accumulation)
    run(model, opt, data, scheds[0], accumulation, clip)
    run(reference, plain, data, scheds[1], accumulation, "torch" if clip else None)
    for a, b in zip(model.parameters(), reference.parameters()):
        assert torch.equal(a, b)
    assert opt.param_groups[1]["lr"] == plain.param_groups[1]["lr"]
    host_weight = opt.optimizer.param_groups[0]["params"][0]
    assert opt.state[model[0].weight] is opt.optimizer.state[host_weight]
    assert (host_weight is model[0].weight) != copies and (len(opt._mirrors) == 6) == copies  # no copy on CPU
    # save, load into a fresh offload optimizer on a copy of the model, two more steps on both
    saved = roundtrip(opt.state_dict())
    twin_model = copy.deepcopy(model)
    twin = lowbit_fn.CPUOffloadOptimizer(groups(twin_model), cls, offload_gradients=offload_gradients, **kw)
    twin.load_state_dict(saved)
    assert twin.param_groups[1]["lr"] == opt.param_groups[1]["lr"]
    more = batches(2 * accumulation, seed=5)
    for m, o in ((model, opt), (twin_model, twin)):
        run(m, o, more, torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0), accumulation, clip)
    for a, b in zip(model.parameters(), twin_model.parameters()):
        assert torch.equal(a, b)


def test_plain_optimizer_checkpoint_loads_into_offload_and_back(copies):
    model = mlp()
    plain = lowbit_fn.AdamW8bit(model.parameters(), min_quant_size=1000)
    run(model, plain, batches(2), torch.optim.lr_scheduler.LambdaLR(plain, lambda s: 1.0), 1, None)
    opt = lowbit_fn.CPUOffloadOptimizer(copy.deepcopy(model).parameters(), lowbit_fn.AdamW8bit, min_quant_size=1000)
    opt.load_state_dict(roundtrip(plain.state_dict()))
    back = lowbit_fn.AdamW8bit(model.parameters(), min_quant_size=1000)
    back.load_state_dict(roundtrip(opt.state_dict()))
    for p in model.parameters():
        a, b = plain.state[p], back.state[p]
        assert all(torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a)


def test_weights_loaded_after_construction_are_noticed(copies):
    model = mlp()
    trained = mlp()
    torch.nn.init.normal_(trained[0].weight)
    opt = lowbit_fn.CPUOffloadOptimizer(model.parameters(), torch.optim.AdamW, lr=1e-2)
    model.load_state_dict(trained.state_dict())  # after the optimizer made its host copies
    with torch.no_grad():
        model[2].bias.fill_(0.5)  # an in-place write from outside
    reference = copy.deepcopy(model)
    plain = torch.optim.AdamW(reference.parameters(), lr=1e-2)
    for m, o in ((model, opt), (reference, plain)):
        for x, y in batches(3):
            o.zero_grad()
            ((m(x) - y) ** 2).mean().backward()
            o.step()
    for a, b in zip(model.parameters(), reference.parameters()):
        assert torch.equal(a, b)


def test_offload_gradients_frees_device_grads_and_add_param_group(copies):
    model = mlp()
    extra = torch.nn.Parameter(torch.randn(10))
    opt = lowbit_fn.CPUOffloadOptimizer(model.parameters(), torch.optim.AdamW, offload_gradients=True, lr=1e-2)
    opt.add_param_group({"params": [extra], "lr": 0.1, "weight_decay": 0.0})
    assert opt.param_groups[1]["betas"] == (0.9, 0.999) and opt.optimizer.param_groups[1]["lr"] == 0.1
    x, y = batches(1)[0]
    (((model(x) - y) ** 2).mean() + extra.sum()).backward()
    if copies:
        assert all(p.grad is None for p in model.parameters()) and extra.grad is None
    before = extra.detach().clone()
    opt.step()
    assert torch.allclose(extra.detach(), before - 0.1, atol=1e-5)  # Adam's first step moves by lr


def test_step_with_closure_and_params_without_grad(copies):
    model = mlp()
    reference = copy.deepcopy(model)
    opt = lowbit_fn.CPUOffloadOptimizer(model.parameters(), torch.optim.AdamW, lr=1e-2)
    plain = torch.optim.AdamW(reference.parameters(), lr=1e-2)
    x, y = batches(1)[0]
    for m, o in ((model, opt), (reference, plain)):
        for _ in range(2):
            def closure():
                o.zero_grad()
                loss = ((m[0](x)) ** 2).mean()  # only the first layer gets gradients
                loss.backward()
                return loss
            assert torch.is_tensor(o.step(closure))
    for a, b in zip(model.parameters(), reference.parameters()):
        assert torch.equal(a, b)
    assert model[2].weight not in opt.state


# --------------------------------------------------------------------------------------------------------------
# the functional transform


def test_offload_transform_matches_inner_in_a_func_loop():
    model = mlp()
    start = lowbit_fn.params_from_module(model).clone()
    data = batches(6)
    inner = lambda: lowbit_fn.chain(lowbit_fn.clip_by_global_norm(0.1), lowbit_fn.adamw(1e-3, state_format="8bit", min_quant_size=1000))  # noqa: E731
    plain = lowbit_fn.adamw(1e-3, state_format="8bit", min_quant_size=1000)
    wrapped = lowbit_fn.offload(plain, min_numel=500)
    ref, ref_state = run_functional(model, plain, data[:4], params=start.clone())
    got, state = run_functional(model, wrapped, data[:4], params=start.clone())
    assert sorted(state["host", "0", "layout"].keys()) == ["0", "2"]  # the two weights with >= 500 elements
    for key in ref.keys(include_nested=True, leaves_only=True):
        assert torch.equal(ref[key], got[key])
    # save / load, then two more steps on both
    state = roundtrip(state)
    ref, _ = run_functional(model, plain, data[4:], params=ref, state=ref_state)
    got, _ = run_functional(model, wrapped, data[4:], params=got, state=state)
    for key in ref.keys(include_nested=True, leaves_only=True):
        assert torch.equal(ref[key], got[key])
    # coupled transforms go outside
    outer = lowbit_fn.chain(lowbit_fn.clip_by_global_norm(0.1), lowbit_fn.offload(plain, min_numel=500))
    a, _ = run_functional(model, inner(), data[:2], params=start.clone())
    b, _ = run_functional(model, outer, data[:2], params=start.clone())
    for key in a.keys(include_nested=True, leaves_only=True):
        assert torch.equal(a[key], b[key])


def test_nothing_is_copied_when_already_on_the_host():
    from lowbit_fn.transforms.offload import to_host

    t = torch.randn(5)
    assert to_host([t], torch.device("cpu"), True)[0] is t
    params = {"w": torch.randn(64, 64)}
    grads = {"w": torch.randn(64, 64)}
    opt = lowbit_fn.offload(lowbit_fn.scale_by_adam(state_format="fp32"), min_numel=0)
    state = opt.init(params)
    updates, state = opt.update(grads, state, params)
    assert updates["w"].device == params["w"].device


def test_offload_transform_bad_input():
    params = {"w": torch.randn(64, 64), "b": torch.zeros(64)}
    opt = lowbit_fn.offload(lowbit_fn.adamw(1e-2, state_format="4bit"), min_numel=0)
    state = opt.init(params)
    assert set(state["device", "0", "layout"].keys()) == set()
    with pytest.raises(ValueError, match="'b'"):
        opt.update({"w": torch.randn(64, 64), "b": torch.randn(63)}, state, params)
    with pytest.raises(ValueError, match="offload state"):
        opt.update({"w": torch.randn(64, 64), "b": torch.randn(64)}, state["host"], params)
    assert int(state["host", "0", "count"]) == 0  # nothing was modified by the failed calls
    updates, state = opt.update({"w": torch.randn(64, 64), "b": torch.randn(64)}, state, params)
    assert int(state["host", "0", "count"]) == 1 and updates["w"].shape == (64, 64)
    with pytest.raises(ValueError, match="min_numel"):
        lowbit_fn.offload(lowbit_fn.adamw(), min_numel=-1)
