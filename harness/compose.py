"""Hydra composition (compose API only: no @hydra.main, no chdir) and validation of one training configuration.

`compose(overrides)` returns the resolved config as a plain dict with absolute paths (Ray/Tune change the working
directory, architecture.md pitfall 11). `validate(cfg)` checks it without building anything heavy and raises
:class:`ConfigValidationError` naming the field and the fix. `fusion_config(cfg)` gives the typed model config.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from mope.config import ConfigError, EncoderConfig, FusionConfig, MoPEConfig


class ConfigValidationError(ValueError):
    """A composed configuration is not runnable; the message names the field and the fix."""


def compose(overrides: list[str] | tuple[str, ...] = (), config_name: str = "train") -> dict[str, Any]:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_module("harness.configs", version_base="1.3"):
            cfg = hydra_compose(config_name=config_name, overrides=list(overrides))
        plain = OmegaConf.to_container(cfg, resolve=True)
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigValidationError(f"cannot compose configuration from overrides {list(overrides)}: {e}") from e
    assert isinstance(plain, dict)
    paths = plain["paths"]
    for key in ("root", "data_root", "run_root"):
        paths[key] = str(Path(paths[key]).expanduser().resolve())
    plain["data"]["shard_dir"] = str(Path(plain["data"]["shard_dir"]).expanduser().resolve())
    for side in ("vision", "text"):
        w = plain[side].get("weights")
        if w:
            plain[side]["weights"] = str(Path(w).expanduser().resolve())
    plain["overrides"] = list(overrides)
    return plain


def fusion_config(cfg: dict[str, Any]) -> FusionConfig:
    """The typed model config from a composed config (raises ConfigError naming the field)."""
    model = dict(cfg["model"])
    return FusionConfig(
        method=cfg["method"]["name"],
        vision=EncoderConfig(**cfg["vision"]),
        text=EncoderConfig(**cfg["text"]),
        num_classes=int(cfg["data"]["num_classes"]),
        task=cfg["data"]["task"],
        mope=MoPEConfig(**cfg["mope"]),
        **model,
    )


def validate(cfg: dict[str, Any], *, check_paths: bool = True) -> FusionConfig:
    """Checks a composed configuration without building models or reading data."""
    try:
        fcfg = fusion_config(cfg)
    except ConfigError as e:
        raise ConfigValidationError(str(e)) from e
    except TypeError as e:  # unknown key in a group
        raise ConfigValidationError(f"unknown field in the model configuration: {e}") from e
    tr = cfg["trainer"]
    for key in ("epochs", "batch_size", "grad_accum"):
        if not isinstance(tr[key], int) or tr[key] < 1:
            raise ConfigValidationError(f"trainer.{key}={tr[key]!r} must be an integer >= 1")
    for key in ("lr_vision", "lr_text", "lr_encoder_vision", "lr_encoder_text"):
        v = tr.get(key)
        if v is None and key.startswith("lr_encoder"):
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
            hint = " or null (= the modality's lr)" if key.startswith("lr_encoder") else ""
            raise ConfigValidationError(f"trainer.{key}={v!r} must be a positive number{hint}, e.g. trainer.{key}=1e-4")
    if tr["precision"] not in ("fp32", "bf16", "fp16"):
        raise ConfigValidationError(f"trainer.precision={tr['precision']!r}: allowed values fp32, bf16, fp16")
    if sorted(tr["milestones"]) != list(tr["milestones"]):
        raise ConfigValidationError(f"trainer.milestones={tr['milestones']!r} must be increasing")
    if int(cfg["deepspeed"]["zero_stage"]) > 2:
        raise ConfigValidationError("deepspeed.zero_stage must be <= 2 (ZeRO-3 partitions the frozen encoders)")
    shots = cfg["data"].get("shots")
    if shots is not None and (not isinstance(shots, int) or shots < 1):
        raise ConfigValidationError(f"data.shots={shots!r} must be a positive integer (total training examples) or null")
    if check_paths:
        shard_dir = Path(cfg["data"]["shard_dir"])
        if not shard_dir.is_dir() and not cfg["data"].get("auto_prepare"):
            raise ConfigValidationError(
                f"data.shard_dir={shard_dir} does not exist: run `harness prep {cfg['data']['name']} --src RAW "
                f"--out {shard_dir}` or set data.shard_dir / MOPE_DATA_ROOT"
            )
        for side in ("vision", "text"):
            w = cfg[side].get("weights")
            auto = cfg["data"].get("auto_prepare") and str(w or "").startswith(str(shard_dir))
            if w and not Path(w).exists() and not auto:
                raise ConfigValidationError(f"{side}.weights={w} does not exist: point it at local weights or null")
    return fcfg


def main(argv: list[str] | None = None) -> int:
    """`harness validate [overrides...]`: compose + check one configuration and print the resolved model config."""
    import json
    import sys

    argv = list(argv or [])
    if argv and argv[0] in ("-h", "--help"):
        print("usage: harness validate [group=option | key=value ...]\n" + (__doc__ or ""))
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        cfg = compose(argv)
        fcfg = validate(cfg)
    except ConfigValidationError as e:
        print(f"harness validate: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"run_name": cfg["run_name"], "model": fcfg.to_dict(), "trainer": cfg["trainer"],
                      "data": cfg["data"]}, indent=2))
    print("configuration OK", file=sys.stderr)
    return 0
