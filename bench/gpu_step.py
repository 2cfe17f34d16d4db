"""Benchmark: one paper-scale MoPE training step on a GPU, fp32 and bf16: samples/s, peak memory and an MFU estimate.

    .venv/bin/python bench/gpu_step.py [--preset paper/mope_swin_b_k16] [--batch 32] [--iters 20] [--json OUT]
    .venv/bin/python bench/gpu_step.py --dry-run          # tiny sizes on CPU (what the test suite runs)

The model is the preset (default ``paper/mope_swin_b_k16``: Swin-B main encoder prompted by MoPE with k = 16, a
prompted BERT-base as the complementary encoder) with random weights, on the vision backbone ``--vision`` at
``--image-size`` (default Swin-B-384, the paper's Food-101 / MM-IMDB / SNLI-VE setup), text of ``--text-len`` tokens.
A step is forward + backward + AdamW over the trainable parameters, timed after ``--warmup`` steps with
``torch.cuda.synchronize`` around it; the median of ``--iters`` steps is reported. FLOPs of one step are counted once
with ``torch.utils.flop_counter.FlopCounterMode`` (matmuls and convolutions, forward and backward), and
MFU = FLOPs per step / step time / the card's dense peak for that precision (:data:`PEAK_TFLOPS`, by device name;
``null`` for a card not in the table, and on CPU). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
import warnings

import torch

# Dense (no sparsity) peak TFLOP/s per precision, from the vendors' data sheets.
PEAK_TFLOPS = {
    "H100 SXM": {"fp32": 67.0, "bf16": 989.0},  # fp32 = non-tensor FP32; bf16 = tensor core, dense
    "H100 PCIe": {"fp32": 51.0, "bf16": 756.0},
    "H100 NVL": {"fp32": 60.0, "bf16": 835.0},
    "H200": {"fp32": 67.0, "bf16": 989.0},
    "A100": {"fp32": 19.5, "bf16": 312.0},
}
DRY_VISION = dict(embed_dim=32, depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8), window_size=4)
DRY_TEXT = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=512)


def peak_tflops(device_name: str, precision: str) -> float | None:
    name = device_name.upper()
    for key in sorted(PEAK_TFLOPS, key=len, reverse=True):  # "H100 NVL" before "H100"
        parts = key.upper().split()
        if all(p in name for p in parts):
            return PEAK_TFLOPS[key][precision]
    if "H100" in name:  # an H100 whose form factor the name does not say: the SXM figures (the usual cloud card)
        return PEAK_TFLOPS["H100 SXM"][precision]
    return None


def build(args):
    from mope import EncoderConfig, build_model
    from mope.presets import get_preset

    cfg = get_preset(args.preset)
    if args.dry_run:
        vision = EncoderConfig(
            kind="timm_swin", name="swin_tiny_patch4_window7_224", kwargs={**DRY_VISION, "img_size": args.image_size}
        )
        text = dataclasses.replace(cfg.text, kwargs=DRY_TEXT)
    else:
        vision = dataclasses.replace(cfg.vision, name=args.vision, kwargs={**cfg.vision.kwargs})
        text = cfg.text
    cfg = dataclasses.replace(cfg, vision=vision, text=text)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_model(cfg)
    return model.train(), cfg


def make_batch(args, cfg, device):
    B, T = args.batch, args.text_len
    vocab = DRY_TEXT["vocab_size"] if args.dry_run else 30522
    return {
        "image": torch.randn(B, 3, args.image_size, args.image_size, device=device),
        "input_ids": torch.randint(0, vocab, (B, T), device=device),
        "attention_mask": torch.ones(B, T, dtype=torch.long, device=device),
        "token_type_ids": torch.zeros(B, T, dtype=torch.long, device=device),
        "label": torch.randint(0, cfg.num_classes, (B,), device=device),
    }


def measure(model, batch, precision: str, args, device) -> dict:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    cuda = device.type == "cuda"
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")

    def step() -> None:
        with amp:
            out = model(batch)
            loss = torch.nn.functional.cross_entropy(out.logits.float(), batch["label"]) + out.aux_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(args.warmup):
        step()
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        step()
    flops = fc.get_total_flops()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(args.iters):
        t0 = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        print(f"{precision} step {i + 1}/{args.iters} {times[-1] * 1e3:.1f} ms", file=sys.stderr, flush=True)
    t = statistics.median(times)
    peak = peak_tflops(torch.cuda.get_device_name(device), precision) if cuda else None
    achieved = flops / t / 1e12
    return {
        "step_ms_median": round(t * 1e3, 2),
        "step_ms_quartiles": [round(q * 1e3, 2) for q in statistics.quantiles(times, n=4)] if len(times) > 1 else None,
        "samples_per_s": round(args.batch / t, 2),
        "peak_mem_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 3) if cuda else None,
        "flops_per_step": flops,
        "achieved_tflops": round(achieved, 3),
        "peak_tflops": peak,
        "mfu": round(achieved / peak, 4) if peak else None,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="paper/mope_swin_b_k16")
    ap.add_argument("--vision", default="swin_base_patch4_window12_384", help="timm Swin name of the main encoder")
    ap.add_argument("--image-size", type=int, default=None, help="default 384 (16 with --dry-run)")
    ap.add_argument("--text-len", type=int, default=None, help="tokens per text (default 40; 8 with --dry-run)")
    ap.add_argument("--batch", type=int, default=None, help="default 32 (2 with --dry-run)")
    ap.add_argument("--iters", type=int, default=None, help="default 20 (2 with --dry-run)")
    ap.add_argument("--warmup", type=int, default=None, help="default 3 (1 with --dry-run)")
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument(
        "--dry-run", action="store_true", help="tiny sizes on CPU: checks the bench runs, measures nothing"
    )
    ap.add_argument("--json", default=None, help="also write the JSON here")
    ap.add_argument("--device", default=None, help="default cuda (cpu with --dry-run); cpu runs the full sizes slowly")
    args = ap.parse_args(argv)
    dry = args.dry_run
    for name, full, tiny in (
        ("image_size", 384, 32),
        ("text_len", 40, 8),
        ("batch", 32, 2),
        ("iters", 20, 2),
        ("warmup", 3, 1),
    ):
        if getattr(args, name) is None:
            setattr(args, name, tiny if dry else full)
    device = torch.device(args.device or ("cpu" if dry else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench/gpu_step.py: no CUDA GPU here; use --dry-run for the CPU check", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    model, cfg = build(args)
    model.to(device)
    batch = make_batch(args, cfg, device)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    res = {
        "bench": "gpu_step",
        "dry_run": dry,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "preset": args.preset,
        "vision": cfg.vision.name,
        "image_size": args.image_size,
        "text_len": args.text_len,
        "batch": args.batch,
        "iters": args.iters,
        "trainable_params": n_train,
        "total_params": n_all,
        "precisions": {},
    }
    for p in [x.strip() for x in args.precisions.split(",") if x.strip()]:
        if p not in ("fp32", "bf16"):
            print(f"bench/gpu_step.py: --precisions {p!r}: use fp32 and/or bf16", file=sys.stderr)
            return 2
        res["precisions"][p] = measure(model, batch, p, args, device)
    text = json.dumps(res, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
