"""Typed configuration of MoPE and of the fusion baselines.

Every switch of mope-reference.md §8 is a field here. Where the paper (arXiv 2403.10568 v1) and the official code
(songrise/MoPE @ b63f9db) disagree, the default follows §8 and the other behaviour is a named value. Library code takes
these dataclasses; only `harness/` knows about YAML/Hydra.

A bad value raises :class:`ConfigError` naming the field, the value and the allowed values.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

CONFIG_VERSION = 1


class ConfigError(ValueError):
    """A configuration field holds a value that is not allowed."""


class _StrEnum(str, Enum):
    def __str__(self) -> str:  # pragma: no cover - cosmetic
        return self.value


class RouterNoise(_StrEnum):
    VMOE = "vmoe"  # paper's [36] (V-MoE): N(0, (1/k)^2), training only
    REFERENCE = "reference"  # official code: std 1/256 (1/16^2), train AND eval
    OFF = "off"


class Routing(_StrEnum):
    DENSE = "dense"  # softmax weights (default, paper + code)
    TOP1_SCALED = "top1_scaled"  # paper Table 3 (V-MoE Top-1): r * onehot(argmax r), router keeps a gradient
    TOP1_HARD = "top1_hard"  # official code's sparse artefact: onehot(argmax r), router gets no gradient


class RoutingKeys(_StrEnum):
    FROZEN_ORTHOGONAL = "frozen_orthogonal"
    LEARNED = "learned"  # Table 4


class WindowPromptLayout(_StrEnum):
    CORRECT = "correct"  # batch-major duplication of prompts into windows
    REFERENCE = "reference"  # official code's window-major layout: prompts leak across samples (§1.7.5)


class MapperBN(_StrEnum):
    FROZEN_STATS = "frozen_stats"  # reference: BN always in eval mode, running stats stay (0, 1)
    BATCH = "batch"  # paper: batch statistics in training


class PromptDropoutTargets(_StrEnum):
    MAPPED_SHALLOW = "mapped+shallow"  # reference
    ALL = "all"  # paper text: dropout on all prompts


class PromptInit(_StrEnum):
    UNIFORM = "uniform"  # VPT rule, uniform(-s, s) with s = sqrt(6 / (3 * patch_area + embed_dim))
    NORMAL = "normal"  # trunc-normal, std 1 (reference flag value)


class Method(_StrEnum):
    """The paper's methods, each a configuration of the same parts (see mope.methods)."""

    MOPE = "mope"
    VANILLA_PROMPT = "vanilla_prompt"  # length-scaling arm of Fig. 4: [P_s(L-1), P_m], no experts
    IMG_ONLY = "img_only"
    TEXT_ONLY = "text_only"
    LATE_CONCAT = "late_concat"
    SEQUENTIAL_FUSE = "sequential_fuse"
    P_IMG_ONLY = "p_img_only"
    P_TEXT_ONLY = "p_text_only"
    P_LATE_CONCAT = "p_late_concat"
    P_SEQUENTIAL_FUSE = "p_sequential_fuse"
    PROMPTFUSE = "promptfuse"


class Task(_StrEnum):
    SINGLE_LABEL = "single_label"  # CE, accuracy
    MULTI_LABEL = "multi_label"  # BCE-with-logits, F1 macro/micro at sigmoid > 0.5
    SEGMENTATION = "segmentation"  # referring segmentation: a mask per sample, BCE + Dice, mIoU / oIoU


SEG_LOSSES = ("bce_dice", "bce")


X0_POOL_VALUES = ("auto", "mean_all_tokens", "cls", "mean_patches")
MODALITIES = ("vision", "text", "audio", "video")


def _coerce_enum(owner: str, name: str, value: Any, enum: type[Enum]) -> Enum:
    if isinstance(value, enum):
        return value
    try:
        return enum(value)
    except ValueError:
        allowed = ", ".join(repr(m.value) for m in enum)  # type: ignore[attr-defined]
        raise ConfigError(f"{owner}.{name}={value!r} is not allowed; allowed values: {allowed}") from None


