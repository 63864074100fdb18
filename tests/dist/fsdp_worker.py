"""One rank of the FSDP2 tests (``tests/test_fsdp.py`` starts one process per rank, with a deadline).

``python fsdp_worker.py SCENARIO OUT_DIR [args]``; rank and world size come from the environment (as torchrun
sets them), the process group is gloo on the CPU. Each scenario writes what the test compares into OUT_DIR:
``params_<rank>.pt`` (full parameters) and, for checkpoints, the full optimizer state.
"""

from __future__ import annotations

import gc
import os
import sys

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DeviceMesh, Replicate, Shard, distribute_tensor, init_device_mesh

import lowbit_fn

STEPS = 5
FULL = StateDictOptions(full_state_dict=True)  # every rank gets the full (gathered) tensors
FLAT = StateDictOptions(flatten_optimizer_state_dict=True)
OPTIMIZERS = {
    "8bit": lambda params: lowbit_fn.AdamW8bit(params, lr=1e-2, min_quant_size=0),
    "4bit": lambda params: lowbit_fn.AdamW4bit(params, lr=1e-2, min_quant_size=0),
    "fp8": lambda params: lowbit_fn.AdamWFp8(params, lr=1e-2, min_quant_size=0),
    "fp32": lambda params: lowbit_fn.AdamW(params, lr=1e-2),
    # quantize-or-not from the global shape: the two 33-row weights (16896 elements) are at least min_quant_size,
    # their shards (at most 8704 elements from world size 2 on) are not, nor the embedding's (32768) from world
    # size 3 on (at most 11264); all three get 8-bit state on every rank
    "8bit_global": lambda params: lowbit_fn.AdamW8bit(params, lr=1e-2, min_quant_size=12000),
    "4bit_bf16": lambda params: lowbit_fn.AdamW4bit(params, lr=1e-2, min_quant_size=0, bf16_stochastic_round=True),
    "factory": lambda params: lowbit_fn.as_torch_optimizer(
        lowbit_fn.adam, params, learning_rate=1e-2, weight_decay=1e-3, state_format="4bit", min_quant_size=0
    ),
    # the rest of the elementwise family, each in another format
    "lion_8bit": lambda params: lowbit_fn.Lion8bit(params, lr=1e-3, weight_decay=1e-2, min_quant_size=0),
    "sgd_4bit": lambda params: lowbit_fn.SGD4bit(params, lr=1e-2, momentum=0.9, nesterov=True, weight_decay=1e-3,
                                                 min_quant_size=0),
    "rmsprop_8bit": lambda params: lowbit_fn.RMSprop8bit(params, lr=1e-3, momentum=0.5, centered=True, min_quant_size=0),
    "ademamix_fp8": lambda params: lowbit_fn.AdEMAMixFp8(params, lr=1e-2, t_alpha=10, t_beta3=10, min_quant_size=0),
}


DTYPES = {"4bit_bf16": torch.bfloat16}  # bfloat16 params, written back with stochastic rounding

# the parameters with quantized (uint8 codes) state, where min_quant_size lies between shard and global sizes;
# every other parameter keeps float32 moments
QUANTIZED = {"8bit_global": {"emb.weight", "down.weight", "up.weight"}}


