"""Dense prediction for referring image segmentation (RIS; the paper's App. C.1, Table 7): a SETR-PUP head on the
prompted main encoder's patch tokens, the pixel loss and the per-sample IoU counts.

SETR-PUP (Zheng et al., CVPR 2021, "progressive upsampling"; mmsegmentation's ``SETRUPHead``): LayerNorm over the
token features, then ``num_convs`` times [3x3 conv -> BatchNorm -> ReLU -> x2 bilinear upsampling], then a 1x1
classifier. With ``num_convs = log2(stride)`` the mask logits come out at the input resolution (ViT-B/16: the 4 stages
of SETR; Swin-B: 5, from its 1/32 grid; the demo ViT/4: 2). The official MoPE code's RIS path is a stub with a UperNet
head (mope-reference §4), so this follows the paper's text, not the code.

Loss: BCE-with-logits + Dice on the object mask (``seg_loss='bce_dice'``, equal weights; ``'bce'`` for BCE alone).
The paper does not state its pixel loss; BCE + Dice is the usual choice of binary referring segmentation (CRIS, LAVT
use BCE/CE; Dice counters the small foreground share of RefCOCO masks).

Metrics (from :func:`iou_counts`): mIoU = mean over samples of I/U (the paper's Table 7 "mIoU"), oIoU = sum I /
sum U over the split, prec@X = share of samples with IoU > X; a prediction is ``sigmoid(logit) > 0.5``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

PREC_THRESHOLDS = (0.5, 0.7, 0.9)


def default_num_convs(stride: int) -> int:
    """Upsampling stages that bring a 1/stride grid back to the input resolution: log2(stride)."""
    n = int(round(math.log2(stride)))
    if stride < 2 or 2**n != stride:
        raise ValueError(f"encoder stride {stride} is not a power of two >= 2; set model.seg_num_convs")
    return n


class SETRPUPHead(nn.Module):
    """(B, C_in, h, w) patch features -> (B, 1, h * 2**num_convs, w * 2**num_convs) mask logits."""

    def __init__(self, in_dim: int, channels: int = 256, num_convs: int = 4, dropout: float = 0.1):
        super().__init__()
        self.norm = nn.LayerNorm(in_dim)
        layers: list[nn.Module] = []
        for i in range(num_convs):
            layers += [
                nn.Conv2d(in_dim if i == 0 else channels, channels, kernel_size=3, padding=1, bias=False),
                nn.BatchNorm2d(channels),
                nn.ReLU(inplace=True),
                nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
            ]
        self.up = nn.Sequential(*layers)
        self.dropout = nn.Dropout2d(dropout)
        self.cls = nn.Conv2d(channels, 1, kernel_size=1)
        self.num_convs = num_convs

    def forward(self, feats: Tensor, out_size: tuple[int, int] | None = None) -> Tensor:
        x = self.norm(feats.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        x = self.cls(self.dropout(self.up(x)))
        if out_size is not None and tuple(x.shape[-2:]) != tuple(out_size):
            x = F.interpolate(x, size=out_size, mode="bilinear", align_corners=False)
        return x


def dice_loss(logits: Tensor, mask: Tensor, eps: float = 1.0) -> Tensor:
    """Soft Dice per sample, averaged: 1 - (2 sum(p y) + eps) / (sum p + sum y + eps)."""
    p = logits.sigmoid().flatten(1)
    y = mask.flatten(1).to(p.dtype)
    return (1 - (2 * (p * y).sum(1) + eps) / (p.sum(1) + y.sum(1) + eps)).mean()


def seg_loss(logits: Tensor, mask: Tensor, kind: str = "bce_dice", dice_weight: float = 1.0) -> Tensor:
    """Pixel loss of (B, 1, H, W) logits against a (B, H, W) {0, 1} mask."""
    logits = logits.squeeze(1)
    if logits.shape != mask.shape:
        raise ValueError(f"mask logits {tuple(logits.shape)} and target mask {tuple(mask.shape)} differ in shape")
    loss = F.binary_cross_entropy_with_logits(logits, mask.to(logits.dtype))
    if kind == "bce_dice":
        loss = loss + dice_weight * dice_loss(logits, mask)
    return loss


def iou_counts(logits: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sample intersection and union pixel counts (int64, (B,)) of ``sigmoid(logits) > 0.5`` against the mask."""
    pred = logits.squeeze(1) > 0
    y = mask > 0.5
    return (pred & y).flatten(1).sum(1), (pred | y).flatten(1).sum(1)


def seg_metrics(inter: Tensor, union: Tensor) -> dict[str, float]:
    """mIoU, oIoU and prec@{50,70,90} from per-sample counts (IoU of an empty prediction of an empty mask = 1)."""
    inter, union = inter.double(), union.double()
    iou = torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(inter))
    out = {"miou": float(iou.mean()) if len(iou) else 0.0, "oiou": float(inter.sum() / union.sum().clamp(min=1))}
    for t in PREC_THRESHOLDS:
        out[f"prec{round(t * 100)}"] = float((iou > t).double().mean()) if len(iou) else 0.0
    return out


__all__ = ["PREC_THRESHOLDS", "SETRPUPHead", "default_num_convs", "dice_loss", "iou_counts", "seg_loss", "seg_metrics"]
