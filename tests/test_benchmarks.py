"""Smoke tests of the benchmark scripts on tiny models: they run and report sane rows (never timings)."""

from __future__ import annotations

import importlib.util
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPT = BENCHMARKS / "step_speed.py"
ROW_KEYS = {
    "model", "dtype", "optimizer", "api", "format", "path", "ms", "ratio", "vs_torch_optim", "qbytes", "bytes", "first_s",
    "cold_s", "peak", "peak_mb", "rss_mb", "rss_first_mb", "family", "kernel", "reference", "vs_bnb",
}
EIGHT_BIT = 2 + 8 / 256  # 1 code byte per moment + one fp32 scale per moment per 256-element block


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

    models = {"tlike100", "sq16M"}  # the default models (m64x1M is opt-in)
    functional = {"lowbit_fn fp32", "lowbit_fn 8bit"}
    inplace = {"lowbit_fn fp32 (functional, inplace)", "lowbit_fn 8bit (functional, inplace)",
               "lowbit_fn fp32 (apply_gradients, inplace)", "lowbit_fn 8bit (apply_gradients, inplace)"}
    optimizers = {"torch fused fp32", "torch foreach fp32", "lowbit_fn AdamW", "lowbit_fn AdamW8bit"} | functional | inplace
    assert {r["model"] for r in rows} == models
    assert {r["optimizer"] for r in rows} >= optimizers
    assert not any("(compiled)" in r["optimizer"] for r in rows)  # --paths defaults to native only
    for row in rows:
        assert set(row) == ROW_KEYS, row
        assert row["dtype"] == "float32"
        assert (row["cold_s"] is not None) == (row["optimizer"] in functional), row
        assert row["optimizer"] not in functional or (math.isfinite(row["cold_s"]) and row["cold_s"] > 0), row
        assert math.isfinite(row["ms"]) and row["ms"] > 0, row
        assert math.isfinite(row["ratio"]) and row["ratio"] > 0, row
        assert math.isfinite(row["first_s"]) and row["first_s"] >= 0, row
        assert (row["vs_torch_optim"] is not None) == (row["optimizer"] in functional | inplace), row
        assert row["rss_mb"] is None and row["rss_first_mb"] is None  # no --rss

    by_key = {(r["model"], r["optimizer"]): r for r in rows}
    for model in models:
        assert by_key[model, "torch fused fp32"]["ratio"] == 1.0
        for name in ("lowbit_fn 8bit", "lowbit_fn 8bit (functional, inplace)"):  # every row of these shapes is 256-aligned
            assert by_key[model, name]["qbytes"] == EIGHT_BIT
            assert by_key[model, name]["format"] == "8bit" and by_key[model, name]["path"] == "native"
        eight = by_key[model, "lowbit_fn AdamW8bit"]
        assert 2.0 <= eight["qbytes"] <= 2.1  # the torch.optim front end also counts each parameter's step counter
        assert eight["bytes"] < 2.2
        # a step's extra memory: the torch.optim front end and the in-place functional step update in place (issue 6:
        # <= 8 B per element of the largest tensor); the pure functional API returns an update and new parameters,
        # 8 B per float32 element of all tensors
        assert by_key[model, "lowbit_fn AdamW8bit"]["peak"] <= 8.0
        assert by_key[model, "lowbit_fn 8bit (functional, inplace)"]["peak"] <= 8.0
        assert by_key[model, "lowbit_fn 8bit (apply_gradients, inplace)"]["peak"] <= 8.0
        assert by_key[model, "lowbit_fn 8bit"]["peak"] >= 8.0
        full = ("torch fused fp32", "torch foreach fp32", "lowbit_fn fp32", "lowbit_fn fp32 (functional, inplace)", "lowbit_fn AdamW")
        for name in full:
            row = by_key[model, name]
            assert row["qbytes"] is None
            assert row["bytes"] == pytest.approx(8.0, abs=0.01)  # fp32 m and v (+ a few step counters)

    out = capsys.readouterr().out
    assert "| model | optimizer | ms/step | × torch fused | × torch_optim |" in out
    assert "contention check (before)" in out and "contention check (after)" in out
    for model in models:
        for fmt in ("fp32", "8bit"):
            assert re.search(rf"^{model} float32 {fmt}: functional inplace / torch_optim = \d+\.\d\dx", out, re.M), out
            assert re.search(rf"^{model} float32 {fmt}: apply_gradients inplace / torch_optim = \d+\.\d\dx", out, re.M), out
    text = report.read_text(encoding="utf-8")
    assert "lowbit_fn 8bit" in text and "torch" in text and "functional inplace / torch_optim" in text


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def test_step_speed_families(capsys: pytest.CaptureFixture[str]) -> None:
    """--optimizers: every family's rows beside its torch reference (or torch's fused AdamW), in a second table."""
    step_speed = _load_script()
    families = ("lion", "sgd", "rmsprop", "ademamix")
    rows = step_speed.main([
        "--optimizers", "adamw", *families, "muon", "--models", "sq16M", "--scale", "0.01", "--formats", "8bit",
        "--apis", "apply_gradients", "torch_optim", "--rounds", "1", "--steps", "1", "--no-cold",
    ])
    references = {"adamw": "torch fused fp32", "lion": "torch AdamW fused fp32", "ademamix": "torch AdamW fused fp32",
                  "rmsprop": "torch RMSprop foreach fp32"}  # torch.optim.RMSprop takes no fused=True
    classes = {"lion": "Lion8bit", "sgd": "SGD8bit", "rmsprop": "RMSprop8bit", "ademamix": "AdEMAMix8bit"}
    assert {r["family"] for r in rows} - {"muon"} == {"adamw", *families}
    for row in rows:
        assert set(row) == ROW_KEYS, row
        assert math.isfinite(row["ms"]) and row["ms"] > 0 and row["ratio"] > 0, row
        assert (row["kernel"] in ("native", "compiled")) == (row["api"] not in ("torch", "peer")), row
    for family in families:
        mine = {r["optimizer"]: r for r in rows if r["family"] == family}
        ref = mine.pop(references.get(family) or next(n for n in mine if n.startswith("torch SGD ")))
        assert ref["api"] == "torch" and ref["ratio"] == 1.0 and ref["reference"] == ref["optimizer"]
        assert set(mine) == {f"lowbit_fn {family} 8bit (apply_gradients, inplace)", f"lowbit_fn {classes[family]}"}
        for row in mine.values():
            assert row["reference"] == ref["optimizer"] and row["format"] == "8bit"
            assert row["qbytes"] is not None and row["qbytes"] >= 1.0  # one byte per element per quantized moment
    sgd_ref = next(r for r in rows if r["family"] == "sgd" and r["api"] == "torch")["optimizer"]
    assert sgd_ref in ("torch SGD fused fp32", "torch SGD foreach fp32")

    out = capsys.readouterr().out
    assert "| model | optimizer | ms/step | × torch fused | × torch_optim |" in out  # AdamW's table as before
    assert "| model | family | optimizer | kernel | ms/step | × torch ref | torch ref | × bitsandbytes 8bit |" in out
    table = [_cells(line) for line in out.splitlines() if line.startswith("| sq16M | ")]
    family_rows = {c[2]: c for c in table if len(c) == 13}
    for family in families:
        cells = family_rows[f"lowbit_fn {classes[family]}"]
        assert cells[1] == family and cells[3] in ("native", "compiled")
        float(cells[4]), float(cells[5])  # ms/step, × torch ref
        assert re.search(rf"^sq16M float32 {family} 8bit, (native|compiled) kernel: torch_optim \d+\.\d\dx", out, re.M), out
        assert re.search(rf"^kernel: lowbit_fn's {family} rows ran the (native C kernel|compiled torch path)", out, re.M), out
        assert f"torch reference of {family} (float32): " in out
    assert "torch has no lion optimizer: compared with torch.optim.AdamW(fused=True)" in out
    muon = {r["optimizer"]: r for r in rows if r["family"] == "muon"}  # torch.optim.Muon's one implementation
    assert muon["torch Muon single fp32"]["ratio"] == 1.0 and muon["lowbit_fn Muon8bit"]["ratio"] > 0, muon
    if importlib.util.find_spec("bitsandbytes") is None:
        assert "bitsandbytes not installed: no bitsandbytes.optim.Lion8bit row (lion)" in out


