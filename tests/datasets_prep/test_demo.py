"""The embedded demo (DigitGrid-VE) on a small configuration: correctness of labels and images, balance (text-only and
image-only at chance), disjoint source digits, byte-identical rebuilds (shards and encoder), loader and timm round
trip."""

from __future__ import annotations

import hashlib
import io
import json
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest

from datasets_prep import demo
from datasets_prep.registry import get_converter

SMALL = {
    "train_pairs": 240,
    "val_pairs": 80,
    "test_pairs": 80,
    "epochs": 1,
    "grids_per_epoch": 128,
    "val_grids": 64,
    "batch_size": 64,
    "threads": 1,
    "verbose": False,
    "templates": "all",
}


def _samples(split_dir: Path) -> list[dict]:
    import tarfile

    m = json.loads((split_dir / "manifest.json").read_text())
    out: dict[str, dict] = {}
    for sh in m["shards"]:
        with tarfile.open(split_dir / sh["file"]) as tar:
            for ti in tar:
                key, _, ext = ti.name.partition(".")
                out.setdefault(key, {})[ext] = tar.extractfile(ti).read()
    return list(out.values())


def _tree_hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, Path, dict]:
    base = tmp_path_factory.mktemp("demo")
    conv = get_converter("demo")
    summary = conv(None, base / "a", shard_size=1000, skip_bad=False, **SMALL)
    conv(None, base / "b", shard_size=1000, skip_bad=False, **SMALL)
    return base / "a", base / "b", summary


def test_byte_identical_rebuild(built):
    a, b, summary = built
    ha, hb = _tree_hashes(a), _tree_hashes(b)
    assert ha == hb
    assert "vision_encoder/model.safetensors" in ha and "train/manifest.json" in ha
    assert summary["splits"] == {"train": 240, "val": 80, "test": 80}


