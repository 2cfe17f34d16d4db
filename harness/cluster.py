"""Cluster mode: what a sweep needs when its trials run on Ray nodes that share no disk with the driver.

A sweep joins an existing cluster with ``--address`` / ``$RAY_ADDRESS``; without one it starts a local cluster and
nothing here changes what it does. On a cluster:

* **Code** reaches the workers through Ray's ``runtime_env`` ``py_modules`` (:func:`runtime_env`): the project's
  packages (``harness``, ``mope``, ``mope_data``, ``datasets_prep``, ``reports``) are uploaded once per sweep by the
  driver, so a node needs the dependencies (an image or a venv built from ``constraints.txt``), not a checkout. Not
  ``working_dir``: it would ship the repository folder with ``runs/``, ``data/`` and ``.venv`` unless every one is
  excluded, and it changes the trials' working directory to a copy of the driver's. The non-secret settings that
  every process must agree on (:data:`FORWARDED_ENV`) travel as ``env_vars``; credentials do not travel: each node
  gets them from its own environment or instance role.
* **Where things live** (:func:`local_path_problems`): with more than one node, the tracking store must be a server
  (``http(s)://``), the shards and the sweep's storage (Tune state and checkpoints) URLs (``s3://``, ``gs://``), unless
  the user says every node mounts the same file system (``--shared-fs``).
* **Trials** work in a node-local scratch directory (:func:`scratch_root`, ``$MOPE_SCRATCH``); their epoch checkpoints
  are handed to Ray (:func:`ray_checkpoint`), which copies them to the storage path, and a trial restarted on any node
  gets them back (:func:`restore_ray_checkpoint`) before the recipe resumes.
* **Resources** (:func:`cluster_resource_problem`): the pre-launch check uses the cluster's live nodes.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mope_data.format import is_url  # the one definition (URL vs local path), re-exported here

# Settings every process of a sweep must see alike; forwarded from the driver to the workers (never credentials).
FORWARDED_ENV = (
    "HF_HUB_OFFLINE",
    "TOKENIZERS_PARALLELISM",
    "MLFLOW_TRACKING_URI",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "MOPE_SCRATCH",
    "MOPE_CACHE",
    "HARNESS_FAKE_GPUS",
    # CPU kernel selection (harness.provenance.NUMERICS_ENV): pinned on the driver, the same on every node
    "ATEN_CPU_CAPABILITY",
    "MKL_CBWR",
)
PACKAGES = ("harness", "mope", "mope_data", "datasets_prep", "reports")
SCRATCH_ENV = "MOPE_SCRATCH"
RAY_CKPT_META = "harness_checkpoint.json"


def runtime_env() -> dict[str, Any]:
    """The job's ``runtime_env`` on an existing cluster: the project packages as ``py_modules``, the settings of
    :data:`FORWARDED_ENV` that are set here as ``env_vars``."""
    import importlib

    modules = [importlib.import_module(name) for name in PACKAGES]
    env = {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}
    env.setdefault("HF_HUB_OFFLINE", "1")
    return {"py_modules": modules, "excludes": ["__pycache__", "*.pyc"], "env_vars": env}


def unreachable(address: str, timeout_s: float = 5.0) -> str | None:
    """Why the Ray cluster at ``host:port`` (or ``ray://host:port``) cannot be reached, or None; asked before
    ``ray.init``, which otherwise retries for minutes. ``auto`` and other forms are left to Ray."""
    import socket

    hostport = address.removeprefix("ray://")
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit() or not host:
        return None
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
        return None
    except OSError as e:
        return (
            f"cannot reach the Ray cluster at {address} ({type(e).__name__}: {e}): start its head with `ray start "
            "--head --port PORT`, or fix --address / RAY_ADDRESS (host:port of the head's GCS, default port 6379)"
        )


def alive_nodes() -> list[dict[str, Any]]:
    """``ray.nodes()`` of the live nodes (needs ``ray.init``)."""
    import ray

    return [n for n in ray.nodes() if n.get("Alive")]


def cluster_resource_problem(resources, nodes: list[dict[str, Any]]) -> str | None:
    """Why a trial can never be placed on these nodes, or None. An in-process trial must fit on one node; a
    multi-worker trial needs each worker to fit on a node and all of them in the cluster at once."""
    if not nodes:
        return "resources: the cluster has no live node"
    per_node = [(float(n["Resources"].get("CPU", 0)), float(n["Resources"].get("GPU", 0))) for n in nodes]
    big_cpu = max(c for c, _ in per_node)
    big_gpu = max(g for _, g in per_node)
    where = f"the largest of the cluster's {len(nodes)} node(s)"
    if resources.workers <= 1:
        return resources.unschedulable_reason(big_cpu, big_gpu, where)
    if resources.cpus_per_worker > big_cpu + 1e-9 or resources.gpus_per_worker > big_gpu + 1e-9:
        return (
            f"resources: one worker needs {resources.cpus_per_worker:g} CPU / {resources.gpus_per_worker:g} GPU but "
            f"{where} has {big_cpu:g} / {big_gpu:g}. Fix: lower resources.cpus_per_worker / gpus_per_worker or add "
            "bigger nodes"
        )
    total_cpu = sum(c for c, _ in per_node)
    total_gpu = sum(g for _, g in per_node)
    return resources.unschedulable_reason(total_cpu, total_gpu, f"the cluster ({len(nodes)} nodes)")


def local_path_problems(cfg: dict[str, Any], storage: str) -> list[str]:
    """What a trial on another node could not reach: every configuration field that names a path on the driver's
    disk where a URL is needed. Empty when everything is a URL (or a package resource such as the offline MiniLM)."""
    from harness.sweep_runs import tracking_target

    out = []
    uri = tracking_target(cfg)[0]
    if not uri.startswith(("http://", "https://", "databricks", "postgresql", "mysql")):
        out.append(
            f"tracking.uri={uri}: a file on the driver; run an MLflow tracking server reachable from every node "
            "and set MLFLOW_TRACKING_URI=http://HOST:PORT (or tracking.uri=...)"
        )
    if not is_url(cfg["data"]["shard_dir"]):
        out.append(
            f"data.shard_dir={cfg['data']['shard_dir']}: a local folder; upload the shards (`harness prep "
            f"{cfg['data']['name']} ... --out s3://BUCKET/PREFIX`) and set data.shard_dir= (or MOPE_DATA_ROOT=) to "
            "the URL"
        )
    for side in ("vision", "text", "audio", "video"):
        w = (cfg.get(side) or {}).get("weights")
        if w and not is_url(w):
            out.append(f"{side}.weights={w}: a local path; upload the weights and give their URL")
    if not is_url(storage):
        out.append(f"--storage {storage}: a local folder; give an object-store URL (--storage s3://BUCKET/PREFIX)")
    return out


def scratch_root(sweep_id: str) -> Path:
    """The node-local directory where a trial works (checkpoints before Ray uploads them, the best adapter):
    ``$MOPE_SCRATCH/<node id>/<sweep_id>``, default ``<tmp>/mope-harness/...``. Named by the Ray node, so that two
    nodes never share it even when ``$MOPE_SCRATCH`` is on a shared mount: what a trial resumes from on another node
    is what Ray kept in the sweep's storage."""
    import ray

    base = os.environ.get(SCRATCH_ENV) or os.path.join(tempfile.gettempdir(), "mope-harness")
    node = ray.get_runtime_context().get_node_id()[:16]
    return Path(base).expanduser().resolve() / f"node-{node}" / sweep_id


def _link_tree(src: Path, dst: Path) -> None:
    def link(s: str, d: str) -> None:
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)

    shutil.copytree(src, dst, copy_function=link, dirs_exist_ok=True)


