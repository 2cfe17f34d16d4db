"""Re-read written shards and check them against their manifests (``harness prep --verify SHARD_DIR``).

``SHARD_DIR`` is a dataset directory (split subdirectories with ``manifest.json``) or a single split directory.
For every split: every listed shard exists and matches its sha256 and sample count, no unlisted ``*.tar`` lies
beside them, every member is ``{key}.{ext}`` with a key of ``[A-Za-z0-9_-]+`` (no dots), members of one sample are
contiguous, no key repeats within the split, every sample has a ``json`` with ``id`` and a valid ``label``, the
class histogram and total match, the declared modalities are present, images and audio decode, text is UTF-8.
Task ``segmentation``: every sample also has a ``mask.png`` (single channel) of its image's size.
"""

from __future__ import annotations

import io
import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from mope_data.format import (
    AUDIO_EXTS,
    IMAGE_EXTS,
    MANIFEST,
    MASK_EXT,
    MODALITY_EXTS,
    ShardFormatError,
    iter_tar_samples,
    read_manifest,
    sha256_file,
)

__all__ = ["VerifyReport", "find_split_dirs", "verify", "verify_split"]

MAX_PROBLEMS_PER_SPLIT = 50


@dataclass
class VerifyReport:
    splits: dict[str, dict] = field(default_factory=dict)  # split dir -> {"num_samples", "shards"}
    problems: list[str] = field(default_factory=list)
    fix: str = ""  # what to run when there are problems (set by verify())

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        lines = [f"{d}: {s['num_samples']} samples in {s['shards']} shards" for d, s in self.splits.items()]
        if self.problems:
            lines.append(f"FAILED: {len(self.problems)} problem(s):")
            lines += [f"  - {p}" for p in self.problems]
            if self.fix:
                lines.append(f"fix: {self.fix}")
        else:
            lines.append("OK")
        return "\n".join(lines)


def find_split_dirs(root: Path) -> list[Path]:
    root = Path(root)
    if (root / MANIFEST).is_file():
        return [root]
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and (p / MANIFEST).is_file())


def _check_image(data: bytes) -> str | None:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
    except Exception as e:  # noqa: BLE001
        return f"undecodable image ({type(e).__name__}: {e})"
    return None


def _check_audio(data: bytes) -> str | None:
    import soundfile as sf

    try:
        x, _ = sf.read(io.BytesIO(data), dtype="float32")
    except Exception as e:  # noqa: BLE001
        return f"undecodable audio ({type(e).__name__}: {e})"
    if len(x) == 0:
        return "empty audio"
    return None


def _check_mask(sample: dict[str, bytes], decode: bool) -> str | None:
    """A segmentation sample's ``mask.png``: present next to an image; decoded, single-channel and of its size."""
    from PIL import Image

    if MASK_EXT not in sample:
        return f"no {MASK_EXT} member (task segmentation)"
    image = next((e for e in sorted(sample) if e != MASK_EXT and e.rsplit(".", 1)[-1] in IMAGE_EXTS), None)
    if image is None:
        return f"no image member beside {MASK_EXT}"
    if not decode:
        return None
    try:
        with Image.open(io.BytesIO(sample[MASK_EXT])) as m, Image.open(io.BytesIO(sample[image])) as im:
            m.load()
            if m.mode not in ("L", "1"):
                return f"{MASK_EXT} has mode {m.mode!r}, not single-channel"
            if m.size != im.size:
                return f"{MASK_EXT} is {m.size[0]}x{m.size[1]}, its image {image} {im.size[0]}x{im.size[1]}"
    except Exception as e:  # noqa: BLE001
        return f"undecodable {MASK_EXT} ({type(e).__name__}: {e})"
    return None


