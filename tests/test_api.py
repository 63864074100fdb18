"""The optax/torch conventions, the in-place functional step, half-precision parameters, graph counts, step memory."""

import inspect
import sys
from pathlib import Path

import pytest
import torch
from tensordict import TensorDict

import lowbit_fn
from helpers import snapshot

FORMATS = ["fp32", "8bit", "4bit", "fp8"]
SHAPES = {"w": (96, 300), "v": (33, 256), "t": (4, 5, 130), "b": (300,)}


def make(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {k: (torch.randn(s, generator=g) * 0.1).to(dtype) for k, s in SHAPES.items()}


def test_gradient_transformation_is_a_two_field_named_tuple():
    init, update = lowbit_fn.adam()
    assert isinstance(lowbit_fn.adamw(), lowbit_fn.GradientTransformation)
    assert lowbit_fn.GradientTransformation._fields == ("init", "update")
    params = make()
    state = init(params)
    updates, state = update(make(seed=1), state)  # adam without weight decay needs no params
    assert set(updates.keys()) == set(SHAPES)
    with pytest.raises(ValueError, match="add_decayed_weights needs params"):
        lowbit_fn.adamw().update(make(seed=1), lowbit_fn.adamw().init(params))


def test_drop_in_signatures_show_their_defaults():
    for cls in (lowbit_fn.AdamW8bit, lowbit_fn.AdamW4bit, lowbit_fn.AdamWFp8, lowbit_fn.AdamW):
        assert inspect.signature(cls).parameters["weight_decay"].default == 1e-2, cls
    for cls in (lowbit_fn.Adam8bit, lowbit_fn.Adam4bit, lowbit_fn.AdamFp8):
        assert inspect.signature(cls).parameters["weight_decay"].default == 0.0, cls
    sig = inspect.signature(lowbit_fn.AdamW8bit).parameters
    assert sig["lr"].default == 1e-3 and sig["betas"].default == (0.9, 0.999) and sig["min_quant_size"].default == 4096


def test_each_input_is_validated_once_per_step(monkeypatch):
    adam_module = sys.modules["lowbit_fn.transforms._moments"]
    calls = []
    real = adam_module.check_like
    monkeypatch.setattr(adam_module, "check_like", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    opt = lowbit_fn.adamw(1e-3)
    params = make()
    state = opt.init(params)
    opt.update(make(seed=1), state, params)
    assert sorted(calls) == ["params", "updates"]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("alias", ["adam", "adamw"])
def test_inplace_and_pure_steps_are_bit_identical(fmt, dtype, alias):
    opt = getattr(lowbit_fn, alias)(1e-2, weight_decay=0.1, state_format=fmt, min_quant_size=0)
    runs = []
    for inplace in (False, True):
        params = TensorDict(make(dtype), batch_size=[])
        state = opt.init(params)
        for step in range(3):
            grads = make(dtype, seed=10 + step)
            ptrs = {k: v.data_ptr() for k, v in grads.items()}
            updates, state = opt.update(grads, state, params, inplace=inplace)
            assert (updates["w"].data_ptr() == ptrs["w"]) == inplace, "inplace writes the updates into the gradients"
            new = lowbit_fn.apply_updates(params, updates, inplace=inplace)
            assert (new is params) == inplace
            params = new
        runs.append((params, state))
    (p1, s1), (p2, s2) = runs
    for k in SHAPES:
        assert p1[k].dtype == dtype and torch.equal(p1[k], p2[k]), k
    assert bool((s1 == s2).all())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("fmt", ["8bit", "fp8"])
def test_functional_and_torch_optim_agree_on_half_precision_params(fmt, dtype):
    """Both front ends run the same kernel on the same layout: decay and learning rate in float32, one rounding.
    The parameters then differ only by the rounding of the functional update to the params' dtype before it is
    added. (Formats that round nearest: stochastic rounding keys its noise by each front end's own identity of a
    parameter, its key path or its position.)"""
    params = make(dtype)
    leaves = [torch.nn.Parameter(params[k].clone()) for k in sorted(SHAPES)]
    cls = {"8bit": lowbit_fn.AdamW8bit, "fp8": lowbit_fn.AdamWFp8}[fmt]
    torch_opt = cls(leaves, lr=1e-2, min_quant_size=0)
    opt = lowbit_fn.adamw(1e-2, state_format=fmt, min_quant_size=0)
    state = opt.init(params)
    for step in range(3):
        grads = make(dtype, seed=20 + step)
        for leaf, k in zip(leaves, sorted(SHAPES)):
            leaf.grad = grads[k].clone()
        torch_opt.step()
        updates, state = opt.update(grads, state, params, inplace=True)
        params = lowbit_fn.apply_updates(params, updates, inplace=True)
    for leaf, k in zip(leaves, sorted(SHAPES)):
        a, b = leaf.detach().float(), params[k].float()
        # per step: the result may round the other way (one ulp of it), and the functional update itself was
        # rounded to the dtype (half an ulp of the update, |u| <= 3 lr here) before the add: 3 steps of both
        eps = torch.finfo(dtype).eps
        bound = 3 * eps * (torch.maximum(a.abs(), b.abs()) + 3 * 1e-2)
        assert bool(((a - b).abs() <= bound).all()), k


def test_functional_bf16_stochastic_rounding_moves_parameters_in_expectation():
    """An update below half a bfloat16 ulp is lost by nearest rounding; with bf16_stochastic_round the parameter
    moves by it on average (the torch.optim front end's write-back, the same random bits definition)."""
    p = {"w": torch.ones(4096, dtype=torch.bfloat16)}
    u = {"w": torch.full((4096,), 1e-3, dtype=torch.bfloat16)}  # an ulp of 1.0 is 2**-7 = 7.8e-3
    assert torch.equal(lowbit_fn.apply_updates(p, u)["w"], p["w"])
    new = lowbit_fn.apply_updates(p, u, bf16_stochastic_round=True, step=1)["w"].float()
    assert abs(float(new.mean()) - (1 + 1e-3)) < 2e-4
    again = lowbit_fn.apply_updates(p, u, bf16_stochastic_round=True, step=1)["w"]
    assert torch.equal(again, new.to(torch.bfloat16)), "deterministic"
    other = lowbit_fn.apply_updates(p, u, bf16_stochastic_round=True, step=2)["w"]
    assert not torch.equal(other, again), "fresh bits every step"
    inplace = {"w": p["w"].clone()}
    lowbit_fn.apply_updates(inplace, u, inplace=True, bf16_stochastic_round=True, step=1)
    assert torch.equal(inplace["w"], again)
    with pytest.raises(ValueError, match="needs step"):
        lowbit_fn.apply_updates(p, u, bf16_stochastic_round=True)


def test_updates_on_another_device_than_the_state_are_refused():
    opt = lowbit_fn.adamw(1e-3)
    params = make()
    state = opt.init(params)
    snap = snapshot(state)
    grads = {k: torch.empty(v.shape, device="meta") for k, v in params.items()}
    with pytest.raises(ValueError, match=r"updates\[.b.\] is on meta, the state on cpu"):
        opt.update(grads, state, params)
    from helpers import same

    assert same(state, snap)
    state["0", "8bit_block256", "mu", "w", "codes"] = torch.empty((96, 300), dtype=torch.uint8, device="meta")
    with pytest.raises(ValueError, match=r"state\['8bit_block256'\]\['mu'\]\['w'\]\['codes'\] is on meta"):
        opt.update(make(seed=1), state, params)


def test_the_kernel_entry_point_refuses_tensors_on_several_devices():
    """The last line of defence before raw pointers go to the native kernel."""
    from lowbit_fn.kernels import Item, StepConfig, moment_step
    from lowbit_fn.kernels.rules import Adam

    g = torch.zeros(8, 8)
    moments = [torch.zeros(8, 8), torch.zeros(8, 8, device="meta")]
    config = StepConfig(Adam(), None, 0, False, 0)
    b = torch.tensor(0.9, dtype=torch.float64)
    with pytest.raises(ValueError, match="not one device"):
        moment_step(config, [Item(g, moments, torch.tensor(1), 0)], (b, b, b))


@pytest.mark.slow
@pytest.mark.parametrize("fmt", FORMATS)
def test_compiled_path_compiles_once_per_format_and_dtype(fmt, monkeypatch):
    """The compiled step (the GPU path; here with LOWBIT_FN_NATIVE=0) is exactly one graph per variant (format,
    dtype, epilogue), compiled by its first call, with no warm-up: every other number of tensors and every other
    shape (sizes of 1, one row, rows of one block or of whole blocks, ragged rows, odd 4-bit rows, 1-D, 3-D, square
    or not) reuses it. A fresh compiled wrapper, so that graphs other tests compiled cannot hide a recompile."""
    from torch._dynamo.utils import counters

    import lowbit_fn.kernels.step as step_module
    from lowbit_fn._compile import compiled
    from lowbit_fn.kernels.reference import tensor_step

    fresh = compiled(tensor_step.fn)
    monkeypatch.setattr(step_module, "tensor_step", fresh)
    monkeypatch.setenv("LOWBIT_FN_NATIVE", "0")

    def run(shapes, dtype):
        gen = torch.Generator().manual_seed(len(shapes))
        params = {f"p{i}": torch.randn(s, generator=gen).to(dtype) for i, s in enumerate(shapes)}
        opt = lowbit_fn.adamw(1e-3, state_format=fmt, min_quant_size=0)
        state = opt.init(params)
        before = counters["stats"]["unique_graphs"], len(fresh._variants)
        for _ in range(2):
            updates, state = opt.update({k: torch.randn_like(v) for k, v in params.items()}, state, params, inplace=True)
            lowbit_fn.apply_updates(params, updates, inplace=True)
        return counters["stats"]["unique_graphs"] - before[0], len(fresh._variants) - before[1]

    for dtype in (torch.float32, torch.bfloat16):
        # a first call compiles one graph for each variant it is the first to use, nothing else
        assert run([(64, 70)], dtype) == (1, 1), f"{fmt} {dtype}: not one graph for the first shape"
        graphs, variants = run([(300,)], dtype)  # 1-D: another variant, or the same one
        assert graphs == variants <= 1, f"{fmt} {dtype}: {graphs} graphs for {variants} new variants"
        more = [
            (1, 5000), (5000, 1), (3, 5, 300), (513, 33), (4, 1024), (7,), (1000,), (8, 301), (8, 9), (2, 512),
            (1,), (1, 1), (9, 9), (1, 256), (2, 128), (65, 78), (3, 768), (33, 603), (256, 300), (7, 1, 900),
        ]
        assert run(more, dtype) == (0, 0), f"{fmt} {dtype}: recompiled for other shapes"
        for shape in more[:8]:
            assert run([shape], dtype) == (0, 0), f"{fmt} {dtype}: recompiled for {shape} alone"


@pytest.mark.parametrize("fmt", ["4bit", "8bit"])
def test_compiled_path_steps_large_tensors_in_pieces(fmt, monkeypatch):
    """The compiled graphs keep temporaries of up to ~26 B per element, so the compiled path steps a quantized
    tensor in pieces of whole rows (at most an eighth of the step's largest tensor): the same bits as the native
    kernel's one pass (stochastic rounding included: each piece's indices start at its first element), one graph
    for every piece, and a step's extra memory within 8 B per element of the largest tensor."""
    from torch._dynamo.utils import counters

    import lowbit_fn.kernels.step as step_module
    from lowbit_fn._compile import compiled
    from lowbit_fn.kernels.reference import tensor_step

    shapes = {"w": (512, 512), "v": (300, 301), "t": (40, 3, 700), "b": (512,)}  # pieces of 64, 108 and 15 rows
    gen = torch.Generator().manual_seed(0)
    start = {k: torch.randn(s, generator=gen).to(torch.bfloat16) for k, s in shapes.items()}
    grads = [{k: torch.randn(s, generator=gen).to(torch.bfloat16) for k, s in shapes.items()} for _ in range(2)]
    opt = lowbit_fn.adamw(1e-2, state_format=fmt, rounding="stochastic")
    runs, fresh = [], compiled(tensor_step.fn)
    monkeypatch.setattr(step_module, "tensor_step", fresh)
    for native in ("1", "0"):
        monkeypatch.setenv("LOWBIT_FN_NATIVE", native)
        params = {k: v.clone() for k, v in start.items()}
        holder = {"state": opt.init(params)}

        def step(g):
            _, holder["state"] = lowbit_fn.apply_gradients(opt, g, holder["state"], params, inplace=True,
                                                           bf16_stochastic_round=True)

        before = counters["stats"]["unique_graphs"]
        step(grads[0])
        peak = _peak(lambda: step(grads[1]))
        assert peak is not None and peak <= 8 * 512 * 512, f"native={native}: {peak / (512 * 512):.2f} B per element"
        runs.append((params, holder["state"], counters["stats"]["unique_graphs"] - before))
    (p1, s1, _), (p2, s2, graphs) = runs
    assert all(torch.equal(p1[k], p2[k]) for k in shapes)
    assert bool((s1 == s2).all())
    assert graphs == 2 == len(fresh._variants), "one graph for the quantized pieces, one for the fp32 bias"


def _peak(step):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from step_speed import peak_step_bytes

    return peak_step_bytes(step)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("fmt", ["8bit", "fp32"])
def test_peak_step_memory_is_within_8_bytes_of_the_largest_tensor(fmt, dtype):
    """No float32 copy of the parameters or gradients: one step's extra memory (torch allocations live at once)
    stays within 8 B x the largest tensor's elements, through torch.optim and the in-place functional step."""
    shapes = [(512, 512)] * 8 + [(512,)] * 4
    largest = 512 * 512
    gen = torch.Generator().manual_seed(0)
    leaves = [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in shapes]
    for leaf in leaves:
        leaf.grad = torch.randn(leaf.shape, generator=gen).to(dtype)
    cls = lowbit_fn.AdamW8bit if fmt == "8bit" else lowbit_fn.AdamW
    opt = cls(leaves, lr=1e-3)
    opt.step()  # the state is made at the first step
    peak = _peak(opt.step)
    assert peak is not None and peak <= 8 * largest, f"torch.optim: {peak / largest:.2f} B per element"
    params = {f"p{i}": leaf.detach().clone() for i, leaf in enumerate(leaves)}
    grads = {k: torch.randn(v.shape, generator=gen).to(dtype) for k, v in params.items()}
    fopt = lowbit_fn.adamw(1e-3, state_format=fmt)
    holder = {"state": fopt.init(params)}

    def step():
        updates, holder["state"] = fopt.update(grads, holder["state"], params, inplace=True)
        lowbit_fn.apply_updates(params, updates, inplace=True)

    step()
    peak = _peak(step)
    assert peak is not None and peak <= 8 * largest, f"functional: {peak / largest:.2f} B per element"

    def fused_step():
        _, holder["state"] = lowbit_fn.apply_gradients(fopt, grads, holder["state"], params, inplace=True)

    fused_step()
    peak = _peak(fused_step)
    assert peak is not None and peak <= 8 * largest, f"apply_gradients: {peak / largest:.2f} B per element"
