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
from pathlib import Path

from .registry import register_dataset
from .writer import (
    BadInputs,
    PrepError,
    ShardSetWriter,
    bad_from_error,
    deterministic_shuffle,
    effective_shard_size,
    load_image,
    progress,
    sanitize_key,
    source_fingerprint,
    write_dataset_info,
)

DATASET = "snli_ve"
CONVERTER_VERSION = "1"
LABELS = ["contradiction", "entailment", "neutral"]
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
    **unknown,
) -> dict:
    if unknown:
        raise PrepError(
            f"snli_ve: unknown option(s) {sorted(unknown)}; valid: images_dir, seed, min_shards, "
            "max_image_side, splits"
        )
    if src is None:
        raise PrepError("snli_ve needs --src RAW_DIR (with snli_ve_{train,dev,test}.jsonl and Flickr30k images)")
    src, out = Path(src), Path(out)
    want = [s.strip() for s in (splits.split(",") if isinstance(splits, str) else splits) if s.strip()]
    for s in want:
        if s not in SPLIT_FILES:
            raise PrepError(f"snli_ve splits are {list(SPLIT_FILES)}, got {s!r}")
    img_dir = Path(images_dir) if images_dir is not None else _find_images_dir(src)
    if not img_dir.is_dir():
        raise PrepError(f"images_dir {img_dir} is not a directory")
    seed = int(seed)
    label_idx = {n: i for i, n in enumerate(LABELS)}

    files: dict[str, Path] = {}
    for split in want:
        found = [src / f for f in SPLIT_FILES[split] if (src / f).is_file()]
        if not found:
            raise PrepError(
                f"{src}: none of {SPLIT_FILES[split]} found for split {split!r}; use --opt splits=... to "
                "convert only the splits you have"
            )
        files[split] = found[0]

    per_split: dict[str, tuple[list[dict], BadInputs]] = {}
    for split, path in files.items():
        recs: list[dict] = []
        bad = BadInputs(skip_bad)
        seen: dict[str, str] = {}

        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                where = f"{path}:{lineno}"
                try:
                    line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
                except UnicodeDecodeError as e:
                    bad.add(
                        "non-UTF-8 line",
                        where,
                        f"not UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1}); re-encode the file as UTF-8",
                    )
                    continue
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    bad.add("malformed JSON line", where, f"malformed JSON line ({e.msg} at column {e.colno})")
                    continue
                if not isinstance(rec, dict):
                    bad.add("line is not a JSON object", where)
                    continue
                pid, hyp, gold = rec.get("pairID"), rec.get("sentence2"), rec.get("gold_label")
                if not isinstance(pid, str) or not pid.strip():
                    bad.add("missing 'pairID'", where)
                    continue
                if not isinstance(hyp, str) or not hyp.strip():
                    bad.add("missing or empty 'sentence2'", where)
                    continue
                if gold not in label_idx:
                    bad.add("label not in labels", where, f"gold_label {gold!r} not in {LABELS}")
                    continue
                iid = image_id_of(rec)
                if not iid:
                    bad.add("no image id (Flickr30K_ID / Flikr30kID / pairID)", where)
                    continue
                if pid in seen:
                    bad.add("duplicate pairID", where, f"duplicate pairID {pid!r} (first at line {seen[pid]})")
                    continue
                seen[pid] = str(lineno)
                prem = rec.get("sentence1")
                recs.append(
                    {
                        "pairID": pid,
                        "text": hyp.strip(),
                        "label": gold,
                        "image_id": iid,
                        "where": where,
                        "premise": prem if isinstance(prem, str) else "",
                    }
                )
        per_split[split] = (recs, bad)

    all_ids = sorted({r["image_id"] for recs, _ in per_split.values() for r in recs})
    checksum = (
        source_fingerprint(list(files.values()), src, [img_dir / f"{i}.jpg" for i in all_ids])
        if img_dir.is_relative_to(src)
        else source_fingerprint(list(files.values()), src)
    )

    image_ok: dict[str, tuple[str, ...]] = {}  # image id -> ("ok", ext) | ("bad", error): each image decoded once
    summary: dict = {"dataset": DATASET, "out": str(out), "splits": {}, "skipped": {}}
    for split, (recs, bad) in per_split.items():
        order = deterministic_shuffle(sorted(recs, key=lambda r: r["pairID"]), seed)
        with ShardSetWriter(
            out,
            split,
            dataset=DATASET,
            task="single_label",
            labels=LABELS,
            shard_size=effective_shard_size(len(order), shard_size, min_shards),
            source_checksum=checksum,
            converter_version=CONVERTER_VERSION,
            modalities=("image", "text"),
            extra={"raw_file": files[split].name, "order": f"shuffled(seed={seed})", "text_field": "sentence2"},
        ) as w:
            bad.replay(w)
            for r in progress(order, total=len(order), desc=f"{DATASET}/{split}"):
                iid = r["image_id"]
                ipath = img_dir / f"{iid}.jpg"
                state = image_ok.get(iid)
                try:
                    if state is None:
                        try:
                            ext, img = load_image(ipath, max_side=int(max_image_side))
                            image_ok[iid] = ("ok", ext)
                        except PrepError as e:
                            image_ok[iid] = ("bad", str(e), e.reason)
                            raise
                    elif state[0] == "bad":
                        raise PrepError(state[1], reason=state[2])
                    elif state[1] == "jpg" and not max_image_side:
                        ext, img = "jpg", ipath.read_bytes()  # decoded once already: original bytes
                    else:
                        ext, img = load_image(ipath, max_side=int(max_image_side))
                except PrepError as e:
                    bad_from_error(w, skip_bad, e, r["where"])
                    continue
                meta = {"id": r["pairID"], "label": label_idx[r["label"]], "image_id": iid, "premise": r["premise"]}
                w.write(sanitize_key(r["pairID"]), {ext: img, "txt": r["text"], "json": meta})
        summary["splits"][split] = w.num_samples
        summary["skipped"][split] = w.skipped

    write_dataset_info(
        out,
        dataset=DATASET,
        task="single_label",
        labels=LABELS,
        splits=summary["splits"],
        converter_version=CONVERTER_VERSION,
    )
    return summary
