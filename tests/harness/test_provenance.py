"""Provenance record: shape, manifest checksums, git present / absent."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess

import pytest

from harness import provenance as prov


def test_shape_and_manifests(tmp_path):
    m = tmp_path / "manifest.json"
    m.write_text('{"shards": 3}')
    rec = prov.provenance([m], extra={"trial_key": "s/p/0"})
    json.dumps(rec)  # serialisable as the MLflow JSON artifact
    assert set(rec) == {"run_info", "meta_info"}
    assert rec["run_info"]["extra"] == {"trial_key": "s/p/0"}
    meta = rec["meta_info"]
    for pkg in ("torch", "timm", "transformers", "deepspeed", "ray", "mlflow", "webdataset", "hydra-core", "numpy"):
        assert pkg in meta["packages"]
    assert meta["packages"]["torch"]
    assert meta["python"]["version"].count(".") == 2
    assert meta["system"]["hostname"] and meta["system"]["cpu_count"] >= 1
    assert {"cuda_available", "gpus", "driver", "cuda"} <= set(meta["accelerator"])
    assert meta["datasets"] == [
        {"path": str(m.resolve()), "sha256": hashlib.sha256(m.read_bytes()).hexdigest(), "bytes": m.stat().st_size}
    ]


def test_missing_manifest_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest"):
        prov.provenance([tmp_path / "nope.json"])


def test_unknown_package_is_none():
    assert prov.package_versions(["surely-not-installed-pkg-xyz"]) == {"surely-not-installed-pkg-xyz": None}


@pytest.fixture
def git_repo(tmp_path):
    if shutil.which("git") is None:
        pytest.skip("git not installed")
    r = tmp_path / "repo"
    r.mkdir()
    env_cfg = ["-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run(["git", "init", "-q", "-b", "main", str(r)], check=True)
    (r / "a.txt").write_text("1")
    subprocess.run(["git", "-C", str(r), "add", "a.txt"], check=True)
    subprocess.run(["git", "-C", str(r), *env_cfg, "commit", "-q", "-m", "init"], check=True)
    return r


def test_git_sha_and_dirty(git_repo):
    sha = subprocess.run(
        ["git", "-C", str(git_repo), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
    ).stdout
    info = prov.git_info(git_repo)
    assert info == {"sha": sha.strip(), "dirty": False, "branch": "main", "source": "git"}
    (git_repo / "untracked.bin").write_text("x")
    assert prov.git_info(git_repo)["dirty"] is False  # untracked outputs don't count
    (git_repo / "a.txt").write_text("2")
    assert prov.git_info(git_repo)["dirty"] is True


def test_without_git_binary_reads_dot_git(git_repo, monkeypatch):
    sha = prov.git_info(git_repo)["sha"]
    monkeypatch.setattr(prov.shutil, "which", lambda name: None)
    info = prov.git_info(git_repo)
    assert info["sha"] == sha and info["dirty"] is None and info["source"] == ".git files"
    subprocess.run(["git", "-C", str(git_repo), "pack-refs", "--all"], check=True)  # ref only in packed-refs
    assert prov.git_info(git_repo)["sha"] == sha


def test_not_a_repo(tmp_path, monkeypatch):
    info = prov.git_info(tmp_path)  # tmp dirs are not inside a git work tree
    assert info["sha"] is None and "error" in info
    monkeypatch.setattr(prov.shutil, "which", lambda name: None)
    rec = prov.provenance(repo=tmp_path)
    assert rec["run_info"]["git"]["sha"] is None


def test_cpu_numerics_records_what_decides_the_last_bits(tmp_path, monkeypatch):
    """The CPU kernels torch picks (and the variables that pin them) are in every run's provenance, and those
    variables reach a cluster's workers."""
    import torch

    from harness.cluster import FORWARDED_ENV
    from harness.provenance import NUMERICS_ENV, provenance

    monkeypatch.setenv("MKL_CBWR", "AVX2")
    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    num = provenance([])["meta_info"]["cpu_numerics"]
    assert num["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert num["num_threads"] == torch.get_num_threads()
    assert num["env"]["MKL_CBWR"] == "AVX2" and num["env"]["ATEN_CPU_CAPABILITY"] is None
    assert set(NUMERICS_ENV) >= {"ATEN_CPU_CAPABILITY", "MKL_CBWR"}
    assert {"ATEN_CPU_CAPABILITY", "MKL_CBWR"} <= set(FORWARDED_ENV)
