"""Registry of dataset converters (`harness prep NAME ...`).

A converter is a function ``convert(src: Path | None, out: Path, *, shard_size: int, skip_bad: bool, **options) -> dict``
that writes ``out/<split>/*.tar`` + ``out/<split>/manifest.json`` (see :mod:`datasets_prep.writer`) and returns a
summary dict (per-split counts, skipped counts). Register with ``@register_dataset("name")``.
"""

from __future__ import annotations

from typing import Callable

CONVERTERS: dict[str, Callable[..., dict]] = {}


def register_dataset(name: str) -> Callable[[Callable[..., dict]], Callable[..., dict]]:
    def deco(fn: Callable[..., dict]) -> Callable[..., dict]:
        if name in CONVERTERS and CONVERTERS[name] is not fn:
            raise ValueError(f"dataset converter {name!r} registered twice")
        CONVERTERS[name] = fn
        return fn

    return deco


def get_converter(name: str) -> Callable[..., dict]:
    _import_builtin()
    try:
        return CONVERTERS[name]
    except KeyError:
        raise KeyError(f"unknown dataset {name!r}; available: {sorted(CONVERTERS)}") from None


def list_datasets() -> list[str]:
    _import_builtin()
    return sorted(CONVERTERS)


def _import_builtin() -> None:
    import importlib

    for mod in ("food101", "mmimdb", "snli_ve", "mustard", "demo"):
        try:
            importlib.import_module(f"datasets_prep.{mod}")
        except ModuleNotFoundError as e:  # a converter module not written yet
            if e.name != f"datasets_prep.{mod}":
                raise
