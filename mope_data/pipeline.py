"""WebDataset stages of the loaders: explicit node / worker shard split, seeded resampling and shuffling, in-worker
batching and main-process rebatching.

Shards are read by :class:`TarSamples` (webdataset's ``tarfile_to_samples`` with its url-opening stage replaced):
local files and URLs (``s3://``, ``http(s)://``, ...) are opened by :func:`mope_data.format.open_verified`, streamed,
and hashed while read; at the end of each shard the sha256 is compared with ``manifest.json``'s.

Shards are split by node **explicitly** (``shards[rank::world]``: rank and world size are arguments, nothing is read
from the environment), then by worker inside the rank (``rank_shards[worker::num_workers]``; a training worker falls
back to all of its rank's shards when there are fewer shards than workers). Every random choice is seeded by
:func:`stable_seed` from ``(seed, epoch, rank, worker)``, stable across processes.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Iterator
from typing import Any

import torch
import webdataset as wds
from torch.utils.data import get_worker_info
from webdataset.tariterators import group_by_keys, tar_file_iterator

from .config import LoaderConfig
from .format import open_verified
from .transforms import collate, expression_key, expressions

__all__ = [
    "Listed",
    "MapStage",
    "RankResampledShards",
    "Rebatch",
    "SelectByIndex",
    "ShardList",
    "TarSamples",
    "WorkerShuffle",
    "buffer_shuffle",
    "check_rank",
    "loader_kwargs",
    "split_by_node",
    "split_by_worker",
    "stable_seed",
]


def listed(src: Iterator[dict], n: int, partial: bool) -> Iterator[list[dict]]:
    """Inner (in-worker) batching: lists of processed samples (no collation; pickled to the main process)."""
    buf: list[dict] = []
    for s in src:
        buf.append(s)
        if len(buf) == n:
            yield buf
            buf = []
    if buf and partial:
        yield buf


class Listed:
    def __init__(self, n: int, partial: bool):
        self.n, self.partial = n, partial

    def __call__(self, src):
        return listed(src, self.n, self.partial)


class Rebatch:
    """Main process: unbatch the workers' lists, optionally shuffle (seeded buffer), rebatch to ``n`` and collate."""

    def __init__(self, n: int, partial: bool, shuffle: int = 0, seed: int = 0):
        self.n, self.partial, self.shuffle, self.seed = n, partial, shuffle, seed

    def __call__(self, src):
        samples = (s for lst in src for s in lst)
        if self.shuffle > 1:
            samples = buffer_shuffle(samples, self.shuffle, random.Random(self.seed))
        for lst in listed(samples, self.n, self.partial):
            yield collate(lst)


def buffer_shuffle(src: Iterator, size: int, rng: random.Random, initial: int = 100) -> Iterator:
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


def stable_seed(*parts: Any) -> int:
    """A 63-bit seed from the parts (stable across processes, unlike ``hash`` of strings)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") & ((1 << 63) - 1)


def worker_info() -> tuple[int, int]:
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
        worker, nw = worker_info()
        urls = split_by_worker(self.urls, worker, nw, fallback_all=True)
        rng = random.Random(stable_seed("shards", self.seed, self.epoch, self.rank, worker))
        for _ in range(self.nshards):
            yield {"url": urls[rng.randrange(len(urls))]}


class ShardList(torch.utils.data.IterableDataset):
    """Evaluation source: this rank's shards in order, split by worker (a worker may get none)."""

    def __init__(self, urls: list[str]):
        super().__init__()
        self.urls = list(urls)

    def __iter__(self):
        worker, nw = worker_info()
        for u in split_by_worker(self.urls, worker, nw, fallback_all=False):
            yield {"url": u}


class TarSamples:
    """``wds.tarfile_to_samples`` with one opener for every location: shard ``{"url": ...}`` -> samples
    ``{"__key__", "__url__", ext: bytes}``. Each shard is streamed through :func:`mope_data.format.open_verified` (a
    local file or an fsspec URL; never copied to disk) and hashed while read; when a shard has been read to its end the
    digest is compared with ``digests[url]`` (from ``manifest.json``) before its last sample is released, and a
    mismatch raises :class:`~mope_data.format.ShardFormatError` naming the URL. A shard left unfinished (the epoch
    ended inside it) is not checked. Errors are raised (``wds.reraise_exception``), as before."""

    def __init__(self, digests: dict[str, str] | None = None):
        self.digests = dict(digests or {})

    def files(self, src):
        for source in src:
            url = source["url"]
            with open_verified(url, self.digests.get(url)) as stream:
                for f in tar_file_iterator(stream, handler=wds.reraise_exception):
                    f["__url__"] = url
                    yield f
                stream.finish()
            yield {}  # end of shard: samples of two shards are never merged

    def __call__(self, src):
        return group_by_keys(self.files(src), handler=wds.reraise_exception)


class WorkerShuffle:
    def __init__(self, size: int, seed: int, rank: int, box: RankResampledShards):
        self.size, self.seed, self.rank, self.box = size, seed, rank, box

    def __call__(self, src):
        worker, _ = worker_info()
        rng = random.Random(stable_seed("samples", self.seed, self.box.epoch, self.rank, worker))
        return buffer_shuffle(src, self.size, rng) if self.size > 1 else src


class SelectByIndex:
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


class ExpandExpressions:
    """Evaluation of referring segmentation: a sample with several expressions (``txt`` lines) becomes one sample per
    expression, key :func:`~mope_data.transforms.expression_key` (the benchmarks score every expression; a RefCOCO
    train split read for a feature cache yields the keys its training draws). Single-expression samples pass."""

    def __call__(self, src):
        for s in src:
            lines = expressions(s["txt"].decode("utf-8")) if "txt" in s else []
            if len(lines) <= 1:
                yield s
                continue
            for i, line in enumerate(lines):
                yield {**s, "__key__": expression_key(s["__key__"], i), "txt": line.encode("utf-8")}


class MapStage:
    def __init__(self, fn: Callable):
        self.fn = fn

    def __call__(self, src):
        for s in src:
            yield self.fn(s)


def check_rank(rank: int, world_size: int) -> None:
    if world_size < 1 or not (0 <= rank < world_size):
        raise ValueError(f"rank={rank}, world_size={world_size}: need 0 <= rank < world_size")


def loader_kwargs(cfg: LoaderConfig, num_workers: int, seed: int) -> dict:
    kw: dict[str, Any] = {
        "num_workers": num_workers,
        "pin_memory": cfg.pin_memory,
        "generator": torch.Generator().manual_seed(seed),
        "persistent_workers": False,
    }
    if num_workers > 0 and cfg.prefetch_factor is not None:
        kw["prefetch_factor"] = cfg.prefetch_factor
    return kw
