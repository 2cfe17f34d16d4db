"""Prompt experts, static prompts, the mapper and the multimodal router: the trainable side of MoPE.

Paper: "MoPE: Parameter-Efficient and Scalable Multimodal Fusion via Mixture of Prompt Experts" (arXiv 2403.10568).
Reference implementation: songrise/MoPE (`models/swin.py`, PromptedSwinTransformerBlock.forward_mm_moe). The maths
follow mope-reference.md §1.5 (router), §1.6 (prompts, mapper), §1.9 (importance loss), §1.10 (per-block
pseudocode); where paper and code differ the behaviour is chosen by :class:`~mope.config.MoPEConfig` (§8).

:class:`PromptGenerator` owns every trainable prompt tensor of one encoder. ``generator.bind(psi)`` returns a
:class:`PromptPass`, the per-forward :class:`~mope.backbones.base.BlockPrompter` that the encoder adapter calls before
each block; the pass records the routing scores of every routed block (Fig. 6 and 7 need them). The same class serves
MoPE ([P_s, P_d, P_m]), every Table-2 ablation, the vanilla prompts of the baselines ([P_s] or [P_s, P_m], length L)
and the complementary BERT's deep prompts (static only, l'=4, uniform ±0.3).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mope.backbones.base import EncoderLayout
from mope.config import MapperBN, MoPEConfig, PromptDropoutTargets, PromptInit, RouterNoise, Routing, RoutingKeys


class FrozenStatsBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d that always normalises with its running statistics (never updated).

    The reference's `train()` override keeps the mapper's BN in eval mode during training, so its running stats stay
    (0, 1) and it acts as a learnable affine map γ·x/√(1+eps)+β (mope-reference §1.8). `mapper_bn=frozen_stats`.
    """

    def forward(self, x: Tensor) -> Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)


class Mapper(nn.Module):
    """f_m: shared down-projection + BN + GELU, then one up-projection per embedding-width group (§1.6)."""

    def __init__(self, in_dim: int, bottleneck: int, group_dims: list[int], *, bn: MapperBN, up_gelu: bool):
        super().__init__()
        self.down = nn.Linear(in_dim, bottleneck)
        self.bn = FrozenStatsBatchNorm1d(bottleneck) if bn == MapperBN.FROZEN_STATS else nn.BatchNorm1d(bottleneck)
        self.up = nn.ModuleList(nn.Linear(bottleneck, d) for d in group_dims)
        self.up_gelu = up_gelu

    def hidden(self, psi: Tensor) -> Tensor:
        return F.gelu(self.bn(self.down(psi)))

    def project(self, h: Tensor, group: int) -> Tensor:
        y = self.up[group](h)
        return F.gelu(y) if self.up_gelu else y


def importance_cv2(gates: Tensor) -> Tensor:
    """Squared coefficient of variation of expert importance, per routed block.

    Args:
        gates: (n_blocks, B, k) routing weights used for the prompt mixture (after noise, softmax and top-1).
    Returns:
        (n_blocks,) CV² = (std_unbiased(Σ_b r) / mean(Σ_b r))². 0 for uniform routing, k when one expert takes all.
    """
    imp = gates.sum(dim=1)  # (n, k)
    k = imp.shape[-1]
    if k < 2:
        return imp.new_zeros(imp.shape[0])
    mean = imp.mean(dim=-1)
    std = imp.std(dim=-1, unbiased=True)
    return torch.where(mean > 0, (std / mean.clamp_min(torch.finfo(imp.dtype).tiny)) ** 2, torch.zeros_like(mean))


def importance_loss(gates: Tensor, threshold: float) -> Tensor:
    """L_imp (Eq. 5): per-block CV², zeroed (value and gradient) where CV² <= γ, averaged over the routed blocks.

    `torch.where` instead of a Python `if` on a device tensor: no host sync (the reference does 40 per step).
    """
    cv2 = importance_cv2(gates)
    return torch.where(cv2 > threshold, cv2, torch.zeros_like(cv2)).mean()


