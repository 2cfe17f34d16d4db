"""The training worker: one run of one configuration (the unit every sweep trial executes).

    summary = train(cfg, rank=0, world_size=1, tracker=tracker)

`cfg` is the resolved plain dict of :func:`harness.compose.compose`. The recipe: seed → data (streamed shards, or an
in-memory few-shot subset) → model (frozen encoders, trainable prompts) → optional feature cache for a black-box
complementary encoder → engine (DeepSpeed when ``deepspeed.enabled``, else a plain torch loop with the same semantics)
→ epochs of (forward, task + importance loss, backward, clip, step) with per-epoch MultiStepLR → evaluation on val at
the configured cadence, model selection on the best val metric → test scored with both the selected and the last
weights → adapter + provenance. Rank 0 logs to the tracker (metrics against the global step).

Checkpoints are written at the end of every epoch (atomic; the data order of epoch e depends only on (seed, e, rank),
so a resumed run continues at the same step with the same batches and RNG state and reproduces the uninterrupted run).
A non-finite loss stops the run with :class:`TrainingDiverged` naming the step.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import resource
import socket
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from mope_data.format import sha256_file

from harness import checkpoint as ck
from harness import faults
from harness.compose import fusion_config
from harness.ds_config import deepspeed_config, trainable_param_groups
from harness.tracking import NoopTracker, Tracker
from mope import build_model, predictions, task_loss
from mope.adapter_io import save_adapter
from mope.config import Task

log = logging.getLogger("harness.worker")


class TrainingDiverged(RuntimeError):
    """The loss became NaN/inf; the message names the step."""


# -- set-up -------------------------------------------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


RUN_CONTROL_KEYS = ("overrides", "resume")
UNLOGGED_METRICS_FILE = "unlogged_metrics.jsonl"  # see harness.tracking (store unavailable)  # how a run is started, not what it computes


def config_id(cfg: dict[str, Any]) -> str:
    """Short hash of the resolved configuration (run-control keys excluded): a changed config is a different run."""
    import hashlib

    ident = {k: v for k, v in cfg.items() if k not in RUN_CONTROL_KEYS}
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:10]


def run_dir_of(cfg: dict[str, Any]) -> Path:
    """``<run_root>/<run_name>/<config_id>``: runs that share a name but not a configuration never share checkpoints."""
    return Path(cfg["paths"]["run_root"]) / cfg["run_name"] / config_id(cfg)


def tokenizer_for(text_cfg: dict[str, Any]) -> str | None:
    """The tokenizer matching the text encoder: its own directory, else the MiniLM package's (BERT uncased vocab)."""
    name = str(text_cfg.get("name") or "")
    if name and Path(name).is_dir() and any((Path(name) / f).exists() for f in ("vocab.txt", "tokenizer.json")):
        return name
    return None  # the loader's default: the offline MiniLM tokenizer (same 30,522-token uncased vocab as BERT-base)


def prepare_data(cfg: dict[str, Any]) -> Path:
    d = cfg["data"]
    shard_dir = Path(d["shard_dir"])
    if d["name"] == "demo" and d.get("auto_prepare") and not (shard_dir / "dataset.json").is_file():
        # build only when nothing is there: an existing build (maybe a custom-sized one) is never replaced here
        from datasets_prep.demo import ensure_demo

        ensure_demo(shard_dir)
    if not (shard_dir / "train" / "manifest.json").is_file():
        raise FileNotFoundError(
            f"data.shard_dir={shard_dir}: no train/manifest.json; run `harness prep {d['name']} --src RAW --out {shard_dir}`"
        )
    return shard_dir


