"""Adapter-only save/load: the trainable tensors (+ the buffers of the trainable modules, e.g. frozen routing keys and
the mapper's BN statistics, without which the adapter would not reproduce), as safetensors, with the model config as
JSON beside them. Loading checks the config and every shape and names what differs.

Files: ``<dir>/adapter.safetensors`` and ``<dir>/mope_config.json``. Writes are atomic (temp file + rename), so an
interrupted save never leaves a truncated adapter behind.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
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


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
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
    meta = {"format": "mope-adapter", "num_tensors": str(len(state))}
    _atomic_write(out / ADAPTER_FILE, lambda p: save_file(state, p, metadata=meta))
    doc = {"model": model.cfg.to_dict(), **(extra or {})}
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


def read_adapter_config(adapter_dir: str | Path) -> FusionConfig:
    doc = json.loads((Path(adapter_dir) / CONFIG_FILE).read_text())
    return FusionConfig.from_dict(doc["model"])


def load_adapter(model: FusionModel, adapter_dir: str | Path, *, check_config: bool = True) -> None:
    """Loads an adapter saved by :func:`save_adapter` into `model`, exactly (strict keys and shapes)."""
    d = Path(adapter_dir)
    if not (d / ADAPTER_FILE).is_file():
        raise FileNotFoundError(f"{d / ADAPTER_FILE} not found: not an adapter directory written by save_adapter")
    if check_config and (d / CONFIG_FILE).is_file():
        saved = json.loads((d / CONFIG_FILE).read_text())["model"]
        diffs = _diff(saved, model.cfg.to_dict())
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
