"""Deterministic webdataset shard writer shared by every converter.

Layout written for one dataset::

    OUT/labels.txt                       one label name per line
    OUT/dataset.json                     {dataset, task, labels, splits, converter_version, ...}
    OUT/<split>/<dataset>-<split>-000000.tar, -000001.tar, ...
    OUT/<split>/manifest.json

Each tar holds webdataset samples: members ``{key}.{ext}`` grouped by key, members of one sample in sorted extension
order. Keys match ``[A-Za-z0-9_-]+`` (webdataset splits key and extension at the *first* dot, so a dot in a key would
break grouping; see :func:`sanitize_key`). The rules and names (``KEY_RE``, ``EXT_RE``, ``MANIFEST``, the manifest
reader) live in :mod:`mope_data.format`, the read side of the same contract; this module writes with them.

Determinism: tar headers carry a fixed mtime (0), uid/gid 0, empty user/group names and mode 0444 (USTAR format);
JSON is written with sorted keys; nothing records wall-clock time. Converting the same input twice therefore gives
byte-identical shards and manifests, provided the converter writes samples in a deterministic order.

Converters: :func:`write_dataset` is the skeleton every converter runs. A converter parses its raw annotation files
into one :class:`SplitPlan` per output split (raw entries in canonical order + the :class:`BadInputs` found while
parsing) and gives a function mapping one raw entry to a :class:`Record` (key, members, json meta); that function
loads the media and may raise :class:`PrepError` for a bad input. The skeleton owns the rest: a writer per split,
the seeded shuffle, the progress bar, the bad-input policy (``--skip-bad``: skip and count; else stop with
:data:`SKIP_HINT`), ``labels.txt`` + ``dataset.json`` and the summary returned to ``harness prep``.

Atomicity: :class:`ShardSetWriter` writes into a hidden temporary directory next to ``OUT/<split>`` and renames it into
place only after every shard and the manifest are complete. An existing ``OUT/<split>`` is replaced only then. On an
exception the temporary directory is deleted and the previous output is left untouched.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import sys
import tarfile
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

from mope_data.format import (
    EXT_RE,
    KEY_RE,
    MANIFEST,
    TASKS,
    ShardFormatError,
    read_manifest,
    sha256_file,
)

__all__ = [
    "KEY_RE",
    "MAX_SKIP_EXAMPLES",
    "SKIP_HINT",
    "TASKS",
    "BadInputs",
    "DatasetSpec",
    "PrepError",
    "Record",
    "ShardSetWriter",
    "SplitPlan",
    "bad_from_error",
    "deterministic_shuffle",
    "effective_shard_size",
    "handle_bad",
    "load_audio_wav",
    "load_image",
    "option_bool",
    "option_list",
    "progress",
    "read_labels_file",
    "read_manifest",
    "sanitize_key",
    "sha256_file",
    "sha256_files",
    "source_fingerprint",
    "write_dataset",
    "write_dataset_info",
    "write_split",
]

MAX_SKIP_EXAMPLES = 20
# USTAR member names are limited to 100 bytes (no '/' in keys, so the 155-byte prefix field cannot be used).
_MAX_KEY_LEN = 80
_HASH_LEN = 10
_TAR_MTIME = 0
_TAR_MODE = 0o444


class PrepError(ShardFormatError):
    """Bad raw input or bad converter usage; the message names the file/key and the fix.

    ``reason`` is a short category ("missing image", "undecodable audio", ...) used to count skipped samples.
    """

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason or message


def _short_hash(raw: str) -> str:
    return hashlib.sha1(raw.encode("utf-8", "surrogatepass")).hexdigest()[:_HASH_LEN]


def sanitize_key(raw: str) -> str:
    """Map an original sample id to a webdataset key made of ``[A-Za-z0-9_-]`` only.

    Unchanged when ``raw`` is already valid (and at most 80 characters). Otherwise every other character is replaced
    with ``_`` and ``_<10 hex chars of sha1(raw)>`` is appended, so that ids differing only in replaced characters
    (``a.b`` vs ``a_b`` vs ``a b``) still get distinct keys. Deterministic. Over-long ids are truncated before the
    hash.
    """
    raw = str(raw)
    if raw and len(raw) <= _MAX_KEY_LEN and KEY_RE.match(raw):
        return raw
    base = re.sub(r"[^A-Za-z0-9_-]", "_", raw)[: _MAX_KEY_LEN - _HASH_LEN - 1]
    return f"{base}_{_short_hash(raw)}" if base else f"k{_short_hash(raw)}"


def sha256_files(paths: Iterable[Path], root: Path | None = None) -> str:
    """One sha256 over (relative name, content) of several files, in the given order; missing files are skipped.

    Converters use it for ``source_checksum`` over the annotation files (not the media, which would be slow).
    """
    h = hashlib.sha256()
    for p in paths:
        p = Path(p)
        if not p.is_file():
            continue
        name = str(p.relative_to(root)) if root is not None else p.name
        h.update(name.encode() + b"\0")
        h.update(sha256_file(p).encode() + b"\n")
    return h.hexdigest()


T = TypeVar("T")


def progress(it: Iterable[T], total: int | None = None, desc: str = "") -> Iterator[T]:
    """A tqdm bar on stderr (rate + ETA). Falls back to a line every 10% when tqdm is not installed."""
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        return _plain_progress(it, total, desc)
    return iter(tqdm(it, total=total, desc=desc, file=sys.stderr, mininterval=1.0, unit="sample", dynamic_ncols=True))


def _plain_progress(it: Iterable[T], total: int | None, desc: str) -> Iterator[T]:  # pragma: no cover
    import time

    t0 = time.monotonic()
    step = max(1, (total or 0) // 10) if total else 1000
    for i, x in enumerate(it, 1):
        yield x
        if i % step == 0:
            dt = time.monotonic() - t0
            rate = i / dt if dt > 0 else 0.0
            eta = f", eta {((total - i) / rate):.0f}s" if total and rate else ""
            print(f"[{desc}] {i}/{total or '?'} ({rate:.1f}/s{eta})", file=sys.stderr)


def _encode(key: str, ext: str, value: Any) -> bytes:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        return value.encode("utf-8")
    if ext == "json" or isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value).encode()
    raise PrepError(f"sample {key!r}: cannot encode field {ext!r} of type {type(value).__name__}")


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    ti.mtime = _TAR_MTIME
    ti.mode = _TAR_MODE
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = ""
    ti.type = tarfile.REGTYPE
    tar.addfile(ti, io.BytesIO(data))


class ShardSetWriter:
    """Write one split of one dataset as deterministic webdataset shards plus ``manifest.json``.

    Use as a context manager::

        with ShardSetWriter(out, "train", dataset="food101", task="single_label", labels=names) as w:
            w.write(sanitize_key(orig_id), {"jpg": jpeg_bytes, "txt": text, "json": {"id": orig_id, "label": 3}})
            w.skip("missing image", "images/train/x/y.jpg")

    ``sample`` maps an extension to a value: bytes (``jpg``/``png``/``wav``/...), str (``txt``, utf-8), dict (``json``,
    sorted keys). ``sample["json"]`` must hold ``"id"`` (the original id) and ``"label"`` (an int index for
    ``single_label``; a list of distinct int indices for ``multi_label``).
    """

    def __init__(
        self,
        out_dir: Path,
        split: str,
        *,
        dataset: str,
        task: str,
        labels: list[str],
        shard_size: int = 1000,
        source_checksum: str = "",
        converter_version: str = "1",
        modalities: tuple[str, ...] = ("image", "text"),
        extra: dict | None = None,
    ) -> None:
        if not split or not KEY_RE.match(split):
            raise PrepError(f"split name {split!r} must match [A-Za-z0-9_-]+")
        if not dataset or not KEY_RE.match(dataset):
            raise PrepError(f"dataset name {dataset!r} must match [A-Za-z0-9_-]+")
        if task not in TASKS:
            raise PrepError(f"task {task!r} must be one of {TASKS}")
        if int(shard_size) < 1:
            raise PrepError(f"shard_size must be >= 1, got {shard_size}")
        labels = [str(x) for x in labels]
        if not labels:
            raise PrepError("labels must not be empty")
        if len(set(labels)) != len(labels):
            dup = sorted(k for k, v in Counter(labels).items() if v > 1)
            raise PrepError(f"duplicate label names: {dup}")
        self.out_dir = Path(out_dir)
        self.split = split
        self.dataset = dataset
        self.task = task
        self.labels = labels
        self.shard_size = int(shard_size)
        self.source_checksum = source_checksum
        self.converter_version = str(converter_version)
        self.modalities = tuple(modalities)
        self.extra = dict(extra or {})
        self._keys: set[str] = set()
        self._hist = [0] * len(labels)
        self._shards: list[dict] = []
        self._tar: tarfile.TarFile | None = None
        self._tar_file: Any = None
        self._tar_count = 0
        self._skip_counts: Counter[str] = Counter()
        self._skip_examples: list[str] = []
        self._warn_counts: Counter[str] = Counter()
        self._warn_examples: list[str] = []
        self._ids: set[str] = set()
        self._tmp: Path | None = None
        self._closed = False
        self.num_samples = 0

    # -- context manager -------------------------------------------------------------------------------------------
    def __enter__(self) -> ShardSetWriter:  # noqa: PYI034
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._recover_stale()
        self._tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{self.split}-", dir=self.out_dir))
        return self

    def _recover_stale(self) -> None:
        """Clean up after a writer of this split that was killed (SIGKILL, power loss) instead of raising: delete its
        half-written ``.tmp-<split>-*`` dir; if it died between its two renames, put the previous set back first."""
        final = self.out_dir / self.split
        olds = sorted(self.out_dir.glob(f".old-{self.split}-*"))
        if not final.exists() and olds and (olds[-1] / MANIFEST).is_file():
            os.replace(olds[-1], final)
            olds = olds[:-1]
        for d in [*olds, *self.out_dir.glob(f".tmp-{self.split}-*")]:
            shutil.rmtree(d, ignore_errors=True)

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None:
            self._abort()
            return False
        try:
            self._finish()
        except BaseException:
            self._abort()
            raise
        return False

    # -- public ----------------------------------------------------------------------------------------------------
    @property
    def skipped(self) -> int:
        return sum(self._skip_counts.values())

    def write(self, key: str, sample: dict) -> None:
        if self._tmp is None or self._closed:
            raise PrepError("ShardSetWriter.write() called outside its `with` block")
        if not isinstance(key, str) or not KEY_RE.match(key):
            raise PrepError(
                f"sample key {key!r} is not a valid shard key ([A-Za-z0-9_-]+); pass it through sanitize_key()"
            )
        if key in self._keys:
            raise PrepError(f"duplicate sample key {key!r} in split {self.split!r} of {self.dataset!r}")
        meta = sample.get("json")
        if not isinstance(meta, dict) or "id" not in meta or "label" not in meta:
            raise PrepError(f"sample {key!r}: sample['json'] must be a dict with 'id' and 'label'")
        idx = self._check_label(key, meta["label"])
        for ext in sample:
            if not isinstance(ext, str) or not EXT_RE.match(ext):
                raise PrepError(f"sample {key!r}: field name {ext!r} must match [a-z0-9]+(.[a-z0-9]+)*")
        payload = [(ext, _encode(key, ext, sample[ext])) for ext in sorted(sample)]

        if self._tar is None:
            self._open_shard()
        assert self._tar is not None
        for ext, data in payload:
            _add_member(self._tar, f"{key}.{ext}", data)
        self._keys.add(key)
        self._ids.add(str(meta["id"]))
        for i in idx:
            self._hist[i] += 1
        self.num_samples += 1
        self._tar_count += 1
        if self._tar_count >= self.shard_size:
            self._close_shard()

    def skip(self, reason: str, where: str) -> None:
        """Record one bad input skipped under ``--skip-bad`` (counted per reason; first 20 examples kept)."""
        self._skip_counts[str(reason)] += 1
        if len(self._skip_examples) < MAX_SKIP_EXAMPLES:
            self._skip_examples.append(f"{where}: {reason}")

    def warn(self, reason: str, where: str) -> None:
        """Record a sample that was written but deserves a look (e.g. text decoded as cp1252, an id also in another
        split): counted per reason in the manifest's ``warnings`` and printed by ``harness prep``."""
        self._warn_counts[str(reason)] += 1
        if len(self._warn_examples) < MAX_SKIP_EXAMPLES:
            self._warn_examples.append(f"{where}: {reason}")

    @property
    def warnings(self) -> dict:
        return {
            "count": sum(self._warn_counts.values()),
            "by_reason": dict(sorted(self._warn_counts.items())),
            "examples": list(self._warn_examples),
        }

    # -- internals -------------------------------------------------------------------------------------------------
    def _check_label(self, key: str, label: Any) -> list[int]:
        n = len(self.labels)

        def ok(x: Any) -> bool:
            return isinstance(x, int) and not isinstance(x, bool) and 0 <= x < n

        if self.task == "single_label":
            if not ok(label):
                raise PrepError(
                    f"sample {key!r}: label {label!r} is not an int index in [0, {n}) "
                    f"for single_label {self.dataset!r}"
                )
            return [label]
        if not isinstance(label, list) or not all(ok(x) for x in label):
            raise PrepError(
                f"sample {key!r}: label {label!r} must be a list of int indices in [0, {n}) "
                f"for multi_label {self.dataset!r}"
            )
        if len(set(label)) != len(label):
            raise PrepError(f"sample {key!r}: label {label!r} repeats an index")
        return list(label)

    def _shard_name(self, i: int) -> str:
        return f"{self.dataset}-{self.split}-{i:06d}.tar"

    def _open_shard(self) -> None:
        assert self._tmp is not None
        name = self._shard_name(len(self._shards))
        self._tar_file = open(self._tmp / name, "wb")  # noqa: SIM115 (kept open across write() calls)
        self._tar = tarfile.open(fileobj=self._tar_file, mode="w", format=tarfile.USTAR_FORMAT)  # noqa: SIM115
        self._shards.append({"file": name, "count": 0, "sha256": ""})
        self._tar_count = 0

    def _close_shard(self) -> None:
        if self._tar is None:
            return
        assert self._tmp is not None
        self._tar.close()
        self._tar_file.close()
        self._tar = self._tar_file = None
        rec = self._shards[-1]
        rec["count"] = self._tar_count
        rec["sha256"] = sha256_file(self._tmp / rec["file"])
        self._tar_count = 0

    def manifest(self) -> dict:
        m = {
            "dataset": self.dataset,
            "split": self.split,
            "task": self.task,
            "labels": list(self.labels),
            "modalities": list(self.modalities),
            "num_samples": self.num_samples,
            "shards": [dict(s) for s in self._shards],
            "class_histogram": {name: self._hist[i] for i, name in enumerate(self.labels)},
            "source_checksum": self.source_checksum,
            "converter_version": self.converter_version,
            "skipped": {
                "count": self.skipped,
                "by_reason": dict(sorted(self._skip_counts.items())),
                "examples": list(self._skip_examples),
            },
        }
        if self._warn_counts:  # only when there are some: manifests without warnings stay as they were
            m["warnings"] = self.warnings
        clash = sorted(set(self.extra) & set(m))
        if clash:
            raise PrepError(f"manifest extra keys {clash} clash with the standard manifest fields")
        m.update(self.extra)
        return m

    def _check_split_leak(self) -> None:
        """Warn when a sample id of this split is also in another split of the same output written by this process
        (train/test overlap inflates test scores). Recorded per split in the manifest's ``warnings``."""
        key = str(self.out_dir.resolve())
        others = _SPLIT_IDS.setdefault(key, {})
        if self.split in others:  # this split is written again: a new conversion, forget the previous one's
            others.clear()
        for other, ids in sorted(others.items()):
            if other == self.split:
                continue
            both = sorted(self._ids & ids)
            if not both:
                continue
            reason = f"split leak: sample id also in split {other!r}"
            for sid in both:
                self.warn(reason, f"id {sid!r}")
            print(
                f"warning: {len(both)} sample id(s) of split {self.split!r} are also in split {other!r} of "
                f"{self.out_dir} (split leak), e.g. {both[:3]}; check the raw split lists (counted in "
                f"{self.split}/manifest.json under 'warnings')",
                file=sys.stderr,
            )
        others[self.split] = set(self._ids)

    def _finish(self) -> None:
        assert self._tmp is not None
        self._close_shard()
        self._check_split_leak()
        _write_json(self._tmp / MANIFEST, self.manifest())
        self._closed = True
        final = self.out_dir / self.split
        old: Path | None = None
        if final.exists() or final.is_symlink():
            old = Path(tempfile.mkdtemp(prefix=f".old-{self.split}-", dir=self.out_dir))
            os.rmdir(old)
            os.replace(final, old)
        try:
            os.replace(self._tmp, final)
        except BaseException:
            if old is not None:  # put the previous complete set back
                os.replace(old, final)
            raise
        self._tmp = None
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def _abort(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError, tarfile.TarError):
            if self._tar is not None:
                self._tar.close()
        with contextlib.suppress(OSError):
            if self._tar_file is not None:
                self._tar_file.close()
        self._tar = self._tar_file = None
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None