def test_step_speed_bf16_compiled_inplace(capsys: pytest.CaptureFixture[str]) -> None:
    step_speed = _load_script()
    before = os.environ.get("LOWBIT_FN_NATIVE")
    rows = step_speed.main([
        "--apis", "functional_inplace", "apply_gradients", "torch_optim", "--paths", "native", "compiled", "--dtype", "bfloat16",
        "--scale", "0.01", "--models", "sq16M", "m64x1M", "--formats", "8bit", "--rounds", "1", "--steps", "1", "--no-cold",
    ])
    assert os.environ.get("LOWBIT_FN_NATIVE") == before  # set around the compiled rows' steps only

    names = {
        "torch fused bf16", "torch foreach bf16", "lowbit_fn 8bit (functional, inplace)", "lowbit_fn AdamW8bit",
        "lowbit_fn 8bit (functional, inplace) (compiled)", "lowbit_fn AdamW8bit (compiled)",
        "lowbit_fn 8bit (apply_gradients, inplace)", "lowbit_fn 8bit (apply_gradients, inplace) (compiled)",
    }
    for model in ("sq16M", "m64x1M"):
        mine = {r["optimizer"]: r for r in rows if r["model"] == model}
        assert set(mine) == names  # no pure functional rows: not in --apis
        for row in mine.values():
            assert row["dtype"] == "bfloat16" and math.isfinite(row["ms"]) and row["ms"] > 0, row
            assert row["peak"] is not None and row["peak_mb"] is not None, row
        assert mine["torch fused bf16"]["ratio"] == 1.0
        assert mine["torch fused bf16"]["bytes"] == pytest.approx(4.0, abs=0.01)  # torch keeps bf16 moments
        for name in ("lowbit_fn 8bit (functional, inplace)", "lowbit_fn 8bit (functional, inplace) (compiled)",
                     "lowbit_fn 8bit (apply_gradients, inplace)", "lowbit_fn 8bit (apply_gradients, inplace) (compiled)"):
            assert mine[name]["qbytes"] == EIGHT_BIT  # float32 scales and uint8 codes whatever the params' dtype
            assert mine[name]["path"] == ("compiled" if "(compiled)" in name else "native")
            assert mine[name]["vs_torch_optim"] is not None and mine[name]["vs_torch_optim"] > 0

    out = capsys.readouterr().out
    assert re.search(r"^sq16M bfloat16 8bit: functional inplace / torch_optim = \d+\.\d\dx", out, re.M), out
    assert re.search(r"^sq16M bfloat16 8bit \(compiled\): functional inplace / torch_optim = \d+\.\d\dx", out, re.M), out
    assert re.search(r"^sq16M bfloat16 8bit: apply_gradients inplace / torch_optim = \d+\.\d\dx", out, re.M), out
    assert re.search(r"^step peak extra on m64x1M .*bfloat16 params.*beside torch fused bf16: \d+\.\d MB", out, re.M), out
    assert re.search(r"^  lowbit_fn 8bit \(functional, inplace\): \d+\.\d MB", out, re.M), out


