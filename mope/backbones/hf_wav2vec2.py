"""Prompt-tunable adapter around a frozen Hugging Face ``Wav2Vec2Model`` (audio encoder).

Reference: songrise/MoPE ``models/wav2vec.py``: ``Wav2Vec2Model.from_pretrained("facebook/wav2vec2-base-960h",
config=Wav2Vec2Config())`` (a Wav2Vec2ForCTC checkpoint, base architecture), feature = ``AdaptiveAvgPool1d`` over the
last hidden state. The reference pools over every frame of its (unpadded) input; we pool over the **valid** frames of
each zero-padded sample, so a sample gives the same feature alone and inside any batch.

The adapter drives the untouched ``Wav2Vec2Model`` itself (composition, like :mod:`mope.backbones.hf_bert`):

1. ``feature_extractor`` (conv stack) on the raw waveform, ``feature_projection``; padded frames are zeroed;
2. ``encoder.pos_conv_embed`` on the real frames (positions come from this convolution only, so prompts, inserted
   afterwards, get no positional signal), then ``encoder.layer_norm`` (post-LN ``Wav2Vec2Encoder`` only) and dropout;
3. before each Transformer layer i the :class:`~mope.backbones.base.BlockPrompter` supplies that layer's prompts, which
   replace the current prompt slots (VPT-deep); ``None`` keeps the current ones. The sequence is ``[prompts (P),
   frames (N)]``; prompts attend and are attended, padding frames are masked as keys, prompts never are;
4. prompts are stripped, then ``encoder.layer_norm`` (``do_stable_layer_norm=True`` variant,
   ``Wav2Vec2EncoderStableLayerNorm``, whose norm follows the layers), then the mean over valid frames.

Frame validity follows transformers' rule (``Wav2Vec2Model._get_feature_vector_attention_mask``): a sample with
``l`` valid waveform samples (right padding; ``audio_mask.sum(-1)``) has ``_get_feat_extract_output_lengths(l)`` valid
frames. **One deliberate difference** from ``Wav2Vec2Model(audio, attention_mask=mask)``: models with
``feat_extract_norm="group"`` (wav2vec2-base) normalise the first conv layer's output with a ``GroupNorm`` over the
time axis; transformers computes those statistics over the whole padded row (zeros included), which makes a padded
sample's feature depend on the batch (the reason HF advises not to pass an attention mask to wav2vec2-base). With
``group_norm="valid"`` (default) the statistics cover each sample's valid positions only, i.e. exactly what the sample
gives alone; ``group_norm="upstream"`` reproduces transformers. Without padding both are identical.

Never applied here: SpecAugment (``apply_spec_augment`` / ``mask_time_prob``; we never pass ``mask_time_indices`` and
never call ``_mask_hidden_states``) and LayerDrop. By default the upstream model always runs in eval mode (dropout off,
``upstream_train_mode=False``); HF gradient checkpointing therefore stays inactive (it checks ``self.training``).

Transformers internals we depend on: ``feature_extractor.conv_layers[j]`` (``.conv``, ``.layer_norm``, ``.activation``
for the GroupNorm layer), ``feature_projection(x) -> (hidden, normed)``, ``encoder.pos_conv_embed``,
``encoder.layer_norm``, ``encoder.dropout``, ``encoder.layers[i](hidden, mask)`` (tensor in v5, tuple in v4),
``_get_feat_extract_output_lengths``, and the attention-mask helper shared with the BERT adapter.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from .base import X0_POOLS, BlockPrompter, EncoderInputs, EncoderLayout, PromptableEncoder
from .hf_bert import _load_state_dict, _masked_mean, _PromptMasks, run_prompted_layers

logger = logging.getLogger(__name__)

# Prompt init bound, uniform(-s, s). The reference has no audio prompts; we reuse its text (BERT) choice 0.3 (models/
# bert.py, mope-reference §1.3): like BERT, wav2vec2-base is a post-LN Transformer whose layer inputs are LayerNorm
# outputs (unit scale per token), so prompts of that scale are comparable to real tokens (VPT's patch-area rule has no
# meaning for a waveform). Override with mope.prompt_init_scale.
WAV2VEC2_PROMPT_INIT_SCALE = 0.3
NOMINAL_SAMPLES = 160_000  # 10 s at 16 kHz: the clip length behind attention_lengths (harness inspect)
SAMPLE_RATE = 16_000
X0_POOLS_AUDIO = ("mean_all_tokens", "mean_patches")  # no [CLS] token in wav2vec2
GROUP_NORMS = ("valid", "upstream")
ADAPTER_OPTIONS = ("group_norm", "normalize_waveform", "upstream_train_mode", "nominal_samples")

_BASE_NAMES = frozenset({"facebook/wav2vec2-base-960h", "wav2vec2-base-960h", "wav2vec2-base"})
# Head / pre-training modules of the wrappers whose checkpoints we accept (Wav2Vec2ForCTC: lm_head; ForPreTraining:
# quantizer, project_q, project_hid; ForSequenceClassification: projector, classifier). Their keys are ignored.
_HEAD_PREFIXES = ("lm_head.", "quantizer.", "project_q.", "project_hid.", "projector.", "classifier.")
_BASE_PREFIX = "wav2vec2."


def _unpack_audio(inputs: EncoderInputs) -> tuple[Tensor, Tensor | None]:
    if isinstance(inputs, Tensor):
        return inputs, None
    if isinstance(inputs, Mapping):
        if "audio" not in inputs:
            raise KeyError(f"audio inputs need 'audio' (B, L) waveform (got keys {sorted(inputs)})")
        return inputs["audio"], inputs.get("audio_mask")
    raise TypeError(f"audio inputs must be a (B, L) waveform tensor or a mapping, got {type(inputs).__name__}")


def _conv_out(lengths: Tensor, kernel: int, stride: int) -> Tensor:
    return torch.div(lengths - kernel, stride, rounding_mode="floor") + 1


def _valid_group_norm(y: Tensor, n_valid: Tensor, gn: nn.GroupNorm) -> Tensor:
    """``gn(y)`` with the statistics of each row taken over its first ``n_valid`` time steps only; y: (B, C, T)."""
    B, C, T = y.shape
    G = gn.num_groups
    yf = y.float().reshape(B, G, C // G, T)
    m = (torch.arange(T, device=y.device) < n_valid[:, None]).to(yf.dtype).view(B, 1, 1, T)
    count = (m.sum(dim=-1, keepdim=True) * (C // G)).clamp_min(1.0)  # (B, 1, 1, 1)
    mean = (yf * m).sum(dim=(2, 3), keepdim=True) / count
    var = ((yf - mean).square() * m).sum(dim=(2, 3), keepdim=True) / count  # biased, as GroupNorm
    out = ((yf - mean) * torch.rsqrt(var + gn.eps)).reshape(B, C, T).to(y.dtype)
    if gn.affine:
        out = out * gn.weight.view(1, C, 1).to(y.dtype) + gn.bias.view(1, C, 1).to(y.dtype)
    return out


def normalize_waveform(audio: Tensor, lengths: Tensor | None) -> Tensor:
    """Zero mean, unit variance per clip over its valid samples, padding kept at 0 (``Wav2Vec2FeatureExtractor``
    with ``do_normalize=True``, as the wav2vec2-base-960h processor does)."""
    x = audio.float()
    if lengths is None:
        out = (x - x.mean(dim=-1, keepdim=True)) / torch.sqrt(x.var(dim=-1, unbiased=False, keepdim=True) + 1e-7)
        return out.to(audio.dtype)
    m = (torch.arange(x.shape[-1], device=x.device) < lengths[:, None]).to(x.dtype)
    n = m.sum(dim=-1, keepdim=True).clamp_min(1.0)
    mean = (x * m).sum(dim=-1, keepdim=True) / n
    var = ((x - mean).square() * m).sum(dim=-1, keepdim=True) / n
    return ((x - mean) / torch.sqrt(var + 1e-7) * m).to(audio.dtype)


class HFWav2Vec2Adapter(PromptableEncoder):
    """Deep/shallow prompt tuning of a frozen HF ``Wav2Vec2Model`` without forking it.

    Args:
        model: the upstream ``transformers.Wav2Vec2Model`` (kept untouched as ``self.model``; call :meth:`freeze` for
            prompt tuning). Models with ``config.add_adapter=True`` (a conv adapter after the encoder) are refused.
        x0_pool: the prompter's x0 from each layer input: ``"mean_patches"`` (default; mean over the valid frames,
            prompts and padding excluded) or ``"mean_all_tokens"`` (mean over prompts + valid frames). ``"cls"`` is
            an error: wav2vec2 has no [CLS] token.
        group_norm: ``"valid"`` (default, batch-independent) or ``"upstream"`` (transformers' statistics over the
            padded row), see the module docstring. Only matters for ``feat_extract_norm="group"`` with padding.
        normalize_waveform: apply the processor's per-clip zero-mean/unit-variance normalisation (over valid samples)
            before the conv stack. Default False: the inputs are expected to be normalised already (or raw, as the
            caller decides); the wav2vec2-base-960h processor normalises (``do_normalize=True``).
        upstream_train_mode: False (default): the upstream model always runs in eval mode (dropout off, frozen
            encoder policy); True: its dropout follows the adapter's training flag (fine-tuning baselines).
        nominal_samples: clip length (samples) behind :meth:`attention_lengths` (default 10 s at 16 kHz).

    Inputs: a (B, L) float waveform at 16 kHz, or a mapping with ``"audio"`` (B, L) and optional ``"audio_mask"``
    (B, L) (1 = valid sample, 0 = right padding; the loader zero-pads). Output: (B, hidden) mean of the final hidden
    states over the valid frames. A clip shorter than the conv stack's receptive field (400 samples for base) counts as
    one frame (transformers would fail on it alone).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        x0_pool: str = "mean_patches",
        group_norm: str = "valid",
        normalize_waveform: bool = False,
        upstream_train_mode: bool = False,
        nominal_samples: int = NOMINAL_SAMPLES,
    ) -> None:
        super().__init__()
        if x0_pool == "cls":
            raise ValueError(
                "x0_pool='cls': wav2vec2 has no [CLS] token; use 'mean_patches' (mean over valid frames, the default) "
                "or 'mean_all_tokens'"
            )
        if x0_pool not in X0_POOLS:
            raise ValueError(f"x0_pool={x0_pool!r}: allowed values for hf_wav2vec2 are {X0_POOLS_AUDIO}")
        if group_norm not in GROUP_NORMS:
            raise ValueError(f"group_norm={group_norm!r}: allowed values are {GROUP_NORMS}")
        if getattr(model, "adapter", None) is not None:
            raise ValueError(
                "Wav2Vec2Model with config.add_adapter=True (conv adapter after the encoder) is not supported"
            )
        self.model = model
        self.x0_pool = x0_pool
        self.group_norm = group_norm
        self.normalize_waveform = bool(normalize_waveform)
        self.upstream_train_mode = bool(upstream_train_mode)
        self.nominal_samples = int(nominal_samples)
        cfg = model.config
        self.stable_layer_norm = bool(getattr(cfg, "do_stable_layer_norm", False))
        self.hidden_size = int(cfg.hidden_size)
        self.num_layers = len(model.encoder.layers)
        self.layout = EncoderLayout(
            block_dims=[self.hidden_size] * self.num_layers,
            block_stage=[0] * self.num_layers,
            out_dim=self.hidden_size,
            prompt_init_scale=WAV2VEC2_PROMPT_INIT_SCALE,
            stage_first_blocks=frozenset({0}),
        )
        self.train(self.training)  # apply the upstream mode policy from the start

    def extra_repr(self) -> str:
        return (
            f"x0_pool={self.x0_pool!r}, group_norm={self.group_norm!r}, normalize_waveform={self.normalize_waveform}, "
            f"layers={self.num_layers}, hidden={self.hidden_size}, stable_layer_norm={self.stable_layer_norm}"
        )

    def train(self, mode: bool = True) -> HFWav2Vec2Adapter:
        super().train(mode)
        if not self.upstream_train_mode:
            self.model.eval()
        return self

    def freeze(self) -> None:
        """No gradient anywhere in the upstream model (also clears the feature encoder's ``_requires_grad`` flag)."""
        super().freeze()
        fe = self.model.feature_extractor
        if hasattr(fe, "_freeze_parameters"):
            fe._freeze_parameters()

    # ---------------------------------------------------------------------------------------------------------------
    def num_frames(self, num_samples: Tensor | int) -> Tensor:
        """Frames the conv stack makes of ``num_samples`` waveform samples (transformers' own formula)."""
        if not isinstance(num_samples, Tensor):
            num_samples = torch.tensor(num_samples)
        return self.model._get_feat_extract_output_lengths(num_samples, add_adapter=False).to(torch.long)

    def _frontend_modules(self) -> list[nn.Module]:
        m = self.model
        mods = [m.feature_extractor, m.feature_projection, m.encoder.pos_conv_embed]
        if not self.stable_layer_norm:
            mods.append(m.encoder.layer_norm)
        return mods

    def _frontend(self, audio: Tensor, lengths: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """Conv features -> projection -> positional conv (+ LayerNorm, post-LN variant) -> dropout: (B, N, H)."""
        m = self.model
        fe = m.feature_extractor
        x = audio[:, None]
        grad_hack = (
            getattr(fe, "_requires_grad", False) and fe.training and torch.is_grad_enabled() and not x.requires_grad
        )
        if grad_hack and any(p.requires_grad for p in fe.parameters()):  # upstream's hack for checkpointed convs
            x.requires_grad = True
        cfg = m.config
        for j, layer in enumerate(fe.conv_layers):
            gn = getattr(layer, "layer_norm", None)
            if j == 0 and lengths is not None and self.group_norm == "valid" and isinstance(gn, nn.GroupNorm):
                n0 = _conv_out(lengths, cfg.conv_kernel[0], cfg.conv_stride[0]).clamp_min(1)
                x = layer.activation(_valid_group_norm(layer.conv(x), n0, gn))
            else:
                x = layer(x)
        x = x.transpose(1, 2)  # (B, N, C)
        frame_mask = None
        if lengths is not None:
            n_frames = self.num_frames(lengths).clamp(1, x.shape[1])
            frame_mask = torch.arange(x.shape[1], device=x.device)[None, :] < n_frames[:, None]
        h, _ = m.feature_projection(x)
        if frame_mask is not None:
            h = h.masked_fill(~frame_mask[..., None], 0.0)  # as Wav2Vec2Encoder: padded frames are 0 for pos_conv
        enc = m.encoder
        h = h + enc.pos_conv_embed(h).to(h.device)
        if not self.stable_layer_norm:
            h = enc.layer_norm(h)
        return enc.dropout(h), frame_mask

    def _x0(self, h: Tensor, num_prompts: int, masks: _PromptMasks) -> Tensor:
        if self.x0_pool == "mean_all_tokens":
            return h.mean(dim=1) if masks.mask2d is None else _masked_mean(h, masks.ext2d(num_prompts))
        frames = h[:, num_prompts:]
        return frames.mean(dim=1) if masks.mask2d is None else _masked_mean(frames, masks.mask2d)

    @staticmethod
    def insert_prompts(h: Tensor, prompts: Tensor, num_current: int) -> Tensor:
        """Replace the first ``num_current`` slots of ``h`` (B, P+N, H) by ``prompts`` (B|1, P', H)."""
        if prompts.dim() != 3 or prompts.shape[-1] != h.shape[-1]:
            raise ValueError(f"prompts must be (B, P, {h.shape[-1]}), got {tuple(prompts.shape)}")
        if prompts.shape[0] != h.shape[0]:
            prompts = prompts.expand(h.shape[0], -1, -1)
        return torch.cat([prompts.to(h.dtype), h[:, num_current:]], dim=1)

    def forward_tokens(
        self, inputs: EncoderInputs, prompter: BlockPrompter | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """Final hidden states of the frames (prompts removed), (B, N, H), and the (B, N) bool frame mask (or None)."""
        audio, audio_mask = _unpack_audio(inputs)
        if audio.dim() != 2:
            raise ValueError(f"audio must be a (B, L) waveform, got shape {tuple(audio.shape)}")
        conv_w = self.model.feature_extractor.conv_layers[0].conv.weight
        audio = audio.to(device=conv_w.device, dtype=conv_w.dtype)
        lengths = None
        if audio_mask is not None:
            lengths = audio_mask.to(audio.device).sum(dim=-1).to(torch.long)  # right padding (transformers' rule)
        if self.normalize_waveform:
            audio = normalize_waveform(audio, lengths)
        frozen = not audio.requires_grad and not any(
            p.requires_grad for mod in self._frontend_modules() for p in mod.parameters()
        )
        with torch.no_grad() if frozen else contextlib.nullcontext():  # no autograd graph over the conv stack
            h, frame_mask = self._frontend(audio, lengths)
        masks = _PromptMasks(self.model.config, frame_mask, prefix=0)
        h, num_prompts = run_prompted_layers(
            self.model.encoder.layers, h, masks, prompter, self._x0, self.insert_prompts
        )
        h = h[:, num_prompts:]
        if self.stable_layer_norm:
            h = self.model.encoder.layer_norm(h)
        return h, frame_mask

    def forward(self, inputs: EncoderInputs, prompter: BlockPrompter | None = None) -> Tensor:
        h, frame_mask = self.forward_tokens(inputs, prompter)
        return h.mean(dim=1) if frame_mask is None else _masked_mean(h, frame_mask)

    def attention_lengths(self, num_prompts: int) -> list[int]:
        """Per layer: frames of a nominal ``nominal_samples`` clip (499 for 10 s, base conv stack) + prompts."""
        return [int(self.num_frames(self.nominal_samples)) + num_prompts] * self.num_layers


# --------------------------------------------------------------------------------------------------------------------
# Loading helpers (offline).
# --------------------------------------------------------------------------------------------------------------------


def _weights_file(path: str) -> str | None:
    if os.path.isfile(path):
        return path
    for name in ("model.safetensors", "pytorch_model.bin"):
        p = os.path.join(path, name)
        if os.path.isfile(p):
            return p
    return None


def _adapt_state_dict(sd: Mapping[str, Tensor], model_keys: set[str]) -> tuple[dict[str, Tensor], list[str]]:
    """Strip a ForCTC/ForPreTraining ``wav2vec2.`` prefix, drop head keys, map weight-norm names; (state, ignored)."""
    out: dict[str, Tensor] = {}
    ignored: list[str] = []
    prefixed = any(k.startswith(_BASE_PREFIX) for k in sd)
    for k, v in sd.items():
        if prefixed and k.startswith(_BASE_PREFIX):
            k = k[len(_BASE_PREFIX) :]
        elif k.startswith(_HEAD_PREFIXES):
            ignored.append(k)
            continue
        # weight norm of pos_conv_embed: old checkpoints (weight_g / weight_v) vs torch parametrizations
        for old, new in (
            (".weight_g", ".parametrizations.weight.original0"),
            (".weight_v", ".parametrizations.weight.original1"),
        ):
            if k.endswith(old) and k not in model_keys and k[: -len(old)] + new in model_keys:
                k = k[: -len(old)] + new
            elif k.endswith(new) and k not in model_keys and k[: -len(new)] + old in model_keys:
                k = k[: -len(new)] + old
        out[k] = v
    return out, ignored


def load_wav2vec2_weights(model: nn.Module, path: str) -> None:
    """Strict load of a Wav2Vec2Model / Wav2Vec2ForCTC state dict (safetensors or torch) from a file or directory.

    Accepted: a ``wav2vec2.`` prefix (stripped), head keys (``lm_head.*`` etc., ignored), ``weight_g``/``weight_v``
    weight-norm names, and a missing ``masked_spec_embed`` (SpecAugment's vector, never used here). Anything else
    missing or unexpected raises, naming the keys.
    """
    wfile = _weights_file(os.path.expanduser(path))
    if wfile is None:
        raise FileNotFoundError(
            f"wav2vec2 weights: {path!r} is neither a file nor a directory with model.safetensors / pytorch_model.bin"
        )
    own = model.state_dict()
    sd, ignored = _adapt_state_dict(_load_state_dict(wfile), set(own))
    missing = [k for k in own if k not in sd and k != "masked_spec_embed"]
    unexpected = [k for k in sd if k not in own]
    shapes = [
        f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in sd.items() if k in own and v.shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        raise ValueError(
            f"wav2vec2 weights {wfile!r} do not fit the architecture: missing {missing[:8]}"
            f"{'...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}, "
            f"shape mismatches (checkpoint vs model) {shapes[:4]}{'...' if len(shapes) > 4 else ''}; "
            "check encoder.name / encoder.kwargs against the checkpoint's config.json"
        )
    model.load_state_dict(sd, strict=False)
    if ignored:
        logger.info("%s: ignored %d head keys (e.g. %s)", wfile, len(ignored), ignored[0])


def build_wav2vec2(name_or_path: str, config_overrides: dict | None = None, weights: str | None = None) -> nn.Module:
    """Build a ``transformers.Wav2Vec2Model`` without touching the network.

    - a local directory with ``config.json`` + ``model.safetensors`` / ``pytorch_model.bin`` (a ``save_pretrained`` or
      ``huggingface-cli download`` copy; a Wav2Vec2ForCTC checkpoint such as wav2vec2-base-960h is accepted):
      architecture from its config (+ ``config_overrides``), weights loaded strictly;
    - ``"facebook/wav2vec2-base-960h"``, ``"wav2vec2-base-960h"``, ``"wav2vec2-base"`` (when no such local directory
      exists): **random init** from ``Wav2Vec2Config()`` defaults (= the base architecture) + ``config_overrides``;
    - ``weights``: a local safetensors/torch file, or a directory holding one, loaded on top (strict);
    - anything else: ValueError (nothing is downloaded).

    ``config_overrides`` are ``Wav2Vec2Config`` attributes; ``attn_implementation`` is honoured.
    """
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    overrides = dict(config_overrides or {})
    attn_impl = overrides.pop("attn_implementation", None)
    path = os.path.expanduser(str(name_or_path))
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise FileNotFoundError(f"encoder.name={name_or_path!r}: directory has no config.json")
        wfile = _weights_file(path)
        if wfile is None and weights is None:
            raise FileNotFoundError(
                f"encoder.name={name_or_path!r}: config.json but no model.safetensors / pytorch_model.bin; "
                "pass encoder.weights"
            )
        config = Wav2Vec2Config.from_pretrained(path, local_files_only=True, **overrides)
    elif str(name_or_path).lower() in _BASE_NAMES:
        wfile = None
        config = Wav2Vec2Config(**overrides)
        if weights is None:
            logger.warning(
                "build_wav2vec2(%r): random-init wav2vec2 (base architecture; nothing is downloaded); set "
                "encoder.name to a local copy for pretrained weights",
                name_or_path,
            )
    else:
        raise ValueError(
            f"encoder.name={name_or_path!r} is not a local directory nor a known architecture name "
            f"({sorted(_BASE_NAMES)}); nothing is downloaded. To use a hub checkpoint, fetch it on a machine with "
            "internet: `huggingface-cli download facebook/wav2vec2-base-960h --local-dir DIR`, copy DIR here and set "
            "encoder.name=DIR"
        )
    if attn_impl is not None:
        config._attn_implementation = attn_impl
    model = Wav2Vec2Model(config)
    if wfile is not None:
        load_wav2vec2_weights(model, wfile)
    if weights is not None:
        load_wav2vec2_weights(model, weights)
    return model


__all__ = [
    "ADAPTER_OPTIONS",
    "NOMINAL_SAMPLES",
    "WAV2VEC2_PROMPT_INIT_SCALE",
    "HFWav2Vec2Adapter",
    "build_wav2vec2",
    "load_wav2vec2_weights",
    "normalize_waveform",
]
