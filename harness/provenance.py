"""Provenance record of a training run: code version, software, hardware and data checksums.

Shaped like the result files of PEFT's ``method_comparison`` benchmark (``run_info`` / ``meta_info``): logged as a JSON
artifact of every MLflow run so a number in a report can be traced to the commit, the package versions, the machine
and the exact dataset manifests it came from. Works offline and without git (then the SHA is read from ``.git`` files,
or recorded as unknown with the reason).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import os
import platform
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterable, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

from mope_data.format import MissingShardsError, is_url, read_bytes, sha256_file

# Distribution names (as pip knows them), reported whether or not they are imported.
PACKAGES = (
    "torch",
    "timm",
    "transformers",
    "deepspeed",
    "ray",
    "mlflow",
    "webdataset",
    "hydra-core",
    "omegaconf",
    "numpy",
    "safetensors",
    "mope-harness",
)
REPO_ROOT = Path(__file__).resolve().parents[1]
_GIT_TIMEOUT_S = 10


def provenance(
    manifests: Iterable[str | Path] = (),
    extra: Mapping[str, Any] | None = None,
    *,
    repo: str | Path | None = None,
) -> dict[str, Any]:
    """Builds the provenance record (a JSON-serialisable dict).

    Args:
        manifests: dataset manifest files (e.g. ``<shards>/manifest.json``); each is hashed with sha256.
        extra: anything the caller wants recorded under ``run_info.extra`` (trial key, resolved config hash, ...).
        repo: the git work tree to describe; default: the checkout this module lives in.

    Returns:
        ``{"run_info": {created_at, argv, git, extra}, "meta_info": {packages, python, platform, system,
        accelerator, datasets}}``.

    Raises:
        FileNotFoundError: a manifest does not exist (a run must not claim data it cannot checksum).
    """
    repo_path = Path(repo) if repo is not None else REPO_ROOT
    return {
        "run_info": {
            "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "argv": list(sys.argv),
            "git": git_info(repo_path),
            "extra": dict(extra) if extra else {},
        },
        "meta_info": {
            "packages": package_versions(),
            "python": {
                "version": platform.python_version(),
                "implementation": platform.python_implementation(),
                "executable": sys.executable,
            },
            "platform": platform.platform(),
            "system": {
                "hostname": socket.gethostname(),
                "cpu_count": os.cpu_count(),
                "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
                "machine": platform.machine(),
            },
            "accelerator": accelerator_info(),
            "cpu_numerics": cpu_numerics(),
            "datasets": manifest_checksums(manifests),
        },
    }


def package_versions(names: Iterable[str] = PACKAGES) -> dict[str, str | None]:
    """Installed version of each distribution (``None`` if not installed); reads metadata, imports nothing."""
    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def manifest_checksums(manifests: Iterable[str | Path]) -> list[dict[str, Any]]:
    out = []
    for m in manifests:
        if is_url(m):  # a remote manifest: hashed as streamed, its URL recorded
            try:
                data = read_bytes(m, "dataset manifest")
            except MissingShardsError:
                raise FileNotFoundError(f"dataset manifest {m} not found (provenance needs its checksum)") from None
            out.append({"path": str(m), "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)})
            continue
        p = Path(m).expanduser().resolve()
        if not p.is_file():
            raise FileNotFoundError(f"dataset manifest {p} not found (provenance needs its checksum)")
        out.append({"path": str(p), "sha256": sha256_file(p), "bytes": p.stat().st_size})
    return out


# -- git --------------------------------------------------------------------------------------------------------------
def git_info(repo: str | Path = REPO_ROOT) -> dict[str, Any]:
    """``{"sha", "dirty", "branch", "source"}``. ``dirty`` = tracked files modified (untracked files, e.g. data or
    outputs, do not count). Without a git binary the SHA is read from ``.git`` (``dirty`` is then ``None``)."""
    repo = Path(repo)
    git = shutil.which("git")
    if git is not None:
        try:
            sha = _git(git, repo, "rev-parse", "HEAD")
            branch = _git(git, repo, "rev-parse", "--abbrev-ref", "HEAD")
            status = _git(git, repo, "status", "--porcelain", "--untracked-files=no")
            return {"sha": sha, "dirty": bool(status), "branch": branch, "source": "git"}
        except (subprocess.SubprocessError, OSError) as e:
            err = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            fallback = _read_git_dir(repo)
            if fallback is not None:
                return {**fallback, "error": err}
            return {"sha": None, "dirty": None, "branch": None, "source": None, "error": err}
    fallback = _read_git_dir(repo)
    if fallback is not None:
        return fallback
    return {"sha": None, "dirty": None, "branch": None, "source": None, "error": "no git binary and no .git directory"}


def _git(git: str, repo: Path, *args: str) -> str:
    # GIT_OPTIONAL_LOCKS=0: `git status` must not take the index lock of a checkout others are working in.
    r = subprocess.run(
        [git, "-C", str(repo), *args],
        capture_output=True,
        text=True,
        timeout=_GIT_TIMEOUT_S,
        check=False,
        env={**os.environ, "GIT_OPTIONAL_LOCKS": "0"},
    )
    if r.returncode != 0:
        raise subprocess.SubprocessError(r.stderr.strip() or f"git {' '.join(args)} exited {r.returncode}")
    return r.stdout.strip()


def _find_git_dir(repo: Path) -> Path | None:
    for d in (repo, *repo.resolve().parents):
        g = d / ".git"
        if g.is_dir():
            return g
        if g.is_file():  # worktree / submodule: "gitdir: <path>"
            text = g.read_text().strip()
            if text.startswith("gitdir:"):
                p = Path(text.split(":", 1)[1].strip())
                return p if p.is_absolute() else (d / p).resolve()
    return None


def _read_git_dir(repo: Path) -> dict[str, Any] | None:
    """HEAD's SHA from the files in ``.git`` (no git binary needed)."""
    try:
        gdir = _find_git_dir(repo)
        if gdir is None:
            return None
        head = (gdir / "HEAD").read_text().strip()
        if not head.startswith("ref:"):
            return {"sha": head, "dirty": None, "branch": "HEAD", "source": ".git files"}
        ref = head.split(":", 1)[1].strip()
        common = gdir
        if (gdir / "commondir").is_file():  # linked worktree: refs live in the common dir
            common = (gdir / (gdir / "commondir").read_text().strip()).resolve()
        for base in (gdir, common):
            if (base / ref).is_file():
                sha = (base / ref).read_text().strip()
                break
        else:
            sha = None
            packed = common / "packed-refs"
            if packed.is_file():
                for line in packed.read_text().splitlines():
                    parts = line.split()
                    if len(parts) == 2 and parts[1] == ref:
                        sha = parts[0]
                        break
        branch = ref.removeprefix("refs/heads/")
        return {"sha": sha, "dirty": None, "branch": branch, "source": ".git files"}
    except OSError:
        return None


