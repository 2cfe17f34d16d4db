"""The node-local cache of a cluster run: what a trial needs on its own disk when the data live in object storage.

``$MOPE_CACHE`` (default ``~/.cache/mope-harness``) holds, per node:

* ``remote/<sha256(url)[:16]>-<name>/``: encoder weights given as a URL (``vision.weights=s3://b/data/demo/
  vision_encoder``: a directory with ``config.json`` + ``model.safetensors``, or one file), downloaded once per node
  by :func:`localize` (into a temporary sibling, then renamed: atomic; concurrent processes on a node are safe, the
  first rename wins) and re-downloaded only when the remote listing (names, sizes, ETags) changes;
* ``feature_cache/<key>/``: the black-box feature cache of a remote shard directory (:func:`feature_cache_root`; a
  local shard directory keeps it beside the shards, as always).

``mope/`` never sees a URL: :func:`localize_weights` gives the recipe a configuration whose weights are local paths.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from mope_data.format import basename, is_url, storage_error, url_fs

CACHE_ENV = "MOPE_CACHE"
WEIGHT_SIDES = ("vision", "text", "audio", "video")
SOURCE_FILE = ".source.json"


def cache_root() -> Path:
    """``$MOPE_CACHE``, else ``~/.cache/mope-harness`` (created)."""
    root = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "mope-harness").expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


def _listing(fs, path: str) -> tuple[bool, list[dict[str, Any]]]:
    """(is a directory, [{name (relative), size, etag}]) of a remote file or directory."""
    info = fs.info(path)
    if info.get("type") != "directory":
        return False, [{"name": basename(path), "size": info.get("size"), "etag": info.get("ETag")}]
    out = []
    for p, d in sorted(fs.find(path, detail=True).items()):
        rel = p[len(path.rstrip("/")) + 1 :] if p.startswith(path.rstrip("/") + "/") else basename(p)
        if rel:
            out.append({"name": rel, "size": d.get("size"), "etag": d.get("ETag")})
    return True, out


def localize(url: str, *, what: str = "weights") -> Path:
    """A local copy of ``url`` (a file or a directory) in the node-local cache; a local path is returned as is."""
    if not is_url(url):
        return Path(url)
    url = str(url).rstrip("/")
    fs, path = url_fs(url)
    try:
        fs.invalidate_cache()
        is_dir, listing = _listing(fs, path)
    except Exception as e:
        raise storage_error(url, e, what) from None
    if is_dir and not listing:
        raise storage_error(url, FileNotFoundError(url), what)
    signature = hashlib.sha256(json.dumps(listing, sort_keys=True, default=str).encode()).hexdigest()
    dest = cache_root() / "remote" / f"{hashlib.sha256(url.encode()).hexdigest()[:16]}-{basename(url)}"
    src_file = dest / SOURCE_FILE if is_dir else dest.with_name(f".{dest.name}{SOURCE_FILE}")
    if dest.exists() and src_file.is_file():
        try:
            if json.loads(src_file.read_text())["signature"] == signature:
                return dest
        except (OSError, ValueError, KeyError):
            pass
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-{os.getpid()}-", dir=dest.parent))
    try:
        target = tmp / "x"
        try:
            if is_dir:
                target.mkdir()
                for item in listing:
                    f = target / item["name"]
                    f.parent.mkdir(parents=True, exist_ok=True)
                    fs.get_file(f"{path.rstrip('/')}/{item['name']}", str(f))
            else:
                fs.get_file(path, str(target))
        except Exception as e:
            raise storage_error(url, e, what) from None
        record = json.dumps({"url": url, "signature": signature, "files": listing}, default=str)
        if is_dir:
            (target / SOURCE_FILE).write_text(record)
        old = None
        if dest.exists():  # a stale copy: move it away, then rename the new one in
            old = tmp / "old"
            os.replace(dest, old)
        try:
            os.replace(target, dest)
        except OSError:
            if not dest.exists():  # another process of this node won the race with the same content
                raise
        if not is_dir:
            src_file.write_text(record)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def localize_weights(cfg: dict[str, Any]) -> dict[str, Any]:
    """``cfg`` with every encoder ``weights`` URL replaced by its node-local copy (a new dict when something changed;
    the run's identity, computed from the original configuration, is unaffected)."""
    sides = [s for s in WEIGHT_SIDES if isinstance(cfg.get(s), dict) and is_url(cfg[s].get("weights") or "")]
    if not sides:
        return cfg
    out = dict(cfg)
    for s in sides:
        out[s] = {**cfg[s], "weights": str(localize(cfg[s]["weights"], what=f"{s}.weights"))}
    return out


def feature_cache_root(shard_dir: str | Path) -> Path:
    """Where a shard directory's black-box feature cache lives: beside local shards, in the node-local cache for
    remote ones (the cache key comes from the manifests, so datasets never collide)."""
    return cache_root() if is_url(shard_dir) else Path(shard_dir)
