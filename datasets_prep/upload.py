"""Upload a built dataset directory to object storage / any fsspec URL (``harness prep NAME ... --out s3://b/prefix``).

``harness prep`` with a URL ``--out`` builds into a local staging directory exactly as for a local ``--out``,
verifies it (:func:`datasets_prep.verify.verify`, without decoding), then calls :func:`upload_dataset`:

1. the remote location is checked as the local command checks an existing ``--out``: empty / missing, or a build of
   the same dataset (its ``dataset.json``) that is replaced; anything else is refused (:class:`PrepError`);
2. every file except the manifests goes up first (shards, few-shot indices, ``labels.txt``, the demo's encoder),
   then each ``<split>/manifest.json``, then ``dataset.json`` last, so a reader never finds a manifest whose shards
   are missing (``fsspec`` ``put``, in batches, with a progress line: files, MB, MB/s);
3. objects under the uploaded split folders that the new build does not have (stale shards of an earlier build) are
   removed, as the local writer replaces a split directory whole.

Credentials and the endpoint come from the environment (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ...).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from mope_data.format import DATASET_INFO, MANIFEST, is_url, join, storage_error, url_fs

from .writer import PrepError

__all__ = ["check_target", "upload_dataset"]

BATCH_FILES = 16


def _remote_dataset_name(fs, root: str, url: str) -> tuple[bool, str | None]:
    """(remote location has objects, the dataset name of its dataset.json or None)."""
    try:
        if not fs.exists(root):
            return False, None
        found = fs.find(root, maxdepth=None)
    except FileNotFoundError:
        return False, None
    except Exception as e:
        raise storage_error(url, e, "upload target") from None
    if not found:
        return False, None
    try:
        info = json.loads(fs.cat_file(f"{root}/{DATASET_INFO}").decode("utf-8"))
        return True, str(info.get("dataset")) if isinstance(info, dict) else None
    except (FileNotFoundError, ValueError, UnicodeDecodeError):
        return True, None


def check_target(url: str, dataset: str) -> bool:
    """Before building for ``--out URL``: the location must be empty / missing (False) or hold a ``dataset`` build
    (True: it will be replaced); anything else raises :class:`PrepError` (as the local command refuses a foreign
    non-empty ``--out``), an unreachable store :class:`~mope_data.format.ShardFormatError` naming the URL."""
    fs, root = url_fs(str(url).rstrip("/"))
    nonempty, remote_name = _remote_dataset_name(fs, root.rstrip("/"), str(url))
    if nonempty and remote_name != dataset:
        raise PrepError(
            f"{url} exists, is not empty and is not a {dataset!r} build"
            f"{f' (its dataset.json says {remote_name!r})' if remote_name else ''}; choose another --out or remove it"
        )
    return nonempty


def upload_dataset(local_dir: str | Path, url: str, *, verbose: bool = True) -> dict:
    """Upload the dataset directory ``local_dir`` (built by ``harness prep``) to ``url``; manifests last.

    Returns ``{"url", "files", "bytes", "seconds", "removed"}``. Raises :class:`PrepError` when ``url`` holds
    something other than a build of the same dataset, :class:`~mope_data.format.ShardFormatError` naming the URL when
    the store is unreachable or refuses the writes."""
    local = Path(local_dir)
    if not is_url(url):
        raise PrepError(f"{url}: not a URL; upload_dataset writes to object storage (s3://bucket/prefix, ...)")
    if not (local / DATASET_INFO).is_file():
        raise PrepError(f"{local}: no {DATASET_INFO}; build the dataset with `harness prep` first")
    name = json.loads((local / DATASET_INFO).read_text(encoding="utf-8")).get("dataset")
    url = str(url).rstrip("/")
    fs, root = url_fs(url)
    root = root.rstrip("/")
    nonempty, remote_name = _remote_dataset_name(fs, root, url)
    if nonempty and remote_name != name:
        raise PrepError(
            f"{url} exists, is not empty and is not a {name!r} build"
            f"{f' (its dataset.json says {remote_name!r})' if remote_name else ''}; choose another --out or remove it"
        )

    files = sorted(p for p in local.rglob("*") if p.is_file() and not any(x.startswith(".") for x in p.parts[-1:]))
    rel = [p.relative_to(local).as_posix() for p in files]
    data = [r for r in rel if Path(r).name != MANIFEST and r != DATASET_INFO]
    manifests = [r for r in rel if Path(r).name == MANIFEST]
    last = [r for r in rel if r == DATASET_INFO]
    sizes = {r: (local / r).stat().st_size for r in rel}
    total_bytes = sum(sizes.values())
    done_files, done_bytes, t0 = 0, 0, time.monotonic()

    def progress(final: bool = False) -> None:
        if not verbose or not (final or sys.stderr.isatty()):
            return
        dt = max(time.monotonic() - t0, 1e-6)
        print(
            f"\rupload {url}: {done_files}/{len(rel)} files, {done_bytes / 1e6:.1f}/{total_bytes / 1e6:.1f} MB, "
            f"{done_bytes / 1e6 / dt:.1f} MB/s",
            end="\n" if final else "",  # one line, rewritten in place on a terminal
            file=sys.stderr,
            flush=True,
        )

    for group in (data, manifests, last):  # manifests after their shards, dataset.json last
        for i in range(0, len(group), BATCH_FILES):
            batch = group[i : i + BATCH_FILES]
            try:
                fs.put([str(local / r) for r in batch], [f"{root}/{r}" for r in batch])
            except Exception as e:
                raise storage_error(join(url, batch[0]), e, "upload") from None
            done_files += len(batch)
            done_bytes += sum(sizes[r] for r in batch)
            progress()
    progress(final=True)

    removed: list[str] = []
    if nonempty:  # stale objects of an earlier build under the split folders just written
        tops = {r.split("/", 1)[0] for r in rel if "/" in r}
        new = {f"{root}/{r}" for r in rel}
        try:
            for top in sorted(tops):
                for obj in fs.find(f"{root}/{top}"):
                    obj = obj.rstrip("/")
                    if obj not in new:
                        removed.append(obj)
            if removed:
                fs.rm(removed)
        except FileNotFoundError:
            pass
        except Exception as e:
            raise storage_error(url, e, "removing stale objects") from None
    try:
        fs.invalidate_cache()
    except Exception:  # pragma: no cover - listing caches only
        pass
    return {
        "url": url,
        "files": len(rel),
        "bytes": total_bytes,
        "seconds": round(time.monotonic() - t0, 2),
        "removed": len(removed),
    }
