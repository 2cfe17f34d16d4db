"""Embedded referring-segmentation demo ``ris_demo`` ("ShapeRef"): segment the object an expression names, offline.

Built by ``harness prep ris_demo --out DIR`` (or :func:`ensure_ris_demo`, which the training code calls for
``data.name == "ris_demo"`` with ``data.auto_prepare`` when ``dataset.json`` is missing) in under 2 minutes on 2 CPU
cores, nothing downloaded. It goes through the shard format of the real RefCOCO converter
(:mod:`datasets_prep.refcoco`): task ``segmentation``, one sample per (scene, referred object, expression).

Scenes
    32 x 32 RGB PNG: a plain dark neutral background (grey level 25-60, slight tint) with mild pixel noise, and 3 or 4
    non-overlapping objects (1 px apart): shapes circle / square / triangle (apex up), colours red / green / blue /
    yellow (jittered), sizes small (side 6-8 px) / large (11-13 px). Every scene is built around a *designed target*
    with a distractor of the same shape in another colour and one of the same colour in another shape; a 4-object
    scene adds the target's twin in the other size (a third of them), its exact twin (a third: only its position
    tells them apart) or a random object. Samples are made for every object of the scene that can be described
    uniquely (and is of the split's target kind), so the image of a scene recurs with different expressions and
    masks (as in RefCOCO): an image-only model cannot know which object is meant.

Expressions (:func:`describe`)
    The shortest (fewest words; ties: attribute < left/right < relation) description that matches the target alone:
    "the <shape>", "the <colour> <shape>", "the <size> <shape>", "the <size> <colour> <shape>", then
    "the <D> on the left / right" (exactly two objects match D, centres >= 4 px apart) and
    "the <D> above / below the <E>" (E: the shortest attribute description of another object, the landmark; the
    target lies entirely above / below it, every other object matching D has its centre on the other side of the
    landmark's centre). D is one of the four attribute descriptions. Objects with no unique description get no
    sample.

Splits (scenes from disjoint seeds: ``[seed, 1..4]``; the pretext uses ``[seed, 10 / 11]``)
    ``train`` (6,000 samples) and ``val`` (600) mix every target kind; mirroring RefCOCO's testA (people) / testB
    (other objects) split by the referred object's kind, ``testA`` (500) holds only targets that are **circles** and
    ``testB`` (500) only **squares and triangles** (their scenes are designed around a target of that kind; objects
    of the other kind are distractors only).

Per-sample members: ``png`` (the scene, RGB), ``txt`` (the expression), ``mask.png`` (the target, mode L 0/255,
32 x 32, written by :func:`datasets_prep.refcoco.mask_png`) and ``json``: ``id`` (= key ``<split>-<scene>-o<i>``),
``label`` (``[shape index]`` in ``labels.txt`` = circle, square, triangle), ``category``, ``scene_id``, ``target``
(index into ``objects``), ``objects`` (the scene: ``shape``, ``colour``, ``size``, ``side``, ``bbox`` [x, y, w, h],
``area`` in px), ``sentences`` ([{"sent": expression}], RefCOCO's field), ``template`` (attribute / left_right /
relation), ``landmark`` (object index for relation, else null), ``size`` ([32, 32]). Object masks are
:func:`shape_mask` ``(shape, side)`` placed at ``bbox``: the json alone re-derives every mask.

``dataset.json`` extras: ``image_size`` (32), ``chance`` per split (the text-free baselines the report prints beside
the results: ``all_objects_miou``, the mean IoU of predicting the union of every object; ``random_object_miou``, the
expected IoU of predicting one object of the scene uniformly at random; ``empty_miou`` = 0), ``scenes`` per split,
``normalization`` (the encoder's per-channel mean / std), ``vision_encoder``, ``pretext`` accuracy, ``config`` (seed,
counts, pretraining settings).

Vision encoder
    A small timm ViT (dim 128, depth 4, 4 heads, patch 4 -> 8 x 8 tokens, [CLS]; :func:`datasets_prep.
    pretrain_vision.timm_kwargs`) pretrained on an image-only pretext over freshly generated scenes (every target kind;
    seed streams disjoint from every split): per-patch 13-way classification of the (shape, colour) covering each
    4 x 4 patch (the object covering the most of its 16 pixels, if at least 4; else background) from the final patch
    tokens, plus multi-label presence of the 24 (shape, colour, size) kinds from the [CLS] feature. It never sees an
    expression or which object is referred. One thread, seeded, deterministic
    (:func:`datasets_prep.pretrain_vision.deterministic_torch`); written as ``OUT/vision_encoder/
    {model.safetensors, config.json}`` in the digit demo's format (:func:`datasets_prep.pretrain_vision.save_encoder`;
    read by ``encoder.name: auto`` and the loader's normalisation).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np

from datasets_prep.demo import _remove_stale, build_atomically
from datasets_prep.pretrain_vision import (
    TIMM_MODEL,
    PretrainConfig,
    adamw,
    cosine_lr,
    deterministic_torch,
    save_encoder,
    timm_kwargs,
)
from datasets_prep.pretrain_vision import log as _demo_log
from datasets_prep.refcoco import mask_png
from datasets_prep.registry import register_dataset
from datasets_prep.writer import (
    DatasetSpec,
    PrepError,
    Record,
    SplitPlan,
    sanitize_key,
    write_dataset_info,
    write_split,
)

__all__ = [
    "COLOURS",
    "SHAPES",
    "SIZES",
    "SPLITS",
    "RisDemoConfig",
    "build_ris_demo",
    "chance_levels",
    "convert",
    "describe",
    "ensure_ris_demo",
    "make_scene",
    "object_masks",
    "render",
    "shape_mask",
]

DATASET = "ris_demo"
CONVERTER_VERSION = "1"
IMG = 32
SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (215, 45, 45), "green": (45, 180, 65), "blue": (50, 90, 225), "yellow": (225, 200, 40)}
SIZES = {"small": (6, 8), "large": (11, 13)}  # side range (px, inclusive)
SPLITS = ("train", "val", "testA", "testB")
TARGET_SHAPES = {"train": SHAPES, "val": SHAPES, "testA": ("circle",), "testB": ("square", "triangle")}
SPLIT_STREAM = {"train": 1, "val": 2, "testA": 3, "testB": 4}
PRETEXT_STREAM = {"train": 10, "val": 11}
MASK_EXT = "mask.png"
LR_GAP = 4  # px between the centres of the two objects "on the left / right"

# The pretext's defaults: the digit demo's ViT at 32 px; epochs x grids_per_epoch fresh scenes ("grids" = scenes).
PRETRAIN_DEFAULTS = PretrainConfig(
    img_size=IMG, patch_size=4, epochs=8, grids_per_epoch=2048, val_grids=512, batch_size=32, lr=4e-3, warmup_steps=30
)


def log(msg: str) -> None:
    _demo_log(f"(ris_demo) {msg}")


@dataclass(frozen=True)
class RisDemoConfig:
    seed: int = 0
    train_samples: int = 6000
    val_samples: int = 600
    testA_samples: int = 500
    testB_samples: int = 500
    min_shards: int = 16  # per split (the shard size is lowered accordingly)
    pretrain: PretrainConfig = field(default_factory=lambda: PRETRAIN_DEFAULTS)

    def samples(self, split: str) -> int:
        return int(getattr(self, f"{split}_samples"))


# ---------------------------------------------------------------------------------------------------------------------
# Scenes
# ---------------------------------------------------------------------------------------------------------------------
def shape_mask(shape: str, side: int) -> np.ndarray:
    """(side, side) bool mask of a shape filling its box: disc, full square, or triangle with its apex up."""
    yy, xx = np.mgrid[0:side, 0:side]
    c = (side - 1) / 2
    if shape == "circle":
        return (yy - c) ** 2 + (xx - c) ** 2 <= (side / 2) ** 2
    if shape == "square":
        return np.ones((side, side), bool)
    if shape == "triangle":
        return np.abs(xx - c) <= (yy + 1) / side * (side / 2)
    raise ValueError(f"unknown shape {shape!r}")


def object_masks(objects: list[dict], size: int = IMG) -> np.ndarray:
    """(n, size, size) bool masks of a scene's objects, from their json annotations (shape, side, bbox)."""
    out = np.zeros((len(objects), size, size), bool)
    for i, o in enumerate(objects):
        x, y, w, h = o["bbox"]
        out[i, y : y + h, x : x + w] = shape_mask(o["shape"], int(o["side"]))
    return out


