"""Hydra composition (compose API only: no @hydra.main, no chdir) and validation of one training configuration.

`compose(overrides)` returns the resolved config as a plain dict with absolute paths (Ray/Tune change the working
directory, architecture.md pitfall 11). `validate(cfg)` checks it without building anything heavy and raises
:class:`ConfigValidationError` naming the field and the fix. `fusion_config(cfg)` gives the typed model config.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from mope.config import ConfigError, EncoderConfig, FusionConfig, MoPEConfig


class ConfigValidationError(ValueError):
    """A composed configuration is not runnable; the message names the field and the fix."""


# The model's defaults live once, in the dataclasses of mope.config; Hydra sees them as the config node
# `model_defaults` (first in train.yaml's defaults list), so the YAML carries only what differs or is swept and
# `mope.num_experts=8` still overrides an existing key.
_NESTED_MODEL_FIELDS = ("method", "vision", "text", "audio", "video", "num_classes", "task", "mope")


def dataclass_defaults(cls: type, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """``{field: default}`` of a config dataclass as plain YAML values (enums as their values)."""
    import enum

    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        if f.default is not dataclasses.MISSING:
            v = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            v = f.default_factory()  # type: ignore[misc]
        else:
            continue
        out[f.name] = v.value if isinstance(v, enum.Enum) else v
    return out


def _register_model_defaults() -> None:
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(
        name="model_defaults",
        node={
            "model": dataclass_defaults(FusionConfig, skip=_NESTED_MODEL_FIELDS),
            "mope": dataclass_defaults(MoPEConfig),
        },
    )


def _absolute(path: Any) -> str:
    """A local path made absolute (Ray / Tune change the working directory); a URL (``s3://...``) kept as given."""
    from mope_data.format import is_url

    return str(path).rstrip("/") if is_url(path) else str(Path(path).expanduser().resolve())


def _remote_exists(key: str, url: str, what: str) -> None:
    """``url`` must exist on its store; a ConfigValidationError naming the URL and the fix otherwise."""
    from mope_data.format import ShardFormatError, exists, is_file

    try:
        ok = is_file(url) if what == "file" else exists(url)
    except ShardFormatError as e:
        raise ConfigValidationError(f"{key}: {e}") from None
    if not ok:
        fix = (
            "upload the shards with `harness prep NAME ... --out <the dataset URL>` (or fix the URL / "
            "AWS_ENDPOINT_URL)"
            if what == "file"
            else "upload the weights directory there (config.json + model.safetensors) or point it at local weights"
        )
        raise ConfigValidationError(f"{key}: {url} does not exist on its object store / server: {fix}")


def compose(overrides: list[str] | tuple[str, ...] = (), config_name: str = "train") -> dict[str, Any]:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    _register_model_defaults()
    try:
        with initialize_config_module("harness.configs", version_base="1.3"):
            cfg = hydra_compose(config_name=config_name, overrides=list(overrides))
        plain = OmegaConf.to_container(cfg, resolve=True)
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigValidationError(_compose_error(str(e), list(overrides), config_name)) from e
    assert isinstance(plain, dict)
    paths = plain["paths"]
    for key in ("root", "data_root", "run_root"):
        paths[key] = _absolute(paths[key])
    plain["data"]["shard_dir"] = _absolute(plain["data"]["shard_dir"])
    for side in ("vision", "text"):
        w = plain[side].get("weights")
        if w:
            plain[side]["weights"] = _absolute(w)
    plain["overrides"] = list(overrides)
    return plain


# -- type checks of the dicts that become mope.config dataclasses -----------------------------------------------------
def _describe(tp: Any) -> str:
    """A readable name of a type hint: 'an integer', 'a number or null', "one of 'dense', 'top1_scaled'"."""
    import enum
    import types
    import typing

    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(dict.fromkeys(_describe(a) for a in typing.get_args(tp)))
    if tp is type(None):
        return "null"
    if tp is bool:
        return "true or false"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if tp is str:
        return "a string"
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return "one of " + ", ".join(repr(m.value) for m in tp)
    if tp is dict or origin is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return f"a mapping of {tp.__name__} fields"
    return getattr(tp, "__name__", str(tp))


def _type_ok(value: Any, tp: Any) -> bool:
    import enum
    import types
    import typing
    from collections.abc import Mapping

    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return isinstance(value, (str, tp))  # the allowed values are checked by the dataclass (named there)
    if tp is dict or origin is dict:
        return isinstance(value, Mapping)
    if dataclasses.is_dataclass(tp):
        return isinstance(value, (Mapping, tp))
    return isinstance(value, tp) if isinstance(tp, type) else True


def _nearest(name: str, known: list[str]) -> str:
    import difflib

    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    return f"did you mean {' or '.join(close)}?" if close else f"known fields: {', '.join(sorted(known))}"


def check_fields(cls: type, values: dict[str, Any], owner: str, *, skip: tuple[str, ...] = ()) -> None:
    """Checks a dict against the fields and type hints of the dataclass `cls` before it is built.

    Raises ConfigValidationError naming ``owner.field``, the value, the expected type and an example (the field's
    default), or the nearest valid key for an unknown one.
    """
    import typing

    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in skip}
    for k, v in values.items():
        if k not in fields:
            raise ConfigValidationError(
                f"{owner}.{k} is not a configuration field "
                f"({_nearest(f'{owner}.{k}', [f'{owner}.{n}' for n in fields])})"
                f"; fix the key, see harness/configs/train.yaml for the fields"
            )
        tp = hints[k]
        if not _type_ok(v, tp):
            f = fields[k]
            default = f.default if f.default is not dataclasses.MISSING else None
            default = getattr(default, "value", default)
            example = (
                ""
                if default is None and f.default is dataclasses.MISSING
                else (f"; e.g. {owner}.{k}={_hydra_text(default)} (the default)")
            )
            raise ConfigValidationError(
                f"{owner}.{k}={v!r} has the wrong type: expected {_describe(tp)}, got {type(v).__name__}{example}"
            )


