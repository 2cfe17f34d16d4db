"""Runs a sweep's trials on Ray Tune, tracked in MLflow as one parent run per sweep and one child run per trial.

Layers (``shared/docs/architecture.md`` §5, §10, pitfalls 6–11):

* :func:`run_sweep` (the driver, head node): ``ray.init`` (``$RAY_ADDRESS`` when set, else a local cluster), the MLflow
  parent run (tags ``harness.sweep_id``, ``harness.spec_hash``, ``harness.git_sha``; the spec YAML and the trial table
  as artifacts), then a ``tune.Tuner`` over ``grid_search`` of the planned trials, named ``sweep_id`` under
  ``<run_root>/ray``. An existing experiment directory of the same name is restored (``Tuner.restore(...,
  resume_errored=True)``): TERMINATED trials are not re-run, errored and unfinished ones are. Never ``fail_fast``
  (it makes an experiment unrestorable, ray#30584); a changed spec has another ``sweep_id`` and another directory.
* :func:`run_trial` (one Tune trial): skips a trial whose MLflow child run is already FINISHED (second line of
  defence after Tune's own state, e.g. when the driver was killed before it saved that the trial terminated), opens or
  resumes the child run by its ``harness.trial_key`` (a retried trial reuses its run), and trains with ``resume=true``
  so a restarted trial continues from its last epoch checkpoint. Single-worker trials run the worker in-process and
  report every evaluation with ``ray.tune.report``; multi-worker trials run it through a Ray Train ``TorchTrainer``
  (Ray owns the process group; DeepSpeed reuses it) with ``TuneReportCallback`` forwarding rank 0's reports.
* :class:`ProgressTable`: a Tune callback printing the trial table (state, epoch, objective) and an ETA.

Only plain dicts cross Ray boundaries: every trial's configuration is composed and validated on the driver, with
absolute paths and an explicit tracking URI (trials run in other processes and directories).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from harness import faults

log = logging.getLogger("harness.launch")

SWEEP_TAG = "harness.sweep_id"
SKIPPED_KEY = "harness/skipped"
FINISHED_KEY = "harness/finished"
STATUS_KEY = "harness/status"
OBJECTIVE_KEY = "objective"
DRIVER_RESOURCE = "harness_trial_driver"


# -- MLflow: parent and child runs ------------------------------------------------------------------------------------
def tracking_target(cfg: dict[str, Any]) -> tuple[str, str]:
    """(tracking URI, experiment name) of a composed trial config (the URI resolved now, on the driver)."""
    from harness.tracking import default_tracking_uri

    t = cfg["tracking"]
    return t.get("uri") or default_tracking_uri(cfg["paths"]["run_root"]), t["experiment"]


def child_tags(trial: dict[str, Any], spec_hash: str) -> dict[str, Any]:
    return {
        SWEEP_TAG: trial["sweep_id"],
        "harness.spec_hash": spec_hash,
        "harness.point_id": trial["point_id"],
        "harness.seed": trial["seed"],
        "harness.arm": trial["arm"] or "",
        "harness.label": trial["label"],
        "harness.axes": json.dumps(trial["values"], sort_keys=True, default=str),
        "harness.role": "trial",
    }


def open_parent_run(spec, cfg: dict[str, Any], trials: list[dict[str, Any]]):
    """Creates or resumes the sweep's parent run (found by trial key ``sweep/<sweep_id>``) and logs the spec."""
    import yaml

    from harness.provenance import git_info
    from harness.tracking import MLflowTracker, flatten_config

    uri, experiment = tracking_target(cfg)
    git = git_info()
    tracker = MLflowTracker.open(
        uri, experiment, run_name=spec.sweep_id, trial_key=f"sweep/{spec.sweep_id}",
        tags={SWEEP_TAG: spec.sweep_id, "harness.spec_hash": spec.spec_hash, "harness.spec_name": spec.name,
              "harness.profile": spec.profile or "", "harness.git_sha": git.get("sha") or "",
              "harness.git_dirty": str(git.get("dirty")), "harness.role": "sweep",
              "harness.num_trials": len(trials), "harness.resources": json.dumps(spec.resources.__dict__)},
        params=flatten_config({"spec": spec.normalized(), "profile": spec.profile or "none"}),
    )
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "spec.yaml"
        p.write_text(yaml.safe_dump(spec.raw, sort_keys=False))
        tracker.log_artifact(str(p))
    tracker.log_dict({"summary": spec.summary(), "normalized": spec.normalized()}, "spec_resolved.json")
    tracker.log_dict([{k: v for k, v in t.items() if k != "cfg"} for t in trials], "trials.json")
    return tracker


