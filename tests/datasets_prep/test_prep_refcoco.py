"""RefCOCO / RefCOCO+ converter (datasets_prep/refcoco.py) on replicas of the refer release
(datasets_prep.replica.make_refcoco_replica: a protocol-2 refs pickle, instances.json with polygon and RLE
segmentations, small JPEGs)."""

from __future__ import annotations

import hashlib
import io
import json
import pickle
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pycocotools")

from pycocotools import mask as mask_utils  # noqa: E402

from datasets_prep.cli import main  # noqa: E402
from datasets_prep.refcoco import VARIANTS, convert, fix_text, load_refs  # noqa: E402
from datasets_prep.replica import make_refcoco_replica  # noqa: E402
from datasets_prep.verify import verify  # noqa: E402
from datasets_prep.writer import PrepError, read_manifest  # noqa: E402
from tests.helpers.prep_helpers import read_split_wds  # noqa: E402

SPLITS = ("train", "val", "testA", "testB")
# pycocotools 2.0.11 under numpy 2 (its own decode, in the tests too)
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


@pytest.fixture(scope="module")
def replica(tmp_path_factory) -> Path:
    return make_refcoco_replica(tmp_path_factory.mktemp("refcoco") / "raw")


@pytest.fixture
def raw(tmp_path) -> Path:
    """A fresh replica per test (for the tests that break it)."""
    return make_refcoco_replica(tmp_path / "raw")


def _refs(root: Path, variant: str = "refcoco") -> list[dict]:
    with open(root / variant / "refs(unc).p", "rb") as f:
        return pickle.load(f)  # our own replica: plain data


def _dump_refs(root: Path, refs: list[dict], variant: str = "refcoco") -> None:
    with open(root / variant / "refs(unc).p", "wb") as f:
        pickle.dump(refs, f, protocol=2)


def _instances(root: Path, variant: str = "refcoco") -> dict:
    return json.loads((root / variant / "instances.json").read_text())


