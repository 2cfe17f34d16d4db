"""HFWav2Vec2Adapter (prompt-tuned frozen wav2vec2) and build_wav2vec2 (offline loading).

Tiny Wav2Vec2Config models (hidden 32, 2 layers, conv stack 2 x 16 channels: 20-sample receptive field, hop 10), both
encoder variants: post-LN ``Wav2Vec2Encoder`` with a GroupNorm conv stack (= wav2vec2-base) and
``do_stable_layer_norm=True`` with a LayerNorm conv stack (= wav2vec2-large-lv60).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import pytest
import torch
from torch import nn

from mope.backbones import DEFAULT_ROUTE_BLOCK0, DEFAULT_X0_POOL, create_encoder
from mope.backbones.hf_wav2vec2 import HFWav2Vec2Adapter, build_wav2vec2, normalize_waveform
from mope.config import EncoderConfig, MoPEConfig
from mope.prompts import PromptGenerator

TINY = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "conv_dim": (16, 16),
    "conv_kernel": (10, 3),
    "conv_stride": (5, 2),
    "num_conv_pos_embeddings": 16,
    "num_conv_pos_embedding_groups": 2,
}
STABLE = {"do_stable_layer_norm": True, "feat_extract_norm": "layer"}
VARIANTS = {"base": {}, "stable": STABLE}
TOL = 1e-5
LENGTHS = (400, 250, 333, 123)


def tiny_w2v(variant: str = "base", attn: str = "sdpa", seed: int = 0, **over):
    torch.manual_seed(seed)
    cfg = {**TINY, **VARIANTS[variant], "attn_implementation": attn, **over}
    return build_wav2vec2("wav2vec2-base", config_overrides=cfg).eval()


def padded_audio(lengths=LENGTHS, seed: int = 1, pad_to: int | None = None, pad_value: float = 0.0):
    g = torch.Generator().manual_seed(seed)
    n = pad_to or max(lengths)
    audio = torch.full((len(lengths), n), pad_value)
    mask = torch.zeros(len(lengths), n, dtype=torch.long)
    for b, L in enumerate(lengths):
        audio[b, :L] = torch.randn(L, generator=g)
        mask[b, :L] = 1
    return {"audio": audio, "audio_mask": mask}


def upstream_masked_mean(model, batch):
    """The masked mean of ``Wav2Vec2Model(audio, attention_mask).last_hidden_state`` (transformers' frame mask)."""
    with torch.no_grad():
        h = model(batch["audio"], attention_mask=batch.get("audio_mask")).last_hidden_state
    if batch.get("audio_mask") is None:
        return h.mean(1)
    fm = model._get_feature_vector_attention_mask(h.shape[1], batch["audio_mask"]).unsqueeze(-1).float()
    return (h * fm).sum(1) / fm.sum(1)


def frames_of(n: int) -> int:
    """Tiny conv stack (10/5, 3/2), computed by hand."""
    return ((n - 10) // 5 + 1 - 3) // 2 + 1


class FixedPrompter:
    def __init__(self, prompts):
        self.prompts = prompts
        self.x0s = []

    def __call__(self, i, x0):
        self.x0s.append(x0)
        return self.prompts[i]


class LinearPrompter(nn.Module):
    """Per-instance prompts p_i = base_i + x0 W_i (depends on each sample's x0)."""

    def __init__(self, layers: int = 2, P: int = 3, H: int = 32):
        super().__init__()
        self.base = nn.Parameter(torch.empty(layers, P, H).uniform_(-0.3, 0.3))
        self.w = nn.Parameter(torch.randn(layers, H, P * H) * 0.05)

    def __call__(self, i, x0):
        return self.base[i] + (x0 @ self.w[i]).view(x0.shape[0], *self.base.shape[1:])


def rand_prompts(B, P, H, seed):
    return torch.empty(B, P, H).uniform_(-0.3, 0.3, generator=torch.Generator().manual_seed(seed))


def manual_forward(adapter, batch, prompts):
    """Independent layer loop: prompts first, hand-built additive mask (prompts and valid frames attend)."""
    model = adapter.model
    with torch.no_grad():
        lengths = batch["audio_mask"].sum(-1)
        h, fm = adapter._frontend(batch["audio"], lengths)
        P = 0
        for i, layer in enumerate(model.encoder.layers):
            if prompts[i] is not None:
                h = torch.cat([prompts[i].expand(h.shape[0], -1, -1), h[:, P:]], dim=1)
                P = prompts[i].shape[1]
            m = torch.cat([torch.ones(h.shape[0], P, dtype=torch.bool), fm], dim=1)
            additive = (~m)[:, None, None, :].float() * -1e9
            out = layer(h, additive)
            h = out[0] if isinstance(out, tuple) else out
        h = h[:, P:]
        if adapter.stable_layer_norm:
            h = model.encoder.layer_norm(h)
        w = fm.unsqueeze(-1).float()
        return (h * w).sum(1) / w.sum(1)


# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("variant", ["base", "stable"])
def test_identity_without_prompter_matches_upstream(variant, attn):
    model = tiny_w2v(variant, attn)
    batch = padded_audio()
    full = {"audio": batch["audio"][:, :300], "audio_mask": torch.ones(4, 300, dtype=torch.long)}  # no padding
    with torch.no_grad():
        # same attention mask as transformers: identical (base: with transformers' GroupNorm statistics)
        up = HFWav2Vec2Adapter(model, group_norm="upstream")
        out = up(batch)
        assert out.shape == (4, 32)
        torch.testing.assert_close(out, upstream_masked_mean(model, batch), atol=TOL, rtol=0)
        adapter = HFWav2Vec2Adapter(model)  # default group_norm="valid"
        for b in (full, {"audio": full["audio"]}, full["audio"]):  # mask of ones, no mask, plain tensor
            ref = upstream_masked_mean(model, b if isinstance(b, dict) else {"audio": b})
            torch.testing.assert_close(adapter(b), ref, atol=TOL, rtol=0)
        # default: every padded sample equals the upstream model run on that sample alone, unpadded
        got = adapter(batch)
        for b, L in enumerate(LENGTHS):
            alone = model(batch["audio"][b : b + 1, :L]).last_hidden_state.mean(1)[0]
            torch.testing.assert_close(got[b], alone, atol=TOL, rtol=0)
        if variant == "stable":  # LayerNorm conv stack: nothing batch-dependent, both modes equal transformers
            torch.testing.assert_close(got, out, atol=TOL, rtol=0)
        else:  # GroupNorm over the padded row (transformers) is batch-dependent; "valid" is not
            assert (got[1:] - out[1:]).abs().max() > 1e-3
            torch.testing.assert_close(got[0], out[0], atol=TOL, rtol=0)  # the longest sample has no padding


@pytest.mark.parametrize("variant", ["base", "stable"])
def test_padding_independence_and_padding_values_ignored(variant):
    adapter = HFWav2Vec2Adapter(tiny_w2v(variant))
    torch.manual_seed(0)
    prompter = LinearPrompter()
    batch = padded_audio(pad_to=512)
    noisy = padded_audio(pad_to=512, pad_value=3.0)  # non-zero padding must not matter either
    with torch.no_grad():
        for pr in (None, prompter):
            a, b = adapter(batch, pr), adapter(noisy, pr)
            torch.testing.assert_close(a, b, atol=TOL, rtol=0)
            for i, L in enumerate(LENGTHS):
                alone = adapter(batch["audio"][i : i + 1, :L], pr)[0]
                torch.testing.assert_close(a[i], alone, atol=TOL, rtol=0)


@pytest.mark.parametrize("x0_pool", ["mean_patches", "mean_all_tokens"])
@pytest.mark.parametrize("variant", ["base", "stable"])
def test_batch_independence_with_prompts(variant, x0_pool):
    adapter = HFWav2Vec2Adapter(tiny_w2v(variant), x0_pool=x0_pool)
    torch.manual_seed(0)
    prompter = LinearPrompter()
    lengths = (180, 420, 95, 300, 420, 260)
    batch = padded_audio(lengths, pad_to=450, seed=3)
    with torch.no_grad():
        full = adapter(batch, prompter)
        base = adapter(batch)
        for i in (0, 2, 4):
            sub = {k: v[i : i + 1, : lengths[i]] for k, v in batch.items()}
            torch.testing.assert_close(adapter(sub, prompter)[0], full[i], atol=TOL, rtol=0)
    assert (full - base).abs().max() > 1e-3


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("variant", ["base", "stable"])
def test_matches_manual_layer_loop_with_changing_and_carried_prompts(variant, attn):
    adapter = HFWav2Vec2Adapter(tiny_w2v(variant, attn, num_hidden_layers=3))
    batch = padded_audio()
    cases = [
        [rand_prompts(4, 2, 32, 1), rand_prompts(4, 3, 32, 2), rand_prompts(4, 1, 32, 3)],  # deep, P changes
        [rand_prompts(4, 4, 32, 4), None, None],  # shallow: carried through all layers
        [None, rand_prompts(1, 2, 32, 5), None],  # first prompts at layer 1, shared (1, P, H)
    ]
    with torch.no_grad():
        base = adapter(batch)
        for prompts in cases:
            out = adapter(batch, FixedPrompter(prompts))
            torch.testing.assert_close(out, manual_forward(adapter, batch, prompts), atol=TOL, rtol=0)
            assert (out - base).abs().max() > 1e-3


def test_prompt_slots_masks_and_x0():
    """Layer inputs are [prompts, frames]; frames are the prompt-free frontend output; prompts are never masked."""
    model = tiny_w2v("base", "eager")
    adapter = HFWav2Vec2Adapter(model)
    batch = padded_audio()
    p0, p1 = rand_prompts(4, 2, 32, 7), rand_prompts(4, 3, 32, 8)
    seen = []
    hooks = [
        layer.register_forward_pre_hook(lambda mod, args: seen.append((args[0].clone(), args[1])))
        for layer in model.encoder.layers
    ]
    try:
        with torch.no_grad():
            pr = FixedPrompter([p0, p1])
            adapter(batch, pr)
            front, fm = adapter._frontend(batch["audio"], batch["audio_mask"].sum(-1))
    finally:
        for hk in hooks:
            hk.remove()
    N = frames_of(400)
    assert front.shape == (4, N, 32)
    assert fm.sum(1).tolist() == [frames_of(L) for L in LENGTHS]
    (x0_in, m0), (x1_in, m1) = seen
    assert x0_in.shape == (4, 2 + N, 32) and x1_in.shape == (4, 3 + N, 32)
    torch.testing.assert_close(x0_in[:, :2], p0)
    torch.testing.assert_close(x0_in[:, 2:], front)  # positional conv on the real frames only, before prompts
    torch.testing.assert_close(x1_in[:, :3], p1)  # replaced, P changed 2 -> 3
    for m, P in ((m0, 2), (m1, 3)):  # eager: additive (B, 1, Q, K) mask; 0 = attend
        attend = m[:, 0, 0] == 0
        assert attend[:, :P].all() and torch.equal(attend[:, P:], fm)
    # x0 (mean_patches): mean over valid frames, prompts and padding excluded
    w = fm.unsqueeze(-1).float()
    torch.testing.assert_close(pr.x0s[0], (front * w).sum(1) / w.sum(1), atol=TOL, rtol=0)
    with pytest.raises(ValueError, match="prompts must be"):
        adapter(batch, FixedPrompter([torch.zeros(4, 2, 16), None]))


def test_x0_pool_choices_and_errors():
    model = tiny_w2v()
    with pytest.raises(ValueError, match=r"no \[CLS\] token"):
        HFWav2Vec2Adapter(model, x0_pool="cls")
    with pytest.raises(ValueError, match="x0_pool="):
        HFWav2Vec2Adapter(model, x0_pool="first")
    with pytest.raises(ValueError, match="group_norm="):
        HFWav2Vec2Adapter(model, group_norm="batch")
    batch = padded_audio()
    p = [rand_prompts(4, 2, 32, 1), None]
    with torch.no_grad():
        a, b = FixedPrompter(p), FixedPrompter(p)
        HFWav2Vec2Adapter(model, x0_pool="mean_patches")(batch, a)
        HFWav2Vec2Adapter(model, x0_pool="mean_all_tokens")(batch, b)
    torch.testing.assert_close(a.x0s[0], b.x0s[0])  # no prompts yet at layer 0
    assert (a.x0s[1] - b.x0s[1]).abs().max() > 1e-4  # mean_all_tokens includes the carried prompts at layer 1


def test_layout_and_attention_lengths():
    adapter = HFWav2Vec2Adapter(tiny_w2v())
    lay = adapter.layout
    assert lay.block_dims == [32, 32] and lay.block_stage == [0, 0] and lay.out_dim == 32
    assert lay.prompt_init_scale == 0.3 and lay.stage_first_blocks == frozenset({0}) and lay.num_blocks == 2
    assert adapter.attention_lengths(4) == [frames_of(160_000) + 4] * 2 == [15_999 + 4] * 2
    assert HFWav2Vec2Adapter(tiny_w2v(), nominal_samples=400).attention_lengths(0) == [frames_of(400)] * 2
    base_conv = build_wav2vec2("wav2vec2-base", config_overrides={"num_hidden_layers": 1})  # base conv stack
    assert HFWav2Vec2Adapter(base_conv).attention_lengths(0) == [499]  # 10 s -> 499 frames (20 ms hop)


def test_frozen_prompts_get_gradients_model_stays_eval():
    model = tiny_w2v()
    adapter = HFWav2Vec2Adapter(model)
    adapter.freeze()
    assert model.feature_extractor._requires_grad is False
    torch.manual_seed(0)
    prompter = LinearPrompter()
    batch = padded_audio()
    adapter.train()
    assert adapter.training and not model.training and not any(m.training for m in model.modules())
    out = adapter(batch, prompter)
    out.pow(2).sum().backward()
    assert prompter.base.grad[0].abs().sum() > 0 and prompter.base.grad[1].abs().sum() > 0
    assert prompter.w.grad.abs().sum() > 0
    assert all(not p.requires_grad and p.grad is None for p in model.parameters())
    with torch.no_grad():  # eval policy: no dropout / layerdrop / SpecAugment although adapter.train()
        torch.testing.assert_close(adapter(batch, prompter), adapter(batch, prompter), atol=0, rtol=0)
    # fine-tuning baselines: upstream dropout follows the adapter's mode
    ft = HFWav2Vec2Adapter(tiny_w2v(), upstream_train_mode=True).train()
    assert ft.model.training
    with torch.no_grad():
        assert (ft(batch) - ft(batch)).abs().max() > 0
    ft.eval()
    assert not ft.model.training


def test_unfrozen_model_gets_gradients_everywhere_used():
    model = tiny_w2v(hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, feat_proj_dropout=0.0)
    adapter = HFWav2Vec2Adapter(model)
    out = adapter(padded_audio())
    out.sum().backward()
    assert model.feature_extractor.conv_layers[0].conv.weight.grad is not None
    assert model.encoder.pos_conv_embed.conv.bias.grad is not None
    assert model.encoder.layers[1].feed_forward.output_dense.weight.grad is not None


def test_normalize_waveform_matches_feature_extractor():
    from transformers import Wav2Vec2FeatureExtractor

    batch = padded_audio()
    ours = normalize_waveform(batch["audio"] * 3 + 1, batch["audio_mask"].sum(-1))
    ref = Wav2Vec2FeatureExtractor.zero_mean_unit_var_norm(
        [x.numpy() for x in batch["audio"] * 3 + 1], attention_mask=batch["audio_mask"].numpy(), padding_value=0.0
    )
    torch.testing.assert_close(ours, torch.from_numpy(np.stack(ref)).float(), atol=1e-4, rtol=0)
    model = tiny_w2v()
    with torch.no_grad():
        raw = {"audio": batch["audio"] * 3 + 1, "audio_mask": batch["audio_mask"]}
        a = HFWav2Vec2Adapter(model, normalize_waveform=True)(raw)
        b = HFWav2Vec2Adapter(model)({"audio": ours, "audio_mask": batch["audio_mask"]})
    torch.testing.assert_close(a, b, atol=TOL, rtol=0)


# ---------------------------------------------------------------------------------------------------------------------
def test_builder_refuses_unknown_hub_name():
    with pytest.raises(ValueError) as e:
        build_wav2vec2("facebook/wav2vec2-large-960h")
    msg = str(e.value)
    assert "encoder.name" in msg and "nothing is downloaded" in msg
    assert "huggingface-cli download facebook/wav2vec2-base-960h --local-dir DIR" in msg and "encoder.name=DIR" in msg


def test_builder_random_base_names():
    for name in ("wav2vec2-base", "wav2vec2-base-960h", "facebook/wav2vec2-base-960h"):
        m = build_wav2vec2(name, config_overrides=TINY)
        assert m.config.hidden_size == 32 and len(m.encoder.layers) == 2
        assert m.config.feat_extract_norm == "group" and not m.config.do_stable_layer_norm


@pytest.mark.parametrize("variant", ["base", "stable"])
def test_local_directory_roundtrip(tmp_path, variant):
    model = tiny_w2v(variant, seed=5)
    model.save_pretrained(tmp_path / "w2v")
    again = build_wav2vec2(str(tmp_path / "w2v")).eval()
    assert again.config.do_stable_layer_norm == (variant == "stable")
    batch = padded_audio()
    with torch.no_grad():
        torch.testing.assert_close(HFWav2Vec2Adapter(again)(batch), HFWav2Vec2Adapter(model)(batch), atol=0, rtol=0)
    (tmp_path / "cfg_only").mkdir()
    model.config.save_pretrained(tmp_path / "cfg_only")
    with pytest.raises(FileNotFoundError, match="encoder.weights"):
        build_wav2vec2(str(tmp_path / "cfg_only"))


def test_ctc_checkpoint_and_weights_file(tmp_path):
    from safetensors.torch import save_file
    from transformers import Wav2Vec2Config, Wav2Vec2ForCTC

    torch.manual_seed(7)
    ctc = Wav2Vec2ForCTC(Wav2Vec2Config(**TINY, vocab_size=12)).eval()
    sd = ctc.state_dict()
    assert any(k.startswith("lm_head.") for k in sd) and any(k.startswith("wav2vec2.") for k in sd)
    batch = padded_audio()
    with torch.no_grad():
        ref = HFWav2Vec2Adapter(ctc.wav2vec2)(batch)
    # a save_pretrained directory of the ForCTC model
    ctc.save_pretrained(tmp_path / "ctc")
    with torch.no_grad():
        got = HFWav2Vec2Adapter(build_wav2vec2(str(tmp_path / "ctc")))(batch)
    torch.testing.assert_close(got, ref, atol=0, rtol=0)
    # weights= a ForCTC-style safetensors file (wav2vec2. prefix + lm_head.*), old weight_g / weight_v names, torch bin
    old = {}
    for k, v in sd.items():
        k = k.replace("parametrizations.weight.original0", "weight_g").replace(
            "parametrizations.weight.original1", "weight_v"
        )
        old[k] = v.contiguous()
    save_file(old, str(tmp_path / "ctc_old.safetensors"))
    torch.save(sd, tmp_path / "ctc.bin")
    for w in (tmp_path / "ctc_old.safetensors", tmp_path / "ctc.bin"):
        m = build_wav2vec2("wav2vec2-base", config_overrides=TINY, weights=str(w))
        with torch.no_grad():
            torch.testing.assert_close(HFWav2Vec2Adapter(m)(batch), ref, atol=0, rtol=0)
    # strict: a missing or an unknown key is named
    bad = dict(old)
    bad.pop("wav2vec2.encoder.layers.1.final_layer_norm.bias")
    bad["wav2vec2.encoder.extra.weight"] = torch.zeros(2)
    save_file(bad, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match=r"layers\.1\.final_layer_norm\.bias.*encoder\.extra\.weight"):
        build_wav2vec2("wav2vec2-base", config_overrides=TINY, weights=str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match=r"shape mismatches .*intermediate_dense\.weight \(64, 32\) vs \(48, 32\)"):
        build_wav2vec2("wav2vec2-base", config_overrides={**TINY, "intermediate_size": 48}, weights=str(w))


# ---------------------------------------------------------------------------------------------------------------------
def test_registry_create_encoder_with_prompt_generator():
    cfg = EncoderConfig(kind="hf_wav2vec2", name="wav2vec2-base", kwargs=TINY)
    assert DEFAULT_X0_POOL["hf_wav2vec2"] == "mean_patches" and DEFAULT_ROUTE_BLOCK0["hf_wav2vec2"] is True
    torch.manual_seed(0)
    enc = create_encoder(cfg, x0_pool=DEFAULT_X0_POOL["hf_wav2vec2"])
    assert isinstance(enc, HFWav2Vec2Adapter) and enc.x0_pool == "mean_patches" and enc.group_norm == "valid"
    enc.freeze()
    gen = PromptGenerator(
        MoPEConfig(num_experts=4, prompt_len=2, router_noise="off", d_cross=4, d_inter=2),
        enc.layout,
        12,
        route_block0_default=DEFAULT_ROUTE_BLOCK0["hf_wav2vec2"],
    )
    assert gen.routed_blocks == [0, 1]
    enc.train()
    gen.train()
    batch = padded_audio()
    psi = torch.randn(4, 12)
    p = gen.bind(psi, 4)
    out = enc(batch, p)
    assert out.shape == (4, 32) and p.routing_stats().scores.shape == (2, 4, 4)
    out.sum().backward()
    assert gen.blocks[0].experts.grad.abs().sum() > 0 and gen.blocks[1].static.grad.abs().sum() > 0
    assert all(q.grad is None for q in enc.model.parameters())
    with torch.no_grad():
        assert (enc(batch, gen.eval().bind(psi, 4)) - enc(batch)).abs().max() > 1e-3
    # adapter options travel in encoder.kwargs without reaching Wav2Vec2Config
    up = create_encoder(
        EncoderConfig(kind="hf_wav2vec2", name="wav2vec2-base", kwargs={**TINY, "group_norm": "upstream"})
    )
    assert up.group_norm == "upstream" and not hasattr(up.model.config, "group_norm")
    with pytest.raises(ValueError, match="encoder.kind"):
        EncoderConfig(kind="hf_wav2vec3")


def test_gradient_checkpointing_same_output_and_grads_in_upstream_train_mode():
    zero = {"hidden_dropout": 0.0, "attention_dropout": 0.0, "activation_dropout": 0.0, "feat_proj_dropout": 0.0}
    model = tiny_w2v(**zero, layerdrop=0.0)
    adapter = HFWav2Vec2Adapter(model, upstream_train_mode=True).train()  # unfrozen: fine-tuning baseline
    torch.manual_seed(0)
    prompter = LinearPrompter()
    results = []
    for ckpt in (False, True):
        if ckpt:
            if hasattr(model, "activation_checkpointing_enable"):  # transformers v5 name
                model.activation_checkpointing_enable({"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            assert all(layer.gradient_checkpointing for layer in model.encoder.layers)
        prompter.zero_grad()
        model.zero_grad()
        out = adapter(padded_audio(), prompter)
        out.sum().backward()
        conv_grad = model.feature_extractor.conv_layers[0].conv.weight.grad.clone()
        results.append((out.detach(), prompter.base.grad.clone(), conv_grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=TOL, rtol=0)
