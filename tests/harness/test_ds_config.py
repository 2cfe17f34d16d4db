"""DeepSpeed config math, the ZeRO-3 refusal, and AdamW param groups over the tiny models."""

from __future__ import annotations

import warnings

import pytest
import torch

from harness.ds_config import STEPS_PER_PRINT, deepspeed_config, modality_group, trainable_param_groups
from mope.config import Method
from tests.helpers.tinymodels import TINY_VIT, tiny_cfg

BASE = dict(micro_batch=4, grad_accum=3, world_size=2, precision="fp32", zero_stage=2, grad_clip=1.0)


def test_batch_math_and_sections():
    cfg = deepspeed_config(**BASE)
    assert cfg["train_batch_size"] == 4 * 3 * 2
    assert cfg["train_micro_batch_size_per_gpu"] == 4
    assert cfg["gradient_accumulation_steps"] == 3
    assert cfg["gradient_clipping"] == 1.0
    assert cfg["zero_optimization"] == {"stage": 2}
    assert cfg["steps_per_print"] == STEPS_PER_PRINT
    assert "optimizer" not in cfg and "scheduler" not in cfg
    assert "bf16" not in cfg and "fp16" not in cfg
    assert deepspeed_config(**{**BASE, "precision": "bf16"})["bf16"] == {"enabled": True}
    fp16 = deepspeed_config(**{**BASE, "precision": "fp16"})["fp16"]
    assert fp16["enabled"] is True and fp16["loss_scale"] == 0  # dynamic loss scaling


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_stages_up_to_two(stage):
    assert deepspeed_config(**{**BASE, "zero_stage": stage})["zero_optimization"]["stage"] == stage


def test_zero3_refused_with_reason():
    with pytest.raises(ValueError, match=r"ZeRO stage 3 is not supported.*frozen"):
        deepspeed_config(**{**BASE, "zero_stage": 3})
    with pytest.raises(ValueError, match="extra.*ZeRO stage 3"):
        deepspeed_config(**BASE, extra={"zero_optimization": {"stage": 3}})


def test_extra_merges_but_cannot_contradict():
    cfg = deepspeed_config(**BASE, extra={"zero_optimization": {"overlap_comm": True}, "wall_clock_breakdown": True})
    assert cfg["zero_optimization"] == {"stage": 2, "overlap_comm": True}
    assert cfg["wall_clock_breakdown"] is True
    with pytest.raises(ValueError, match="train_batch_size"):
        deepspeed_config(**BASE, extra={"train_batch_size": 99})
    with pytest.raises(ValueError, match="optimizer"):
        deepspeed_config(**BASE, extra={"optimizer": {"type": "AdamW"}})
    with pytest.raises(ValueError, match="both bf16 and fp16"):
        deepspeed_config(**{**BASE, "precision": "fp16"}, extra={"bf16": {"enabled": True}})


