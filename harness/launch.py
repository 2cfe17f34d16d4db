"""Runs a sweep's trials on Ray Tune, tracked in MLflow as one parent run per sweep and one child run per trial.

Layers (``shared/docs/architecture.md`` §5, §10, pitfalls 6–11):

* :func:`run_sweep` (the driver, head node): ``ray.init`` (``$RAY_ADDRESS`` when set, else a local cluster), the MLflow
  parent run (:func:`harness.sweep_runs.open_parent_run`: tags ``harness.sweep_id``, ``harness.spec_hash``,
  ``harness.git_sha``; the spec YAML and the trial table as artifacts), then a ``tune.Tuner`` over ``grid_search`` of
  the planned trials, named ``sweep_id`` under ``<run_root>/ray``. An existing experiment directory of the same name is
  restored (``Tuner.restore(..., resume_errored=True)``): TERMINATED trials are not re-run, errored and unfinished ones
  are. Never ``fail_fast`` (it makes an experiment unrestorable, ray#30584); a changed spec has another ``sweep_id``
  and another directory.
* :func:`run_trial` (the Tune trainable, one trial): skips a trial whose MLflow child run is already FINISHED (second
  line of defence after Tune's own state, e.g. when the driver was killed before it saved that the trial terminated),
  opens or resumes the child run by its ``harness.trial_key`` (a retried trial reuses its run), and trains
  (:func:`harness.recipe.train`) with ``resume=true`` so a restarted trial continues from its last epoch checkpoint.
  Single-worker trials train in-process and report every evaluation with ``ray.tune.report``; multi-worker trials run
  :func:`train_loop_per_worker` through a Ray Train ``TorchTrainer`` (Ray owns the process group; DeepSpeed reuses it)
  with ``TuneReportCallback`` forwarding rank 0's reports.

Every MLflow run ends through :class:`harness.tracking.RunLifecycle`. The driver's view of the runs (parent and child
runs in the store, the progress table, the closing lines) is :mod:`harness.sweep_runs`.

Only plain dicts cross Ray boundaries: every trial's configuration is composed and validated on the driver, with
absolute paths and an explicit tracking URI (trials run in other processes and directories).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

from harness import faults

# `progress_lines` is not used here: the progress callback pickled into a Tune experiment started before
# harness.sweep_runs existed names it `harness.launch.progress_lines`, and Tuner.restore of such a sweep needs it
from harness.sweep_runs import (
    FINISHED_KEY,
    OBJECTIVE_KEY,
    SKIPPED_KEY,
    STATUS_KEY,
    child_tags,
    finished_child_metrics,
    make_progress_callback,
    open_parent_run,
    progress_lines,  # noqa: F401 - see above
    sweep_outcome,
    tracking_target,
)
from harness.tracking import RunLifecycle

log = logging.getLogger("harness.launch")

DRIVER_RESOURCE = "harness_trial_driver"
STORAGE_ENV = "MOPE_STORAGE"
RAY_STOPS = (KeyboardInterrupt, SystemExit)  # Ctrl-C, or Ray stopping the trial (SystemExit 0): not a failure


# -- one trial --------------------------------------------------------------------------------------------------------
def selection_metric(cfg: dict[str, Any]) -> str:
    """The recipe's model-selection metric: ``val/acc_best`` (single-label), ``val/f1_micro_best`` (multi-label) or
    ``val/miou_best`` (segmentation). Reported to Tune also as ``objective``, the default objective of a spec, so a
    spec works for every dataset."""
    from harness.recipe import objective_key
    from mope.config import Task

    return f"val/{objective_key(Task(cfg['data']['task']))}_best"


def _tune_metrics(m: dict[str, Any], cfg: dict[str, Any]) -> dict[str, Any]:
    out = {k: float(v) for k, v in m.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    out["epochs"] = float(cfg["trainer"]["epochs"])
    out[OBJECTIVE_KEY] = out.get(selection_metric(cfg), float("nan"))
    return out


def _final_metrics(summary: dict[str, Any], cfg: dict[str, Any]) -> dict[str, Any]:
    """The last report of a trial: the test metrics and the best validation value."""
    out = {
        k: float(v)
        for k, v in summary.items()
        if isinstance(v, (int, float))
        and not isinstance(v, bool)
        and (k.startswith(("final/", "perf/")) or k == "step")
    }
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


def _trial_cfg(config: dict[str, Any], t: dict[str, Any]) -> dict[str, Any]:
    """The trial's configuration as this process runs it: resuming, and on a cluster in node-local scratch."""
    from harness.cluster import scratch_root

    cfg = copy.deepcopy(t["cfg"])
    cfg["resume"] = True  # a restarted trial continues from its last epoch checkpoint
    if config.get("node_local"):
        cfg["work_root"] = str(scratch_root(t["sweep_id"]))
    return cfg


