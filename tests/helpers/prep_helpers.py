"""Helpers for the dataset converter tests (imported by conftest.py and the tests; unique module name on purpose)."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np

from datasets_prep.replica import (  # noqa: F401  (re-exported for the tests)
    make_mustard_replica,
    mustard_annotations,
    mustard_colour,
    mustard_frame,
    mustard_frame_index,
    mustard_freq,
    mustard_grey,
    mustard_video_codec,
    write_mp4,
    write_mustard_media,
    write_wav,
)

# Real raw files ship with the tests (tests/fixtures/raw-samples, byte-for-byte public copies, see PROVENANCE.md
# there), so a bare clone runs them; MOPE_RAW_SAMPLES points them at another copy.
_REPO = Path(__file__).resolve().parents[2]
RAW_SAMPLES = Path(os.environ.get("MOPE_RAW_SAMPLES") or _REPO / "tests" / "fixtures" / "raw-samples")


def jpeg_bytes(seed: int = 0, size: tuple[int, int] = (12, 10)) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, size=(size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=80)
    return buf.getvalue()


def png_bytes(seed: int = 0, size: tuple[int, int] = (9, 7)) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, size=(size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def read_split(split_dir: Path) -> list[dict]:
    """All samples of one split, in manifest shard order, read with plain tarfile: [{"__key__", ext: bytes}]."""
    m = json.loads((split_dir / "manifest.json").read_text())
    out: list[dict] = []
    for s in m["shards"]:
        with tarfile.open(split_dir / s["file"]) as tar:
            cur: dict | None = None
            for ti in tar:
                key, ext = ti.name.split(".", 1)
                if cur is None or cur["__key__"] != key:
                    cur = {"__key__": key}
                    out.append(cur)
                cur[ext] = tar.extractfile(ti).read()
    return out


def read_split_wds(split_dir: Path) -> list[dict]:
    """The same through webdataset (grouping by key at the first dot), to prove the layout is what it expects."""
    import webdataset as wds

    m = json.loads((split_dir / "manifest.json").read_text())
    urls = [str(split_dir / s["file"]) for s in m["shards"]]
    ds = wds.WebDataset(urls, shardshuffle=False, empty_check=False)
    return list(ds)


def by_id(samples: list[dict]) -> dict[str, dict]:
    return {json.loads(s["json"])["id"]: s for s in samples}


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


MMIMDB_LABELS_REAL = RAW_SAMPLES / "mmimdb" / "songrise__MoPE" / "data" / "MM-IMDB" / "labels.txt"
SNLI_SAMPLE_DIR = RAW_SAMPLES / "snli-ve" / "CpuKnows__SNLI-VE" / "data" / "sample"
MUSTARD_REAL = RAW_SAMPLES / "mustard" / "soujanyaporia__MUStARD" / "data" / "sarcasm_data.json"
MUSTARD_OLD = RAW_SAMPLES / "mustard" / "soujanyaporia__MUStARD@72fd3eb" / "data" / "sarcasm_data.json"
FOOD_TITLES_REAL = RAW_SAMPLES / "food101" / "songrise__MoPE" / "data" / "food101" / "text" / "test_titles.csv"
FOOD_LABELS_REAL = RAW_SAMPLES / "food101" / "songrise__MoPE" / "data" / "food101" / "labels.txt"
