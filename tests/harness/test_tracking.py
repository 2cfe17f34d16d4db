"""MLflow tracking on a SQLite store in a temp dir: parent/child runs, resume by trial key, immutable params,
metric histories, artifacts, and the no-op tracker for other ranks."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from harness.tracking import (
    PARENT_RUN_TAG,
    TRIAL_KEY_TAG,
    MLflowTracker,
    NoopTracker,
    ParamConflictError,
    Tracker,
    default_artifact_location,
    default_tracking_uri,
    flatten_config,
    make_tracker,
)

CONFIG = {
    "model": {"method": "mope", "mope": {"num_experts": 4, "prompt_len": 2}},
    "trainer": {"lr": {"vision": 4e-4, "text": 5e-4}, "milestones": [3, 6], "precision": None},
    "data": {"name": "demo", "shards": [{"split": "train", "n": 10}]},
}


@pytest.fixture(scope="module")
def _template_db(tmp_path_factory) -> Path:
    """Creating MLflow's SQLite schema takes seconds (migrations): do it once, copy the file per test."""
    d = tmp_path_factory.mktemp("mlflow-template")
    from mlflow.tracking import MlflowClient

    MlflowClient(tracking_uri=f"sqlite:///{d / 'mlflow.db'}").search_experiments()
    return d / "mlflow.db"


@pytest.fixture
def uri(tmp_path, _template_db, monkeypatch) -> str:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    shutil.copy(_template_db, tmp_path / "mlflow.db")
    u = default_tracking_uri(tmp_path)
    assert u == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    return u


def test_flatten_config():
    flat = flatten_config(CONFIG)
    assert flat == {
        "model.method": "mope",
        "model.mope.num_experts": "4",
        "model.mope.prompt_len": "2",
        "trainer.lr.vision": "0.0004",
        "trainer.lr.text": "0.0005",
        "trainer.milestones": "[3, 6]",
        "trainer.precision": "None",
        "data.name": "demo",
        "data.shards.0.split": "train",
        "data.shards.0.n": "10",
    }
    assert flatten_config({"x": "a" * 7000})["x"] == "a" * 6000  # MLflow's param value limit
    assert flatten_config({"empty": {}}) == {"empty": "{}"}


def test_flatten_omegaconf_resolves():
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"a": 1, "b": {"c": "${a}"}})
    assert flatten_config(cfg) == {"a": "1", "b.c": "1"}


