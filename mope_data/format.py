"""The shard contract, read side: the one place that says what ``harness prep`` writes and how it is read back.

Layout of one dataset directory (written by :mod:`datasets_prep.writer` with the names defined here)::

    ROOT/dataset.json                     {dataset, task, labels, splits, converter_version, modalities?, ...}
    ROOT/labels.txt                       one label name per line
    ROOT/<split>/manifest.json            {dataset, split, task, labels, num_samples, shards: [{file, count, sha256}],
                                           class_histogram, modalities, skipped, ...}
    ROOT/<split>/<dataset>-<split>-000000.tar, ...
    ROOT/<split>/fewshot/seed-<s>/shots-<n>.json             nested few-shot subsets (datasets_prep.fewshot)
    ROOT/<split>/fewshot/stratified-seed-<s>/shots-<n>.json

Each tar holds webdataset samples: members ``{key}.{ext}`` grouped by key (consecutive members), keys of
``[A-Za-z0-9_-]`` (webdataset splits key and extension at the *first* dot), extensions lower case and possibly
multi-part (``f00.png``: video frame 0). Every sample has a ``json`` member with at least ``id`` and ``label`` (an int
for ``single_label``, a list of ints for ``multi_label``). Images are ``jpg``/``png``/..., text ``txt`` (UTF-8), audio
``wav``/``flac``, video frames ``f00.png``, ``f01.png``, ... (:func:`frame_member`).
"""

from __future__ import annotations

import hashlib
import json
import re
import tarfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "AUDIO_EXTS",
    "DATASET_INFO",
    "EXT_RE",
    "FRAME_RE",
    "IMAGE_EXTS",
    "KEY_RE",
    "MANIFEST",
    "MODALITY_EXTS",
    "TASKS",
    "DatasetInfo",
    "MissingShardsError",
    "ShardFormatError",
    "dataset_info",
    "fewshot_path",
    "frame_member",
    "iter_tar_samples",
    "read_fewshot",
    "read_json",
    "read_manifest",
    "read_samples",
    "read_split_index",
    "sha256_file",
    "shard_paths",
    "split_member",
]

MANIFEST = "manifest.json"
DATASET_INFO = "dataset.json"
TASKS = ("single_label", "multi_label")
KEY_RE = re.compile(r"^[A-Za-z0-9_-]+$")
EXT_RE = re.compile(r"^[a-z0-9]+(?:\.[a-z0-9]+)*$")  # "jpg", "txt", "f00.png" (multi-part, no leading dot)
IMAGE_EXTS = ("jpg", "jpeg", "png", "bmp", "gif", "webp", "tif", "tiff", "ppm")
AUDIO_EXTS = ("wav", "flac", "ogg")
FRAME_EXTS = ("png", "jpg", "jpeg", "webp", "bmp")
FRAME_RE = re.compile(r"^f(\d+)\.(?:png|jpg|jpeg|webp|bmp)$")  # video frame members, see frame_member()
MODALITY_EXTS = {"image": IMAGE_EXTS, "text": ("txt",), "audio": AUDIO_EXTS}


class ShardFormatError(ValueError):
    """Shards, manifest, dataset info or few-shot index unreadable or inconsistent; the message names the file and
    the command that fixes it."""


class MissingShardsError(ShardFormatError, FileNotFoundError):
    """A manifest / dataset directory that should exist does not (the shards were not built)."""


def frame_member(i: int, ext: str = "png") -> str:
    """Member extension of video frame ``i`` of a sample: ``f00.png``, ``f01.png``, ... (read back by FRAME_RE)."""
    if ext not in FRAME_EXTS:
        raise ShardFormatError(f"frame extension {ext!r}: use one of {FRAME_EXTS}")
    return f"f{int(i):02d}.{ext}"


