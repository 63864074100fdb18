"""Smoke test of ``benchmarks/step_speed.py`` on tiny models: it runs and reports sane rows (never timings)."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "step_speed.py"


def _load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("_step_speed_benchmark", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the script runs
    spec.loader.exec_module(module)
    return module


def test_step_speed_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    step_speed = _load_script()
    report = tmp_path / "report.md"
    rows = step_speed.main(
        ["--scale", "0.01", "--rounds", "1", "--steps", "1", "--formats", "fp32", "8bit", "--markdown", str(report)]
    )

    models = {"tlike100", "flat16M"}
    optimizers = {"torch fused fp32", "torch foreach fp32", "lowbit_fn fp32", "lowbit_fn 8bit", "lowbit_fn AdamW", "lowbit_fn AdamW8bit"}
    assert {r["model"] for r in rows} == models
    assert {r["optimizer"] for r in rows} >= optimizers
    for row in rows:
        assert set(row) == {"model", "optimizer", "ms", "ratio", "qbytes", "bytes", "first_s", "cold_s", "peak"}
        functional = row["optimizer"] in ("lowbit_fn fp32", "lowbit_fn 8bit")
        assert (row["cold_s"] is not None) == functional, row
        assert not functional or (math.isfinite(row["cold_s"]) and row["cold_s"] > 0), row
        assert math.isfinite(row["ms"]) and row["ms"] > 0, row
        assert math.isfinite(row["ratio"]) and row["ratio"] > 0, row
        assert math.isfinite(row["first_s"]) and row["first_s"] >= 0, row

    by_key = {(r["model"], r["optimizer"]): r for r in rows}
    for model in models:
        assert by_key[model, "torch fused fp32"]["ratio"] == 1.0
        for name in ("lowbit_fn 8bit", "lowbit_fn AdamW8bit"):  # functional and torch.optim front ends
            eight = by_key[model, name]
            assert 2.0 <= eight["qbytes"] <= 2.1  # 1 code byte per moment + one fp32 scale per 256-element block
            assert eight["bytes"] < 2.2
        # a step's extra memory: the torch.optim front end updates in place (issue 6: <= 8 B per element of the
        # largest tensor); the functional API returns an update and new parameters, 8 B per element of all tensors
        assert by_key[model, "lowbit_fn AdamW8bit"]["peak"] <= 8.0
        assert by_key[model, "lowbit_fn 8bit"]["peak"] >= 8.0
        for name in ("torch fused fp32", "torch foreach fp32", "lowbit_fn fp32", "lowbit_fn AdamW"):
            row = by_key[model, name]
            assert row["qbytes"] is None
            assert row["bytes"] == pytest.approx(8.0, abs=0.01)  # fp32 m and v (+ a few step counters)

    out = capsys.readouterr().out
    assert "| model | optimizer | ms/step | × fused fp32 |" in out
    assert "contention check (before)" in out and "contention check (after)" in out
    text = report.read_text(encoding="utf-8")
    assert "lowbit_fn 8bit" in text and "torch" in text


def test_offload_benchmark_smoke(capsys: pytest.CaptureFixture[str]) -> None:
    path = Path(__file__).parents[1] / "benchmarks" / "offload.py"
    spec = importlib.util.spec_from_file_location("offload_bench", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows = module.main(["--layers", "1", "--width", "256", "--steps", "1", "--warmup", "1", "--device", "cpu"])
    assert [r["config"] for r in rows][:2] == ["AdamW on device", "CPUOffloadOptimizer(AdamW)"] and len(rows) == 6
    assert all(r["ms"] > 0 and r["peak_gib"] is None for r in rows)
    assert "| CPUOffloadOptimizer(AdamW8bit) |" in capsys.readouterr().out
