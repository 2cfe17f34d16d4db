"""Benchmark: our MoPE against the official implementation (songrise/MoPE), side by side, same architecture.

    .venv/bin/python bench/vs_official.py --official /tmp/official-mope [--k 2,16] [--batch 8] [--image-size 224]
        [--rounds 12] [--threads 2] [--json OUT]

Without ``--official`` the bench prints how to get the official code and exits 0 ("skipped"). It never copies the
official code into this project: it imports their ``models/`` from DIR (a file-by-file extraction of the mirror) and
applies the shims below in memory.

Both sides get the same architecture, random weights: a Swin-T (embed 96, depths 2-2-6-2, heads 3-6-12-24, window 7
at 224 px; the official code hard-codes Swin-B, too slow for a CPU bench), l = 6, the same k, batch and image size,
ψ width 768, 101 classes (Food-101, whose titles are the text), block 0 of every stage unrouted on both sides (the
official structure; our Swin default). Official: their ``PromptedSwinTransformer`` classifier, configured as their
``main_classify.py`` builds it for ``--use_vpt --fuse_method mope`` (``use_static_prompt``, ``use_instruct``,
``d_cross 8``, ``d_inter 2``, ``prompt_init uniform``, AdamW groups lr 4e-4 / 5e-4, wd 1e-3, grad clip 1.0); ours:
``mope.build_model`` with a timm ``swin_tiny_patch4_window7_224`` (frozen), prompts / mapper / router / head trainable,
the step of ``harness.recipe`` (``TorchEngine``, ``trainable_param_groups``, grad clip 1.0).

Arms, interleaved round-robin in one process (drift hits every arm alike), medians + quartiles per arm; every
ratio is official ÷ ours in time = ours ÷ official in throughput, also given paired per round (median [q1, q3]):

  (a) block_train   forward + loss (CE + 0.01·L_imp) + backward + AdamW step, ψ given (a fixed (B, 768) tensor)
  (b) block_infer   inference forward (eval, no_grad), ψ given
  (c) e2e_train     the training step a user runs. Official: their ``VisionTextClassifiers`` step (``mope`` fusion,
                    frozen BERT re-encoding the raw titles every batch under no_grad, tokenizer included;
                    ``log_softmax`` + NLL + 0.01·L_imp, the train-accuracy ``.item()``, backward, clip, AdamW), i.e.
                    ``Model.training_step`` + Lightning's automatic optimisation minus Lightning's own overhead.
                    Ours: ψ looked up in ``harness.feature_cache.FeatureCache`` (a precomputed (N, 768) table, as
                    every trial of a sweep reads it), then the recipe step.
      e2e_infer     the same for evaluation (official re-encodes text; ours reads the cache)
  (c') ours e2e_train_nocache  ours running the same frozen BERT in the step (inputs tokenised by the loader, as our
                    data pipeline does): separates the feature-cache lever from the rest
  (d) ours e2e_train_bf16 / e2e_infer_bf16  the lever left on this side: bf16 autocast (``trainer.precision=bf16``).
                    ``--bf16 auto`` (default) first probes fp32 against bf16 (one warm-up pair + ``--bf16-probe``
                    timed pairs, first k) and keeps a bf16 arm in the rounds only if it is faster on this machine;
                    the probe is reported either way. SDPA attention is already on in every arm of ours (our Swin
                    adapter calls ``F.scaled_dot_product_attention``; the official code computes softmax(QKᵀ)V
                    explicitly).

Precision: fp32 on both sides on CPU. On a GPU (``--device auto`` picks cuda when available; that path has not been
run by the author) the official end-to-end arms run under fp16 autocast + GradScaler, as their
``Trainer(precision=16)`` does; the block-level arms stay fp32 on both sides.

BERT: the BERT-base architecture (``BertConfig()`` defaults: 12 layers, hidden 768, 12 heads, intermediate 3072),
random weights, ``--bert-layers`` to shrink it. Official: their ``BertClassifier(use_prompt=False)`` (ψ = pooler
output: the cheaper of their two frozen-BERT paths; ``--official-pbert`` switches to their layer-by-layer prompted
path, eager attention); ours: a frozen ``hf_bert`` encoder of the same config (only the no-cache arm runs it).
Tokenizer (both): a ``BertTokenizerFast`` over a WordPiece vocabulary built from the titles themselves (the real
``bert-base-uncased`` vocabulary is not available offline; whole words, so sequences are a little shorter than with
the real vocabulary, i.e. the BERT cost is, if anything, under-counted for the official side).

Shims applied to the official code at import time (their files are not edited):
  1. ``mmcv`` / ``mmcv.cnn``: a stub module (``models/decoder_heads.py`` imports ``mmcv.cnn.ConvModule``, used only by
     segmentation heads), installed only when mmcv is not importable.
  2. ``cv2``: a stub module when OpenCV is not installed (``utils/helpers.py`` imports it, ``models/bert.py`` imports
     ``utils``; none of it is called).
  3. ``swin.get_swin_encoder``: replaced. The original hard-codes Swin-B and loads a checkpoint from
     ``pretrained/``; the replacement builds the same ``PromptedSwinTransformer`` branch with the Swin-T dims above
     (``--image-size``, ``--window-size``), applies the same freeze rule (trainable iff "prompt" in the name) and loads
     nothing.
  4. ``swin.get_swin_classifier``: wrapped, to swap the classifier head's hard-coded ``Linear(1024, C)`` for
     ``Linear(768, C)`` (Swin-T's final width).
  5. ``bert.BertModel.from_pretrained`` / ``bert.BertTokenizerFast.from_pretrained``: the module-level names are
     replaced by offline builders (random-init ``BertModel(BertConfig(...))``; the local-vocabulary tokenizer above).

Parameters: the trainable counts of both models are printed with the difference explained, computed from the models:
the official code allocates, in every stage, block 0's slot of ``deep_prompt_embeddings_s`` (static prompt + k
experts) and block 0's router (``mm_prompt_self_proj`` W_x, ``mm_prompt_cross_proj`` W_y), and never reads them
(``BasicLayer.forward`` runs ``blocks[0](x)`` unrouted). The bench also counts the trainable elements that receive a
nonzero gradient in one backward (eval mode, no dropout) on each side.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import platform
import random
import re
import statistics
import sys
import tempfile
import time
import types
import warnings
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SWIN_T = dict(embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24])
PSI_DIM = 768  # BERT [CLS] width: the official mapper's Linear(768, 384) and W_y's Linear(768, d_cross) hard-code it
PROMPT_LEN = 6
NUM_CLASSES = 101  # Food-101 (the titles are the text)
W_IMP = 0.01
LR_VIS, LR_TEXT, WD = 4e-4, 5e-4, 1e-3  # main_classify.py defaults
GRAD_CLIP = 1.0  # main_classify.py: Trainer(gradient_clip_val=1.0); our trainer configs: grad_clip 1.0
TITLES = Path("data/food101/text/test_titles.csv")  # inside the official repository

HOW_TO_GET = """\
vs_official: skipped (no --official DIR given). To run it, get the official code (songrise/MoPE) outside this repo:

  1. mirror it: in an agent session, the `fetch` tool with source github:songrise/MoPE
     (gives /work/.mirror/songrise+MoPE/repo); elsewhere: git clone --bare https://github.com/songrise/MoPE mope.git
  2. extract file by file (`git archive HEAD` aborts: the blob of data/food101/text/train_titles.csv is missing):

     G="git --git-dir=/work/.mirror/songrise+MoPE/repo"   # or --git-dir=mope.git
     mkdir -p /tmp/official-mope && cd /tmp/official-mope
     for p in $($G ls-tree -r HEAD --name-only -- models utils main_classify.py data/food101/text/test_titles.csv); do
       mkdir -p "$(dirname "$p")" && $G show "HEAD:$p" > "$p"; done

  3. .venv/bin/python bench/vs_official.py --official /tmp/official-mope --k 2,16 --rounds 12 --json OUT.json
