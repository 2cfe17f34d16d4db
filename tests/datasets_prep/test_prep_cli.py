from __future__ import annotations

import json

import pytest

from datasets_prep import registry
from datasets_prep.cli import main


def test_cli_convert_then_verify(snli_raw, tmp_path, capsys):
    out = tmp_path / "shards"
    rc = main(
        [
            "snli_ve",
            "--src",
            str(snli_raw),
            "--out",
            str(out),
            "--shard-size",
            "2",
            "--min-shards",
            "1",
            "--opt",
            "seed=3",
        ]
    )
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["splits"] == {"train": 4, "val": 2, "test": 1}
    assert main(["--verify", str(out)]) == 0
    assert "OK" in capsys.readouterr().out
    # corrupt one shard: verify names it and fails
    shard = min((out / "train").glob("*.tar"))
    shard.write_bytes(shard.read_bytes()[:-1024] + b"\0" * 1024 + b"x")
    assert main(["--verify", str(out)]) == 2
    assert shard.name in capsys.readouterr().out


def test_cli_errors_are_clear(tmp_path, capsys):
    assert main(["nosuch", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "unknown dataset 'nosuch'" in err and "food101" in err and "mustard" in err
    assert main(["mustard", "--src", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "sarcasm_data.json" in capsys.readouterr().err
    assert main(["food101", "--src", str(tmp_path), "--out", str(tmp_path / "o"), "--opt", "bogus"]) == 2
    assert main([]) == 2
    assert "available" in capsys.readouterr().err
    assert main(["--list"]) == 0
    assert {"food101", "mmimdb", "snli_ve", "mustard"} <= set(capsys.readouterr().out.split())
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "split_scheme" in capsys.readouterr().out


def test_cli_passes_src_none_and_options(tmp_path, monkeypatch, capsys):
    seen = {}

    def fake(src, out, *, shard_size, skip_bad, **options):
        seen.update(src=src, out=out, shard_size=shard_size, skip_bad=skip_bad, options=options)
        return {"ok": True}

    monkeypatch.setitem(registry.CONVERTERS, "fake_ds", fake)
    assert (
        main(
            [
                "prep",
                "fake_ds",
                "--out",
                str(tmp_path / "o"),
                "--skip-bad",
                "--opt",
                "a=1",
                "--opt",
                "b=true",
                "--opt",
                "c=x=y",
                "--opt",
                "no-audio=false",
            ]
        )
        == 0
    )
    assert seen["src"] is None and seen["skip_bad"] is True and seen["shard_size"] == 1000
    assert seen["options"] == {"a": 1, "b": True, "c": "x=y", "no_audio": False}


def test_registry_refuses_options_missing_from_the_converter_signature(tmp_path, monkeypatch, capsys):
    calls = []

    def conv(src, out, *, shard_size, skip_bad, seed=0, splits="train"):
        calls.append(seed)
        return {"splits": {}}

    monkeypatch.setitem(registry.CONVERTERS, "fake_sig", registry.refuse_unknown_options("fake_sig", conv))
    assert main(["fake_sig", "--out", str(tmp_path / "o"), "--opt", "sed=1"]) == 2
    assert "error: fake_sig: unknown option(s) ['sed']; valid: seed, splits" in capsys.readouterr().err
    assert calls == []  # refused before the converter runs
    assert main(["fake_sig", "--out", str(tmp_path / "o"), "--opt", "seed=1"]) == 0
    assert calls == [1]
