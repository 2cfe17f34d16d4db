"""Bad inputs get a clear answer (issue 18): every case runs the real entry point in-process (the CLI's ``main(argv)``
where there is one) and asserts the exit code, that the message names the file / sample / config field, that it
names a fix, and that no traceback escapes.

The README's "Bad input" table is generated from these cases' actual messages::

    nice -n 19 .venv/bin/python -m tests.reliability.test_bad_inputs  # prints the markdown table (from the repo root)
"""

from __future__ import annotations

import io
import json
import pickle
import re
import tarfile
import tempfile
import time
import traceback
from collections.abc import Callable
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------------------------------- helpers
def _cli(fn: Callable[[list[str]], int], argv: list[str]) -> tuple[int, str]:
    """Run a ``main(argv)`` in-process; (exit code, stdout + stderr). An exception is a failure (no traceback
    allowed)."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            rc = fn(argv)
        except SystemExit as e:  # argparse
            rc = e.code if isinstance(e.code, int) else 2
    return int(rc or 0), out.getvalue() + err.getvalue()


def harness(argv: list[str]) -> tuple[int, str]:
    from harness.cli import main

    return _cli(main, argv)


def jpeg(seed: int = 0) -> bytes:
    import numpy as np
    from PIL import Image

    arr = np.random.default_rng(seed).integers(0, 255, size=(10, 12, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=80)
    return buf.getvalue()


def _snli_line(iid: str, cap: int, lab: str = "entailment", pair: str | None = None) -> bytes:
    rec = {
        "Flickr30K_ID": iid,
        "gold_label": lab,
        "pairID": pair or f"{iid}.jpg#{cap}r1{lab[0]}",
        "sentence1": f"premise {iid} {cap}",
        "sentence2": f"hypothesis {iid} {cap} {lab}",
    }
    return json.dumps(rec).encode()


def snli_raw(
    root: Path,
    *,
    train: list[bytes] | None = None,
    test: list[bytes] | None = None,
    images: dict[str, bytes] | None = None,
) -> Path:
    """A tiny SNLI-VE release: snli_ve_{train,test}.jsonl + Flickr30K/flickr30k_images/{id}.jpg."""
    src = root / "snli_raw"
    img = src / "Flickr30K" / "flickr30k_images"
    img.mkdir(parents=True, exist_ok=True)
    for iid, data in (images or {"100": jpeg(1), "200": jpeg(2)}).items():
        (img / f"{iid}.jpg").write_bytes(data)
    train = train if train is not None else [_snli_line("100", 0), _snli_line("100", 1, "neutral")]
    test = test if test is not None else [_snli_line("200", 0, "contradiction")]
    (src / "snli_ve_train.jsonl").write_bytes(b"\n".join(train) + b"\n")
    (src / "snli_ve_test.jsonl").write_bytes(b"\n".join(test) + b"\n")
    return src


def prep(src: Path, out: Path, *extra: str) -> tuple[int, str]:
    return harness(
        [
            "prep",
            "snli_ve",
            "--src",
            str(src),
            "--out",
            str(out),
            "--min-shards",
            "1",
            "--opt",
            "splits=train,test",
            *extra,
        ]
    )


def good_shards(tmp: Path) -> Path:
    out = tmp / "shards"
    rc, text = prep(snli_raw(tmp), out)
    assert rc == 0, text
    return out


def spec_file(tmp: Path, body: str) -> Path:
    p = tmp / "spec.yaml"
    p.write_text(body)
    return p


SPEC = """\
name: bad
experiment: demo_mope
overrides:
  mope.prompt_len: 6
axes:
  mope.num_experts: [2, 4]
arms:
  mope: {method: mope}
  vanilla:
    method: vanilla_prompt
    model.vanilla_prompt_len: "=(mope.num_experts + 1) * mope.prompt_len + 1"
