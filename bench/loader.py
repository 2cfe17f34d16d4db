"""Benchmark: samples/s of the streaming training pipeline (harness.data) on the demo dataset.

    .venv/bin/python bench/loader.py [--data data/demo] [--workers 2] [--batch 64] [--epochs 2] [--build]

Iterates ``make_train_loader`` (resampled shards -> PNG decode + normalise + MiniLM tokenisation in the workers ->
unbatch/shuffle/rebatch in the main process) without any model, so the number is the loader's ceiling. Reports the
steady-state rate (first batch excluded: worker start-up and tokenizer loading) and the first-batch latency per epoch.
Prints one JSON object. ``--build`` builds the demo first when it is missing (``ensure_demo``; a few minutes).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="data/demo")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--build", action="store_true", help="build the demo first if it is missing")
    a = ap.parse_args(argv)

    import torch

    from harness.data import LoaderConfig, make_train_loader

    if a.build:
        from datasets_prep.demo import ensure_demo

        ensure_demo(a.data)
    if not os.path.isfile(os.path.join(a.data, "train", "manifest.json")):
        print(f"{a.data}: no demo shards; run `harness prep demo --out {a.data}` or pass --build", file=sys.stderr)
        return 2
    cfg = LoaderConfig(data_dir=a.data, batch_size=a.batch, num_workers=a.workers, seed=0)
    loader, per_epoch = make_train_loader(cfg, 0, 1)
    first, steady_t, steady_n, total_n = [], 0.0, 0, 0
    t_all = time.perf_counter()
    for _ in range(a.epochs):
        t0 = time.perf_counter()
        for i, batch in enumerate(loader):
            n = len(batch["key"])
            total_n += n
            if i == 0:
                t1 = time.perf_counter()
                first.append(t1 - t0)
            else:
                steady_n += n
        steady_t += time.perf_counter() - t1
    wall = time.perf_counter() - t_all
    print(json.dumps({
        "bench": "loader",
        "dataset": a.data,
        "num_workers": a.workers,
        "batch_size": a.batch,
        "batches_per_epoch": per_epoch,
        "epochs": a.epochs,
        "samples": total_n,
        "samples_per_s": round(steady_n / steady_t, 1) if steady_t > 0 else None,
        "samples_per_s_incl_startup": round(total_n / wall, 1),
        "first_batch_s": [round(x, 2) for x in first],
        "image_shape": list(batch["image"].shape[1:]),
        "cpu_count": os.cpu_count(),
        "load_avg_1min": round(os.getloadavg()[0], 2),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
