"""The tidy tables a report is computed from: one row per trial, one row per logged metric value.

A report never reads MLflow directly: :mod:`reports.mlflow_source` turns a sweep's parent and child runs into a
:class:`SweepData`, and everything else (tables, figures, claims) reads only that. Tests build a ``SweepData`` by hand.

``SweepData.runs`` (one row per planned trial, also the ones that never started):

* identity: ``trial_key``, ``point_id``, ``label``, ``arm``, ``seed``, ``run_id``, ``status`` (MLflow run status, or
  ``MISSING`` for a planned trial with no child run), ``error`` (the ``harness.error`` tag), ``wall_s`` (run start to
  end);
* configuration: dotted config keys as the sweep spec names them (``method.name``, ``mope.num_experts``,
  ``model.vanilla_prompt_len``, ``data.shots``, ...), typed (int / float / bool / str / None);
* metrics: the latest value of every ``final/*``, ``perf/*``, ``cost/*`` metric and of ``val/pred_class_frac_max``.

``SweepData.history`` (long format): ``run_id``, ``key``, ``step``, ``value`` for the time series the figures need
(``routing/*``, ``val/*``, ``train/loss``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from mope.config import tunable_prompts_per_layer

# config keys read from every child run's params (a report needs them whether or not the spec varies them)
CONFIG_KEYS = (
    "method.name",
    "data.name",
    "data.task",
    "data.shots",
    "vision.name",
    "vision.kind",
    "vision.weights",
    "text.name",
    "trainer.batch_size",
    "trainer.epochs",
    "trainer.max_steps_per_epoch",
    "mope.num_experts",
    "mope.prompt_len",
    "mope.static_len",
    "model.vanilla_prompt_len",
    "mope.routing",
    "mope.routing_keys",
    "mope.imp_loss_weight",
    "mope.use_static",
    "mope.use_dynamic",
    "mope.use_mapped",
)
ID_COLUMNS = ("trial_key", "point_id", "label", "arm", "seed", "run_id", "status", "error", "wall_s")
COLLAPSE_KEY = "val/pred_class_frac_max"
SEG_COLLAPSE_KEY = "val/miss_frac"
COLLAPSE_THRESHOLD = 0.99  # a run predicting one class (label vector) for >= 99% of the val split has collapsed
STATUS_MISSING = "MISSING"


@dataclass
class SweepData:
    """Everything a report reads. ``meta`` holds the sweep's identity (see :mod:`reports.mlflow_source`):
    ``sweep_id``, ``spec_name``, ``spec_hash``, ``profile``, ``status`` (the parent run's), ``axes`` (spec axis key ->
    values), ``arms`` (arm names), ``seeds``, ``num_trials``, ``tracking_uri``, ``parent_run_id``, ``started``,
    ``git_sha``."""

    meta: dict[str, Any]
    runs: pd.DataFrame
    history: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=["run_id", "key", "step", "value"]))
    notes: list[str] = field(default_factory=list)  # problems met while reading the store (shown under "Missing")
    # segmentation: run_id -> harness.mask_examples.read() of that run's logged val predictions (one run per arm)
    mask_examples: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return str(self.meta.get("spec_name") or self.meta.get("sweep_id") or "sweep")

    @property
    def axes(self) -> dict[str, list[Any]]:
        return dict(self.meta.get("axes") or {})

    def finished(self) -> pd.DataFrame:
        return self.runs[self.runs["status"] == "FINISHED"]


def parse_param(value: Any) -> Any:
    """An MLflow param string back to the value ``flatten_config`` wrote (``"4"`` -> 4, ``"None"`` -> None)."""
    if not isinstance(value, str):
        return value
    if value == "None" or value == "null":
        return None
    if value in ("True", "true"):
        return True
    if value in ("False", "false"):
        return False
    try:
        return int(value)
    except ValueError:
        pass
    try:
        return float(value)
    except ValueError:
        return value


def is_missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def primary_metric(runs: pd.DataFrame) -> str:
    """The metric a report compares: test F1-micro for multi-label sweeps, else test accuracy, both of the adapter
    selected on val (``final/test_*``; the official code reports the last weights, ``final/test_*_last``)."""
    tasks = set(runs.get("data.task", pd.Series(dtype=object)).dropna())
    if "segmentation" in tasks:  # mIoU over the held-out splits (RefCOCO: testA + testB)
        return "final/test_miou"
    return "final/test_f1_micro" if "multi_label" in tasks else "final/test_acc"


def metric_label(metric: str) -> str:
    names = {
        "final/test_acc": "test accuracy (adapter selected on val)",
        "final/test_acc_last": "test accuracy (last weights)",
        "final/val_acc_best": "best val accuracy",
        "final/test_f1_micro": "test F1-micro (adapter selected on val)",
        "final/test_f1_macro": "test F1-macro (adapter selected on val)",
        "final/val_f1_micro_best": "best val F1-micro",
        "final/test_miou": "held-out mIoU (testA + testB; adapter selected on val)",
        "final/val_miou_best": "best val mIoU",
    }
    return names.get(metric, metric)


def tunable_prompts(row: pd.Series) -> float:
    """Tunable prompts per layer (mope-reference §6.1): MoPE = static (l or static_len) + k*l experts + 1 mapped;
    a vanilla prompt = its length L. NaN for methods without a per-layer prompt count on this axis."""
    method = row.get("method.name")
    if method == "mope":
        k, l = row.get("mope.num_experts"), row.get("mope.prompt_len")
        if is_missing(k) or is_missing(l):
            return math.nan
        s = row.get("mope.static_len")
        return float(
            tunable_prompts_per_layer(
                int(k),
                int(l),
                None if is_missing(s) else int(s),
                use_static=row.get("mope.use_static", True) is not False,
                use_dynamic=row.get("mope.use_dynamic", True) is not False,
                use_mapped=row.get("mope.use_mapped", True) is not False,
            )
        )
    if method == "vanilla_prompt":
        L = row.get("model.vanilla_prompt_len")
        if is_missing(L):
            k, l = row.get("mope.num_experts"), row.get("mope.prompt_len")
            if is_missing(k) or is_missing(l):
                return math.nan
            L = tunable_prompts_per_layer(int(k), int(l))  # the method's default length (mope/methods.py)
        return float(L)
    return math.nan


def attended_prompts(row: pd.Series) -> float:
    """Prompt tokens the attention sees per layer: MoPE 2l+1 (static + one mixed dynamic + mapped), vanilla L."""
    if row.get("method.name") == "mope":
        l = row.get("mope.prompt_len")
        return math.nan if is_missing(l) else float(2 * l + 1)
    return tunable_prompts(row)


DATA_WAIT_KEY = "perf/run_data_wait_frac"  # logged by every trial at its end (harness.recipe)
DATA_WAIT_LIMIT = 0.05  # a trial whose step waited longer than this for data is flagged: the loader starved it


def add_derived(runs: pd.DataFrame) -> pd.DataFrame:
    """Adds ``tunable_prompts``, ``attended_prompts``, ``step_time_ms``, ``data_wait_frac`` and ``collapsed`` to a runs
    table."""
    runs = runs.copy()
    if runs.empty:
        for c in ("tunable_prompts", "attended_prompts", "step_time_ms", "data_wait_frac", "collapsed"):
            runs[c] = pd.Series(dtype=float)
        return runs
    runs["tunable_prompts"] = runs.apply(tunable_prompts, axis=1)
    runs["attended_prompts"] = runs.apply(attended_prompts, axis=1)
    sps = (
        pd.to_numeric(runs.get("perf/train_samples_per_s"), errors="coerce")
        if "perf/train_samples_per_s" in runs
        else pd.Series(math.nan, index=runs.index)
    )
    bs = (
        pd.to_numeric(runs.get("trainer.batch_size"), errors="coerce")
        if "trainer.batch_size" in runs
        else pd.Series(math.nan, index=runs.index)
    )
    runs["step_time_ms"] = 1000.0 * bs / sps
    # the share of step time spent waiting for the loader, whole run (older runs: the last windowed value)
    wait = pd.Series(math.nan, index=runs.index)
    for key in ("perf/data_wait_frac", DATA_WAIT_KEY):
        if key in runs:
            v = pd.to_numeric(runs[key], errors="coerce")
            wait = v.where(v.notna(), wait)
    runs["data_wait_frac"] = wait
    if COLLAPSE_KEY in runs or SEG_COLLAPSE_KEY in runs:
        # a segmentation run has no predicted class: it has collapsed when its masks miss the object on >= 99% of val
        key = COLLAPSE_KEY if COLLAPSE_KEY in runs else SEG_COLLAPSE_KEY
        other = pd.to_numeric(runs.get(SEG_COLLAPSE_KEY, pd.Series(float("nan"), index=runs.index)), errors="coerce")
        frac = pd.to_numeric(runs[key], errors="coerce").fillna(other)
        runs["collapsed"] = frac >= COLLAPSE_THRESHOLD
    else:
        runs["collapsed"] = False
    return runs


def point_columns(data: SweepData) -> list[str]:
    """The columns that identify a point of the sweep: the arm, then every axis and arm-set key present."""
    cols = ["arm"] if data.runs["arm"].fillna("").astype(str).str.len().gt(0).any() else []
    for k in data.meta.get("point_keys") or data.axes:
        if k in data.runs.columns and k not in cols:
            cols.append(k)
    return cols


def aggregate(runs: pd.DataFrame, by: list[str], metric: str) -> pd.DataFrame:
    """Mean, std (ddof 1), n and the seeds of ``metric`` per group of FINISHED runs that have it."""
    ok = runs[(runs["status"] == "FINISHED")].copy()
    if metric not in ok:
        return pd.DataFrame(columns=[*by, "mean", "std", "n", "seeds"])
    ok[metric] = pd.to_numeric(ok[metric], errors="coerce")
    ok = ok[ok[metric].notna()]
    rows = []
    for key, g in groups(ok, by):
        vals = g[metric].astype(float)
        rows.append(
            {
                **key,
                "mean": float(vals.mean()),
                "std": float(vals.std(ddof=1)) if len(vals) > 1 else math.nan,
                "n": len(vals),
                "seeds": sorted(int(s) for s in g["seed"]),
            }
        )
    return pd.DataFrame(rows, columns=[*by, "mean", "std", "n", "seeds"])


def groups(df: pd.DataFrame, by: list[str]):
    """(dict of group values, sub-frame) in first-seen order; None/NaN are a group value like any other."""
    if not by:
        yield {}, df
        return
    keys: dict[tuple, list[int]] = {}
    for i, row in df[by].iterrows():
        k = tuple(_hashable(row[c]) for c in by)
        keys.setdefault(k, []).append(i)
    for k, idx in keys.items():
        yield dict(zip(by, (None if v == "<none>" else v for v in k))), df.loc[idx]


def _hashable(v: Any) -> Any:
    if is_missing(v):
        return "<none>"
    if isinstance(v, (list, dict)):
        return str(v)
    return v


def by_seed(runs: pd.DataFrame, metric: str) -> dict[int, float]:
    """seed -> metric of FINISHED runs (the mean when a seed appears twice)."""
    ok = runs[runs["status"] == "FINISHED"]
    if metric not in ok:
        return {}
    vals = pd.to_numeric(ok[metric], errors="coerce")
    out: dict[int, list[float]] = {}
    for s, v in zip(ok["seed"], vals):
        if not is_missing(v):
            out.setdefault(int(s), []).append(float(v))
    return {s: sum(v) / len(v) for s, v in out.items()}


def backbone_name(row: pd.Series, part: str) -> str:
    """A readable encoder name: ``vision.name`` (its last path part), or, for one built from local weights with
    ``name: auto``, the weights folder (``demo/vision_encoder``)."""
    name = row.get(f"{part}.name")
    if is_missing(name):
        return "?"
    name = str(name)
    if name == "auto" and isinstance(row.get(f"{part}.weights"), str):
        w = row[f"{part}.weights"].rstrip("/").split("/")
        return "/".join(w[-2:])
    return name.rstrip("/").rsplit("/", 1)[-1]


def backbones_label(runs: pd.DataFrame, part: str) -> str:
    """The encoders of ``part`` across the runs ("timm_vit", "a/b"); a run whose params were never logged (killed
    before its start) adds nothing rather than a "?"."""
    names = {backbone_name(r, part) for _, r in runs.iterrows()}
    return "/".join(sorted(names - {"?"})) or "?"


def datasets_label(runs: pd.DataFrame) -> str:
    return "/".join(sorted({str(v) for v in runs.get("data.name", pd.Series(dtype=object)).dropna()})) or "?"


def fmt_value(v: Any) -> str:
    if is_missing(v):
        return "–"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def fmt_mean_std(mean: float, std: float, n: int, digits: int = 3) -> str:
    if n == 0 or is_missing(mean):
        return "–"
    s = f"{mean:.{digits}f}"
    s += f" ± {std:.{digits}f}" if not is_missing(std) else " ± –"
    return f"{s} (n={n})"


__all__ = [
    "COLLAPSE_KEY",
    "SEG_COLLAPSE_KEY",
    "COLLAPSE_THRESHOLD",
    "CONFIG_KEYS",
    "DATA_WAIT_KEY",
    "DATA_WAIT_LIMIT",
    "ID_COLUMNS",
    "STATUS_MISSING",
    "SweepData",
    "add_derived",
    "aggregate",
    "attended_prompts",
    "backbone_name",
    "backbones_label",
    "by_seed",
    "datasets_label",
    "fmt_mean_std",
    "fmt_value",
    "groups",
    "is_missing",
    "metric_label",
    "parse_param",
    "point_columns",
    "primary_metric",
    "tunable_prompts",
]
