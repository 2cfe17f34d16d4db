"""UPMC Food-101 -> webdataset shards (``harness prep food101``).

Raw layout (``--src``)::

    images/{train,test}/{class}/{class}_{n}.jpg     (also {class}_{n}-{k}.jpg)
    texts_txt/{class}/{class}_{n}.txt              scraped page text (the MMBT/MoPE text source)
    texts/{train,test}_titles.csv                  optional Kaggle titles (``text/`` also accepted): no header, CRLF,
                                                   RFC-4180 quoting, columns image_filename,title,label
    labels.txt                                     101 class names (else: sorted class dirs of images/train)

Options (``--opt key=value``):

- ``text_source``: ``auto`` (default: ``texts_txt`` if that directory exists, else ``titles``), ``texts_txt``, ``titles``.
- ``title_fallback`` (bool, default false): with ``texts_txt``, use the title when an image's txt file is missing
  (MMBT skips such images; here they are an error, or skipped and counted with ``--skip-bad``).
- ``clean``: ``mmbt`` (default; MMBT punctuation removal, whitespace collapse, lower case), ``basic`` (whitespace
  only), ``none``. Titles are always unwrapped / unescaped first (:func:`datasets_prep.text.clean_title`).
- ``val_size`` (default 5000): stratified val split drawn from train with ``train_test_split(random_state=seed)``;
  capped at 20% of train for tiny inputs; ``0`` disables val. Non-stratified when a class has < 2 train samples.
- ``seed`` (default 0), ``splits`` (default ``train,test``), ``min_shards`` (default 32), ``max_image_side`` (0 = keep
  original bytes), ``labels_file``.

Sample: key = ``sanitize_key("{class}_{file}")``; ``jpg``/``png`` image bytes; ``txt`` cleaned text; ``json`` =
``{"id": "{class}_{file}" (MMBT id, keeps .jpg), "label": int, "class", "file", "text_source"}``.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from .registry import register_dataset
from .text import clean_title, decode_text_bytes_info, mmbt_clean, normalize_space
from .writer import (
    BadInputs,
    PrepError,
    ShardSetWriter,
    bad_from_error,
    deterministic_shuffle,
    effective_shard_size,
    handle_bad,
    load_image,
    progress,
    read_labels_file,
    sanitize_key,
    source_fingerprint,
    write_dataset_info,
)

DATASET = "food101"
CONVERTER_VERSION = "1"
TEXT_SOURCES = ("auto", "texts_txt", "titles")
CLEAN_MODES = ("mmbt", "basic", "none")


@dataclass
class TitleRow:
    file: str
    title: str
    label: str
    where: str  # "path:line"


@dataclass
class Cand:
    cls: str
    file: str
    image: Path | None = None
    title: TitleRow | None = None
    txt: Path | None = None

    @property
    def id(self) -> str:
        return f"{self.cls}_{self.file}"


def read_titles_csv(path: Path) -> tuple[list[TitleRow], list[tuple[str, str, str]]]:
    """Parse a UPMC ``*_titles.csv`` (no header, CRLF, RFC-4180).

    Returns ``(rows, bad)``, bad = ``[(reason, "path:line", detail)]``.
    """
    rows: list[TitleRow] = []
    bad: list[tuple[str, str, str]] = []
    data = path.read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise PrepError(
            f"{path}:{line}: not UTF-8 (byte {data[e.start]:#04x}); re-encode the file as UTF-8 "
            f"(e.g. iconv -f cp1252 -t utf-8), then re-run `harness prep food101`"
        ) from None
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f)
        start = 1
        try:
            for rec in reader:
                where = f"{path}:{start}"
                start = reader.line_num + 1
                if not rec or (len(rec) == 1 and not rec[0].strip()):
                    continue
                if len(rec) != 3:
                    bad.append(("malformed CSV row", where, f"expected 3 columns (image,title,label), got {len(rec)}"))
                    continue
                file, title, label = rec[0].strip(), rec[1], rec[2].strip()
                if not file or not label:
                    bad.append(("malformed CSV row", where, "empty image file name or label"))
                    continue
                rows.append(TitleRow(file, title, label, where))
        except csv.Error as e:
            raise PrepError(f"{path}:{reader.line_num}: malformed CSV ({e})") from None
    return rows, bad


def _find_titles(src: Path, split: str) -> Path | None:
    for d in ("texts", "text"):
        p = src / d / f"{split}_titles.csv"
        if p.is_file():
            return p
    return None


def _to_bool(v) -> bool:
    if isinstance(v, bool):
        return v
    return str(v).strip().lower() in ("1", "true", "yes", "y", "on")


@register_dataset(DATASET)
def convert(
    src: Path | None,
    out: Path,
    *,
    shard_size: int = 1000,
    skip_bad: bool = False,
    text_source: str = "auto",
    title_fallback: bool = False,
    clean: str = "mmbt",
    val_size: int = 5000,
    seed: int = 0,
    splits: str | list[str] = "train,test",
    min_shards: int = 32,
    max_image_side: int = 0,
    labels_file: str | Path | None = None,
    **unknown,
) -> dict:
    if unknown:
        raise PrepError(
            f"food101: unknown option(s) {sorted(unknown)}; valid: text_source, title_fallback, clean, val_size, seed, "
            "splits, min_shards, max_image_side, labels_file"
        )
    if src is None:
        raise PrepError("food101 needs --src RAW_DIR (with images/{train,test}/{class}/*.jpg)")
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise PrepError(f"--src {src} is not a directory")
    if text_source not in TEXT_SOURCES:
        raise PrepError(f"text_source must be one of {TEXT_SOURCES}, got {text_source!r}")
    if clean not in CLEAN_MODES:
        raise PrepError(f"clean must be one of {CLEAN_MODES}, got {clean!r}")
    title_fallback = _to_bool(title_fallback)
    want = [s.strip() for s in (splits.split(",") if isinstance(splits, str) else splits) if s.strip()]
    for s in want:
        if s not in ("train", "test"):
            raise PrepError(f"food101 raw splits are train and test, got {s!r}")
    val_size, seed = int(val_size), int(seed)

    # labels
    if labels_file is not None:
        labels = read_labels_file(Path(labels_file))
    elif (src / "labels.txt").is_file():
        labels = read_labels_file(src / "labels.txt")
    elif (src / "images" / "train").is_dir():
        labels = sorted(
            p.name for p in (src / "images" / "train").iterdir() if p.is_dir() and not p.name.startswith(".")
        )
        if not labels:
            raise PrepError(f"{src}: no labels.txt and no class directories under images/train")
    else:
        raise PrepError(f"{src}: no labels.txt (pass --opt labels_file=PATH)")
    label_idx = {n: i for i, n in enumerate(labels)}

    txt_dir = src / "texts_txt"
    if text_source == "auto":
        text_source = "texts_txt" if txt_dir.is_dir() else "titles"
    if text_source == "texts_txt" and not txt_dir.is_dir():
        raise PrepError(f"{txt_dir} not found (use --opt text_source=titles to use texts/*_titles.csv)")
    use_titles = text_source == "titles" or title_fallback

    annotation_files: list[Path] = [src / "labels.txt"]
    media: list[Path] = []
    per_split: dict[str, tuple[list[Cand], BadInputs]] = {}

    for split in want:
        cands: dict[tuple[str, str], Cand] = {}
        bad = BadInputs(skip_bad)

        img_root = src / "images" / split
        titles_path = _find_titles(src, split) if use_titles else None
        if text_source == "titles" and titles_path is None:
            raise PrepError(
                f"{src}: no texts/{split}_titles.csv (needed for text_source=titles; texts_txt/ is the other text source)"
            )
        if not img_root.is_dir() and titles_path is None:
            raise PrepError(
                f"{img_root} not found (expected images/{split}/{{class}}/*.jpg); use --opt splits=... to "
                "convert only the splits you have"
            )
        if img_root.is_dir():
            for cdir in sorted(p for p in img_root.iterdir() if p.is_dir() and not p.name.startswith(".")):
                for f in sorted(p for p in cdir.iterdir() if p.is_file() and not p.name.startswith(".")):
                    cands[(cdir.name, f.name)] = Cand(cdir.name, f.name, image=f)
                    media.append(f)
        if titles_path is not None:
            annotation_files.append(titles_path)
            rows, row_bad = read_titles_csv(titles_path)
            for b in row_bad:
                bad.add(*b)
            for r in rows:
                c = cands.get((r.label, r.file))
                if c is None:
                    c = cands[(r.label, r.file)] = Cand(r.label, r.file)
                if c.title is not None:
                    bad.add("duplicate title row", r.where, f"second row for {r.file} (first at {c.title.where})")
                    continue
                c.title = r

        good: list[Cand] = []
        for key in sorted(cands):
            c = cands[key]
            where = str(c.image.relative_to(src)) if c.image else (c.title.where if c.title else c.id)
            if c.cls not in label_idx:
                bad.add("label not in labels.txt", where, f"label {c.cls!r} not in labels.txt")
                continue
            if c.image is None:
                bad.add(
                    "missing image", where, f"missing image images/{split}/{c.cls}/{c.file} (listed in titles CSV)"
                )
                continue
            if text_source == "texts_txt":
                t = txt_dir / c.cls / (Path(c.file).stem + ".txt")
                if t.is_file():
                    c.txt = t
                    media.append(t)
                elif not (title_fallback and c.title is not None):
                    bad.add(
                        "missing text",
                        where,
                        f"missing text {t.relative_to(src)}"
                        + ("" if title_fallback else " (or use --opt title_fallback=true)"),
                    )
                    continue
            elif c.title is None:
                bad.add(
                    "no title row",
                    where,
                    f"no row for {c.file} in {titles_path.name if titles_path else 'titles CSV'}",
                )
                continue
            good.append(c)
        per_split[split] = (good, bad)

    # val split (seeded, stratified) from train
    out_splits: dict[str, tuple[list[Cand], BadInputs]] = {}
    val_info: dict = {"val_size_requested": val_size}
    if "train" in per_split and val_size > 0 and len(per_split["train"][0]) >= 2:
        train_good, train_bad = per_split["train"]
        n = len(train_good)
        n_val = min(val_size, max(1, n // 5))  # capped at 20% of train for tiny inputs
        y = [c.cls for c in train_good]
        counts: dict[str, int] = {}
        for c in y:
            counts[c] = counts.get(c, 0) + 1
        k = len(counts)
        stratified = min(counts.values()) >= 2 and n_val >= k and n - n_val >= k
        from sklearn.model_selection import train_test_split

        idx = list(range(n))
        tr_idx, va_idx = train_test_split(idx, test_size=n_val, random_state=seed, stratify=y if stratified else None)
        out_splits["train"] = ([train_good[i] for i in sorted(tr_idx)], train_bad)
        out_splits["val"] = ([train_good[i] for i in sorted(va_idx)], BadInputs(skip_bad))
        val_info.update({"val_size": n_val, "val_stratified": stratified, "val_from": "train"})
    elif "train" in per_split:
        out_splits["train"] = per_split["train"]
        val_info.update({"val_size": 0})
    if "test" in per_split:
        out_splits["test"] = per_split["test"]

    checksum = source_fingerprint([p for p in annotation_files if p.is_file()], src, media)
    summary: dict = {"dataset": DATASET, "out": str(out), "splits": {}, "skipped": {}}
    extra_common = {
        "text_source": text_source,
        "title_fallback": title_fallback,
        "clean": clean,
        "seed": seed,
        "order": f"shuffled(seed={seed})",
        **val_info,
    }

    for split, (good, bad) in out_splits.items():
        order = deterministic_shuffle(good, seed)
        with ShardSetWriter(
            out,
            split,
            dataset=DATASET,
            task="single_label",
            labels=labels,
            shard_size=effective_shard_size(len(order), shard_size, min_shards),
            source_checksum=checksum,
            converter_version=CONVERTER_VERSION,
            modalities=("image", "text"),
            extra=dict(extra_common),
        ) as w:
            bad.replay(w)
            for c in progress(order, total=len(order), desc=f"{DATASET}/{split}"):
                where = str(c.image.relative_to(src)) if c.image else c.id
                try:
                    ext, img = load_image(c.image, max_side=int(max_image_side))
                except PrepError as e:
                    bad_from_error(w, skip_bad, e, where)
                    continue
                if c.txt is not None:
                    try:
                        raw, enc = decode_text_bytes_info(c.txt.read_bytes())
                    except OSError as e:
                        handle_bad(w, skip_bad, "unreadable text", where, f"unreadable text {c.txt} ({e})")
                        continue
                    if enc != "utf-8":
                        w.warn(f"text not UTF-8, decoded as {enc}", str(c.txt))
                    used = "texts_txt"
                else:
                    assert c.title is not None
                    raw = clean_title(c.title.title)
                    used = "title"
                text = mmbt_clean(raw) if clean == "mmbt" else normalize_space(raw) if clean == "basic" else raw
                meta = {"id": c.id, "label": label_idx[c.cls], "class": c.cls, "file": c.file, "text_source": used}
                w.write(sanitize_key(c.id), {ext: img, "txt": text, "json": meta})
        summary["splits"][split] = w.num_samples
        summary["skipped"][split] = w.skipped

    write_dataset_info(
        out,
        dataset=DATASET,
        task="single_label",
        labels=labels,
        splits=summary["splits"],
        converter_version=CONVERTER_VERSION,
        extra={"text_source": text_source, "clean": clean, **val_info},
    )
    return summary