def loader_config(cfg: dict[str, Any], shard_dir: Path):
    from mope_data import LoaderConfig

    d, tr = cfg["data"], cfg["trainer"]
    norm = {"dataset": "default", "mmbt": "mmbt", "imagenet": "imagenet"}[d.get("image_norm", "mmbt")]
    return LoaderConfig(
        data_dir=shard_dir,
        batch_size=int(tr["batch_size"]),
        num_workers=int(tr["num_workers"]),
        seed=int(cfg["seed"]),
        shots=d.get("shots"),
        min_batches_per_epoch=tr.get("min_steps_per_epoch"),
        fewshot_seed=int(d.get("shots_seed", 0)),
        fewshot_stratified=bool(d.get("shots_stratified", False)),
        tokenizer=tokenizer_for(cfg["text"]),
        max_text_len=int(d["max_text_len"]),
        image_size=d.get("image_size"),
        normalization=norm,
        train_augment=d.get("train_aug", "none") != "none",
        shuffle_buffer=int(d.get("shuffle_buffer") or 1000),
    )


class DataMismatchError(ValueError):
    """The shards do not carry a modality the model reads."""


SHARD_MODALITY = {"vision": "image", "text": "text", "audio": "audio", "video": "video"}


def check_modalities(fcfg, shard_dir: Path) -> None:
    """Before any model is built: every modality the method reads must be in the shards (manifest ``modalities``)."""
    from mope_data import dataset_info
    from mope.methods import METHODS, reads_complementary

    needed = [fcfg.main] if METHODS[fcfg.method].use_main else []
    if reads_complementary(fcfg):
        needed += fcfg.complementary_modalities
    have = dataset_info(shard_dir).modalities
    missing = [m for m in needed if SHARD_MODALITY[m] not in have]
    if missing:
        hint = {"video": "`harness prep mustard --opt frames=8` writes video frames",
                "audio": "`harness prep mustard` writes audio unless --opt no_audio=true",
                "vision": "this dataset has no images: pick model.main / model.complementary among its modalities",
                "text": "this dataset has no text"}
        raise DataMismatchError(
            f"data.shard_dir={shard_dir} carries {list(have)}, but the model reads {missing} (model.main="
            f"{fcfg.main}, model.complementary={fcfg.complementary_modalities}); "
            + "; ".join(hint[m] for m in missing) + ", or drop it from model.complementary")


# -- feature cache ---------------------------------------------------------------------------------------------------
class FeatureCache:
    """Per-sample features of a frozen, un-prompted complementary encoder, computed once per (encoder, dataset).

    Stored beside the shards under ``feature_cache/<key>/<split>.safetensors`` (a (N, d) matrix + the sample keys in
    the metadata), where key = sha256(encoder cache key + every split manifest's sha256 + tokenizer settings), so
    every trial of a sweep reuses it and a changed encoder or dataset gets a new entry.
    """

    def __init__(self, root: Path, key: str):
        self.dir = root / "feature_cache" / key
        self.tables: dict[str, dict[str, int]] = {}
        self.feats: dict[str, torch.Tensor] = {}

    @staticmethod
    def key_for(model, shard_dir: Path, lcfg) -> str:
        import hashlib

        from mope.backbones.blackbox import state_dict_fingerprint

        h = hashlib.sha256(state_dict_fingerprint(model.comp_encoder).encode())
        h.update(f"{type(model.comp_encoder).__name__}|{getattr(model.comp_encoder, 'pool', '')}".encode())
        h.update(f"{lcfg.tokenizer}|{lcfg.max_text_len}".encode())
        for m in sorted(shard_dir.glob("*/manifest.json")):
            h.update(sha256_file(m).encode())
        return h.hexdigest()[:24]

    def build(self, model, lcfg, splits: list[str], *, rank: int, world_size: int) -> None:
        from safetensors.torch import load_file, save_file

        from mope_data import make_eval_loader

        self.dir.mkdir(parents=True, exist_ok=True)
        for split in splits:
            f = self.dir / f"{split}.safetensors"
            if not f.is_file():  # every rank computes its own copy only on first use; writes are atomic
                keys, rows = [], []
                seen: dict[bytes, torch.Tensor] = {}  # distinct inputs (e.g. a demo's few statements) encoded once
                t0 = time.perf_counter()
                with torch.no_grad():
                    for batch in make_eval_loader(lcfg, split, 0, 1):
                        digests = input_row_digests(model.complementary_inputs(batch))
                        first: dict[bytes, int] = {}  # digest -> first row of this batch with that input
                        for i, d in enumerate(digests):
                            if d not in seen:
                                first.setdefault(d, i)
                        if first:
                            idx = torch.tensor(list(first.values()))
                            n = len(digests)
                            sub = {k: v[idx] for k, v in batch.items() if torch.is_tensor(v) and v.shape[:1] == (n,)}
                            feats = model.complementary_feature(sub).float().cpu()
                            seen.update(zip(first, feats))
                        rows.append(torch.stack([seen[d] for d in digests]))
                        keys.extend(batch["key"])
                tmp = f.with_name(f".{f.name}.{os.getpid()}.tmp")
                save_file({"features": torch.cat(rows)}, str(tmp), metadata={"keys": json.dumps(keys)})
                os.replace(tmp, f)
                log.info("feature cache %s/%s: %d samples (%d distinct inputs) in %.1fs", self.dir.name, split,
                         len(keys), len(seen), time.perf_counter() - t0)
            from safetensors import safe_open

            with safe_open(str(f), framework="pt") as fh:
                keys = json.loads(fh.metadata()["keys"])
            self.feats[split] = load_file(str(f))["features"]
            self.tables[split] = {k: i for i, k in enumerate(keys)}

    def lookup(self, split: str, keys: list[str]) -> torch.Tensor:
        table = self.tables[split]
        try:
            idx = torch.tensor([table[k] for k in keys])
        except KeyError as e:
            raise KeyError(f"feature cache {self.dir}: sample key {e.args[0]!r} of split {split!r} missing; "
                           "delete the cache directory to rebuild it") from None
        return self.feats[split][idx]


