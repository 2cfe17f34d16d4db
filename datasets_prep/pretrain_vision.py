"""Pretrain the embedded demo's vision encoder (a small timm ViT) on an image-only pretext task.

No pretrained ViT/Swin weights exist offline (``../shared/docs/environment.md``), so ``harness prep demo`` trains one
locally, once, and from then on the harness treats it as a frozen pretrained encoder (like Swin-B on a cluster).

Pretext task: *digit-cell classification*. Each pretext image is a 2x2 grid of real UCI digits composed exactly like
the demo images (:func:`datasets_prep.demo.compose_grids`), drawn afresh every epoch from the **training** source
digits only; the model predicts the digit class of each of the 4 cells (4 x 10-way cross-entropy on the [CLS]
feature), plus an auxiliary loss classifying each cell from the mean of its final patch tokens (``patch_loss``: the
patch features learn within a few hundred steps, which then lets the [CLS] aggregation learn; both heads are
discarded). Digit identity is an image annotation: no statement and no entailment label is used. Pretext accuracy
(of the [CLS] head, and of the patch head) is measured on grids composed from the *validation* source digits.

Determinism: seeded NumPy generator for the pretext data, ``torch.manual_seed`` inside :func:`torch.random.fork_rng`
(the caller's RNG state is left untouched), ``torch.use_deterministic_algorithms(True)``, and a fixed intra-op thread
count (``threads``, default 1: the bytes differ between 1 and 2 threads, and may differ on another CPU ISA or torch
build, so the thread count is recorded in ``config.json``). Two runs with the same software on the same kind of machine
give byte-identical weights.

Output (``out_dir``): ``model.safetensors`` holds exactly
``timm.create_model(name, pretrained=False, **timm_kwargs)``'s state dict (``num_classes=0``: no head), so
``load_state_dict(load_file(...), strict=True)`` works; ``config.json`` holds
``{"timm_model", "timm_kwargs", "img_size", "mean", "std", "pretext", "train_images_sha256", ...}``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "PretrainConfig",
    "adamw",
    "cosine_lr",
    "deterministic_torch",
    "load_encoder",
    "log",
    "pretrain_encoder",
    "save_encoder",
    "timm_kwargs",
]

TIMM_MODEL = "vit_tiny_patch16_224"  # architecture name only; every size argument is overridden by timm_kwargs


def log(msg: str) -> None:
    print(f"[prep demo] {msg}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class PretrainConfig:
    img_size: int = 16
    patch_size: int = 4  # 4x4 = 16 patch tokens; each digit cell is 2x2 patches
    embed_dim: int = 128
    depth: int = 4
    num_heads: int = 4
    epochs: int = 9  # 9 x 4096 grids = 1,152 steps of 32 (~1.5 min on one thread at 16 px)
    grids_per_epoch: int = 4096
    val_grids: int = 1000
    batch_size: int = 32  # small batches: the [CLS] aggregation is step-limited, not sample-limited
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 50
    global_pool: str = "token"  # timm pooling of the saved encoder: "token" ([CLS]) or "avg" (mean of patch tokens)
    patch_loss: bool = True  # also classify each cell from the mean of its final patch tokens (faster learning)
    # Intra-op threads, fixed: the weights' bytes depend on it (1 vs 2 threads differ bitwise). One thread is also the
    # fastest on a busy 2-core machine at batch 32 (2 OpenMP threads sharing a core with another job ran ~6x slower).
    threads: int = 1
    seed: int = 0


def timm_kwargs(cfg: PretrainConfig) -> dict:
    return {
        "img_size": cfg.img_size,
        "patch_size": cfg.patch_size,
        "in_chans": 3,
        "embed_dim": cfg.embed_dim,
        "depth": cfg.depth,
        "num_heads": cfg.num_heads,
        "mlp_ratio": 4.0,
        "class_token": True,
        "global_pool": cfg.global_pool,
        "num_classes": 0,
    }


@contextlib.contextmanager
def deterministic_torch(threads: int, seed: int):
    """A fixed intra-op thread count, deterministic algorithms and ``torch.manual_seed(seed)`` inside
    :func:`torch.random.fork_rng`; the caller's thread count, determinism flag and RNG state are restored on exit."""
    import torch

    prev_threads = torch.get_num_threads()
    prev_det = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            yield
    finally:
        torch.set_num_threads(prev_threads)
        torch.use_deterministic_algorithms(prev_det)


