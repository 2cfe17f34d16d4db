"""SNLI-VE -> webdataset shards (``harness prep snli_ve``), 3-way visual entailment.

Raw layout (``--src``)::

    snli_ve_{train,dev,test}.jsonl   (``{train,val,test}.jsonl`` also accepted; dev is written as ``val``)
    Flickr30K/flickr30k_images/{id}.jpg  or  flickr30k_images/{id}.jpg  or  images/{id}.jpg  or  {id}.jpg in --src
                                     (override with ``--opt images_dir=PATH``)

Each line is one JSON object. Text = ``sentence2`` (the hypothesis; MoPE/PMF do not use the premise, which is kept in
json as ``premise``). Label = ``gold_label`` in (contradiction, entailment, neutral). Image id = ``Flickr30K_ID``
(post-2020 generator, no ``.jpg``) or ``Flikr30kID`` (Drive-era files, with ``.jpg``): one trailing ``.jpg`` is
stripped; fallback: the part of ``pairID`` before ``.jpg``. Samples are keyed by ``pairID`` (unique; image ids repeat).
Malformed JSON lines, missing fields, unknown labels and missing/undecodable images are errors naming ``file:line``,
or skipped and counted with ``--skip-bad``.

Options: ``images_dir``, ``seed`` (0), ``min_shards`` (32), ``max_image_side`` (0 = original bytes; the full train
split repeats each image ~18x, so ~70 GB at original size), ``splits`` (default ``train,val,test``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .registry import register_dataset
from .writer import (
    BadInputs,
    DatasetSpec,
    PrepError,
    Record,
    SplitPlan,
    load_image,
    option_list,
    sanitize_key,
    source_fingerprint,
    write_dataset,
)

DATASET = "snli_ve"
CONVERTER_VERSION = "1"
LABELS = ["contradiction", "entailment", "neutral"]
LABEL_IDX = {n: i for i, n in enumerate(LABELS)}
SPLIT_FILES = {
    "train": ("snli_ve_train.jsonl", "train.jsonl"),
    "val": ("snli_ve_dev.jsonl", "dev.jsonl", "val.jsonl"),
    "test": ("snli_ve_test.jsonl", "test.jsonl"),
}
IMAGE_DIR_CANDIDATES = ("Flickr30K/flickr30k_images", "flickr30k_images", "Flickr30k/flickr30k_images", "images", ".")


def image_id_of(rec: dict) -> str | None:
    """Flickr30k image id of one SNLI-VE line (both key spellings; one trailing .jpg stripped; pairID fallback)."""
    for k in ("Flickr30K_ID", "Flikr30kID"):
        v = rec.get(k)
        if isinstance(v, (str, int)) and not isinstance(v, bool) and str(v).strip():
            v = str(v).strip()
            return v[: -len(".jpg")] if v.lower().endswith(".jpg") else v
    pid = rec.get("pairID")
    if isinstance(pid, str) and ".jpg" in pid:
        return pid[: pid.index(".jpg")]
    return None


def _find_images_dir(src: Path) -> Path:
    for c in IMAGE_DIR_CANDIDATES:
        d = src / c
        if d.is_dir() and any(d.glob("*.jpg")):
            return d
    raise PrepError(
        f"{src}: no Flickr30k image directory found (tried {', '.join(IMAGE_DIR_CANDIDATES)}); "
        "pass --opt images_dir=PATH"
    )


def _parse_line(raw: bytes, lineno: int, where: str, bad: BadInputs) -> dict | None:
    """One JSONL line -> its object, or None (blank; or bad, recorded in ``bad``)."""
    try:
        line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
    except UnicodeDecodeError as e:
        bad.add(
            "non-UTF-8 line",
            where,
            f"not UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1}); re-encode the file as UTF-8",
        )
        return None
    if not line.strip():
        return None
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as e:
        bad.add("malformed JSON line", where, f"malformed JSON line ({e.msg} at column {e.colno})")
        return None
    if not isinstance(rec, dict):
        bad.add("line is not a JSON object", where)
        return None
    return rec


def _problem(rec: dict) -> tuple[str, str] | None:
    """``(reason, detail)`` when a line lacks what a sample needs (pair id, hypothesis, known label, image id)."""
    pid, hyp, gold = rec.get("pairID"), rec.get("sentence2"), rec.get("gold_label")
    if not isinstance(pid, str) or not pid.strip():
        return "missing 'pairID'", ""
    if not isinstance(hyp, str) or not hyp.strip():
        return "missing or empty 'sentence2'", ""
    if gold not in LABEL_IDX:
        return "label not in labels", f"gold_label {gold!r} not in {LABELS}"
    if not image_id_of(rec):
        return "no image id (Flickr30K_ID / Flikr30kID / pairID)", ""
    return None


def read_split_file(path: Path, bad: BadInputs) -> list[dict]:
    """The usable pairs of one ``snli_ve_*.jsonl``, sorted by ``pairID``: ``{"pairID", "text" (hypothesis), "label",
    "image_id", "where" (file:line), "premise"}``; the bad lines go to ``bad``."""
    recs: list[dict] = []
    seen: dict[str, str] = {}
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            rec = _parse_line(raw, lineno, where, bad)
            if rec is None:
                continue
            problem = _problem(rec)
            if problem is not None:
                bad.add(problem[0], where, problem[1])
                continue
            pid = rec["pairID"]
            if pid in seen:
                bad.add("duplicate pairID", where, f"duplicate pairID {pid!r} (first at line {seen[pid]})")
                continue
            seen[pid] = str(lineno)
            prem = rec.get("sentence1")
            recs.append(
                {
                    "pairID": pid,
                    "text": rec["sentence2"].strip(),
                    "label": rec["gold_label"],
                    "image_id": image_id_of(rec),
                    "where": where,
                    "premise": prem if isinstance(prem, str) else "",
                }
            )
    return sorted(recs, key=lambda r: r["pairID"])


@dataclass
class SnliImages:
    """Maps a pair to its sample (:meth:`record`); each Flickr30k image is decoded once (the first time a pair uses
    it): later pairs reuse its original bytes, or its first error."""

    img_dir: Path
    max_image_side: int
    seen: dict[str, tuple[str, ...]] = field(default_factory=dict)  # image id -> ("ok", ext) | ("bad", error, reason)

    def load(self, iid: str) -> tuple[str, bytes]:
        ipath = self.img_dir / f"{iid}.jpg"
        state = self.seen.get(iid)
        if state is None:
            try:
                ext, img = load_image(ipath, max_side=int(self.max_image_side))
            except PrepError as e:
                self.seen[iid] = ("bad", str(e), e.reason)
                raise
            self.seen[iid] = ("ok", ext)
            return ext, img
        if state[0] == "bad":
            raise PrepError(state[1], reason=state[2])
        if state[1] == "jpg" and not self.max_image_side:
            return "jpg", ipath.read_bytes()  # decoded once already: original bytes
        return load_image(ipath, max_side=int(self.max_image_side))

    def record(self, r: dict) -> Record:
        """Pair -> sample: image, hypothesis text, ``{"id": pairID, "label", "image_id", "premise"}``."""
        ext, img = self.load(r["image_id"])
        meta = {"id": r["pairID"], "label": LABEL_IDX[r["label"]], "image_id": r["image_id"], "premise": r["premise"]}
        return Record(sanitize_key(r["pairID"]), {ext: img, "txt": r["text"]}, meta)


def _split_files(src: Path, want: list[str]) -> dict[str, Path]:
    files: dict[str, Path] = {}
    for split in want:
        found = [src / f for f in SPLIT_FILES[split] if (src / f).is_file()]
        if not found:
            raise PrepError(
                f"{src}: none of {SPLIT_FILES[split]} found for split {split!r}; use --opt splits=... to "
                "convert only the splits you have"
            )
        files[split] = found[0]
    return files


@register_dataset(DATASET)
def convert(
    src: Path | None,
    out: Path,
    *,
    shard_size: int = 1000,
    skip_bad: bool = False,
    images_dir: str | Path | None = None,
    seed: int = 0,
    min_shards: int = 32,
    max_image_side: int = 0,
    splits: str | list[str] = "train,val,test",
) -> dict:
    """Convert SNLI-VE (module docstring) to shards of the requested splits (raw ``dev`` written as ``val``)."""
    if src is None:
        raise PrepError("snli_ve needs --src RAW_DIR (with snli_ve_{train,dev,test}.jsonl and Flickr30k images)")
    src, out = Path(src), Path(out)
    want = option_list(splits)
    for s in want:
        if s not in SPLIT_FILES:
            raise PrepError(f"snli_ve splits are {list(SPLIT_FILES)}, got {s!r}")
    img_dir = Path(images_dir) if images_dir is not None else _find_images_dir(src)
    if not img_dir.is_dir():
        raise PrepError(f"images_dir {img_dir} is not a directory")
    seed = int(seed)
    files = _split_files(src, want)
    plans: dict[str, SplitPlan[dict]] = {}
    for split, path in files.items():
        bad = BadInputs(skip_bad)
        plans[split] = SplitPlan(read_split_file(path, bad), bad, {"raw_file": path.name, "text_field": "sentence2"})

    all_ids = sorted({r["image_id"] for p in plans.values() for r in p.entries})
    checksum = (
        source_fingerprint(list(files.values()), src, [img_dir / f"{i}.jpg" for i in all_ids])
        if img_dir.is_relative_to(src)
        else source_fingerprint(list(files.values()), src)
    )
    return write_dataset(
        out,
        DatasetSpec(DATASET, "single_label", LABELS, CONVERTER_VERSION, source_checksum=checksum),
        plans,
        SnliImages(img_dir, max_image_side).record,
        where=lambda r: r["where"],
        shard_size=shard_size,
        min_shards=min_shards,
        skip_bad=skip_bad,
        seed=seed,
    )
