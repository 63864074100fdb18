"""The main job behind ``make demo``: what low-bit optimizer states buy, on a real model and real data.

A small character-level transformer learns to write Python from text that ships with every Python installation,
the standard library's own source code (read from disk: nothing is downloaded). It is trained once per optimizer,
same seed, same batches, same steps, and the demo prints (and writes under ``--out``) one table row per optimizer:
optimizer-state bytes, peak process memory, steps per second and the final training and held-out loss, plus a
plot of the loss curves.

Optimizers (``--optimizers``): ``fp32`` is ``torch.optim.AdamW(fused=True)``, the reference every row is compared
with; ``8bit``, ``4bit``, ``fp8`` are lowbit_fn's AdamW with that state format; ``offload`` is 8-bit AdamW whose
state lives in host memory and whose step runs on the host (``CPUOffloadOptimizer``). ``--torch-optim`` (the
default) drives them as ``torch.optim`` optimizers; ``--functional`` as lowbit_fn transforms in a ``torch.func``
training loop (``grad`` -> ``apply_gradients``, in place), with ``lowbit_fn.offload`` for the offload row.
The fp32 reference row is ``torch.optim``'s in both modes.

Families (``--family``, default ``adamw``: all of the above): ``lion``, ``sgd``, ``rmsprop``, ``ademamix`` run every
row with that optimizer instead (``Lion8bit``, ``SGD4bit``, ... ; ``lowbit_fn.lion(...)`` in ``--functional``), with
the family's hyperparameters (:data:`FAMILIES`; ``--lr`` and ``--weight-decay`` override them). The fp32 row is
torch's implementation where torch has one (``torch.optim.SGD(fused=True)``, ``torch.optim.RMSprop(foreach=True)``;
torch's RMSprop has no fused kernel), else lowbit_fn's fp32-state class (``lowbit_fn.Lion``, ``lowbit_fn.AdEMAMix``).
``muon`` runs Muon on the transformer blocks' 2-D weights and AdamW (same state format, its own lr) on the rest
(embeddings, head, norms, biases), as torch.optim.Muon requires: ``Muon8bit`` + ``AdamW8bit``, ...; two
transforms on the two subsets of the parameters in ``--functional``; the fp32 row ``torch.optim.Muon`` +
``torch.optim.AdamW(fused=True)``; ``--lr`` and ``--weight-decay`` set Muon's, and the state bytes are both's.
``--seeds 0 1 2`` repeats every row for each seed and adds a quality table: each row's final held-out and training
loss as a ratio to the fp32 row of the same seed, mean and min..max over seeds (the first table, the plot and
``results.json``'s ``results`` are the first seed's).

Run it with ``python -m lowbit_fn.demo`` (``--help`` lists the options). The progress bars need ``tqdm`` and the
plot ``matplotlib``: the ``demo`` extra (``pip install 'lowbit_fn[demo]'``; ``make demo`` installs it).

Example:
    >>> from lowbit_fn.demo import Corpus, stdlib_text
    >>> corpus = Corpus.from_bytes(stdlib_text(max_bytes=100_000))
    >>> x, y = corpus.batch("train", batch_size=2, context=16, generator=torch.Generator().manual_seed(0))
    >>> x.shape, bool((x[:, 1:] == y[:, :-1]).all())
    (torch.Size([2, 16]), True)
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import subprocess
import sys
import sysconfig
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import lowbit_fn

__all__ = ["Corpus", "CharTransformer", "RunResult", "stdlib_text", "train", "main"]

OPTIMIZERS = ("fp32", "8bit", "4bit", "fp8", "offload")
SIZES: dict[str, dict[str, int]] = {  # width, layers, heads, context (characters)
    "tiny": {"width": 64, "layers": 2, "heads": 4, "context": 64},
    "small": {"width": 128, "layers": 4, "heads": 4, "context": 128},
    "medium": {"width": 256, "layers": 6, "heads": 8, "context": 256},
}
VOCAB = 256  # bytes of UTF-8 text
_LOW_BIT = {"8bit": lowbit_fn.AdamW8bit, "4bit": lowbit_fn.AdamW4bit, "fp8": lowbit_fn.AdamWFp8}


@dataclass(frozen=True)
class Family:
    """One optimizer family of ``--family``: lowbit_fn's functional factory and torch.optim classes per state format,
    the fp32 reference (a ``torch.optim`` class with its flags, or lowbit_fn's fp32-state class) and the
    hyperparameters (torch.optim's names, ``lr`` and ``weight_decay`` the peak learning rate and decay).

    ``rest``: for an optimizer of matrices only (Muon), the family that steps every other parameter (embeddings,
    the output head, norms, biases), with its own hyperparameters; the family's own optimizer then takes the
    transformer blocks' 2-D weights (:func:`hidden_matrix`). Both run in every row, in the row's state format."""

    factory: Any
    classes: dict[str, Any]
    reference: Any
    reference_flags: dict[str, Any]
    hyper: dict[str, Any]
    rest: "Family | None" = None


FAMILIES: dict[str, Family] = {
    "adamw": Family(lowbit_fn.adamw, _LOW_BIT, torch.optim.AdamW, {"fused": True}, {"lr": 2e-3, "weight_decay": 0.01}),
    # the other families' peak lr: the best fp32 held-out loss of those tried (300 steps, the small model, seed 0):
    # Lion 5e-4 / 2e-3 -> 2.497 / 2.480 (decoupled weight decay 0.1, 10x AdamW's); SGD (momentum 0.9) 0.3 -> 2.428
    # (1.0 diverges on the tiny model); RMSprop 2e-3 -> 2.300; AdEMAMix 2e-3 -> 2.333; AdamW 2e-3 -> 2.343
    "lion": Family(lowbit_fn.lion, {"8bit": lowbit_fn.Lion8bit, "4bit": lowbit_fn.Lion4bit, "fp8": lowbit_fn.LionFp8},
                   lowbit_fn.Lion, {}, {"lr": 2e-3, "weight_decay": 0.1}),
    "sgd": Family(lowbit_fn.sgd, {"8bit": lowbit_fn.SGD8bit, "4bit": lowbit_fn.SGD4bit, "fp8": lowbit_fn.SGDFp8},
                  torch.optim.SGD, {"fused": True}, {"lr": 0.3, "momentum": 0.9, "weight_decay": 0.0}),
    "rmsprop": Family(lowbit_fn.rmsprop, {"8bit": lowbit_fn.RMSprop8bit, "4bit": lowbit_fn.RMSprop4bit, "fp8": lowbit_fn.RMSpropFp8},
                      torch.optim.RMSprop, {"foreach": True}, {"lr": 2e-3, "weight_decay": 0.0}),
    # AdEMAMix: the slow EMA's b3 scaled to a run of a few hundred steps (the paper's 0.9999 is for ~100k steps)
    "ademamix": Family(lowbit_fn.ademamix, {"8bit": lowbit_fn.AdEMAMix8bit, "4bit": lowbit_fn.AdEMAMix4bit, "fp8": lowbit_fn.AdEMAMixFp8},
                       lowbit_fn.AdEMAMix, {}, {"lr": 2e-3, "weight_decay": 0.01, "betas": (0.9, 0.999, 0.999), "alpha": 5.0}),
}
# Muon: the blocks' 2-D weights (Muon<format>, fp32 row torch.optim.Muon) and AdamW<same format> for the rest
# (embeddings, head, norms, biases; fp32 row torch.optim.AdamW(fused=True)), as torch.optim.Muon's docs and Keller
# Jordan do. The peak lrs (Muon's / its AdamW's, the same schedule): the best fp32 held-out loss of those tried (200
# steps, the tiny model, seed 0; Muon's adjust_lr_fn None, torch's default): Muon 0.005 / 0.01 / 0.02 / 0.05 / 0.1
# with AdamW 5e-3 -> 2.476 / 2.394 / 2.286 / 2.217 / 2.297; with Muon 0.05, AdamW 2e-3 / 5e-3 / 0.01 / 0.02 / 0.05 / 0.1
# -> 2.276 / 2.217 / 2.159 / 2.118 / 2.069 / 2.064; Muon 0.03 / 0.07 / 0.1 with AdamW 0.05 -> 2.095 / 2.066 / 2.100.
# On the small model (300 steps) 0.05 / 0.05 -> 1.731, 0.05 / 0.02 -> 1.752, 0.05 / 0.1 -> 1.757, 0.1 / 0.05 -> 1.732,
# 0.02 / 2e-3 -> 1.985. The AdamW part (embeddings, head, norms, biases) wants a far larger lr than AdamW for the
# whole model (2e-3); Muon's weight decay is torch's default 0.1, the AdamW part's the demo's 0.01 (not tuned)
FAMILIES["muon"] = Family(
    lowbit_fn.muon, {"8bit": lowbit_fn.Muon8bit, "4bit": lowbit_fn.Muon4bit, "fp8": lowbit_fn.MuonFp8},
    torch.optim.Muon, {}, {"lr": 0.05, "weight_decay": 0.1},
    rest=replace(FAMILIES["adamw"], hyper={"lr": 0.05, "weight_decay": 0.01}),
)


def hidden_matrix(name: str, param: Tensor) -> bool:
    """Whether a family with a ``rest`` (Muon) takes the parameter ``name`` of :class:`CharTransformer`: the
    transformer blocks' 2-D weights (not the embeddings, the head, norms or biases)."""
    return name.startswith("blocks.") and param.dim() == 2


# --------------------------------------------------------------------------------------------------- the data


def stdlib_sources() -> list[Path]:
    """The standard library's top-level ``*.py`` files, sorted by name (this Python's own installation)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(root.glob("*.py"))
    if not files:
        raise FileNotFoundError(f"no Python sources of the standard library under {root}")
    return files


def stdlib_text(max_bytes: int = 4_000_000) -> bytes:
    """Up to ``max_bytes`` of standard-library source text (UTF-8), whole files in name order."""
    if max_bytes <= 0:
        raise ValueError(f"max_bytes must be positive, got {max_bytes}")
    chunks, total = [], 0
    for path in stdlib_sources():
        chunks.append(path.read_bytes())
        total += len(chunks[-1])
        if total >= max_bytes:
            break
    return b"".join(chunks)[:max_bytes]


@dataclass
class Corpus:
    """Byte-level text split into a training part and a held-out part (the last ``valid_fraction`` of the text:
    other files than the training part's, except for the one file on the border)."""

    train: Tensor  # uint8
    valid: Tensor  # uint8

    @classmethod
    def from_bytes(cls, data: bytes, valid_fraction: float = 0.1) -> "Corpus":
        if not 0 < valid_fraction < 1:
            raise ValueError(f"valid_fraction must be in (0, 1), got {valid_fraction}")
        tokens = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        cut = int(len(tokens) * (1 - valid_fraction))
        return cls(tokens[:cut].clone(), tokens[cut:].clone())

    def batch(self, split: str, batch_size: int, context: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """``batch_size`` random windows of ``context`` bytes (int64) and the same windows one byte later."""
        data = self._split(split)
        if len(data) <= context + 1:
            raise ValueError(f"the {split} text has {len(data)} bytes, fewer than a window of {context + 1}")
        starts = torch.randint(0, len(data) - context - 1, (batch_size,), generator=generator)
        windows = torch.stack([data[s : s + context + 1] for s in starts.tolist()]).long()
        return windows[:, :-1], windows[:, 1:]

    def _split(self, split: str) -> Tensor:
        if split not in ("train", "valid"):
            raise ValueError(f"split must be 'train' or 'valid', got {split!r}")
        return self.train if split == "train" else self.valid


# --------------------------------------------------------------------------------------------------- the model


class _Block(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.fc, self.out = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attended.transpose(1, 2).reshape(b, t, c))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class CharTransformer(nn.Module):
    """A GPT-style decoder over bytes: token and position embeddings, pre-norm blocks, a linear head."""

    def __init__(self, width: int = 128, layers: int = 4, heads: int = 4, context: int = 128, vocab: int = VOCAB):
        super().__init__()
        if width % heads:
            raise ValueError(f"width ({width}) must be a multiple of heads ({heads})")
        self.context = context
        self.tokens, self.positions = nn.Embedding(vocab, width), nn.Embedding(context, width)
        self.blocks = nn.Sequential(*[_Block(width, heads) for _ in range(layers)])
        self.norm, self.head = nn.LayerNorm(width), nn.Linear(width, vocab)

    def forward(self, idx: Tensor) -> Tensor:
        positions = torch.arange(idx.shape[1], device=idx.device)
        return self.head(self.norm(self.blocks(self.tokens(idx) + self.positions(positions))))


def _loss(logits: Tensor, targets: Tensor) -> Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


# --------------------------------------------------------------------------------------------------- a run


@dataclass
class Config:
    size: str = "small"
    steps: int = 300
    batch_size: int = 16
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup: int = 30
    eval_every: int = 50
    eval_batches: int = 8
    corpus_bytes: int = 4_000_000
    seed: int = 0
    api: str = "torch_optim"  # or "functional"
    family: str = "adamw"  # see FAMILIES

    def lr_factor(self, step: Tensor) -> Tensor:
        """Linear warm-up, then cosine decay to 10%, of the step count (a tensor: the same in both APIs)."""
        t = step.to(torch.float64)
        warm = torch.clamp((t + 1) / self.warmup, max=1.0)
        cosine = 0.5 * (1 + torch.cos(math.pi * torch.clamp(t / self.steps, max=1.0)))
        return warm * (0.1 + 0.9 * cosine)


@dataclass
class RunResult:
    """One training run. ``peak_rss_mb``: the peak resident memory of the process that ran it (the demo's CLI runs
    each optimizer in a fresh process, so there it is the run's own)."""

    optimizer: str
    api: str
    state_bytes: int
    params: int
    peak_rss_mb: float | None
    steps_per_s: float
    train_loss: float
    valid_loss: float
    curve: list[float] = field(default_factory=list)  # training loss per step
    valid_curve: list[tuple[int, float]] = field(default_factory=list)  # (step, held-out loss)


def _tensor_bytes(tensors: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, Tensor))


def _peak_rss_mb() -> float | None:
    """This process's peak resident memory so far (Linux), in MiB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _progress(total: int, desc: str, enabled: bool):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # the demo extra is not installed: run without bars
        return None
    return tqdm(total=total, desc=desc, disable=not enabled, leave=True, dynamic_ncols=True)


class _Stepper:
    """One optimizer driving the model: ``step(x, y)`` trains on a batch and returns the loss; ``state_bytes()``."""

    def __init__(self, name: str, model: CharTransformer, cfg: Config):
        self.model = model
        self.functional = cfg.api == "functional" and name != "fp32"
        family = FAMILIES[cfg.family]
        hyper: dict[str, Any] = {**family.hyper, "lr": cfg.lr, "weight_decay": cfg.weight_decay}
        # (family, hyperparameters, parameter names) per optimizer: one, or with a rest (Muon) two, each its own
        # optimizer with its own state, schedule and step
        named = list(model.named_parameters())
        if family.rest is None:
            parts = [(family, hyper, [n for n, _ in named])]
        else:
            parts = [(family, hyper, [n for n, p in named if hidden_matrix(n, p)]),
                     (family.rest, dict(family.rest.hyper), [n for n, p in named if not hidden_matrix(n, p)])]
        if self.functional:
            self.params = lowbit_fn.params_from_module(model)
            self.parts: list[tuple[Any, tuple | None]] = []  # (transform, the parameters' key paths or None: all)
            self.states = []
            for part, part_hyper, names in parts:
                lr = part_hyper["lr"]
                schedule = lambda count, lr=lr: lr * cfg.lr_factor(count)  # noqa: E731
                extra = {k: v for k, v in part_hyper.items() if k not in ("lr", "betas")}
                extra.update(zip(("b1", "b2", "b3"), part_hyper.get("betas", ())))
                core = part.factory(schedule, **extra, state_format="8bit" if name == "offload" else name)
                transform = lowbit_fn.offload(core) if name == "offload" else core
                keys = None if family.rest is None else tuple(tuple(n.split(".")) for n in names)
                self.parts.append((transform, keys))
                self.states.append(transform.init(self._select(self.params, keys)))

            def loss_of(params, x, y):
                logits = torch.func.functional_call(model, params.flatten_keys(".").to_dict(), (x,))
                return _loss(logits, y)

            self.grad = torch.func.grad_and_value(loss_of)
        else:
            by_name = dict(named)
            self.opts: list[torch.optim.Optimizer] = []
            for part, part_hyper, names in parts:
                params = [by_name[n] for n in names]
                if name == "fp32":
                    opt = part.reference(params, **part_hyper, **part.reference_flags)
                elif name == "offload":
                    opt = lowbit_fn.CPUOffloadOptimizer(params, part.classes["8bit"], **part_hyper)
                else:
                    opt = part.classes[name](params, **part_hyper)
                self.opts.append(opt)
            self.scheds = [torch.optim.lr_scheduler.LambdaLR(opt, lambda s: float(cfg.lr_factor(torch.tensor(s))))
                           for opt in self.opts]

    @staticmethod
    def _select(tree: Any, keys: tuple | None) -> Any:
        return tree if keys is None else tree.select(*keys)  # the same tensors, a subset of the keys

    def step(self, x: Tensor, y: Tensor) -> float:
        if self.functional:
            grads, loss = self.grad(self.params, x, y)
            # one pass per step for adamw (offload's transform runs update, then apply_updates); the params are the
            # module's own tensors (detached views), updated in place (with a rest, each part steps its own subset)
            for i, (transform, keys) in enumerate(self.parts):
                params, self.states[i] = lowbit_fn.apply_gradients(
                    transform, self._select(grads, keys), self.states[i], self._select(self.params, keys), inplace=True)
                if keys is None:
                    self.params = params
            return float(loss.detach())
        loss = _loss(self.model(x), y)
        for opt in self.opts:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        for opt in self.opts:
            opt.step()
        for sched in self.scheds:
            sched.step()
        return float(loss.detach())

    @torch.no_grad()
    def evaluate(self, batches: list[tuple[Tensor, Tensor]]) -> float:
        if self.functional:  # the trained params back into the module
            for key, value in self.params.flatten_keys(".").items():
                self.model.get_parameter(key).copy_(value)
        return sum(float(_loss(self.model(x), y)) for x, y in batches) / len(batches)

    def state_bytes(self) -> int:
        """The bytes of every optimizer-state tensor, of all the run's optimizers (Muon's and its AdamW's)."""
        if self.functional:
            return sum(_tensor_bytes(state.values(include_nested=True, leaves_only=True)) for state in self.states)
        total = 0
        for opt in self.opts:
            opt = opt.optimizer if isinstance(opt, lowbit_fn.CPUOffloadOptimizer) else opt
            total += _tensor_bytes(t for st in opt.state.values() for t in st.values())
        return total


def train(name: str, corpus: Corpus, cfg: Config, *, progress: bool = True) -> RunResult:
    """Train a fresh model (seeded by ``cfg.seed``) with optimizer ``name`` for ``cfg.steps`` steps."""
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")
    if cfg.size not in SIZES:
        raise ValueError(f"size must be one of {tuple(SIZES)}, got {cfg.size!r}")
    if cfg.family not in FAMILIES:
        raise ValueError(f"family must be one of {tuple(FAMILIES)}, got {cfg.family!r}")
    size = SIZES[cfg.size]
    torch.manual_seed(cfg.seed)
    model = CharTransformer(**size)
    stepper = _Stepper(name, model, cfg)
    data = torch.Generator().manual_seed(cfg.seed)  # the same batches for every optimizer
    fixed = torch.Generator().manual_seed(cfg.seed + 1)
    eval_sets = {
        split: [corpus.batch(split, cfg.batch_size, size["context"], fixed) for _ in range(cfg.eval_batches)]
        for split in ("train", "valid")
    }
    curve, valid_curve, seconds = [], [], 0.0
    bar = _progress(cfg.steps, f"{name:>7} ({cfg.api})", progress)
    for step in range(cfg.steps):
        x, y = corpus.batch("train", cfg.batch_size, size["context"], data)
        start = time.perf_counter()
        curve.append(stepper.step(x, y))
        seconds += time.perf_counter() - start
        if not math.isfinite(curve[-1]):
            raise FloatingPointError(f"{name}: the loss became {curve[-1]} at step {step}")
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            valid_curve.append((step + 1, stepper.evaluate(eval_sets["valid"])))
        if bar is not None:
            bar.set_postfix(loss=f"{curve[-1]:.3f}", refresh=False)
            bar.update(1)
    if bar is not None:
        bar.close()
    return RunResult(
        optimizer=name,
        api="torch_optim" if name == "fp32" else cfg.api,
        state_bytes=stepper.state_bytes(),
        params=sum(p.numel() for p in model.parameters()),
        peak_rss_mb=_peak_rss_mb(),
        steps_per_s=cfg.steps / seconds,
        train_loss=stepper.evaluate(eval_sets["train"]),
        valid_loss=valid_curve[-1][1],
        curve=curve,
        valid_curve=valid_curve,
    )


# --------------------------------------------------------------------------------------------------- reporting


def markdown_table(results: list[RunResult]) -> str:
    """One row per run; the losses also relative to the fp32 row (when there is one)."""
    ref = next((r for r in results if r.optimizer == "fp32"), None)
    lines = [
        "| optimizer | API | state MB | state B/param | peak RSS MB | steps/s | train loss | held-out loss | held-out vs fp32 |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        relative = f"{100 * (r.valid_loss / ref.valid_loss - 1):+.2f}%" if ref is not None else "—"
        peak = f"{r.peak_rss_mb:.0f}" if r.peak_rss_mb is not None else "—"
        lines.append(
            f"| {r.optimizer} | {r.api} | {r.state_bytes / 2**20:.2f} | {r.state_bytes / r.params:.2f} | {peak} "
            f"| {r.steps_per_s:.2f} | {r.train_loss:.4f} | {r.valid_loss:.4f} | {relative} |"
        )
    return "\n".join(lines)


def seeds_table(runs: dict[int, list[RunResult]], family: str = "adamw") -> str:
    """Per optimizer row, its final held-out and training loss as a ratio to the fp32 row of the same seed: the mean
    over seeds and the smallest and largest ratio of a seed."""
    seeds = list(runs)
    lines = [
        f"| {family} | held-out vs fp32 (mean) | min..max over seeds | train vs fp32 (mean) | min..max over seeds | held-out loss (mean) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for i, first in enumerate(runs[seeds[0]]):
        cells = []
        for attr in ("valid_loss", "train_loss"):
            ratios = []
            for seed in seeds:
                ref = next((r for r in runs[seed] if r.optimizer == "fp32"), None)
                if ref is not None:
                    ratios.append(getattr(runs[seed][i], attr) / getattr(ref, attr))
            if ratios:
                cells += [f"{sum(ratios) / len(ratios):.4f}", f"{min(ratios):.4f}..{max(ratios):.4f}"]
            else:
                cells += ["—", "—"]
        mean = sum(runs[seed][i].valid_loss for seed in seeds) / len(seeds)
        lines.append(f"| {first.optimizer} | " + " | ".join(cells) + f" | {mean:.4f} |")
    return "\n".join(lines)


def plot(results: list[RunResult], path: Path) -> None:
    """Training loss (moving average over 20 steps) and held-out loss per optimizer, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for r in results:
        curve = torch.tensor(r.curve)
        window = min(20, len(curve))
        smooth = curve.unfold(0, window, 1).mean(1) if window > 1 else curve
        left.plot(range(window, len(curve) + 1), smooth.tolist(), label=r.optimizer)
        right.plot([s for s, _ in r.valid_curve], [v for _, v in r.valid_curve], marker="o", label=r.optimizer)
    left.set(title="training loss (moving average)", xlabel="step", ylabel="cross-entropy (nats/byte)")
    right.set(title="held-out loss", xlabel="step", ylabel="cross-entropy (nats/byte)")
    for ax in (left, right):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _machine() -> str:
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, Python {platform.python_version()}"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m lowbit_fn.demo", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Example: python -m lowbit_fn.demo --size tiny --steps 100 --optimizers fp32 8bit --functional",
    )
    defaults = Config()
    parser.add_argument("--size", choices=list(SIZES), default=defaults.size,
                        help="model size: " + "; ".join(f"{k}: {v}" for k, v in SIZES.items()) + f" (default {defaults.size})")
    parser.add_argument("--steps", type=int, default=defaults.steps, help=f"training steps per optimizer (default {defaults.steps})")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help=f"windows per batch (default {defaults.batch_size})")
    parser.add_argument("--lr", type=float, default=None,
                        help=f"peak learning rate (default {defaults.lr}; other families: their own, see --family; muon: "
                        "Muon's, its AdamW keeps its own)")
    parser.add_argument("--weight-decay", type=float, default=None,
                        help=f"AdamW weight decay (default {defaults.weight_decay}; other families: their own)")
    parser.add_argument("--family", choices=list(FAMILIES), default=defaults.family,
                        help="the optimizer of every row (default adamw); its lr and weight decay: "
                        + "; ".join(f"{k} {v.hyper['lr']:g}, {v.hyper['weight_decay']:g}"
                                   + (f" (the rest: adamw {v.rest.hyper['lr']:g}, {v.rest.hyper['weight_decay']:g})" if v.rest else "")
                                   for k, v in FAMILIES.items()))
    parser.add_argument("--optimizers", nargs="+", choices=OPTIMIZERS, default=list(OPTIMIZERS), help="which rows (default: all)")
    api = parser.add_mutually_exclusive_group()
    api.add_argument("--torch-optim", dest="api", action="store_const", const="torch_optim", help="torch.optim optimizers (default)")
    api.add_argument("--functional", dest="api", action="store_const", const="functional", help="lowbit_fn transforms in a torch.func loop")
    parser.set_defaults(api=defaults.api)
    parser.add_argument("--eval-every", type=int, default=defaults.eval_every, help=f"held-out evaluation interval (default {defaults.eval_every})")
    parser.add_argument("--corpus-bytes", type=int, default=defaults.corpus_bytes, help=f"bytes of stdlib source to use (default {defaults.corpus_bytes})")
    parser.add_argument("--seed", type=int, default=defaults.seed, help=f"model, batches (default {defaults.seed})")
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="run every row once per seed and add a table of each row's losses relative to the fp32 "
                        "row of the same seed (mean, min..max over seeds)")
    parser.add_argument("--out", type=Path, default=Path("demo_out"), help="folder for results.md, results.json, loss.png (default demo_out)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    family = FAMILIES[args.family].hyper
    args.lr = family["lr"] if args.lr is None else args.lr
    args.weight_decay = family["weight_decay"] if args.weight_decay is None else args.weight_decay
    for name in ("steps", "batch_size", "eval_every", "corpus_bytes"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    return args


def _train_in_child(name: str, cfg: Config, progress: bool) -> RunResult:
    """:func:`train` in a fresh Python process, so that each run's peak process memory is its own."""
    job = json.dumps({"name": name, "config": asdict(cfg), "progress": progress})
    child = subprocess.run([sys.executable, "-m", "lowbit_fn.demo", "--run-one", job], stdout=subprocess.PIPE, text=True)
    if child.returncode != 0:
        raise RuntimeError(f"the {name} run failed (exit status {child.returncode}; its error is printed above)")
    return RunResult(**json.loads(child.stdout.strip().splitlines()[-1]))


def _run_one(job: str) -> None:
    spec = json.loads(job)
    cfg = Config(**spec["config"])
    result = train(spec["name"], Corpus.from_bytes(stdlib_text(cfg.corpus_bytes)), cfg, progress=spec["progress"])
    print(json.dumps(asdict(result)))


def main(argv: list[str] | None = None) -> list[RunResult]:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--run-one"]:  # internal: one run in a child process (see _train_in_child)
        _run_one(argv[1])
        return []
    args = parse_args(argv)
    cfg = Config(size=args.size, steps=args.steps, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                 eval_every=args.eval_every, corpus_bytes=args.corpus_bytes, seed=args.seed, api=args.api,
                 warmup=max(1, min(Config.warmup, args.steps // 10)), family=args.family)
    corpus = Corpus.from_bytes(stdlib_text(cfg.corpus_bytes))
    size = SIZES[cfg.size]
    print(f"corpus: {len(corpus.train):,} training and {len(corpus.valid):,} held-out bytes of the standard library's "
          f"source ({sysconfig.get_paths()['stdlib']})")
    print(f"model: {cfg.size} {size}, {sum(p.numel() for p in CharTransformer(**size).parameters()):,} parameters; "
          f"{cfg.steps} steps of {cfg.batch_size} x {size['context']} bytes; API: {cfg.api}"
          + (f"; family: {cfg.family}, lr {cfg.lr:g}, weight decay {cfg.weight_decay:g}" if cfg.family != "adamw" else ""))
    seeds = list(dict.fromkeys(args.seeds)) if args.seeds else [cfg.seed]
    runs = {seed: [_train_in_child(name, replace(cfg, seed=seed), progress=not args.no_progress) for name in args.optimizers]
            for seed in seeds}
    results = runs[seeds[0]]
    table = markdown_table(results)
    if args.seeds:
        table += "\n\n" + seeds_table(runs, cfg.family)
    command = "python -m lowbit_fn.demo " + " ".join(argv)
    notes = [
        f"- command: `{command.strip()}`; {datetime.datetime.now().isoformat(timespec='seconds')}; {_machine()}",
        "- state: bytes of every optimizer-state tensor; peak RSS: peak resident memory of the run's own process (each run "
        "is a fresh process: Python, torch, the data, the model, its activations and the optimizer)",
        "- steps/s: optimizer and model step together (forward, backward, update), evaluation excluded",
        "- losses: mean cross-entropy (nats per byte) over the same fixed batches for every optimizer",
    ]
    if "offload" in args.optimizers:
        notes.append(f"- offload: 8-bit {'AdamW' if cfg.family == 'adamw' else cfg.family}"
                     f"{' (+ 8-bit adamw)' if FAMILIES[cfg.family].rest is not None else ''} stepped on the host; on a CPU-only "
                     "machine host and device are one, so it equals the 8bit row but for the wrapper's work")
    if cfg.family != "adamw":
        family = FAMILIES[cfg.family]

        def reference(f: Family) -> str:
            flags = ", ".join(f"{k}=True" for k in f.reference_flags)
            where = "torch.optim" if f.reference.__module__.startswith("torch.") else "lowbit_fn"
            return f"{where}.{f.reference.__name__}({flags})"

        hyper = dict(family.hyper, lr=cfg.lr, weight_decay=cfg.weight_decay)
        if family.rest is None:
            notes.append(f"- family {cfg.family}: the fp32 row is {reference(family)} (fp32 state); hyperparameters {hyper}")
        else:
            rest = next(k for k, v in FAMILIES.items() if v.factory is family.rest.factory)
            notes.append(f"- family {cfg.family}: {cfg.family} for the transformer blocks' 2-D weights, {rest} (same state "
                         f"format) for the embeddings, head, norms and biases; the fp32 row is {reference(family)} + "
                         f"{reference(family.rest)} (fp32 state); hyperparameters {hyper}, {rest} {family.rest.hyper}; "
                         "state bytes: both optimizers'")
    report = "\n".join(["# lowbit_fn demo", "", table, "", *notes, ""])
    print()
    print(table)
    print("\n".join(notes))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.md").write_text(report, encoding="utf-8")
    saved: dict[str, Any] = {"config": asdict(replace(cfg, seed=seeds[0])), "results": [asdict(r) for r in results]}
    if args.seeds:
        saved["seeds"] = {str(seed): [asdict(r) for r in rs] for seed, rs in runs.items()}
    (args.out / "results.json").write_text(json.dumps(saved, indent=1))
    try:
        plot(results, args.out / "loss.png")
        print(f"wrote {args.out / 'results.md'}, {args.out / 'results.json'}, {args.out / 'loss.png'}")
    except ImportError:
        print(f"wrote {args.out / 'results.md'}, {args.out / 'results.json'} (no plot: matplotlib is not installed)")
    return results


if __name__ == "__main__":
    main()