def _client_and_experiment(cfg: dict[str, Any]):
    from mlflow.tracking import MlflowClient

    uri, experiment = tracking_target(cfg)
    client = MlflowClient(tracking_uri=uri)
    return client, client.get_experiment_by_name(experiment)


def finished_child_metrics(cfg: dict[str, Any], trial_key: str) -> dict[str, float] | None:
    """The latest metrics of this trial's child run when it is FINISHED, else None."""
    from harness.tracking import TRIAL_KEY_TAG

    client, exp = _client_and_experiment(cfg)
    if exp is None:
        return None
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`{TRIAL_KEY_TAG}` = '{trial_key}'",
                              max_results=10)
    for r in runs:
        if r.info.status == "FINISHED":
            return dict(r.data.metrics)
    return None


def sweep_children(cfg: dict[str, Any], sweep_id: str) -> list[Any]:
    """All child runs of a sweep (any status)."""
    client, exp = _client_and_experiment(cfg)
    if exp is None:
        return []
    runs, token = [], None
    while True:
        page = client.search_runs([exp.experiment_id], filter_string=f"tags.`{SWEEP_TAG}` = '{sweep_id}' and "
                                  f"tags.`harness.role` = 'trial'", max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


# -- one trial --------------------------------------------------------------------------------------------------------
def selection_metric(cfg: dict[str, Any]) -> str:
    """The worker's model-selection metric: ``val/acc_best`` (single-label) or ``val/f1_micro_best`` (multi-label).
    Reported to Tune also as ``objective``, the default objective of a spec, so a spec works for every dataset."""
    return "val/f1_micro_best" if cfg["data"]["task"] == "multi_label" else "val/acc_best"


def _tune_metrics(m: dict[str, Any], cfg: dict[str, Any]) -> dict[str, Any]:
    out = {k: float(v) for k, v in m.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    out["epochs"] = float(cfg["trainer"]["epochs"])
    out[OBJECTIVE_KEY] = out.get(selection_metric(cfg), float("nan"))
    return out


def _final_metrics(summary: dict[str, Any], cfg: dict[str, Any]) -> dict[str, Any]:
    """The last report of a trial: the test metrics and the best validation value."""
    out = {k: float(v) for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
           and (k.startswith(("final/", "perf/")) or k == "step")}
    best = summary.get("best") or {}
    if isinstance(best, dict) and best.get("metric"):
        out[f"{best['metric']}_best"] = float(best["value"])
    epochs = int(cfg["trainer"]["epochs"])
    out = _tune_metrics(out, cfg)
    out.update({"epoch": float(epochs - 1), FINISHED_KEY: 1.0})
    return out


def _setup_trial_process(config: dict[str, Any] | None = None) -> None:
    if config and config.get("fault_inject"):
        os.environ[faults.ENV] = config["fault_inject"]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)


def run_trial(config: dict[str, Any]) -> None:
    """The Tune trainable: one trial (see the module docstring)."""
    from ray import tune

    _setup_trial_process(config)
    t = config["trial"]
    cfg = copy.deepcopy(t["cfg"])
    cfg["resume"] = True  # a restarted trial continues from its last epoch checkpoint
    objective = config["objective"]["metric"]
    epochs = int(cfg["trainer"]["epochs"])
    done = finished_child_metrics(cfg, t["trial_key"])
    if done is not None:
        log.info("trial %s: MLflow child run already FINISHED; not re-run", t["trial_key"])
        sel = selection_metric(cfg)
        done.setdefault(sel, done.get("final/" + sel.replace("/", "_"), float("nan")))  # final/val_acc_best
        m = _tune_metrics(done, cfg)
        m.setdefault(objective, float("nan"))
        tune.report({**m, "epoch": float(epochs - 1), SKIPPED_KEY: 1.0, FINISHED_KEY: 1.0})
        return
    if int(config["resources"]["workers"]) > 1:
        return _run_torchtrainer(config, cfg)

    from harness.train_cmd import open_tracker, run
    from harness.worker import TrainingDiverged

    tracker = open_tracker(cfg, rank=0, trial_key=t["trial_key"], parent_run_id=config["parent_run_id"],
                           tags=child_tags(t, config["spec_hash"]))

    def report(m: dict[str, Any]) -> None:
        tune.report(_tune_metrics(m, cfg))

    try:
        summary = run(cfg, rank=0, world_size=1, tracker=tracker, report=report)
    except (KeyboardInterrupt, SystemExit):  # Ctrl-C, or Ray stopping the trial (SystemExit 0): not a failure
        tracker.finish("KILLED")
        raise
    except BaseException as e:
        tracker.set_tags({"harness.error": f"{type(e).__name__}: {e}"[:5000]})
        tracker.finish("FAILED")
        if not is_deterministic_failure(e):
            raise  # a crash, OOM, lost node...: Tune retries it from the trial's last checkpoint
        # deterministic (diverged loss, bad configuration or input): a retry gives the same; end the trial now,
        # with the cause on the trial row and in MLflow (harness.error)
        cause = f"{type(e).__name__}: {e}".splitlines()[0][:300]
        tune.report({objective: float("nan"), OBJECTIVE_KEY: float("nan"), "epochs": float(epochs),
                     STATUS_KEY: ("diverged: " if isinstance(e, TrainingDiverged) else "failed: ") + cause})
        return
    tracker.finish("FINISHED" if summary.get("finished") else "KILLED")
    tune.report(_final_metrics(summary, cfg))


def is_deterministic_failure(e: BaseException) -> bool:
    """True for failures that a retry of the same trial reproduces exactly: a diverged loss, a configuration or
    input error (ConfigError, ValueError, TypeError, KeyError, a refused adapter/checkpoint, a missing file). Tune
    retries only the others (a killed worker, OOM, a lost node)."""
    from harness.checkpoint import CheckpointError
    from harness.compose import ConfigValidationError
    from harness.worker import TrainingDiverged
    from mope.config import ConfigError

    if isinstance(e, (KeyboardInterrupt, SystemExit, MemoryError)):
        return False
    return isinstance(e, (TrainingDiverged, ConfigError, ConfigValidationError, CheckpointError, ValueError,
                          TypeError, KeyError, FileNotFoundError, NotImplementedError))


# -- multi-worker trials: Ray Train TorchTrainer ----------------------------------------------------------------------
def _run_torchtrainer(config: dict[str, Any], cfg: dict[str, Any]) -> None:
    """One trial over `resources.workers` Ray Train workers. This Tune trial is only the driver: it owns the MLflow
    child run (created here, resumed by rank 0 through the same trial key, closed here with the right status)."""
    import ray.train
    from ray import tune
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    from harness.train_cmd import open_tracker

    t = config["trial"]
    res = config["resources"]
    tags = child_tags(t, config["spec_hash"])
    tracker = open_tracker(cfg, rank=0, trial_key=t["trial_key"], parent_run_id=config["parent_run_id"], tags=tags)
    gpus = float(res["gpus_per_worker"])
    per_worker = {"CPU": float(res["cpus_per_worker"])}
    if gpus:
        per_worker["GPU"] = gpus
    # Named from the Tune trial id, no timestamp: a restarted driver finds its Train run again (pitfall 6).
    trial_id = tune.get_context().get_trial_id()
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg, "trial": {k: v for k, v in t.items() if k != "cfg"},
                           "parent_run_id": config["parent_run_id"], "tags": tags,
                           "objective": config["objective"]["metric"],
                           "sample_log_dir": config.get("sample_log_dir"),
                           "fault_inject": config.get("fault_inject")},
        scaling_config=ray.train.ScalingConfig(num_workers=int(res["workers"]), use_gpu=gpus > 0,
                                               resources_per_worker=per_worker),
        run_config=ray.train.RunConfig(name=f"train-{trial_id}", storage_path=config["storage_path"],
                                       failure_config=ray.train.FailureConfig(max_failures=1),
                                       callbacks=[TuneReportCallback()]),
    )
    try:
        trainer.fit()
    except (KeyboardInterrupt, SystemExit):  # Ctrl-C, or Ray stopping the trial (SystemExit 0): not a failure
        tracker.finish("KILLED")
        raise
    except BaseException as e:
        tracker.set_tags({"harness.error": f"{type(e).__name__}: {e}"[:5000]})
        tracker.finish("FAILED")
        raise
    tracker.finish("FINISHED")


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """One Ray Train worker: rank/world size from the Train context; Ray has built the process group (gloo on CPU,
    nccl on GPU), which the worker's DeepSpeed engine reuses. Every rank reports every evaluation (Ray's report is a
    barrier); rank 0 logs to the child run."""
    import ray.train
    import torch

    from harness.train_cmd import open_tracker, run

    _setup_trial_process(config)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    cfg = copy.deepcopy(config["cfg"])
    cfg["resume"] = True
    if not torch.cuda.is_available():
        # DeepSpeed's CPU communication backend JIT-compiles a shared-memory all-reduce (~70 s of g++) on first use;
        # gloo through torch.distributed does the same job for the small prompt gradients.
        import importlib

        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    if config.get("sample_log_dir"):
        _record_train_keys(Path(config["sample_log_dir"]), f"{config['trial']['label']}-s{config['trial']['seed']}",
                           rank)
    t = config["trial"]
    tracker = open_tracker(cfg, rank=rank, trial_key=t["trial_key"], parent_run_id=config["parent_run_id"],
                           tags=config["tags"])
    summary = run(cfg, rank=rank, world_size=world, tracker=tracker,
                  report=lambda m: ray.train.report(_tune_metrics(m, cfg)))
    ray.train.report(_final_metrics(summary, cfg))


