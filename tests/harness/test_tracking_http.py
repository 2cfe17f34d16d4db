"""Tracking over HTTP against a real ``mlflow server`` on 127.0.0.1 (``tests.helpers.mlflow_server``): runs,
metrics and artifacts travel through the server (``mlflow-artifacts:`` roots, nothing written beside the logging
process), MLflow's HTTP retries are bounded so a down server costs a call seconds, a training run survives the
server being stopped and restarted on the same port and store with every metric value stored exactly once, and
(marker ``ray``) the smoke sweep with ``MLFLOW_TRACKING_URI=http://...`` ends with its parent run, children, adapters
and report downloadable through the server and ``harness report --tracking-uri http://...`` regenerates the report.
"""

from __future__ import annotations

import collections
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from harness.tracking import HTTP_CLIENT_LIMITS, MLflowTracker, limit_http_retries
from tests.helpers.demo_helpers import cfg_for

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "sweeps" / "smoke.yaml"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch, tmp_path):
    """No inherited tracking URI or HTTP limits; whatever the tracker sets in os.environ is undone afterwards."""
    for k in (*HTTP_CLIENT_LIMITS, "MLFLOW_TRACKING_URI", "HARNESS_FAULT_INJECT"):
        monkeypatch.setenv(k, "x")  # records the original value (or its absence) for teardown
        monkeypatch.delenv(k)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    monkeypatch.chdir(tmp_path)  # a stray ./mlruns or ./mlartifacts would show up here


def _client(server):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=server.uri)


# -- the HTTP client's limits -----------------------------------------------------------------------------------------
def test_http_limits_are_set_for_a_server_and_the_users_env_wins(monkeypatch):
    assert limit_http_retries("sqlite:////tmp/x/mlflow.db") == {}
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "77")
    got = limit_http_retries("http://127.0.0.1:5000")
    assert got == {**HTTP_CLIENT_LIMITS, "MLFLOW_HTTP_REQUEST_TIMEOUT": "77"}
    from mlflow.environment_variables import MLFLOW_HTTP_REQUEST_MAX_RETRIES, MLFLOW_HTTP_REQUEST_TIMEOUT

    assert MLFLOW_HTTP_REQUEST_MAX_RETRIES.get() == 2 and MLFLOW_HTTP_REQUEST_TIMEOUT.get() == 77


# -- runs, metrics and artifacts through the server -------------------------------------------------------------------
def test_tracker_logs_runs_metrics_and_artifacts_through_the_server(mlflow_server_module, tmp_path):
    server = mlflow_server_module
    src = tmp_path / "src"
    (src / "adapter").mkdir(parents=True)
    (src / "adapter" / "adapter.safetensors").write_bytes(b"\0" * 1000)
    (src / "config.yaml").write_text("a: 1\n")
    parent = MLflowTracker.open(server.uri, "http-artifacts", "sweep", "sweep/s1", params={"spec": {"n": 2}})
    child = MLflowTracker.open(
        server.uri, "http-artifacts", "trial", "s1/p/0", parent_run_id=parent.run_id, params={"lr": 0.1}
    )
    for step in range(1, 6):
        child.log_metrics({"train/loss": 1.0 / step}, step=step)
    child.log_artifact(src / "config.yaml")
    child.log_artifact(src / "adapter", "adapter")
    child.log_dict({"git": "abc"}, "provenance.json")
    child.finish()
    parent.log_artifact(src / "config.yaml", "report")
    parent.finish()

    c = _client(server)
    r = c.get_run(child.run_id)
    assert r.info.status == "FINISHED" and r.data.tags["mlflow.parentRunId"] == parent.run_id
    assert r.info.artifact_uri.startswith("mlflow-artifacts:"), r.info.artifact_uri
    assert c.get_experiment(r.info.experiment_id).artifact_location.startswith("mlflow-artifacts:")
    assert [m.step for m in c.get_metric_history(child.run_id, "train/loss")] == [1, 2, 3, 4, 5]
    assert {a.path for a in c.list_artifacts(child.run_id)} == {"adapter", "config.yaml", "provenance.json"}
    got = Path(c.download_artifacts(child.run_id, "adapter/adapter.safetensors", str(tmp_path / "dl")))
    assert got.read_bytes() == b"\0" * 1000
    # written by the server under its --artifacts-destination, nothing beside the client
    assert list(server.artifacts_dir.rglob("adapter.safetensors"))
    assert not [p for p in tmp_path.rglob("*") if p.name in ("mlruns", "mlartifacts")]
    # a second open finds the same run (resume), no duplicate
    again = MLflowTracker.open(server.uri, "http-artifacts", "trial", "s1/p/0", params={"lr": 0.1})
    assert again.run_id == child.run_id and again.resumed
    again.finish()


