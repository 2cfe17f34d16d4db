from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import pytest

from datasets_prep.food101 import convert, read_titles_csv
from datasets_prep.verify import verify
from datasets_prep.writer import PrepError, read_labels_file, read_manifest, sanitize_key
from tests.helpers.prep_helpers import (
    FOOD_LABELS_REAL,
    FOOD_TITLES_REAL,
    by_id,
    jpeg_bytes,
    png_bytes,
    read_split,
    read_split_wds,
    tree_bytes,
)


def test_food101_texts_txt(food101_raw, tmp_path):
    out = tmp_path / "out"
    summary = convert(food101_raw, out, shard_size=4, skip_bad=False, val_size=3, min_shards=1)
    # 18 train -> 15 train + 3 val (stratified: one per class); 6 test
    assert summary["splits"] == {"train": 15, "val": 3, "test": 6}
    val = read_split(out / "val")
    assert Counter(json.loads(s["json"])["class"] for s in val) == {"apple_pie": 1, "baklava": 1, "sushi": 1}
    train_ids = {json.loads(s["json"])["id"] for s in read_split(out / "train")}
    val_ids = {json.loads(s["json"])["id"] for s in val}
    assert not train_ids & val_ids and len(train_ids | val_ids) == 18
    test = by_id(read_split_wds(out / "test"))
    s = test["sushi_sushi_101.jpg"]  # MMBT id keeps .jpg; key sanitized
    assert s["__key__"] == sanitize_key("sushi_sushi_101.jpg") and "." not in s["__key__"]
    meta = json.loads(s["json"])
    assert meta["label"] == 2 and meta["class"] == "sushi" and meta["text_source"] == "texts_txt"
    assert s["txt"] == b"best sushi recipe with extra quotes more 1"
    assert s["jpg"] == (food101_raw / "images/test/sushi/sushi_101.jpg").read_bytes()  # original bytes
    m = read_manifest(out / "train")
    assert m["val_stratified"] is True and m["text_source"] == "texts_txt" and m["num_samples"] == 15
    assert [x["count"] for x in m["shards"]] == [4, 4, 4, 3]
    assert (out / "labels.txt").read_text() == "apple_pie\nbaklava\nsushi\n"
    assert json.loads((out / "dataset.json").read_text())["splits"] == {"train": 15, "val": 3, "test": 6}
    assert verify(out).ok
    # the "-k" file name survives
    assert any(i.endswith("_100-2.jpg") for i in train_ids | val_ids)


def test_food101_deterministic_and_seeded_val(food101_raw, tmp_path):
    convert(food101_raw, tmp_path / "a", shard_size=4, skip_bad=False, val_size=3, min_shards=1)
    convert(food101_raw, tmp_path / "b", shard_size=4, skip_bad=False, val_size=3, min_shards=1)
    assert tree_bytes(tmp_path / "a") == tree_bytes(tmp_path / "b")
    convert(food101_raw, tmp_path / "c", shard_size=4, skip_bad=False, val_size=3, min_shards=1, seed=5)

    def ids(d):
        return {json.loads(s["json"])["id"] for s in read_split(d / "val")}

    assert len(ids(tmp_path / "c")) == 3


def test_food101_titles_source(food101_raw, tmp_path):
    out = tmp_path / "out"
    convert(food101_raw, out, shard_size=100, skip_bad=False, text_source="titles", val_size=0, clean="basic")
    test = by_id(read_split(out / "test"))
    assert json.loads(test["apple_pie_apple_pie_100.jpg"]["json"])["text_source"] == "title"
    assert test["apple_pie_apple_pie_100.jpg"]["txt"].decode() == "My apple_pie Café & friends 0"
    assert test["baklava_baklava_101.jpg"]["txt"].decode() == 'baklava "best" \'1'
    assert not (out / "val").exists()
    assert read_manifest(out / "train")["num_samples"] == 18


def test_food101_bad_inputs_error_then_skip(food101_raw, tmp_path):
    (food101_raw / "images/train/baklava/baklava_103.jpg").write_bytes(b"\xff\xd8not a jpeg at all")
    (food101_raw / "texts_txt/sushi/sushi_104.txt").unlink()
    (food101_raw / "images/test/pizza").mkdir()  # class outside labels.txt
    (food101_raw / "images/test/pizza/pizza_1.png").write_bytes(png_bytes(1))
    with pytest.raises(PrepError, match=r"sushi_104\.txt.*--skip-bad"):
        convert(food101_raw, tmp_path / "o1", shard_size=100, skip_bad=False, val_size=0)
    (food101_raw / "texts_txt/sushi/sushi_104.txt").write_text("back")
    with pytest.raises(PrepError, match=r"pizza.*not in labels\.txt"):
        convert(food101_raw, tmp_path / "o2", shard_size=100, skip_bad=False, val_size=0)
    shutil.rmtree(food101_raw / "images/test/pizza")
    with pytest.raises(PrepError, match=r"baklava_103\.jpg.*undecodable image.*--skip-bad"):
        convert(food101_raw, tmp_path / "o3", shard_size=100, skip_bad=False, val_size=0)
    assert not (tmp_path / "o3" / "train").exists()  # nothing half-written
    # skip-bad: counted, not silent
    (food101_raw / "texts_txt/sushi/sushi_104.txt").unlink()
    (food101_raw / "images/test/pizza").mkdir()
    (food101_raw / "images/test/pizza/pizza_1.png").write_bytes(png_bytes(1))
    s = convert(food101_raw, tmp_path / "o4", shard_size=100, skip_bad=True, val_size=0)
    assert s["splits"] == {"train": 16, "test": 6} and s["skipped"] == {"train": 2, "test": 1}
    mt = read_manifest(tmp_path / "o4" / "train")
    assert mt["skipped"]["by_reason"] == {"missing text": 1, "undecodable image": 1}
    assert any("baklava_103.jpg" in e for e in mt["skipped"]["examples"])
    assert read_manifest(tmp_path / "o4" / "test")["skipped"]["by_reason"] == {"label not in labels.txt": 1}


