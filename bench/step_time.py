"""Benchmark: forward+backward step time of MoPE (k experts) vs vanilla prompts, same frozen backbone, side by side.

    .venv/bin/python bench/step_time.py [--backbone vit_s16|swin_t|demo_vit] [--batch 8] [--iters 10] [--threads 2]

Arms (all share one frozen backbone and a black-box complementary feature ψ, so only the prompt machinery differs):
  mope_k{2,4,16,64}        MoPE, l=6: attention sees 2l+1 = 13 prompt tokens whatever k is
  vanilla_L13              vanilla prompt [P_s(12), P_m] of the SAME attention length as MoPE (2l+1)
  vanilla_L{19,31,103,199} the Fig. 4 length-scaling arm, L = (k+1)·l+1 for k = 2, 4, 16, 32

Timing: warm-up, then the arms are interleaved round-robin for `--iters` rounds (drift hits every arm alike) and the
median per arm is reported. Prints one JSON object: per-arm ms and the ratios the issue targets:
  mope_vs_vanilla_same_len[k] = t(mope_k) / t(vanilla_L13)       (target <= 1.05)
  k64_over_k2                 = t(mope_k64) / t(mope_k2)          (target <= 1.10)
  L199_over_L19               = t(vanilla_L199) / t(vanilla_L19)  (reported: the quadratic cost of length scaling)
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
import warnings

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


def arms(l: int = 6) -> dict[str, tuple[str, dict]]:
    out: dict[str, tuple[str, dict]] = {}
    for k in (2, 4, 16, 64):
        out[f"mope_k{k}"] = ("mope", dict(num_experts=k))
    out["vanilla_L13"] = ("vanilla_prompt", dict(vanilla=2 * l + 1))
    for k in (2, 4, 16, 32):
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", choices=sorted(BACKBONES), default="vit_s16")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    _, size = BACKBONES[args.backbone]
    B = args.batch
    batch = {
        "image": torch.randn(B, 3, size, size),
        "comp_feat": torch.randn(B, TEXT.kwargs["hidden_size"]),
        "label": torch.randint(0, 3, (B,)),
    }
    models, opts_of, state = {}, {}, None
    for name, (method, opts) in arms().items():
        models[name] = build(args.backbone, method, opts, state)
        state = models[name].main_encoder.state_dict() if state is None else state
        opts_of[name] = opts
    optims = {n: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4) for n, m in models.items()}

    def step(name: str) -> float:
        m, opt = models[name], optims[name]
        t0 = time.perf_counter()
        out = m(batch)
        loss = torch.nn.functional.cross_entropy(out.logits, batch["label"]) + out.aux_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
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
        "ratios": {
            "mope_vs_vanilla_same_len": {k: round(med[f"mope_k{k}"] / med["vanilla_L13"], 3) for k in (2, 4, 16, 64)},
            "k64_over_k2": round(med["mope_k64"] / med["mope_k2"], 3),
            "L199_over_L19": round(med["vanilla_L199"] / med["vanilla_L19"], 3),
        },
    }
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
