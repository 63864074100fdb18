"""The README's Python examples run as written."""

import re
from pathlib import Path

import pytest
import torch

README = (Path(__file__).parents[1] / "README.md").read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", README, flags=re.S)


@pytest.mark.slow
def test_readme_examples_run(tmp_path, monkeypatch):
    assert len(BLOCKS) >= 9
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    exec(BLOCKS[0], ns)  # the functional loop, in place
    assert torch.isfinite(ns["loss"]) and int(ns["state"]["0", "count"]) == 10
    looped = ns["state"]
    exec(BLOCKS[1], ns)  # the chain
    state = ns["opt"].init(ns["params"])
    ns["state"] = state
    exec(BLOCKS[2], ns)  # checkpoints
    assert int(ns["state"]["1", "count"]) == 0 and int(ns["state"]["3", "count"]) == 0
    ns["state"] = looped
    exec(BLOCKS[3], ns)  # where the loop's state keeps each parameter
    exec(BLOCKS[4], ns)  # torch.optim loop
    weight = ns["model"][0].weight
    assert int(ns["opt"].state[weight]["step"]) == 20 and ns["opt"].state[weight]["state_format"] == "8bit"
    exec(BLOCKS[5], ns)  # checkpoint conversions
    assert ns["opt4"].state[weight]["state_format"] == "4bit" and ns["opt8"].state[weight]["state_format"] == "8bit"
    assert ns["reference"].state[weight]["exp_avg"].dtype == torch.float32
    exec(BLOCKS[6], ns)  # the family
    loss = torch.nn.functional.cross_entropy(ns["model"](torch.randn(4, 512)), torch.randint(0, 10, (4,)))
    loss.backward()
    for name in ("lion", "sgd", "muon"):
        ns[name].step()
    assert "momentum_buffer_codes" in ns["muon"].state[weight] and "exp_avg_codes" in ns["lion"].state[weight]
    assert ns["rms"].init({"w": torch.zeros(2)}) is not None
    exec(BLOCKS[7], ns)  # offload
    assert int(ns["opt"].state[ns["model"][0].weight]["step"]) == 1 and ns["functional"].init is not None
    ns["x"] = torch.randn(1000)
    exec(BLOCKS[8], ns)  # formats
    assert ns["x_hat"].shape == (1000,) and ns["table"].shape == (256,)