def _attrs(rng: np.random.Generator, shape=None, colour=None, size=None, not_shape=None, not_colour=None) -> dict:
    shapes = [s for s in SHAPES if s != not_shape]
    colours = [c for c in COLOURS if c != not_colour]
    return {
        "shape": shape or str(shapes[int(rng.integers(len(shapes)))]),
        "colour": colour or str(colours[int(rng.integers(len(colours)))]),
        "size": size or ("small", "large")[int(rng.integers(2))],
    }


def _place(rng: np.random.Generator, objs: list[dict]) -> bool:
    """Sides and non-overlapping positions (1 px apart) for every object, largest first; False on failure."""
    for o in objs:
        lo, hi = SIZES[o["size"]]
        o["side"] = int(rng.integers(lo, hi + 1))
    taken = np.zeros((IMG, IMG), bool)
    for o in sorted(objs, key=lambda o: -o["side"]):
        s = o["side"]
        for _ in range(100):
            x, y = int(rng.integers(0, IMG - s + 1)), int(rng.integers(0, IMG - s + 1))
            if not taken[max(0, y - 1) : y + s + 1, max(0, x - 1) : x + s + 1].any():
                taken[y : y + s, x : x + s] = True
                o["bbox"] = [x, y, s, s]
                break
        else:
            return False
    return True