"""


# ---------------------------------------------------------------------------------------------------- text + tokenizer
def load_titles(official: Path, n_min: int) -> tuple[list[str], list[str], str]:
    """(keys, titles, source): Food-101 page titles from the official repository (its test split CSV: image,title,
    label), or synthetic titles when the CSV is absent."""
    f = official / TITLES
    keys: list[str] = []
    texts: list[str] = []
    if f.is_file():
        with f.open(newline="", encoding="utf-8") as fh:
            for row in csv.reader(fh):
                if len(row) >= 2 and row[1].strip():
                    keys.append(row[0])
                    texts.append(row[1])
        source = f"{TITLES} of the official repository ({len(texts)} titles)"
    if len(texts) < n_min:
        keys = [f"synthetic_{i}.jpg" for i in range(n_min)]
        texts = [f"homemade recipe number {i}: the best {['apple pie', 'ramen', 'tacos'][i % 3]} ever" for i in keys]
        source = "synthetic titles (the official titles CSV was not found)"
    return keys, texts, source


_WORD = re.compile(r"\w+|[^\w\s]")


def build_tokenizer(texts: list[str], workdir: Path):
    """A BertTokenizerFast over a WordPiece vocabulary of the titles' lower-cased words (+ single characters and
    their ## continuations, so nothing maps to [UNK])."""
    from transformers import BertTokenizerFast

    words = sorted({w for t in texts for w in _WORD.findall(t.lower())})
    chars = sorted({c for w in words for c in w})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + chars + [f"##{c}" for c in chars] + words
    vocab = list(dict.fromkeys(vocab))
    path = workdir / "vocab.txt"
    path.write_text("\n".join(vocab) + "\n", encoding="utf-8")
    return BertTokenizerFast(vocab_file=str(path), do_lower_case=True, model_max_length=512)