def _reporter(cfg: dict[str, Any], send, checkpoint_cls):
    """The recipe's `report(metrics, checkpoint_dir)` for Ray: the metrics merged with the last ones (an epoch without
    evaluation keeps the trial's objective), the epoch checkpoint handed to Ray, which copies it to the storage."""
    from harness.cluster import ray_checkpoint
    from harness.run_setup import run_dir_of

    last: dict[str, Any] = {}

    def report(metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        last.update(metrics)
        m = _tune_metrics(last, cfg)
        if checkpoint_dir is None:
            send(m)
            return
        with ray_checkpoint(run_dir_of(cfg), checkpoint_dir, int(metrics["step"]), checkpoint_cls) as ckpt:
            send(m, checkpoint=ckpt)

    return report


def _restore(cfg: dict[str, Any], checkpoint, tracker, rank: int = 0) -> None:
    """Before the recipe resumes: the checkpoint Ray kept, back in this node's run directory; where the trial runs."""
    from harness.cluster import check_gpus, node_facts, restore_ray_checkpoint
    from harness.run_setup import run_dir_of

    check_gpus()
    step = restore_ray_checkpoint(checkpoint, run_dir_of(cfg))
    if step is not None:
        log.info("trial %s: checkpoint of step %d restored from the sweep's storage", cfg["run_name"], step)
    if rank == 0:
        facts = node_facts()
        if step is not None:
            facts["harness.restored_step"] = str(step)
        tracker.set_tags(facts)


def run_trial(config: dict[str, Any]) -> None:
    """The Tune trainable: one trial (see the module docstring)."""
    from ray import tune

    _setup_trial_process(config)
    t = config["trial"]
    cfg = _trial_cfg(config, t)
    objective = config["objective"]["metric"]
    done = finished_child_metrics(cfg, t["trial_key"])
    if done is not None:
        log.info("trial %s: MLflow child run already FINISHED; not re-run", t["trial_key"])
        tune.report(_skipped_metrics(done, cfg, objective))
        return
    if int(config["resources"]["workers"]) > 1:
        return _run_torchtrainer(config, cfg)

    from harness import recipe

    tracker = recipe.open_tracker(
        cfg,
        rank=0,
        trial_key=t["trial_key"],
        parent_run_id=config["parent_run_id"],
        tags=child_tags(t, config["spec_hash"]),
    )
    try:
        with RunLifecycle(tracker, killed_by=RAY_STOPS) as run:
            _restore(cfg, tune.get_checkpoint(), tracker)
            summary = recipe.train(
                cfg, rank=0, world_size=1, tracker=tracker, report=_reporter(cfg, tune.report, tune.Checkpoint)
            )
            run.status = "FINISHED" if summary.get("finished") else "KILLED"
    except BaseException as e:
        if not is_deterministic_failure(e):
            raise  # a crash, OOM, lost node...: Tune retries it from the trial's last checkpoint
        # deterministic (diverged loss, bad configuration or input): a retry gives the same; end the trial now,
        # with the cause on the trial row and in MLflow (harness.error)
        tune.report(_failure_metrics(e, cfg, objective))
        return
    tune.report(_final_metrics(summary, cfg))


def _skipped_metrics(done: dict[str, float], cfg: dict[str, Any], objective: str) -> dict[str, Any]:
    """The one report of a trial whose child run is already FINISHED: its logged metrics."""
    sel = selection_metric(cfg)
    done.setdefault(sel, done.get("final/" + sel.replace("/", "_"), float("nan")))  # final/val_acc_best
    m = _tune_metrics(done, cfg)
    m.setdefault(objective, float("nan"))
    return {**m, "epoch": float(int(cfg["trainer"]["epochs"]) - 1), SKIPPED_KEY: 1.0, FINISHED_KEY: 1.0}


def _failure_metrics(e: BaseException, cfg: dict[str, Any], objective: str) -> dict[str, Any]:
    """The last report of a trial ended by a deterministic failure: no objective, the cause on the trial row."""
    from harness.recipe import TrainingDiverged

    cause = f"{type(e).__name__}: {e}".splitlines()[0][:300]
    return {
        objective: float("nan"),
        OBJECTIVE_KEY: float("nan"),
        "epochs": float(int(cfg["trainer"]["epochs"])),
        STATUS_KEY: ("diverged: " if isinstance(e, TrainingDiverged) else "failed: ") + cause,
    }


def is_deterministic_failure(e: BaseException) -> bool:
    """True for failures that a retry of the same trial reproduces exactly: a diverged loss, a configuration or
    input error (ConfigError, ValueError, TypeError, KeyError, a refused adapter/checkpoint, a missing file). Tune
    retries only the others (a killed worker, OOM, a lost node)."""
    from harness.checkpoint import CheckpointError
    from harness.compose import ConfigValidationError
    from harness.recipe import TrainingDiverged
    from mope.config import ConfigError

    if isinstance(e, (KeyboardInterrupt, SystemExit, MemoryError)):
        return False
    return isinstance(
        e,
        (
            TrainingDiverged,
            ConfigError,
            ConfigValidationError,
            CheckpointError,
            ValueError,
            TypeError,
            KeyError,
            FileNotFoundError,
            NotImplementedError,
        ),
    )


# -- multi-worker trials: Ray Train TorchTrainer ----------------------------------------------------------------------
def _run_torchtrainer(config: dict[str, Any], cfg: dict[str, Any]) -> None:
    """One trial over `resources.workers` Ray Train workers. This Tune trial is only the driver: it owns the MLflow
    child run (created here, resumed by rank 0 through the same trial key, closed here with the right status)."""
    import ray.train
    from ray import tune
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    from harness.recipe import open_tracker

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
        train_loop_config={
            "cfg": cfg,
            "trial": {k: v for k, v in t.items() if k != "cfg"},
            "parent_run_id": config["parent_run_id"],
            "tags": tags,
            "objective": config["objective"]["metric"],
            "sample_log_dir": config.get("sample_log_dir"),
            "fault_inject": config.get("fault_inject"),
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=int(res["workers"]), use_gpu=gpus > 0, resources_per_worker=per_worker
        ),
        run_config=ray.train.RunConfig(
            name=f"train-{trial_id}",
            storage_path=config["storage_path"],
            failure_config=ray.train.FailureConfig(max_failures=1),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=int(cfg["trainer"].get("keep_checkpoints", 2))),
            callbacks=[TuneReportCallback()],
        ),
    )
    with RunLifecycle(tracker, killed_by=RAY_STOPS):
        trainer.fit()


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """One Ray Train worker: rank/world size from the Train context; Ray has built the process group (gloo on CPU,
    nccl on GPU), which the worker's DeepSpeed engine reuses. Every rank reports every evaluation (Ray's report is a
    barrier); rank 0 logs to the child run."""
    import ray.train
    import torch

    from harness.recipe import open_tracker, train

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
        _record_train_keys(
            Path(config["sample_log_dir"]), f"{config['trial']['label']}-s{config['trial']['seed']}", rank
        )
    t = config["trial"]
    tracker = open_tracker(
        cfg, rank=rank, trial_key=t["trial_key"], parent_run_id=config["parent_run_id"], tags=config["tags"]
    )
    _restore(cfg, ray.train.get_checkpoint(), tracker, rank)  # every rank, into its own node's run directory
    _tag_worker_nodes(tracker, rank, world)
    summary = train(
        cfg,
        rank=rank,
        world_size=world,
        tracker=tracker,
        report=_reporter(cfg, ray.train.report, ray.train.Checkpoint),
    )
    ray.train.report(_final_metrics(summary, cfg))