def split_member(name: str) -> tuple[str, str]:
    """``"key.ext.more"`` -> ``("key", "ext.more")`` (webdataset's rule: the first dot)."""
    key, _, ext = name.partition(".")
    return key, ext


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in chunks (shards, manifests, checkpoints, adapters)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def read_json(path: str | Path, what: str = "file") -> dict:
    p = Path(path)
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MissingShardsError(f"{p}: {what} not found; build the shards with `harness prep` first") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ShardFormatError(f"{p}: invalid JSON ({e}); re-run `harness prep`") from None


def read_manifest(split_dir: str | Path) -> dict:
    """``split_dir/manifest.json``; :class:`MissingShardsError` / :class:`ShardFormatError` naming the file."""
    p = Path(split_dir) / MANIFEST
    if not p.is_file():
        raise MissingShardsError(
            f"{p}: no manifest.json; is {split_dir} a split directory written by `harness prep`? "
            "Build the shards with `harness prep` first"
        )
    m = read_json(p, "manifest")
    if not isinstance(m.get("shards"), list):
        raise ShardFormatError(f"{p}: no 'shards' list; re-run `harness prep`")
    return m


def shard_paths(split_dir: str | Path, manifest: dict) -> list[str]:
    """The shard files of a split, in manifest order."""
    return [str(Path(split_dir) / sh["file"]) for sh in manifest["shards"]]


@dataclass
class DatasetInfo:
    name: str
    task: str
    labels: list[str]
    modalities: tuple[str, ...]
    root: Path
    extra: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.labels)


def dataset_info(data_dir: str | Path, split: str = "train") -> DatasetInfo:
    """Name, task, labels and modalities of a dataset directory (``dataset.json``, else a split's manifest)."""
    root = Path(data_dir)
    info = read_json(root / DATASET_INFO) if (root / DATASET_INFO).is_file() else {}
    m = read_manifest(root / split) if (root / split / MANIFEST).is_file() else {}
    if not info and not m:
        raise MissingShardsError(f"{root}: neither {DATASET_INFO} nor {split}/{MANIFEST}; run `harness prep` first")
    return DatasetInfo(
        name=str(info.get("dataset") or m.get("dataset")),
        task=str(info.get("task") or m.get("task")),
        labels=list(info.get("labels") or m.get("labels")),
        modalities=tuple(m.get("modalities") or info.get("modalities") or ("image", "text")),
        root=root,
        extra=info,
    )


