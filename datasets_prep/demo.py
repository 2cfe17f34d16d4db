"""Embedded demo dataset ``demo`` ("DigitGrid-VE"): visual entailment over grids of real handwritten digits.

Built offline by ``harness prep demo --out DIR`` (or :func:`ensure_demo`) from scikit-learn's UCI handwritten digits
(1,797 real 8x8 scans shipped inside the package, no download). It goes through the same shard/manifest path as the
real datasets (:class:`datasets_prep.writer.ShardSetWriter`, PNG images, ``json.label`` int, task ``single_label``).

Task
    Each image (16x16 grey PNG) is a 2x2 grid of four real digits, each a native 8x8 scan filling its 8x8 cell
    (2x2 patches of 4 px). The text is a templated statement about the grid; the label is
    ``entailment`` (1) if the statement is true of the image, else ``contradiction`` (0) -- SNLI-VE's label names.
    Nine templates of three difficulty levels (:data:`TEMPLATES`), 157 distinct statements:

    - easy: one cell -- "the top left digit is a seven", "... is even", "... is greater than five";
    - medium: whole grid / two cells -- "there is a three in the picture", "exactly two of the four digits are even",
      "the top left digit is larger than the bottom right digit";
    - hard: arithmetic / argmax -- "the digits in the left column add up to more than ten",
      "the four digits add up to more than eighteen", "the largest digit is in the bottom left".

    The default build uses only ``digit_is`` (40 statements: "the <cell> digit is a <digit>"), the cell-lookup task
    (``DemoConfig.templates``; ``harness prep demo --opt templates=all`` gives the nine-template mix). Measured on
    2 CPU cores (frozen demo ViT + MiniLM, MoPE k=4 l=6, batch 64, AdamW 1e-3, mapper BN on batch statistics):
    ``harness train experiment=demo_mope`` reaches 0.64 val after 2 epochs and 0.72 test after 6; in a development
    loop over the same data the full mix stayed at 0.50-0.53 for 3-6 epochs
    (the prompts of a 4-layer, 128-wide frozen ViT have little room to compute arithmetic / comparisons), which would
    make every curve of a demo sweep flat at chance. The harder mix is kept for larger encoders.

Both modalities are needed, by construction
    Pairs are made in *quads*: an image A (uniform random digits), a statement s true of A, a statement t false of A,
    and an image B drawn uniformly among digit grids where s is false and t is true; the quad gives the four pairs
    (A, s, 1), (A, t, 0), (B, s, 0), (B, t, 1). Hence in every split **each exact statement text, each template and
    each image has exactly as many entailed as contradicted pairs**: a text-only or image-only classifier scores
    exactly 50% on every split, whatever templates are selected. Labels are balanced overall (50/50). Measured sanity
    check on the nine-template mix (frozen demo ViT [CLS] + frozen MiniLM mean-pooled text -> 2-layer MLP): text-only
    50.0%, image-only ~50%, late fusion ~74% test (99.6% train; "compare" templates ~56%, "contains" ~88%).

No test digit is seen in training
    The 1,797 source scans are split per class (seeded hash order) 60/20/20 into train/val/test source pools; a split's
    grids use only its own pool (``json.source_indices`` records the UCI indices).

Sizes (defaults): 8,000 train / 1,600 val / 2,000 test pairs (each image appears in exactly 2 pairs), 16x16 images
(16 patch tokens at patch 4), >= 32 shards per split. Deterministic given ``seed``.

Vision encoder
    :mod:`datasets_prep.pretrain_vision` pretrains a small timm ViT (dim 128, depth 4, 4 heads, patch 4, [CLS]) on an
    image-only pretext task (digit class of each cell) using grids of the *training* source digits only, one thread,
    9 x 4,096 grids (pretext val cell accuracy of the [CLS] head ~0.97); written to
    ``OUT/vision_encoder/{model.safetensors,config.json}``. Build time: ~6 s of data + ~1.7 min of pretraining on one
    core (measured on a shared 2-core machine).

Output layout::

    OUT/dataset.json, OUT/labels.txt
    OUT/{train,val,test}/demo-<split>-000000.tar ... + manifest.json
    OUT/vision_encoder/model.safetensors, config.json

Per-sample ``json``: ``id``, ``label``, ``template``, ``difficulty``, ``statement_id``, ``image_id``, ``digits`` (the
four cell classes, row-major), ``source_indices`` (UCI indices). These annotations are for analysis only; the loader
passes only image, text and label to the model.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from datasets_prep.pretrain_vision import PretrainConfig, log, pretrain_encoder
from datasets_prep.registry import register_dataset
from datasets_prep.writer import (
    DatasetSpec,
    PrepError,
    Record,
    SplitPlan,
    read_manifest,
    sanitize_key,
    sha256_file,
    write_dataset_info,
    write_split,
)

__all__ = [
    "CONVERTER_VERSION",
    "LABELS",
    "SPLITS",
    "TEMPLATES",
    "DemoConfig",
    "Statement",
    "build_demo",
    "compose_grids",
    "convert",
    "ensure_demo",
    "is_complete",
    "make_pairs",
    "split_source_digits",
    "statements",
]

CONVERTER_VERSION = "2"  # 2: 16-px grids of native 8-px scans (1: 32 px)
DEFAULT_TEMPLATES = "digit_is"
DATASET = "demo"
LABELS = ["contradiction", "entailment"]
SPLITS = ("train", "val", "test")
DEFAULT_SHARD_SIZE = 1000
MIN_SHARDS = 32

IMG = 16  # image side (px)
CELL = 8  # cell side
DIGIT = 8  # digit side: the native 8x8 scans, placed at a random offset 0..CELL-DIGIT (here 0: aligned with the 4-px
# patch grid; a 14-px digit with 0-2 px jitter in 16-px cells made the ViT pretext learn ~2x slower). Until 2026-11-23
# the demo was 32 px (scans upsampled 8 -> 16 px, 64 patch tokens). `harness train experiment=demo_mope`, val after
# epochs 1/2/3: 16 px 0.568/0.644/0.665 (test 0.722 @ 6, 5 min 14 s), 32 px 0.559/0.591/0.655 (0.765, 8 min 05 s);
# bench/step_time.py (MoPE k=4, batch 32, 1 thread): 193 vs 286 ms per step.
CELL_NAMES = ("top left", "top right", "bottom left", "bottom right")  # row-major
LINES = {"top row": (0, 1), "bottom row": (2, 3), "left column": (0, 2), "right column": (1, 3)}
WORDS = [
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
    "nineteen",
    "twenty",
]
_TENS = {20: "twenty", 30: "thirty"}


def _word(n: int) -> str:
    if n <= 20:
        return WORDS[n]
    t, u = divmod(n, 10)
    return _TENS[t * 10] + ("" if u == 0 else "-" + WORDS[u])


def _article(w: str) -> str:
    return "an" if w.startswith(("eight", "eleven")) else "a"


@dataclass(frozen=True)
class DemoConfig:
    seed: int = 0
    train_pairs: int = 8000
    val_pairs: int = 1600
    test_pairs: int = 2000
    split_fractions: tuple[float, float, float] = (0.6, 0.2, 0.2)
    # Which statement templates the pairs use (comma-separated names of TEMPLATES, or "all"), equal weight each.
    # Default "digit_is" (the cell-lookup task): measured, prompt-tuned fusion of the tiny frozen demo ViT learns it in
    # a few CPU epochs (MoPE 0.72 test after 6 epochs) but stays near chance on the full nine-template mix within the
    # same budget (0.52 after 6 epochs); "all" is the harder variant (late-fusion MLP ~74%).
    templates: str = DEFAULT_TEMPLATES
    template_weights: tuple[float, ...] | None = None  # per TEMPLATES entry; overrides `templates` when given
    min_shards: int = (
        MIN_SHARDS  # per split (shard size lowered accordingly; streaming needs shards >> ranks x workers)
    )
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)

    def __post_init__(self) -> None:
        self.weights()  # a bad template name fails here, naming the option

    def pairs(self, split: str) -> int:
        return {"train": self.train_pairs, "val": self.val_pairs, "test": self.test_pairs}[split]

    def weights(self) -> tuple[float, ...]:
        """Sampling weight of each template (in TEMPLATES order)."""
        if self.template_weights is not None:
            return tuple(float(x) for x in self.template_weights)
        return template_weights_for(self.templates)


def template_weights_for(templates: str) -> tuple[float, ...]:
    names = list(TEMPLATES)
    chosen = [t.strip() for t in str(templates).split(",") if t.strip()]
    if chosen == ["all"]:
        return tuple(1.0 for _ in names)
    bad = [t for t in chosen if t not in TEMPLATES]
    if bad or not chosen:
        raise PrepError(
            f"demo option templates={templates!r}: unknown template(s) {bad}; use 'all' or a comma-separated "
            f"subset of {names}"
        )
    return tuple(1.0 if t in chosen else 0.0 for t in names)


# ---------------------------------------------------------------------------------------------------------------------
# Statements
# ---------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Statement:
    id: int
    template: str
    difficulty: str
    text: str


TEMPLATES = {  # name -> difficulty
    "digit_is": "easy",
    "parity": "easy",
    "cell_threshold": "easy",
    "contains": "medium",
    "count_even": "medium",
    "compare": "medium",
    "line_sum": "hard",
    "total_sum": "hard",
    "max_position": "hard",
}


def _statement_table() -> tuple[list[Statement], np.ndarray]:
    """All statements and their truth over all 10^4 digit grids: ``truth[g, s]`` (g = 1000*d0+100*d1+10*d2+d3)."""
    g = np.array(np.unravel_index(np.arange(10_000), (10, 10, 10, 10))).T  # (10000, 4), row-major cells
    cols: list[np.ndarray] = []
    stmts: list[Statement] = []

    def add(template: str, text: str, truth: np.ndarray) -> None:
        stmts.append(Statement(len(stmts), template, TEMPLATES[template], text))
        cols.append(truth.astype(bool))

    for c, cn in enumerate(CELL_NAMES):
        for d in range(10):
            add("digit_is", f"the {cn} digit is {_article(WORDS[d])} {WORDS[d]}", g[:, c] == d)
    for c, cn in enumerate(CELL_NAMES):
        add("parity", f"the {cn} digit is even", g[:, c] % 2 == 0)
        add("parity", f"the {cn} digit is odd", g[:, c] % 2 == 1)
    for c, cn in enumerate(CELL_NAMES):
        for k in range(2, 8):
            add("cell_threshold", f"the {cn} digit is greater than {WORDS[k]}", g[:, c] > k)
            add("cell_threshold", f"the {cn} digit is smaller than {WORDS[k]}", g[:, c] < k)
    for d in range(10):
        add("contains", f"there is {_article(WORDS[d])} {WORDS[d]} in the picture", (g == d).any(axis=1))
    n_even = (g % 2 == 0).sum(axis=1)
    for n in range(5):
        add("count_even", f"exactly {WORDS[n]} of the four digits are even", n_even == n)
    for c1, n1 in enumerate(CELL_NAMES):
        for c2, n2 in enumerate(CELL_NAMES):
            if c1 != c2:
                add("compare", f"the {n1} digit is larger than the {n2} digit", g[:, c1] > g[:, c2])
    for ln, (a, b) in LINES.items():
        s = g[:, a] + g[:, b]
        for k in (6, 9, 12):
            add("line_sum", f"the digits in the {ln} add up to more than {_word(k)}", s > k)
            add("line_sum", f"the digits in the {ln} add up to less than {_word(k)}", s < k)
    tot = g.sum(axis=1)
    for k in (12, 15, 18, 21, 24, 27):
        add("total_sum", f"the four digits add up to more than {_word(k)}", tot > k)
    mx = g.max(axis=1)
    unique_max = (g == mx[:, None]).sum(axis=1) == 1
    for c, cn in enumerate(CELL_NAMES):
        add("max_position", f"the largest digit is in the {cn}", unique_max & (g[:, c] == mx))
    return stmts, np.stack(cols, axis=1)


_TABLE: tuple[list[Statement], np.ndarray] | None = None


def statements() -> tuple[list[Statement], np.ndarray]:
    global _TABLE
    if _TABLE is None:
        _TABLE = _statement_table()
    return _TABLE


def _grid_index(digits: np.ndarray) -> np.ndarray:
    return ((digits[..., 0] * 10 + digits[..., 1]) * 10 + digits[..., 2]) * 10 + digits[..., 3]


# ---------------------------------------------------------------------------------------------------------------------
# Source digits and image composition
# ---------------------------------------------------------------------------------------------------------------------
class SourceDigits:
    """The UCI digits as uint8 DIGIT-px images (native 8 px, else bilinear) with labels and per-split index pools."""

    def __init__(self, seed: int, fractions: tuple[float, float, float]):
        from PIL import Image
        from sklearn.datasets import load_digits

        d = load_digits()
        raw = np.clip(np.rint(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)  # (1797, 8, 8)
        self.raw = raw
        self.labels = d.target.astype(np.int64)
        self.big = (
            raw
            if DIGIT == raw.shape[1]
            else np.stack(
                [np.asarray(Image.fromarray(im, "L").resize((DIGIT, DIGIT), Image.BILINEAR)) for im in raw]
            ).astype(np.uint8)
        )
        self.pools = split_source_digits(self.labels, seed, fractions)
        # pool per split per class
        self.by_class = {s: [idx[self.labels[idx] == c] for c in range(10)] for s, idx in self.pools.items()}

    def sha256(self, split: str) -> str:
        """sha256 over (UCI index, 8x8 pixels) of a split's source digits."""
        h = hashlib.sha256()
        for i in self.pools[split]:
            h.update(int(i).to_bytes(4, "little"))
            h.update(self.raw[i].tobytes())
        return h.hexdigest()


