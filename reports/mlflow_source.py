"""Reads a sweep from MLflow into a :class:`~reports.data.SweepData`, and logs a report folder back to its parent run.

What ``harness sweep`` writes (``harness/sweep_runs.py``): one parent run per sweep (tags ``harness.role = sweep``,
``harness.sweep_id``, ``harness.spec_name``, ``harness.spec_hash``, ``harness.profile``, ``harness.git_sha``; params
``spec.*`` = the normalized spec; artifact ``trials.json`` = the planned trials) and one child run per trial (tags
``harness.role = trial``, ``harness.sweep_id``, ``harness.trial_key``, ``harness.point_id``, ``harness.seed``,
``harness.arm``, ``harness.label``, ``harness.axes``; params = the flattened resolved config; metrics ``final/*``,
``perf/*``, ``cost/*``, ``val/*``, ``routing/*`` against the global step). Only the explicit client API is used.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pandas as pd

from reports.data import CONFIG_KEYS, STATUS_MISSING, SweepData, parse_param

ROLE_TAG, SWEEP_TAG = "harness.role", "harness.sweep_id"
# the time series the figures and claims read (others stay in MLflow)
HISTORY_KEYS = (
    "routing/entropy",
    "val/acc",
    "val/f1_micro",
    "val/miou",
    "val/loss",
    "train/loss",
    "val/pred_class_frac_max",
)
HISTORY_KEY_PREFIXES = ("routing/importance_last/",)


class StoreError(RuntimeError):
    """The store cannot be read (missing file, unknown sweep): the message names it and what to do."""


def sqlite_path(uri: str) -> Path | None:
    """The file of a ``sqlite:///path`` URI (``sqlite:////abs`` or ``sqlite:///rel``); None for other stores."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(unquote(uri[len("sqlite:///") :].split("?", 1)[0]))


