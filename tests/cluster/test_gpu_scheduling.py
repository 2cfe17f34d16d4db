"""Cluster mode, simulated on this machine (marker `cluster`): Ray's own ``ray.cluster_utils.Cluster`` starts the
nodes as local processes.

* A node with 2 *logical* GPUs (``num_gpus=2``, none physical): a spec with one GPU per trial runs two trials at once,
  each seeing its own ``CUDA_VISIBLE_DEVICES`` (compute falls back to the CPU behind ``HARNESS_FAKE_GPUS=1``; without
  it a trial that was given a GPU it cannot see fails with a clear error instead of silently training on the CPU).
* A 2-worker Ray Train + DeepSpeed trial spans two 1-CPU nodes (gloo): both nodes hold a rank.

Both go through the real CLI (`harness sweep --address ...`) in a subprocess, as a user on the head node would.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers.cluster import local_cluster, smoke_spec, sqlite_runs, sweep_env

pytestmark = [pytest.mark.ray, pytest.mark.cluster, pytest.mark.timeout(900)]


def _sweep(spec: Path, address: str, cwd: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "harness.cli", "sweep", str(spec), "--address", address, "--progress-every", "5"]
    return subprocess.run([*cmd, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=800, check=False)


def test_one_gpu_per_trial_runs_two_trials_at_once_on_two_logical_gpus(small_demo, tmp_path):
    spec = smoke_spec(tmp_path, resources={"workers": 1, "cpus_per_worker": 1, "gpus_per_worker": 1})
    run_root = tmp_path / "runs"
    with local_cluster(tmp_path, [{"num_cpus": 2, "num_gpus": 2}]) as cluster:
        env = sweep_env(small_demo.parent, run_root, HARNESS_FAKE_GPUS="1")
        res = _sweep(spec, cluster.address, tmp_path, env)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-4000:]
    assert "2/2 trials FINISHED" in out and "2 at a time" in out, out[-3000:]
    children = [r for r in sqlite_runs(run_root, "mope-smoke") if r.data.tags.get("harness.role") == "trial"]
    assert len(children) == 2
    devices = sorted(r.data.tags["harness.cuda_visible_devices"] for r in children)
    assert devices == ["0", "1"], devices  # one logical GPU each, distinct
    a, b = sorted(children, key=lambda r: r.info.start_time)
    assert b.info.start_time < a.info.end_time, "the two trials did not run at the same time"


def test_a_trial_given_a_gpu_it_cannot_see_fails_clearly(small_demo, tmp_path):
    """Without the test-only switch, a logical GPU that torch cannot see is an error naming the node and the fix."""
    spec = smoke_spec(tmp_path, resources={"workers": 1, "cpus_per_worker": 1, "gpus_per_worker": 1}, arms=["mope"])
    run_root = tmp_path / "runs"
    with local_cluster(tmp_path, [{"num_cpus": 1, "num_gpus": 1}]) as cluster:
        env = sweep_env(small_demo.parent, run_root)
        env.pop("HARNESS_FAKE_GPUS", None)
        res = _sweep(spec, cluster.address, tmp_path, env, "--verbose")
    out = res.stdout + res.stderr
    assert res.returncode != 0, out[-3000:]
    assert "torch sees no CUDA device" in out and "resources.gpus_per_worker=0" in out, out[-4000:]


def test_two_worker_deepspeed_trial_spans_two_nodes(small_demo, tmp_path):
    spec = smoke_spec(
        tmp_path,
        resources={"workers": 2, "cpus_per_worker": 1},
        arms=["mope"],
        overrides={"deepspeed": "zero2"},
    )
    run_root = tmp_path / "runs"
    # the TorchTrainer's own (idle) driver takes the custom resource of the head, so each 1-CPU node holds a rank
    nodes = [{"num_cpus": 1, "resources": {"harness_trial_driver": 10}}, {"num_cpus": 1}]
    with local_cluster(tmp_path, nodes) as cluster:
        env = sweep_env(small_demo.parent, run_root)
        # the simulated nodes do share this machine's disk: say so, or the sweep is refused (local paths)
        refused = _sweep(spec, cluster.address, tmp_path, env)
        assert refused.returncode == 2 and "share no disk" in refused.stderr, refused.stderr[-3000:]
        assert "tracking.uri=sqlite" in refused.stderr and "data.shard_dir=" in refused.stderr
        res = _sweep(spec, cluster.address, tmp_path, env, "--shared-fs")
        node_ids = {n["NodeID"] for n in cluster.nodes()}
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-4000:]
    assert "1/1 trials FINISHED" in out and "Ray Train TorchTrainer" in out
    (child,) = [r for r in sqlite_runs(run_root, "mope-smoke") if r.data.tags.get("harness.role") == "trial"]
    ranks = json.loads(child.data.tags["harness.worker_nodes"])
    assert len(ranks) == 2 and len(set(ranks)) == 2 and set(ranks) == node_ids, ranks
    assert child.data.params["deepspeed.zero_stage"] == "2"
    assert child.data.metrics["final/test_acc"] >= 0.0
    assert os.environ.get("RAY_ADDRESS") is None  # the test process itself never joined a cluster
    assert yaml.safe_load(spec.read_text())["resources"]["workers"] == 2
