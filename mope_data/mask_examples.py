"""Predicted masks of a few val samples, kept with the run (MLflow artifact ``mask_examples/``) for the report's
mask figure: for segmentation people look before they read numbers.

Files: ``examples.safetensors`` (``image`` (N, H, W, 3) uint8 as the model saw it, de-normalised; ``mask`` (N, H, W)
uint8 0/1 ground truth; ``prob`` (N, H, W) uint8 = round(255 * sigmoid(logit))) and ``examples.json`` (``keys``,
``texts``: the expressions, ``iou``: each sample's IoU at sigmoid > 0.5). safetensors + JSON: nothing is unpickled.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

MASK_EXAMPLES_DIR = "mask_examples"
NUM_EXAMPLES = 8


def collect(engine, loader, lcfg, cache=None, n: int = NUM_EXAMPLES) -> dict[str, Any]:
    """The first `n` samples of `loader` (the val split, in its fixed order) with the model's predictions."""
    from mope.heads import iou_counts
    from mope_data import dataset_info
    from mope_data.transforms import norm_stats

    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in norm_stats(lcfg, dataset_info(lcfg.data_dir)))
    model = engine.module
    was_training = model.training
    model.eval()
    images, masks, probs, keys, texts, ious = [], [], [], [], [], []
    with torch.no_grad():
        for batch in loader:
            if cache is not None:
                batch["comp_feat"] = cache.lookup("val", batch["key"])
            img = batch["image"].float().cpu()
            logits = engine.forward(batch).logits.float().cpu()
            gt = batch["mask"].float().cpu()
            inter, union = iou_counts(logits, gt)
            images.append(((img * std + mean).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1))
            masks.append(gt.to(torch.uint8))
            probs.append((logits.squeeze(1).sigmoid() * 255).round().to(torch.uint8))
            keys += list(batch["key"])
            texts += list(batch.get("text") or [""] * len(img))
            ious += (inter.double() / union.double().clamp(min=1)).tolist()
            if len(keys) >= n:
                break
    model.train(was_training)
    return {
        "image": torch.cat(images)[:n].contiguous(),
        "mask": torch.cat(masks)[:n].contiguous(),
        "prob": torch.cat(probs)[:n].contiguous(),
        "keys": keys[:n],
        "texts": texts[:n],
        "iou": ious[:n],
    }


def write(out_dir: str | Path, ex: dict[str, Any]) -> Path:
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: ex[k] for k in ("image", "mask", "prob")}, str(out / "examples.safetensors"))
    (out / "examples.json").write_text(json.dumps({k: ex[k] for k in ("keys", "texts", "iou")}, indent=1))
    return out


def read(dir_: str | Path) -> dict[str, Any]:
    """What :func:`write` wrote, as numpy arrays + lists; a clear error when a file is missing."""
    from safetensors.numpy import load_file

    d = Path(dir_)
    for name in ("examples.safetensors", "examples.json"):
        if not (d / name).is_file():
            raise FileNotFoundError(f"{d / name}: missing; the run did not log its mask examples (task segmentation)")
    arrays = load_file(str(d / "examples.safetensors"))
    meta = json.loads((d / "examples.json").read_text())
    return {**{k: np.asarray(v) for k, v in arrays.items()}, **meta}
