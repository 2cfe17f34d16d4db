"""Typed configuration of the loaders (plain dataclass; the Hydra config in ``harness/configs`` fills it)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["EVAL_SPLITS", "NORMALIZATIONS", "LoaderConfig"]

NORMALIZATIONS = ("default", "mmbt", "imagenet", "dataset")
EVAL_SPLITS = ("auto", "shard", "sample")


@dataclass
class LoaderConfig:
    """Everything a loader needs; validated on construction (a bad field raises ``ValueError`` naming it).

    Fields:
        data_dir: dataset directory written by ``harness prep`` (holds ``dataset.json`` and ``<split>/``).
        batch_size: samples per batch **per rank**.
        num_workers: DataLoader worker processes per rank (0 = load in the training process).
        seed: seeds data order and augmentation, combined with ``(epoch, rank, worker)``.
        train_split: the split the training loaders read.
        shots: few-shot subset size of the training split (``datasets_prep.fewshot``); ``None`` = full data, streamed.
        fewshot_seed, fewshot_stratified: which built subset to read.
        min_batches_per_epoch: an epoch has at least this many batches per rank (a small few-shot set is passed
            over several times, each pass in a fresh seeded order) so every shot count gets the same optimizer
            steps; ``None`` = one pass.
        tokenizer: local Hugging Face tokenizer directory; ``None`` = the offline MiniLM package.
        max_text_len: tokens kept per text; ``pad_to_max_length`` pads every text to it (else to the batch longest).
        dataset: transform preset (``food101``, ``mmimdb``, ``snli_ve``, ``demo``, ...); ``None`` = the dataset named
            in ``manifest.json``.
        image_size: crop size; ``None`` = the dataset default (224, or the demo's native size).
        normalization: ``default`` (MMBT; the demo: its own statistics), ``mmbt``, ``imagenet``, ``dataset``.
        train_augment: RandAugment for MM-IMDB / SNLI-VE training, as the reference code.
        audio_sample_rate, max_audio_seconds: waveform resampling rate and crop (MUStARD).
        shuffle_buffer: per-worker sample buffer; the main process uses the same size across workers.
        inner_batch: batch size inside the workers before unbatch / shuffle / rebatch in the main process.
        eval_split: ``auto``, ``shard`` (needs ``num_shards >= world_size``) or ``sample``.
        pin_memory, prefetch_factor: passed to the DataLoader.
    """

    data_dir: str | Path
    batch_size: int = 64
    num_workers: int = 2
    seed: int = 0
    train_split: str = "train"
    shots: int | None = None
    fewshot_seed: int = 0
    min_batches_per_epoch: int | None = None
    fewshot_stratified: bool = False
    tokenizer: str | Path | None = None
    max_text_len: int = 128
    pad_to_max_length: bool = False
    dataset: str | None = None
    image_size: int | None = None
    normalization: str = "default"
    train_augment: bool = True
    audio_sample_rate: int = 16000
    max_audio_seconds: float = 10.0
    shuffle_buffer: int = 1000
    inner_batch: int = 32
    eval_split: str = "auto"
    pin_memory: bool = False
    prefetch_factor: int | None = None

    def __post_init__(self) -> None:
        def need(ok: bool, name: str, rule: str) -> None:
            if not ok:
                raise ValueError(f"LoaderConfig.{name}={getattr(self, name)!r}: {rule}")

        need(self.batch_size >= 1, "batch_size", "must be >= 1 (samples per rank)")
        need(self.num_workers >= 0, "num_workers", "must be >= 0")
        need(self.shots is None or self.shots >= 1, "shots", "must be >= 1, or None for the full training split")
        need(
            self.min_batches_per_epoch is None or self.min_batches_per_epoch >= 1,
            "min_batches_per_epoch",
            "must be >= 1 or None",
        )
        need(self.max_text_len >= 1, "max_text_len", "must be >= 1")
        need(self.image_size is None or self.image_size >= 1, "image_size", "must be >= 1 or None")
        need(self.normalization in NORMALIZATIONS, "normalization", f"use one of {NORMALIZATIONS}")
        need(self.audio_sample_rate >= 1, "audio_sample_rate", "must be >= 1 Hz")
        need(self.max_audio_seconds >= 0, "max_audio_seconds", "must be >= 0 (0 keeps the whole waveform)")
        need(self.shuffle_buffer >= 0, "shuffle_buffer", "must be >= 0 (0 or 1: no shuffling)")
        need(self.inner_batch >= 1, "inner_batch", "must be >= 1")
        need(self.eval_split in EVAL_SPLITS, "eval_split", f"use one of {EVAL_SPLITS}")
        need(self.prefetch_factor is None or self.prefetch_factor >= 1, "prefetch_factor", "must be >= 1 or None")
