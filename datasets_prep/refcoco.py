"""RefCOCO / RefCOCO+ -> webdataset shards (``harness prep refcoco`` / ``harness prep refcoco+``), referring
segmentation.

Raw layout (``--src``, the lichengunc/refer release: ``refcoco.zip`` / ``refcoco+.zip`` unpacked, plus COCO
train2014)::

    refcoco/refs(unc).p          (RefCOCO+: refcoco+/refs(unc).p) Python-2 pickle: a list of refs, one per object,
                                 {ref_id, ann_id, image_id, split (train/val/testA/testB), sentences: [{sent, raw,
                                 tokens, sent_id}], sent_ids, category_id, file_name}
    refcoco/instances.json       COCO json: images [{id, file_name, height, width}], annotations [{id, image_id,
                                 segmentation (polygons, or RLE), bbox, area, iscrowd, category_id}], categories
    images/train2014/COCO_train2014_%012d.jpg   (or images/mscoco/images/train2014/, train2014/;
                                 ``--opt images=PATH`` names the directory)

The pickle is read by an unpickler that refuses every global (a plain refs pickle has none: lists, dicts, strings,
ints), so a planted payload cannot run; Python-2 ``str`` is read as latin-1 and UTF-8 byte strings are repaired.
The CRIS-style LMDB (pyarrow-serialised records, ``pa.deserialize``, unreadable by modern pyarrow) is not an input.

Samples: in ``train`` one per ref (object), key ``ref_id``, with all its sentences (the loader draws one per visit,
seeded by (seed, epoch, key), as LAVT trains); in ``val`` / ``testA`` / ``testB`` one per (ref, sentence), key
``<ref_id>_<i>``, because the benchmarks score every expression (RefCOCO val 10,834 / testA 5,657 / testB 5,095
expressions). Written grouped by image (sorted by ``image_id``, then ``ref_id``; not shuffled, so the image can be
cached for its group), task ``segmentation``. Members: the image (``jpg``; the original JPEG bytes when its longer side
is at most ``max_side``, else downscaled once per image and re-encoded as JPEG q=95; the same bytes for every ref of
that image), ``mask.png`` (the object's mask from the COCO polygons / RLE through pycocotools, 0/255 single-channel,
resized with nearest to the stored image's size), ``txt`` (the ref's sentences, one per line; an evaluation sample's
one sentence) and ``json``: ``{"id": ref_id, "label": [category index], "ref_id", "ann_id", "image_id", "category_id",
"category", "sentences": [{"sent", "raw", "tokens", "sent_id"}], "bbox", "iscrowd", "file_name", "orig_size": [h, w],
"size": [h, w]}`` (evaluation samples add ``"sent_index"``). Labels are the COCO category names sorted by category id;
``label`` is a one-element list because the writer's contract for every task but ``single_label`` is a list of indices.

Cost of self-contained samples: a streamed sample must carry its image, so each image is stored once per ref of it,
~2.5 times on average (RefCOCO: 50,000 objects on 19,994 images): about 2.5x the size of the COCO images used
(~8 GB for RefCOCO at the original COCO resolution, which ``max_side=640`` keeps).

Split sizes (samples): RefCOCO train 42,404 refs / val 10,834 / testA 5,657 / testB 5,095 expressions (of 3,811 / 1,975
/ 1,810 refs); RefCOCO+ 42,278 refs / 10,758 / 5,726 / 4,889 expressions (of 3,805 / 1,975 / 1,798 refs). Bad inputs
are errors naming the file and ``ref_id`` (skipped and counted with ``--skip-bad``): missing or undecodable image,
image size differing from ``instances.json``, ref with an unknown ``ann_id`` / ``image_id`` / category, no sentences,
broken polygon (odd length, fewer than 3 points, empty), malformed RLE, empty mask. A missing, truncated or refused
pickle and a missing or invalid ``instances.json`` stop the conversion (named).

Options: ``images`` (directory of the COCO_train2014 JPEGs), ``max_side`` (640; 0 = original bytes always),
``splits`` (``train,val,testA,testB``), ``min_shards`` (32).
"""

from __future__ import annotations

import io
import json
import math
import pickle
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mope_data.format import MASK_EXT