seeds: [0]
resources: {workers: 1, cpus_per_worker: 1}
"""


def validate_spec(tmp: Path, body: str) -> tuple[int, str, list[str]]:
    p = spec_file(tmp, body)
    rc, text = harness(["validate", str(p), "--no-path-check"])
    return rc, text, [str(p)]


def sweep_no_launch(tmp: Path, body: str, *extra: str) -> tuple[int, str, list[str]]:
    """`harness sweep SPEC` (not a dry run) with the launcher replaced by a failure: a sweep refused before launch
    never reaches it, and nothing is ever started on this machine."""
    from harness import launch

    p = spec_file(tmp, body)
    real = launch.run_sweep

    def must_not_launch(*a, **k):
        raise AssertionError("the sweep was launched although its trials can never be scheduled")

    launch.run_sweep = must_not_launch
    try:
        rc, text = harness(["sweep", str(p), "--no-report", *extra])
    finally:
        launch.run_sweep = real
    return rc, text, [str(p)]


def validate_overrides(*ovr: str) -> tuple[int, str]:
    return harness(["validate", *ovr])


# ------------------------------------------------------------------------------------------------------- the cases
@dataclass
class Case:
    id: str
    area: str
    input: str  # what the user gave (for the README table)
    run: Callable[[Path], tuple[int, str, list[str]]]  # -> exit code, message, strings it must name
    fix: tuple[str, ...]  # at least one must appear: the fix the message names
    rc: int = 2


def _c(rc_text: tuple[int, str], *names: str) -> tuple[int, str, list[str]]:
    return rc_text[0], rc_text[1], list(names)


def _raw_case(mutate: Callable[[Path], tuple[Path, list[str]]], *extra: str) -> Callable[[Path], tuple]:
    def run(tmp: Path):
        src, names = mutate(tmp)
        rc, text = prep(src, tmp / "out", *extra)
        return rc, text, names

    return run


def _nonutf8(tmp: Path):
    src = snli_raw(tmp, train=[_snli_line("100", 0), b'{"pairID": "x", "sentence2": "caf\xe9"}'])
    return src, [f"{src / 'snli_ve_train.jsonl'}:2", "not UTF-8"]


def _nonutf8_skip(tmp: Path):
    src, _ = _nonutf8(tmp)
    return src, ["non-UTF-8 line", '"skipped"']


def _malformed(tmp: Path):
    src = snli_raw(tmp, train=[_snli_line("100", 0), _snli_line("100", 1)[:25]])  # a truncated last line
    return src, [f"{src / 'snli_ve_train.jsonl'}:2", "malformed JSON line"]


def _bad_label(tmp: Path):
    src = snli_raw(tmp, train=[_snli_line("100", 0), _snli_line("100", 1, "maybe")])
    return src, [f"{src / 'snli_ve_train.jsonl'}:2", "'maybe'", "contradiction"]


def _dup_ids(tmp: Path):
    src = snli_raw(tmp, train=[_snli_line("100", 0, pair="p1"), _snli_line("100", 1, pair="p1")])
    return src, [f"{src / 'snli_ve_train.jsonl'}:2", "duplicate pairID 'p1'", "line 1"]


def _corrupt_jpeg(tmp: Path):
    src = snli_raw(tmp, images={"100": b"\xff\xd8\xff\xe0 definitely not a JPEG", "200": jpeg(2)})
    return src, [str(src / "Flickr30K" / "flickr30k_images" / "100.jpg"), "undecodable image"]


def _corrupt_jpeg_skip(tmp: Path):
    src, _ = _corrupt_jpeg(tmp)
    return src, ["undecodable image", '"train": 2']  # both train lines use image 100: both skipped, counted


def _truncated_jpeg(tmp: Path):
    src = snli_raw(tmp, images={"100": jpeg(1)[:300], "200": jpeg(2)})
    return src, [str(src / "Flickr30K" / "flickr30k_images" / "100.jpg"), "undecodable image"]


def _missing_image(tmp: Path):
    src = snli_raw(tmp, images={"100": jpeg(1)})
    return src, [str(src / "Flickr30K" / "flickr30k_images" / "200.jpg"), "missing image"]


def _missing_file(tmp: Path):
    src = snli_raw(tmp)
    (src / "snli_ve_test.jsonl").unlink()
    return src, [str(src), "snli_ve_test.jsonl", "'test'"]


def _food_titles_nonutf8(tmp: Path):
    src = tmp / "food_raw"
    (src / "images" / "train" / "apple_pie").mkdir(parents=True)
    (src / "images" / "train" / "apple_pie" / "apple_pie_1.jpg").write_bytes(jpeg(1))
    (src / "texts").mkdir()
    (src / "texts" / "train_titles.csv").write_bytes(
        b"apple_pie_1.jpg,ok title,apple_pie\r\napple_pie_2.jpg,caf\xe9 title,apple_pie\r\n"
    )
    return src, [f"{src / 'texts' / 'train_titles.csv'}:2", "not UTF-8"]


def _food_prep(tmp: Path):
    src, names = _food_titles_nonutf8(tmp)
    rc, text = harness(
        [
            "prep",
            "food101",
            "--src",
            str(src),
            "--out",
            str(tmp / "out"),
            "--opt",
            "splits=train",
            "--opt",
            "val_size=0",
            "--opt",
            "text_source=titles",
        ]
    )
    return rc, text, names


# -- shards
def _verify(tmp: Path, mutate: Callable[[Path], list[str]]) -> tuple[int, str, list[str]]:
    out = good_shards(tmp)
    names = mutate(out)
    rc, text = harness(["prep", "--verify", str(out)])
    return rc, text, names


def _truncate_tar(out: Path) -> list[str]:
    shard = min((out / "train").glob("*.tar"))
    shard.write_bytes(shard.read_bytes()[:700])
    return [shard.name, "sha256 mismatch"]


def _drop_manifest(out: Path) -> list[str]:
    for m in out.glob("*/manifest.json"):
        m.unlink()
    return [str(out), "no split directory with a manifest.json"]


def _count_mismatch(out: Path) -> list[str]:
    p = out / "train" / "manifest.json"
    m = json.loads(p.read_text())
    m["shards"][0]["count"] += 5
    p.write_text(json.dumps(m))
    return [m["shards"][0]["file"], "manifest says"]


def _dotdot_member(out: Path) -> list[str]:
    shard = min((out / "train").glob("*.tar"))
    with tarfile.open(shard, "a") as tar:
        data = b'{"id": "evil", "label": 0}'
        ti = tarfile.TarInfo("../evil.json")
        ti.size = len(data)
        tar.addfile(ti, io.BytesIO(data))
    return [shard.name, "'../evil.json'"]


# -- adapters
def _adapter_case(kind: str) -> Callable[[Path], tuple[int, str, list[str]]]:
    def run(tmp: Path):
        from mope import AdapterMismatchError, load_adapter, save_adapter
        from tests.helpers.tinymodels import build, tiny_cfg

        model = build(tiny_cfg("mope"))
        d = tmp / "adapter"
        save_adapter(model, d)
        f = d / "adapter.safetensors"
        names = [str(f) if kind != "config" else str(d)]
        if kind == "config":
            model = build(tiny_cfg("mope", num_experts=2))
            names.append("mope.num_experts: saved 4, model 2")
        elif kind == "truncated":
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
            names.append("not a safetensors adapter file")
        elif kind == "pickle":
            marker = tmp / "PWNED"
            f.write_bytes(pickle.dumps(_Planted(str(marker))))
            names.append("not a safetensors adapter file")
        try:
            load_adapter(model, d)
        except AdapterMismatchError as e:
            if kind == "pickle":
                assert not (tmp / "PWNED").exists(), "the planted pickle was executed"
            return 2, f"{type(e).__name__}: {e}", names
        return 0, "loaded", names

    return run


class _Planted:
    """A pickle that creates a marker file when unpickled (proof that a loader ran it)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