def _tag_worker_nodes(tracker, rank: int, world: int) -> None:
    """Rank 0 tags the child run with the Ray node of every rank (``harness.worker_nodes``, a JSON list by rank)."""
    import ray
    import torch.distributed as dist

    node = ray.get_runtime_context().get_node_id()
    nodes: list[Any] = [None] * world
    if dist.is_available() and dist.is_initialized():
        dist.all_gather_object(nodes, node)
    else:
        nodes = [node]
    if rank == 0:
        tracker.set_tags({"harness.worker_nodes": json.dumps(nodes)})


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


# -- the driver -------------------------------------------------------------------------------------------------------
def ray_init(num_cpus: int | None = None, *, verbose: bool = False, address: str | None = None) -> dict[str, float]:
    """Connects to `address` (else ``$RAY_ADDRESS``: an existing, possibly multi-node cluster; the project code
    travels as the job's ``runtime_env``, :func:`harness.cluster.runtime_env`) or starts a local one; returns the
    cluster resources."""
    import ray

    if not ray.is_initialized():
        kw: dict[str, Any] = {
            "include_dashboard": False,
            "log_to_driver": verbose,
            "logging_level": logging.INFO if verbose else logging.WARNING,
        }
        addr = address or os.environ.get("RAY_ADDRESS")
        if addr:
            from harness.cluster import runtime_env

            ray.init(address=addr, runtime_env=runtime_env(), **kw)
        else:
            ray.init(
                address="local", num_cpus=num_cpus or os.cpu_count() or 1, resources={DRIVER_RESOURCE: 1000}, **kw
            )
    return dict(ray.cluster_resources())


