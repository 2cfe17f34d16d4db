"""The loader on segmentation shards (RefCOCO converted from a replica of the raw release): the mask is decoded,
resized exactly like the image (nearest, no crop), carried with the expression, and a shard without masks is refused
by name."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pycocotools")
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

from datasets_prep.refcoco import convert  # noqa: E402
from datasets_prep.replica import make_refcoco_replica  # noqa: E402
from mope_data import LoaderConfig, dataset_info, make_eval_loader  # noqa: E402
from mope_data.transforms import SampleProcessor  # noqa: E402
from tests.helpers.prep_helpers import read_split_wds  # noqa: E402


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("refseg")
    raw = make_refcoco_replica(root / "raw")
    out = root / "out"
    convert(raw, out, shard_size=4, min_shards=1)
    return out


def _cfg(out: Path, **kw) -> LoaderConfig:
    return LoaderConfig(data_dir=out, batch_size=4, num_workers=0, normalization="imagenet", **kw)


def test_batch_carries_mask_and_expression(shards):
    from PIL import Image

    side = 40
    loader = make_eval_loader(_cfg(shards, image_size=side), "val")
    raw = {s["__key__"]: s for s in read_split_wds(shards / "val")}
    n = 0
    for batch in loader:
        assert batch["image"].shape[-2:] == (side, side)
        assert batch["mask"].shape == (len(batch["key"]), side, side)
        assert set(np.unique(batch["mask"].numpy())) <= {0.0, 1.0}
        for i, key in enumerate(batch["key"]):
            s = raw[key]
            assert batch["text"][i] == s["txt"].decode()
            with Image.open(io.BytesIO(s["mask.png"])) as im:  # what the shard holds, resized by nearest
                want = np.array(im.resize((side, side), Image.NEAREST)) > 127
            np.testing.assert_array_equal(batch["mask"][i].numpy() > 0.5, want)
            assert batch["label"][i] == json.loads(s["json"])["label"][0]
            n += 1
    assert n == len(raw) > 0


def test_default_side_is_384_and_no_random_ops(shards):
    info = dataset_info(shards)
    proc = SampleProcessor(_cfg(shards), info, train=True)
    s = read_split_wds(shards / "train")[0]
    a, b = proc(dict(s)), proc(dict(s))
    assert a["image"].shape == (3, 384, 384) and a["mask"].shape == (384, 384)
    assert (a["image"] == b["image"]).all()  # no RandAugment / flip for referring segmentation


def test_missing_mask_member_is_named(shards):
    info = dataset_info(shards)
    proc = SampleProcessor(_cfg(shards, image_size=32), info, train=False)
    s = dict(read_split_wds(shards / "val")[0])
    del s["mask.png"]
    with pytest.raises(ValueError, match=r"no mask\.png member.*harness prep"):
        proc(s)


def _sentences_by_ref(shards: Path) -> dict[str, list[str]]:
    return {s["__key__"]: s["txt"].decode().split("\n") for s in read_split_wds(shards / "train")}


def test_training_draws_one_expression_per_visit_seeded_by_epoch(shards):
    """A train sample with several sentences yields one of them per visit under ``<key>#s<i>``: the same draw for
    the same (seed, epoch), other draws in other epochs, every draw one of that object's sentences."""
    from mope_data.transforms import expression_key

    info = dataset_info(shards)
    refs = _sentences_by_ref(shards)
    multi = [s for s in read_split_wds(shards / "train") if len(refs[s["__key__"]]) > 1]
    assert multi, "the replica must have multi-sentence train refs"
    proc = SampleProcessor(_cfg(shards, image_size=32), info, train=True)
    draws = {}
    for epoch in range(6):
        proc.epoch = epoch
        for s in multi:
            out = proc(dict(s))
            i = int(out["key"].rsplit("#s", 1)[1])
            assert out["key"] == expression_key(s["__key__"], i) and out["text"] == refs[s["__key__"]][i]
            assert proc(dict(s))["key"] == out["key"]  # deterministic within an epoch
            draws.setdefault(s["__key__"], set()).add(i)
    assert any(len(v) > 1 for v in draws.values())  # the sentence changes across epochs
    single = next(s for s in read_split_wds(shards / "train") if len(refs[s["__key__"]]) == 1)
    assert proc(dict(single))["key"] == single["__key__"]  # one sentence: the stored key


def test_evaluation_scores_every_expression(shards):
    """Evaluation reads one sample per expression: the converted val split stores them so (keys ``<ref>_<i>``), and
    a split stored per object (train, read for a feature cache) is expanded to the keys training draws."""
    val = [k for b in make_eval_loader(_cfg(shards, image_size=32), "val") for k in b["key"]]
    assert len(val) == len(set(val)) == len(read_split_wds(shards / "val")) and not any("#" in k for k in val)
    refs = _sentences_by_ref(shards)
    got = {}
    for b in make_eval_loader(_cfg(shards, image_size=32), "train"):
        got.update(zip(b["key"], b["text"], strict=True))
    want = {(k if len(v) == 1 else f"{k}#s{i}"): line for k, v in refs.items() for i, line in enumerate(v)}
    assert got == want and len(want) > len(refs)


@pytest.mark.parametrize("workers", [0, 1])
def test_train_loader_passes_the_epoch_to_its_workers(shards, workers):
    """Through the real train loader (worker processes copy the processor when each epoch starts): every drawn key is
    the one ``stable_seed("expression", seed, epoch, key)`` names for that epoch."""
    from mope_data import make_train_loader
    from mope_data.pipeline import stable_seed

    refs = _sentences_by_ref(shards)
    cfg = LoaderConfig(
        data_dir=shards, batch_size=4, num_workers=workers, normalization="imagenet", image_size=32, seed=3
    )
    loader, _ = make_train_loader(cfg)
    seen_multi = 0
    for epoch in range(2):
        for batch in loader:
            for key, text in zip(batch["key"], batch["text"], strict=True):
                base = key.split("#s")[0]
                if len(refs[base]) > 1:
                    i = stable_seed("expression", 3, epoch, base) % len(refs[base])
                    assert key == f"{base}#s{i}" and text == refs[base][i], (epoch, key)
                    seen_multi += 1
    assert seen_multi > 0
