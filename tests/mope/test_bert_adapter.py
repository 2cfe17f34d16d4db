"""HFBertAdapter (prompt-tuned frozen BERT), loading helpers, and black-box text encoders.

Tiny BertConfig models (hidden 32, 2 layers, 2 heads, vocab 100); one test loads the offline MiniLM package.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mope.backbones.blackbox import BagOfWordsEncoder, FrozenTextEncoder
from mope.backbones.hf_bert import HFBertAdapter, build_bert, load_tokenizer, resolve_text_model

TINY = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 37,
    "vocab_size": 100,
    "max_position_embeddings": 64,
}
IMPLS = ["eager", "sdpa"]
TOL = 1e-5


def tiny_bert(attn: str = "sdpa", seed: int = 0, **over):
    torch.manual_seed(seed)
    return build_bert("bert_base", config_overrides={**TINY, "attn_implementation": attn, **over}).eval()


def padded_batch(lengths=(9, 5, 7, 3), seed: int = 1, pad_to: int | None = None):
    """[CLS]=2 ... [SEP]=3 then padding id 0; token_type_ids: second half of each real span is segment 1."""
    g = torch.Generator().manual_seed(seed)
    n = pad_to or max(lengths)
    ids = torch.zeros(len(lengths), n, dtype=torch.long)
    mask = torch.zeros(len(lengths), n, dtype=torch.long)
    tt = torch.zeros(len(lengths), n, dtype=torch.long)
    for b, L in enumerate(lengths):
        ids[b, :L] = torch.randint(5, 100, (L,), generator=g)
        ids[b, 0], ids[b, L - 1] = 2, 3
        mask[b, :L] = 1
        tt[b, L // 2 : L] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": tt}


class FixedPrompter:
    """Returns prompts[i] (B|1, P_i, H) or None for block i; records the x0 it was given."""

    def __init__(self, prompts):
        self.prompts = prompts
        self.x0s = []

    def __call__(self, i, x0):
        self.x0s.append(x0)
        return self.prompts[i]


class LinearPrompter(nn.Module):
    """Per-instance prompts p_i = base_i + x0 W_i (depends on each sample's x0)."""

    def __init__(self, layers: int, P: int, H: int):
        super().__init__()
        self.base = nn.Parameter(torch.empty(layers, P, H).uniform_(-0.3, 0.3))
        self.w = nn.Parameter(torch.randn(layers, H, P * H) * 0.05)

    def __call__(self, i, x0):
        return self.base[i] + (x0 @ self.w[i]).view(x0.shape[0], *self.base.shape[1:])


def rand_prompts(B, P, H, seed):
    return torch.empty(B, P, H).uniform_(-0.3, 0.3, generator=torch.Generator().manual_seed(seed))


def manual_forward(model, batch, prompts):
    """Independent reference: prompts after [CLS], float additive mask built by hand, layer by layer."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    h = model.embeddings(input_ids=ids, token_type_ids=batch["token_type_ids"])
    P = 0
    for i, layer in enumerate(model.encoder.layer):
        if prompts[i] is not None:
            h = torch.cat([h[:, :1], prompts[i], h[:, 1 + P :]], dim=1)
            P = prompts[i].shape[1]
        m = torch.cat([mask[:, :1], torch.ones(ids.shape[0], P, dtype=mask.dtype), mask[:, 1:]], dim=1)
        additive = (1.0 - m[:, None, None, :].float()) * -1e9
        out = layer(h, additive)
        h = out[0] if isinstance(out, tuple) else out
    return torch.cat([h[:, :1], h[:, 1 + P :]], dim=1)


# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("attn", IMPLS)
@pytest.mark.parametrize("pool", ["cls", "pooler", "mean"])
def test_identity_without_prompter(attn, pool):
    model = tiny_bert(attn)
    adapter = HFBertAdapter(model, pool=pool).eval()
    batch = padded_batch()
    with torch.no_grad():
        ref = model(**batch)
        out = adapter(batch)
    m = batch["attention_mask"].unsqueeze(-1).float()
    expected = {
        "cls": ref.last_hidden_state[:, 0],
        "pooler": ref.pooler_output,
        "mean": (ref.last_hidden_state * m).sum(1) / m.sum(1),
    }[pool]
    assert out.shape == (4, 32)
    torch.testing.assert_close(out, expected, atol=TOL, rtol=0)


def test_identity_plain_tensor_input_and_layout():
    model = tiny_bert()
    adapter = HFBertAdapter(model).eval()
    ids = padded_batch(lengths=(6, 6))["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(adapter(ids), model(ids).last_hidden_state[:, 0], atol=TOL, rtol=0)
    lay = adapter.layout
    assert lay.block_dims == [32, 32] and lay.block_stage == [0, 0] and lay.out_dim == 32
    assert lay.prompt_init_scale == 0.3 and lay.stage_first_blocks == frozenset({0})
    assert adapter.attention_lengths(4) == [64 + 4] * 2
    assert HFBertAdapter(model, max_len=20).attention_lengths(0) == [20, 20]


@pytest.mark.parametrize("attn", IMPLS)
def test_prompts_change_output_and_are_stripped(attn):
    adapter = HFBertAdapter(tiny_bert(attn)).eval()
    batch = padded_batch()
    pr = FixedPrompter([rand_prompts(4, 3, 32, 5), rand_prompts(4, 3, 32, 6)])
    with torch.no_grad():
        base = adapter(batch)
        out = adapter(batch, pr)
        tokens, mask = adapter.forward_tokens(batch, pr)
    assert out.shape == (4, 32) and tokens.shape == (4, 9, 32) and mask is batch["attention_mask"]
    assert (out - base).abs().max() > 1e-3
    assert len(pr.x0s) == 4 and pr.x0s[0].shape == (4, 32)  # 2 forwards x 2 layers


def test_prompt_slots_sit_right_after_cls():
    """Capture each layer's input and mask inside the adapter: [CLS], prompts, tokens; prompt slots unmasked."""
    model = tiny_bert("eager")
    adapter = HFBertAdapter(model).eval()
    batch = padded_batch()
    p0, p1 = rand_prompts(4, 2, 32, 7), rand_prompts(4, 3, 32, 8)
    seen = []
    hooks = [
        layer.register_forward_pre_hook(lambda mod, args: seen.append((args[0].clone(), args[1])))
        for layer in model.encoder.layer
    ]
    try:
        with torch.no_grad():
            adapter(batch, FixedPrompter([p0, p1]))
            emb = model.embeddings(input_ids=batch["input_ids"], token_type_ids=batch["token_type_ids"])
    finally:
        for hk in hooks:
            hk.remove()
    (x0_in, m0), (x1_in, m1) = seen
    assert x0_in.shape == (4, 1 + 2 + 8, 32) and x1_in.shape == (4, 1 + 3 + 8, 32)
    torch.testing.assert_close(x0_in[:, 0], emb[:, 0])
    torch.testing.assert_close(x0_in[:, 1:3], p0)
    torch.testing.assert_close(x0_in[:, 3:], emb[:, 1:])
    torch.testing.assert_close(x1_in[:, 1:4], p1)  # replaced, P changed 2 -> 3
    for m, P in ((m0, 2), (m1, 3)):  # eager: additive (B, 1, Q|1, K) mask; 0 = attend
        attend = m[:, 0, 0] == 0
        pad = batch["attention_mask"].bool()
        assert attend[:, 1 : 1 + P].all() and attend[:, 0].all()
        assert torch.equal(attend[:, 1 + P :], pad[:, 1:])
    # the static helper itself
    h = torch.arange(4 * 5 * 32, dtype=torch.float).view(4, 5, 32)
    q = HFBertAdapter.insert_prompts(h, torch.zeros(1, 2, 32), num_current=1)
    assert q.shape == (4, 6, 32) and torch.equal(q[:, 0], h[:, 0]) and torch.equal(q[:, 3:], h[:, 2:])
    assert torch.equal(HFBertAdapter.strip_prompts(q, 2), torch.cat([h[:, :1], h[:, 2:]], 1))


@pytest.mark.parametrize("attn", IMPLS)
def test_matches_manual_computation_with_changing_and_carried_prompts(attn):
    model = tiny_bert(attn, num_hidden_layers=3)
    adapter = HFBertAdapter(model).eval()
    batch = padded_batch()
    cases = [
        [rand_prompts(4, 2, 32, 1), rand_prompts(4, 3, 32, 2), rand_prompts(4, 1, 32, 3)],  # deep, P changes
        [rand_prompts(4, 4, 32, 4), None, None],  # shallow: given at layer 0 only, carried
        [None, rand_prompts(1, 2, 32, 5), None],  # first prompts at layer 1, shared (1, P, H)
    ]
    with torch.no_grad():
        base = adapter.forward_tokens(batch)[0]
        for prompts in cases:
            out, _ = adapter.forward_tokens(batch, FixedPrompter(prompts))
            ref = manual_forward(model, batch, [None if p is None else p.expand(4, -1, -1) for p in prompts])
            real = batch["attention_mask"].bool()
            torch.testing.assert_close(out[real], ref[real], atol=TOL, rtol=0)
            assert (out[:, 0] - base[:, 0]).abs().max() > 1e-3


def test_carried_prompts_reach_later_layers():
    """Shallow prompts (layer 0 only) stay in the sequence: the layer-1 input still holds their outputs."""
    model = tiny_bert("eager")
    adapter = HFBertAdapter(model, x0_pool="mean_all_tokens").eval()
    batch = padded_batch()
    pa, pb = rand_prompts(4, 4, 32, 11), rand_prompts(4, 4, 32, 12)
    with torch.no_grad():
        ra, rb = FixedPrompter([pa, None]), FixedPrompter([pb, None])
        oa, ob = adapter(batch, ra), adapter(batch, rb)
        # x0 of layer 1 = masked mean over [CLS, prompts, real tokens] of the layer-1 input: differs if carried
        assert (ra.x0s[1] - rb.x0s[1]).abs().max() > 1e-3
        # and the final output equals a full-encoder run on the prompt-extended sequence
        ref = manual_forward(model, batch, [pa, None])
    torch.testing.assert_close(oa, ref[:, 0], atol=TOL, rtol=0)
    assert (oa - ob).abs().max() > 1e-3


@pytest.mark.parametrize("attn", IMPLS)
@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_padding_stays_masked_with_prompts(attn, pool):
    torch.manual_seed(0)
    adapter = HFBertAdapter(tiny_bert(attn), pool=pool, x0_pool="mean_patches").eval()
    prompter = LinearPrompter(2, 3, 32)
    batch = padded_batch()
    other = {k: v.clone() for k, v in batch.items()}
    other["input_ids"][batch["attention_mask"] == 0] = 77  # change every padded token id
    with torch.no_grad():
        a, b = adapter(batch, prompter), adapter(other, prompter)
    torch.testing.assert_close(a, b, atol=TOL, rtol=0)


@pytest.mark.parametrize("x0_pool", ["cls", "mean_all_tokens", "mean_patches"])
def test_batch_independence(x0_pool):
    torch.manual_seed(0)
    adapter = HFBertAdapter(tiny_bert("sdpa"), pool="mean", x0_pool=x0_pool).eval()
    prompter = LinearPrompter(2, 4, 32)
    lengths = (5, 12, 3, 9, 7, 12, 4, 10)
    batch = padded_batch(lengths, pad_to=14)
    with torch.no_grad():
        full = adapter(batch, prompter)
        for b in (0, 2, 5):
            L = lengths[b]
            alone = {k: v[b : b + 1, :L] for k, v in batch.items()}
            torch.testing.assert_close(adapter(alone, prompter)[0], full[b], atol=TOL, rtol=0)


def test_gradients_reach_prompts_only_and_dropout_follows_training():
    model = tiny_bert("sdpa")
    adapter = HFBertAdapter(model)
    adapter.freeze()
    prompter = LinearPrompter(2, 3, 32)
    batch = padded_batch()
    adapter.train()
    out = adapter(batch, prompter)
    out.pow(2).sum().backward()
    assert prompter.base.grad is not None and (prompter.base.grad[0].abs().sum() > 0)
    assert prompter.base.grad[1].abs().sum() > 0 and prompter.w.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())
    with torch.no_grad():  # dropout (0.1) active in train mode although frozen, off in eval
        assert (adapter(batch, prompter) - adapter(batch, prompter)).abs().max() > 0
        adapter.eval()
        torch.testing.assert_close(adapter(batch, prompter), adapter(batch, prompter), atol=0, rtol=0)


