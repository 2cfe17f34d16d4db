"""UPMC Food-101 -> webdataset shards (``harness prep food101``).

Raw layout (``--src``)::

    images/{train,test}/{class}/{class}_{n}.jpg     (also {class}_{n}-{k}.jpg)
    texts_txt/{class}/{class}_{n}.txt              scraped page text (the MMBT/MoPE text source)
    texts/{train,test}_titles.csv                  optional Kaggle titles (``text/`` also accepted): no header, CRLF,
                                                   RFC-4180 quoting, columns image_filename,title,label
    labels.txt                                     101 class names (else: sorted class dirs of images/train)

Options (``--opt key=value``):

- ``text_source``: ``auto`` (default: ``texts_txt`` if that directory exists, else ``titles``), ``texts_txt``,
  ``titles``.
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
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .registry import register_dataset
from .text import clean_title, decode_text_bytes_info, mmbt_clean, normalize_space
from .writer import (
    BadInputs,
    DatasetSpec,
    PrepError,
    Record,
    SplitPlan,
    load_image,
    option_bool,
    option_list,
    read_labels_file,
    sanitize_key,
    source_fingerprint,
    write_dataset,
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


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise PrepError(f"{name} must be one of {choices}, got {value!r}")


def _labels(src: Path, labels_file: str | Path | None) -> list[str]:
    """``labels_file``, else ``src/labels.txt``, else the sorted class directories of ``images/train``."""
    if labels_file is not None:
        return read_labels_file(Path(labels_file))
    if (src / "labels.txt").is_file():
        return read_labels_file(src / "labels.txt")
    if not (src / "images" / "train").is_dir():
        raise PrepError(f"{src}: no labels.txt (pass --opt labels_file=PATH)")
    labels = sorted(p.name for p in (src / "images" / "train").iterdir() if p.is_dir() and not p.name.startswith("."))
    if not labels:
        raise PrepError(f"{src}: no labels.txt and no class directories under images/train")
    return labels


def _resolve_text_source(src: Path, text_source: str) -> str:
    """``auto`` -> ``texts_txt`` when that directory exists, else ``titles``; ``texts_txt`` needs the directory."""
    txt_dir = src / "texts_txt"
    if text_source == "auto":
        text_source = "texts_txt" if txt_dir.is_dir() else "titles"
    if text_source == "texts_txt" and not txt_dir.is_dir():
        raise PrepError(f"{txt_dir} not found (use --opt text_source=titles to use texts/*_titles.csv)")
    return text_source


def _visible(d: Path, dirs: bool) -> list[Path]:
    return sorted(p for p in d.iterdir() if (p.is_dir() if dirs else p.is_file()) and not p.name.startswith("."))


@dataclass
class Food101Raw:
    """The raw tree with the text options: lists each split's candidates (:meth:`list_split`) and maps a candidate
    to its sample (:meth:`record`: image bytes + cleaned text + meta)."""

    src: Path
    text_source: str  # resolved: texts_txt | titles
    title_fallback: bool
    clean: str
    max_image_side: int
    label_idx: dict[str, int]
    annotation_files: list[Path] = field(default_factory=list)  # for source_checksum, in this order
    media: list[Path] = field(default_factory=list)

    @property
    def txt_dir(self) -> Path:
        return self.src / "texts_txt"

    def list_split(self, split: str, bad: BadInputs) -> list[Cand]:
        """The usable candidates of raw ``split`` in (class, file) order; the others go to ``bad``."""
        use_titles = self.text_source == "titles" or self.title_fallback
        titles_path = _find_titles(self.src, split) if use_titles else None
        img_root = self.src / "images" / split
        if self.text_source == "titles" and titles_path is None:
            raise PrepError(
                f"{self.src}: no texts/{split}_titles.csv (needed for text_source=titles; texts_txt/ is the other "
                "text source)"
            )
        if not img_root.is_dir() and titles_path is None:
            raise PrepError(
                f"{img_root} not found (expected images/{split}/{{class}}/*.jpg); use --opt splits=... to "
                "convert only the splits you have"
            )
        cands: dict[tuple[str, str], Cand] = {}
        if img_root.is_dir():
            for cdir in _visible(img_root, dirs=True):
                for f in _visible(cdir, dirs=False):
                    cands[(cdir.name, f.name)] = Cand(cdir.name, f.name, image=f)
                    self.media.append(f)
        if titles_path is not None:
            self._add_titles(cands, titles_path, bad)
        return [cands[k] for k in sorted(cands) if self._usable(cands[k], split, titles_path, bad)]

    def _add_titles(self, cands: dict[tuple[str, str], Cand], titles_path: Path, bad: BadInputs) -> None:
        self.annotation_files.append(titles_path)
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

    def _usable(self, c: Cand, split: str, titles_path: Path | None, bad: BadInputs) -> bool:
        where = str(c.image.relative_to(self.src)) if c.image else (c.title.where if c.title else c.id)
        if c.cls not in self.label_idx:
            bad.add("label not in labels.txt", where, f"label {c.cls!r} not in labels.txt")
            return False
        if c.image is None:
            bad.add("missing image", where, f"missing image images/{split}/{c.cls}/{c.file} (listed in titles CSV)")
            return False
        if self.text_source == "texts_txt":
            return self._find_text(c, where, bad)
        if c.title is None:
            csv_name = titles_path.name if titles_path else "titles CSV"
            bad.add("no title row", where, f"no row for {c.file} in {csv_name}")
            return False
        return True

    def _find_text(self, c: Cand, where: str, bad: BadInputs) -> bool:
        t = self.txt_dir / c.cls / (Path(c.file).stem + ".txt")
        if t.is_file():
            c.txt = t
            self.media.append(t)
            return True
        if self.title_fallback and c.title is not None:
            return True
        fix = "" if self.title_fallback else " (or use --opt title_fallback=true)"
        bad.add("missing text", where, f"missing text {t.relative_to(self.src)}{fix}")
        return False

    def where(self, c: Cand) -> str:
        return str(c.image.relative_to(self.src)) if c.image else c.id

    def record(self, c: Cand) -> Record:
        """Candidate -> sample: its image (checked to decode), its text (texts_txt page or title, cleaned) and
        ``{"id", "label", "class", "file", "text_source"}``. A text that is not UTF-8 is a warning."""
        assert c.image is not None
        ext, img = load_image(c.image, max_side=int(self.max_image_side))
        warnings: tuple[tuple[str, str], ...] = ()
        if c.txt is not None:
            try:
                raw, enc = decode_text_bytes_info(c.txt.read_bytes())
            except OSError as e:
                raise PrepError(f"unreadable text {c.txt} ({e})", reason="unreadable text") from None
            if enc != "utf-8":
                warnings = ((f"text not UTF-8, decoded as {enc}", str(c.txt)),)
            used = "texts_txt"
        else:
            assert c.title is not None
            raw = clean_title(c.title.title)
            used = "title"
        text = mmbt_clean(raw) if self.clean == "mmbt" else normalize_space(raw) if self.clean == "basic" else raw
        meta = {"id": c.id, "label": self.label_idx[c.cls], "class": c.cls, "file": c.file, "text_source": used}
        return Record(sanitize_key(c.id), {ext: img, "txt": text}, meta, warnings)


Listing = dict[str, tuple[list[Cand], BadInputs | None]]  # split -> (usable candidates, bad inputs found listing it)


def _with_val(per_split: Listing, val_size: int, seed: int) -> tuple[Listing, dict]:
    """Output splits train, val, test: val is drawn from train (seeded, stratified when every class allows it)."""
    out_splits: Listing = {}
    val_info: dict = {"val_size_requested": val_size}
    if "train" in per_split and val_size > 0 and len(per_split["train"][0]) >= 2:
        train_good, train_bad = per_split["train"]
        n = len(train_good)
        n_val = min(val_size, max(1, n // 5))  # capped at 20% of train for tiny inputs
        y = [c.cls for c in train_good]
        counts = Counter(y)
        k = len(counts)
        stratified = min(counts.values()) >= 2 and n_val >= k and n - n_val >= k
        from sklearn.model_selection import train_test_split

        idx = list(range(n))
        tr_idx, va_idx = train_test_split(idx, test_size=n_val, random_state=seed, stratify=y if stratified else None)
        out_splits["train"] = ([train_good[i] for i in sorted(tr_idx)], train_bad)
        out_splits["val"] = ([train_good[i] for i in sorted(va_idx)], None)
        val_info.update({"val_size": n_val, "val_stratified": stratified, "val_from": "train"})
    elif "train" in per_split:
        out_splits["train"] = per_split["train"]
        val_info.update({"val_size": 0})
    if "test" in per_split:
        out_splits["test"] = per_split["test"]
    return out_splits, val_info


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
) -> dict:
    """Convert a UPMC Food-101 tree (module docstring) to shards of train, val (from train) and test."""
    if src is None:
        raise PrepError("food101 needs --src RAW_DIR (with images/{train,test}/{class}/*.jpg)")
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise PrepError(f"--src {src} is not a directory")
    _check_choice("text_source", text_source, TEXT_SOURCES)
    _check_choice("clean", clean, CLEAN_MODES)
    title_fallback = option_bool(title_fallback)
    want = option_list(splits)
    for s in want:
        if s not in ("train", "test"):
            raise PrepError(f"food101 raw splits are train and test, got {s!r}")
    val_size, seed = int(val_size), int(seed)
    labels = _labels(src, labels_file)
    raw = Food101Raw(
        src,
        _resolve_text_source(src, text_source),
        title_fallback,
        clean,
        max_image_side,
        label_idx={n: i for i, n in enumerate(labels)},
        annotation_files=[src / "labels.txt"],
    )

    per_split: Listing = {}
    for split in want:
        bad = BadInputs(skip_bad)
        per_split[split] = (raw.list_split(split, bad), bad)
    out_splits, val_info = _with_val(per_split, val_size, seed)

    checksum = source_fingerprint([p for p in raw.annotation_files if p.is_file()], src, raw.media)
    extra = {"text_source": raw.text_source, "title_fallback": title_fallback, "clean": clean, "seed": seed}
    extra.update(val_info)
    return write_dataset(
        out,
        DatasetSpec(DATASET, "single_label", labels, CONVERTER_VERSION, source_checksum=checksum),
        {split: SplitPlan(cands, bad, dict(extra)) for split, (cands, bad) in out_splits.items()},
        raw.record,
        where=raw.where,
        shard_size=shard_size,
        min_shards=min_shards,
        skip_bad=skip_bad,
        seed=seed,
        info_extra={"text_source": raw.text_source, "clean": clean, **val_info},
    )
