"""Adapter driving a frozen timm VisionTransformer with per-block prompts (VPT-deep style).

Layout of the token sequence: [prefix tokens (CLS, registers), prompts (P), patches]. Prompts sit right after the
prefix tokens (VPT / MoPE ViT port); the prompts of block i replace those left by block i-1; prompts are stripped
before the final norm and pooling so timm's own `forward_head` (token or avg pooling over `num_prefix_tokens`) stays
correct (architecture.md pitfall 16). The upstream model is never modified.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mope.backbones.base import BlockPrompter, EncoderLayout, PromptableEncoder, needs_x0, patch_grid, pool_x0
from mope.prompts import vpt_init_scale


class TimmViTAdapter(PromptableEncoder):
    def __init__(self, model, *, x0_pool: str = "cls"):
        super().__init__()
        self.model = model
        self.x0_pool = x0_pool
        self.num_prefix = int(getattr(model, "num_prefix_tokens", 1))
        if x0_pool == "cls" and self.num_prefix < 1:
            raise ValueError("x0_pool='cls' needs a ViT with a class token (class_token=True)")
        depth = len(model.blocks)
        dim = int(model.embed_dim)
        ph, pw = model.patch_embed.patch_size
        self.layout = EncoderLayout(
            block_dims=[dim] * depth,
            block_stage=[0] * depth,
            out_dim=int(model.num_features),
            prompt_init_scale=vpt_init_scale(ph * pw, dim),
            stage_first_blocks=frozenset({0}),
        )

    def embed(self, images: Tensor) -> Tensor:
        """timm's embedding stage (patch embed, pos embed, patch drop, norm_pre), kept in one place."""
        m = self.model
        x = m.patch_embed(images)
        x = m._pos_embed(x)  # private timm API: wrapped here so an upgrade breaks in one place
        x = m.patch_drop(x)
        return m.norm_pre(x)

    @property
    def out_stride(self) -> int:
        return int(self.model.patch_embed.patch_size[0])

    def forward(self, inputs: Tensor, prompter: BlockPrompter | None = None) -> Tensor:
        return self.model.forward_head(self._tokens(inputs, prompter), pre_logits=True)

    def forward_patches(self, inputs: Tensor, prompter: BlockPrompter | None = None) -> Tensor:
        x = self._tokens(inputs, prompter)[:, self.num_prefix :]
        s = self.out_stride
        return patch_grid(x, inputs.shape[-2] // s, inputs.shape[-1] // s)

    def _tokens(self, inputs: Tensor, prompter: BlockPrompter | None) -> Tensor:
        """Final normed tokens [prefix, patches] (prompts removed) after the prompted blocks."""
        x = self.embed(inputs)
        npf = self.num_prefix
        n_prompt = 0
        for i, blk in enumerate(self.model.blocks):
            if prompter is not None:
                x0 = pool_x0(x, self.x0_pool, npf, n_prompt) if needs_x0(prompter, i) else x[:, 0]
                p = prompter(i, x0)
                if p is not None:
                    x = _splice(x, p, npf, n_prompt)
                    n_prompt = p.shape[1]
            x = blk(x)
        if n_prompt:
            x = _splice(x, None, npf, n_prompt)
        return self.model.norm(x)

    def attention_lengths(self, num_prompts: int) -> list[int]:
        n_patches = int(self.model.patch_embed.num_patches)
        return [self.num_prefix + num_prompts + n_patches] * self.layout.num_blocks


def _splice(x: Tensor, prompts: Tensor | None, num_prefix: int, n_old: int) -> Tensor:
    """Replace the `n_old` prompt slots after the prefix tokens by `prompts` (or remove them when None)."""
    parts = [x[:, :num_prefix]]
    if prompts is not None:
        parts.append(prompts)
    parts.append(x[:, num_prefix + n_old :])
    return torch.cat(parts, dim=1)
