"""MM-IMDB -> webdataset shards (``harness prep mmimdb``), multi-label over 23 genres.

Raw layout (``--src``)::

    split.json            {"train": [ids], "dev": [ids], "test": [ids]}   ids: 7-digit zero-padded strings
    dataset/{id}.json     IMDbPY dump (many keys, some with spaces); used: "plot" (list; the longest is kept), "genres"
    dataset/{id}.jpeg     poster
    labels.txt            optional (MoPE's 23-genre file; trailing spaces stripped). Default: the MoPE list below.

Protocol (MMBT + MoPE, see docs/mope-reference.md §5):

- ``train`` is processed first (whatever the key order of split.json), then ``dev`` (written as ``val``), then
  ``test``.
- Samples with a genre in ``drop_genres`` (News, Reality-TV, Talk-Show) are dropped and counted.
- The ``Adult`` genre (not in labels.txt, not filtered by MoPE) is removed from the sample's genres and counted; the
  sample is kept if other genres remain, else dropped and counted.
- Samples whose plot list is empty (or only blank strings) are dropped and counted (MMBT does the same).
- A train genre outside labels.txt is bad input (error, or skipped with ``--skip-bad``). dev/test samples with a genre
  unseen in train are dropped and counted.

Options: ``labels_file``, ``seed`` (shuffle of the written order, default 0), ``min_shards`` (32), ``max_image_side``
(0), ``drop_genres`` (comma list, default ``News,Reality-TV,Talk-Show``), ``remove_genres`` (default ``Adult``).

Sample: key = id; ``jpg``/``png``; ``txt`` = longest plot (stripped); ``json`` = ``{"id", "label": sorted list of
genre indices (the multi-hot vector's non-zero positions), "genres": [names]}``.
"""

from __future__ import annotations

import json
from collections import Counter
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
    read_labels_file,
    sanitize_key,
    source_fingerprint,
    write_dataset,
)

DATASET = "mmimdb"
CONVERTER_VERSION = "1"
MOPE_LABELS = [
    "Drama", "Family", "Comedy", "Biography", "Romance", "War", "Thriller", "History", "Crime", "Music", "Action",
    "Animation", "Adventure", "Musical", "Horror", "Western", "Documentary", "Sport", "Mystery", "Short", "Sci-Fi",
    "Film-Noir", "Fantasy",
]  # fmt: skip
DEFAULT_DROP = "News,Reality-TV,Talk-Show"
DEFAULT_REMOVE = "Adult"
SPLIT_MAP = (("train", ("train",)), ("val", ("dev", "val")), ("test", ("test",)))


def _norm_id(x, where: str) -> str:
    if isinstance(x, str):
        return x.strip()
    if isinstance(x, int) and not isinstance(x, bool):
        return f"{x:07d}"  # an int lost its leading zeros; ids are 7-digit strings
    raise PrepError(f"{where}: id {x!r} is neither a string nor an int")