# -- accelerator ------------------------------------------------------------------------------------------------------
# Environment variables that select CPU kernels (and so the last bits of every float result): recorded, and forwarded
# to a cluster's workers (harness.cluster.FORWARDED_ENV), so runs that must agree bit for bit can pin them.
NUMERICS_ENV = ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def cpu_numerics() -> dict[str, Any]:
    """What decides the last bits of CPU results: the CPU model and flags torch's kernels use (``cpu_capability``:
    AVX2 / AVX512 / DEFAULT), the BLAS / oneDNN builds, the thread count, and the variables of :data:`NUMERICS_ENV`.
    Two runs agree bit for bit only when these agree (same seed, same data): a CPU with another instruction set picks
    other MKL and ATen kernels (README "Reproducibility")."""
    info: dict[str, Any] = {"model": None, "env": {k: os.environ.get(k) for k in NUMERICS_ENV}}
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            info["model"] = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), None)
    except OSError:
        info["model"] = platform.processor() or None
    try:
        import torch

        cfg = torch.__config__.show()
        info["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
        info["num_threads"] = torch.get_num_threads()
        info["blas"] = next((ln.strip(" -") for ln in cfg.splitlines() if "Math Kernel Library" in ln), None)
        info["onednn"] = next((ln.strip(" -") for ln in cfg.splitlines() if "MKL-DNN" in ln or "oneDNN" in ln), None)
    except Exception as e:  # noqa: BLE001 - provenance records what it can
        info["error"] = f"{type(e).__name__}: {e}"
    return info


def accelerator_info() -> dict[str, Any]:
    """CUDA devices as torch sees them, plus the driver version from ``nvidia-smi`` when present."""
    info: dict[str, Any] = {"cuda_available": False, "gpus": [], "cuda": None, "cudnn": None, "driver": None}
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return info
    info["cuda"] = torch.version.cuda  # the CUDA version torch was built with (None for CPU builds)
    try:
        if torch.cuda.is_available():
            info["cuda_available"] = True
            for i in range(torch.cuda.device_count()):
                props = torch.cuda.get_device_properties(i)
                info["gpus"].append(
                    {
                        "index": i,
                        "name": props.name,
                        "memory_gib": round(props.total_memory / 2**30, 2),
                        "capability": f"{props.major}.{props.minor}",
                    }
                )
            info["cudnn"] = torch.backends.cudnn.version()
            info["driver"] = _nvidia_driver()
    except Exception as e:  # noqa: BLE001 - a broken driver must not stop the run from recording what it can
        info["error"] = f"{type(e).__name__}: {e}"
    return info


def _nvidia_driver() -> str | None:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        r = subprocess.run(
            [smi, "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (subprocess.SubprocessError, OSError):
        return None
    lines = [x.strip() for x in r.stdout.splitlines() if x.strip()]
    return lines[0] if r.returncode == 0 and lines else None


__all__ = ["accelerator_info", "git_info", "manifest_checksums", "package_versions", "provenance", "sha256_file"]
