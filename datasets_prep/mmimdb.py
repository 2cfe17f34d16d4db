"""MM-IMDB -> webdataset shards (``harness prep mmimdb``), multi-label over 23 genres.

Raw layout (``--src``)::

    split.json            {"train": [ids], "dev": [ids], "test": [ids]}   ids: 7-digit zero-padded strings
    dataset/{id}.json     IMDbPY dump (many keys, some with spaces); used: "plot" (list; the longest is kept), "genres"
    dataset/{id}.jpeg     poster
    labels.txt            optional (MoPE's 23-genre file; trailing spaces stripped). Default: the MoPE list below.

Protocol (MMBT + MoPE, see docs/mope-reference.md §5):

- ``train`` is processed first (whatever the key order of split.json), then ``dev`` (written as ``val``), then ``test``.
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
    read_labels_file,
    sanitize_key,
    source_fingerprint,
    write_dataset_info,
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


def _csv_list(v) -> tuple[str, ...]:
    if isinstance(v, (list, tuple)):
        return tuple(str(x).strip() for x in v if str(x).strip())
    return tuple(x.strip() for x in str(v).split(",") if x.strip())


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
    **unknown,
) -> dict:
    if unknown:
        raise PrepError(
            f"mmimdb: unknown option(s) {sorted(unknown)}; valid: labels_file, seed, min_shards, "
            "max_image_side, drop_genres, remove_genres"
        )
    if src is None:
        raise PrepError("mmimdb needs --src RAW_DIR (with split.json and dataset/{id}.json|.jpeg)")
    src, out = Path(src), Path(out)
    split_path = src / "split.json"
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

    if labels_file is not None:
        labels = read_labels_file(Path(labels_file))
    elif (src / "labels.txt").is_file():
        labels = read_labels_file(src / "labels.txt")
    else:
        labels = list(MOPE_LABELS)
    label_idx = {n: i for i, n in enumerate(labels)}
    drop = set(_csv_list(drop_genres))
    remove = set(_csv_list(remove_genres))
    seed = int(seed)
    data_dir = src / "dataset"

    # resolve split names; train first explicitly
    plan: list[tuple[str, str, list]] = []
    for out_name, raw_names in SPLIT_MAP:
        found = [r for r in raw_names if r in split_obj]
        if not found:
            raise PrepError(f"{split_path}: no {' / '.join(raw_names)!r} list")
        ids = split_obj[found[0]]
        if not isinstance(ids, list):
            raise PrepError(f"{split_path}: {found[0]!r} is not a list of ids")
        plan.append((out_name, found[0], ids))

    checksum_files = [split_path] + ([src / "labels.txt"] if (src / "labels.txt").is_file() else [])
    media: list[Path] = []
    train_genres: set[str] = set()
    drops: Counter[str] = Counter()
    per_split: dict[str, tuple[list[dict], BadInputs]] = {}
    seen_ids: dict[str, str] = {}

    for out_name, raw_name, raw_ids in plan:
        recs: list[dict] = []
        bad = BadInputs(skip_bad)

        for pos, x in enumerate(raw_ids):
            mid = _norm_id(x, f"{split_path} [{raw_name}][{pos}]")
            where = f"dataset/{mid}.json"
            if mid in seen_ids:
                bad.add(
                    "id listed twice",
                    f"split.json[{raw_name}][{pos}]",
                    f"id {mid} listed twice in split.json ({seen_ids[mid]} and {raw_name})",
                )
                continue
            seen_ids[mid] = raw_name
            jp = data_dir / f"{mid}.json"
            try:
                meta = json.loads(jp.read_text(encoding="utf-8"))
            except FileNotFoundError:
                bad.add("missing movie JSON", where)
                continue
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                bad.add("malformed movie JSON", where, f"malformed JSON ({e})")
                continue
            if not isinstance(meta, dict):
                bad.add("movie JSON is not an object", where)
                continue
            genres = meta.get("genres")
            plots = meta.get("plot")
            if not isinstance(genres, list) or not all(isinstance(g, str) for g in genres):
                bad.add("no 'genres' list of strings", where)
                continue
            if isinstance(plots, str):
                plots = [plots]
            if not isinstance(plots, list) or not all(isinstance(p, str) for p in plots):
                bad.add("no 'plot' list of strings", where)
                continue
            genres = list(dict.fromkeys(g.strip() for g in genres if g.strip()))
            hit = sorted(set(genres) & drop)
            if hit:
                drops[f"{out_name}: genre {hit[0]}"] += 1
                continue
            removed = sorted(set(genres) & remove)
            if removed:
                genres = [g for g in genres if g not in remove]
                for g in removed:
                    drops[f"{out_name}: {g} label removed"] += 1
                if not genres:
                    drops[f"{out_name}: only {'/'.join(removed)} genres"] += 1
                    continue
            if not genres:
                drops[f"{out_name}: no genres"] += 1
                continue
            plot = max((p.strip() for p in plots), key=len, default="")
            if not plot:
                drops[f"{out_name}: empty plot"] += 1
                continue
            if out_name == "train":
                unknown_g = [g for g in genres if g not in label_idx]
                if unknown_g:
                    bad.add("genre not in labels.txt", where, f"train genre(s) {unknown_g} not in labels.txt")
                    continue
                train_genres.update(genres)
            else:
                unseen = [g for g in genres if g not in train_genres]
                if unseen:
                    drops[f"{out_name}: genre unseen in train"] += 1
                    continue
            img = data_dir / f"{mid}.jpeg"
            media.append(img)
            recs.append({"id": mid, "genres": genres, "plot": plot, "image": img})
        per_split[out_name] = (recs, bad)

    checksum = source_fingerprint(checksum_files, src, media)
    summary: dict = {
        "dataset": DATASET,
        "out": str(out),
        "splits": {},
        "skipped": {},
        "dropped": dict(sorted(drops.items())),
    }
    for split, (recs, bad) in per_split.items():
        order = deterministic_shuffle(sorted(recs, key=lambda r: r["id"]), seed)
        split_drops = {k.split(": ", 1)[1]: v for k, v in sorted(drops.items()) if k.startswith(f"{split}: ")}
        with ShardSetWriter(
            out,
            split,
            dataset=DATASET,
            task="multi_label",
            labels=labels,
            shard_size=effective_shard_size(len(order), shard_size, min_shards),
            source_checksum=checksum,
            converter_version=CONVERTER_VERSION,
            modalities=("image", "text"),
            extra={
                "dropped": split_drops,
                "drop_genres": sorted(drop),
                "remove_genres": sorted(remove),
                "raw_split": {o: r for o, r, _ in plan}[split],
                "order": f"shuffled(seed={seed})",
            },
        ) as w:
            bad.replay(w)
            for r in progress(order, total=len(order), desc=f"{DATASET}/{split}"):
                where = f"dataset/{r['id']}.jpeg"
                try:
                    ext, img = load_image(r["image"], max_side=int(max_image_side))
                except PrepError as e:
                    bad_from_error(w, skip_bad, e, where)
                    continue
                label = sorted(label_idx[g] for g in r["genres"])
                meta = {"id": r["id"], "label": label, "genres": [labels[i] for i in label]}
                w.write(sanitize_key(r["id"]), {ext: img, "txt": r["plot"], "json": meta})
        summary["splits"][split] = w.num_samples
        summary["skipped"][split] = w.skipped

    write_dataset_info(
        out,
        dataset=DATASET,
        task="multi_label",
        labels=labels,
        splits=summary["splits"],
        converter_version=CONVERTER_VERSION,
        extra={"dropped": summary["dropped"]},
    )
    return summary