def test_step_speed_paths_and_rss() -> None:
    step_speed = _load_script()
    seen: list[str | None] = []
    before = os.environ.get("LOWBIT_FN_NATIVE")
    step_speed.on_path(lambda: seen.append(os.environ.get("LOWBIT_FN_NATIVE")), "compiled")()
    step_speed.on_path(lambda: seen.append(os.environ.get("LOWBIT_FN_NATIVE")), "native")()
    assert seen == ["0", before] and os.environ.get("LOWBIT_FN_NATIVE") == before

    # peak-RSS growth of one optimizer's step, in a fresh process (what --rss runs for every row)
    spec = step_speed.Spec("functional_inplace", "8bit")
    grown = step_speed.measure_rss("sq16M", 0.01, "bfloat16", spec)
    assert set(grown) == {"first", "step"} and all(isinstance(v, int) and v >= 0 for v in grown.values()), grown


def test_state_bytes_smoke(tmp_path: Path) -> None:
    report = tmp_path / "state.md"
    out = subprocess.run(
        [sys.executable, str(BENCHMARKS / "state_bytes.py"), "--markdown", str(report), "--optimizers", "adamw", "lion",
         "rmsprop_centered", "muon"],
        capture_output=True, text=True, check=True, timeout=120,
    ).stdout
    tables: dict[str, dict[tuple[str, str], list[str]]] = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 9 and cells[4] in ("fp32", "8bit", "4bit", "fp8"):
            tables.setdefault(cells[0], {})[cells[1], cells[4]] = cells[1:]
    assert set(tables) == {"adamw", "lion", "rmsprop_centered", "muon"}
    table = tables["adamw"]
    assert set(table) == {(m, f) for m in ("tlike100", "demo", "mlp") for f in ("fp32", "8bit", "4bit", "fp8")}

    def value(model: str, fmt: str, column: int, family: str = "adamw") -> float | None:
        cell = tables[family][model, fmt][column]
        return None if cell == "—" else float(cell)

    # one moment (Lion, Muon) is half of Adam's two; three (RMSprop centered with momentum) one and a half times
    for fmt in ("8bit", "4bit", "fp8"):
        adam = value("mlp", fmt, 5)  # the table's 5 decimals
        assert value("mlp", fmt, 5, "lion") == pytest.approx(adam / 2, abs=1e-5) == value("mlp", fmt, 5, "muon")
        assert value("mlp", fmt, 5, "rmsprop_centered") == pytest.approx(adam * 1.5, abs=1e-5)

    # tlike100 and the MLP: every quantized row is a multiple of 256 (and 128) elements, so the ratios are exact
    for model in ("tlike100", "mlp"):
        assert value(model, "8bit", 5) == EIGHT_BIT and value(model, "fp8", 5) == EIGHT_BIT
        assert value(model, "8bit", 6) == 8 / 256
        assert value(model, "4bit", 5) == 1 + 8 / 128 and value(model, "4bit", 6) == 8 / 128
    for model in ("tlike100", "demo", "mlp"):
        assert value(model, "fp32", 4) == pytest.approx(8.0, abs=1e-4)  # two fp32 moments (+ the step count)
        assert value(model, "fp32", 5) is None and value(model, "fp32", 6) is None
        assert value(model, "8bit", 4) >= value(model, "8bit", 5) * 0.99  # the small tensors keep fp32 state
        assert value(model, "8bit", 5) >= EIGHT_BIT  # narrower rows than 256 only add scales
    assert report.read_text(encoding="utf-8").count("\n| ") >= 4 * 12 + 1


