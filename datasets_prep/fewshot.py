"""Few-shot subsets of a training split (the "#shots" axis of the paper's Fig. 5).

``n`` shots = the **total** number of training examples kept (not per class), as in the reference code
(``LowShotDataset``: ``np.random.choice`` over the whole training set, uniform, without replacement, not stratified).

Here the subsets are deterministic, seeded and **nested**, and saved as index manifests next to the shards:

- ``uniform`` (default, the reference's sampling distribution): every training key is ranked by
  ``sha256(f"{seed}:{key}")``; the ``n``-shot set is the first ``n`` keys of that order. Nested by construction
  (100-shot set ⊂ 1,000-shot set ⊂ ...), independent of shard layout and of the NumPy version.
- ``stratified`` (option): each class's keys are ranked the same way, then taken round-robin over the classes (class
  order also seeded); the ``n``-shot set is again a prefix, so it is nested and per-class counts differ by at most one
  (among classes that still have samples). For multi-label data a sample's stratum is its rarest label in the split.

Files: ``SPLIT_DIR/fewshot/seed-<s>/shots-<n>.json`` (uniform) or
``SPLIT_DIR/fewshot/stratified-seed-<s>/shots-<n>.json`` (see :func:`fewshot_path`), each ``{"dataset", "split",
"task", "strategy", "seed", "shots", "keys" (selection order), "class_histogram", "num_split_samples",
"split_manifest_sha256"}``. The loader (:mod:`mope_data.loaders`) reads the keys
(:func:`mope_data.format.read_fewshot`) and loads those samples into memory.

CLI hook: ``harness prep --fewshot SHARD_DIR --shots 100,1000 --seed 0 [--stratified] [--split train]``
(:func:`fewshot_main`); ``SHARD_DIR`` is a dataset directory (holding ``train/``) or a split directory.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from collections import Counter
from pathlib import Path

from datasets_prep.writer import PrepError
from mope_data.format import (
    MANIFEST,
    ShardFormatError,
    fewshot_path,
    read_fewshot,
    read_manifest,
    read_split_index,
    sha256_file,
)

__all__ = [
    "build_fewshot",
    "fewshot_main",
    "fewshot_order",
    "fewshot_path",
    "read_fewshot",
    "read_split_index",
]


def _rank(seed: int, item: str) -> str:
    return hashlib.sha256(f"{seed}:{item}".encode()).hexdigest()


def _stratum(label: int | list[int], freq: Counter) -> int:
    if isinstance(label, list):
        if not label:
            return -1
        return min(label, key=lambda c: (freq[c], c))  # rarest label of the sample
    return int(label)


def fewshot_order(index: list[tuple[str, int | list[int]]], seed: int, stratified: bool = False) -> list[str]:
    """The full selection order of a split's keys; the ``n``-shot set is its first ``n`` keys (hence nested)."""
    if not stratified:
        return [k for k, _ in sorted(index, key=lambda kl: (_rank(seed, kl[0]), kl[0]))]
    freq: Counter = Counter()
    for _, lab in index:
        freq.update(lab if isinstance(lab, list) else [lab])
    groups: dict[int, list[str]] = {}
    for key, lab in index:
        groups.setdefault(_stratum(lab, freq), []).append(key)
    for g in groups.values():
        g.sort(key=lambda k: (_rank(seed, k), k))
    classes = sorted(groups, key=lambda c: (_rank(seed, f"class:{c}"), c))
    order: list[str] = []
    depth = max(len(g) for g in groups.values()) if groups else 0
    for r in range(depth):
        for c in classes:
            if r < len(groups[c]):
                order.append(groups[c][r])
    return order


def build_fewshot(split_dir: Path, shots: list[int], seed: int = 0, stratified: bool = False) -> list[Path]:
    """Write the nested ``shots``-example subsets of ``split_dir``; returns the manifest paths (idempotent)."""
    split_dir = Path(split_dir)
    m = read_manifest(split_dir)
    index = read_split_index(split_dir)
    labels = dict(index)
    order = fewshot_order(index, seed, stratified)
    names = m["labels"]
    man_sha = sha256_file(split_dir / MANIFEST)
    paths = []
    for n in sorted({int(s) for s in shots}):
        if n < 1 or n > len(order):
            raise PrepError(f"--shots {n}: must be between 1 and the split size {len(order)} ({split_dir})")
        keys = order[:n]
        hist: Counter = Counter()
        for k in keys:
            lab = labels[k]
            hist.update(lab if isinstance(lab, list) else [lab])
        doc = {
            "dataset": m["dataset"],
            "split": m["split"],
            "task": m["task"],
            "strategy": "stratified" if stratified else "uniform",
            "seed": int(seed),
            "shots": n,
            "keys": keys,
            "class_histogram": {names[i]: hist.get(i, 0) for i in range(len(names))},
            "num_split_samples": len(order),
            "split_manifest_sha256": man_sha,
        }
        p = fewshot_path(split_dir, n, seed, stratified)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f".{p.name}.tmp")
        tmp.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        os.replace(tmp, p)
        paths.append(p)
    return paths


def _resolve_split_dir(shard_dir: Path, split: str) -> Path:
    shard_dir = Path(shard_dir)
    if (shard_dir / MANIFEST).is_file():
        return shard_dir
    if (shard_dir / split / MANIFEST).is_file():
        return shard_dir / split
    raise PrepError(f"{shard_dir}: neither a split directory nor a dataset directory with {split}/manifest.json")


def fewshot_main(argv: list[str] | None = None) -> int:
    """``harness prep --fewshot SHARD_DIR --shots 100,1000 [--seed 0] [--stratified] [--split train]``."""
    ap = argparse.ArgumentParser(prog="harness prep --fewshot", description=__doc__.split("\n\n")[0])
    ap.add_argument("--fewshot", dest="shard_dir", metavar="SHARD_DIR", help="dataset dir (with train/) or split dir")
    ap.add_argument("dir", nargs="?", help=argparse.SUPPRESS)
    ap.add_argument("--shots", required=True, help="comma-separated totals, e.g. 100,1000,10000")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stratified", action="store_true", help="class-stratified (default: uniform, as the reference)")
    ap.add_argument("--split", default="train")
    a = ap.parse_args(argv)
    shard_dir = a.shard_dir or a.dir
    if not shard_dir:
        ap.error("SHARD_DIR is required")
    try:
        shots = [int(x) for x in a.shots.split(",") if x.strip()]
    except ValueError:
        ap.error(f"--shots {a.shots!r}: expected comma-separated integers")
    try:
        split_dir = _resolve_split_dir(Path(shard_dir), a.split)
        paths = build_fewshot(split_dir, shots, seed=a.seed, stratified=a.stratified)
    except ShardFormatError as e:
        print(f"harness prep --fewshot: error: {e}", file=sys.stderr)
        return 2
    for p in paths:
        doc = json.loads(p.read_text(encoding="utf-8"))
        print(
            json.dumps(
                {
                    "path": str(p),
                    "shots": doc["shots"],
                    "strategy": doc["strategy"],
                    "class_histogram": doc["class_histogram"],
                }
            )
        )
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(fewshot_main())
