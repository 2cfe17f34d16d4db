"""Builds a sweep's report folder from a :class:`~reports.data.SweepData`: ``report.md``, ``report.html`` (figures
embedded), one PNG + SVG per figure, ``results.csv`` (one row per trial) and ``claims.json``.

Nothing here reads MLflow; a report is a function of the tables (tests build them by hand).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from reports import render
from reports.claims import EQUIVALENCE_MARGIN, Claim, claims_summary, evaluate_claims
from reports.data import (
    COLLAPSE_KEY,
    CONFIG_KEYS,
    ID_COLUMNS,
    STATUS_MISSING,
    SweepData,
    add_derived,
    metric_label,
    point_columns,
    primary_metric,
)
from reports.figures import Figure, Skipped, build_figures
from reports.stats import CONFIDENCE
from reports.tables import Table, pairs_table, paper_tables, results_table


@dataclass
class Report:
    out_dir: Path
    metric: str
    claims: list[Claim]
    figures: dict[str, Path]  # figure key -> PNG path
    skipped: list[Skipped]
    tables: list[Table]
    missing: list[str]
    warnings: list[str]
    files: list[Path] = field(default_factory=list)

    @property
    def verdicts(self) -> dict[str, str]:
        return {c.key: c.verdict for c in self.claims}


def results_frame(data: SweepData) -> pd.DataFrame:
    """results.csv: one row per trial (planned trials without a run included), identity, arm and axes, seed, the
    configuration values the report reads, every final/*, perf/*, cost/* metric, status and wall time."""
    runs = add_derived(data.runs)
    metric_cols = (
        sorted(c for c in runs.columns if c.startswith("final/"))
        + sorted(c for c in runs.columns if c.startswith(("perf/", "cost/")))
        + ([COLLAPSE_KEY] if COLLAPSE_KEY in runs else [])
    )
    first = [c for c in ("arm", *point_columns(data), "seed", "status", "wall_s") if c in runs]
    first = list(dict.fromkeys(first))
    rest = [
        c
        for c in (
            *ID_COLUMNS,
            *CONFIG_KEYS,
            "tunable_prompts",
            "attended_prompts",
            "step_time_ms",
            "collapsed",
            "error",
        )
        if c in runs and c not in first
    ]
    cols = list(dict.fromkeys([*first, *metric_cols, *rest]))
    return runs[cols]


def missing_items(data: SweepData, metric: str) -> tuple[list[str], list[str]]:
    """(missing, warnings): what the report could not use, each naming the trials / metrics and the cause."""
    runs = add_derived(data.runs)
    missing, warnings = list(data.notes), []
    status = data.meta.get("status")
    n_fin = int((runs["status"] == "FINISHED").sum())
    if status == "RUNNING":
        missing.append(
            f"the sweep is still running (parent run RUNNING): {n_fin} of {len(runs)} trials FINISHED so "
            "far; this report covers those. Re-run `harness report` when it ends."
        )
    for _, r in runs[runs["status"] != "FINISHED"].iterrows():
        who = f"{r['label']} seed {r['seed']}"
        if r["status"] == STATUS_MISSING:
            missing.append(f"{who}: no MLflow child run (not started yet, or launched against another store)")
        elif r["status"] == "RUNNING":
            missing.append(f"{who}: still RUNNING (run {r['run_id']})")
        else:
            err = r.get("error")
            cause = f": {str(err).splitlines()[0][:300]}" if isinstance(err, str) and err else ""
            missing.append(f"{who}: {r['status']} (run {r['run_id']}){cause}")
    fin = runs[runs["status"] == "FINISHED"]
    needed = {
        metric: "the report's metric",
        "perf/train_samples_per_s": "Fig. 4 step-time panel",
        "cost/trainable_params": "trainable-parameter column",
    }
    for key, why in needed.items():
        lacking = fin[fin[key].isna()] if key in fin else fin
        if len(lacking):
            names = ", ".join(f"{a}-s{s}" for a, s in zip(lacking["label"], lacking["seed"]))
            missing.append(f"{key} ({why}) absent from {len(lacking)} FINISHED run(s): {names[:400]}")
    mope = fin[fin.get("method.name", pd.Series(dtype=object)) == "mope"] if "method.name" in fin else fin.iloc[0:0]
    if "mope.use_dynamic" in mope:  # Table-2 rows without P_d have no router, hence no routing history to miss
        mope = mope[mope["mope.use_dynamic"].map(lambda v: v is not False)]
    if len(mope):
        have = set(data.history[data.history["key"] == "routing/entropy"]["run_id"]) if len(data.history) else set()
        lacking = mope[~mope["run_id"].isin(have)]
        if len(lacking):
            missing.append(
                f"routing/entropy history absent from {len(lacking)} FINISHED MoPE run(s) (Fig. 6, "
                "Fig. 7 and the importance-loss claim need it)"
            )
    if len(fin) and COLLAPSE_KEY not in fin:
        missing.append(
            f"{COLLAPSE_KEY} not logged by these runs (trained before the collapse detector): a run that "
            "predicts one class cannot be told apart from a learning one"
        )
    col = runs[runs["collapsed"].fillna(False).astype(bool)]
    for _, r in col.iterrows():
        warnings.append(
            f"{r['label']} seed {r['seed']}: collapsed (predicts one class for "
            f"{float(r[COLLAPSE_KEY]):.1%} of val): a failed run, not a result of the method"
        )
    return missing, warnings


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def build_report(
    data: SweepData, out_dir: str | Path, *, metric: str | None = None, equivalence_margin: float = EQUIVALENCE_MARGIN
) -> Report:
    """Writes the report folder and returns what it holds."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metric = metric or primary_metric(data.runs)
    claims = evaluate_claims(data, metric, equivalence_margin=equivalence_margin)
    figs, skipped = {}, []
    captions: dict[str, tuple[str, str]] = {}
    for f in build_figures(data, metric):
        if isinstance(f, Figure):
            figs[f.key] = f.save(out)["png"]
            captions[f.key] = (f.title, f.caption)
        else:
            skipped.append(f)
    tables = [results_table(data, metric)]
    if (p := pairs_table(data, metric)) is not None:
        tables.append(p)
    tables += paper_tables(data, metric)
    missing, warnings = missing_items(data, metric)
    rep = Report(out, metric, claims, figs, skipped, tables, missing, warnings)

    csv_path = out / "results.csv"
    results_frame(data).to_csv(csv_path, index=False)
    claims_path = out / "claims.json"
    _atomic_write(
        claims_path,
        json.dumps(
            [
                {
                    "key": c.key,
                    "claim": c.text,
                    "source": c.source,
                    "verdict": c.verdict,
                    "rule": c.rule,
                    "rows": [r.__dict__ for r in c.rows],
                }
                for c in claims
            ],
            indent=2,
        ),
    )
    md, page = _markdown(data, rep, captions), _html(data, rep, captions)
    _atomic_write(out / "report.md", md)
    _atomic_write(out / "report.html", page)
    rep.files = [out / "report.md", out / "report.html", csv_path, claims_path] + [
        p for k in figs for p in (figs[k], figs[k].with_suffix(".svg"))
    ]
    return rep


def _meta_lines(data: SweepData, rep: Report) -> list[str]:
    m = data.meta
    runs = data.runs
    n_fin = int((runs["status"] == "FINISHED").sum())
    axes = "; ".join(f"{k} = {v}" for k, v in data.axes.items()) or "–"
    started = m.get("started")
    when = (
        time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started / 1000)) if isinstance(started, (int, float)) else "?"
    )
    return [
        f"sweep `{m.get('sweep_id', '?')}` (spec `{m.get('spec_name', '?')}`, profile `{m.get('profile') or '-'}`, "
        f"spec hash `{str(m.get('spec_hash', '?'))[:16]}`), started {when}, parent run status {m.get('status', '?')}",
        f"trials: {n_fin} of {len(runs)} FINISHED; arms: {', '.join(m.get('arms') or []) or '–'}; axes: {axes}; "
        f"seeds: {m.get('seeds') or sorted(set(runs['seed'].dropna().astype(int)))}",
        f"metric: `{rep.metric}` ({metric_label(rep.metric)}); statistics: mean ± std over seeds, differences paired "
        f"by seed with a {CONFIDENCE:.0%} Student-t interval",
        f"MLflow: {m.get('tracking_uri', '?')}, parent run `{m.get('parent_run_id', '?')}`; git "
        f"{str(m.get('git_sha') or '?')[:12]}; report written {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}",
    ]


def _summary_line(rep: Report) -> str:
    s = claims_summary(rep.claims)
    return (
        f"{len(rep.claims)} claim(s) decidable from this sweep: {s['supported']} supported, "
        f"{s['not supported']} not supported, {s['inconclusive']} inconclusive."
    )


def _markdown(data: SweepData, rep: Report, captions: dict[str, tuple[str, str]]) -> str:
    lines = [f"# Report: {data.name}", ""] + [f"- {x}" for x in _meta_lines(data, rep)] + [""]
    lines += ["## Claims", "", _summary_line(rep), ""] + render.md_claims(rep.claims)
    lines += ["## Figures", ""]
    for key, png in rep.figures.items():
        title, cap = captions[key]
        lines += [
            f"### {title}",
            "",
            f"![{title}]({png.name})",
            "",
            f"{cap} ([SVG]({png.with_suffix('.svg').name}))",
            "",
        ]
    if rep.skipped:
        lines += ["Not drawn:", ""] + [f"- {s.title}: {s.reason}" for s in rep.skipped] + [""]
    lines += ["## Tables", ""]
    for t in rep.tables:
        lines += render.md_table(t)
    lines += (
        ["## Missing", ""]
        + (
            [f"- {x}" for x in rep.missing]
            or ["Nothing: every planned trial FINISHED with every metric the report reads."]
        )
        + [""]
    )
    if rep.warnings:
        lines += ["## Warnings", ""] + [f"- {x}" for x in rep.warnings] + [""]
    lines += ["Files: `results.csv` (one row per trial), `claims.json`, one PNG and SVG per figure.", ""]
    return "\n".join(lines)


def _html(data: SweepData, rep: Report, captions: dict[str, tuple[str, str]]) -> str:
    e = render.esc
    parts = [
        f"<!doctype html><html lang=en><head><meta charset=utf-8><title>Report: {e(data.name)}</title>"
        f"<style>{render.CSS}</style></head><body>",
        f"<h1>Report: {e(data.name)}</h1>",
        '<ul class="meta">',
    ]
    parts += [f"<li>{e(x).replace('`', '')}</li>" for x in _meta_lines(data, rep)]
    parts += [
        "</ul>",
        "<h2>Claims</h2>",
        f"<p>{e(_summary_line(rep))}</p>",
        render.html_claims(rep.claims),
        "<h2>Figures</h2>",
    ]
    for key, png in rep.figures.items():
        title, cap = captions[key]
        parts.append(render.html_figure(title, cap, png))
    if rep.skipped:
        parts += ["<p>Not drawn:</p>", render.html_list([f"{s.title}: {s.reason}" for s in rep.skipped])]
    parts.append("<h2>Tables</h2>")
    parts += [render.html_table(t) for t in rep.tables]
    parts += ["<h2>Missing</h2>", render.html_list(rep.missing)]
    if rep.warnings:
        parts += ["<h2>Warnings</h2>", render.html_list(rep.warnings)]
    parts.append(
        '<p class="note">Files beside this page: <a href="results.csv">results.csv</a>, '
        '<a href="claims.json">claims.json</a>, one PNG and SVG per figure.</p></body></html>'
    )
    return "\n".join(parts)


__all__ = ["Report", "build_report", "missing_items", "results_frame"]