def test_offload_benchmark_smoke(capsys: pytest.CaptureFixture[str]) -> None:
    path = Path(__file__).parents[1] / "benchmarks" / "offload.py"
    spec = importlib.util.spec_from_file_location("offload_bench", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows = module.main(["--layers", "1", "--width", "256", "--steps", "1", "--warmup", "1", "--device", "cpu"])
    assert [r["config"] for r in rows][:2] == ["AdamW on device", "CPUOffloadOptimizer(AdamW)"] and len(rows) == 6
    assert all(r["ms"] > 0 and r["peak_gib"] is None for r in rows)
    assert "| CPUOffloadOptimizer(AdamW8bit) |" in capsys.readouterr().out


def test_mlp_quality_families(capsys: pytest.CaptureFixture[str]) -> None:
    """--optimizers: each format against the same family's fp32-state run, a table with the bars (never asserts
    the quality itself: 3 steps)."""
    spec = importlib.util.spec_from_file_location("_mlp_quality_benchmark", BENCHMARKS / "mlp_quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    table = module.main(["--optimizers", "lion", "sgd", "muon", "--steps", "3", "--seeds", "0", "1", "--formats", "8bit", "4bit"])
    families = {"lion", "sgd", "muon"}
    assert set(table) == {(f, fmt) for f in families for fmt in ("8bit", "4bit")}
    for row in table.values():
        assert row["min"] <= row["ratio"] <= row["max"] and row["finite"], row
        assert row["bar"] in (0.02, 0.05) and row["passed"] == (abs(row["ratio"] - 1) <= row["bar"])
    out = capsys.readouterr().out
    assert "| family | state | × fp32 final (mean) | min..max over seeds | bar | pass |" in out
    for family in ("lion", "sgd"):
        for fmt, bar in (("8bit", "±2%"), ("4bit", "±5%")):
            line = next(line for line in out.splitlines() if line.startswith(f"| {family} | {fmt} |"))
            cells = _cells(line)
            low, high = cells[3].split("..")
            assert float(low) <= float(cells[2]) <= float(high)
            assert cells[4] == bar and cells[5] in ("pass", "FAIL") and float(cells[6]) > 0 and float(cells[7]) > 0
