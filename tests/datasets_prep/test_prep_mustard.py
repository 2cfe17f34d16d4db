from __future__ import annotations

import io
import json
import shutil
from collections import Counter

import numpy as np
import pytest
import soundfile as sf

from datasets_prep.mustard import convert
from datasets_prep.verify import verify
from datasets_prep.writer import PrepError, read_manifest
from tests.helpers.prep_helpers import (
    MUSTARD_OLD,
    MUSTARD_REAL,
    by_id,
    make_mustard_replica,
    mustard_colour,
    mustard_frame,
    mustard_frame_index,
    mustard_grey,
    read_split,
    read_split_wds,
    tree_bytes,
    write_mustard_media,
    write_wav,
)


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
    from tests.helpers.prep_helpers import png_bytes

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


# ------------------------------------------------------------------------------------------ frames from the mp4s
VIDEO = (48, 32)  # width x height of the replica clips: 3:2, so the center crop is exercised
SHORT = "2_53"  # a test-split clip of 2 frames (< frames=4: the last is repeated)


def _keys(src):
    return list(json.loads((src / "sarcasm_data.json").read_text()))


def _with_videos(src, *, frames_dir=False):
    """20 frames (2 s at 10 fps) per clip, one clip (SHORT) of 2 frames."""
    keys = _keys(src)
    write_mustard_media(
        src, [k for k in keys if k != SHORT], wav=False, seconds=2.0, size=VIDEO, frames_dir=frames_dir
    )
    write_mustard_media(src, [SHORT], wav=False, seconds=0.2, size=VIDEO, frames_dir=frames_dir)
    return keys


def _img(b):
    from PIL import Image

    with Image.open(io.BytesIO(b)) as im:
        return im.format, im.size, np.asarray(im.convert("RGB"), dtype=np.float64)


def _expected(key, i, side):
    """Reference frame i of key: the lossless source frame, shorter side -> side (bicubic), center crop."""
    from PIL import Image

    w, h = VIDEO
    nw = round(w * side / h)
    im = Image.fromarray(mustard_frame(key, i, VIDEO)).resize((nw, side), Image.BICUBIC)
    left = (nw - side) // 2
    return np.asarray(im.crop((left, 0, left + side, side)), dtype=np.float64)


def _frames_of(smp):
    return [smp[k] for k in sorted(k for k in smp if k.startswith("f") and k[1:3].isdigit())]


def test_mustard_frames_from_mp4(mustard_raw, tmp_path):
    keys = _with_videos(mustard_raw)
    out = tmp_path / "out"
    s = convert(mustard_raw, out, shard_size=100, skip_bad=False, expect_entries=0, frames=4, frame_size=16)
    assert s["splits"] == {"train": 5, "test": 3, "val": 3}
    got = {**by_id(read_split_wds(out / "train")), **by_id(read_split_wds(out / "test"))}
    assert sorted(got) == sorted(keys)
    for key, smp in got.items():
        assert sorted(k for k in smp if k.startswith("f")) == ["f00.png", "f01.png", "f02.png", "f03.png"]
        assert "wav" in smp and "txt" in smp
        # evenly spaced: segment centres floor((2i+1)*20/8) of 20 frames; the 2-frame clip: 0, 1, then 1 repeated
        want = [0, 1, 1, 1] if key == SHORT else [2, 7, 12, 17]
        seen = []
        for i, b in enumerate(_frames_of(smp)):
            fmt, size, arr = _img(b)
            assert fmt == "PNG" and size == (16, 16)
            seen.append(mustard_frame_index(arr[:3, :3].mean()))  # background grey encodes the frame index
            # the whole frame is the source frame (square position + key colour) resized and center-cropped
            assert np.abs(arr - _expected(key, want[i], 16)).mean() < 4, (key, i)
            assert np.abs(arr - _expected(key, want[i] + 1, 16)).mean() > 6  # ... and not its neighbour
        assert seen == want, key
    # the square's colour is the key's (frames belong to their own sample)
    _, _, arr = _img(_frames_of(got[keys[0]])[1])  # source frame 7: square at x 14..22 (inside the crop)
    assert np.abs(arr[8, 5] - np.array(mustard_colour(keys[0]))).max() < 40
    m = read_manifest(out / "train")
    assert m["modalities"] == ["text", "audio", "video"]
    assert (m["frames"], m["frames_source"], m["frame_size"]) == (4, "video", 16)
    assert "segment centres" in m["frame_rule"]
    info = json.loads((out / "dataset.json").read_text())
    assert (info["frames"], info["frames_source"], info["frame_size"]) == (4, "video", 16)
    assert verify(out).ok
    convert(mustard_raw, tmp_path / "again", shard_size=100, skip_bad=False, expect_entries=0, frames=4, frame_size=16)
    assert tree_bytes(out) == tree_bytes(tmp_path / "again")  # deterministic decode + resize + PNG


