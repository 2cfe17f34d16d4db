"""``harness prep``: convert a raw dataset to webdataset shards, or verify written shards.

harness prep DATASET --src RAW_DIR --out SHARD_DIR [--shard-size N] [--min-shards K] [--skip-bad]
             [--opt key=value ...]
harness prep DATASET ... --out s3://bucket/prefix      (built in a local staging dir, verified, then uploaded)
harness prep --upload SHARD_DIR --out s3://bucket/prefix   (an existing local build: verified, then uploaded)
harness prep --verify SHARD_DIR [--no-decode]
harness prep --list
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from mope_data.format import ShardFormatError, is_url

from .registry import get_converter, list_datasets

DATASET_OPTIONS = """\
dataset options (--opt key=value, repeatable; values true/false/ints are converted):
  all:      seed=0 (deterministic shuffle of the written order), min_shards=32 (shard size is lowered so a split
            has at least this many shards: streaming needs shards >> ranks x workers), max_image_side=0
  food101:  text_source=auto|texts_txt|titles  title_fallback=false  clean=mmbt|basic|none  val_size=5000
            splits=train,test  labels_file=PATH
  mmimdb:   labels_file=PATH  drop_genres=News,Reality-TV,Talk-Show  remove_genres=Adult
  snli_ve:  images_dir=PATH  splits=train,val,test
  mustard:  split_scheme=friends|mope_code  no_audio=false  audio_dir=PATH  sample_rate=16000  frames=0
            frames_dir=PATH  frames_source=auto|video|dir  video_dir=PATH  frame_size=224  expect_entries=690
            train_count=334
