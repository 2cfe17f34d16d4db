"""mope_data.loaders: streaming train loader, eval loader and few-shot loader with fake ranks and real worker
processes.

Tiny shards are written through datasets_prep.writer in a tmp dir (13 shards of 6 samples + one of 4, 8x8 PNGs).
MUStARD audio + video frames: shards written by the converter from a synthetic replica (tests/datasets_prep).
"""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from datasets_prep.fewshot import build_fewshot
from datasets_prep.writer import ShardSetWriter, write_dataset_info
from mope_data import LoaderConfig, collate, equal_split_indices, make_eval_loader, make_train_loader

N_TRAIN, SHARD = 82, 6  # 14 shards, the last one with 4 samples
N_VAL = 23  # 4 shards of 6 + ... (6, 6, 6, 5)
LABELS = ["no", "yes", "maybe"]


def _png(i: int) -> bytes:
    from PIL import Image

    arr = np.full((8, 8), (i * 37) % 256, dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr, "L").save(buf, format="PNG")
    return buf.getvalue()


def _wav(n: int) -> bytes:
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, np.sin(np.arange(n) / 5.0).astype(np.float32), 16000, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def _write(root: Path, split: str, n: int, shard: int, *, task="single_label", audio=False) -> dict[str, str]:
    """Returns key -> shard file."""
    where = {}
    with ShardSetWriter(
        root,
        split,
        dataset="toy",
        task=task,
        labels=LABELS,
        shard_size=shard,
        modalities=("image", "text", "audio") if audio else ("image", "text"),
    ) as w:
        for i in range(n):
            key = f"{split}-{i:04d}"
            lab = i % 3 if task == "single_label" else sorted({i % 3, (i // 3) % 3})
            sample = {"png": _png(i), "txt": "word " * (1 + i % 5) + f"number {i}", "json": {"id": key, "label": lab}}
            if audio:
                sample["wav"] = _wav(100 + 10 * i)
            w.write(key, sample)
            where[key] = f"toy-{split}-{i // shard:06d}.tar"
    return where


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("toy")
    where = _write(root, "train", N_TRAIN, SHARD)
    _write(root, "val", N_VAL, 6)
    _write(root, "tiny", 5, 5)  # one shard: fewer shards than ranks
    write_dataset_info(root, dataset="toy", task="single_label", labels=LABELS, splits={"train": N_TRAIN})
    return root, where


def cfg(root: Path, **kw) -> LoaderConfig:
    base = {
        "data_dir": root,
        "batch_size": 4,
        "num_workers": 0,
        "seed": 0,
        "dataset": "demo",
        "shuffle_buffer": 20,
        "inner_batch": 3,
    }
    base.update(kw)
    return LoaderConfig(**base)


def keys_of(loader) -> list[list[str]]:
    return [b["key"] for b in loader]


def test_batch_format(toy):
    root, _ = toy
    loader, _ = make_train_loader(cfg(root), 0, 1)
    b = next(iter(loader))
    assert b["image"].shape == (4, 3, 8, 8) and b["image"].dtype == torch.float32
    for k in ("input_ids", "attention_mask", "token_type_ids"):
        assert b[k].dtype == torch.long and b[k].shape[0] == 4
    assert b["input_ids"].shape == b["attention_mask"].shape
    assert b["input_ids"][:, 0].eq(101).all()  # [CLS] of the MiniLM tokenizer: tokenised in the loader
    assert b["label"].dtype == torch.long and b["label"].shape == (4,)
    assert len(b["key"]) == 4 and "audio" not in b and "frames" not in b
    # the label really is the sample's label, and padding is masked
    for key, y, m in zip(b["key"], b["label"], b["attention_mask"]):
        assert int(key.split("-")[1]) % 3 == int(y)
        assert m[0] == 1


def test_train_epoch_length_equal_ranks_and_disjoint_shards(toy):
    """2 fake ranks x 2 worker processes: exactly N // (world*B) full batches on each rank (not x num_workers),
    and the shards a rank reads are its own."""
    root, where = toy
    world, bs = 2, 4
    shards_seen = []
    for rank in range(world):
        loader, n = make_train_loader(cfg(root, num_workers=2, batch_size=bs), rank, world)
        assert n == N_TRAIN // (world * bs) == 10
        batches = keys_of(loader)
        assert len(batches) == n  # with_epoch on the loader: not multiplied by the 2 workers
        assert all(len(b) == bs for b in batches)  # drop-last: full batches only
        shards_seen.append({where[k] for b in batches for k in b})
        expected = {f"toy-train-{i:06d}.tar" for i in range(rank, 14, world)}
        assert shards_seen[-1] <= expected
    assert not (shards_seen[0] & shards_seen[1])


def test_train_three_ranks_equal_counts(toy):
    root, _ = toy
    ns = []
    for rank in range(3):
        loader, n = make_train_loader(cfg(root, batch_size=5), rank, 3)
        ns.append((n, len(keys_of(loader))))
    assert ns == [(N_TRAIN // 15,) * 2] * 3


def test_train_order_deterministic(toy):
    root, _ = toy
    a, _ = make_train_loader(cfg(root, num_workers=2), 0, 2)
    b, _ = make_train_loader(cfg(root, num_workers=2), 0, 2)
    e0a, e0b = keys_of(a), keys_of(b)
    assert e0a == e0b  # same seed -> same order, across worker processes
    e1a = keys_of(a)  # second iteration = epoch 1
    assert e1a != e0a
    a.set_epoch(0)
    assert keys_of(a) == e0a  # resuming at an epoch reproduces it
    c, _ = make_train_loader(cfg(root, num_workers=2, seed=1), 0, 2)
    assert keys_of(c) != e0a


def test_train_too_few_shards_raises(toy):
    root, _ = toy
    with pytest.raises(ValueError, match="shards < world_size"):
        make_train_loader(cfg(root, train_split="tiny"), 0, 2)


@pytest.mark.parametrize("world,split,workers", [(1, "val", 0), (2, "val", 2), (3, "val", 0), (3, "tiny", 0)])
def test_eval_exactly_once(toy, world, split, workers):
    root, _ = toy
    total = {"val": N_VAL, "tiny": 5}[split]
    bs = 4
    all_keys = []
    for rank in range(world):
        loader = make_eval_loader(cfg(root, num_workers=workers, batch_size=bs), split, rank, world)
        batches = keys_of(loader)
        assert len(batches) == len(loader)
        sizes = [len(b) for b in batches]
        assert sum(sizes) == loader.num_samples
        assert all(s == bs for s in sizes[:-1]) and 0 < sizes[-1] <= bs  # one smaller last batch at most
        all_keys += [k for b in batches for k in b]
        if split == "tiny":
            assert loader.mode == "sample"  # 1 shard < 3 ranks: split at sample level
    assert sorted(all_keys) == sorted(f"{split}-{i:04d}" for i in range(total))
    assert max(Counter(all_keys).values()) == 1
    if world == 3 and split == "val":
        assert any(len(make_eval_loader(cfg(root, batch_size=bs), split, r, world)) for r in range(3))


def test_eval_smaller_last_batch_single_rank(toy):
    root, _ = toy
    sizes = [len(b["key"]) for b in make_eval_loader(cfg(root, batch_size=10), "val", 0, 1)]
    assert sizes == [10, 10, 3]


def test_fewshot_in_memory(toy):
    root, _ = toy
    build_fewshot(root / "train", [6, 40], seed=0)
    sub = set(json.loads((root / "train/fewshot/seed-0/shots-40.json").read_text())["keys"])
    per_rank = []
    for rank in range(2):
        loader, n = make_train_loader(cfg(root, shots=40, batch_size=4, num_workers=2), rank, 2)
        assert n == 5
        batches = keys_of(loader)
        assert len(batches) == n and all(len(b) == 4 for b in batches)
        per_rank.append({k for b in batches for k in b})
    assert per_rank[0] | per_rank[1] <= sub and not (per_rank[0] & per_rank[1])
    assert len(per_rank[0] | per_rank[1]) == 40  # 40 = 2 ranks x 5 batches x 4: every sample once
    # a subset smaller than one batch per rank still gives each rank one full batch
    loader, n = make_train_loader(cfg(root, shots=6, batch_size=4), 1, 2)
    assert n == 1 and [len(b) for b in keys_of(loader)] == [4]


def test_fewshot_min_batches_repeats_the_subset_within_an_epoch(toy):
    """min_batches_per_epoch (trainer.min_steps_per_epoch): equal optimizer steps for every shot count, by passing
    over the subset several times per epoch; each pass covers every sample once, in a fresh order."""
    root, _ = toy
    build_fewshot(root / "train", [8], seed=0)
    sub = set(json.loads((root / "train/fewshot/seed-0/shots-8.json").read_text())["keys"])
    loader, n = make_train_loader(cfg(root, shots=8, batch_size=4, min_batches_per_epoch=6), 0, 1)
    assert n == 6
    batches = keys_of(loader)
    assert len(batches) == 6 and all(len(b) == 4 for b in batches)
    passes = [[k for b in batches[i : i + 2] for k in b] for i in range(0, 6, 2)]
    assert all(set(p) == sub for p in passes)  # 3 passes of 2 batches, each over the whole subset
    assert len({tuple(p) for p in passes}) > 1  # not the same order every pass
    # the first pass is the epoch's plain order: asking for more steps only appends passes
    plain, n1 = make_train_loader(cfg(root, shots=8, batch_size=4), 0, 1)
    assert n1 == 2 and keys_of(plain) == batches[:2]
    # a set that already gives more batches than the minimum is unchanged
    _, nb = make_train_loader(cfg(root, shots=8, batch_size=2, min_batches_per_epoch=3), 0, 1)
    assert nb == 4


def test_equal_split_indices_properties():
    for n, bs, world in [(100, 8, 3), (7, 4, 2), (64, 8, 2)]:
        parts = [equal_split_indices(n, bs, r, world, seed=0, epoch=0) for r in range(world)]
        assert len({len(p) for p in parts}) == 1
        flat = [i for p in parts for b in p for i in b]
        if n >= world * bs:
            assert len(flat) == len(set(flat))  # no repeats within an epoch
        assert all(0 <= i < n for i in flat)
    assert equal_split_indices(100, 8, 0, 2, 0, 0) != equal_split_indices(100, 8, 0, 2, 0, 1)


def test_multilabel_and_audio(tmp_path):
    _write(tmp_path, "train", 12, 3, task="multi_label", audio=True)
    loader, _ = make_train_loader(cfg(tmp_path, batch_size=4), 0, 1)
    b = next(iter(loader))
    assert b["label"].shape == (4, 3) and b["label"].dtype == torch.float32
    for key, y in zip(b["key"], b["label"]):
        i = int(key.split("-")[1])
        assert set(torch.nonzero(y).flatten().tolist()) == {i % 3, (i // 3) % 3}
    assert b["audio"].dtype == torch.float32 and b["audio_mask"].shape == b["audio"].shape
    lengths = b["audio_mask"].sum(1).tolist()
    assert sorted(lengths) == sorted(100 + 10 * int(k.split("-")[1]) for k in b["key"])
    assert b["audio"].shape[1] == max(lengths)


# ------------------------------------------------------------------------------------------ MUStARD: audio + frames
@pytest.fixture(scope="module")
def mustard_shards(tmp_path_factory) -> Path:
    """converter output of a 12-entry replica: 48x32 clips of 6/7/9 frames -> frames=4 PNGs of 32x32 + 16 kHz wav."""
    from datasets_prep.mustard import convert
    from tests.helpers.prep_helpers import make_mustard_replica

    root = tmp_path_factory.mktemp("mustard")
    src = make_mustard_replica(root / "raw", n=12, size=(48, 32))
    convert(src, root / "out", shard_size=100, skip_bad=False, expect_entries=0, frames=4, frame_size=32)
    return root / "out"


def _stored(split_dir: Path) -> dict[str, dict]:
    from tests.helpers.prep_helpers import read_split

    return {s["__key__"]: s for s in read_split(split_dir)}


def test_mustard_frames_and_audio_batches(mustard_shards):
    import soundfile as sf
    from PIL import Image

    from mope_data import MMBT_MEAN, MMBT_STD, dataset_info, image_transform

    c = cfg(mustard_shards, dataset=None, image_size=24, batch_size=4)  # the "mustard" preset: Resize + CenterCrop
    batches = list(make_eval_loader(c, "test", 0, 1))
    assert [len(b["key"]) for b in batches] == [4, 2]
    b = batches[0]
    assert b["frames"].shape == (4, 4, 3, 24, 24) and b["frames"].dtype == torch.float32
    assert "image" not in b and b["label"].shape == (4,)
    stored = _stored(mustard_shards / "test")
    tf = image_transform(c, dataset_info(mustard_shards, "test"), train=False)  # the image path's transform
    for i, key in enumerate(b["key"]):
        for t in range(4):
            with Image.open(io.BytesIO(stored[key][f"f{t:02d}.png"])) as im:
                assert torch.equal(b["frames"][i, t], tf(im.convert("RGB"))), (key, t)
    # MMBT normalisation: the top-left background pixel de-normalises to the stored grey level
    mean, std = torch.tensor(MMBT_MEAN), torch.tensor(MMBT_STD)
    with Image.open(io.BytesIO(stored[b["key"][0]]["f00.png"])) as im:
        grey = np.asarray(im.convert("RGB"))[0, 0] / 255.0
    assert torch.allclose(b["frames"][0, 0, :, 0, 0] * std + mean, torch.tensor(grey, dtype=torch.float32), atol=0.02)
    # audio as before: the stored 16 kHz wav, zero-padded, with its mask
    assert b["audio"].dtype == torch.float32 and b["audio_mask"].shape == b["audio"].shape
    for i, key in enumerate(b["key"]):
        x, sr = sf.read(io.BytesIO(stored[key]["wav"]), dtype="float32")
        n = int(b["audio_mask"][i].sum())
        assert sr == 16000 and n == len(x) and torch.equal(b["audio"][i, :n], torch.from_numpy(x))
        assert b["audio"][i, n:].abs().sum() == 0
    assert len({int(m.sum()) for m in b["audio_mask"]}) > 1  # clips of different lengths: padding exercised
    # training batches carry the same frames (no augmentation for MUStARD; shape as in evaluation)
    train, _ = make_train_loader(cfg(mustard_shards, dataset=None, image_size=24, batch_size=3), 0, 1)
    tb = next(iter(train))
    assert tb["frames"].shape == (3, 4, 3, 24, 24) and "audio" in tb


def test_mustard_frame_count_checked(mustard_shards, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(mustard_shards, bad)
    info = json.loads((bad / "dataset.json").read_text())
    info["frames"] = 5
    (bad / "dataset.json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match=r"sample \S+ .*4 frames, but dataset.json says frames=5"):
        list(make_eval_loader(cfg(bad, dataset=None, image_size=24), "test", 0, 1))


def test_collate_frames_must_agree():
    def smp(key, frames=None):
        s = {"key": key, "label": 0, "input_ids": [101, 102], "attention_mask": [1, 1], "token_type_ids": [0, 0]}
        if frames is not None:
            s["frames"] = torch.zeros(frames, 3, 4, 4)
        return s

    assert collate([smp("a", 3), smp("b", 3)])["frames"].shape == (2, 3, 3, 4, 4)
    with pytest.raises(ValueError, match=r"sample b: frames of shape \(2, 3, 4, 4\), but sample a .*\(3, 3, 4, 4\)"):
        collate([smp("a", 3), smp("b", 2)])
    with pytest.raises(ValueError, match=r"sample b: no video frames, but sample a"):
        collate([smp("a", 3), smp("b")])
    assert "frames" not in collate([smp("a"), smp("b")])


def test_to_normalized_tensor_is_bit_identical_to_torchvision():
    """The fused image step equals T.ToTensor() + T.Normalize(mean, std) bit for bit (RGB and other modes)."""
    from PIL import Image
    from torchvision import transforms as T

    from mope_data.transforms import ToNormalizedTensor

    mean, std = (0.4815, 0.4578, 0.4082), (0.2686, 0.2613, 0.2758)
    ref = T.Compose([T.ToTensor(), T.Normalize(mean, std)])
    ours = ToNormalizedTensor(mean, std)
    rng = np.random.default_rng(0)
    for w, h in ((16, 16), (17, 9), (224, 224)):
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")
        a, b = ref(img), ours(img)
        assert a.dtype == b.dtype == torch.float32 and a.shape == b.shape == (3, h, w)
        assert torch.equal(a, b)
    grey = Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8), "L")
    assert torch.equal(ref(grey.convert("RGB")), ours(grey))


def test_tokens_are_memoised_without_changing_them(tmp_path):
    from mope_data import LoaderConfig
    from mope_data.format import DatasetInfo
    from mope_data.transforms import SampleProcessor, _get_tokenizer

    cfg = LoaderConfig(data_dir=str(tmp_path), batch_size=4)
    info = DatasetInfo(name="demo", task="single_label", labels=["a", "b"], modalities=("text",), root=tmp_path)
    proc = SampleProcessor(cfg, info, train=False)
    tok = _get_tokenizer(proc.tokenizer_path)
    for text in ("a red digit", "a red digit", "", "ünïcödé text " * 40):
        ids, mask, types, pad = proc._tokens(text)
        enc = tok(text, truncation=True, max_length=cfg.max_text_len, return_token_type_ids=True)
        assert list(ids) == enc["input_ids"] and list(mask) == enc["attention_mask"]
        assert list(types) == enc["token_type_ids"] and pad == tok.pad_token_id
    assert len(proc._token_memo) == 3
