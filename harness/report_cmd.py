"""`harness report`: a sweep's figures, tables and claim verdicts, regenerated from MLflow.

    harness report --sweep expert_vs_length                 # the newest sweep of that name
    harness report --sweep expert_vs_length --sweep-id 1a2b3c4d   # an older one (id or a prefix of its spec hash)
    harness report --all                                    # every sweep in the store
    harness report --list                                   # the sweeps the store holds

Writes a self-contained folder (default ``<run_root>/reports/<sweep_id>/``): ``report.md``, ``report.html`` (figures
embedded, opens offline), one PNG + SVG per figure, ``results.csv`` (one row per trial), ``claims.json``; and logs it
as the ``report/`` artifacts of the sweep's parent run (``--no-log`` to skip). A sweep still running, failed or
missing trials and metrics absent from old runs are listed in the report's "Missing" section.

Options:
  --sweep NAME            spec name (sweeps/NAME.yaml's `name`)
  --sweep-id ID           a sweep id (name-hash8) or a prefix of its spec hash
  --all                   report every sweep in the store (each in its own folder under --out)
  --list                  list the store's sweeps and exit
  --out DIR               output folder (with --all: one sub-folder per sweep)
  --tracking-uri URI      the MLflow store (default: $MLFLOW_TRACKING_URI, else sqlite:///<run_root>/mlflow.db)
  --metric KEY            the metric compared (default final/test_acc, final/test_f1_micro for multi-label)
  --equivalence-margin X  margin of the frozen-vs-learned-keys equivalence claim (default 0.01)
  --no-log                do not log the report folder to the parent run
  --debug                 show the traceback of an unexpected error

Exit codes: 0 written; 2 a user error (unknown sweep, no store, bad option), named with the fix; 1 anything else.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # exit 2 with one line, not argparse's usage dump
        raise SystemExit(_fail(f"{message} (see `harness report --help`)"))


def _fail(msg: str, rc: int = 2) -> int:
    print(f"harness report: {msg}", file=sys.stderr)
    return rc


def default_run_root() -> Path:
    """``paths.run_root`` of the default configuration (the store `harness sweep` writes to)."""
    from harness.compose import compose

    return Path(compose([])["paths"]["run_root"]).expanduser().resolve()


def default_uri(run_root: Path) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{run_root / 'mlflow.db'}"


def report_sweeps(
    uri: str,
    *,
    name: str | None = None,
    sweep_id: str | None = None,
    every: bool = False,
    out: str | Path | None = None,
    run_root: Path | None = None,
    metric: str | None = None,
    equivalence_margin: float | None = None,
    log_to_mlflow: bool = True,
    stream=None,
) -> list[Any]:
    """Reports the selected sweeps; returns their :class:`reports.build.Report` objects.

    Raises:
        reports.mlflow_source.StoreError: no store, no such sweep (the message lists what exists).
    """
    from reports.build import build_report, run_description, summary_series
    from reports.claims import EQUIVALENCE_MARGIN
    from reports.mlflow_source import list_sweeps, load_sweep, log_report, select_sweeps

    stream = stream or sys.stdout
    chosen = select_sweeps(list_sweeps(uri), name=name, sweep_id=sweep_id, every=every)
    reports = []
    for s in chosen:
        t0 = time.perf_counter()
        data = load_sweep(uri, s)
        if out is None:
            dest = (run_root or default_run_root()) / "reports" / s["sweep_id"]
        else:
            dest = Path(out) / s["sweep_id"] if (every and len(chosen) > 1) else Path(out)
        rep = build_report(
            data,
            dest,
            metric=metric,
            equivalence_margin=EQUIVALENCE_MARGIN if equivalence_margin is None else equivalence_margin,
        )
        logged = ""
        if log_to_mlflow:
            try:
                log_report(
                    uri,
                    s["run_id"],
                    dest,
                    description=run_description(data, rep),
                    series=summary_series(data, rep),
                    figures=rep.figures,
                )
                logged = f"; logged to parent run {s['run_id']} (artifacts report/)"
            except Exception as e:  # noqa: BLE001 - the folder is written; the store may be read-only
                logged = f"; NOT logged to MLflow ({type(e).__name__}: {str(e)[:200]})"
        n_fin = int((data.runs["status"] == "FINISHED").sum())
        print(
            f"[{s['sweep_id']}] report: {dest / 'report.html'} ({n_fin}/{len(data.runs)} trials FINISHED, "
            f"{len(rep.figures)} figure(s), {len(rep.claims)} claim(s), {time.perf_counter() - t0:.1f}s){logged}",
            file=stream,
            flush=True,
        )
        for key, png in rep.figures.items():
            print(f"  figure {key}: {png}", file=stream)
        for sk in rep.skipped:
            print(f"  not drawn: {sk.title}: {sk.reason}", file=stream)
        for c in rep.claims:
            print(f"  claim {c.key}: {c.verdict}", file=stream)
        if rep.missing:
            print(f"  missing: {len(rep.missing)} item(s), see the report's Missing section", file=stream)
        for w in rep.warnings:
            print(f"  warning: {w}", file=stream)
        reports.append(rep)
    return reports


def main(argv: list[str] | None = None) -> int:
    argv = list(argv or [])
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    p = _Parser(prog="harness report", add_help=False)
    p.add_argument("--sweep")
    p.add_argument("--sweep-id")
    p.add_argument("--all", action="store_true")
    p.add_argument("--list", action="store_true")
    p.add_argument("--out")
    p.add_argument("--tracking-uri")
    p.add_argument("--metric")
    p.add_argument("--equivalence-margin", type=float)
    p.add_argument("--no-log", action="store_true")
    p.add_argument("--debug", action="store_true")
    try:
        a = p.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    from reports.mlflow_source import StoreError, list_sweeps

    try:
        run_root = None if (a.tracking_uri and a.out) else default_run_root()
        uri = a.tracking_uri or default_uri(run_root)
        if a.list:
            sweeps = list_sweeps(uri)
            if not sweeps:
                return _fail(f"the store {uri} holds no sweep: run `harness sweep SPEC` first")
            for s in sweeps:
                when = time.strftime("%Y-%m-%d %H:%M", time.localtime((s["started"] or 0) / 1000))
                print(
                    f"{s['sweep_id']:<32} {s['spec_name']:<20} {s['status']:<9} {when}  profile {s['profile'] or '-'}"
                )
            return 0
        if not (a.sweep or a.sweep_id or a.all):
            return _fail("name a sweep: --sweep NAME, --sweep-id ID or --all (`--list` shows the store's sweeps)")
        report_sweeps(
            uri,
            name=a.sweep,
            sweep_id=a.sweep_id,
            every=a.all,
            out=a.out,
            run_root=run_root,
            metric=a.metric,
            equivalence_margin=a.equivalence_margin,
            log_to_mlflow=not a.no_log,
        )
        return 0
    except StoreError as e:
        return _fail(str(e))
    except Exception as e:
        if a.debug:
            raise
        return _fail(f"unexpected error: {type(e).__name__}: {e} (re-run with --debug for the traceback)", 1)


__all__ = ["default_run_root", "default_uri", "main", "report_sweeps"]
