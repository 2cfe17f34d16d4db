"""Synthetic replicas of raw dataset releases, in their exact raw layout and formats (no real media is public
offline): for the converter tests, the loader bench and a user's smoke test of ``harness prep`` before downloading.

``make_mustard_replica(root, n)`` writes a MUStARD release tree (``sarcasm_data.json`` with the real schema, the
``utterances_final/{key}.wav`` audio, the ``videos/utterances_final/{key}.mp4`` H.264 video), convertible with
``harness prep mustard --src root --opt expect_entries=0``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

__all__ = [
    "make_mustard_replica",
    "mustard_annotations",
    "mustard_colour",
    "mustard_frame",
    "mustard_frame_index",
    "mustard_freq",
    "mustard_grey",
    "mustard_video_codec",
    "write_mp4",
    "write_mustard_media",
    "write_wav",
]


def write_wav(path: Path, seconds: float = 0.1, sr: int = 22050, channels: int = 2, freq: float = 440.0) -> None:
    import soundfile as sf

    t = np.arange(int(seconds * sr)) / sr
    x = 0.5 * np.sin(2 * np.pi * freq * t)
    data = np.stack([x] * channels, axis=1) if channels > 1 else x
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), data, sr, subtype="PCM_16")


# ------------------------------------------------------------------------------------------------ MUStARD replicas
# Synthetic media in the release's raw layout (no real MUStARD media is public, SCHEMA.md):
#   {root}/utterances_final/{key}.wav          sine, frequency key-dependent (mustard_freq), 22,050 Hz stereo
#   {root}/videos/utterances_final/{key}.mp4   frame i: grey background of level mustard_grey(i) (encodes the frame
#                                              index, robust to lossy coding) + a square of colour mustard_colour(key)
#                                              moving left to right through the middle rows
#   {root}/utterances_final/processed/{key}/frame_{i:03d}.png  (frames_dir=True) the same frames, lossless
def _crc(key: str) -> int:
    import zlib

    return zlib.crc32(str(key).encode())


def mustard_freq(key: str) -> float:
    """Sine frequency (Hz) of the replica wav of ``key``: 200..790 Hz in steps of 10, key-dependent."""
    return 200.0 + 10.0 * (_crc(key) % 60)


def mustard_colour(key: str) -> tuple[int, int, int]:
    """RGB colour of the moving square in the replica video of ``key`` (saturated, key-dependent)."""
    palette = [(230, 30, 30), (30, 200, 40), (40, 60, 230), (230, 200, 30), (200, 40, 200), (30, 200, 210)]
    return palette[_crc(key) % len(palette)]


def mustard_grey(i: int) -> int:
    """Background grey level of frame ``i`` of every replica video (index recoverable mod 21 from the frame)."""
    return 20 + 10 * (i % 21)


def mustard_frame_index(grey: float) -> int:
    """Inverse of :func:`mustard_grey` (mod 21) for a measured (lossy) background level."""
    return round((float(grey) - 20) / 10) % 21


def mustard_frame(key: str, i: int, size: int | tuple[int, int] = 32) -> np.ndarray:
    """Frame ``i`` (H, W, 3) uint8 of the replica video of ``key``; ``size`` = side, or (width, height)."""
    w, h = (size, size) if isinstance(size, int) else size
    arr = np.full((h, w, 3), mustard_grey(i), dtype=np.uint8)
    sq = max(2, h // 4)
    x = (2 * i) % max(1, w - sq)
    y = (h - sq) // 2
    arr[y : y + sq, x : x + sq] = mustard_colour(key)
    return arr


def mustard_video_codec() -> str:
    """libx264 (h264, as the release's mp4s) when the PyAV wheel has the encoder, else mpeg4."""
    import av

    return "libx264" if "libx264" in av.codecs_available else "mpeg4"


def write_mp4(path: Path, frames: list[np.ndarray], fps: int = 10, codec: str | None = None) -> None:
    """Encode RGB frames (all the same even size) as an mp4 with PyAV (near-lossless settings)."""
    import av

    codec = codec or mustard_video_codec()
    h, w = frames[0].shape[:2]
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w", format="mp4") as out:
        opts = {"crf": "4", "preset": "ultrafast"} if codec == "libx264" else {}
        st = out.add_stream(codec, rate=fps, options=opts)
        st.width, st.height, st.pix_fmt = w, h, "yuv420p"
        if codec != "libx264":
            st.bit_rate = 4_000_000
        for arr in frames:
            for pkt in st.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(arr), format="rgb24")):
                out.mux(pkt)
        for pkt in st.encode():
            out.mux(pkt)


