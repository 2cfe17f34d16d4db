"""Referring segmentation on the model side: the SETR-PUP head on the prompted main encoder's patch grid, the pixel
loss, the IoU metrics (checked against scikit-learn), the config checks, the trainable set, and that the expression
reaches the mask through the router / mapper."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mope import build_model
from mope.config import ConfigError, EncoderConfig, FusionConfig
from mope.heads import SETRPUPHead, default_num_convs, dice_loss, iou_counts, seg_loss, seg_metrics

VIT = EncoderConfig(
    kind="timm_vit",
    name="vit_tiny_patch16_224",
    kwargs={"img_size": 32, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2},
)
SWIN = EncoderConfig(
    kind="timm_swin",
    name="swin_tiny_patch4_window7_224",
    kwargs={"img_size": 64, "window_size": 2, "embed_dim": 16, "depths": [1, 1, 2, 1], "num_heads": [1, 1, 1, 1]},
)


def _cfg(method="mope", vision=VIT, **kw) -> FusionConfig:
    cfg = FusionConfig(
        method=method,
        task="segmentation",
        num_classes=1,
        vision=vision,
        text=EncoderConfig(kind="hf_bert", name="minilm"),
        seg_channels=16,
        comp_prompt_len=0,
        **kw,
    )
    cfg.mope.num_experts = 4
    return cfg


def _batch(n=2, size=32, texts=None):
    torch.manual_seed(0)
    ids = torch.randint(1000, 2000, (n, 6)) if texts is None else texts
    return {
        "image": torch.randn(n, 3, size, size),
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "token_type_ids": torch.zeros_like(ids),
        "mask": (torch.rand(n, size, size) > 0.7).float(),
    }


def test_num_convs_bring_the_grid_back_to_the_input():
    assert [default_num_convs(s) for s in (4, 16, 32)] == [2, 4, 5]
    with pytest.raises(ValueError, match="power of two"):
        default_num_convs(14)
    head = SETRPUPHead(8, channels=4, num_convs=3)
    assert head(torch.randn(2, 8, 5, 6)).shape == (2, 1, 40, 48)
    assert head(torch.randn(2, 8, 5, 6), out_size=(37, 41)).shape == (2, 1, 37, 41)


@pytest.mark.parametrize("vision,size", [(VIT, 32), (SWIN, 64)], ids=["vit", "swin"])
def test_mask_logits_at_input_resolution(vision, size):
    m = build_model(_cfg(vision=vision))
    out = m(_batch(size=size))
    assert out.logits.shape == (2, 1, size, size)
    assert out.routing is not None  # MoPE's router ran on the segmentation path too
    assert m.head.num_convs == {4: 2, 32: 5}[m.main_encoder.out_stride]


def test_vit_patch_grid_is_the_pooled_tokens():
    """forward_patches is the same final normed token sequence that forward pools, laid out as a grid."""
    m = build_model(_cfg(method="p_img_only"))
    enc, x = m.main_encoder, torch.randn(2, 3, 32, 32)
    grid = enc.forward_patches(x)
    assert grid.shape == (2, 32, 8, 8)
    tokens = enc._tokens(x, None)
    torch.testing.assert_close(grid.flatten(2).transpose(1, 2), tokens[:, 1:])
    # row-major: grid[..., r, c] is patch r * 8 + c
    torch.testing.assert_close(grid[:, :, 2, 5], tokens[:, 1 + 2 * 8 + 5])


def test_iou_metrics_agree_with_sklearn():
    from sklearn.metrics import jaccard_score

    g = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 1, 10, 12, generator=g)
    mask = (torch.rand(6, 10, 12, generator=g) > 0.6).float()
    inter, union = iou_counts(logits, mask)
    m = seg_metrics(inter, union)
    pred = (logits.squeeze(1) > 0).numpy().astype(int)
    y = mask.numpy().astype(int)
    per = [jaccard_score(y[i].ravel(), pred[i].ravel()) for i in range(6)]
    assert m["miou"] == pytest.approx(np.mean(per))
    assert m["oiou"] == pytest.approx(jaccard_score(y.ravel(), pred.ravel()))
    assert m["prec50"] == pytest.approx(np.mean(np.array(per) > 0.5))
    assert m["miou"] != pytest.approx(m["oiou"])  # the two differ on unequal object sizes


def test_perfect_prediction_scores_one_and_low_loss():
    mask = torch.zeros(2, 8, 8)
    mask[0, 2:5, 2:5] = 1
    mask[1, :, :4] = 1
    logits = (mask * 2 - 1).unsqueeze(1) * 20
    assert seg_metrics(*iou_counts(logits, mask)) == {
        "miou": 1.0,
        "oiou": 1.0,
        "prec50": 1.0,
        "prec70": 1.0,
        "prec90": 1.0,
    }
    assert dice_loss(logits, mask) < 1e-3
    assert seg_loss(logits, mask) < 1e-2 < seg_loss(-logits, mask)
    assert seg_loss(-logits, mask, "bce") < seg_loss(-logits, mask, "bce_dice")
    with pytest.raises(ValueError, match="differ in shape"):
        seg_loss(logits, mask[:, :4])


@pytest.mark.parametrize("method", ["late_concat", "text_only"])
def test_methods_without_a_main_head_are_refused(method):
    with pytest.raises(ConfigError, match="model.method"):
        _cfg(method=method)


def test_trainable_set_and_gradients():
    m = build_model(_cfg())
    rep = m.parameter_report()["components"]
    assert rep["vision encoder"]["trainable"] == 0 and rep["text encoder"]["trainable"] == 0
    assert rep["head"]["trainable"] == rep["head"]["total"] > 0
    b = _batch()
    out = m(b)
    (m.loss(out.logits, b["mask"]) + out.aux_loss).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.head.parameters() if p.requires_grad)
    assert m.main_prompts.mapper is not None
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.main_prompts.parameters())
    assert all(p.grad is None for p in m.main_encoder.parameters())


def test_the_expression_changes_the_mask_for_mope_not_for_image_only():
    same_image = _batch(n=1)
    texts = torch.tensor([[101, 1996, 2417, 4418, 102], [101, 1996, 2630, 2675, 102]])
    batch = {**{k: v.expand(2, *v.shape[1:]) for k, v in same_image.items() if k in ("image", "mask")}}
    batch.update(input_ids=texts, attention_mask=torch.ones_like(texts), token_type_ids=torch.zeros_like(texts))
    for method, differs in (("mope", True), ("p_sequential_fuse", True), ("p_img_only", False)):
        m = build_model(_cfg(method=method)).eval()
        with torch.no_grad():
            lo = m(batch).logits
        assert (not torch.allclose(lo[0], lo[1])) == differs, method
