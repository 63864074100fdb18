"""Train the demo's byte-level transformer with FSDP2 and ``lowbit_fn.AdamW8bit``, checkpoint with DCP, and resume
the checkpoint at another world size.

    torchrun --nproc-per-node 2 examples/fsdp_train.py [--steps 30] [--width 128] [--layers 2] [--out fsdp_out]

What it does, on the CPU with gloo (or NCCL on GPUs):

1. every rank builds the same model (``lowbit_fn.demo.CharTransformer``, on the standard library's own source
   text), ``fully_shard``s each block and the whole, and trains it with ``AdamW8bit``: each rank takes its own
   slice of every global batch, and FSDP2 averages the gradients;
2. halfway, it saves the model and optimizer with ``torch.distributed.checkpoint`` (sharded: each rank writes its
   rows of the parameters and of the 8-bit state);
3. rank 0 then starts a plain single process (world size 1, no FSDP) that trains the same model on the whole
   global batches from the start (the reference), and loads the checkpoint to finish the second half from it.

It prints each rank's optimizer-state bytes and step time, the sharded run's losses beside the single process's,
and where the resumed run ends against the uninterrupted one.
"""

from __future__ import annotations

import argparse
import gc
import os
import subprocess
import sys
import time
import warnings

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

import lowbit_fn
from lowbit_fn.demo import CharTransformer, Corpus, stdlib_text

GLOBAL_BATCH, CONTEXT = 16, 64


SIZE = {"width": 128, "layers": 2}  # --width / --layers


def build(seed: int = 0) -> CharTransformer:
    torch.manual_seed(seed)
    return CharTransformer(width=SIZE["width"], layers=SIZE["layers"], heads=4, context=CONTEXT)


def optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    return lowbit_fn.AdamW8bit(model.parameters(), lr=2e-3, weight_decay=0.01)