def adamw(params: list, lr: float, weight_decay: float):
    """AdamW with weight decay on the matrices only (not on biases / norms / 1-d parameters)."""
    import torch

    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=lr
    )


def cosine_lr(step: int, lr: float, warmup_steps: int, total: int) -> float:
    """Linear warm-up over ``warmup_steps``, then cosine decay to 0 at step ``total``."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    p = (step - warmup_steps) / max(1, total - warmup_steps)
    return lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, p)))


def save_encoder(out_dir: Path, state: dict, config: dict) -> None:
    """Write ``out_dir/model.safetensors`` (the state dict) and ``out_dir/config.json`` (atomically, last)."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    tmp = out_dir / ".config.json.tmp"
    tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, out_dir / "config.json")


def _to_input(images_u8: np.ndarray, mean: float, std: float):
    import torch

    x = torch.from_numpy(images_u8).float().div_(255.0).sub_(mean).div_(std)
    return x.unsqueeze(1).expand(-1, 3, -1, -1).contiguous()  # grey -> 3 identical channels, like the loader's RGB


def pretrain_encoder(
    sample_grids: Callable[[np.random.Generator, int, str], tuple[np.ndarray, np.ndarray]],
    *,
    mean: float,
    std: float,
    cfg: PretrainConfig,
    out_dir: Path,
    train_images_sha256: str,
    verbose: bool = True,
) -> dict:
    """Train the ViT on the pretext task and write ``out_dir/model.safetensors`` + ``out_dir/config.json``.

    ``sample_grids(rng, n, split)`` returns ``(images uint8 (n, H, W), cell digit labels int (n, 4))`` composed from
    the source digits of ``split`` ("train" for training, "val" for the pretext accuracy). Returns the config dict
    written.
    """
    import timm
    import torch
    import torch.nn.functional as F

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    kw = timm_kwargs(cfg)
    t_start = time.monotonic()
    with deterministic_torch(cfg.threads, cfg.seed):
        model = timm.create_model(TIMM_MODEL, pretrained=False, **kw)
        head = torch.nn.Linear(cfg.embed_dim, 4 * 10)
        cell_head = torch.nn.Linear(cfg.embed_dim, 10)
        params = list(model.parameters()) + list(head.parameters()) + list(cell_head.parameters())
        grid = cfg.img_size // cfg.patch_size
        npfx = model.num_prefix_tokens

        def cell_logits(tokens):  # (B, prefix + grid*grid, D) -> (B*4, 10): mean patch token per cell
            p = tokens[:, npfx:].reshape(-1, 2, grid // 2, 2, grid // 2, cfg.embed_dim).mean(dim=(2, 4))
            return cell_head(p.reshape(-1, cfg.embed_dim))

        opt = adamw(params, cfg.lr, cfg.weight_decay)
        steps_per_epoch = cfg.grids_per_epoch // cfg.batch_size
        total = steps_per_epoch * cfg.epochs

        rng_val = np.random.default_rng([cfg.seed, 1])
        val_x, val_y = sample_grids(rng_val, cfg.val_grids, "val")
        val_inp = _to_input(val_x, mean, std)
        val_t = torch.from_numpy(val_y.astype(np.int64))

        def evaluate(n: int) -> dict:  # on the first n validation grids
            model.eval()
            head.eval()
            preds = []
            cpreds = []
            with torch.no_grad():
                for i in range(0, n, 256):
                    tokens = model.forward_features(val_inp[i : min(n, i + 256)])
                    preds.append(head(model.forward_head(tokens)).view(-1, 4, 10).argmax(-1))
                    cpreds.append(cell_logits(tokens).view(-1, 4, 10).argmax(-1))
            model.train()
            head.train()
            correct = torch.cat(preds) == val_t[:n]
            out = {
                "val_cell_accuracy": round(float(correct.float().mean()), 4),
                "val_grid_accuracy": round(float(correct.all(dim=1).float().mean()), 4),
            }
            if cfg.patch_loss:
                out["val_patch_cell_accuracy"] = round(float((torch.cat(cpreds) == val_t[:n]).float().mean()), 4)
            return out

        rng = np.random.default_rng([cfg.seed, 0])
        step = 0
        history = []
        seen = 0
        t0 = time.monotonic()
        for epoch in range(cfg.epochs):
            xs, ys = sample_grids(rng, steps_per_epoch * cfg.batch_size, "train")
            inp = _to_input(xs, mean, std)
            tgt = torch.from_numpy(ys.astype(np.int64))
            loss_sum = 0.0
            for b in range(steps_per_epoch):
                sl = slice(b * cfg.batch_size, (b + 1) * cfg.batch_size)
                for g in opt.param_groups:
                    g["lr"] = cosine_lr(step, cfg.lr, cfg.warmup_steps, total)
                tokens = model.forward_features(inp[sl])
                logits = head(model.forward_head(tokens)).view(-1, 10)
                y = tgt[sl].reshape(-1)
                loss = F.cross_entropy(logits, y)
                if cfg.patch_loss:
                    loss = loss + F.cross_entropy(cell_logits(tokens), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                loss_sum += loss.item()
                step += 1
                seen += cfg.batch_size
            n_val = len(val_inp) if epoch + 1 == cfg.epochs else min(200, len(val_inp))  # cheap progress check
            metrics = {"val_grids": n_val, **evaluate(n_val)}
            dt = time.monotonic() - t0
            rate = seen / dt
            eta = (total - step) * cfg.batch_size / rate
            history.append({"epoch": epoch + 1, "loss": round(loss_sum / steps_per_epoch, 4), **metrics})
            if verbose:
                log(
                    f"encoder pretraining epoch {epoch + 1}/{cfg.epochs}: loss {loss_sum / steps_per_epoch:.3f}, "
                    f"val cell acc {metrics['val_cell_accuracy']:.3f} (patch head "
                    f"{metrics.get('val_patch_cell_accuracy', float('nan')):.3f}), "
                    f"{rate:.0f} img/s, eta {eta:.0f}s"
                )
        train_seconds = time.monotonic() - t0
        state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}

    final = history[-1] if history else {}
    config = {
        "timm_model": TIMM_MODEL,
        "timm_kwargs": kw,
        "img_size": cfg.img_size,
        "patch_size": cfg.patch_size,
        "num_patches": (cfg.img_size // cfg.patch_size) ** 2,
        "mean": [round(mean, 6)] * 3,
        "std": [round(std, 6)] * 3,
        "pretext": {
            "task": "digit-cell classification: 4 cells x 10 digit classes from the [CLS] feature; grids composed "
            "from the demo's training source digits only (no statements, no entailment labels)",
            "config": asdict(cfg),
            "steps": total,
            "val_cell_accuracy": final.get("val_cell_accuracy"),
            "val_grid_accuracy": final.get("val_grid_accuracy"),
            "history": history,
        },
        "train_images_sha256": train_images_sha256,
        "deterministic": {"torch_threads": cfg.threads, "use_deterministic_algorithms": True, "seed": cfg.seed},
    }
    save_encoder(out_dir, state, config)
    if verbose:
        log(
            f"encoder pretraining done in {train_seconds:.0f}s ({time.monotonic() - t_start:.0f}s with set-up); "
            f"pretext val cell accuracy {final.get('val_cell_accuracy')}, all-4-cells {final.get('val_grid_accuracy')}"
        )
    return config


def load_encoder(encoder_dir: Path):
    """Build the timm model from ``encoder_dir/config.json`` and load ``model.safetensors`` strictly (eval mode)."""
    import timm
    from safetensors.torch import load_file

    encoder_dir = Path(encoder_dir)
    cfg = json.loads((encoder_dir / "config.json").read_text(encoding="utf-8"))
    model = timm.create_model(cfg["timm_model"], pretrained=False, **cfg["timm_kwargs"])
    model.load_state_dict(load_file(str(encoder_dir / "model.safetensors")), strict=True)
    return model.eval(), cfg
