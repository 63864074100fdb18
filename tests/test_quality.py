"""Training quality on the MLP regression of benchmarks/mlp_quality.py, against fp32 AdamW."""

import importlib.util
import math
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("mlp_quality", Path(__file__).parents[1] / "benchmarks" / "mlp_quality.py")
mlp_quality = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(mlp_quality)


@pytest.mark.slow
def test_low_bit_states_train_like_fp32(capsys):
    table = mlp_quality.main(["--steps", "200", "--seeds", "0", "1", "2"])
    printed = capsys.readouterr().out
    assert "| 8bit |" in printed and "| 4bit |" in printed
    for fmt in ("8bit", "fp8", "4bit"):
        assert table[fmt]["finite"], f"{fmt} produced a non-finite loss"
    # the bar: 8-bit and FP8 end no more than 2% above fp32 AdamW's final loss (mean of 3 seeds)
    assert table["8bit"]["ratio"] <= 1.02
    assert table["fp8"]["ratio"] <= 1.02
    # 4-bit with nearest rounding is reported, not yet held to fp32 (the 4-bit quality issue); no divergence
    assert table["4bit"]["ratio"] < 1.5 and math.isfinite(table["4bit"]["final"])
