"""Without a working compiler the same math runs eagerly after one warning, with identical results."""

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import sys, warnings, torch, lowbit_fn
    torch.manual_seed(0)
    params = {"w": torch.randn(200, 300), "b": torch.randn(300)}
    grads = [{k: torch.randn_like(v) for k, v in params.items()} for _ in range(3)]
    out = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for fmt in ("fp32", "8bit", "4bit", "fp8"):
            opt = lowbit_fn.adamw(1e-2, state_format=fmt, min_quant_size=0)
            p, state = params, opt.init(params)
            for g in grads:
                u, state = opt.update(g, state, p)
                p = lowbit_fn.apply_updates(p, u)
            out[fmt] = (p, state)
        codes, scale = lowbit_fn.quantize(torch.randn(1000), "8bit", signed=True)
        out["quantize"] = (codes, scale)
    ours = [w for w in caught if "lowbit_fn: torch.compile is unavailable" in str(w.message)]
    torch.save({"n_warnings": len(ours), "compiled": lowbit_fn.compile_enabled(), "out": out}, sys.argv[1])
    """
)


def _run(tmp_path, name, **env):
    path = tmp_path / f"{name}.pt"
    full_env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / f"cache-{name}"), **env}
    subprocess.run([sys.executable, "-c", SCRIPT, str(path)], check=True, env=full_env, timeout=600)
    import torch

    return torch.load(path, weights_only=False)


def test_no_compiler_warns_once_and_matches_eager(tmp_path):
    broken = _run(tmp_path, "broken", CXX="/nonexistent/c++")
    eager = _run(tmp_path, "eager", LOWBIT_FN_COMPILE="0")
    assert broken["n_warnings"] == 1, "exactly one warning, then eager"
    assert broken["compiled"] is False and eager["n_warnings"] == 0
    assert broken["out"].keys() == eager["out"].keys()
    for key, pair in broken["out"].items():
        for got, want in zip(pair, eager["out"][key]):
            assert bool((got == want).all()), key