class Model(torch.nn.Module):
    """An embedding, a Linear(512, 33) and a Linear(33, 512) (ragged rows: 33 elements; 33 rows: uneven shards),
    a LayerNorm, biases, and a head of 3 rows (empty shards at world size 4)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(64, 512)
        self.down = torch.nn.Linear(512, 33)
        self.norm = torch.nn.LayerNorm(33)
        self.up = torch.nn.Linear(33, 512)
        self.head = torch.nn.Linear(512, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.emb(tokens).mean(1)
        h = torch.tanh(self.norm(self.down(h)))
        return self.head(torch.tanh(self.up(h)))


def model(sharded: bool, offload: bool = False, fmt: str = "", mixed: bool = False) -> Model:
    """The model, wrapped with fully_shard per layer when ``sharded``: with FSDP2's CPU offload policy (parameters
    and gradients on the host, pinned memory off on a CPU-only build), or its mixed precision (bfloat16 compute,
    float32 sharded parameters and gradient reduction)."""
    torch.manual_seed(0)
    m = Model().to(DTYPES.get(fmt, torch.float32))
    if sharded:
        policy = {"offload_policy": CPUOffloadPolicy(pin_memory=False)} if offload else {}
        if mixed:
            policy["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for part in (m.emb, m.down, m.norm, m.up, m.head):
            fully_shard(part, **policy)
        fully_shard(m, **policy)
    return m


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)  # the same batch on every rank
    return torch.randint(0, 64, (16, 8), generator=g), torch.randn(16, 3, generator=g)


def train(m: Model, opt: torch.optim.Optimizer, steps: range, clip: float | None = None) -> list[float]:
    """The steps' losses; the loss in float32 (the model's output may be bfloat16); with ``clip`` the gradients'
    global norm is clipped first (``clip_grad_norm_``, DTensor gradients included)."""
    losses = []
    for step in steps:
        tokens, target = batch(step)
        out = m(tokens)
        loss = torch.nn.functional.mse_loss(out.float(), target)
        opt.zero_grad()
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(m.parameters(), clip)
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def full_params(m: Model) -> dict[str, torch.Tensor]:
    return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone() for n, p in m.named_parameters()}


def main() -> None:
    dist.init_process_group("gloo")
    run(sys.argv[1], sys.argv[2])
    # every model, optimizer and DTensor of the scenario is released before the process group goes: a gloo
    # group destroyed while tensors still refer to it can abort the process at exit
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


def run(scenario: str, out: str) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    if scenario == "parity":  # train sharded with each optimizer, save the full params
        for fmt in sys.argv[3:]:
            m = model(True, fmt=fmt)
            opt = OPTIMIZERS[fmt](m.parameters())
            train(m, opt, range(STEPS))
            if fmt in QUANTIZED:
                check_quantized(m.named_parameters(), opt, QUANTIZED[fmt])
            params = full_params(m)
            if rank == 0:
                torch.save(params, os.path.join(out, f"params_{fmt}.pt"))
    if scenario in ("offload", "ddp"):  # FSDP2 with its CPU offload policy; DDP (replicated params)
        for fmt in sys.argv[3:]:
            if scenario == "ddp":
                m = torch.nn.parallel.DistributedDataParallel(model(False))
            else:
                m = model(True, offload=True)
            opt = OPTIMIZERS[fmt](m.parameters())
            train(m, opt, range(STEPS))
            steps = {int(s["step"]) for s in opt.state.values()}
            if steps != {STEPS}:
                raise AssertionError(f"step counts {steps}, expected {STEPS}")
            params = full_params(m.module if scenario == "ddp" else m)
            if rank == 0:
                torch.save(params, os.path.join(out, f"{scenario}_{fmt}.pt"))
    if scenario == "mixed":  # bfloat16 compute, gradient clipping on DTensors: the state stays float32-sharded
        m = model(True, mixed=True)
        opt = OPTIMIZERS["8bit"](m.parameters())
        losses = train(m, opt, range(STEPS), clip=1.0)
        check_state_is_sharded(m, opt)
        if rank == 0:
            torch.save(losses, os.path.join(out, "mixed_losses.pt"))
        skip_together()
    if scenario == "errors":
        errors()
    if scenario == "save":  # 3 steps, DCP save (sharded) and a full state dict; then 2 more steps
        for fmt in sys.argv[3:]:
            m = model(True)
            opt = OPTIMIZERS[fmt](m.parameters())
            train(m, opt, range(3))
            check_state_is_sharded(m, opt)
            saved = get_optimizer_state_dict(m, opt, options=FULL)  # the full state on every rank
            # torchtitan's flattened form, into this optimizer; then (gradients set to None: torch builds a new
            # optimizer's state only without them, and with them its full_state_dict load stops at "Expected
            # device to be set" while the flattened one loads nothing) into new sharded optimizers, flattened and
            # full (each rank takes its rows of the full tensors): the state is bit-identical each time
            flat = get_optimizer_state_dict(m, opt, options=FLAT)
            set_optimizer_state_dict(m, opt, flat, options=FLAT)
            same_state(saved, get_optimizer_state_dict(m, opt, options=FULL), "flattened, into itself")
            opt.zero_grad(set_to_none=True)
            for how, sd, options in (("full", saved, FULL), ("flattened", flat, FLAT)):
                again = OPTIMIZERS[fmt](m.parameters())
                set_optimizer_state_dict(m, again, sd, options=options)
                same_state(saved, get_optimizer_state_dict(m, again, options=FULL), f"{how}, into a new optimizer")
            sd = {"model": get_model_state_dict(m), "optim": get_optimizer_state_dict(m, opt)}
            dcp.save(sd, checkpoint_id=os.path.join(out, f"dcp_{fmt}"))
            full = get_optimizer_state_dict(m, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            model_full = get_model_state_dict(m, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            if rank == 0:
                torch.save({"optim": full, "model": model_full}, os.path.join(out, f"full_{fmt}.pt"))
            train(m, again, range(3, STEPS))  # continued by the optimizer loaded from the flattened form
            params = full_params(m)
            if rank == 0:
                torch.save(params, os.path.join(out, f"params_{fmt}.pt"))
    if scenario == "load":  # DCP load at this world size, the full state as loaded, then the last 2 steps
        for fmt in sys.argv[3:]:
            m = model(True)
            opt = OPTIMIZERS[fmt](m.parameters())
            sd = {"model": get_model_state_dict(m), "optim": get_optimizer_state_dict(m, opt)}
            dcp.load(sd, checkpoint_id=os.path.join(out, f"dcp_{fmt}"))
            set_model_state_dict(m, sd["model"])
            set_optimizer_state_dict(m, opt, sd["optim"])
            check_state_is_sharded(m, opt)
            full = get_optimizer_state_dict(m, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            if rank == 0:
                torch.save(full, os.path.join(out, f"loaded_{fmt}_{world}.pt"))
            # the gathered (full) state dict, saved with torch.save, through the sharded optimizer's own
            # load_state_dict: each rank keeps its rows
            direct = OPTIMIZERS[fmt](m.parameters())
            direct.load_state_dict(torch.load(os.path.join(out, f"full_{fmt}.pt"), weights_only=True)["optim"])
            again = get_optimizer_state_dict(m, direct, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            if rank == 0:
                torch.save(again, os.path.join(out, f"direct_{fmt}_{world}.pt"))
            # and through set_optimizer_state_dict(full_state_dict=True) into a new sharded optimizer (no gradients
            # exist yet, which torch needs, see "save")
            saved = torch.load(os.path.join(out, f"full_{fmt}.pt"), weights_only=True)["optim"]
            via_set = OPTIMIZERS[fmt](m.parameters())
            set_optimizer_state_dict(m, via_set, saved, options=FULL)
            same_state(saved, get_optimizer_state_dict(m, via_set, options=FULL), f"full state dict set at {world}")
            train(m, opt, range(3, STEPS))
            params = full_params(m)
            if rank == 0:
                torch.save(params, os.path.join(out, f"resumed_{fmt}_{world}.pt"))


def skip_together() -> None:
    """max_consecutive_errors: a NaN in rank 0's shard of one gradient only makes every rank skip the step (the
    verdict is reduced over the mesh): the full params and every rank's state stay as they were."""
    m = model(True)
    opt = lowbit_fn.AdamW8bit(m.parameters(), lr=1e-2, min_quant_size=0, max_consecutive_errors=3)
    train(m, opt, range(2))
    before, state = full_params(m), {p: {k: v.clone() for k, v in s.items() if isinstance(v, torch.Tensor)} for p, s in opt.state.items()}
    tokens, target = batch(2)
    opt.zero_grad()
    torch.nn.functional.mse_loss(m(tokens).float(), target).backward()
    if dist.get_rank() == 0:
        grad = next(p.grad for p in m.parameters() if p.grad.to_local().numel())
        grad.to_local().view(-1)[0] = float("nan")
    opt.step()
    counts = opt.apply_if_finite_state
    if counts != {"notfinite_count": 1, "last_finite": False, "total_notfinite": 1}:
        raise AssertionError(f"rank {dist.get_rank()}: {counts}")
    after = full_params(m)
    if any(not torch.equal(before[n], after[n]) for n in before):
        raise AssertionError(f"rank {dist.get_rank()}: a skipped step changed the params")
    for p, entry in state.items():
        for k, v in entry.items():
            now = opt.state[p][k]
            if not torch.equal(v.to_local() if isinstance(v, DTensor) else v, now.to_local() if isinstance(now, DTensor) else now):
                raise AssertionError(f"rank {dist.get_rank()}: a skipped step changed the state ({k})")


