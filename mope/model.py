"""The fusion model: a main encoder driven by a :class:`~mope.prompts.PromptGenerator`, a complementary encoder whose
feature ψ conditions the router and the mapper, and a linear head. Every method of the paper (MoPE and the baselines
of Table 1/2, the vanilla-prompt arm of Fig. 4) is a configuration of these parts (:mod:`mope.methods`).

Batch contract (built by the data loader; no tokenization here):
    image (B,3,H,W) float; input_ids / attention_mask / token_type_ids (B,T) long;
    audio / audio_mask (B,L) 16 kHz waveform + validity (MUStARD); frames (B,T,3,H,W) [+ frames_mask (B,T)];
    optional comp_feat (B, d): precomputed feature of a black-box complementary encoder (feature cache);
    task segmentation: mask (B,H,W) float {0,1}, the referred object at the image's resolution.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mope.backbones import DEFAULT_ROUTE_BLOCK0, DEFAULT_X0_POOL, PromptableEncoder, create_encoder
from mope.config import EncoderConfig, FusionConfig, Method, MoPEConfig, Task
from mope.heads import SETRPUPHead, default_num_convs, seg_loss
from mope.methods import METHODS, MethodSpec, comp_prompt_len, main_prompt_config, reads_complementary
from mope.prompts import PromptGenerator, RoutingStats


@dataclass
class FusionOutput:
    logits: Tensor  # (B, num_classes); task segmentation: (B, 1, H, W) mask logits at the input resolution
    aux_loss: Tensor  # w_imp · L_imp (0 when no routing)
    imp_loss: Tensor | None
    routing: RoutingStats | None
    features: Tensor  # what the head read


_BATCH_KEYS = {
    "text": ("input_ids", "attention_mask", "token_type_ids"),
    "audio": ("audio", "audio_mask"),
    "video": ("frames", "frames_mask"),
}


def _inputs_for(modality: str, batch: Mapping[str, Any]) -> Any:
    """The batch fields one modality's encoder reads: the image tensor, or a dict of that modality's tensors."""
    if modality == "vision":
        return batch["image"]
    keys = _BATCH_KEYS[modality]
    if keys[0] not in batch:
        raise KeyError(
            f"the batch has no {keys[0]!r} field for the {modality} encoder (batch keys {sorted(batch)}); "
            f"the shards must carry {modality} (e.g. `harness prep mustard --opt frames=8` for video)"
        )
    return {k: batch[k] for k in keys if k in batch}


class MultiComplementary(nn.Module):
    """Several frozen complementary encoders as one black box: psi = the concatenation of their features in the
    configured order (e.g. [audio, video] for MUStARD: wav2vec2 mean-pooled + frame-encoder mean over frames)."""

    def __init__(self, encoders: Mapping[str, nn.Module]):
        super().__init__()
        self.encoders = nn.ModuleDict(dict(encoders))
        self.out_dim = sum(_out_dim(e) for e in self.encoders.values())

    def forward(self, inputs: Mapping[str, Any]) -> Tensor:
        return torch.cat([enc(_inputs_for(m, inputs)) for m, enc in self.encoders.items()], dim=-1)


def _create_modality_encoder(modality: str, cfg: EncoderConfig, **kwargs: Any) -> nn.Module:
    """A frozen encoder for `modality`; video = the vision encoder run on every frame (mean over frames)."""
    enc = create_encoder(cfg, **kwargs)
    if modality == "video":
        from mope.backbones.frames import FrameEncoder

        enc.freeze()
        return FrameEncoder(enc)
    return enc


class FusionModel(nn.Module):
    """Frozen encoders + trainable prompts/router/mapper/head, per ``cfg.method``."""

    def __init__(self, cfg: FusionConfig, comp_module: nn.Module | None = None):
        """Args:
        cfg: the model configuration.
        comp_module: optional custom complementary encoder: any module mapping the batch's inputs of the
            complementary modality to a (B, out_dim) vector, with an ``out_dim`` attribute (e.g. a frozen
            sentence encoder, :class:`~mope.backbones.blackbox.BagOfWordsEncoder`). It replaces ``cfg.text``
            (or ``cfg.vision`` when text is main); it is never prompt-tuned; its own ``requires_grad`` flags
            decide what trains (BoW's projector does, the embeddings don't).
        """
        super().__init__()
        self.cfg = cfg
        self.spec: MethodSpec = METHODS[cfg.method]
        comp_mods = cfg.complementary_modalities
        main_cfg, comp_cfg = getattr(cfg, cfg.main), getattr(cfg, comp_mods[0])
        self.main_kind, self.comp_kind = main_cfg.kind, comp_cfg.kind
        self.main_modality = cfg.main
        self.comp_modalities = list(comp_mods)
        self.comp_modality = "+".join(comp_mods)
        if len(comp_mods) > 1 and (self.spec.train_comp or comp_module is not None):
            raise ValueError(
                f"model.complementary={comp_mods}: several complementary modalities are frozen black "
                f"boxes; method {cfg.method.value!r} fine-tunes the complementary encoder (or a custom one "
                "was given): use one complementary modality, or a prompt method (mope, vanilla_prompt, "
                "p_sequential_fuse, promptfuse)"
            )
        pcfg = main_prompt_config(cfg)
        self.prompt_cfg = pcfg
        m = pcfg or cfg.mope
        x0_pool = DEFAULT_X0_POOL[main_cfg.kind] if m.x0_pool == "auto" else m.x0_pool
        self.main_encoder: PromptableEncoder | None = None
        if self.spec.use_main:
            self.main_encoder = create_encoder(
                main_cfg,
                x0_pool=x0_pool,
                window_prompt_layout=m.window_prompt_layout.value,
                pool_includes_prompts=m.pool_includes_prompts,
            )
        self.comp_encoder: nn.Module | None = None
        self.comp_is_custom = comp_module is not None
        if reads_complementary(cfg):
            if comp_module is not None:
                if not hasattr(comp_module, "out_dim"):
                    raise ValueError("comp_module needs an `out_dim` attribute (width of its output vector)")
                self.comp_encoder = comp_module
            elif len(comp_mods) > 1:
                self.comp_encoder = MultiComplementary(
                    {
                        m: _create_modality_encoder(m, getattr(cfg, m), x0_pool=DEFAULT_X0_POOL[getattr(cfg, m).kind])
                        for m in comp_mods
                    }
                )
            else:
                self.comp_encoder = _create_modality_encoder(
                    comp_mods[0], comp_cfg, x0_pool=DEFAULT_X0_POOL[comp_cfg.kind]
                )
        comp_dim = _out_dim(self.comp_encoder) if self.comp_encoder is not None else 0
        self.comp_dim = comp_dim

        self.main_prompts: PromptGenerator | None = None
        if pcfg is not None and self.main_encoder is not None:
            self.main_prompts = PromptGenerator(
                pcfg, self.main_encoder.layout, comp_dim, route_block0_default=DEFAULT_ROUTE_BLOCK0[main_cfg.kind]
            )
        self.comp_prompts: PromptGenerator | None = None
        lp = comp_prompt_len(cfg)
        # With comp_tuned=False the complementary prompts would stay at their random init: plain frozen encoder instead
        # (Table 5 "BERT frozen", mope-reference §2), so its features are a cacheable black box.
        # complementary prompts: the BERT (or, text main, the vision encoder) of a two-modality model; audio, video
        # and several complementary modalities are frozen black boxes
        promptable = comp_mods in (["text"], ["vision"])
        if lp > 0 and promptable and self.comp_encoder is not None and not self.comp_is_custom and cfg.comp_tuned:
            ccfg = MoPEConfig(
                prompt_len=lp,
                use_static=True,
                use_dynamic=False,
                use_mapped=False,
                prompt_dropout=cfg.comp_prompt_dropout,
                prompt_dropout_targets="all",
                prompt_init_scale=cfg.comp_prompt_init_scale,
                route_block0=True,
            )
            self.comp_prompts = PromptGenerator(ccfg, self.comp_encoder.layout, 0, route_block0_default=True)

        main_dim = self.main_encoder.layout.out_dim if self.main_encoder else 0
        head_in = {"main": main_dim, "comp": comp_dim, "concat": main_dim + comp_dim}[self.spec.head_input]
        self.head: nn.Module
        if cfg.task == Task.SEGMENTATION:  # a dense head on the main encoder's patch grid (config checks main=vision)
            stride = self.main_encoder.out_stride
            if stride is None:
                raise ValueError(f"{main_cfg.kind} has no patch grid: task segmentation needs a vision main encoder")
            self.head = SETRPUPHead(
                self.main_encoder.layout.block_dims[-1],
                channels=cfg.seg_channels,
                num_convs=cfg.seg_num_convs or default_num_convs(stride),
            )
        else:
            self.head = nn.Linear(head_in, cfg.num_classes)
        self.set_trainable()
        self.train()  # apply the frozen-encoder mode policy from the start (nn.Module starts in train mode)

    # -- trainable set ---------------------------------------------------------------------------------------------
    def set_trainable(self) -> None:
        """Freezes everything, then enables exactly the method's trainable set."""
        custom = {n: p.requires_grad for n, p in self.comp_encoder.named_parameters()} if self.comp_is_custom else {}
        self.requires_grad_(False)
        for n, p in self.comp_encoder.named_parameters() if self.comp_is_custom else ():
            p.requires_grad_(custom[n])
        for mod in (self.main_prompts, self.head):
            if mod is not None:
                mod.requires_grad_(True)
        if self.comp_prompts is not None:
            self.comp_prompts.requires_grad_(self.cfg.comp_tuned)
        for gen in (self.main_prompts, self.comp_prompts):
            if gen is None:
                continue
            for blk in gen.blocks:  # frozen routing keys are buffers already; learned keys are Parameters
                if isinstance(getattr(blk, "keys", None), nn.Parameter):
                    blk.keys.requires_grad_(True)
        if self.spec.train_main and self.main_encoder is not None:
            self.main_encoder.requires_grad_(True)
        if self.spec.train_comp and self.comp_encoder is not None:
            self.comp_encoder.requires_grad_(True)

    @property
    def comp_is_blackbox(self) -> bool:
        """True when ψ depends on nothing trainable: features can be computed once and cached per dataset."""
        if self.comp_encoder is None or self.spec.train_comp:
            return False
        if self.comp_is_custom or self.comp_prompts is None:
            return not any(p.requires_grad for p in self.comp_encoder.parameters())
        return not self.cfg.comp_tuned

    def train(self, mode: bool = True) -> FusionModel:
        super().train(mode)
        # Frozen encoders (mope-reference §1.8): a frozen timm encoder runs in eval whatever prompts it carries (the
        # reference's train() override: no DropPath / dropout inside the frozen blocks, main or complementary role);
        # BERT's dropout stays active as in the reference, unless BERT is a black box (then ψ is cacheable and must be
        # deterministic). Fine-tuned encoders train normally. Prompt dropout lives in the PromptGenerators, not here.
        if self.main_encoder is not None and not self.spec.train_main and self.main_kind.startswith("timm"):
            self.main_encoder.eval()
        if self.comp_encoder is not None and not self.spec.train_comp:
            if self.comp_is_blackbox or (not self.comp_is_custom and self.comp_kind.startswith("timm")):
                self.comp_encoder.eval()
        return self

    # -- forward -----------------------------------------------------------------------------------------------------
    def complementary_inputs(self, batch: Mapping[str, Any]) -> Any:
        """The batch fields the complementary encoder reads (a dict of text / audio / frame tensors, or the image
        tensor; with several complementary modalities one flat dict of all their fields)."""
        if len(self.comp_modalities) == 1:
            return _inputs_for(self.comp_modalities[0], batch)
        out: dict[str, Any] = {}
        for m in self.comp_modalities:
            x = _inputs_for(m, batch)
            out.update({"image": x} if m == "vision" else x)
        return out

    def complementary_feature(self, batch: Mapping[str, Any]) -> Tensor | None:
        if self.comp_encoder is None:
            return None
        if "comp_feat" in batch and self.comp_is_blackbox:
            return batch["comp_feat"]
        inputs = self.complementary_inputs(batch)
        if self.comp_is_custom:
            return self.comp_encoder(inputs)
        if self.comp_is_blackbox:
            with torch.no_grad():
                return self.comp_encoder(inputs)
        prompter = self.comp_prompts.bind(None, _batch_size(inputs)) if self.comp_prompts is not None else None
        return self.comp_encoder(inputs, prompter)

    def forward(self, batch: Mapping[str, Any]) -> FusionOutput:
        psi = self.complementary_feature(batch)
        routing, imp = None, None
        feats = []
        if self.main_encoder is not None:
            inputs = _inputs_for(self.main_modality, batch)
            p = self.main_prompts.bind(psi, _batch_size(inputs)) if self.main_prompts is not None else None
            if self.cfg.task == Task.SEGMENTATION:
                grid = self.main_encoder.forward_patches(inputs, p)
                logits = self.head(grid, out_size=tuple(inputs.shape[-2:]))
                if p is not None:
                    routing, imp = p.routing_stats(), p.importance_loss()
                return self._output(logits, imp, routing, grid.mean(dim=(2, 3)))
            pooled = self.main_encoder(inputs, p)
            if p is not None:
                routing, imp = p.routing_stats(), p.importance_loss()
            feats.append(pooled)
        if self.spec.head_input in ("comp", "concat"):
            feats.append(psi)
        if self.spec.head_input == "comp":
            feats = feats[-1:]
        features = torch.cat(feats, dim=-1) if len(feats) > 1 else feats[0]
        return self._output(self.head(features), imp, routing, features)

    def _output(self, logits: Tensor, imp: Tensor | None, routing: RoutingStats | None, features: Tensor):
        w = self.prompt_cfg.imp_loss_weight if self.prompt_cfg is not None else 0.0
        aux = w * imp if (imp is not None and w > 0) else logits.new_zeros(())
        return FusionOutput(logits=logits, aux_loss=aux, imp_loss=imp, routing=routing, features=features)

    def loss(self, logits: Tensor, target: Tensor) -> Tensor:
        """The task loss of this model's configuration against the batch's target (:func:`task_target`)."""
        cfg = self.cfg
        return task_loss(logits, target, cfg.task, seg_kind=cfg.seg_loss, dice_weight=cfg.seg_dice_weight)

    # -- accounting ---------------------------------------------------------------------------------------------------
    def component_of(self, name: str) -> str:
        head, _, rest = name.partition(".")
        if head == "main_prompts":
            if rest.startswith("mapper."):
                return "mapper"
            if ".w_x." in f".{rest}" or rest.startswith("w_y.") or rest.endswith(".keys"):
                return "router"
            return f"{self.main_modality} prompts"
        if head == "comp_prompts":
            return f"{self.comp_modality} prompts"
        if head == "main_encoder":
            return f"{self.main_modality} encoder"
        if head == "comp_encoder":
            return f"{self.comp_modality} encoder"
        return head

    def parameter_report(self) -> dict[str, Any]:
        comps: dict[str, dict[str, int]] = {}
        for n, p in self.named_parameters():
            c = comps.setdefault(self.component_of(n), {"trainable": 0, "total": 0})
            c["total"] += p.numel()
            if p.requires_grad:
                c["trainable"] += p.numel()
        trainable = sum(c["trainable"] for c in comps.values())
        total = sum(c["total"] for c in comps.values())
        return {"trainable": trainable, "total": total, "components": comps}


