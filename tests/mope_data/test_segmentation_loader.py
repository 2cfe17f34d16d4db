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
