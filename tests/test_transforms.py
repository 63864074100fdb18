"""Building blocks, state layout, dtypes, donation, bad input, eager == compiled, no recompiles."""


import pytest
import torch
from tensordict import TensorDict

import lowbit_fn
from lowbit_fn._random import tensor_id
from helpers import batches, group_key, mlp, run_functional, same, snapshot

FORMATS = ["fp32", "8bit", "4bit", "fp8"]


def quant_group(state, fmt):
    return state[group_key(fmt)]


# --- building blocks ---------------------------------------------------------------------------------------------

def test_clip_by_global_norm_formula():
    t = lowbit_fn.clip_by_global_norm(1.0)
    u = {"a": torch.tensor([3.0, 0.0]), "b": {"c": torch.tensor([[4.0]])}}
    out, _ = t.update(u, t.init({}))
    assert torch.allclose(out["a"], torch.tensor([0.6, 0.0])) and torch.allclose(out["b", "c"], torch.tensor([[0.8]]))
    small = {"a": torch.tensor([0.3, 0.4])}
    assert torch.equal(t.update(small, t.init({}))[0]["a"], small["a"])
    assert torch.equal(u["a"], torch.tensor([3.0, 0.0])), "input updates are not modified"


def test_clip_matches_torch_clip_grad_norm():
    g = {"w": torch.randn(30, 20), "b": torch.randn(20)}
    t = lowbit_fn.clip_by_global_norm(0.5)
    out, _ = t.update(g, t.init({}))
    ps = [torch.nn.Parameter(torch.zeros_like(v)) for v in (g["b"], g["w"])]
    for p, v in zip(ps, (g["b"], g["w"])):
        p.grad = v.clone()
    torch.nn.utils.clip_grad_norm_(ps, 0.5)
    assert torch.allclose(out["b"], ps[0].grad, rtol=1e-6) and torch.allclose(out["w"], ps[1].grad, rtol=1e-6)


def test_learning_rate_float_tensor_and_schedule():
    u = {"w": torch.ones(2)}
    t = lowbit_fn.scale_by_learning_rate(0.5)
    assert torch.equal(t.update(u, t.init(u))[0]["w"], torch.full((2,), -0.5))
    lr = torch.tensor(0.5)
    t = lowbit_fn.scale_by_learning_rate(lr)
    state = t.init(u)
    lr.fill_(0.25)  # changed in place between steps
    assert torch.equal(t.update(u, state)[0]["w"], torch.full((2,), -0.25))
    seen = []
    t = lowbit_fn.scale_by_learning_rate(lambda c: seen.append(int(c)) or 0.1)
    state = t.init(u)
    for _ in range(3):
        t.update(u, state)
    assert seen == [0, 1, 2] and int(state["count"]) == 3, "schedules see the updates done before this one"
    t = lowbit_fn.scale_by_learning_rate(2.0, flip_sign=False)
    assert torch.equal(t.update(u, t.init(u))[0]["w"], torch.full((2,), 2.0))


def test_chain_state_and_identity():
    opt = lowbit_fn.chain(lowbit_fn.identity(), lowbit_fn.scale_by_adam(state_format="fp32"), lowbit_fn.scale_by_learning_rate(0.1))
    params = {"w": torch.zeros(3)}
    state = opt.init(params)
    assert set(state.keys()) == {"0", "1", "2"} and isinstance(state, TensorDict)
    updates, state = opt.update({"w": torch.tensor([1.0, -1.0, 0.0])}, state, params)
    assert torch.allclose(updates["w"], torch.tensor([-0.1, 0.1, 0.0]), atol=1e-6)
    with pytest.raises(TypeError, match="argument 1 must be a GradientTransformation"):
        lowbit_fn.chain(lowbit_fn.identity(), lambda x: x)


def test_params_from_module_trainable_and_tied_once():
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10), torch.nn.LayerNorm(10))
    model[1].weight = model[0].weight  # tied (10, 4)
    model[2].requires_grad_(False)
    params = lowbit_fn.params_from_module(model)
    keys = sorted(params.keys(include_nested=True, leaves_only=True))
    assert keys == [("0", "weight"), ("1", "bias")]
    assert params["0", "weight"].data_ptr() == model[0].weight.data_ptr() and not params["0", "weight"].requires_grad