from .registry import register_dataset
from .writer import (
    BadInputs,
    DatasetSpec,
    PrepError,
    Record,
    SplitPlan,
    load_image,
    option_list,
    sanitize_key,
    source_fingerprint,
    write_dataset,
)

CONVERTER_VERSION = "2"  # 2: evaluation splits one sample per (ref, sentence)
TASK = "segmentation"
SPLITS = ("train", "val", "testA", "testB")
REFS_FILE = "refs(unc).p"
INSTANCES_FILE = "instances.json"
IMAGE_DIR_CANDIDATES = ("images/train2014", "images/mscoco/images/train2014", "train2014")
IMAGE_NAME = "COCO_train2014_{:012d}.jpg"
DEFAULT_MAX_SIDE = 640


@dataclass(frozen=True)
class Variant:
    name: str  # `harness prep NAME`
    dataset: str  # the dataset name in the shards (a safe key)
    raw_dir: str  # the release's directory under --src
    expected: dict[str, int]  # refs per split in the full release (docs/mope-reference.md)
    expressions: dict[str, int]  # sentences per split in the full release (CRIS / LAVT papers' split tables)


VARIANTS = {
    "refcoco": Variant(
        "refcoco",
        "refcoco",
        "refcoco",
        {"train": 42404, "val": 3811, "testA": 1975, "testB": 1810},
        {"train": 120624, "val": 10834, "testA": 5657, "testB": 5095},
    ),
    "refcoco+": Variant(
        "refcoco+",
        "refcoco_plus",
        "refcoco+",
        {"train": 42278, "val": 3805, "testA": 1975, "testB": 1798},
        {"train": 120191, "val": 10758, "testA": 5726, "testB": 4889},
    ),
}


# ---------------------------------------------------------------------------------------------------------------------
# Raw annotation files
# ---------------------------------------------------------------------------------------------------------------------
class _RefsUnpickler(pickle.Unpickler):
    """Plain data only: every global (class, function) is refused, so nothing in the pickle can run."""

    def __init__(self, f: Any, path: Path) -> None:
        super().__init__(f, encoding="latin1")
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        raise PrepError(
            f"{self.path}: refuses to load globals ({module}.{name}): not a plain refs pickle",
            reason="refused pickle",
        )


def load_refs(path: Path) -> list:
    """The list of refs in ``refs(unc).p`` (:class:`PrepError` naming the file when missing, truncated, refused)."""
    path = Path(path)
    if not path.is_file():
        raise PrepError(f"{path}: refs pickle not found (expected the refer release's {REFS_FILE})")
    with open(path, "rb") as f:
        try:
            refs = _RefsUnpickler(f, path).load()
        except PrepError:
            raise
        except (EOFError, pickle.UnpicklingError, ValueError, TypeError, IndexError, KeyError, MemoryError) as e:
            raise PrepError(
                f"{path}: truncated or corrupt pickle ({type(e).__name__}: {e}); download the refer release again",
                reason="corrupt pickle",
            ) from None
    if not isinstance(refs, list):
        raise PrepError(f"{path}: holds a {type(refs).__name__}, not a list of refs")
    return refs


