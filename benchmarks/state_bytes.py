"""Optimizer-state bytes per parameter element of lowbit_fn's AdamW (and, with ``--optimizers``, the rest of the
family), per state format, on three models.

What is computed
    For each state format (``fp32``, ``8bit``, ``4bit``, ``fp8``) and model, the state that
    ``lowbit_fn.adamw(state_format=<format>).init(params)`` builds (default block sizes and ``min_quant_size``),
    with the params on the ``meta`` device (shapes and dtypes only: nothing is allocated, so it takes well under a
    second; CPU zeros where ``meta`` does not work), and the sum of ``numel * element_size`` of its leaves:

    * "all state / all params": every state leaf (moments, scales, step count, the zero-size layout entries)
      divided by the elements of all the params;
    * "quantized groups / quantized params": the leaves of the quantized groups (the entries of ``state["0"]``
      whose name ends with ``_block<N>``: codes and scales) divided by the elements of the params in them (those
      of two or more dimensions with at least 4096 elements; checked; none for ``fp32``);
    * "scale overhead": the scales' bytes (the ``scale`` leaves of those groups) divided by the same elements.

Models
    ``tlike100``: the shapes of ``step_speed.REFERENCE_MODELS["tlike100"]`` (100 tensors, 25.3 M elements, shaped
    like a small transformer). ``demo``: ``lowbit_fn.demo.CharTransformer`` at the demo's default size
    (``lowbit_fn.demo.SIZES[lowbit_fn.demo.Config().size]``), its ``named_parameters`` shapes. ``mlp``:
    ``Linear(4096, 11008)`` + ``Linear(11008, 4096)``, weights and biases (an LLM's MLP block). All params float32.

The family (``--optimizers adamw lion sgd rmsprop rmsprop_centered ademamix muon``): SGD with momentum 0.9,
RMSprop plain and centered with momentum 0.9, Muon on the models' 2-D parameters only (torch's Muon takes no
others).

Usage:
    python benchmarks/state_bytes.py [--optimizers adamw ...] [--markdown PATH]
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from typing import Any

import torch
from tensordict import TensorDict

import lowbit_fn
from lowbit_fn import demo

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import step_speed  # noqa: E402  (its REFERENCE_MODELS)

__all__ = ["MODELS", "state_bytes", "main"]

Shape = tuple[int, ...]
FORMATS = ("fp32", "8bit", "4bit", "fp8")
# each family's factory, with the options that give it its full state (momentum buffers)
OPTIMIZERS = {
    "adamw": lambda fmt: lowbit_fn.adamw(state_format=fmt),
    "lion": lambda fmt: lowbit_fn.lion(state_format=fmt),
    "sgd": lambda fmt: lowbit_fn.sgd(momentum=0.9, state_format=fmt),
    "rmsprop": lambda fmt: lowbit_fn.rmsprop(state_format=fmt),
    "rmsprop_centered": lambda fmt: lowbit_fn.rmsprop(momentum=0.9, centered=True, state_format=fmt),
    "ademamix": lambda fmt: lowbit_fn.ademamix(state_format=fmt),
    "muon": lambda fmt: lowbit_fn.muon(state_format=fmt),
}
MIN_QUANT_SIZE = 4096  # lowbit_fn's default min_quant_size
_QUANT_GROUP = re.compile(r"_block\d+$")


def demo_shapes() -> list[Shape]:
    """The parameter shapes of the demo's model at its default size (built on the meta device: no memory)."""
    with torch.device("meta"):
        model = demo.CharTransformer(**demo.SIZES[demo.Config().size])
    return [tuple(p.shape) for _, p in model.named_parameters()]


def mlp_shapes() -> list[Shape]:
    with torch.device("meta"):
        model = torch.nn.Sequential(torch.nn.Linear(4096, 11008), torch.nn.Linear(11008, 4096))
    return [tuple(p.shape) for _, p in model.named_parameters()]


MODELS = {
    "tlike100": lambda: list(step_speed.REFERENCE_MODELS["tlike100"]),
    "demo": demo_shapes,
    "mlp": mlp_shapes,
}