def split_source_digits(labels: np.ndarray, seed: int, fractions=(0.6, 0.2, 0.2)) -> dict[str, np.ndarray]:
    """Split the source scans per class into disjoint train/val/test pools (order: sha256 of "seed:index")."""
    out: dict[str, list[int]] = {s: [] for s in SPLITS}
    for c in range(10):
        idx = np.flatnonzero(labels == c)
        idx = sorted(idx.tolist(), key=lambda i: hashlib.sha256(f"{seed}:{i}".encode()).hexdigest())
        n = len(idx)
        n_tr = round(fractions[0] * n)
        n_va = round(fractions[1] * n)
        out["train"] += idx[:n_tr]
        out["val"] += idx[n_tr : n_tr + n_va]
        out["test"] += idx[n_tr + n_va :]
    return {s: np.array(sorted(v), dtype=np.int64) for s, v in out.items()}


def compose_grids(big: np.ndarray, src_idx: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """``src_idx`` (n, 4) source-scan indices, ``offsets`` (n, 4, 2) -> uint8 images (n, IMG, IMG), black
    background."""
    n = src_idx.shape[0]
    out = np.zeros((n, IMG, IMG), dtype=np.uint8)
    for c in range(4):
        r0, c0 = (c // 2) * CELL, (c % 2) * CELL
        for j in range(n):
            dy, dx = offsets[j, c]
            out[j, r0 + dy : r0 + dy + DIGIT, c0 + dx : c0 + dx + DIGIT] = big[src_idx[j, c]]
    return out


def _pick_sources(src: SourceDigits, split: str, digits: np.ndarray, rng: np.random.Generator):
    """Random source scans of the given classes from ``split``'s pool, and random offsets."""
    n = digits.shape[0]
    idx = np.empty((n, 4), dtype=np.int64)
    pools = src.by_class[split]
    choice = rng.random((n, 4))
    for j in range(n):
        for c in range(4):
            pool = pools[digits[j, c]]
            idx[j, c] = pool[min(int(choice[j, c] * len(pool)), len(pool) - 1)]
    offsets = rng.integers(0, CELL - DIGIT + 1, size=(n, 4, 2))
    return idx, offsets


def sample_pretext_grids(src: SourceDigits):
    """``sample_grids(rng, n, split)`` for :func:`pretrain_encoder`: uniform random digit grids from ``split``'s
    pool."""

    def sample(rng: np.random.Generator, n: int, split: str):
        digits = rng.integers(0, 10, size=(n, 4))
        idx, offsets = _pick_sources(src, split, digits, rng)
        return compose_grids(src.big, idx, offsets), digits

    return sample


# ---------------------------------------------------------------------------------------------------------------------
# Pairs (quads)
# ---------------------------------------------------------------------------------------------------------------------
def make_pairs(n_pairs: int, rng: np.random.Generator, template_weights=None) -> list[dict]:
    """Statement/label pairs over abstract digit grids, in quads (see module docstring). Returns a shuffled list of
    ``{"image": i, "digits": (4,), "statement": id, "label": 0|1}`` with ``image`` indexing ``2 * (n_pairs // 4)``
    images (A of quad q is image 2q, B is 2q+1)."""
    stmts, truth = statements()
    names = list(TEMPLATES)
    w = np.ones(len(names)) if template_weights is None else np.asarray(template_weights, dtype=float)
    if len(w) != len(names) or (w < 0).any() or w.sum() <= 0:
        raise PrepError(f"template_weights must be {len(names)} non-negative numbers (templates {names})")
    w = w / w.sum()
    by_t = {t: np.array([s.id for s in stmts if s.template == t]) for t in names}
    all_grids = np.array(np.unravel_index(np.arange(10_000), (10, 10, 10, 10))).T
    n_quads = n_pairs // 4
    if n_quads * 4 != n_pairs or n_pairs <= 0:
        raise PrepError(f"pair counts must be positive multiples of 4 (quads), got {n_pairs}")

    def pick(row_truth: np.ndarray, want: bool, ok=None) -> int:
        for _ in range(1000):
            t = names[rng.choice(len(names), p=w)]
            cand = by_t[t][row_truth[by_t[t]] == want]
            if ok is not None and len(cand):
                cand = cand[[ok(s) for s in cand]]
            if len(cand):
                return int(cand[rng.integers(len(cand))])
        raise RuntimeError("no statement found")  # pragma: no cover (every grid has true and false statements)

    pairs: list[dict] = []
    for q in range(n_quads):
        a = int(rng.integers(10_000))
        ta = truth[a]
        s = pick(ta, True)
        not_s = ~truth[:, s]
        t = pick(ta, False, ok=lambda c, not_s=not_s: bool((not_s & truth[:, c]).any()))
        cand_b = np.flatnonzero(not_s & truth[:, t])
        b = int(cand_b[rng.integers(len(cand_b))])
        da, db = all_grids[a], all_grids[b]
        pairs += [
            {"image": 2 * q, "digits": da, "statement": s, "label": 1},
            {"image": 2 * q, "digits": da, "statement": t, "label": 0},
            {"image": 2 * q + 1, "digits": db, "statement": s, "label": 0},
            {"image": 2 * q + 1, "digits": db, "statement": t, "label": 1},
        ]
    order = rng.permutation(len(pairs))
    return [pairs[i] for i in order]


def _png(img: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img, "L").save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------------------------------
# Build
# ---------------------------------------------------------------------------------------------------------------------
def _config_fingerprint(cfg: DemoConfig, shard_size: int) -> str:
    d = asdict(cfg)
    d["shard_size"] = shard_size
    d["converter_version"] = CONVERTER_VERSION
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()


def build_demo(
    out: Path, cfg: DemoConfig = DemoConfig(), *, shard_size: int = DEFAULT_SHARD_SIZE, verbose: bool = True
) -> dict:
    """Build the whole demo (shards of the three splits + vision encoder) into ``out``, atomically.

    Everything is written into a hidden sibling temp directory and renamed to ``out`` at the end; an existing ``out``
    is replaced only if it is a demo build (its ``dataset.json`` says ``"dataset": "demo"``) or empty.
    """
    out = Path(out).resolve()
    if out.exists() and any(out.iterdir()):
        info = out / "dataset.json"
        ok = False
        if info.is_file():
            try:
                ok = json.loads(info.read_text(encoding="utf-8")).get("dataset") == DATASET
            except json.JSONDecodeError:
                ok = False
        if not ok:
            raise PrepError(f"{out} exists, is not empty and is not a demo build; choose another --out or remove it")
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(out)
    t0 = time.monotonic()
    summary = build_atomically(out, lambda tmp: _build_into(tmp, cfg, shard_size=shard_size, verbose=verbose))
    summary["seconds"] = round(time.monotonic() - t0, 1)
    if verbose:
        log(f"demo built in {summary['seconds']:.0f}s -> {out}")
    return summary


def build_atomically(out: Path, build: Callable[[Path], dict]) -> dict:
    """``build(tmp)`` into a fresh sibling directory of `out`, then swap it in (the old build removed only after):
    an interrupted build never leaves a half-written `out`. Directories get the umask's permissions (``mkdtemp``,
    here and in the shard writer, makes 0700 ones). Returns what `build` returned."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
    try:
        summary = build(tmp)
        umask = os.umask(0o22)
        os.umask(umask)
        for d in (tmp, *(p for p in tmp.rglob("*") if p.is_dir())):
            os.chmod(d, 0o777 & ~umask)
        old = None
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-{os.getpid()}-", dir=out.parent))
            os.rmdir(old)
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary


def _remove_stale(out: Path) -> None:
    """Remove temp dirs left by a killed build (``.NAME.tmp-PID-*`` / ``.NAME.old-PID-*`` whose PID is gone)."""
    for p in out.parent.glob(f".{out.name}.*-*-*"):
        parts = p.name[len(out.name) + 2 :].split("-")
        if len(parts) < 3 or parts[0] not in ("tmp", "old") or not parts[1].isdigit() or not p.is_dir():
            continue
        try:
            os.kill(int(parts[1]), 0)
            continue  # a live build (another process)
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        if parts[0] == "old" and not out.exists():
            os.replace(p, out)  # killed between the two renames: put the previous complete build back
        else:
            shutil.rmtree(p, ignore_errors=True)


def _pair_records(split: str, pairs: list[dict], pngs: list[bytes], src_idx: np.ndarray) -> Callable[[int], Record]:
    """Pair number -> sample: the grid PNG, the statement, its label and the analysis annotations."""
    stmts, _ = statements()

    def record(i: int) -> Record:
        p = pairs[i]
        st = stmts[p["statement"]]
        key = sanitize_key(f"demo-{split}-{i:06d}")
        meta = {
            "id": key,
            "label": int(p["label"]),
            "template": st.template,
            "difficulty": st.difficulty,
            "statement_id": st.id,
            "image_id": f"{split}-img-{p['image']:06d}",
            "digits": [int(x) for x in p["digits"]],
            "source_indices": [int(x) for x in src_idx[p["image"]]],
        }
        return Record(key, {"png": pngs[p["image"]], "txt": st.text}, meta)

    return record


def _build_into(out: Path, cfg: DemoConfig, *, shard_size: int, verbose: bool) -> dict:
    t0 = time.monotonic()
    src = SourceDigits(cfg.seed, cfg.split_fractions)
    stmts, _ = statements()
    counts: dict[str, int] = {}
    train_pixels: list[np.ndarray] = []
    for si, split in enumerate(SPLITS):
        rng = np.random.default_rng([cfg.seed, 100 + si])
        pairs = make_pairs(cfg.pairs(split), rng, cfg.weights())
        n_img = 2 * (len(pairs) // 4)
        img_digits = np.zeros((n_img, 4), dtype=np.int64)
        for p in pairs:
            img_digits[p["image"]] = p["digits"]
        src_idx, offsets = _pick_sources(src, split, img_digits, rng)
        images = compose_grids(src.big, src_idx, offsets)
        if split == "train":
            train_pixels.append(images)
        n = len(pairs)
        write_split(
            out,
            split,
            SplitPlan(
                range(n),
                extra={
                    "demo": {
                        "images": n_img,
                        "source_digits": len(src.pools[split]),
                        "seed": cfg.seed,
                        "image_size": IMG,
                    }
                },
            ),
            _pair_records(split, pairs, [_png(im) for im in images], src_idx),
            spec=DatasetSpec(DATASET, "single_label", LABELS, CONVERTER_VERSION, source_checksum=src.sha256(split)),
            shard_size=shard_size,
            min_shards=cfg.min_shards,
            skip_bad=False,
            seed=None,
            show_progress=verbose,
        )  # the pairs are in random order already
        counts[split] = n
    data_seconds = time.monotonic() - t0
    pix = np.concatenate(train_pixels).astype(np.float64) / 255.0
    mean, std = float(pix.mean()), float(pix.std())
    if verbose:
        log(f"shards written in {data_seconds:.1f}s ({counts}); train pixel mean {mean:.4f} std {std:.4f}")
    enc = pretrain_encoder(
        sample_pretext_grids(src),
        mean=mean,
        std=std,
        cfg=cfg.pretrain,
        out_dir=out / "vision_encoder",
        train_images_sha256=src.sha256("train"),
        verbose=verbose,
    )
    write_dataset_info(
        out,
        dataset=DATASET,
        task="single_label",
        labels=LABELS,
        splits=counts,
        converter_version=CONVERTER_VERSION,
        extra={
            "description": "DigitGrid-VE: visual entailment over 2x2 grids of real UCI handwritten digits "
            "(datasets_prep/demo.py); text-only and image-only baselines are at chance by construction",
            "image_size": IMG,
            "templates": TEMPLATES,
            "template_weights": dict(zip(TEMPLATES, cfg.weights())),
            "num_statements": len(stmts),
            "source_digits": {s: len(v) for s, v in src.pools.items()},
            "vision_encoder": "vision_encoder",
            "normalization": {"mean": enc["mean"], "std": enc["std"]},
            "config": {**asdict(cfg), "shard_size": shard_size},
            "config_sha256": _config_fingerprint(cfg, shard_size),
        },
    )
    return {
        "dataset": DATASET,
        "splits": counts,
        "image_size": IMG,
        "num_statements": len(stmts),
        "data_seconds": round(data_seconds, 1),
        "pretext_val_cell_accuracy": enc["pretext"]["val_cell_accuracy"],
        "pretext_val_grid_accuracy": enc["pretext"]["val_grid_accuracy"],
        "skipped": 0,
    }


def _config_from_options(options: dict) -> DemoConfig:
    pre_keys = set(PretrainConfig.__dataclass_fields__)
    demo_keys = set(DemoConfig.__dataclass_fields__) - {"pretrain"}
    if int(options.pop("max_image_side", 0) or 0):
        raise PrepError(f"max_image_side does not apply to the demo (its images are {IMG}x{IMG})")
    bad = sorted(set(options) - pre_keys - demo_keys - {"verbose"})
    if bad:
        raise PrepError(
            f"unknown demo options {bad}; demo options: {sorted(demo_keys)}, pretraining: {sorted(pre_keys)}"
        )
    pre = replace(PretrainConfig(), **{k: v for k, v in options.items() if k in pre_keys and k != "seed"})
    kw = {k: v for k, v in options.items() if k in demo_keys}
    if "seed" in options:
        pre = replace(pre, seed=int(options["seed"]))
    return DemoConfig(**kw, pretrain=pre)


@register_dataset("demo")
def convert(
    src: Path | None, out: Path, *, shard_size: int = DEFAULT_SHARD_SIZE, skip_bad: bool = False, **options
) -> dict:
    """``harness prep demo --out DIR``: build the demo dataset and its vision encoder (``src`` is ignored: the data
    ships inside scikit-learn). ``options`` override :class:`DemoConfig` / :class:`PretrainConfig` fields (``seed``
    sets both), e.g. ``train_pairs=800, epochs=1`` for a small test build."""
    verbose = bool(options.pop("verbose", True))
    cfg = _config_from_options(options)
    return build_demo(Path(out), cfg, shard_size=shard_size, verbose=verbose)


def is_complete(
    out: Path, cfg: DemoConfig = DemoConfig(), *, shard_size: int = DEFAULT_SHARD_SIZE, check_hashes: bool = True
) -> bool:
    """True when ``out`` holds a finished demo build of this converter version and configuration (every split's
    manifest, every shard with its sha256, the encoder weights and config)."""
    out = Path(out)
    try:
        info = json.loads((out / "dataset.json").read_text(encoding="utf-8"))
        if info.get("dataset") != DATASET or info.get("converter_version") != CONVERTER_VERSION:
            return False
        if info.get("config_sha256") != _config_fingerprint(cfg, shard_size):
            return False
        for split in SPLITS:
            m = read_manifest(out / split)
            for sh in m["shards"]:
                p = out / split / sh["file"]
                if not p.is_file() or (check_hashes and sha256_file(p) != sh["sha256"]):
                    return False
        enc = out / "vision_encoder"
        return (enc / "model.safetensors").is_file() and (enc / "config.json").is_file()
    except (OSError, ValueError, KeyError):
        return False


def ensure_demo(out: Path, *, cfg: DemoConfig | None = None, verbose: bool = True) -> Path:
    """Build the demo at ``out`` unless a complete build of the same configuration (default: :class:`DemoConfig`) is
    already there; return ``out`` (resolved). Called by the sweep command on a fresh machine (no manual step)."""
    out = Path(out).resolve()
    cfg = cfg or DemoConfig()
    if is_complete(out, cfg):
        return out
    if verbose:
        log(f"{out}: no complete demo build; building it (data + vision-encoder pretraining, a few minutes)")
    build_demo(out, cfg, shard_size=DEFAULT_SHARD_SIZE, verbose=verbose)
    return out
