"""Training checkpoints for resume: adapter + optimizer/scheduler/RNG/data-position state, written atomically.

Layout::

    <run_dir>/checkpoints/step-<N>/adapter.safetensors   # mope.adapter_io.save_adapter (trainable tensors only)
                                  /mope_config.json
                                  /train_state.pt        # TRAIN_STATE_FILE (torch.load(weights_only=True) reads it)

A checkpoint is first written into ``checkpoints/.tmp-step-<N>-<pid>`` and then renamed into place, so a directory
named ``step-<N>`` is always complete; leftover ``.tmp-*`` directories of a crashed save are ignored (and cleaned by
the next save). Only the last ``keep_last`` checkpoints are kept.

``train_state.pt`` holds only tensors, dicts, lists, tuples, numbers, strings and ``None`` (numpy and Python RNG
states are converted), so it loads with ``weights_only=True`` and never executes pickled code.

For DeepSpeed engines, :func:`save_engine`/:func:`load_engine` wrap ``engine.save_checkpoint``/``load_checkpoint``
with ``exclude_frozen_parameters=True`` (DeepSpeed worker checkpoints otherwise contain the full frozen model,
ray#43917; architecture.md pitfall 5). The engine checkpoint is collective: *every* rank must call them. DeepSpeed's
files are pickles, so ``save_engine`` records their SHA-256 and ``load_engine`` refuses any file that does not match
before DeepSpeed reads it. The trainer itself (``harness.recipe``) resumes from the weights-only state above, with or
without DeepSpeed: it never calls ``engine.load_checkpoint``.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from collections import Counter, OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mope_data.format import sha256_file

CHECKPOINT_DIR = "checkpoints"
TRAIN_STATE_FILE = "train_state.pt"
STATE_FORMAT = "mope-train-state"
STATE_VERSION = 1
_STEP_RE = re.compile(r"^step-(\d+)$")
_TMP_PREFIX = ".tmp-"


class CheckpointError(RuntimeError):
    """A checkpoint on disk cannot be read (corrupt, truncated, or not written by this module)."""


# -- RNG --------------------------------------------------------------------------------------------------------------
def capture_rng() -> dict[str, Any]:
    """torch (CPU and every CUDA device), numpy's global and Python's ``random`` states, as weights_only-safe data."""
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    version, py_state, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),  # uint32 values fit int64
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": {
            "version": int(version),
            "state": torch.tensor(py_state, dtype=torch.int64),
            "gauss_next": gauss_next,
        },
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: Mapping[str, Any]) -> None:
    """Inverse of :func:`capture_rng`: the next random numbers equal those the saved process would have drawn."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        (
            n["kind"],
            n["keys"].numpy().astype(np.uint32),
            int(n["pos"]),
            int(n["has_gauss"]),
            float(n["cached_gaussian"]),
        )
    )
    p = state["python"]
    random.setstate((int(p["version"]), tuple(int(x) for x in p["state"].tolist()), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
        else:  # resumed on a machine with another GPU count: restore what lines up
            for i, s in enumerate(cuda_states[: torch.cuda.device_count()]):
                torch.cuda.set_rng_state(s, i)


# -- validation of the saved structure --------------------------------------------------------------------------------
_PLAIN_SCALARS = (str, int, float, bool, type(None))


def check_weights_only_safe(obj: Any, where: str = "state") -> None:
    """Raises ``TypeError`` naming the first value ``torch.load(weights_only=True)`` could not read back.

    Allowed: tensors, dict (incl. OrderedDict/Counter, as in optimizer and MultiStepLR states), list, tuple, str,
    int, float, bool, None, ``torch.dtype``/``torch.Size``. Convert numpy arrays to tensors and numpy scalars with
    ``.item()``.
    """
    if isinstance(obj, (torch.Tensor, torch.dtype, torch.Size, *_PLAIN_SCALARS)):
        return
    if type(obj) in (dict, OrderedDict, Counter):
        for k, v in obj.items():
            if not isinstance(k, _PLAIN_SCALARS):
                raise TypeError(f"{where}: key {k!r} of type {type(k).__name__} is not weights_only-safe")
            check_weights_only_safe(v, f"{where}[{k!r}]")
        return
    if type(obj) in (list, tuple):
        for i, v in enumerate(obj):
            check_weights_only_safe(v, f"{where}[{i}]")
        return
    hint = " (use torch.from_numpy / .item())" if type(obj).__module__.startswith("numpy") else ""
    raise TypeError(
        f"{where}: value of type {type(obj).__module__}.{type(obj).__qualname__} cannot be loaded with "
        f"torch.load(weights_only=True){hint}"
    )


# -- save / load ------------------------------------------------------------------------------------------------------
def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (``step-<N>`` directories), oldest first. Temp directories are ignored."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        m = _STEP_RE.match(d.name)
        if m and d.is_dir():
            found.append((int(m.group(1)), d))
    return sorted(found)


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    *,
    model: Any,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    epoch: int = 0,
    data_state: Mapping[str, Any] | None = None,
    best: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
    keep_last: int = 3,
    is_main_process: bool = True,
) -> Path:
    """Writes ``<run_dir>/checkpoints/step-<step>/`` atomically and prunes to the newest `keep_last`.

    Args:
        run_dir: the run's directory (absolute; Ray changes the cwd).
        step: global optimizer step the state corresponds to (training continues at ``step``+1's batch).
        model: the :class:`mope.model.FusionModel` (adapter tensors are saved via ``mope.adapter_io.save_adapter``).
        optimizer: its ``state_dict()`` is saved (``None`` when a DeepSpeed engine holds it: use :func:`save_engine`).
        scheduler: LR scheduler, ``state_dict()`` saved.
        epoch: current epoch.
        data_state: the data loader's position (opaque to this module; must be weights_only-safe).
        best: best-metric bookkeeping (e.g. ``{"metric": "val/acc", "value": 0.71, "step": 300}``).
        extra: anything else weights_only-safe.
        keep_last: how many complete checkpoints to keep (≥ 1).
        is_main_process: other ranks write nothing and return the target path.

    Returns:
        The checkpoint directory.

    Raises:
        TypeError: part of the state would not load with ``weights_only=True`` (the offending key is named).
        CheckpointError: the directory cannot be written (disk full, permissions); the previous checkpoint is kept.
    """
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    root = checkpoint_root(run_dir)
    final = root / f"step-{int(step)}"
    if not is_main_process:
        return final
    from mope.adapter_io import save_adapter

    state = {
        "format": STATE_FORMAT,
        "version": STATE_VERSION,
        "step": int(step),
        "epoch": int(epoch),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "rng": capture_rng(),
        "data": dict(data_state) if data_state is not None else None,
        "best": dict(best) if best is not None else None,
        "extra": dict(extra) if extra is not None else None,
    }
    check_weights_only_safe(state)

    tmp = root / f"{_TMP_PREFIX}step-{int(step)}-{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        _remove_stale_temps(root)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        save_adapter(model, tmp)
        with open(tmp / TRAIN_STATE_FILE, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        old = None
        if final.exists():  # re-saving a step (e.g. after a resume): swap, then drop the old copy
            old = root / f"{_TMP_PREFIX}old-step-{int(step)}-{os.getpid()}"
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync_dir(root)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except OSError as e:  # disk full, read-only or unwritable directory, quota: the previous checkpoint is untouched
        shutil.rmtree(tmp, ignore_errors=True)
        prev = list_checkpoints(run_dir)
        raise CheckpointError(
            f"cannot write checkpoint step-{int(step)} under {root}: {e.strerror or e} (errno {e.errno}); "
            + (f"the previous checkpoint {prev[-1][1]} is intact and a re-run resumes from it; " if prev else "")
            + "free disk space or make the directory writable (or point paths.run_root at another disk), then "
            "re-run the same command"
        ) from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for _, d in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(d, ignore_errors=True)
    return final


def _remove_stale_temps(root: Path) -> None:
    """Temp dirs of crashed saves. Only this process's own names, or names of processes that no longer exist."""
    for d in root.glob(f"{_TMP_PREFIX}*"):
        pid = d.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and _pid_alive(int(pid)):
            continue  # another live process may be writing it right now
        shutil.rmtree(d, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_train_state(ckpt_dir: str | Path) -> dict[str, Any]:
    """Loads ``train_state.pt`` of one checkpoint with ``weights_only=True`` on CPU.

    Raises:
        CheckpointError: missing, truncated/corrupt, or not a train state of this module (the file is named).
    """
    path = Path(ckpt_dir) / TRAIN_STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"checkpoint {ckpt_dir} has no {TRAIN_STATE_FILE}: {path} is missing")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(
            f"checkpoint file {path} is corrupt or unreadable ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
            f"delete {Path(ckpt_dir)} to resume from the previous checkpoint"
        ) from e
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{path} is not a {STATE_FORMAT} file (written by harness.checkpoint.save_checkpoint)")
    if state.get("version", 0) > STATE_VERSION:
        raise CheckpointError(f"{path} has format version {state['version']}; this code reads <= {STATE_VERSION}")
    return state


def load_latest(run_dir: str | Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest complete checkpoint of the run as ``(dir, state)``, or ``None`` if there is none.

    The newest one is read and a damaged file raises :class:`CheckpointError` rather than silently falling back to
    an older step (which would replay a different data order without anyone noticing).
    """
    ckpts = list_checkpoints(run_dir)
    if not ckpts:
        return None
    _, d = ckpts[-1]
    return d, read_train_state(d)


def restore(
    ckpt_dir: str | Path,
    state: Mapping[str, Any],
    *,
    model: Any | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    rng: bool = True,
) -> None:
    """Puts a loaded checkpoint back: adapter tensors into `model`, optimizer and scheduler states, RNG states.

    Call it after building the model/optimizer/scheduler exactly as for a fresh run (same param groups) and before
    the first training step. The data position (``state["data"]``) and ``state["best"]`` are the caller's.
    """
    if model is not None:
        from mope.adapter_io import load_adapter

        load_adapter(model, ckpt_dir)  # in place (copy_), so the optimizer's parameter references stay valid
    if optimizer is not None:
        if state.get("optimizer") is None:
            raise CheckpointError(f"checkpoint {ckpt_dir} holds no optimizer state (saved by a DeepSpeed run?)")
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None:
        if state.get("scheduler") is None:
            raise CheckpointError(f"checkpoint {ckpt_dir} holds no scheduler state")
        scheduler.load_state_dict(state["scheduler"])
    if rng:
        restore_rng(state["rng"])


# -- DeepSpeed engines ------------------------------------------------------------------------------------------------
ENGINE_DIGESTS_FILE = "mope_digests.json"
_TAG_RE = re.compile(r"^[A-Za-z0-9_.-]+$")


def _engine_tag(ckpt_dir: Path, tag: str | None) -> str:
    if tag is None:
        latest = ckpt_dir / "latest"
        if not latest.is_file():
            raise CheckpointError(f"no DeepSpeed checkpoint found in {ckpt_dir} (no 'latest' file and no tag given)")
        tag = latest.read_text(encoding="utf-8", errors="replace").strip()
    if not _TAG_RE.match(tag) or tag in (".", ".."):
        raise CheckpointError(f"{ckpt_dir}: DeepSpeed checkpoint tag {tag!r} is not a plain directory name; refused")
    return tag


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def save_engine(
    engine: Any, ckpt_dir: str | Path, *, tag: str | None = None, client_state: dict | None = None
) -> None:
    """``engine.save_checkpoint(dir, exclude_frozen_parameters=True)``: module state without the frozen encoders,
    plus the (ZeRO-partitioned) optimizer and the scheduler. Collective: every rank must call it.

    DeepSpeed writes pickles (its ``load_checkpoint`` reads them with ``torch.load(weights_only=False)``), so rank 0
    then records the SHA-256 of every file of the checkpoint in ``<tag>/mope_digests.json``; :func:`load_engine` lets
    DeepSpeed read only files that match it.
    """
    ckpt_dir = Path(ckpt_dir)
    engine.save_checkpoint(
        str(ckpt_dir), tag=tag, client_state=dict(client_state or {}), exclude_frozen_parameters=True
    )
    _barrier()  # every rank's shard is on disk before rank 0 hashes them
    rank = (
        torch.distributed.get_rank() if torch.distributed.is_available() and torch.distributed.is_initialized() else 0
    )
    if rank == 0:
        import json

        tdir = ckpt_dir / _engine_tag(ckpt_dir, tag)
        digests = {
            f.name: sha256_file(f) for f in sorted(tdir.iterdir()) if f.is_file() and f.name != ENGINE_DIGESTS_FILE
        }
        tmp = tdir / f".{ENGINE_DIGESTS_FILE}.tmp"
        tmp.write_text(json.dumps({"format": "mope-deepspeed-digests", "sha256": digests}, indent=1))
        os.replace(tmp, tdir / ENGINE_DIGESTS_FILE)
    _barrier()


def verify_engine_checkpoint(ckpt_dir: str | Path, *, tag: str | None = None) -> Path:
    """Checks a :func:`save_engine` checkpoint before DeepSpeed unpickles anything in it: the tag is a plain name,
    the digest file exists, every file of the tag directory is listed in it and has the recorded SHA-256.

    Returns the tag directory. Raises :class:`CheckpointError` naming the offending file (a planted or modified file
    is refused without being read by a pickle loader).
    """
    import json

    ckpt_dir = Path(ckpt_dir)
    tdir = ckpt_dir / _engine_tag(ckpt_dir, tag)
    manifest = tdir / ENGINE_DIGESTS_FILE
    fix = (
        f"delete {tdir} (and 'latest' in {ckpt_dir}) and resume from an earlier checkpoint, or re-run the trial "
        "from scratch"
    )
    if not manifest.is_file():
        raise CheckpointError(
            f"{tdir} has no {ENGINE_DIGESTS_FILE}: it was not written by harness.checkpoint.save_engine, "
            "and DeepSpeed "
            f"would unpickle its files (code execution); refused. Fix: {fix}"
        )
    try:
        doc = json.loads(manifest.read_text(encoding="utf-8"))
        digests = dict(doc["sha256"])
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{manifest} is not a digest file ({type(e).__name__}); refused. Fix: {fix}") from None
    present = {f.name for f in tdir.iterdir() if f.name != ENGINE_DIGESTS_FILE and not f.name.startswith(".")}
    unlisted = sorted(present - set(digests))
    if unlisted:
        name = unlisted[0]
        raise CheckpointError(
            f"{tdir / name} is not part of the checkpoint written by this harness (not in "
            f"{ENGINE_DIGESTS_FILE}); refused without reading it. Fix: remove the file, or {fix}"
        )
    for name, digest in sorted(digests.items()):
        f = tdir / name
        if not f.is_file():
            raise CheckpointError(
                f"{f} is missing from the DeepSpeed checkpoint (listed in {ENGINE_DIGESTS_FILE}). Fix: {fix}"
            )
        if sha256_file(f) != digest:
            raise CheckpointError(
                f"{f} does not match the SHA-256 recorded when it was saved (modified or planted "
                f"file); refused without unpickling it. Fix: {fix}"
            )
    return tdir


def load_engine(engine: Any, ckpt_dir: str | Path, *, tag: str | None = None) -> dict[str, Any]:
    """Loads a :func:`save_engine` checkpoint into an engine built like the saved one; returns its client state.

    Every file is checked against the digests recorded at save time first (:func:`verify_engine_checkpoint`), because
    DeepSpeed's loader unpickles. ``load_module_strict=False`` because the frozen parameters were excluded on save
    (the engine keeps the ones it was built with). Collective: every rank must call it.

    Raises:
        CheckpointError: nothing to load in `ckpt_dir`, or a file that this harness did not write.
    """
    tag = _engine_tag(Path(ckpt_dir), tag)
    verify_engine_checkpoint(ckpt_dir, tag=tag)
    load_path, client_state = engine.load_checkpoint(
        str(ckpt_dir), tag=tag, load_module_strict=False, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if load_path is None:
        raise CheckpointError(f"no DeepSpeed checkpoint found in {ckpt_dir} (tag {tag!r}; is there a 'latest' file?)")
    return client_state or {}


__all__ = [
    "CheckpointError",
    "capture_rng",
    "check_weights_only_safe",
    "list_checkpoints",
    "load_engine",
    "load_latest",
    "read_train_state",
    "restore",
    "restore_rng",
    "save_checkpoint",
    "save_engine",
    "verify_engine_checkpoint",
]
