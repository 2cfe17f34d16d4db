"""TimmSwinAdapter: identity, batch independence (and the reference layout leak), padded bias/mask, token counts,
gradients, carry semantics. Tiny timm Swins built locally (pretrained=False); mope-reference §1.4, §1.7, §8."""

from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models.swin_transformer import window_partition, window_reverse
from torch import nn

from mope.backbones.timm_swin import TimmSwinAdapter

TOL = 1e-5
# name -> create_model kwargs. "w7": 14x14 grid, stage 0 has 4 windows and one shifted block; stage 1 is 7x7 (= window,
# no shift); stages 2/3 clamp the window to the 4x4 / 2x2 grids. "w4pad": 14 and 7 are not multiples of 4 (timm pads),
# shifted blocks in stages 0 and 1. "dyn": strict_img_size=False, timm builds the shift mask per forward.
CONFIGS = {
    "w7": {"img_size": 56, "window_size": 7},
    "w4pad": {"img_size": 56, "window_size": 4},
    "dyn": {"img_size": 56, "window_size": 4, "strict_img_size": False},
}


def make_swin(seed: int = 0, **kw) -> nn.Module:
    torch.manual_seed(seed)
    args = {
        "pretrained": False,
        "img_size": 56,
        "embed_dim": 16,
        "depths": (2, 2, 2, 2),
        "num_heads": (1, 2, 2, 2),
        "window_size": 7,
        "num_classes": 0,
        "drop_path_rate": 0.0,
    }
    args.update(kw)
    m = timm.create_model("swin_tiny_patch4_window7_224", **args)
    with torch.no_grad():  # timm inits the bias tables at std 0.02; make them matter so bias bugs show
        for n, p in m.named_parameters():
            if "relative_position_bias_table" in n:
                p.normal_(0.0, 0.5)
    return m.eval()


def images(b: int, seed: int = 1, size: int = 56) -> torch.Tensor:
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


class InstancePrompter(nn.Module):
    """Prompts = tanh(Linear(x0)) (instance-conditioned, like MoPE's dynamic/mapped prompts), every block."""

    def __init__(self, dims: list[int], P: int = 3, seed: int = 0, blocks: set[int] | None = None):
        super().__init__()
        torch.manual_seed(seed)
        self.P, self.blocks = P, blocks
        self.lin = nn.ModuleDict({str(d): nn.Linear(d, P * d) for d in sorted(set(dims))})

    def __call__(self, i: int, x0: torch.Tensor):
        if self.blocks is not None and i not in self.blocks:
            return None
        d = x0.shape[1]
        return 3 * torch.tanh(self.lin[str(d)](10 * x0)).view(x0.shape[0], self.P, d)  # strongly instance-dependent


