"""The sweep's runs as its driver sees them: the MLflow parent and child runs, the progress table, the closing lines.

* MLflow (``shared/docs/architecture.md`` §5, §10): :func:`open_parent_run` (one parent run per sweep, found again by
  its trial key ``sweep/<sweep_id>``; the spec and the trial table as artifacts), :func:`child_tags` (the tags of
  every trial's child run), :func:`finished_child_metrics` and :func:`sweep_children` (what the store holds);
* :func:`make_progress_callback`: a Tune callback printing the trial table (state, epoch, objective) and an ETA
  (:func:`progress_lines`);
* :func:`sweep_outcome`: after Tune, the closing lines and the sweep's exit code, read from the child runs.

The keys a trial reports to Tune besides its metrics (:data:`SKIPPED_KEY`, :data:`FINISHED_KEY`, :data:`STATUS_KEY`,
:data:`OBJECTIVE_KEY`) are defined here: ``harness.launch`` reports them, the progress table reads them.
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SWEEP_TAG = "harness.sweep_id"
SKIPPED_KEY = "harness/skipped"
FINISHED_KEY = "harness/finished"
STATUS_KEY = "harness/status"
OBJECTIVE_KEY = "objective"


# -- MLflow: parent and child runs ------------------------------------------------------------------------------------
def tracking_target(cfg: dict[str, Any]) -> tuple[str, str]:
    """(tracking URI, experiment name) of a composed trial config (the URI resolved now, on the driver)."""
    from harness.tracking import default_tracking_uri

    t = cfg["tracking"]
    return t.get("uri") or default_tracking_uri(cfg["paths"]["run_root"]), t["experiment"]


def axis_tags(values: dict[str, Any]) -> dict[str, str]:
    """The swept values under short names (``axis.num_experts``: the last part of the config key, the whole key when
    two axes share it), for the MLflow runs table's columns and group-by."""
    last = [k.rsplit(".", 1)[-1] for k in values]
    return {f"axis.{short if last.count(short) == 1 else k}": str(v) for (k, v), short in zip(values.items(), last)}


def child_tags(trial: dict[str, Any], spec_hash: str) -> dict[str, Any]:
    return {
        **axis_tags(trial["values"]),
        SWEEP_TAG: trial["sweep_id"],
        "harness.spec_hash": spec_hash,
        "harness.point_id": trial["point_id"],
        "harness.seed": trial["seed"],
        "harness.arm": trial["arm"] or "",
        "harness.label": trial["label"],
        "harness.axes": json.dumps(trial["values"], sort_keys=True, default=str),
        "harness.role": "trial",
    }


def open_parent_run(spec, cfg: dict[str, Any], trials: list[dict[str, Any]]):
    """Creates or resumes the sweep's parent run (found by trial key ``sweep/<sweep_id>``) and logs the spec."""
    import yaml

    from harness.provenance import git_info
    from harness.tracking import MLflowTracker, flatten_config

    uri, experiment = tracking_target(cfg)
    git = git_info()
    tracker = MLflowTracker.open(
        uri,
        experiment,
        run_name=spec.sweep_id,
        trial_key=f"sweep/{spec.sweep_id}",
        tags={
            SWEEP_TAG: spec.sweep_id,
            "harness.spec_hash": spec.spec_hash,
            "harness.spec_name": spec.name,
            "harness.profile": spec.profile or "",
            "harness.git_sha": git.get("sha") or "",
            "harness.git_dirty": str(git.get("dirty")),
            "harness.role": "sweep",
            "harness.num_trials": len(trials),
            "harness.resources": json.dumps(spec.resources.__dict__),
        },
        params=flatten_config({"spec": spec.normalized(), "profile": spec.profile or "none"}),
    )
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "spec.yaml"
        p.write_text(yaml.safe_dump(spec.raw, sort_keys=False))
        tracker.log_artifact(str(p))
    tracker.log_dict({"summary": spec.summary(), "normalized": spec.normalized()}, "spec_resolved.json")
    tracker.log_dict([{k: v for k, v in t.items() if k != "cfg"} for t in trials], "trials.json")
    return tracker


def _client_and_experiment(cfg: dict[str, Any]):
    from mlflow.tracking import MlflowClient

    from harness.tracking import limit_http_retries

    uri, experiment = tracking_target(cfg)
    limit_http_retries(uri)
    client = MlflowClient(tracking_uri=uri)
    return client, client.get_experiment_by_name(experiment)