def sweep_storage(cfg: dict[str, Any], storage: str | None = None) -> str:
    """Where Tune keeps the sweep's state and the trials' checkpoints: `storage` (``--storage``), else
    ``$MOPE_STORAGE``, else ``<run_root>/ray``; a URL (``s3://bucket/prefix``) on a cluster without shared disk."""
    s = storage or os.environ.get(STORAGE_ENV) or str(Path(cfg["paths"]["run_root"]) / "ray")
    return s.rstrip("/") if "://" in s else str(Path(s).expanduser().resolve())


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


def _keep_checkpoints(trials: list[dict[str, Any]]) -> int:
    return max(int(t["cfg"]["trainer"].get("keep_checkpoints", 2)) for t in trials)


def _trial_name(trial) -> str:
    t = trial.config["trial"]
    return f"{t['label']}-s{t['seed']}"


def _trial_dirname(trial) -> str:
    t = trial.config["trial"]
    return re.sub(r"[^A-Za-z0-9_.=+-]", "_", f"{t['index']:03d}-{t['label']}-s{t['seed']}_{trial.trial_id}")[:120]


def prepare_shared_inputs(cfgs: list[dict[str, Any]]) -> None:
    """Once on the driver, before any trial starts: build the embedded demo when missing (`data.auto_prepare`) and
    fill its feature cache for black-box complementary encoders (so concurrent trials do not all compute it), and
    write the few-shot subset manifests the trials' `data.shots` need (nested per subset seed; idempotent).

    A remote `data.shard_dir` (a URL) is read-only here: its few-shot subsets must already be there (built on the
    local copy before the upload; a clear error says so otherwise) and its feature cache goes to the node-local cache
    (`harness.node_cache`)."""
    from datasets_prep.fewshot import build_fewshot
    from harness.compose import fusion_config
    from harness.feature_cache import FeatureCache
    from harness.node_cache import feature_cache_root, localize_weights
    from harness.run_setup import cached_splits, loader_config, prepare_data
    from mope_data.format import MissingShardsError, ShardFormatError, is_url, join, read_fewshot

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
        if not is_url(shard_dir):
            build_fewshot(Path(shard_dir) / "train", sorted(sizes), seed=seed, stratified=stratified)
            continue
        for n in sorted(sizes):  # remote shards are never written by a sweep: the subsets must have been uploaded
            try:
                read_fewshot(join(shard_dir, "train"), n, seed, stratified)
            except ShardFormatError as e:
                what = "missing" if isinstance(e, MissingShardsError) else "stale or unreadable"
                raise MissingShardsError(
                    f"data.shots={n}: the few-shot subset of {shard_dir} is {what} ({e}). Build the few-shot subsets "
                    f"on the local build before uploading (`harness prep --fewshot LOCAL_DIR --split train --shots "
                    f"{','.join(map(str, sorted(sizes)))} --seed {seed}{' --stratified' if stratified else ''}`), "
                    f"then upload it again (`harness prep NAME ... --out {shard_dir}` or "
                    "datasets_prep.upload.upload_dataset)"
                ) from None

    seen: set[tuple[str, str]] = set()
    for cfg in cfgs:
        if not cfg["data"].get("auto_prepare"):
            continue
        key = (
            cfg["data"]["shard_dir"],
            json.dumps(cfg["text"], sort_keys=True) + json.dumps(cfg["vision"], sort_keys=True),
        )
        if key in seen:
            continue
        seen.add(key)
        shard_dir = prepare_data(cfg)
        import torch

        from mope import build_model

        model = build_model(fusion_config(localize_weights(cfg)))  # weights given as URLs: node-local copies
        if model.comp_is_blackbox:
            threads = torch.get_num_threads()
            torch.set_num_threads(os.cpu_count() or 1)
            try:
                lcfg = loader_config(cfg, shard_dir)
                FeatureCache(feature_cache_root(shard_dir), FeatureCache.key_for(model, shard_dir, lcfg)).build(
                    model, lcfg, cached_splits(cfg), rank=0, world_size=1
                )
            finally:
                torch.set_num_threads(threads)
        del model