def make_scene(rng: np.random.Generator, target_shapes: tuple[str, ...] = SHAPES) -> list[dict]:
    """The objects of one scene (module docstring), in random order; each ``{shape, colour, size, side, bbox,
    area}``."""
    while True:
        t = _attrs(rng, shape=str(target_shapes[int(rng.integers(len(target_shapes)))]))
        objs = [
            t,
            _attrs(rng, shape=t["shape"], not_colour=t["colour"]),  # same shape, another colour
            _attrs(rng, colour=t["colour"], not_shape=t["shape"]),  # same colour, another shape
        ]
        if rng.random() < 0.5:
            r = rng.random()
            if r < 1 / 3:
                objs.append({**t, "size": "small" if t["size"] == "large" else "large"})
            elif r < 2 / 3:
                objs.append(dict(t))
            else:
                objs.append(_attrs(rng))
        if _place(rng, objs):
            break
    order = rng.permutation(len(objs))
    objs = [objs[i] for i in order]
    for o, m in zip(objs, object_masks(objs)):
        o["area"] = int(m.sum())
    return objs


def render(rng: np.random.Generator, objs: list[dict]) -> np.ndarray:
    """The scene as uint8 (32, 32, 3): dark neutral noisy background, jittered flat-coloured objects."""
    grey = rng.uniform(25, 60)
    img = grey + rng.uniform(-5, 5, 3) + rng.normal(0, 6, (IMG, IMG, 3))
    for o, m in zip(objs, object_masks(objs)):
        col = np.array(COLOURS[o["colour"]], float) + rng.uniform(-15, 15, 3)
        img[m] = col + rng.normal(0, 5, (int(m.sum()), 3))
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------------------------------
# Expressions
# ---------------------------------------------------------------------------------------------------------------------
ATTR_KEYS = (("shape",), ("colour", "shape"), ("size", "shape"), ("size", "colour", "shape"))


def _attr_text(o: dict, keys: tuple[str, ...]) -> str:
    return " ".join(["the", *(o[k] for k in keys)])


def _cx(o: dict) -> float:
    return o["bbox"][0] + o["bbox"][2] / 2


def _cy(o: dict) -> float:
    return o["bbox"][1] + o["bbox"][3] / 2


def _matching(objs: list[dict], o: dict, keys: tuple[str, ...]) -> list[int]:
    return [j for j, p in enumerate(objs) if all(p[k] == o[k] for k in keys)]


def _shortest_attr(objs: list[dict], i: int) -> str | None:
    for keys in ATTR_KEYS:
        if _matching(objs, objs[i], keys) == [i]:
            return _attr_text(objs[i], keys)
    return None