def write_mustard_media(
    root: Path,
    keys,
    *,
    wav: bool = True,
    mp4: bool = True,
    seconds: float = 0.6,
    sr: int = 22050,
    fps: int = 10,
    size: int | tuple[int, int] = 32,
    frames_dir: bool | Path = False,
) -> None:
    """Write the replica media of ``keys`` (any iterable of keys, e.g. the annotation dict) under ``root`` in the raw
    layout above: ``round(seconds * fps)`` video frames (at least 1), ``seconds`` of audio. ``frames_dir=True`` also
    writes the frames as PNG dirs at the converter's default ``frames_dir`` (or under the given path)."""
    from PIL import Image

    root = Path(root)
    n_frames = max(1, round(seconds * fps))
    fdir = (
        root / "utterances_final" / "processed" if frames_dir is True else (Path(frames_dir) if frames_dir else None)
    )
    for key in keys:
        if wav:
            write_wav(root / "utterances_final" / f"{key}.wav", seconds=seconds, sr=sr, freq=mustard_freq(key))
        if not (mp4 or fdir):
            continue
        frames = [mustard_frame(key, i, size) for i in range(n_frames)]
        if mp4:
            write_mp4(root / "videos" / "utterances_final" / f"{key}.mp4", frames, fps=fps)
        if fdir:
            (fdir / key).mkdir(parents=True, exist_ok=True)
            for i, arr in enumerate(frames):
                Image.fromarray(arr).save(fdir / key / f"frame_{i:03d}.png")