def same_state(a, b, where: str) -> None:
    """Two optimizer state dicts (FQN keys) hold the same values, tensors bit for bit."""
    assert a["state"].keys() == b["state"].keys(), where
    for fqn, entry in a["state"].items():
        assert entry.keys() == b["state"][fqn].keys(), (where, fqn)
        for key, value in entry.items():
            other = b["state"][fqn][key]
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, other), f"{where}: {fqn}.{key} differs"
            else:
                assert value == other, f"{where}: {fqn}.{key}: {value!r} != {other!r}"


def expect(kind: type, match: str, fn) -> None:
    try:
        fn()
    except kind as err:
        if match not in str(err):
            raise AssertionError(f"{kind.__name__} without {match!r}: {err}") from err
        return
    raise AssertionError(f"no {kind.__name__} ({match!r})")


def errors() -> None:
    """What is not supported raises a clear error naming the parameter, and leaves it as it was."""
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    weight = torch.randn(8, 6)

    def param(placements):
        p = torch.nn.Parameter(distribute_tensor(weight.clone(), mesh, placements))
        p.grad = distribute_tensor(torch.ones(8, 6), mesh, placements)
        return p

    for placements, what in (([Replicate()], "Replicate"), ([Shard(1)], "Shard(dim=1)")):
        p = param(placements)
        before = p.detach().full_tensor().clone()
        expect(ValueError, "not supported", lbs_step(p))
        expect(ValueError, what, lbs_step(p))
        if not torch.equal(p.detach().full_tensor(), before):
            raise AssertionError("a refused step changed the parameter")
    p = param([Shard(0)])
    p.grad = distribute_tensor(torch.ones(8, 6), mesh, [Replicate()])
    expect(ValueError, "not sharded like the parameter", lbs_step(p))
    # HSDP: a 2-D mesh (world x 1: replicate x shard, as gloo allows at world size 2), in either order; and a
    # gradient sharded by rows on another mesh (the same ranks in reverse order: another rank's rows, same shapes)
    mesh2d = init_device_mesh("cpu", (dist.get_world_size(), 1), mesh_dim_names=("replicate", "shard"))
    for placements in ([Replicate(), Shard(0)], [Shard(0), Replicate()]):
        p = torch.nn.Parameter(distribute_tensor(weight.clone(), mesh2d, placements))
        p.grad = distribute_tensor(torch.ones(8, 6), mesh2d, placements)
        refused(p, "on a 2-D mesh is not supported", "HSDP meshes are not")
    reversed_mesh = DeviceMesh("cpu", torch.arange(dist.get_world_size()).flip(0))
    p = param([Shard(0)])
    p.grad = distribute_tensor(torch.ones(8, 6), reversed_mesh, [Shard(0)])
    refused(p, "the gradient is a DTensor on another device mesh (ranks [1, 0]) than the parameter (ranks [0, 1])")
    p = param([Shard(0)])
    other = lowbit_fn.as_torch_optimizer(lowbit_fn.scale_by_adam, [p], state_format="8bit")
    expect(TypeError, "DTensor (sharded) parameters are stepped by the elementwise factories", other.step)
    muon = lowbit_fn.Muon8bit([p], min_quant_size=0)  # Newton-Schulz needs whole matrices: refused, not gathered
    before = p.detach().full_tensor()
    expect(TypeError, "Muon needs whole matrices", muon.step)
    if not torch.equal(p.detach().full_tensor(), before) or muon.state:
        raise AssertionError("a refused Muon step changed the parameter or made state")
    opt = lowbit_fn.adamw(1e-3)
    expect(TypeError, "is a DTensor: the functional API steps plain tensors", lambda: opt.init({"w": p.detach()}))