def _hydra_text(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def _flat_keys(node: Any, prefix: str = "") -> list[str]:
    out: list[str] = []
    if isinstance(node, dict):
        for k, v in node.items():
            key = f"{prefix}{k}"
            out.append(key)
            out += _flat_keys(v, key + ".")
    return out


def _known_keys(overrides: list[str], config_name: str) -> list[str]:
    """Every dotted key of the configuration composed from `overrides` (or from none, if those do not compose)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from omegaconf import OmegaConf

    _register_model_defaults()
    for ovr in (overrides, []):
        try:
            with initialize_config_module("harness.configs", version_base="1.3"):
                cfg = hydra_compose(config_name=config_name, overrides=ovr)
            return _flat_keys(OmegaConf.to_container(cfg, resolve=False))
        except Exception:  # noqa: BLE001, S112 - only used to build a hint
            continue
    return []


def _compose_error(msg: str, overrides: list[str], config_name: str) -> str:
    """Hydra's message made actionable: an unknown key gets the nearest valid key (instead of Hydra's
    "use +key=value", which only leads to a second error), an unknown group option keeps its list of options."""
    import difflib
    import re

    msg = msg.split("\nConfig search path", 1)[0].strip()
    m = re.search(r"Could not override '([^']+)'", msg)
    if m and "To append to your config use +" in msg:
        key = m.group(1)
        bad = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") == key]
        known = _known_keys([o for o in overrides if o not in bad], config_name)
        close = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
        hint = f"did you mean {' or '.join(close)}?" if close else "no similar key exists"
        return (
            f"unknown configuration key {key!r} in override {bad[0] if bad else key!r} ({hint}); fix the key "
            f"(the fields are in harness/configs/train.yaml and its groups)"
        )
    m = re.search(r"Could not find '([^'/]+)/([^']+)'", msg)
    if m:
        return (
            f"{m.group(1)}={m.group(2)}: no such option of the {m.group(1)!r} group; use one of the options "
            f"listed below (harness/configs/{m.group(1)}/)\n{msg}"
        )
    return f"cannot compose configuration from overrides {overrides}: {msg}"


def fusion_config(cfg: dict[str, Any]) -> FusionConfig:
    """The typed model config from a composed config (raises ConfigError naming the field)."""
    model = dict(cfg["model"])
    check_fields(FusionConfig, model, "model", skip=_NESTED_MODEL_FIELDS)
    check_fields(EncoderConfig, dict(cfg["vision"]), "vision")
    check_fields(EncoderConfig, dict(cfg["text"]), "text")
    extra = {}
    for m in ("audio", "video"):  # optional modalities (MUStARD): null unless audio=... / video=... is selected
        if cfg.get(m):
            check_fields(EncoderConfig, dict(cfg[m]), m)
            extra[m] = EncoderConfig(**cfg[m])
    check_fields(MoPEConfig, dict(cfg["mope"]), "mope")
    nc = cfg["data"]["num_classes"]
    if isinstance(nc, bool) or not isinstance(nc, int):
        raise ConfigValidationError(
            f"data.num_classes={nc!r} has the wrong type: expected an integer, got {type(nc).__name__}"
        )
    if not isinstance(cfg["method"].get("name"), str):
        raise ConfigValidationError(f"method.name={cfg['method'].get('name')!r} must be a method name (method=...)")
    return FusionConfig(
        method=cfg["method"]["name"],
        vision=EncoderConfig(**cfg["vision"]),
        text=EncoderConfig(**cfg["text"]),
        num_classes=int(cfg["data"]["num_classes"]),
        task=cfg["data"]["task"],
        mope=MoPEConfig(**cfg["mope"]),
        **extra,
        **model,
    )


def validate(cfg: dict[str, Any], *, check_paths: bool = True) -> FusionConfig:
    """Checks a composed configuration without building models or reading data."""
    try:
        fcfg = fusion_config(cfg)
    except ConfigValidationError:
        raise
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
            raise ConfigValidationError(
                f"trainer.{key}={v!r} must be a positive number{hint}, e.g. trainer.{key}=1e-4"
            )
    if tr["precision"] not in ("fp32", "bf16", "fp16"):
        raise ConfigValidationError(f"trainer.precision={tr['precision']!r}: allowed values fp32, bf16, fp16")
    if sorted(tr["milestones"]) != list(tr["milestones"]):
        raise ConfigValidationError(f"trainer.milestones={tr['milestones']!r} must be increasing")
    if int(cfg["deepspeed"]["zero_stage"]) > 2:
        raise ConfigValidationError("deepspeed.zero_stage must be <= 2 (ZeRO-3 partitions the frozen encoders)")
    shots = cfg["data"].get("shots")
    if shots is not None and (not isinstance(shots, int) or shots < 1):
        raise ConfigValidationError(
            f"data.shots={shots!r} must be a positive integer (total training examples) or null"
        )
    if check_paths:
        from mope_data.format import is_url, join

        remote = is_url(cfg["data"]["shard_dir"])
        shard_dir = cfg["data"]["shard_dir"] if remote else Path(cfg["data"]["shard_dir"])
        if remote:  # never built here: the remote train manifest must be there
            _remote_exists("data.shard_dir", str(join(shard_dir, "train", "manifest.json")), "file")
        elif not shard_dir.is_dir() and not cfg["data"].get("auto_prepare"):
            raise ConfigValidationError(
                f"data.shard_dir={shard_dir} does not exist: run `harness prep {cfg['data']['name']} --src RAW "
                f"--out {shard_dir}` or set data.shard_dir / MOPE_DATA_ROOT"
            )
        from mope.methods import METHODS, reads_complementary

        used = ([fcfg.main] if METHODS[fcfg.method].use_main else []) + (
            fcfg.complementary_modalities if reads_complementary(fcfg) else []
        )
        for side in (m for m in ("vision", "text", "audio", "video") if m in used):  # an unused encoder is never built
            w = cfg[side].get("weights")
            auto = cfg["data"].get("auto_prepare") and not remote and str(w or "").startswith(str(shard_dir))
            if w and is_url(w):
                _remote_exists(f"{side}.weights", str(w), "dir")
            elif w and not Path(w).exists() and not auto:
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
    print(
        json.dumps(
            {"run_name": cfg["run_name"], "model": fcfg.to_dict(), "trainer": cfg["trainer"], "data": cfg["data"]},
            indent=2,
        )
    )
    print("configuration OK", file=sys.stderr)
    return 0