def finished_child_metrics(cfg: dict[str, Any], trial_key: str) -> dict[str, float] | None:
    """The latest metrics of this trial's child run when it is FINISHED, else None (waits for a store that is
    down, :func:`harness.tracking.wait_for_store`)."""
    from harness.tracking import TRIAL_KEY_TAG, wait_for_store

    def read() -> dict[str, float] | None:
        client, exp = _client_and_experiment(cfg)
        if exp is None:
            return None
        runs = client.search_runs(
            [exp.experiment_id], filter_string=f"tags.`{TRIAL_KEY_TAG}` = '{trial_key}'", max_results=10
        )
        for r in runs:
            if r.info.status == "FINISHED":
                return dict(r.data.metrics)
        return None

    return wait_for_store(read, f"looking up the run of trial {trial_key}")


def sweep_children(cfg: dict[str, Any], sweep_id: str) -> list[Any]:
    """All child runs of a sweep (any status; waits for a store that is down)."""
    from harness.tracking import wait_for_store

    def read() -> list[Any]:
        client, exp = _client_and_experiment(cfg)
        if exp is None:
            return []
        runs, token = [], None
        while True:
            page = client.search_runs(
                [exp.experiment_id],
                filter_string=f"tags.`{SWEEP_TAG}` = '{sweep_id}' and tags.`harness.role` = 'trial'",
                max_results=1000,
                page_token=token,
            )
            runs.extend(page)
            token = page.token
            if not token:
                return runs

    return wait_for_store(read, f"listing the child runs of sweep {sweep_id}")


# -- after Tune: the closing lines ------------------------------------------------------------------------------------
def sweep_outcome(
    spec, trials: list[dict[str, Any]], n_err: int, *, parent_run_id: str, t0: float, exp_dir: Path, out
) -> tuple[int, str]:
    """Prints how the sweep ended, from the MLflow child runs (counts; every deterministic failure's cause; the
    trials not finished and what to do); returns (exit code: 0 when every trial has a FINISHED child run, else 1,
    status of the parent run)."""
    sid = spec.sweep_id
    children = sweep_children(trials[0]["cfg"], sid)
    finished = {r.data.tags.get("harness.trial_key") for r in children if r.info.status == "FINISHED"}
    missing = [t for t in trials if t["trial_key"] not in finished]
    status = "FINISHED" if not missing else ("FAILED" if n_err else "KILLED")
    print(
        f"[{sid}] {len(trials) - len(missing)}/{len(trials)} trials FINISHED, {n_err} errored, "
        f"{time.time() - t0:.0f}s; MLflow parent run {parent_run_id}",
        file=out,
        flush=True,
    )
    _print_failures(sid, children, missing, exp_dir, out)
    hint = review_hint(trials[0]["cfg"], parent_run_id)
    if hint:
        print(f"[{sid}] review: {hint}", file=out, flush=True)
    if missing:
        print(
            f"[{sid}] not finished: "
            + ", ".join(f"{t['label']}-s{t['seed']}" for t in missing[:20])
            + (
                "; re-run the same command to resume"
                if status == "KILLED"
                else "; see the trials' error.txt under " + str(exp_dir)
            ),
            file=out,
            flush=True,
        )
    return (0 if not missing else 1), status


def review_hint(cfg: dict[str, Any], parent_run_id: str) -> str | None:
    """Where to look at the sweep in the MLflow UI: the command that serves a local store, and the link to the
    experiment's runs table. (MLflow 3.17's UI opens an experiment on its GenAI view whatever the experiment's
    ``mlflow.experimentKind`` tag says, until "Model training" is clicked once; the ``/runs`` link goes straight to the
    table.)"""
    from harness.tracking import is_http_uri

    uri, _ = tracking_target(cfg)
    try:
        client, _ = _client_and_experiment(cfg)
        exp_id = client.get_run(parent_run_id).info.experiment_id
    except Exception:  # noqa: BLE001 - a hint only; the sweep's outcome is printed already
        return None
    page = f"#/experiments/{exp_id}/runs"
    if is_http_uri(uri):
        return f"{uri.rstrip('/')}/{page}"
    return f"mlflow ui --host 127.0.0.1 --backend-store-uri {uri}, then http://127.0.0.1:5000/{page}"