def refused(p: torch.nn.Parameter, *messages: str) -> None:
    """A step of the named parameter raises a ValueError that names it and says each of ``messages``, and leaves
    the parameter and the optimizer's state as they were (none)."""
    opt = lowbit_fn.AdamW8bit([("blocks.0.weight", p)], lr=1e-2, min_quant_size=0)
    before = p.detach().full_tensor().clone()
    for message in ("parameter 'blocks.0.weight' (param_groups[0]['params'][0]) of shape [8, 6]", *messages):
        expect(ValueError, message, opt.step)
    if not torch.equal(p.detach().full_tensor(), before) or opt.state:
        raise AssertionError("a refused step changed the parameter or made state")


def lbs_step(p: torch.nn.Parameter):
    return lowbit_fn.AdamW8bit([p], lr=1e-2, min_quant_size=0).step


def check_state_is_sharded(m: Model, opt: torch.optim.Optimizer) -> None:
    """optimizer.state_dict() holds DTensors of the global sizes, sharded like the parameters."""
    state = opt.state_dict()["state"]
    for index, (name, p) in enumerate(m.named_parameters()):
        for key, value in state[index].items():
            if key == "step" or not isinstance(value, torch.Tensor):
                continue
            if not isinstance(value, DTensor) or value.placements != p.placements or value.shape[0] != p.shape[0]:
                raise AssertionError(f"{name}: state {key!r} is {type(value).__name__} {tuple(value.shape)}, not sharded like {tuple(p.shape)}")