def _check(cond: bool, owner: str, name: str, value: Any, need: str) -> None:
    if not cond:
        raise ConfigError(f"{owner}.{name}={value!r} is invalid: {need}")


@dataclass
class MoPEConfig:
    """Prompt/router/mapper settings of the main encoder (mope-reference §1, §8)."""

    num_experts: int = field(default=16, metadata={"help": "k, experts per routed block (paper default 16)"})
    prompt_len: int = field(default=6, metadata={"help": "l, length of each expert (and of the static prompt)"})
    static_len: int | None = field(default=None, metadata={"help": "static prompt length; None = prompt_len"})
    d_cross: int = field(default=8, metadata={"help": "router query width from the complementary feature (W_y)"})
    d_inter: int = field(default=2, metadata={"help": "router query width from the main block input (W_x)"})
    tau: float = field(default=0.1, metadata={"help": "router temperature"})
    router_noise: RouterNoise = field(default=RouterNoise.VMOE, metadata={"help": "vmoe | reference | off"})
    x0_pool: str = field(default="auto", metadata={"help": "router x_0: auto (Swin mean_all_tokens, ViT/BERT cls)"})
    routing: Routing = field(default=Routing.DENSE, metadata={"help": "dense | top1_scaled | top1_hard"})
    routing_keys: RoutingKeys = field(default=RoutingKeys.FROZEN_ORTHOGONAL)
    use_static: bool = True
    use_dynamic: bool = True
    use_mapped: bool = True
    window_prompt_layout: WindowPromptLayout = WindowPromptLayout.CORRECT
    mapper_bn: MapperBN = MapperBN.FROZEN_STATS
    mapper_bottleneck: int | None = field(default=None, metadata={"help": "None = complementary dim // 2"})
    mapper_up_groups: int = field(default=3, metadata={"help": "up-projections for single-width encoders"})
    mapper_up_gelu: bool = field(default=True, metadata={"help": "reference's GELU after the up-projection"})
    prompt_dropout: float = 0.1
    prompt_dropout_targets: PromptDropoutTargets = PromptDropoutTargets.MAPPED_SHALLOW
    route_block0: bool | None = field(
        default=None,
        metadata={"help": "route the first block of each stage; None = encoder default (Swin False, ViT/BERT True)"},
    )
    prompt_depth: str = field(default="deep", metadata={"help": "deep (every block) | shallow (input layer only)"})
    pool_includes_prompts: bool = field(default=True, metadata={"help": "Swin: final mean includes prompt tokens"})
    prompt_init: PromptInit = PromptInit.UNIFORM
    prompt_init_scale: float | None = field(default=None, metadata={"help": "None = the encoder's VPT value"})
    imp_loss_weight: float = field(default=0.01, metadata={"help": "w_imp (Fig. 7 compares 0.01 vs 0)"})
    imp_loss_threshold: float = field(default=0.1, metadata={"help": "gamma, compared with CV^2"})

    def __post_init__(self) -> None:
        o = "mope"
        self.router_noise = _coerce_enum(o, "router_noise", self.router_noise, RouterNoise)
        self.routing = _coerce_enum(o, "routing", self.routing, Routing)
        self.routing_keys = _coerce_enum(o, "routing_keys", self.routing_keys, RoutingKeys)
        self.window_prompt_layout = _coerce_enum(
            o, "window_prompt_layout", self.window_prompt_layout, WindowPromptLayout
        )
        self.mapper_bn = _coerce_enum(o, "mapper_bn", self.mapper_bn, MapperBN)
        self.prompt_dropout_targets = _coerce_enum(
            o, "prompt_dropout_targets", self.prompt_dropout_targets, PromptDropoutTargets
        )
        self.prompt_init = _coerce_enum(o, "prompt_init", self.prompt_init, PromptInit)
        _check(self.x0_pool in X0_POOL_VALUES, o, "x0_pool", self.x0_pool, f"one of {X0_POOL_VALUES}")
        _check(self.prompt_depth in ("deep", "shallow"), o, "prompt_depth", self.prompt_depth, "'deep' or 'shallow'")
        if self.use_dynamic:
            _check(self.num_experts >= 1, o, "num_experts", self.num_experts, "must be >= 1")
        _check(self.prompt_len >= 0, o, "prompt_len", self.prompt_len, "must be >= 0")
        if self.static_len is not None:
            _check(self.static_len >= 0, o, "static_len", self.static_len, "must be >= 0 or null")
        _check(self.d_cross >= 0 and self.d_inter >= 0, o, "d_cross/d_inter", (self.d_cross, self.d_inter), ">= 0")
        if self.use_dynamic:
            _check(self.d_cross + self.d_inter >= 1, o, "d_cross+d_inter", self.d_cross + self.d_inter, ">= 1")
        _check(self.tau > 0, o, "tau", self.tau, "must be > 0")
        _check(0.0 <= self.prompt_dropout < 1.0, o, "prompt_dropout", self.prompt_dropout, "in [0, 1)")
        _check(self.mapper_up_groups >= 1, o, "mapper_up_groups", self.mapper_up_groups, ">= 1")
        _check(self.imp_loss_weight >= 0, o, "imp_loss_weight", self.imp_loss_weight, ">= 0")
        _check(self.imp_loss_threshold >= 0, o, "imp_loss_threshold", self.imp_loss_threshold, ">= 0")

    @property
    def static_tokens(self) -> int:
        if not self.use_static:
            return 0
        return self.prompt_len if self.static_len is None else self.static_len

    @property
    def dynamic_tokens(self) -> int:
        return self.prompt_len if self.use_dynamic else 0

    @property
    def mapped_tokens(self) -> int:
        return 1 if self.use_mapped else 0

    @property
    def num_prompts(self) -> int:
        """Prompt tokens in the attention sequence of each prompted block (2l+1 for full MoPE)."""
        return self.static_tokens + self.dynamic_tokens + self.mapped_tokens

    @property
    def tunable_prompts_per_layer(self) -> int:
        """Fig. 4's x-axis: static + k experts + mapped = (k+1)·l+1 for full MoPE."""
        return tunable_prompts_per_layer(
            self.num_experts,
            self.prompt_len,
            self.static_len,
            use_static=self.use_static,
            use_dynamic=self.use_dynamic,
            use_mapped=self.use_mapped,
        )