def input_row_digests(inputs: Any) -> list[bytes]:
    """One digest per batch row of an encoder's inputs (a tensor, or a dict of tensors with an optional
    ``attention_mask``): rows with equal digests hold equal inputs. Padding is excluded, so the same text padded to
    different lengths in different batches gets the same digest."""
    import hashlib

    if not isinstance(inputs, dict):
        inputs = {"x": inputs}
    mask = inputs.get("attention_mask")
    n = next(iter(inputs.values())).shape[0]
    out = []
    for i in range(n):
        h = hashlib.blake2b(digest_size=16)
        keep = mask[i].bool() if mask is not None else None
        for k in sorted(inputs):
            v = inputs[k][i]
            if keep is not None and v.shape[:1] == keep.shape:
                v = v[keep]
            h.update(f"{k}:{v.dtype}:{tuple(v.shape)}|".encode())
            h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        out.append(h.digest())
    return out


# -- engines: one interface, DeepSpeed or plain torch ---------------------------------------------------------------
def to_device(batch: dict, device: torch.device, float_dtype: torch.dtype | None = None) -> dict:
    """Moves the batch's tensors (nested dicts included, e.g. tokenised text) onto `device` **in place**, so the caller's
    ``batch["label"]`` is the moved one; floating inputs are cast to `float_dtype` (a DeepSpeed bf16/fp16 module has
    half-precision weights), labels keep their dtype (the loss is computed in fp32)."""

    def move(v, cast: bool):
        if isinstance(v, torch.Tensor):
            if cast and float_dtype is not None and v.is_floating_point():
                return v.to(device=device, dtype=float_dtype, non_blocking=True)
            return v.to(device, non_blocking=True)
        if isinstance(v, dict):
            return {k: move(x, cast) for k, x in v.items()}
        return v

    for k in list(batch):
        batch[k] = move(batch[k], cast=k != "label")
    return batch