def routing_entropy(scores: Tensor) -> Tensor:
    """H(r) = -Σ r log2 r, per (block, sample). scores: (n, B, k) softmax scores (pre top-1)."""
    return -(scores * torch.log2(scores.clamp_min(1e-12))).sum(dim=-1)


@dataclass
class RoutingStats:
    """Routing statistics of one forward (tensors, detached; no host sync inside the forward)."""

    blocks: list[int]  # global block index of each routed block
    scores: Tensor  # (n, B, k) softmax scores before top-1 (Fig. 6 entropy is computed on these)
    gates: Tensor  # (n, B, k) weights actually used to mix experts

    @property
    def entropy(self) -> Tensor:
        """Mean routing entropy over batch and routed blocks (bits)."""
        return routing_entropy(self.scores).mean()

    @property
    def entropy_per_block(self) -> Tensor:
        return routing_entropy(self.scores).mean(dim=1)

    @property
    def importance_last(self) -> Tensor:
        """(k,) average routing score per expert in the last routed block over the batch (Fig. 7)."""
        return self.scores[-1].mean(dim=0)

    @property
    def top1_share_last(self) -> Tensor:
        """(k,) fraction of samples whose highest-scored expert is j, last routed block (Fig. 3 grouping)."""
        s = self.scores[-1]
        return F.one_hot(s.argmax(dim=-1), s.shape[-1]).float().mean(dim=0)


class BlockPrompts(nn.Module):
    """Trainable tensors of one prompted block: static prompt, experts, and its router (W_x, routing keys V)."""

    def __init__(self, cfg: MoPEConfig, dim: int, routed: bool):
        super().__init__()
        s, l, k = cfg.static_tokens, cfg.prompt_len, cfg.num_experts
        self.static = nn.Parameter(torch.zeros(s, dim)) if s > 0 else None
        self.routed = routed
        if routed:
            self.experts = nn.Parameter(torch.zeros(k, l, dim))
            self.w_x = nn.Linear(dim, cfg.d_inter) if cfg.d_inter > 0 else None
            keys = torch.empty(cfg.d_inter + cfg.d_cross, k)
            nn.init.orthogonal_(keys)
            if cfg.routing_keys == RoutingKeys.LEARNED:
                self.keys = nn.Parameter(keys)
            else:
                self.register_buffer("keys", keys)
        else:
            self.experts = None
            self.w_x = None