def test_default_uri_honours_env(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    assert default_tracking_uri(tmp_path) == "http://mlflow.example:5000"
    assert default_artifact_location("http://mlflow.example:5000") is None
    assert default_artifact_location(f"sqlite:///{tmp_path}/x/mlflow.db") == (tmp_path / "x" / "mlartifacts").as_uri()


def test_parent_child_metrics_artifacts(uri, tmp_path):
    parent = MLflowTracker.open(uri, "mope-test", "sweep", "sweep-abc", tags={"harness.sweep_id": "sweep-abc"})
    child = MLflowTracker.open(
        uri,
        "mope-test",
        "trial-0",
        "sweep-abc/p0/0",
        parent_run_id=parent.run_id,
        params=CONFIG,
        tags={"harness.seed": 0},
    )
    assert isinstance(child, Tracker) and not child.resumed
    for step in (1, 2, 5):
        child.log_metrics({"train/loss": 1.0 / step, "train/acc": step / 10}, step=step)
    many = {f"routing/expert_{i}": float(i) for i in range(1200)}  # > MLflow's 1000 per batch
    child.log_metrics(many, step=5)
    child.log_dict({"a": 1}, "config/resolved.yaml")
    (tmp_path / "prov.json").write_text("{}")
    child.log_artifact(tmp_path / "prov.json")
    adir = tmp_path / "adapter"
    adir.mkdir()
    (adir / "adapter.safetensors").write_bytes(b"x")
    child.log_artifact(adir, "adapter")
    child.finish("FINISHED")
    parent.finish("FINISHED")

    c = child.client
    exp = c.get_experiment_by_name("mope-test")
    assert exp.artifact_location == (tmp_path.resolve() / "mlartifacts").as_uri()  # absolute, beside the db
    children = c.search_runs([exp.experiment_id], f"tags.`{PARENT_RUN_TAG}` = '{parent.run_id}'")
    assert [r.info.run_id for r in children] == [child.run_id]
    run = c.get_run(child.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "trial-0"
    assert run.data.tags[TRIAL_KEY_TAG] == "sweep-abc/p0/0" and run.data.tags["harness.seed"] == "0"
    assert run.data.params == flatten_config(CONFIG)
    hist = c.get_metric_history(child.run_id, "train/loss")
    assert sorted((m.step, m.value) for m in hist) == [(1, 1.0), (2, 0.5), (5, 0.2)]
    assert run.data.metrics["routing/expert_1199"] == 1199.0
    top = {f.path for f in c.list_artifacts(child.run_id)}
    assert top == {"config", "prov.json", "adapter"}
    assert [f.path for f in c.list_artifacts(child.run_id, "adapter")] == ["adapter/adapter.safetensors"]
    files = list((tmp_path / "mlartifacts").rglob("adapter.safetensors"))
    assert len(files) == 1


def test_resume_by_trial_key(uri):
    first = MLflowTracker.open(uri, "exp", "t", "k/p/0", params=CONFIG)
    first.log_metrics({"loss": 2.0}, step=1)
    first.finish("FAILED")
    again = MLflowTracker.open(uri, "exp", "t", "k/p/0", params=CONFIG)
    assert again.run_id == first.run_id and again.resumed
    c = again.client
    assert c.get_run(again.run_id).info.status == "RUNNING"
    again.log_metrics({"loss": 1.5}, step=1)  # the retried step: same x position, both values kept in the history
    again.log_metrics({"loss": 1.0}, step=2)
    exp = c.get_experiment_by_name("exp")
    runs = c.search_runs([exp.experiment_id], f"tags.`{TRIAL_KEY_TAG}` = 'k/p/0'")
    assert len(runs) == 1
    assert sorted((m.step, m.value) for m in c.get_metric_history(again.run_id, "loss")) == [
        (1, 1.5),
        (1, 2.0),
        (2, 1.0),
    ]
    other = MLflowTracker.open(uri, "exp", "t", "k/p/1", params=CONFIG)  # another seed: another run
    assert other.run_id != first.run_id


def test_resume_with_changed_params_raises(uri):
    MLflowTracker.open(uri, "exp", "t", "k/p/0", params=CONFIG).finish("FAILED")
    changed = {**CONFIG, "trainer": {**CONFIG["trainer"], "milestones": [4, 8]}}
    with pytest.raises(ParamConflictError, match=r"trainer\.milestones: stored '\[3, 6\]', now '\[4, 8\]'"):
        MLflowTracker.open(uri, "exp", "t", "k/p/0", params=changed)
    dropped = {k: v for k, v in CONFIG.items() if k != "data"}
    with pytest.raises(ParamConflictError, match=r"only in the stored run: \['data.name'"):
        MLflowTracker.open(uri, "exp", "t", "k/p/0", params=dropped)
    # log_params after the fact: same values are fine, a changed one is refused
    tr = MLflowTracker.open(uri, "exp", "t", "k/p/0", params=CONFIG)
    tr.log_params({"model": {"method": "mope"}, "extra_key": 1})
    with pytest.raises(ParamConflictError, match="model.method"):
        tr.log_params({"model": {"method": "late_concat"}})


def test_context_manager_sets_failed(uri):
    with pytest.raises(RuntimeError), MLflowTracker.open(uri, "exp", "t", "k/boom") as tr:
        raise RuntimeError("loss is NaN at step 3")
    assert tr.client.get_run(tr.run_id).info.status == "FAILED"
    with pytest.raises(ValueError, match="status"):
        tr.finish("DONE")


def test_make_tracker_rank_zero_only(uri):
    kw = dict(tracking_uri=uri, experiment="exp", run_name="t", trial_key="k/r")
    nt = make_tracker(1, **kw)
    assert isinstance(nt, NoopTracker) and isinstance(nt, Tracker) and nt.run_id is None
    nt.log_params(CONFIG)
    nt.log_metrics({"a": 1.0}, step=0)
    nt.log_artifact("/nonexistent")
    nt.log_dict({}, "x.json")
    nt.set_tags({"a": 1})
    nt.finish("KILLED")
    assert isinstance(make_tracker(0, **{**kw, "tracking_uri": None}), NoopTracker)
    t0 = make_tracker(0, **kw)
    assert isinstance(t0, MLflowTracker) and t0.run_id


def test_resume_clears_the_previous_attempts_error(uri):
    t = MLflowTracker.open(uri, "exp-err", "run", "k/err")
    t.set_tags({"harness.error": "RuntimeError: worker died"})
    t.finish("FAILED")
    again = MLflowTracker.open(uri, "exp-err", "run", "k/err")
    assert again.run_id == t.run_id
    run = again.client.get_run(again.run_id)
    assert run.info.status == "RUNNING" and "harness.error" not in run.data.tags


def test_trials_starting_together_log_the_same_dataset_inputs(uri):
    """Runs that start at the same moment log the same shards as inputs: MLflow's store checks for the dataset row,
    then inserts it, so concurrent loggers collide on its unique key; every run must still end up linked to it."""
    import threading

    from mlflow.tracking import MlflowClient

    n = 6
    trackers = [MLflowTracker.open(uri, "mope-test", f"trial-{i}", f"sweep-x/p/{i}") for i in range(n)]
    datasets = [
        {"name": f"demo/{sp}", "digest": f"{sp}-digest", "source": f"/data/demo/{sp}", "context": sp}
        for sp in ("train", "val", "test")
    ]
    gate, errors = threading.Barrier(n), []

    def log(t):
        gate.wait()
        try:
            t.log_datasets(datasets)
        except Exception as e:  # surfaced below with the run
            errors.append(e)

    threads = [threading.Thread(target=log, args=(t,)) for t in trackers]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    client = MlflowClient(uri)
    for t in trackers:
        names = sorted(d.dataset.name for d in client.get_run(t.run_id).inputs.dataset_inputs)
        assert names == ["demo/test", "demo/train", "demo/val"]
        t.finish()
