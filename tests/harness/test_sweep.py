"""`harness sweep` / `harness validate SPEC.yaml`: every shipped spec composes; the dry-run table; and (marker `ray`)
a tiny sweep on a local Ray cluster killed mid-way and resumed, and a 2-worker TorchTrainer trial on CPU (gloo)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.cli import main as cli_main
from harness.compose import compose
from harness.sweep_cmd import plan, trial_table

ROOT = Path(__file__).resolve().parents[2]
SWEEPS = sorted((ROOT / "sweeps").glob("*.yaml"))
SMOKE = ROOT / "sweeps" / "smoke.yaml"


def test_sweeps_are_shipped():
    names = {p.stem for p in SWEEPS}
    assert {
        "expert_vs_length",
        "data_scaling",
        "routing",
        "importance_loss",
        "prompt_ablation",
        "baselines",
        "smoke",
    } <= names


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
def test_every_shipped_sweep_validates(path, capsys):
    """Every trial of the default (embedded) profile composes and validates; paths are not required to exist."""
    assert cli_main(["validate", str(path), "--no-path-check"]) == 0
    out = capsys.readouterr().out
    assert f"sweep {path.stem}-" in out


@pytest.mark.parametrize("path", [p for p in SWEEPS if p.stem != "smoke"], ids=lambda p: p.stem)
def test_paper_profile_validates(path):
    """One documented override switches each sweep to the paper scale (Swin-B + BERT-base, GPUs)."""
    spec, trials = plan(str(path), ["profile=paper"], check_paths=False)
    assert spec.resources.gpus_per_worker >= 1
    cfg = trials[0]["cfg"]
    assert cfg["vision"]["kind"] == "timm_swin" and cfg["text"]["name"].endswith("bert-base-uncased")
    assert cfg["trainer"]["max_steps_per_epoch"] is None and cfg["trainer"]["epochs"] == 15
    if path.stem == "ris":  # Table 7: RefCOCO at paper scale, RefCOCO+ by the same data override
        assert cfg["data"]["name"] == "refcoco" and cfg["data"]["task"] == "segmentation"
        plus = plan(str(path), ["profile=paper", "data=refcoco_plus"], check_paths=False)[1][0]["cfg"]
        assert plus["data"]["name"] == "refcoco+" and plus["vision"]["name"].endswith("_384")
        return
    mm = plan(str(path), ["profile=paper", "data=mmimdb"], check_paths=False)[1][0]["cfg"]
    assert mm["data"]["name"] == "mmimdb" and mm["data"]["task"] == "multi_label"


def test_data_scaling_mustard_profile_is_text_main_with_audio_and_video():
    spec, trials = plan(str(ROOT / "sweeps" / "data_scaling.yaml"), ["profile=mustard"], check_paths=False)
    assert len(trials) == 4 * 3 * 3  # shots x {mope, vanilla, promptfuse} x seeds
    cfg = trials[0]["cfg"]
    assert cfg["data"]["name"] == "mustard" and cfg["data"]["shots_stratified"] is True
    assert cfg["model"]["main"] == "text" and cfg["model"]["complementary"] == ["audio", "video"]
    assert cfg["audio"]["kind"] == "hf_wav2vec2" and cfg["video"]["kind"] == "timm_vit"
    assert {t["cfg"]["method"]["name"] for t in trials} == {"mope", "vanilla_prompt", "promptfuse"}
    assert sorted({t["cfg"]["data"]["shots"] or 0 for t in trials}) == [0, 32, 64, 128]


def test_expert_vs_length_pairs_each_k():
    spec, trials = plan(str(ROOT / "sweeps/expert_vs_length.yaml"), check_paths=False)
    assert len(trials) == 3 * 2 * 3 and spec.seeds == [0, 1, 2]  # the default profile: k in {8, 4, 2}, 3 seeds
    van = {
        t["cfg"]["mope"]["num_experts"]: t["cfg"]["model"]["vanilla_prompt_len"]
        for t in trials
        if t["arm"] == "vanilla"
    }
    assert van == {2: 19, 4: 31, 8: 55}
    assert all(t["cfg"]["trainer"]["max_steps_per_epoch"] == 75 and t["cfg"]["trainer"]["epochs"] == 2 for t in trials)
    paper = plan(str(ROOT / "sweeps/expert_vs_length.yaml"), ["profile=paper"], check_paths=False)[1]
    assert {t["cfg"]["model"]["vanilla_prompt_len"] for t in paper if t["arm"] == "vanilla"} == {19, 31, 55, 103, 199}
    for t in trials:
        cfg = t["cfg"]
        assert cfg["method"]["name"] == ("mope" if t["arm"] == "mope" else "vanilla_prompt")
        assert cfg["mope"]["prompt_len"] == 6 and cfg["seed"] == t["seed"] and cfg["run_name"] == t["run_name"]
        assert cfg["trainer"]["threads"] == 1 and cfg["tracking"]["experiment"] == "mope-expert-vs-length"
    assert len({t["run_name"] for t in trials}) == len(trials)


def test_seed_only_changes_seed_and_run_name():
    """plan() composes one config per point and copies it per seed: guard that nothing else depends on the seed."""
    a = compose(["experiment=demo_mope", "seed=0", "run_name=x"])
    b = compose(["experiment=demo_mope", "seed=7", "run_name=y"])
    for k in ("seed", "run_name", "overrides"):
        a.pop(k), b.pop(k)
    assert a == b


def test_dry_run_prints_the_trial_table(capsys):
    assert cli_main(["sweep", str(ROOT / "sweeps/expert_vs_length.yaml"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert any(line.startswith("sweep expert_vs_length-") for line in lines)
    table = lines[lines.index(next(line for line in lines if line.startswith("#  "))) :]
    assert len(table) == 2 + 18
    assert "model.vanilla_prompt_len" in table[0] and "point_id" in table[0]
    row = next(line for line in table if "vanilla_prompt_len55-s2" in line)
    assert " 55 " in row and " 8 " in row


def test_trial_table_columns():
    trials = [{"index": 0, "arm": None, "values": {"a": 1.5}, "seed": 0, "point_id": "p", "run_name": "r"}]
    assert trial_table(trials)[0].split() == ["#", "arm", "a", "seed", "point_id", "run_name"]


def test_bad_spec_is_named(tmp_path, capsys):
    p = tmp_path / "bad.yaml"
    p.write_text(
        "name: bad\nexperiment: demo_mope\naxes: {mope.num_experts: [2]}\n"
        "arms: {v: {method: vanilla_prompt, model.vanilla_prompt_len: '=mope.prompt_len * nope'}}\n"
    )
    assert cli_main(["validate", str(p), "--no-path-check"]) == 2
    assert "unknown name 'nope'" in capsys.readouterr().err
    p.write_text("name: bad\nexperiment: demo_mope\naxes: {mope.routing: [sparse]}\n")
    assert cli_main(["sweep", str(p), "--dry-run"]) == 2
    assert "mope.routing" in capsys.readouterr().err


def test_progress_lines_eta():
    from harness.sweep_runs import progress_lines

    rows = [
        {"label": "a", "seed": 0, "state": "TERMINATED", "epoch": 1, "epochs": 2, "metric": 0.61, "duration": 100.0},
        {
            "label": "b",
            "seed": 0,
            "state": "RUNNING",
            "epoch": 0,
            "epochs": 2,
            "metric": 0.5,
            "frac": 0.5,
            "running_for": 50.0,
        },
        {"label": "c", "seed": 0, "state": "PENDING", "epoch": None, "epochs": 2, "metric": None},
    ]
    lines = progress_lines(rows, sweep_id="s-1", objective="objective", concurrency=2, elapsed=150)
    assert "done 1/3" in lines[0] and "running 1" in lines[0] and "pending 1" in lines[0]
    assert "ETA 1m15s" in lines[0]  # (100*0.5 + 100) / 2
    assert "2/2" in lines[2] and "0.6100" in lines[2] and "1/2" in lines[3] and "-/2" in lines[4]


# -- Ray integration (marker `ray`: in the default run; alone: `pytest -m ray tests/harness/test_sweep.py`) -----------
@pytest.fixture(scope="module")
def small_demo(tmp_path_factory) -> Path:
    """A small demo build (512/128/128 pairs, tiny encoder) as MOPE_DATA_ROOT/demo."""
    from datasets_prep.demo import DemoConfig, build_demo
    from datasets_prep.pretrain_vision import PretrainConfig

    root = tmp_path_factory.mktemp("sweepdata")
    build_demo(
        root / "demo",
        DemoConfig(
            train_pairs=512,
            val_pairs=128,
            test_pairs=128,
            pretrain=PretrainConfig(
                embed_dim=32,
                depth=2,
                num_heads=2,
                epochs=1,
                grids_per_epoch=256,
                val_grids=64,
                batch_size=64,
                threads=1,
            ),
        ),
        shard_size=32,
    )
    return root


def _env(data_root: Path, run_root: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env.update(MOPE_DATA_ROOT=str(data_root), MOPE_RUN_ROOT=str(run_root), HF_HUB_OFFLINE="1", **extra)
    return env


def _sweep_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "harness.cli", "sweep", str(SMOKE), "--progress-every", "5", *args]


def _runs(run_root: Path, experiment: str = "mope-smoke"):
    from mlflow.tracking import MlflowClient

    db = run_root / "mlflow.db"
    if not db.is_file():
        return []
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    exp = client.get_experiment_by_name(experiment)
    return [] if exp is None else client.search_runs([exp.experiment_id], max_results=1000)


def _children(runs):
    return [r for r in runs if r.data.tags.get("harness.role") == "trial"]


@pytest.mark.slow
def test_driver_prepares_fewshot_subsets(small_demo):
    """Trials with `data.shots` read nested subset manifests: the driver writes them before launching."""
    from datasets_prep.fewshot import read_fewshot
    from harness.launch import prepare_shared_inputs

    cfgs = [
        compose(
            ["experiment=demo_mope", f"paths.data_root={small_demo}", "data.auto_prepare=false", f"data.shots={n}"]
        )
        for n in (16, 64, 16)
    ]
    prepare_shared_inputs(cfgs)
    big = read_fewshot(small_demo / "demo" / "train", 64, 0)  # raises when missing or stale
    small = read_fewshot(small_demo / "demo" / "train", 16, 0)
    assert len(big["keys"]) == 64 and set(small["keys"]) <= set(big["keys"])


@pytest.mark.ray
@pytest.mark.timeout(900)
def test_sweep_killed_midway_resumes_without_rerun_or_duplicates(small_demo, tmp_path):
    run_root = tmp_path / "runs"
    env = _env(small_demo, run_root)
    log1 = (tmp_path / "first.log").open("w")
    # one trial at a time, so that killing after the first one finished leaves the second one mid-way
    proc = subprocess.Popen(
        _sweep_cmd("--num-cpus", "1"),
        cwd=tmp_path,
        env=env,
        stdout=log1,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    first = None
    try:
        deadline = time.time() + 600
        while time.time() < deadline and proc.poll() is None:
            time.sleep(2)
            # read MLflow only once the driver has created its store (two processes creating the schema race)
            if "MLflow parent run" not in (tmp_path / "first.log").read_text():
                continue
            done = [r for r in _children(_runs(run_root)) if r.info.status == "FINISHED"]
            if done:
                first = done[0]
                break
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the driver, its local Ray cluster and the trial processes
        proc.wait(timeout=60)
        log1.close()
    assert first is not None, (tmp_path / "first.log").read_text()[-3000:]
    assert len(_children(_runs(run_root))) <= 2
    first_dir = Path(run_root, first.data.tags["mlflow.runName"])
    ckpt_mtimes = {p: p.stat().st_mtime for p in first_dir.rglob("*") if p.is_file()}
    assert ckpt_mtimes

    second = subprocess.run(
        _sweep_cmd(), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False
    )
    out = second.stdout + second.stderr
    assert second.returncode == 0, out[-4000:]
    assert "2/2 trials FINISHED" in out and "resuming" in out
    # the sweep ends with its report (harness report), written under the run root and named on the console
    reports = list((run_root / "reports").glob("smoke-*/report.html"))
    assert len(reports) == 1 and str(reports[0]) in out, out[-3000:]
    with (reports[0].parent / "results.csv").open() as f:
        assert sum(1 for _ in f) == 3  # header + one row per trial

    runs = _runs(run_root)
    children = _children(runs)
    keys = [r.data.tags["harness.trial_key"] for r in children]
    assert len(keys) == 2 and len(set(keys)) == 2, keys  # one child run per trial, none duplicated
    assert all(r.info.status == "FINISHED" for r in children)
    parents = [r for r in runs if r.data.tags.get("harness.role") == "sweep"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parents[0].info.run_id}
    # the trial that had finished was not re-run: same run, untouched end time and checkpoints
    again = next(r for r in children if r.info.run_id == first.info.run_id)
    assert again.info.end_time == first.info.end_time
    assert {p: p.stat().st_mtime for p in first_dir.rglob("*") if p.is_file()} == ckpt_mtimes
    # and Tune has exactly one trial directory per trial
    exp_dirs = [d for d in (run_root / "ray").iterdir() if d.is_dir()]
    assert len(exp_dirs) == 1
    assert len([d for d in exp_dirs[0].iterdir() if d.is_dir()]) == 2
    ends = {r.info.run_id: r.info.end_time for r in children}
    # a third run finds everything finished and runs nothing
    third = subprocess.run(
        _sweep_cmd(), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert third.returncode == 0 and "2/2 trials FINISHED" in third.stdout, third.stdout[-3000:]
    # without Tune's state (lost storage, or a crash before Tune saved it), the MLflow child runs' FINISHED status
    # is the second line of defence: Tune schedules the trials again, they see their runs and do not train
    shutil.rmtree(exp_dirs[0])
    fourth = subprocess.run(
        _sweep_cmd(), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert fourth.returncode == 0 and "2/2 trials FINISHED" in fourth.stdout, fourth.stdout[-3000:]
    assert fourth.stdout.count("SKIPPED") >= 2
    children = _children(_runs(run_root))
    assert {r.info.run_id: r.info.end_time for r in children} == ends
    assert {p: p.stat().st_mtime for p in first_dir.rglob("*") if p.is_file()} == ckpt_mtimes


@pytest.mark.slow  # ~55-75 s on 2 cores (CI's machine ~2x that): run with -m slow
@pytest.mark.ray
@pytest.mark.timeout(900)
def test_two_worker_torchtrainer_trial_trains_on_disjoint_data(small_demo, tmp_path):
    run_root, keys_dir = tmp_path / "runs", tmp_path / "keys"
    env = _env(small_demo, run_root, HARNESS_SAMPLE_LOG_DIR=str(keys_dir))
    # the smoke sweep's `two_workers` profile, limited to its MoPE point via a constraint-free override of the arms
    spec = tmp_path / "two.yaml"
    import yaml

    data = yaml.safe_load(SMOKE.read_text())
    data["arms"] = {"mope": {"method": "mope"}}
    spec.write_text(yaml.safe_dump(data))
    cmd = [sys.executable, "-m", "harness.cli", "sweep", str(spec), "profile=two_workers", "--num-cpus", "2"]
    res = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=800, check=False)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-4000:]
    assert "1/1 trials FINISHED" in out and "Ray Train TorchTrainer" in out
    files = sorted(keys_dir.glob("*.keys"))
    assert [f.name.rsplit(".", 2)[1] for f in files] == ["rank0", "rank1"]
    seen = [[line.split() for line in f.read_text().splitlines()] for f in files]
    # both ranks trained the same number of full batches (2 epochs x 3 steps), on disjoint samples
    assert len(seen[0]) == len(seen[1]) == 6
    assert all(len(b) == 16 for batches in seen for b in batches)
    rank0 = {k for b in seen[0] for k in b}
    rank1 = {k for b in seen[1] for k in b}
    assert rank0 and rank1 and not (rank0 & rank1)
    children = _children(_runs(run_root))
    assert len(children) == 1 and children[0].info.status == "FINISHED"
    assert "final/test_acc" in children[0].data.metrics
    assert json.loads(children[0].data.tags["harness.axes"]) == {"mope.num_experts": 2, "method": "mope"}


def test_progress_row_shows_a_failed_trial_and_its_cause():
    from harness.sweep_runs import progress_lines

    rows = [
        {
            "label": "a",
            "seed": 0,
            "state": "TERMINATED",
            "epoch": None,
            "epochs": 2,
            "metric": float("nan"),
            "duration": 3.0,
            "status": "failed: ValueError: trainer.min_steps_per_epoch=9 > ...",
        },
        {"label": "b", "seed": 0, "state": "TERMINATED", "epoch": 1, "epochs": 2, "metric": 0.6, "duration": 9.0},
    ]
    lines = progress_lines(rows, sweep_id="s-1", objective="objective", concurrency=2, elapsed=10)
    assert "errors 1" in lines[0] and "done 2/2" in lines[0]
    assert "FAILED" in lines[2] and "min_steps_per_epoch" in lines[2] and "FAILED" not in lines[3]


def test_deterministic_failures_are_classified():
    from harness.launch import is_deterministic_failure
    from harness.recipe import TrainingDiverged

    assert is_deterministic_failure(TrainingDiverged("nan at step 3"))
    assert is_deterministic_failure(ValueError("trainer.min_steps_per_epoch=9 > trainer.max_steps_per_epoch=3"))
    assert is_deterministic_failure(FileNotFoundError("shard"))
    assert not is_deterministic_failure(RuntimeError("worker died"))
    assert not is_deterministic_failure(MemoryError())
    assert not is_deterministic_failure(KeyboardInterrupt())


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_deterministic_trial_failure_fails_fast_with_its_cause(small_demo, tmp_path):
    """A configuration error inside a trial (passes spec validation, raises in the worker) is not retried: the trial
    row says FAILED with the cause, the MLflow child is FAILED with harness.error, the other trial still finishes."""
    spec = tmp_path / "bad.yaml"
    spec.write_text(
        SMOKE.read_text()
        .replace("name: smoke", "name: smoke_bad")
        .replace(
            "  vanilla:\n    method: vanilla_prompt\n",
            "  vanilla:\n    method: vanilla_prompt\n    trainer.min_steps_per_epoch: 9\n",
        )
    )
    run_root = tmp_path / "runs"
    proc = subprocess.run(
        [sys.executable, "-m", "harness.cli", "sweep", str(spec), "--progress-every", "5", "--no-report"],
        cwd=tmp_path,
        env=_env(small_demo, run_root),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-3000:]
    assert "retrying" not in out, out[-3000:]  # Tune's on_trial_recover never fired
    assert "vanilla-num_experts2-vanilla_prompt_len19-s0 FAILED: ValueError: trainer.min_steps_per_epoch=9" in out
    assert "1/2 trials FINISHED" in out
    children = _children(_runs(run_root))
    assert len(children) == 2
    bad = next(
        r
        for r in children
        if r.data.tags.get("harness.arm") == "vanilla" or "vanilla" in r.data.tags.get("mlflow.runName", "")
    )
    assert bad.info.status == "FAILED" and "min_steps_per_epoch" in bad.data.tags["harness.error"]
    assert sum(r.info.status == "FINISHED" for r in children) == 1


@pytest.mark.parametrize("stop", [SystemExit(0), KeyboardInterrupt()], ids=["ray_stops_trial", "ctrl_c"])
def test_a_trial_stopped_by_ray_or_ctrl_c_is_killed_not_failed(monkeypatch, stop):
    """Ray stops a trial's actor with SystemExit(0) when the sweep is interrupted: its child run is KILLED (resumable)
    without a harness.error tag, not FAILED with 'SystemExit: 0' (seen on an interrupted data_scaling sweep)."""
    import harness.launch as launch
    import harness.recipe as recipe

    seen: dict = {}

    class Tracker:
        def set_tags(self, tags):
            seen.setdefault("tags", []).append(tags)

        def finish(self, status):
            seen["status"] = status

    def interrupted(*a, **kw):
        raise stop

    monkeypatch.setattr(recipe, "open_tracker", lambda *a, **kw: Tracker())
    monkeypatch.setattr(recipe, "train", interrupted)
    monkeypatch.setattr(launch, "finished_child_metrics", lambda cfg, key: None)
    monkeypatch.setattr(launch, "_restore", lambda *a, **kw: None)  # Ray's checkpoint and node: none outside Ray
    trial = {
        "cfg": {"trainer": {"epochs": 2}},
        "trial_key": "s/p/0",
        "sweep_id": "s",
        "point_id": "p",
        "seed": 0,
        "arm": "mope",
        "label": "mope",
        "values": {},
    }
    config = {
        "trial": trial,
        "objective": {"metric": "objective"},
        "resources": {"workers": 1},
        "parent_run_id": "parent",
        "spec_hash": "h",
    }
    with pytest.raises(type(stop)):
        launch.run_trial(config)
    assert seen == {"status": "KILLED"}