# out_dir -> split -> sample ids written by this process (for the split-leak warning).
_SPLIT_IDS: dict[str, dict[str, set[str]]] = {}


def _write_json(path: Path, obj: Any) -> None:
    text = json.dumps(obj, sort_keys=True, indent=2, ensure_ascii=False) + "\n"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_dataset_info(
    out: Path,
    *,
    dataset: str,
    task: str,
    labels: list[str],
    splits: dict[str, int] | list[str],
    converter_version: str = "1",
    extra: dict | None = None,
) -> None:
    """Write ``out/labels.txt`` (one name per line, final newline) and ``out/dataset.json``.

    ``splits`` is ``{split: num_samples}`` (or a list of split names).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".labels.txt.tmp"
    tmp.write_text("".join(f"{x}\n" for x in labels), encoding="utf-8")
    os.replace(tmp, out / "labels.txt")
    info = {
        "dataset": dataset,
        "task": task,
        "labels": list(labels),
        "splits": dict(splits) if isinstance(splits, dict) else list(splits),
        "converter_version": str(converter_version),
    }
    for k, v in (extra or {}).items():
        if k in info:
            raise PrepError(f"dataset.json extra key {k!r} clashes with a standard field")
        info[k] = v
    _write_json(out / "dataset.json", info)


def read_labels_file(path: Path) -> list[str]:
    """Labels file: one name per line; strips surrounding whitespace and \\r, ignores blank lines, rejects
    duplicates."""
    path = Path(path)
    if not path.is_file():
        raise PrepError(f"{path}: labels file not found")
    names = [ln.strip() for ln in path.read_text(encoding="utf-8-sig").splitlines()]
    names = [n for n in names if n]
    dup = sorted(k for k, v in Counter(names).items() if v > 1)
    if dup:
        raise PrepError(f"{path}: duplicate label names {dup}")
    if not names:
        raise PrepError(f"{path}: no labels")
    return names


# ---------------------------------------------------------------------------------------------------------------------
# Helpers shared by the converters
# ---------------------------------------------------------------------------------------------------------------------
SKIP_HINT = "fix the input, or re-run with --skip-bad to skip such samples (they are counted in manifest.json)"


def handle_bad(writer: ShardSetWriter | None, skip_bad: bool, reason: str, where: str, detail: str = "") -> None:
    """Bad raw input: raise a :class:`PrepError` naming ``where`` and the fix, or (``skip_bad``) count it as skipped.

    ``reason`` is the category counted in the manifest; ``detail`` (optional) the specific message.
    """
    if not skip_bad or writer is None:
        raise PrepError(f"{where}: {detail or reason}; {SKIP_HINT}", reason=reason)
    writer.skip(reason, f"{where} ({detail})" if detail and detail != reason else where)


class BadInputs:
    """Bad raw inputs found before a split's writer exists (e.g. while listing/parsing annotations).

    ``add`` raises :class:`PrepError` at once unless ``skip_bad``; ``replay(writer)`` records the collected ones as
    skipped in that split's manifest.
    """

    def __init__(self, skip_bad: bool) -> None:
        self.skip_bad = skip_bad
        self.items: list[tuple[str, str, str]] = []

    def add(self, reason: str, where: str, detail: str = "") -> None:
        if not self.skip_bad:
            handle_bad(None, False, reason, where, detail)
        self.items.append((reason, where, detail))

    def replay(self, writer: ShardSetWriter) -> None:
        for reason, where, detail in self.items:
            handle_bad(writer, True, reason, where, detail)

    def __len__(self) -> int:
        return len(self.items)


def bad_from_error(writer: ShardSetWriter, skip_bad: bool, err: PrepError, where: str) -> None:
    """:func:`handle_bad` for a :class:`PrepError` raised by :func:`load_image` / :func:`load_audio_wav`."""
    handle_bad(writer, skip_bad, err.reason, where, str(err))


def option_bool(value: Any) -> bool:
    """A converter's boolean ``--opt`` value: a bool as is, else true for ``1/true/yes/y/on`` (any case)."""
    if isinstance(value, bool):
        return value
    return str(value).strip().lower() in ("1", "true", "yes", "y", "on")