CASES: list[Case] = [
    # -- sweep YAML
    Case(
        "spec-unknown-key",
        "sweep YAML",
        "top-level key `axis:` (typo of `axes`)",
        lambda t: validate_spec(t, SPEC.replace("axes:", "axis:")),
        ("allowed",),
    ),
    Case(
        "spec-wrong-type",
        "sweep YAML",
        "`seeds: two`",
        lambda t: validate_spec(t, SPEC.replace("seeds: [0]", "seeds: two")),
        ("must be a non-empty list",),
    ),
    Case(
        "spec-axis-string-value",
        "sweep YAML",
        "axis `mope.num_experts: [heavy]` (no arm expression)",
        lambda t: validate_spec(
            t, SPEC.replace("[2, 4]", "[heavy]").replace('"=(mope.num_experts + 1) * mope.prompt_len + 1"', "19")
        ),
        ("expected an integer",),
    ),
    Case(
        "spec-axis-string-in-expression",
        "sweep YAML",
        "axis `[two]` read by an `=` arm expression",
        lambda t: validate_spec(t, SPEC.replace("[2, 4]", "[two]")),
        ("check the type",),
    ),
    Case(
        "spec-empty-axis",
        "sweep YAML",
        "`mope.num_experts: []`",
        lambda t: validate_spec(t, SPEC.replace("[2, 4]", "[]")),
        ("must be a non-empty list",),
    ),
    Case(
        "spec-impossible-constraint",
        "sweep YAML",
        '`constraints: ["mope.num_experts > 100"]`',
        lambda t: validate_spec(t, SPEC + 'constraints: ["mope.num_experts > 100"]\n'),
        ("relax them",),
    ),
    Case(
        "spec-unknown-method",
        "sweep YAML",
        "arm `{method: nosuch}`",
        lambda t: validate_spec(t, SPEC.replace("{method: mope}", "{method: nosuch}")),
        ("use one of the options",),
    ),
    Case(
        "spec-unknown-backbone",
        "sweep YAML",
        "override `vision: nosuch_vit`",
        lambda t: validate_spec(
            t, SPEC.replace("  mope.prompt_len: 6\n", "  mope.prompt_len: 6\n  vision: nosuch_vit\n")
        ),
        ("use one of the options",),
    ),
    Case(
        "spec-yaml-syntax",
        "sweep YAML",
        "unclosed `[` in an axis",
        lambda t: validate_spec(t, SPEC.replace("[2, 4]", "[2, 4")),
        ("fix the syntax",),
    ),
    Case(
        "spec-gpus-on-cpu-machine",
        "sweep YAML",
        "`resources: {gpus_per_worker: 8}` on a machine without GPUs",
        lambda t: sweep_no_launch(t, SPEC.replace("cpus_per_worker: 1}", "cpus_per_worker: 1, gpus_per_worker: 8}")),
        ("lower resources",),
    ),
    Case(
        "spec-cpus-larger-than-machine",
        "sweep YAML",
        "`resources: {workers: 4, cpus_per_worker: 16}` (2 CPUs)",
        lambda t: sweep_no_launch(
            t, SPEC.replace("{workers: 1, cpus_per_worker: 1}", "{workers: 4, cpus_per_worker: 16}"), "--num-cpus", "2"
        ),
        ("lower resources",),
    ),
    # -- Hydra overrides
    Case(
        "override-unknown-key",
        "Hydra override",
        "`mope.num_expertz=4`",
        lambda t: _c(validate_overrides("mope.num_expertz=4"), "mope.num_expertz", "mope.num_experts"),
        ("did you mean",),
    ),
    Case(
        "override-wrong-type",
        "Hydra override",
        "`mope.num_experts=abc`",
        lambda t: _c(validate_overrides("mope.num_experts=abc"), "mope.num_experts='abc'"),
        ("expected an integer",),
    ),
    Case(
        "override-float-for-int",
        "Hydra override",
        "`mope.num_experts=2.5`",
        lambda t: _c(validate_overrides("mope.num_experts=2.5"), "mope.num_experts=2.5"),
        ("expected an integer",),
    ),
    Case(
        "override-negative-length",
        "Hydra override",
        "`mope.prompt_len=-3`",
        lambda t: _c(validate_overrides("mope.prompt_len=-3"), "mope.prompt_len=-3"),
        ("must be >= 0",),
    ),
    Case(
        "override-unknown-group-option",
        "Hydra override",
        "`method=nosuch`",
        lambda t: _c(validate_overrides("method=nosuch"), "method=nosuch", "vanilla_prompt"),
        ("use one of the options",),
    ),
    Case(
        "override-bad-epochs",
        "Hydra override",
        "`trainer.epochs=0`",
        lambda t: _c(validate_overrides("trainer.epochs=0"), "trainer.epochs=0"),
        ("must be an integer >= 1",),
    ),
    # -- raw dataset files
    Case(
        "raw-missing-file",
        "raw dataset",
        "SNLI-VE `--src` without `snli_ve_test.jsonl`",
        _raw_case(_missing_file),
        ("--opt splits=",),
    ),
    Case(
        "raw-non-utf8",
        "raw dataset",
        "a `.jsonl` line with a cp1252 byte",
        _raw_case(_nonutf8),
        ("re-encode the file as UTF-8",),
    ),
    Case(
        "raw-non-utf8-skip-bad",
        "raw dataset",
        "the same with `--skip-bad`",
        _raw_case(_nonutf8_skip, "--skip-bad"),
        ("manifest",),
        rc=0,
    ),
    Case("raw-malformed-json-line", "raw dataset", "a truncated JSON line", _raw_case(_malformed), ("--skip-bad",)),
    Case("raw-label-not-in-list", "raw dataset", "`gold_label: maybe`", _raw_case(_bad_label), ("--skip-bad",)),
    Case("raw-duplicate-ids", "raw dataset", "the same `pairID` twice", _raw_case(_dup_ids), ("--skip-bad",)),
    Case("raw-corrupt-jpeg", "raw dataset", "an image that is not a JPEG", _raw_case(_corrupt_jpeg), ("--skip-bad",)),
    Case(
        "raw-corrupt-jpeg-skip-bad",
        "raw dataset",
        "the same with `--skip-bad`",
        _raw_case(_corrupt_jpeg_skip, "--skip-bad"),
        ("--verify",),
        rc=0,
    ),
    Case(
        "raw-truncated-jpeg", "raw dataset", "a JPEG cut after 300 bytes", _raw_case(_truncated_jpeg), ("--skip-bad",)
    ),
    Case(
        "raw-missing-image",
        "raw dataset",
        "an image file that is not there",
        _raw_case(_missing_image),
        ("--skip-bad",),
    ),
    Case(
        "raw-csv-non-utf8",
        "raw dataset",
        "Food-101 `train_titles.csv` with a cp1252 byte",
        _food_prep,
        ("re-encode the file as UTF-8",),
    ),
    # -- shards
    Case(
        "shard-truncated-tar",
        "shards",
        "`harness prep --verify` on a shard cut to 700 bytes",
        lambda t: _verify(t, _truncate_tar),
        ("re-run the conversion",),
    ),
    Case(
        "shard-missing-manifest",
        "shards",
        "`--verify` on splits whose manifest.json was deleted",
        lambda t: _verify(t, _drop_manifest),
        ("convert into it first",),
    ),
    Case(
        "shard-count-mismatch",
        "shards",
        "manifest.json count 5 higher than the shard holds",
        lambda t: _verify(t, _count_mismatch),
        ("re-run the conversion",),
    ),
    Case(
        "shard-dotdot-member",
        "shards",
        "a shard member named `../evil.json`",
        lambda t: _verify(t, _dotdot_member),
        ("re-run the conversion",),
    ),
    # -- adapters / checkpoints (library calls: the error type is the answer)
    Case(
        "adapter-other-config",
        "adapter",
        "`load_adapter` into a model with k=2 (saved with k=4)",
        _adapter_case("config"),
        ("read_adapter_config",),
    ),
    Case(
        "adapter-truncated",
        "adapter",
        "`load_adapter` on a half-written adapter.safetensors",
        _adapter_case("truncated"),
        ("save_adapter",),
    ),
    Case(
        "adapter-pickle",
        "adapter",
        "a pickle (with a code-running `__reduce__`) renamed adapter.safetensors",
        _adapter_case("pickle"),
        ("never unpickled",),
    ),
    # -- CLI arguments
    Case(
        "cli-unknown-subcommand",
        "CLI",
        "`harness swep`",
        lambda t: _c(harness(["swep"]), "'swep'"),
        ("did you mean `harness sweep`",),
    ),
    Case(
        "cli-missing-out",
        "CLI",
        "`harness prep snli_ve --src DIR` (no --out)",
        lambda t: _c(harness(["prep", "snli_ve", "--src", str(t)]), "--out"),
        ("is required",),
    ),
    Case(
        "cli-sweep-missing-spec",
        "CLI",
        "`harness sweep --dry-run` (no SPEC)",
        lambda t: _c(harness(["sweep", "--dry-run"]), "SPEC"),
        ("sweeps/expert_vs_length.yaml",),
    ),
    Case(
        "cli-inspect-no-preset",
        "CLI",
        "`harness inspect` (no --preset)",
        lambda t: _c(harness(["inspect"]), "paper/mope_swin_b_k4", "no preset given"),
        ("--preset NAME",),
    ),
    Case(
        "cli-unknown-option",
        "CLI",
        "`harness prep --frobnicate`",
        lambda t: _c(harness(["prep", "--frobnicate"]), "--frobnicate"),
        ("usage:",),
    ),
]


