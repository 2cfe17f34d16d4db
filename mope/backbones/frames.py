"""A frozen image encoder applied frame by frame to video, with temporal pooling.

Reference: songrise/MoPE ``models/pool_vit.py`` (``PoolViT``): a ViT-B/16 runs on every frame of a (B, T, C, H, W)
clip, its final [CLS] token is taken per frame, and the T frame features are **max**-pooled
(``AdaptiveMaxPool1d(1)``). Our default is the **mean** over frames (the issue's choice: every real frame contributes
equally, and one outlier frame cannot dominate a channel); ``pool="max"`` reproduces the reference. Either way padded
frames (``frames_mask == 0``) are ignored, and are not even encoded.

The encoder is a vision :class:`~mope.backbones.base.PromptableEncoder` (timm ViT / Swin adapter) used without prompts:
the per-frame feature is exactly the adapter's ``forward(images, None)`` (ViT: final-normed [CLS] through timm's
``forward_head(pre_logits=True)``; Swin: mean over the final tokens). It is frozen, runs in eval mode whatever
``train()`` says, and computes no gradients, so the features depend only on the frames and the weights:
:meth:`FrameEncoder.cache_key` keys a per-dataset feature cache (as
:class:`~mope.backbones.blackbox.FrozenTextEncoder` does).
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from .base import EncoderInputs, frozen_forward_guard
from .blackbox import state_dict_fingerprint

FRAME_POOLS = ("mean", "max")


def _unpack_frames(inputs: EncoderInputs) -> tuple[Tensor, Tensor | None]:
    if isinstance(inputs, Tensor):
        return inputs, None
    if isinstance(inputs, Mapping):
        if "frames" not in inputs:
            raise KeyError(f"video inputs need 'frames' (B, T, C, H, W) (got keys {sorted(inputs)})")
        return inputs["frames"], inputs.get("frames_mask")
    raise TypeError(f"video inputs must be a (B, T, C, H, W) tensor or a mapping, got {type(inputs).__name__}")


class FrameEncoder(nn.Module):
    """Frozen per-frame image encoder + pooling over time: (B, T, C, H, W) -> (B, out_dim).

    Args:
        encoder: a vision PromptableEncoder (or any module mapping (N, C, H, W) to (N, D)); frozen here.
        pool: ``"mean"`` (default) or ``"max"`` (reference ``pool_vit.py``) over the real frames.
        frame_chunk: frames encoded per call (bounds activation memory; results do not depend on it).
        out_dim: feature width; inferred from ``encoder.layout.out_dim`` or ``encoder.out_dim`` when not given.

    Inputs: the ``frames`` tensor (B, T, C, H, W), or a mapping with ``"frames"`` and optional ``"frames_mask"`` (B, T)
    (1 = real frame, 0 = padding). A clip without any real frame gives a zero feature.
    """

    def __init__(
        self, encoder: nn.Module, *, pool: str = "mean", frame_chunk: int = 64, out_dim: int | None = None
    ) -> None:
        super().__init__()
        if pool not in FRAME_POOLS:
            raise ValueError(f"pool={pool!r}: allowed values are {FRAME_POOLS}")
        if int(frame_chunk) < 1:
            raise ValueError(f"frame_chunk={frame_chunk!r} must be >= 1")
        self.encoder = encoder
        self.pool = pool
        self.frame_chunk = int(frame_chunk)
        for p in self.encoder.parameters():
            p.requires_grad_(False)
        self.encoder.eval()
        if out_dim is None:
            layout = getattr(encoder, "layout", None)
            out_dim = layout.out_dim if layout is not None else getattr(encoder, "out_dim", None)
            if out_dim is None:
                raise ValueError("FrameEncoder: cannot infer out_dim; pass out_dim=")
        self.out_dim = int(out_dim)

    def extra_repr(self) -> str:
        return f"pool={self.pool!r}, frame_chunk={self.frame_chunk}, out_dim={self.out_dim}"

    def train(self, mode: bool = True) -> FrameEncoder:
        super().train(mode)
        self.encoder.eval()
        return self

    def encode_frames(self, images: Tensor) -> Tensor:
        """(N, C, H, W) -> (N, D), ``frame_chunk`` frames per encoder call."""
        outs = [self.encoder(images[i : i + self.frame_chunk]) for i in range(0, images.shape[0], self.frame_chunk)]
        if not outs:
            return images.new_zeros(0, self.out_dim)
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)

    def frame_features(self, inputs: EncoderInputs) -> tuple[Tensor, Tensor | None]:
        """Per-frame features (B, T, D) (zeros at padded frames, which are not encoded) and the bool mask (or None)."""
        frames, mask = _unpack_frames(inputs)
        if frames.dim() != 5:
            raise ValueError(f"frames must be (B, T, C, H, W), got shape {tuple(frames.shape)}")
        B, T = frames.shape[:2]
        flat = frames.reshape(B * T, *frames.shape[2:])
        grad_ctx = torch.no_grad() if frozen_forward_guard(self.encoder) else contextlib.nullcontext()
        with grad_ctx:
            if mask is None:
                return self.encode_frames(flat).reshape(B, T, -1), None
            mask = mask.to(frames.device).bool()
            idx = mask.reshape(-1).nonzero().squeeze(1)
            feats = self.encode_frames(flat.index_select(0, idx))
            out = feats.new_zeros(B * T, feats.shape[-1]).index_copy(0, idx, feats)
            return out.reshape(B, T, -1), mask

    def forward(self, inputs: EncoderInputs) -> Tensor:
        feats, mask = self.frame_features(inputs)
        with torch.no_grad() if frozen_forward_guard(self.encoder) else contextlib.nullcontext():
            if mask is None:
                return feats.mean(dim=1) if self.pool == "mean" else feats.amax(dim=1)
            m = mask.unsqueeze(-1)
            if self.pool == "mean":
                return (feats * m.to(feats.dtype)).sum(dim=1) / m.sum(dim=1).clamp_min(1).to(feats.dtype)
            pooled = feats.masked_fill(~m, float("-inf")).amax(dim=1)
            return torch.where(m.any(dim=1), pooled, torch.zeros_like(pooled))

    def weights_fingerprint(self) -> str:
        """Stable sha256 of the wrapped encoder's state dict (a feature-cache key; recomputed on each call)."""
        return state_dict_fingerprint(self.encoder)

    def cache_key(self) -> str:
        """Fingerprint of weights *and* feature definition (encoder class and extra_repr, pool, out_dim).

        ``frame_chunk`` is left out: it changes memory use, not the features.
        """
        desc = (
            f"FrameEncoder(pool={self.pool!r})|{type(self.encoder).__qualname__}({self.encoder.extra_repr()})"
            f"|out_dim={self.out_dim}"
        )
        return hashlib.sha256(f"{desc}|{self.weights_fingerprint()}".encode()).hexdigest()


__all__ = ["FRAME_POOLS", "FrameEncoder"]
