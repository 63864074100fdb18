"""Checkpoints of lowbit_fn 0.1.0 (flat buffers, blocks over the flattened tensors) load into today's row layout.

The fixture (``fixtures/v010_checkpoints.pt``, made by ``fixtures/make_v010_checkpoints.py`` with 0.1.0's code)
holds torch.optim checkpoints of every drop-in class and functional ``adamw`` states, on a ragged (512, 33)
weight, a (33, 256) one, a 3-D (4, 24, 48) tensor, a bias and a small matrix.
"""

from pathlib import Path

import pytest
import torch
from tensordict import TensorDict

import lowbit_fn
from lowbit_fn.torch_optim import _moment
from fixtures.make_v010_checkpoints import CLASSES, SHAPES, grads

FIXTURE = torch.load(Path(__file__).parent / "fixtures" / "v010_checkpoints.pt", weights_only=True)
SIGNED = {"exp_avg": True, "exp_avg_sq": False, "max_exp_avg_sq": False}


def _loaded(name):
    run = FIXTURE["runs"][name]
    params = [torch.nn.Parameter(run["params"][k].clone()) for k in SHAPES]
    opt = getattr(lowbit_fn, name)(params, lr=1e-2, **run["kwargs"])
    opt.load_state_dict(run["state_dict"])
    return run, params, opt


@pytest.mark.parametrize("name", CLASSES)
def test_every_drop_in_class_loads_its_0_1_0_checkpoint_and_trains_on(name):
    run, params, opt = _loaded(name)
    saved = run["state_dict"]["state"]
    for index, (key, p) in enumerate(zip(SHAPES, params)):
        entry, old = opt.state[p], saved[index]
        assert int(entry["step"]) == 3
        for moment, signed in SIGNED.items():
            if moment not in entry and f"{moment}_codes" not in entry:
                continue
            before = _moment(old, moment, p.shape, key)  # 0.1.0's value, decoded from its flat blocks
            if f"{moment}_codes" not in entry:
                assert torch.equal(entry[moment], before), (key, moment)  # full precision: exact
                continue
            fmt, block, rounding = entry["state_format"], entry["block_size"], entry["rounding"]
            rows_aligned = (p.numel() // p.shape[0]) % block == 0
            if rows_aligned:  # the same blocks: the same codes and scales, reshaped
                assert torch.equal(entry[f"{moment}_codes"].view(-1), old[f"{moment}_codes"][: entry[f"{moment}_codes"].numel()])
                assert torch.equal(entry[f"{moment}_scale"].view(-1), old[f"{moment}_scale"])
                continue
            # blocks changed: the old value quantized once into the new blocks
            stochastic = rounding == "stochastic"
            value = before.sqrt() if stochastic and not signed else before
            codes, scale = lowbit_fn.quantize(value, fmt, signed=signed, block_size=block, rounding=rounding, step=3)
            assert torch.equal(entry[f"{moment}_codes"], codes) and torch.equal(entry[f"{moment}_scale"], scale), (key, moment)
    # training continues, and follows torch's optimizer resumed from the same (dequantized) moments
    reference_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    torch_cls = torch.optim.AdamW if "AdamW" in name else torch.optim.Adam
    reference = torch_cls(reference_params, lr=1e-2, **run["kwargs"])
    reference.load_state_dict(lowbit_fn.to_torch_state_dict(opt))
    start = [p.detach().clone() for p in params]
    for step in (3, 4):
        for ps in (params, reference_params):
            for p, g in zip(ps, grads(step).values()):
                p.grad = g.clone()
        opt.step()
        reference.step()
    for p, q, s in zip(params, reference_params, start):
        p, q = p.detach(), q.detach()
        moved = (q - s).norm()
        assert bool(torch.isfinite(p).all()) and float(moved) > 0
        assert float((p - q).norm() / moved) < (0.3 if "4bit" in name else 0.1)


@pytest.mark.parametrize("fmt", ["8bit", "4bit"])
def test_a_0_1_0_functional_state_is_refused_with_the_way_to_convert_it(fmt):
    data = FIXTURE["functional"][fmt]
    old = TensorDict(data["state"], batch_size=[])
    params = TensorDict(data["params"], batch_size=[])
    opt = lowbit_fn.adamw(1e-2, state_format=fmt)
    with pytest.raises(ValueError, match="lowbit_fn.convert_state"):
        opt.update(grads(3), old.clone(), params)
    state = lowbit_fn.convert_state(old, opt)
    assert int(state["0", "count"]) == 3
    group = state["0", "4bit_sr_block128" if fmt == "4bit" else "8bit_block256"]
    assert set(group["mu"].keys()) == {"w_ragged", "w_t", "w3"}  # matrices of >= 4096 elements
    assert set(state["0", "fp32", "mu"].keys()) == {"bias", "small"}
    # the converted moments are the old ones quantized once into rows (or kept, in full precision)
    old_v = old["0", "fp32", "nu"]  # the bias (96) then the small matrix (64), in key order
    assert torch.equal(state["0", "fp32", "nu", "small"].view(-1), old_v[96:160])
    assert torch.equal(state["0", "fp32", "nu", "bias"], old_v[:96])
    for step in (3, 4):
        updates, state = opt.update(grads(step), state, params)
        params = lowbit_fn.apply_updates(params, updates)
    assert int(state["0", "count"]) == 5
    assert all(bool(torch.isfinite(v).all()) for v in params.values())


def test_convert_state_returns_a_current_state_as_it_is():
    opt = lowbit_fn.adamw(1e-3, state_format="4bit", amsgrad=True)
    params = {"w": torch.randn(64, 300), "b": torch.randn(300)}
    state = opt.init(params)
    opt.update({k: torch.randn_like(v) for k, v in params.items()}, state, params)
    assert lowbit_fn.convert_state(state, opt) is state