def run_sweep(
    spec,
    trials: list[dict[str, Any]],
    *,
    num_cpus: int | None = None,
    progress_every_s: float = 30.0,
    verbose: bool = False,
    stream=None,
    address: str | None = None,
    storage: str | None = None,
) -> int:
    """Runs (or resumes) the sweep; returns 0 when every trial has a FINISHED child run, 1 otherwise.

    Args:
        spec: the :class:`harness.spec.SweepSpec`.
        trials: ``Trial.to_dict()`` of every trial plus its composed ``cfg`` (see ``harness.sweep_cmd.plan``).
        num_cpus: CPUs of a local cluster (default: all); ignored on an existing cluster.
        progress_every_s: seconds between progress tables.
        verbose: stream the trials' logs to this console.
        address: an existing Ray cluster (default ``$RAY_ADDRESS``; none: a local cluster).
        storage: the Tune storage (:func:`sweep_storage`); a URL makes every trial work in node-local scratch and
            keep its checkpoints only through Ray.
    """
    from harness.cluster import is_url

    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    address = address or os.environ.get("RAY_ADDRESS")
    out = stream or sys.stdout
    cfg0 = trials[0]["cfg"]
    storage = sweep_storage(cfg0, storage)
    exp_dir = f"{storage}/{spec.sweep_id}"
    for t in trials:  # explicit in every process (trials run elsewhere; pitfall 8)
        t["cfg"]["tracking"]["uri"] = tracking_target(t["cfg"])[0]
    t0 = time.time()
    parent = open_parent_run(spec, cfg0, trials)
    print(
        f"[{spec.sweep_id}] MLflow parent run {parent.run_id} ({tracking_target(cfg0)[0]}); Tune experiment {exp_dir}",
        file=out,
        flush=True,
    )
    try:
        # the parent run: FINISHED / FAILED / KILLED as the trials' child runs say, KILLED on Ctrl-C, FAILED (no
        # error tag) when the driver itself fails; this session's wall time is tagged in every case
        with RunLifecycle(
            parent, record_error=False, close_tags=lambda: {"harness.wall_s_last_session": f"{time.time() - t0:.1f}"}
        ) as run:
            prepare_shared_inputs([t["cfg"] for t in trials])
            from ray import tune  # noqa: F401 - imported before Ray starts, as it always was

            cluster = ray_init(num_cpus, verbose=verbose, address=address)
            concurrency = spec.resources.max_concurrent_for(cluster.get("CPU", 0.0), cluster.get("GPU", 0.0))
            print(
                f"[{spec.sweep_id}] {len(trials)} trials, {concurrency} at a time on {cluster.get('CPU', 0):g} CPUs "
                f"/ {cluster.get('GPU', 0):g} GPUs (prepare + Ray start {time.time() - t0:.0f}s)",
                file=out,
                flush=True,
            )
            tuner = _make_tuner(
                spec,
                trials,
                parent.run_id,
                storage,
                cluster,
                concurrency,
                progress_every_s,
                stream,
                node_local=is_url(storage),
            )
            grid = tuner.fit()
            rc, run.status = sweep_outcome(
                spec, trials, grid.num_errors, parent_run_id=parent.run_id, t0=t0, exp_dir=exp_dir, out=out
            )
            return rc
    finally:
        import ray

        if ray.is_initialized() and not address:
            ray.shutdown()