def test_mustard_frames_default_size_and_no_frames_manifest(mustard_raw, tmp_path):
    _with_videos(mustard_raw)
    convert(mustard_raw, tmp_path / "o", shard_size=100, skip_bad=False, expect_entries=0, frames=2)
    smp = read_split(tmp_path / "o" / "test")[0]
    assert _img(smp["f01.png"])[1] == (224, 224)  # frame_size default: 224 x 224 (upscaled from 32 px here)
    convert(mustard_raw, tmp_path / "n", shard_size=100, skip_bad=False, expect_entries=0)
    m = read_manifest(tmp_path / "n" / "train")
    assert (m["frames"], m["frames_source"], m["frame_size"], m["modalities"]) == (0, None, None, ["text", "audio"])
    assert not any(k.startswith("f0") for k in read_split(tmp_path / "n" / "train")[0])


def test_mustard_bad_videos(mustard_raw, tmp_path):
    import av

    _with_videos(mustard_raw)
    vdir = mustard_raw / "videos" / "utterances_final"
    (vdir / "1_3.mp4").unlink()  # train
    data = (vdir / "2_23.mp4").read_bytes()
    (vdir / "2_23.mp4").write_bytes(data[: len(data) // 2])  # test: truncated (the moov atom is at the end)
    with av.open(str(vdir / "2_73.mp4"), "w", format="mp4") as o:  # train: a video track without frames
        st = o.add_stream("mpeg4", rate=10)
        st.width, st.height, st.pix_fmt = 32, 32, "yuv420p"
        o.start_encoding()
    opts = {"shard_size": 100, "expect_entries": 0, "frames": 4, "frame_size": 16}
    with pytest.raises(PrepError) as e:
        convert(mustard_raw, tmp_path / "o1", skip_bad=False, **opts)
    msg = str(e.value)
    assert "'1_3'" in msg and str(vdir / "1_3.mp4") in msg and "missing video" in msg
    assert "video_dir" in msg and "frames=0" in msg and "--skip-bad" in msg
    assert not (tmp_path / "o1" / "train").exists()
    s = convert(mustard_raw, tmp_path / "o2", skip_bad=True, **opts)
    assert s["splits"] == {"train": 3, "test": 2, "val": 2} and s["skipped"] == {"train": 2, "test": 1, "val": 1}
    assert read_manifest(tmp_path / "o2" / "train")["skipped"]["by_reason"] == {"empty video": 1, "missing video": 1}
    for split in ("test", "val"):
        sk = read_manifest(tmp_path / "o2" / split)["skipped"]
        assert sk["by_reason"] == {"undecodable video": 1} and "2_23.mp4" in sk["examples"][0]
    # with the missing clip back and the empty one fixed, the truncated one is the error, named with its key
    write_mustard_media(mustard_raw, ["1_3", "2_73"], wav=False, seconds=2.0, size=VIDEO)
    with pytest.raises(PrepError, match=r"'2_23'.*undecodable video .*2_23\.mp4.*video_dir.*--skip-bad"):
        convert(mustard_raw, tmp_path / "o3", skip_bad=False, **opts)
    (vdir / "2_23.mp4").write_bytes(b"this is not a video")
    with pytest.raises(PrepError, match=r"'2_23'.*undecodable video"):
        convert(mustard_raw, tmp_path / "o4", skip_bad=False, **opts)
    # no video dir at all: one clear error up front
    with pytest.raises(PrepError, match=r"video directory .*nowhere not found.*video_dir=.*frames=0"):
        convert(mustard_raw, tmp_path / "o5", skip_bad=True, video_dir=tmp_path / "nowhere", **opts)


def test_mustard_frames_need_pyav(mustard_raw, tmp_path, monkeypatch):
    import sys

    _with_videos(mustard_raw)
    monkeypatch.setitem(sys.modules, "av", None)  # `import av` raises ImportError
    with pytest.raises(PrepError, match=r"pip install av"):
        convert(mustard_raw, tmp_path / "o", shard_size=100, skip_bad=True, expect_entries=0, frames=4)
    s = convert(mustard_raw, tmp_path / "o2", shard_size=100, skip_bad=False, expect_entries=0)  # no frames: fine
    assert s["splits"]["train"] == 5


def test_mustard_frames_source_dir_auto_video(mustard_raw, tmp_path):
    keys = _with_videos(mustard_raw, frames_dir=True)  # PNG dirs at the default frames_dir + the mp4s
    opts = {"shard_size": 100, "skip_bad": False, "expect_entries": 0, "frames": 4, "frame_size": 16}
    for source in ("auto", "dir"):  # auto: the frames dir exists -> dir
        out = tmp_path / source
        convert(mustard_raw, out, frames_source=source, **opts)
        m = read_manifest(out / "train")
        assert (m["frames_source"], m["frame_size"], m["modalities"]) == ("dir", None, ["text", "audio", "video"])
        smp = by_id(read_split(out / "train"))[keys[0]]
        fr = [_img(b) for b in _frames_of(smp)]
        assert [f[1] for f in fr] == [VIDEO] * 4  # stored at their own size, losslessly
        assert [f[2][0, 0, 0] for f in fr] == [mustard_grey(i) for i in (2, 7, 12, 17)]  # same index rule
        short = by_id(read_split(out / "test"))[SHORT]
        assert [_img(b)[2][0, 0, 0] for b in _frames_of(short)] == [mustard_grey(i) for i in (0, 1, 1, 1)]
    convert(mustard_raw, tmp_path / "video", frames_source="video", **opts)  # both present: video forced
    m = read_manifest(tmp_path / "video" / "train")
    assert (m["frames_source"], m["frame_size"]) == ("video", 16)
    assert _img(read_split(tmp_path / "video" / "train")[0]["f00.png"])[1] == (16, 16)
    with pytest.raises(PrepError, match=r"frames directory .* not found"):
        convert(mustard_raw, tmp_path / "x", frames_source="dir", frames_dir=tmp_path / "none", **opts)
    with pytest.raises(PrepError, match="frames_source must be one of"):
        convert(mustard_raw, tmp_path / "y", frames_source="mp4", **opts)


def test_make_mustard_replica(tmp_path):
    src = make_mustard_replica(tmp_path / "raw", n=12, size=VIDEO)
    data = json.loads((src / "sarcasm_data.json").read_text())
    assert len(data) == 12 and all(
        list(v) == ["utterance", "speaker", "context", "context_speakers", "show", "sarcasm"] for v in data.values()
    )
    assert (src / "videos" / "utterances_final" / f"{next(iter(data))}.mp4").is_file()
    s = convert(src, tmp_path / "out", shard_size=100, skip_bad=False, expect_entries=0, frames=3, frame_size=8)
    assert s["splits"] == {"train": 6, "test": 6, "val": 6} and s["skipped"]["train"] == 0
    for split in ("train", "test"):
        assert set(read_manifest(tmp_path / "out" / split)["class_histogram"].values()) == {3}
    assert verify(tmp_path / "out").ok
