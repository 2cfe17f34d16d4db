"""bench/vs_official.py: without the official code it explains how to get it and exits 0 ("skipped"); with an
extraction of songrise/MoPE at $MOPE_OFFICIAL_DIR (default /tmp/official-mope) a tiny run times both sides and
accounts for the parameter difference (slow)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "vs_official.py"
OFFICIAL = Path(os.environ.get("MOPE_OFFICIAL_DIR", "/tmp/official-mope"))


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def test_without_official_prints_how_to_get_it_and_exits_0():
    p = _run([], timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "skipped" in p.stdout
    assert "github:songrise/MoPE" in p.stdout and "git clone" in p.stdout  # how to mirror it
    assert "ls-tree" in p.stdout and "show" in p.stdout and "--official" in p.stdout  # how to extract and run


def test_a_directory_that_is_not_the_official_code_is_refused(tmp_path):
    p = _run(["--official", str(tmp_path)], timeout=120)
    assert p.returncode == 2, p.stdout + p.stderr
    assert "models/swin.py" in p.stdout and "not an extraction" in p.stdout


@pytest.mark.slow
@pytest.mark.skipif(not (OFFICIAL / "models" / "swin.py").is_file(), reason=f"no official code at {OFFICIAL}")
def test_tiny_run_times_both_sides_and_explains_the_parameter_difference(tmp_path):
    out = tmp_path / "vs.json"
    tiny = ["--k", "2", "--rounds", "1", "--warmup", "0", "--batch", "2", "--image-size", "64", "--window-size", "2"]
    p = _run(["--official", str(OFFICIAL), *tiny, "--bert-layers", "1", "--threads", "1", "--json", str(out)], 900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    res = json.loads(out.read_text())
    d = res["per_k"]["2"]
    sides = {name.split("/")[0] for name in d["ms"]}
    assert sides == {"official", "ours"}
    for step in ("block_train", "block_infer", "e2e_train", "e2e_infer"):
        assert d["ms"][f"official/{step}"]["median"] > 0 and d["ms"][f"ours/{step}"]["median"] > 0
        assert d["ratios"][step]["official_over_ours"] > 0
    assert all(v["median"] > 0 and v["n"] == 1 for v in d["ms"].values())
    prm = d["params"]
    assert prm["official_trainable"] > prm["ours_trainable"] > 0
    # official − (block-0 prompt slots + block-0 routers, allocated and never read) = ours, computed from the models
    assert prm["remainder"] == 0, prm
    assert prm["nonzero_grad_elements"] == {"official": prm["ours_trainable"], "ours": prm["ours_trainable"]}
    assert set(res["bf16"]["probe"]) == {"e2e_train", "e2e_infer"}  # --bf16 auto: measured, reported either way
    assert "| 2 | (a) training step" in p.stdout and "official ÷ ours" in p.stdout