class TorchEngine:
    """Plain torch loop: autocast for bf16/fp16 on the model's device, grad-norm clipping, optimizer step."""

    def __init__(self, model, optimizer, precision: str, grad_clip: float):
        self.module, self.optimizer, self.grad_clip = model, optimizer, grad_clip
        self.device = next(model.parameters()).device
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        self.autocast = (lambda: torch.autocast(self.device.type, dtype=dtype)) if dtype else nullcontext
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=precision == "fp16")
        self.params = [p for g in optimizer.param_groups for p in g["params"]]

    def forward(self, batch):
        if self.device.type != "cpu":
            to_device(batch, self.device)
        with self.autocast():
            return self.module(batch)

    def backward_step(self, loss) -> None:
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)


class DeepSpeedEngine:
    """`deepspeed.initialize` with only the trainable parameters (via the optimizer's groups); DeepSpeed does the
    clipping, precision and ZeRO (≤ 2). The LR scheduler is stepped per epoch by the worker, not by DeepSpeed."""

    def __init__(self, model, optimizer, cfg: dict[str, Any], world_size: int):
        import deepspeed

        tr = cfg["trainer"]
        _init_single_process_dist(world_size)
        ds_cfg = deepspeed_config(
            micro_batch=int(tr["batch_size"]),
            grad_accum=int(tr["grad_accum"]),
            world_size=world_size,
            precision=tr["precision"],
            zero_stage=int(cfg["deepspeed"]["zero_stage"]),
            grad_clip=float(tr["grad_clip"]),
        )
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_cfg)
        self.module = self.engine.module
        self.device = torch.device(self.engine.device)
        self.float_dtype = (torch.bfloat16 if self.engine.bfloat16_enabled()
                            else torch.float16 if self.engine.fp16_enabled() else None)

    def forward(self, batch):
        return self.engine(to_device(batch, self.device, self.float_dtype))

    def backward_step(self, loss) -> None:
        self.engine.backward(loss)
        self.engine.step()


def _init_single_process_dist(world_size: int) -> None:
    """A single `harness train` process: give DeepSpeed a 1-rank process group (gloo on CPU, nccl on GPU).

    Under Ray Train the group exists already (created by Ray), and nothing is done here (pitfall 1)."""
    if world_size != 1 or (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))
    if not torch.cuda.is_available():
        # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce op on first start (~70 s, g++/ninja); one
        # rank never all-reduces, so skip the build.
        import importlib

        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo", verbose=False)


# -- evaluation -------------------------------------------------------------------------------------------------------
def evaluate(engine, loader, task: Task, cache: FeatureCache | None, split: str, world_size: int) -> dict[str, float]:
    model = engine.module
    was_training = model.training
    model.eval()
    preds, labels, loss_sum, n = [], [], 0.0, 0
    with torch.no_grad():
        for batch in loader:
            if cache is not None:
                batch["comp_feat"] = cache.lookup(split, batch["key"])
            out = engine.forward(batch)
            logits = out.logits.float()
            loss_sum += float(task_loss(logits, batch["label"], task)) * logits.shape[0]
            n += logits.shape[0]
            preds.append(predictions(logits, task).cpu())
            labels.append(batch["label"].cpu())
    model.train(was_training)
    p, y = torch.cat(preds), torch.cat(labels)
    if world_size > 1:  # eval splits differ per rank: gather everything (small) on all ranks
        gathered: list[Any] = [None] * world_size
        torch.distributed.all_gather_object(gathered, (p, y, loss_sum, n))
        p = torch.cat([g[0] for g in gathered])
        y = torch.cat([g[1] for g in gathered])
        loss_sum, n = sum(g[2] for g in gathered), sum(g[3] for g in gathered)
    res = {"loss": loss_sum / max(n, 1), "n": float(n)}
    res["pred_class_frac_max"] = pred_class_frac_max(p)
    if task == Task.MULTI_LABEL:
        from sklearn.metrics import f1_score

        res["f1_macro"] = float(f1_score(y.numpy(), p.numpy(), average="macro", zero_division=0))
        res["f1_micro"] = float(f1_score(y.numpy(), p.numpy(), average="micro", zero_division=0))
    else:
        res["acc"] = float((p == y).float().mean())
    return res