def describe(objs: list[dict], i: int) -> dict | None:
    """The shortest expression naming ``objs[i]`` alone (module docstring): ``{"text", "template", "landmark"}``, or
    None when there is none."""
    t = objs[i]
    cands: list[tuple[int, int, int, dict]] = []  # (words, kind, order, expression)
    for n, keys in enumerate(ATTR_KEYS):
        d = _attr_text(t, keys)
        match = _matching(objs, t, keys)
        if match == [i]:
            cands.append((len(d.split()), 0, n, {"text": d, "template": "attribute", "landmark": None}))
            continue
        if len(match) == 2:
            other = objs[match[0] if match[1] == i else match[1]]
            if abs(_cx(t) - _cx(other)) >= LR_GAP:
                side = "left" if _cx(t) < _cx(other) else "right"
                text = f"{d} on the {side}"
                cands.append((len(text.split()), 1, n, {"text": text, "template": "left_right", "landmark": None}))
        for j, lm in enumerate(objs):
            if j == i or (e := _shortest_attr(objs, j)) is None:
                continue
            x, y, w, h = lm["bbox"]
            others = [objs[k] for k in match if k not in (i, j)]
            for rel, holds, clear in (
                ("above", t["bbox"][1] + t["bbox"][3] <= y, all(_cy(p) >= _cy(lm) for p in others)),
                ("below", t["bbox"][1] >= y + h, all(_cy(p) <= _cy(lm) for p in others)),
            ):
                if holds and clear:
                    text = f"{d} {rel} {e}"
                    cands.append(
                        (len(text.split()), 2, 10 * n + j, {"text": text, "template": "relation", "landmark": j})
                    )
    return min(cands, key=lambda c: c[:3])[3] if cands else None


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    u = int((a | b).sum())
    return float((a & b).sum()) / u if u else 1.0


def chance_levels(samples: list[tuple[np.ndarray, int]]) -> dict[str, float]:
    """Text-free baselines over ``(object masks (n, H, W), target index)`` samples (module docstring)."""
    if not samples:
        return {"all_objects_miou": 0.0, "random_object_miou": 0.0, "empty_miou": 0.0}
    all_obj = [_iou(m.any(axis=0), m[t]) for m, t in samples]
    rand = [float(np.mean([_iou(m[j], m[t]) for j in range(len(m))])) for m, t in samples]
    return {
        "all_objects_miou": round(float(np.mean(all_obj)), 6),
        "random_object_miou": round(float(np.mean(rand)), 6),
        "empty_miou": 0.0,
    }


# ---------------------------------------------------------------------------------------------------------------------
# Samples
# ---------------------------------------------------------------------------------------------------------------------
def plan_split(split: str, cfg: RisDemoConfig) -> tuple[list[dict], list[np.ndarray]]:
    """The split's samples in order (scene by scene) until ``cfg.samples(split)``, and the scenes' images."""
    rng = np.random.default_rng([cfg.seed, SPLIT_STREAM[split]])
    entries: list[dict] = []
    images: list[np.ndarray] = []
    want = cfg.samples(split)
    while len(entries) < want:
        objs = make_scene(rng, TARGET_SHAPES[split])
        images.append(render(rng, objs))
        sc = len(images) - 1
        for i, o in enumerate(objs):
            if o["shape"] not in TARGET_SHAPES[split] or len(entries) >= want:
                continue
            expr = describe(objs, i)
            if expr is not None:
                entries.append({"split": split, "scene": sc, "objects": objs, "target": i, **expr})
    return entries, images


def _records(images_png: list[bytes]):
    def record(e: dict) -> Record:
        key = sanitize_key(f"{e['split']}-{e['scene']:05d}-o{e['target']}")
        t = e["objects"][e["target"]]
        mask = object_masks(e["objects"])[e["target"]].astype(np.uint8)
        meta = {
            "id": key,
            "label": [SHAPES.index(t["shape"])],
            "category": t["shape"],
            "scene_id": f"{e['split']}-{e['scene']:05d}",
            "target": e["target"],
            "objects": e["objects"],
            "sentences": [{"sent": e["text"]}],
            "template": e["template"],
            "landmark": e["landmark"],
            "size": [IMG, IMG],
        }
        return Record(
            key, {"png": images_png[e["scene"]], MASK_EXT: mask_png(mask, (IMG, IMG)), "txt": e["text"]}, meta
        )

    return record


