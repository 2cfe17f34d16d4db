"""The contract between MoPE and the frozen encoders it drives.

MoPE (arXiv 2403.10568; reference code songrise/MoPE) conditions every layer of a frozen *main* encoder on per-instance
prompt tokens. Following the VPT-deep convention the prompts of layer i **replace** the prompt slots left by layer i-1.
We never fork the upstream models (timm, transformers). An adapter owns the frozen upstream module and drives it block
by block; before each block it asks a :class:`BlockPrompter` for that block's prompt tokens. State moves as explicit
arguments (no forward hooks: they break under activation checkpointing, see PEFT's lora/model.py comment).

Block indices are global (0 .. num_blocks-1) across stages.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn

EncoderInputs = Tensor | Mapping[str, Tensor]


@runtime_checkable
class BlockPrompter(Protocol):
    """Supplies the prompt tokens of one block.

    Args:
        block_idx: global block index.
        x0: (B, C_block) pooled feature of the block input (the router's x_0; how it is pooled is the adapter's
            ``x0_pool`` setting: mean over all tokens incl. prompts, the [CLS] token, or mean over non-prompt tokens).
    Returns:
        (B, P, C_block) prompt tokens that replace the current prompt slots, or None to keep the current ones
        (e.g. Swin block 0 of stages 1-3 runs on the prompts carried through patch merging).
    """

    def __call__(self, block_idx: int, x0: Tensor) -> Tensor | None: ...


@dataclass(frozen=True)
class EncoderLayout:
    """Static description of a promptable encoder, enough to size prompts, routers and mappers."""

    block_dims: list[int]  # token width of each block
    block_stage: list[int]  # stage index of each block (Swin: 0..3; plain Transformers: 0 for all)
    out_dim: int  # width of the pooled output
    prompt_init_scale: float  # VPT rule sqrt(6 / (3 * patch_area + embed_dim)) for vision; see mope-reference §1.3
    stage_first_blocks: frozenset[int] = field(default_factory=frozenset)  # first block of each stage

    @property
    def num_blocks(self) -> int:
        return len(self.block_dims)

    @property
    def stage_dims(self) -> list[int]:
        dims: dict[int, int] = {}
        for d, s in zip(self.block_dims, self.block_stage):
            dims.setdefault(s, d)
        return [dims[s] for s in sorted(dims)]


class PromptableEncoder(nn.Module):
    """Base class of adapters (composition: ``self.model`` is the untouched upstream module).

    Subclasses implement :meth:`forward`. With ``prompter=None`` (or a prompter that always returns None and no
    shallow prompt) the output must equal the frozen upstream model's own pooled output exactly.
    """

    layout: EncoderLayout
    model: nn.Module

    def forward(self, inputs: EncoderInputs, prompter: BlockPrompter | None = None) -> Tensor:  # (B, out_dim)
        raise NotImplementedError

    def attention_lengths(self, num_prompts: int) -> list[int]:
        """Attention sequence length per block when `num_prompts` prompt tokens are present (for `harness inspect`)."""
        raise NotImplementedError

    #: input pixels per output patch along each side (vision encoders: the patch size, Swin: patch size x merges);
    #: None for encoders without a spatial token grid
    out_stride: int | None = None

    def forward_patches(self, inputs: EncoderInputs, prompter: BlockPrompter | None = None) -> Tensor:
        """The final normed patch tokens as a feature map ``(B, C, H / out_stride, W / out_stride)``, prompts and
        prefix tokens removed, for a dense head (referring segmentation). Vision encoders only."""
        raise NotImplementedError(f"{type(self).__name__} has no spatial patch grid for a dense head")

    def freeze(self) -> None:
        for p in self.model.parameters():
            p.requires_grad_(False)


def mean_tokens(x: Tensor) -> Tensor:
    """(B, N, C) -> (B, C) token mean."""
    return x.mean(dim=1)


X0_POOLS = ("mean_all_tokens", "cls", "mean_patches")


def patch_grid(tokens: Tensor, h: int, w: int) -> Tensor:
    """(B, h*w, C) row-major patch tokens -> (B, C, h, w) feature map."""
    B, N, C = tokens.shape
    if N != h * w:
        raise ValueError(f"{N} patch tokens do not form the {h}x{w} grid of the input")
    return tokens.transpose(1, 2).reshape(B, C, h, w)


def pool_x0(x: Tensor, mode: str, num_prefix: int, num_prompts: int) -> Tensor:
    """The router's x_0 from a block input laid out as [prefix (e.g. CLS), prompts, patches].

    mean_all_tokens: reference Swin behaviour (all tokens, prompts included, no LayerNorm);
    cls: the [CLS] token (paper; needs num_prefix >= 1); mean_patches: mean over non-prompt, non-prefix tokens.
    """
    if mode == "mean_all_tokens":
        return x.mean(dim=1)
    if mode == "cls":
        if num_prefix < 1:
            raise ValueError("x0_pool='cls' needs an encoder with a [CLS] token; use 'mean_all_tokens' for Swin")
        return x[:, 0]
    if mode == "mean_patches":
        return x[:, num_prefix + num_prompts :].mean(dim=1)
    raise ValueError(f"x0_pool={mode!r}: allowed values are {X0_POOLS}")


def needs_x0(prompter: BlockPrompter, block_idx: int) -> bool:
    """Whether `prompter` reads x0 at this block (a prompter may expose ``needs_x0(block_idx)``; default: yes).

    Adapters skip pooling the block input when it is not read (e.g. unrouted blocks, static-only prompters) and pass
    ``x[:, 0]`` instead: a free view that still carries the batch size, dtype and device.
    """
    fn = getattr(prompter, "needs_x0", None)
    return True if fn is None else bool(fn(block_idx))


def frozen_forward_guard(module: nn.Module) -> bool:
    """True when no parameter of `module` needs a gradient (lets adapters skip autograd bookkeeping)."""
    return not any(p.requires_grad for p in module.parameters())


__all__ = [
    "BlockPrompter",
    "EncoderInputs",
    "EncoderLayout",
    "PromptableEncoder",
    "X0_POOLS",
    "frozen_forward_guard",
    "mean_tokens",
    "needs_x0",
    "patch_grid",
    "pool_x0",
    "torch",
]