def _init(fmt: str, shapes: list[Shape], optimizer: str = "adamw") -> tuple[TensorDict, str]:
    """The state of ``optimizer`` in ``fmt`` for params of ``shapes``, and the device it was built on."""
    opt = OPTIMIZERS[optimizer](fmt)
    for device in ("meta", "cpu"):
        params = TensorDict({f"p{i:03d}": torch.zeros(s, device=device) for i, s in enumerate(shapes)}, batch_size=[])
        try:
            return opt.init(params), device
        except Exception:
            if device == "cpu":
                raise
    raise AssertionError("unreachable")


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _core_state(state: TensorDict) -> TensorDict:
    """The moment transform's part of a chain's state (the sub-TensorDict holding ``layout``)."""
    for key in state.keys():
        if key == "layout":
            return state
        if isinstance(state[key], TensorDict) and "layout" in state[key].keys(include_nested=True):
            return _core_state(state[key])
    raise AssertionError("no moment transform state")


def state_bytes(fmt: str, shapes: list[Shape], optimizer: str = "adamw") -> dict[str, Any]:
    """Bytes of the ``optimizer`` state of ``fmt`` for params of ``shapes``: totals and per element (see the
    module doc)."""
    if optimizer == "muon":
        shapes = [s for s in shapes if len(s) == 2]
    state, device = _init(fmt, shapes, optimizer)
    numel = sum(torch.Size(s).numel() for s in shapes)
    total = sum(_nbytes(t) for t in state.values(include_nested=True, leaves_only=True))
    adam = _core_state(state)
    groups = [key for key in adam.keys() if _QUANT_GROUP.search(key)]
    qbytes = scale_bytes = 0
    for group in groups:
        for path, t in adam[group].items(include_nested=True, leaves_only=True):
            qbytes += _nbytes(t)
            if (path if isinstance(path, tuple) else (path,))[-1] == "scale":
                scale_bytes += _nbytes(t)
    keys = {f"p{i:03d}": torch.Size(s).numel() for i, s in enumerate(shapes)}
    # the params whose state is quantized (the keys of the groups' first moment)
    in_groups = {key for group in groups for key in adam[group, next(iter(adam[group].keys()))].keys()}
    qnumel = sum(keys[k] for k in in_groups)
    expected = {k for k, s in zip(keys, shapes) if len(s) >= 2 and keys[k] >= MIN_QUANT_SIZE}
    if groups and in_groups != expected:
        raise AssertionError(
            f"{fmt}: the state quantizes {sorted(in_groups)[:5]}..., "
            f"the rule (>= 2 dims, >= 4096 elements) {sorted(expected)[:5]}..."
        )
    return {
        "optimizer": optimizer,
        "format": fmt,
        "device": device,
        "params": numel,
        "quantized_params": qnumel,
        "groups": groups,
        "state_bytes": total,
        "all": total / numel,
        "quantized": qbytes / qnumel if groups and qnumel else None,
        "scale": scale_bytes / qnumel if groups and qnumel else None,
    }


def _num(value: float | None) -> str:
    return "—" if value is None else f"{value:.5f}"


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| optimizer | model | params (M) | quantized params (M) | format | state B/elem (all state / all params) "
        "| state B/elem (quantized groups / quantized params) | scale overhead B/elem | state MiB |",
        "|---|---|---:|---:|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['optimizer']} | {r['model']} | {r['params'] / 1e6:.3f} | {r['quantized_params'] / 1e6:.3f} | {r['format']} | {_num(r['all'])} "
            f"| {_num(r['quantized'])} | {_num(r['scale'])} | {r['state_bytes'] / 2**20:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Print the table (and write it to ``--markdown``); return its rows (dicts, as :func:`state_bytes` plus
    ``model``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--markdown", metavar="PATH", help="also write the table to this file")
    parser.add_argument("--optimizers", nargs="+", choices=list(OPTIMIZERS), default=["adamw"],
                        help="families to measure (default adamw)")
    args = parser.parse_args(argv)
    rows = []
    for optimizer in args.optimizers:
        for model, shapes_of in MODELS.items():
            shapes = shapes_of()
            rows += [{"model": model, **state_bytes(fmt, shapes, optimizer)} for fmt in FORMATS]
    devices = sorted({r["device"] for r in rows})
    report = "\n".join([
        f"lowbit_fn optimizer state bytes per parameter element (float32 params, default block sizes and min_quant_size; "
        f"states built on {', '.join(devices)}), torch {torch.__version__}",
        "",
        markdown_table(rows),
    ])
    print(report)
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as fh:
            fh.write(report + "\n")
    return rows


if __name__ == "__main__":
    main()