def _png(arr: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------------------------------
# Vision-encoder pretext
# ---------------------------------------------------------------------------------------------------------------------
N_PATCH_CLASSES = 1 + len(SHAPES) * len(COLOURS)  # background + (shape, colour)
PRESENCE = [(s, c, z) for s in SHAPES for c in COLOURS for z in SIZES]  # 24 multi-label kinds on [CLS]


def pretext_batch(rng: np.random.Generator, n: int, patch: int = 4) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``n`` fresh scenes: images uint8 (n, 32, 32, 3), per-patch class (n, g*g), presence (n, 24) float."""
    g = IMG // patch
    imgs = np.zeros((n, IMG, IMG, 3), np.uint8)
    patch_t = np.zeros((n, g * g), np.int64)
    pres = np.zeros((n, len(PRESENCE)), np.float32)
    colours = list(COLOURS)
    for k in range(n):
        objs = make_scene(rng)
        imgs[k] = render(rng, objs)
        masks = object_masks(objs)
        cover = masks.reshape(len(objs), g, patch, g, patch).sum(axis=(2, 4)).reshape(len(objs), g * g)
        best = cover.argmax(axis=0)
        for j in range(g * g):
            if cover[best[j], j] >= patch * patch // 4:
                o = objs[best[j]]
                patch_t[k, j] = 1 + SHAPES.index(o["shape"]) * len(COLOURS) + colours.index(o["colour"])
        for o in objs:
            pres[k, PRESENCE.index((o["shape"], o["colour"], o["size"]))] = 1.0
    return imgs, patch_t, pres


def pretrain(
    cfg: PretrainConfig, out_dir: Path, mean: np.ndarray, std: np.ndarray, *, seed: int, verbose: bool
) -> dict:
    """Train the ViT on the image-only pretext (module docstring) and write it to ``out_dir``; the config written."""
    import timm
    import torch
    import torch.nn.functional as F

    kw = timm_kwargs(cfg)
    m_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)

    def to_input(imgs: np.ndarray):
        return torch.from_numpy(imgs).permute(0, 3, 1, 2).float().div_(255.0).sub_(m_t).div_(s_t).contiguous()

    t_start = time.monotonic()
    with deterministic_torch(cfg.threads, cfg.seed):
        model = timm.create_model(TIMM_MODEL, pretrained=False, **kw)
        patch_head = torch.nn.Linear(cfg.embed_dim, N_PATCH_CLASSES)
        pres_head = torch.nn.Linear(cfg.embed_dim, len(PRESENCE))
        params = [*model.parameters(), *patch_head.parameters(), *pres_head.parameters()]
        opt = adamw(params, cfg.lr, cfg.weight_decay)
        steps_per_epoch = cfg.grids_per_epoch // cfg.batch_size
        total = steps_per_epoch * cfg.epochs
        npfx = model.num_prefix_tokens

        def heads(x):
            tokens = model.forward_features(x)
            return patch_head(tokens[:, npfx:]), pres_head(model.forward_head(tokens))

        vx, vp, vq = pretext_batch(np.random.default_rng([seed, PRETEXT_STREAM["val"]]), cfg.val_grids, cfg.patch_size)
        val_inp, val_p, val_q = to_input(vx), torch.from_numpy(vp), torch.from_numpy(vq)

        def evaluate(n: int) -> dict:
            model.eval()
            with torch.no_grad():
                outs = [heads(val_inp[i : min(n, i + 256)]) for i in range(0, n, 256)]
            model.train()
            pp = torch.cat([o[0] for o in outs]).argmax(-1)
            qq = torch.cat([o[1] for o in outs]) > 0
            obj = val_p[:n] > 0
            ok = pp == val_p[:n]
            q_ok = qq == (val_q[:n] > 0.5)
            return {
                "val_patch_accuracy": round(float(ok.float().mean()), 4),
                "val_object_patch_accuracy": round(float(ok[obj].float().mean()), 4),
                "val_presence_accuracy": round(float(q_ok.float().mean()), 4),
                "val_presence_exact": round(float(q_ok.all(dim=1).float().mean()), 4),
            }

        rng = np.random.default_rng([seed, PRETEXT_STREAM["train"]])
        step, seen, history = 0, 0, []
        t0 = time.monotonic()
        for epoch in range(cfg.epochs):
            xs, ps, qs = pretext_batch(rng, steps_per_epoch * cfg.batch_size, cfg.patch_size)
            inp, pt, qt = to_input(xs), torch.from_numpy(ps), torch.from_numpy(qs)
            loss_sum = 0.0
            for b in range(steps_per_epoch):
                sl = slice(b * cfg.batch_size, (b + 1) * cfg.batch_size)
                for g in opt.param_groups:
                    g["lr"] = cosine_lr(step, cfg.lr, cfg.warmup_steps, total)
                lp, lq = heads(inp[sl])
                loss = F.cross_entropy(lp.reshape(-1, N_PATCH_CLASSES), pt[sl].reshape(-1))
                loss = loss + F.binary_cross_entropy_with_logits(lq, qt[sl])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                loss_sum += loss.item()
                step += 1
                seen += cfg.batch_size
            n_val = len(val_inp) if epoch + 1 == cfg.epochs else min(128, len(val_inp))
            metrics = {"val_scenes": n_val, **evaluate(n_val)}
            rate = seen / (time.monotonic() - t0)
            history.append({"epoch": epoch + 1, "loss": round(loss_sum / max(1, steps_per_epoch), 4), **metrics})
            if verbose:
                log(
                    f"encoder pretraining epoch {epoch + 1}/{cfg.epochs}: loss {history[-1]['loss']:.3f}, val patch "
                    f"acc {metrics['val_patch_accuracy']:.3f} (object patches "
                    f"{metrics['val_object_patch_accuracy']:.3f}), presence {metrics['val_presence_accuracy']:.3f}, "
                    f"{rate:.0f} img/s, "
                    f"eta {(total - step) * cfg.batch_size / rate:.0f}s"
                )
        train_seconds = time.monotonic() - t0
        state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    final = history[-1] if history else {}
    config = {
        "timm_model": TIMM_MODEL,
        "timm_kwargs": kw,
        "img_size": cfg.img_size,
        "patch_size": cfg.patch_size,
        "num_patches": (cfg.img_size // cfg.patch_size) ** 2,
        "mean": [round(float(v), 6) for v in mean],
        "std": [round(float(v), 6) for v in std],
        "pretext": {
            "task": "ShapeRef scenes, image only: per-patch (shape, colour) or background of each 4x4 patch "
            f"({N_PATCH_CLASSES}-way, from the patch tokens) + presence of the 24 (shape, colour, size) kinds "
            "(multi-label, from [CLS]); fresh scenes from seed streams disjoint from every split; no expressions, "
            "no referred objects",
            "config": asdict(cfg),
            "steps": total,
            **{k: v for k, v in final.items() if k.startswith("val_")},
            "history": history,
        },
        "train_images_sha256": None,  # generated afresh each epoch (seed in "deterministic")
        "deterministic": {"torch_threads": cfg.threads, "use_deterministic_algorithms": True, "seed": cfg.seed},
    }
    save_encoder(out_dir, state, config)
    if verbose:
        log(
            f"encoder pretraining done in {train_seconds:.0f}s ({time.monotonic() - t_start:.0f}s with set-up); "
            f"pretext val patch accuracy {final.get('val_patch_accuracy')}, object patches "
            f"{final.get('val_object_patch_accuracy')}, presence {final.get('val_presence_accuracy')}"
        )
    return config


# ---------------------------------------------------------------------------------------------------------------------
# Build
# ---------------------------------------------------------------------------------------------------------------------
def _build_into(out: Path, cfg: RisDemoConfig, *, shard_size: int, verbose: bool) -> dict:
    t0 = time.monotonic()
    counts, chance, scenes = {}, {}, {}
    train_images = None
    for split in SPLITS:
        entries, images = plan_split(split, cfg)
        if split == "train":
            train_images = np.stack(images)
        pngs = [_png(im) for im in images]
        h = hashlib.sha256(b"".join(hashlib.sha256(p).digest() for p in pngs)).hexdigest()
        write_split(
            out,
            split,
            SplitPlan(entries, extra={"ris_demo": {"seed": cfg.seed, "scenes": len(images), "image_size": IMG}}),
            _records(pngs),
            spec=DatasetSpec(DATASET, "segmentation", list(SHAPES), CONVERTER_VERSION, source_checksum=h),
            shard_size=shard_size,
            min_shards=cfg.min_shards,
            skip_bad=False,
            seed=None,
            show_progress=False,
        )
        counts[split], scenes[split] = len(entries), len(images)
        chance[split] = chance_levels([(object_masks(e["objects"]), e["target"]) for e in entries])
        if verbose:
            log(f"{split}: {len(entries)} samples from {len(images)} scenes ({time.monotonic() - t0:.1f}s)")
    data_seconds = time.monotonic() - t0
    pix = train_images.reshape(-1, 3).astype(np.float64) / 255.0
    mean, std = pix.mean(axis=0), pix.std(axis=0)
    enc = pretrain(cfg.pretrain, out / "vision_encoder", mean, std, seed=cfg.seed, verbose=verbose)
    pretext = {k: v for k, v in enc["pretext"].items() if k.startswith("val_")}
    write_dataset_info(
        out,
        dataset=DATASET,
        task="segmentation",
        labels=list(SHAPES),
        splits=counts,
        converter_version=CONVERTER_VERSION,
        extra={
            "description": "ShapeRef: referring segmentation of coloured shapes in 32 px scenes "
            "(datasets_prep/ris_demo.py); testA = circle targets, testB = square / triangle targets; the expression "
            "is needed to pick the object",
            "image_size": IMG,
            "chance": chance,
            "scenes": scenes,
            "target_shapes": {s: list(v) for s, v in TARGET_SHAPES.items()},
            "vision_encoder": "vision_encoder",
            "normalization": {"mean": enc["mean"], "std": enc["std"]},
            "pretext": pretext,
            "seed": cfg.seed,
            "config": {**asdict(cfg), "shard_size": shard_size},
        },
    )
    return {
        "dataset": DATASET,
        "splits": counts,
        "scenes": scenes,
        "chance": chance,
        "data_seconds": round(data_seconds, 1),
        "pretext": pretext,
        "skipped": 0,
    }


def build_ris_demo(out: Path, cfg: RisDemoConfig = RisDemoConfig(), *, shard_size: int = 1000, verbose: bool = True):
    """Build everything into a hidden temp directory beside ``out``, then rename it to ``out``; an existing ``out`` is
    replaced only when it is empty or a ``ris_demo`` build."""
    out = Path(out).resolve()
    if out.exists() and any(out.iterdir()):
        try:
            ok = json.loads((out / "dataset.json").read_text(encoding="utf-8")).get("dataset") == DATASET
        except (OSError, ValueError):
            ok = False
        if not ok:
            raise PrepError(f"{out} exists, is not empty and is not a ris_demo build; choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(out)
    t0 = time.monotonic()
    summary = build_atomically(out, lambda tmp: _build_into(tmp, cfg, shard_size=shard_size, verbose=verbose))
    summary["seconds"] = round(time.monotonic() - t0, 1)
    if verbose:
        log(f"ris_demo built in {summary['seconds']:.0f}s -> {out}: {summary['splits']}")
    return summary


def ensure_ris_demo(out_dir: Path, *, cfg: RisDemoConfig | None = None, verbose: bool = True) -> Path:
    """Build the demo at ``out_dir`` unless its ``dataset.json`` exists (an existing build, maybe a custom-sized one,
    is never replaced); return ``out_dir`` resolved."""
    out = Path(out_dir).resolve()
    if not (out / "dataset.json").is_file():
        if verbose:
            log(f"{out}: no dataset.json; building the ShapeRef demo (scenes + encoder pretraining, under 2 minutes)")
        build_ris_demo(out, cfg or RisDemoConfig(), verbose=verbose)
    return out


def _config_from_options(options: dict) -> RisDemoConfig:
    pre_keys = {f.name for f in fields(PretrainConfig)} - {"img_size", "patch_size", "patch_loss"}
    own_keys = {f.name for f in fields(RisDemoConfig)} - {"pretrain"}
    bad = sorted(set(options) - pre_keys - own_keys)
    if bad:
        raise PrepError(
            f"unknown ris_demo options {bad}; options: {sorted(own_keys)}, pretraining: {sorted(pre_keys)}"
        )

    pre = replace(
        PRETRAIN_DEFAULTS,
        **{k: type(getattr(PRETRAIN_DEFAULTS, k))(v) for k, v in options.items() if k in pre_keys and k != "seed"},
    )
    kw = {k: int(v) for k, v in options.items() if k in own_keys}
    if "seed" in options:
        pre = replace(pre, seed=int(options["seed"]))
    return RisDemoConfig(**kw, pretrain=pre)


@register_dataset(DATASET)
def convert(src: Path | None, out: Path, *, shard_size: int = 1000, skip_bad: bool = False, **options) -> dict:
    """``harness prep ris_demo --out DIR``: generate ShapeRef and pretrain its encoder (``src`` is ignored). Options
    override :class:`RisDemoConfig` fields (sample counts, ``seed``, ``min_shards``) and the pretraining's
    :class:`~datasets_prep.pretrain_vision.PretrainConfig` fields (``epochs``, ``grids_per_epoch`` = scenes per
    epoch, ``val_grids``, ``batch_size``, ``lr``, ...; ``seed`` sets both), e.g. ``train_samples=300, epochs=1``."""
    verbose = bool(options.pop("verbose", True))
    return build_ris_demo(Path(out), _config_from_options(options), shard_size=shard_size, verbose=verbose)