def check(case: Case, tmp: Path) -> tuple[str, list[str]]:
    """Runs one case and checks it; returns its message and the names it had to contain (for the README table)."""
    rc, text, names = case.run(tmp)
    assert "Traceback" not in text, f"{case.id}: a traceback escaped:\n{text}"
    assert rc == case.rc, f"{case.id}: exit code {rc}, expected {case.rc}:\n{text}"
    for n in names:
        assert n in text, f"{case.id}: the message does not name {n!r}:\n{text}"
    assert any(f in text for f in case.fix), f"{case.id}: the message names no fix ({case.fix}):\n{text}"
    return text, names


def test_at_least_25_cases_over_every_area():
    assert len(CASES) >= 25 and len({c.id for c in CASES}) == len(CASES)
    assert {c.area for c in CASES} == {"sweep YAML", "Hydra override", "raw dataset", "shards", "adapter", "CLI"}


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_input(case: Case, tmp_path: Path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    if case.id == "spec-gpus-on-cpu-machine":  # the check reads torch.cuda.device_count(): pretend no GPU
        import torch

        monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    check(case, tmp_path)


def test_explicit_cluster_or_flag_skips_the_resource_check(tmp_path, monkeypatch):
    """--no-resource-check skips the refusal; --dry-run only warns; RAY_ADDRESS (an existing cluster) replaces the
    local check by the cluster's (tests/cluster), and a cluster that cannot be reached is named at once."""
    body = SPEC.replace("{workers: 1, cpus_per_worker: 1}", "{workers: 4, cpus_per_worker: 16}")
    rc, text = harness(["sweep", str(spec_file(tmp_path, body)), "--dry-run", "--num-cpus", "2"])
    assert rc == 0 and "warning: resources: a trial needs 64 CPUs" in text and "run_name" in text
    launched = []
    from harness import launch

    monkeypatch.setattr(launch, "run_sweep", lambda *a, **k: launched.append(1) or 0)
    assert harness(["sweep", str(tmp_path / "spec.yaml"), "--no-report", "--no-resource-check"])[0] == 0
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
    t0 = time.perf_counter()
    rc, text = harness(["sweep", str(tmp_path / "spec.yaml"), "--no-report"])
    assert rc == 2 and f"cannot reach the Ray cluster at 127.0.0.1:{port}" in text and "ray start --head" in text
    assert time.perf_counter() - t0 < 30  # not Ray's minutes of reconnecting
    assert launched == [1]


def test_non_utf8_text_and_split_leak_are_counted_and_printed(tmp_path):
    """A text decoded by the cp1252 fallback and a sample id in train and test: written, but counted in the manifest's
    `warnings` and printed by `harness prep`."""
    src = tmp_path / "food_raw"
    for split, names in (("train", ["apple_pie_1", "apple_pie_2"]), ("test", ["apple_pie_2", "apple_pie_3"])):
        for n in names:
            (src / "images" / split / "apple_pie").mkdir(parents=True, exist_ok=True)
            (src / "images" / split / "apple_pie" / f"{n}.jpg").write_bytes(jpeg(len(n)))
            (src / "texts_txt" / "apple_pie").mkdir(parents=True, exist_ok=True)
            txt = b"caf\xe9 au lait" if n == "apple_pie_1" else b"plain text"
            (src / "texts_txt" / "apple_pie" / f"{n}.txt").write_bytes(txt)
    out = tmp_path / "out"
    rc, text = harness(
        [
            "prep",
            "food101",
            "--src",
            str(src),
            "--out",
            str(out),
            "--opt",
            "val_size=0",
            "--opt",
            "text_source=texts_txt",
            "--min-shards",
            "1",
        ]
    )
    assert rc == 0, text
    assert "1 x text not UTF-8, decoded as cp1252" in text and "split leak" in text and "apple_pie_2" in text
    train = json.loads((out / "train" / "manifest.json").read_text())
    test = json.loads((out / "test" / "manifest.json").read_text())
    assert train["warnings"]["by_reason"] == {"text not UTF-8, decoded as cp1252": 1}
    assert test["warnings"]["by_reason"] == {"split leak: sample id also in split 'train'": 1}
    assert "apple_pie_apple_pie_2" in test["warnings"]["examples"][0]
    # a second conversion into the same folder gives the same manifests (the leak registry is per conversion)
    before = {p: p.read_bytes() for p in out.glob("*/manifest.json")}
    assert (
        harness(
            [
                "prep",
                "food101",
                "--src",
                str(src),
                "--out",
                str(out),
                "--opt",
                "val_size=0",
                "--opt",
                "text_source=texts_txt",
                "--min-shards",
                "1",
            ]
        )[0]
        == 0
    )
    assert {p: p.read_bytes() for p in out.glob("*/manifest.json")} == before


# ------------------------------------------------------------------------------------------------------- README table
_MSG_LINE = re.compile(r"^(harness[\w -]*: |error: |warning: |skipped |fix: |- |\w+Error: )")


def _table_message(text: str, tmp: Path, names: list[str]) -> str:
    """The message line that names the most specific thing the case checks, plus the `fix:` line if separate."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    cand = [ln for ln in lines if _MSG_LINE.match(ln)] or lines
    pick = [ln for ln in cand if any(n in ln for n in names[-1:])][:1] or cand[:1]
    i = lines.index(pick[0])
    if pick[0].endswith(":") and i + 1 < len(lines):
        pick.append(lines[i + 1])
    pick += [ln for ln in cand if ln.startswith("fix:")][:1]
    msg = " / ".join(dict.fromkeys(pick)).replace(str(tmp), "<tmp>").replace(str(ROOT), ".").replace("|", "\\|")
    return msg if len(msg) <= 360 else msg[:357] + "..."


def markdown_table() -> str:
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.pop("RAY_ADDRESS", None)
    import torch

    torch.cuda.device_count = lambda: 0  # as in the test
    rows = ["| area | input | exit | message (abridged) |", "|---|---|---|---|"]
    for c in CASES:
        with tempfile.TemporaryDirectory() as d:
            tmp = Path(d)
            try:
                text, names = check(c, tmp)
            except Exception:  # noqa: BLE001 - show the failing case in the table rather than hide it
                text, names = "CASE FAILED: " + traceback.format_exc(limit=1), []
            exit_ = "exception" if c.area == "adapter" else str(c.rc)
            rows.append(f"| {c.area} | {c.input} | {exit_} | {_table_message(text, tmp, names)} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown_table())
