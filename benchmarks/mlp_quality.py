"""Training quality of each state format on a small MLP regression, against fp32 AdamW (REFERENCE §5 style).

A student MLP (64 -> 256 -> 256 -> 1, tanh) fits a fixed random teacher MLP on 2048 Gaussian inputs with 200
AdamW steps (minibatches of 128 drawn with a seeded generator, lr 1e-3, weight decay 1e-2) through the functional
API (``torch.func`` loop); the reported loss is the train loss over all 2048 inputs. The three weight
matrices are quantized (>= 4096 elements); biases keep fp32 state. Prints, per format, the final train loss and
its ratio to fp32 AdamW's, averaged over seeds.

    python benchmarks/mlp_quality.py [--steps 200] [--seeds 0 1 2] [--lr 1e-3] [--depth 2]
                                     [--formats 8bit fp8 4bit 4bit:nearest 8bit:stochastic fp8:stochastic]
"""

from __future__ import annotations

import argparse
import math
import statistics

import torch
from torch import nn

import lowbit_fn

FORMATS = ("fp32", "8bit", "fp8", "4bit")
# "<state_format>[:<rounding>]": the format with its default rounding, or with the one named
VARIANTS = ("8bit", "fp8", "4bit", "4bit:nearest", "8bit:stochastic", "fp8:stochastic")


def make_problem(
    seed: int, n: int = 2048, dim: int = 64, hidden: int = 256, depth: int = 2
) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """Inputs, teacher targets and a freshly initialized student with ``depth`` hidden layers, all from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=gen)
    with torch.random.fork_rng():
        torch.manual_seed(seed + 10_000)
        teacher = nn.Sequential(nn.Linear(dim, 256), nn.Tanh(), nn.Linear(256, 1))
        torch.manual_seed(seed)
        layers: list[nn.Module] = [nn.Linear(dim, hidden), nn.Tanh()]
        for _ in range(depth - 1):
            layers += [nn.Linear(hidden, hidden), nn.Tanh()]
        student = nn.Sequential(*layers, nn.Linear(hidden, 1))
    with torch.no_grad():
        y = teacher(x)
    return student, x, y


def train(variant: str, seed: int = 0, steps: int = 200, lr: float = 1e-3, batch: int = 128, depth: int = 2) -> list[float]:
    """Full train-set loss after each step (``steps`` values) with ``adamw(state_format=..., rounding=...)``."""
    model, x, y = make_problem(seed, depth=depth)
    params = lowbit_fn.params_from_module(model)
    state_format, _, rounding = variant.partition(":")
    opt = lowbit_fn.adamw(learning_rate=lr, weight_decay=1e-2, state_format=state_format, rounding=rounding or None)
    state = opt.init(params)
    order = torch.Generator().manual_seed(seed + 20_000)

    def loss_fn(p, xb, yb):
        out = torch.func.functional_call(model, p.flatten_keys(".").to_dict(), (xb,))
        return torch.nn.functional.mse_loss(out, yb)

    grad_fn = torch.func.grad(loss_fn)
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (batch,), generator=order)
        updates, state = opt.update(grad_fn(params, x[idx], y[idx]), state, params)
        params = lowbit_fn.apply_updates(params, updates)
        with torch.no_grad():
            losses.append(float(loss_fn(params, x, y)))
    return losses


def compare(
    formats=VARIANTS, seeds=(0, 1, 2), steps: int = 200, lr: float = 1e-3, depth: int = 2, batch: int = 128
) -> dict[str, dict[str, float]]:
    """Per variant: mean final loss, and mean ratios to fp32 of the final, step-20 and step-50 losses."""
    runs = {f: [train(f, s, steps, lr, batch, depth) for s in seeds] for f in dict.fromkeys(("fp32", *formats))}
    out = {}
    for f in formats:
        row = {"final": statistics.mean(r[-1] for r in runs[f])}
        for label, idx in (("ratio", -1), ("ratio@20", 19), ("ratio@50", 49)):
            if idx < steps:
                row[label] = statistics.mean(a[idx] / b[idx] for a, b in zip(runs[f], runs["fp32"]))
        row["finite"] = all(math.isfinite(v) for r in runs[f] for v in r)
        out[f] = row
    return out


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--depth", type=int, default=2, help="hidden layers of width 256 (default 2)")
    parser.add_argument("--batch", type=int, default=128, help="minibatch size (2048: full batch)")
    parser.add_argument("--formats", nargs="+", default=list(VARIANTS), help=f"variants, e.g. {', '.join(VARIANTS)}")
    args = parser.parse_args(argv)
    table = compare(args.formats, tuple(args.seeds), args.steps, args.lr, args.depth, args.batch)
    print(f"MLP regression ({args.depth} hidden layers, batch {args.batch}), {args.steps} AdamW steps, lr {args.lr}, seeds {args.seeds}")
    print("| state | final loss | × fp32 final | × fp32 @20 | × fp32 @50 |")
    print("|---|---:|---:|---:|---:|")
    for f, row in table.items():
        cells = [f"{row.get(k, float('nan')):.3f}" for k in ("ratio", "ratio@20", "ratio@50")]
        print(f"| {f} | {row['final']:.5f} | " + " | ".join(cells) + " |")
    return table


if __name__ == "__main__":
    main()