# ---------------------------------------------------------------------------------------------------- official side
class _Unavailable:
    """Stand-in for an optional dependency's class the benchmarked path never uses."""

    def __init__(self, *a, **kw):
        raise RuntimeError("vs_official shim: this class is a stub (only the segmentation heads need it)")


def _stub_module(name: str, **attrs) -> None:
    if importlib.util.find_spec(name.split(".")[0]) is not None:
        return
    parts = name.split(".")
    for i in range(1, len(parts) + 1):
        sub = ".".join(parts[:i])
        if sub not in sys.modules:
            mod = types.ModuleType(sub)
            mod.__dict__["__vs_official_stub__"] = True
            sys.modules[sub] = mod
            if i > 1:
                setattr(sys.modules[".".join(parts[: i - 1])], parts[i - 1], mod)
    for k, v in attrs.items():
        setattr(sys.modules[name], k, v)


def import_official(official: Path, *, image_size: int, window_size: int, bert_layers: int, tokenizer):
    """Import the official ``models.swin``, ``models.bert``, ``models.classifier`` from `official` with the shims of
    the module docstring. Returns the three modules."""
    for name in ("models", "utils"):
        mod = sys.modules.get(name)
        if mod is not None and not str(getattr(mod, "__file__", "")).startswith(str(official)):
            raise RuntimeError(f"a module named {name!r} from {getattr(mod, '__file__', '?')} is already imported")
    _stub_module("mmcv.cnn", ConvModule=_Unavailable)  # shim 1
    _stub_module("cv2")  # shim 2
    sys.path.insert(0, str(official))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import models.bert as bert  # noqa: PLC0415  (the official package, found through sys.path)
        import models.classifier as classifier  # noqa: PLC0415
        import models.swin as swin  # noqa: PLC0415
    for m in (swin, bert, classifier):
        if not str(m.__file__).startswith(str(official)):
            raise RuntimeError(f"{m.__name__} was imported from {m.__file__}, not from {official}")

    def get_swin_encoder(  # shim 3: same signature and branch (use_vpt=True), Swin-T dims, no checkpoint
        num_classes,
        crop_size,
        use_vpt=True,
        moe_n_experts=8,
        prompt_length=10,
        use_static_prompt=False,
        use_instruct=True,
        prompt_init="uniform",
        d_cross=0,
        d_inter=0,
    ):
        assert use_vpt, "the bench builds the prompted (use_vpt) branch only"
        model = swin.PromptedSwinTransformer(
            img_size=image_size,
            window_size=window_size,
            drop_path_rate=0.2,  # Swin-T's; inactive anyway (the train() override keeps the blocks in eval)
            num_classes=num_classes,
            moe_n_experts=moe_n_experts,
            prompt_length=prompt_length,
            use_static_prompt=use_static_prompt,
            use_instruct=use_instruct,
            prompt_init=prompt_init,
            d_cross=d_cross,
            d_inter=d_inter,
            **SWIN_T,
        )
        for name, param in model.named_parameters():  # the original's freeze rule
            param.requires_grad = "prompt" in name
        return model

    swin.get_swin_encoder = get_swin_encoder
    original_classifier = swin.get_swin_classifier

    def get_swin_classifier(*args, **kwargs):  # shim 4: the head's hard-coded Linear(1024, C)
        clf = original_classifier(*args, **kwargs)
        old = clf.classifier
        clf.classifier = nn.Linear(clf.encoder.num_features, old.out_features)
        return clf

    swin.get_swin_classifier = get_swin_classifier

    from transformers import BertConfig
    from transformers import BertModel as HFBertModel

    class OfflineBertModel(HFBertModel):  # shim 5
        @classmethod
        def from_pretrained(cls, *_a, **_kw):
            return HFBertModel(BertConfig(num_hidden_layers=bert_layers))

    class OfflineTokenizer:  # shim 5
        @staticmethod
        def from_pretrained(*_a, **_kw):
            return tokenizer

    bert.BertModel = OfflineBertModel
    bert.BertTokenizerFast = OfflineTokenizer
    return swin, bert, classifier


