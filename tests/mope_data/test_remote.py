"""Shards, manifests and encoder weights read from URLs (s3:// on a real moto server, http:// on ``http.server``),
through the one reader of :mod:`mope_data.format`: identical batches to the local copy, clear errors naming the URL."""

from __future__ import annotations

import io
import shutil
import tarfile
import time
from pathlib import Path

import pytest
import torch

from datasets_prep.upload import upload_dataset
from mope_data import LoaderConfig, make_eval_loader, make_train_loader
from mope_data.format import (
    MissingShardsError,
    ShardFormatError,
    dataset_info,
    read_fewshot,
    read_manifest,
    read_split_index,
    sha256_file,
    shard_paths,
    split_manifests,
)
from tests.helpers.demo_helpers import small_demo  # noqa: F401  (session fixture)
from tests.helpers.s3 import HttpFolderServer, clear_fs_caches, free_port

BUCKET = "data"


@pytest.fixture(scope="module")
def remote_demo(small_demo, s3_module, tmp_path_factory):  # noqa: F811
    """A copy of the small demo (with a few-shot subset built on it) uploaded to s3://data/demo."""
    from datasets_prep.fewshot import build_fewshot

    local = tmp_path_factory.mktemp("remote") / "demo"
    shutil.copytree(small_demo, local)
    build_fewshot(local / "train", [16], seed=0)
    s3_module.make_bucket(BUCKET)
    upload_dataset(local, f"s3://{BUCKET}/demo", verbose=False)
    return local, f"s3://{BUCKET}/demo"


@pytest.fixture(scope="module")
def web(remote_demo):
    with HttpFolderServer(remote_demo[0].parent) as server:
        yield server


def _cfg(root, **kw) -> LoaderConfig:
    return LoaderConfig(data_dir=root, batch_size=32, num_workers=kw.pop("num_workers", 2), seed=0, **kw)


def _batches(loader) -> list[dict]:
    return list(loader)


def _same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b) > 0
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            if torch.is_tensor(x[k]):
                assert torch.equal(x[k], y[k]), k
            else:
                assert x[k] == y[k], k


def _compare(local: Path, url: str, **kw) -> None:
    lt, ln = make_train_loader(_cfg(local, **kw))
    rt, rn = make_train_loader(_cfg(url, **kw))
    assert ln == rn
    _same(_batches(lt), _batches(rt))
    for split in ("val", "test"):
        _same(_batches(make_eval_loader(_cfg(local, **kw), split)), _batches(make_eval_loader(_cfg(url, **kw), split)))


def test_s3_batches_identical_to_local(remote_demo):
    local, url = remote_demo
    info = dataset_info(url)
    assert info.root == url and info.name == "demo" and info.labels == dataset_info(local).labels
    assert shard_paths(f"{url}/train", read_manifest(f"{url}/train"))[0].startswith(f"{url}/train/demo-train-")
    assert sha256_file(f"{url}/train/manifest.json") == sha256_file(local / "train" / "manifest.json")
    assert [str(m).rpartition("/")[2] for m in split_manifests(url)] == ["manifest.json"] * 3
    _compare(local, url)


def test_s3_split_index_and_fewshot_subset(remote_demo):
    local, url = remote_demo
    assert read_split_index(f"{url}/val") == read_split_index(local / "val")
    assert read_fewshot(f"{url}/train", 16) == read_fewshot(local / "train", 16)
    _same(
        _batches(make_train_loader(_cfg(local, shots=16, num_workers=0))[0]),
        _batches(make_train_loader(_cfg(url, shots=16, num_workers=0))[0]),
    )


def test_http_batches_identical_to_local(remote_demo, web):
    local, _ = remote_demo
    _compare(local, web.url(local.name), num_workers=1)


def _tamper(tar_bytes: bytes) -> bytes:
    """The same tar with one byte of one text member changed (still a valid tar: only the digest differs)."""
    src = tarfile.open(fileobj=io.BytesIO(tar_bytes), mode="r:")
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as dst:
        done = False
        for ti in src:
            data = src.extractfile(ti).read()
            if not done and ti.name.endswith(".txt") and data:
                data = bytes([data[0] ^ 0x01]) + data[1:]
                done = True
            dst.addfile(ti, io.BytesIO(data))
    assert done
    return out.getvalue()


def test_tampered_shard_on_s3_is_named(remote_demo, s3_module):
    local, _ = remote_demo
    url = f"s3://{BUCKET}/tampered"
    upload_dataset(local, url, verbose=False)
    victim = read_manifest(local / "val")["shards"][1]["file"]
    s3_module.fs().pipe_file(f"{BUCKET}/tampered/val/{victim}", _tamper((local / "val" / victim).read_bytes()))
    clear_fs_caches()
    for workers in (0, 1):
        with pytest.raises(ShardFormatError) as e:
            _batches(make_eval_loader(_cfg(url, num_workers=workers), "val"))
        assert f"{url}/val/{victim}" in str(e.value) and "re-upload" in str(e.value)


def test_missing_bucket_and_missing_manifest(remote_demo):
    with pytest.raises(MissingShardsError) as e:
        make_train_loader(_cfg("s3://no-such-bucket/demo"))
    assert "s3://no-such-bucket/demo" in str(e.value) and "harness prep" in str(e.value)
    with pytest.raises(MissingShardsError) as e:
        read_manifest(f"s3://{BUCKET}/nothing-here/train")
    assert f"s3://{BUCKET}/nothing-here/train/manifest.json" in str(e.value) and "--out" in str(e.value)


def test_unreachable_endpoint_is_clear(remote_demo, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    monkeypatch.setenv("AWS_RETRY_MODE", "standard")
    clear_fs_caches()
    t0 = time.monotonic()
    try:
        with pytest.raises(ShardFormatError) as e:
            make_train_loader(_cfg(f"s3://{BUCKET}/demo"))
    finally:
        monkeypatch.undo()
        clear_fs_caches()
    msg = str(e.value)
    assert f"s3://{BUCKET}/demo" in msg and "not reachable" in msg and "AWS_ENDPOINT_URL" in msg, msg
    assert time.monotonic() - t0 < 15


def test_missing_shard_is_a_404_naming_the_url(remote_demo, web, s3_module, tmp_path):
    local, _ = remote_demo
    copy = tmp_path / "holey"
    shutil.copytree(local, copy, ignore=shutil.ignore_patterns("vision_encoder"))
    gone = read_manifest(copy / "val")["shards"][0]["file"]
    with HttpFolderServer(tmp_path) as server:
        (copy / "val" / gone).unlink()
        url = server.url("holey")
        with pytest.raises(MissingShardsError) as e:
            _batches(make_eval_loader(_cfg(url, num_workers=0), "val"))
        assert f"{url}/val/{gone}" in str(e.value)
    s3url = f"s3://{BUCKET}/holey"
    upload_dataset(copy, s3url, verbose=False)
    with pytest.raises(MissingShardsError) as e:
        _batches(make_eval_loader(_cfg(s3url, num_workers=0), "val"))
    assert f"{s3url}/val/{gone}" in str(e.value) and "not found" in str(e.value)
