"""Offload with a real accelerator: device parameters, pinned host copies, asynchronous copies and events.

These run where CUDA is present (the project's lent GPU machines); CPU-only runs report them as skipped.
"""

import copy

import pytest
import torch

import lowbit_fn
from helpers import batches, mlp

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("offload_gradients", [False, True])
@pytest.mark.parametrize("cls", [torch.optim.AdamW, lowbit_fn.AdamW8bit], ids=lambda c: c.__name__)
def test_cuda_offload_matches_host_training(cls, offload_gradients):
    """Offloaded training of a CUDA model equals the same optimizer run on a CPU copy of the model."""
    model = mlp().cuda()
    reference = copy.deepcopy(model).cpu()
    kw = {"lr": 1e-3} | ({"min_quant_size": 1000} if cls is lowbit_fn.AdamW8bit else {})
    opt = lowbit_fn.CPUOffloadOptimizer(model.parameters(), cls, offload_gradients=offload_gradients, **kw)
    plain = cls(reference.parameters(), **kw)
    assert opt.optimizer.param_groups[0]["params"][0].is_pinned()
    data = batches(6)
    for i in range(0, 6, 2):
        for m, o, dev in ((model, opt, "cuda"), (reference, plain, "cpu")):
            o.zero_grad()
            for x, y in data[i : i + 2]:
                (((m(x.to(dev)) - y.to(dev)) ** 2).mean() / 2).backward()
            if o is opt:
                o.clip_grad_norm_(0.05)
            else:
                torch.nn.utils.clip_grad_norm_(m.parameters(), 0.05)
            o.step()
    torch.cuda.synchronize()
    for a, b in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-5, atol=1e-6)  # GPU and CPU matmuls round differently


def test_cuda_functional_offload_keeps_state_on_host():
    params = {"w": torch.randn(256, 256, device="cuda"), "b": torch.zeros(256, device="cuda")}
    opt = lowbit_fn.offload(lowbit_fn.adamw(1e-3, state_format="8bit"), min_numel=1024)
    state = opt.init(params)
    updates, state = opt.update({k: torch.randn_like(v) for k, v in params.items()}, state, params)
    assert state["host", "0", "8bit_block256", "mu", "w", "codes"].device.type == "cpu"
    assert state["device", "0", "fp32", "mu", "b"].device.type == "cuda"
    assert updates["w"].device.type == "cuda" and updates["b"].device.type == "cuda"