def option_list(value: Any) -> list[str]:
    """A converter's list ``--opt`` value (``splits=train,test``): a list or tuple, else its string split at commas;
    items are stripped, empty ones dropped."""
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    return [str(x).strip() for x in items if str(x).strip()]


def effective_shard_size(n: int, shard_size: int, min_shards: int = 1) -> int:
    """``shard_size`` lowered so that ``n`` samples give at least ``min_shards`` shards (never below 1).

    Streaming with fewer shards than ranks x workers hangs a rank (webdataset#188), so converters default to
    ``min_shards=32`` even for small splits.
    """
    shard_size = max(1, int(shard_size))
    if min_shards and min_shards > 1 and n > 0:
        shard_size = min(shard_size, max(1, n // int(min_shards)))
    return shard_size


def deterministic_shuffle(items: list[T], seed: int) -> list[T]:
    """A seeded permutation of ``items`` (call it on a sorted list): shards then mix classes for streaming."""
    import random

    out = list(items)
    random.Random(int(seed)).shuffle(out)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# The converter skeleton: a converter maps raw entries to records; the loop, bad-input policy and summary live here
# ---------------------------------------------------------------------------------------------------------------------
E = TypeVar("E")


@dataclass(frozen=True)
class DatasetSpec:
    """What every split of one converted dataset shares: the names and fields written into each manifest and into
    ``dataset.json``."""

    dataset: str
    task: str
    labels: Sequence[str]
    converter_version: str = "1"
    modalities: tuple[str, ...] = ("image", "text")
    source_checksum: str = ""


@dataclass(frozen=True)
class Record:
    """One sample made from one raw entry: its shard ``key`` (already :func:`sanitize_key`-ed), its ``members``
    (extension -> value, everything but ``json``), its ``meta`` (the ``json`` member, with ``"id"`` and ``"label"``)
    and ``warnings`` (``(reason, where)`` pairs recorded with :meth:`ShardSetWriter.warn` when it is written)."""

    key: str
    members: dict[str, Any]
    meta: dict
    warnings: tuple[tuple[str, str], ...] = ()


@dataclass
class SplitPlan(Generic[E]):
    """One output split before writing: its raw ``entries`` in a canonical (sorted) order, the ``bad`` inputs found
    while listing them (replayed as skipped into its manifest) and the split's own manifest fields (``extra``)."""

    entries: Sequence[E]
    bad: BadInputs | None = None
    extra: dict = field(default_factory=dict)


def write_split(
    out: Path,
    split: str,
    plan: SplitPlan[E],
    record: Callable[[E], Record],
    *,
    spec: DatasetSpec,
    shard_size: int,
    min_shards: int,
    skip_bad: bool,
    seed: int | None,
    where: Callable[[E], str] = str,
    show_progress: bool = True,
) -> ShardSetWriter:
    """Write one split: ``record(entry)`` for each entry, lazily (media are loaded while writing, one at a time).

    With ``seed`` the entries are written in :func:`deterministic_shuffle` order (recorded as the manifest's
    ``order``); ``seed=None`` keeps their order. A :class:`PrepError` raised by ``record`` is bad input at
    ``where(entry)``: counted as skipped under ``skip_bad``, else raised with the fix (:func:`handle_bad`). Errors of
    the written record itself (bad key, label, field) are converter bugs and propagate. Returns the closed writer
    (``num_samples``, ``skipped``).
    """
    entries = list(plan.entries)
    extra = dict(plan.extra)
    if seed is not None:
        entries = deterministic_shuffle(entries, seed)
        extra["order"] = f"shuffled(seed={seed})"
    with ShardSetWriter(
        out,
        split,
        dataset=spec.dataset,
        task=spec.task,
        labels=list(spec.labels),
        shard_size=effective_shard_size(len(entries), shard_size, min_shards),
        source_checksum=spec.source_checksum,
        converter_version=spec.converter_version,
        modalities=spec.modalities,
        extra=extra,
    ) as w:
        if plan.bad is not None:
            plan.bad.replay(w)
        items = progress(entries, total=len(entries), desc=f"{spec.dataset}/{split}") if show_progress else entries
        for entry in items:
            try:
                rec = record(entry)
            except PrepError as err:
                bad_from_error(w, skip_bad, err, where(entry))
                continue
            for reason, at in rec.warnings:
                w.warn(reason, at)
            w.write(rec.key, {**rec.members, "json": rec.meta})
    return w


def write_dataset(
    out: Path,
    spec: DatasetSpec,
    splits: Mapping[str, SplitPlan[E]],
    record: Callable[[E], Record],
    *,
    where: Callable[[E], str],
    shard_size: int,
    min_shards: int,
    skip_bad: bool,
    seed: int,
    info_extra: dict | None = None,
    summary_extra: dict | None = None,
) -> dict:
    """Write every split of ``splits`` in its order with :func:`write_split`, then ``labels.txt`` and
    ``dataset.json`` (:func:`write_dataset_info`, with ``info_extra``).

    Returns the converter's summary for ``harness prep``: ``{"dataset", "out", "splits": {split: written},
    "skipped": {split: skipped}, **summary_extra}``.
    """
    out = Path(out)
    summary: dict = {"dataset": spec.dataset, "out": str(out), "splits": {}, "skipped": {}, **(summary_extra or {})}
    for split, plan in splits.items():
        w = write_split(
            out,
            split,
            plan,
            record,
            spec=spec,
            shard_size=shard_size,
            min_shards=min_shards,
            skip_bad=skip_bad,
            seed=seed,
            where=where,
        )
        summary["splits"][split] = w.num_samples
        summary["skipped"][split] = w.skipped
    write_dataset_info(
        out,
        dataset=spec.dataset,
        task=spec.task,
        labels=list(spec.labels),
        splits=summary["splits"],
        converter_version=spec.converter_version,
        extra=info_extra,
    )
    return summary


def load_image(path: Path, *, max_side: int = 0) -> tuple[str, bytes]:
    """Read an image file, check that it fully decodes, return ``(ext, bytes)``.

    JPEGs are returned as the original bytes (``"jpg"``); any other format is re-encoded losslessly as PNG (``"png"``).
    With ``max_side > 0`` an image whose longer side exceeds it is downscaled (LANCZOS) and re-encoded as JPEG q=95.
    Raises :class:`PrepError` (missing / unreadable / undecodable) with the path in the message.
    """
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise PrepError(f"missing image {path}", reason="missing image") from None
    except OSError as e:
        raise PrepError(f"unreadable image {path} ({e})", reason="unreadable image") from None
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            fmt = im.format
            if max_side and max(im.size) > max_side:
                im2 = im.convert("RGB")
                im2.thumbnail((max_side, max_side), Image.LANCZOS)
                buf = io.BytesIO()
                im2.save(buf, format="JPEG", quality=95)
                return "jpg", buf.getvalue()
            if fmt == "JPEG":
                return "jpg", data
            im2 = (
                im
                if im.mode in ("RGB", "RGBA", "L", "LA", "I;16")
                else im.convert("RGBA" if "A" in im.mode else "RGB")
            )
            buf = io.BytesIO()
            im2.save(buf, format="PNG", optimize=False)
            return "png", buf.getvalue()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise PrepError(f"undecodable image {path} ({type(e).__name__}: {e})", reason="undecodable image") from None


def load_audio_wav(path: Path, *, target_sr: int = 16000) -> tuple[bytes, float]:
    """Read an audio file (anything libsndfile reads), downmix to mono, resample to ``target_sr`` with
    ``scipy.signal.resample_poly``, return ``(PCM16 WAV bytes, duration_s)``. Deterministic (stdlib ``wave``
    writer)."""
    import wave
    from math import gcd

    import numpy as np
    import soundfile as sf

    path = Path(path)
    if not path.is_file():
        raise PrepError(f"missing audio {path}", reason="missing audio")
    try:
        x, sr = sf.read(str(path), dtype="float64", always_2d=True)
    except (RuntimeError, OSError, ValueError, TypeError) as e:  # soundfile.LibsndfileError is a RuntimeError
        raise PrepError(f"undecodable audio {path} ({type(e).__name__}: {e})", reason="undecodable audio") from None
    if x.shape[0] == 0:
        raise PrepError(f"empty audio {path}", reason="empty audio")
    x = x.mean(axis=1)
    if sr != target_sr:
        from scipy.signal import resample_poly

        g = gcd(int(sr), int(target_sr))
        x = resample_poly(x, target_sr // g, int(sr) // g)
    pcm = np.clip(np.round(x * 32767.0), -32768, 32767).astype("<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(int(target_sr))
        w.writeframes(pcm.tobytes())
    return buf.getvalue(), len(pcm) / float(target_sr)


def source_fingerprint(files: Iterable[Path], root: Path, media: Iterable[Path] = ()) -> str:
    """``source_checksum``: sha256 over the annotation files' contents plus the sorted (path, size) list of media files
    (media contents are not hashed: too slow for full datasets; shard sha256s cover the written bytes)."""
    h = hashlib.sha256()
    h.update(sha256_files(files, root).encode())
    for p in sorted(str(Path(m).relative_to(root)) if Path(m).is_absolute() else str(m) for m in media):
        try:
            size = (Path(root) / p).stat().st_size
        except OSError:
            size = -1
        h.update(f"{p}\0{size}\n".encode())
    return h.hexdigest()
