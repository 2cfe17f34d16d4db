"""Backbone registry: ``create_encoder(EncoderConfig, ...) -> PromptableEncoder`` without any download.

timm models are built with ``pretrained=False`` from their architecture name (+ kwargs); pretrained weights come from a
local safetensors file (or a directory holding ``model.safetensors``). BERT models come from a local directory, the
offline MiniLM package (``minilm``), or a random-init architecture (``bert-base-uncased`` -> BertConfig defaults).
Wav2Vec2 audio encoders (``hf_wav2vec2``) likewise: a local directory, or the base architecture with random weights.
A video modality wraps a vision adapter in :class:`mope.backbones.frames.FrameEncoder` (per frame, pooled over frames).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from mope.backbones.base import BlockPrompter, EncoderLayout, PromptableEncoder, pool_x0
from mope.config import EncoderConfig

_BUILDERS: dict[str, Callable[..., PromptableEncoder]] = {}


def register_backbone(kind: str) -> Callable[[Callable[..., PromptableEncoder]], Callable[..., PromptableEncoder]]:
    def deco(fn: Callable[..., PromptableEncoder]) -> Callable[..., PromptableEncoder]:
        _BUILDERS[kind] = fn
        return fn

    return deco


def list_backbones() -> list[str]:
    return sorted(_BUILDERS)


def create_encoder(cfg: EncoderConfig, **adapter_kwargs: Any) -> PromptableEncoder:
    try:
        builder = _BUILDERS[cfg.kind]
    except KeyError:
        raise ValueError(f"encoder.kind={cfg.kind!r}: available kinds {list_backbones()}") from None
    return builder(cfg, **adapter_kwargs)


def load_timm_weights(model: nn.Module, weights: str | Path) -> None:
    """Loads a local safetensors state dict into a timm model (strict, except a classifier head we do not use)."""
    from safetensors.torch import load_file

    path = Path(weights)
    if path.is_dir():
        path = path / "model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(
            f"encoder.weights: {path} does not exist (expected a .safetensors file or a dir with model.safetensors)"
        )
    state = load_file(str(path))
    missing, unexpected = model.load_state_dict(state, strict=False)
    unexpected = [k for k in unexpected if not k.startswith("head.")]
    if missing or unexpected:
        raise ValueError(
            f"encoder.weights {path}: state dict does not match the architecture "
            f"(missing {missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}); "
            "check encoder.name/encoder.kwargs against the checkpoint's config.json"
        )


def _create_timm(cfg: EncoderConfig) -> nn.Module:
    import json

    import timm

    name, kwargs = cfg.name, dict(cfg.kwargs)
    if (
        name == "auto"
    ):  # architecture recorded beside the weights (e.g. the demo encoder written by `harness prep demo`)
        cfg_file = Path(cfg.weights or "") / "config.json"
        if not cfg.weights or not cfg_file.is_file():
            raise FileNotFoundError(
                f"encoder.name=auto needs encoder.weights to be a directory with config.json; {cfg_file} not found"
            )
        meta = json.loads(cfg_file.read_text())
        name, kwargs = meta["timm_model"], {**meta.get("timm_kwargs", {}), **kwargs}
    kwargs.setdefault("num_classes", 0)
    model = timm.create_model(name, pretrained=False, **kwargs)
    if cfg.weights:
        load_timm_weights(model, cfg.weights)
    return model


@register_backbone("timm_vit")
def _build_vit(cfg: EncoderConfig, *, x0_pool: str = "cls", **_: Any) -> PromptableEncoder:
    from mope.backbones.timm_vit import TimmViTAdapter

    return TimmViTAdapter(_create_timm(cfg), x0_pool=x0_pool)


@register_backbone("timm_swin")
def _build_swin(
    cfg: EncoderConfig,
    *,
    x0_pool: str = "mean_all_tokens",
    window_prompt_layout: str = "correct",
    pool_includes_prompts: bool = True,
    **_: Any,
) -> PromptableEncoder:
    from mope.backbones.timm_swin import TimmSwinAdapter

    return TimmSwinAdapter(
        _create_timm(cfg),
        x0_pool=x0_pool,
        window_prompt_layout=window_prompt_layout,
        pool_includes_prompts=pool_includes_prompts,
    )


@register_backbone("hf_bert")
def _build_bert(cfg: EncoderConfig, *, x0_pool: str = "cls", **_: Any) -> PromptableEncoder:
    from mope.backbones.hf_bert import HFBertAdapter, build_bert

    model = build_bert(cfg.name, config_overrides=dict(cfg.kwargs) or None, weights=cfg.weights)
    return HFBertAdapter(model, pool=cfg.pool, x0_pool=x0_pool)


@register_backbone("hf_wav2vec2")
def _build_wav2vec2(cfg: EncoderConfig, *, x0_pool: str = "mean_patches", **adapter_kwargs: Any) -> PromptableEncoder:
    """cfg.kwargs are Wav2Vec2Config overrides, except the adapter options named in ``ADAPTER_OPTIONS`` (group_norm,
    normalize_waveform, upstream_train_mode, nominal_samples), which go to the adapter. cfg.pool is not used (the
    feature is always the mean over valid frames)."""
    from mope.backbones.hf_wav2vec2 import ADAPTER_OPTIONS, HFWav2Vec2Adapter, build_wav2vec2

    overrides = dict(cfg.kwargs)
    opts = {k: overrides.pop(k) for k in ADAPTER_OPTIONS if k in overrides}
    opts.update({k: v for k, v in adapter_kwargs.items() if k in ADAPTER_OPTIONS})
    model = build_wav2vec2(cfg.name, config_overrides=overrides or None, weights=cfg.weights)
    return HFWav2Vec2Adapter(model, x0_pool=x0_pool, **opts)


DEFAULT_X0_POOL = {"timm_vit": "cls", "timm_swin": "mean_all_tokens", "hf_bert": "cls", "hf_wav2vec2": "mean_patches"}
DEFAULT_ROUTE_BLOCK0 = {"timm_vit": True, "timm_swin": False, "hf_bert": True, "hf_wav2vec2": True}

__all__ = [
    "BlockPrompter",
    "DEFAULT_ROUTE_BLOCK0",
    "DEFAULT_X0_POOL",
    "EncoderLayout",
    "PromptableEncoder",
    "create_encoder",
    "list_backbones",
    "load_timm_weights",
    "pool_x0",
    "register_backbone",
]
