"""What one training run starts from: its identity and directory, its data, its seeds (used by :mod:`harness.recipe`,
the sweep driver and the benchmarks).

* :func:`config_id` / :func:`run_dir_of`: a run's directory is ``<run_root>/<run_name>/<config_id>``;
* :func:`prepare_data`, :func:`loader_config`, :func:`check_modalities`: the shards a run reads, how its loaders read
  them, and that they carry every modality the model reads (:class:`DataMismatchError` otherwise);
* :func:`seed_everything`: Python, NumPy and torch seeded together.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# how a run is started, not what it computes; `work_root`: where a sweep trial on a cluster keeps its run directory
# (node-local scratch, harness.cluster.scratch_root), set by the trial, never by a user's configuration
RUN_CONTROL_KEYS = ("overrides", "resume", "work_root")
UNLOGGED_METRICS_FILE = "unlogged_metrics.jsonl"  # see harness.tracking (store unavailable)


def config_id(cfg: dict[str, Any]) -> str:
    """Short hash of the resolved configuration (run-control keys excluded): a changed config is a different run."""
    import hashlib

    ident = {k: v for k, v in cfg.items() if k not in RUN_CONTROL_KEYS}
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:10]


def run_dir_of(cfg: dict[str, Any]) -> Path:
    """``<run_root>/<run_name>/<config_id>`` (``<work_root>/...`` for a cluster trial): runs that share a name but
    not a configuration never share checkpoints."""
    return Path(cfg.get("work_root") or cfg["paths"]["run_root"]) / cfg["run_name"] / config_id(cfg)


def tokenizer_for(text_cfg: dict[str, Any]) -> str | None:
    """The tokenizer matching the text encoder: its own directory, else the MiniLM package's (BERT uncased vocab)."""
    name = str(text_cfg.get("name") or "")
    if name and Path(name).is_dir() and any((Path(name) / f).exists() for f in ("vocab.txt", "tokenizer.json")):
        return name
    return None  # the loader's default: the offline MiniLM tokenizer (same 30,522-token uncased vocab as BERT-base)


def prepare_data(cfg: dict[str, Any]) -> Path | str:
    """The run's shard directory, checked: a local one (built first for the demo with ``data.auto_prepare``) as a
    Path; a remote one (``s3://...``, ``http(s)://...``) as its URL string, never built here (its
    ``train/manifest.json`` must exist: uploaded by ``harness prep NAME ... --out URL``)."""
    from mope_data.format import MissingShardsError, ShardFormatError, is_file, is_url, join

    d = cfg["data"]
    if is_url(d["shard_dir"]):
        url = str(d["shard_dir"]).rstrip("/")
        manifest = join(url, "train", "manifest.json")
        try:
            ok = is_file(manifest)
        except ShardFormatError as e:
            raise MissingShardsError(f"data.shard_dir={url}: {e}") from None
        if not ok:
            raise MissingShardsError(
                f"data.shard_dir={url}: no train/manifest.json at {manifest}; upload the shards with "
                f"`harness prep {d['name']} ... --out {url}` (remote shards are never built by a run)"
            )
        return url
    shard_dir = Path(d["shard_dir"])
    if d["name"] in ("demo", "ris_demo") and d.get("auto_prepare") and not (shard_dir / "dataset.json").is_file():
        # build only when nothing is there: an existing build (maybe a custom-sized one) is never replaced here
        if d["name"] == "demo":
            from datasets_prep.demo import ensure_demo as ensure
        else:
            from datasets_prep.ris_demo import ensure_ris_demo as ensure

        ensure(shard_dir)
    if not (shard_dir / "train" / "manifest.json").is_file():
        raise FileNotFoundError(
            f"data.shard_dir={shard_dir}: no train/manifest.json; run `harness prep {d['name']} --src RAW --out "
            f"{shard_dir}`"
        )
    return shard_dir


def test_splits(cfg: dict[str, Any]) -> list[str]:
    """The splits scored at the end (``data.test_splits``; default ``[test]``; RefCOCO: ``[val, testA, testB]``)."""
    splits = cfg["data"].get("test_splits") or ["test"]
    if isinstance(splits, str) or not all(isinstance(x, str) and x for x in splits):
        raise ValueError(f"data.test_splits={splits!r}: a list of split names, e.g. [test] or [val, testA, testB]")
    return list(splits)


def cached_splits(cfg: dict[str, Any]) -> list[str]:
    """Every split a run reads: train, val and the test splits (what a feature cache must hold)."""
    return ["train", "val", *(sp for sp in test_splits(cfg) if sp not in ("train", "val"))]


def loader_config(cfg: dict[str, Any], shard_dir: Path | str):
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


def check_modalities(fcfg, shard_dir: Path | str) -> None:
    """Before any model is built: every modality the method reads must be in the shards (manifest ``modalities``)."""
    from mope.methods import METHODS, reads_complementary
    from mope_data import dataset_info

    needed = [fcfg.main] if METHODS[fcfg.method].use_main else []
    if reads_complementary(fcfg):
        needed += fcfg.complementary_modalities
    have = dataset_info(shard_dir).modalities
    missing = [m for m in needed if SHARD_MODALITY[m] not in have]
    if missing:
        hint = {
            "video": "`harness prep mustard --opt frames=8` writes video frames",
            "audio": "`harness prep mustard` writes audio unless --opt no_audio=true",
            "vision": "this dataset has no images: pick model.main / model.complementary among its modalities",
            "text": "this dataset has no text",
        }
        raise DataMismatchError(
            f"data.shard_dir={shard_dir} carries {list(have)}, but the model reads {missing} (model.main="
            f"{fcfg.main}, model.complementary={fcfg.complementary_modalities}); "
            + "; ".join(hint[m] for m in missing)
            + ", or drop it from model.complementary"
        )
