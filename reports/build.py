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
    DATA_WAIT_LIMIT,
    ID_COLUMNS,
    SEG_COLLAPSE_KEY,
    STATUS_MISSING,
    SweepData,
    add_derived,
    aggregate,
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
        + [k for k in (COLLAPSE_KEY, SEG_COLLAPSE_KEY) if k in runs]
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
    if len(fin) and COLLAPSE_KEY not in fin and SEG_COLLAPSE_KEY not in fin:
        missing.append(
            f"{COLLAPSE_KEY} not logged by these runs (trained before the collapse detector): a run that "
            "predicts one class cannot be told apart from a learning one"
        )
    wait = pd.to_numeric(fin["data_wait_frac"], errors="coerce")
    for _, r in fin[wait > DATA_WAIT_LIMIT].iterrows():
        warnings.append(
            f"{r['label']} seed {r['seed']}: the step waited {float(r['data_wait_frac']):.1%} of its time for data "
            f"(> {DATA_WAIT_LIMIT:.0%}): its step time measures the loader, not the method; give it more loader "
            "workers (trainer.num_workers) or CPUs"
        )
    col = runs[runs["collapsed"].fillna(False).astype(bool)]
    for _, r in col.iterrows():
        if pd.notna(r.get(COLLAPSE_KEY)):
            what = f"predicts one class for {float(r[COLLAPSE_KEY]):.1%} of val"
        else:  # segmentation: its masks miss the referred object
            what = f"its masks miss the referred object on {float(r[SEG_COLLAPSE_KEY]):.1%} of val"
        warnings.append(f"{r['label']} seed {r['seed']}: collapsed ({what}): a failed run, not a result of the method")
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


# -- the parent run's page in the MLflow UI ---------------------------------------------------------------------------
NOTE_MAX_CHARS = 7500  # MLflow keeps tag values up to 8000 characters (mlflow.note.content is a tag)


def run_description(data: SweepData, rep: Report, artifact_path: str = "report") -> str:
    """The parent run's description (``mlflow.note.content``, Markdown): what the sweep is, how many trials
    finished, each claim's verdict with its deciding statistic, and where the report and figures are among the run's
    artifacts. Cut (with a note) to :data:`NOTE_MAX_CHARS`."""
    lines = [f"**Sweep {data.name}. Claims**: {_summary_line(rep)} Report: `{artifact_path}/report.html`.", ""]
    lines += [f"- {x}" for x in _meta_lines(data, rep)[:3]] + [""]
    lines += [f"Also `{artifact_path}/report.md` and `{artifact_path}/results.csv` among the artifacts.", ""]
    for i, c in enumerate(rep.claims, 1):
        lines.append(f"{i}. **{c.verdict}**: {c.text} ({c.source})")
        for r in c.rows:
            note = f"; {'; '.join(r.notes)}" if r.notes else ""
            lines.append(f"    - {r.comparison}: {r.statistic}{note} (n={r.n}): {r.verdict}")
    if rep.figures:
        lines += [
            "",
            "**Figures** (artifacts): " + ", ".join(f"`{artifact_path}/{p.name}`" for p in rep.figures.values()),
        ]
    if rep.missing:
        lines += ["", f"**Missing**: {len(rep.missing)} item(s), see the report's Missing section."]
    axes = summary_axes(data)
    if axes:
        steps = "; ".join(f"`summary/{arm}/...` by {axis}" for arm, axis in axes.items())
        lines += ["", f"**Charts** of this run's metrics (the step is the swept value): {steps}."]
    text = "\n".join(lines) + "\n"
    if len(text) > NOTE_MAX_CHARS:
        cut = text[: NOTE_MAX_CHARS - 120].rsplit("\n", 1)[0]
        text = cut + f"\n\n(cut here: the full claims table is in `{artifact_path}/report.md`)\n"
    return text


def _metric_name(metric: str) -> str:
    return metric.split("/", 1)[-1]


def summary_axes(data: SweepData) -> dict[str, str]:
    """``{arm: the column its summary series are indexed by}``: ``tunable_prompts`` when it varies within the arm (the
    expert-vs-length sweep: MoPE's k and the vanilla prompt's L meet on the tunable-prompt count, Fig. 4's x axis),
    else the one point column that varies (e.g. ``data.shots``); arms with no such integer axis are left out."""
    runs = add_derived(data.runs)
    cols = point_columns(data)
    if "arm" not in cols or runs.empty:
        return {}
    out = {}
    for arm in [a for a in dict.fromkeys(runs["arm"].dropna()) if str(a)]:
        sub = runs[runs["arm"] == arm]
        varying = [c for c in cols if c != "arm" and sub[c].dropna().nunique() > 1]
        if sub["tunable_prompts"].dropna().nunique() > 1:
            varying = ["tunable_prompts"]
        elif len(varying) != 1:
            varying = []
        if varying:
            x = pd.to_numeric(sub[varying[0]], errors="coerce").dropna()
            if len(x) and (x == x.round()).all():
                out[str(arm)] = varying[0]
    return out


def summary_series(data: SweepData, rep: Report) -> dict[str, list[tuple[int, float]]]:
    """Per arm, one series per statistic over the arm's axis (:func:`summary_axes`), step = the axis value, so that
    an MLflow chart of the parent run draws e.g. test accuracy against the tunable-prompt count:
    ``summary/<arm>/<metric>_mean`` and ``_std`` over seeds, ``summary/<arm>/step_time_ms``."""
    runs = add_derived(data.runs)
    out: dict[str, list[tuple[int, float]]] = {}
    for arm, axis in summary_axes(data).items():
        sub = runs[runs["arm"] == arm]
        for stat_metric, names in ((rep.metric, ("mean", "std")), ("step_time_ms", ("mean",))):
            for _, row in aggregate(sub, [axis], stat_metric).iterrows():
                x = pd.to_numeric(row[axis], errors="coerce")
                if pd.isna(x):
                    continue
                for n in names:
                    if pd.notna(row[n]):
                        key = (
                            f"summary/{arm}/step_time_ms"
                            if stat_metric == "step_time_ms"
                            else f"summary/{arm}/{_metric_name(stat_metric)}_{n}"
                        )
                        out.setdefault(key, []).append((int(x), float(row[n])))
    return {k: sorted(v) for k, v in out.items()}


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
