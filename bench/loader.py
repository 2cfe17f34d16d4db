"""Benchmark: samples/s of the streaming training pipeline (harness.data), on the demo or on MUStARD shards.

    .venv/bin/python bench/loader.py [--data data/demo] [--workers 2] [--batch 64] [--epochs 2] [--build]
    .venv/bin/python bench/loader.py --data data/mustard            # MUStARD shards (audio, and frames if written)
    .venv/bin/python bench/loader.py --mustard-replica 96 [--frames 8] [--frame-size 224] [--replica-seconds 4]

Iterates ``make_train_loader`` (resampled shards -> decode + transform + MiniLM tokenisation in the workers ->
unbatch/shuffle/rebatch in the main process) without any model, so the number is the loader's ceiling. Reports the
steady-state rate (first batch excluded: worker start-up and tokenizer loading) and the first-batch latency per epoch.
Prints one JSON object per measurement; ``cpu_s_per_sample`` (CPU of the main process and the workers per sample
delivered) stays comparable when the machine is busy. ``--build`` builds the demo first when it is missing
(``ensure_demo``; a few minutes).

The demo decodes PNG images. MUStARD decodes the stored 16 kHz PCM16 wav (the 22.05 kHz -> 16 kHz resampling is done
once at prep, not here) and, with frames, T PNG frames per sample, each resized/cropped/normalised like an image
(``"frames"`` (B, T, 3, 224, 224)). ``--mustard-replica N`` writes a synthetic raw replica of N clips (22.05 kHz
stereo wav + mp4, ``tests/datasets_prep/prep_helpers.py``) in a temporary dir, converts it twice with
``harness prep mustard`` (``frames=0``, then ``frames=F``; the prep time is reported) and measures both shard sets.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path


def _cpu_s() -> float:
    import resource

    a, b = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime


def measure(
    data: str, *, workers: int, batch: int, epochs: int, shuffle_buffer: int | None = None, extra: dict | None = None
) -> dict:
    import torch

    from mope_data import LoaderConfig, make_train_loader

    kw = {} if shuffle_buffer is None else {"shuffle_buffer": shuffle_buffer}
    cfg = LoaderConfig(data_dir=data, batch_size=batch, num_workers=workers, seed=0, **kw)
    loader, per_epoch = make_train_loader(cfg, 0, 1)
    first, steady_t, steady_n, total_n = [], 0.0, 0, 0
    cpu0 = _cpu_s()
    t_all = time.perf_counter()
    for _ in range(epochs):
        t0 = time.perf_counter()
        for i, batch_ in enumerate(loader):
            n = len(batch_["key"])
            total_n += n
            if i == 0:
                t1 = time.perf_counter()
                first.append(t1 - t0)
            else:
                steady_n += n
        steady_t += time.perf_counter() - t1
    wall = time.perf_counter() - t_all
    cpu = _cpu_s() - cpu0  # workers are not persistent: reaped after each epoch, so their CPU time is counted
    out = {
        "bench": "loader",
        "dataset": str(data),
        **(extra or {}),
        "num_workers": workers,
        "batch_size": batch,
        "shuffle_buffer": cfg.shuffle_buffer,
        "batches_per_epoch": per_epoch,
        "epochs": epochs,
        "samples": total_n,
        "samples_per_s": round(steady_n / steady_t, 1) if steady_t > 0 and steady_n else None,
        "samples_per_s_incl_startup": round(total_n / wall, 1),
        "first_batch_s": [round(x, 2) for x in first],
        # CPU seconds (main + workers, user + sys) per sample, start-up included: comparable on a busy machine
        "cpu_s_per_sample": round(cpu / total_n, 4) if total_n else None,
    }
    for k in ("image", "frames"):
        if k in batch_:
            out[f"{k}_shape"] = list(batch_[k].shape[1:])
    if "audio" in batch_:
        out["audio_samples_max"] = int(batch_["audio"].shape[1])
        out["audio_s_mean"] = round(float(batch_["audio_mask"].sum(1).float().mean()) / cfg.audio_sample_rate, 2)
    out.update(
        {
            "cpu_count": os.cpu_count(),
            "load_avg_1min": round(os.getloadavg()[0], 2),
            "torch": torch.__version__,
            "python": platform.python_version(),
        }
    )
    return out


def mustard_replica(a) -> int:
    from datasets_prep.mustard import convert
    from datasets_prep.replica import make_mustard_replica

    side = int(a.replica_size)
    with tempfile.TemporaryDirectory(prefix="bench-mustard-") as tmp:
        t0 = time.perf_counter()
        src = make_mustard_replica(
            Path(tmp) / "raw",
            n=a.mustard_replica,
            seconds=a.replica_seconds,
            fps=a.replica_fps,
            size=(side * 3 // 2 // 2 * 2, side),
        )
        replica_s = time.perf_counter() - t0
        for frames in (0, a.frames) if a.frames else (0,):
            out = Path(tmp) / f"shards-f{frames}"
            t0 = time.perf_counter()
            summary = convert(
                src, out, shard_size=1000, skip_bad=False, expect_entries=0, frames=frames, frame_size=a.frame_size
            )
            prep_s = time.perf_counter() - t0
            extra = {
                "config": f"audio+frames={frames}" if frames else "audio",
                "replica": {
                    "clips": a.mustard_replica,
                    "seconds": [a.replica_seconds, a.replica_seconds * 1.5],
                    "wav_sr": 22050,
                    "video": f"{side * 3 // 2 // 2 * 2}x{side}@{a.replica_fps}fps",
                    "write_s": round(replica_s, 1),
                },
                "prep_s": round(prep_s, 1),
                "prep_samples": sum(summary["splits"].values()),  # train + test + val (= test)
                "frame_size": a.frame_size if frames else None,
            }
            res = measure(
                str(out),
                workers=a.workers,
                batch=a.batch,
                epochs=a.epochs,
                shuffle_buffer=a.shuffle_buffer,
                extra=extra,
            )
            print(json.dumps(res), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="data/demo")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--build", action="store_true", help="build the demo first if it is missing")
    ap.add_argument(
        "--shuffle-buffer",
        type=int,
        default=None,
        help="LoaderConfig.shuffle_buffer (default: its default, 1000). The main-process buffer fills to "
        "100 samples before the first batch, then takes two samples per sample out until full, so an "
        "epoch shorter than the buffer processes up to ~2x its samples",
    )
    ap.add_argument(
        "--mustard-replica",
        type=int,
        default=0,
        metavar="N",
        help="build a synthetic MUStARD replica of N clips, prep it, measure (ignores --data)",
    )
    ap.add_argument("--frames", type=int, default=8, help="with --mustard-replica: frames per clip (0: audio only)")
    ap.add_argument("--frame-size", type=int, default=224)
    ap.add_argument("--replica-seconds", type=float, default=4.0, help="clip length (x1, x1.25, x1.5 by entry)")
    ap.add_argument("--replica-fps", type=int, default=10)
    ap.add_argument("--replica-size", type=int, default=64, help="clip height in px (width 1.5x)")
    a = ap.parse_args(argv)

    if a.mustard_replica:
        return mustard_replica(a)
    if a.build:
        from datasets_prep.demo import ensure_demo

        ensure_demo(a.data)
    if not os.path.isfile(os.path.join(a.data, "train", "manifest.json")):
        print(
            f"{a.data}: no shards; run `harness prep demo --out {a.data}` (or pass --build for the demo)",
            file=sys.stderr,
        )
        return 2
    print(
        json.dumps(measure(a.data, workers=a.workers, batch=a.batch, epochs=a.epochs, shuffle_buffer=a.shuffle_buffer))
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
