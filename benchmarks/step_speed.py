"""Optimizer step speed and memory: lowbit_fn's AdamW against ``torch.optim.AdamW`` (``--optimizers``: other families).

What is measured
    One *step* of every optimizer on the same model-shaped set of parameters, all of one dtype (``--dtype``:
    float32, the default, bfloat16 or float16; the gradients have the params' dtype), with the same fixed random
    gradients reused at every step (the in-place rows feed their own buffers instead, see below):

    * ``lowbit_fn <format>`` (``--apis functional``): ``opt.update(grads, state, params)`` followed by
      ``lowbit_fn.apply_updates(params, updates)``, both pure (``inplace=False``), for ``opt =
      lowbit_fn.adamw(learning_rate=1e-3, weight_decay=1e-2, state_format=<format>)``: a full step through the
      functional API that returns new updates and new params (the state is donated, so it is updated in place).
    * ``lowbit_fn <format> (functional, inplace)`` (``--apis functional_inplace``): the same two calls with
      ``inplace=True``: ``update`` writes the updates into the gradients' buffers and ``apply_updates`` adds them
      into the params' own tensors. The runner has its own copy of the gradients; every step overwrites it with
      that step's updates, and the same buffers are fed again, as they are, as the next step's gradients (no copy
      in the timed region). The updates are about as large as the gradients (``learning_rate`` = 1e-3 times a
      direction of magnitude about 1, against gradients of standard deviation 1e-3), so the kernel sees
      representative values and the timing is that of a real step.
    * ``lowbit_fn <format> (apply_gradients, inplace)`` (``--apis apply_gradients``): the same step in one call,
      ``params, state = lowbit_fn.apply_gradients(opt, grads, state, params, inplace=True)``, which adds each
      update into its parameter inside the Adam step's own pass (the gradients are only read).
    * ``lowbit_fn <Class>`` (``--apis torch_optim``): the torch.optim front end (``lowbit_fn.AdamW8bit``, ...,
      ``lowbit_fn.AdamW`` for fp32 state) with ``.grad`` set, timing ``opt.step()``.
    * ``torch fused <dtype>`` / ``torch foreach <dtype>``: ``torch.optim.AdamW(..., fused=True)`` (resp.
      ``foreach=True``) with ``.grad`` set to the same gradients, timing ``opt.step()``; torch keeps its moments in
      the params' dtype (``fp32``, ``bf16``, ``fp16``). A baseline that raises for the dtype is skipped, with a note.
    * torchao / bitsandbytes low-bit AdamW, only when those packages are importable and run here (else a note).

    Optimizer families (``--optimizers``, default ``adamw``: the rows above, and only those): for each family
    named, lowbit_fn's rows of that optimizer (the same ``--apis`` and ``--formats``: ``lowbit_fn lion 8bit``,
    ``lowbit_fn lion 8bit (apply_gradients, inplace)``, ``lowbit_fn Lion8bit``, ...) are timed side by side with

    * torch's fastest implementation of the same optimizer on the same tensors (``torch SGD fused fp32``,
      ``torch RMSprop foreach fp32``): ``fused=True`` where the class takes it and a step of it runs on CPU for the
      dtype (tried once on a small tensor), else ``foreach=True``; the report says which. torch has no Lion and no
      AdEMAMix: their rows are compared with ``torch.optim.AdamW(fused=True)`` (AdamW's hyperparameters), the
      reference step, and the report says so;
    * bitsandbytes' 8-bit class of the family (``bnb.optim.Lion8bit``, ``SGD8bit``, ``RMSprop8bit``,
      ``AdEMAMix8bit``; ``AdamW8bit`` among AdamW's peers) where bitsandbytes is importable (else a note).

    Each family is measured in its own interleaved rounds (below) with its reference and peer, so its ratios
    ("× torch ref", "× bitsandbytes 8bit") are side by side in the same run; AdamW's rows stay in the first
    table, the other families' rows go to a second table with a "kernel" column: the kernel that ran lowbit_fn's
    step (``native``: the C kernel, for every rule on the CPU; ``compiled``: the compiled torch path). Summary lines give, per family and format, the
    torch.optim front end's and apply_gradients' step as a ratio to the reference. Hyperparameters
    (:data:`FAMILIES`): AdamW lr 1e-3, weight decay 1e-2; Lion lr 1e-4, decoupled weight decay 0.1; SGD lr 0.1,
    momentum 0.9, weight decay 1e-2 (lr / (1 - momentum) = 1 keeps the in-place rows' fed-back updates at the
    gradients' size); RMSprop lr 1e-3 (alpha 0.99, no momentum), weight decay 1e-2; AdEMAMix lr 1e-3, weight decay
    1e-2 (b3 0.9999, alpha 5); Muon lr 0.02 on the model's 2-D tensors only (as torch.optim.Muon, whose one
    implementation is the reference: it takes neither ``fused`` nor ``foreach``). The cold first step is measured
    for AdamW's rows only.

    lowbit_fn's rows run the native path (``--paths native``, the default: the C kernel, for every rule it
    serves). ``--paths compiled`` adds the same rows on the compiled torch path, named with a ``(compiled)``
    suffix: ``LOWBIT_FN_NATIVE=0`` is set around those runners' step calls only (and restored after), so every
    other row keeps the native kernel.

    Model shapes (``REFERENCE_MODELS``): ``tlike100``, 100 tensors and 25.3 M elements shaped like a small
    transformer (12 x [1024, 1024], 3 x [4096, 1024], 3 x [4096], 82 x [1024]); ``sq16M``, one [4096, 4096]
    tensor (16.8 M elements; lowbit_fn quantizes the state of tensors of two or more dimensions with at least 4096
    elements, 1-D ones keep fp32 state); ``m64x1M``, 64 x [1024, 1024] (67.1 M elements: the step-memory case, run
    with ``--dtype bfloat16``; not in the default ``--models``). ``--scale`` multiplies every tensor's first
    dimension (at least 1) for quick runs.

How it is timed
    Every optimizer first takes one step timed on its own ("first step s (warm)": it includes any compilation
    and the native kernel's loading, with whatever the on-disk caches already hold) and one more untimed warm-up
    step. "first step s (cold)" (the native pure functional rows ``lowbit_fn <format>``; ``--no-cold`` skips it)
    is the first step of a fresh process whose caches (``TORCHINDUCTOR_CACHE_DIR``, ``LOWBIT_FN_CACHE``) start
    empty: a new user's first step, including the build of the native kernel. Then, for
    ``--rounds`` rounds, every optimizer runs ``--steps`` steps back to back, timed as a whole; optimizers are
    interleaved within a round and the order is reversed every other round, so slow drifts of the machine hit
    all of them alike. The table gives the median over rounds of the per-step milliseconds, the ratio of that
    median to the fused torch AdamW's median (same dtype) from the same run, and for lowbit_fn's functional rows
    (pure, in place, apply_gradients) the ratio to the torch.optim front end's row of the same format and path
    ("× torch_optim"). Summary lines repeat the "functional inplace / torch_optim" and "apply_gradients inplace /
    torch_optim" ratios per model, format and path (the target is at most 1.15x), measured side by side in the
    same run.

    Nothing is set in the environment: the figures are those of a user who sets no variable. ``--omp-wait``
    measures what ``OMP_WAIT_POLICY=PASSIVE`` would be worth (nothing else): AdamW8bit's and torch's fused step on
    one [4096, 4096] float32 parameter, each right after a ``torch.mm``, in fresh processes with the variable unset
    and set, alternated, as ratios, on the machine as it is or with ``--load N`` busy processes beside it (see
    :func:`omp_wait_comparison`).
    A contention check runs before and after the measurements: a fixed small workload (20 x ``torch.mm`` of
    512 x 512 float32, one thread) timed alone, then timed while a second process runs the same workload. On an
    idle two-core machine the ratio is about 1; a clearly larger ratio means another job was using the cores,
    and the timings of that run are suspect.

Memory columns
    "step peak extra": the most memory that one step's own allocations hold at the same time (torch profiler
    memory events, measured on one step after the warm-up; the native kernel's few KiB of scratch are outside
    torch's allocator and not counted), in bytes per element of the model's largest tensor: 8 B/elem is the budget
    of issue 6, and a step that allocates an update for every parameter (the pure functional API, by its
    contract) needs 2 x the params' element size per element of *all* of them. For ``m64x1M`` summary lines also
    give it in MB, beside torch's fused AdamW of the same dtype.
    "state B/elem (all)": bytes of every optimizer-state tensor divided by the number of parameter elements.
    "state B/elem (quantized tensors)": for lowbit_fn, bytes of every tensor in the quantized group(s) of the
    state (the entries of ``state["0"]`` whose name ends with ``_block<N>``: codes and scales) divided by the
    elements of the quantized parameters (two or more dimensions and at least 4096 elements); for other low-bit
    optimizers, the same over their quantized per-parameter states.
    "RSS step growth MB" / "RSS 1st step MB" (``--rss``): how much the peak resident memory of the process grows
    during one step, measured for each optimizer in a fresh child process (so that each peak is its own) that
    builds the params, grads and optimizer alone: the first step, then (after it, a warm-up) one more step. Before
    each measured step the kernel's peak-RSS mark (``VmHWM``, the counter behind ``getrusage(RUSAGE_SELF)
    .ru_maxrss``) is reset to the current RSS (``/proc/self/clear_refs``), and the growth is ``VmHWM`` after the
    step minus RSS before it. (``ru_maxrss`` itself cannot be reset, and a child process inherits its parent's
    value at ``exec``, so its plain before/after difference reads 0 whenever the parent was bigger; where
    ``clear_refs`` cannot be written that difference is what is reported.) Before each measured step the C heap's
    free memory is also handed back to the OS (glibc's ``malloc_trim(0)``), so that a step's temporaries count
    even where the allocator kept the warm-up step's ones. The first step also counts state that an optimizer
    allocates lazily (torch.optim-style ones) and any compilation.

Usage:
    python benchmarks/step_speed.py [--models tlike100 sq16M m64x1M] [--formats fp32 8bit 4bit fp8]
                                    [--optimizers adamw lion sgd rmsprop ademamix muon]
                                    [--apis functional functional_inplace apply_gradients torch_optim] [--paths native compiled]
                                    [--dtype float32|bfloat16|float16] [--rounds 5] [--steps 5] [--scale 1.0]
                                    [--rss] [--no-cold] [--markdown PATH]
    python benchmarks/step_speed.py --omp-wait [--load 0] [--rounds 6] [--steps 10]
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import gc
import json
import os
import re
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from tensordict import TensorDict, TensorDictBase
from torch import Tensor

import lowbit_fn

__all__ = ["REFERENCE_MODELS", "main"]

Shape = tuple[int, ...]

REFERENCE_MODELS: dict[str, list[Shape]] = {
    "tlike100": [(1024, 1024)] * 12 + [(4096, 1024)] * 3 + [(4096,)] * 3 + [(1024,)] * 82,
    "sq16M": [(4096, 4096)],
    "m64x1M": [(1024, 1024)] * 64,
}
DEFAULT_MODELS = ("tlike100", "sq16M")
FORMATS = ("fp32", "8bit", "4bit", "fp8")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_LABELS = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
LEARNING_RATE = 1e-3
WEIGHT_DECAY = 1e-2
MIN_QUANT_SIZE = 4096
APIS = ("functional", "functional_inplace", "apply_gradients", "torch_optim")
PATHS = ("native", "compiled")
# lowbit_fn's default: smaller tensors keep fp32 state
TORCH_OPTIM_CLASSES = {"fp32": "AdamW", "8bit": "AdamW8bit", "4bit": "AdamW4bit", "fp8": "AdamWFp8"}
FUSED = "torch fused fp32"  # the float32 names of the torch baselines (see baseline_names)
FOREACH = "torch foreach fp32"
MEMORY_MODEL = "m64x1M"  # the model whose step peak is also summarized in MB
INPLACE_TARGET = 1.15  # the target for a functional step / torch_optim
_QUANT_GROUP = re.compile(r"_block\d+$")
_SUFFIX = {"functional": "", "functional_inplace": " (functional, inplace)", "apply_gradients": " (apply_gradients, inplace)", "torch_optim": ""}


@dataclass(frozen=True)
class Family:
    """One optimizer family of ``--optimizers``: lowbit_fn's functional factory (``lowbit_fn.<factory>``) and
    torch.optim classes per state format, the hyperparameters of every row (torch.optim's names; ``lr`` is the
    factory's ``learning_rate``), torch's class of the same optimizer (``None``: torch has none, and its rows are
    compared with ``torch.optim.AdamW(fused=True)`` instead) and bitsandbytes' 8-bit class."""

    name: str
    factory: str
    classes: dict[str, str]
    hyper: dict[str, Any]
    torch_class: str | None
    bnb_class: str


FAMILIES: dict[str, Family] = {
    "adamw": Family("adamw", "adamw", TORCH_OPTIM_CLASSES, {"lr": LEARNING_RATE, "weight_decay": WEIGHT_DECAY}, "AdamW",
                    "AdamW8bit"),
    # Lion's update is lr * sign(.): a 10x smaller lr and a 10x larger (decoupled) decay than AdamW's
    "lion": Family("lion", "lion", {"fp32": "Lion", "8bit": "Lion8bit", "4bit": "Lion4bit", "fp8": "LionFp8"},
                   {"lr": 1e-4, "weight_decay": 1e-1}, None, "Lion8bit"),
    # lr 0.1 with momentum 0.9: lr / (1 - momentum) = 1, so the in-place rows' updates, fed back as the next
    # gradients, keep the gradients' magnitude (a smaller lr would shrink them to denormals within a few rounds)
    "sgd": Family("sgd", "sgd", {"fp32": "SGD", "8bit": "SGD8bit", "4bit": "SGD4bit", "fp8": "SGDFp8"},
                  {"lr": 0.1, "momentum": 0.9, "weight_decay": WEIGHT_DECAY}, "SGD", "SGD8bit"),
    "rmsprop": Family("rmsprop", "rmsprop", {"fp32": "RMSprop", "8bit": "RMSprop8bit", "4bit": "RMSprop4bit", "fp8": "RMSpropFp8"},
                      {"lr": LEARNING_RATE, "weight_decay": WEIGHT_DECAY}, "RMSprop", "RMSprop8bit"),
    "ademamix": Family("ademamix", "ademamix",
                       {"fp32": "AdEMAMix", "8bit": "AdEMAMix8bit", "4bit": "AdEMAMix4bit", "fp8": "AdEMAMixFp8"},
                       {"lr": LEARNING_RATE, "weight_decay": WEIGHT_DECAY}, None, "AdEMAMix8bit"),
    # 2-D params only (the models' matrices), as torch.optim.Muon
    "muon": Family("muon", "muon", {"fp32": "Muon", "8bit": "Muon8bit", "4bit": "Muon4bit", "fp8": "MuonFp8"},
                   {"lr": 0.02}, "Muon", "Muon8bit"),
}
DEFAULT_FAMILIES = ("adamw",)


def baseline_names(dtype: str = "float32") -> tuple[str, str]:
    """The rows of torch's fused and foreach AdamW for params of ``dtype``: ``("torch fused bf16", ...)``."""
    label = DTYPE_LABELS[dtype]
    return f"torch fused {label}", f"torch foreach {label}"


# ----------------------------------------------------------------------------------------------- the models


def scaled_shapes(shapes: Iterable[Shape], scale: float) -> list[Shape]:
    """``shapes`` with every first dimension multiplied by ``scale`` (rounded, at least 1)."""
    return [(max(1, round(s[0] * scale)), *s[1:]) for s in shapes]


def make_tensors(
    shapes: list[Shape], seed: int = 0, dtype: torch.dtype = torch.float32
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Random params and grads of ``dtype`` for ``shapes``, keyed ``p000``, ``p001``, ... (fixed by ``seed``: drawn
    in float32, then rounded to ``dtype``)."""
    gen = torch.Generator().manual_seed(seed)
    params = {f"p{i:03d}": torch.randn(s, generator=gen) * 0.02 for i, s in enumerate(shapes)}
    grads = {k: torch.randn(v.shape, generator=gen) * 1e-3 for k, v in params.items()}
    if dtype != torch.float32:
        params = {k: v.to(dtype) for k, v in params.items()}
        grads = {k: v.to(dtype) for k, v in grads.items()}
    return params, grads


def is_quantized_shape(shape: torch.Size | Shape) -> bool:
    """Whether lowbit_fn's default (``min_quant_size=4096``) quantizes the state of a parameter of ``shape``."""
    return len(shape) >= 2 and torch.Size(shape).numel() >= MIN_QUANT_SIZE


def tensor_bytes(t: Tensor) -> int:
    """Storage bytes of ``t``; for tensor subclasses (e.g. torchao's quantized states), of their inner tensors."""
    flatten = getattr(type(t), "__tensor_flatten__", None)
    if flatten is not None:
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


# ----------------------------------------------------------------------------------------------- the runners


@dataclass(frozen=True)
class Spec:
    """What a runner is: ``kind`` (``functional``, ``functional_inplace``, ``apply_gradients``, ``torch_optim``:
    lowbit_fn's; ``fused``,
    ``foreach``: torch's AdamW; ``peer``: an optional low-bit AdamW of another package), ``fmt`` (lowbit_fn's
    state format, or the peer's row name) and ``path`` (``native`` or ``compiled``, lowbit_fn's rows only).
    ``family`` (``--optimizers``) is the optimizer of lowbit_fn's and the peers' rows; other families than
    ``adamw`` have one torch row, ``reference`` (torch's fastest implementation of the family on this machine, see
    :func:`torch_reference`)."""

    kind: str
    fmt: str = ""
    path: str = "native"
    family: str = "adamw"

    @property
    def ours(self) -> bool:
        return self.kind in APIS

    def name(self, dtype: str = "float32") -> str:
        if self.kind in ("fused", "foreach"):
            return baseline_names(dtype)[self.kind == "foreach"]
        if self.kind == "reference":
            cls, flag, _ = torch_reference(self.family, dtype)
            return f"torch {cls} {flag} {DTYPE_LABELS[dtype]}"
        if self.kind == "peer":
            return self.fmt
        family = FAMILIES[self.family]
        if self.kind == "torch_optim":
            base = f"lowbit_fn {family.classes[self.fmt]}"
        else:
            base = f"lowbit_fn {self.fmt}" if self.family == "adamw" else f"lowbit_fn {self.family} {self.fmt}"
        return base + _SUFFIX[self.kind] + (" (compiled)" if self.path == "compiled" else "")


@dataclass
class Runner:
    """One optimizer on its own copy of the params: ``step()`` does one full step."""

    name: str
    step: Callable[[], None]
    memory: Callable[[], tuple[float | None, float]]  # (quantized B/elem or None, all B/elem)
    first_s: float = float("nan")
    peak_bytes: int | None = None  # extra memory allocated during one step, at its peak
    spec: Spec | None = None
    kernel: str | None = None  # lowbit_fn's rows: the kernel that runs their step, "native" or "compiled"


_TORCH_REFERENCE: dict[tuple[str, str], tuple[str, str, str]] = {}


def torch_reference(family: str, dtype: str = "float32") -> tuple[str, str, str]:
    """torch's fastest implementation of ``family`` for CPU params of ``dtype``: ``(class, "fused" | "foreach",
    why)``. ``fused=True`` where the class takes it and one step of it runs here (tried on a small tensor), else
    ``foreach=True``; a family torch has no class of (Lion, AdEMAMix, and Muon on a torch without
    ``torch.optim.Muon``) gets ``torch.optim.AdamW(fused=True)``, the reference step."""
    key = (family, dtype)
    if key in _TORCH_REFERENCE:
        return _TORCH_REFERENCE[key]
    name = FAMILIES[family].torch_class
    cls = getattr(torch.optim, name, None) if name else None
    if cls is None:
        _TORCH_REFERENCE[key] = ("AdamW", "fused", f"torch has no {family} optimizer: compared with torch.optim.AdamW(fused=True)")
        return _TORCH_REFERENCE[key]
    hyper = torch_hyper(family)
    whys = []
    for flag in ("fused", "foreach"):  # torch's fastest first; Muon takes neither: its one implementation
        try:
            leaf = torch.nn.Parameter(torch.zeros(8, 8, dtype=DTYPES[dtype]))
            leaf.grad = torch.ones_like(leaf)
            cls([leaf], **hyper, **{flag: True}).step()
            found = (name, flag, f"torch.optim.{name}({flag}=True): supported on CPU for {dtype}" + "".join(whys))
            break
        except (TypeError, RuntimeError, ValueError) as err:
            whys.append(f"; {flag}=True is not ({type(err).__name__}: {str(err).splitlines()[0][:100] if str(err) else ''})")
    else:
        found = (name, "single", f"torch.optim.{name}(): its single-tensor implementation" + "".join(whys))
    _TORCH_REFERENCE[key] = found
    return found


def torch_hyper(family: str) -> dict[str, Any]:
    """The hyperparameters of ``family``'s torch.optim-style rows (torch's names)."""
    return dict(FAMILIES[family].hyper)


def lowbit_transform(family: str, fmt: str) -> Any:
    """lowbit_fn's functional optimizer of ``family`` in state format ``fmt``, with the family's hyperparameters."""
    hyper = torch_hyper(family)
    hyper["learning_rate"] = hyper.pop("lr")
    return getattr(lowbit_fn, FAMILIES[family].factory)(**hyper, state_format=fmt)


def kernel_of(opt: Any, path: str) -> str:
    """The kernel that steps ``opt``'s CPU tensors on ``path``: ``native`` where the native C kernel is built and
    serves the optimizer's rule (and ``path`` is ``native``), else ``compiled`` (the compiled torch path). For Muon
    that is its momentum's kernel; the Newton-Schulz iteration runs in torch either way."""
    if path != "native":
        return "compiled"
    from lowbit_fn.kernels.native import native_available, native_serves_rule
    from lowbit_fn.torch_optim import moment_core

    rule = moment_core(opt).config.rule
    return "native" if native_available(torch.device("cpu")) and native_serves_rule(rule) else "compiled"


def on_path(step: Callable[[], None], path: str) -> Callable[[], None]:
    """``step`` as is (``native``), or run with ``LOWBIT_FN_NATIVE=0`` (``compiled``: the compiled torch path; the
    variable is read at every step) and the variable restored after."""
    if path == "native":
        return step
    if path != "compiled":
        raise ValueError(f"path must be one of {list(PATHS)}, got {path!r}")

    def compiled_step() -> None:
        old = os.environ.get("LOWBIT_FN_NATIVE")
        os.environ["LOWBIT_FN_NATIVE"] = "0"
        try:
            step()
        finally:
            if old is None:
                del os.environ["LOWBIT_FN_NATIVE"]
            else:
                os.environ["LOWBIT_FN_NATIVE"] = old

    return compiled_step


FUNCTIONAL = ("functional", "functional_inplace", "apply_gradients")


def lowbit_runner(
    fmt: str, params: dict[str, Tensor], grads: dict[str, Tensor], api: str = "functional", path: str = "native",
    family: str = "adamw",
) -> Runner:
    """lowbit_fn's functional step on a copy of ``params``: ``update`` + ``apply_updates``, pure (``functional``) or
    with ``inplace=True`` on a copy of ``grads`` that every step overwrites with its updates and that the next
    step takes as its gradients (``functional_inplace``); or ``apply_gradients(..., inplace=True)`` (which leaves
    the gradients as they are). ``family``: the optimizer (:data:`FAMILIES`), AdamW by default."""
    if api not in FUNCTIONAL:
        raise ValueError(f"api must be one of {list(FUNCTIONAL)}, got {api!r}")
    inplace = api == "functional_inplace"
    opt = lowbit_transform(family, fmt)
    core_index = str(getattr(opt, "core_index", 0))
    grads_td = TensorDict({k: v.clone() for k, v in grads.items()} if inplace else dict(grads), batch_size=[])
    holder: dict[str, TensorDictBase] = {"params": TensorDict({k: v.clone() for k, v in params.items()}, batch_size=[])}
    holder["state"] = opt.init(holder["params"])
    numel = sum(p.numel() for p in params.values())
    qnumel = sum(p.numel() for p in params.values() if is_quantized_shape(p.shape))

    def step() -> None:
        updates, holder["state"] = opt.update(grads_td, holder["state"], holder["params"])
        holder["params"] = lowbit_fn.apply_updates(holder["params"], updates)

    checked = [False]

    def step_inplace() -> None:
        updates, holder["state"] = opt.update(grads_td, holder["state"], holder["params"], inplace=True)
        new = lowbit_fn.apply_updates(holder["params"], updates, inplace=True)
        if not checked[0]:  # the contract the timing relies on; once, outside the steady state
            checked[0] = True
            moved = [k for k in grads_td.keys() if updates[k].data_ptr() != grads_td[k].data_ptr()]
            if moved or new is not holder["params"]:
                raise RuntimeError(
                    f"lowbit_fn {family} {fmt}: update(..., inplace=True) did not write into the gradients' buffers ({moved[:3]}) "
                    f"or apply_updates(..., inplace=True) returned other params ({new is not holder['params']})"
                )

    def step_fused() -> None:
        new, holder["state"] = lowbit_fn.apply_gradients(opt, grads_td, holder["state"], holder["params"], inplace=True)
        if new is not holder["params"]:
            raise RuntimeError(f"lowbit_fn {family} {fmt}: apply_gradients(..., inplace=True) returned other params")

    def memory() -> tuple[float | None, float]:
        state = holder["state"]
        total = sum(tensor_bytes(t) for t in state.values(include_nested=True, leaves_only=True))
        core_state = state[core_index]
        quant = [
            tensor_bytes(t)
            for key in core_state.keys()
            if _QUANT_GROUP.search(key)
            for t in core_state[key].values(include_nested=True, leaves_only=True)
        ]
        qbytes = sum(quant) / qnumel if quant and qnumel else None
        return qbytes, total / numel

    spec = Spec(api, fmt, path, family)
    steps = {"functional": step, "functional_inplace": step_inplace, "apply_gradients": step_fused}
    return Runner(spec.name(), on_path(steps[api], path), memory, spec=spec, kernel=kernel_of(opt, path))


def _is_quantized(t: Tensor) -> bool:
    """Whether a torch.optim-style state tensor is low-bit: a tensor subclass (torchao) or 8-bit codes (bitsandbytes)."""
    return type(t) not in (Tensor, torch.nn.Parameter) or t.dtype in (torch.uint8, torch.int8)


def torch_optim_runner(
    name: str, factory: Callable[[list[Tensor]], torch.optim.Optimizer], params: dict[str, Tensor], grads: dict[str, Tensor],
    path: str = "native",
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

    return Runner(name, on_path(opt.step, path), memory)


def peer_factories() -> tuple[list[tuple[str, Callable[[list[Tensor]], torch.optim.Optimizer]]], list[str]]:
    """torchao / bitsandbytes low-bit AdamW factories where those packages are importable, and notes about them."""
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
    return factories, notes


def bnb_row_name(family: str) -> str:
    """The row of bitsandbytes' 8-bit optimizer of ``family``."""
    return "bitsandbytes 8bit" if family == "adamw" else f"bitsandbytes {FAMILIES[family].bnb_class}"


def family_peer_factories(family: str) -> tuple[list[tuple[str, Callable[[list[Tensor]], torch.optim.Optimizer]]], list[str]]:
    """The optional peers of ``family``: for AdamW torchao's and bitsandbytes' (:func:`peer_factories`), for the
    others bitsandbytes' 8-bit class (``bnb.optim.Lion8bit``, ...) where bitsandbytes is importable; and notes."""
    if family == "adamw":
        return peer_factories()
    cls_name = FAMILIES[family].bnb_class
    hyper = torch_hyper(family)
    try:
        import bitsandbytes as bnb
    except ImportError:
        return [], [f"bitsandbytes not installed: no bitsandbytes.optim.{cls_name} row ({family})"]
    cls = getattr(bnb.optim, cls_name, None)
    if cls is None:
        return [], [f"bitsandbytes {getattr(bnb, '__version__', '')}: no bitsandbytes.optim.{cls_name}, no row ({family})"]
    return [(bnb_row_name(family), lambda ps: cls(ps, **hyper))], []


def make_runner(spec: Spec, params: dict[str, Tensor], grads: dict[str, Tensor], dtype: str = "float32") -> Runner:
    """The runner of ``spec`` on copies of ``params`` (and, where it changes them, of ``grads``)."""
    hyper: dict[str, Any] = torch_hyper(spec.family)
    name = spec.name(dtype)
    kernel = None
    if spec.kind in FUNCTIONAL:
        runner = lowbit_runner(spec.fmt, params, grads, api=spec.kind, path=spec.path, family=spec.family)
        kernel = runner.kernel
    elif spec.kind == "torch_optim":
        cls = getattr(lowbit_fn, FAMILIES[spec.family].classes[spec.fmt])
        runner = torch_optim_runner(name, lambda ps: cls(ps, **hyper), params, grads, spec.path)
        kernel = kernel_of(lowbit_transform(spec.family, spec.fmt), spec.path)  # the same rule, the same kernel
    elif spec.kind in ("fused", "foreach"):
        flag = {spec.kind: True}
        runner = torch_optim_runner(name, lambda ps: torch.optim.AdamW(ps, **hyper, **flag), params, grads)
    elif spec.kind == "reference":
        cls_name, flag_name, _ = torch_reference(spec.family, dtype)
        if cls_name != FAMILIES[spec.family].torch_class:  # torch has no such optimizer: AdamW's step, AdamW's hyper
            hyper = torch_hyper("adamw")
        torch_cls = getattr(torch.optim, cls_name)
        flags = {} if flag_name == "single" else {flag_name: True}
        runner = torch_optim_runner(name, lambda ps: torch_cls(ps, **hyper, **flags), params, grads)
    elif spec.kind == "peer":
        factory = dict(family_peer_factories(spec.family)[0]).get(spec.fmt)
        if factory is None:
            raise ValueError(f"no optional optimizer {spec.fmt!r} here")
        runner = torch_optim_runner(name, factory, params, grads)
    else:
        raise ValueError(f"unknown runner kind {spec.kind!r}")
    runner.name, runner.spec, runner.kernel = name, spec, kernel
    return runner


def _skip_note(name: str, err: Exception) -> str:
    return f"{name}: skipped ({type(err).__name__}: {str(err).splitlines()[0][:120] if str(err) else ''})"


def start_runners(
    specs: list[Spec], params: dict[str, Tensor], grads: dict[str, Tensor], dtype: str
) -> tuple[list[Runner], list[str]]:
    """Build every runner, time its first step and take one untimed warm-up step. A baseline or optional optimizer
    that raises (e.g. no support for the dtype on this machine) is skipped with a note; lowbit_fn's rows never are."""
    runners: list[Runner] = []
    notes: list[str] = []
    for spec in specs:
        try:
            runner = make_runner(spec, params, grads, dtype)
            runner.first_s = _timed(runner.step)
            runner.step()  # one untimed warm-up step
        except Exception as err:
            if spec.ours:
                raise
            notes.append(_skip_note(spec.name(dtype), err))
            continue
        runners.append(runner)
    return runners, notes


def peak_step_bytes(step: Callable[[], None]) -> int | None:
    """Peak bytes of the torch allocations made during one ``step()`` and live at the same time (from the torch
    profiler's memory events), or ``None`` where the profiler gives none. Memory outside torch's allocator (the
    native kernel's scratch: eight blocks of float32 per thread) is not included."""
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
shapes = step_speed.scaled_shapes(step_speed.REFERENCE_MODELS[sys.argv[2]], float(sys.argv[4]))
params, grads = step_speed.make_tensors(shapes, dtype=step_speed.DTYPES[sys.argv[5]])
runner = step_speed.lowbit_runner(sys.argv[3], params, grads)
t0 = time.perf_counter()
runner.step()
print(json.dumps(time.perf_counter() - t0))
"""


def cold_first_step(model: str, fmt: str, scale: float, dtype: str = "float32") -> float:
    """Seconds of the first functional step in a fresh process with empty caches (torch.compile's and the native
    kernel's build): what a new user's first step costs."""
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=os.path.join(tmp, "inductor"), LOWBIT_FN_CACHE=os.path.join(tmp, "native"))
        here = os.path.dirname(os.path.abspath(__file__))
        out = subprocess.run(
            [sys.executable, "-c", _COLD_CHILD, here, model, fmt, str(scale), dtype], env=env, capture_output=True, text=True,
            check=True,
        )
    return float(out.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------- peak RSS


def _status_bytes(field: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``) in bytes; ``None`` where there is none."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset this process's peak-RSS mark (``VmHWM``) to its current RSS (Linux >= 4.0); whether it could."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
        return _status_bytes("VmHWM") is not None and _status_bytes("VmRSS") is not None
    except OSError:
        return False


def _maxrss_bytes() -> int:
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib if sys.platform == "darwin" else kib * 1024  # bytes on macOS, KiB on Linux


def _trim_heap() -> None:
    """Hand the C heap's free memory back to the OS (glibc's ``malloc_trim``; elsewhere nothing), so that memory
    freed earlier and kept by the allocator is not counted as resident before a step and reused unseen."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError, TypeError):
        pass


def rss_step_growth(step: Callable[[], None]) -> int:
    """Bytes by which the process's peak RSS grows during one ``step()``: ``VmHWM`` after it minus the RSS before
    it, the mark reset just before (and the heap's free memory returned to the OS); without
    ``/proc/self/clear_refs``, the growth of ``ru_maxrss`` (which only shows growth beyond the process's earlier
    peak, or an inherited one)."""
    gc.collect()
    _trim_heap()
    if _reset_peak_rss():
        before = _status_bytes("VmRSS")
        step()
        return max(0, _status_bytes("VmHWM") - before)
    before = _maxrss_bytes()
    step()
    return _maxrss_bytes() - before


def rss_growth(model: str, scale: float, dtype: str, spec: Spec) -> dict[str, int]:
    """In this process (a fresh child of :func:`measure_rss`): the params, grads and the optimizer of ``spec``
    alone, then the peak-RSS growth of its first step and of the step after it (``first``, ``step``, bytes)."""
    shapes = scaled_shapes(REFERENCE_MODELS[model], scale)
    params, grads = make_tensors(shapes, dtype=DTYPES[dtype])
    runner = make_runner(spec, params, grads, dtype)
    del params  # the runner has its own copy; the grads stay (the runners that do not change them share them)
    first = rss_step_growth(runner.step)
    return {"first": first, "step": rss_step_growth(runner.step)}


_RSS_CHILD = """
import json, sys
sys.path.insert(0, sys.argv[1])
import step_speed
spec = step_speed.Spec(*json.loads(sys.argv[5]))
print(json.dumps(step_speed.rss_growth(sys.argv[2], float(sys.argv[3]), sys.argv[4], spec)))
"""


def measure_rss(model: str, scale: float, dtype: str, spec: Spec) -> dict[str, int]:
    """:func:`rss_growth` of one optimizer in a fresh Python process, so that its peak is its own."""
    here = os.path.dirname(os.path.abspath(__file__))
    out = subprocess.run(
        [sys.executable, "-c", _RSS_CHILD, here, model, str(scale), dtype, json.dumps([spec.kind, spec.fmt, spec.path, spec.family])],
        capture_output=True, text=True, check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


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


# ------------------------------------------------------------------------------------------ --omp-wait mode

_OMP_CHILD = r"""
import json, statistics, sys, time
import torch, lowbit_fn
steps = int(sys.argv[1])
gen = torch.Generator().manual_seed(0)
a, b = torch.randn(1024, 1024, generator=gen), torch.randn(1024, 1024, generator=gen)
p, q = torch.randn(4096, 4096, generator=gen), torch.randn(4096, 4096, generator=gen)
p.grad, q.grad = torch.randn(4096, 4096, generator=gen) * 1e-3, torch.randn(4096, 4096, generator=gen) * 1e-3
opts = {"lowbit_fn AdamW8bit": lowbit_fn.AdamW8bit([p], lr=1e-3, weight_decay=1e-2),
        "torch fused fp32": torch.optim.AdamW([q], lr=1e-3, weight_decay=1e-2, fused=True)}
times = {name: [] for name in opts}
for i in range(steps + 2):  # two warm-up steps
    for name, opt in opts.items():
        torch.mm(a, b)  # torch's intra-op pool has just worked, as in a training loop before opt.step()
        t0 = time.perf_counter()
        opt.step()
        if i >= 2:
            times[name].append(time.perf_counter() - t0)
gomp = sorted({line.split()[-1] for line in open("/proc/self/maps") if "libgomp" in line})
print(json.dumps({"ms": {k: statistics.median(v) * 1e3 for k, v in times.items()}, "gomp": gomp}))
"""


def omp_wait_comparison(rounds: int, steps: int, load: int = 0) -> list[str]:
    """The step of ``lowbit_fn.AdamW8bit`` and of torch's fused AdamW on one [4096, 4096] float32 parameter, each
    right after a 1024 x 1024 ``torch.mm`` (torch's intra-op threads have just worked), in fresh processes with
    ``OMP_WAIT_POLICY`` unset and set to ``PASSIVE``, alternated (the order swapped every round), while ``load``
    single-threaded busy-loop processes run beside them (another job on the machine); returns report lines with
    the per-round ratio unset / PASSIVE of the median step (above 1: the variable helps)."""
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(load)]
    try:
        return _omp_wait_rounds(rounds, steps, load)
    finally:
        for proc in busy:
            proc.kill()
            proc.wait()


def _omp_wait_rounds(rounds: int, steps: int, load: int) -> list[str]:
    ratios: dict[str, list[float]] = {}
    gomp: set[str] = set()
    for r in range(rounds):
        results = {}
        for policy in (("unset", "PASSIVE") if r % 2 == 0 else ("PASSIVE", "unset")):
            env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
            if policy == "PASSIVE":
                env["OMP_WAIT_POLICY"] = "PASSIVE"
            out = subprocess.run([sys.executable, "-c", _OMP_CHILD, str(steps)], env=env, capture_output=True,
                                 text=True, check=True, timeout=600)
            results[policy] = json.loads(out.stdout.strip().splitlines()[-1])
            gomp.update(results[policy]["gomp"])
        for name in results["unset"]["ms"]:
            ratios.setdefault(name, []).append(results["unset"]["ms"][name] / results["PASSIVE"]["ms"][name])
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.3f}" for k, v in ratios.items()), flush=True)
    lines = [f"OMP_WAIT_POLICY unset / PASSIVE, median step of {steps} after a torch.mm each, {rounds} rounds, "
             f"{load} busy process(es) beside them (above 1: slower without the variable); "
             f"OpenMP runtime loaded: {', '.join(sorted(gomp)) or 'none'}"]
    for name, values in ratios.items():
        lines.append(f"- {name}: median {statistics.median(values):.3f}, range {min(values):.3f}-{max(values):.3f}")
    return lines


# ----------------------------------------------------------------------------------------------- measuring


def runner_specs(formats: Iterable[str], apis: Iterable[str], paths: Iterable[str], family: str = "adamw") -> list[Spec]:
    """The rows of one model, in table order: torch's baselines (AdamW: fused and foreach; another family: its
    :func:`torch_reference`), then per path lowbit_fn's rows per API and format."""
    specs = [Spec("fused"), Spec("foreach")] if family == "adamw" else [Spec("reference", family=family)]
    for path in PATHS:
        if path in paths:
            specs += [Spec(api, fmt, path, family) for api in APIS if api in apis for fmt in formats]
    return specs


def reference_name(family: str, dtype: str = "float32") -> str:
    """The row every row of ``family`` is compared with ("× torch ref"): torch's fused AdamW for AdamW, else the
    family's :func:`torch_reference`."""
    return baseline_names(dtype)[0] if family == "adamw" else Spec("reference", family=family).name(dtype)


def measure_model(
    model: str, shapes: list[Shape], formats: list[str], rounds: int, steps: int, apis: Iterable[str] = APIS,
    scale: float = 1.0, cold_start: bool = True, dtype: str = "float32", paths: Iterable[str] = ("native",),
    rss: bool = False, family: str = "adamw",
) -> tuple[list[dict[str, Any]], list[str]]:
    """Rows for every optimizer of ``family`` on one model (lowbit_fn's, torch's, the peers'), timed side by side,
    and notes (skipped baselines and optional optimizers)."""
    apis, paths = list(apis), list(paths)
    params, grads = make_tensors(shapes, dtype=DTYPES[dtype])
    runners, notes = start_runners(runner_specs(formats, apis, paths, family), params, grads, dtype)
    factories, peer_notes = family_peer_factories(family)
    peers, skipped = start_runners([Spec("peer", name, family=family) for name, _ in factories], params, grads, dtype)
    runners += peers
    notes += peer_notes + skipped
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
    fused = reference_name(family, dtype)
    bnb = bnb_row_name(family)
    cold = {}
    if cold_start and "functional" in apis and "native" in paths and family == "adamw":
        cold = {Spec("functional", fmt).name(): cold_first_step(model, fmt, scale, dtype) for fmt in formats}
    rss_of = {}
    if rss:
        for runner in runners:
            rss_of[runner.name] = measure_rss(model, scale, dtype, runner.spec)
    by_spec = {(r.spec.kind, r.spec.fmt, r.spec.path): r.name for r in runners}
    torch_kinds = ("fused", "foreach", "reference")
    rows = []
    for runner in runners:
        spec = runner.spec
        qbytes, nbytes = runner.memory()
        functional = spec.kind in FUNCTIONAL
        reference = by_spec.get(("torch_optim", spec.fmt, spec.path)) if functional else None
        grown = rss_of.get(runner.name)
        rows.append({
            "model": model,
            "dtype": dtype,
            "optimizer": runner.name,
            "family": family,
            "api": spec.kind if spec.ours else ("torch" if spec.kind in torch_kinds else "peer"),
            "format": spec.fmt if spec.ours else None,
            "path": spec.path if spec.ours else None,
            "kernel": runner.kernel,
            "ms": medians[runner.name],
            "reference": fused if fused in medians else None,
            "ratio": medians[runner.name] / medians[fused] if fused in medians else None,
            "vs_bnb": medians[runner.name] / medians[bnb] if bnb in medians else None,
            "vs_torch_optim": medians[runner.name] / medians[reference] if reference else None,
            "qbytes": qbytes,
            "bytes": nbytes,
            "first_s": runner.first_s,
            "cold_s": cold.get(runner.name),
            "peak": None if runner.peak_bytes is None else runner.peak_bytes / largest,
            "peak_mb": None if runner.peak_bytes is None else runner.peak_bytes / 2**20,
            "rss_mb": None if grown is None else grown["step"] / 2**20,
            "rss_first_mb": None if grown is None else grown["first"] / 2**20,
        })
    return rows, notes


# ----------------------------------------------------------------------------------------------- reporting


def _num(value: float | None, digits: int) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _ms(value: float) -> str:
    return f"{value:.1f}" if value >= 100 else f"{value:.2f}" if value >= 1 else f"{value:.3f}"


Column = tuple[str, bool, Callable[[dict[str, Any]], str]]  # header, right-aligned, cell


def _markdown(columns: list[Column], rows: list[dict[str, Any]]) -> str:
    """A Markdown table of ``rows``, plus the RSS columns when any row measured them (``--rss``)."""
    if any(r.get("rss_mb") is not None for r in rows):
        columns = columns + [("RSS step growth MB", True, lambda r: _num(r.get("rss_mb"), 1)),
                             ("RSS 1st step MB", True, lambda r: _num(r.get("rss_first_mb"), 1))]
    lines = ["| " + " | ".join(c[0] for c in columns) + " |",
             "|" + "".join("---:|" if c[1] else "---|" for c in columns)]
    lines += ["| " + " | ".join(c[2](r) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    return _markdown([
        ("model", False, lambda r: r["model"]), ("optimizer", False, lambda r: r["optimizer"]),
        ("ms/step", True, lambda r: _ms(r["ms"])), ("× torch fused", True, lambda r: _num(r["ratio"], 2)),
        ("× torch_optim", True, lambda r: _num(r.get("vs_torch_optim"), 2)),
        ("state B/elem (quantized tensors)", True, lambda r: _num(r["qbytes"], 3)),
        ("state B/elem (all)", True, lambda r: _num(r["bytes"], 3)),
        ("first step s (warm)", True, lambda r: _num(r["first_s"], 2)),
        ("first step s (cold)", True, lambda r: _num(r.get("cold_s"), 2)),
        ("step peak extra, B/elem of largest tensor", True, lambda r: _num(r.get("peak"), 2)),
    ], rows)


def summary_lines(rows: list[dict[str, Any]], scale: float = 1.0) -> list[str]:
    """"functional inplace / torch_optim" and "apply_gradients / torch_optim" per model, format and path; step peak
    memory in MB on ``m64x1M``."""
    lines = []
    labels = {"functional_inplace": "functional inplace", "apply_gradients": "apply_gradients inplace"}
    for r in rows:
        if r.get("api") in labels and r.get("vs_torch_optim") is not None:
            path = " (compiled)" if r["path"] == "compiled" else ""
            reference = r["ms"] / r["vs_torch_optim"]
            verdict = "meets" if r["vs_torch_optim"] <= INPLACE_TARGET else "misses"
            lines.append(
                f"{r['model']} {r['dtype']} {r['format']}{path}: {labels[r['api']]} / torch_optim = {r['vs_torch_optim']:.2f}x "
                f"({_ms(r['ms'])} / {_ms(reference)} ms per step; {verdict} the target <= {INPLACE_TARGET:.2f}x)"
            )
    for model in dict.fromkeys(r["model"] for r in rows):
        if model != MEMORY_MODEL:
            continue
        mine = [r for r in rows if r["model"] == model]
        dtype = mine[0]["dtype"]
        fused = next((r for r in mine if r["optimizer"] == baseline_names(dtype)[0]), None)

        def mb(r: dict[str, Any] | None) -> str:
            if r is None:
                return "not measured"
            text = f"{_num(r.get('peak_mb'), 1)} MB"
            return text + (f" (RSS +{r['rss_mb']:.1f} MB)" if r.get("rss_mb") is not None else "")

        shapes = scaled_shapes(REFERENCE_MODELS[model], scale)
        numel = sum(torch.Size(s).numel() for s in shapes)
        lines.append(
            f"step peak extra on {model} ({len(shapes)} x {'x'.join(map(str, shapes[0]))}, {numel / 1e6:.1f} M elements), "
            f"{dtype} params, torch profiler, MB; beside {baseline_names(dtype)[0]}: {mb(fused)}"
        )
        for r in mine:
            if r is not fused:
                lines.append(f"  {r['optimizer']}: {mb(r)}  ({baseline_names(dtype)[0]}: {mb(fused)})")
    return lines


def family_table(rows: list[dict[str, Any]]) -> str:
    """The rows of the families other than AdamW (``--optimizers``): each family's rows timed side by side with its
    torch reference and bitsandbytes' 8-bit class (where it ran), in one run."""
    return _markdown([
        ("model", False, lambda r: r["model"]), ("family", False, lambda r: r["family"]),
        ("optimizer", False, lambda r: r["optimizer"]), ("kernel", False, lambda r: r.get("kernel") or "—"),
        ("ms/step", True, lambda r: _ms(r["ms"])), ("× torch ref", True, lambda r: _num(r["ratio"], 2)),
        ("torch ref", False, lambda r: r.get("reference") or "—"),
        ("× bitsandbytes 8bit", True, lambda r: _num(r.get("vs_bnb"), 2)),
        ("× torch_optim", True, lambda r: _num(r.get("vs_torch_optim"), 2)),
        ("state B/elem (quantized tensors)", True, lambda r: _num(r["qbytes"], 3)),
        ("state B/elem (all)", True, lambda r: _num(r["bytes"], 3)),
        ("first step s (warm)", True, lambda r: _num(r["first_s"], 2)),
        ("step peak extra, B/elem of largest tensor", True, lambda r: _num(r.get("peak"), 2)),
    ], rows)


def family_summary_lines(rows: list[dict[str, Any]]) -> list[str]:
    """Per model, family, format and path, the torch.optim front end's and apply_gradients' step as a ratio to the
    family's torch reference (and to bitsandbytes' 8-bit class where it ran), with the kernel that ran."""
    lines = []
    groups: dict[tuple, dict[str, dict[str, Any]]] = {}
    for r in rows:
        if r["api"] in ("torch_optim", "apply_gradients"):
            groups.setdefault((r["model"], r["dtype"], r["family"], r["format"], r["path"]), {})[r["api"]] = r
    for (model, dtype, family, fmt, path), by_api in groups.items():
        parts = []
        for api, label in (("torch_optim", "torch_optim"), ("apply_gradients", "apply_gradients inplace")):
            r = by_api.get(api)
            if r is not None and r["ratio"] is not None:
                parts.append(f"{label} {r['ratio']:.2f}x ({_ms(r['ms'])} ms)")
        first = next(iter(by_api.values()))
        if not parts:
            continue
        reference = first["reference"] or "no torch reference"
        ref_ms = first["ms"] / first["ratio"] if first["ratio"] else None
        bnb = [f"{label} {by_api[api]['vs_bnb']:.2f}x" for api, label in (("torch_optim", "torch_optim"), ("apply_gradients", "apply_gradients"))
               if api in by_api and by_api[api].get("vs_bnb") is not None]
        compiled = " (compiled)" if path == "compiled" else ""
        lines.append(
            f"{model} {dtype} {family} {fmt}{compiled}, {first.get('kernel')} kernel: " + ", ".join(parts)
            + f" of {reference}" + (f" ({_ms(ref_ms)} ms)" if ref_ms else "")
            + ("; × bitsandbytes 8bit: " + ", ".join(bnb) if bnb else "; bitsandbytes: not run")
        )
    return lines


def kernel_notes(rows: list[dict[str, Any]], families: Iterable[str]) -> list[str]:
    """Which kernel ran lowbit_fn's rows of each family, and what each family's torch reference is."""
    notes = []
    for family in families:
        kernels = sorted({r["kernel"] for r in rows if r["family"] == family and r.get("kernel")})
        if not kernels:
            continue
        what = {"native": "the native C kernel", "compiled": "the compiled torch path", "unknown": "an unknown kernel"}
        ran = " and ".join(what.get(k, k) for k in kernels)
        why = ""
        if "compiled" in kernels and any(r["path"] == "native" and r.get("kernel") == "compiled" for r in rows if r["family"] == family):
            why = " (the native kernel does not serve this rule yet)"
        notes.append(f"kernel: lowbit_fn's {family} rows ran {ran}{why}")
    for family in families:
        dtypes = sorted({r["dtype"] for r in rows if r["family"] == family})
        for dtype in dtypes:
            notes.append(f"torch reference of {family} ({dtype}): {torch_reference(family, dtype)[2]}")
    return notes


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=list(REFERENCE_MODELS), default=list(DEFAULT_MODELS),
                        help=f"model shapes (default: {' '.join(DEFAULT_MODELS)})")
    parser.add_argument("--formats", nargs="+", choices=list(FORMATS), default=list(FORMATS), help="lowbit_fn state formats")
    parser.add_argument("--apis", nargs="+", choices=list(APIS), default=list(APIS),
                        help="lowbit_fn front ends to time (default: all)")
    parser.add_argument("--paths", nargs="+", choices=list(PATHS), default=["native"],
                        help="lowbit_fn step paths: the native C kernel, the compiled torch path (default: native)")
    parser.add_argument("--optimizers", nargs="+", choices=list(FAMILIES), default=list(DEFAULT_FAMILIES),
                        help="optimizer families to time, each beside torch's fastest implementation of it (or torch's "
                        "fused AdamW where torch has none) and bitsandbytes' 8-bit class (default: adamw)")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32",
                        help="dtype of all params and grads (default float32)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds; the table gives the median (default 5)")
    parser.add_argument("--steps", type=int, default=5, help="steps per optimizer per round (default 5)")
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies every tensor's first dimension (default 1.0)")
    parser.add_argument("--markdown", metavar="PATH", help="also write the report to this file")
    parser.add_argument("--no-cold", dest="cold", action="store_false", help="skip the cold first-step measurements")
    parser.add_argument("--rss", action="store_true",
                        help="also measure each optimizer's peak-RSS growth during a step, in a fresh process each")
    parser.add_argument("--omp-wait", action="store_true",
                        help="only compare AdamW8bit's and torch's fused step with OMP_WAIT_POLICY unset and PASSIVE, "
                        "in alternated fresh processes (--rounds of them, --steps steps each)")
    parser.add_argument("--load", type=int, default=0, metavar="N",
                        help="--omp-wait: run N single-threaded busy processes beside the measurement (default 0)")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.steps < 1:
        parser.error("--rounds and --steps must be >= 1")
    if args.load < 0:
        parser.error("--load must be >= 0")
    if not args.scale > 0:
        parser.error("--scale must be > 0")
    return args


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Run the benchmark, print the Markdown report, and return the table's rows.

    Each row is a dict with ``model``, ``dtype`` (of the params and grads), ``optimizer`` (the row's name), ``api``
    (lowbit_fn's ``functional``, ``functional_inplace``, ``apply_gradients`` or ``torch_optim``; ``torch``;
    ``peer``), ``format`` and
    ``path`` (lowbit_fn's rows; ``None`` elsewhere), ``ms`` (median ms per step), ``ratio`` (to the fused torch
    AdamW of the same dtype; ``None`` if that did not run), ``vs_torch_optim`` (lowbit_fn's functional rows: to the
    torch.optim front end's row of the same format and path; ``None`` elsewhere), ``qbytes`` (state bytes per
    element of the quantized tensors, ``None`` without any), ``bytes`` (all state bytes per parameter element),
    ``first_s`` (seconds of the first step in this process, with whatever the on-disk caches hold: warm after any
    earlier run), ``cold_s`` (native pure functional rows: the first step in a fresh process with empty caches;
    ``None`` elsewhere or with ``--no-cold``), ``peak`` / ``peak_mb`` (a step's peak extra allocations, in bytes per
    element of the largest tensor / in MB) and ``rss_mb`` / ``rss_first_mb`` (``--rss``: peak-RSS growth of a
    step / of the first step, MB; ``None`` without it); ``family`` (``--optimizers``: ``adamw``, ``lion``, ...),
    ``kernel`` (lowbit_fn's rows: ``native`` or ``compiled``, the kernel that ran the step; ``None`` elsewhere),
    ``reference`` (the row ``ratio`` is to: torch's fused AdamW for AdamW, the family's torch reference for the
    others) and ``vs_bnb`` (to bitsandbytes' 8-bit optimizer of the family in the same run; ``None`` where it did
    not run). For other families than AdamW, ``ratio`` is to the family's torch reference.
    """
    if argv is None:
        command = shlex.join(sys.orig_argv)
    else:
        command = f"step_speed.main({argv!r})"
    args = parse_args(argv)
    if args.omp_wait:
        lines = omp_wait_comparison(args.rounds, args.steps, args.load)
        print("\n".join(lines))
        return []

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
    families = list(dict.fromkeys(args.optimizers))
    for model in args.models:
        shapes = scaled_shapes(REFERENCE_MODELS[model], args.scale)
        numel = sum(torch.Size(s).numel() for s in shapes)
        for family in families:
            what = "" if args.optimizers == list(DEFAULT_FAMILIES) else f", {family}"
            print(f"measuring {model}: {len(shapes)} tensors, {numel / 1e6:.2f} M elements, {args.dtype}{what} ...", flush=True)
            apis = [a for a in args.apis if a != "torch_optim" or all(hasattr(lowbit_fn, FAMILIES[family].classes[f]) for f in args.formats)]
            if apis != list(args.apis):
                notes.append(f"{family}: lowbit_fn has not all of {[FAMILIES[family].classes[f] for f in args.formats]}, no torch_optim rows")
            model_rows, model_notes = measure_model(
                model, [s for s in shapes if len(s) == 2] if family == "muon" else shapes, args.formats, args.rounds,
                args.steps, apis, args.scale, args.cold, args.dtype, args.paths, args.rss, family,
            )
            rows += model_rows
            notes += [n for n in model_notes if n not in notes]
            gc.collect()

    after = contention_check()
    adam_rows = [r for r in rows if r["family"] == "adamw"]
    other_rows = [r for r in rows if r["family"] != "adamw"]
    summary = summary_lines(adam_rows, args.scale)
    extended = args.optimizers != list(DEFAULT_FAMILIES)  # the default run prints what it always did
    tables = [markdown_table(adam_rows)] if adam_rows else []
    if other_rows:
        tables.append(family_table(other_rows))
    family_lines = family_summary_lines(rows) if extended else []
    if extended:
        notes += [n for n in kernel_notes(rows, families) if n not in notes]
    body = []
    for table in tables:
        body += [table, ""]
    for block in (summary, family_lines):
        body += [*block, *([""] if block else [])]
    report = "\n".join([
        header,
        "",
        f"median of {args.rounds} rounds x {args.steps} steps, interleaved; params and grads {args.dtype}; "
        f"paths {' '.join(args.paths)}; scale {args.scale:g}" + (f"; optimizers {' '.join(args.optimizers)}" if extended else ""),
        "",
        *body,
        before.describe("before"),
        after.describe("after"),
        *notes,
    ])
    print(after.describe("after"))
    print()
    print("\n".join(body))
    for note in notes:
        print(note)
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as fh:
            fh.write(report + "\n")
    return rows


if __name__ == "__main__":
    main()