# -- the server down --------------------------------------------------------------------------------------------------
def test_a_stopped_server_costs_a_call_seconds_and_nothing_is_lost(mlflow_server, caplog):
    """While the server is stopped, logging only buffers (a failed call ~2.5 s with the harness's limits instead of
    MLflow's ~4 min); after the restart on the same port and store, finish() logs every value once."""
    server = mlflow_server
    tracker = MLflowTracker.open(server.uri, "http-down", "r", "down/0", params={"x": 1})
    tracker.log_metrics({"m": 0.0}, step=0)
    server.stop()
    times = []
    with caplog.at_level(logging.WARNING, logger="harness.tracking"):
        for step in range(1, 21):
            t0 = time.monotonic()
            tracker.log_metrics({"m": float(step)}, step=step)
            times.append(time.monotonic() - t0)
            time.sleep(0.1)
        assert len(tracker.pending_metrics()) == 20
        server.start()
        tracker.finish()
    print(f"log_metrics while the server was down: max {max(times):.2f}s, total {sum(times):.2f}s")
    assert max(times) < 5.0, times  # MLflow's defaults (7 retries, factor 2) would take minutes here
    assert "MLflow store unavailable" in caplog.text and "is back" in caplog.text
    hist = _client(server).get_metric_history(tracker.run_id, "m")
    assert sorted((m.step, m.value) for m in hist) == [(s, float(s)) for s in range(21)]


def test_open_waits_for_a_restarting_server(mlflow_server, caplog):
    server = mlflow_server
    server.stop()
    t = threading.Thread(target=lambda: (time.sleep(2), server.start()), daemon=True)
    t.start()
    with caplog.at_level(logging.WARNING, logger="harness.tracking"):
        tracker = MLflowTracker.open(server.uri, "http-open", "r", "open/0", params={"x": 1})
    t.join(60)
    tracker.finish()
    assert "opening the run of trial open/0" in caplog.text
    exp = _client(server).get_experiment_by_name("http-open")
    runs = _client(server).search_runs([exp.experiment_id])
    assert [r.info.run_id for r in runs] == [tracker.run_id] and runs[0].info.status == "FINISHED"


def test_training_survives_a_server_restart_and_stores_every_metric_once(small_demo, mlflow_server, caplog):
    """A short training run logs to the server; the server is stopped mid-run and restarted on the same port and
    store: the run finishes, every value the worker logged (per key and step) is in the store exactly once, one run."""
    from harness.recipe import open_tracker, train

    server = mlflow_server
    os.environ["MLFLOW_TRACKING_URI"] = server.uri  # (restored by _clean_env)
    cfg = cfg_for(small_demo, Path.cwd() / "runs", "trainer.epochs=4")
    tracker = open_tracker(cfg)
    logged: list[tuple[str, int, float]] = []
    call_s: list[float] = []
    log_metrics = tracker.log_metrics

    def recording(metrics, step):
        logged.extend((str(k), int(step), float(v.item() if hasattr(v, "item") else v)) for k, v in metrics.items())
        t0 = time.monotonic()
        log_metrics(metrics, step)
        call_s.append(time.monotonic() - t0)

    tracker.log_metrics = recording
    client = _client(server)
    outage: dict[str, float] = {}

    def outage_mid_run():
        deadline = time.time() + 120
        while time.time() < deadline and not client.get_metric_history(tracker.run_id, "train/loss"):
            time.sleep(0.2)
        outage["stop"] = time.monotonic()
        server.stop()
        time.sleep(3)
        server.start()
        outage["back"] = time.monotonic()

    th = threading.Thread(target=outage_mid_run, daemon=True)
    t0 = time.monotonic()
    th.start()
    with caplog.at_level(logging.WARNING, logger="harness.tracking"):
        summary = train(cfg, tracker=tracker)
        t_trained = time.monotonic()
        tracker.finish("FINISHED")
    th.join(120)
    print(
        f"training {t_trained - t0:.1f}s; server down {outage['back'] - outage['stop']:.1f}s "
        f"(from {outage['stop'] - t0:.1f}s); slowest log_metrics {max(call_s):.2f}s"
    )
    assert "stop" in outage and "back" in outage
    assert outage["stop"] < t_trained, "the server went down after training ended: nothing was tested"
    assert "MLflow store unavailable" in caplog.text and "is back" in caplog.text, caplog.text
    assert max(call_s) < 6.0, call_s  # a down server costs a step seconds, not MLflow's minutes

    r = client.get_run(tracker.run_id)
    assert r.info.status == "FINISHED" and summary["finished"]
    exp = client.get_experiment(r.info.experiment_id)
    assert exp.artifact_location.startswith("mlflow-artifacts:")
    assert len(client.search_runs([exp.experiment_id])) == 1  # no duplicate run
    want = collections.Counter((k, s) for k, s, _ in logged)
    assert max(want.values()) == 1  # the worker logs each key once per step
    stored = collections.Counter()
    values = {}
    for key in {k for k, _, _ in logged}:
        for m in client.get_metric_history(tracker.run_id, key):
            stored[(key, m.step)] += 1
            values[(key, m.step)] = m.value
    assert stored == want, (set(want) - set(stored), {k: n for k, n in stored.items() if n > 1})
    assert all(values[(k, s)] == pytest.approx(v, rel=1e-6, nan_ok=True) for k, s, v in logged)
    assert sorted(s for (k, s) in stored if k == "train/loss") == list(range(4, 65, 4))
    arts = {a.path for a in client.list_artifacts(tracker.run_id)}
    assert {"provenance.json", "config.yaml", "adapter"} <= arts
    assert not (Path.cwd() / "runs" / "mlflow.db").exists() and not list(Path.cwd().rglob("mlartifacts"))


