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
from safetensors import SafetensorError, safe_open
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


class NotAnAdapterFileError(AdapterMismatchError):
    """The adapter file is not a (complete) safetensors file: truncated, or another format such as a pickle.

    Nothing is ever unpickled: the file's header is checked before the safetensors reader (which never runs code)
    touches it.
    """


_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit on the JSON header


def _not_adapter(path: Path, why: str) -> NotAnAdapterFileError:
    return NotAnAdapterFileError(
        f"not a safetensors adapter file: {path} ({why}); point at an adapter directory written by "
        "mope.adapter_io.save_adapter (harness checkpoints and best/ dirs), or re-run the training that wrote it"
    )


def _check_safetensors_file(path: Path) -> None:
    """Cheap structural check of a safetensors file (8-byte little-endian header size, then a JSON object) so that a
    truncated file or a pickle renamed ``.safetensors`` is refused with the path named, before any reader runs."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError as e:
        raise _not_adapter(path, f"unreadable: {e.strerror or e}") from None
    if len(head) < 9:
        raise _not_adapter(path, f"only {size} bytes")
    if head[:2] == b"PK":
        raise _not_adapter(path, "a zip archive (torch.save format?), refused: it is never unpickled")
    if head[:1] == b"\x80":
        raise _not_adapter(path, "a Python pickle, refused: it is never unpickled")
    n = int.from_bytes(head[:8], "little")
    if head[8:9] != b"{" or n > _MAX_HEADER:
        raise _not_adapter(path, "no safetensors header")
    if 8 + n > size:
        raise _not_adapter(path, f"truncated: header says {8 + n} bytes or more, file has {size}")


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


def save_adapter(
    model: FusionModel, out_dir: str | Path, *, is_main_process: bool = True, extra: dict | None = None
) -> Path:
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
    path = adapter_dir / ADAPTER_FILE
    _check_safetensors_file(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise _not_adapter(path, f"{type(e).__name__}: {e}") from None
    try:
        return json.loads(meta["mope_config"]) if "mope_config" in meta else None
    except json.JSONDecodeError as e:
        raise _not_adapter(path, f"its mope_config metadata is not JSON ({e})") from None


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    _check_safetensors_file(path)
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:  # e.g. truncated tensor data
        raise _not_adapter(path, f"{type(e).__name__}: {e}") from None


def read_adapter_config(adapter_dir: str | Path) -> FusionConfig:
    doc = _read_doc(Path(adapter_dir))
    if doc is None:
        raise AdapterMismatchError(
            f"{Path(adapter_dir) / ADAPTER_FILE} carries no config (not written by save_adapter)"
        )
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
                f"{d / ADAPTER_FILE} carries no model config, so it cannot be checked; "
                "pass check_config=False to load it anyway (shapes are still checked)"
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
                f"adapter {d} was saved for a different model configuration:\n  "
                + "\n  ".join(diffs)
                + "\nBuild the model from the adapter's config (mope.adapter_io.read_adapter_config) "
                "or pass matching overrides."
            )
    state = _load_tensors(d / ADAPTER_FILE)
    expected = adapter_state_dict(model)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [
        f"{k}: saved {tuple(state[k].shape)}, model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
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