Bad raw input (missing/undecodable media, missing text, unknown label, malformed line) stops the conversion with
the file and line/key named (exit code 2); --skip-bad skips such samples and counts them in each split's
manifest.json. Written samples that deserve a look (text that is not UTF-8 and was decoded as cp1252, a sample id
also in another split: a split leak) are counted under "warnings" in the manifest and printed.
Output: SHARD_DIR/<split>/<dataset>-<split>-NNNNNN.tar + manifest.json, SHARD_DIR/labels.txt, SHARD_DIR/dataset.json.
--out may be a URL (s3://bucket/prefix, gs://..., any fsspec URL; endpoint and credentials from the environment, e.g.
AWS_ENDPOINT_URL / AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY): the dataset is built into a local staging directory,
verified (no decoding), then uploaded with the manifests and dataset.json last (datasets_prep/upload.py).
"""


def _parse_value(v: str):
    low = v.strip().lower()
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    if low in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v


def _split_field(out: Path, summary: dict, name: str) -> dict:
    """``name`` (``warnings``: texts decoded as cp1252, split leaks; ``skipped``: --skip-bad) of every written split's
    manifest, for the splits where it counts something."""
    found: dict = {}
    splits = summary.get("splits") if isinstance(summary, dict) else None
    for split in splits or {}:
        p = out / str(split) / "manifest.json"
        try:
            w = json.loads(p.read_text(encoding="utf-8")).get(name)
        except (OSError, ValueError):
            continue
        if isinstance(w, dict) and w.get("count"):
            found[str(split)] = w
    return found


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="harness prep",
        description="Convert a raw dataset into deterministic webdataset shards, or verify shards.",
        epilog=DATASET_OPTIONS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("dataset", nargs="?", help="dataset converter name (see --list)")
    p.add_argument(
        "--src", type=Path, default=None, help="raw dataset directory (omit for generated datasets, e.g. demo)"
    )
    p.add_argument("--out", type=str, default=None, help="output shard directory, or a URL (s3://bucket/prefix)")
    p.add_argument("--shard-size", type=int, default=1000, help="max samples per shard (default 1000)")
    p.add_argument("--min-shards", type=int, default=None, help="lower the shard size so each split has >= K shards")
    p.add_argument("--skip-bad", action="store_true", help="skip and count bad raw samples instead of stopping")
    p.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE", help="dataset-specific option")
    p.add_argument("--verify", type=Path, default=None, metavar="SHARD_DIR", help="verify written shards and exit")
    p.add_argument("--no-decode", action="store_true", help="with --verify: skip image/audio decoding (faster)")
    p.add_argument(
        "--upload",
        type=Path,
        default=None,
        metavar="SHARD_DIR",
        help="upload an existing local build (e.g. after `harness prep --fewshot`) to --out URL, verified first",
    )
    p.add_argument("--list", action="store_true", help="list available datasets and exit")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "prep":  # tolerate being handed the sub-command name
        argv = argv[1:]
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse has printed the usage and the problem; return its code, no traceback
        if e.code in (0, None):
            raise
        return int(e.code) if isinstance(e.code, int) else 2

    if args.list:
        print("\n".join(list_datasets()))
        return 0

    if args.verify is not None:
        from .verify import verify

        rep = verify(args.verify, decode=not args.no_decode)
        print(rep.summary())
        return 0 if rep.ok else 2

    if args.upload is not None:
        if not is_url(args.out):
            print("error: --upload SHARD_DIR needs --out URL (s3://bucket/prefix/<dataset>)", file=sys.stderr)
            return 2
        return _verify_and_upload(args.upload.expanduser().resolve(), str(args.out).rstrip("/"))

    if not args.dataset:
        parser.print_usage(sys.stderr)
        print(f"error: give a DATASET (available: {', '.join(list_datasets())}) or --verify DIR", file=sys.stderr)
        return 2
    if args.out is None:
        print("error: --out SHARD_DIR is required", file=sys.stderr)
        return 2
    try:
        convert = get_converter(args.dataset)
    except KeyError:
        print(f"error: unknown dataset {args.dataset!r}; available: {', '.join(list_datasets())}", file=sys.stderr)
        return 2

    options: dict = {}
    for kv in args.opt:
        if "=" not in kv:
            print(f"error: --opt {kv!r} is not KEY=VALUE", file=sys.stderr)
            return 2
        k, v = kv.split("=", 1)
        options[k.strip().replace("-", "_")] = _parse_value(v)
    if args.min_shards is not None:
        options["min_shards"] = args.min_shards

    if is_url(args.out):
        return _prep_remote(args, convert, options)
    return _prep(args, convert, options, Path(args.out).expanduser().resolve())


def _prep_remote(args, convert, options: dict) -> int:
    """``--out URL``: build into a local staging directory exactly as for a local --out, verify, upload, clean up."""
    from .upload import check_target

    url = str(args.out).rstrip("/")
    try:
        check_target(url, args.dataset)
    except ShardFormatError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    staging = Path(tempfile.mkdtemp(prefix=f"mope-prep-{args.dataset}-"))
    try:
        rc = _prep(args, convert, options, staging / args.dataset, remote=url)
        return rc if rc != 0 else _verify_and_upload(staging / args.dataset, url, checked=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _verify_and_upload(local: Path, url: str, checked: bool = False) -> int:
    """Verify the local build ``local`` (no decoding), then upload it to ``url`` (:func:`upload_dataset`)."""
    from .upload import check_target, upload_dataset
    from .verify import verify

    if not (local / "dataset.json").is_file():
        print(f"error: {local}: no dataset.json; not a dataset directory written by `harness prep`", file=sys.stderr)
        return 2
    try:
        if not checked:
            check_target(url, json.loads((local / "dataset.json").read_text(encoding="utf-8"))["dataset"])
    except (ShardFormatError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rep = verify(local, decode=False)
    if not rep.ok:
        print(rep.summary(), file=sys.stderr)
        print(f"error: {local} failed verification; nothing was uploaded to {url}", file=sys.stderr)
        return 2
    try:
        up = upload_dataset(local, url)
    except ShardFormatError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    stale = f", removed {up['removed']} stale objects" if up["removed"] else ""
    print(
        f"uploaded {up['files']} files ({up['bytes'] / 1e6:.1f} MB) to {url} in {up['seconds']:.1f}s{stale}; "
        f"train with data.shard_dir={url}",
        file=sys.stderr,
    )
    return 0


def _prep(args, convert, options: dict, out: Path, remote: str | None = None) -> int:
    t0 = time.monotonic()
    try:
        summary = convert(
            args.src.resolve() if args.src is not None else None,
            out,
            shard_size=args.shard_size,
            skip_bad=args.skip_bad,
            **options,
        )
    except ShardFormatError as e:  # PrepError included
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # e.g. --out not writable, disk full
        print(
            f"error: {e.filename or out}: {e.strerror or e}; check --out / free space, then re-run",
            file=sys.stderr,
        )
        return 2
    if remote:
        summary["out"] = remote
    for split, w in _split_field(out, summary, "skipped").items():
        reasons = "; ".join(f"{n} x {r}" for r, n in w["by_reason"].items())
        print(
            f"skipped (--skip-bad): {args.dataset}/{split}: {reasons}; first: {w['examples'][:1]} "
            f"(all counted in {split}/manifest.json 'skipped')",
            file=sys.stderr,
        )
    warnings = _split_field(out, summary, "warnings")
    if warnings:
        summary["warnings"] = warnings
        for split, w in warnings.items():
            reasons = "; ".join(f"{n} x {r}" for r, n in w["by_reason"].items())
            print(
                f"warning: {args.dataset}/{split}: {reasons} (see {split}/manifest.json 'warnings')", file=sys.stderr
            )
    print(json.dumps(summary, indent=2, sort_keys=True, default=str))
    check = "verifying, then uploading" if remote else f"check with: harness prep --verify {args.out}"
    print(f"done in {time.monotonic() - t0:.1f}s; {check}", file=sys.stderr)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
