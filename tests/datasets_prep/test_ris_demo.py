"""The embedded referring-segmentation demo (ShapeRef) on a small configuration: shard validity, masks re-derived from
the json annotations, expressions that name their target alone (checked by an independent parser), testA / testB by
target kind, disjoint scenes across splits, byte-identical rebuilds, chance levels, an image-only answer far from 1."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from datasets_prep import ris_demo
from datasets_prep.registry import get_converter
from datasets_prep.verify import verify

SMALL = {
    "train_samples": 120,
    "val_samples": 40,
    "testA_samples": 40,
    "testB_samples": 40,
    "min_shards": 2,
    "epochs": 1,
    "grids_per_epoch": 64,
    "val_grids": 32,
    "batch_size": 32,
    "verbose": False,
}
SHAPES = ("circle", "square", "triangle")


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, Path, dict]:
    base = tmp_path_factory.mktemp("ris_demo")
    conv = get_converter("ris_demo")
    summary = conv(None, base / "a", shard_size=1000, skip_bad=False, **SMALL)
    conv(None, base / "b", shard_size=1000, skip_bad=False, **SMALL)
    return base / "a", base / "b", summary


def _samples(split_dir: Path) -> list[dict]:
    m = json.loads((split_dir / "manifest.json").read_text())
    out: dict[str, dict] = {}
    for sh in m["shards"]:
        with tarfile.open(split_dir / sh["file"]) as tar:
            for ti in tar:
                key, _, ext = ti.name.partition(".")
                out.setdefault(key, {})[ext] = tar.extractfile(ti).read()
    return [{**s, "meta": json.loads(s["json"])} for s in out.values()]


@pytest.fixture(scope="module")
def splits(built) -> dict[str, list[dict]]:
    return {s: _samples(built[0] / s) for s in ris_demo.SPLITS}


def _gray(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        assert im.mode == "L"
        return np.asarray(im)


def _obj_mask(o: dict) -> np.ndarray:
    """An object's mask drawn here from its annotation (not with the module's helper)."""
    m = np.zeros((32, 32), bool)
    x, y, w, h = o["bbox"]
    s = o["side"]
    assert w == h == s and 0 <= x and x + s <= 32 and 0 <= y and y + s <= 32
    yy, xx = np.mgrid[0:s, 0:s]
    c = (s - 1) / 2
    if o["shape"] == "circle":
        box = (yy - c) ** 2 + (xx - c) ** 2 <= (s / 2) ** 2
    elif o["shape"] == "square":
        box = np.ones((s, s), bool)
    else:
        box = np.abs(xx - c) <= (yy + 1) / s * (s / 2)
    m[y : y + s, x : x + s] = box
    return m


def _iou(a, b) -> float:
    u = (a | b).sum()
    return float((a & b).sum() / u) if u else 1.0


def _parse_np(words: list[str]) -> dict:
    """'the [size] [colour] shape' -> attribute constraints."""
    assert words[0] == "the" and words[-1] in SHAPES, words
    c = {"shape": words[-1]}
    for w in words[1:-1]:
        if w in ("small", "large"):
            c["size"] = w
        else:
            assert w in ris_demo.COLOURS, words
            c["colour"] = w
    return c


def _refers_to(text: str, objs: list[dict]) -> list[int]:
    """Indices of the objects the expression can mean, read from the text and the annotations alone."""
    w = text.split()

    def match(c: dict) -> list[int]:
        return [i for i, o in enumerate(objs) if all(o[k] == v for k, v in c.items())]

    cx = [o["bbox"][0] + o["bbox"][2] / 2 for o in objs]
    if w[-3:-1] == ["on", "the"]:
        cand = match(_parse_np(w[:-3]))
        assert len(cand) == 2 and abs(cx[cand[0]] - cx[cand[1]]) >= 4
        key = min if w[-1] == "left" else max
        return [key(cand, key=lambda i: cx[i])]
    for rel in ("above", "below"):
        if rel in w:
            k = w.index(rel)
            lms = match(_parse_np(w[k + 1 :]))
            assert len(lms) == 1, text  # the landmark is named uniquely
            lm = objs[lms[0]]
            ly, lh = lm["bbox"][1], lm["bbox"][3]
            out = []
            for i in match(_parse_np(w[:k])):
                y, h = objs[i]["bbox"][1], objs[i]["bbox"][3]
                if i != lms[0] and ((rel == "above" and y + h <= ly) or (rel == "below" and y >= ly + lh)):
                    out.append(i)
            return out
    return match(_parse_np(w))


def test_verify_and_dataset_info(built, splits):
    a, _, summary = built
    rep = verify(a, decode=True)
    assert rep.ok, rep.summary()
    info = json.loads((a / "dataset.json").read_text())
    assert info["dataset"] == "ris_demo" and info["task"] == "segmentation" and info["image_size"] == 32
    assert (a / "labels.txt").read_text().split() == list(SHAPES) == info["labels"]
    assert info["splits"] == {s: SMALL[f"{s}_samples"] for s in ris_demo.SPLITS} == summary["splits"]
    assert {s: len(v) for s, v in splits.items()} == info["splits"]
    assert info["config"]["seed"] == 0 and info["config"]["train_samples"] == 120
    enc = json.loads((a / "vision_encoder" / "config.json").read_text())
    assert enc["timm_kwargs"]["img_size"] == 32 and enc["timm_kwargs"]["patch_size"] == 4
    assert enc["timm_kwargs"]["embed_dim"] == 128 and enc["timm_kwargs"]["depth"] == 4 and len(enc["mean"]) == 3
    assert 0.0 <= info["pretext"]["val_patch_accuracy"] <= 1.0


def test_masks_images_and_labels(splits):
    for samples in splits.values():
        for s in samples:
            m, mask = s["meta"], _gray(s["mask.png"])
            assert set(np.unique(mask)) == {0, 255} and mask.shape == (32, 32)
            with Image.open(io.BytesIO(s["png"])) as im:
                assert im.mode == "RGB" and im.size == (32, 32)
                img = np.asarray(im).astype(int)
            objs = m["objects"]
            assert 3 <= len(objs) <= 4
            drawn = [_obj_mask(o) for o in objs]
            assert all(d.sum() == o["area"] > 0 for d, o in zip(drawn, objs))
            assert np.array_equal(mask == 255, drawn[m["target"]])  # the mask is the target's, from the annotation
            assert not np.any(np.sum(drawn, axis=0) > 1)  # non-overlapping
            t = objs[m["target"]]
            assert m["label"] == [SHAPES.index(t["shape"])] and m["category"] == t["shape"]
            assert s["txt"].decode() == m["sentences"][0]["sent"]
            # the target's pixels carry its colour: brighter than the dark background
            assert img[mask == 255].mean() > img[np.sum(drawn, axis=0) == 0].mean() + 20


def test_expressions_name_their_target_alone(splits):
    n_spatial = 0
    for samples in splits.values():
        for s in samples:
            m = s["meta"]
            text = s["txt"].decode()
            assert _refers_to(text, m["objects"]) == [m["target"]], (text, m)
            # shortest: no shorter attribute-only description is unique
            t = m["objects"][m["target"]]
            for keys in (("shape",), ("colour", "shape"), ("size", "shape"), ("size", "colour", "shape")):
                words = 1 + len(keys)
                unique = sum(all(o[k] == t[k] for k in keys) for o in m["objects"]) == 1
                if unique:
                    assert len(text.split()) <= words, (text, keys)
            n_spatial += m["template"] != "attribute"
    assert n_spatial > 0  # left/right or relation expressions occur


def test_test_splits_by_target_kind_and_disjoint_scenes(splits):
    assert {s["meta"]["category"] for s in splits["testA"]} == {"circle"}
    assert "circle" not in {s["meta"]["category"] for s in splits["testB"]}
    assert {s["meta"]["category"] for s in splits["train"]} == set(SHAPES)
    scenes = {sp: {s["meta"]["scene_id"] for s in v} for sp, v in splits.items()}
    images = {sp: {hashlib.sha256(s["png"]).hexdigest() for s in v} for sp, v in splits.items()}
    sps = list(splits)
    for i, x in enumerate(sps):
        for y in sps[i + 1 :]:
            assert not scenes[x] & scenes[y] and not images[x] & images[y]
    # images are reused across samples of a scene, one image per scene
    per_scene = defaultdict(set)
    for s in splits["train"]:
        per_scene[s["meta"]["scene_id"]].add(hashlib.sha256(s["png"]).hexdigest())
    assert all(len(v) == 1 for v in per_scene.values())
    assert len(per_scene) < len(splits["train"])


def test_deterministic(built):
    a, b, _ = built
    for split in ris_demo.SPLITS:
        ma = json.loads((a / split / "manifest.json").read_text())
        mb = json.loads((b / split / "manifest.json").read_text())
        assert [sh["sha256"] for sh in ma["shards"]] == [sh["sha256"] for sh in mb["shards"]]
    for f in ("model.safetensors", "config.json"):
        ha = hashlib.sha256((a / "vision_encoder" / f).read_bytes()).hexdigest()
        hb = hashlib.sha256((b / "vision_encoder" / f).read_bytes()).hexdigest()
        assert ha == hb, f


def test_chance_levels_and_image_only_answer(built, splits):
    info = json.loads((built[0] / "dataset.json").read_text())
    for split, samples in splits.items():
        all_obj, rand, largest = [], [], []
        for s in samples:
            m = s["meta"]
            target = _gray(s["mask.png"]) == 255
            drawn = [_obj_mask(o) for o in m["objects"]]
            all_obj.append(_iou(np.any(drawn, axis=0), target))
            rand.append(np.mean([_iou(d, target) for d in drawn]))
            largest.append(_iou(drawn[int(np.argmax([d.sum() for d in drawn]))], target))
        ch = info["chance"][split]
        assert ch["all_objects_miou"] == pytest.approx(np.mean(all_obj), abs=1e-5)
        assert ch["random_object_miou"] == pytest.approx(np.mean(rand), abs=1e-5)
        assert ch["empty_miou"] == 0.0
        assert ch["all_objects_miou"] < 0.5 and ch["random_object_miou"] < 0.5
        assert np.mean(largest) < 0.6  # an image-only answer is far from 1: the text is needed


def test_ensure_and_options(built, tmp_path):
    a = built[0]
    before = (a / "dataset.json").stat().st_mtime_ns
    assert ris_demo.ensure_ris_demo(a, verbose=False) == a.resolve()  # dataset.json present: left as is
    assert (a / "dataset.json").stat().st_mtime_ns == before
    with pytest.raises(Exception, match="unknown ris_demo options"):
        get_converter("ris_demo")(None, tmp_path / "x", shard_size=10, skip_bad=False, bogus=1)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "f").write_text("x")
    with pytest.raises(Exception, match="not a ris_demo build"):
        get_converter("ris_demo")(None, tmp_path / "other", shard_size=10, skip_bad=False, **SMALL)
    assert not list(tmp_path.glob(".*tmp-*"))  # nothing half-built left beside
