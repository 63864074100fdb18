"""The native CPU kernel against the reference path, for every rule: identical codes, scales, directions and
parameters; the fallback."""

import math
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lowbit_fn
import lowbit_fn.kernels.step as step_module
from lowbit_fn.kernels import Epilogue, Item, StepConfig, moment_step
from lowbit_fn.kernels.rules import RMS, AdEMAMix, Adam, Lion, MuonMomentum, Trace
from lowbit_fn.kernels.native import native_available, nearest_thresholds, prefix_table, threshold_table

pytestmark = pytest.mark.skipif(not native_available(torch.device("cpu")), reason="no C compiler here")


def f64(x):
    return torch.tensor(x, dtype=torch.float64)


def both(fmt_name, g, moments, step, stochastic, rule=None, hyper=None, b1=0.9, b2=0.999, eps=1e-8, seed=0,
         param=None, epilogue=Epilogue(), compiled=True):
    """Run the reference and the native kernel (through the one entry point) on copies of the same state and
    parameter; returns both ``(update or parameter, moments)``. ``rule`` (default: Adam, with amsgrad when there
    are three moments) and its hyperparameters ``hyper`` (floats; default ``(b1, b2, eps)``). The reference is
    compiled, or with ``compiled=False`` the same function run eagerly (no graph to compile: the wide matrices).
    Checks that the native kernel ran the second and only the second."""
    fmt = lowbit_fn.FORMATS[fmt_name] if fmt_name != "fp32" else None
    if rule is None:
        rule = Adam(len(moments) > (4 if fmt else 2))
    hyper = tuple(f64(h) for h in (hyper if hyper is not None else (b1, b2, eps)))
    config = StepConfig(rule, fmt, fmt.default_block_size if fmt else 0, stochastic, seed)
    calls, real = [], step_module.native_step

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    out = []
    for native in ("0", "1"):
        env = {"LOWBIT_FN_NATIVE": native, **({"LOWBIT_FN_COMPILE": "0"} if native == "0" and not compiled else {})}
        os.environ.update(env)
        step_module.native_step = counted
        try:
            state = [t.clone() for t in moments]
            p = None if param is None else param.clone()
            (d,) = moment_step(config, [Item(g, state, torch.tensor(step), 1234, p)], hyper, epilogue)
        finally:
            step_module.native_step = real
            for name in env:
                del os.environ[name]
        assert len(calls) == int(native), f"native calls: {len(calls)} with LOWBIT_FN_NATIVE={native}"
        out.append((p if epilogue.apply else d, state))
    return out


def random_state(fmt_name, shape, signed, gen):
    """Moments of ``shape``: ``signed`` per moment (a tuple of bools; an int n: Adam's n moments, the first
    signed), with magnitudes over six decades; quantized in ``fmt_name``, or float32 tensors for ``"fp32"``."""
    if isinstance(signed, int):
        signed = (True,) + (False,) * (signed - 1)
    moments = []
    n = math.prod(shape)
    for s in signed:
        x = (torch.randn(n, generator=gen) * torch.logspace(-6, 0, n)).view(shape)
        x = x if s else x.abs()
        moments += [x] if fmt_name == "fp32" else list(lowbit_fn.quantize(x, fmt_name, signed=s))
    return moments


