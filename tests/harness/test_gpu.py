"""The GPU path of the worker (issue: DeepSpeed bf16, ZeRO-2, 1 GPU). Marked `gpu`: deselected by default, and skipped
cleanly on a machine without CUDA (`pytest -m gpu`)."""

from __future__ import annotations

import pytest
import torch

from tests.helpers.demo_helpers import cfg_for

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def test_deepspeed_bf16_zero2_one_gpu(small_demo, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from harness.recipe import train
    from harness.tracking import default_tracking_uri

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = cfg_for(small_demo, tmp_path, "deepspeed=zero2", "trainer.precision=bf16", "trainer.epochs=3")
    summary = train(cfg)
    assert summary["finished"] and summary["step"] == 3 * 16
    c = MlflowClient(default_tracking_uri(str(tmp_path)))
    r = c.get_run(summary["run_id"])
    assert r.info.status == "FINISHED"
    assert r.data.params["deepspeed.zero_stage"] == "2" and r.data.params["trainer.precision"] == "bf16"
    loss = [m.value for m in c.get_metric_history(r.info.run_id, "train/loss")]
    assert all(torch.isfinite(torch.tensor(loss))) and loss[-1] < loss[0]
    assert r.data.metrics["perf/peak_mem_mb"] > 0  # CUDA memory was used
    assert 0.0 <= r.data.metrics["final/test_acc"] <= 1.0
