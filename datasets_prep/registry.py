"""Registry of dataset converters (`harness prep NAME ...`).

A converter is a function ``convert(src: Path | None, out: Path, *, shard_size: int, skip_bad: bool, **options)``
that writes ``out/<split>/*.tar`` + ``out/<split>/manifest.json`` (see :mod:`datasets_prep.writer`) and returns a
summary dict (per-split counts, skipped counts): :func:`datasets_prep.writer.write_dataset` does all that from the
converter's split lists and its "raw entry -> record" function. Register with ``@register_dataset("name")`` in the
converter's module and add that module to :data:`BUILTIN` (one line).

Options: the converter's keyword parameters are its options (``--opt key=value``). The registry refuses any other
option before the converter runs, with an error naming it and the accepted ones; converters do not check for unknown
options themselves. A converter whose signature takes ``**options`` (the generated ``demo``, whose options are its
config's fields) receives every option and checks them itself.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

from .writer import PrepError

# Modules holding the built-in converters, imported on first use: one line per converter.
BUILTIN = (
    "food101",
    "mmimdb",
    "snli_ve",
    "mustard",
    "demo",
    "refcoco",  # refcoco and refcoco+
    "ris_demo",
)
# Keyword parameters set by `harness prep`'s own flags (--shard-size, --skip-bad), not by --opt.
CLI_PARAMETERS = ("shard_size", "skip_bad")

CONVERTERS: dict[str, Callable[..., dict]] = {}


def register_dataset(name: str) -> Callable[[Callable[..., dict]], Callable[..., dict]]:
    """Register ``fn`` as converter ``name``; the registered (and returned) function refuses unknown options."""

    def deco(fn: Callable[..., dict]) -> Callable[..., dict]:
        if name in CONVERTERS and inspect.unwrap(CONVERTERS[name]) is not fn:
            raise ValueError(f"dataset converter {name!r} registered twice")
        CONVERTERS[name] = checked = refuse_unknown_options(name, fn)
        return checked

    return deco


def refuse_unknown_options(name: str, fn: Callable[..., dict]) -> Callable[..., dict]:
    """``fn`` behind a check of its keyword arguments against its signature: an option it has no parameter for
    raises :class:`PrepError` naming it and listing the accepted options. ``fn`` itself when it takes ``**options``."""
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return fn
    accepted = [n for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY and n not in CLI_PARAMETERS]

    @functools.wraps(fn)
    def convert(*args, **kwargs) -> dict:
        unknown = sorted(k for k in kwargs if k not in params)
        if unknown:
            raise PrepError(f"{name}: unknown option(s) {unknown}; valid: {', '.join(accepted)}")
        return fn(*args, **kwargs)

    return convert


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

    for mod in BUILTIN:
        try:
            importlib.import_module(f"datasets_prep.{mod}")
        except ModuleNotFoundError as e:  # a converter module not written yet
            if e.name != f"datasets_prep.{mod}":
                raise
