"""MUStARD -> webdataset shards (``harness prep mustard``), binary sarcasm detection (text + audio [+ frames]).

Raw layout (``--src``)::

    sarcasm_data.json                 one JSON object, 690 keys "{1|2}_{n}" in a meaningful order; each value holds
                                      utterance, speaker, context, context_speakers, show, sarcasm (bool)
    utterances_final/{key}.wav        utterance audio (any rate/channels libsndfile reads; override: audio_dir)
    videos/utterances_final/{key}.mp4 utterance video, as in the release's ``data/`` dir (override: video_dir); read
                                      only with ``frames=N``
    (optional) frames: {frames_dir}/{key}/*.{png,jpg,bmp} or {frames_dir}/{key}_aligned/*.bmp (OpenFace crops)

The file must be the current release (2019-02-28): exactly 690 entries, each with ``show``. Older releases (no
``show``) are refused with a clear error.

Split schemes (``--opt split_scheme=...``):

- ``friends`` (default; speaker-independent, as MUStARD and PromptFuse): test = ``show == "FRIENDS"`` (356),
  train = the rest (334); counts asserted.
- ``mope_code``: MoPE's released loader, first 334 keys (file order) = train, the other 356 = test.

``val`` is written as an identical copy of ``test`` (the MoPE reference evaluates on the same set; there is no
separate MUStARD dev set). Its manifest carries ``"val_is_test": true``.

Text = ``"{speaker}: {utterance}"`` (context not used by the reference; kept in json). Label: 0 ``not_sarcastic``,
1 ``sarcastic``. Audio: downmixed to mono, resampled to 16 kHz (``scipy.signal.resample_poly``), stored as PCM16 WAV
(``wav``). A missing/undecodable wav is an error (or skipped and counted with ``--skip-bad``); ``no_audio=true``
builds text-only shards (for the annotation file without media).

Frames (``frames=N``, N > 0; the ``"video"`` modality): N frames per clip stored as PNG members ``f00.png``,
``f01.png``, ... Their source (``frames_source``):

- ``video``: decoded from ``{video_dir}/{key}.mp4`` with PyAV (``pip install av``, the ``video`` extra). Every frame is
  decoded (presentation order); of the n decoded frames, frame i (0 <= i < N) is number ``floor((2i + 1) n / (2N))``,
  the middle of the i-th of N equal segments; when n < N the n frames are taken in order and the last is repeated.
  Each frame is resized so that its shorter side is ``frame_size`` (bicubic) and center-cropped to
  ``frame_size`` x ``frame_size`` (``frame_size=0``: native size, no resize). A missing or undecodable mp4 (not a
  video, truncated, no video stream, zero frames) is an error naming file and key, or skipped and counted with
  ``--skip-bad``.
- ``dir``: image files already extracted per clip (``{frames_dir}/{key}/`` or OpenFace's ``{key}_aligned/``), sorted by
  name, picked with the same index rule, stored losslessly at their own size (``frame_size`` is not applied).
- ``auto`` (default): ``dir`` when ``frames_dir`` is given or its default directory exists, else ``video``.

The manifests and ``dataset.json`` record ``frames``, ``frames_source`` (``"video"``/``"dir"``, null without frames)
and ``frame_size`` (null unless the frames come from the videos).

Options: ``split_scheme``, ``no_audio`` (false), ``audio_dir`` (``{src}/utterances_final``), ``sample_rate`` (16000),
``frames`` (0 = none), ``frames_source`` (``auto``), ``video_dir`` (``{src}/videos/utterances_final``),
``frame_size`` (224), ``frames_dir`` (``{src}/utterances_final/processed``), ``seed`` (0), ``min_shards`` (32),
``expect_entries`` (690; 0 disables the count checks, for small test replicas), ``train_count`` (334,
``mope_code`` only).
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

from mope_data.format import IMAGE_EXTS, frame_member

from .registry import register_dataset
from .writer import (
    BadInputs,
    DatasetSpec,
    PrepError,
    Record,
    SplitPlan,
    load_audio_wav,
    load_image,
    option_bool,
    sanitize_key,
    source_fingerprint,
    write_dataset,
)

DATASET = "mustard"
CONVERTER_VERSION = "2"  # 2: frames from the mp4s, segment-centre frame rule
LABELS = ["not_sarcastic", "sarcastic"]
SCHEMES = ("friends", "mope_code")
N_ENTRIES, N_TRAIN, N_TEST = 690, 334, 356
FRAME_SOURCES = ("auto", "video", "dir")
FRAME_RULE = "floor((2i+1)n/(2N)) of the n frames (segment centres); n < N: all n, then the last repeated"
VIDEO_FIX = "pass --opt video_dir=PATH, --opt frames=0 (no frames), or --skip-bad to skip and count it"


def load_annotations(path: Path, expect_entries: int = N_ENTRIES) -> dict[str, dict]:
    """Load ``sarcasm_data.json`` keeping file order; check the release (entry count, ``show`` present)."""
    path = Path(path)
    if not path.is_file():
        raise PrepError(f"{path} not found (expected MUStARD's data/sarcasm_data.json in --src)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise PrepError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
    if not isinstance(data, dict):
        raise PrepError(f"{path}: expected one JSON object keyed by utterance id, got {type(data).__name__}")
    if expect_entries and len(data) != expect_entries:
        raise PrepError(
            f"{path}: {len(data)} entries, expected {expect_entries} (current MUStARD release); "
            "pass --opt expect_entries=0 to accept another count"
        )
    no_show = [k for k, v in data.items() if not isinstance(v, dict) or "show" not in v]
    if no_show:
        raise PrepError(
            f"{path}: {len(no_show)} entries lack the 'show' key (first: {no_show[0]!r}). This is an older MUStARD "
            "release (before 2019-02-28); download the current data/sarcasm_data.json from soujanyaporia/MUStARD"
        )
    return data


def _frame_files(frames_dir: Path, key: str) -> list[Path]:
    for d in (frames_dir / key, frames_dir / f"{key}_aligned"):
        if d.is_dir():
            return sorted(p for p in d.iterdir() if p.is_file() and p.suffix.lower().lstrip(".") in IMAGE_EXTS)
    return []


def frame_indices(n: int, frames: int) -> list[int]:
    """Indices of the ``frames`` frames taken from ``n`` (module docstring): segment centres, or all then the last
    repeated when ``n < frames``."""
    if n <= 0 or frames <= 0:
        return []
    if n < frames:
        return [min(i, n - 1) for i in range(frames)]
    return [((2 * i + 1) * n) // (2 * frames) for i in range(frames)]


def _import_av():
    try:
        import av
    except ImportError:
        raise PrepError(
            "frames from the MUStARD mp4s need PyAV: `pip install av` (or `pip install -e .[video]`); or pass "
            "--opt frames=0, or --opt frames_dir=PATH for frames already extracted as images"
        ) from None
    return av


def _square_png(im, size: int) -> bytes:
    """Shorter side to ``size`` (bicubic) + center crop to ``size`` x ``size`` (``size=0``: unchanged); PNG bytes."""
    from PIL import Image

    im = im.convert("RGB")
    if size:
        w, h = im.size
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        if (nw, nh) != (w, h):
            im = im.resize((nw, nh), Image.BICUBIC)
        left, top = (nw - size) // 2, (nh - size) // 2
        im = im.crop((left, top, left + size, top + size))
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def load_video_frames(path: Path, frames: int, size: int = 224, key: str = "") -> list[bytes]:
    """``frames`` PNG frames (module docstring rule) decoded from the video ``path`` with PyAV; :class:`PrepError`
    (``missing video`` / ``undecodable video`` / ``empty video``) naming the file, the sample and the fix."""
    av = _import_av()
    path = Path(path)
    who = f" (sample {key!r})" if key else ""
    if not path.is_file():
        raise PrepError(f"missing video {path}{who}; {VIDEO_FIX}", reason="missing video")
    errors = (av.error.FFmpegError, OSError, ValueError, EOFError)

    def undecodable(e: BaseException) -> PrepError:
        return PrepError(
            f"undecodable video {path}{who} ({type(e).__name__}: {e}); {VIDEO_FIX}", reason="undecodable video"
        )

    def no_frames() -> PrepError:  # also a video track without samples: the mp4 demuxer drops it
        return PrepError(
            f"empty video {path}{who}: no video stream or no decodable frame; {VIDEO_FIX}", reason="empty video"
        )

    def decode(want: set[int]) -> tuple[int, dict[int, bytes]]:
        got: dict[int, bytes] = {}
        n = 0
        with av.open(str(path)) as c:
            if not c.streams.video:
                raise no_frames()
            st = c.streams.video[0]
            st.thread_type = "AUTO"
            for f in c.decode(st):
                if n in want:
                    got[n] = _square_png(f.to_image(), size)
                n += 1
        return n, got

    try:
        with av.open(str(path)) as c:  # cheap first guess of the frame count: non-empty packets (no decoding)
            if not c.streams.video:
                raise no_frames()
            guess = sum(1 for p in c.demux(c.streams.video[0]) if p.size)
        n, got = decode(set(frame_indices(guess, frames)))
        if n == 0:
            raise no_frames()
        picks = frame_indices(n, frames)
        if not set(picks) <= set(got):  # decoded count != packet count (rare): decode again with the right picks
            n2, got = decode(set(picks))
            if n2 != n:
                raise PrepError(
                    f"undecodable video {path}{who}: {n} then {n2} frames decoded; {VIDEO_FIX}",
                    reason="undecodable video",
                )
    except PrepError:
        raise
    except errors as e:
        raise undecodable(e) from None
    return [got[i] for i in picks]


def _valid_entries(data: dict[str, dict], ann_path: Path, bad: BadInputs) -> list[dict]:
    """The annotation entries with the fields a sample needs, in file order, as ``{"key", "pos", **entry}``."""
    entries: list[dict] = []
    for pos, (key, v) in enumerate(data.items()):
        ok = (
            isinstance(v.get("utterance"), str)
            and v["utterance"].strip()
            and isinstance(v.get("speaker"), str)
            and isinstance(v.get("sarcasm"), bool)
            and isinstance(v.get("show"), str)
        )
        if not ok:
            bad.add(
                "invalid entry",
                f"{ann_path.name}[{key!r}]",
                "entry needs utterance (non-empty str), speaker (str), show (str) and sarcasm (bool)",
            )
            continue
        entries.append({"key": key, "pos": pos, **v})
    return entries


def _split(entries: list[dict], split_scheme: str, train_count: int) -> tuple[list[dict], list[dict]]:
    """``(train, test)`` by the split scheme (module docstring), each in file order."""
    if split_scheme == "friends":
        return [e for e in entries if e["show"] != "FRIENDS"], [e for e in entries if e["show"] == "FRIENDS"]
    cut = int(train_count)
    return [e for e in entries if e["pos"] < cut], [e for e in entries if e["pos"] >= cut]


@dataclass(frozen=True)
class MustardMedia:
    """Where and how a clip's audio and frames are read: maps an annotation entry to its sample (:meth:`record`)."""

    audio_dir: Path
    video_dir: Path
    frames_dir: Path
    no_audio: bool
    sample_rate: int
    frames: int
    frame_size: int
    source: str | None  # of the frames: "video", "dir", or None without frames

    @property
    def modalities(self) -> tuple[str, ...]:
        return ("text",) + (() if self.no_audio else ("audio",)) + (("video",) if self.frames else ())

    def media(self, entries: list[dict]) -> list[Path]:
        """The media files read for ``entries`` (for ``source_checksum``): wavs, and mp4s with frames from videos."""
        media = [] if self.no_audio else [self.audio_dir / f"{e['key']}.wav" for e in entries]
        if self.source == "video":
            media += [self.video_dir / f"{e['key']}.mp4" for e in entries]
        return media

    def record(self, e: dict) -> Record:
        """Entry -> sample: ``"{speaker}: {utterance}"`` text, 16 kHz mono wav, frames ``f00.png``...; json with
        the annotation fields (and ``duration_s`` with audio)."""
        key = e["key"]
        members: dict = {"txt": f"{e['speaker']}: {e['utterance']}"}
        meta = {
            "id": key,
            "label": int(e["sarcasm"]),
            "show": e["show"],
            "speaker": e["speaker"],
            "utterance": e["utterance"],
            "context": e.get("context", []),
            "context_speakers": e.get("context_speakers", []),
        }
        if not self.no_audio:
            members["wav"], dur = load_audio_wav(self.audio_dir / f"{key}.wav", target_sr=self.sample_rate)
            meta["duration_s"] = round(dur, 4)
        members.update(self._frame_members(key))
        return Record(sanitize_key(key), members, meta)

    def _frame_members(self, key: str) -> dict[str, bytes]:
        if self.source == "video":
            pngs = load_video_frames(self.video_dir / f"{key}.mp4", self.frames, self.frame_size, key)
            return {frame_member(i): b for i, b in enumerate(pngs)}
        if self.source != "dir":
            return {}
        files = _frame_files(self.frames_dir, key)
        if not files:
            raise PrepError(f"no frames for {key} under {self.frames_dir}", reason="missing frames")
        members: dict[str, bytes] = {}
        for i, j in enumerate(frame_indices(len(files), self.frames)):
            ext, b = load_image(files[j])
            members[frame_member(i, ext)] = b
        return members


