"""The training recipe end to end on a small demo build: learning, MLflow contents, resume = uninterrupted run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from harness.compose import compose
from harness.compose import fusion_config as fusion_config_of
from harness.recipe import open_tracker, train
from tests.helpers.demo_helpers import cfg_for


def _client(cfg):
    from mlflow.tracking import MlflowClient

    from harness.tracking import default_tracking_uri

    return MlflowClient(default_tracking_uri(cfg["paths"]["run_root"]))


def test_train_logs_everything_and_learns(small_demo, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = cfg_for(small_demo, tmp_path, "trainer.epochs=3")
    summary = train(cfg)
    assert summary["finished"] and summary["step"] == 3 * 16
    c = _client(cfg)
    r = c.get_run(summary["run_id"])
    assert r.info.status == "FINISHED"
    assert r.data.params["mope.num_experts"] == "4" and r.data.params["method.name"] == "mope"
    loss = [m.value for m in c.get_metric_history(r.info.run_id, "train/loss")]
    assert len(loss) == 12 and loss[-1] < loss[0]  # the training loss goes down
    ent = c.get_metric_history(r.info.run_id, "routing/entropy")
    assert len(ent) == 12 and all(0 <= m.value <= 2.0 + 1e-6 for m in ent)  # log2(4) bits at most
    assert "routing/importance_last/e3" in r.data.metrics and "routing/entropy_block1" in r.data.metrics
    for k in (
        "final/test_acc",
        "final/test_acc_last",
        "final/val_acc_best",
        "perf/train_samples_per_s",
        "perf/data_wait_frac",
        "perf/run_data_wait_frac",
        "perf/peak_mem_mb",
        "val/acc",
    ):
        assert k in r.data.metrics, k
    arts = {a.path for a in c.list_artifacts(r.info.run_id)}
    assert {"provenance.json", "config.yaml", "adapter"} <= arts
    assert {a.path for a in c.list_artifacts(r.info.run_id, "adapter")} >= {"adapter/adapter.safetensors"}
    # the shards it read, as MLflow dataset inputs (the UI's Datasets column): digest = the split manifest's sha256
    from mope_data.format import sha256_file

    inputs = {d.dataset.name: d for d in r.inputs.dataset_inputs}
    assert set(inputs) == {"demo/train", "demo/val", "demo/test"}
    for split in ("train", "val", "test"):
        d = inputs[f"demo/{split}"]
        assert d.dataset.digest == sha256_file(small_demo / split / "manifest.json")[:36]
        assert str(small_demo / split) in d.dataset.source
        assert {t.key: t.value for t in d.tags}["mlflow.data.context"] == split


def test_resume_reproduces_uninterrupted_run(small_demo, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    full = train(cfg_for(small_demo, tmp_path / "a", "trainer.epochs=3"))
    cfg_b = cfg_for(small_demo, tmp_path / "b", "trainer.epochs=3")
    part = train(cfg_b, stop_after_epochs=1)  # "crash" after epoch 1
    assert not part["finished"] and part["step"] == 16
    resumed = train(cfg_for(small_demo, tmp_path / "b", "trainer.epochs=3", "resume=true"))
    assert resumed["step"] == full["step"] == 48
    assert resumed["run_id"] == part["run_id"]  # the same MLflow run continues (found by its trial key)
    for k in ("final/test_acc", "final/val_acc_best", "final/test_loss_last"):
        assert resumed[k] == pytest.approx(full[k], abs=1e-6), k
    from safetensors.torch import load_file

    a = load_file(str(Path(full["run_dir"]) / "adapter" / "adapter.safetensors"))
    b = load_file(str(Path(resumed["run_dir"]) / "adapter" / "adapter.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    hist = _client(cfg_b).get_metric_history(resumed["run_id"], "train/loss")
    assert sorted(m.step for m in hist) == list(range(4, 49, 4))  # no duplicated or missing steps
    inputs = _client(cfg_b).get_run(resumed["run_id"]).inputs.dataset_inputs
    assert sorted(d.dataset.name for d in inputs) == ["demo/test", "demo/train", "demo/val"]  # not logged twice


def test_nan_loss_fails_the_run_and_keeps_logged_data(small_demo, tmp_path, monkeypatch):
    from harness.recipe import TrainingDiverged

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = cfg_for(small_demo, tmp_path, "trainer.epochs=1", "trainer.lr_vision=1e30", "trainer.lr_text=1e30")
    tracker = open_tracker(cfg)
    with pytest.raises(TrainingDiverged, match="at step"):
        train(cfg, tracker=None)
    r = _client(cfg).get_run(tracker.run_id)
    assert r.info.status == "FAILED" and "at step" in r.data.tags["harness.error"]
    assert r.data.params["seed"] == "0"


def test_changed_config_is_a_new_run_and_a_rerun_never_overwrites(small_demo, tmp_path, monkeypatch, capsys):
    from harness.run_setup import config_id, run_dir_of
    from harness.train_cmd import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    base = [
        f"data.shard_dir={small_demo}",
        f"vision.weights={small_demo}/vision_encoder",
        f"paths.run_root={tmp_path}",
        "data.auto_prepare=false",
        "deepspeed=off",
        "trainer.num_workers=0",
        "trainer.batch_size=32",
        "trainer.threads=1",
        "trainer.epochs=1",
    ]
    a = compose(["experiment=demo_mope", *base])
    b = compose(["experiment=demo_mope", *base, "trainer.lr_vision=5e-3"])
    assert config_id(a) == config_id(compose(["experiment=demo_mope", *base, "resume=true"]))  # run control only
    assert config_id(a) != config_id(b) and run_dir_of(a) != run_dir_of(b)
    ra, rb = train(a), train(b)  # same run_name, different config: a second MLflow run, not a param conflict
    assert ra["run_id"] != rb["run_id"]
    c = _client(a)
    assert c.get_run(ra["run_id"]).data.params["trainer.lr_vision"] == "0.001"
    assert c.get_run(rb["run_id"]).data.params["trainer.lr_vision"] == "0.005"
    n_loss = len(c.get_metric_history(ra["run_id"], "val/acc"))
    # the same command again (no resume=true) is refused: the finished run and its checkpoints stay as they are
    assert main(["experiment=demo_mope", *base]) == 2
    assert "resume=true" in capsys.readouterr().err
    assert len(c.get_metric_history(ra["run_id"], "val/acc")) == n_loss
    assert c.get_run(ra["run_id"]).info.status == "FINISHED"


def test_to_device_moves_nested_inputs_and_keeps_label_dtype():
    from harness.engines import to_device

    batch = {
        "image": torch.ones(2, 3),
        "text": {"input_ids": torch.ones(2, 4, dtype=torch.long)},
        "label": torch.tensor([0.0, 1.0]),
        "key": ["a", "b"],
    }
    out = to_device(batch, torch.device("cpu"), torch.bfloat16)
    assert out is batch and batch["image"].dtype == torch.bfloat16  # in place: the caller's batch is the moved one
    assert batch["text"]["input_ids"].dtype == torch.long and batch["label"].dtype == torch.float32
    assert batch["key"] == ["a", "b"]


def test_input_row_digests_ignore_padding_and_tell_inputs_apart():
    from harness.feature_cache import input_row_digests

    ids = torch.tensor([[101, 7, 8, 102, 0, 0], [101, 7, 8, 102, 0, 0], [101, 7, 9, 102, 0, 0]])
    mask = (ids != 0).long()
    d = input_row_digests({"input_ids": ids, "attention_mask": mask})
    assert d[0] == d[1] != d[2]
    # the same text padded to another length (another batch) has the same digest
    short = input_row_digests({"input_ids": ids[:, :4], "attention_mask": mask[:, :4]})
    assert short[0] == d[0] and short[2] == d[2]
    img = torch.zeros(3, 3, 4, 4)
    img[2, 0, 0, 0] = 1.0
    di = input_row_digests(img)
    assert di[0] == di[1] != di[2]


def test_feature_cache_encodes_each_distinct_input_once_and_matches_direct(small_demo, tmp_path, monkeypatch):
    """The cache of the frozen text tower: every sample covered, each distinct statement encoded once (the demo has
    far fewer statements than pairs), features equal to encoding each batch directly."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from harness.feature_cache import FeatureCache, input_row_digests
    from harness.run_setup import loader_config
    from mope import build_model
    from mope_data import make_eval_loader

    cfg = cfg_for(small_demo, tmp_path)
    model = build_model(fusion_config_of(cfg)).eval()
    assert model.comp_is_blackbox
    lcfg = loader_config(cfg, small_demo)
    batches = list(make_eval_loader(lcfg, "val", 0, 1))
    with torch.no_grad():
        direct = torch.cat([model.complementary_feature(b) for b in batches])
    distinct = {d for b in batches for d in input_row_digests(model.complementary_inputs(b))}
    n = sum(len(b["key"]) for b in batches)
    assert len(distinct) < n

    encoded: list[int] = []
    inner = model.complementary_feature
    monkeypatch.setattr(model, "complementary_feature", lambda b: encoded.append(len(b["input_ids"])) or inner(b))
    cache = FeatureCache(tmp_path, "k")
    cache.build(model, lcfg, ["val"], rank=0, world_size=1)
    assert sum(encoded) == len(distinct)
    cached = torch.cat([cache.lookup("val", b["key"]) for b in batches])
    torch.testing.assert_close(cached, direct, atol=1e-5, rtol=1e-4)
    # a second build reads the stored file (nothing is encoded again)
    encoded.clear()
    FeatureCache(tmp_path, "k").build(model, lcfg, ["val"], rank=0, world_size=1)
    assert encoded == []


def test_system_metrics_are_logged_by_mlflows_monitor(small_demo, tmp_path, monkeypatch):
    """tracking.system_metrics_s: MLflow's own system-metrics monitor samples the run (system/* metrics) and is
    stopped with the run; null turns it off."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    import threading

    def monitors() -> set:
        return {t for t in threading.enumerate() if "SystemMetricsMonitor" in t.name}

    before = monitors()  # another in-process test's monitor is not this test's to judge
    on = train(cfg_for(small_demo, tmp_path / "on", "trainer.epochs=2", "tracking.system_metrics_s=0.5"))
    off = train(cfg_for(small_demo, tmp_path / "off", "trainer.epochs=1", "tracking.system_metrics_s=null"))
    m_on = _client(cfg_for(small_demo, tmp_path / "on")).get_run(on["run_id"]).data.metrics
    m_off = _client(cfg_for(small_demo, tmp_path / "off")).get_run(off["run_id"]).data.metrics
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(m_on), sorted(m_on)
    assert not [k for k in m_off if k.startswith("system/")]
    assert not monitors() - before  # stopped with the run
