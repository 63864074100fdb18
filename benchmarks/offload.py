"""Training-step time and peak device memory with and without host offload.

What is measured
    A stack of ``--layers`` Linear(``--width``, ``--width``) layers with GELU (default 6 x 4096^2: 100.7 M
    parameters) trained on random data, one full step (forward, backward, optimizer step) per iteration, for:

    * ``AdamW`` on the device (``torch.optim.AdamW``, fused where the device supports it);
    * ``CPUOffloadOptimizer(AdamW)`` and ``CPUOffloadOptimizer(AdamW8bit)``, with ``offload_gradients`` off and on;
    * ``offload(adamw(state_format="8bit"))`` through the functional API.

    Reported: median milliseconds per step over ``--steps`` steps after ``--warmup`` steps, and the peak device
    memory allocated during the timed steps (CUDA only: on a CPU-only machine device and host are one and the
    column reads "—"). Everything runs in one process, one configuration after the other, same data.

Usage:
    python benchmarks/offload.py [--layers 6] [--width 4096] [--batch 8] [--steps 10] [--warmup 3] [--device cuda]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from typing import Any, Callable

import torch

import lowbit_fn


def make_model(layers: int, width: int, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    blocks = []
    for _ in range(layers):
        blocks += [torch.nn.Linear(width, width), torch.nn.GELU()]
    return torch.nn.Sequential(*blocks).to(device)


def synchronize(device: torch.device) -> None:
    if device.type != "cpu":
        torch.accelerator.synchronize(device)


def torch_step(model, opt, x) -> Callable[[], None]:
    def step() -> None:
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()

    return step


def functional_step(model, opt, x) -> Callable[[], None]:
    params = lowbit_fn.params_from_module(model)
    state = {"state": opt.init(params), "params": params}
    loss = lambda p: torch.func.functional_call(model, p.flatten_keys(".").to_dict(), (x,)).square().mean()  # noqa: E731
    grad = torch.func.grad(loss)

    def step() -> None:
        updates, state["state"] = opt.update(grad(state["params"]), state["state"], state["params"])
        state["params"] = lowbit_fn.apply_updates(state["params"], updates)

    return step


def configurations() -> list[tuple[str, Callable[[torch.nn.Module, torch.Tensor], Callable[[], None]]]]:
    kw: dict[str, Any] = {"lr": 1e-4, "weight_decay": 1e-2}
    return [
        ("AdamW on device", lambda m, x: torch_step(m, torch.optim.AdamW(m.parameters(), **kw), x)),
        ("CPUOffloadOptimizer(AdamW)", lambda m, x: torch_step(m, lowbit_fn.CPUOffloadOptimizer(m.parameters(), torch.optim.AdamW, **kw), x)),
        ("CPUOffloadOptimizer(AdamW), offload_gradients", lambda m, x: torch_step(
            m, lowbit_fn.CPUOffloadOptimizer(m.parameters(), torch.optim.AdamW, offload_gradients=True, **kw), x)),
        ("CPUOffloadOptimizer(AdamW8bit)", lambda m, x: torch_step(m, lowbit_fn.CPUOffloadOptimizer(m.parameters(), lowbit_fn.AdamW8bit, **kw), x)),
        ("CPUOffloadOptimizer(AdamW8bit), offload_gradients", lambda m, x: torch_step(
            m, lowbit_fn.CPUOffloadOptimizer(m.parameters(), lowbit_fn.AdamW8bit, offload_gradients=True, **kw), x)),
        ("offload(adamw 8bit), functional", lambda m, x: functional_step(
            m, lowbit_fn.offload(lowbit_fn.adamw(1e-4, state_format="8bit")), x)),
    ]


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    base = make_model(args.layers, args.width, device)
    numel = sum(p.numel() for p in base.parameters())
    x = torch.randn(args.batch, args.width, device=device)
    print(f"offload benchmark: {numel / 1e6:.1f} M params on {device}, torch {torch.__version__}", flush=True)
    rows = []
    for name, make in configurations():
        model = copy.deepcopy(base)
        step = make(model, x)
        for _ in range(args.warmup):
            step()
        synchronize(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            step()
            synchronize(device)
            times.append((time.perf_counter() - t0) * 1e3)
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        rows.append({"config": name, "ms": statistics.median(times), "peak_gib": peak})
        print(f"| {name} | {rows[-1]['ms']:.1f} | {'—' if peak is None else f'{peak:.2f}'} |", flush=True)
        del model, step
    return rows


if __name__ == "__main__":
    main()
