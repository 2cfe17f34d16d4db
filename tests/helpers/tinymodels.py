"""Tiny encoder configs built locally (no download): the matrix every model test runs over."""

import warnings

import torch

from mope.config import EncoderConfig, FusionConfig, MoPEConfig

TINY_VIT = EncoderConfig(
    kind="timm_vit",
    name="vit_tiny_patch16_224",
    kwargs=dict(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2),
)
TINY_SWIN = EncoderConfig(
    kind="timm_swin",
    name="swin_tiny_patch4_window7_224",
    kwargs=dict(img_size=56, embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 2), window_size=7),
)
TINY_BERT = EncoderConfig(
    kind="hf_bert",
    name="bert-base-uncased",
    kwargs=dict(hidden_size=24, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48, vocab_size=100),
)
IMG = {"timm_vit": 32, "timm_swin": 56}


def tiny_cfg(method="mope", vision=TINY_VIT, **mope_kw) -> FusionConfig:
    mope_kw.setdefault("num_experts", 4)
    mope_kw.setdefault("prompt_len", 2)
    mope_kw.setdefault("router_noise", "off")
    return FusionConfig(
        method=method,
        vision=vision,
        text=TINY_BERT,
        num_classes=5,
        mope=MoPEConfig(**mope_kw),
        baseline_prompt_len=2,
        comp_prompt_len=2,
    )


def make_batch(B, size, seed=0, T=7):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[::2, T - 2 :] = 0  # some padding
    return {
        "image": torch.randn(B, 3, size, size, generator=g),
        "input_ids": torch.randint(1, 100, (B, T), generator=g),
        "attention_mask": mask,
        "label": torch.randint(0, 5, (B,), generator=g),
    }


def build(cfg, seed=0):
    from mope import build_model

    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_model(cfg)
