"""Optimizer step speed and state memory: lowbit_fn's AdamW against ``torch.optim.AdamW``.

What is measured
    One *step* of every optimizer on the same model-shaped set of float32 parameters, with the same fixed random
    gradients reused at every step:

    * ``lowbit_fn <format>``: ``opt.update(grads, state, params)`` followed by ``lowbit_fn.apply_updates(params,
      updates)`` for ``opt = lowbit_fn.adamw(learning_rate=1e-3, weight_decay=1e-2, state_format=<format>)``,
      i.e. a full step through the functional API (the state is donated, so it is updated in place).
    * ``lowbit_fn <Class>``: the same step through the torch.optim front end (``lowbit_fn.AdamW8bit``, ...,
      ``lowbit_fn.AdamW`` for fp32 state) with ``.grad`` set, timing ``opt.step()`` (``--apis torch_optim``).
    * ``torch fused fp32`` / ``torch foreach fp32``: ``torch.optim.AdamW(..., fused=True)`` (resp.
      ``foreach=True``) with ``.grad`` set to the same gradients, timing ``opt.step()``.
    * torchao / bitsandbytes low-bit AdamW, only when those packages are importable.

    Model shapes (``REFERENCE_MODELS``): ``tlike100``, 100 tensors and 25.3 M elements shaped like a small
    transformer (12 x [1024, 1024], 3 x [4096, 1024], 3 x [4096], 82 x [1024]); ``flat16M``, one tensor of
    16 x 2**20 elements. ``--scale`` multiplies every tensor's first dimension (at least 1) for quick runs.

How it is timed
    Every optimizer first takes one step timed on its own ("first step s (warm)": it includes any compilation
    and the native kernel's loading, with whatever the on-disk caches already hold) and one more untimed warm-up
    step. "first step s (cold)" (functional rows; ``--no-cold`` skips it) is the first step of a fresh process
    whose caches (``TORCHINDUCTOR_CACHE_DIR``, ``LOWBIT_FN_CACHE``) start empty: a new user's first step,
    including the build of the native kernel. Then, for
    ``--rounds`` rounds, every optimizer runs ``--steps`` steps back to back, timed as a whole; optimizers are
    interleaved within a round and the order is reversed every other round, so slow drifts of the machine hit
    all of them alike. The table gives the median over rounds of the per-step milliseconds, and the ratio of
    that median to the fused torch AdamW's median from the same run.

    ``OMP_WAIT_POLICY=PASSIVE`` (idle OpenMP threads sleep instead of spinning) and ``THP_MEM_ALLOC_ENABLE=1``
    (transparent huge pages for large CPU allocations) are set before torch is imported, unless already set.
    A contention check runs before and after the measurements: a fixed small workload (20 x ``torch.mm`` of
    512 x 512 float32, one thread) timed alone, then timed while a second process runs the same workload. On an
    idle two-core machine the ratio is about 1; a clearly larger ratio means another job was using the cores,
    and the timings of that run are suspect.

Memory columns
    "step peak extra": the most memory that one step's own allocations hold at the same time (torch profiler
    memory events; the native kernel's few KiB of scratch are outside torch's allocator and not counted), in bytes
    per element of the model's largest tensor: 8 B/elem is the budget of issue 6, and a step that allocates an
    update for every parameter (the functional API, by its contract) needs 8 B per element of *all* of them.
    "state B/elem (all)": bytes of every optimizer-state tensor divided by the number of parameter elements.
    "state B/elem (quantized tensors)": for lowbit_fn, bytes of the quantized group(s) of the state (entries
    named ``<format>_block<N>``) divided by the elements of the parameters in them (those with at least 4096
    elements); for other low-bit optimizers, the same over their quantized per-parameter states.

Usage:
    python benchmarks/step_speed.py [--models tlike100 flat16M] [--formats fp32 8bit 4bit fp8]
                                    [--apis functional torch_optim] [--rounds 5] [--steps 5] [--scale 1.0]
                                    [--markdown PATH]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import argparse  # noqa: E402
import datetime  # noqa: E402
import gc  # noqa: E402
import re  # noqa: E402
import shlex  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Any, Callable, Iterable  # noqa: E402

import torch  # noqa: E402
from tensordict import TensorDict, TensorDictBase  # noqa: E402
from torch import Tensor  # noqa: E402

import lowbit_fn  # noqa: E402

__all__ = ["REFERENCE_MODELS", "main"]

Shape = tuple[int, ...]

REFERENCE_MODELS: dict[str, list[Shape]] = {
    "tlike100": [(1024, 1024)] * 12 + [(4096, 1024)] * 3 + [(4096,)] * 3 + [(1024,)] * 82,
    "flat16M": [(16 * 2**20,)],
}
FORMATS = ("fp32", "8bit", "4bit", "fp8")
LEARNING_RATE = 1e-3
WEIGHT_DECAY = 1e-2
MIN_QUANT_SIZE = 4096
APIS = ("functional", "torch_optim")
TORCH_OPTIM_CLASSES = {"fp32": "AdamW", "8bit": "AdamW8bit", "4bit": "AdamW4bit", "fp8": "AdamWFp8"}  # lowbit_fn's default: smaller tensors keep fp32 state
FUSED = "torch fused fp32"
FOREACH = "torch foreach fp32"
_QUANT_GROUP = re.compile(r"_block\d+$")


# ----------------------------------------------------------------------------------------------- the models


def scaled_shapes(shapes: Iterable[Shape], scale: float) -> list[Shape]:
    """``shapes`` with every first dimension multiplied by ``scale`` (rounded, at least 1)."""
    return [(max(1, round(s[0] * scale)), *s[1:]) for s in shapes]


def make_tensors(shapes: list[Shape], seed: int = 0) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Random float32 params and grads for ``shapes``, keyed ``p000``, ``p001``, ... (fixed by ``seed``)."""
    gen = torch.Generator().manual_seed(seed)
    params = {f"p{i:03d}": torch.randn(s, generator=gen) * 0.02 for i, s in enumerate(shapes)}
    grads = {k: torch.randn(v.shape, generator=gen) * 1e-3 for k, v in params.items()}
    return params, grads


