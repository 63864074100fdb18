"""The functional state survives memmap and torch.save bit-exactly, and training resumes bit-exactly."""

import pytest
import torch
from tensordict import TensorDict

import lowbit_fn
from helpers import batches, group_key, mlp, run_functional


def _roundtrip(state, how, tmp_path):
    if how == "memmap":
        state.memmap(tmp_path / "state")
        return TensorDict.load_memmap(tmp_path / "state")
    torch.save(state, tmp_path / "state.pt")
    return torch.load(tmp_path / "state.pt", weights_only=True)


@pytest.mark.parametrize("fmt", ["fp32", "8bit", "4bit", "fp8"])
@pytest.mark.parametrize("how", ["memmap", "torch.save"])
def test_state_roundtrip_and_resume_bit_exact(fmt, how, tmp_path):
    model = mlp()
    opt = lowbit_fn.adamw(1e-2, state_format=fmt, amsgrad=True, min_quant_size=1000)
    data = batches(6)
    params, state = run_functional(model, opt, data[:3])
    saved_params = params.clone()
    loaded = _roundtrip(state.clone(), how, tmp_path)
    assert bool((loaded == state).all())
    dtypes = {k: v.dtype for k, v in state.items(include_nested=True, leaves_only=True)}
    assert dtypes == {k: v.dtype for k, v in loaded.items(include_nested=True, leaves_only=True)}
    if fmt != "fp32":
        assert loaded["0", group_key(fmt), "mu", "2", "weight", "codes"].dtype == torch.uint8
    # continue both: the original and the restored one
    a, _ = run_functional(model, opt, data[3:], params=params, state=state)
    b, _ = run_functional(model, opt, data[3:], params=saved_params, state=loaded.clone() if how == "memmap" else loaded)
    assert bool((a == b).all())