# --- state layout ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["8bit", "fp8", "4bit"])
def test_state_bytes_per_element(fmt):
    params = {"a": torch.zeros(1000, 1024), "b": torch.zeros(4097), "small": torch.zeros(10, 10)}
    state = lowbit_fn.scale_by_adam(state_format=fmt).init(params)
    group = quant_group(state, fmt)
    quant_bytes = sum(t.numel() * t.element_size() for t in group.values(include_nested=True, leaves_only=True))
    per_elem = quant_bytes / (1000 * 1024)
    assert per_elem == (1.0 if fmt == "4bit" else 2.0) + 2 * 4 / lowbit_fn.FORMATS[fmt].default_block_size
    assert state["fp32", "mu", "small"].shape == (10, 10), "tensors under min_quant_size keep fp32 state"
    assert state["fp32", "mu", "b"].shape == (4097,), "1-D tensors keep fp32 state, whatever their size"
    assert set(group["mu"].keys()) == {"a"}
    assert state["layout", "a"].shape == (0, 1000, 1024) and state["layout", "a"].numel() == 0


@pytest.mark.parametrize("fmt", ["8bit", "fp8", "4bit"])
def test_blocks_stay_inside_rows(fmt):
    """Codes shaped like the parameter (4-bit: pairs within a row), scales (rows, blocks per row): a ragged row
    has a shorter last block, and a slice of rows of the state is the state of that slice of the parameter."""
    bs = lowbit_fn.FORMATS[fmt].default_block_size
    params = {"w": torch.zeros(512, 33), "t": torch.zeros(33, bs + 7), "c": torch.zeros(4, 5, 2 * bs)}
    t = lowbit_fn.scale_by_adam(state_format=fmt, min_quant_size=0)
    state = t.init(params)
    grads = {k: torch.randn(v.shape) for k, v in params.items()}
    t.update(grads, state, params)
    mu = quant_group(state, fmt)["mu"]
    per_row = {"w": 33, "t": bs + 7, "c": 10 * bs}
    for key, p in params.items():
        codes, scale = mu[key, "codes"], mu[key, "scale"]
        rows = p.shape[0]
        assert codes.shape == (p.shape if fmt != "4bit" else (rows, -(-per_row[key] // 2)))
        assert scale.shape == (rows, -(-per_row[key] // bs))
        # the first moment after one step is (1 - b1) * g: re-quantizing a slice of rows gives that slice's codes
        lo, hi = 3, rows - 1
        want_c, want_s = lowbit_fn.quantize(0.1 * grads[key][lo:hi].float(), fmt, signed=True,
                                            rounding="stochastic" if fmt == "4bit" else "nearest", step=1,
                                            offset=lo * per_row[key], tensor_id=tensor_id(key))
        assert torch.equal(codes[lo:hi], want_c) and torch.equal(scale[lo:hi], want_s)


def test_min_quant_size_zero_quantizes_every_matrix_and_1d_tensors_stay_full():
    params = {"a": torch.zeros(3), "b": torch.zeros(()), "c": torch.zeros(2, 257)}
    state = lowbit_fn.scale_by_adam(state_format="8bit", min_quant_size=0).init(params)
    assert set(state.keys()) == {"count", "layout", "8bit_block256", "fp32"}
    assert state["8bit_block256", "mu", "c", "scale"].shape == (2, 2), "each row in whole blocks"
    assert set(state["fp32", "mu"].keys()) == {"a", "b"}


def test_a_parameters_state_does_not_depend_on_the_others():
    params = {"a": torch.randn(64, 300), "b": torch.randn(128, 64), "c": torch.randn(300)}
    grads = {k: torch.randn_like(v) for k, v in params.items()}
    runs = []
    for keys in (("a", "b", "c"), ("a",), ("b", "a")):
        t = lowbit_fn.adamw(1e-2, state_format="4bit", min_quant_size=0)
        sub = {k: params[k].clone() for k in keys}
        state = t.init(sub)
        for _ in range(2):
            t.update({k: grads[k] for k in keys}, state, sub)
        runs.append(state["0", "4bit_sr_block128"])
    for run in runs[1:]:
        for part in ("codes", "scale"):
            assert torch.equal(run["mu", "a", part], runs[0]["mu", "a", part])
            assert torch.equal(run["nu", "a", part], runs[0]["nu", "a", part])


def test_identical_parameters_draw_different_noise():
    """Stochastic rounding is keyed by each parameter's identity: two equal parameters with equal gradients get
    different codes (the same element index does not mean the same random number)."""
    w, g = torch.randn(64, 256), torch.randn(64, 256)
    t = lowbit_fn.scale_by_adam(state_format="4bit", min_quant_size=0)
    state = t.init({"x": w, "y": w.clone()})
    t.update({"x": g, "y": g.clone()}, state, {"x": w, "y": w.clone()})
    mu = state["4bit_sr_block128", "mu"]
    assert not torch.equal(mu["x", "codes"], mu["y", "codes"])
    assert torch.equal(mu["x", "scale"], mu["y", "scale"])


@pytest.mark.parametrize("fmt", FORMATS)
def test_state_is_donated_updated_in_place(fmt):
    params = {"w": torch.randn(128, 64), "b": torch.randn(64)}
    t = lowbit_fn.scale_by_adam(state_format=fmt, min_quant_size=0)
    state = t.init(params)
    ptrs = {k: v.data_ptr() for k, v in state.items(include_nested=True, leaves_only=True) if v.numel()}
    _, new = t.update({k: torch.randn_like(v) for k, v in params.items()}, state, params)
    assert new is state
    assert ptrs == {k: v.data_ptr() for k, v in new.items(include_nested=True, leaves_only=True) if v.numel()}
    assert int(new["count"]) == 1


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_param_dtypes(fmt, dtype):
    model = mlp(dtype)
    params, state = run_functional(model, lowbit_fn.adamw(1e-3, state_format=fmt), batches(3, dtype))
    for v in params.values(include_nested=True, leaves_only=True):
        assert v.dtype == dtype and bool(torch.isfinite(v).all())
    full = state["0", "fp64" if dtype == torch.float64 else "fp32", "mu", "4", "bias"]
    assert full.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)


def test_default_dtype_bfloat16_does_not_break():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        params = {"w": torch.randn(64, 64)}
        opt = lowbit_fn.adamw(1e-3, state_format="8bit", min_quant_size=0)
        state = opt.init(params)
        updates, state = opt.update({"w": torch.randn(64, 64)}, state, params)
        assert updates["w"].dtype == torch.bfloat16 and bool(torch.isfinite(updates["w"]).all())
    finally:
        torch.set_default_dtype(old)


def test_empty_params():
    opt = lowbit_fn.adamw(1e-3)
    state = opt.init({})
    updates, state = opt.update({}, state, {})
    assert len(updates.keys()) == 0 and int(state["0", "count"]) == 1


# --- eager == compiled, no recompiles ----------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("amsgrad", [False, True])
def test_eager_and_compiled_are_bit_identical(fmt, amsgrad, monkeypatch):
    monkeypatch.setenv("LOWBIT_FN_NATIVE", "0")  # the compiled step (the native kernel's equality is test_native's)
    model = mlp()
    start = lowbit_fn.params_from_module(model).clone()
    data = batches(4)
    opt = lowbit_fn.adamw(1e-2, state_format=fmt, amsgrad=amsgrad, min_quant_size=0)
    compiled_params, compiled_state = run_functional(model, opt, data, params=start.clone())
    monkeypatch.setenv("LOWBIT_FN_COMPILE", "0")
    eager_params, eager_state = run_functional(model, opt, data, params=start.clone())
    assert bool((compiled_params == eager_params).all()) and bool((compiled_state == eager_state).all())


def test_float64_eager_and_compiled_agree_to_an_ulp(monkeypatch):
    model = mlp(torch.float64)
    start = lowbit_fn.params_from_module(model).clone()
    opt = lowbit_fn.adamw(1e-2, state_format="fp32")
    a, _ = run_functional(model, opt, batches(4, torch.float64), params=start.clone())
    monkeypatch.setenv("LOWBIT_FN_COMPILE", "0")
    b, _ = run_functional(model, opt, batches(4, torch.float64), params=start.clone())
    for k in a.keys(include_nested=True, leaves_only=True):
        # float64 sqrt is not correctly rounded in eager torch on CPU; the paths differ only at rounding level
        assert float((a[k] - b[k]).abs().max() / a[k].abs().max()) < 1e-13


def _fresh_compiled_step(monkeypatch):
    """The compiled step (LOWBIT_FN_NATIVE=0) through a fresh compiled wrapper, so that graphs other tests compiled
    cannot hide a recompile; returns the wrapper (its ``_variants``: the variants compiled so far)."""
    import lowbit_fn.kernels.step as step_module
    from lowbit_fn._compile import compiled
    from lowbit_fn.kernels.reference import tensor_step

    fresh = compiled(tensor_step.fn)
    monkeypatch.setattr(step_module, "tensor_step", fresh)
    monkeypatch.setenv("LOWBIT_FN_NATIVE", "0")
    return fresh


def test_changing_learning_rate_or_betas_never_recompiles(monkeypatch):
    from torch._dynamo.utils import counters

    fresh = _fresh_compiled_step(monkeypatch)
    params = {"w": torch.randn(300, 300), "b": torch.randn(300)}
    grads = {k: torch.randn_like(v) for k, v in params.items()}
    lr, b1 = torch.tensor(1e-3), torch.tensor(0.9, dtype=torch.float64)
    for make in (lambda: lowbit_fn.adamw(lr, b1=b1), lambda: lowbit_fn.adamw(lambda c: 1e-3 / (1 + c))):
        opt = make()
        state = opt.init(params)
        before = counters["stats"]["unique_graphs"], len(fresh._variants)
        opt.update(grads, state, params)  # the first step compiles one graph per new variant, nothing else
        assert counters["stats"]["unique_graphs"] - before[0] == len(fresh._variants) - before[1]
        before = counters["stats"]["unique_graphs"]
        for i in range(4):
            lr.fill_(1e-3 * (i + 2))
            b1.fill_(0.9 - 0.01 * i)
            opt.update(grads, state, params)
        assert counters["stats"]["unique_graphs"] == before
    # a float learning rate baked into a new optimizer: a float64 scalar, so its own variants (compiled by the
    # first, one graph each), and the same graphs for any other value
    for value in (1e-4, 3e-4):
        opt = lowbit_fn.adamw(value)
        state = opt.init(params)
        before = counters["stats"]["unique_graphs"], len(fresh._variants)
        opt.update(grads, state, params)
        new = len(fresh._variants) - before[1]
        assert counters["stats"]["unique_graphs"] - before[0] == new and (value == 1e-4 or new == 0)


def test_graph_count_does_not_grow_with_the_number_of_tensors(monkeypatch):
    from torch._dynamo.utils import counters

    fresh = _fresh_compiled_step(monkeypatch)

    def run(n):
        params = {f"p{i}": torch.randn(64 + i, 70 + 3 * i) for i in range(n)} | {f"b{i}": torch.randn(7 + i) for i in range(n)}
        opt = lowbit_fn.adamw(1e-3, state_format="8bit", min_quant_size=0)
        state = opt.init(params)
        before = counters["stats"]["unique_graphs"]
        opt.update({k: torch.randn_like(v) for k, v in params.items()}, state, params)
        return counters["stats"]["unique_graphs"] - before

    # no warm-up: the first call compiles exactly one graph per variant (the weights' epilogue and the biases')
    assert run(3) == len(fresh._variants) == 2
    assert run(40) == 0 and run(7) == 0 and run(1) == 0, "differently shaped tensors reuse the graphs compiled for 3"


# --- bad input ---------------------------------------------------------------------------------------------------

@pytest.fixture
def trained():
    params = {"layer": {"w": torch.randn(64, 80)}, "b": torch.randn(80)}
    opt = lowbit_fn.adamw(1e-3, state_format="8bit", min_quant_size=0)
    state = opt.init(params)
    _, state = opt.update({"layer": {"w": torch.randn(64, 80)}, "b": torch.randn(80)}, state, params)
    return opt, params, state


def _grads(**override):
    g = {"layer": {"w": torch.randn(64, 80)}, "b": torch.randn(80)}
    g.update(override)
    return g


@pytest.mark.parametrize(
    "grads, error, match",
    [
        (lambda: {"layer": {"w": torch.randn(64, 80)}}, ValueError, "missing 'b'"),
        (lambda: _grads(extra=torch.randn(3)), ValueError, "unexpected 'extra'"),
        (lambda: _grads(b=torch.randn(81)), ValueError, r"updates\['b'\] has shape \(81,\)"),
        (lambda: _grads(layer={"w": torch.randn(80, 64)}), ValueError, r"updates\['layer.w'\] has shape"),
        (lambda: _grads(b=torch.randn(80, dtype=torch.float64)), ValueError, r"updates\['b'\] has dtype torch.float64"),
        (lambda: _grads(b=torch.randn(80).to_sparse()), TypeError, r"updates\['b'\].*sparse gradients are not supported"),
        (lambda: _grads(b=torch.arange(80)), TypeError, r"unsupported dtype torch.int64"),
        (lambda: [torch.randn(80)], TypeError, "must be a TensorDict or a mapping"),
    ],
)
def test_bad_grads_raise_before_anything_changes(trained, grads, error, match):
    opt, params, state = trained
    snap = snapshot(state)
    with pytest.raises(error, match=match):
        opt.update(grads(), state, params)
    assert same(state, snap)


def test_bad_params_and_missing_params_leave_state_unchanged(trained):
    opt, params, state = trained
    snap = snapshot(state)
    with pytest.raises(ValueError, match=r"params\['b'\] has shape"):
        opt.update(_grads(), state, {"layer": {"w": torch.randn(64, 80)}, "b": torch.randn(5)})
    with pytest.raises(ValueError, match="add_decayed_weights needs params"):
        opt.update(_grads(), state)  # scale_by_adam runs first in adamw: it must not have advanced
    assert same(state, snap)


@pytest.mark.parametrize("alias", ["adam", "adamw"])
def test_failed_fused_step_leaves_schedule_and_state_unchanged(alias):
    """adam/adamw fuse decay and learning rate into the step: a step that fails validation changes nothing,
    the schedule's count included."""
    params = {"layer": {"w": torch.randn(64, 80)}, "b": torch.randn(80)}
    opt = getattr(lowbit_fn, alias)(lambda count: 1e-3 / (1 + count), state_format="8bit", min_quant_size=0)
    state = opt.init(params)
    _, state = opt.update(_grads(), state, params)
    snap = snapshot(state)
    with pytest.raises(ValueError, match=r"updates\['b'\] has shape"):
        opt.update(_grads(b=torch.randn(81)), state, params)
    assert same(state, snap) and int(state["2", "count"]) == 1
    _, state = opt.update(_grads(), state, params)
    assert int(state["2", "count"]) == 2 and int(state["1" if alias == "adam" else "0", "count"]) == 2


def test_state_from_another_format_or_setting_is_refused(trained):
    _, params, state = trained
    snap = snapshot(state)
    for other in (lowbit_fn.adamw(state_format="fp8", min_quant_size=0), lowbit_fn.adamw(state_format="8bit", min_quant_size=8192),
                  lowbit_fn.adamw(state_format="8bit", min_quant_size=0, block_size=128),
                  lowbit_fn.adamw(state_format="8bit", min_quant_size=0, amsgrad=True)):
        with pytest.raises(ValueError, match="state"):
            other.update(_grads(), state, params)
    assert same(state, snap)


def test_corrupt_state_buffer_is_refused(trained):
    opt, params, state = trained
    state["0", "8bit_block256", "nu", "layer", "w", "codes"] = state["0", "8bit_block256", "nu", "layer", "w", "codes"][:-1].clone()
    with pytest.raises(ValueError, match=r"state\['8bit_block256'\]\['nu'\]\['layer'\]\['w'\]\['codes'\].*corrupt or foreign"):
        opt.update(_grads(), state, params)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(state_format="2bit"), ValueError, "state_format must be one of"),
        (dict(state_format="4bit", block_size=5), ValueError, "multiple of 2"),
        (dict(state_format="8bit", block_size=0), ValueError, "block_size must be a positive int"),
        (dict(state_format="fp32", block_size=64), ValueError, "block_size applies to quantized formats"),
        (dict(min_quant_size=-1), ValueError, "min_quant_size"),
        (dict(b1=1.0), ValueError, r"b1 must be in \[0, 1\)"),
        (dict(eps=-1.0), ValueError, "eps must be >= 0"),
        (dict(amsgrad="yes"), TypeError, "amsgrad must be a bool"),
    ],
)
def test_bad_hyperparameters(kwargs, error, match):
    with pytest.raises(error, match=match):
        lowbit_fn.scale_by_adam(**kwargs)


def test_bad_learning_rate_and_weight_decay():
    with pytest.raises(TypeError, match="learning_rate"):
        lowbit_fn.adamw("0.1")
    with pytest.raises(ValueError, match="weight_decay"):
        lowbit_fn.adamw(weight_decay=-1.0)
    with pytest.raises(ValueError, match="max_norm"):
        lowbit_fn.clip_by_global_norm(0.0)