def tunable_prompts_per_layer(
    num_experts: int,
    prompt_len: int,
    static_len: int | None = None,
    *,
    use_static: bool = True,
    use_dynamic: bool = True,
    use_mapped: bool = True,
) -> int:
    """Tunable prompt tokens per prompted layer, Fig. 4's x-axis: static + k experts of length l + mapped, i.e.
    ``(k+1)·l+1`` for full MoPE (``static_len`` None = l). The one formula: :class:`MoPEConfig`, the vanilla
    prompt's matched default length (``mope.methods``), the sweep expression ``tunable_prompts(k, l)`` and the
    report's x-axis all call it."""
    static = (prompt_len if static_len is None else static_len) if use_static else 0
    experts = num_experts * prompt_len if use_dynamic else 0
    return int(static + experts + (1 if use_mapped else 0))


@dataclass
class EncoderConfig:
    """How to build one frozen encoder without downloading anything.

    kind: timm_vit | timm_swin (timm models, `name` a timm model name) | hf_bert (transformers BertModel; `name` a
    local dir, 'minilm' (offline package) or 'bert-base-uncased' (random init from the BERT-base config)) | hf_wav2vec2
    (transformers Wav2Vec2Model audio encoder; `name` a local dir or 'wav2vec2-base' / 'facebook/wav2vec2-base-960h'
    (random init from the base config); `kwargs` Wav2Vec2Config overrides).
    weights: local file/dir with pretrained weights (safetensors); None = random init (architecture only).
    """

    kind: str = "timm_vit"
    name: str = "vit_base_patch16_224"
    weights: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)  # timm create_model kwargs / BertConfig overrides
    pool: str = "cls"  # hf_bert: cls | pooler | mean

    def __post_init__(self) -> None:
        kinds = ("timm_vit", "timm_swin", "hf_bert", "hf_wav2vec2")
        _check(self.kind in kinds, "encoder", "kind", self.kind, f"one of {kinds}")
        _check(self.pool in ("cls", "pooler", "mean"), "encoder", "pool", self.pool, "cls | pooler | mean")


