from __future__ import annotations

import json

import pytest

from datasets_prep.mmimdb import MOPE_LABELS, convert
from datasets_prep.verify import verify
from datasets_prep.writer import PrepError, read_labels_file, read_manifest
from tests.helpers.prep_helpers import MMIMDB_LABELS_REAL, by_id, read_split, read_split_wds, tree_bytes


def test_real_labels_file_23_clean_names():
    raw = MMIMDB_LABELS_REAL.read_bytes()
    assert not raw.endswith(b"\n") and b"History \n" in raw  # the quirks are really there
    labels = read_labels_file(MMIMDB_LABELS_REAL)
    assert labels == MOPE_LABELS and len(labels) == 23
    assert all(x == x.strip() and x for x in labels)


def test_mmimdb_convert(mmimdb_raw, tmp_path):
    out = tmp_path / "out"
    s = convert(mmimdb_raw, out, shard_size=2, skip_bad=False, labels_file=MMIMDB_LABELS_REAL, min_shards=1)
    # train: 0000005 (News) dropped; dev: 0000010 (Western unseen in train) and 0000012 (Adult only) dropped;
    # test: 0000021 (empty plot) dropped. dev is written as val, although listed first in split.json.
    assert s["splits"] == {"train": 5, "val": 1, "test": 1}
    assert s["dropped"] == {
        "train: Adult label removed": 1,
        "train: genre News": 1,
        "val: Adult label removed": 1,
        "val: genre unseen in train": 1,
        "val: only Adult genres": 1,
        "test: empty plot": 1,
    }
    train = by_id(read_split_wds(out / "train"))
    assert sorted(train) == ["0000001", "0000002", "0000003", "0000004", "0000006"]  # ids stay 7-digit strings
    m1 = json.loads(train["0000001"]["json"])
    assert m1["genres"] == ["Drama", "Short"] and m1["label"] == [
        MOPE_LABELS.index("Drama"),
        MOPE_LABELS.index("Short"),
    ]
    assert train["0000001"]["txt"].decode().startswith("A much longer plot")  # longest plot kept
    assert train["0000001"]["__key__"] == "0000001"
    assert json.loads(train["0000006"]["json"])["genres"] == ["Drama"]  # Adult removed, sample kept
    assert train["0000002"]["jpg"] == (mmimdb_raw / "dataset/0000002.jpeg").read_bytes()
    val = by_id(read_split(out / "val"))
    assert list(val) == ["0000011"]
    mv = read_manifest(out / "val")
    assert mv["raw_split"] == "dev" and mv["dropped"] == {
        "Adult label removed": 1,
        "genre unseen in train": 1,
        "only Adult genres": 1,
    }
    mt = read_manifest(out / "train")
    assert mt["task"] == "multi_label" and mt["class_histogram"]["Drama"] == 4 and mt["class_histogram"]["War"] == 1
    assert [x["count"] for x in mt["shards"]] == [2, 2, 1]
    assert (out / "labels.txt").read_text().splitlines() == MOPE_LABELS
    assert verify(out).ok


def test_mmimdb_deterministic(mmimdb_raw, tmp_path):
    convert(mmimdb_raw, tmp_path / "a", shard_size=2, skip_bad=False)
    convert(mmimdb_raw, tmp_path / "b", shard_size=2, skip_bad=False)
    assert tree_bytes(tmp_path / "a") == tree_bytes(tmp_path / "b")


def test_mmimdb_bad_inputs(mmimdb_raw, tmp_path):
    # a train genre outside labels.txt is an error naming the file
    meta = json.loads((mmimdb_raw / "dataset/0000002.json").read_text())
    meta["genres"] = ["Comedy", "Game-Show"]
    (mmimdb_raw / "dataset/0000002.json").write_text(json.dumps(meta))
    with pytest.raises(PrepError, match=r"dataset/0000002\.json.*Game-Show.*--skip-bad"):
        convert(mmimdb_raw, tmp_path / "o1", shard_size=10, skip_bad=False)
    (mmimdb_raw / "dataset/0000003.jpeg").unlink()
    (mmimdb_raw / "dataset/0000004.json").write_text("{not json")
    s = convert(mmimdb_raw, tmp_path / "o2", shard_size=10, skip_bad=True)
    assert s["splits"]["train"] == 2 and s["skipped"]["train"] == 3
    m = read_manifest(tmp_path / "o2" / "train")
    assert m["skipped"]["by_reason"] == {"genre not in labels.txt": 1, "malformed movie JSON": 1, "missing image": 1}
    assert any("0000003.jpeg" in e for e in m["skipped"]["examples"])


def test_mmimdb_int_ids_are_zero_padded(mmimdb_raw, tmp_path):
    split = json.loads((mmimdb_raw / "split.json").read_text())
    split["train"] = [int(x) for x in split["train"]]
    (mmimdb_raw / "split.json").write_text(json.dumps(split))
    s = convert(mmimdb_raw, tmp_path / "o", shard_size=10, skip_bad=False)
    assert s["splits"]["train"] == 5
    assert "0000001" in by_id(read_split(tmp_path / "o" / "train"))
