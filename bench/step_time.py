"""Benchmark: forward+backward step time and peak memory of MoPE (k experts) vs vanilla prompts, same frozen backbone.

    .venv/bin/python bench/step_time.py [--backbone vit_s16|swin_t|demo_vit] [--batch 8] [--iters 10] [--threads 2]
        [--memory] [--figure docs/figures/cost_growth.png] [--json OUT]

Arms (all share one frozen backbone and a black-box complementary feature ψ, so only the prompt machinery differs):
  mope_k{2,4,8,16,32,64}        MoPE, l=6: attention sees 2l+1 = 13 prompt tokens whatever k is
  vanilla_L13                   vanilla prompt [P_s(12), P_m] of the SAME attention length as MoPE (2l+1)
  vanilla_L{19,31,55,103,199}   the Fig. 4 length-scaling arm, L = (k+1)·l+1 for k = 2, 4, 8, 16, 32

Timing: warm-up, then the arms are interleaved round-robin for `--iters` rounds (drift hits every arm alike) and the
median per arm is reported. `--memory`: each arm's peak memory during one training step after the timing (every
tensor alive at the peak: frozen and trainable weights, gradients, AdamW state, activations; from the profiler's
memory timeline on CPU, ``max_memory_allocated`` on CUDA), and what the step adds above its start.
`--figure`: step time and peak memory against the tunable prompts per layer ((k+1)·l+1 for MoPE, L for vanilla),
the cost side of Fig. 4.
Prints one JSON object: per-arm ms (and MB) and the ratios the issue targets:
  mope_vs_vanilla_same_len[k] = t(mope_k) / t(vanilla_L13)       (target <= 1.05)
  k64_over_k2                 = t(mope_k64) / t(mope_k2)          (target <= 1.10)
  mem_k64_over_k2             = peak(mope_k64) / peak(mope_k2)    (target <= 1.05, with --memory)
  L199_over_L19               = t(vanilla_L199) / t(vanilla_L19)  (reported: the quadratic cost of length scaling)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

from mope import EncoderConfig, FusionConfig, MoPEConfig, build_model  # noqa: E402

BACKBONES = {
    # real architectures, random weights (step time does not depend on the weights' values)
    "vit_s16": (EncoderConfig(kind="timm_vit", name="vit_small_patch16_224"), 224),
    "swin_t": (EncoderConfig(kind="timm_swin", name="swin_tiny_patch4_window7_224"), 224),
    "demo_vit": (
        EncoderConfig(
            kind="timm_vit",
            name="vit_tiny_patch16_224",
            kwargs=dict(img_size=64, patch_size=8, embed_dim=128, depth=4, num_heads=4),
        ),
        64,
    ),
}
TEXT = EncoderConfig(
    kind="hf_bert",
    name="bert-base-uncased",
    kwargs=dict(hidden_size=384, num_hidden_layers=1, num_attention_heads=6, intermediate_size=64, vocab_size=128),
)


MOPE_K = (2, 4, 8, 16, 32, 64)
VANILLA_K = (2, 4, 8, 16, 32)  # L = (k+1)*6+1 = 19, 31, 55, 103, 199
PROMPT_LEN = 6


def tunable(name: str, opts: dict) -> int:
    """Tunable prompts per layer: (k+1)·l+1 for MoPE, L for a vanilla prompt."""
    return (opts["num_experts"] + 1) * PROMPT_LEN + 1 if name.startswith("mope") else opts["vanilla"]


def arms(l: int = 6) -> dict[str, tuple[str, dict]]:
    out: dict[str, tuple[str, dict]] = {}
    for k in MOPE_K:
        out[f"mope_k{k}"] = ("mope", dict(num_experts=k))
    out["vanilla_L13"] = ("vanilla_prompt", dict(vanilla=2 * l + 1))
    for k in VANILLA_K:
        L = (k + 1) * l + 1
        out[f"vanilla_L{L}"] = ("vanilla_prompt", dict(vanilla=L))
    return out


def build(backbone: str, method: str, opts: dict, state: dict | None):
    enc, _ = BACKBONES[backbone]
    cfg = FusionConfig(
        method=method,
        vision=enc,
        text=TEXT,
        num_classes=3,
        comp_prompt_len=0,  # ψ is a black-box feature given in the batch: identical for every arm
        vanilla_prompt_len=opts.get("vanilla"),
        mope=MoPEConfig(num_experts=opts.get("num_experts", 4), prompt_len=6, router_noise="vmoe"),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_model(cfg)
    if state is not None:
        model.main_encoder.load_state_dict(state)
    model.train()
    return model


def make_batch(backbone: str, B: int) -> dict:
    _, size = BACKBONES[backbone]
    return {
        "image": torch.randn(B, 3, size, size),
        "comp_feat": torch.randn(B, TEXT.kwargs["hidden_size"]),
        "label": torch.randint(0, 3, (B,)),
    }


def train_step(model, opt, batch) -> None:
    out = model(batch)
    loss = torch.nn.functional.cross_entropy(out.logits, batch["label"]) + out.aux_loss
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def measure_memory(model, opt, batch) -> tuple[float, float]:
    """(peak MB, MB added by the step) of one training step of a warmed-up model: on CUDA from the caching
    allocator's counters; on CPU from the profiler's memory timeline (every tensor the step touches, by category:
    the frozen and trainable weights, gradients, AdamW state, activations), since the CPU allocator keeps no peak."""
    if next(model.parameters()).is_cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        train_step(model, opt, batch)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        return peak / 2**20, (peak - base) / 2**20
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as p:
            train_step(model, opt, batch)
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "timeline.json")
            p.export_memory_timeline(path, device="cpu")
            _, sizes = json.loads(Path(path).read_text())
    total = [sum(x) for x in sizes]
    return max(total) / 2**20, (max(total) - total[0]) / 2**20


def draw(res: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ms, mem, tun = res["ms_median"], res.get("peak_mb") or {}, res["tunable_prompts"]
    series = {
        "MoPE (k experts, l=6: attends 13)": sorted((tun[n], n) for n in ms if n.startswith("mope")),
        "vanilla prompt (attends all L)": sorted((tun[n], n) for n in ms if n.startswith("vanilla") and tun[n] > 13),
    }
    panels = [("step time (ms, median)", ms)] + ([("peak step memory (MB)", mem)] if mem else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.8), squeeze=False)
    for ax, (ylabel, vals) in zip(axes[0], panels):
        for (label, pts), style in zip(series.items(), ("o-", "s--")):
            xs = [x for x, _ in pts]
            ax.plot(xs, [vals[n] for _, n in pts], style, label=label)
            for x, n in pts:
                tag = f"k={n.split('_k')[1]}" if n.startswith("mope") else f"L={n.split('_L')[1]}"
                ax.annotate(tag, (x, vals[n]), textcoords="offset points", xytext=(3, 4), fontsize=7)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tunable prompts per layer ((k+1)·l+1 for MoPE, L for vanilla)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(
        f"Cost of expert vs length scaling: {res['backbone']} backbone, batch {res['batch']}, {res['threads']} "
        f"thread(s), {res['device']}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    print(f"figure: {path}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", choices=sorted(BACKBONES), default="vit_s16")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--memory", action="store_true", help="also measure each arm's peak memory of a training step")
    ap.add_argument("--figure", default=None, help="draw step time (and memory) against the tunable prompt count")
    ap.add_argument("--json", default=None, help="also write the JSON here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    B = args.batch
    batch = make_batch(args.backbone, B)
    models, opts_of, state = {}, {}, None
    for name, (method, opts) in arms().items():
        models[name] = build(args.backbone, method, opts, state)
        state = models[name].main_encoder.state_dict() if state is None else state
        opts_of[name] = opts
    optims = {n: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4) for n, m in models.items()}

    def step(name: str) -> float:
        t0 = time.perf_counter()
        train_step(models[name], optims[name], batch)
        return (time.perf_counter() - t0) * 1e3

    for _ in range(args.warmup):
        for n in models:
            step(n)
    times: dict[str, list[float]] = {n: [] for n in models}
    for it in range(args.iters):
        for n in models:
            times[n].append(step(n))
        print(f"round {it + 1}/{args.iters}", file=sys.stderr, flush=True)
    med = {n: statistics.median(v) for n, v in times.items()}
    res = {
        "backbone": args.backbone,
        "batch": B,
        "threads": args.threads,
        "iters": args.iters,
        "device": "cpu",
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "ms_median": {n: round(v, 2) for n, v in med.items()},
        "attention_prompt_tokens": {n: (13 if n.startswith("mope") else opts_of[n]["vanilla"]) for n in med},
        "tunable_prompts": {n: tunable(n, opts_of[n]) for n in med},
        "ratios": {
            "mope_vs_vanilla_same_len": {k: round(med[f"mope_k{k}"] / med["vanilla_L13"], 3) for k in MOPE_K},
            "k64_over_k2": round(med["mope_k64"] / med["mope_k2"], 3),
            "L199_over_L19": round(med["vanilla_L199"] / med["vanilla_L19"], 3),
        },
    }
    if args.memory:
        res["memory_device"] = "cuda" if torch.cuda.is_available() else "cpu (profiler memory timeline)"
        res["peak_mb"], res["step_mb"] = {}, {}
        for n in models:
            peak, added = measure_memory(models[n], optims[n], batch)
            res["peak_mb"][n], res["step_mb"][n] = round(peak, 2), round(added, 2)
            print(f"memory {n}: peak {peak:.1f} MB, step adds {added:.1f} MB", file=sys.stderr, flush=True)
        res["ratios"]["mem_k64_over_k2"] = round(res["peak_mb"]["mope_k64"] / res["peak_mb"]["mope_k2"], 3)
        res["ratios"]["mem_L199_over_L19"] = round(res["peak_mb"]["vanilla_L199"] / res["peak_mb"]["vanilla_L19"], 3)
    if args.figure:
        draw(res, args.figure)
    text = json.dumps(res, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