def tensor_bytes(t: Tensor) -> int:
    """Storage bytes of ``t``; for tensor subclasses (e.g. torchao's quantized states), of their inner tensors."""
    flatten = getattr(type(t), "__tensor_flatten__", None)
    if flatten is not None:
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


# ----------------------------------------------------------------------------------------------- the runners


@dataclass
class Runner:
    """One optimizer on its own copy of the params: ``step()`` does one full step."""

    name: str
    step: Callable[[], None]
    memory: Callable[[], tuple[float | None, float]]  # (quantized B/elem or None, all B/elem)
    first_s: float = float("nan")
    peak_bytes: int | None = None  # extra memory allocated during one step, at its peak


def lowbit_runner(fmt: str, params: dict[str, Tensor], grads: dict[str, Tensor]) -> Runner:
    opt = lowbit_fn.adamw(learning_rate=LEARNING_RATE, weight_decay=WEIGHT_DECAY, state_format=fmt)
    grads_td = TensorDict(grads, batch_size=[])
    holder: dict[str, TensorDictBase] = {"params": TensorDict({k: v.clone() for k, v in params.items()}, batch_size=[])}
    holder["state"] = opt.init(holder["params"])
    numel = sum(p.numel() for p in params.values())
    qnumel = sum(p.numel() for p in params.values() if p.numel() >= MIN_QUANT_SIZE)

    def step() -> None:
        updates, holder["state"] = opt.update(grads_td, holder["state"], holder["params"])
        holder["params"] = lowbit_fn.apply_updates(holder["params"], updates)

    def memory() -> tuple[float | None, float]:
        state = holder["state"]
        total = sum(tensor_bytes(t) for t in state.values(include_nested=True, leaves_only=True))
        adam_state = state["0"]
        quant = [
            tensor_bytes(t)
            for key in adam_state.keys()
            if _QUANT_GROUP.search(key)
            for t in adam_state[key].values(include_nested=True, leaves_only=True)
        ]
        qbytes = sum(quant) / qnumel if quant and qnumel else None
        return qbytes, total / numel

    return Runner(f"lowbit_fn {fmt}", step, memory)


def _is_quantized(t: Tensor) -> bool:
    """Whether a torch.optim-style state tensor is low-bit: a tensor subclass (torchao) or 8-bit codes (bitsandbytes)."""
    return type(t) not in (Tensor, torch.nn.Parameter) or t.dtype in (torch.uint8, torch.int8)


