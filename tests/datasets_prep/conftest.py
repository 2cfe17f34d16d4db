"""Fixtures for the dataset converter tests: small replicas of each raw format, built in tmp dirs.

Media are real (tiny JPEGs written with PIL, WAVs written with soundfile at 22,050 Hz stereo so that resampling and
downmixing are exercised). Real annotation files come from tests/fixtures/raw-samples (see PROVENANCE.md there).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers.prep_helpers import jpeg_bytes, write_wav

# ------------------------------------------------------------------------------------------------------- Food-101
FOOD_CLASSES = ["apple_pie", "baklava", "sushi"]


@pytest.fixture
def food101_raw(tmp_path: Path) -> Path:
    """images/{train,test}/{class}/*.jpg + texts_txt + texts/{split}_titles.csv (CRLF, quoted, quirky) + labels.txt.

    train: 6 per class (one file named {class}_{n}-{k}.jpg); test: 2 per class. All good; tests add bad cases.
    """
    src = tmp_path / "food_raw"
    (src / "texts").mkdir(parents=True)
    (src / "labels.txt").write_text("".join(f"{c}\n" for c in FOOD_CLASSES))
    seed = 0
    for split, n in (("train", 6), ("test", 2)):
        rows = []
        for c in FOOD_CLASSES:
            for i in range(n):
                name = f"{c}_{100 + i}" + ("-2" if (split == "train" and i == 0) else "")
                p = src / "images" / split / c / f"{name}.jpg"
                p.parent.mkdir(parents=True, exist_ok=True)
                p.write_bytes(jpeg_bytes(seed))
                seed += 1
                t = src / "texts_txt" / c / f"{name}.txt"
                t.parent.mkdir(parents=True, exist_ok=True)
                t.write_text(f"Best {c.replace('_', ' ').title()} recipe!!\nWith (extra) 'quotes' & more_{i}...")
                title = f'[["My {c} Caf\\xc3\\xa9 &amp; friends {i}"]]' if i % 2 == 0 else f'{c} "best" &#039;{i}'
                rows.append(
                    f'{name}.jpg,"{title.replace(chr(34), chr(34) * 2)}",{c}'
                    if '"' in title
                    else f"{name}.jpg,{title},{c}"
                )
        (src / "texts" / f"{split}_titles.csv").write_bytes(("\r\n".join(rows) + "\r\n").encode())
    return src


# ------------------------------------------------------------------------------------------------------- MM-IMDB
def _movie(plots: list[str], genres: list[str], title: str) -> dict:
    return {
        "plot": plots,
        "genres": genres,
        "title": title,
        "smart canonical title": title,
        "votes": 1335,
        "long imdb canonical title": f"{title} (1893)",
        "country codes": ["us"],
        "certificates": ["USA:Unrated"],
        "cover url": "http://example.invalid/x.jpg",
        "director": [{"name": "Someone", "personID": "0000001"}],
    }


@pytest.fixture
def mmimdb_raw(tmp_path: Path) -> Path:
    """split.json (dev listed BEFORE train, to prove train is processed first) + dataset/{id}.json|.jpeg.

    train: 0000001..0000006 (0000005 has News -> dropped; 0000006 has Adult+Drama -> Adult removed, kept)
    dev: 0000010 (Western: unseen in train -> dropped), 0000011 (Drama, Comedy), 0000012 (Adult only -> dropped)
    test: 0000020 (Comedy), 0000021 (empty plot -> dropped)
    """
    src = tmp_path / "mmimdb_raw"
    (src / "dataset").mkdir(parents=True)
    movies = {
        "0000001": (["short", "A much longer plot about a blacksmith   scene::someone@x"], ["Short", "Drama"]),
        "0000002": (["A comedy plot."], ["Comedy"]),
        "0000003": (["A romance."], ["Romance", "Drama", "Comedy"]),
        "0000004": (["War drama."], ["War", "Drama"]),
        "0000005": (["News reel."], ["News", "Drama"]),
        "0000006": (["Adult drama."], ["Adult", "Drama"]),
        "0000010": (["A western."], ["Western", "Drama"]),
        "0000011": (["Dev plot."], ["Drama", "Comedy"]),
        "0000012": (["Adult only."], ["Adult"]),
        "0000020": (["Test plot."], ["Comedy"]),
        "0000021": (["", "  "], ["Comedy"]),
    }
    for i, (mid, (plots, genres)) in enumerate(movies.items()):
        (src / "dataset" / f"{mid}.json").write_text(json.dumps(_movie(plots, genres, f"Movie {mid}"), indent=4))
        (src / "dataset" / f"{mid}.jpeg").write_bytes(jpeg_bytes(100 + i))
    split = {
        "dev": ["0000010", "0000011", "0000012"],
        "test": ["0000020", "0000021"],
        "train": ["0000001", "0000002", "0000003", "0000004", "0000005", "0000006"],
    }
    (src / "split.json").write_text(json.dumps(split))
    return src


# ------------------------------------------------------------------------------------------------------- SNLI-VE
@pytest.fixture
def snli_raw(tmp_path: Path) -> Path:
    """snli_ve_{train,dev,test}.jsonl mixing both id spellings + Flickr30K/flickr30k_images/{id}.jpg."""
    src = tmp_path / "snli_raw"
    img = src / "Flickr30K" / "flickr30k_images"
    img.mkdir(parents=True)
    for k, iid in enumerate(["1000092795", "10002456", "1000268201", "99999"]):
        (img / f"{iid}.jpg").write_bytes(jpeg_bytes(200 + k))

    def line(iid: str, cap: int, lab: str, spelling: str) -> str:
        rec = {
            "annotator_labels": [lab],
            "captionID": f"{iid}.jpg#{cap}",
            "gold_label": lab,
            "pairID": f"{iid}.jpg#{cap}r1{lab[0]}",
            "sentence1": f"premise {iid} {cap}",
            "sentence2": f"hypothesis {iid} {cap} {lab}",
        }
        if spelling == "old":
            rec["Flikr30kID"] = f"{iid}.jpg"
        elif spelling == "new":
            rec["Flickr30K_ID"] = iid
        return json.dumps(dict(sorted(rec.items())))

    train = [
        line("1000092795", 0, "entailment", "old"),
        line("1000092795", 0, "neutral", "old"),
        line("10002456", 1, "contradiction", "new"),
        line("10002456", 2, "entailment", "none"),
    ]
    dev = [line("1000268201", 0, "neutral", "new"), line("1000268201", 1, "contradiction", "old")]
    test = [line("99999", 3, "entailment", "new")]
    (src / "snli_ve_train.jsonl").write_text("\n".join(train))  # no final newline, as the real files
    (src / "snli_ve_dev.jsonl").write_text("\n".join(dev) + "\n")
    (src / "snli_ve_test.jsonl").write_text("\n".join(test) + "\n")
    return src


# ------------------------------------------------------------------------------------------------------- MUStARD
@pytest.fixture
def mustard_raw(tmp_path: Path) -> Path:
    """8 entries (BBT/FRIENDS mix, key order meaningful) + utterances_final/{key}.wav at 22,050 Hz stereo."""
    src = tmp_path / "mustard_raw"
    shows = ["BBT", "BBT", "FRIENDS", "BBT", "GOLDENGIRLS", "FRIENDS", "FRIENDS", "SARCASMOHOLICS"]
    data = {}
    for i, show in enumerate(shows):
        key = f"{1 if show == 'BBT' else 2}_{10 * i + 3}"
        data[key] = {
            "utterance": f"Line {i}  don\u00d5t.",
            "speaker": f"SPK{i}",
            "context": [f"ctx {i}\nmore"],
            "context_speakers": ["X"],
            "show": show,
            "sarcasm": bool(i % 2),
        }
    src.mkdir(parents=True)
    (src / "sarcasm_data.json").write_text(json.dumps(data, indent=4))
    for j, key in enumerate(data):
        write_wav(src / "utterances_final" / f"{key}.wav", seconds=0.1 + 0.01 * j)
    return src
