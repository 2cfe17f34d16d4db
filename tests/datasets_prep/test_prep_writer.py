from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

from datasets_prep.verify import verify
from datasets_prep.writer import (
    KEY_RE,
    PrepError,
    ShardSetWriter,
    effective_shard_size,
    read_manifest,
    sanitize_key,
    write_dataset_info,
)
from tests.helpers.prep_helpers import read_split, read_split_wds, tree_bytes

LABELS = ["cat", "dog", "eel"]


def _write(out: Path, n: int = 7, split: str = "train", fail_at: int | None = None, shard_size: int = 3) -> None:
    with ShardSetWriter(
        out,
        split,
        dataset="toy",
        task="single_label",
        labels=LABELS,
        shard_size=shard_size,
        source_checksum="abc",
        modalities=("text",),
        extra={"note": "x"},
    ) as w:
        for i in range(n):
            if fail_at is not None and i == fail_at:
                raise RuntimeError("boom")
            oid = f"img.{i}.jpg"
            w.write(sanitize_key(oid), {"txt": f"text {i}", "json": {"id": oid, "label": i % 3}})
        w.skip("missing image", "a/b.jpg")
        w.skip("missing image", "a/c.jpg")
        w.skip("missing text", "t/x.txt")


def test_sanitize_key_valid_deterministic_injective():
    raws = ["sushi_sushi_416.jpg", "a.b", "a_b", "a b", "a/b", "555378351.jpg#2r1e", "x" * 300, "", "Ünïcode"]
    keys = [sanitize_key(r) for r in raws]
    assert all(KEY_RE.match(k) for k in keys), keys
    assert all("." not in k for k in keys)
    assert len(set(keys)) == len(keys)
    assert keys == [sanitize_key(r) for r in raws]
    assert sanitize_key("1_60") == "1_60"  # already valid ids are unchanged
    assert sanitize_key("0000005") == "0000005"
    assert all(len(k) <= 80 for k in keys)


def test_writer_layout_manifest_and_readback(tmp_path):
    _write(tmp_path)
    split = tmp_path / "train"
    m = read_manifest(split)
    assert m["num_samples"] == 7
    assert [s["count"] for s in m["shards"]] == [3, 3, 1]
    assert [s["file"] for s in m["shards"]] == [f"toy-train-00000{i}.tar" for i in range(3)]
    assert m["class_histogram"] == {"cat": 3, "dog": 2, "eel": 2}
    assert m["skipped"] == {
        "count": 3,
        "by_reason": {"missing image": 2, "missing text": 1},
        "examples": ["a/b.jpg: missing image", "a/c.jpg: missing image", "t/x.txt: missing text"],
    }
    assert m["note"] == "x" and m["source_checksum"] == "abc" and m["task"] == "single_label"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train"]  # no temp dir left
    samples = read_split_wds(split)
    assert len(samples) == 7
    ids = [json.loads(s["json"])["id"] for s in samples]
    assert ids == [f"img.{i}.jpg" for i in range(7)]
    assert samples[4]["txt"] == b"text 4"
    with tarfile.open(split / m["shards"][0]["file"]) as tar:
        for ti in tar:
            assert ti.mtime == 0 and ti.uid == 0 and ti.gid == 0 and ti.uname == "" and ti.mode == 0o444


def test_writer_deterministic_bytes(tmp_path):
    _write(tmp_path / "a")
    _write(tmp_path / "b")
    assert tree_bytes(tmp_path / "a") == tree_bytes(tmp_path / "b")


def _toy(out: Path, task: str = "single_label") -> ShardSetWriter:
    return ShardSetWriter(out, "train", dataset="toy", task=task, labels=LABELS, modalities=())


def test_writer_rejects_duplicate_key_and_bad_labels(tmp_path):
    with pytest.raises(PrepError, match="duplicate sample key 'k1'"), _toy(tmp_path) as w:
        w.write("k1", {"json": {"id": "1", "label": 0}})
        w.write("k1", {"json": {"id": "1", "label": 1}})
    with pytest.raises(PrepError, match="'k2'.*label 3"), _toy(tmp_path) as w:
        w.write("k2", {"json": {"id": "2", "label": 3}})
    with pytest.raises(PrepError, match="'k3'"), _toy(tmp_path) as w:
        w.write("k3", {"json": {"id": "3", "label": True}})
    with pytest.raises(PrepError, match="not a valid shard key"), _toy(tmp_path) as w:
        w.write("a.b", {"json": {"id": "3", "label": 0}})
    with pytest.raises(PrepError, match="'id' and 'label'"), _toy(tmp_path) as w:
        w.write("k4", {"json": {"label": 0}})
    with pytest.raises(PrepError, match="'m1'"), _toy(tmp_path, "multi_label") as w:
        w.write("m1", {"json": {"id": "m", "label": [0, 5]}})
    assert not (tmp_path / "train").exists()
    assert list(tmp_path.iterdir()) == []  # every failed run cleaned its temp dir


def test_writer_multilabel_histogram(tmp_path):
    with ShardSetWriter(tmp_path, "val", dataset="toy", task="multi_label", labels=LABELS) as w:
        w.write("a", {"json": {"id": "a", "label": [0, 2]}})
        w.write("b", {"json": {"id": "b", "label": [2]}})
    assert read_manifest(tmp_path / "val")["class_histogram"] == {"cat": 1, "dog": 0, "eel": 2}


