"""DeepSpeed configuration and AdamW parameter groups for one MoPE training run.

MoPE (arXiv 2403.10568) tunes prompts, a router, a mapper and a head on top of frozen encoders; the reference
implementation (songrise/MoPE, ``main_classify.py``) trains them with AdamW in two groups: the vision side at lr 4e-4
and the text side at lr 5e-4, weight decay 1e-3 for both (``shared/docs/mope-reference.md`` §3).

Rules followed here (``shared/docs/architecture.md`` pitfalls 3 and 4):

* ``train_batch_size`` is always derived as micro × accumulation × world size, never written by hand.
* ZeRO stage ≤ 2 only (see :data:`MAX_ZERO_STAGE`).
* No ``optimizer``/``scheduler`` section: the worker builds torch ``AdamW`` + ``MultiStepLR`` and passes them to
  ``deepspeed.initialize(optimizer=..., lr_scheduler=...)``; DeepSpeed refuses a config optimizer *and* a client one.
* Only trainable parameters reach DeepSpeed, and never an empty parameter group.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from typing import Any, Literal

from torch import nn

Precision = Literal["fp32", "bf16", "fp16"]
PRECISIONS = ("fp32", "bf16", "fp16")
MAX_ZERO_STAGE = 2
# DeepSpeed prints a throughput line every `steps_per_print` steps; we log through MLflow instead.
STEPS_PER_PRINT = 2**31 - 1
# Keys the worker passes as torch objects: a config section would make deepspeed.initialize raise.
_FORBIDDEN_KEYS = ("optimizer", "scheduler")

_ZERO3_WHY = (
    "ZeRO stage 3 partitions the parameters themselves, including the frozen encoders: prompt initialisation from the "
    "encoders' embeddings then sees empty `ds_shape` placeholders (peft#996), every eval forward runs parameter "
    "all-gathers, and frozen layers are the known failure mode of ZeRO with partial training (DeepSpeed#4055). MoPE "
    "only trains prompts/router/head, whose optimizer state ZeRO-2 already shards; use zero_stage 0, 1 or 2 "
    "(architecture.md pitfall 3)."
)


def deepspeed_config(
    *,
    micro_batch: int,
    grad_accum: int,
    world_size: int,
    precision: Precision,
    zero_stage: int,
    grad_clip: float,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Builds the DeepSpeed config dict for one run.

    Args:
        micro_batch: samples per rank per forward (``train_micro_batch_size_per_gpu``).
        grad_accum: micro-batches accumulated per optimizer step.
        world_size: number of data-parallel ranks (the trial's ``workers_per_trial``).
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"`` (fp16 with dynamic loss scaling).
        zero_stage: 0, 1 or 2. Stage 3 is refused (see the error message for why).
        grad_clip: global gradient-norm clip; 0 disables clipping (DeepSpeed's convention).
        extra: deep-merged over the result (e.g. ``{"zero_optimization": {"overlap_comm": True}}``). It may not set
            the batch-size keys to values that contradict the arguments, may not raise the ZeRO stage above 2, and
            may not add an optimizer or scheduler section.

    Returns:
        A plain dict for ``deepspeed.initialize(config=...)``.

    Raises:
        ValueError: naming the bad argument and the fix.
    """
    for name, value in (("micro_batch", micro_batch), ("grad_accum", grad_accum), ("world_size", world_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if grad_clip is None or grad_clip < 0:
        raise ValueError(f"grad_clip must be >= 0 (0 disables clipping), got {grad_clip!r}")
    _check_zero_stage(zero_stage)

    cfg: dict[str, Any] = {
        "train_batch_size": micro_batch * grad_accum * world_size,
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": float(grad_clip),
        "steps_per_print": STEPS_PER_PRINT,
        "wall_clock_breakdown": False,
        "zero_optimization": {"stage": zero_stage},
    }
    if precision == "bf16":
        cfg["bf16"] = {"enabled": True}
    elif precision == "fp16":
        # Dynamic loss scaling (loss_scale 0), DeepSpeed's documented defaults spelled out so they are logged.
        cfg["fp16"] = {
            "enabled": True,
            "loss_scale": 0,
            "initial_scale_power": 16,
            "loss_scale_window": 1000,
            "hysteresis": 2,
            "min_loss_scale": 1,
        }
    if extra:
        bad = [k for k in _FORBIDDEN_KEYS if k in extra]
        if bad:
            raise ValueError(
                f"extra must not contain {bad}: the worker passes torch optimizer/scheduler objects to "
                "deepspeed.initialize, and DeepSpeed refuses both at once"
            )
        cfg = _deep_merge(cfg, extra)
        _check_zero_stage(cfg.get("zero_optimization", {}).get("stage", 0), where="extra['zero_optimization']")
        expected = {
            "train_batch_size": micro_batch * grad_accum * world_size,
            "train_micro_batch_size_per_gpu": micro_batch,
            "gradient_accumulation_steps": grad_accum,
        }
        clash = {k: cfg[k] for k, v in expected.items() if cfg[k] != v}
        if clash:
            raise ValueError(
                f"extra sets {clash}, which contradicts micro_batch={micro_batch} × grad_accum={grad_accum} × "
                f"world_size={world_size}; set the batch through those arguments instead (pitfall 4)"
            )
        if cfg.get("bf16", {}).get("enabled") and cfg.get("fp16", {}).get("enabled"):
            raise ValueError("extra enables both bf16 and fp16; choose one through `precision`")
    return cfg


def _check_zero_stage(stage: Any, where: str = "zero_stage") -> None:
    if isinstance(stage, bool) or not isinstance(stage, int) or stage < 0:
        raise ValueError(f"{where}: ZeRO stage must be an int in 0..{MAX_ZERO_STAGE}, got {stage!r}")
    if stage > MAX_ZERO_STAGE:
        raise ValueError(f"{where}: ZeRO stage {stage} is not supported. {_ZERO3_WHY}")


def _deep_merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(dict(base))
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


# -- parameter groups -------------------------------------------------------------------------------------------------
def modality_group(component: str, main_modality: str) -> str:
    """Maps a :meth:`mope.model.FusionModel.component_of` name to its optimizer group, ``"vision"`` or ``"text"``.

    Mapping (the reference's ``vision_classifier``/``text_classifier`` split, mope-reference §3):

    * ``"vision prompts"``, ``"vision encoder"`` → ``"vision"``; ``"text prompts"``, ``"text encoder"`` → ``"text"``
      (the encoders only appear when a method fine-tunes them).
    * ``"router"``, ``"mapper"``, ``"head"`` → the *main* modality's group: in the reference they live inside the
      main (vision) classifier module and train at its lr.

    Raises:
        ValueError: for a component this mapping does not know, so a new trainable part gets placed deliberately.
    """
    modality, _, _ = component.partition(" ")
    if modality in ("vision", "text"):
        return modality
    if component in ("router", "mapper", "head"):
        if main_modality not in ("vision", "text"):
            raise ValueError(f"main modality must be 'vision' or 'text', got {main_modality!r}")
        return main_modality
    raise ValueError(
        f"no optimizer group for model component {component!r}: extend harness.ds_config.modality_group "
        "(components: '<modality> prompts', '<modality> encoder', 'router', 'mapper', 'head')"
    )


def trainable_param_groups(
    model: nn.Module, lr_by_group: Mapping[str, float], weight_decay: float
) -> list[dict[str, Any]]:
    """AdamW parameter groups over the model's *trainable* parameters only, one group per modality.

    Args:
        model: a :class:`mope.model.FusionModel` (anything with ``component_of(name)`` and ``main_modality``).
        lr_by_group: learning rate per group, e.g. ``{"vision": 4e-4, "text": 5e-4}`` (the reference's values).
            Every group that has trainable parameters needs an entry; extra entries are ignored. Optional
            ``"vision_encoder"`` / ``"text_encoder"`` entries put a fine-tuned encoder's own weights (component
            ``"<modality> encoder"``) in a group of their own at that lr; without them they share the modality's group.
        weight_decay: applied to every group (the reference uses 1e-3 for both).

    Returns:
        ``[{"name": group, "params": [...], "lr": lr, "weight_decay": wd}, ...]`` in a fixed order (vision,
        vision_encoder, text, text_encoder),
        with no empty group. Parameter order inside a group follows ``model.named_parameters()``, so the optimizer
        state of a resumed run lines up.

    Raises:
        ValueError: no trainable parameters, or a group without a learning rate.
    """
    main = getattr(model, "main_modality", None)
    by_group: dict[str, list[nn.Parameter]] = {"vision": [], "vision_encoder": [], "text": [], "text_encoder": []}
    for name, p in model.named_parameters():
        if p.requires_grad:
            component = model.component_of(name)
            group = modality_group(component, main)
            if component.endswith(" encoder") and f"{group}_encoder" in lr_by_group:
                group = f"{group}_encoder"  # a fine-tuned encoder's own weights at their own lr
            by_group[group].append(p)
    groups = []
    for group, params in by_group.items():
        if not params:
            continue  # an empty group breaks ZeRO stage 1/2 (pitfall 3)
        if group not in lr_by_group:
            raise ValueError(
                f"lr_by_group has no learning rate for the {group!r} group ({sum(p.numel() for p in params)} "
                f"trainable parameters); got keys {sorted(lr_by_group)}"
            )
        groups.append({"name": group, "params": params, "lr": float(lr_by_group[group]), "weight_decay": weight_decay})
    if not groups:
        raise ValueError(
            "the model has no trainable parameters: nothing to optimize (check the method's trainable set)"
        )
    return groups


def trainable_parameters(groups: Iterable[Mapping[str, Any]]) -> list[nn.Parameter]:
    """The flat parameter list of `groups` (for counting and for gradient clipping outside DeepSpeed)."""
    return [p for g in groups for p in g["params"]]
