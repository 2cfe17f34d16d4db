"""Complementary encoders used as black boxes (paper Table 5: BoW, frozen BERT, frozen GPT-2, ...).

A black-box encoder is frozen and not prompt-tuned, so its features depend only on the input and the weights: they can
be computed once per dataset and cached. :meth:`FrozenTextEncoder.weights_fingerprint` gives a stable key for that
cache.

Reference (songrise/MoPE ``models/bow.py``): BoW = BERT word embeddings, mean over the sequence, then a
``Linear(768, d)`` feature projector. Note the reference averages over **all** positions, padding included (it pads
to the longest text in the batch), so its feature depends on the batch; we average over real tokens by default
(``mean_over="all_tokens"`` reproduces the reference). The reference ``freeze_backbone`` also freezes the projector.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .base import EncoderInputs, PromptableEncoder
from .hf_bert import _masked_mean, _unpack_inputs


def state_dict_fingerprint(module: nn.Module) -> str:
    """sha256 over the (sorted) state dict: names, dtypes, shapes and raw bytes of every tensor."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach()
        h.update(f"{name}|{str(t.dtype).removeprefix('torch.')}|{tuple(t.shape)}\n".encode())
        flat = t.to("cpu").contiguous().reshape(-1)
        if flat.numel():
            h.update(flat.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class FrozenTextEncoder(nn.Module):
    """Wrap any text encoder (+ optional pool) as a frozen feature extractor.

    Args:
        encoder: maps tokenised text to a vector, or to something ``pool`` turns into one. A
            :class:`~mope.backbones.base.PromptableEncoder` (e.g. ``HFBertAdapter(model, pool="cls")``) or any module
            taking the input tensor is called as ``encoder(inputs)``; otherwise a mapping input is passed as keyword
            arguments (``encoder(**inputs)``, e.g. a raw HF model).
        pool: optional ``pool(encoder_output, inputs) -> (B, D)``, e.g.
            ``lambda out, inp: out.last_hidden_state[:, 0]``.
        out_dim: feature width; inferred from ``encoder.layout.out_dim``, ``encoder.out_dim`` or
            ``encoder.config.hidden_size`` when not given.

    The encoder always runs in eval mode (``train()`` never reaches it) under ``torch.no_grad()`` (not
    ``inference_mode``: the features may feed trainable modules), and its parameters have ``requires_grad=False``.
    """

    def __init__(
        self,
        encoder: nn.Module,
        *,
        pool: Callable[[Any, EncoderInputs], Tensor] | None = None,
        out_dim: int | None = None,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.pool = pool
        for p in self.encoder.parameters():
            p.requires_grad_(False)
        self.encoder.eval()
        if out_dim is None:
            layout = getattr(encoder, "layout", None)
            if layout is not None:
                out_dim = layout.out_dim
            elif getattr(encoder, "out_dim", None) is not None:
                out_dim = encoder.out_dim
            elif getattr(getattr(encoder, "config", None), "hidden_size", None) is not None:
                out_dim = encoder.config.hidden_size
            else:
                raise ValueError("FrozenTextEncoder: cannot infer out_dim; pass out_dim=")
        self.out_dim = int(out_dim)
        self._kwargs_call = isinstance(encoder, nn.Module) and not isinstance(
            encoder, (PromptableEncoder, BagOfWordsEncoder)
        )

    def train(self, mode: bool = True) -> FrozenTextEncoder:
        super().train(mode)
        self.encoder.eval()
        return self

    def forward(self, inputs: EncoderInputs) -> Tensor:
        with torch.no_grad():
            if self._kwargs_call and isinstance(inputs, Mapping):
                out = self.encoder(**inputs)
            else:
                out = self.encoder(inputs)
            return self.pool(out, inputs) if self.pool is not None else out

    def weights_fingerprint(self) -> str:
        """Stable sha256 of the wrapped encoder's state dict (a feature-cache key; recomputed on each call)."""
        return state_dict_fingerprint(self.encoder)

    def cache_key(self) -> str:
        """Fingerprint of weights *and* feature definition (encoder class, its extra_repr such as the pool,
        out_dim)."""
        desc = f"{type(self.encoder).__qualname__}({self.encoder.extra_repr()})|out_dim={self.out_dim}"
        if self.pool is not None:
            desc += f"|pool={getattr(self.pool, '__qualname__', repr(self.pool))}"
        return hashlib.sha256(f"{desc}|{self.weights_fingerprint()}".encode()).hexdigest()


class BagOfWordsEncoder(nn.Module):
    """Mean of (frozen) BERT word embeddings over the real tokens, then an optional trainable projector.

    Args:
        word_embeddings: an ``nn.Embedding`` or its (V, E) weight; copied into a frozen embedding.
        proj_dim: width of the trainable ``Linear(E, proj_dim)`` projector (reference: 768 -> d); None: no projector.
        mean_over: ``"real_tokens"`` (attention_mask == 1, [CLS]/[SEP] included) or ``"all_tokens"`` (the reference:
            padding positions included, batch-dependent).
    """

    def __init__(
        self, word_embeddings: nn.Embedding | Tensor, *, proj_dim: int | None = None, mean_over: str = "real_tokens"
    ) -> None:
        super().__init__()
        if mean_over not in ("real_tokens", "all_tokens"):
            raise ValueError(f"mean_over={mean_over!r}: allowed values are ('real_tokens', 'all_tokens')")
        weight = word_embeddings.weight if isinstance(word_embeddings, nn.Embedding) else word_embeddings
        self.embeddings = nn.Embedding.from_pretrained(weight.detach().clone(), freeze=True)
        self.embed_dim = int(weight.shape[1])
        self.mean_over = mean_over
        self.proj = nn.Linear(self.embed_dim, proj_dim) if proj_dim is not None else None
        self.out_dim = int(proj_dim) if proj_dim is not None else self.embed_dim

    @classmethod
    def from_bert(cls, model: nn.Module, **kwargs: Any) -> BagOfWordsEncoder:
        """From a ``BertModel`` (or an ``HFBertAdapter``): its ``embeddings.word_embeddings``."""
        model = getattr(model, "model", model)
        return cls(model.embeddings.word_embeddings, **kwargs)

    def extra_repr(self) -> str:
        return f"mean_over={self.mean_over!r}, out_dim={self.out_dim}"

    def pooled_embeddings(self, inputs: EncoderInputs) -> Tensor:
        """(B, E) mean word embedding (no projector)."""
        input_ids, attention_mask, _ = _unpack_inputs(inputs)
        e = self.embeddings(input_ids)
        if attention_mask is None or self.mean_over == "all_tokens":
            return e.mean(dim=1)
        return _masked_mean(e, attention_mask.to(e.device))

    def forward(self, inputs: EncoderInputs) -> Tensor:
        x = self.pooled_embeddings(inputs)
        return self.proj(x) if self.proj is not None else x


__all__ = ["BagOfWordsEncoder", "FrozenTextEncoder", "state_dict_fingerprint"]