def iter_tar_samples(
    tar: tarfile.TarFile,
    name: str,
    problem: Callable[[str], None] | None = None,
    exts: Iterable[str] | None = None,
) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Group consecutive ``{key}.{ext}`` members into ``(key, {ext: bytes})`` samples, as webdataset does.

    ``exts``: read only these extensions (others are skipped without reading). Malformed members (not a file, no
    ``{key}.{ext}`` form, a key outside ``[A-Za-z0-9_-]``, a duplicate member) go to ``problem`` when given (the
    verifier collects them), else raise :class:`ShardFormatError` naming the shard."""

    def bad(msg: str) -> None:
        if problem is None:
            raise ShardFormatError(f"{name}: {msg}; run `harness prep --verify` on the shard directory")
        problem(f"{name}: {msg}")

    want = None if exts is None else set(exts)
    cur_key: str | None = None
    cur: dict[str, bytes] = {}
    for ti in tar:
        if not ti.isfile():
            bad(f"non-file member {ti.name!r}")
            continue
        if "/" in ti.name or "." not in ti.name:
            bad(f"member {ti.name!r} is not '{{key}}.{{ext}}'")
            continue
        key, ext = split_member(ti.name)
        if not KEY_RE.match(key):
            bad(f"key {key!r} has characters outside [A-Za-z0-9_-]")
        if key != cur_key:
            if cur_key is not None:
                yield cur_key, cur
            cur_key, cur = key, {}
        if want is not None and ext.lower() not in want:
            continue
        if ext in cur:
            bad(f"duplicate member {ti.name!r}")
        f = tar.extractfile(ti)
        assert f is not None
        cur[ext] = f.read()
    if cur_key is not None:
        yield cur_key, cur


def _open_shard(path: str) -> tarfile.TarFile:
    if not Path(path).is_file():
        raise MissingShardsError(f"{path}: shard listed in manifest.json is missing; re-run `harness prep`")
    return tarfile.open(path, mode="r:")


def read_samples(split_dir: str | Path, manifest: dict, keys: list[str]) -> list[dict]:
    """Raw samples (``{"__key__", "__url__", ext: bytes}``, webdataset's form) of ``keys``, in that order."""
    want = set(keys)
    found: dict[str, dict] = {}
    for u in shard_paths(split_dir, manifest):
        with _open_shard(u) as tar:
            for key, sample in iter_tar_samples(tar, u):
                if key in want:
                    found.setdefault(key, {"__key__": key, "__url__": u}).update(
                        {e.lower(): v for e, v in sample.items()}
                    )
    missing = [k for k in keys if k not in found]
    if missing:
        raise ShardFormatError(
            f"{split_dir}: {len(missing)} few-shot keys not in the shards (e.g. {missing[:3]}); "
            "rebuild the subset with `harness prep --fewshot`"
        )
    return [found[k] for k in keys]


def read_split_index(split_dir: str | Path) -> list[tuple[str, int | list[int]]]:
    """``[(key, label), ...]`` for every sample of a split, in shard order, read from the ``.json`` members only.

    Checks that the total matches ``manifest.json``'s ``num_samples`` and that no key repeats."""
    split_dir = Path(split_dir)
    m = read_manifest(split_dir)
    out: list[tuple[str, int | list[int]]] = []
    for path in shard_paths(split_dir, m):
        with _open_shard(path) as tar:
            for key, sample in iter_tar_samples(tar, path, exts=("json",)):
                if "json" not in sample:
                    continue
                try:
                    meta = json.loads(sample["json"].decode("utf-8"))
                except (UnicodeDecodeError, json.JSONDecodeError) as e:
                    raise ShardFormatError(f"{path}: member {key}.json: invalid JSON ({e})") from None
                if not isinstance(meta, dict) or "label" not in meta:
                    raise ShardFormatError(f"{path}: member {key}.json has no 'label'; re-run `harness prep`")
                out.append((key, meta["label"]))
    if len(out) != m["num_samples"]:
        raise ShardFormatError(
            f"{split_dir}: read {len(out)} samples but manifest.json says {m['num_samples']}; "
            "run `harness prep --verify`"
        )
    if len({k for k, _ in out}) != len(out):
        raise ShardFormatError(f"{split_dir}: duplicate sample keys; run `harness prep --verify`")
    return out


def fewshot_path(split_dir: str | Path, shots: int, seed: int = 0, stratified: bool = False) -> Path:
    """Where the ``shots``-example subset of a split lives (written by :func:`datasets_prep.fewshot.build_fewshot`)."""
    sub = f"stratified-seed-{seed}" if stratified else f"seed-{seed}"
    return Path(split_dir) / "fewshot" / sub / f"shots-{int(shots)}.json"


def read_fewshot(split_dir: str | Path, shots: int, seed: int = 0, stratified: bool = False) -> dict:
    """Load a subset index; a clear error naming the command that builds it when missing or stale."""
    p = fewshot_path(split_dir, shots, seed, stratified)
    hint = (
        f"harness prep --fewshot {Path(split_dir).parent} --split {Path(split_dir).name} --shots {shots} "
        f"--seed {seed}{' --stratified' if stratified else ''}"
    )
    if not p.is_file():
        raise MissingShardsError(f"{p}: few-shot subset not built; run `{hint}`")
    doc = read_json(p, "few-shot index")
    if doc.get("split_manifest_sha256") != sha256_file(Path(split_dir) / MANIFEST):
        raise ShardFormatError(f"{p}: built for another version of {split_dir}; re-run `{hint}`")
    return doc
