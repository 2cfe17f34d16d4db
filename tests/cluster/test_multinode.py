"""The same sweep on a 2-node Ray cluster that shares no disk with the driver (marker `cluster`): the proof of
cluster mode, everything real and on 127.0.0.1.

* nodes: ``ray.cluster_utils.Cluster``, a head and one worker node with one CPU each, started from a folder where
  the driver's ``runs/`` and ``data/`` do not exist (and the data is nowhere on local disk: only in S3);
* object storage: moto's S3 server, holding the demo shards + encoder weights (uploaded as `harness prep --out
  s3://` does) and the sweep's Tune storage (``--storage s3://...``: experiment state and checkpoints);
* tracking: a real ``mlflow server`` (``--artifacts-destination``), reached over HTTP by every trial.

The driver runs `harness sweep --address ...` in a subprocess. Once the trial on the worker node has put a
checkpoint in S3, the worker node is killed: its trial is rescheduled on the head and resumes from that checkpoint;
the sweep ends with both trials FINISHED, one MLflow child run each, and its report.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from tests.helpers.cluster import local_cluster, smoke_spec, sweep_env

pytestmark = [pytest.mark.ray, pytest.mark.cluster, pytest.mark.timeout(1200)]

BUCKET = "mope"
EPOCHS = 6


def _children(client, experiment: str) -> list:
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    runs = client.search_runs([exp.experiment_id], max_results=100)
    return [r for r in runs if r.data.tags.get("harness.role") == "trial"]


def test_sweep_on_two_nodes_without_shared_disk_survives_a_node_kill(small_demo, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from datasets_prep.upload import upload_dataset
    from tests.helpers.mlflow_server import MlflowServer
    from tests.helpers.s3 import S3Server

    t_start = time.time()
    with S3Server() as s3, MlflowServer(tmp_path / "mlflow") as tracking:
        for k, v in s3.env().items():
            monkeypatch.setenv(k, v)  # the node processes inherit it (their own credentials, as on a real cluster)
        s3.make_bucket(BUCKET)
        upload_dataset(small_demo, f"s3://{BUCKET}/data/demo")
        fs = s3.fs()
        spec = smoke_spec(
            tmp_path,
            resources={"workers": 1, "cpus_per_worker": 1},
            overrides={"trainer.epochs": EPOCHS, "trainer.max_steps_per_epoch": 6},
        )
        driver = tmp_path / "driver"
        driver.mkdir()
        env = sweep_env(
            f"s3://{BUCKET}/data",
            driver / "runs",
            MLFLOW_TRACKING_URI=tracking.uri,
            MOPE_SCRATCH=str(tmp_path / "scratch"),
            MOPE_CACHE=str(tmp_path / "cache"),
            **s3.env(),
        )
        client = MlflowClient(tracking_uri=tracking.uri)
        log_path = tmp_path / "driver.log"
        with local_cluster(tmp_path, [{"num_cpus": 1}, {"num_cpus": 1}]) as cluster:
            head_id, worker = cluster.head.node_id, cluster.workers[0]
            worker_id = worker.node_id
            cmd = [sys.executable, "-m", "harness.cli", "sweep", str(spec), "--address", cluster.address]
            cmd += ["--storage", f"s3://{BUCKET}/tune", "--progress-every", "5"]
            with log_path.open("w") as log:
                proc = subprocess.Popen(cmd, cwd=driver, env=env, stdout=log, stderr=subprocess.STDOUT)
                moved = None
                try:
                    deadline = time.time() + 600
                    while moved is None and time.time() < deadline and proc.poll() is None:
                        time.sleep(1)
                        on_worker = [
                            r
                            for r in _children(client, "mope-smoke")
                            if r.data.tags.get("harness.node_id") == worker_id
                        ]
                        for r in on_worker:
                            label = r.data.tags["harness.label"]
                            fs.invalidate_cache()
                            if fs.glob(f"{BUCKET}/tune/*/*-{label}-s0_*/checkpoint_*"):
                                moved = r
                    assert moved is not None, log_path.read_text()[-4000:]
                    assert moved.info.status == "RUNNING"
                    cluster.kill(worker)  # mid-trial: its next epochs never run there
                    rc = proc.wait(timeout=700)
                finally:
                    if proc.poll() is None:
                        proc.kill()
        out = log_path.read_text()
        assert rc == 0, out[-5000:]
        assert "2/2 trials FINISHED" in out, out[-3000:]

        children = _children(client, "mope-smoke")
        assert len(children) == 2 and len({r.data.tags["harness.trial_key"] for r in children}) == 2  # no duplicate
        assert all(r.info.status == "FINISHED" for r in children)
        again = next(r for r in children if r.info.run_id == moved.info.run_id)
        other = next(r for r in children if r.info.run_id != moved.info.run_id)
        # trials ran on both nodes; the moved one ended on the head, resumed from its checkpoint in S3
        assert other.data.tags["harness.node_id"] == head_id
        assert again.data.tags["harness.node_id"] == head_id
        restored = int(again.data.tags["harness.restored_step"])
        assert restored >= 6, again.data.tags
        # nothing lost: one validation value per epoch, and an epoch replayed after the restore agrees with itself
        for r in children:
            hist = client.get_metric_history(r.info.run_id, "val/acc")
            by_step: dict[int, set[float]] = {}
            for m in hist:
                by_step.setdefault(m.step, set()).add(round(m.value, 6))
            assert sorted(by_step) == [6 * (e + 1) for e in range(EPOCHS)], sorted(by_step)
            assert all(len(v) == 1 for v in by_step.values()), by_step
            assert "final/test_acc" in r.data.metrics
            arts = {a.path for a in client.list_artifacts(r.info.run_id)}
            assert "adapter" in arts and "config.yaml" in arts, arts
        assert r.info.artifact_uri.startswith("mlflow-artifacts:"), r.info.artifact_uri
        fs.invalidate_cache()
        # the storage holds Tune's state and the checkpoints; no trial wrote into the driver's folders
        assert fs.glob(f"{BUCKET}/tune/*/experiment_state-*.json")
        assert len(fs.glob(f"{BUCKET}/tune/*/*-s0_*/checkpoint_*")) >= 2
        written = [p for p in driver.rglob("*") if p.is_file()]
        assert not [p for p in written if "checkpoints" in p.parts or p.name == "mlflow.db"], written
        assert not (driver / "data").exists()
        assert list((tmp_path / "scratch").rglob("train_state.pt"))  # trials worked in node-local scratch
        # an adapter kept in the S3 storage loads with load_adapter once fetched (harness.node_cache.localize)
        from harness.node_cache import localize
        from mope import build_model
        from mope.adapter_io import load_adapter, read_adapter_config

        best = sorted(fs.glob(f"{BUCKET}/tune/*/*-s0_*/checkpoint_*/best_adapter"))
        assert best, fs.glob(f"{BUCKET}/tune/*/*-s0_*/checkpoint_*/*")
        monkeypatch.setenv("MOPE_CACHE", str(tmp_path / "cache-here"))  # this process's own node-local cache
        local = localize(f"s3://{best[-1]}", what="adapter")
        assert local.is_relative_to(tmp_path / "cache-here") and (local / "adapter.safetensors").is_file()
        model = build_model(read_adapter_config(local))
        load_adapter(model, local)  # strict keys, shapes, config and frozen-weight fingerprints
        # the sweep's report, from the runs on the tracking server
        assert list((driver / "runs" / "reports").glob("smoke-*/report.html")), out[-2000:]
    print(f"simulated-cluster sweep with a node kill: {time.time() - t_start:.0f}s")
    assert os.environ.get("RAY_ADDRESS") is None
