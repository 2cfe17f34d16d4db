"""Audio and video as complementary modalities (issue 16): psi = the concatenation of several frozen complementary
encoders' features (MUStARD: text main, audio + video complementary), built from configuration."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mope.config import ConfigError, EncoderConfig, FusionConfig
from tests.helpers.tinymodels import TINY_BERT, TINY_VIT, build, tiny_cfg

TINY_W2V = EncoderConfig(
    kind="hf_wav2vec2",
    name="wav2vec2-base",
    kwargs=dict(
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        conv_dim=(8, 8),
        conv_kernel=(10, 3),
        conv_stride=(5, 2),
        num_conv_pos_embeddings=8,
        num_conv_pos_embedding_groups=2,
    ),
)


def mustard_cfg(method="mope", comp=("audio", "video"), **kw) -> FusionConfig:
    base = tiny_cfg(method)
    return dataclasses.replace(
        base, main="text", complementary=list(comp), audio=TINY_W2V, video=TINY_VIT, num_classes=2, **kw
    )


def mustard_batch(B=4, L=3200, T=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    amask = torch.ones(B, L, dtype=torch.long)
    amask[1, L // 2 :] = 0
    tmask = torch.ones(B, 6, dtype=torch.long)
    tmask[::2, 4:] = 0
    return {
        "input_ids": torch.randint(1, 100, (B, 6), generator=g),
        "attention_mask": tmask,
        "audio": torch.randn(B, L, generator=g) * amask,
        "audio_mask": amask,
        "frames": torch.randn(B, T, 3, 32, 32, generator=g),
        "label": torch.randint(0, 2, (B,), generator=g),
    }


def test_psi_is_the_concatenation_of_the_audio_and_video_features_in_order():
    m = build(mustard_cfg()).train()
    b = mustard_batch()
    psi = m.complementary_feature(b)
    audio, video = m.comp_encoder.encoders["audio"], m.comp_encoder.encoders["video"]
    with torch.no_grad():
        a = audio({"audio": b["audio"], "audio_mask": b["audio_mask"]})
        v = torch.stack([video.encoder(b["frames"][:, t]) for t in range(b["frames"].shape[1])], 1).mean(1)
    assert psi.shape == (4, a.shape[1] + v.shape[1]) == (4, m.comp_dim)
    torch.testing.assert_close(psi, torch.cat([a, v], -1))
    # reversed order in the config: reversed halves
    r = build(mustard_cfg(comp=("video", "audio")))
    r.load_state_dict(m.state_dict(), strict=False)
    r.comp_encoder.encoders["audio"].load_state_dict(audio.state_dict())
    r.comp_encoder.encoders["video"].load_state_dict(video.state_dict())
    torch.testing.assert_close(r.complementary_feature(b), torch.cat([v, a], -1))


def test_multi_complementary_is_a_frozen_cacheable_black_box_and_every_prompt_learns():
    m = build(mustard_cfg()).train()
    assert m.comp_is_blackbox and m.comp_prompts is None
    assert not any(p.requires_grad for p in m.comp_encoder.parameters())
    assert not any(p.requires_grad for p in m.main_encoder.parameters())
    assert not m.comp_encoder.training  # frozen black box: eval (deterministic psi, cacheable)
    b = mustard_batch()
    out = m(b)
    assert out.routing is not None and out.logits.shape == (4, 2)
    (out.logits.sum() + out.aux_loss).backward()
    trainable = [(n, p) for n, p in m.named_parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in trainable), [
        n for n, p in trainable if p.grad is None or p.grad.abs().sum() == 0
    ]
    comps = m.parameter_report()["components"]
    assert comps["audio+video encoder"]["trainable"] == 0 and comps["text prompts"]["trainable"] > 0
    # the cached feature path gives the same logits
    m.eval()
    cached = dict(b, comp_feat=m.complementary_feature(b))
    torch.testing.assert_close(m(cached).logits, m(b).logits)


def test_batch_independence_with_audio_and_video():
    m = build(mustard_cfg()).eval()
    b = mustard_batch()
    full = m(b).logits
    for i in range(4):
        one = {k: v[i : i + 1] for k, v in b.items()}
        if i == 1:  # the padded clip alone, without its padding
            n = int(b["audio_mask"][1].sum())
            one["audio"], one["audio_mask"] = one["audio"][:, :n], one["audio_mask"][:, :n]
        torch.testing.assert_close(m(one).logits, full[i : i + 1], atol=1e-5, rtol=1e-4)


def test_single_audio_complementary_and_vision_main():
    cfg = dataclasses.replace(tiny_cfg("mope"), complementary=["audio"], audio=TINY_W2V)
    m = build(cfg).train()
    b = mustard_batch()
    b["image"] = torch.randn(4, 3, 32, 32)
    assert m.comp_is_blackbox and m.comp_dim == 16
    out = m(b)
    assert out.routing is not None
    out.logits.sum().backward()
    assert all(p.grad is not None for p in m.parameters() if p.requires_grad)
    assert not any(p.requires_grad for p in m.comp_encoder.parameters())


@pytest.mark.parametrize(
    "kw, field",
    [
        (dict(complementary=["text"]), "complementary"),  # the main modality
        (dict(complementary=["audio", "audio"]), "complementary"),
        (dict(complementary=["smell"]), "complementary"),
        (dict(complementary=["audio"], audio=None), "complementary"),
        (dict(complementary=["video"], video=TINY_BERT), "video.kind"),
        (dict(complementary=["audio"], audio=TINY_VIT), "audio.kind"),
    ],
)
def test_bad_modality_config_is_named(kw, field):
    base = dict(method="mope", vision=TINY_VIT, text=TINY_BERT, main="text", audio=TINY_W2V, video=TINY_VIT)
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        FusionConfig(**{**base, **kw})


def test_fine_tuning_several_complementary_encoders_is_refused():
    with pytest.raises(ValueError, match="frozen black boxes.*sequential_fuse"):
        build(mustard_cfg("sequential_fuse"))


def test_batch_without_the_modality_is_named():
    m = build(mustard_cfg())
    b = mustard_batch()
    del b["frames"]
    with pytest.raises(KeyError, match="no 'frames' field for the video encoder.*frames=8"):
        m(b)
