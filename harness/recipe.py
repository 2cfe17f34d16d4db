"""The recipe: one training run of one configuration, what `harness train` and every sweep trial execute.

    summary = train(cfg)                       # `harness train`: opens, and closes with its status, its own MLflow run
    summary = train(cfg, rank=r, world_size=n, tracker=t, report=f)    # a sweep trial: the caller owns the run

`cfg` is the resolved plain dict of :func:`harness.compose.compose`. The steps (methods of :class:`TrainingRun`):

* setup: seed → data (streamed shards, or an in-memory few-shot subset) → model (frozen encoders, trainable prompts)
  → optional feature cache for a black-box complementary encoder → engine (DeepSpeed when ``deepspeed.enabled``, else
  a plain torch loop with the same semantics; :mod:`harness.engines`) → the state to continue from (last checkpoint);
* epoch: batches of (forward, task + importance loss, backward, clip, step), then the per-epoch MultiStepLR step;
* eval: on val at the configured cadence, model selection on the best val metric (the best adapter is saved);
* checkpoint: at the end of every epoch (atomic; the data order of epoch e depends only on (seed, e, rank), so a
  resumed run continues at the same step with the same batches and RNG state and reproduces the uninterrupted run);
* finish: test scored with both the selected and the last weights → adapter + final metrics.

Rank 0 logs to the tracker (metrics against the global step). A non-finite loss stops the run with
:class:`TrainingDiverged` naming the step.
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from harness import checkpoint as ck
from harness import faults
from harness.compose import fusion_config
from harness.ds_config import trainable_param_groups
from harness.engines import DeepSpeedEngine, TorchEngine, evaluate
from harness.feature_cache import FeatureCache
from harness.run_setup import (
    RUN_CONTROL_KEYS,
    UNLOGGED_METRICS_FILE,
    cached_splits,
    check_modalities,
    config_id,
    loader_config,
    prepare_data,
    run_dir_of,
    seed_everything,
    test_splits,
)
from harness.tracking import RunLifecycle, Tracker, default_tracking_uri, flatten_config, make_tracker
from mope import build_model
from mope.adapter_io import save_adapter
from mope.config import Task
from mope.model import task_target

log = logging.getLogger("harness.worker")  # the logger name training logs have always carried


class TrainingDiverged(RuntimeError):
    """The loss became NaN/inf; the message names the step."""


# report(metrics, checkpoint_dir): see train()
Report = Callable[[dict[str, float], "Path | None"], None]


# -- one training run -------------------------------------------------------------------------------------------------
def train(
    cfg: dict[str, Any],
    *,
    rank: int = 0,
    world_size: int = 1,
    tracker: Tracker | None = None,
    report: Report | None = None,
    stop_after_epochs: int | None = None,
) -> dict[str, Any]:
    """Runs one configuration; returns its summary (step, epochs_done, finished, best, run_dir, final metrics, run_id).

    Without `tracker` the call opens the run's MLflow run (:func:`open_tracker`) and closes it with its status
    (:class:`harness.tracking.RunLifecycle`: FINISHED, KILLED when stopped early or by Ctrl-C, FAILED with the cause);
    with one, the caller owns the run. `report(metrics, checkpoint_dir)` is called after every evaluation (Ray Tune
    hooks in there): mid-epoch ones with `checkpoint_dir=None`, the end-of-epoch one once that epoch's checkpoint is
    written, with its directory (Ray copies it to the sweep's storage).
    `stop_after_epochs` ends the run early after that many epochs in this process (tests use it to simulate a crash
    before resuming)."""
    if tracker is None:
        tracker = open_tracker(cfg, rank=rank)
        with RunLifecycle(tracker) as closing:
            summary = train(
                cfg,
                rank=rank,
                world_size=world_size,
                tracker=tracker,
                report=report,
                stop_after_epochs=stop_after_epochs,
            )
            closing.status = "FINISHED" if summary.get("finished") else "KILLED"
        return summary
    if rank == 0:
        log_run_artifacts(tracker, cfg)
    run = TrainingRun(cfg, rank=rank, world_size=world_size, tracker=tracker, report=report)
    run.setup()
    for epoch in run.epochs_to_run(stop_after_epochs):
        run.run_epoch(epoch)
        run.validate_if_due(epoch)
        run.checkpoint(epoch)
    return {**run.finish(), "run_id": tracker.run_id}


def open_tracker(
    cfg: dict[str, Any],
    *,
    rank: int = 0,
    trial_key: str | None = None,
    parent_run_id: str | None = None,
    tags: dict | None = None,
):
    t = cfg["tracking"]
    uri = t.get("uri") or default_tracking_uri(cfg["paths"]["run_root"])
    # run-control keys are not part of the configuration's identity (a resumed run keeps its params)
    params = {k: v for k, v in cfg.items() if k not in RUN_CONTROL_KEYS}
    return make_tracker(
        rank,
        tracking_uri=uri,
        experiment=t["experiment"],
        run_name=cfg["run_name"],
        trial_key=trial_key or f"train/{cfg['run_name']}/{config_id(cfg)}",
        parent_run_id=parent_run_id,
        tags={"harness.method": cfg["method"]["name"], "harness.dataset": cfg["data"]["name"], **(tags or {})},
        params=flatten_config(params),
        enabled=bool(t.get("enabled", True)),
        system_metrics_s=t.get("system_metrics_s"),
    )


def log_run_artifacts(tracker, cfg: dict[str, Any]) -> None:
    import yaml

    from harness.provenance import provenance
    from mope_data.format import split_manifests

    manifests = split_manifests(cfg["data"]["shard_dir"])  # local paths or URLs (recorded as such)
    prov = provenance(manifests)
    tracker.log_dict(prov, "provenance.json")
    tracker.log_datasets(dataset_inputs(cfg, prov))
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "config.yaml"
        p.write_text(yaml.safe_dump(cfg, sort_keys=False))
        tracker.log_artifact(str(p))


def dataset_inputs(cfg: dict[str, Any], prov: dict[str, Any]) -> list[dict[str, Any]]:
    """The shards a run reads, as MLflow dataset inputs (:meth:`harness.tracking.MLflowTracker.log_datasets`): one per
    split the run uses (train, val, test), digest = the split manifest's sha256 (from the provenance record), source =
    the split directory or URL; a few-shot run's train input is its subset (``<name>/train/shots-N``, digest of the
    subset index)."""
    from mope_data.format import basename, fewshot_path, parent, read_json, sha256_file

    d = cfg["data"]
    used = {"train": "train", "val": "val", "test": "test"}
    by_split = {basename(parent(m["path"])): m for m in prov["meta_info"]["datasets"]}
    out = []
    for context, split in used.items():
        m = by_split.get(split)
        if m is None:
            continue
        src, name, digest = str(parent(m["path"])), f"{d['name']}/{split}", m["sha256"]
        profile: dict[str, Any] = {"split": split}
        try:
            profile["num_samples"] = int(read_json(m["path"], "manifest").get("num_samples"))
        except (TypeError, ValueError):
            pass
        if context == "train" and d.get("shots"):
            fs = fewshot_path(src, int(d["shots"]), int(d.get("shots_seed", 0)), bool(d.get("shots_stratified")))
            name, digest, src = f"{name}/shots-{int(d['shots'])}", sha256_file(fs), str(fs)
            profile["num_samples"] = int(d["shots"])
        out.append({"name": name, "digest": digest, "source": src, "context": context, "profile": profile})
    return out


def learning_rates(tr: dict[str, Any]) -> dict[str, float]:
    """Optimizer lr per parameter group from the trainer config (see :func:`harness.ds_config.trainable_param_groups`):
    prompts, router, mapper and head train at ``lr_vision`` / ``lr_text`` by modality; a fine-tuned encoder's own
    weights (img_only, text_only, late_concat, sequential_fuse) at ``lr_encoder_vision`` / ``lr_encoder_text``, which
    default to the modality's lr (``null``: the reference's single lr per modality, trainer=paper)."""
    lrs = {"vision": float(tr["lr_vision"]), "text": float(tr["lr_text"])}
    for modality in ("vision", "text"):
        enc = tr.get(f"lr_encoder_{modality}")
        lrs[f"{modality}_encoder"] = lrs[modality] if enc is None else float(enc)
    return lrs


def objective_key(task: Task) -> str:
    return {Task.MULTI_LABEL: "f1_micro", Task.SEGMENTATION: "miou"}.get(task, "acc")


# -- the steps --------------------------------------------------------------------------------------------------------
class _Window:
    """Sums since the last ``train/loss`` log line."""

    def __init__(self) -> None:
        self.loss, self.n, self.t, self.wait, self.samples = 0.0, 0, time.perf_counter(), 0.0, 0

    def add(self, loss: float, wait: float, samples: int) -> None:
        self.loss += loss
        self.n += 1
        self.wait += wait
        self.samples += samples


class TrainingRun:
    """The state of one run between the steps of :func:`train`: :meth:`setup`, then per epoch :meth:`run_epoch`,
    :meth:`validate_if_due` and :meth:`checkpoint`, then :meth:`finish`."""

    def __init__(
        self,
        cfg: dict[str, Any],
        *,
        rank: int,
        world_size: int,
        tracker: Tracker,
        report: Report | None,
    ):
        self.cfg, self.tr = cfg, cfg["trainer"]
        self.rank, self.world_size, self.is_main = rank, world_size, rank == 0
        self.tracker, self.report = tracker, report

    # -- setup --------------------------------------------------------------------------------------------------------
    def setup(self) -> None:
        """Seeds, model, data, engine, then the state this run continues from."""
        tr = self.tr
        self._build_model()
        self._build_data()
        self._build_engine()
        self._resume()
        self.injected = faults.for_run(str(self.cfg.get("run_name", "")))
        if self.is_main and self.start_epoch == 0:
            self.tracker.log_metrics(
                {
                    "cost/trainable_params": float(sum(p.numel() for p in self.model.parameters() if p.requires_grad)),
                    "data/batches_per_epoch": float(self.batches_per_epoch),
                    **self._chance_levels(),
                },
                step=0,
            )
        self.eval_every = float(tr["eval_every_epochs"])
        self.eval_steps = max(1, round(self.eval_every * self.batches_per_epoch)) if self.eval_every < 1 else None
        self.best_dir = self.run_dir / "best_adapter"
        self.log_every, self.rstats_every = int(tr["log_every_steps"]), int(tr["routing_stats_every_steps"])
        self.model.train()
        self.t_run = time.perf_counter()
        self.samples_total, self.data_wait_total, self.step_time_total = 0, 0.0, 0.0
        self.epochs = int(tr["epochs"])
        self.last_epoch_run = self.start_epoch - 1
        self.pending_report: dict[str, Any] | None = None

    def _chance_levels(self) -> dict[str, float]:
        """``chance/<split>/<baseline>``: the text-free baselines a dataset states in dataset.json ``chance`` (the
        RIS demo: IoU of predicting every object / a random object), for the report to print beside the results."""
        from mope_data import dataset_info

        chance = dataset_info(self.shard_dir).extra.get("chance") or {}
        return {
            f"chance/{split}/{name}": float(v)
            for split, vals in chance.items()
            if isinstance(vals, dict)
            for name, v in vals.items()
            if isinstance(v, (int, float))
        }

    def _build_model(self) -> None:
        cfg, seed = self.cfg, int(self.cfg["seed"])
        if self.tr.get("threads"):
            torch.set_num_threads(int(self.tr["threads"]))
        seed_everything(seed + 1000 * self.rank)
        self.run_dir = run_dir_of(cfg)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.shard_dir = prepare_data(cfg)  # a Path, or the URL of remote shards
        from harness.node_cache import localize_weights

        fcfg = fusion_config(localize_weights(cfg))  # encoder weights given as URLs: node-local copies
        check_modalities(fcfg, self.shard_dir)
        seed_everything(seed)  # identical initial adapter on every rank
        self.model = build_model(fcfg)
        self.task = fcfg.task
        seed_everything(seed + 1000 * self.rank)

    def _build_data(self) -> None:
        from mope_data import make_eval_loader, make_train_loader  # looked up now: harness.launch may wrap the loader

        tr, rank, world = self.tr, self.rank, self.world_size
        lcfg = loader_config(self.cfg, self.shard_dir)
        self.train_loader, self.batches_per_epoch = make_train_loader(lcfg, rank, world)
        if tr.get("max_steps_per_epoch"):
            if tr.get("min_steps_per_epoch") and int(tr["min_steps_per_epoch"]) > int(tr["max_steps_per_epoch"]):
                raise ValueError(
                    f"trainer.min_steps_per_epoch={tr['min_steps_per_epoch']} > "
                    f"trainer.max_steps_per_epoch={tr['max_steps_per_epoch']}: lower the first or raise "
                    "the second"
                )
            self.batches_per_epoch = min(self.batches_per_epoch, int(tr["max_steps_per_epoch"]))
        self.val_loader = make_eval_loader(lcfg, "val", rank, world)
        self.test_splits = test_splits(self.cfg)
        self.test_loaders = {
            sp: self.val_loader if sp == "val" else make_eval_loader(lcfg, sp, rank, world) for sp in self.test_splits
        }
        self.lcfg = lcfg
        self.cache: FeatureCache | None = None
        if self.model.comp_is_blackbox:
            from harness.node_cache import feature_cache_root

            key = FeatureCache.key_for(self.model, self.shard_dir, lcfg)
            self.cache = FeatureCache(feature_cache_root(self.shard_dir), key)
            self.cache.build(self.model, lcfg, cached_splits(self.cfg), rank=rank, world_size=world)

    def _build_engine(self) -> None:
        cfg, tr, model = self.cfg, self.tr, self.model
        if not cfg["deepspeed"]["enabled"] and torch.cuda.is_available():  # DeepSpeed places the module itself
            model = model.to(torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))))
        groups = trainable_param_groups(model, learning_rates(tr), weight_decay=float(tr["weight_decay"]))
        self.optimizer = torch.optim.AdamW(groups)
        self.scheduler = torch.optim.lr_scheduler.MultiStepLR(
            self.optimizer, milestones=list(tr["milestones"]), gamma=tr["gamma"]
        )
        self.engine: Any
        if cfg["deepspeed"]["enabled"]:
            self.engine = DeepSpeedEngine(model, self.optimizer, cfg, self.world_size)
        else:
            self.engine = TorchEngine(model, self.optimizer, tr["precision"], float(tr["grad_clip"]))
        self.model = self.engine.module

    def _resume(self) -> None:
        """Step 0, or where the last checkpoint left off; metrics a down store never took are logged again."""
        self.step, self.start_epoch = 0, 0
        self.objective = objective_key(self.task)
        self.best = {"metric": f"val/{self.objective}", "value": -math.inf, "step": -1, "epoch": -1}
        if self.is_main:
            self._replay_unlogged_metrics()
        if self.cfg.get("resume"):
            self._restore_checkpoint()

    def _replay_unlogged_metrics(self) -> None:
        # metrics the tracking store could not take (store down): kept in each checkpoint and, when the store never
        # came back, in the run directory; both are logged again here, so a resume never leaves a hole in the run's
        # metrics
        spill = self.run_dir / UNLOGGED_METRICS_FILE
        if hasattr(self.tracker, "spill_path"):
            self.tracker.spill_path = spill
        if spill.is_file():
            rows = [json.loads(line) for line in spill.read_text().splitlines() if line.strip()]
            self.tracker.requeue_metrics(rows)
            log.info("replaying %d metric values that %s holds (the store was unavailable)", len(rows), spill)
            if self.tracker.try_flush():
                spill.unlink()

    def _restore_checkpoint(self) -> None:
        latest = ck.load_latest(self.run_dir)
        if latest is None:
            return
        path, state = latest
        ck.restore(path, state, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler, rng=True)
        self.step, self.start_epoch = int(state["step"]), int(state["epoch"]) + 1
        self.best = dict(state.get("best") or self.best)
        if self.is_main:
            self.tracker.requeue_metrics((state.get("extra") or {}).get("unlogged_metrics") or [])
        log.info("resumed from %s at step %d (epoch %d)", path, self.step, self.start_epoch)

    def epochs_to_run(self, stop_after_epochs: int | None = None) -> range:
        end = self.epochs if stop_after_epochs is None else min(self.epochs, self.start_epoch + stop_after_epochs)
        return range(self.start_epoch, end)

    # -- epoch --------------------------------------------------------------------------------------------------------
    def run_epoch(self, epoch: int) -> None:
        """The epoch's batches (with the mid-epoch evaluations of ``eval_every_epochs < 1``), then the LR step."""
        self.train_loader.set_epoch(epoch)
        it = iter(self.train_loader)
        self.window = _Window()
        for b in range(self.batches_per_epoch):
            t0 = time.perf_counter()
            batch = next(it)
            self._step(epoch, b, batch, t0, time.perf_counter())
        self.scheduler.step()

    def _step(self, epoch: int, b: int, batch: dict, t0: float, t1: float) -> None:
        if self.cache is not None:
            batch["comp_feat"] = self.cache.lookup("train", batch["key"])
        out = self.engine.forward(batch)
        loss = self.model.loss(out.logits.float(), task_target(batch, self.task)) + out.aux_loss
        if self.injected:
            loss = faults.after_step(self.injected, self.step + 1, loss)
        if not torch.isfinite(loss):
            raise TrainingDiverged(f"non-finite loss {loss.item()} at step {self.step + 1} (epoch {epoch}, batch {b})")
        self.engine.backward_step(loss)
        self.step += 1
        t2 = time.perf_counter()
        bs = int(batch["label"].shape[0])
        self.samples_total += bs
        self.data_wait_total += t1 - t0
        self.step_time_total += t2 - t0
        self.window.add(float(loss.detach()), t1 - t0, bs)
        if self.is_main and self.step % self.log_every == 0:
            self._log_train(epoch, b)
        if self.is_main and out.routing is not None and self.step % self.rstats_every == 0:
            self._log_routing(out)
        if self.eval_steps is not None and self.step % self.eval_steps == 0:
            self.validate(epoch)

    def _log_train(self, epoch: int, b: int) -> None:
        w, per_epoch = self.window, self.batches_per_epoch
        dt = time.perf_counter() - w.t
        self.tracker.log_metrics(
            {
                "train/loss": w.loss / w.n,
                "train/lr_vision": self.optimizer.param_groups[0]["lr"],
                "perf/samples_per_s": w.samples / max(dt, 1e-9),
                "perf/step_time_s": dt / w.n,
                "perf/data_wait_frac": w.wait / max(dt, 1e-9),
                "train/epoch": epoch + (b + 1) / per_epoch,
            },
            step=self.step,
        )
        log.info(
            "epoch %d step %d/%d loss %.4f  %.1f samples/s  ETA %.0fs",
            epoch,
            b + 1,
            per_epoch,
            w.loss / w.n,
            w.samples / max(dt, 1e-9),
            (self.epochs - epoch - (b + 1) / per_epoch) * per_epoch * dt / w.n,
        )
        self.window = _Window()

    def _log_routing(self, out) -> None:
        r = out.routing
        m = {"routing/entropy": float(r.entropy)}
        per_block = zip(r.blocks, r.entropy_per_block, strict=False)
        m.update({f"routing/entropy_block{blk}": float(v) for blk, v in per_block})
        m.update({f"routing/importance_last/e{j}": float(v) for j, v in enumerate(r.importance_last)})
        if out.imp_loss is not None:
            m["train/imp_loss"] = float(out.imp_loss.detach())
        self.tracker.log_metrics(m, step=self.step)

    # -- eval ---------------------------------------------------------------------------------------------------------
    def validate_if_due(self, epoch: int) -> None:
        """The end-of-epoch evaluation: every ``eval_every_epochs`` epochs, and after the last epoch whenever its last
        step was not evaluated already."""
        last = epoch + 1 == self.epochs
        if self.eval_steps is None and ((epoch + 1) % max(1, int(self.eval_every)) == 0 or last):
            self.validate(epoch, defer_report=True)
        elif self.eval_steps is not None and self.step % self.eval_steps != 0 and last:
            self.validate(epoch, defer_report=True)

    def validate(self, epoch: int, *, defer_report: bool = False) -> dict[str, float]:
        """Scores val; a new best value saves the selected adapter. Logs and reports the metrics (deferred to the
        epoch's checkpoint for the end-of-epoch evaluation, so they reach Ray together with it)."""
        res = evaluate(self.engine, self.val_loader, self.task, self.cache, "val", self.world_size)
        objective = self.objective
        metrics = {f"val/{k}": v for k, v in res.items() if k != "n"}
        if res[objective] > self.best["value"]:
            self.best = {"metric": f"val/{objective}", "value": res[objective], "step": self.step, "epoch": epoch}
            save_adapter(
                self.model, self.best_dir, is_main_process=self.is_main, extra={"step": self.step, "epoch": epoch}
            )
        metrics[f"val/{objective}_best"] = self.best["value"]
        if self.is_main:
            self.tracker.log_metrics(metrics, step=self.step)
        if defer_report:
            self.pending_report = {**metrics, "step": self.step, "epoch": epoch}
        elif self.report is not None:
            self.report({**metrics, "step": self.step, "epoch": epoch}, None)
        return metrics

    # -- checkpoint ---------------------------------------------------------------------------------------------------
    def checkpoint(self, epoch: int) -> None:
        """The end-of-epoch checkpoint, with the metrics the store has not taken yet (rank 0)."""
        if self.is_main:
            self.tracker.try_flush()
        path = ck.save_checkpoint(
            self.run_dir,
            self.step,
            model=self.model,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            epoch=epoch,
            data_state={"epoch": epoch, "batches_per_epoch": self.batches_per_epoch},
            best=self.best,
            extra={"unlogged_metrics": self.tracker.pending_metrics() if self.is_main else []},
            keep_last=int(self.tr.get("keep_checkpoints", 2)),
            is_main_process=self.is_main,
        )
        self.last_epoch_run = epoch
        if self.report is not None:  # every rank reports (Ray Train's report is a barrier); only rank 0 wrote it
            metrics, self.pending_report = self.pending_report or {"step": self.step, "epoch": epoch}, None
            self.report(metrics, path if self.is_main else None)

    # -- finish -------------------------------------------------------------------------------------------------------
    def finish(self) -> dict[str, Any]:
        """The summary; when every epoch is done, also the test scores, the final metrics and the adapter."""
        finished = self.last_epoch_run + 1 >= self.epochs
        summary: dict[str, Any] = {
            "step": self.step,
            "epochs_done": self.last_epoch_run + 1,
            "finished": finished,
            "best": self.best,
            "run_dir": str(self.run_dir),
        }
        if not finished:
            return summary
        final = {**self._test_metrics(), **self._perf_metrics()}
        if self.is_main:
            self.tracker.log_metrics(final, step=self.step)
            save_adapter(
                self.model,
                self.run_dir / "adapter",
                extra={"step": self.best["step"], "selected_by": self.best["metric"]},
            )
            self.tracker.log_artifact(str(self.run_dir / "adapter"), "adapter")
        summary.update(final)
        return summary

    def _test_metrics(self) -> dict[str, float]:
        """Each of ``data.test_splits`` with the last weights, then with the selected (best-val) adapter; keys
        ``final/<split>_<metric>`` (``final/test_acc``; RefCOCO ``final/testA_miou``), ``..._last`` for the last
        weights."""

        def score_all() -> dict[str, dict[str, float]]:
            return {
                sp: evaluate(self.engine, loader, self.task, self.cache, sp, self.world_size)
                for sp, loader in self.test_loaders.items()
            }

        def keyed(scores: dict[str, dict[str, float]], suffix: str) -> dict[str, float]:
            out = {f"final/{sp}_{k}{suffix}": v for sp, res in scores.items() for k, v in res.items() if k != "n"}
            held_out = [sp for sp in scores if sp not in ("val", "test")]
            if held_out and "test" not in scores:  # RefCOCO's testA + testB: final/test_* over their union
                n = sum(scores[sp]["n"] for sp in held_out)
                for k in ("miou", "prec50", "prec70", "prec90", "acc", "loss"):
                    if all(k in scores[sp] for sp in held_out):
                        out[f"final/test_{k}{suffix}"] = sum(scores[sp][k] * scores[sp]["n"] for sp in held_out) / n
                if all("union_px" in scores[sp] for sp in held_out):  # oIoU pools the pixels, not the two ratios
                    union = sum(scores[sp]["union_px"] for sp in held_out)
                    inter = sum(scores[sp]["inter_px"] for sp in held_out)
                    out[f"final/test_oiou{suffix}"] = inter / max(union, 1.0)
            return out

        last = score_all()
        final = keyed(last, "_last")
        if self.best_dir.is_dir():
            if self.best["step"] == self.step:  # the selected adapter was saved from these very weights: same scores
                sel = last
            else:
                from mope.adapter_io import load_adapter

                load_adapter(self.model, self.best_dir)
                sel = score_all()
            final.update(keyed(sel, ""))
            if self.task == Task.SEGMENTATION and self.is_main:
                self._log_mask_examples()
        final[f"final/val_{self.objective}_best"] = self.best["value"]
        final["final/best_step"] = float(self.best["step"])
        return final

    def _log_mask_examples(self) -> None:
        """Predicted masks of the first val samples with the selected adapter, for the report's mask figure."""
        from mope_data.mask_examples import MASK_EXAMPLES_DIR, collect, write

        out = self.run_dir / MASK_EXAMPLES_DIR
        write(out, collect(self.engine, self.val_loader, self.lcfg, self.cache))
        self.tracker.log_artifact(str(out), MASK_EXAMPLES_DIR)

    def _perf_metrics(self) -> dict[str, float]:
        wall = time.perf_counter() - self.t_run
        return {
            "perf/train_samples_per_s": self.samples_total / max(self.step_time_total, 1e-9),
            # whole run; its own key, since the windowed perf/data_wait_frac is logged at the same last step
            "perf/run_data_wait_frac": self.data_wait_total / max(self.step_time_total, 1e-9),
            "perf/wall_s": wall,
            "perf/peak_mem_mb": _peak_mem_mb(),
        }


def _peak_mem_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
