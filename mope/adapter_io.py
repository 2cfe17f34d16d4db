"""Adapter-only save/load: the trainable tensors (+ the buffers of the trainable modules, e.g. frozen routing keys and
the mapper's BN statistics, without which the adapter would not reproduce), as safetensors.

The safetensors metadata carries the model config and a fingerprint (sha256) of every *frozen* encoder weight the
adapter was trained on, in the same atomic file: loading checks the config, the frozen backbones and every shape, and
names what differs. ``<dir>/mope_config.json`` is a human-readable copy of the same config. Writes are atomic (temp
file, fsync, rename), so an interrupted save never leaves a truncated or mismatched adapter behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mope.config import FusionConfig
from mope.model import FusionModel

ADAPTER_FILE = "adapter.safetensors"
CONFIG_FILE = "mope_config.json"
_ADAPTER_MODULES = ("main_prompts", "comp_prompts", "head")
# Fields that do not change the adapter's tensors or meaning (where the frozen weights live, training-only knobs).
_IGNORED_FIELDS = {("vision", "weights"), ("text", "weights"), ("mope", "prompt_dropout"), ("comp_prompt_dropout",)}


class AdapterMismatchError(ValueError):
    """The saved adapter does not fit the model it is loaded into."""


def adapter_state_dict(model: FusionModel) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            state[name] = p.detach()
    for name, b in model.named_buffers():
        if name.split(".", 1)[0] in _ADAPTER_MODULES:
            state[name] = b.detach()
    return state


def frozen_fingerprints(model: FusionModel) -> dict[str, str]:
    """sha256 of the frozen weights of each encoder (what the adapter was trained on top of)."""
    out = {}
    for name in ("main_encoder", "comp_encoder"):
        enc = getattr(model, name)
        if enc is None:
            continue
        h = hashlib.sha256()
        for k, t in sorted(enc.state_dict(keep_vars=True).items()):
            if getattr(t, "requires_grad", False):
                continue  # fine-tuned weights are in the adapter itself
            t = t.detach().to("cpu").contiguous()
            h.update(f"{k}|{t.dtype}|{tuple(t.shape)}\n".encode())
            if t.numel():
                h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        out[name] = h.hexdigest()
    return out


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_adapter(model: FusionModel, out_dir: str | Path, *, is_main_process: bool = True, extra: dict | None = None) -> Path:
    """Writes the adapter; only the main process writes (DDP/DeepSpeed ranks must not race on one file)."""
    out = Path(out_dir)
    if not is_main_process:
        return out
    state = {k: v.contiguous().cpu() for k, v in adapter_state_dict(model).items()}
    doc = {"model": model.cfg.to_dict(), "frozen_fingerprints": frozen_fingerprints(model), **(extra or {})}
    meta = {"format": "mope-adapter", "num_tensors": str(len(state)), "mope_config": json.dumps(doc, sort_keys=True)}
    _atomic_write(out / ADAPTER_FILE, lambda p: save_file(state, p, metadata=meta))
    _atomic_write(out / CONFIG_FILE, lambda p: Path(p).write_text(json.dumps(doc, indent=2, sort_keys=True)))
    return out


def _diff(a: dict, b: dict, prefix: tuple = ()) -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        key = prefix + (k,)
        if key in _IGNORED_FIELDS:
            continue
        va, vb = a.get(k, "<missing>"), b.get(k, "<missing>")
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _diff(va, vb, key)
        elif va != vb:
            out.append(f"{'.'.join(key)}: saved {va!r}, model {vb!r}")
    return out


def _read_doc(adapter_dir: Path) -> dict | None:
    with safe_open(str(adapter_dir / ADAPTER_FILE), framework="pt") as f:
        meta = f.metadata() or {}
    return json.loads(meta["mope_config"]) if "mope_config" in meta else None


def read_adapter_config(adapter_dir: str | Path) -> FusionConfig:
    doc = _read_doc(Path(adapter_dir))
    if doc is None:
        raise AdapterMismatchError(f"{Path(adapter_dir) / ADAPTER_FILE} carries no config (not written by save_adapter)")
    return FusionConfig.from_dict(doc["model"])


def load_adapter(model: FusionModel, adapter_dir: str | Path, *, check_config: bool = True) -> None:
    """Loads an adapter saved by :func:`save_adapter` into `model`, exactly (strict keys and shapes)."""
    d = Path(adapter_dir)
    if not (d / ADAPTER_FILE).is_file():
        raise FileNotFoundError(f"{d / ADAPTER_FILE} not found: not an adapter directory written by save_adapter")
    if check_config:
        doc = _read_doc(d)
        if doc is None:
            raise AdapterMismatchError(
                f"{d / ADAPTER_FILE} carries no model config, so it cannot be checked; pass check_config=False to load "
                "it anyway (shapes are still checked)"
            )
        diffs = _diff(doc["model"], model.cfg.to_dict())
        saved_fp, now_fp = doc.get("frozen_fingerprints", {}), frozen_fingerprints(model)
        diffs += [
            f"frozen {k} weights differ from those the adapter was trained on (sha256 {saved_fp[k][:12]} vs "
            f"{now_fp.get(k, 'absent')[:12]}): check vision.weights / text.weights"
            for k in saved_fp
            if saved_fp[k] != now_fp.get(k)
        ]
        if diffs:
            raise AdapterMismatchError(
                f"adapter {d} was saved for a different model configuration:\n  " + "\n  ".join(diffs)
                + "\nBuild the model from the adapter's config (mope.adapter_io.read_adapter_config) or pass matching overrides."
            )
    state = load_file(str(d / ADAPTER_FILE))
    expected = adapter_state_dict(model)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [f"{k}: saved {tuple(state[k].shape)}, model {tuple(v.shape)}" for k, v in expected.items()
              if k in state and state[k].shape != v.shape]
    if missing or unexpected or shapes:
        raise AdapterMismatchError(
            f"adapter {d} does not fit this model: missing {missing[:8]}, unexpected {unexpected[:8]}, "
            f"shape mismatches {shapes[:8]}"
        )
    with torch.no_grad():
        params = dict(model.named_parameters())
        buffers = dict(model.named_buffers())
        for k, v in state.items():
            target = params.get(k, buffers.get(k))
            target.copy_(v.to(target.dtype))