def test_gradient_checkpointing_gives_same_output_and_grads():
    model = tiny_bert("eager", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    adapter = HFBertAdapter(model)
    adapter.freeze()
    torch.manual_seed(3)
    prompter = LinearPrompter(2, 3, 32)
    batch = padded_batch()
    adapter.train()
    results = []
    for ckpt in (False, True):
        if ckpt:
            if hasattr(model, "activation_checkpointing_enable"):  # transformers v5 name
                model.activation_checkpointing_enable({"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            assert all(layer.gradient_checkpointing for layer in model.encoder.layer)
        prompter.zero_grad()
        out = adapter(batch, prompter)
        out.sum().backward()
        results.append((out.detach(), prompter.base.grad.clone()))
    torch.testing.assert_close(results[0][0], results[1][0], atol=TOL, rtol=0)
    torch.testing.assert_close(results[0][1], results[1][1], atol=TOL, rtol=0)


def test_prompter_shape_errors():
    adapter = HFBertAdapter(tiny_bert()).eval()
    with pytest.raises(ValueError, match="prompts must be"):
        adapter(padded_batch(), FixedPrompter([torch.zeros(4, 2, 16), None]))
    with pytest.raises(ValueError, match="pool="):
        HFBertAdapter(tiny_bert(), pool="max")


# ---------------------------------------------------------------------------------------------------------------------
def test_build_bert_helpers(tmp_path):
    assert resolve_text_model("bert-base-uncased") is None and resolve_text_model(None) is None
    m = tiny_bert()
    assert m.config.hidden_size == 32 and len(m.encoder.layer) == 2 and m.pooler is not None
    # a local dir round trip, then a checkpoint without pooler weights -> built without pooler
    m.save_pretrained(tmp_path / "full")
    again = build_bert(str(tmp_path / "full")).eval()
    ids = padded_batch()["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(again(ids).pooler_output, m(ids).pooler_output)
    from safetensors.torch import save_file

    nopool = tmp_path / "nopool"
    m.config.save_pretrained(nopool)
    save_file(
        {k: v.contiguous() for k, v in m.state_dict().items() if not k.startswith("pooler.")},
        str(nopool / "model.safetensors"),
    )
    np_model = build_bert(str(nopool))
    assert np_model.pooler is None
    with pytest.raises(ValueError, match="pooler"):
        HFBertAdapter(np_model, pool="pooler")
    # weights= on top of an architecture name (bert. prefixes stripped)
    save_file({"bert." + k: v.contiguous() for k, v in m.state_dict().items()}, str(tmp_path / "w.safetensors"))
    w = build_bert("bert_base", config_overrides=TINY, weights=str(tmp_path / "w.safetensors")).eval()
    with torch.no_grad():
        torch.testing.assert_close(w(ids).last_hidden_state, m(ids).last_hidden_state)
    with pytest.raises(FileNotFoundError, match="hf download"):
        build_bert("some-org/not-here")
    with pytest.raises(OSError, match="hf download"):
        load_tokenizer("some-org/not-here")


def test_minilm_offline_mean_pool_and_tokenizer():
    model = build_bert("minilm").eval()
    tok = load_tokenizer("minilm")
    adapter = HFBertAdapter(model, pool="mean").eval()
    assert adapter.layout.num_blocks == 6 and adapter.layout.out_dim == 384
    texts = [
        "A man is playing a guitar on stage.",
        "A musician performs a song with his guitar.",
        "The stock market fell sharply on Monday.",
    ]
    enc = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        v = adapter(dict(enc))
        ref = model(**enc).last_hidden_state
    assert v.shape == (3, 384)
    m = enc["attention_mask"].unsqueeze(-1).float()
    torch.testing.assert_close(v, (ref * m).sum(1) / m.sum(1), atol=TOL, rtol=0)
    v = F.normalize(v, dim=-1)
    assert (v[0] @ v[1]) > (v[0] @ v[2]) + 0.2 and (v[0] @ v[1]) > (v[1] @ v[2]) + 0.2


# ---------------------------------------------------------------------------------------------------------------------
def test_frozen_blackbox_encoder_no_grad_and_fingerprint():
    enc = FrozenTextEncoder(HFBertAdapter(tiny_bert(seed=4), pool="cls"))
    enc.train()
    assert not enc.encoder.training and enc.out_dim == 32
    batch = padded_batch()
    out = enc(batch)
    assert out.shape == (4, 32) and not out.requires_grad
    assert all(not p.requires_grad for p in enc.parameters())
    torch.testing.assert_close(out, enc(batch), atol=0, rtol=0)  # eval: deterministic even in train()
    enc2 = FrozenTextEncoder(HFBertAdapter(tiny_bert(seed=4), pool="cls"))
    fp = enc.weights_fingerprint()
    assert fp == enc2.weights_fingerprint() and len(fp) == 64
    assert enc.cache_key() == enc2.cache_key()
    assert enc.cache_key() != FrozenTextEncoder(HFBertAdapter(tiny_bert(seed=4), pool="mean")).cache_key()
    with torch.no_grad():
        enc2.encoder.model.encoder.layer[1].output.dense.weight[0, 0] += 1e-3
    assert enc2.weights_fingerprint() != fp
    # a raw HF model + pool function
    raw = FrozenTextEncoder(tiny_bert(seed=4), pool=lambda o, _: o.last_hidden_state[:, 0])
    assert raw.out_dim == 32 and raw.weights_fingerprint() != fp  # same tensors, other names ("model." prefix)
    torch.testing.assert_close(raw(batch), out, atol=TOL, rtol=0)


def test_bag_of_words_encoder():
    model = tiny_bert()
    batch = padded_batch()
    bow = BagOfWordsEncoder.from_bert(model)
    assert bow.out_dim == 32 and bow.proj is None
    e = model.embeddings.word_embeddings(batch["input_ids"]).detach()
    m = batch["attention_mask"].unsqueeze(-1).float()
    torch.testing.assert_close(bow(batch), (e * m).sum(1) / m.sum(1))
    ref_style = BagOfWordsEncoder.from_bert(model, mean_over="all_tokens")
    torch.testing.assert_close(ref_style(batch), e.mean(1))
    proj = BagOfWordsEncoder.from_bert(HFBertAdapter(model), proj_dim=16)
    y = proj(batch)
    assert y.shape == (4, 16) and proj.out_dim == 16
    y.sum().backward()
    assert proj.proj.weight.grad is not None and proj.embeddings.weight.grad is None
    frozen = FrozenTextEncoder(BagOfWordsEncoder.from_bert(model))
    assert frozen.out_dim == 32 and frozen(batch).shape == (4, 32)