@contextlib.contextmanager
def ray_checkpoint(run_dir: str | Path, ckpt_dir: str | Path, step: int, checkpoint_cls: Any) -> Iterator[Any]:
    """A Ray checkpoint (``checkpoint_cls``: ``ray.tune.Checkpoint`` in a Tune trial, ``ray.train.Checkpoint`` in a
    Train worker) of the run's state at ``step``: the epoch checkpoint ``checkpoints/step-N/`` and
    the best adapter so far, laid out as in the run directory (hard links into a staging folder, removed after use:
    Ray has copied it to the storage path when ``report`` returns)."""
    from harness.checkpoint import CHECKPOINT_DIR

    run_dir, ckpt_dir = Path(run_dir), Path(ckpt_dir)
    with tempfile.TemporaryDirectory(prefix="harness-ckpt-", dir=run_dir) as d:
        stage = Path(d)
        _link_tree(ckpt_dir, stage / CHECKPOINT_DIR / ckpt_dir.name)
        best = run_dir / "best_adapter"
        if best.is_dir():
            _link_tree(best, stage / "best_adapter")
        (stage / RAY_CKPT_META).write_text(json.dumps({"step": int(step), "checkpoint": ckpt_dir.name}))
        yield checkpoint_cls.from_directory(str(stage))


