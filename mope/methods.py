"""The paper's methods as configurations of the same parts (mope-reference §4).

Each :class:`MethodSpec` states explicitly which prompt kinds the main encoder gets, whether the complementary encoder
is used / prompt-tuned / fine-tuned, whether the main encoder is fine-tuned, and what the head reads. No flag changes
a method's trainable set behind the user's back (the reference's `--train_instructor` does).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from mope.config import FusionConfig, Method, MoPEConfig, tunable_prompts_per_layer


@dataclass(frozen=True)
class MethodSpec:
    use_main: bool = True  # main encoder present
    main_prompts: tuple[str, ...] = ()  # subset of ("static", "dynamic", "mapped")
    prompt_len_from: str = "mope"  # mope: l from cfg.mope | baseline: cfg.baseline_prompt_len | vanilla: L-1
    prompt_depth: str = "deep"
    use_comp: bool = True
    comp_prompt_len_from: str | None = "comp"  # comp: cfg.comp_prompt_len | baseline: cfg.baseline_prompt_len | None
    train_main: bool = False
    train_comp: bool = False
    head_input: str = "main"  # main | comp | concat
    summary: str = ""


METHODS: dict[Method, MethodSpec] = {
    Method.MOPE: MethodSpec(
        main_prompts=("static", "dynamic", "mapped"),
        summary="MoPE: [P_s, P_d, P_m] per block, frozen encoders, complementary deep prompts l'",
    ),
    Method.VANILLA_PROMPT: MethodSpec(
        main_prompts=("static", "mapped"),
        prompt_len_from="vanilla",
        summary="Fig. 4 length-scaling arm: [P_s(L-1), P_m], L=(k+1)·l+1 tunable prompts per layer",
    ),
    Method.IMG_ONLY: MethodSpec(use_comp=False, comp_prompt_len_from=None, train_main=True, summary="main fine-tuned"),
    Method.TEXT_ONLY: MethodSpec(
        use_main=False, comp_prompt_len_from=None, train_comp=True, head_input="comp", summary="complementary FT"
    ),
    Method.LATE_CONCAT: MethodSpec(
        comp_prompt_len_from=None, train_main=True, train_comp=True, head_input="concat", summary="both FT, concat"
    ),
    Method.SEQUENTIAL_FUSE: MethodSpec(
        main_prompts=("static", "mapped"),
        prompt_len_from="baseline",
        comp_prompt_len_from=None,
        train_main=True,
        train_comp=True,
        summary="paper's SequentialFuse (FT): [P_s, P_m] in the main encoder, both encoders fine-tuned",
    ),
    Method.P_IMG_ONLY: MethodSpec(
        main_prompts=("static",), prompt_len_from="baseline", use_comp=False, comp_prompt_len_from=None
    ),
    Method.P_TEXT_ONLY: MethodSpec(use_main=False, comp_prompt_len_from="baseline", head_input="comp"),
    Method.P_LATE_CONCAT: MethodSpec(
        main_prompts=("static",), prompt_len_from="baseline", comp_prompt_len_from="baseline", head_input="concat"
    ),
    Method.P_SEQUENTIAL_FUSE: MethodSpec(
        main_prompts=("static", "mapped"), prompt_len_from="baseline", summary="[P_s, P_m], no experts (Table 2 row)"
    ),
    Method.PROMPTFUSE: MethodSpec(
        main_prompts=("static", "mapped"),
        prompt_len_from="baseline",
        prompt_depth="shallow",
        comp_prompt_len_from=None,
        summary="PromptFuse† (prefix style): input-layer prompts, complementary encoder a frozen black box",
    ),
}


def main_prompt_config(cfg: FusionConfig) -> MoPEConfig | None:
    """The MoPEConfig actually used for the main encoder's prompts under cfg.method (None: no prompts)."""
    spec = METHODS[cfg.method]
    if not spec.main_prompts:
        return None
    m = cfg.mope
    kinds = set(spec.main_prompts)
    if cfg.method == Method.MOPE:  # MoPE keeps the Table-2 ablation switches of cfg.mope
        return m
    length = {"mope": m.prompt_len, "baseline": cfg.baseline_prompt_len}.get(spec.prompt_len_from)
    if spec.prompt_len_from == "vanilla":
        total = cfg.vanilla_prompt_len or tunable_prompts_per_layer(m.num_experts, m.prompt_len)
        length = total - (1 if "mapped" in kinds else 0)
    return dataclasses.replace(
        m,
        use_static="static" in kinds,
        use_dynamic="dynamic" in kinds,
        use_mapped="mapped" in kinds,
        prompt_len=length,
        static_len=length,
        prompt_depth=spec.prompt_depth,
    )


def comp_prompt_len(cfg: FusionConfig) -> int:
    spec = METHODS[cfg.method]
    if spec.comp_prompt_len_from == "comp":
        return cfg.comp_prompt_len
    if spec.comp_prompt_len_from == "baseline":
        return cfg.baseline_prompt_len
    return 0


def reads_complementary(cfg: FusionConfig) -> bool:
    """True when the forward pass reads the complementary feature ψ: the head reads it, or the main prompts route on
    it (dynamic prompts with d_cross > 0) or map it (mapped prompts). When False, no complementary encoder or prompts
    are built (Table-2 row [P_s]: nothing would ever give them a gradient, and they would inflate the parameter count).
    """
    spec = METHODS[cfg.method]
    if not spec.use_comp:
        return False
    if spec.head_input in ("comp", "concat"):
        return True
    pcfg = main_prompt_config(cfg)
    if pcfg is None:
        return False
    return bool(pcfg.use_mapped or (pcfg.use_dynamic and pcfg.d_cross > 0))