def _png(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        assert im.mode == "L"
        return np.asarray(im)


def _size(data: bytes) -> tuple[int, int]:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return im.size


def _expected_mask(ann: dict, h: int, w: int, size: tuple[int, int]) -> np.ndarray:
    """pycocotools' own decode of the raw segmentation, resized with nearest to the stored image's size."""
    from PIL import Image

    seg = ann["segmentation"]
    if isinstance(seg, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(seg, h, w))
    elif isinstance(seg["counts"], list):
        rle = mask_utils.frPyObjects(seg, h, w)
    else:
        rle = seg
    m = Image.fromarray(mask_utils.decode(rle) * 255, mode="L")
    return np.asarray(m.resize(size, Image.NEAREST) if m.size != size else m)


def _convert(src: Path, out: Path, *, shard_size: int = 4, skip_bad: bool = False, **opts) -> dict:
    return convert(src, out, shard_size=shard_size, skip_bad=skip_bad, min_shards=1, **opts)


@pytest.mark.parametrize("max_side", [640, 40])
def test_refcoco_convert(replica, tmp_path, max_side):
    out = tmp_path / "out"
    s = _convert(replica, out, max_side=max_side)
    refs = {r["ref_id"]: r for r in _refs(replica)}
    inst = _instances(replica)
    anns = {a["id"]: a for a in inst["annotations"]}
    images = {im["id"]: im for im in inst["images"]}
    # train: one sample per ref; val / testA / testB: one per (ref, sentence), as the benchmarks score them
    want = {
        sp: sum((1 if sp == "train" else len(r["sentences"])) for r in refs.values() if r["split"] == sp)
        for sp in SPLITS
    }
    assert s["splits"] == want and all(want.values()) and s["skipped"] == dict.fromkeys(SPLITS, 0)
    assert want["val"] > sum(r["split"] == "val" for r in refs.values())  # the replica has multi-sentence refs
    assert s["expected"] == VARIANTS["refcoco"].expected
    assert s["expected_samples"]["val"] == 10834 and s["expected_samples"]["train"] == 42404
    info = json.loads((out / "dataset.json").read_text())
    assert info["task"] == "segmentation" and info["labels"] == ["person", "car", "dog", "chair"]
    seen_kinds, image_bytes = set(), defaultdict(set)
    for sp in SPLITS:
        samples = read_split_wds(out / sp)
        metas = [json.loads(x["json"]) for x in samples]
        order = [(m["image_id"], m["ref_id"], m.get("sent_index", 0)) for m in metas]
        assert order == sorted(order)
        if sp != "train":  # every sentence of every ref of the split, once
            got = sorted((m["ref_id"], m["sent_index"]) for m in metas)
            assert got == sorted(
                (r["ref_id"], j) for r in refs.values() if r["split"] == sp for j in range(len(r["sentences"]))
            )
        for smp, meta in zip(samples, metas):
            r, ann = refs[meta["id"]], anns[meta["ann_id"]]
            im = images[r["image_id"]]
            sents = r["sentences"] if sp == "train" else [r["sentences"][meta["sent_index"]]]
            key = str(r["ref_id"]) if sp == "train" else f"{r['ref_id']}_{meta['sent_index']}"
            assert smp["__key__"] == key and r["split"] == sp
            assert [meta[k] for k in ("ann_id", "image_id", "category_id")] == [
                r["ann_id"],
                im["id"],
                r["category_id"],
            ]
            assert (
                info["labels"][meta["label"][0]]
                == meta["category"]
                == {1: "person", 3: "car", 18: "dog", 62: "chair"}[r["category_id"]]
            )
            assert meta["sentences"] == [
                {"sent": x["sent"], "raw": x["raw"], "tokens": x["tokens"], "sent_id": x["sent_id"]} for x in sents
            ]
            assert smp["txt"].decode() == "\n".join(x["sent"] for x in sents)
            size = _size(smp["jpg"])
            assert meta["orig_size"] == [im["height"], im["width"]] and meta["size"] == [size[1], size[0]]
            if max_side >= max(im["width"], im["height"]):
                assert smp["jpg"] == (replica / "images" / "train2014" / im["file_name"]).read_bytes()
            else:
                assert max(size) == max_side
            mask = _png(smp["mask.png"])
            assert set(np.unique(mask)) <= {0, 255} and mask.any()
            np.testing.assert_array_equal(mask, _expected_mask(ann, im["height"], im["width"], size))
            seg = ann["segmentation"]
            seen_kinds.add("polygon" if isinstance(seg, list) else type(seg["counts"]).__name__)
            image_bytes[meta["image_id"]].add(smp["jpg"])
    assert seen_kinds == {"polygon", "list", "str"}  # polygons, uncompressed (crowd) and compressed RLE
    assert all(len(v) == 1 for v in image_bytes.values())  # one encoding per image, shared by its refs
    assert len(image_bytes) < sum(want.values())  # images with several refs exist
    assert verify(out).ok


def test_refcoco_deterministic(replica, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    _convert(replica, a, max_side=40)
    _convert(replica, b, max_side=40)

    def digests(root: Path) -> dict[str, str]:
        return {
            p.parent.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.glob("*/manifest.json"))
        }

    assert digests(a) == digests(b) and len(digests(a)) == 4
    assert (a / "dataset.json").read_bytes() == (b / "dataset.json").read_bytes()


def test_refcoco_plus_cli_and_verify(tmp_path, capsys):
    src = make_refcoco_replica(tmp_path / "raw", "refcoco+", n_images=6, seed=1)
    imgs = tmp_path / "elsewhere"
    (src / "images" / "train2014").rename(imgs)
    out = tmp_path / "shards"
    argv = ["refcoco+", "--src", str(src), "--out", str(out), "--min-shards", "1", "--opt", f"images={imgs}"]
    assert main([*argv, "--opt", "splits=train,val"]) == 0
    summary = json.loads(capsys.readouterr().out)
    refs = _refs(src, "refcoco+")
    assert summary["splits"] == {
        "train": sum(r["split"] == "train" for r in refs),
        "val": sum(len(r["sentences"]) for r in refs if r["split"] == "val"),
    }
    assert read_manifest(out / "train")["dataset"] == "refcoco_plus"
    assert main(["--verify", str(out)]) == 0
    assert "OK" in capsys.readouterr().out
    assert main(["refcoco+", "--src", str(src), "--out", str(out)]) == 2  # default images dir is gone now
    assert "--opt images=PATH" in capsys.readouterr().err


def test_verify_checks_the_mask(replica, tmp_path):
    """--verify of a segmentation split fails when a mask is not the image's size."""
    import tarfile

    out = tmp_path / "out"
    _convert(replica, out, splits="val", shard_size=100)
    shard = next((out / "val").glob("*.tar"))
    with tarfile.open(shard) as tar:
        members = [(ti, tar.extractfile(ti).read()) for ti in tar]
    with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as tar:
        for ti, data in members:
            if ti.name.endswith(".mask.png") and ti.name.split(".")[0] == members[0][0].name.split(".")[0]:
                from PIL import Image

                buf = io.BytesIO()
                Image.new("L", (3, 3), 255).save(buf, format="PNG")
                data = buf.getvalue()
                ti.size = len(data)
            tar.addfile(ti, io.BytesIO(data))
    rep = verify(out / "val")
    assert any("mask.png is 3x3" in p for p in rep.problems), rep.problems


# ------------------------------------------------------------------------------------------------- the pickle
class _Planted:
    """A pickle payload that would create a file when unpickled with the plain pickle module."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (open, (str(self.target), "w"))


def test_planted_pickle_is_refused(raw, tmp_path):
    marker = tmp_path / "pwned"
    refs = _refs(raw)
    refs[0]["sentences"].append(_Planted(marker))
    _dump_refs(raw, refs)
    for skip_bad in (False, True):
        with pytest.raises(PrepError, match=r"refs\(unc\)\.p: refuses to load globals \(io\.open\)") as ei:
            _convert(raw, tmp_path / "out", skip_bad=skip_bad)
        assert str(raw / "refcoco" / "refs(unc).p") in str(ei.value)
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_truncated_pickle_and_missing_files(raw, tmp_path):
    p = raw / "refcoco" / "refs(unc).p"
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(PrepError, match=r"refs\(unc\)\.p: truncated or corrupt pickle"):
        _convert(raw, tmp_path / "o1", skip_bad=True)
    p.write_bytes(data)
    (raw / "refcoco" / "instances.json").unlink()
    with pytest.raises(PrepError, match=r"refcoco/instances\.json: instances\.json not found"):
        _convert(raw, tmp_path / "o2", skip_bad=True)
    p.unlink()
    with pytest.raises(PrepError, match=r"refs\(unc\)\.p: refs pickle not found"):
        _convert(raw, tmp_path / "o3")


def test_python2_strings_are_read(tmp_path):
    """A protocol-0 pickle as Python 2 writes it, with a UTF-8 byte string: read as latin-1, repaired."""
    p = tmp_path / "refs(unc).p"
    p.write_bytes(b"(lp0\n(dp1\nS'sent'\np2\nS'caf\\xc3\\xa9'\np3\nsS'ref_id'\np4\nI7\nsa.")
    refs = load_refs(p)
    assert refs == [{"sent": "caf\u00c3\u00a9", "ref_id": 7}]
    assert fix_text(refs[0]["sent"]) == "caf\u00e9" and fix_text("caf\u00e9") == "caf\u00e9"


# ------------------------------------------------------------------------------------------------- bad inputs
def _first_ref(raw: Path, split: str = "val", kind: str = "polygon") -> dict:
    inst = _instances(raw)
    anns = {a["id"]: a for a in inst["annotations"]}
    for r in sorted(_refs(raw), key=lambda r: r["ref_id"]):
        if r["ann_id"] not in anns:  # broken already
            continue
        seg = anns[r["ann_id"]]["segmentation"]
        if r["split"] == split and (kind == "any" or isinstance(seg, list) == (kind == "polygon")):
            return r
    raise AssertionError("no such ref in the replica")


def _set_segmentation(raw: Path, ann_id: int, seg) -> None:
    inst = _instances(raw)
    next(a for a in inst["annotations"] if a["id"] == ann_id)["segmentation"] = seg
    (raw / "refcoco" / "instances.json").write_text(json.dumps(inst))


def _samples(ref: dict) -> int:
    """The samples a ref gives: one in train, one per sentence in val / testA / testB."""
    return 1 if ref["split"] == "train" else len(ref["sentences"])


def _break(raw: Path, case: str, split: str = "val") -> tuple[int, int, str]:
    """Break the replica; returns (ref_id, number of samples skipped, what the error names besides the ref).
    An evaluation-split ref gives one sample per sentence, so it is skipped once per sentence."""
    ref = _first_ref(raw, split, kind="any" if case in ("missing image", "unknown ann_id") else "polygon")
    inst = _instances(raw)
    im = next(i for i in inst["images"] if i["id"] == ref["image_id"])
    h, w = im["height"], im["width"]
    if case == "missing image":
        (raw / "images" / "train2014" / im["file_name"]).unlink()
        n = sum(_samples(r) for r in _refs(raw) if r["image_id"] == ref["image_id"] and r["split"] == split)
        return ref["ref_id"], n, im["file_name"]
    if case == "unknown ann_id":
        refs = _refs(raw)
        next(r for r in refs if r["ref_id"] == ref["ref_id"])["ann_id"] = 987654321
        _dump_refs(raw, refs)
        return ref["ref_id"], _samples(ref), "ann_id 987654321"
    seg, named = {
        "broken polygon (odd length)": ([[1.0, 1.0, 9.0, 1.0, 9.0]], "odd length 5"),
        "broken polygon (2 points)": ([[1.0, 1.0, 9.0, 9.0]], "has 2 points"),
        "broken polygon (empty)": ([], "empty segmentation"),
        "empty mask": ({"counts": [h * w], "size": [h, w]}, "empty mask"),
        "malformed RLE": ({"counts": [5, 3], "size": [h, w]}, "run lengths sum to 8"),
    }[case]
    _set_segmentation(raw, ref["ann_id"], seg)
    n = sum(_samples(r) for r in _refs(raw) if r["ann_id"] == ref["ann_id"] and r["split"] == split)
    return ref["ref_id"], n, named


BAD_CASES = [
    ("missing image", "missing image"),
    ("unknown ann_id", "unknown ann_id"),
    ("broken polygon (odd length)", "broken polygon"),
    ("broken polygon (2 points)", "broken polygon"),
    ("broken polygon (empty)", "broken polygon"),
    ("empty mask", "empty mask"),
    ("malformed RLE", "malformed RLE"),
]


@pytest.mark.parametrize(("case", "reason"), BAD_CASES, ids=[c for c, _ in BAD_CASES])
def test_bad_input_named_and_counted(raw, tmp_path, case, reason):
    good = sum(len(r["sentences"]) for r in _refs(raw) if r["split"] == "val")
    ref_id, n_bad, named = _break(raw, case)
    with pytest.raises(PrepError) as ei:
        _convert(raw, tmp_path / "o1", splits="val")
    msg = str(ei.value)
    assert f"refs(unc).p: ref_id {ref_id}" in msg and named in msg and "--skip-bad" in msg, msg
    s = _convert(raw, tmp_path / "o2", splits="val", skip_bad=True)
    assert s["splits"] == {"val": good - n_bad} and s["skipped"] == {"val": n_bad}
    m = read_manifest(tmp_path / "o2" / "val")
    assert m["skipped"]["by_reason"] == {reason: n_bad}
    assert any(f"ref_id {ref_id}" in e for e in m["skipped"]["examples"])
    assert verify(tmp_path / "o2").ok


def test_all_bad_inputs_at_once(raw, tmp_path):
    """Several kinds of bad input in one release (one split each): each skipped and counted under its reason."""
    total = sum(_samples(r) for r in _refs(raw))
    cases = {"train": ("unknown ann_id", "unknown ann_id"), "val": ("broken polygon (odd length)", "broken polygon")}
    cases["testA"] = ("empty mask", "empty mask")
    cases["testB"] = ("missing image", "missing image")
    n = {sp: _break(raw, case, sp)[1] for sp, (case, _) in cases.items()}
    s = _convert(raw, tmp_path / "o", skip_bad=True)
    assert s["skipped"] == n and sum(s["splits"].values()) == total - sum(n.values())
    for sp, (_, reason) in cases.items():
        assert read_manifest(tmp_path / "o" / sp)["skipped"]["by_reason"] == {reason: n[sp]}
    assert verify(tmp_path / "o").ok