def pred_class_frac_max(preds: torch.Tensor) -> float:
    """Collapse detector: the share of the split given the most frequent prediction (a class, or a multi-label
    vector). A run at ~1.0 answers the same for everything; `harness report` flags it as collapsed, not a result."""
    if len(preds) == 0:
        return 0.0
    return float(torch.unique(preds, dim=0, return_counts=True)[1].max()) / len(preds)


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
    return "f1_micro" if task == Task.MULTI_LABEL else "acc"


# -- the recipe -------------------------------------------------------------------------------------------------------
def train(
    cfg: dict[str, Any],
    *,
    rank: int = 0,
    world_size: int = 1,
    tracker: Tracker | None = None,
    report: Callable[[dict[str, float]], None] | None = None,
    stop_after_epochs: int | None = None,
) -> dict[str, Any]:
    """Runs one configuration. `report(metrics)` is called after every evaluation (Ray Tune hooks in there).

    `stop_after_epochs` ends the run early after that many epochs in this process (tests use it to simulate a crash
    before resuming)."""
    tracker = tracker or NoopTracker()
    tr = cfg["trainer"]
    if tr.get("threads"):
        torch.set_num_threads(int(tr["threads"]))
    seed_everything(int(cfg["seed"]) + 1000 * rank)
    run_dir = run_dir_of(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    shard_dir = prepare_data(cfg)
    fcfg = fusion_config(cfg)
    check_modalities(fcfg, shard_dir)
    seed_everything(int(cfg["seed"]))  # identical initial adapter on every rank
    model = build_model(fcfg)
    task = fcfg.task
    seed_everything(int(cfg["seed"]) + 1000 * rank)

    from mope_data import make_eval_loader, make_train_loader

    lcfg = loader_config(cfg, shard_dir)
    train_loader, batches_per_epoch = make_train_loader(lcfg, rank, world_size)
    if tr.get("max_steps_per_epoch"):
        if tr.get("min_steps_per_epoch") and int(tr["min_steps_per_epoch"]) > int(tr["max_steps_per_epoch"]):
            raise ValueError(f"trainer.min_steps_per_epoch={tr['min_steps_per_epoch']} > trainer.max_steps_per_epoch="
                             f"{tr['max_steps_per_epoch']}: lower the first or raise the second")
        batches_per_epoch = min(batches_per_epoch, int(tr["max_steps_per_epoch"]))
    val_loader = make_eval_loader(lcfg, "val", rank, world_size)
    test_loader = make_eval_loader(lcfg, "test", rank, world_size)

    cache = None
    if model.comp_is_blackbox:
        cache = FeatureCache(shard_dir, FeatureCache.key_for(model, shard_dir, lcfg))
        cache.build(model, lcfg, ["train", "val", "test"], rank=rank, world_size=world_size)

    if not cfg["deepspeed"]["enabled"] and torch.cuda.is_available():  # DeepSpeed places the module itself
        model = model.to(torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))))
    groups = trainable_param_groups(model, learning_rates(tr), weight_decay=float(tr["weight_decay"]))
    optimizer = torch.optim.AdamW(groups)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(tr["milestones"]), gamma=tr["gamma"])
    if cfg["deepspeed"]["enabled"]:
        engine: Any = DeepSpeedEngine(model, optimizer, cfg, world_size)
    else:
        engine = TorchEngine(model, optimizer, tr["precision"], float(tr["grad_clip"]))
    model = engine.module

    step, start_epoch = 0, 0
    objective = objective_key(task)
    best = {"metric": f"val/{objective}", "value": -math.inf, "step": -1, "epoch": -1}
    is_main = rank == 0
    # metrics the tracking store could not take (store down): kept in each checkpoint and, when the store never came
    # back, in the run directory; both are logged again here, so a resume never leaves a hole in the run's metrics
    spill = run_dir / UNLOGGED_METRICS_FILE
    if is_main and hasattr(tracker, "spill_path"):
        tracker.spill_path = spill
    if is_main and spill.is_file():
        rows = [json.loads(line) for line in spill.read_text().splitlines() if line.strip()]
        tracker.requeue_metrics(rows)
        log.info("replaying %d metric values that %s holds (the store was unavailable)", len(rows), spill)
        if tracker.try_flush():
            spill.unlink()
    if cfg.get("resume"):
        latest = ck.load_latest(run_dir)
        if latest is not None:
            path, state = latest
            ck.restore(path, state, model=model, optimizer=optimizer, scheduler=scheduler, rng=True)
            step, start_epoch = int(state["step"]), int(state["epoch"]) + 1
            best = dict(state.get("best") or best)
            if is_main:
                tracker.requeue_metrics((state.get("extra") or {}).get("unlogged_metrics") or [])
            log.info("resumed from %s at step %d (epoch %d)", path, step, start_epoch)
    injected = faults.for_run(str(cfg.get("run_name", "")))

    if is_main and start_epoch == 0:
        tracker.log_metrics({"cost/trainable_params": float(sum(p.numel() for p in model.parameters()
                                                                 if p.requires_grad)),
                             "data/batches_per_epoch": float(batches_per_epoch)}, step=0)
    eval_every = float(tr["eval_every_epochs"])
    eval_steps = max(1, round(eval_every * batches_per_epoch)) if eval_every < 1 else None
    best_dir = run_dir / "best_adapter"
    log_every, rstats_every = int(tr["log_every_steps"]), int(tr["routing_stats_every_steps"])

    def run_eval(epoch: int) -> dict[str, float]:
        nonlocal best
        res = evaluate(engine, val_loader, task, cache, "val", world_size)
        metrics = {f"val/{k}": v for k, v in res.items() if k != "n"}
        if res[objective] > best["value"]:
            best = {"metric": f"val/{objective}", "value": res[objective], "step": step, "epoch": epoch}
            save_adapter(model, best_dir, is_main_process=is_main, extra={"step": step, "epoch": epoch})
        metrics[f"val/{objective}_best"] = best["value"]
        if is_main:
            tracker.log_metrics(metrics, step=step)
        if report is not None:
            report({**metrics, "step": step, "epoch": epoch})
        return metrics

    model.train()
    t_run = time.perf_counter()
    samples_total, data_wait_total, step_time_total = 0, 0.0, 0.0
    epochs = int(tr["epochs"])
    last_epoch_run = start_epoch - 1
    for epoch in range(start_epoch, epochs):
        if stop_after_epochs is not None and epoch - start_epoch >= stop_after_epochs:
            break
        train_loader.set_epoch(epoch)
        it = iter(train_loader)
        window = {"loss": 0.0, "n": 0, "t": time.perf_counter(), "wait": 0.0, "samples": 0}
        for b in range(batches_per_epoch):
            t0 = time.perf_counter()
            batch = next(it)
            t1 = time.perf_counter()
            if cache is not None:
                batch["comp_feat"] = cache.lookup("train", batch["key"])
            out = engine.forward(batch)
            loss = task_loss(out.logits.float(), batch["label"], task) + out.aux_loss
            if injected:
                loss = faults.after_step(injected, step + 1, loss)
            if not torch.isfinite(loss):
                raise TrainingDiverged(f"non-finite loss {loss.item()} at step {step + 1} (epoch {epoch}, batch {b})")
            engine.backward_step(loss)
            step += 1
            t2 = time.perf_counter()
            bs = int(batch["label"].shape[0])
            samples_total += bs
            data_wait_total += t1 - t0
            step_time_total += t2 - t0
            window["loss"] += float(loss.detach())
            window["n"] += 1
            window["wait"] += t1 - t0
            window["samples"] += bs
            if is_main and step % log_every == 0:
                dt = time.perf_counter() - window["t"]
                tracker.log_metrics({
                    "train/loss": window["loss"] / window["n"],
                    "train/lr_vision": optimizer.param_groups[0]["lr"],
                    "perf/samples_per_s": window["samples"] / max(dt, 1e-9),
                    "perf/step_time_s": dt / window["n"],
                    "perf/data_wait_frac": window["wait"] / max(dt, 1e-9),
                    "train/epoch": epoch + (b + 1) / batches_per_epoch,
                }, step=step)
                log.info("epoch %d step %d/%d loss %.4f  %.1f samples/s  ETA %.0fs", epoch, b + 1, batches_per_epoch,
                         window["loss"] / window["n"], window["samples"] / max(dt, 1e-9),
                         (epochs - epoch - (b + 1) / batches_per_epoch) * batches_per_epoch * dt / window["n"])
                window = {"loss": 0.0, "n": 0, "t": time.perf_counter(), "wait": 0.0, "samples": 0}
            if is_main and out.routing is not None and step % rstats_every == 0:
                r = out.routing
                m = {"routing/entropy": float(r.entropy)}
                m.update({f"routing/entropy_block{blk}": float(v) for blk, v in zip(r.blocks, r.entropy_per_block)})
                m.update({f"routing/importance_last/e{j}": float(v) for j, v in enumerate(r.importance_last)})
                if out.imp_loss is not None:
                    m["train/imp_loss"] = float(out.imp_loss.detach())
                tracker.log_metrics(m, step=step)
            if eval_steps is not None and step % eval_steps == 0:
                run_eval(epoch)
        scheduler.step()
        if eval_steps is None and ((epoch + 1) % max(1, int(eval_every)) == 0 or epoch + 1 == epochs):
            run_eval(epoch)
        elif eval_steps is not None and step % eval_steps != 0 and epoch + 1 == epochs:
            run_eval(epoch)
        if is_main:
            tracker.try_flush()
        ck.save_checkpoint(run_dir, step, model=model, optimizer=optimizer, scheduler=scheduler, epoch=epoch,
                           data_state={"epoch": epoch, "batches_per_epoch": batches_per_epoch}, best=best,
                           extra={"unlogged_metrics": tracker.pending_metrics() if is_main else []},
                           keep_last=int(tr.get("keep_checkpoints", 2)), is_main_process=is_main)
        last_epoch_run = epoch

    finished = last_epoch_run + 1 >= epochs
    summary: dict[str, Any] = {"step": step, "epochs_done": last_epoch_run + 1, "finished": finished,
                               "best": best, "run_dir": str(run_dir)}
    if not finished:
        return summary
    # test: the last weights, then the selected (best-val) adapter
    last = evaluate(engine, test_loader, task, cache, "test", world_size)
    final = {f"final/test_{k}_last": v for k, v in last.items() if k != "n"}
    if best_dir.is_dir():
        if best["step"] == step:  # the selected adapter was saved from these very weights: same scores
            sel = last
        else:
            from mope.adapter_io import load_adapter

            load_adapter(model, best_dir)
            sel = evaluate(engine, test_loader, task, cache, "test", world_size)
        final.update({f"final/test_{k}": v for k, v in sel.items() if k != "n"})
    final[f"final/val_{objective}_best"] = best["value"]
    final["final/best_step"] = float(best["step"])
    wall = time.perf_counter() - t_run
    final["perf/train_samples_per_s"] = samples_total / max(step_time_total, 1e-9)
    final["perf/data_wait_frac"] = data_wait_total / max(step_time_total, 1e-9)
    final["perf/wall_s"] = wall
    final["perf/peak_mem_mb"] = _peak_mem_mb()
    if is_main:
        tracker.log_metrics(final, step=step)
        save_adapter(model, run_dir / "adapter", extra={"step": best["step"], "selected_by": best["metric"]})
        tracker.log_artifact(str(run_dir / "adapter"), "adapter")
    summary.update(final)
    return summary


def _peak_mem_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
