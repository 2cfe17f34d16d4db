"""Benchmark: the feature cache of a frozen black-box complementary encoder (MiniLM) vs recomputing it every step.

    .venv/bin/python bench/feature_cache.py [--data data/demo] [--steps 30] [--trials 30] [--threads 2]

Side by side in one process, same model, same batches: the training step with ψ looked up in the cache vs the same
step with the frozen text encoder run inside the forward; plus the one-time cost of building the cache for the
train split. Prints JSON with per-step times, the cache build time and the projected time of a sweep of `--trials`
trials of `--steps` steps each (every trial of a sweep reuses one cache).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="data/demo")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--trials", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from harness.compose import compose, fusion_config
    from harness.feature_cache import FeatureCache
    from harness.run_setup import loader_config, prepare_data
    from mope import build_model, task_loss
    from mope_data import make_train_loader

    data = Path(args.data).resolve()
    cfg = compose(
        [
            "experiment=demo_mope",
            f"data.shard_dir={data}",
            f"vision.weights={data}/vision_encoder",
            f"trainer.batch_size={args.batch}",
            "trainer.num_workers=0",
        ]
    )
    shard_dir = prepare_data(cfg)
    model = build_model(fusion_config(cfg))
    assert model.comp_is_blackbox
    lcfg = loader_config(cfg, shard_dir)
    loader, _ = make_train_loader(lcfg, 0, 1)
    batches = [b for _, b in zip(range(args.steps), loader)]
    with tempfile.TemporaryDirectory() as tmp:
        cache = FeatureCache(Path(tmp), "bench")
        t0 = time.perf_counter()
        cache.build(model, lcfg, ["train"], rank=0, world_size=1)
        build_s = time.perf_counter() - t0
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        model.train()

        def step(batch, cached: bool) -> float:
            b = dict(batch)
            if cached:
                b["comp_feat"] = cache.lookup("train", b["key"])
            t = time.perf_counter()
            out = model(b)
            loss = task_loss(out.logits, b["label"], model.cfg.task) + out.aux_loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return time.perf_counter() - t

        for b in batches[:2]:  # warm-up
            step(b, True), step(b, False)
        t_cache, t_nocache = [], []
        for b in batches:  # interleaved: drift hits both alike
            t_cache.append(step(b, True))
            t_nocache.append(step(b, False))
    med_c, med_n = statistics.median(t_cache), statistics.median(t_nocache)
    sweep_nocache = args.trials * args.steps * med_n
    sweep_cache = build_s + args.trials * args.steps * med_c
    print(
        json.dumps(
            {
                "data": str(data),
                "batch": args.batch,
                "threads": args.threads,
                "steps_timed": len(batches),
                "step_ms_cached": round(med_c * 1e3, 1),
                "step_ms_recomputed": round(med_n * 1e3, 1),
                "step_speedup": round(med_n / med_c, 2),
                "cache_build_s_train_split": round(build_s, 1),
                "projected_sweep_s": {
                    "trials": args.trials,
                    "steps_per_trial": args.steps,
                    "without_cache": round(sweep_nocache, 1),
                    "with_cache": round(sweep_cache, 1),
                    "saving_frac": round(1 - sweep_cache / sweep_nocache, 3),
                },
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
