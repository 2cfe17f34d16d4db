from __future__ import annotations

import io
import json
import shutil
from collections import Counter

import pytest
import soundfile as sf
from prep_helpers import MUSTARD_OLD, MUSTARD_REAL, by_id, read_split, read_split_wds, tree_bytes, write_wav

from datasets_prep.mustard import convert
from datasets_prep.verify import verify
from datasets_prep.writer import PrepError, read_manifest


def test_mustard_replica_audio_resampled(mustard_raw, tmp_path):
    out = tmp_path / "out"
    s = convert(mustard_raw, out, shard_size=100, skip_bad=False, expect_entries=0)
    assert s["splits"] == {"train": 5, "test": 3, "val": 3}  # 3 FRIENDS in test
    test = by_id(read_split_wds(out / "test"))
    assert {json.loads(x["json"])["show"] for x in test.values()} == {"FRIENDS"}
    smp = test["2_23"]
    meta = json.loads(smp["json"])
    assert (
        smp["txt"].decode() == "SPK2: Line 2  don\u00d5t."
        and meta["label"] == 0
        and meta["context"] == ["ctx 2\nmore"]
    )
    x, sr = sf.read(io.BytesIO(smp["wav"]), dtype="int16", always_2d=True)
    info = sf.info(io.BytesIO(smp["wav"]))
    assert sr == 16000 and x.shape[1] == 1 and info.subtype == "PCM_16"
    assert x.shape[0] == round((0.1 + 0.01 * 2) * 16000)  # 22,050 Hz stereo -> 16 kHz mono, same duration
    assert 0.45 < abs(x).max() / 32767 < 0.55  # amplitude preserved (0.5 sine)
    assert read_manifest(out / "val")["val_is_test"] is True
    assert [json.loads(v["json"])["id"] for v in read_split(out / "val")] == [
        json.loads(v["json"])["id"] for v in read_split(out / "test")
    ]
    assert read_manifest(out / "train")["modalities"] == ["text", "audio"]
    assert verify(out).ok
    convert(mustard_raw, tmp_path / "again", shard_size=100, skip_bad=False, expect_entries=0)
    assert tree_bytes(out) == tree_bytes(tmp_path / "again")


def test_mustard_missing_and_bad_audio(mustard_raw, tmp_path):
    (mustard_raw / "utterances_final/1_3.wav").unlink()
    (mustard_raw / "utterances_final/2_53.wav").write_bytes(b"RIFF....garbage")
    with pytest.raises(PrepError, match=r"1_3.*missing audio.*--skip-bad"):
        convert(mustard_raw, tmp_path / "o1", shard_size=100, skip_bad=False, expect_entries=0)
    s = convert(mustard_raw, tmp_path / "o2", shard_size=100, skip_bad=True, expect_entries=0)
    assert s["splits"] == {"train": 4, "test": 2, "val": 2}
    assert read_manifest(tmp_path / "o2" / "train")["skipped"]["by_reason"] == {"missing audio": 1}
    assert read_manifest(tmp_path / "o2" / "test")["skipped"]["by_reason"] == {"undecodable audio": 1}
    s = convert(mustard_raw, tmp_path / "o3", shard_size=100, skip_bad=False, expect_entries=0, no_audio=True)
    assert s["splits"] == {"train": 5, "test": 3, "val": 3}
    assert all("wav" not in x for x in read_split(tmp_path / "o3" / "train"))


def test_mustard_frames(mustard_raw, tmp_path):
    from prep_helpers import png_bytes

    for k, key in enumerate(json.loads((mustard_raw / "sarcasm_data.json").read_text())):
        d = mustard_raw / "frames" / key
        d.mkdir(parents=True)
        for i in range(1 + k % 3):
            (d / f"frame_{i:03d}.png").write_bytes(png_bytes(k * 10 + i))
    convert(
        mustard_raw,
        tmp_path / "o",
        shard_size=100,
        skip_bad=False,
        expect_entries=0,
        frames=4,
        frames_dir=mustard_raw / "frames",
    )
    smp = read_split_wds(tmp_path / "o" / "train")[0]
    assert sorted(k for k in smp if k.startswith("f")) == ["f00.png", "f01.png", "f02.png", "f03.png"]
    assert read_manifest(tmp_path / "o" / "train")["modalities"] == ["text", "audio", "video"]
    assert verify(tmp_path / "o").ok


def _real_src(tmp_path, with_audio: bool):
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(MUSTARD_REAL, src / "sarcasm_data.json")
    if with_audio:  # placeholder audio under the real ids (no real media is public)
        for key in json.loads(MUSTARD_REAL.read_text()):
            write_wav(src / "utterances_final" / f"{key}.wav", seconds=0.02, channels=1)
    return src


def _balance(split_dir):
    c = Counter(json.loads(x["json"])["label"] for x in read_split(split_dir))
    return c[1], c[0]


def test_mustard_real_friends_split(tmp_path):
    src = _real_src(tmp_path, with_audio=True)
    out = tmp_path / "out"
    s = convert(src, out, shard_size=1000, skip_bad=False)
    assert s["splits"] == {"train": 334, "test": 356, "val": 356}
    assert _balance(out / "train") == (193, 141) and _balance(out / "test") == (152, 204)
    test_shows = Counter(json.loads(x["json"])["show"] for x in read_split(out / "test"))
    assert test_shows == {"FRIENDS": 356}
    assert len(read_manifest(out / "test")["shards"]) >= 32
    assert verify(out).ok


def test_mustard_real_mope_code_split_text_only(tmp_path):
    src = _real_src(tmp_path, with_audio=False)
    out = tmp_path / "out"
    s = convert(src, out, shard_size=1000, skip_bad=False, split_scheme="mope_code", no_audio=True)
    assert s["splits"] == {"train": 334, "test": 356, "val": 356}
    assert _balance(out / "train") == (184, 150) and _balance(out / "test") == (161, 195)
    order = list(json.loads(MUSTARD_REAL.read_text()))
    assert {json.loads(x["json"])["id"] for x in read_split(out / "train")} == set(order[:334])
    assert Counter(json.loads(x["json"])["show"] for x in read_split(out / "train")) == {"BBT": 280, "FRIENDS": 54}
    assert read_manifest(out / "train")["modalities"] == ["text"]
    # without --no-audio and without media: a clear error
    with pytest.raises(PrepError, match="no_audio"):
        convert(src, tmp_path / "o2", shard_size=1000, skip_bad=False)


def test_mustard_old_release_refused(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(MUSTARD_OLD, src / "sarcasm_data.json")
    with pytest.raises(PrepError, match=r"lack the 'show' key.*older MUStARD release"):
        convert(src, tmp_path / "out", shard_size=1000, skip_bad=True, no_audio=True)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_mustard_entry_count_asserted(mustard_raw, tmp_path):
    with pytest.raises(PrepError, match="8 entries, expected 690"):
        convert(mustard_raw, tmp_path / "o", shard_size=10, skip_bad=False)