def mustard_annotations(n: int = 24, seed: int = 0) -> dict[str, dict]:
    """``n`` entries with the real schema (the 6 keys in the release's order), keys ``"{1|2}_{k}"``: about half
    FRIENDS (the default split's test set), the rest BBT / GOLDENGIRLS / SARCASMOHOLICS; labels alternate within
    each show so both splits hold both classes. Text has the release's quirks (mojibake apostrophe, double spaces,
    newlines in the context)."""
    import random

    rng = random.Random(seed)
    others = ["BBT", "GOLDENGIRLS", "SARCASMOHOLICS"]
    data: dict[str, dict] = {}
    used: set[int] = set()
    for i in range(n):
        show = "FRIENDS" if i % 2 else others[(i // 2) % 3] if i % 6 else "BBT"
        k = rng.randrange(1, 12332)
        while k in used:
            k = rng.randrange(1, 12332)
        used.add(k)
        key = f"{1 if show == 'BBT' else 2}_{k}"
        spk = rng.choice(["SHELDON", "CHANDLER", "PERSON", "DOROTHY", "MODERATOR"])
        ctx = [
            f"Context line {j} of {i}." + ("\nsecond line" if j == 0 and i % 3 == 0 else "") for j in range(1 + i % 3)
        ]
        data[key] = {
            "utterance": f"Utterance {i}:  I don\u00d5t know{'...' if i % 4 == 0 else '.'}",
            "speaker": spk,
            "context": ctx,
            "context_speakers": [rng.choice(["RAJ", "ROSS", spk]) for _ in ctx],
            "show": show,
            "sarcasm": (i // 2) % 2 == 1,
        }
    return data


def make_mustard_replica(
    root: Path,
    n: int = 24,
    *,
    mp4: bool = True,
    wav: bool = True,
    seed: int = 0,
    seconds: float = 0.6,
    fps: int = 10,
    size: int | tuple[int, int] = 32,
    frames_dir: bool | Path = False,
) -> Path:
    """A complete small MUStARD raw dir at ``root`` (``sarcasm_data.json`` + media), for ``harness prep mustard
    --src root --opt expect_entries=0``. Clip lengths vary per entry (``seconds`` x 1, 1.25, 1.5) so audio padding
    is exercised; returns ``root``."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    data = mustard_annotations(n, seed)
    (root / "sarcasm_data.json").write_text(json.dumps(data, indent=4), encoding="utf-8")  # no final newline: real
    for j, key in enumerate(data):
        write_mustard_media(
            root,
            [key],
            wav=wav,
            mp4=mp4,
            seconds=seconds * (1 + 0.25 * (j % 3)),
            fps=fps,
            size=size,
            frames_dir=frames_dir,
        )
    return root


# ------------------------------------------------------------------------------------------------ RefCOCO replicas
# The refer release's raw layout (lichengunc/refer), written exactly: {root}/{refcoco|refcoco+}/refs(unc).p (a
# protocol-2 pickle of the list of refs, as the Python-2 release), {root}/{...}/instances.json (COCO json with
# polygon, uncompressed-RLE (iscrowd) and compressed-RLE segmentations) and
# {root}/images/train2014/COCO_train2014_%012d.jpg (small noise JPEGs, one image larger than the others).
REFCOCO_CATEGORIES = [
    {"supercategory": "person", "id": 1, "name": "person"},
    {"supercategory": "vehicle", "id": 3, "name": "car"},
    {"supercategory": "animal", "id": 18, "name": "dog"},
    {"supercategory": "furniture", "id": 62, "name": "chair"},
]
REFCOCO_SPLIT_CYCLE = ("train", "train", "val", "testA", "train", "testB")


def _rle_counts(mask: np.ndarray) -> list[int]:
    """Uncompressed COCO RLE counts of a 0/1 (h, w) mask: column-major runs, starting with a run of zeros."""
    flat = np.asarray(mask, dtype=np.uint8).flatten(order="F")
    counts, cur, run = [], 0, 0
    for v in flat:
        if v != cur:
            counts.append(run)
            cur, run = int(v), 0
        run += 1
    counts.append(run)
    return counts


def _polygon_mask_box(rng: np.random.Generator, w: int, h: int) -> tuple[list[float], list[float]]:
    """A random convex quadrilateral inside (w, h) as a COCO polygon, and its bbox [x, y, bw, bh]."""
    x0, y0 = rng.uniform(1, w / 2), rng.uniform(1, h / 2)
    x1, y1 = rng.uniform(x0 + 6, w - 1), rng.uniform(y0 + 6, h - 1)
    dx = rng.uniform(0, (x1 - x0) / 4)
    poly = [x0 + dx, y0, x1, y0 + dx, x1 - dx, y1, x0, y1 - dx]
    poly = [round(float(v), 2) for v in poly]
    xs, ys = poly[0::2], poly[1::2]
    return poly, [min(xs), min(ys), round(max(xs) - min(xs), 2), round(max(ys) - min(ys), 2)]


def refcoco_raw_dir(variant: str) -> str:
    """The release's directory for ``refcoco`` / ``refcoco+``."""
    if variant not in ("refcoco", "refcoco+"):
        raise ValueError(f"variant {variant!r}: use 'refcoco' or 'refcoco+'")
    return variant


def make_refcoco_replica(
    root: Path,
    variant: str = "refcoco",
    *,
    n_images: int = 12,
    seed: int = 0,
    size: tuple[int, int] = (48, 36),
    big_size: tuple[int, int] = (96, 72),
) -> Path:
    """A small refer release at ``root`` for ``harness prep refcoco --src root`` (or ``refcoco+``): ``n_images`` COCO
    images (``size``; the second one ``big_size``, for resizing), 1-4 objects each, each a ref with 1-3 sentences; the
    images cycle through the splits (:data:`REFCOCO_SPLIT_CYCLE`). Segmentations: mostly polygons (some objects in two
    parts), every 5th object a crowd region as uncompressed RLE, every 7th a compressed RLE string; plus objects with
    no ref (the real instances.json holds every annotation of its images). Returns ``root``."""
    import io
    import pickle

    from PIL import Image
    from pycocotools import mask as mask_utils

    root = Path(root)
    raw = root / refcoco_raw_dir(variant)
    img_dir = root / "images" / "train2014"
    raw.mkdir(parents=True, exist_ok=True)
    img_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    words = "left right man woman red car dog chair blue shirt far near caf\u00e9".split()
    images, anns, refs = [], [], []
    ann_id, ref_id, sent_id = 200000, 0, 0
    for i in range(n_images):
        image_id = 100003 + 7919 * i
        w, h = big_size if i == 1 else size
        file_name = f"COCO_train2014_{image_id:012d}.jpg"
        arr = rng.integers(0, 255, size=(h, w, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=85)
        (img_dir / file_name).write_bytes(buf.getvalue())
        url = f"http://images.cocodataset.org/train2014/{file_name}"
        images.append(
            {
                "license": 1,
                "file_name": file_name,
                "coco_url": url,
                "height": h,
                "width": w,
                "date_captured": "2013-11-14 16:28:13",
                "flickr_url": "",
                "id": image_id,
            }
        )
        split = REFCOCO_SPLIT_CYCLE[i % len(REFCOCO_SPLIT_CYCLE)]
        n_obj = 1 + (i * 5 + seed) % 4
        for j in range(n_obj + 1):  # the last object has no ref
            ann_id += 1
            cat = REFCOCO_CATEGORIES[(i + j) % len(REFCOCO_CATEGORIES)]
            k = len(anns)
            if k % 5 == 4 or k % 7 == 6:
                m = np.zeros((h, w), dtype=np.uint8)
                y0, x0 = int(rng.integers(0, h // 2)), int(rng.integers(0, w // 2))
                m[y0 : y0 + h // 3, x0 : x0 + w // 3] = 1
                enc = mask_utils.encode(np.asfortranarray(m))
                crowd = k % 5 == 4
                seg: dict | list = (
                    {"counts": _rle_counts(m), "size": [h, w]}
                    if crowd
                    else {"size": [h, w], "counts": enc["counts"].decode("ascii")}
                )
                bbox, area = [float(v) for v in mask_utils.toBbox(enc)], int(m.sum())
            else:
                crowd = False
                poly, bbox = _polygon_mask_box(rng, w, h)
                seg = [poly]
                if k % 3 == 1:  # a second part
                    seg.append([1.0, 1.0, 5.0, 1.0, 3.0, 4.0])
                area = float(mask_utils.area(mask_utils.merge(mask_utils.frPyObjects(seg, h, w))))
            anns.append(
                {
                    "segmentation": seg,
                    "area": area,
                    "iscrowd": int(crowd),
                    "image_id": image_id,
                    "bbox": bbox,
                    "category_id": cat["id"],
                    "id": ann_id,
                }
            )
            if j == n_obj:
                continue
            sents = []
            for _ in range(1 + (ref_id % 3)):
                toks = [str(x) for x in rng.choice(words, size=int(rng.integers(2, 5)))]
                raw_s = " ".join(toks).capitalize() + ("." if sent_id % 2 else "")
                sents.append({"tokens": toks, "raw": raw_s, "sent_id": sent_id, "sent": " ".join(toks)})
                sent_id += 1
            refs.append(
                {
                    "image_id": image_id,
                    "split": split,
                    "sentences": sents,
                    "file_name": f"COCO_train2014_{image_id:012d}_{ann_id}.jpg",
                    "category_id": cat["id"],
                    "ann_id": ann_id,
                    "sent_ids": [s["sent_id"] for s in sents],
                    "ref_id": ref_id,
                }
            )
            ref_id += 1
    inst = {
        "info": {"description": "This is stable 1.0 version of the 2014 MS COCO dataset.", "year": 2014},
        "images": images,
        "licenses": [{"url": "http://creativecommons.org/licenses/by-nc-sa/2.0/", "id": 1, "name": "BY-NC-SA"}],
        "type": "instances",
        "annotations": anns,
        "categories": REFCOCO_CATEGORIES,
    }
    (raw / "instances.json").write_text(json.dumps(inst), encoding="utf-8")
    refs.sort(key=lambda r: (r["split"] != "train", r["ref_id"]))  # not in (image_id, ref_id) order on purpose
    with open(raw / "refs(unc).p", "wb") as f:
        pickle.dump(refs, f, protocol=2)
    return root