def build_official(mods, k: int, *, pbert: bool):
    """Their classifier for ``--use_vpt --fuse_method mope`` as ``main_classify.Model.__init__`` builds it (frozen
    text encoder: no ``--train_instructor``), and its ``configure_optimizers`` AdamW."""
    swin, bert, classifier = mods
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        vision = swin.get_swin_classifier(
            num_classes=NUM_CLASSES,
            backbone="swinb_224",
            use_vpt=True,
            moe_n_experts=k,
            prompt_length=PROMPT_LEN,
            use_static_prompt=True,
            prompt_init="uniform",
            use_instruct=True,
            d_cross=8,
            d_inter=2,
        )
        text = bert.BertClassifier(NUM_CLASSES, use_prompt=pbert, prompt_length=4)
        clf = classifier.VisionTextClassifiers(
            vision,
            text,
            NUM_CLASSES,
            fusion_method="mope",
            train_instructor=False,
            moe_n_experts=k,
            dense_routing=True,
            moe_top_k=1,
            route_per_layer=True,
        )
    text.requires_grad_(False)  # main_classify: `if not args.train_instructor: text_classifier.requires_grad_(False)`
    opt = torch.optim.AdamW(
        [
            {"params": vision.parameters(), "lr": LR_VIS, "weight_decay": WD},
            {"params": text.parameters(), "lr": LR_TEXT, "weight_decay": WD},
        ]
    )
    return clf, opt


def official_dead_params(clf) -> dict[str, int]:
    """Trainable elements the official MoPE path allocates and never reads, counted from the model: per stage,
    block 0's slot of deep_prompt_embeddings_s (static prompt + k experts) and block 0's router (W_x, W_y)."""
    enc = clf.vision_model.encoder
    slots = routers = 0
    for s, layer in enumerate(enc.layers):
        p = getattr(enc, f"deep_prompt_embeddings_{s}")
        if p.requires_grad:
            slots += p[:, 0].numel()
        blk0 = layer.blocks[0]
        for mod in (blk0.mm_prompt_self_proj, blk0.mm_prompt_cross_proj):
            routers += sum(q.numel() for q in mod.parameters() if q.requires_grad)
    return {"block0_prompt_slots": slots, "block0_routers": routers}