def test_interrupted_run_keeps_previous_output(tmp_path):
    _write(tmp_path, n=7)
    before = tree_bytes(tmp_path)
    with pytest.raises(RuntimeError, match="boom"):
        _write(tmp_path, n=20, fail_at=10, shard_size=2)  # 5 shards already written when it fails
    assert tree_bytes(tmp_path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train"]
    _write(tmp_path, n=4)  # a complete re-run replaces the old set
    assert read_manifest(tmp_path / "train")["num_samples"] == 4
    assert len(list((tmp_path / "train").glob("*.tar"))) == 2


def test_effective_shard_size():
    assert effective_shard_size(356, 1000, 32) == 11  # 33 shards >= 32
    assert effective_shard_size(10, 1000, 32) == 1
    assert effective_shard_size(100000, 1000, 32) == 1000
    assert effective_shard_size(100, 7, 1) == 7


def test_write_dataset_info(tmp_path):
    write_dataset_info(tmp_path, dataset="toy", task="single_label", labels=LABELS, splits={"train": 7})
    assert (tmp_path / "labels.txt").read_text() == "cat\ndog\neel\n"
    info = json.loads((tmp_path / "dataset.json").read_text())
    assert info == {
        "dataset": "toy",
        "task": "single_label",
        "labels": LABELS,
        "splits": {"train": 7},
        "converter_version": "1",
    }


# --------------------------------------------------------------------------------------------------------- verify
def test_verify_ok_then_detects_corruption(tmp_path):
    _write(tmp_path)
    write_dataset_info(tmp_path, dataset="toy", task="single_label", labels=LABELS, splits={"train": 7})
    assert verify(tmp_path).ok
    shard = tmp_path / "train" / "toy-train-000001.tar"
    data = bytearray(shard.read_bytes())
    data[600] ^= 0xFF  # flip a byte inside the first member's payload
    shard.write_bytes(bytes(data))
    rep = verify(tmp_path)
    assert not rep.ok
    assert any("toy-train-000001.tar" in p and "sha256" in p for p in rep.problems)


def test_verify_detects_truncated_shard(tmp_path):
    _write(tmp_path)
    shard = tmp_path / "train" / "toy-train-000000.tar"
    shard.write_bytes(shard.read_bytes()[:700])
    rep = verify(tmp_path)
    assert any("toy-train-000000.tar" in p for p in rep.problems)
    assert any("samples read" in p for p in rep.problems)


def _rewrite_shard(split: Path, name: str, members: list[tuple[str, bytes]]) -> None:
    """Replace a shard and fix its manifest entry (sha256 stays valid), so only content checks can fail."""
    import hashlib

    path = split / name
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for n, b in members:
            ti = tarfile.TarInfo(n)
            ti.size = len(b)
            tar.addfile(ti, io.BytesIO(b))
    m = json.loads((split / "manifest.json").read_text())
    for s in m["shards"]:
        if s["file"] == name:
            s["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    (split / "manifest.json").write_text(json.dumps(m))


def test_verify_detects_duplicate_key_and_dotted_key(tmp_path):
    _write(tmp_path)
    split = tmp_path / "train"
    first = read_split(split)[0]
    key = first["__key__"]
    # shard 2 (1 sample) now holds a sample whose key already is in shard 0
    _rewrite_shard(split, "toy-train-000002.tar", [(f"{key}.json", first["json"]), (f"{key}.txt", b"t")])
    rep = verify(tmp_path)
    assert any(f"duplicate key {key!r}" in p for p in rep.problems), rep.problems
    # a dotted key is split by webdataset at the first dot: flagged
    _rewrite_shard(split, "toy-train-000002.tar", [("a.b.json", b'{"id":"z","label":0}'), ("a.b.txt", b"t")])
    rep = verify(tmp_path)
    assert any("key contains a dot" in p for p in rep.problems), rep.problems


def test_verify_detects_bad_label_and_histogram(tmp_path):
    _write(tmp_path)
    split = tmp_path / "train"
    _rewrite_shard(split, "toy-train-000002.tar", [("zz.json", b'{"id":"z","label":9}'), ("zz.txt", b"t")])
    rep = verify(tmp_path)
    assert any("label 9 invalid" in p for p in rep.problems)
    assert any("class histogram" in p for p in rep.problems)


def test_killed_writer_leftovers_are_recovered(tmp_path):
    """A writer killed with SIGKILL cannot clean up: the next writer of that split removes its temp dir, and restores
    the previous set if the kill happened between the two renames."""
    _write(tmp_path, n=7)
    before = tree_bytes(tmp_path)
    (tmp_path / ".tmp-train-dead").mkdir()
    (tmp_path / ".tmp-train-dead" / "toy-train-000000.tar").write_bytes(b"half")
    (tmp_path / "train").rename(tmp_path / ".old-train-dead")  # killed after the first rename
    with pytest.raises(RuntimeError, match="stop"), _toy(tmp_path):
        assert not (tmp_path / ".old-train-dead").exists() and not (tmp_path / ".tmp-train-dead").exists()
        raise RuntimeError("stop")
    assert tree_bytes(tmp_path) == before  # previous complete set restored, leftovers gone