def _make_tuner(
    spec,
    trials: list[dict[str, Any]],
    parent_run_id: str,
    storage: str,
    cluster: dict[str, float],
    concurrency: int,
    progress_every_s: float,
    stream,
    *,
    node_local: bool = False,
):
    """The sweep's ``tune.Tuner``: restored from ``<storage>/<sweep_id>`` when Tune can, else a new one."""
    from ray import tune

    exp_dir = f"{storage}/{spec.sweep_id}"
    res = spec.resources
    trainable = tune.with_resources(run_trial, trial_resources(res, cluster))
    if tune.Tuner.can_restore(exp_dir):
        print(
            f"[{spec.sweep_id}] resuming: finished trials are kept, errored and unfinished ones are re-run",
            file=stream or sys.stdout,
            flush=True,
        )
        return tune.Tuner.restore(exp_dir, trainable=trainable, resume_errored=True)
    param_space = {
        "trial": tune.grid_search(trials),
        "parent_run_id": parent_run_id,
        "spec_hash": spec.spec_hash,
        "objective": dict(spec.objective.__dict__),
        "resources": dict(res.__dict__),
        "storage_path": storage,
        "node_local": node_local,  # trials work in node-local scratch (harness.cluster.scratch_root)
        "sample_log_dir": os.environ.get("HARNESS_SAMPLE_LOG_DIR"),
        "fault_inject": os.environ.get(faults.ENV),  # reliability tests only (harness.faults)
    }
    progress = make_progress_callback(
        spec.sweep_id,
        spec.objective.metric,
        concurrency,
        progress_every_s,
        [(t["label"], t["seed"], int(t["cfg"]["trainer"]["epochs"])) for t in trials],
        stream,
    )
    return tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(
            metric=spec.objective.metric,
            mode=spec.objective.mode,
            max_concurrent_trials=concurrency,
            # one process per slot for the whole sweep: saves ~10-20 s of imports per trial on 2 cores
            reuse_actors=True,
            trial_name_creator=_trial_name,
            trial_dirname_creator=_trial_dirname,
        ),
        run_config=tune.RunConfig(
            name=spec.sweep_id,
            storage_path=storage,
            verbose=0,
            failure_config=tune.FailureConfig(max_failures=2, fail_fast=False),
            # the trials' epoch checkpoints (harness.cluster.ray_checkpoint), as many as the recipe keeps locally
            checkpoint_config=tune.CheckpointConfig(num_to_keep=_keep_checkpoints(trials)),
            callbacks=[progress],
        ),
    )


__all__ = [
    "is_deterministic_failure",
    "prepare_shared_inputs",
    "ray_init",
    "run_sweep",
    "run_trial",
    "sweep_storage",
    "train_loop_per_worker",
    "trial_resources",
]