def check_quantized(named_params, opt: torch.optim.Optimizer, quantized: set[str]) -> None:
    """This rank's state (its local rows, for a sharded parameter) is uint8 codes with the parameter's local rows
    for the parameters in ``quantized``, and float32 moments for the others (``named_params`` in the optimizer's
    order)."""
    state = opt.state_dict()["state"]
    for index, (name, p) in enumerate(named_params):
        entry = {k: v.to_local() if isinstance(v, DTensor) else v for k, v in state[index].items()}
        rows = (p.to_local() if isinstance(p, DTensor) else p).shape[0]
        if name in quantized:
            codes = [entry.get(f"{k}_codes") for k in ("exp_avg", "exp_avg_sq")]
            if any(c is None or c.dtype != torch.uint8 or c.shape[0] != rows for c in codes) or "exp_avg" in entry:
                raise AssertionError(f"{name} of shape {tuple(p.shape)}: state not quantized on rank "
                                     f"{dist.get_rank() if dist.is_initialized() else 0}: {sorted(entry)}")
        elif any(k.endswith("_codes") for k in entry) or entry["exp_avg"].dtype != torch.float32:
            raise AssertionError(f"{name} of shape {tuple(p.shape)}: quantized state, expected float32 moments")


if __name__ == "__main__":
    main()