# ---------------------------------------------------------------------------------------------------- our side
def build_ours(k: int, *, image_size: int, window_size: int, bert_layers: int):
    from harness.ds_config import trainable_param_groups
    from mope import EncoderConfig, FusionConfig, MoPEConfig, build_model

    cfg = FusionConfig(
        method="mope",
        vision=EncoderConfig(
            kind="timm_swin",
            name="swin_tiny_patch4_window7_224",
            kwargs=dict(img_size=image_size, window_size=window_size),
        ),
        text=EncoderConfig(
            kind="hf_bert", name="bert-base-uncased", pool="cls", kwargs=dict(num_hidden_layers=bert_layers)
        ),
        num_classes=NUM_CLASSES,
        comp_prompt_len=0,  # frozen un-prompted BERT: ψ is a black-box feature, cacheable
        mope=MoPEConfig(num_experts=k, prompt_len=PROMPT_LEN),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_model(cfg)
    assert model.comp_is_blackbox
    opt = torch.optim.AdamW(trainable_param_groups(model, {"vision": LR_VIS, "text": LR_TEXT}, weight_decay=WD))
    return model, opt


# ---------------------------------------------------------------------------------------------------- timing helpers
def _quartiles(v: list[float]) -> tuple[float, float, float]:
    if len(v) == 1:
        return v[0], v[0], v[0]
    q = statistics.quantiles(v, n=4, method="inclusive")
    return q[0], statistics.median(v), q[2]


def _stats(v: list[float]) -> dict[str, float]:
    q1, med, q3 = _quartiles(v)
    return {"median": round(med, 2), "q1": round(q1, 2), "q3": round(q3, 2), "n": len(v)}


def _paired(a: list[float], b: list[float]) -> dict[str, float]:
    q1, med, q3 = _quartiles([x / y for x, y in zip(a, b, strict=True)])
    return {"median": round(med, 3), "q1": round(q1, 3), "q3": round(q3, 3)}


def count_nonzero_grads(model: nn.Module, loss_fn) -> int:
    """Trainable elements with a nonzero gradient after one backward of loss_fn() (grads cleared before/after)."""
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = None
    loss_fn().backward()
    n = sum(int((p.grad != 0).sum()) for p in params if p.grad is not None)
    for p in params:
        p.grad = None
    return n


# ---------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--official", type=Path, help="directory of the extracted official code (models/, utils/)")
    ap.add_argument("--k", default="2,16", help="comma-separated expert counts")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--window-size", type=int, default=7, help="Swin window (must divide every stage's grid)")
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds before the timed ones")
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads (default: torch's); on a CPU shared with other busy processes use 1",
    )
    ap.add_argument("--bert-layers", type=int, default=12, help="BERT-base has 12")
    ap.add_argument("--official-pbert", action="store_true", help="official text side: their prompted-BERT path")
    ap.add_argument(
        "--bf16",
        choices=("auto", "on", "off"),
        default="auto",
        help="bf16-autocast arms (d): auto = probe first, keep an arm in the rounds only if it is faster here",
    )
    ap.add_argument("--bf16-probe", type=int, default=1, help="timed fp32/bf16 pairs of the probe (after one warm-up)")
    ap.add_argument("--device", default="auto", help="auto (cuda when available) | cpu | cuda")
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args(argv)

    if args.official is None:
        print(HOW_TO_GET)
        return 0
    official = args.official.resolve()
    missing = [p for p in ("models/swin.py", "models/bert.py", "models/classifier.py") if not (official / p).is_file()]
    if missing:
        print(f"vs_official: {official} lacks {missing}: not an extraction of songrise/MoPE\n\n{HOW_TO_GET}")
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    ks = [int(x) for x in args.k.split(",") if x.strip()]
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    B, S, dev = args.batch, args.image_size, torch.device(args.device)
    # the official Trainer(precision=16): fp16 autocast + GradScaler on a GPU; on CPU both sides run fp32
    off_amp = (lambda: torch.autocast("cuda", dtype=torch.float16)) if dev.type == "cuda" else nullcontext
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    load_before = os.getloadavg()

    n_batches = args.warmup + args.rounds
    keys_all, texts_all, text_source = load_titles(official, n_batches * B)
    order = list(range(len(texts_all)))
    random.Random(0).shuffle(order)
    batches_txt = [[order[(r * B + i) % len(order)] for i in range(B)] for r in range(n_batches)]

    tmp = tempfile.TemporaryDirectory(prefix="vs_official_")
    tok = build_tokenizer(texts_all, Path(tmp.name))
    mods = import_official(
        official, image_size=S, window_size=args.window_size, bert_layers=args.bert_layers, tokenizer=tok
    )
    from harness.engines import TorchEngine
    from harness.feature_cache import FeatureCache
    from mope import Task, task_loss

    torch.manual_seed(0)
    image = torch.randn(B, 3, S, S, device=dev)
    psi = torch.randn(B, PSI_DIM, device=dev)
    label = torch.randint(0, NUM_CLASSES, (B,), device=dev)
    texts = [[texts_all[i] for i in idx] for idx in batches_txt]
    keys = [[keys_all[i] for i in idx] for idx in batches_txt]
    tokenised = [
        {k: v.to(dev) for k, v in tok(t, padding=True, truncation=True, return_tensors="pt").items()} for t in texts
    ]
    seq_lens = [int(t["input_ids"].shape[1]) for t in tokenised]

    # the feature cache as our recipe reads it: a (N, 768) table + key -> row (features of a frozen BERT; random here)
    cache = FeatureCache(Path(tmp.name), "bench")
    uniq = list(dict.fromkeys(keys_all))
    cache.feats["train"] = torch.randn(len(uniq), PSI_DIM, device=dev)
    cache.tables["train"] = {kk: i for i, kk in enumerate(uniq)}

    setups: dict[int, dict] = {}
    params: dict[str, dict] = {}
    for k in ks:
        clf, opt_off = build_official(mods, k, pbert=args.official_pbert)
        clf.to(dev)
        off_trainable = [p for p in clf.parameters() if p.requires_grad]
        opt_off_block = torch.optim.AdamW(off_trainable, lr=LR_VIS, weight_decay=WD)
        ours, opt_ours = build_ours(k, image_size=S, window_size=args.window_size, bert_layers=args.bert_layers)
        ours.to(dev)
        opt_ours_block = torch.optim.AdamW(
            [p for p in ours.parameters() if p.requires_grad], lr=LR_VIS, weight_decay=WD
        )
        eng = TorchEngine(ours, opt_ours, "fp32", GRAD_CLIP)
        eng_bf16 = TorchEngine(ours, opt_ours, "bf16", GRAD_CLIP)

        # -- parameters
        n_off = sum(p.numel() for p in off_trainable)
        n_ours = sum(p.numel() for p in ours.parameters() if p.requires_grad)
        dead = official_dead_params(clf)
        vis = clf.vision_model

        def off_loss(vis=vis):
            logits, extra = vis.forward_instruct_multimodal_moe(image, psi)
            return F.cross_entropy(logits, label) + W_IMP * extra["importance_loss"]

        def ours_loss(ours=ours):
            out = ours({"image": image, "comp_feat": psi, "label": label})
            return task_loss(out.logits, label, Task.SINGLE_LABEL) + out.aux_loss

        clf.eval(), ours.eval()
        nz_off, nz_ours = count_nonzero_grads(clf, off_loss), count_nonzero_grads(ours, ours_loss)
        params[str(k)] = {
            "official_trainable": n_off,
            "ours_trainable": n_ours,
            "difference": n_off - n_ours,
            "official_unused": dead,
            "remainder": n_off - sum(dead.values()) - n_ours,
            "nonzero_grad_elements": {"official": nz_off, "ours": nz_ours},
            "ours_components": {c: v["trainable"] for c, v in ours.parameter_report()["components"].items()},
        }
        setups[k] = dict(
            clf=clf, opt_off=opt_off, opt_off_block=opt_off_block, ours=ours, opt_ours_block=opt_ours_block,
            eng=eng, eng_bf16=eng_bf16, scaler_off=torch.amp.GradScaler(dev.type, enabled=dev.type == "cuda"),
        )  # fmt: skip

    def arms_for(k: int) -> dict:
        s = setups[k]
        clf, vis, ours = s["clf"], s["clf"].vision_model, s["ours"]

        def off_block_train(r):
            logits, extra = vis.forward_instruct_multimodal_moe(image, psi)
            loss = F.cross_entropy(logits, label) + W_IMP * extra["importance_loss"]
            s["opt_off_block"].zero_grad(set_to_none=True)
            loss.backward()
            s["opt_off_block"].step()

        def ours_block_train(r):
            out = ours({"image": image, "comp_feat": psi, "label": label})
            loss = task_loss(out.logits, label, Task.SINGLE_LABEL) + out.aux_loss
            s["opt_ours_block"].zero_grad(set_to_none=True)
            loss.backward()
            s["opt_ours_block"].step()

        def off_block_infer(r):
            with torch.no_grad():
                vis.forward_instruct_multimodal_moe(image, psi)

        def ours_block_infer(r):
            with torch.no_grad():
                ours({"image": image, "comp_feat": psi})

        def off_e2e_train(r):  # main_classify.Model.training_step + Lightning's zero_grad / backward / clip / step
            opt, scaler = s["opt_off"], s["scaler_off"]
            with off_amp():
                outputs, extra_out = clf(image, texts[r])
                outputs = F.log_softmax(outputs, dim=1)
                loss_val = F.nll_loss(outputs, label)  # their NLLLoss(ignore_index=args.ignore_label): no such arg
                loss_val = loss_val + extra_out["importance_loss"] * W_IMP
            with torch.no_grad():
                pred = torch.argmax(F.log_softmax(outputs, dim=1), dim=1)
                _ = torch.sum(pred == label).item() / pred.size(0)  # their train_acc log
            opt.zero_grad()
            scaler.scale(loss_val).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], GRAD_CLIP)
            scaler.step(opt)
            scaler.update()

        def ours_step(engine, batch):  # harness.recipe.Recipe._step
            out = engine.forward(batch)
            loss = task_loss(out.logits.float(), batch["label"], Task.SINGLE_LABEL) + out.aux_loss
            if not torch.isfinite(loss):
                raise RuntimeError("non-finite loss")
            engine.backward_step(loss)

        def ours_e2e_train(r, engine=None):
            batch = {"image": image, "label": label, "key": keys[r]}
            batch["comp_feat"] = cache.lookup("train", batch["key"])
            ours_step(engine or s["eng"], batch)

        def ours_e2e_train_nocache(r):
            ours_step(s["eng"], {"image": image, "label": label, **tokenised[r]})

        def off_e2e_infer(r):
            with torch.no_grad(), off_amp():
                outputs, _ = clf(image, texts[r])
                F.log_softmax(outputs, dim=1).argmax(dim=1)

        def ours_e2e_infer(r, autocast=False):
            ctx = torch.autocast(dev.type, dtype=torch.bfloat16) if autocast else nullcontext()
            with torch.no_grad(), ctx:
                out = ours({"image": image, "comp_feat": cache.lookup("train", keys[r])})
                out.logits.float().argmax(dim=-1)

        arms = {
            "official/block_train": (clf, True, off_block_train),
            "ours/block_train": (ours, True, ours_block_train),
            "official/block_infer": (clf, False, off_block_infer),
            "ours/block_infer": (ours, False, ours_block_infer),
            "official/e2e_train": (clf, True, off_e2e_train),
            "ours/e2e_train": (ours, True, ours_e2e_train),
            "ours/e2e_train_nocache": (ours, True, ours_e2e_train_nocache),
            "official/e2e_infer": (clf, False, off_e2e_infer),
            "ours/e2e_infer": (ours, False, ours_e2e_infer),
        }
        arms["ours/e2e_train_bf16"] = (ours, True, lambda r: ours_e2e_train(r, s["eng_bf16"]))
        arms["ours/e2e_infer_bf16"] = (ours, False, lambda r: ours_e2e_infer(r, autocast=True))
        return arms

    def run_arm(arm, r: int) -> float:
        model, train, fn = arm
        model.train(train)
        sync()
        t0 = time.perf_counter()
        fn(r)
        sync()
        return (time.perf_counter() - t0) * 1e3

    t_start = time.perf_counter()
    all_arms = {(k, name): arm for k in ks for name, arm in arms_for(k).items()}
    bf16_probe: dict[str, dict] = {}
    for step in ("e2e_train", "e2e_infer"):
        fp32, bf16 = f"ours/{step}", f"ours/{step}_bf16"
        keep = args.bf16 == "on"
        if args.bf16 == "auto":  # one warm-up pair, then --bf16-probe timed pairs, on the first k, batch 0
            t32, t16 = [], []
            for i in range(1 + args.bf16_probe):
                a, b = run_arm(all_arms[(ks[0], fp32)], 0), run_arm(all_arms[(ks[0], bf16)], 0)
                if i:
                    t32.append(a), t16.append(b)
            keep = statistics.median(t16) < statistics.median(t32)
            bf16_probe[step] = {
                "k": ks[0],
                "fp32_ms": [round(x, 1) for x in t32],
                "bf16_ms": [round(x, 1) for x in t16],
                "bf16_faster": keep,
            }
            print(f"bf16 probe {step}: fp32 {t32} ms, bf16 {t16} ms -> in the rounds: {keep}", file=sys.stderr)
        if not keep:
            for k in ks:
                del all_arms[(k, bf16)]
    times: dict[tuple[int, str], list[float]] = {a: [] for a in all_arms}
    for r in range(n_batches):
        for a, arm in all_arms.items():
            t = run_arm(arm, r)
            if r >= args.warmup:
                times[a].append(t)
        tag = "warm-up" if r < args.warmup else "round"
        n = r + 1 if r < args.warmup else r + 1 - args.warmup
        last = " ".join(f"{k}:{name}={times[(k, name)][-1]:.0f}" for (k, name) in all_arms if r >= args.warmup)
        print(f"{tag} {n}/{args.warmup if r < args.warmup else args.rounds} {last}", file=sys.stderr, flush=True)
    wall_s = time.perf_counter() - t_start

    pairs = [
        ("block_train", "official/block_train", "ours/block_train"),
        ("block_infer", "official/block_infer", "ours/block_infer"),
        ("e2e_train", "official/e2e_train", "ours/e2e_train"),
        ("e2e_train_nocache", "official/e2e_train", "ours/e2e_train_nocache"),
        ("e2e_infer", "official/e2e_infer", "ours/e2e_infer"),
    ]
    pairs += [
        (f"{step}_bf16", f"official/{step}", f"ours/{step}_bf16")
        for step in ("e2e_train", "e2e_infer")
        if (ks[0], f"ours/{step}_bf16") in all_arms
    ]
    per_k = {}
    for k in ks:
        ms = {name: _stats(times[(k, name)]) for (kk, name) in all_arms if kk == k}
        ratios = {}
        for label_, a, b in pairs:
            ratios[label_] = {
                "official_over_ours": round(ms[a]["median"] / ms[b]["median"], 3),
                "paired": _paired(times[(k, a)], times[(k, b)]),
            }
        levers = {
            "feature_cache": round(ms["ours/e2e_train_nocache"]["median"] / ms["ours/e2e_train"]["median"], 3),
        }
        for step, key in (("e2e_train", "bf16_train"), ("e2e_infer", "bf16_infer")):
            if f"ours/{step}_bf16" in ms:
                levers[key] = round(ms[f"ours/{step}"]["median"] / ms[f"ours/{step}_bf16"]["median"], 3)
        per_k[str(k)] = {"ms": ms, "ratios": ratios, "lever_speedups": levers, "params": params[str(k)]}

    import timm
    import transformers

    res = {
        "bench": "vs_official",
        "official_dir": str(official),
        "config": {
            "k": ks,
            "batch": B,
            "image_size": S,
            "window_size": args.window_size,
            "swin": SWIN_T,
            "prompt_len": PROMPT_LEN,
            "psi_dim": PSI_DIM,
            "num_classes": NUM_CLASSES,
            "rounds": args.rounds,
            "warmup": args.warmup,
            "bert": {
                "layers": args.bert_layers,
                "hidden": 768,
                "weights": "random",
                "official_path": "pbert" if args.official_pbert else "plain (pooler output)",
            },
        },
        "text": {
            "source": text_source,
            "padded_len_median": statistics.median(seq_lens),
            "padded_len_max": max(seq_lens),
        },
        "device": str(dev) + (f" ({torch.cuda.get_device_name()})" if dev.type == "cuda" else ""),
        "official_e2e_precision": "fp16 autocast + GradScaler (Lightning precision=16)"
        if dev.type == "cuda"
        else "fp32",
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "transformers": transformers.__version__,
        "wall_s": round(wall_s, 1),
        "bf16": {"mode": args.bf16, "probe": bf16_probe},
        "per_k": per_k,
    }
    print(markdown(res))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=2) + "\n", encoding="utf-8")
        print(f"\nJSON written to {args.json}")
    else:
        print(json.dumps(res, indent=2))
    tmp.cleanup()
    return 0


