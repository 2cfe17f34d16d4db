"""Security (issue 18): YAML is safe-loaded, nothing is unpickled, shards never write outside their directory, the
MLflow UI the harness documents binds 127.0.0.1. Each test plants the attack and shows it does nothing."""

from __future__ import annotations

import io
import json
import re
import tarfile
import uuid
from pathlib import Path

from test_bad_inputs import ROOT, good_shards, harness

PROJECT_CODE = [
    p for d in ("harness", "mope", "mope_data", "datasets_prep", "reports", "bench") for p in (ROOT / d).rglob("*.py")
]


def test_sweep_yaml_python_tag_is_refused_without_running(tmp_path):
    marker = tmp_path / "PWNED"
    spec = tmp_path / "evil.yaml"
    spec.write_text(f'name: !!python/object/apply:builtins.open ["{marker}", "w"]\nexperiment: demo_mope\n')
    rc, text = harness(["validate", str(spec), "--no-path-check"])
    assert rc == 2 and "tag refused" in text and str(spec) in text and "safe_load" in text, text
    assert "Traceback" not in text
    assert not marker.exists(), "the YAML tag was executed"
    rc, text = harness(["sweep", str(spec), "--dry-run"])
    assert rc == 2 and not marker.exists()


def test_project_code_never_loads_yaml_or_pickles_unsafely():
    bad = re.compile(
        r"yaml\.load\(|yaml\.unsafe_load|yaml\.(Full|Unsafe)?Loader\b|pickle\.loads?\(|"
        r"torch\.load\((?![^)]*weights_only=True)"
    )
    hits = [
        f"{p.relative_to(ROOT)}:{i}: {ln.strip()}"
        for p in PROJECT_CODE
        for i, ln in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
        if bad.search(ln) and not ln.lstrip().startswith(("#", '"', "'")) and "``" not in ln
    ]
    assert not hits, "unsafe loaders:\n" + "\n".join(hits)


def _add(tar: tarfile.TarFile, name: str, data: bytes = b"x", *, link: str | None = None) -> None:
    ti = tarfile.TarInfo(name)
    if link is not None:
        ti.type, ti.linkname = tarfile.SYMTYPE, link
        tar.addfile(ti)
        return
    ti.size = len(data)
    tar.addfile(ti, io.BytesIO(data))


def test_shard_member_paths_cannot_write_outside_the_output_directory(tmp_path):
    """A shard with members `../escape.json`, an absolute path and a symlink is read by every shard reader
    (verify, few-shot index, the training loader's in-memory reader, webdataset): none writes a file anywhere, and
    verify names each bad member."""
    out = good_shards(tmp_path)
    abs_target = Path("/tmp") / f"mope-escape-{uuid.uuid4().hex}.json"
    shard = min((out / "train").glob("*.tar"))
    meta = json.dumps({"id": "evil", "label": 0}).encode()
    with tarfile.open(shard, "a") as tar:
        _add(tar, "../escape.json", meta)
        _add(tar, str(abs_target), meta)
        _add(tar, "link.json", link="/etc/passwd")
    before = set(tmp_path.rglob("*"))

    rc, text = harness(["prep", "--verify", str(out)])
    assert rc == 2 and "'../escape.json'" in text and str(abs_target).lstrip("/") in text and "link.json" in text
    assert "re-run the conversion" in text

    from mope_data.format import read_samples, read_split_index

    try:
        read_split_index(out / "train")
    except Exception:  # noqa: BLE001, S110 - refusing is fine; writing is not
        pass
    import webdataset as wds

    list(wds.WebDataset([str(shard)], shardshuffle=False, empty_check=False, handler=wds.ignore_and_continue))

    m = json.loads((out / "train" / "manifest.json").read_text())
    try:
        read_samples(out / "train", m, ["..", "evil", "link"])
    except Exception:  # noqa: BLE001, S110 - refusing is fine
        pass

    assert not abs_target.exists()
    assert not (out / "escape.json").exists() and not (out / "train" / "link.json").exists()
    assert set(tmp_path.rglob("*")) == before, "a shard reader wrote files"


def test_no_shard_reader_extracts_to_disk():
    """Shards are only ever read into memory (tarfile.extractfile / webdataset), never extracted to a path."""
    hits = [
        f"{p.relative_to(ROOT)}:{i}"
        for p in PROJECT_CODE
        for i, ln in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
        if re.search(r"\.extractall\(|\.extract\(", ln)
    ]
    assert not hits, hits


def test_mlflow_ui_is_documented_and_started_on_localhost_only():
    """The harness never starts an MLflow server or UI itself; every `mlflow ui` / `mlflow server` command it
    documents binds 127.0.0.1 explicitly (`--host 127.0.0.1`: MLflow's default has changed across versions and is
    set by env vars), or, for the cluster's tracking server, the head node's private address the user names
    (`--host "$HEAD_PRIVATE_IP"`); no 0.0.0.0 anywhere."""
    docs = [ROOT / "README.md", ROOT / "Makefile", *PROJECT_CODE]
    allowed = ("127.0.0.1", "localhost", '"$HEAD_PRIVATE_IP"')
    for p in docs:
        text = p.read_text(encoding="utf-8")
        assert "0.0.0.0" not in text, f"{p.relative_to(ROOT)} binds all interfaces"
        for cmd in re.findall(r"mlflow (?:ui|server)[^`\n]*", text):
            host = re.search(r"(?:--host|-h)[ =](\S+)", cmd)
            assert host is not None and host.group(1) in allowed, f"{p.relative_to(ROOT)}: {cmd}"
    spawn = re.compile(r"""["']mlflow["']\s*,\s*["'](?:ui|server)["']|mlflow\.server|_run_server""")
    assert not [p for p in PROJECT_CODE if spawn.search(p.read_text(encoding="utf-8"))]