def test_layout_and_manifests(built):
    a, _, _ = built
    info = json.loads((a / "dataset.json").read_text())
    assert info["dataset"] == "demo" and info["task"] == "single_label" and info["labels"] == demo.LABELS
    assert (a / "labels.txt").read_text() == "contradiction\nentailment\n"
    for split, n in (("train", 240), ("val", 80), ("test", 80)):
        m = json.loads((a / split / "manifest.json").read_text())
        assert m["num_samples"] == n and len(m["shards"]) >= 32  # shards >> ranks x workers
        assert m["class_histogram"] == {"contradiction": n // 2, "entailment": n // 2}


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_labels_correct_and_balanced(built, split):
    from PIL import Image

    a, _, _ = built
    stmts, truth = demo.statements()
    src = demo.SourceDigits(0, (0.6, 0.2, 0.2))
    per_text: dict[str, Counter] = defaultdict(Counter)
    per_image: dict[str, Counter] = defaultdict(Counter)
    per_template: dict[str, Counter] = defaultdict(Counter)
    for s in _samples(a / split):
        meta = json.loads(s["json"])
        text = s["txt"].decode()
        st = stmts[meta["statement_id"]]
        assert st.text == text and st.template == meta["template"]
        digits = np.array(meta["digits"])
        # the label is the statement's truth on the digits shown
        assert bool(truth[demo._grid_index(digits), st.id]) == bool(meta["label"])
        # the image shows those source digits in those cells (each source scan has the stated class)
        src_idx = np.array(meta["source_indices"])
        assert (src.labels[src_idx] == digits).all()
        img = np.asarray(Image.open(io.BytesIO(s["png"])))
        assert img.shape == (demo.IMG, demo.IMG)
        expect = demo.compose_grids(src.big, src_idx[None], np.zeros((1, 4, 2), dtype=np.int64))[0]
        assert (img == expect).all()
        per_text[text][meta["label"]] += 1
        per_image[meta["image_id"]][meta["label"]] += 1
        per_template[meta["template"]][meta["label"]] += 1
    # text-only and image-only classifiers are exactly at chance: every text, template and image is balanced
    assert all(c[0] == c[1] for c in per_text.values())
    assert all(c[0] == c[1] == 1 for c in per_image.values())
    assert all(c[0] == c[1] for c in per_template.values())
    assert len(per_template) >= 7  # templates=all: a mix of easy / medium / hard templates


def test_template_selection():
    rng = np.random.default_rng(0)
    stmts, _ = demo.statements()
    default = demo.make_pairs(400, rng, demo.DemoConfig().weights())
    assert {stmts[p["statement"]].template for p in default} == {"digit_is"}  # the default: cell lookup only
    two = demo.make_pairs(400, rng, demo.template_weights_for("digit_is,contains"))
    assert {stmts[p["statement"]].template for p in two} == {"digit_is", "contains"}
    assert sum(demo.template_weights_for("all")) == len(demo.TEMPLATES)
    with pytest.raises(demo.PrepError, match="templates='digit_iz'.*unknown template"):
        demo.DemoConfig(templates="digit_iz")


def test_source_digits_disjoint(built):
    a, _, _ = built
    used = {
        split: {i for s in _samples(a / split) for i in json.loads(s["json"])["source_indices"]}
        for split in demo.SPLITS
    }
    assert (
        not (used["train"] & used["val"]) and not (used["train"] & used["test"]) and not (used["val"] & used["test"])
    )
    pools = demo.split_source_digits(demo.SourceDigits(0, (0.6, 0.2, 0.2)).labels, 0)
    assert sum(len(v) for v in pools.values()) == 1797
    assert used["test"] <= set(pools["test"].tolist())


def test_encoder_loads_strict_and_config(built):
    import timm
    import torch
    from safetensors.torch import load_file

    a, _, _ = built
    cfg = json.loads((a / "vision_encoder/config.json").read_text())
    assert cfg["timm_kwargs"]["num_classes"] == 0 and cfg["img_size"] == 16
    assert cfg["timm_kwargs"]["img_size"] // cfg["timm_kwargs"]["patch_size"] == 4  # 16 patch tokens
    assert 0.0 <= cfg["pretext"]["val_cell_accuracy"] <= 1.0 and len(cfg["train_images_sha256"]) == 64
    model = timm.create_model(cfg["timm_model"], pretrained=False, **cfg["timm_kwargs"])
    model.load_state_dict(load_file(str(a / "vision_encoder/model.safetensors")), strict=True)
    assert model(torch.zeros(2, 3, 16, 16)).shape == (2, cfg["timm_kwargs"]["embed_dim"])


def test_loader_reads_demo(built):
    from mope_data import LoaderConfig, make_eval_loader

    a, _, _ = built
    enc = json.loads((a / "vision_encoder/config.json").read_text())
    loader = make_eval_loader(LoaderConfig(data_dir=a, batch_size=32, num_workers=0), "test", 0, 1)
    batches = list(loader)
    assert sum(len(b["key"]) for b in batches) == 80
    b = batches[0]
    assert b["image"].shape == (32, 3, 16, 16)
    # normalised with the demo's own statistics: black background -> -mean/std
    assert abs(float(b["image"].min()) - (-enc["mean"][0] / enc["std"][0])) < 1e-4


def test_ensure_demo_and_completeness(built, tmp_path):
    a, _, _ = built
    cfg = demo._config_from_options({k: v for k, v in SMALL.items() if k != "verbose"})
    assert demo.is_complete(a, cfg, shard_size=1000)
    assert not demo.is_complete(a, demo.DemoConfig(), shard_size=1000)  # another configuration
    assert demo.ensure_demo(a, cfg=cfg, verbose=False) == a.resolve()  # complete: returned as is
    out = tmp_path / "d"
    import shutil

    shutil.copytree(a, out)
    victim = next((out / "val").glob("*.tar"))
    victim.write_bytes(b"corrupt")
    assert not demo.is_complete(out, cfg, shard_size=1000)
    demo.ensure_demo(out, cfg=cfg, verbose=False)  # rebuilt
    assert _tree_hashes(out) == _tree_hashes(a)


def test_refuses_to_replace_foreign_dir(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "precious.txt").write_text("keep")
    with pytest.raises(demo.PrepError, match="not a demo build"):
        demo.build_demo(tmp_path / "x", demo.DemoConfig(train_pairs=4, val_pairs=4, test_pairs=4), verbose=False)
    assert (tmp_path / "x" / "precious.txt").read_text() == "keep"


def test_statement_table_sane():
    stmts, truth = demo.statements()
    assert truth.shape == (10_000, len(stmts)) and len({s.text for s in stmts}) == len(stmts)
    p = truth.mean(axis=0)
    assert (p > 0).all() and (p < 1).all()  # every statement can be true and false
    assert {s.difficulty for s in stmts} == {"easy", "medium", "hard"}
    assert "the top left digit is an eight" in {s.text for s in stmts}