def test_food101_title_fallback_and_non_jpeg(food101_raw, tmp_path):
    (food101_raw / "texts_txt/sushi/sushi_104.txt").unlink()
    p = food101_raw / "images/train/sushi/sushi_104.jpg"
    p.write_bytes(png_bytes(3))  # a PNG with a .jpg name: re-encoded as png
    convert(food101_raw, tmp_path / "o", shard_size=100, skip_bad=False, val_size=0, title_fallback=True)
    s = by_id(read_split(tmp_path / "o" / "train"))["sushi_sushi_104.jpg"]
    assert json.loads(s["json"])["text_source"] == "title" and "png" in s and "jpg" not in s
    assert s["txt"] == b"my sushi caf\xc3\xa9 friends 4"


# ---------------------------------------------------------------------------------------------- real test_titles.csv
def test_real_titles_csv_all_rows_parse():
    rows, bad = read_titles_csv(FOOD_TITLES_REAL)
    labels = read_labels_file(FOOD_LABELS_REAL)
    assert len(labels) == 101 and labels[0] == "apple_pie" and labels == sorted(labels)
    assert bad == [] and len(rows) == 22716
    assert {r.label for r in rows} == set(labels)  # no "\r" left on labels, no header row swallowed
    per = Counter(r.label for r in rows)
    assert min(per.values()) == 197 and max(per.values()) == 238
    assert all(r.file.startswith(r.label + "_") and r.file.endswith(".jpg") for r in rows)
    assert sum("-" in r.file.rsplit("_", 1)[1] for r in rows) == 42
    assert rows[0].where.endswith(":1")
    assert len({r.file for r in rows}) == 22716


def test_real_titles_convert_subset_with_placeholder_images(tmp_path):
    """All 22,716 real rows go through the converter; placeholder images exist for 2 rows per class only, so the other
    rows are counted as 'missing image' (never silently dropped) and the 202 written samples keep their labels."""
    rows, _ = read_titles_csv(FOOD_TITLES_REAL)
    src = tmp_path / "src"
    (src / "texts").mkdir(parents=True)
    shutil.copy(FOOD_TITLES_REAL, src / "texts" / "test_titles.csv")
    shutil.copy(FOOD_LABELS_REAL, src / "labels.txt")
    chosen: dict[str, list] = {}
    for r in rows:
        if len(chosen.setdefault(r.label, [])) < 2:
            chosen[r.label].append(r)
    img = jpeg_bytes(0, (4, 4))
    for rs in chosen.values():
        for r in rs:
            p = src / "images" / "test" / r.label / r.file
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(img)
    out = tmp_path / "out"
    s = convert(src, out, shard_size=1000, skip_bad=True, splits="test", text_source="titles")
    assert s["splits"] == {"test": 202} and s["skipped"] == {"test": 22716 - 202}
    m = read_manifest(out / "test")
    assert m["skipped"]["by_reason"] == {"missing image": 22716 - 202}
    assert len(m["skipped"]["examples"]) == 20
    assert set(m["class_histogram"].values()) == {2}
    labels = read_labels_file(FOOD_LABELS_REAL)
    got = by_id(read_split(out / "test"))
    for rs in chosen.values():
        for r in rs:
            meta = json.loads(got[f"{r.label}_{r.file}"]["json"])
            assert labels[meta["label"]] == r.label
    assert len(m["shards"]) >= 32  # min_shards default keeps shards >> ranks x workers
    # without --skip-bad the first missing image is a clear error naming CSV file and line
    with pytest.raises(PrepError, match=r"test_titles\.csv:\d+: missing image"):
        convert(src, tmp_path / "o2", shard_size=1000, skip_bad=False, splits="test", text_source="titles")


def test_food101_missing_src_is_clear(tmp_path):
    with pytest.raises(PrepError, match="--src"):
        convert(None, tmp_path / "o", shard_size=10, skip_bad=False)
    with pytest.raises(PrepError, match="unknown option"):
        convert(tmp_path, tmp_path / "o", shard_size=10, skip_bad=False, bogus=1)
    with pytest.raises(PrepError, match="labels"):
        convert(Path(tmp_path), tmp_path / "o", shard_size=10, skip_bad=False)