def _record_train_keys(out_dir: Path, name: str, rank: int) -> None:
    """Audit of the data split: every training batch's sample keys, one line per batch, ``<name>.rank<r>.keys``.

    Enabled by ``HARNESS_SAMPLE_LOG_DIR`` on the driver (tests check that ranks train on disjoint samples)."""
    import mope_data as data

    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.rank{rank}.keys"
    inner_make = data.make_train_loader

    class Recorder:
        def __init__(self, loader):
            self._loader = loader

        def set_epoch(self, epoch: int) -> None:
            self._loader.set_epoch(epoch)

        def __iter__(self):
            with path.open("a") as f:
                for batch in self._loader:
                    f.write(" ".join(batch["key"]) + "\n")
                    f.flush()
                    yield batch

        def __getattr__(self, name):
            return getattr(self._loader, name)

    def make(*args, **kw):
        loader, n = inner_make(*args, **kw)
        return Recorder(loader), n

    data.make_train_loader = make


# -- progress ---------------------------------------------------------------------------------------------------------
def _fmt_s(s: float | None) -> str:
    if s is None or not math.isfinite(s):
        return "?"
    s = round(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else (f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s")


def progress_lines(rows: list[dict[str, Any]], *, sweep_id: str, objective: str, concurrency: int,
                   elapsed: float) -> list[str]:
    """The progress table. Each row: label, seed, state, epoch (0-based, last reported), epochs, metric, start, end,
    duration (seconds, for finished trials), skipped."""
    final = ("TERMINATED", "ERROR")
    n_done = sum(r["state"] in final for r in rows)
    n_run = sum(r["state"] == "RUNNING" for r in rows)
    n_err = sum(r["state"] == "ERROR" or bool(r.get("status")) for r in rows)
    n_pend = len(rows) - n_done - n_run
    durs = [r["duration"] for r in rows if r["state"] == "TERMINATED" and r.get("duration") and not r.get("skipped")]
    est = sum(durs) / len(durs) if durs else None
    if est is None:  # from running trials' progress
        rates = [r["running_for"] / r["frac"] for r in rows if r["state"] == "RUNNING" and r.get("frac")]
        est = sum(rates) / len(rates) if rates else None
    eta = None
    if est is not None:
        left = sum(est * (1 - (r.get("frac") or 0.0)) for r in rows if r["state"] == "RUNNING") + est * n_pend
        eta = left / max(1, min(concurrency, n_run + n_pend)) if (n_run + n_pend) else 0.0
    head = (f"[{sweep_id}] {time.strftime('%H:%M:%S')}  elapsed {_fmt_s(elapsed)}  done {n_done}/{len(rows)}  "
            f"running {n_run}  pending {n_pend}  errors {n_err}  ETA {_fmt_s(eta) if n_done < len(rows) else '0s'}")
    w = max([len(r["label"]) for r in rows] + [5])
    lines = [head, f"  {'trial':<{w}}  seed  {'state':<10}  epoch  {objective:>14}  time"]
    for r in rows:
        ep = f"{int(r['epoch']) + 1}/{r['epochs']}" if r.get("epoch") is not None else f"-/{r['epochs']}"
        m = r.get("metric")
        ms = f"{m:.4f}" if isinstance(m, float) and math.isfinite(m) else "-"
        state = "SKIPPED" if r.get("skipped") else ("FAILED" if r.get("status") else r["state"])
        tm = _fmt_s(r.get("duration") if r["state"] in final else r.get("running_for"))
        cause = f"  {r['status']}" if r.get("status") else ""
        lines.append(f"  {r['label']:<{w}}  {r['seed']:>4}  {state:<10}  {ep:>5}  {ms:>14}  {tm}{cause}")
    return lines


def _make_progress_callback(sweep_id: str, objective: str, concurrency: int, every_s: float,
                            planned: list[tuple[str, int, int]], stream=None):
    from ray.tune import Callback

    class ProgressTable(Callback):
        """Prints the trial table (state, epoch, objective) and an ETA every `every_s` s and when a trial ends."""

        def __init__(self):
            self.sweep_id, self.objective, self.concurrency, self.every_s = sweep_id, objective, concurrency, every_s
            self.planned = list(planned)  # (label, seed, epochs) of every trial, Tune creates them lazily
            self._start: dict[str, float] = {}
            self._end: dict[str, float] = {}
            self._t0 = time.time()
            self._last = 0.0

        def __getstate__(self):  # pickled into the experiment state with the run config
            return {k: v for k, v in self.__dict__.items() if k in ("sweep_id", "objective", "concurrency",
                                                                     "every_s", "planned")}

        def __setstate__(self, state):
            self.__dict__.update(state)
            self._start, self._end, self._t0, self._last = {}, {}, time.time(), 0.0

        def setup(self, **info):
            self._t0 = time.time()

        def on_trial_start(self, iteration, trials, trial, **info):
            self._start[trial.trial_id] = time.time()

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._end[trial.trial_id] = time.time()
            self._print(trials)

        def on_trial_error(self, iteration, trials, trial, **info):
            self._end[trial.trial_id] = time.time()
            out = stream or sys.stdout
            print(f"[{self.sweep_id}] trial {trial.config['trial']['label']} s{trial.config['trial']['seed']} "
                  f"failed: {trial.error_file or ''}", file=out, flush=True)
            self._print(trials)

        def on_trial_recover(self, iteration, trials, trial, **info):
            out = stream or sys.stdout
            print(f"[{self.sweep_id}] trial {trial.config['trial']['label']} s{trial.config['trial']['seed']} "
                  f"failed; retrying from its last checkpoint ({trial.error_file or ''})", file=out, flush=True)

        def on_step_end(self, iteration, trials, **info):
            if time.time() - self._last >= self.every_s:
                self._print(trials)

        def on_experiment_end(self, trials, **info):
            self._print(trials)

        def _print(self, trials) -> None:
            now = time.time()
            self._last = now
            rows = []
            for tr in trials:
                t = tr.config["trial"]
                res = tr.last_result or {}
                epochs = int(t["cfg"]["trainer"]["epochs"])
                epoch = res.get("epoch")
                frac = (float(epoch) + 1) / epochs if epoch is not None else 0.0
                start = self._start.get(tr.trial_id)
                end = self._end.get(tr.trial_id)
                dur = (end - start) if (start and end) else res.get("time_total_s")
                rows.append({"label": t["label"], "seed": t["seed"], "state": tr.status, "epoch": epoch,
                             "epochs": epochs, "metric": res.get(self.objective), "frac": min(frac, 1.0),
                             "running_for": (now - start) if start else None, "duration": dur,
                             "skipped": bool(res.get(SKIPPED_KEY)), "status": res.get(STATUS_KEY)})
            seen = {(r["label"], r["seed"]) for r in rows}
            rows += [{"label": lab, "seed": seed, "state": "PENDING", "epoch": None, "epochs": ep, "metric": None,
                      "frac": 0.0, "running_for": None, "duration": None, "skipped": False}
                     for lab, seed, ep in getattr(self, "planned", []) if (lab, seed) not in seen]
            lines = progress_lines(rows, sweep_id=self.sweep_id, objective=self.objective,
                                   concurrency=self.concurrency, elapsed=now - self._t0)
            print("\n".join(lines), file=stream or sys.stdout, flush=True)

    return ProgressTable()


# -- the driver -------------------------------------------------------------------------------------------------------
def ray_init(num_cpus: int | None = None, *, verbose: bool = False) -> dict[str, float]:
    """Connects to ``$RAY_ADDRESS`` (a multi-node cluster) or starts a local one; returns the cluster resources."""
    import ray

    if not ray.is_initialized():
        kw: dict[str, Any] = {"include_dashboard": False, "log_to_driver": verbose,
                              "logging_level": logging.INFO if verbose else logging.WARNING}
        addr = os.environ.get("RAY_ADDRESS")
        if addr:
            ray.init(address=addr, **kw)
        else:
            ray.init(address="local", num_cpus=num_cpus or os.cpu_count() or 1, resources={DRIVER_RESOURCE: 1000},
                     **kw)
    return dict(ray.cluster_resources())


def trial_resources(res, cluster: dict[str, float] | None = None) -> dict[str, float]:
    """What Tune reserves per trial: the whole worker for in-process trials; for TorchTrainer trials only the
    (idle) driver, since Ray Train reserves its workers itself (gang-scheduled, all at once). The driver takes one
    unit of the custom resource ``harness_trial_driver`` (the local cluster has it; on a cluster, give it to the
    non-preemptible nodes: ``ray start --resources='{"harness_trial_driver": 100}'``), else 0.01 CPU (Tune refuses
    an empty request, and a whole CPU would keep a 2-worker trial from ever fitting on a 2-CPU machine)."""
    if res.workers > 1:
        return {DRIVER_RESOURCE: 1.0} if (cluster or {}).get(DRIVER_RESOURCE) else {"CPU": 0.01}
    out = {"CPU": float(res.cpus_per_worker)}
    if res.gpus_per_worker:
        out["GPU"] = float(res.gpus_per_worker)
    return out


def _trial_name(trial) -> str:
    t = trial.config["trial"]
    return f"{t['label']}-s{t['seed']}"


def _trial_dirname(trial) -> str:
    t = trial.config["trial"]
    return re.sub(r"[^A-Za-z0-9_.=+-]", "_", f"{t['index']:03d}-{t['label']}-s{t['seed']}_{trial.trial_id}")[:120]


def prepare_shared_inputs(cfgs: list[dict[str, Any]]) -> None:
    """Once on the driver, before any trial starts: build the embedded demo when missing (`data.auto_prepare`) and
    fill its feature cache for black-box complementary encoders (so concurrent trials do not all compute it), and
    write the few-shot subset manifests the trials' `data.shots` need (nested per subset seed; idempotent)."""
    from datasets_prep.fewshot import build_fewshot
    from harness.compose import fusion_config
    from harness.worker import FeatureCache, loader_config, prepare_data

    for cfg in cfgs:
        if cfg["data"].get("auto_prepare"):
            prepare_data(cfg)
    shots: dict[tuple[str, int, bool], set[int]] = {}
    for cfg in cfgs:
        d = cfg["data"]
        if d.get("shots"):
            key = (d["shard_dir"], int(d.get("shots_seed", 0)), bool(d.get("shots_stratified", False)))
            shots.setdefault(key, set()).add(int(d["shots"]))
    for (shard_dir, seed, stratified), sizes in shots.items():
        build_fewshot(Path(shard_dir) / "train", sorted(sizes), seed=seed, stratified=stratified)

    seen: set[tuple[str, str]] = set()
    for cfg in cfgs:
        if not cfg["data"].get("auto_prepare"):
            continue
        key = (cfg["data"]["shard_dir"], json.dumps(cfg["text"], sort_keys=True) + json.dumps(cfg["vision"],
                                                                                               sort_keys=True))
        if key in seen:
            continue
        seen.add(key)
        shard_dir = prepare_data(cfg)
        import torch

        from mope import build_model

        model = build_model(fusion_config(cfg))
        if model.comp_is_blackbox:
            threads = torch.get_num_threads()
            torch.set_num_threads(os.cpu_count() or 1)
            try:
                lcfg = loader_config(cfg, shard_dir)
                FeatureCache(shard_dir, FeatureCache.key_for(model, shard_dir, lcfg)).build(
                    model, lcfg, ["train", "val", "test"], rank=0, world_size=1)
            finally:
                torch.set_num_threads(threads)
        del model


def run_sweep(spec, trials: list[dict[str, Any]], *, num_cpus: int | None = None, progress_every_s: float = 30.0,
              verbose: bool = False, stream=None) -> int:
    """Runs (or resumes) the sweep; returns 0 when every trial has a FINISHED child run, 1 otherwise.

    Args:
        spec: the :class:`harness.spec.SweepSpec`.
        trials: ``Trial.to_dict()`` of every trial plus its composed ``cfg`` (see ``harness.sweep_cmd.plan``).
        num_cpus: CPUs of a local cluster (default: all); ignored with ``$RAY_ADDRESS``.
        progress_every_s: seconds between progress tables.
        verbose: stream the trials' logs to this console.
    """
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = stream or sys.stdout
    cfg0 = trials[0]["cfg"]
    storage = Path(cfg0["paths"]["run_root"]) / "ray"
    exp_dir = storage / spec.sweep_id
    for t in trials:  # explicit in every process (trials run elsewhere; pitfall 8)
        t["cfg"]["tracking"]["uri"] = tracking_target(t["cfg"])[0]
    t0 = time.time()
    parent = open_parent_run(spec, cfg0, trials)
    print(f"[{spec.sweep_id}] MLflow parent run {parent.run_id} ({tracking_target(cfg0)[0]}); "
          f"Tune experiment {exp_dir}", file=out, flush=True)
    status = "FAILED"
    try:
        prepare_shared_inputs([t["cfg"] for t in trials])
        from ray import tune

        cluster = ray_init(num_cpus, verbose=verbose)
        res = spec.resources
        concurrency = res.max_concurrent_for(cluster.get("CPU", 0.0), cluster.get("GPU", 0.0))
        print(f"[{spec.sweep_id}] {len(trials)} trials, {concurrency} at a time on {cluster.get('CPU', 0):g} CPUs / "
              f"{cluster.get('GPU', 0):g} GPUs (prepare + Ray start {time.time() - t0:.0f}s)", file=out, flush=True)
        trainable = tune.with_resources(run_trial, trial_resources(res, cluster))
        if tune.Tuner.can_restore(str(exp_dir)):
            print(f"[{spec.sweep_id}] resuming: finished trials are kept, errored and unfinished ones are re-run",
                  file=out, flush=True)
            tuner = tune.Tuner.restore(str(exp_dir), trainable=trainable, resume_errored=True)
        else:
            param_space = {
                "trial": tune.grid_search(trials),
                "parent_run_id": parent.run_id,
                "spec_hash": spec.spec_hash,
                "objective": dict(spec.objective.__dict__),
                "resources": dict(res.__dict__),
                "storage_path": str(storage),
                "sample_log_dir": os.environ.get("HARNESS_SAMPLE_LOG_DIR"),
                "fault_inject": os.environ.get(faults.ENV),  # reliability tests only (harness.faults)
            }
            progress = _make_progress_callback(spec.sweep_id, spec.objective.metric, concurrency, progress_every_s,
                                               [(t["label"], t["seed"], int(t["cfg"]["trainer"]["epochs"]))
                                                for t in trials], stream)
            tuner = tune.Tuner(
                trainable,
                param_space=param_space,
                tune_config=tune.TuneConfig(
                    metric=spec.objective.metric, mode=spec.objective.mode, max_concurrent_trials=concurrency,
                    # one process per slot for the whole sweep: saves ~10-20 s of imports per trial on 2 cores
                    reuse_actors=True, trial_name_creator=_trial_name, trial_dirname_creator=_trial_dirname),
                run_config=tune.RunConfig(
                    name=spec.sweep_id, storage_path=str(storage), verbose=0,
                    failure_config=tune.FailureConfig(max_failures=2, fail_fast=False),
                    callbacks=[progress]),
            )
        grid = tuner.fit()
        n_err = grid.num_errors
        children = sweep_children(cfg0, spec.sweep_id)
        finished = {r.data.tags.get("harness.trial_key") for r in children if r.info.status == "FINISHED"}
        missing = [t for t in trials if t["trial_key"] not in finished]
        status = "FINISHED" if not missing else ("FAILED" if n_err else "KILLED")
        print(f"[{spec.sweep_id}] {len(trials) - len(missing)}/{len(trials)} trials FINISHED, {n_err} errored, "
              f"{time.time() - t0:.0f}s; MLflow parent run {parent.run_id}", file=out, flush=True)
        causes = {r.data.tags.get("harness.trial_key"): r.data.tags["harness.error"] for r in children
                  if r.info.status == "FAILED" and r.data.tags.get("harness.error")}
        failed = [t for t in missing if t["trial_key"] in causes]
        for t in failed:
            print(f"[{spec.sweep_id}] {t['label']}-s{t['seed']} FAILED: {causes[t['trial_key']].splitlines()[0]}",
                  file=out, flush=True)
        if failed:
            print(f"[{spec.sweep_id}] a deterministic failure is not retried; fix its cause, then `rm -r {exp_dir}` "
                  "and re-run the same command: FINISHED trials are skipped (their MLflow runs), the others run again",
                  file=out, flush=True)
        if missing:
            print(f"[{spec.sweep_id}] not finished: " + ", ".join(f"{t['label']}-s{t['seed']}" for t in missing[:20])
                  + ("; re-run the same command to resume" if status == "KILLED" else
                     "; see the trials' error.txt under " + str(exp_dir)), file=out, flush=True)
        return 0 if not missing else 1
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        parent.set_tags({"harness.wall_s_last_session": f"{time.time() - t0:.1f}"})
        parent.finish(status)
        import ray

        if ray.is_initialized() and not os.environ.get("RAY_ADDRESS"):
            ray.shutdown()


__all__ = ["child_tags", "finished_child_metrics", "open_parent_run", "prepare_shared_inputs", "progress_lines",
           "ray_init", "run_sweep", "run_trial", "sweep_children", "train_loop_per_worker", "trial_resources"]
