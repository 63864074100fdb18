"""``python -m lowbit_fn.demo``: its data loading on the shipped text, its CLI, and short end-to-end runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lowbit_fn import demo


def test_stdlib_text_is_real_python_source():
    files = demo.stdlib_sources()
    assert len(files) > 50 and [f.name for f in files] == sorted(f.name for f in files)
    text = demo.stdlib_text(200_000)
    assert len(text) == 200_000
    assert text.startswith(files[0].read_bytes()[:1000])  # whole files, in name order, from the first on
    source = text.decode("utf-8", errors="replace")
    assert source.count("def ") > 100 and source.count("import ") > 20
    with pytest.raises(ValueError, match="max_bytes"):
        demo.stdlib_text(0)


def test_corpus_split_and_batches():
    data = demo.stdlib_text(100_000)
    corpus = demo.Corpus.from_bytes(data, valid_fraction=0.2)
    assert len(corpus.train) == 80_000 and len(corpus.valid) == 20_000
    assert bytes(corpus.train.tolist()) + bytes(corpus.valid.tolist()) == data  # held-out is the text's tail
    gen = torch.Generator().manual_seed(0)
    x, y = corpus.batch("valid", batch_size=4, context=32, generator=gen)
    assert x.shape == y.shape == (4, 32) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the next bytes
    tail = bytes(corpus.valid.tolist())
    for row in x:
        assert bytes(row.tolist()) in tail  # windows of the held-out text itself
    again = corpus.batch("valid", 4, 32, torch.Generator().manual_seed(0))
    assert torch.equal(again[0], x)  # seeded: the same batches for every optimizer
    with pytest.raises(ValueError, match="split"):
        corpus.batch("test", 1, 8, gen)
    with pytest.raises(ValueError, match="fewer than a window"):
        demo.Corpus.from_bytes(data[:100]).batch("valid", 1, 64, gen)


def test_model_is_causal():
    torch.manual_seed(0)
    model = demo.CharTransformer(width=32, layers=1, heads=4, context=16)
    x = torch.randint(0, 256, (2, 16))
    changed = x.clone()
    changed[:, 10] = (changed[:, 10] + 1) % 256
    out, out_changed = model(x), model(changed)
    assert out.shape == (2, 16, 256)
    assert torch.equal(out[:, :10], out_changed[:, :10])  # no position sees the future
    assert not torch.equal(out[:, 10:], out_changed[:, 10:])


def test_help_runs_as_a_module():
    result = subprocess.run([sys.executable, "-m", "lowbit_fn.demo", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "--functional" in result.stdout and "--optimizers" in result.stdout and "--size" in result.stdout


def test_bad_arguments_are_named():
    with pytest.raises(SystemExit):
        demo.parse_args(["--steps", "0"])
    with pytest.raises(ValueError, match="optimizer must be one of"):
        demo.train("sgd", demo.Corpus.from_bytes(demo.stdlib_text(10_000)), demo.Config(size="tiny", steps=1))


@pytest.mark.parametrize("api", ["--torch-optim", "--functional"])
def test_short_run_writes_the_report(tmp_path: Path, api: str):
    out = tmp_path / "out"
    results = demo.main(["--size", "tiny", "--steps", "6", "--eval-every", "3", "--optimizers", "fp32", "8bit", "4bit",
                         "offload", "--corpus-bytes", "200000", "--no-progress", "--out", str(out), api])
    by_name = {r.optimizer: r for r in results}
    assert list(by_name) == ["fp32", "8bit", "4bit", "offload"]
    fp32 = by_name["fp32"]
    assert fp32.state_bytes / fp32.params == pytest.approx(8.0, abs=0.01)  # two fp32 moments (+ step counters)
    assert 2.0 < by_name["8bit"].state_bytes / by_name["8bit"].params < 2.3  # small tensors keep fp32 state
    assert 1.0 < by_name["4bit"].state_bytes / by_name["4bit"].params < by_name["8bit"].state_bytes / by_name["8bit"].params
    for r in results:
        assert len(r.curve) == 6 and [s for s, _ in r.valid_curve] == [3, 6]
        assert r.valid_loss < r.curve[0] < 6.0  # it learned something from ~ln(256) = 5.5
        assert r.steps_per_s > 0 and (r.peak_rss_mb is None or r.peak_rss_mb > 50)
        assert r.api == ("torch_optim" if r.optimizer == "fp32" else api.strip("-").replace("-", "_"))
    assert by_name["offload"].valid_loss == pytest.approx(by_name["8bit"].valid_loss, rel=1e-6)  # same 8-bit step
    report = (out / "results.md").read_text()
    assert "| optimizer | API | state MB |" in report and "| offload |" in report
    saved = json.loads((out / "results.json").read_text())
    assert [r["optimizer"] for r in saved["results"]] == list(by_name) and saved["config"]["steps"] == 6
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("family", ["lion", "sgd"])
def test_family_and_seeds(tmp_path: Path, family: str, capsys: pytest.CaptureFixture[str]):
    """--family runs every row with that optimizer (fp32: torch's class where torch has one); --seeds adds the table
    of each row's losses relative to the fp32 row of the same seed."""
    out = tmp_path / "out"
    results = demo.main(["--size", "tiny", "--steps", "4", "--eval-every", "2", "--optimizers", "fp32", "8bit", "--family", family,
                         "--seeds", "0", "1", "--corpus-bytes", "200000", "--no-progress", "--out", str(out), "--functional"])
    assert [r.optimizer for r in results] == ["fp32", "8bit"]
    state = {r.optimizer: r.state_bytes / r.params for r in results}
    assert state["fp32"] == pytest.approx(4.0, abs=0.01)  # one fp32 moment (Lion's, SGD's momentum)
    assert 1.0 < state["8bit"] < 1.2  # one byte per element (+ scales and small tensors' fp32 state)
    printed = capsys.readouterr().out
    assert f"family: {family}, lr {demo.FAMILIES[family].hyper['lr']:g}" in printed
    reference = "torch.optim.SGD(fused=True)" if family == "sgd" else "lowbit_fn.Lion()"
    assert f"- family {family}: the fp32 row is {reference}" in printed
    assert f"| {family} | held-out vs fp32 (mean) | min..max over seeds |" in printed
    row = next(line for line in printed.splitlines() if line.startswith("| 8bit | ") and ".." in line)
    cells = [c.strip() for c in row.strip("|").split("|")]
    low, high = cells[2].split("..")
    assert float(low) <= float(cells[1]) <= float(high) and 0.5 < float(cells[1]) < 2.0
    saved = json.loads((out / "results.json").read_text())
    assert saved["config"]["family"] == family and set(saved["seeds"]) == {"0", "1"}
    assert saved["seeds"]["1"][0]["valid_loss"] != saved["seeds"]["0"][0]["valid_loss"]  # another seed, another run


@pytest.mark.parametrize("api", ["--torch-optim", "--functional"])
def test_muon_family_takes_the_blocks_matrices(tmp_path: Path, api: str, capsys: pytest.CaptureFixture[str]):
    """--family muon: Muon for the transformer blocks' 2-D weights, AdamW in the same format for the rest (fp32:
    torch.optim.Muon + AdamW(fused=True)); the state bytes count both optimizers'."""
    model = demo.CharTransformer(**demo.SIZES["tiny"])
    named = dict(model.named_parameters())
    matrices = {n for n, p in named.items() if demo.hidden_matrix(n, p)}
    assert matrices == {f"blocks.{i}.{m}.weight" for i in range(2) for m in ("qkv", "proj", "fc", "out")}
    stepper = demo._Stepper("8bit", model, demo.Config(size="tiny", family="muon", lr=0.05, weight_decay=0.1))
    assert [type(o).__name__ for o in stepper.opts] == ["Muon8bit", "AdamW8bit"]
    assert {id(p) for p in stepper.opts[0].param_groups[0]["params"]} == {id(named[n]) for n in matrices}
    assert stepper.opts[1].param_groups[0]["initial_lr"] == demo.FAMILIES["muon"].rest.hyper["lr"]

    results = demo.main(["--size", "tiny", "--steps", "3", "--eval-every", "3", "--optimizers", "fp32", "8bit", "--family",
                         "muon", "--corpus-bytes", "200000", "--no-progress", "--out", str(tmp_path / "out"), api])
    n_matrix = sum(named[n].numel() for n in matrices)
    n_rest = sum(p.numel() for n, p in named.items() if n not in matrices)
    fp32, low = results
    # Muon's fp32 momentum + AdamW's two fp32 moments (+ AdamW's step counters)
    assert fp32.state_bytes == pytest.approx(4 * n_matrix + 8 * n_rest, abs=4 * len(named))
    assert 1.02 * n_matrix < low.state_bytes < 1.1 * n_matrix + 8 * n_rest  # both states, Muon's at ~1 B/element
    assert all(r.valid_loss < r.curve[0] for r in results)
    printed = capsys.readouterr().out
    assert "the fp32 row is torch.optim.Muon() + torch.optim.AdamW(fused=True)" in printed


@pytest.mark.slow
def test_low_bit_training_tracks_fp32():
    """A real (if short) run: every low-bit optimizer ends within 3% of fp32's held-out loss."""
    corpus = demo.Corpus.from_bytes(demo.stdlib_text(1_000_000))
    cfg = demo.Config(size="tiny", steps=120, eval_every=60, warmup=12)
    results = {name: demo.train(name, corpus, cfg, progress=False) for name in ("fp32", "8bit", "4bit", "fp8")}
    ref = results["fp32"].valid_loss
    assert ref < 3.2  # well below the unigram entropy of source text (~4.5 nats per byte)
    for name, r in results.items():
        assert r.valid_loss / ref < 1.03, (name, r.valid_loss, ref)