def _print_failures(sid: str, children: list[Any], missing: list[dict[str, Any]], exp_dir: Path, out) -> None:
    causes = {
        r.data.tags.get("harness.trial_key"): r.data.tags["harness.error"]
        for r in children
        if r.info.status == "FAILED" and r.data.tags.get("harness.error")
    }
    failed = [t for t in missing if t["trial_key"] in causes]
    for t in failed:
        print(
            f"[{sid}] {t['label']}-s{t['seed']} FAILED: {causes[t['trial_key']].splitlines()[0]}", file=out, flush=True
        )
    if failed:
        print(
            f"[{sid}] a deterministic failure is not retried; fix its cause, then `rm -r {exp_dir}` "
            "and re-run the same command: FINISHED trials are skipped (their MLflow runs), the others run again",
            file=out,
            flush=True,
        )


# -- progress ---------------------------------------------------------------------------------------------------------
def _fmt_s(s: float | None) -> str:
    if s is None or not math.isfinite(s):
        return "?"
    s = round(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else (f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s")


def progress_lines(
    rows: list[dict[str, Any]], *, sweep_id: str, objective: str, concurrency: int, elapsed: float
) -> list[str]:
    """The progress table. Each row: label, seed, state, epoch (0-based, last reported), epochs, metric, start, end,
    duration (seconds, for finished trials), skipped."""
    final = ("TERMINATED", "ERROR")
    n_done = sum(r["state"] in final for r in rows)
    n_run = sum(r["state"] == "RUNNING" for r in rows)
    n_err = sum(r["state"] == "ERROR" or bool(r.get("status")) for r in rows)
    n_pend = len(rows) - n_done - n_run
    durs = [r["duration"] for r in rows if r["state"] == "TERMINATED" and r.get("duration") and not r.get("skipped")]
    est = sum(durs) / len(durs) if durs else None
    if est is None:  # from running trials' progress
        rates = [r["running_for"] / r["frac"] for r in rows if r["state"] == "RUNNING" and r.get("frac")]
        est = sum(rates) / len(rates) if rates else None
    eta = None
    if est is not None:
        left = sum(est * (1 - (r.get("frac") or 0.0)) for r in rows if r["state"] == "RUNNING") + est * n_pend
        eta = left / max(1, min(concurrency, n_run + n_pend)) if (n_run + n_pend) else 0.0
    head = (
        f"[{sweep_id}] {time.strftime('%H:%M:%S')}  elapsed {_fmt_s(elapsed)}  done {n_done}/{len(rows)}  "
        f"running {n_run}  pending {n_pend}  errors {n_err}  ETA {_fmt_s(eta) if n_done < len(rows) else '0s'}"
    )
    w = max([len(r["label"]) for r in rows] + [5])
    lines = [head, f"  {'trial':<{w}}  seed  {'state':<10}  epoch  {objective:>14}  time"]
    for r in rows:
        ep = f"{int(r['epoch']) + 1}/{r['epochs']}" if r.get("epoch") is not None else f"-/{r['epochs']}"
        m = r.get("metric")
        ms = f"{m:.4f}" if isinstance(m, float) and math.isfinite(m) else "-"
        state = "SKIPPED" if r.get("skipped") else ("FAILED" if r.get("status") else r["state"])
        tm = _fmt_s(r.get("duration") if r["state"] in final else r.get("running_for"))
        cause = f"  {r['status']}" if r.get("status") else ""
        lines.append(f"  {r['label']:<{w}}  {r['seed']:>4}  {state:<10}  {ep:>5}  {ms:>14}  {tm}{cause}")
    return lines


def progress_rows(
    trials: list[Any],
    planned: list[tuple[str, int, int]],
    start: dict[str, float],
    end: dict[str, float],
    objective: str,
    now: float,
) -> list[dict[str, Any]]:
    """The rows of :func:`progress_lines` for Tune's trials (start / end: trial id -> time) and the planned trials
    Tune has not created yet ((label, seed, epochs); PENDING)."""
    rows = []
    for tr in trials:
        t = tr.config["trial"]
        res = tr.last_result or {}
        epochs = int(t["cfg"]["trainer"]["epochs"])
        epoch = res.get("epoch")
        frac = (float(epoch) + 1) / epochs if epoch is not None else 0.0
        t_start = start.get(tr.trial_id)
        t_end = end.get(tr.trial_id)
        dur = (t_end - t_start) if (t_start and t_end) else res.get("time_total_s")
        rows.append(
            {
                "label": t["label"],
                "seed": t["seed"],
                "state": tr.status,
                "epoch": epoch,
                "epochs": epochs,
                "metric": res.get(objective),
                "frac": min(frac, 1.0),
                "running_for": (now - t_start) if t_start else None,
                "duration": dur,
                "skipped": bool(res.get(SKIPPED_KEY)),
                "status": res.get(STATUS_KEY),
            }
        )
    seen = {(r["label"], r["seed"]) for r in rows}
    rows += [
        {
            "label": lab,
            "seed": seed,
            "state": "PENDING",
            "epoch": None,
            "epochs": ep,
            "metric": None,
            "frac": 0.0,
            "running_for": None,
            "duration": None,
            "skipped": False,
        }
        for lab, seed, ep in planned
        if (lab, seed) not in seen
    ]
    return rows


def _trial_event(sweep_id: str, trial, what: str) -> str:
    t = trial.config["trial"]
    return f"[{sweep_id}] trial {t['label']} s{t['seed']} {what}"


class _ProgressTable:
    """The trial table (state, epoch, objective) and an ETA, printed every `every_s` s and when a trial ends: the
    methods of the Tune callback that :func:`make_progress_callback` builds (Ray is imported only by a sweep)."""

    def __init__(
        self,
        sweep_id: str,
        objective: str,
        concurrency: int,
        every_s: float,
        planned: list[tuple[str, int, int]],
        stream=None,
    ):
        self.sweep_id, self.objective, self.concurrency, self.every_s = sweep_id, objective, concurrency, every_s
        self.planned = list(planned)  # (label, seed, epochs) of every trial, Tune creates them lazily
        self._stream = stream
        self._start: dict[str, float] = {}
        self._end: dict[str, float] = {}
        self._t0 = time.time()
        self._last = 0.0

    def __getstate__(self):  # pickled into the experiment state with the run config
        return {
            k: v
            for k, v in self.__dict__.items()
            if k in ("sweep_id", "objective", "concurrency", "every_s", "planned")
        }

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._stream, self._start, self._end, self._t0, self._last = None, {}, {}, time.time(), 0.0

    def setup(self, **info):
        self._t0 = time.time()

    def on_trial_start(self, iteration, trials, trial, **info):
        self._start[trial.trial_id] = time.time()

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._end[trial.trial_id] = time.time()
        self._print(trials)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._end[trial.trial_id] = time.time()
        print(
            _trial_event(self.sweep_id, trial, f"failed: {trial.error_file or ''}"),
            file=self._stream or sys.stdout,
            flush=True,
        )
        self._print(trials)

    def on_trial_recover(self, iteration, trials, trial, **info):
        what = f"failed; retrying from its last checkpoint ({trial.error_file or ''})"
        print(_trial_event(self.sweep_id, trial, what), file=self._stream or sys.stdout, flush=True)

    def on_step_end(self, iteration, trials, **info):
        if time.time() - self._last >= self.every_s:
            self._print(trials)

    def on_experiment_end(self, trials, **info):
        self._print(trials)

    def _print(self, trials) -> None:
        now = time.time()
        self._last = now
        rows = progress_rows(trials, getattr(self, "planned", []), self._start, self._end, self.objective, now)
        lines = progress_lines(
            rows,
            sweep_id=self.sweep_id,
            objective=self.objective,
            concurrency=self.concurrency,
            elapsed=now - self._t0,
        )
        print("\n".join(lines), file=self._stream or sys.stdout, flush=True)


def make_progress_callback(
    sweep_id: str, objective: str, concurrency: int, every_s: float, planned: list[tuple[str, int, int]], stream=None
):
    """The sweep's progress table as a Tune callback (see :class:`_ProgressTable`); printed to `stream` (stdout)."""
    from ray.tune import Callback

    class ProgressTable(_ProgressTable, Callback):
        pass

    return ProgressTable(sweep_id, objective, concurrency, every_s, planned, stream)


__all__ = [
    "FINISHED_KEY",
    "OBJECTIVE_KEY",
    "SKIPPED_KEY",
    "STATUS_KEY",
    "SWEEP_TAG",
    "child_tags",
    "finished_child_metrics",
    "make_progress_callback",
    "open_parent_run",
    "progress_lines",
    "progress_rows",
    "sweep_children",
    "sweep_outcome",
    "tracking_target",
]
