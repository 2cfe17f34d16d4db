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
``wav``/``flac``, video frames ``f00.png``, ``f01.png``, ... (:func:`frame_member`). Task ``segmentation`` (referring
segmentation, one sample per object): ``label`` as for ``multi_label`` (the list ``[category index]``) plus the object
mask, member ``mask.png`` (:data:`MASK_EXT`: single-channel, 0/255, the size of the sample's image).

Locations: ``ROOT`` (and every path taken here) is a local path or a URL (``s3://bucket/prefix``, ``gs://...``,
``http(s)://host/path``, any fsspec protocol whose package is installed). Local paths are read exactly as always
(``pathlib``; ``file://`` counts as local); URLs through fsspec (:func:`open_binary` streams, nothing is copied to disk
whole). For S3 the endpoint and credentials come from the environment (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION`` / ``AWS_PROFILE``), read by botocore. A missing object, bucket or web
page, a refused connection or denied access is a :class:`MissingShardsError` / :class:`ShardFormatError` naming the
URL and the fix. Helpers: :func:`is_url`, :func:`join`, :func:`parent`, :func:`basename`, :func:`exists`,
:func:`is_file`, :func:`open_binary`, :func:`read_bytes`; shard streams checked against the manifest's sha256 while
they are read: :func:`open_verified`.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import re
import tarfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

__all__ = [
    "AUDIO_EXTS",
    "DATASET_INFO",
    "EXT_RE",
    "FRAME_RE",
    "IMAGE_EXTS",
    "KEY_RE",
    "MANIFEST",
    "MASK_EXT",
    "MODALITY_EXTS",
    "TASKS",
    "DatasetInfo",
    "MissingShardsError",
    "ShardFormatError",
    "VerifiedStream",
    "basename",
    "dataset_info",
    "exists",
    "fewshot_path",
    "frame_member",
    "is_file",
    "is_url",
    "iter_tar_samples",
    "join",
    "open_binary",
    "open_verified",
    "parent",
    "read_bytes",
    "read_fewshot",
    "read_json",
    "read_manifest",
    "read_samples",
    "read_split_index",
    "sha256_file",
    "shard_digests",
    "shard_paths",
    "split_manifests",
    "split_member",
    "storage_error",
    "url_fs",
]

MANIFEST = "manifest.json"
DATASET_INFO = "dataset.json"
TASKS = ("single_label", "multi_label", "segmentation")
MASK_EXT = "mask.png"  # the object mask of a segmentation sample
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


# ---------------------------------------------------------------------------------------------------------------------
# Locations: local paths and URLs (the one place that opens dataset files; fsspec for URLs)
# ---------------------------------------------------------------------------------------------------------------------
def is_url(path: Any) -> bool:
    """True for ``scheme://...`` locations (object stores, web servers); False for local paths and ``file://``."""
    return "://" in str(path) and not str(path).startswith("file://")


def _local(path: str | Path) -> Path:
    s = str(path)
    return Path(s[len("file://") :]) if s.startswith("file://") else Path(path)


def join(base: str | Path, *parts: str) -> Path | str:
    """``base / part / ...``: a :class:`~pathlib.Path` for a local base, a ``/``-joined URL string for a URL."""
    if not is_url(base):
        return _local(base).joinpath(*parts)
    out = str(base).rstrip("/")
    for p in parts:
        p = str(p).strip("/")
        if p:
            out = f"{out}/{p}"
    return out


def parent(path: str | Path) -> Path | str:
    """The containing directory (a URL keeps its ``scheme://``)."""
    if not is_url(path):
        return _local(path).parent
    head, _, _ = str(path).rstrip("/").rpartition("/")
    return head if "://" in head and not head.endswith(":/") else str(path)


def basename(path: str | Path) -> str:
    return _local(path).name if not is_url(path) else str(path).rstrip("/").rpartition("/")[2]


def url_fs(url: str):
    """``(filesystem, path)`` of a URL (fsspec; cached filesystem instances, endpoint from the environment)."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(str(url))
    except (ImportError, ValueError) as e:
        raise ShardFormatError(
            f"{url}: no filesystem for this URL ({e}); install its fsspec package (s3fs for s3://, gcsfs for gs://, "
            "aiohttp for http://)"
        ) from None


def _cause_chain(e: BaseException) -> Iterator[BaseException]:
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def storage_error(url: Any, e: BaseException, what: str = "file") -> ShardFormatError:
    """A clear :class:`MissingShardsError` / :class:`ShardFormatError` for an exception raised reading ``url``."""
    if isinstance(e, ShardFormatError):
        return e
    chain = list(_cause_chain(e))
    detail = f"{type(e).__name__}: {e}".strip()
    unreachable = any(
        "connect" in type(x).__name__.lower() or isinstance(x, (ConnectionError, TimeoutError)) for x in chain
    )
    endpoint_hint = (
        "check AWS_ENDPOINT_URL (the object store's address), the credentials (AWS_ACCESS_KEY_ID / "
        "AWS_SECRET_ACCESS_KEY or AWS_PROFILE) and the network"
        if str(url).startswith(("s3://", "s3a://"))
        else "check the server's address and the network"
    )
    if unreachable:
        return ShardFormatError(f"{url}: {what}: storage not reachable ({detail}); {endpoint_hint}")
    if isinstance(e, PermissionError) or "accessdenied" in detail.lower().replace(" ", ""):
        return ShardFormatError(f"{url}: {what}: access denied ({detail}); {endpoint_hint}")
    if isinstance(e, FileNotFoundError) or "nosuchbucket" in detail.lower():
        return MissingShardsError(
            f"{url}: {what} not found ({detail}: no such object, bucket or web page); upload the dataset with "
            "`harness prep NAME --out <url of the dataset>` (or check the URL and AWS_ENDPOINT_URL)"
        )
    return ShardFormatError(f"{url}: {what}: cannot read ({detail}); {endpoint_hint}")


def exists(path: str | Path) -> bool:
    """Whether a file or directory (prefix) exists; for URLs an unreachable store raises (:func:`storage_error`)."""
    if not is_url(path):
        return _local(path).exists()
    fs, p = url_fs(str(path))
    try:
        fs.info(p)  # not fs.exists(): it answers False for an unreachable store too
        return True
    except FileNotFoundError:
        return False
    except Exception as e:
        raise storage_error(path, e, "existence check") from None


def is_file(path: str | Path) -> bool:
    """Whether ``path`` is a file / an object (False when missing); an unreachable store raises."""
    if not is_url(path):
        return _local(path).is_file()
    fs, p = url_fs(str(path))
    try:
        return fs.info(p).get("type") == "file"  # not fs.isfile(): it answers False for an unreachable store too
    except FileNotFoundError:
        return False
    except Exception as e:
        raise storage_error(path, e, "existence check") from None


def open_binary(path: str | Path, what: str = "file") -> BinaryIO:
    """Open for reading bytes: a local file as ``open(path, "rb")`` (FileNotFoundError as before), a URL as an fsspec
    file read in blocks (streaming, never downloaded whole); URL errors become :func:`storage_error`."""
    if not is_url(path):
        return open(_local(path), "rb")
    fs, p = url_fs(str(path))
    try:
        return fs.open(p, "rb")
    except Exception as e:
        raise storage_error(path, e, what) from None


def read_bytes(path: str | Path, what: str = "file") -> bytes:
    if not is_url(path):
        return _local(path).read_bytes()
    try:
        with open_binary(path, what) as f:
            return f.read()
    except ShardFormatError:
        raise
    except Exception as e:
        raise storage_error(path, e, what) from None


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in chunks (shards, manifests, checkpoints, adapters); a URL is streamed."""
    h = hashlib.sha256()
    with open_binary(path) as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


class VerifiedStream(io.RawIOBase):
    """A read-only stream over a shard that hashes the bytes as they are read; :meth:`finish` reads what is left
    (tar's end padding) and compares the sha256 with the manifest's, raising :class:`ShardFormatError` naming the URL
    on a mismatch. ``expected=None`` only streams (no check)."""

    def __init__(self, raw: BinaryIO, url: str, expected: str | None):
        super().__init__()
        self.raw, self.url, self.expected = raw, str(url), expected
        self.h = hashlib.sha256() if expected else None
        self.nbytes = 0

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        try:
            b = self.raw.read(n)
        except ShardFormatError:
            raise
        except Exception as e:
            raise storage_error(self.url, e, "shard") from None
        if self.h is not None:
            self.h.update(b)
        self.nbytes += len(b)
        return b

    def readinto(self, buf) -> int:
        b = self.read(len(buf))
        buf[: len(b)] = b
        return len(b)

    def finish(self) -> None:
        """Read to the end and check the digest (call once the tar stream is consumed)."""
        if self.h is None:
            return
        while self.read(1 << 20):
            pass
        got = self.h.hexdigest()
        if got != self.expected:
            raise ShardFormatError(
                f"{self.url}: sha256 {got[:16]}... != manifest.json's {str(self.expected)[:16]}... ({self.nbytes} "
                "bytes read): the shard was changed or truncated after it was written; re-upload it / re-run "
                "`harness prep` (then `harness prep --verify`)"
            )

    def close(self) -> None:
        try:
            self.raw.close()
        finally:
            super().close()


def open_verified(url: str | Path, expected_sha256: str | None) -> VerifiedStream:
    """A shard (local or URL) opened for streaming, hashed while read (:class:`VerifiedStream`)."""
    u = str(url)
    if not is_url(u) and not _local(u).is_file():
        raise MissingShardsError(f"{u}: shard listed in manifest.json is missing; re-run `harness prep`")
    return VerifiedStream(open_binary(u, "shard"), u, expected_sha256)


def read_json(path: str | Path, what: str = "file") -> dict:
    if is_url(path):
        raw = read_bytes(path, what)
        try:
            return json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ShardFormatError(f"{path}: invalid JSON ({e}); re-run `harness prep` and re-upload") from None
    p = _local(path)
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MissingShardsError(f"{p}: {what} not found; build the shards with `harness prep` first") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ShardFormatError(f"{p}: invalid JSON ({e}); re-run `harness prep`") from None


def read_manifest(split_dir: str | Path) -> dict:
    """``split_dir/manifest.json``; :class:`MissingShardsError` / :class:`ShardFormatError` naming the file."""
    p = join(split_dir, MANIFEST)
    if not is_file(p):
        where = (
            f"upload it with `harness prep NAME --out {parent(split_dir)}` (manifests are uploaded last)"
            if is_url(split_dir)
            else "Build the shards with `harness prep` first"
        )
        raise MissingShardsError(
            f"{p}: no manifest.json; is {split_dir} a split directory written by `harness prep`? {where}"
        )
    m = read_json(p, "manifest")
    if not isinstance(m.get("shards"), list):
        raise ShardFormatError(f"{p}: no 'shards' list; re-run `harness prep`")
    return m


def shard_paths(split_dir: str | Path, manifest: dict) -> list[str]:
    """The shard files of a split, in manifest order (URL strings for a remote split)."""
    return [str(join(split_dir, sh["file"])) for sh in manifest["shards"]]


def shard_digests(split_dir: str | Path, manifest: dict) -> dict[str, str]:
    """``{shard path or URL: sha256}`` from the manifest (shards without a digest are left out)."""
    return {str(join(split_dir, sh["file"])): str(sh["sha256"]) for sh in manifest["shards"] if sh.get("sha256")}


def split_manifests(data_dir: str | Path) -> list[Path | str]:
    """Every ``<split>/manifest.json`` of a dataset directory, sorted: a glob for a local directory; for a URL the
    splits of ``dataset.json`` (web servers cannot list), else ``train`` / ``val`` / ``test``, those that exist."""
    if not is_url(data_dir):
        return sorted(_local(data_dir).glob(f"*/{MANIFEST}"))
    info_p = join(data_dir, DATASET_INFO)
    splits = list((read_json(info_p, "dataset info").get("splits") or {}) if is_file(info_p) else ())
    out = [join(data_dir, sp, MANIFEST) for sp in sorted(splits or ("test", "train", "val"))]
    return [m for m in out if is_file(m)]


@dataclass
class DatasetInfo:
    name: str
    task: str
    labels: list[str]
    modalities: tuple[str, ...]
    root: Path | str  # a Path for a local dataset, the URL string for a remote one
    extra: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.labels)


def dataset_info(data_dir: str | Path, split: str = "train") -> DatasetInfo:
    """Name, task, labels and modalities of a dataset directory (``dataset.json``, else a split's manifest)."""
    root = join(data_dir)
    info = read_json(join(root, DATASET_INFO)) if is_file(join(root, DATASET_INFO)) else {}
    m = read_manifest(join(root, split)) if is_file(join(root, split, MANIFEST)) else {}
    if not info and not m:
        fix = f"upload it with `harness prep NAME --out {root}`" if is_url(root) else "run `harness prep` first"
        raise MissingShardsError(f"{root}: neither {DATASET_INFO} nor {split}/{MANIFEST}; {fix}")
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


@contextlib.contextmanager
def _open_shard(path: str) -> Iterator[tarfile.TarFile]:
    """A shard as a tar: a local file random-access (``"r:"``) as always; a URL *streamed* (``"r|"``: members in
    order, no seeks, no local copy)."""
    if is_url(path):
        with open_verified(path, None) as stream:
            try:
                tar = tarfile.open(fileobj=stream, mode="r|")
            except tarfile.TarError as e:
                raise ShardFormatError(f"{path}: not a tar file ({e}); re-upload it / re-run `harness prep`") from None
            with tar:
                yield tar
        return
    if not Path(path).is_file():
        raise MissingShardsError(f"{path}: shard listed in manifest.json is missing; re-run `harness prep`")
    with tarfile.open(path, mode="r:") as tar:
        yield tar


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
    split_dir = join(split_dir)
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


def fewshot_path(split_dir: str | Path, shots: int, seed: int = 0, stratified: bool = False) -> Path | str:
    """Where the ``shots``-example subset of a split lives (written by :func:`datasets_prep.fewshot.build_fewshot`);
    a URL string for a remote split."""
    sub = f"stratified-seed-{seed}" if stratified else f"seed-{seed}"
    return join(split_dir, "fewshot", sub, f"shots-{int(shots)}.json")


def read_fewshot(split_dir: str | Path, shots: int, seed: int = 0, stratified: bool = False) -> dict:
    """Load a subset index; a clear error naming the command that builds it when missing or stale."""
    p = fewshot_path(split_dir, shots, seed, stratified)
    hint = (
        f"harness prep --fewshot {parent(split_dir)} --split {basename(split_dir)} --shots {shots} "
        f"--seed {seed}{' --stratified' if stratified else ''}"
    )
    if is_url(split_dir):
        hint = f"{hint}` on the local build, then upload it again (`harness prep NAME --out {parent(split_dir)}"
    if not is_file(p):
        raise MissingShardsError(f"{p}: few-shot subset not built; run `{hint}`")
    doc = read_json(p, "few-shot index")
    if doc.get("split_manifest_sha256") != sha256_file(join(split_dir, MANIFEST)):
        raise ShardFormatError(f"{p}: built for another version of {split_dir}; re-run `{hint}`")
    return doc