def restore_ray_checkpoint(checkpoint: Any, run_dir: str | Path) -> int | None:
    """Puts a checkpoint that Ray kept (``tune.get_checkpoint()``) back into the node-local run directory, unless
    the directory already holds a checkpoint as new. Returns the step restored, or None."""
    from harness.checkpoint import list_checkpoints

    if checkpoint is None:
        return None
    run_dir = Path(run_dir)
    with checkpoint.as_directory() as d:
        meta_file = Path(d) / RAY_CKPT_META
        if not meta_file.is_file():
            return None
        step = int(json.loads(meta_file.read_text())["step"])
        have = list_checkpoints(run_dir) if run_dir.is_dir() else []
        if have and have[-1][0] >= step:
            return None
        run_dir.mkdir(parents=True, exist_ok=True)
        for child in Path(d).iterdir():
            if child.is_dir():
                shutil.copytree(child, run_dir / child.name, dirs_exist_ok=True)
    return step


FAKE_GPUS_ENV = "HARNESS_FAKE_GPUS"


def check_gpus() -> None:
    """A trial that Ray gave GPUs must see them: on a node whose CUDA is broken (driver, a CPU build of torch) it would
    otherwise train on the CPU, silently and many times slower. Raises RuntimeError (Tune retries it, maybe on
    another node). ``HARNESS_FAKE_GPUS=1`` (tests only: logical GPUs, ``ray start --num-gpus``) computes on the CPU."""
    import ray
    import torch

    ids = ray.get_gpu_ids()
    if not ids or torch.cuda.is_available() or os.environ.get(FAKE_GPUS_ENV) == "1":
        return
    raise RuntimeError(
        f"Ray gave this trial GPU(s) {ids} (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}) on node "
        f"{ray.get_runtime_context().get_node_id()[:12]}, but torch sees no CUDA device (torch {torch.__version__}, "
        f"CUDA build {torch.version.cuda}): fix the node's driver or torch build, or ask for no GPUs "
        f"(resources.gpus_per_worker=0); {FAKE_GPUS_ENV}=1 is for tests with logical GPUs only"
    )


def node_facts() -> dict[str, str]:
    """Where this trial runs: Ray node id, host, the GPUs Ray gave it (tags of the child run)."""
    import socket

    import ray

    ctx = ray.get_runtime_context()
    return {
        "harness.node_id": ctx.get_node_id(),
        "harness.host": socket.gethostname(),
        "harness.cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES", ""),
    }


__all__ = [
    "FORWARDED_ENV",
    "alive_nodes",
    "check_gpus",
    "cluster_resource_problem",
    "is_url",
    "local_path_problems",
    "node_facts",
    "ray_checkpoint",
    "restore_ray_checkpoint",
    "runtime_env",
    "scratch_root",
    "unreachable",
]