def global_batch(corpus: Corpus, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    return corpus.batch("train", GLOBAL_BATCH, CONTEXT, torch.Generator().manual_seed(step))


def train_step(model, opt, x, y) -> tuple[float, float]:
    """One step; returns the loss and the optimizer step's seconds."""
    logits = model(x)
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
    opt.zero_grad()
    loss.backward()
    t0 = time.perf_counter()
    opt.step()
    return float(loss.detach()), time.perf_counter() - t0


def state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of this process's optimizer state (the local rows of sharded state)."""
    local = (v.to_local() if hasattr(v, "to_local") else v for s in opt.state.values() for v in s.values())
    return sum(t.numel() * t.element_size() for t in local if isinstance(t, torch.Tensor))


def sharded(args: argparse.Namespace, corpus: Corpus) -> None:
    dist.init_process_group("gloo" if not torch.cuda.is_available() else "nccl")
    train_sharded(args, corpus)
    gc.collect()  # the model, optimizer and DTensors go before their process group (gloo can abort otherwise)
    dist.barrier()
    rank = dist.get_rank()
    dist.destroy_process_group()
    if rank == 0:  # world size 1: a fresh process, no process group
        subprocess.run([sys.executable, __file__, "--single", "--steps", str(args.steps), "--out", args.out,
                        "--width", str(args.width), "--layers", str(args.layers)], check=True)


def train_sharded(args: argparse.Namespace, corpus: Corpus) -> None:
    from torch.distributed.fsdp import fully_shard

    rank, world = dist.get_rank(), dist.get_world_size()
    if GLOBAL_BATCH % world:
        raise SystemExit(f"the global batch ({GLOBAL_BATCH}) must divide among {world} ranks")
    model = build()
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    opt = optimizer(model)
    losses, times = [], []
    share = GLOBAL_BATCH // world
    for step in range(args.steps):
        x, y = global_batch(corpus, step)
        loss, seconds = train_step(model, opt, x[rank * share:(rank + 1) * share], y[rank * share:(rank + 1) * share])
        losses.append(loss)
        times.append(seconds)
        if step + 1 == args.steps // 2:
            sd = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
            dcp.save(sd, checkpoint_id=os.path.join(args.out, "checkpoint"))
    mean = torch.tensor(losses)
    dist.all_reduce(mean)  # the global batch's loss: the mean of the ranks' slices
    per_rank = [None] * world
    dist.all_gather_object(per_rank, (state_bytes(opt), sorted(times[1:])[len(times[1:]) // 2]))
    if rank == 0:
        params = sum(p.numel() for p in model.parameters())
        print(f"FSDP2 at world size {world}: {params / 1e6:.2f} M parameters, AdamW8bit, {args.steps} steps, "
              f"DCP checkpoint after step {args.steps // 2}")
        for r, (nbytes, seconds) in enumerate(per_rank):
            print(f"  rank {r}: optimizer state {nbytes / 2**20:.2f} MiB ({nbytes / params:.2f} B per parameter of the "
                  f"model), median step {seconds * 1e3:.1f} ms")
        torch.save((mean / world).tolist(), os.path.join(args.out, "sharded_losses.pt"))
    dist.barrier()
    params = {n: p.full_tensor().detach() for n, p in model.named_parameters()}
    if rank == 0:
        torch.save(params, os.path.join(args.out, "sharded_params.pt"))


def single(args: argparse.Namespace, corpus: Corpus) -> None:
    """The reference (one process, whole batches, from the start) and the resumed run (from the checkpoint)."""
    model, half = build(), args.steps // 2
    opt = optimizer(model)
    losses, times = [], []
    for step in range(args.steps):
        loss, seconds = train_step(model, opt, *global_batch(corpus, step))
        losses.append(loss)
        times.append(seconds)
    resumed = build(seed=1)  # other weights: everything comes from the checkpoint
    ropt = optimizer(resumed)
    sd = {"model": get_model_state_dict(resumed), "optim": get_optimizer_state_dict(resumed, ropt)}
    dcp.load(sd, checkpoint_id=os.path.join(args.out, "checkpoint"), no_dist=True)
    set_model_state_dict(resumed, sd["model"])
    set_optimizer_state_dict(resumed, ropt, sd["optim"])
    resumed_losses = [train_step(resumed, ropt, *global_batch(corpus, step))[0] for step in range(half, args.steps)]
    sharded_losses = torch.load(os.path.join(args.out, "sharded_losses.pt"))
    sharded_params = torch.load(os.path.join(args.out, "sharded_params.pt"))
    print(f"single process (world size 1, no FSDP): optimizer state {state_bytes(opt) / 2**20:.2f} MiB, "
          f"median step {sorted(times[1:])[len(times[1:]) // 2] * 1e3:.1f} ms")
    print("step | loss, FSDP2 | loss, one process | loss, resumed at world size 1")
    for step in sorted({0, half - 1, half, args.steps - 1} | set(range(0, args.steps, 5))):
        again = f"{resumed_losses[step - half]:.4f}" if step >= half else "—"
        print(f"{step + 1:4d} | {sharded_losses[step]:.4f} | {losses[step]:.4f} | {again}")
    final = {n: p.detach() for n, p in model.named_parameters()}
    ended = {n: p.detach() for n, p in resumed.named_parameters()}
    moved = max(float((final[n] - build().state_dict()[n]).norm()) for n in final)
    far = max(float((sharded_params[n] - final[n]).norm()) for n in final)
    back = max(float((ended[n] - sharded_params[n]).norm()) for n in final)
    print(f"largest parameter distance (L2): FSDP2 vs one process {far:.2e}; resumed at world size 1 vs the "
          f"uninterrupted FSDP2 run {back:.2e}; distance moved in training {moved:.2e}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="training steps (default 30; the checkpoint at half)")
    parser.add_argument("--out", default="fsdp_out", help="where the checkpoint and the runs' records go")
    parser.add_argument("--width", type=int, default=128, help="model width (default 128)")
    parser.add_argument("--layers", type=int, default=2, help="transformer blocks (default 2)")
    parser.add_argument("--single", action="store_true", help=argparse.SUPPRESS)  # the world-size-1 part
    args = parser.parse_args(argv)
    SIZE.update(width=args.width, layers=args.layers)
    if args.steps < 2:
        parser.error("--steps must be >= 2")
    os.makedirs(args.out, exist_ok=True)
    # FSDP2 notes that the model returns a view of its output; nothing here writes into it
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module")
    warnings.filterwarnings("ignore", message="torch.distributed is disabled")
    corpus = Corpus.from_bytes(stdlib_text(max_bytes=1_000_000))
    single(args, corpus) if args.single else sharded(args, corpus)


if __name__ == "__main__":
    main()