ROWS = [
    ("(a) training step, prompt block (ψ given)", "official/block_train", "ours/block_train", "block_train"),
    ("(b) inference forward (ψ given)", "official/block_infer", "ours/block_infer", "block_infer"),
    ("(c) training step end to end (official: BERT every batch; ours: feature cache)", "official/e2e_train",
     "ours/e2e_train", "e2e_train"),
    ("(c') … ours without the cache (same frozen BERT in the step)", "official/e2e_train", "ours/e2e_train_nocache",
     "e2e_train_nocache"),
    ("(c) inference end to end", "official/e2e_infer", "ours/e2e_infer", "e2e_infer"),
    ("(d) training step end to end, ours bf16", "official/e2e_train", "ours/e2e_train_bf16", "e2e_train_bf16"),
    ("(d) inference end to end, ours bf16", "official/e2e_infer", "ours/e2e_infer_bf16", "e2e_infer_bf16"),
]  # fmt: skip


def markdown(res: dict) -> str:
    c = res["config"]
    out = [
        f"MoPE, official vs ours: Swin-T dims, {c['image_size']} px, batch {c['batch']}, l = {c['prompt_len']}, "
        f"ψ 768, random weights, BERT {c['bert']['layers']} layers; {res['device']}, {res['threads']} threads "
        f"({res['cpus']} CPUs, load average {res['loadavg_before'][0]} → {res['loadavg_after'][0]}), "
        f"{c['rounds']} interleaved rounds, medians [q1–q3].",
        "",
        "| k | step | official ms | ours ms | official ÷ ours (paired [q1–q3]) |",
        "|---|---|---|---|---|",
    ]
    for k, d in res["per_k"].items():
        ms = d["ms"]
        for title, a, b, key in ROWS:
            if b not in ms:
                continue
            r = d["ratios"][key]
            p = r["paired"]
            out.append(
                f"| {k} | {title} | {_fmt(ms[a])} | {_fmt(ms[b])} | **{r['official_over_ours']:.2f}×** "
                f"({p['median']:.2f} [{p['q1']:.2f}–{p['q3']:.2f}]) |"
            )
    out += ["", "Levers on our side (speed-up of the step, ours ÷ ours):", ""]
    for k, d in res["per_k"].items():
        lv = d["lever_speedups"]
        line = f"- k={k}: feature cache (vs the frozen BERT in the step) {lv['feature_cache']:.2f}×"
        for key, what in (("bf16_train", "training"), ("bf16_infer", "inference")):
            if key in lv:
                line += f"; bf16 autocast {what} {lv[key]:.2f}×"
        out.append(line)
    for step, p in res["bf16"]["probe"].items():
        if not p["bf16_faster"]:
            out.append(
                f"- bf16 autocast, {step} (probe, k={p['k']}): fp32 {statistics.median(p['fp32_ms']):.0f} ms vs bf16 "
                f"{statistics.median(p['bf16_ms']):.0f} ms, not faster on this machine, so left out of the rounds"
            )
    out += ["", "Trainable parameters:", ""]
    for k, d in res["per_k"].items():
        p = d["params"]
        dead = p["official_unused"]
        out.append(
            f"- k={k}: official {p['official_trainable']:,}, ours {p['ours_trainable']:,}, difference "
            f"{p['difference']:,} = block-0 prompt slots (static + {k} experts, every stage) "
            f"{dead['block0_prompt_slots']:,} + block-0 routers (W_x, W_y, every stage) {dead['block0_routers']:,}"
            + (f" (remainder {p['remainder']:,})" if p["remainder"] else " exactly")
            + "; allocated by the official code and never read (block 0 of each stage runs unrouted). "
            f"Elements with a nonzero gradient after one backward: official "
            f"{p['nonzero_grad_elements']['official']:,}, ours {p['nonzero_grad_elements']['ours']:,}."
        )
    return "\n".join(out)


def _fmt(s: dict) -> str:
    return f"{s['median']:.0f} [{s['q1']:.0f}–{s['q3']:.0f}]"


if __name__ == "__main__":
    raise SystemExit(main())
