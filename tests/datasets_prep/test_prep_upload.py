"""`harness prep NAME ... --out s3://...` and `harness prep --upload DIR --out s3://...` against a real S3 server
(moto, 127.0.0.1): what lands in the bucket is byte-for-byte the local build, manifests included; a rebuild replaces
stale shards; a foreign target, a broken local build and an unreachable store are refused with the URL named, nothing
uploaded."""

from __future__ import annotations

import hashlib

from datasets_prep.cli import main
from mope_data.format import read_manifest, read_split_index


def _snli(raw, out, shard_size="2"):
    return ["snli_ve", "--src", str(raw), "--out", str(out), "--shard-size", shard_size, "--min-shards", "1"]


def _tree(fs, url_root: str) -> dict[str, str]:
    root = url_root.removeprefix("s3://").rstrip("/")
    fs.invalidate_cache()
    return {p[len(root) + 1 :]: hashlib.sha256(fs.cat_file(p)).hexdigest() for p in fs.find(root)}


def _local_tree(d) -> dict[str, str]:
    return {
        p.relative_to(d).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in d.rglob("*") if p.is_file()
    }


def test_prep_out_s3_uploads_exactly_the_local_build(snli_raw, tmp_path, s3, capsys):
    s3.make_bucket("data")
    local = tmp_path / "local"
    assert main(_snli(snli_raw, local)) == 0
    url = "s3://data/datasets/snli_ve"
    assert main(_snli(snli_raw, url)) == 0
    err = capsys.readouterr().err
    assert f"to {url}" in err and f"data.shard_dir={url}" in err
    fs = s3.fs()
    assert _tree(fs, url) == _local_tree(local)  # deterministic build: the same bytes, manifests and dataset.json
    assert [k for k, _ in read_split_index(f"{url}/train")] == [k for k, _ in read_split_index(local / "train")]

    # a rebuild with another shard size replaces the split: no stale shard of the first build stays behind
    before = {k for k in _tree(fs, url) if k.endswith(".tar")}
    assert main(_snli(snli_raw, url, shard_size="1")) == 0
    after = _tree(fs, url)
    m = read_manifest(f"{url}/train")
    assert {k for k in after if k.startswith("train/") and k.endswith(".tar")} == {
        f"train/{s['file']}" for s in m["shards"]
    }
    assert before != {k for k in after if k.endswith(".tar")}


def test_prep_upload_of_a_local_build_with_fewshot_subsets(snli_raw, tmp_path, s3, capsys):
    from datasets_prep.fewshot import build_fewshot

    s3.make_bucket("data")
    local = tmp_path / "snli"
    assert main(_snli(snli_raw, local)) == 0
    build_fewshot(local / "train", [2], seed=0)
    url = "s3://data/snli"
    assert main(["--upload", str(local), "--out", url]) == 0
    assert _tree(s3.fs(), url) == _local_tree(local)
    from mope_data.format import read_fewshot

    assert len(read_fewshot(f"{url}/train", 2, 0)["keys"]) == 2  # checked against the remote manifest's sha256


def test_prep_to_s3_refusals_name_the_url_and_upload_nothing(snli_raw, tmp_path, s3, capsys, monkeypatch):
    s3.make_bucket("data")
    fs = s3.fs()
    fs.pipe_file("data/other/notes.txt", b"someone else's files")
    assert main(_snli(snli_raw, "s3://data/other")) == 2
    err = capsys.readouterr().err
    assert "s3://data/other" in err and "not empty" in err
    assert _tree(fs, "s3://data/other") == {"notes.txt": hashlib.sha256(b"someone else's files").hexdigest()}

    # a local build that fails verification (a shard cut short) is not uploaded
    local = tmp_path / "snli"
    assert main(_snli(snli_raw, local)) == 0
    shard = min((local / "train").glob("*.tar"))
    shard.write_bytes(shard.read_bytes()[:-1024])
    assert main(["--upload", str(local), "--out", "s3://data/snli"]) == 2
    err = capsys.readouterr().err
    assert "failed verification" in err and "s3://data/snli" in err
    fs.invalidate_cache()
    assert not fs.exists("data/snli")
    assert main(["--upload", str(local), "--out", str(tmp_path / "x")]) == 2
    assert "needs --out URL" in capsys.readouterr().err

    # an unreachable store: named, with the endpoint variable to check
    from tests.helpers.s3 import clear_fs_caches, free_port

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    clear_fs_caches()
    assert main(_snli(snli_raw, "s3://data/snli")) == 2
    err = capsys.readouterr().err
    assert "s3://data/snli" in err and "AWS_ENDPOINT_URL" in err, err
