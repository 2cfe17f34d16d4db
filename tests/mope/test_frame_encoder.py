"""FrameEncoder: a frozen tiny ViT / Swin adapter applied per frame, pooled over time (mean / max), cacheable."""

from __future__ import annotations

import pytest
import torch

from mope.backbones import create_encoder
from mope.backbones.frames import FrameEncoder
from tests.helpers.tinymodels import IMG, TINY_SWIN, TINY_VIT

TOL = 1e-6


def tiny_vision(cfg=TINY_VIT, seed: int = 0):
    torch.manual_seed(seed)
    return create_encoder(cfg)


def clip(B=2, T=5, size=32, seed=1):
    return torch.randn(B, T, 3, size, size, generator=torch.Generator().manual_seed(seed))


def per_frame(encoder, frames):
    encoder.eval()
    with torch.no_grad():
        return torch.stack([encoder(frames[:, t]) for t in range(frames.shape[1])], dim=1)  # (B, T, D)


@pytest.mark.parametrize("cfg", [TINY_VIT, TINY_SWIN], ids=["vit", "swin"])
def test_mean_and_max_equal_per_frame_outputs(cfg):
    enc = tiny_vision(cfg)
    frames = clip(size=IMG[cfg.kind])
    ref = per_frame(enc, frames)
    mean, mx = FrameEncoder(enc), FrameEncoder(enc, pool="max")
    assert mean.out_dim == mx.out_dim == enc.layout.out_dim
    out = mean(frames)
    assert out.shape == (2, mean.out_dim)
    torch.testing.assert_close(out, ref.mean(1), atol=TOL, rtol=0)
    torch.testing.assert_close(mx(frames), ref.amax(1), atol=TOL, rtol=0)
    torch.testing.assert_close(mean({"frames": frames}), out, atol=0, rtol=0)  # mapping input, no mask
    assert (mx(frames) - out).abs().max() > 1e-3


def test_frames_mask_is_respected_and_padded_frames_not_encoded():
    enc = tiny_vision()
    frames = clip(B=3, T=4)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0]])
    ref = per_frame(enc, frames)
    garbage = frames.clone()
    garbage[mask == 0] = 1e3  # padded frames' content must not matter
    sizes = []
    hook = enc.register_forward_pre_hook(lambda mod, args: sizes.append(args[0].shape[0]))
    try:
        for pool in ("mean", "max"):
            fe = FrameEncoder(enc, pool=pool, frame_chunk=4)
            out = fe({"frames": garbage, "frames_mask": mask})
            agg = (lambda x: x.mean(0)) if pool == "mean" else (lambda x: x.amax(0))
            torch.testing.assert_close(out[0], agg(ref[0]), atol=TOL, rtol=0)
            torch.testing.assert_close(out[1], agg(ref[1, :2]), atol=TOL, rtol=0)
            assert torch.equal(out[2], torch.zeros_like(out[2]))  # no real frame: zero feature
            feats, m = fe.frame_features({"frames": garbage, "frames_mask": mask})
            assert feats.shape == (3, 4, 32) and torch.equal(m, mask.bool())
            assert torch.equal(feats[mask == 0], torch.zeros(6, 32))
    finally:
        hook.remove()
    assert sizes == [4, 2] * 4  # 6 real frames in chunks of 4 (forward + frame_features, x2 pools); padding skipped


def test_chunking_gives_identical_results():
    enc = tiny_vision()
    frames = clip(B=3, T=5)
    mask = torch.ones(3, 5, dtype=torch.long)
    mask[1, 3:] = 0
    big = FrameEncoder(enc, frame_chunk=64)
    for chunk in (1, 2, 7):
        small = FrameEncoder(enc, frame_chunk=chunk)
        torch.testing.assert_close(small(frames), big(frames), atol=TOL, rtol=0)
        batch = {"frames": frames, "frames_mask": mask}
        torch.testing.assert_close(small(batch), big(batch), atol=TOL, rtol=0)
    sizes = []
    hook = enc.register_forward_pre_hook(lambda mod, args: sizes.append(args[0].shape[0]))
    try:
        FrameEncoder(enc, frame_chunk=4)(frames)
    finally:
        hook.remove()
    assert sizes == [4, 4, 4, 3]  # B*T = 15 frames


def test_frozen_eval_no_grad_and_errors():
    enc = tiny_vision(TINY_VIT)
    enc.model.blocks[0].drop_path1 = torch.nn.Dropout(0.5)  # would make train-mode outputs random
    fe = FrameEncoder(enc)
    fe.train()
    assert fe.training and not fe.encoder.training and not any(m.training for m in fe.encoder.modules())
    assert all(not p.requires_grad for p in fe.parameters())
    frames = clip()
    out = fe(frames)
    assert not out.requires_grad
    torch.testing.assert_close(out, fe(frames), atol=0, rtol=0)  # deterministic although .train()
    with pytest.raises(ValueError, match="pool="):
        FrameEncoder(enc, pool="attn")
    with pytest.raises(ValueError, match="frame_chunk"):
        FrameEncoder(enc, frame_chunk=0)
    with pytest.raises(ValueError, match=r"\(B, T, C, H, W\)"):
        fe(frames[:, 0])
    with pytest.raises(KeyError, match="frames"):
        fe({"image": frames})


def test_cache_key_and_fingerprint():
    a, b = FrameEncoder(tiny_vision(seed=3)), FrameEncoder(tiny_vision(seed=3))
    fp = a.weights_fingerprint()
    assert len(fp) == 64 and fp == b.weights_fingerprint() and a.cache_key() == b.cache_key()
    assert FrameEncoder(tiny_vision(seed=3), frame_chunk=2).cache_key() == a.cache_key()  # memory knob only
    assert FrameEncoder(tiny_vision(seed=3), pool="max").cache_key() != a.cache_key()
    assert FrameEncoder(tiny_vision(seed=4)).weights_fingerprint() != fp
    with torch.no_grad():
        b.encoder.model.blocks[1].mlp.fc2.weight[0, 0] += 1e-3
    assert b.weights_fingerprint() != fp and b.cache_key() != a.cache_key()