class PromptGenerator(nn.Module):
    """All prompt parameters of one encoder, sized from its :class:`EncoderLayout`.

    Args:
        cfg: the prompt configuration.
        layout: the encoder's block widths / stages.
        comp_dim: width of the complementary feature ψ (0 = no complementary input: no mapped prompt, no W_y).
        route_block0_default: the encoder's default for routing the first block of each stage
            (Swin: False, as the reference; ViT/BERT: True).
    """

    def __init__(self, cfg: MoPEConfig, layout: EncoderLayout, comp_dim: int, *, route_block0_default: bool):
        super().__init__()
        if cfg.use_mapped and comp_dim <= 0:
            raise ValueError("mope.use_mapped=true needs a complementary feature (comp_dim > 0)")
        if cfg.use_dynamic and cfg.d_cross > 0 and comp_dim <= 0:
            raise ValueError("mope.d_cross > 0 needs a complementary feature; set mope.d_cross=0 for unimodal routing")
        if cfg.use_dynamic and cfg.routing_keys == RoutingKeys.FROZEN_ORTHOGONAL:
            d_r = cfg.d_cross + cfg.d_inter
            if cfg.num_experts > d_r:
                warnings.warn(
                    f"mope.num_experts={cfg.num_experts} > d_cross+d_inter={d_r}: frozen routing keys cannot be "
                    "orthogonal (only their rows are), see mope-reference §1.3; consider mope.routing_keys=learned",
                    stacklevel=2,
                )
        self.cfg = cfg
        self.layout = layout
        self.comp_dim = comp_dim
        n = layout.num_blocks
        route_block0 = route_block0_default if cfg.route_block0 is None else cfg.route_block0
        if cfg.prompt_depth == "shallow":
            fresh = [0]
        else:
            fresh = [b for b in range(n) if route_block0 or b not in layout.stage_first_blocks or b == 0]
        # Block 0 gets a learned instance-independent shallow prompt when it is not routed (reference Swin).
        self.use_shallow = cfg.prompt_depth == "deep" and not route_block0 and cfg.num_prompts > 0
        self.fresh_blocks = [b for b in fresh if not (self.use_shallow and b == 0)]
        self.routed_blocks = self.fresh_blocks if cfg.use_dynamic else []
        self._slot = {b: i for i, b in enumerate(self.fresh_blocks)}
        self._routed_slot = {b: i for i, b in enumerate(self.routed_blocks)}
        self.blocks = nn.ModuleList(
            BlockPrompts(cfg, layout.block_dims[b], routed=cfg.use_dynamic) for b in self.fresh_blocks
        )
        self.shallow = nn.Parameter(torch.zeros(cfg.num_prompts, layout.block_dims[0])) if self.use_shallow else None
        nr = len(self.routed_blocks)
        self.w_y = nn.Linear(comp_dim, nr * cfg.d_cross) if (nr and cfg.d_cross > 0) else None  # all W_y in one GEMM
        # Mapper: one up-projection per stage (multi-width encoders) or per group of consecutive layers.
        if len(layout.stage_dims) > 1:
            group_of = list(layout.block_stage)
        else:
            g = min(cfg.mapper_up_groups, n)
            group_of = [b * g // n for b in range(n)]
        # Only groups that actually receive fresh prompts get an up-projection (shallow prompting: just block 0's).
        used = sorted({group_of[b] for b in self.fresh_blocks})
        self._group_of = {b: used.index(group_of[b]) for b in self.fresh_blocks}
        group_dims = [layout.block_dims[group_of.index(gr)] for gr in used]
        if cfg.use_mapped:
            bottleneck = cfg.mapper_bottleneck or max(1, comp_dim // 2)
            self.mapper = Mapper(comp_dim, bottleneck, group_dims, bn=cfg.mapper_bn, up_gelu=cfg.mapper_up_gelu)
        else:
            self.mapper = None
        self.dropout = nn.Dropout(cfg.prompt_dropout)
        self.reset_prompts()

    def reset_prompts(self) -> None:
        scale = self.layout.prompt_init_scale if self.cfg.prompt_init_scale is None else self.cfg.prompt_init_scale
        tensors = [self.shallow] + [t for blk in self.blocks for t in (blk.static, blk.experts)]
        for t in tensors:
            if t is None:
                continue
            if self.cfg.prompt_init == PromptInit.UNIFORM:
                nn.init.uniform_(t, -scale, scale)
            else:
                nn.init.trunc_normal_(t, std=1.0, a=-2.0, b=2.0)

    @property
    def num_routed(self) -> int:
        return len(self.routed_blocks)

    def bind(self, psi: Tensor | None, batch_size: int) -> PromptPass:
        return PromptPass(self, psi, batch_size)


@dataclass
class PromptPass:
    """Per-forward prompter (implements :class:`~mope.backbones.base.BlockPrompter`)."""

    gen: PromptGenerator
    psi: Tensor | None
    batch_size: int
    _q_cross: Tensor | None = None
    _hidden: Tensor | None = None
    _mapped: dict[int, Tensor] = field(default_factory=dict)
    _scores: list[Tensor] = field(default_factory=list)
    _gates: list[Tensor] = field(default_factory=list)

    def __post_init__(self) -> None:
        g = self.gen
        if self.psi is not None:
            if g.w_y is not None:
                self._q_cross = g.w_y(self.psi).view(self.psi.shape[0], g.num_routed, g.cfg.d_cross)
            if g.mapper is not None:
                self._hidden = g.mapper.hidden(self.psi)

    # -- parts -------------------------------------------------------------------------------------------------
    def _mapped_prompt(self, block_idx: int) -> Tensor:
        group = self.gen._group_of[block_idx]
        p = self._mapped.get(group)
        if p is None:  # once per group per forward: one dropout mask per stage, as the reference
            p = self.gen.dropout(self.gen.mapper.project(self._hidden, group)).unsqueeze(1)  # (B, 1, C)
            self._mapped[group] = p
        return p

    def _route(self, blk: BlockPrompts, block_idx: int, x0: Tensor) -> Tensor:
        cfg = self.gen.cfg
        parts = []
        if blk.w_x is not None:
            parts.append(blk.w_x(x0))
        if self._q_cross is not None:
            parts.append(self._q_cross[:, self.gen._routed_slot[block_idx]])
        q = torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]  # (B, d_inter + d_cross), code order [x ; ψ]
        logits = q @ blk.keys.to(q.dtype) / cfg.tau
        if cfg.router_noise == RouterNoise.VMOE and self.gen.training:
            logits = logits + torch.randn_like(logits) / cfg.num_experts
        elif cfg.router_noise == RouterNoise.REFERENCE:
            logits = logits + torch.randn_like(logits) / 256.0
        scores = logits.softmax(dim=-1)
        if cfg.routing == Routing.DENSE:
            gates = scores
        else:
            onehot = F.one_hot(scores.argmax(dim=-1), scores.shape[-1]).to(scores.dtype)
            gates = scores * onehot if cfg.routing == Routing.TOP1_SCALED else onehot
        self._scores.append(scores)
        self._gates.append(gates)
        return gates

    # -- BlockPrompter -------------------------------------------------------------------------------------------
    def needs_x0(self, block_idx: int) -> bool:
        """x0 is read only by the W_x part of a routed block's router."""
        slot = self.gen._routed_slot.get(block_idx)
        return slot is not None and self.gen.blocks[self.gen._slot[block_idx]].w_x is not None

    def __call__(self, block_idx: int, x0: Tensor) -> Tensor | None:
        g, cfg = self.gen, self.gen.cfg
        B = x0.shape[0]
        if g.use_shallow and block_idx == 0:
            return g.dropout(g.shallow.unsqueeze(0).expand(B, -1, -1))  # per-sample dropout mask, as VPT
        slot = g._slot.get(block_idx)
        if slot is None:
            return None
        blk = g.blocks[slot]
        drop_all = cfg.prompt_dropout_targets == PromptDropoutTargets.ALL
        parts: list[Tensor] = []
        if blk.static is not None:
            st = blk.static.unsqueeze(0).expand(B, -1, -1)
            parts.append(g.dropout(st) if drop_all else st)
        if blk.routed:
            gates = self._route(blk, block_idx, x0)
            dyn = torch.einsum("bk,kld->bld", gates.to(blk.experts.dtype), blk.experts)
            parts.append(g.dropout(dyn) if drop_all else dyn)
        if g.mapper is not None:
            parts.append(self._mapped_prompt(block_idx).to(x0.dtype))
        if not parts:
            return None
        return torch.cat(parts, dim=1).to(x0.dtype) if len(parts) > 1 else parts[0].to(x0.dtype)

    # -- results -------------------------------------------------------------------------------------------------
    def routing_stats(self) -> RoutingStats | None:
        if not self._scores:
            return None
        return RoutingStats(
            blocks=list(self.gen.routed_blocks[: len(self._scores)]),
            scores=torch.stack(self._scores).detach(),
            gates=torch.stack(self._gates).detach(),
        )

    def importance_loss(self) -> Tensor | None:
        if not self._gates:
            return None
        return importance_loss(torch.stack(self._gates), self.gen.cfg.imp_loss_threshold)


def vpt_init_scale(patch_area: int, embed_dim: int) -> float:
    """VPT's uniform init bound sqrt(6 / (3·patch_area + embed_dim)) (0.1846 for Swin-B/4, 0.0625 for ViT-B/16)."""
    return math.sqrt(6.0 / (3.0 * patch_area + embed_dim))