def _read_split_json(split_path: Path) -> dict:
    if not split_path.is_file():
        raise PrepError(f"{split_path} not found (expected the MM-IMDB release root as --src)")
    try:
        split_obj = json.loads(split_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise PrepError(f"{split_path}:{e.lineno}: malformed JSON ({e.msg}); fix the file or re-download it") from None
    except UnicodeDecodeError as e:
        raise PrepError(f"{split_path}: not UTF-8 ({e.reason} at byte {e.start}); re-encode it as UTF-8") from None
    if not isinstance(split_obj, dict):
        raise PrepError(f"{split_path}: expected an object {{train, dev, test}}")
    return split_obj


def _split_plan(split_path: Path, split_obj: dict) -> list[tuple[str, str, list]]:
    """``[(output split, raw split name, raw ids)]`` in :data:`SPLIT_MAP` order (train first)."""
    plan: list[tuple[str, str, list]] = []
    for out_name, raw_names in SPLIT_MAP:
        found = [r for r in raw_names if r in split_obj]
        if not found:
            raise PrepError(f"{split_path}: no {' / '.join(raw_names)!r} list")
        ids = split_obj[found[0]]
        if not isinstance(ids, list):
            raise PrepError(f"{split_path}: {found[0]!r} is not a list of ids")
        plan.append((out_name, found[0], ids))
    return plan


def _read_movie(path: Path, where: str, bad: BadInputs) -> tuple[list[str], str] | None:
    """``(genres, longest plot stripped)`` of one ``dataset/{id}.json``, or None (recorded in ``bad``)."""
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        bad.add("missing movie JSON", where)
        return None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        bad.add("malformed movie JSON", where, f"malformed JSON ({e})")
        return None
    if not isinstance(meta, dict):
        bad.add("movie JSON is not an object", where)
        return None
    genres = meta.get("genres")
    plots = meta.get("plot")
    if not isinstance(genres, list) or not all(isinstance(g, str) for g in genres):
        bad.add("no 'genres' list of strings", where)
        return None
    if isinstance(plots, str):
        plots = [plots]
    if not isinstance(plots, list) or not all(isinstance(p, str) for p in plots):
        bad.add("no 'plot' list of strings", where)
        return None
    return genres, max((p.strip() for p in plots), key=len, default="")


@dataclass
class MmimdbRaw:
    """The release's movies filtered by the MMBT/MoPE protocol (module docstring): :meth:`list_split` keeps the
    usable movies of a split (counting the dropped ones), :meth:`record` maps one to its sample."""

    data_dir: Path
    labels: list[str]
    drop: set[str]
    remove: set[str]
    max_image_side: int
    drops: Counter[str] = field(default_factory=Counter)  # "split: reason" -> movies dropped (or genres removed)
    media: list[Path] = field(default_factory=list)
    train_genres: set[str] = field(default_factory=set)
    seen_ids: dict[str, str] = field(default_factory=dict)  # id -> raw split listing it
    label_idx: dict[str, int] = field(init=False)

    def __post_init__(self) -> None:
        self.label_idx = {n: i for i, n in enumerate(self.labels)}

    def list_split(self, out_name: str, raw_name: str, raw_ids: list, split_path: Path, bad: BadInputs) -> list[dict]:
        """The kept movies of one split, sorted by id: ``{"id", "genres", "plot", "image"}``."""
        recs: list[dict] = []
        for pos, x in enumerate(raw_ids):
            mid = _norm_id(x, f"{split_path} [{raw_name}][{pos}]")
            if mid in self.seen_ids:
                bad.add(
                    "id listed twice",
                    f"split.json[{raw_name}][{pos}]",
                    f"id {mid} listed twice in split.json ({self.seen_ids[mid]} and {raw_name})",
                )
                continue
            self.seen_ids[mid] = raw_name
            where = f"dataset/{mid}.json"
            movie = _read_movie(self.data_dir / f"{mid}.json", where, bad)
            genres = self._genres(out_name, *movie, where, bad) if movie else None
            if genres is None:
                continue
            img = self.data_dir / f"{mid}.jpeg"
            self.media.append(img)
            recs.append({"id": mid, "genres": genres, "plot": movie[1], "image": img})
        return sorted(recs, key=lambda r: r["id"])

    def _genres(self, out_name: str, genres: list[str], plot: str, where: str, bad: BadInputs) -> list[str] | None:
        """The movie's genres after the protocol's filters, or None when it is dropped (counted) or bad."""
        genres = list(dict.fromkeys(g.strip() for g in genres if g.strip()))
        hit = sorted(set(genres) & self.drop)
        if hit:
            self.drops[f"{out_name}: genre {hit[0]}"] += 1
            return None
        removed = sorted(set(genres) & self.remove)
        if removed:
            genres = [g for g in genres if g not in self.remove]
            for g in removed:
                self.drops[f"{out_name}: {g} label removed"] += 1
            if not genres:
                self.drops[f"{out_name}: only {'/'.join(removed)} genres"] += 1
                return None
        if not genres:
            self.drops[f"{out_name}: no genres"] += 1
            return None
        if not plot:
            self.drops[f"{out_name}: empty plot"] += 1
            return None
        return self._known_genres(out_name, genres, where, bad)

    def _known_genres(self, out_name: str, genres: list[str], where: str, bad: BadInputs) -> list[str] | None:
        """Train genres must be labels (else bad input); a val/test movie with a genre unseen in train is dropped."""
        if out_name == "train":
            unknown_g = [g for g in genres if g not in self.label_idx]
            if unknown_g:
                bad.add("genre not in labels.txt", where, f"train genre(s) {unknown_g} not in labels.txt")
                return None
            self.train_genres.update(genres)
        elif any(g not in self.train_genres for g in genres):
            self.drops[f"{out_name}: genre unseen in train"] += 1
            return None
        return genres

    def split_drops(self, split: str) -> dict[str, int]:
        return {k.split(": ", 1)[1]: v for k, v in sorted(self.drops.items()) if k.startswith(f"{split}: ")}

    def record(self, r: dict) -> Record:
        """Movie -> sample: poster (checked to decode), longest plot, ``{"id", "label": sorted genre indices,
        "genres"}``."""
        ext, img = load_image(r["image"], max_side=int(self.max_image_side))
        label = sorted(self.label_idx[g] for g in r["genres"])
        meta = {"id": r["id"], "label": label, "genres": [self.labels[i] for i in label]}
        return Record(sanitize_key(r["id"]), {ext: img, "txt": r["plot"]}, meta)


def _where(r: dict) -> str:
    return f"dataset/{r['id']}.jpeg"


@register_dataset(DATASET)
def convert(
    src: Path | None,
    out: Path,
    *,
    shard_size: int = 1000,
    skip_bad: bool = False,
    labels_file: str | Path | None = None,
    seed: int = 0,
    min_shards: int = 32,
    max_image_side: int = 0,
    drop_genres: str | list[str] = DEFAULT_DROP,
    remove_genres: str | list[str] = DEFAULT_REMOVE,
) -> dict:
    """Convert an MM-IMDB release (module docstring) to shards of train, val (raw ``dev``) and test."""
    if src is None:
        raise PrepError("mmimdb needs --src RAW_DIR (with split.json and dataset/{id}.json|.jpeg)")
    src, out = Path(src), Path(out)
    split_path = src / "split.json"
    split_obj = _read_split_json(split_path)
    if labels_file is not None:
        labels = read_labels_file(Path(labels_file))
    elif (src / "labels.txt").is_file():
        labels = read_labels_file(src / "labels.txt")
    else:
        labels = list(MOPE_LABELS)
    raw = MmimdbRaw(
        src / "dataset", labels, set(option_list(drop_genres)), set(option_list(remove_genres)), max_image_side
    )
    seed = int(seed)
    common = {"drop_genres": sorted(raw.drop), "remove_genres": sorted(raw.remove)}
    plans: dict[str, SplitPlan[dict]] = {}
    for out_name, raw_name, raw_ids in _split_plan(split_path, split_obj):
        bad = BadInputs(skip_bad)
        recs = raw.list_split(out_name, raw_name, raw_ids, split_path, bad)
        plans[out_name] = SplitPlan(recs, bad, {**common, "dropped": raw.split_drops(out_name), "raw_split": raw_name})

    checksum_files = [split_path] + ([src / "labels.txt"] if (src / "labels.txt").is_file() else [])
    dropped = dict(sorted(raw.drops.items()))
    return write_dataset(
        out,
        DatasetSpec(
            DATASET,
            "multi_label",
            labels,
            CONVERTER_VERSION,
            source_checksum=source_fingerprint(checksum_files, src, raw.media),
        ),
        plans,
        raw.record,
        where=_where,
        shard_size=shard_size,
        min_shards=min_shards,
        skip_bad=skip_bad,
        seed=seed,
        info_extra={"dropped": dropped},
        summary_extra={"dropped": dropped},
    )
