"""`bench/gpu_check.sh --dry-run`: the GPU check runs end to end on CPU at tiny sizes, so it cannot rot before a GPU
machine is lent (the real run: README "GPU")."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_dry_run_prints_one_json_with_every_step(small_demo, tmp_path):
    env = {**os.environ, "GPU_CHECK_DATA": str(small_demo), "PYTHON": sys.executable}
    p = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_check.sh"), "--dry-run", "--out", str(tmp_path / "out")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(p.stdout)  # one JSON object, nothing else on stdout
    assert res["ok"] and res["dry_run"]
    steps = res["steps"]
    assert steps["gpu_tests"] == {"skipped": "dry run: no GPU"}
    assert "no --official" in steps["vs_official"]["skipped"]
    step = steps["step"]["result"]
    assert step["preset"] == "paper/mope_swin_b_k16" and step["trainable_params"] < step["total_params"]
    for prec in ("fp32", "bf16"):
        m = step["precisions"][prec]
        assert m["step_ms_median"] > 0 and m["samples_per_s"] > 0 and m["flops_per_step"] > 0
        assert m["mfu"] is None  # no peak for a CPU
    run = steps["zero2_train"]["run"]
    assert steps["zero2_train"]["rc"] == 0 and run["status"] == "FINISHED"
    assert run["params"] == {"deepspeed.zero_stage": "2", "trainer.precision": "fp32"}
    assert 0.0 <= run["metrics"]["final/test_acc"] <= 1.0


def test_peak_table_names_the_card():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_step", ROOT / "bench" / "gpu_step.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == 989.0  # SXM (the name does not say; HBM3 = SXM)
    assert mod.peak_tflops("NVIDIA H100 NVL", "bf16") == 835.0
    assert mod.peak_tflops("NVIDIA H100 PCIe", "fp32") == 51.0
    assert mod.peak_tflops("NVIDIA H200", "bf16") == 989.0
    assert mod.peak_tflops("Tesla T4", "bf16") is None