def load_instances(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise PrepError(f"{path}: {INSTANCES_FILE} not found (it ships in the refer release next to {REFS_FILE})")
    try:
        inst = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PrepError(f"{path}: invalid JSON ({e}); download the refer release again") from None
    if not isinstance(inst, dict) or not all(isinstance(inst.get(k), list) for k in ("images", "annotations")):
        raise PrepError(f"{path}: not a COCO instances file (needs 'images' and 'annotations' lists)")
    if not isinstance(inst.get("categories"), list) or not inst["categories"]:
        raise PrepError(f"{path}: no 'categories' list")
    return inst


def fix_text(s: Any) -> str:
    """A Python-2 string as read with ``encoding="latin1"``: UTF-8 bytes read as latin-1 are decoded back."""
    s = str(s)
    if s.isascii():
        return s
    try:
        return s.encode("latin1").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        return s


def _int(x: Any) -> int | None:
    return x if isinstance(x, int) and not isinstance(x, bool) else None


def _sentences(ref: dict) -> list[dict] | None:
    out = []
    for s in ref.get("sentences") or ():
        if not isinstance(s, dict):
            return None
        sent = " ".join(fix_text(s.get("sent") or s.get("raw") or "").split())  # one line: txt holds one per line
        if not sent:
            continue
        out.append(
            {
                "sent": sent,
                "raw": fix_text(s.get("raw") or sent),
                "tokens": [fix_text(t) for t in s["tokens"]] if isinstance(s.get("tokens"), list) else [],
                "sent_id": _int(s.get("sent_id")),
            }
        )
    return out


@dataclass
class Catalog:
    """``instances.json`` indexed: images and annotations by id, category id -> label index, label names."""

    images: dict[int, dict]
    anns: dict[int, dict]
    cat_index: dict[int, int]
    labels: list[str]

    @classmethod
    def build(cls, inst: dict, path: Path) -> Catalog:
        cats = [c for c in inst["categories"] if isinstance(c, dict) and _int(c.get("id")) is not None]
        cats.sort(key=lambda c: c["id"])
        labels = [str(c.get("name") or c["id"]) for c in cats]
        if len(set(labels)) != len(labels) or not labels:
            raise PrepError(f"{path}: category names are empty or repeat")
        images = {im["id"]: im for im in inst["images"] if isinstance(im, dict) and _int(im.get("id")) is not None}
        anns = {a["id"]: a for a in inst["annotations"] if isinstance(a, dict) and _int(a.get("id")) is not None}
        return cls(images, anns, {c["id"]: i for i, c in enumerate(cats)}, labels)


def _skip(bad: BadInputs, n: int, reason: str, where: str, detail: str = "") -> None:
    """A bad ref counts as the samples it would have given: 1 in train, one per sentence in evaluation splits (the
    writer counts a ref failing while written the same way, once per sample)."""
    for j in range(n):
        bad.add(reason, where if n == 1 else f"{where} sentence {j}", detail)


def plan_splits(refs: list, cat: Catalog, refs_path: Path, want: list[str], skip_bad: bool) -> dict[str, SplitPlan]:
    """Refs -> one :class:`SplitPlan` per wanted split: entries sorted by (image_id, ref_id[, sentence]); bad refs
    recorded. Train entries are refs, evaluation entries (ref, sentence) pairs (module docstring)."""
    bads = {s: BadInputs(skip_bad) for s in want}
    entries: dict[str, list[dict]] = {s: [] for s in want}
    seen: set[int] = set()
    for i, ref in enumerate(refs):
        if not isinstance(ref, dict) or _int(ref.get("ref_id")) is None:
            bads[want[0]].add("malformed ref", f"{refs_path}: entry {i}", "not a dict with an int 'ref_id'")
            continue
        rid, split = ref["ref_id"], ref.get("split")
        if split not in bads:
            continue  # another split (or one not asked for)
        bad, where = bads[split], f"{refs_path}: ref_id {rid}"
        n = 1 if split == "train" else max(1, len(_sentences(ref) or ()))  # the samples this ref would give
        ann_id, image_id = _int(ref.get("ann_id")), _int(ref.get("image_id"))
        if rid in seen:
            _skip(bad, n, "duplicate ref_id", where)
            continue
        seen.add(rid)
        if ann_id not in cat.anns:
            _skip(bad, n, "unknown ann_id", where, f"ann_id {ref.get('ann_id')!r} not in {INSTANCES_FILE}")
            continue
        ann = cat.anns[ann_id]
        if image_id not in cat.images:
            _skip(bad, n, "unknown image_id", where, f"image_id {ref.get('image_id')!r} not in {INSTANCES_FILE}")
            continue
        if ann.get("image_id") != image_id:
            _skip(bad, n, "ann_id of another image", where, f"ann_id {ann_id} is on image {ann.get('image_id')!r}")
            continue
        cid = _int(ann.get("category_id"))
        if cid not in cat.cat_index:
            _skip(bad, n, "unknown category", where, f"category_id {ann.get('category_id')!r} not in {INSTANCES_FILE}")
            continue
        sents = _sentences(ref)
        if sents is None:
            _skip(bad, n, "malformed sentences", where)
            continue
        if not sents:
            _skip(bad, n, "no sentences", where)
            continue
        e = {"ref_id": rid, "ann_id": ann_id, "image_id": image_id, "category_id": cid, "sentences": sents}
        if split == "train":  # one sample per object, its sentences drawn per visit by the loader
            entries[split].append({**e, "where": where})
        else:  # one sample per expression: the benchmarks score every sentence
            for j, sent in enumerate(sents):
                entries[split].append({**e, "sentences": [sent], "sent_index": j, "where": f"{where} sentence {j}"})
    return {
        s: SplitPlan(
            sorted(entries[s], key=lambda e: (e["image_id"], e["ref_id"], e.get("sent_index", 0))),
            bads[s],
            {"raw_file": str(refs_path.relative_to(refs_path.parent.parent)), "order": "image_id, ref_id"},
        )
        for s in want
    }


# ---------------------------------------------------------------------------------------------------------------------
# Masks
# ---------------------------------------------------------------------------------------------------------------------
def rle_string_counts(s: str | bytes) -> list[int]:
    """Run lengths of a compressed COCO RLE string (the maskApi.c ``rleFrString`` scheme), checked to be well formed:
    pycocotools decodes without bounds checks, so counts are validated here first."""
    b = s.encode("ascii") if isinstance(s, str) else bytes(s)
    cnts: list[int] = []
    p = 0
    while p < len(b):
        x = k = 0
        more = True
        while more:
            if p >= len(b):
                raise ValueError("RLE string ends inside a number")
            c = b[p] - 48
            if not 0 <= c < 64:
                raise ValueError(f"RLE string has a character {chr(b[p])!r} outside the code")
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and (c & 0x10):
                x |= -1 << (5 * k)
        if len(cnts) > 2:
            x += cnts[-2]
        cnts.append(x)
    return cnts


def decode_segmentation(seg: Any, h: int, w: int):
    """COCO segmentation (polygon list, uncompressed or compressed RLE) -> (h, w) uint8 0/1 array, via pycocotools.

    Raises :class:`PrepError` (reason ``broken polygon`` / ``malformed RLE``) before pycocotools sees bad input."""
    import numpy as np
    from pycocotools import mask as mask_utils

    if isinstance(seg, list):
        if not seg:
            raise PrepError("broken polygon: empty segmentation list", reason="broken polygon")
        for j, poly in enumerate(seg):
            if not isinstance(poly, list) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in poly
            ):
                raise PrepError(f"broken polygon: polygon {j} is not a list of numbers", reason="broken polygon")
            if len(poly) % 2:
                raise PrepError(f"broken polygon: polygon {j} has an odd length {len(poly)}", reason="broken polygon")
            if len(poly) < 6:
                raise PrepError(
                    f"broken polygon: polygon {j} has {len(poly) // 2} points (at least 3 needed)",
                    reason="broken polygon",
                )
        rle = mask_utils.merge(mask_utils.frPyObjects([[float(v) for v in p] for p in seg], h, w))
    elif isinstance(seg, dict) and "counts" in seg:
        size = seg.get("size")
        if not isinstance(size, list) or [_int(v) for v in size] != [h, w]:
            raise PrepError(f"malformed RLE: size {size!r} is not the image's [{h}, {w}]", reason="malformed RLE")
        counts = seg["counts"]
        try:
            if isinstance(counts, list):
                cnts = [_int(c) for c in counts]
                if None in cnts:
                    raise ValueError("counts are not ints")
                rle = mask_utils.frPyObjects({"size": [h, w], "counts": cnts}, h, w)
            elif isinstance(counts, (str, bytes)):
                cnts = rle_string_counts(counts)
                rle = {"size": [h, w], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
            else:
                raise ValueError(f"counts of type {type(counts).__name__}")
        except (ValueError, UnicodeEncodeError) as e:
            raise PrepError(f"malformed RLE: {e}", reason="malformed RLE") from None
        if any(c < 0 for c in cnts) or sum(cnts) != h * w:
            raise PrepError(f"malformed RLE: run lengths sum to {sum(cnts)}, not {h}x{w}", reason="malformed RLE")
    else:
        raise PrepError(f"broken polygon: segmentation of type {type(seg).__name__}", reason="broken polygon")
    with warnings.catch_warnings():  # pycocotools 2.0.11 + numpy 2: "__array__ implementation doesn't accept a copy"
        warnings.simplefilter("ignore", DeprecationWarning)
        m = mask_utils.decode(rle)
    if m.ndim == 3:
        m = m.max(axis=2)
    return np.ascontiguousarray(m, dtype=np.uint8)


def mask_png(mask01, size: tuple[int, int]) -> bytes:
    """A 0/1 (h, w) mask -> PNG bytes, mode L 0/255, resized with nearest to ``size`` = (width, height)."""
    from PIL import Image

    im = Image.fromarray(mask01 * 255, mode="L")
    if im.size != tuple(size):
        im = im.resize(tuple(size), Image.NEAREST)
    if im.getextrema()[1] == 0:
        raise PrepError(f"empty mask after resizing to {size[0]}x{size[1]}", reason="empty mask")
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------------------------------
# Samples
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class RefSamples:
    """Maps a ref to its sample (:meth:`record`). The image of the current image group is loaded (and re-encoded)
    once and its bytes reused for every ref of that image; refs arrive grouped by image, so one slot suffices."""

    cat: Catalog
    img_dir: Path
    max_side: int
    _cached: tuple[int, tuple] | None = field(default=None, repr=False)  # (image_id, ("ok", ...) | ("bad", ...))
    _mask: tuple[tuple[int, tuple], bytes] | None = field(default=None, repr=False)  # ((ann_id, size), mask.png)

    def image_path(self, image_id: int) -> Path:
        name = self.cat.images[image_id].get("file_name") or IMAGE_NAME.format(image_id)
        return self.img_dir / Path(str(name)).name

    def image(self, image_id: int) -> tuple[str, bytes, tuple[int, int]]:
        """(ext, bytes, stored (width, height)) of an image, checked against ``instances.json``'s size."""
        if self._cached is None or self._cached[0] != image_id:
            try:
                self._cached = (image_id, ("ok", *self._load(image_id)))
            except PrepError as e:
                self._cached = (image_id, ("bad", str(e), e.reason))
        state = self._cached[1]
        if state[0] == "bad":
            raise PrepError(state[1], reason=state[2])
        return state[1], state[2], state[3]

    def _load(self, image_id: int) -> tuple[str, bytes, tuple[int, int]]:
        from PIL import Image

        path = self.image_path(image_id)
        ext, data = load_image(path, max_side=int(self.max_side))
        info = self.cat.images[image_id]
        with Image.open(path) as im:
            orig = im.size
        if orig != (info.get("width"), info.get("height")):
            raise PrepError(
                f"image {path} is {orig[0]}x{orig[1]}, {INSTANCES_FILE} says {info.get('width')}x{info.get('height')}",
                reason="image size mismatch",
            )
        with Image.open(io.BytesIO(data)) as im:
            stored = im.size
        return ext, data, stored

    def record(self, e: dict) -> Record:
        ext, img, stored = self.image(e["image_id"])
        info, ann = self.cat.images[e["image_id"]], self.cat.anns[e["ann_id"]]
        h, w = int(info["height"]), int(info["width"])
        if self._mask is None or self._mask[0] != (e["ann_id"], stored):  # an object's sentences follow each other
            m = decode_segmentation(ann.get("segmentation"), h, w)
            if not m.any():
                raise PrepError(f"empty mask (ann_id {e['ann_id']})", reason="empty mask")
            self._mask = ((e["ann_id"], stored), mask_png(m, stored))
        meta = {
            "id": e["ref_id"],
            "label": [self.cat.cat_index[e["category_id"]]],
            "ref_id": e["ref_id"],
            "ann_id": e["ann_id"],
            "image_id": e["image_id"],
            "category_id": e["category_id"],
            "category": self.cat.labels[self.cat.cat_index[e["category_id"]]],
            "sentences": e["sentences"],
            "bbox": ann.get("bbox"),
            "iscrowd": ann.get("iscrowd", 0),
            "file_name": self.image_path(e["image_id"]).name,
            "orig_size": [h, w],
            "size": [stored[1], stored[0]],
        }
        key = str(e["ref_id"])
        if "sent_index" in e:
            meta["sent_index"] = e["sent_index"]
            key = f"{key}_{e['sent_index']}"
        members = {ext: img, MASK_EXT: self._mask[1], "txt": "\n".join(s["sent"] for s in e["sentences"])}
        return Record(sanitize_key(key), members, meta)


def _find_images_dir(src: Path) -> Path:
    for c in IMAGE_DIR_CANDIDATES:
        if (src / c).is_dir():
            return src / c
    raise PrepError(
        f"{src}: no COCO train2014 image directory found (tried {', '.join(IMAGE_DIR_CANDIDATES)}); "
        "pass --opt images=PATH"
    )


def convert_variant(
    variant: Variant,
    src: Path | None,
    out: Path,
    *,
    shard_size: int,
    skip_bad: bool,
    images: str | Path | None,
    max_side: int,
    splits: str | list[str],
    min_shards: int,
) -> dict:
    """Convert one refer release (module docstring)."""
    if src is None:
        raise PrepError(
            f"{variant.name} needs --src RAW_DIR (with {variant.raw_dir}/{REFS_FILE}, {variant.raw_dir}/"
            f"{INSTANCES_FILE} and images/train2014/)"
        )
    src, out = Path(src), Path(out)
    want = option_list(splits)
    for s in want:
        if s not in SPLITS:
            raise PrepError(f"{variant.name} splits are {list(SPLITS)}, got {s!r}")
    if not want:
        raise PrepError(f"{variant.name}: no splits asked for (--opt splits=train,val,testA,testB)")
    if int(max_side) < 0:
        raise PrepError(f"{variant.name}: max_side must be >= 0 (0 = original bytes), got {max_side}")
    raw = src / variant.raw_dir
    refs_path, inst_path = raw / REFS_FILE, raw / INSTANCES_FILE
    refs = load_refs(refs_path)
    cat = Catalog.build(load_instances(inst_path), inst_path)
    img_dir = Path(images) if images is not None else _find_images_dir(src)
    if not img_dir.is_dir():
        raise PrepError(f"images directory {img_dir} is not a directory")
    plans = plan_splits(refs, cat, refs_path, want, skip_bad)
    samples = RefSamples(cat, img_dir, int(max_side))
    ids = sorted({e["image_id"] for p in plans.values() for e in p.entries})
    media = [samples.image_path(i) for i in ids] if img_dir.resolve().is_relative_to(src.resolve()) else []
    checksum = source_fingerprint([refs_path, inst_path], src, [p.resolve().relative_to(src.resolve()) for p in media])
    return write_dataset(
        out,
        DatasetSpec(variant.dataset, TASK, cat.labels, CONVERTER_VERSION, source_checksum=checksum),
        plans,
        samples.record,
        where=lambda e: e["where"],
        shard_size=shard_size,
        min_shards=min_shards,
        skip_bad=skip_bad,
        seed=None,  # type: ignore[arg-type]  # keep the image grouping (the cache relies on it)
        info_extra={"raw_release": f"{variant.raw_dir}/{REFS_FILE}", "max_side": int(max_side)},
        summary_extra={
            "expected": {s: variant.expected[s] for s in want},
            "expected_samples": {s: variant.expected[s] if s == "train" else variant.expressions[s] for s in want},
        },
    )


def _converter(name: str):
    """The registered converter of one variant (its keyword parameters are the ``--opt`` options the registry
    accepts)."""

    def convert(
        src: Path | None,
        out: Path,
        *,
        shard_size: int = 1000,
        skip_bad: bool = False,
        images: str | Path | None = None,
        max_side: int = DEFAULT_MAX_SIDE,
        splits: str | list[str] = "train,val,testA,testB",
        min_shards: int = 32,
    ) -> dict:
        opts = {"images": images, "max_side": max_side, "splits": splits, "min_shards": min_shards}
        return convert_variant(VARIANTS[name], src, out, shard_size=shard_size, skip_bad=skip_bad, **opts)

    convert.__doc__ = f"Convert {name} (``SRC/{name}/refs(unc).p`` + ``instances.json`` + COCO train2014 images)."
    return convert


convert = register_dataset("refcoco")(_converter("refcoco"))
convert_plus = register_dataset("refcoco+")(_converter("refcoco+"))
