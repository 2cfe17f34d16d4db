"""A Ray cluster of several nodes on this machine, and the smoke sweep sized for it (tests/cluster).

    with local_cluster(tmp_path, [{"num_cpus": 1}, {"num_cpus": 1}]) as c:    # head + one worker node
        subprocess.run([... "harness", "sweep", spec, "--address", c.address], env=sweep_env(...))
        c.kill(c.workers[0])                                                    # a node dies

The nodes are Ray's own ``ray.cluster_utils.Cluster`` processes, started from ``<tmp>/nodes`` (their working
directory: neither the driver's ``runs/`` nor ``data/`` exist there) and stopped at exit. The test process never
connects to the cluster itself (the sweep's driver runs in a subprocess, as on a head node). Never ``ray stop``:
it would stop every Ray process of the user.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "sweeps" / "smoke.yaml"


@dataclass
class LocalCluster:
    cluster: Any
    head: Any
    workers: list[Any] = field(default_factory=list)

    @property
    def address(self) -> str:
        return self.cluster.address

    def nodes(self) -> list[dict[str, str]]:
        """``[{"NodeID": hex}]`` of the live nodes (head first)."""
        return [{"NodeID": n.node_id} for n in [self.head, *self.workers]]

    def kill(self, node: Any) -> None:
        """The node dies (its raylet and every worker process on it; SIGKILL, no graceful shutdown)."""
        self.cluster.remove_node(node, allow_graceful=False)
        self.workers.remove(node)


@contextlib.contextmanager
def local_cluster(tmp: Path, nodes: list[dict[str, Any]]) -> Iterator[LocalCluster]:
    """Head = ``nodes[0]``, one worker node per further entry (``ray.cluster_utils.Cluster.add_node`` kwargs)."""
    from ray.cluster_utils import Cluster

    cwd = Path(tmp) / "nodes"
    cwd.mkdir(parents=True, exist_ok=True)
    old = Path.cwd()
    os.chdir(cwd)  # the node processes inherit it
    try:
        t0 = time.time()
        c = Cluster(initialize_head=True, head_node_args={"include_dashboard": False, **nodes[0]})
        lc = LocalCluster(c, c.head_node)
        for args in nodes[1:]:
            lc.workers.append(c.add_node(**args))
        c.wait_for_nodes()
        print(f"local cluster of {len(nodes)} node(s) up in {time.time() - t0:.1f}s at {c.address}")
    finally:
        os.chdir(old)
    try:
        yield lc
    finally:
        c.shutdown()


def smoke_spec(
    tmp: Path,
    *,
    resources: dict[str, Any],
    arms: list[str] | None = None,
    overrides: dict[str, Any] | None = None,
    name: str = "smoke",
) -> Path:
    """``sweeps/smoke.yaml`` with other resources (and optionally fewer arms, more overrides), written to ``tmp``."""
    data = yaml.safe_load(SMOKE.read_text())
    data["resources"] = resources
    data["profiles"] = {}
    if arms is not None:
        data["arms"] = {k: v for k, v in data["arms"].items() if k in arms}
    data["overrides"].update(overrides or {})
    data["name"] = name
    path = Path(tmp) / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def sweep_env(data_root: Path | str, run_root: Path, **extra: str) -> dict[str, str]:
    """The driver's environment: this process's, without a Ray address or tracking URI of its own."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "MOPE_STORAGE")}
    env.update(MOPE_DATA_ROOT=str(data_root), MOPE_RUN_ROOT=str(run_root), HF_HUB_OFFLINE="1", **extra)
    return env


def sqlite_runs(run_root: Path, experiment: str) -> list[Any]:
    from mlflow.tracking import MlflowClient

    db = Path(run_root) / "mlflow.db"
    if not db.is_file():
        return []
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    exp = client.get_experiment_by_name(experiment)
    return [] if exp is None else client.search_runs([exp.experiment_id], max_results=1000)