def _frame_source(frames: int, frames_source: str, frames_dir_given: bool, f_dir: Path, v_dir: Path) -> str | None:
    """``"dir"`` / ``"video"`` (checked to be readable) for ``frames > 0``, else None."""
    if frames_source not in FRAME_SOURCES:
        raise PrepError(f"frames_source must be one of {FRAME_SOURCES}, got {frames_source!r}")
    if not frames:
        return None
    use_dir = frames_source == "dir" or (frames_source == "auto" and (frames_dir_given or f_dir.is_dir()))
    if use_dir and not f_dir.is_dir():
        raise PrepError(
            f"frames directory {f_dir} not found; pass --opt frames_dir=PATH, --opt frames_source=video (frames "
            "from the mp4s), or --opt frames=0"
        )
    if use_dir:
        return "dir"
    _import_av()
    if not v_dir.is_dir():
        raise PrepError(
            f"video directory {v_dir} not found (the release keeps the clips in data/videos/utterances_final); "
            "pass --opt video_dir=PATH, --opt frames_dir=PATH for extracted frames, or --opt frames=0"
        )
    return "video"


@register_dataset(DATASET)
def convert(
    src: Path | None,
    out: Path,
    *,
    shard_size: int = 1000,
    skip_bad: bool = False,
    split_scheme: str = "friends",
    no_audio: bool = False,
    audio_dir: str | Path | None = None,
    sample_rate: int = 16000,
    frames: int = 0,
    frames_source: str = "auto",
    video_dir: str | Path | None = None,
    frame_size: int = 224,
    frames_dir: str | Path | None = None,
    seed: int = 0,
    min_shards: int = 32,
    expect_entries: int = N_ENTRIES,
    train_count: int = N_TRAIN,
) -> dict:
    """Convert MUStARD (module docstring) to shards of train, test and val (a copy of test)."""
    if src is None:
        raise PrepError("mustard needs --src RAW_DIR (with sarcasm_data.json and utterances_final/{key}.wav)")
    if split_scheme not in SCHEMES:
        raise PrepError(f"split_scheme must be one of {SCHEMES}, got {split_scheme!r}")
    src, out = Path(src), Path(out)
    no_audio = option_bool(no_audio)
    frames, seed, expect_entries, sample_rate = int(frames), int(seed), int(expect_entries), int(sample_rate)
    ann_path = src / "sarcasm_data.json"
    data = load_annotations(ann_path, expect_entries)
    a_dir = Path(audio_dir) if audio_dir is not None else src / "utterances_final"
    f_dir = Path(frames_dir) if frames_dir is not None else src / "utterances_final" / "processed"
    if not no_audio and not a_dir.is_dir():
        raise PrepError(
            f"audio directory {a_dir} not found; pass --opt audio_dir=PATH, or --opt no_audio=true for "
            "text-only shards"
        )
    v_dir = Path(video_dir) if video_dir is not None else src / "videos" / "utterances_final"
    frame_size = int(frame_size)
    if frames < 0 or frame_size < 0:
        raise PrepError(f"frames ({frames}) and frame_size ({frame_size}) must be >= 0")
    source = _frame_source(frames, frames_source, frames_dir is not None, f_dir, v_dir)
    media = MustardMedia(a_dir, v_dir, f_dir, no_audio, sample_rate, frames, frame_size, source)

    bad = BadInputs(skip_bad)  # entries rejected before splitting: counted in train (their show may be unknown)
    entries = _valid_entries(data, ann_path, bad)
    train, test = _split(entries, split_scheme, train_count)
    if expect_entries == N_ENTRIES and not bad and (len(train), len(test)) != (N_TRAIN, N_TEST):
        raise PrepError(
            f"{ann_path}: split {split_scheme!r} gives {len(train)}/{len(test)} train/test, "
            f"expected {N_TRAIN}/{N_TEST}"
        )
    checksum = source_fingerprint([ann_path], src, [m for m in media.media(entries) if m.is_relative_to(src)])
    frame_size_info = media.frame_size if media.source == "video" else None
    common = {
        "split_scheme": split_scheme,
        "sample_rate": None if no_audio else sample_rate,
        "frames": frames,
        "frames_source": media.source,
        "frame_size": frame_size_info,
        "frame_rule": FRAME_RULE if frames else None,
        "text_format": "{speaker}: {utterance}",
    }
    return write_dataset(
        out,
        DatasetSpec(DATASET, "single_label", LABELS, CONVERTER_VERSION, media.modalities, checksum),
        {
            "train": SplitPlan(train, bad, {**common, "val_is_test": False}),
            "test": SplitPlan(test, None, {**common, "val_is_test": False}),
            "val": SplitPlan(test, None, {**common, "val_is_test": True}),
        },
        media.record,
        where=lambda e: f"{ann_path.name}[{e['key']!r}]",
        shard_size=shard_size,
        min_shards=min_shards,
        skip_bad=skip_bad,
        seed=seed,
        info_extra={
            "split_scheme": split_scheme,
            "val_is_test": True,
            "modalities": list(media.modalities),
            "frames": frames,
            "frames_source": media.source,
            "frame_size": frame_size_info,
        },
        summary_extra={"split_scheme": split_scheme},
    )