# -- the smoke sweep over HTTP (marker `ray`) -------------------------------------------------------------------------
@pytest.mark.ray
@pytest.mark.timeout(900)
def test_smoke_sweep_over_http_logs_everything_through_the_server(small_demo, mlflow_server, tmp_path):
    from mlflow.tracking import MlflowClient

    server = mlflow_server
    run_root = tmp_path / "runs"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env.update(
        MOPE_DATA_ROOT=str(small_demo.parent),
        MOPE_RUN_ROOT=str(run_root),
        HF_HUB_OFFLINE="1",
        MLFLOW_TRACKING_URI=server.uri,
    )
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "harness.cli", "sweep", str(SMOKE), "--progress-every", "5"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=800,
        check=False,
    )
    t_sweep = time.monotonic() - t0
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    assert "2/2 trials FINISHED" in out, out[-3000:]

    c = MlflowClient(tracking_uri=server.uri)
    exp = c.get_experiment_by_name("mope-smoke")
    assert exp.artifact_location.startswith("mlflow-artifacts:"), exp.artifact_location
    runs = c.search_runs([exp.experiment_id], max_results=100)
    parents = [r for r in runs if r.data.tags.get("harness.role") == "sweep"]
    children = [r for r in runs if r.data.tags.get("harness.role") == "trial"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == 2 and len({r.data.tags["harness.trial_key"] for r in children}) == 2
    parent = parents[0]
    dl = tmp_path / "dl"
    for r in children:
        assert r.info.status == "FINISHED" and r.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert r.info.artifact_uri.startswith("mlflow-artifacts:")
        assert "final/test_acc" in r.data.metrics
        p = Path(c.download_artifacts(r.info.run_id, "adapter", str(dl / r.info.run_id)))
        assert (p / "adapter.safetensors").stat().st_size > 0
        assert {"config.yaml", "provenance.json"} <= {a.path for a in c.list_artifacts(r.info.run_id)}
    assert {"spec.yaml", "trials.json", "report"} <= {a.path for a in c.list_artifacts(parent.info.run_id)}
    rep = Path(c.download_artifacts(parent.info.run_id, "report", str(dl / "parent")))
    assert (rep / "report.html").stat().st_size > 0 and (rep / "results.csv").is_file()
    # no artifact store on the driver's disk: the runs root holds Tune's state and the report folder only
    assert not (run_root / "mlflow.db").exists()
    assert not [p for p in tmp_path.rglob("*") if p.name in ("mlruns", "mlartifacts")]

    # `harness report --tracking-uri http://...` regenerates the report from the server
    out_dir = tmp_path / "again"
    t1 = time.monotonic()
    rp = subprocess.run(
        [sys.executable, "-m", "harness.cli", "report", "--sweep", "smoke", "--tracking-uri", server.uri]
        + ["--out", str(out_dir)],
        cwd=tmp_path,
        env={**env, "MLFLOW_TRACKING_URI": ""},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert rp.returncode == 0, (rp.stdout + rp.stderr)[-3000:]
    assert (out_dir / "report.html").is_file() and "2/2 trials FINISHED" in rp.stdout, rp.stdout
    assert f"logged to parent run {parent.info.run_id}" in rp.stdout, rp.stdout
    print(f"smoke sweep over HTTP: {t_sweep:.0f}s; harness report over HTTP: {time.monotonic() - t1:.1f}s")
