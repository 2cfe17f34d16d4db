"""`harness inspect --preset NAME [--json]`: parameter counts per component and attention length per layer."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Any

import torch


def inspect_preset(name: str, *, num_classes: int | None = None, materialize: bool = False) -> dict[str, Any]:
    """Builds the preset (on the meta device unless `materialize`: no memory, no init cost) and reports it."""
    from mope import build_model
    from mope.presets import get_preset

    cfg = get_preset(name)
    if num_classes is not None:
        cfg = dataclasses.replace(cfg, num_classes=num_classes)
    if materialize:
        model = build_model(cfg)
    else:
        with torch.device("meta"):
            model = build_model(cfg)
    rep = model.parameter_report()
    main_np = model.prompt_cfg.num_prompts if model.prompt_cfg is not None else 0
    attn: dict[str, list[int]] = {}
    if model.main_encoder is not None:
        attn[model.main_modality] = model.main_encoder.attention_lengths(main_np)
    if model.comp_encoder is not None:
        comp_np = model.comp_prompts.cfg.num_prompts if model.comp_prompts is not None else 0
        encoders = getattr(model.comp_encoder, "encoders", {model.comp_modality: model.comp_encoder})
        for mod, enc in encoders.items():
            enc = getattr(enc, "encoder", enc)  # a video FrameEncoder: its per-frame encoder
            if hasattr(enc, "attention_lengths"):
                attn[mod] = enc.attention_lengths(comp_np)
    gen = model.main_prompts
    return {
        "preset": name,
        "method": cfg.method.value,
        "main": model.main_modality,
        "complementary": model.comp_modalities if model.comp_encoder is not None else [],
        "num_classes": cfg.num_classes,
        "trainable": int(rep["trainable"]),
        "total": int(rep["total"]),
        "components": rep["components"],
        "prompts_per_block": main_np,
        "tunable_prompts_per_layer": model.prompt_cfg.tunable_prompts_per_layer if model.prompt_cfg else 0,
        "routed_blocks": list(gen.routed_blocks) if gen is not None else [],
        "attention_length_per_layer": attn,
        "config": cfg.to_dict(),
    }


def _fmt(n: int) -> str:
    return f"{n / 1e6:.3f}M" if n >= 1e5 else f"{n:,}"


def main(argv: list[str] | None = None) -> int:
    from mope.presets import list_presets

    ap = argparse.ArgumentParser(prog="harness inspect", description=__doc__)
    ap.add_argument("--preset", help="model preset name; --list shows them")
    ap.add_argument("--list", action="store_true", help="list presets")
    ap.add_argument("--json", action="store_true", help="print JSON (top-level key 'trainable' is an integer)")
    ap.add_argument("--num-classes", type=int, default=None, help="override the head size (e.g. 101 for Food-101)")
    args = ap.parse_args(argv)
    if args.list or not args.preset:
        import logging

        logging.getLogger("mope").setLevel(logging.ERROR)  # "random-init encoder" notes: counts need no weights
        for name in list_presets():  # built on the meta device: counts without memory or init cost
            rep = inspect_preset(name)
            comp = ",".join(rep["complementary"]) or "-"
            print(
                f"{name:<48} {rep['method']:<20}main={rep['main']:<7}comp={comp:<12}"
                f"trainable {_fmt(rep['trainable']):>9} of {_fmt(rep['total'])}"
            )
        if args.list:
            return 0
        print(
            "harness inspect: no preset given; pick one of the presets listed above: harness inspect --preset NAME",
            file=sys.stderr,
        )
        return 2
    try:
        rep = inspect_preset(args.preset, num_classes=args.num_classes)
    except KeyError as e:
        print(f"harness inspect: {e.args[0]}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(rep, indent=2))
        return 0
    print(f"preset {rep['preset']}  method={rep['method']}  classes={rep['num_classes']}")
    print(f"{'component':<20}{'trainable':>14}{'total':>16}")
    for comp, c in sorted(rep["components"].items()):
        print(f"{comp:<20}{_fmt(c['trainable']):>14}{_fmt(c['total']):>16}")
    print(f"{'TOTAL':<20}{_fmt(rep['trainable']):>14}{_fmt(rep['total']):>16}")
    print(
        f"prompt tokens per block: {rep['prompts_per_block']}  (tunable per layer: {rep['tunable_prompts_per_layer']})"
    )
    for mod, lens in rep["attention_length_per_layer"].items():
        print(f"attention length per layer ({mod}): {lens}")
    return 0