def _check_sample(
    where: str,
    key: str,
    sample: dict[str, bytes],
    task: str | None,
    labels: list,
    mods: list[str],
    hist: list[int],
    decode: bool,
) -> list[str]:
    out: list[str] = []
    if "json" not in sample:
        dotted = sorted(e for e in sample if e.endswith(".json"))
        if dotted:
            out.append(
                f"{where}: member {key + '.' + dotted[0]!r}: the sample key contains a dot "
                "(webdataset splits key and extension at the first dot)"
            )
        else:
            out.append(f"{where}: no .json member")
    else:
        try:
            meta = json.loads(sample["json"].decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            out.append(f"{where}: invalid json ({e})")
            meta = None
        if isinstance(meta, dict):
            if "id" not in meta:
                out.append(f"{where}: json has no 'id'")
            lab = meta.get("label")
            idx = [lab] if task == "single_label" else lab if isinstance(lab, list) else None
            if idx is None or not all(
                isinstance(i, int) and not isinstance(i, bool) and 0 <= i < len(labels) for i in idx
            ):
                out.append(f"{where}: label {lab!r} invalid for {task} with {len(labels)} labels")
            else:
                for i in idx:
                    hist[i] += 1
        elif meta is not None:
            out.append(f"{where}: json is not an object")
    exts = {e.rsplit(".", 1)[-1] for e in sample}
    for mod in mods:
        if not exts & set(MODALITY_EXTS[mod]):
            out.append(f"{where}: no {mod} member (manifest modalities {mods})")
    for ext, data in sample.items():
        last = ext.rsplit(".", 1)[-1]
        err = None
        if last == "txt":
            try:
                data.decode("utf-8")
            except UnicodeDecodeError:
                err = "text is not UTF-8"
        elif decode and last in IMAGE_EXTS:
            err = _check_image(data)
        elif decode and last in AUDIO_EXTS:
            err = _check_audio(data)
        if err:
            out.append(f"{where}.{ext}: {err}")
    if task == "segmentation":
        err = _check_mask(sample, decode)
        if err:
            out.append(f"{where}: {err}")
    return out


def verify_split(split_dir: Path, *, decode: bool = True) -> tuple[int, int, list[str]]:
    """Check one split directory. Returns ``(num_samples_read, num_shards, problems)``."""
    split_dir = Path(split_dir)
    problems: list[str] = []

    def problem(msg: str) -> None:
        if len(problems) < MAX_PROBLEMS_PER_SPLIT:
            problems.append(f"{split_dir}: {msg}")
        elif len(problems) == MAX_PROBLEMS_PER_SPLIT:
            problems.append(f"{split_dir}: ... more problems not shown")

    try:
        m = read_manifest(split_dir)
    except ShardFormatError as e:
        return 0, 0, [str(e)]
    labels = m.get("labels") or []
    task = m.get("task")
    mods = [x for x in m.get("modalities", []) if x in MODALITY_EXTS]
    shards = m.get("shards") or []
    listed = {s.get("file") for s in shards}
    for extra in sorted(p.name for p in split_dir.glob("*.tar") if p.name not in listed):
        problem(f"{extra}: shard not listed in manifest.json")

    hist = [0] * len(labels)
    seen: dict[str, str] = {}
    total = 0
    for s in shards:
        name = s.get("file", "?")
        path = split_dir / name
        if not path.is_file():
            problem(f"{name}: shard listed in manifest.json is missing")
            continue
        if s.get("sha256") and sha256_file(path) != s["sha256"]:
            problem(f"{name}: sha256 mismatch (file corrupted or modified after writing)")
        count = 0
        try:
            with tarfile.open(path, mode="r:") as tar:
                for key, sample in iter_tar_samples(tar, name, problem):
                    count += 1
                    if key in seen:
                        problem(f"{name}: duplicate key {key!r} (also in {seen[key]})")
                    seen[key] = name
                    for msg in _check_sample(f"{name}: sample {key!r}", key, sample, task, labels, mods, hist, decode):
                        problem(msg)
        except (tarfile.TarError, OSError, EOFError) as e:
            problem(f"{name}: unreadable tar ({type(e).__name__}: {e})")
        total += count
        if count != s.get("count"):
            problem(f"{name}: {count} samples read, manifest says {s.get('count')}")
    if total != m.get("num_samples"):
        problem(f"{total} samples read, manifest num_samples = {m.get('num_samples')}")
    mh = m.get("class_histogram")
    if isinstance(mh, dict) and labels:
        got = {n: hist[i] for i, n in enumerate(labels)}
        if got != mh:
            diff = {n: (mh.get(n), got[n]) for n in labels if mh.get(n) != got[n]}
            problem(f"class histogram differs from manifest (label: (manifest, read)): {diff}")
    return total, len(shards), problems


def verify(root: Path, *, decode: bool = True) -> VerifyReport:
    """Verify every split under ``root`` (or ``root`` itself if it is a split directory)."""
    root = Path(root)
    rep = VerifyReport()
    if not root.is_dir():
        rep.problems.append(f"{root}: not a directory")
        rep.fix = (
            "give --verify the --out directory of a conversion (`harness prep DATASET --src RAW_DIR --out "
            "SHARD_DIR`), or run that conversion first"
        )
        return rep
    dirs = find_split_dirs(root)
    if not dirs:
        rep.problems.append(f"{root}: no split directory with a manifest.json found")
        rep.fix = (
            f"convert into it first (`harness prep DATASET --src RAW_DIR --out {root}`), or give --verify "
            "the directory that holds the split folders (train/, val/, test/)"
        )
        return rep
    out_root = root.parent if dirs == [root] else root
    dataset = "DATASET"
    try:
        dataset = str(read_manifest(dirs[0]).get("dataset") or dataset)
    except ShardFormatError:
        pass
    rep.fix = (
        f"the shards are damaged, incomplete or stale: re-run the conversion `harness prep {dataset} --src "
        f"RAW_DIR --out {out_root}` (it replaces each split atomically; the demo: `harness prep demo --out "
        f"{out_root}`), then `harness prep --verify {root}` again"
    )
    for d in dirs:
        n, k, probs = verify_split(d, decode=decode)
        rep.splits[str(d)] = {"num_samples": n, "shards": k}
        rep.problems.extend(probs)
    lf = root / "labels.txt"
    if lf.is_file():
        names = [x.strip() for x in lf.read_text(encoding="utf-8").splitlines() if x.strip()]
        for d in dirs:
            if read_manifest(d).get("labels") != names:
                rep.problems.append(f"{lf}: labels differ from {d / 'manifest.json'}")
    ds = root / "dataset.json"
    if ds.is_file():
        try:
            info = json.loads(ds.read_text(encoding="utf-8"))
            splits = info.get("splits")
            if isinstance(splits, dict):
                for sp, n in splits.items():
                    key = str(root / sp)
                    if key not in rep.splits:
                        rep.problems.append(f"{ds}: split {sp!r} listed but {root / sp} has no manifest")
                    elif rep.splits[key]["num_samples"] != n:
                        rep.problems.append(
                            f"{ds}: split {sp!r} says {n} samples, read {rep.splits[key]['num_samples']}"
                        )
        except json.JSONDecodeError as e:
            rep.problems.append(f"{ds}: invalid JSON ({e})")
    return rep
