"""Router, importance loss, routing modes and config validation (no backbone needed)."""

import math
import warnings

import pytest
import torch

from mope.backbones.base import EncoderLayout
from mope.config import ConfigError, FusionConfig, MoPEConfig
from mope.prompts import PromptGenerator, importance_cv2, importance_loss, routing_entropy

LAYOUT = EncoderLayout(
    block_dims=[16, 16, 32, 32],
    block_stage=[0, 0, 1, 1],
    out_dim=32,
    prompt_init_scale=0.1,
    stage_first_blocks=frozenset({0, 2}),
)


def make_gen(route_block0=True, **kw):
    cfg = MoPEConfig(num_experts=kw.pop("k", 4), prompt_len=3, router_noise=kw.pop("router_noise", "off"), **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PromptGenerator(cfg, LAYOUT, comp_dim=12, route_block0_default=route_block0)


def run_pass(gen, B=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    psi = torch.randn(B, 12, generator=g)
    p = gen.bind(psi, B)
    outs = {}
    for b, d in enumerate(LAYOUT.block_dims):
        x0 = torch.randn(B, d, generator=g)
        outs[b] = p(b, x0)
    return p, outs


def test_importance_loss_values():
    B, k = 8, 4
    uniform = torch.full((1, B, k), 1.0 / k)
    assert importance_cv2(uniform).item() == pytest.approx(0.0, abs=1e-7)
    onehot = torch.zeros(1, B, k)
    onehot[..., 2] = 1
    assert importance_cv2(onehot).item() == pytest.approx(k, rel=1e-6)  # unbiased std: CV^2 = k
    assert importance_loss(onehot, 0.1).item() == pytest.approx(k, rel=1e-6)


def test_importance_loss_zero_value_and_grad_below_threshold():
    r = torch.tensor([[0.26, 0.24, 0.25, 0.25]] * 6).unsqueeze(0).requires_grad_(True)
    assert importance_cv2(r).item() < 0.1
    loss = importance_loss(r, 0.1)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.count_nonzero(r.grad) == 0
    r2 = torch.tensor([[0.9, 0.05, 0.03, 0.02]] * 6).unsqueeze(0).requires_grad_(True)
    importance_loss(r2, 0.1).backward()
    assert torch.count_nonzero(r2.grad) > 0


def test_importance_loss_is_mean_over_blocks_including_zeros():
    B, k = 4, 4
    onehot = torch.zeros(B, k)
    onehot[:, 0] = 1
    gates = torch.stack([onehot, torch.full((B, k), 0.25)])
    assert importance_loss(gates, 0.1).item() == pytest.approx(k / 2, rel=1e-6)


def test_routing_rows_sum_to_one_and_prompt_shapes():
    gen = make_gen()
    p, outs = run_pass(gen)
    stats = p.routing_stats()
    assert stats.scores.shape == (4, 5, 4)
    torch.testing.assert_close(stats.scores.sum(-1), torch.ones(4, 5))
    for b, d in enumerate(LAYOUT.block_dims):
        assert outs[b].shape == (5, 3 + 3 + 1, d)  # [static l, dynamic l, mapped 1]
    assert 0 <= stats.entropy.item() <= math.log2(4) + 1e-6
    assert stats.importance_last.shape == (4,)


def test_swin_default_block0_unrouted_uses_shallow_then_carries():
    gen = make_gen(route_block0=False)
    gen.eval()  # no dropout: the shallow prompt is then identical for every sample
    assert gen.routed_blocks == [1, 3]
    p, outs = run_pass(gen)
    assert outs[0] is not None and outs[0].shape == (5, 7, 16)
    torch.testing.assert_close(outs[0][0], outs[0][1])  # shallow prompt: instance-independent
    assert outs[2] is None  # stage-first block of stage 1 runs on the carried prompts


@pytest.mark.parametrize("routing,expect_grad", [("dense", True), ("top1_scaled", True), ("top1_hard", False)])
def test_top1_router_gradient(routing, expect_grad):
    gen = make_gen(routing=routing)
    p, outs = run_pass(gen)
    loss = sum(o.pow(2).sum() for o in outs.values())
    loss.backward()
    g = gen.blocks[1].w_x.weight.grad
    has = g is not None and torch.count_nonzero(g) > 0
    assert has == expect_grad
    if routing != "dense":
        nnz = (p.routing_stats().gates > 0).sum(-1)
        assert torch.all(nnz == 1)


def test_router_noise_modes():
    torch.manual_seed(0)
    x0 = torch.randn(3, 16)
    psi = torch.randn(3, 12)

    def scores(gen):
        p = gen.bind(psi, 3)
        p(1, x0)
        return p.routing_stats().scores[0]

    vmoe = make_gen(router_noise="vmoe")
    vmoe.eval()
    torch.testing.assert_close(scores(vmoe), scores(vmoe))  # off at eval
    vmoe.train()
    assert not torch.equal(scores(vmoe), scores(vmoe))
    ref = make_gen(router_noise="reference")
    ref.eval()
    assert not torch.equal(scores(ref), scores(ref))  # the reference adds noise at inference too


def test_learned_keys_are_parameters_and_frozen_keys_buffers():
    frozen = make_gen()
    learned = make_gen(routing_keys="learned")
    assert "blocks.0.keys" in dict(frozen.named_buffers())
    assert "blocks.0.keys" in dict(learned.named_parameters())
    k = frozen.blocks[0].keys  # (d_r=10, k=4): orthonormal columns for k <= d_r
    torch.testing.assert_close(k.T @ k, torch.eye(4), atol=1e-5, rtol=0)


def test_warns_when_keys_cannot_be_orthogonal():
    with pytest.warns(UserWarning, match="cannot be orthogonal"):
        PromptGenerator(MoPEConfig(num_experts=16), LAYOUT, comp_dim=12, route_block0_default=True)


def test_mapped_prompt_shared_within_stage_and_dropout_mask_once_per_stage():
    gen = make_gen(use_static=False, use_dynamic=False)
    gen.train()
    p, outs = run_pass(gen)
    torch.testing.assert_close(outs[0], outs[1])  # same stage: the same mapped prompt (and dropout mask)
    assert outs[2].shape[-1] == 32


def test_entropy_bounds():
    u = torch.full((1, 2, 8), 1 / 8)
    assert routing_entropy(u).mean().item() == pytest.approx(3.0)


@pytest.mark.parametrize(
    "kw,field",
    [
        ({"routing": "sparse"}, "mope.routing"),
        ({"router_noise": "gauss"}, "mope.router_noise"),
        ({"window_prompt_layout": "wrong"}, "mope.window_prompt_layout"),
        ({"tau": 0}, "mope.tau"),
        ({"x0_pool": "max"}, "mope.x0_pool"),
        ({"prompt_dropout_targets": "experts"}, "mope.prompt_dropout_targets"),
    ],
)
def test_config_errors_name_field_and_allowed_values(kw, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        MoPEConfig(**kw)


def test_fusion_config_roundtrip_and_unknown_field():
    cfg = FusionConfig(method="vanilla_prompt", num_classes=3, mope=MoPEConfig(num_experts=4, routing="top1_scaled"))
    again = FusionConfig.from_dict(cfg.to_dict())
    assert again == cfg
    d = cfg.to_dict()
    d["mope"]["num_expert"] = 3
    with pytest.raises(ConfigError, match="num_expert"):
        FusionConfig.from_dict(d)
    with pytest.raises(ConfigError, match="model.method"):
        FusionConfig(method="moe")


def test_prompt_counts():
    m = MoPEConfig(num_experts=4, prompt_len=6)
    assert m.num_prompts == 13 and m.tunable_prompts_per_layer == 31


def test_shallow_prompt_dropout_mask_per_sample():
    gen = make_gen(route_block0=False)
    gen.train()
    _, outs = run_pass(gen, B=8)
    assert not torch.equal(outs[0][0], outs[0][1])


def test_unrouted_blocks_do_not_need_x0():
    gen = make_gen(route_block0=False)
    p = gen.bind(torch.randn(2, 12), 2)
    assert [p.needs_x0(b) for b in range(4)] == [False, True, False, True]
    static_only = make_gen(use_dynamic=False, use_mapped=False)
    assert not any(static_only.bind(None, 2).needs_x0(b) for b in range(4))