def _out_dim(enc: nn.Module) -> int:
    layout = getattr(enc, "layout", None)
    return int(layout.out_dim if layout is not None else enc.out_dim)


def _batch_size(inputs: Any) -> int:
    if isinstance(inputs, Tensor):
        return inputs.shape[0]
    return next(iter(inputs.values())).shape[0]


def build_model(cfg: FusionConfig | Mapping[str, Any], comp_module: nn.Module | None = None) -> FusionModel:
    if not isinstance(cfg, FusionConfig):
        cfg = FusionConfig.from_dict(dict(cfg))
    return FusionModel(cfg, comp_module=comp_module)


# -- losses and metrics inputs ---------------------------------------------------------------------------------------
def task_target(batch: Mapping[str, Any], task: Task) -> Tensor:
    """What the loss compares the logits with: the (B, H, W) object mask for segmentation, else the labels."""
    if task == Task.SEGMENTATION:
        if "mask" not in batch:
            raise KeyError(f"task segmentation needs a 'mask' field in the batch (batch keys {sorted(batch)})")
        return batch["mask"]
    return batch["label"]


def task_loss(
    logits: Tensor, labels: Tensor, task: Task, *, seg_kind: str = "bce_dice", dice_weight: float = 1.0
) -> Tensor:
    """CE for single-label tasks (Food-101, SNLI-VE, demo), BCE-with-logits on multi-hot targets (MM-IMDB), the
    pixel loss of :func:`mope.heads.seg_loss` for segmentation (`labels` = the mask)."""
    if task == Task.SEGMENTATION:
        return seg_loss(logits, labels, seg_kind, dice_weight)
    if task == Task.MULTI_LABEL:
        return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))
    return F.cross_entropy(logits, labels)


def predictions(logits: Tensor, task: Task) -> Tensor:
    """argmax for single-label; sigmoid(logit) > 0.5 for multi-label (the reference's eval rule) and for masks."""
    if task == Task.SEGMENTATION:
        return (logits.squeeze(1) > 0).to(torch.uint8)
    if task == Task.MULTI_LABEL:
        return (logits.sigmoid() > 0.5).long()
    return logits.argmax(dim=-1)


def with_method(cfg: FusionConfig, method: Method | str, **mope_overrides: Any) -> FusionConfig:
    """A copy of cfg with another method (and optional cfg.mope overrides): sweeps pair arms this way."""
    mope_cfg = dataclasses.replace(cfg.mope, **mope_overrides) if mope_overrides else cfg.mope
    return dataclasses.replace(cfg, method=Method(method), mope=mope_cfg)


__all__ = [
    "EncoderConfig",
    "FusionConfig",
    "FusionModel",
    "FusionOutput",
    "MultiComplementary",
    "build_model",
    "predictions",
    "task_loss",
    "task_target",
    "with_method",
]
