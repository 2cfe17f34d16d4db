"""MUStARD end to end, offline on CPU (issue 16): a synthetic replica in the raw layout (sarcasm_data.json + 22.05 kHz
stereo wav + mp4 per utterance) -> ``harness prep mustard`` (16 kHz audio, 4 frames decoded from each mp4) -> the
streaming loader (text + audio + frames) -> ``harness train experiment=mustard_tiny_mope`` (MiniLM text main with MoPE
prompts, audio + video complementary black boxes) -> MLflow."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.train_cli import run_train as _train


@pytest.fixture(scope="module")
def mustard_shards(tmp_path_factory) -> Path:
    from datasets_prep.cli import main as prep_main
    from tests.helpers.prep_helpers import make_mustard_replica

    root = tmp_path_factory.mktemp("mustard")
    raw = make_mustard_replica(root / "raw", n=24, seconds=0.6, fps=10, size=32)
    out = root / "shards"
    rc = prep_main(
        [
            "mustard",
            "--src",
            str(raw),
            "--out",
            str(out),
            "--opt",
            "frames=4",
            "--opt",
            "frame_size=32",
            "--opt",
            "expect_entries=0",
            "--opt",
            "min_shards=1",
        ]
    )
    assert rc == 0
    return out


def test_prep_then_train_mustard_with_audio_and_video_logs_to_mlflow(mustard_shards, tmp_path, monkeypatch):
    import json

    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    manifest = json.loads((mustard_shards / "train" / "manifest.json").read_text())
    assert manifest["frames"] == 4 and manifest["frames_source"] == "video"
    rc, out = _train(
        [
            "experiment=mustard_tiny_mope",
            f"data.shard_dir={mustard_shards}",
            f"paths.run_root={tmp_path}",
            "trainer.epochs=2",
            "trainer.max_steps_per_epoch=2",
            "trainer.batch_size=4",
            "trainer.log_every_steps=1",
            "trainer.routing_stats_every_steps=1",
        ]
    )
    assert rc == 0, out[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs(
        [client.get_experiment_by_name("mope-demo").experiment_id]
        if client.get_experiment_by_name("mope-demo")
        else [e.experiment_id for e in client.search_experiments()]
    )
    assert run.info.status == "FINISHED"
    p, m = run.data.params, run.data.metrics
    assert p["model.complementary"] == '["audio", "video"]' and p["model.main"] == "text"
    assert p["audio.kind"] == "hf_wav2vec2" and p["video.kind"] == "timm_vit"
    assert {"final/test_acc", "val/acc", "routing/entropy", "train/loss"} <= set(m)
    assert 0.0 <= m["final/test_acc"] <= 1.0 and m["routing/entropy"] > 0
    assert len(client.get_metric_history(run.info.run_id, "train/loss")) == 4
    # psi (audio + video) is a frozen black box: its features were computed once and cached beside the shards
    caches = list((mustard_shards / "feature_cache").glob("*/train.safetensors"))
    assert len(caches) == 1
    from safetensors.torch import load_file

    feats = load_file(str(caches[0]))["features"]
    assert feats.shape == (manifest["num_samples"], 32 + 32)  # tiny wav2vec2 hidden 32 + tiny ViT dim 32
    assert feats.std(0).gt(0).all()  # every utterance gets its own feature


def test_mustard_without_frames_says_how_to_get_them(tmp_path, monkeypatch):
    from datasets_prep.cli import main as prep_main
    from tests.helpers.prep_helpers import make_mustard_replica

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    raw = make_mustard_replica(tmp_path / "raw", n=12, mp4=False)
    out = tmp_path / "shards"
    assert (
        prep_main(
            ["mustard", "--src", str(raw), "--out", str(out), "--opt", "expect_entries=0", "--opt", "min_shards=1"]
        )
        == 0
    )
    rc, text = _train(
        [
            "experiment=mustard_tiny_mope",
            f"data.shard_dir={out}",
            f"paths.run_root={tmp_path}",
            "trainer.max_steps_per_epoch=1",
            "trainer.batch_size=4",
        ]
    )
    assert rc == 2 and "Traceback" not in text, text[-2000:]
    assert f"data.shard_dir={out} carries ['text', 'audio'], but the model reads ['video']" in text, text[-2000:]
    assert "--opt frames=8" in text and "model.complementary" in text