def client_for(uri: str):
    """An ``MlflowClient`` for `uri`; a ``sqlite:///`` file that does not exist is an error (MLflow would create an
    empty store there)."""
    f = sqlite_path(uri)
    if f is not None and not f.is_file():
        raise StoreError(
            f"no MLflow store at {f} (tracking URI {uri}): run a sweep first (`harness sweep "
            "sweeps/expert_vs_length.yaml`) or name the store with --tracking-uri / MLFLOW_TRACKING_URI"
        )
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _search_all(client, experiment_ids: list[str], filter_string: str) -> list[Any]:
    runs, token = [], None
    while True:
        page = client.search_runs(experiment_ids, filter_string=filter_string, max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def list_sweeps(uri: str) -> list[dict[str, Any]]:
    """Every sweep's parent run in the store, newest first: sweep_id, spec_name, status, start time, run id."""
    client = client_for(uri)
    exps = [e.experiment_id for e in client.search_experiments()]
    if not exps:
        return []
    out = []
    for r in _search_all(client, exps, f"tags.`{ROLE_TAG}` = 'sweep'"):
        t = r.data.tags
        out.append(
            {
                "sweep_id": t.get(SWEEP_TAG, r.info.run_name),
                "spec_name": t.get("harness.spec_name", ""),
                "spec_hash": t.get("harness.spec_hash", ""),
                "profile": t.get("harness.profile", ""),
                "status": r.info.status,
                "started": r.info.start_time,
                "run_id": r.info.run_id,
                "experiment_id": r.info.experiment_id,
                "num_trials": t.get("harness.num_trials"),
            }
        )
    return sorted(out, key=lambda s: s["started"] or 0, reverse=True)


def select_sweeps(
    sweeps: list[dict[str, Any]], *, name: str | None = None, sweep_id: str | None = None, every: bool = False
) -> list[dict[str, Any]]:
    """The sweeps to report: all (`every`), one by id (full id or a prefix of its hash), or the newest of a name.

    Raises:
        StoreError: nothing matches; the message lists what the store holds.
    """
    if not sweeps:
        raise StoreError(
            "the store holds no sweep (no parent run tagged harness.role=sweep): run `harness sweep SPEC` first"
        )
    if every:
        return sweeps
    known = sorted({s["spec_name"] for s in sweeps})
    if sweep_id:
        hits = [
            s
            for s in sweeps
            if s["sweep_id"] == sweep_id
            or s["spec_hash"].startswith(sweep_id)
            or s["sweep_id"].endswith("-" + sweep_id)
        ]
        if name:
            hits = [s for s in hits if s["spec_name"] == name]
        if not hits:
            raise StoreError(
                f"no sweep with id {sweep_id!r}" + (f" named {name!r}" if name else "") + "; the store "
                "has: " + ", ".join(f"{s['sweep_id']} ({s['status']})" for s in sweeps[:30])
            )
        return hits[:1]
    if not name:
        raise StoreError(
            "name a sweep with --sweep NAME (or --sweep-id ID, or --all); the store has: " + ", ".join(known)
        )
    hits = [s for s in sweeps if s["spec_name"] == name or s["sweep_id"] == name]
    if not hits:
        raise StoreError(f"unknown sweep {name!r}; the store has: {', '.join(known)}")
    return hits[:1]


def _planned_trials(client, run_id: str, notes: list[str]) -> list[dict[str, Any]]:
    try:
        with tempfile.TemporaryDirectory() as d:
            p = client.download_artifacts(run_id, "trials.json", d)
            return list(json.loads(Path(p).read_text()))
    except Exception as e:  # noqa: BLE001 - an old or damaged parent run: report the children we have
        notes.append(
            f"the parent run's trials.json artifact could not be read ({type(e).__name__}: {str(e)[:200]}): "
            "trials that never started cannot be listed"
        )
        return []


def _axes_from_params(params: dict[str, str]) -> dict[str, list[Any]]:
    out = {}
    for k, v in params.items():
        if k.startswith("spec.axes."):
            try:
                out[k[len("spec.axes.") :]] = json.loads(v)
            except json.JSONDecodeError:
                out[k[len("spec.axes.") :]] = [v]
    return out


def load_sweep(uri: str, sweep: dict[str, Any]) -> SweepData:
    """The tidy tables of one sweep (see :mod:`reports.data` for the columns)."""
    client = client_for(uri)
    parent = client.get_run(sweep["run_id"])
    notes: list[str] = []
    params = parent.data.params
    axes = _axes_from_params(params)
    seeds = json.loads(params["spec.seeds"]) if "spec.seeds" in params else None
    planned = _planned_trials(client, sweep["run_id"], notes)
    children = _search_all(
        client,
        [parent.info.experiment_id],
        f"tags.`{SWEEP_TAG}` = '{sweep['sweep_id']}' and tags.`{ROLE_TAG}` = 'trial'",
    )
    by_key: dict[str, Any] = {}
    for r in sorted(children, key=lambda r: r.info.start_time or 0):
        k = r.data.tags.get("harness.trial_key") or r.info.run_id
        if k in by_key:
            keep = r if (r.info.status == "FINISHED" or by_key[k].info.status != "FINISHED") else by_key[k]
            notes.append(
                f"trial {k} has more than one child run ({by_key[k].info.run_id}, {r.info.run_id}); the "
                f"report uses {keep.info.run_id} ({keep.info.status})"
            )
            by_key[k] = keep
        else:
            by_key[k] = r
    rows, point_keys = [], list(axes)
    history: list[dict[str, Any]] = []
    planned_keys = [t["trial_key"] for t in planned]
    for t in planned:
        for k in t.get("values", {}):
            if k not in point_keys:
                point_keys.append(k)
    for key in planned_keys + [k for k in by_key if k not in set(planned_keys)]:
        r = by_key.get(key)
        t = next((x for x in planned if x["trial_key"] == key), None)
        row: dict[str, Any] = {"trial_key": key}
        if t is not None:
            row.update(
                {
                    "point_id": t["point_id"],
                    "label": t["label"],
                    "arm": t.get("arm") or "",
                    "seed": int(t["seed"]),
                    "index": t.get("index"),
                }
            )
            row.update(t.get("values", {}))
        if r is None:
            row.update({"run_id": None, "status": STATUS_MISSING, "error": None, "wall_s": None})
            rows.append(row)
            continue
        tags = r.data.tags
        vals = json.loads(tags.get("harness.axes") or "{}")
        for k in vals:
            if k not in point_keys:
                point_keys.append(k)
        row.update(vals)
        row.update(
            {
                "point_id": tags.get("harness.point_id", row.get("point_id")),
                "label": tags.get("harness.label", row.get("label") or r.info.run_name),
                "arm": tags.get("harness.arm", row.get("arm") or ""),
                "seed": int(tags.get("harness.seed", row.get("seed", -1))),
                "run_id": r.info.run_id,
                "status": r.info.status,
                "error": tags.get("harness.error"),
                "wall_s": (r.info.end_time - r.info.start_time) / 1000.0
                if r.info.end_time and r.info.start_time
                else None,
            }
        )
        for k in CONFIG_KEYS:
            if k in r.data.params:
                row[k] = parse_param(r.data.params[k])
        row.update(
            {
                k: float(v)
                for k, v in r.data.metrics.items()
                if k.startswith(("final/", "perf/", "cost/", "chance/"))
                or k in ("val/pred_class_frac_max", "val/miss_frac")
            }
        )
        rows.append(row)
        for k in r.data.metrics:
            if k in HISTORY_KEYS or k.startswith(HISTORY_KEY_PREFIXES):
                for m in client.get_metric_history(r.info.run_id, k):
                    history.append({"run_id": r.info.run_id, "key": k, "step": int(m.step), "value": float(m.value)})
    runs = pd.DataFrame(rows)
    for c in ("trial_key", "point_id", "label", "arm", "seed", "run_id", "status", "error", "wall_s"):
        if c not in runs:
            runs[c] = None
    meta = {
        "sweep_id": sweep["sweep_id"],
        "spec_name": sweep["spec_name"],
        "spec_hash": sweep["spec_hash"],
        "profile": sweep.get("profile"),
        "status": parent.info.status,
        "axes": axes,
        "arms": sorted({a for a in runs["arm"].dropna() if a}),
        "seeds": seeds,
        "num_trials": len(planned) or len(runs),
        "tracking_uri": uri,
        "parent_run_id": sweep["run_id"],
        "started": parent.info.start_time,
        "git_sha": parent.data.tags.get("harness.git_sha"),
        "point_keys": point_keys,
    }
    hist = pd.DataFrame(history, columns=["run_id", "key", "step", "value"])
    return SweepData(meta, runs, hist, notes, _mask_examples(client, runs, notes))


def _mask_examples(client, runs: pd.DataFrame, notes: list[str]) -> dict[str, dict[str, Any]]:
    """Segmentation sweeps: the logged val predictions (``mask_examples/``) of the lowest-seed finished run per arm."""
    import tempfile

    from mope_data.mask_examples import MASK_EXAMPLES_DIR, read

    if runs.empty or "data.task" not in runs or "segmentation" not in set(runs["data.task"].dropna()):
        return {}
    ok = runs[(runs["status"] == "FINISHED") & (runs["data.task"] == "segmentation")].sort_values("seed")
    out: dict[str, dict[str, Any]] = {}
    for _, r in ok.drop_duplicates("arm").iterrows():
        try:
            with tempfile.TemporaryDirectory() as tmp:
                local = client.download_artifacts(r["run_id"], MASK_EXAMPLES_DIR, tmp)
                out[r["run_id"]] = read(local)
        except Exception as e:  # a missing artifact leaves the figure out, with the reason under "Missing"
            notes.append(f"run {r['run_id']} ({r['arm']}): no mask examples ({type(e).__name__}: {e})")
    return out


NOTE_TAG = "mlflow.note.content"  # the run's description in the MLflow UI (Markdown)


def log_report(
    uri: str,
    run_id: str,
    out_dir: Path,
    artifact_path: str = "report",
    *,
    description: str | None = None,
    series: dict[str, list[tuple[int, float]]] | None = None,
    figures: dict[str, Path] | None = None,
) -> None:
    """Logs the report to the sweep's parent run, so that its MLflow page tells the story: the report folder as
    artifacts (``report/``), `description` as the run's description (``mlflow.note.content``), `series`
    (``{key: [(step, value)]}``, :func:`reports.build.summary_series`) as metrics a chart draws (a value already
    logged at that step is not logged again, so re-running the report adds nothing twice), and `figures`
    (``{key: png}``) as images under ``figures/`` (replaced on a re-run)."""
    import time

    from mlflow.entities import Metric

    client = client_for(uri)
    client.log_artifacts(run_id, str(out_dir), artifact_path)
    if description is not None:
        client.set_tag(run_id, NOTE_TAG, description)
    if series:
        now = int(time.time() * 1000)
        todo = []
        for key, points in series.items():
            have = {(m.step, m.value) for m in client.get_metric_history(run_id, key)}
            todo += [Metric(key, float(v), now, int(st)) for st, v in points if (int(st), float(v)) not in have]
        for i in range(0, len(todo), 1000):  # MLflow's log_batch limit
            client.log_batch(run_id, metrics=todo[i : i + 1000], synchronous=True)
    for key, png in (figures or {}).items():
        from PIL import Image

        with Image.open(png) as im:
            client.log_image(run_id, im.convert("RGB"), artifact_file=f"figures/{key}.png")


__all__ = ["StoreError", "client_for", "list_sweeps", "load_sweep", "log_report", "select_sweeps", "sqlite_path"]
