"""Referring segmentation end to end, offline on CPU: a RefCOCO replica in the raw refer layout -> ``harness prep
refcoco`` (train one sample per object, evaluation one per expression) -> ``harness train`` (MoPE on a tiny random
ViT, the MiniLM expression feature cached as psi) -> MLflow: per-split mIoU / oIoU, the testA + testB aggregate, the
mask examples the report draws, and a feature cache that holds every expression training can draw."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers.train_cli import run_train as _train

pytest.importorskip("pycocotools")

TINY_VIT = [
    "vision.name=vit_tiny_patch16_224",
    "vision.weights=null",
    "+vision.kwargs={img_size: 32, patch_size: 8, embed_dim: 32, depth: 2, num_heads: 2}",
]


@pytest.fixture(scope="module")
def refcoco_shards(tmp_path_factory) -> Path:
    from datasets_prep.cli import main as prep_main
    from datasets_prep.replica import make_refcoco_replica

    root = tmp_path_factory.mktemp("refcoco")
    raw = make_refcoco_replica(root / "raw")
    out = root / "shards"
    assert (
        prep_main(["refcoco", "--src", str(raw), "--out", str(out), "--shard-size", "4", "--opt", "min_shards=1"]) == 0
    )
    return out


def test_prep_then_train_refcoco_logs_every_split(refcoco_shards, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient
    from safetensors.torch import load_file

    from mope_data.format import read_manifest

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    rc, out = _train(
        [
            "experiment=ris_demo_mope",
            "data=refcoco",
            f"data.shard_dir={refcoco_shards}",
            "data.image_size=32",
            *TINY_VIT,
            f"paths.run_root={tmp_path}",
            "trainer.epochs=2",
            "trainer.max_steps_per_epoch=2",
            "trainer.milestones=[1]",
            "trainer.batch_size=4",
            "trainer.threads=1",
            "trainer.num_workers=0",
            "tracking.system_metrics_s=null",
            "deepspeed=off",  # in-process: no process group may outlive the test (sweeps run DeepSpeed in Ray workers)
        ]
    )
    assert rc == 0, out[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "FINISHED"
    m = run.data.metrics
    for split in ("val", "testA", "testB"):
        assert 0.0 <= m[f"final/{split}_miou"] <= 1.0 and 0.0 <= m[f"final/{split}_oiou"] <= 1.0
    n = {sp: read_manifest(refcoco_shards / sp)["num_samples"] for sp in ("testA", "testB")}
    want = (m["final/testA_miou"] * n["testA"] + m["final/testB_miou"] * n["testB"]) / (n["testA"] + n["testB"])
    assert m["final/test_miou"] == pytest.approx(want, abs=1e-6)  # size-weighted over the expressions
    inter = m["final/testA_inter_px"] + m["final/testB_inter_px"]
    assert m["final/test_oiou"] == pytest.approx(inter / (m["final/testA_union_px"] + m["final/testB_union_px"]))
    assert m["final/testA_oiou"] == pytest.approx(m["final/testA_inter_px"] / m["final/testA_union_px"])
    arts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "mask_examples" in arts
    # psi is the frozen MiniLM's: cached once; the train cache holds every expression under the key training draws
    (cache,) = (refcoco_shards / "feature_cache").glob("*/train.safetensors")
    from safetensors import safe_open

    with safe_open(str(cache), "pt") as fh:
        keys = json.loads(fh.metadata()["keys"])
    assert len(keys) == len(set(keys)) and any("#s" in k for k in keys)
    assert len(load_file(str(cache))["features"]) == len(keys) > read_manifest(refcoco_shards / "train")["num_samples"]