@dataclass
class FusionConfig:
    """A whole model: which method, which encoders, which task."""

    method: Method = Method.MOPE
    vision: EncoderConfig = field(default_factory=EncoderConfig)
    text: EncoderConfig = field(default_factory=lambda: EncoderConfig(kind="hf_bert", name="bert-base-uncased"))
    audio: EncoderConfig | None = field(
        default=None, metadata={"help": "audio encoder (kind hf_wav2vec2); None = no audio modality"}
    )
    video: EncoderConfig | None = field(
        default=None,
        metadata={"help": "per-frame encoder of the video modality (a timm vision encoder, mean over frames)"},
    )
    main: str = field(default="vision", metadata={"help": "main (prompted) modality: vision | text"})
    complementary: list[str] | None = field(
        default=None,
        metadata={
            "help": "complementary modalities whose features, concatenated in this order, form psi; None = the "
            "other of vision/text. Several (e.g. [audio, video] into a text-main MoPE, MUStARD) are frozen "
            "black boxes"
        },
    )
    num_classes: int = 101
    task: Task = Task.SINGLE_LABEL
    mope: MoPEConfig = field(default_factory=MoPEConfig)
    comp_prompt_len: int = field(default=4, metadata={"help": "l' deep prompts of the complementary BERT (0 = none)"})
    comp_prompt_init_scale: float = 0.3
    comp_prompt_dropout: float = 0.1
    comp_tuned: bool = field(default=True, metadata={"help": "train the complementary prompts (--train_instructor)"})
    baseline_prompt_len: int = field(default=6, metadata={"help": "l for prompt baselines (paper: 6)"})
    vanilla_prompt_len: int | None = field(
        default=None, metadata={"help": "L for vanilla_prompt; None = (k+1)·l+1 from mope.num_experts/prompt_len"}
    )
    seg_channels: int = field(
        default=256, metadata={"help": "task segmentation: width of the SETR-PUP head's convolutions (SETR: 256)"}
    )
    seg_num_convs: int | None = field(
        default=None,
        metadata={
            "help": "SETR-PUP conv + x2-upsampling stages; None = log2(patch stride), so the mask comes out at the "
            "input resolution (ViT/16: 4 as SETR, Swin/32: 5, the demo ViT/4: 2)"
        },
    )
    seg_loss: str = field(default="bce_dice", metadata={"help": "bce_dice (BCE + Dice, equal weights) | bce"})
    seg_dice_weight: float = field(default=1.0, metadata={"help": "weight of the Dice term in bce_dice"})

    def __post_init__(self) -> None:
        self.method = _coerce_enum("model", "method", self.method, Method)
        self.task = _coerce_enum("model", "task", self.task, Task)
        if isinstance(self.vision, dict):
            self.vision = EncoderConfig(**self.vision)
        if isinstance(self.text, dict):
            self.text = EncoderConfig(**self.text)
        if isinstance(self.mope, dict):
            self.mope = MoPEConfig(**self.mope)
        for name in ("audio", "video"):
            if isinstance(getattr(self, name), dict):
                setattr(self, name, EncoderConfig(**getattr(self, name)))
        _check(self.main in ("vision", "text"), "model", "main", self.main, "'vision' or 'text'")
        comp = self.complementary_modalities
        _check(
            len(comp) >= 1 and len(set(comp)) == len(comp) and self.main not in comp,
            "model",
            "complementary",
            self.complementary,
            f"distinct modalities other than the main one ({self.main!r})",
        )
        for m in comp:
            _check(m in MODALITIES, "model", "complementary", self.complementary, f"each one of {MODALITIES}")
            _check(
                getattr(self, m) is not None,
                "model",
                "complementary",
                self.complementary,
                f"{m!r} needs its encoder config (e.g. {m}={'wav2vec2_base' if m == 'audio' else 'vit_b16'})",
            )
        if self.video is not None:
            _check(
                self.video.kind in ("timm_vit", "timm_swin"),
                "video",
                "kind",
                self.video.kind,
                "a timm vision encoder (timm_vit | timm_swin) run on every frame",
            )
        if self.audio is not None:
            _check(self.audio.kind == "hf_wav2vec2", "audio", "kind", self.audio.kind, "'hf_wav2vec2'")
        _check(self.num_classes >= 1, "model", "num_classes", self.num_classes, ">= 1")
        _check(self.seg_loss in SEG_LOSSES, "model", "seg_loss", self.seg_loss, f"one of {SEG_LOSSES}")
        _check(self.seg_channels >= 1, "model", "seg_channels", self.seg_channels, ">= 1")
        if self.seg_num_convs is not None:
            _check(self.seg_num_convs >= 1, "model", "seg_num_convs", self.seg_num_convs, ">= 1 or null")
        _check(self.seg_dice_weight >= 0, "model", "seg_dice_weight", self.seg_dice_weight, ">= 0")
        if self.task == Task.SEGMENTATION:
            from mope.methods import METHODS

            spec = METHODS[self.method]
            _check(
                self.main == "vision" and spec.use_main and spec.head_input == "main",
                "model",
                "method",
                self.method.value,
                "task segmentation puts a dense head on the main vision encoder's patch tokens: use model.main=vision "
                "and a method whose head reads the main encoder (mope, sequential_fuse, p_sequential_fuse, "
                "vanilla_prompt, img_only, p_img_only, promptfuse)",
            )
        _check(self.comp_prompt_len >= 0, "model", "comp_prompt_len", self.comp_prompt_len, ">= 0")

    @property
    def complementary_modalities(self) -> list[str]:
        """The complementary modalities, in psi's order (default: the other of vision/text)."""
        if self.complementary is None:
            return ["text" if self.main == "vision" else "vision"]
        return [str(m) for m in self.complementary]

    # -- serialisation ---------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = _to_plain(dataclasses.asdict(self))
        d["config_version"] = CONFIG_VERSION
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FusionConfig:
        """Builds from a plain dict; unknown keys raise (a typo must not silently fall back to a default)."""
        d = dict(d)
        d.pop("config_version", None)
        return _build(cls, d, "model")


def _to_plain(x: Any) -> Any:
    if isinstance(x, Enum):
        return x.value
    if isinstance(x, dict):
        return {k: _to_plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_to_plain(v) for v in x]
    return x


def _build(cls: type, d: dict[str, Any], owner: str) -> Any:
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(names))
    if unknown:
        raise ConfigError(f"{owner}: unknown field(s) {unknown}; known fields: {sorted(names)}")
    kwargs: dict[str, Any] = {}
    nested = {
        "vision": EncoderConfig,
        "text": EncoderConfig,
        "audio": EncoderConfig,
        "video": EncoderConfig,
        "mope": MoPEConfig,
    }
    for k, v in d.items():
        if k in nested and isinstance(v, dict) and cls is FusionConfig:
            kwargs[k] = _build(nested[k], v, f"{owner}.{k}")
        else:
            kwargs[k] = v
    return cls(**kwargs)