class ParamPrompter(nn.Module):
    """One trainable (P, C) prompt per block (VPT-deep), optionally only for some blocks."""

    def __init__(self, dims: list[int], P: int = 3, blocks: set[int] | None = None, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.blocks = blocks
        self.prompts = nn.ParameterList([nn.Parameter(torch.randn(P, d)) for d in dims])

    def __call__(self, i: int, x0: torch.Tensor):
        if self.blocks is not None and i not in self.blocks:
            return None
        return self.prompts[i].unsqueeze(0).expand(x0.shape[0], -1, -1)


# ----------------------------------------------------------------------------------------------- 1. identity


@pytest.mark.parametrize("cfg", list(CONFIGS))
def test_identity_without_prompter(cfg):
    m = make_swin(**CONFIGS[cfg])
    a = TimmSwinAdapter(m)
    x = images(3)
    with torch.no_grad():
        ref = m.forward_head(m.forward_features(x), pre_logits=True)
        out = a(x)
        out_none = a(x, lambda i, x0: None)  # a prompter that never prompts is also the identity
    assert out.shape == (3, m.num_features)
    torch.testing.assert_close(out, ref, atol=TOL, rtol=0)
    torch.testing.assert_close(out_none, ref, atol=TOL, rtol=0)


def test_identity_dynamic_size_other_input():
    m = make_swin(**CONFIGS["dyn"])  # strict_img_size=False: any input size, shift mask built for the padded grid
    a = TimmSwinAdapter(m)
    x = images(2, size=72)  # 18x18 grid: padded to 20x20 in stage 0
    with torch.no_grad():
        torch.testing.assert_close(a(x), m.forward_head(m.forward_features(x), pre_logits=True), atol=TOL, rtol=0)
        assert a(x, ParamPrompter(a.layout.block_dims)).shape == (2, m.num_features)


def naive_reference_block(blk, x, P, H, W, layout):
    """Literal port of songrise/MoPE PromptedSwinTransformerBlock.forward + PromptedWindowAttention.forward on timm's
    modules: every prompt copy goes through qkv, bias/mask zero-padded with torch.cat, unfused softmax, mean over
    copies."""
    attn = blk.attn
    B, _, C = x.shape
    shortcut = x
    x = blk.norm1(x)
    prompt, x = x[:, :P], x[:, P:].reshape(B, H, W, C)
    (wh, ww), (sh, sw) = blk.window_size, blk.shift_size
    if sh:
        x = torch.roll(x, shifts=(-sh, -sw), dims=(1, 2))
    xw = window_partition(x, (wh, ww)).reshape(-1, wh * ww, C)
    nW = xw.shape[0] // B
    if layout == "reference":
        pr = prompt.unsqueeze(0).expand(nW, -1, -1, -1).reshape(-1, P, C)
    else:
        pr = prompt.unsqueeze(1).expand(-1, nW, -1, -1).reshape(-1, P, C)
    xw = torch.cat([pr, xw], dim=1)
    B_, N, _ = xw.shape
    nH = attn.num_heads
    q, k, v = attn.qkv(xw).reshape(B_, N, 3, nH, -1).permute(2, 0, 3, 1, 4)
    a = (q * attn.scale) @ k.transpose(-2, -1)
    A = wh * ww
    rel = attn._get_rel_pos_bias()[0]
    rel = torch.cat([torch.zeros(nH, P, A), rel], dim=1)
    rel = torch.cat([torch.zeros(nH, A + P, P), rel], dim=-1)
    a = a + rel.unsqueeze(0)
    mask = blk.attn_mask if blk.attn_mask is not None else torch.zeros(nW, A, A)
    mask = torch.cat([torch.zeros(nW, P, A), mask], dim=1)
    mask = torch.cat([torch.zeros(nW, A + P, P), mask], dim=-1)
    a = (a.view(B_ // nW, nW, nH, N, N) + mask.unsqueeze(1).unsqueeze(0)).view(-1, nH, N, N).softmax(-1)
    o = attn.proj((a @ v).transpose(1, 2).reshape(B_, N, -1))
    po, o = o[:, :P], o[:, P:]
    if layout == "reference":
        po = po.reshape(-1, B, P, C).mean(0)
    else:
        po = po.reshape(B, -1, P, C).mean(1)
    x = window_reverse(o.reshape(-1, wh, ww, C), (wh, ww), H, W)
    if sh:
        x = torch.roll(x, shifts=(sh, sw), dims=(1, 2))
    x = shortcut + torch.cat([po, x.reshape(B, H * W, C)], dim=1)
    return x + blk.mlp(blk.norm2(x))


@pytest.mark.parametrize("layout", ["correct", "reference"])
@pytest.mark.parametrize("block", [0, 1])  # 1 is shifted
def test_prompted_block_matches_literal_reference_port(layout, block):
    m = make_swin()
    a = TimmSwinAdapter(m, window_prompt_layout=layout)
    blk = m.layers[0].blocks[block]
    B, P, H, W, C = 3, 4, 14, 14, 16
    g = torch.Generator().manual_seed(3)
    x = torch.randn(B, P + H * W, C, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(
            a._block(blk, x, P, H, W), naive_reference_block(blk, x, P, H, W, layout), atol=TOL, rtol=0
        )


# ----------------------------------------------------------------------------------------------- 2. batch independence


def _run_all(a, x, pr):
    """(pooled output, all stage outputs concatenated along tokens) per sample."""
    _, _, stages = a.forward_tokens(x, pr)
    return a(x, pr), torch.cat([s.flatten(1) for s in stages], dim=1)


@pytest.fixture(scope="module")
def batch_runs():
    """For each layout: sample i in a batch of 16, alone (B=1), in the batch with sample j != i replaced, and first of
    a smaller (last) batch of 5. Prompts depend on the instance through x0."""
    m = make_swin(**CONFIGS["w4pad"])  # nW = 16 at stage 0 and 4 at stage 1: two stages where the bug bites
    x = images(16)
    # reference layout: window w of image b carries the prompts of instance (b*nW + w) % B, and instance b's averaged
    # prompt output comes from copies w*B + b (batch-major: image (w*B + b) // nW). With nW = B = 16 at stage 0, window
    # w of every image carries instance w's prompts, so sample j=4's prompts sit in window 4 of sample i=5.
    i, j = 5, 4
    x2 = x.clone()
    x2[j] = images(1, seed=99)[0]
    runs = {}
    with torch.no_grad():
        for layout in ("correct", "reference"):
            a = TimmSwinAdapter(m, window_prompt_layout=layout)
            pr = InstancePrompter(a.layout.block_dims, P=6)
            full, alone, swapped, small = (_run_all(a, xx, pr) for xx in (x, x[i : i + 1], x2, x[i : i + 5]))
            runs[layout] = {
                "full": [t[i] for t in full],
                "alone": [t[0] for t in alone],
                "swapped": [t[i] for t in swapped],
                "small": [t[0] for t in small],
            }
    return runs


def test_batch_independence_correct_layout(batch_runs):
    r = batch_runs["correct"]
    for other in ("alone", "swapped", "small"):
        for got, want in zip(r[other], r["full"]):
            torch.testing.assert_close(got, want, atol=TOL, rtol=0)


def test_reference_layout_leaks_across_samples(batch_runs):
    r, c = batch_runs["reference"], batch_runs["correct"]
    for got, want in zip(r["alone"], c["alone"]):
        torch.testing.assert_close(got, want, atol=TOL, rtol=0)  # B=1: the bug is invisible
    for other in ("alone", "swapped", "small"):  # batch composition changes sample i's output (~1e-2 vs <1e-5)
        pooled, tokens = ((g - w).abs().max() for g, w in zip(r[other], r["full"]))
        assert pooled > 1e-3 and tokens > 1e-3, (other, pooled, tokens)


def test_reference_layout_harmless_for_instance_independent_prompts():
    """VPT's case: identical prompts for all samples, the misaligned copy is invisible (§1.7.5)."""
    m = make_swin()
    pr = ParamPrompter(TimmSwinAdapter(m).layout.block_dims)
    x = images(6)
    with torch.no_grad():
        out_c = TimmSwinAdapter(m, window_prompt_layout="correct")(x, pr)
        out_r = TimmSwinAdapter(m, window_prompt_layout="reference")(x, pr)
    torch.testing.assert_close(out_c, out_r, atol=TOL, rtol=0)


# ----------------------------------------------------------------------------------------------- 3. bias / mask


@pytest.mark.parametrize("cfg", ["w7", "w4pad"])
def test_prompts_get_zero_position_bias_and_no_shift_mask(cfg):
    m = make_swin(**CONFIGS[cfg])
    a = TimmSwinAdapter(m)
    P = 5
    shifted_seen = 0
    for idx in range(a.layout.num_blocks):
        blk, H, W = a._block_and_resolution(idx)
        bias = a.attn_bias(idx, P)
        A = blk.window_size[0] * blk.window_size[1]
        nH = blk.attn.num_heads
        nW = math.ceil(H / blk.window_size[0]) * math.ceil(W / blk.window_size[1])
        assert bias.shape == (nW, nH, P + A, P + A)
        assert torch.count_nonzero(bias[:, :, :P, :]) == 0 and torch.count_nonzero(bias[:, :, :, :P]) == 0
        expected = blk.attn._get_rel_pos_bias().expand(nW, -1, -1, -1)
        if blk.attn_mask is not None:
            shifted_seen += 1
            assert (blk.attn_mask == -100).any()
            expected = expected + blk.attn_mask.unsqueeze(1)
        torch.testing.assert_close(bias[:, :, P:, P:], expected, atol=0, rtol=0)
    assert shifted_seen >= 1


def test_bias_cache_follows_table_updates():
    m = make_swin()
    a = TimmSwinAdapter(m)
    b0 = a.attn_bias(0, 3).clone()
    with torch.no_grad():
        m.layers[0].blocks[0].attn.relative_position_bias_table.add_(1.0)
    b1 = a.attn_bias(0, 3)
    torch.testing.assert_close(b1[:, :, 3:, 3:], b0[:, :, 3:, 3:] + 1.0)
    assert torch.count_nonzero(b1[:, :, :3]) == 0


# ----------------------------------------------------------------------------------------------- 4. token counts


def test_token_counts_per_window_and_per_stage(monkeypatch):
    m = make_swin(**CONFIGS["w7"])
    a = TimmSwinAdapter(m)
    P = 13
    seen: list[int] = []
    sdpa = F.scaled_dot_product_attention

    def recording_sdpa(q, k, v, **kw):
        seen.append(q.shape[-2])
        return sdpa(q, k, v, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording_sdpa)
    pr = ParamPrompter(a.layout.block_dims, P=P)
    with torch.no_grad():
        tokens, n_prompts, stages = a.forward_tokens(images(2), pr)
    assert seen == a.attention_lengths(P) == [49 + P] * 4 + [16 + P] * 2 + [4 + P] * 2  # 62 per window at l=6
    assert n_prompts == P
    assert [s.shape[1] for s in stages] == [P + 14 * 14, P + 7 * 7, P + 4 * 4, P + 2 * 2]
    assert [s.shape[2] for s in stages] == a.layout.stage_dims
    assert tokens.shape == (2, P + 4, m.num_features)


def test_prompt_count_may_change_between_blocks():
    m = make_swin()
    a = TimmSwinAdapter(m)
    dims = a.layout.block_dims

    def pr(i, x0):
        n = {0: 2, 3: 5}.get(i)
        return None if n is None else torch.ones(x0.shape[0], n, dims[i])

    with torch.no_grad():
        _, n_prompts, stages = a.forward_tokens(images(2), pr)
    assert n_prompts == 5
    assert [s.shape[1] for s in stages] == [2 + 196, 5 + 49, 5 + 16, 5 + 4]


def test_swin_b_224_shapes_and_layout():
    m = timm.create_model("swin_base_patch4_window7_224", pretrained=False, num_classes=0).eval()
    a = TimmSwinAdapter(m)
    lay = a.layout
    assert lay.block_dims == [128] * 2 + [256] * 2 + [512] * 18 + [1024] * 2
    assert lay.block_stage == [0] * 2 + [1] * 2 + [2] * 18 + [3] * 2
    assert lay.stage_first_blocks == frozenset({0, 2, 4, 22}) and lay.out_dim == 1024
    assert lay.prompt_init_scale == pytest.approx(0.1846, abs=1e-4)
    assert a.attention_lengths(13) == [62] * 24
    assert all(b.shift_size == (0, 0) and b.window_size == (7, 7) for b in m.layers[3].blocks)  # 7x7: never shifts
    # reference schedule: prompts at block 0 (shallow) and every routed block; stage-first blocks 2, 4, 22 run on
    # carried ones
    pr = ParamPrompter(lay.block_dims, P=13, blocks=set(range(24)) - (lay.stage_first_blocks - {0}))
    with torch.no_grad():
        tokens, n_prompts, stages = a.forward_tokens(images(1, size=224), pr)
    assert n_prompts == 13
    assert [tuple(s.shape[1:]) for s in stages] == [
        (13 + 3136, 128),
        (13 + 784, 256),
        (13 + 196, 512),
        (13 + 49, 1024),
    ]
    assert tokens.shape == (1, 62, 1024)


# ----------------------------------------------------------------------------------------------- 5. gradients


def test_gradients_reach_prompts_only():
    m = make_swin(**CONFIGS["w4pad"])
    a = TimmSwinAdapter(m)
    a.freeze()
    pr = ParamPrompter(a.layout.block_dims)
    a(images(2), pr).square().sum().backward()
    for i, p in enumerate(pr.prompts):
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient for block {i}'s prompt"
    assert all(p.grad is None for p in m.parameters())


def test_unfrozen_bias_table_gets_gradient():
    m = make_swin()
    a = TimmSwinAdapter(m)
    a(images(2), ParamPrompter(a.layout.block_dims)).sum().backward()
    assert m.layers[0].blocks[1].attn.relative_position_bias_table.grad.abs().sum() > 0


def test_train_mode_drop_path_and_grad_checkpointing():
    m = make_swin(drop_path_rate=0.5)
    a = TimmSwinAdapter(m)
    pr = ParamPrompter(a.layout.block_dims)
    x = images(4)
    with torch.no_grad():
        e1, e2 = a(x, pr), a(x, pr)
        torch.testing.assert_close(e1, e2, atol=0, rtol=0)
        a.train()
        torch.manual_seed(0)
        t1 = a(x, pr)
        torch.manual_seed(1)
        t2 = a(x, pr)
        assert (t1 - t2).abs().max() > 1e-4  # stochastic depth active in train mode
    a.eval()
    m.set_grad_checkpointing(True)
    out = a(x, pr)
    torch.testing.assert_close(out, e1, atol=TOL, rtol=0)
    out.sum().backward()
    assert pr.prompts[5].grad.abs().sum() > 0


# ----------------------------------------------------------------------------------------------- 6. carry


def test_block0_prompts_are_carried_through_blocks_and_merging():
    m = make_swin()
    a = TimmSwinAdapter(m, pool_includes_prompts=False)
    x = images(2)
    pr_a = ParamPrompter(a.layout.block_dims, blocks={0}, seed=1)
    pr_b = ParamPrompter(a.layout.block_dims, blocks={0}, seed=2)
    with torch.no_grad():
        base = a(x)
        tok_a, n_a, stages_a = a.forward_tokens(x, pr_a)
        tok_b, _, _ = a.forward_tokens(x, pr_b)
        out_a = a(x, pr_a)
    assert n_a == 3 and [s.shape[1] for s in stages_a] == [3 + 196, 3 + 49, 3 + 16, 3 + 4]
    assert (tok_a[:, :3] - tok_b[:, :3]).abs().max() > 1e-3  # final prompt tokens still depend on block-0 prompts
    assert (tok_a[:, 3:] - tok_b[:, 3:]).abs().max() > 1e-3
    assert (out_a - base).abs().max() > 1e-3  # patches-only pooling: influence went through attention
    # pooled output = mean over the normed tokens, with or without the prompts
    torch.testing.assert_close(out_a, tok_a[:, 3:].mean(1), atol=TOL, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(TimmSwinAdapter(m)(x, pr_a), tok_a.mean(1), atol=TOL, rtol=0)


def test_last_stage_prompts_matter_only_through_carry():
    """A prompter active only at stage 0 changes the stage-3 attention (carried prompts attend with the patches)."""
    m = make_swin()
    a = TimmSwinAdapter(m, pool_includes_prompts=False)
    x = images(2)
    with torch.no_grad():
        _, _, st_a = a.forward_tokens(x, ParamPrompter(a.layout.block_dims, blocks={0}, seed=1))
        _, _, st_b = a.forward_tokens(x, ParamPrompter(a.layout.block_dims, blocks={0}, seed=2))
    # stage-3 input prompt tokens come from merging the stage-2 prompt outputs: they differ, and are present
    assert st_a[3].shape[1] == 3 + 4 and (st_a[3][:, :3] - st_b[3][:, :3]).abs().max() > 1e-3


def test_patch_merging_tiles_prompts_as_2x2_copies():
    """Prompts through PatchMerging = reference `cat((p, p, p, p), -1)` + the frozen norm/reduction = timm's merge of a
    2x2 patch of identical tokens; patches are merged by timm's own module."""
    m = make_swin()
    a = TimmSwinAdapter(m)
    ds = m.layers[1].downsample
    B, P, H, W, C = 2, 3, 7, 7, 16  # odd grid: timm pads
    x = torch.randn(B, P + H * W, C, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        y, H2, W2 = a._merge(ds, x, P, H, W)
        p = x[:, :P]
        literal = ds.reduction(ds.norm(torch.cat((p, p, p, p), dim=-1)))
        as_patch = ds(p.reshape(B * P, 1, 1, C).expand(-1, 2, 2, -1)).reshape(B, P, -1)
        patches = ds(x[:, P:].reshape(B, H, W, C)).reshape(B, H2 * W2, -1)
    assert (H2, W2) == (4, 4) and y.shape == (B, P + 16, 32)
    torch.testing.assert_close(y[:, :P], literal, atol=TOL, rtol=0)
    torch.testing.assert_close(y[:, :P], as_patch, atol=TOL, rtol=0)
    torch.testing.assert_close(y[:, P:], patches, atol=0, rtol=0)


def test_rejects_bad_prompt_shape_and_cls_pool():
    m = make_swin()
    with pytest.raises(ValueError):
        TimmSwinAdapter(m, x0_pool="cls")
    with pytest.raises(ValueError):
        TimmSwinAdapter(m, window_prompt_layout="buggy")
    a = TimmSwinAdapter(m)
    with pytest.raises(ValueError):
        a(images(2), lambda i, x0: torch.zeros(2, 3, 7))