def same_bits(a, b):
    """Equal NaN positions and, elsewhere, equal bit patterns (so +0 and -0 differ; NaN payloads may)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    nan = torch.isnan(a)
    if not torch.equal(nan, torch.isnan(b)):
        return False
    bits = {4: torch.int32, 2: torch.int16, 1: torch.uint8}[a.element_size()]
    return torch.equal(a.view(bits)[~nan], b.view(bits)[~nan])


def assert_identical(ref, nat, fmt_name):
    (d1, m1), (d2, m2) = ref, nat
    assert same_bits(d1, d2)
    if fmt_name == "fp32":
        for i, (a, b) in enumerate(zip(m1, m2)):
            assert same_bits(a, b), f"moment {i}"
        return
    for i in range(0, len(m1), 2):
        s1, s2 = m1[i + 1], m2[i + 1]
        assert same_bits(s1, s2), f"scales of moment {i // 2}"
        assert torch.equal(m1[i], m2[i]), f"codes of moment {i // 2}"


@pytest.mark.parametrize("fmt", ["8bit", "4bit", "fp8"])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("shape", [(41, 256), (37, 33), (3, 5, 301)])
def test_native_equals_reference_bit_for_bit(fmt, rounding, amsgrad, shape):
    gen = torch.Generator().manual_seed(0)
    n = math.prod(shape)
    g = (torch.randn(n, generator=gen) * torch.logspace(-12, 3, n)).view(shape)
    g.view(-1)[7 * 33 + 5] = float("nan")  # one non-finite element: it costs only itself
    g[1] = 0.0  # all-zero blocks
    moments = random_state(fmt, shape, 3 if amsgrad else 2, gen)
    for step in (1, 2, 1000):
        ref, nat = both(fmt, g, moments, step, rounding == "stochastic")
        assert_identical(ref, nat, fmt)
        moments = ref[1]


@pytest.mark.parametrize("fmt, dtype, mode", [  # every format, dtype and epilogue at least once (each compiles)
    ("8bit", torch.bfloat16, "decoupled_sr"), ("8bit", torch.float16, "update"), ("4bit", torch.bfloat16, "l2"),
    ("4bit", torch.float32, "decoupled_sr"), ("fp8", torch.float16, "l2"), ("fp8", torch.bfloat16, "update"),
    ("fp32", torch.bfloat16, "decoupled_sr"), ("fp32", torch.float16, "l2"),
], ids=str)
def test_half_precision_params_read_and_written_in_the_kernel(fmt, dtype, mode):
    """bfloat16/float16 parameters and gradients: the native kernel converts them block by block and writes the
    parameter (rounded to nearest, or stochastically for bfloat16) or the update back; the compiled reference
    computes the same bits."""
    gen = torch.Generator().manual_seed(2)
    shape = (37, 300)
    g = torch.randn(shape, generator=gen).to(dtype)
    p = torch.randn(shape, generator=gen).to(dtype)
    moments = random_state(fmt, shape, 2, gen) if fmt != "fp32" else [torch.randn(shape, generator=gen), torch.rand(shape, generator=gen)]
    wd, lr = torch.tensor(0.1, dtype=torch.float64), torch.tensor(-1e-2, dtype=torch.float64)
    epilogue = {
        "l2": Epilogue(wd, l2=True, factor=lr, apply=True),
        "decoupled_sr": Epilogue(wd, decoupled=True, factor=lr, apply=True, param_sr=True),
        "update": Epilogue(wd, decoupled=True, factor=lr),
    }[mode]
    ref, nat = both(fmt, g, moments, 3, fmt == "4bit", param=p, epilogue=epilogue)
    if fmt == "fp32":
        (r, mr), (n_, mn) = ref, nat
        assert torch.equal(r, n_) and all(torch.equal(a, b) for a, b in zip(mr, mn))
    else:
        assert_identical(ref, nat, fmt)
    assert ref[0].dtype == dtype
    if mode != "update":
        assert not torch.equal(ref[0], p), "the parameter moved"


@settings(max_examples=15, deadline=None)  # every format and rounding compiles a reference graph
@given(
    values=st.lists(st.floats(-(2.0**100), 2.0**100, allow_nan=False, width=32), min_size=1, max_size=600),
    fmt=st.sampled_from(["8bit", "4bit", "fp8"]),
    stochastic=st.booleans(),
    step=st.integers(1, 10**6),
    b1=st.floats(0.0, 0.999),
)
def test_native_equals_reference_on_arbitrary_gradients(values, fmt, stochastic, step, b1):
    g = torch.tensor(values, dtype=torch.float32)
    g = torch.nn.functional.pad(g, (0, -g.numel() % 3)).view(3, -1)  # three rows, ragged blocks
    moments = random_state(fmt, tuple(g.shape), 2, torch.Generator().manual_seed(step))
    assert_identical(*both(fmt, g, moments, step, stochastic, b1=b1), fmt)


# every rule variant: (id, rule, hyperparameters in the order of its scalars' inputs)
RULES = [
    ("adam", Adam(), (0.9, 0.999, 1e-8)),
    ("amsgrad", Adam(amsgrad=True), (0.8, 0.99, 1e-6)),
    ("lion", Lion(), (0.9, 0.99)),
    ("sgd", Trace(momentum=False), (0.0, 0.0)),
    ("momentum", Trace(), (0.9, 0.1)),
    ("nesterov", Trace(nesterov=True), (0.9, 0.0)),
    ("rms", RMS(), (0.99, 1e-8, 0.0)),
    ("rms_centered", RMS(centered=True), (0.9, 1e-8, 0.0)),
    ("rms_momentum", RMS(momentum=True), (0.99, 1e-8, 0.9)),
    ("rms_centered_momentum", RMS(centered=True, momentum=True), (0.9, 0.0, 0.5)),
    ("ademamix", AdEMAMix(), (0.9, 0.999, 0.9999, 5.0, 1e-8)),
    ("ademamix_warmup", AdEMAMix(t_alpha=10, t_beta3=10), (0.9, 0.999, 0.999, 8.0, 1e-8)),
    ("muon", MuonMomentum(), (0.95,)),
    ("muon_plain", MuonMomentum(nesterov=False), (0.95,)),
]
FORMAT_ROUNDINGS = [(f, r) for f in ("8bit", "4bit", "fp8") for r in (False, True)] + [("fp32", False)]
EPILOGUES = ["direction", "decoupled_bf16", "l2_apply", "decoupled_apply_bf16_sr"]


def rule_inputs(shape, epilogue_name, gen):
    """A gradient of ``shape`` over 15 decades with a NaN (one element), an all-zero row, subnormals and huge
    values (their squares overflow); the parameter and the epilogue of ``epilogue_name`` (``EPILOGUES``):
    float32 or bfloat16 gradient and parameter, the update returned or applied (bfloat16 stochastically)."""
    n = math.prod(shape)
    g = (torch.randn(n, generator=gen) * torch.logspace(-12, 3, n)).view(shape)
    flat = g.view(-1)
    flat[min(n - 1, 7 * 33 + 5)] = float("nan")
    flat[n // 2 : n // 2 + 3] = torch.tensor([1e-40, -3e-42, 1e-45])
    flat[-4:] = torch.tensor([3e38, -1e20, 2e19, -5.0])
    if shape[0] > 2:
        g[1] = 0.0
    p = torch.randn(shape, generator=gen)
    wd, lr = torch.tensor(0.1, dtype=torch.float64), torch.tensor(-1e-2, dtype=torch.float64)
    epilogue = {
        "direction": Epilogue(),
        "decoupled_bf16": Epilogue(wd, decoupled=True, factor=lr),
        "l2_apply": Epilogue(wd, l2=True, factor=lr, apply=True),
        "decoupled_apply_bf16_sr": Epilogue(wd, decoupled=True, factor=lr, apply=True, param_sr=True),
    }[epilogue_name]
    dtype = torch.bfloat16 if "bf16" in epilogue_name else torch.float32
    return g.to(dtype), p.to(dtype), epilogue


def check_rule(fmt, stochastic, rule, hyper, shape, epilogue_name, steps, gen, compiled):
    g, p, epilogue = rule_inputs(shape, epilogue_name, gen)
    moments = random_state(fmt, shape, rule.signed(), gen)
    for step in steps:
        ref, nat = both(fmt, g, moments, step, stochastic, rule=rule, hyper=hyper, param=p, epilogue=epilogue,
                        compiled=compiled)
        try:
            assert_identical(ref, nat, fmt)
        except AssertionError as err:
            raise AssertionError(f"{rule} {fmt} stochastic={stochastic} {epilogue_name} step {step}: {err}") from None
        assert ref[0].dtype == g.dtype
        moments = ref[1]


# the rules whose compiled graphs no other test builds, each in its richest variant (Adam's graphs are compiled by
# the tests above; every variant of every rule meets the eager reference below): a cold graph costs 20-90 s here
COMPILED = [k for k, (name, _, _) in enumerate(RULES) if name in ("lion", "nesterov", "rms_centered_momentum",
                                                                  "ademamix_warmup", "muon")]


@pytest.mark.parametrize("k", COMPILED, ids=[RULES[k][0] for k in COMPILED])
def test_every_rule_equals_the_compiled_reference(k):
    """Each rule against the compiled reference (one graph each: the format, rounding, epilogue and shape rotate
    over the rules); the wide matrix below uses the eager reference, which these cases tie to the compiled one."""
    _, rule, hyper = RULES[k]
    fmt, stochastic = FORMAT_ROUNDINGS[k % len(FORMAT_ROUNDINGS)]
    shape = [(41, 256), (37, 33), (3, 5, 301)][k % 3]
    check_rule(fmt, stochastic, rule, hyper, shape, EPILOGUES[k % len(EPILOGUES)], (1, 2, 1000),
               torch.Generator().manual_seed(k), compiled=True)


@pytest.mark.parametrize("fmt", ["8bit", "4bit", "fp8", "fp32"])
@pytest.mark.parametrize("k", range(len(RULES)), ids=[name for name, _, _ in RULES])
def test_every_rule_rounding_and_epilogue_equals_the_reference(k, fmt):
    """Every rule x format x rounding x epilogue (float32 or bfloat16 tensors, update or applied, bfloat16
    stochastic rounding), ragged rows and a short last block, a NaN, subnormal and huge gradients, the first step
    and later ones: the native kernel's bits are the reference's (run eagerly: no graph per case)."""
    _, rule, hyper = RULES[k]
    gen = torch.Generator().manual_seed(100 + k)
    for stochastic in (False, True) if fmt != "fp32" else (False,):
        for name in EPILOGUES:
            check_rule(fmt, stochastic, rule, hyper, (5, 545), name, (1, 3), gen, compiled=False)


@settings(max_examples=25, deadline=None)
@given(
    values=st.lists(st.floats(-(2.0**100), 2.0**100, allow_nan=False, width=32), min_size=1, max_size=600),
    k=st.integers(0, len(RULES) - 1),
    fmt=st.sampled_from(["8bit", "4bit", "fp8", "fp32"]),
    stochastic=st.booleans(),
    step=st.integers(1, 10**6),
    beta=st.floats(0.0, 0.999),
)
def test_every_rule_equals_the_reference_on_arbitrary_gradients(values, k, fmt, stochastic, step, beta):
    _, rule, hyper = RULES[k]
    hyper = (beta,) + hyper[1:]  # the first hyperparameter of every rule is a decay rate in [0, 1)
    g = torch.tensor(values, dtype=torch.float32)
    g = torch.nn.functional.pad(g, (0, -g.numel() % 3)).view(3, -1)  # three rows, ragged blocks
    moments = random_state(fmt, tuple(g.shape), rule.signed(), torch.Generator().manual_seed(step))
    ref, nat = both(fmt, g, moments, step, stochastic and fmt != "fp32", rule=rule, hyper=hyper, compiled=False)
    assert_identical(ref, nat, fmt)


def test_the_kernel_refuses_a_rule_it_does_not_know():
    """A rule number or moments the C kernel does not know are refused before anything is written."""
    from dataclasses import dataclass, replace
    from typing import ClassVar

    from lowbit_fn.kernels.native import native_serves_rule, native_step

    @dataclass(frozen=True)
    class Unknown(Lion):
        native_id: ClassVar[int] = 99

    assert all(native_serves_rule(rule) for _, rule, _ in RULES) and not native_serves_rule(Unknown())
    g = torch.randn(4, 300)
    moments = random_state("8bit", (4, 300), (True,), torch.Generator().manual_seed(0))
    before = [t.clone() for t in moments]
    out = torch.zeros_like(g)
    config = StepConfig(Unknown(), lowbit_fn.FORMATS["8bit"], 256, False, 0)
    with pytest.raises(ValueError, match="not a rule it knows"):
        native_step([g], [moments], [300], [0], [1], 1, torch.zeros(10), config, outs=[out])
    assert all(torch.equal(a, b) for a, b in zip(before, moments)) and not out.any()
    with pytest.raises(ValueError, match="moments"):  # Lion has one moment, not two
        native_step([g], [moments + moments], [300], [0], [1], 1, torch.zeros(10), replace(config, rule=Lion()), outs=[out])


@given(st.lists(st.floats(width=32, allow_nan=False), min_size=1, max_size=200))
def test_prefix_table_counts_like_a_search(values):
    for fmt in ("8bit", "4bit"):
        for signed in (True, False):
            table = lowbit_fn.FORMATS[fmt].codebook(signed)
            lut = prefix_table(table)
            y = torch.tensor(values, dtype=torch.float32)
            c = lut[(y.view(torch.int32).to(torch.int64) >> 16) & 0xFFFF].long()
            idx = (c + (table[c] < y).long()).clamp(max=table.numel() - 1)
            want = torch.searchsorted(table, y, side="left").clamp(max=table.numel() - 1)
            assert torch.equal(idx, want)


@given(st.lists(st.floats(-1.0, 1.0, width=32), min_size=1, max_size=200))
def test_nearest_thresholds_pick_the_nearest_code(values):
    from lowbit_fn.formats._base import nearest_code

    for fmt in ("8bit", "4bit"):
        for signed in (True, False):
            table = lowbit_fn.FORMATS[fmt].codebook(signed)
            y = torch.tensor(values, dtype=torch.float32)
            y = y if signed else y.abs()
            t = nearest_thresholds(table)
            want = nearest_code(y, table).long()
            assert torch.equal((t[1:-1, None] <= y).sum(0), want)  # the code counts the thresholds at or below y
            a = threshold_table(table)[(y.view(torch.int32).to(torch.int64) >> 16) & 0xFFFF].long()
            assert torch.equal(a + (t[a + 1] <= y).long(), want)  # the kernel's count: table, then one comparison


@pytest.mark.parametrize("fmt", ["4bit", "8bit", "fp8", "fp32"])
def test_training_is_identical_with_and_without_the_native_kernel(monkeypatch, fmt):
    from helpers import batches, mlp, run_functional

    model = mlp()
    start = lowbit_fn.params_from_module(model).clone()
    runs = []
    for native in ("1", "0"):
        monkeypatch.setenv("LOWBIT_FN_NATIVE", native)
        opt = lowbit_fn.adamw(1e-2, state_format=fmt, min_quant_size=100, amsgrad=True)
        runs.append(run_functional(model, opt, batches(4), params=start.clone()))
    (p1, s1), (p2, s2) = runs
    for key in p1.keys(include_nested=True, leaves_only=True):
        assert torch.equal(p1[key], p2[key])
    for key in s1.keys(include_nested=True, leaves_only=True):
        assert torch.equal(s1[key], s2[key])


def test_the_kernel_runs_on_torchs_own_openmp_runtime():
    """One OpenMP runtime in the process, torch's: the kernel's parallel region reuses torch's intra-op threads
    (two runtimes would each keep a pool of spinning threads on the same cores)."""
    p = torch.nn.Parameter(torch.randn(64, 256))
    p.grad = torch.randn(64, 256)
    lowbit_fn.AdamW8bit([p]).step()
    assert native_available(torch.device("cpu"))
    with open("/proc/self/maps") as maps:
        runtimes = {line.split()[-1] for line in maps if "libgomp" in line or "libiomp" in line}
    assert len(runtimes) == 1, runtimes


def test_without_a_c_compiler_one_warning_then_the_compiled_path(tmp_path):
    broken = run_build(tmp_path, "broken", tmp_path / "native-broken", formats=FORMATS3, CC="/nonexistent/cc")
    native = run_build(tmp_path, "native", tmp_path / "native-native", formats=FORMATS3)
    assert len(broken["warnings"]) == 1 and "native CPU kernel is unavailable" in broken["warnings"][0]
    assert broken["native"] is False
    assert native["warnings"] == [] and native["native"] is True
    assert list((tmp_path / "native-native").glob("native_*.so")), "the build is cached"
    for fmt, want in native["out"].items():
        assert torch.equal(broken["out"][fmt], want), fmt


@pytest.mark.parametrize("alias", ["adam", "adamw"])
@pytest.mark.parametrize("fmt", ["8bit", "4bit", "fp8"])
def test_fused_adam_step_equals_the_chain_bit_for_bit(alias, fmt):
    """adam/adamw run decay and learning rate inside the native step; the plain chain of the same pieces (the
    kernel's direction, then torch ops) must give the same updates and states, bit for bit."""
    gen = torch.Generator().manual_seed(1)
    params = {"a": torch.randn(300, 70, generator=gen), "b": torch.randn(2 * 4096 + 5, generator=gen),
              "c": torch.randn(10, generator=gen)}  # partial last blocks; "c" keeps full-precision state
    lr, wd = (lambda count: 1e-2 / (1 + count)), torch.tensor(0.05, dtype=torch.float64)
    kw = dict(state_format=fmt, min_quant_size=1000, amsgrad=fmt == "4bit")
    fused = getattr(lowbit_fn, alias)(lr, weight_decay=wd, **kw)
    core = lowbit_fn.scale_by_adam(**kw)
    decay, scale = lowbit_fn.add_decayed_weights(wd), lowbit_fn.scale_by_learning_rate(lr)
    plain = lowbit_fn.chain(core, decay, scale) if alias == "adamw" else lowbit_fn.chain(decay, core, scale)
    runs = []
    for opt in (fused, plain):
        p, state, seen = {k: v.clone() for k, v in params.items()}, opt.init(params), []
        for step in range(3):
            grads = {k: torch.randn(v.shape, generator=torch.Generator().manual_seed(step)) for k, v in p.items()}
            updates, state = opt.update(grads, state, p)
            seen.append(updates)
            p = lowbit_fn.apply_updates(p, updates)
        runs.append((seen, state))
    (u1, s1), (u2, s2) = runs
    for a, b in zip(u1, u2):
        for key in params:
            assert torch.equal(a[key], b[key]), key
    for key in s1.keys(include_nested=True, leaves_only=True):
        assert torch.equal(s1[key], s2[key]), key
    assert u1[0]["a"].abs().max() > 0


CODE_PATHS_SCRIPT = textwrap.dedent(
    """
    import sys, torch, lowbit_fn
    sys.path.insert(0, sys.argv[1])
    from test_native import EPILOGUES, FORMAT_ROUNDINGS, RULES, assert_identical, both, check_rule, random_state
    from lowbit_fn.kernels.native import native_available
    assert native_available(torch.device("cpu"))
    gen = torch.Generator().manual_seed(3)
    for fmt in ("8bit", "4bit", "fp8"):
        bs = lowbit_fn.FORMATS[fmt].default_block_size
        shape = (5, bs * 2 + 33)
        n = shape[0] * shape[1]
        g = (torch.randn(n, generator=gen) * torch.logspace(-12, 3, n)).view(shape)
        g[2, 1] = float("nan")
        for stochastic in (False, True):
            for nmom in (2, 3):
                moments = random_state(fmt, shape, nmom, gen)
                for step in (1, 7):
                    ref, nat = both(fmt, g, moments, step, stochastic)
                    assert_identical(ref, nat, fmt)
                    moments = ref[1]
    # every rule, format and rounding, the epilogues in turn (the eager reference: no graph per case)
    for k, (_, rule, hyper) in enumerate(RULES):
        for j, (fmt, stochastic) in enumerate(FORMAT_ROUNDINGS):
            epilogue = EPILOGUES[(k + j) % len(EPILOGUES)]
            check_rule(fmt, stochastic, rule, hyper, (5, 545), epilogue, (1, 7), gen, compiled=False)
    print("identical")
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("flags", ["-DLOWBIT_PORTABLE", "-mno-avx512vbmi"])
def test_other_code_paths_equal_the_reference(tmp_path, flags):
    """The kernel's other builds (portable C; AVX-512 without VBMI byte permutes) give the reference's bits too,
    for every rule."""
    env = {**os.environ, "LOWBIT_FN_CACHE": str(tmp_path), "LOWBIT_FN_NATIVE_FLAGS": flags}
    out = subprocess.run([sys.executable, "-c", CODE_PATHS_SCRIPT, os.path.dirname(__file__)], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and "identical" in out.stdout, out.stderr[-2000:]


BUILD_RACE_SCRIPT = textwrap.dedent(
    """
    import glob, os, sys, time
    from lowbit_fn.kernels import native
    ready, n = sys.argv[1], int(sys.argv[2])
    open(os.path.join(ready, str(os.getpid())), "w").close()
    deadline = time.monotonic() + 60
    while len(os.listdir(ready)) < n and time.monotonic() < deadline:  # start the builds together
        time.sleep(0.01)
    lib = native._library()
    assert lib is not None, "the native kernel did not load"
    st = os.stat(lib._name)
    print(os.getpid(), st.st_ino, st.st_mtime_ns, lib._name)
    """
)


@pytest.mark.slow
def test_concurrent_processes_build_once_and_load_the_same_library(tmp_path):
    """Eight processes needing the kernel at once (a torchrun's ranks): one compiles, the others wait and load the
    same file, which is never replaced; the cache holds that library and its lock file only."""
    import shutil

    n, cache, ready, log = 8, tmp_path / "cache", tmp_path / "ready", tmp_path / "cc.log"
    ready.mkdir()
    cc = tmp_path / "cc"  # counts the compiler's invocations (the parent pid of the exec'd shell is the process)
    cc.write_text(f'#!/bin/sh\necho "$PPID $*" >> "{log}"\nexec "{shutil.which(os.environ.get("CC", "gcc"))}" "$@"\n')
    cc.chmod(0o755)
    root = os.path.dirname(os.path.dirname(os.path.abspath(lowbit_fn.__file__)))
    env = {**os.environ, "LOWBIT_FN_CACHE": str(cache), "CC": str(cc), "LOWBIT_FN_NATIVE": "1",
           "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen([sys.executable, "-c", BUILD_RACE_SCRIPT, str(ready), str(n)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(n)]
    outs = []
    try:
        for proc in procs:
            outs.append(proc.communicate(timeout=120))
    finally:
        for proc in procs:
            proc.kill()
    report = "\n".join(f"[{p.pid}] rc={p.returncode}\n{out}{err[-2000:]}" for p, (out, err) in zip(procs, outs))
    assert all(p.returncode == 0 for p in procs), report
    compiles = [line.split()[0] for line in log.read_text().splitlines() if " -o " in line]
    assert len(compiles) == 1, f"{compiles}\n{report}"
    loaded = [out.split() for out, _ in outs]
    assert compiles[0] in [pid for pid, *_ in loaded], report  # the compiling process is one of ours
    assert len({(ino, mtime, name) for _, ino, mtime, name in loaded}) == 1, report
    assert sorted(f.suffix for f in cache.iterdir()) == [".lock", ".so"], sorted(os.listdir(cache))


# ------------------------------------------------------------------------- build environments that go wrong

BUILD_SCRIPT = textwrap.dedent(
    """
    import sys, warnings, torch, lowbit_fn
    torch.manual_seed(0)
    params = {"w": torch.randn(64, 300)}
    grads = [{"w": torch.randn(64, 300)} for _ in range(2)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = {}
        for fmt in sys.argv[2].split(","):
            opt = lowbit_fn.adamw(1e-2, state_format=fmt, min_quant_size=0)
            p, state = params, opt.init(params)
            for g in grads:
                u, state = opt.update(g, state, p)
                p = lowbit_fn.apply_updates(p, u)
            out[fmt] = p["w"]
        from lowbit_fn.kernels.native import native_available
        native = native_available(torch.device("cpu"))
    ours = [str(w.message) for w in caught if str(w.message).startswith("lowbit_fn:")]
    torch.save({"warnings": ours, "native": native, "out": out}, sys.argv[1])
    """
)
FORMATS3 = ("8bit", "4bit", "fp8")


def run_build(tmp_path, name, cache, wrap=(), formats=("8bit",), **env):
    """BUILD_SCRIPT in a fresh process with ``LOWBIT_FN_CACHE=cache`` (a crash shows as a failed test, not a
    dead worker); returns its warnings, whether the native kernel ran and, per format, the parameter after two
    steps (``out``; the result's ``p``: the first format's)."""
    path = tmp_path / f"{name}.pt"
    full = {**os.environ, "LOWBIT_FN_CACHE": str(cache), **env}
    out = subprocess.run([*wrap, sys.executable, "-c", BUILD_SCRIPT, str(path), ",".join(formats)], env=full,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, f"rc {out.returncode}\n{out.stderr[-3000:]}"
    result = torch.load(path, weights_only=False)
    return {**result, "p": result["out"][formats[0]]}


@pytest.fixture(scope="module")
def compiled_result(tmp_path_factory):
    """BUILD_SCRIPT's parameter on the compiled path (LOWBIT_FN_NATIVE=0): what every case must give."""
    tmp = tmp_path_factory.mktemp("compiled")
    result = run_build(tmp, "compiled", tmp / "cache", LOWBIT_FN_NATIVE="0")
    assert result["warnings"] == [] and not result["native"]
    return result["p"]


def current_library():
    from lowbit_fn.kernels import native

    return Path(native._library()._name)


def assert_fell_back(result, compiled_result, *words):
    assert len(result["warnings"]) == 1, result["warnings"]
    (message,) = result["warnings"]
    assert "native CPU kernel is unavailable" in message and "compiled torch path" in message, message
    for word in words:
        assert word in message, message
    assert result["native"] is False
    assert torch.equal(result["p"], compiled_result)


def test_a_failing_compiler_one_warning_with_its_error_then_the_compiled_path(tmp_path, compiled_result):
    cc = tmp_path / "cc"  # runs (--version) but every build fails, with a message
    cc.write_text('#!/bin/sh\n[ "$1" = --version ] && { echo "fake cc 1.0"; exit 0; }\n'
                  'echo "cc: error: simulated failure" >&2\nexit 3\n')
    cc.chmod(0o755)
    result = run_build(tmp_path, "failing", tmp_path / "cache", CC=str(cc))
    assert_fell_back(result, compiled_result, "failed (exit status 3)", "simulated failure")
    assert [f.suffix for f in (tmp_path / "cache").iterdir()] == [".lock"]  # no partial library left behind


def test_a_compiler_that_does_not_run_one_warning_then_the_compiled_path(tmp_path, compiled_result):
    cc = tmp_path / "cc"
    cc.write_text("#!/bin/sh\nexit 1\n")
    cc.chmod(0o755)
    result = run_build(tmp_path, "broken", tmp_path / "cache", CC=str(cc))
    assert_fell_back(result, compiled_result, "does not run", str(cc))


def test_a_full_filesystem_one_warning_then_the_compiled_path(tmp_path, compiled_result):
    """Every file the build writes is capped at 20 KiB (a per-process file size limit: writes past it fail with
    EFBIG, as they fail with ENOSPC on a full disk); the library is larger, so the build cannot write it."""
    cc = tmp_path / "cc"
    gcc = shutil.which(os.environ.get("CC", "gcc"))
    cc.write_text(f'#!/bin/sh\ntrap "" XFSZ\nulimit -f 40\nexec "{gcc}" "$@"\n')
    cc.chmod(0o755)
    result = run_build(tmp_path, "full", tmp_path / "cache", CC=str(cc))
    assert_fell_back(result, compiled_result, "File too large")
    assert [f.suffix for f in (tmp_path / "cache").iterdir()] == [".lock"]


def read_only(cache):
    """A command prefix under which ``cache`` is read-only: its permission bits for an ordinary user; for root
    (whom permission bits do not stop) a read-only bind mount in a private mount namespace."""
    if os.geteuid() != 0:
        cache.chmod(0o555)
        return ()
    probe = subprocess.run(["unshare", "--mount", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("root without mount namespaces: a read-only directory cannot be made here")
    return ("unshare", "--mount", "sh", "-c",
            f'mount --bind "{cache}" "{cache}" && mount -o remount,bind,ro "{cache}" && exec "$@"', "sh")


@pytest.mark.parametrize("content", ["none", "truncated"])
def test_a_read_only_cache_one_warning_then_the_compiled_path(tmp_path, compiled_result, content):
    """Nothing to load and nowhere to build it; or a truncated library that cannot be replaced (never loaded: it
    would crash the process)."""
    cache = tmp_path / "cache"
    cache.mkdir()
    if content == "truncated":
        good = current_library()
        (cache / good.name).write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    result = run_build(tmp_path, "ro", cache, read_only(cache))
    words = ["cannot write to the cache directory"] if content == "none" else ["truncated or corrupt", "cannot be removed"]
    assert_fell_back(result, compiled_result, *words)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "unsealed"])
def test_a_damaged_cached_library_is_rebuilt_with_one_warning(tmp_path, compiled_result, damage):
    """A cached library cut short (which ``dlopen`` would map and the first call would crash on, SIGBUS), random
    bytes, or a whole library without its seal, under the current key: refused before loading, rebuilt in place."""
    from lowbit_fn.kernels.native import _SEAL_BYTES, _sealed

    cache = tmp_path / "cache"
    cache.mkdir()
    good = current_library()
    data = good.read_bytes()
    planted = {"truncated": data[: len(data) // 2], "garbage": os.urandom(len(data)), "unsealed": data[:-_SEAL_BYTES]}[damage]
    (cache / good.name).write_bytes(planted)
    result = run_build(tmp_path, damage, cache)
    assert len(result["warnings"]) == 1, result["warnings"]
    assert "was truncated or corrupt" in result["warnings"][0] and "rebuilding" in result["warnings"][0]
    assert result["native"] is True
    assert torch.equal(result["p"], compiled_result)
    assert _sealed(cache / good.name) and (cache / good.name).stat().st_size == len(data)
    assert run_build(tmp_path, damage + "-again", cache)["warnings"] == []  # the rebuilt library is used as is


@pytest.mark.parametrize("planted", ["other library", "not an ELF file"])
def test_a_wrong_sealed_library_one_warning_then_the_compiled_path(tmp_path, compiled_result, planted):
    """A sealed file under the current key that is not this build of the kernel (as a library copied from another
    machine or version would be): another library whose layout check fails, or a file ``dlopen`` refuses. A
    library for another CPU gets another key (the CPU's flags are in it): one with instructions this CPU lacks
    would be killed by SIGILL at its first call, which no check after loading can catch."""
    from lowbit_fn.kernels.native import _seal

    cache = tmp_path / "cache"
    cache.mkdir()
    target = cache / current_library().name
    if planted == "other library":
        stub = tmp_path / "stub.c"
        stub.write_text("int lowbit_abi(void) { return -1; }\nint lowbit_step(void) { return 0; }\n")
        subprocess.run([os.environ.get("CC", "gcc"), "-shared", "-fPIC", str(stub), "-o", str(target)], check=True)
        words = ["is another version's", "delete it"]
    else:
        target.write_bytes(b"\x7fELF" + os.urandom(4000))
        words = ["does not load", "delete it"]
    _seal(target)
    result = run_build(tmp_path, "wrong", cache)
    assert_fell_back(result, compiled_result, str(target), *words)
