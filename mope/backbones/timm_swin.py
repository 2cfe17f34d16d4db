"""Adapter driving a frozen timm SwinTransformer with per-block prompt tokens (MoPE's Swin path).

mope-reference §1.4 / §1.7. The adapter owns the untouched ``timm`` model and runs it stage by stage, block by block,
calling the model's own frozen submodules (``patch_embed``, ``stage.downsample``, ``block.norm1``, ``attn.qkv``,
``attn.proj``, the relative-position-bias table, the shift mask, ``norm2``, ``mlp``, ``drop_path*``, ``model.norm``).
Nothing is subclassed, copied or monkeypatched; two timm internals are read (``WindowAttention._get_rel_pos_bias`` and
the block's ``attn_mask`` / ``get_attn_mask``), each in one helper below, so a timm upgrade breaks in one place.

Token layout: ``[prompts (P), patches (H_s*W_s)]`` (Swin has no [CLS]). Inside a block with prompts:

- ``norm1`` on the whole sequence; the patches are shifted, padded and partitioned exactly as timm does; the prompts
  are copied into every window and prepended (window length ``P + window_area``, 13 + 49 = 62 for MoPE's Swin-B);
- the relative position bias and the shift mask are padded with zeros on the prompt rows and columns (prompts see and
  are seen by every token of their window); the per-window prompt outputs are averaged over the windows of their image;
- residual + ``norm2``/MLP run on all tokens.

``window_prompt_layout="reference"`` reproduces the official code's layout bug (§1.7.5): window-major prompt copies
against batch-major windows, so instance-conditioned prompts leak across the samples of a batch.

Efficiency (hot path of every trial): no Python loop over windows or samples, no host sync. The prompts' q/k/v are
computed once per image and broadcast to the windows (``qkv`` is per-token, so this equals projecting every copy), and
``proj`` is applied after the window average (affine, so it commutes with the mean). Attention runs through
``F.scaled_dot_product_attention`` with the windows folded into the head axis, ``(B, nW*nH, L, hd)``, so the cached
additive bias+mask ``(1, nW*nH, L, L)`` broadcasts over the batch without being materialised per sample.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from timm.models.swin_transformer import SwinTransformer, window_partition, window_reverse
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from mope.backbones.base import (
    X0_POOLS,
    BlockPrompter,
    EncoderInputs,
    EncoderLayout,
    PromptableEncoder,
    needs_x0,
    patch_grid,
    pool_x0,
)
from mope.prompts import vpt_init_scale

WINDOW_PROMPT_LAYOUTS = ("correct", "reference")


class TimmSwinAdapter(PromptableEncoder):
    """Promptable view of a frozen ``timm.models.swin_transformer.SwinTransformer``.

    Args:
        model: the timm Swin (any config; built by the caller, weights loaded by the caller). Must pool with 'avg'.
        x0_pool: the router's x_0 from each block input: 'mean_all_tokens' (reference) or 'mean_patches'.
        window_prompt_layout: 'correct' (batch-major prompt copies, default) or 'reference' (official bug, §1.7.5).
        pool_includes_prompts: final token mean includes the prompt tokens (reference) or only the patches.
    """

    def __init__(
        self,
        model: SwinTransformer,
        *,
        x0_pool: str = "mean_all_tokens",
        window_prompt_layout: str = "correct",
        pool_includes_prompts: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(model, SwinTransformer):
            raise TypeError(f"TimmSwinAdapter needs a timm SwinTransformer, got {type(model).__name__}")
        if x0_pool not in X0_POOLS or x0_pool == "cls":
            raise ValueError(f"x0_pool={x0_pool!r}: Swin has no [CLS]; use 'mean_all_tokens' or 'mean_patches'")
        if window_prompt_layout not in WINDOW_PROMPT_LAYOUTS:
            raise ValueError(f"window_prompt_layout={window_prompt_layout!r}: allowed {WINDOW_PROMPT_LAYOUTS}")
        if getattr(model, "global_pool", "avg") != "avg":
            raise ValueError(f"global_pool={model.global_pool!r}: the adapter pools by token mean, build with 'avg'")
        for s, stage in enumerate(model.layers):
            ds = stage.downsample
            if not isinstance(ds, nn.Identity) and not (hasattr(ds, "norm") and hasattr(ds, "reduction")):
                raise TypeError(f"stage {s}: unsupported downsample {type(ds).__name__} (expected timm PatchMerging)")
        self.model = model
        self.x0_pool = x0_pool
        self.window_prompt_layout = window_prompt_layout
        self.pool_includes_prompts = bool(pool_includes_prompts)
        # (block id, P, Hp, Wp, dtype, device) -> (table version key, bias tensor); see _attn_bias
        self._bias_cache: dict[tuple, tuple[tuple, Tensor]] = {}

        block_dims: list[int] = []
        block_stage: list[int] = []
        first: set[int] = set()
        for s, stage in enumerate(model.layers):
            first.add(len(block_dims))
            for blk in stage.blocks:
                block_dims.append(int(blk.dim))
                block_stage.append(s)
        ph, pw = model.patch_embed.patch_size
        self.layout = EncoderLayout(
            block_dims=block_dims,
            block_stage=block_stage,
            out_dim=int(model.num_features),
            prompt_init_scale=vpt_init_scale(ph * pw, block_dims[0]),
            stage_first_blocks=frozenset(first),
        )

    # ------------------------------------------------------------------ public API

    def forward(self, inputs: EncoderInputs, prompter: BlockPrompter | None = None) -> Tensor:
        x, num_prompts, _ = self._run(inputs, prompter, return_stages=False)
        x = self.model.norm(x)
        if not self.pool_includes_prompts:
            x = x[:, num_prompts:]
        return x.mean(dim=1)

    @property
    def out_stride(self) -> int:
        merges = sum(not isinstance(stage.downsample, nn.Identity) for stage in self.model.layers)
        return int(self.model.patch_embed.patch_size[0]) * 2**merges

    def forward_patches(self, inputs: EncoderInputs, prompter: BlockPrompter | None = None) -> Tensor:
        x, num_prompts, _ = self._run(inputs, prompter, return_stages=False)
        images, s = _images(inputs), self.out_stride
        return patch_grid(self.model.norm(x)[:, num_prompts:], images.shape[-2] // s, images.shape[-1] // s)

    def forward_tokens(
        self, inputs: EncoderInputs, prompter: BlockPrompter | None = None
    ) -> tuple[Tensor, int, list[Tensor]]:
        """Final normed tokens ``(B, P + N, C)``, the final prompt count P, and each stage's output
        ``(B, P_s + H_s*W_s, C_s)``."""
        x, num_prompts, stages = self._run(inputs, prompter, return_stages=True)
        return self.model.norm(x), num_prompts, stages

    def attention_lengths(self, num_prompts: int) -> list[int]:
        return [
            int(blk.window_size[0] * blk.window_size[1]) + num_prompts
            for stage in self.model.layers
            for blk in stage.blocks
        ]

    def attn_bias(self, block_idx: int, num_prompts: int) -> Tensor:
        """The additive attention bias used in block `block_idx` at the model's own input size: ``(nW, nH, L, L)``,
        ``L = num_prompts + window_area``; relative position bias + shift mask on the patch part, zeros on prompt
        rows/cols."""
        blk, H, W = self._block_and_resolution(block_idx)
        (wh, ww) = blk.window_size
        Hp, Wp = -(-H // wh) * wh, -(-W // ww) * ww
        dev = blk.attn.relative_position_bias_table.device
        dt = blk.attn.relative_position_bias_table.dtype
        bias = self._attn_bias(blk, num_prompts, Hp, Wp, dt, dev)
        nH = blk.attn.num_heads
        return bias.reshape(-1, nH, bias.shape[-2], bias.shape[-1])

    # ------------------------------------------------------------------ driving the model

    def _run(
        self, inputs: EncoderInputs, prompter: BlockPrompter | None, return_stages: bool
    ) -> tuple[Tensor, int, list[Tensor]]:
        images = _images(inputs)
        x = self.model.patch_embed(images)  # (B, H, W, C), NHWC; timm Swin has no absolute position embedding
        B, H, W, C = x.shape
        x = x.reshape(B, H * W, C)
        P = 0
        idx = 0
        stages: list[Tensor] = []
        for stage in self.model.layers:
            if not isinstance(stage.downsample, nn.Identity):
                x, H, W = self._merge(stage.downsample, x, P, H, W)
            ckpt = getattr(stage, "grad_checkpointing", False) and torch.is_grad_enabled()
            for blk in stage.blocks:
                if prompter is not None:
                    x0 = pool_x0(x, self.x0_pool, num_prefix=0, num_prompts=P) if needs_x0(prompter, idx) else x[:, 0]
                    p = prompter(idx, x0)
                    if p is not None:
                        if p.dim() != 3 or p.shape[0] != B or p.shape[2] != x.shape[2]:
                            raise ValueError(
                                f"block {idx}: prompts must be (B={B}, P, C={x.shape[2]}), got {tuple(p.shape)}"
                            )
                        x = torch.cat([p.to(x.dtype), x[:, P:]], dim=1)
                        P = p.shape[1]
                if ckpt:
                    x = checkpoint(self._block, blk, x, P, H, W, use_reentrant=False)
                else:
                    x = self._block(blk, x, P, H, W)
                idx += 1
            if return_stages:
                stages.append(x)
        return x, P, stages

    def _merge(self, ds: nn.Module, x: Tensor, P: int, H: int, W: int) -> tuple[Tensor, int, int]:
        """timm PatchMerging on the patches; each prompt is tiled 4x along channels ([p, p, p, p], as the reference's
        ``torch.cat((p, p, p, p), -1)``, i.e. a 2x2 block of identical tokens, so the chunk order is immaterial) and
        goes through the same frozen LayerNorm(4C) + Linear(4C -> 2C)."""
        B, _, C = x.shape
        patches = ds(x[:, P:].reshape(B, H, W, C))  # (B, H', W', C'), pads odd sizes like timm
        _, H2, W2, C2 = patches.shape
        patches = patches.reshape(B, H2 * W2, C2)
        if P:
            prompts = ds.reduction(ds.norm(x[:, :P].repeat(1, 1, 4)))
            patches = torch.cat([prompts, patches], dim=1)
        return patches, H2, W2

    def _block(self, blk: nn.Module, x: Tensor, P: int, H: int, W: int) -> Tensor:
        """timm SwinTransformerBlock.forward on a [prompts, patches] sequence (B, P + H*W, C)."""
        x = x + blk.drop_path1(self._window_attention(blk, blk.norm1(x), P, H, W))
        return x + blk.drop_path2(blk.mlp(blk.norm2(x)))

    def _window_attention(self, blk: nn.Module, xn: Tensor, P: int, H: int, W: int) -> Tensor:
        """timm SwinTransformerBlock._attn + WindowAttention.forward, with the prompts prepended to every window."""
        attn = blk.attn
        B, _, C = xn.shape
        wh, ww = blk.window_size
        sh, sw = blk.shift_size
        nH = attn.num_heads
        A = wh * ww
        L = P + A

        patches = xn[:, P:].reshape(B, H, W, C)
        if sh or sw:
            patches = torch.roll(patches, shifts=(-sh, -sw), dims=(1, 2))
        pad_h, pad_w = (wh - H % wh) % wh, (ww - W % ww) % ww
        if pad_h or pad_w:
            patches = F.pad(patches, (0, 0, 0, pad_w, 0, pad_h))
        Hp, Wp = H + pad_h, W + pad_w
        nW = (Hp // wh) * (Wp // ww)

        qkv = attn.qkv(window_partition(patches, (wh, ww)).reshape(B, nW, A, C))  # (B, nW, A, 3D), batch-major
        if P:
            qkv_p = attn.qkv(xn[:, :P])  # (B, P, 3D): once per image, not once per window copy
            qkv = torch.cat([self._prompt_copies(qkv_p, nW), qkv], dim=2)  # (B, nW, L, 3D)
        D = qkv.shape[-1] // 3
        hd = D // nH
        q, k, v = qkv.reshape(B, nW, L, 3, nH, hd).permute(3, 0, 1, 4, 2, 5).reshape(3, B, nW * nH, L, hd).unbind(0)
        bias = self._attn_bias(blk, P, Hp, Wp, q.dtype, q.device)  # (1, nW*nH, L, L)
        drop = attn.attn_drop.p if attn.attn_drop.training else 0.0
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=drop, scale=attn.scale)
        o = o.reshape(B, nW, nH, L, hd).transpose(2, 3)  # (B, nW, L, nH, hd)

        out = attn.proj_drop(attn.proj(o[:, :, P:].reshape(B * nW, wh, ww, D)))
        out = window_reverse(out, (wh, ww), Hp, Wp)[:, :H, :W]
        if sh or sw:
            out = torch.roll(out, shifts=(sh, sw), dims=(1, 2))
        out = out.reshape(B, H * W, C)
        if not P:
            return out
        prompts = self._merge_prompt_copies(o[:, :, :P]).reshape(B, P, D)
        prompts = attn.proj_drop(attn.proj(prompts))  # proj is affine: proj(mean) == mean(proj)
        return torch.cat([prompts, out], dim=1)

    # ------------------------------------------------------------------ prompt <-> window layout (§1.7.5)

    def _prompt_copies(self, t: Tensor, nW: int) -> Tensor:
        """(B, P, X) -> (B, nW, P, X): the prompt copy attached to window w of image b (windows are batch-major)."""
        B = t.shape[0]
        if self.window_prompt_layout == "correct":
            return t.unsqueeze(1).expand(B, nW, *t.shape[1:])  # window (b, w) <- instance b
        # reference: copies laid out window-major (copy j = w*B + b) but consumed batch-major (j = b*nW + w), so
        # window w of image b gets the prompts of instance (b*nW + w) % B
        # (songrise/MoPE models/swin.py, expand+reshape)
        return t.unsqueeze(0).expand(nW, B, *t.shape[1:]).reshape(B, nW, *t.shape[1:])

    def _merge_prompt_copies(self, o: Tensor) -> Tensor:
        """(B, nW, P, ...) per-window prompt outputs -> (B, P, ...) averaged over windows."""
        if self.window_prompt_layout == "correct":
            return o.mean(dim=1)
        B, nW = o.shape[:2]
        return o.reshape(nW, B, *o.shape[2:]).mean(dim=0)  # reference: `.view(-1, B, P, C).mean(0)`

    # ------------------------------------------------------------------ bias + mask (cached)

    def _attn_bias(self, blk: nn.Module, P: int, Hp: int, Wp: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        """Additive attention bias (1, nW*nH, L, L): relative position bias + shift mask on the patch block, zeros on
        the prompt rows and columns. Cached per block, size, dtype and device; rebuilt when the bias table changes
        in place or is replaced, and never cached when the table is being trained."""
        table = blk.attn.relative_position_bias_table
        trainable = table.requires_grad and torch.is_grad_enabled()
        key = (
            id(blk),
            P,
            Hp,
            Wp,
            tuple(blk.window_size),
            tuple(blk.shift_size),
            dtype,
            device,
            torch.is_inference_mode_enabled(),
        )  # inference tensors must not reach autograd
        stamp = (table._version, table.data_ptr())
        if not trainable:
            hit = self._bias_cache.get(key)
            if hit is not None and hit[0] == stamp:
                return hit[1]
        with torch.set_grad_enabled(trainable):
            bias = _build_bias(blk, P, Hp, Wp, dtype, device)
        if not trainable:
            self._bias_cache[key] = (stamp, bias)
        return bias

    def _block_and_resolution(self, block_idx: int) -> tuple[nn.Module, int, int]:
        H, W = self.model.patch_embed.grid_size
        i = 0
        for stage in self.model.layers:
            if not isinstance(stage.downsample, nn.Identity):
                H, W = (H + 1) // 2, (W + 1) // 2
            for blk in stage.blocks:
                if i == block_idx:
                    return blk, H, W
                i += 1
        raise IndexError(f"block_idx {block_idx} out of range (num_blocks={i})")

    def _apply(self, fn, *args, **kwargs):  # .to()/.cuda()/.half(): drop cached tensors of the old device/dtype
        self._bias_cache.clear()
        return super()._apply(fn, *args, **kwargs)


def _build_bias(blk: nn.Module, P: int, Hp: int, Wp: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    wh, ww = blk.window_size
    A = wh * ww
    L = P + A
    nW = (Hp // wh) * (Wp // ww)
    nH = blk.attn.num_heads
    patch_bias = _timm_rel_pos_bias(blk.attn).reshape(1, nH, A, A).to(device=device, dtype=dtype)
    mask = _timm_shift_mask(blk, Hp, Wp, device)
    if mask is not None:
        if mask.shape[0] != nW:
            raise RuntimeError(
                f"shift mask has {mask.shape[0]} windows, expected {nW} (input size differs from the model's?)"
            )
        patch_bias = patch_bias + mask.to(dtype).unsqueeze(1)  # (nW, nH, A, A)
    # Last dim padded to a multiple of 16 then sliced: memory-efficient SDPA kernels want an aligned row stride.
    Lpad = -(-L // 16) * 16
    full = torch.zeros(nW, nH, L, Lpad, dtype=dtype, device=device)
    full[:, :, P:, P:L] = patch_bias
    return full.reshape(1, nW * nH, L, Lpad)[..., :L]


def _timm_rel_pos_bias(attn: nn.Module) -> Tensor:
    """timm WindowAttention's relative position bias (1, nH, A, A) (private timm API, wrapped here)."""
    return attn._get_rel_pos_bias()


def _timm_shift_mask(blk: nn.Module, Hp: int, Wp: int, device: torch.device) -> Tensor | None:
    """timm's SW-MSA mask (nW, A, A) with 0 / -100 entries, or None when the block does not shift."""
    if not any(blk.shift_size):
        return None
    if getattr(blk, "dynamic_mask", False) or blk.attn_mask is None:
        return blk.get_attn_mask(torch.empty(1, Hp, Wp, 0, device=device))  # only the shape, device, dtype are read
    return blk.attn_mask


def _images(inputs: EncoderInputs) -> Tensor:
    if isinstance(inputs, Tensor):
        return inputs
    if isinstance(inputs, Mapping):
        for name in ("pixel_values", "images", "image"):
            if name in inputs:
                return inputs[name]
    raise TypeError(
        "TimmSwinAdapter expects an image tensor (B, 3, H, W) or a mapping with 'pixel_values'/'images'/'image'"
    )


__all__ = ["WINDOW_PROMPT_LAYOUTS", "TimmSwinAdapter"]
