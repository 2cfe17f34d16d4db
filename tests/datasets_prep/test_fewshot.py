"""datasets_prep.fewshot: nested, deterministic, seeded subsets; stratified option; CLI hook."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from datasets_prep.fewshot import build_fewshot, fewshot_main, fewshot_order
from datasets_prep.writer import PrepError, ShardSetWriter
from mope_data.format import MissingShardsError, ShardFormatError, fewshot_path, read_fewshot, read_split_index

LABELS = ["a", "b", "c"]


def _labels(i: int) -> int:
    return 2 if i % 10 == 0 else i % 2  # class c is rare (10%), a and b ~45% each


def _write(root: Path, n: int = 120, task: str = "single_label") -> Path:
    with ShardSetWriter(root, "train", dataset="toy", task=task, labels=LABELS, shard_size=17) as w:
        for i in range(n):
            lab = _labels(i) if task == "single_label" else sorted({_labels(i), (i // 7) % 2})
            w.write(f"s{i:04d}", {"txt": f"t{i}", "json": {"id": i, "label": lab}})
    return root / "train"


def _keys(p: Path) -> list[str]:
    return json.loads(p.read_text())["keys"]


def test_nested_and_deterministic(tmp_path):
    split = _write(tmp_path)
    paths = build_fewshot(split, [10, 50, 100], seed=0)
    k10, k50, k100 = (_keys(p) for p in paths)
    assert (len(k10), len(k50), len(k100)) == (10, 50, 100)
    assert set(k10) < set(k50) < set(k100)  # nested
    assert k50[:10] == k10  # a prefix of one seeded order
    before = [p.read_bytes() for p in paths]
    again = build_fewshot(split, [100, 10, 50], seed=0)
    assert [p.read_bytes() for p in again] == before  # deterministic, byte-identical files
    other = _keys(build_fewshot(split, [50], seed=1)[0])
    assert set(other) != set(k50)
    assert paths[0] == fewshot_path(split, 10, 0) and paths[0].parent.name == "seed-0"
    doc = read_fewshot(split, 50, 0)
    assert doc["strategy"] == "uniform" and doc["shots"] == 50
    assert sum(doc["class_histogram"].values()) == 50


def test_uniform_order_independent_of_shard_layout(tmp_path):
    a = read_split_index(_write(tmp_path / "a"))
    assert fewshot_order(a, 3) == fewshot_order(list(reversed(a)), 3)


def test_stratified_balanced_and_nested(tmp_path):
    split = _write(tmp_path)
    p12, p30, p60 = build_fewshot(split, [12, 30, 60], seed=0, stratified=True)
    assert p12.parent.name == "stratified-seed-0"
    h = json.loads(p12.read_text())["class_histogram"]
    assert h == {"a": 4, "b": 4, "c": 4}  # uniform sampling would give c about 1
    assert set(_keys(p12)) < set(_keys(p30)) < set(_keys(p60))
    h60 = json.loads(p60.read_text())["class_histogram"]
    assert h60["c"] == 12 and abs(h60["a"] - h60["b"]) <= 1 and h60["a"] + h60["b"] == 48  # c exhausted (12 in all)


def test_stratified_multilabel_uses_rarest_label(tmp_path):
    split = _write(tmp_path, task="multi_label")
    (p,) = build_fewshot(split, [9], seed=0, stratified=True)
    idx = dict(read_split_index(split))
    freq: Counter = Counter(c for lab in idx.values() for c in lab)
    strata = Counter(min(idx[k], key=lambda c: (freq[c], c)) for k in _keys(p))
    assert sorted(strata.values()) == [3, 3, 3]


def test_errors(tmp_path):
    split = _write(tmp_path)
    with pytest.raises(PrepError, match="between 1 and the split size 120"):
        build_fewshot(split, [121])
    with pytest.raises(MissingShardsError, match="harness prep --fewshot"):
        read_fewshot(split, 5, 0)
    build_fewshot(split, [5])
    m = json.loads((split / "manifest.json").read_text())
    m["source_checksum"] = "changed"
    (split / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ShardFormatError, match="another version"):
        read_fewshot(split, 5, 0)


def test_cli(tmp_path, capsys):
    _write(tmp_path)
    assert fewshot_main(["--fewshot", str(tmp_path), "--shots", "5,20", "--seed", "2", "--stratified"]) == 0
    out = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [o["shots"] for o in out] == [5, 20] and out[0]["strategy"] == "stratified"
    assert fewshot_path(tmp_path / "train", 20, 2, True).is_file()
    assert fewshot_main(["--fewshot", str(tmp_path / "train"), "--shots", "500"]) == 2
    assert "split size" in capsys.readouterr().err
