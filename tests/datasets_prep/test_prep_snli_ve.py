from __future__ import annotations

import json
import shutil

import pytest

from datasets_prep.snli_ve import LABELS, convert, image_id_of
from datasets_prep.verify import verify
from datasets_prep.writer import PrepError, read_manifest
from tests.helpers.prep_helpers import SNLI_SAMPLE_DIR, by_id, read_split, read_split_wds, tree_bytes


def test_image_id_of_both_spellings():
    assert image_id_of({"Flikr30kID": "555378351.jpg"}) == "555378351"
    assert image_id_of({"Flickr30K_ID": "555378351"}) == "555378351"
    assert image_id_of({"Flickr30K_ID": "x.jpg.jpg"}) == "x.jpg"  # only one trailing .jpg stripped
    assert image_id_of({"pairID": "555378351.jpg#2r1e"}) == "555378351"
    assert image_id_of({}) is None


def test_snli_convert(snli_raw, tmp_path):
    out = tmp_path / "out"
    s = convert(snli_raw, out, shard_size=2, skip_bad=False, min_shards=1)
    assert s["splits"] == {"train": 4, "val": 2, "test": 1}
    train = by_id(read_split_wds(out / "train"))
    assert len(train) == 4
    for pid, smp in train.items():
        meta = json.loads(smp["json"])
        lab = pid.split("r1")[1]
        assert LABELS[meta["label"]][0] == lab  # pairID's last letter mirrors the label
        assert smp["txt"].decode() == f"hypothesis {meta['image_id']} {pid.split('#')[1][0]} {LABELS[meta['label']]}"
        assert smp["jpg"] == (snli_raw / "Flickr30K/flickr30k_images" / f"{meta['image_id']}.jpg").read_bytes()
        assert "." not in smp["__key__"] and "#" not in smp["__key__"]
    assert json.loads(train["10002456.jpg#2r1e"]["json"])["image_id"] == "10002456"  # pairID fallback
    assert read_manifest(out / "val")["raw_file"] == "snli_ve_dev.jsonl"
    assert verify(out).ok
    convert(snli_raw, tmp_path / "again", shard_size=2, skip_bad=False, min_shards=1)
    assert tree_bytes(out) == tree_bytes(tmp_path / "again")


def test_snli_bad_lines(snli_raw, tmp_path):
    p = snli_raw / "snli_ve_dev.jsonl"
    lines = p.read_text().splitlines()
    good = json.loads(lines[0])
    bad_label = dict(good, pairID="1000268201.jpg#0r9x", gold_label="-")
    missing_img = dict(good, pairID="424242.jpg#0r1n", Flickr30K_ID="424242")
    lines[1:1] = ['{"pairID": "broken', json.dumps(bad_label), json.dumps(missing_img)]
    p.write_text("\n".join(lines) + "\n")
    with pytest.raises(PrepError, match=r"snli_ve_dev\.jsonl:2: malformed JSON line.*--skip-bad"):
        convert(snli_raw, tmp_path / "o1", shard_size=10, skip_bad=False)
    s = convert(snli_raw, tmp_path / "o2", shard_size=10, skip_bad=True)
    assert s["splits"]["val"] == 2 and s["skipped"]["val"] == 3
    m = read_manifest(tmp_path / "o2" / "val")
    assert m["skipped"]["by_reason"] == {"label not in labels": 1, "malformed JSON line": 1, "missing image": 1}
    assert any(e.startswith(f"{p}:2") for e in m["skipped"]["examples"])
    assert any(e.startswith(f"{p}:4") and "424242.jpg" in e for e in m["skipped"]["examples"])


def test_snli_real_sample_lines_and_images(tmp_path):
    """The five real Drive-era lines (Flikr30kID with .jpg, sorted keys, no final newline) with their real images."""
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(SNLI_SAMPLE_DIR / "sample_data.jsonl", src / "snli_ve_train.jsonl")
    raw = [json.loads(x) for x in (SNLI_SAMPLE_DIR / "sample_data.jsonl").read_text().splitlines() if x.strip()]
    assert len(raw) == 5 and all("Flikr30kID" in r for r in raw)
    s = convert(src, tmp_path / "out", shard_size=1000, skip_bad=False, splits="train", images_dir=SNLI_SAMPLE_DIR)
    assert s["splits"] == {"train": 5}
    got = by_id(read_split(tmp_path / "out" / "train"))
    assert sorted(got) == sorted(r["pairID"] for r in raw)
    for r in raw:
        smp = got[r["pairID"]]
        meta = json.loads(smp["json"])
        assert LABELS[meta["label"]] == r["gold_label"]
        assert smp["txt"].decode() == r["sentence2"].strip()
        assert meta["image_id"] + ".jpg" == r["Flikr30kID"]
        assert smp["jpg"] == (SNLI_SAMPLE_DIR / r["Flikr30kID"]).read_bytes()
    assert verify(tmp_path / "out").ok