def torch_optim_runner(
    name: str, factory: Callable[[list[Tensor]], torch.optim.Optimizer], params: dict[str, Tensor], grads: dict[str, Tensor]
) -> Runner:
    """A ``torch.optim``-style optimizer (also torchao's / bitsandbytes') on leaf copies of ``params``."""
    leaves = [torch.nn.Parameter(p.clone()) for p in params.values()]
    for leaf, g in zip(leaves, grads.values()):
        leaf.grad = g  # AdamW reads the grads without changing them: all steps see the same ones
    opt = factory(leaves)
    numel = sum(p.numel() for p in leaves)

    def memory() -> tuple[float | None, float]:
        total, qbytes, qnumel = 0, 0, 0
        for p in leaves:
            tensors = [t for t in opt.state[p].values() if isinstance(t, Tensor)]
            nbytes = sum(tensor_bytes(t) for t in tensors)
            total += nbytes
            if any(_is_quantized(t) for t in tensors):
                qbytes, qnumel = qbytes + nbytes, qnumel + p.numel()
        return (qbytes / qnumel if qnumel else None), total / numel

    return Runner(name, opt.step, memory)


def optional_runners(params: dict[str, Tensor], grads: dict[str, Tensor]) -> tuple[list[Runner], list[str]]:
    """torchao / bitsandbytes low-bit AdamW runners where those packages are importable, and notes about them."""
    runners: list[Runner] = []
    notes: list[str] = []
    kwargs: dict[str, Any] = {"lr": LEARNING_RATE, "weight_decay": WEIGHT_DECAY}
    factories: list[tuple[str, Callable[[list[Tensor]], torch.optim.Optimizer]]] = []
    try:
        try:
            from torchao.optim import AdamW4bit, AdamW8bit, AdamWFp8
        except ImportError:
            from torchao.prototype.low_bit_optim import AdamW4bit, AdamW8bit, AdamWFp8  # older torchao
        factories += [
            ("torchao 8bit", lambda ps: AdamW8bit(ps, **kwargs)),
            ("torchao 4bit", lambda ps: AdamW4bit(ps, **kwargs)),
            ("torchao fp8", lambda ps: AdamWFp8(ps, **kwargs)),
        ]
    except ImportError:
        notes.append("torchao: not installed, no rows")
    try:
        import bitsandbytes as bnb

        factories.append(("bitsandbytes 8bit", lambda ps: bnb.optim.AdamW8bit(ps, **kwargs)))
    except ImportError:
        notes.append("bitsandbytes: not installed, no rows")
    for name, factory in factories:
        try:
            runner = torch_optim_runner(name, factory, params, grads)
            runner.first_s = _timed(runner.step)
            runner.step()
        except Exception as err:  # an optional baseline that does not run here (e.g. no CPU support) is skipped
            notes.append(f"{name}: skipped ({type(err).__name__}: {str(err).splitlines()[0][:120] if str(err) else ''})")
            continue
        runners.append(runner)
    return runners, notes