@pytest.mark.parametrize(
    "bad", [{"micro_batch": 0}, {"grad_accum": 1.5}, {"world_size": True}, {"precision": "fp8"}, {"grad_clip": -1}]
)
def test_bad_arguments_named(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        deepspeed_config(**{**BASE, **bad})


# -- param groups -----------------------------------------------------------------------------------------------------
LRS = {"vision": 4e-4, "text": 5e-4}


def _build(cfg):
    from mope import build_model

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_model(cfg)


def _check_groups(model, groups):
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    grouped = [id(p) for g in groups for p in g["params"]]
    assert len(grouped) == len(set(grouped)), "a parameter is in two groups"
    assert set(grouped) == trainable
    assert all(g["params"] for g in groups), "empty group"
    names = {id(p): n for n, p in model.named_parameters()}
    for g in groups:
        assert g["lr"] == LRS[g["name"]] and g["weight_decay"] == 1e-3
        for p in g["params"]:
            assert modality_group(model.component_of(names[id(p)]), model.main_modality) == g["name"]


def test_mope_groups_vision_main():
    model = _build(tiny_cfg("mope"))
    groups = trainable_param_groups(model, LRS, weight_decay=1e-3)
    _check_groups(model, groups)
    assert [g["name"] for g in groups] == ["vision", "text"]
    names = {id(p): n for n, p in model.named_parameters()}
    comps = {g["name"]: {model.component_of(names[id(p)]) for p in g["params"]} for g in groups}
    # router, mapper and head train with the main (vision) modality, as in the reference's vision_classifier
    assert comps["vision"] == {"vision prompts", "router", "mapper", "head"}
    assert comps["text"] == {"text prompts"}
    optim = torch.optim.AdamW(groups)  # the groups are valid AdamW input
    assert [g["lr"] for g in optim.param_groups] == [4e-4, 5e-4]


@pytest.mark.parametrize("method", [m.value for m in Method if m != Method.MOPE])
def test_every_method_has_valid_groups(method):
    model = _build(tiny_cfg(method, vision=TINY_VIT))
    _check_groups(model, trainable_param_groups(model, LRS, weight_decay=1e-3))


def test_missing_lr_and_unknown_component():
    model = _build(tiny_cfg("mope"))
    with pytest.raises(ValueError, match="'text' group"):
        trainable_param_groups(model, {"vision": 1e-3}, weight_decay=0.0)
    with pytest.raises(ValueError, match="no optimizer group for model component 'gizmo'"):
        modality_group("gizmo", "vision")
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        trainable_param_groups(model, LRS, weight_decay=0.0)


def test_text_main_puts_router_and_head_in_text_group():
    import dataclasses

    model = _build(dataclasses.replace(tiny_cfg("mope"), main="text"))
    groups = trainable_param_groups(model, LRS, weight_decay=1e-3)
    _check_groups(model, groups)
    names = {id(p): n for n, p in model.named_parameters()}
    text = {model.component_of(names[id(p)]) for g in groups if g["name"] == "text" for p in g["params"]}
    assert {"text prompts", "router", "head"} <= text


FINE_TUNED = {
    "img_only": {"vision"},
    "text_only": {"text"},
    "late_concat": {"vision", "text"},
    "sequential_fuse": {"vision", "text"},
}


@pytest.mark.parametrize("trainer", ["demo", "paper"])
@pytest.mark.parametrize("method", [m.value for m in Method])
def test_each_method_composed_config_gives_fine_tuned_encoders_their_own_lr(method, trainer):
    """The lr a fine-tuned encoder trains at comes from the composed trainer config (no per-sweep patch): the demo
    profile slows the encoders down (full fine-tuning at 1e-3 collapsed), the paper profile keeps the reference's
    single lr per modality (mope-reference §3)."""
    from harness.compose import compose
    from harness.recipe import learning_rates

    tr = compose(["experiment=demo_mope", f"method={method}", f"trainer={trainer}"])["trainer"]
    lrs = learning_rates(tr)
    model = _build(tiny_cfg(method, vision=TINY_VIT))
    groups = trainable_param_groups(model, lrs, weight_decay=1e-3)
    names = {id(p): n for n, p in model.named_parameters()}
    by_name = {g["name"]: g for g in groups}
    assert {g.removesuffix("_encoder") for g in by_name if g.endswith("_encoder")} == FINE_TUNED.get(method, set())
    for g in groups:
        comps = {model.component_of(names[id(p)]) for p in g["params"]}
        if g["name"].endswith("_encoder"):
            modality = g["name"].removesuffix("_encoder")
            assert comps == {f"{modality} encoder"}
            expected = {"demo": {"vision": 1e-4, "text": 3e-5}, "paper": {"vision": 4e-4, "text": 5e-4}}[trainer]
            assert g["lr"] == expected[modality]
        else:
            assert not any(c.endswith(" encoder") for c in comps)
            assert g["lr"] == (1e-3 if trainer == "demo" else {"vision": 4e-4, "text": 5e-4}[g["name"]])


def test_lr_fields_are_type_checked():
    from harness.compose import ConfigValidationError, compose, validate

    for bad in ("trainer.lr_encoder_vision=-1", "trainer.lr_vision=abc", "trainer.lr_text=0"):
        with pytest.raises(ConfigValidationError, match=bad.split("=")[0].replace(".", r"\.")):
            validate(compose(["experiment=demo_mope", bad]), check_paths=False)
    validate(compose(["experiment=demo_mope", "trainer.lr_encoder_text=null"]), check_paths=False)