def peak_step_bytes(step: Callable[[], None]) -> int | None:
    """Peak bytes of the torch allocations made during one ``step()`` and live at the same time (from the torch
    profiler's memory events), or ``None`` where the profiler gives none. Memory outside torch's allocator (the
    native kernel's scratch: six blocks of float32 per thread) is not included."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    try:
        events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    except AttributeError:  # a torch without these (private) results
        return None
    live = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)
    return peak


def _timed(fn: Callable[[], None]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


_COLD_CHILD = """
import json, sys, time
sys.path.insert(0, sys.argv[1])
import step_speed, torch
params, grads = step_speed.make_tensors(step_speed.scaled_shapes(step_speed.REFERENCE_MODELS[sys.argv[2]], float(sys.argv[4])))
runner = step_speed.lowbit_runner(sys.argv[3], params, grads)
t0 = time.perf_counter()
runner.step()
print(json.dumps(time.perf_counter() - t0))
"""


def cold_first_step(model: str, fmt: str, scale: float) -> float:
    """Seconds of the first functional step in a fresh process with empty caches (torch.compile's and the native
    kernel's build): what a new user's first step costs."""
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=os.path.join(tmp, "inductor"), LOWBIT_FN_CACHE=os.path.join(tmp, "native"))
        here = os.path.dirname(os.path.abspath(__file__))
        out = subprocess.run(
            [sys.executable, "-c", _COLD_CHILD, here, model, fmt, str(scale)], env=env, capture_output=True, text=True, check=True
        )
    return float(out.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------- contention


_PROBE_REPS = 20
_PROBE_N = 512
_PROBE_CHILD = f"""
import os, statistics, sys, time
import torch
torch.set_num_threads(1)
a, b = torch.randn({_PROBE_N}, {_PROBE_N}), torch.randn({_PROBE_N}, {_PROBE_N})
torch.mm(a, b)
print("ready", flush=True)
sys.stdin.readline()
times, start = [], time.perf_counter()
while time.perf_counter() - start < float(sys.argv[1]):
    t0 = time.perf_counter()
    for _ in range({_PROBE_REPS}):
        torch.mm(a, b)
    times.append(time.perf_counter() - t0)
print(statistics.median(times), flush=True)
"""


@dataclass
class Contention:
    alone_s: float  # the workload in this process, nothing else of ours running
    together_s: float  # the same while the second process runs it
    other_s: float  # the second process's own time

    @property
    def ratio(self) -> float:
        return self.together_s / self.alone_s

    def describe(self, when: str) -> str:
        return (
            f"contention check ({when}): {_PROBE_REPS} x mm {_PROBE_N}x{_PROBE_N} fp32, 1 thread: alone "
            f"{self.alone_s * 1e3:.1f} ms; with a 2nd process running it too {self.together_s * 1e3:.1f} ms here, "
            f"{self.other_s * 1e3:.1f} ms there; ratio {self.ratio:.2f} (about 1: the second core was free; about 2: it was busy)"
        )


def _probe_in_process(repeats: int) -> float:
    """Median time of the workload (one thread) over ``repeats`` runs in this process."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        gen = torch.Generator().manual_seed(1)
        a, b = torch.randn(_PROBE_N, _PROBE_N, generator=gen), torch.randn(_PROBE_N, _PROBE_N, generator=gen)
        torch.mm(a, b)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(_PROBE_REPS):
                torch.mm(a, b)
            times.append(time.perf_counter() - t0)
        return statistics.median(times)
    finally:
        torch.set_num_threads(threads)


def contention_check() -> Contention:
    """Time the probe alone, then while a second process runs it at the same time."""
    alone = _probe_in_process(5)
    window = max(0.2, 8 * alone)  # the child keeps busy while this process takes its 3 measurements
    env = dict(os.environ, OMP_NUM_THREADS="1")
    child = subprocess.Popen(
        [sys.executable, "-c", _PROBE_CHILD, str(window)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
    )
    try:
        assert child.stdin is not None and child.stdout is not None
        if child.stdout.readline().strip() != "ready":
            raise RuntimeError("contention check: the second process did not start")
        child.stdin.write("go\n")
        child.stdin.flush()
        together = _probe_in_process(3)
        other = float(child.stdout.readline())
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    return Contention(alone, together, other)


# ----------------------------------------------------------------------------------------------- measuring


def measure_model(
    model: str, shapes: list[Shape], formats: list[str], rounds: int, steps: int, apis: Iterable[str] = APIS,
    scale: float = 1.0, cold_start: bool = True,
) -> tuple[list[dict[str, Any]], list[str]]:
    """Rows for every optimizer on one model, and notes (skipped optional baselines)."""
    params, grads = make_tensors(shapes)
    hyper: dict[str, Any] = {"lr": LEARNING_RATE, "weight_decay": WEIGHT_DECAY}
    runners = [
        torch_optim_runner(FUSED, lambda ps: torch.optim.AdamW(ps, **hyper, fused=True), params, grads),
        torch_optim_runner(FOREACH, lambda ps: torch.optim.AdamW(ps, **hyper, foreach=True), params, grads),
    ]
    if "functional" in apis:
        runners += [lowbit_runner(fmt, params, grads) for fmt in formats]
    if "torch_optim" in apis:
        for fmt in formats:
            cls = getattr(lowbit_fn, TORCH_OPTIM_CLASSES[fmt])
            runners.append(torch_optim_runner(f"lowbit_fn {cls.__name__}", lambda ps, c=cls: c(ps, **hyper), params, grads))
    for runner in runners:
        runner.first_s = _timed(runner.step)
        runner.step()  # one untimed warm-up step
    extra, notes = optional_runners(params, grads)
    runners += extra
    largest = max(p.numel() for p in params.values())
    del params
    for runner in runners:
        runner.peak_bytes = peak_step_bytes(runner.step)

    per_step: dict[str, list[float]] = {r.name: [] for r in runners}
    for i in range(rounds):
        for runner in runners if i % 2 == 0 else runners[::-1]:
            t0 = time.perf_counter()
            for _ in range(steps):
                runner.step()
            per_step[runner.name].append((time.perf_counter() - t0) / steps * 1e3)

    medians = {name: statistics.median(ms) for name, ms in per_step.items()}
    cold = {f"lowbit_fn {fmt}": cold_first_step(model, fmt, scale) for fmt in formats} if cold_start else {}
    rows = []
    for runner in runners:
        qbytes, nbytes = runner.memory()
        rows.append({
            "model": model,
            "optimizer": runner.name,
            "ms": medians[runner.name],
            "ratio": medians[runner.name] / medians[FUSED],
            "qbytes": qbytes,
            "bytes": nbytes,
            "first_s": runner.first_s,
            "cold_s": cold.get(runner.name),
            "peak": None if runner.peak_bytes is None else runner.peak_bytes / largest,
        })
    return rows, notes


# ----------------------------------------------------------------------------------------------- reporting


def _num(value: float | None, digits: int) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _ms(value: float) -> str:
    return f"{value:.1f}" if value >= 100 else f"{value:.2f}" if value >= 1 else f"{value:.3f}"


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| model | optimizer | ms/step | × fused fp32 | state B/elem (quantized tensors) | state B/elem (all) "
        "| first step s (warm) | first step s (cold) | step peak extra, B/elem of largest tensor |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['optimizer']} | {_ms(r['ms'])} | {_num(r['ratio'], 2)} | {_num(r['qbytes'], 3)} "
            f"| {_num(r['bytes'], 3)} | {_num(r['first_s'], 2)} | {_num(r.get('cold_s'), 2)} | {_num(r.get('peak'), 2)} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=list(REFERENCE_MODELS), default=list(REFERENCE_MODELS))
    parser.add_argument("--formats", nargs="+", choices=list(FORMATS), default=list(FORMATS), help="lowbit_fn state formats")
    parser.add_argument("--apis", nargs="+", choices=list(APIS), default=list(APIS), help="lowbit_fn front ends to time")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds; the table gives the median (default 5)")
    parser.add_argument("--steps", type=int, default=5, help="steps per optimizer per round (default 5)")
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies every tensor's first dimension (default 1.0)")
    parser.add_argument("--markdown", metavar="PATH", help="also write the report to this file")
    parser.add_argument("--no-cold", dest="cold", action="store_false", help="skip the cold first-step measurements")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.steps < 1:
        parser.error("--rounds and --steps must be >= 1")
    if not args.scale > 0:
        parser.error("--scale must be > 0")
    return args


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Run the benchmark, print the Markdown report, and return the table's rows.

    Each row is a dict with ``model``, ``optimizer``, ``ms`` (median ms per step), ``ratio`` (to the fused torch
    AdamW), ``qbytes`` (state bytes per element of the quantized tensors, ``None`` without any), ``bytes`` (all
    state bytes per parameter element), ``first_s`` (seconds of the first step in this process, with whatever the
    on-disk caches hold: warm after any earlier run) and ``cold_s`` (functional rows: the first step in a fresh
    process with empty caches; ``None`` elsewhere or with ``--no-cold``).
    """
    if argv is None:
        command = shlex.join(sys.orig_argv)
    else:
        command = f"step_speed.main({argv!r})"
    args = parse_args(argv)

    header = (
        f"lowbit_fn step speed, {datetime.datetime.now().isoformat(timespec='seconds')}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, cpu capability {torch.backends.cpu.get_cpu_capability()}\n"
        f"command: `{command}`"
    )
    print(header, flush=True)
    before = contention_check()
    print(before.describe("before"), flush=True)

    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    for model in args.models:
        shapes = scaled_shapes(REFERENCE_MODELS[model], args.scale)
        numel = sum(torch.Size(s).numel() for s in shapes)
        print(f"measuring {model}: {len(shapes)} tensors, {numel / 1e6:.2f} M elements ...", flush=True)
        model_rows, model_notes = measure_model(
            model, shapes, args.formats, args.rounds, args.steps, args.apis, args.scale, args.cold
        )
        rows += model_rows
        notes += [n for n in model_notes if n not in notes]
        gc.collect()

    after = contention_check()
    report = "\n".join([
        header,
        "",
        f"median of {args.rounds} rounds x {args.steps} steps, interleaved; scale {args.scale:g}",
        "",
        markdown_table(rows),
        "",
        before.describe("before"),
        after.describe("after"),
        *notes,
    ])
    print(after.describe("after"))
    print()
    print(markdown_table(rows))
    print()
    for note in notes:
        print(note)
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as fh:
            fh.write(report + "\n")
    return rows


if __name__ == "__main__":
    main()
