"""The report's tables: every point of the sweep, the Fig. 4 pairs, and Tables 1–4 in the paper's layout.

A :class:`Table` is plain strings (rendered to Markdown and HTML by :mod:`reports.render`). In the paper tables our
columns (mean ± std over our seeds, our dataset and backbones named in the header) and the paper's columns (marked
"paper", with the dataset and backbone each was measured on) are never mixed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

from reports import paper
from reports.claims import prompt_set
from reports.data import (
    DATA_WAIT_KEY,
    DATA_WAIT_LIMIT,
    SweepData,
    add_derived,
    aggregate,
    backbones_label,
    by_seed,
    datasets_label,
    fmt_mean_std,
    fmt_value,
    groups,
    is_missing,
    metric_label,
    point_columns,
)
from reports.stats import diff


@dataclass
class Table:
    key: str
    title: str
    columns: list[str]
    rows: list[list[str]]
    note: str = ""
    marks: list[str] = field(default_factory=list)  # per row: "" or a warning shown beside it


def _agg_cell(runs: pd.DataFrame, metric: str, digits: int = 3) -> str:
    a = aggregate(runs, [], metric)
    if a.empty:
        return "–"
    r = a.iloc[0]
    return fmt_mean_std(r["mean"], r["std"], int(r["n"]), digits)


def _mean_cell(runs: pd.DataFrame, metric: str, fmt: str = "{:.0f}") -> str:
    ok = runs[runs["status"] == "FINISHED"]
    if metric not in ok:
        return "–"
    v = pd.to_numeric(ok[metric], errors="coerce").dropna()
    return fmt.format(v.mean()) if len(v) else "–"


def _wait_cell(runs: pd.DataFrame) -> str:
    """Mean (max) share of step time the loader made the step wait, over the group's FINISHED runs."""
    v = pd.to_numeric(runs.loc[runs["status"] == "FINISHED", "data_wait_frac"], errors="coerce").dropna()
    return "–" if v.empty else f"{v.mean():.1%} (max {v.max():.1%})"


def results_table(data: SweepData, metric: str) -> Table:
    """One row per point (arm × axis values): seeds finished, val / test (selected) / test (last weights), trainable
    parameters, step time, wall time per trial."""
    runs = add_derived(data.runs)
    by = point_columns(data)
    last = metric + "_last" if not metric.endswith("_last") else metric
    val = next((f"final/val_{k}_best" for k in ("f1_micro", "miou") if k in metric), "final/val_acc_best")
    show_method = "method" not in by  # the arms set `method=` themselves in most specs
    cols = [
        *by,
        *(["method"] if show_method else []),
        "tunable / attended prompts",
        "finished",
        f"val best ({val})",
        f"test ({metric})",
        f"test, last weights ({last})",
        "trainable params",
        "step (ms)",
        "data wait",
        "wall per trial (s)",
    ]
    rows, marks = [], []
    for vals, g in groups(runs, by):
        meth = sorted({str(m) for m in g.get("method.name", pd.Series(dtype=object)).dropna()})
        tp = g["tunable_prompts"].dropna()
        ap = g["attended_prompts"].dropna()
        prompts = f"{tp.iloc[0]:g} / {ap.iloc[0]:g}" if len(tp) and len(ap) else "–"
        n_fin = int((g["status"] == "FINISHED").sum())
        rows.append(
            [
                *(fmt_value(vals[c]) for c in by),
                *(["/".join(meth) or "–"] if show_method else []),
                prompts,
                f"{n_fin}/{len(g)}",
                _agg_cell(g, val),
                _agg_cell(g, metric),
                _agg_cell(g, last),
                _mean_cell(g, "cost/trainable_params", "{:,.0f}"),
                _mean_cell(g, "step_time_ms"),
                _wait_cell(g),
                _mean_cell(g, "wall_s"),
            ]
        )
        n_col = int(g["collapsed"].fillna(False).astype(bool).sum())
        starved = int((pd.to_numeric(g["data_wait_frac"], errors="coerce") > DATA_WAIT_LIMIT).sum())
        mark = [f"{n_col} collapsed run(s): one class predicted"] if n_col else []
        mark += [f"{starved} run(s) waited > {DATA_WAIT_LIMIT:.0%} of step time for data"] if starved else []
        marks.append("; ".join(mark))
    return Table(
        "results",
        "All points of the sweep",
        cols,
        rows,
        note=f"mean ± std over seeds (n = runs with the metric); {metric_label(metric)}; step time from "
        "perf/train_samples_per_s × batch; data wait = share of step time spent waiting for the loader "
        f"({DATA_WAIT_KEY}), flagged above {DATA_WAIT_LIMIT:.0%}; wall = MLflow run start to end.",
        marks=marks,
    )


def pairs_table(data: SweepData, metric: str) -> Table | None:
    """Fig. 4's pairs: at each tunable count, MoPE (k experts) beside the vanilla prompt of that length."""
    runs = add_derived(data.runs)
    if "method.name" not in runs:
        return None
    mope, van = runs[runs["method.name"] == "mope"], runs[runs["method.name"] == "vanilla_prompt"]
    counts = sorted(set(mope["tunable_prompts"].dropna()) & set(van["tunable_prompts"].dropna()))
    if not counts or ("data.shots" in runs and len(set(runs["data.shots"].dropna())) > 1):
        return None
    rows = []
    for c in counts:
        mv, vv = mope[mope["tunable_prompts"] == c], van[van["tunable_prompts"] == c]
        k = sorted({fmt_value(x) for x in mv["mope.num_experts"].dropna()})
        d = diff(by_seed(mv, metric), by_seed(vv, metric))
        rows.append(
            [
                f"{c:g}",
                "/".join(k),
                _agg_cell(mv, metric),
                _mean_cell(mv, "step_time_ms"),
                f"{c:g}",
                _agg_cell(vv, metric),
                _mean_cell(vv, "step_time_ms"),
                d.text(),
            ]
        )
    cols = [
        "tunable prompts per layer",
        "MoPE k",
        f"MoPE {metric}",
        "MoPE step (ms)",
        "vanilla L",
        f"vanilla {metric}",
        "vanilla step (ms)",
        "MoPE − vanilla [95% CI]",
    ]
    return Table(
        "pairs",
        "Fig. 4 pairs: MoPE and the vanilla prompt at the same tunable count",
        cols,
        rows,
        note="paired by seed; CI: Student t over the per-seed differences (see Claims).",
    )


def _ours_header(runs: pd.DataFrame, metric: str) -> str:
    return f"ours: {datasets_label(runs)}, {metric_label(metric)} ({backbones_label(runs, 'vision')} backbone)"


def _paper_cols() -> list[str]:
    return [f"paper: {c}" for c in paper.COLUMNS]


def paper_tables(data: SweepData, metric: str) -> list[Table]:
    runs = add_derived(data.runs)
    if "method.name" not in runs or runs.empty:
        return []
    out = []
    ours = _ours_header(runs, metric)
    note = (
        f"Paper columns: {paper.SOURCE}; measured on SNLI-VE / Food-101 / MM-IMDB, not on our data. Our columns: "
        "mean ± std over our seeds on the dataset named in the header."
    )
    if "data.task" in runs and "segmentation" in set(runs["data.task"].dropna()):
        return [table7(runs)]
    # Table 1: when the sweep has several methods
    methods = list(dict.fromkeys(runs["method.name"].dropna()))
    if len(methods) >= 3:
        rows = []
        # what tells one row of a method from another: MoPE's expert count k, a vanilla prompt's length L (its runs
        # carry mope.num_experts too, only as the default behind L: no expert count of their own)
        t1 = runs.assign(
            _k=[
                k if m == "mope" else None
                for m, k in zip(runs["method.name"], runs.get("mope.num_experts", [None] * len(runs)))
            ],
            _L=[L if m == "vanilla_prompt" else None for m, L in zip(runs["method.name"], runs["tunable_prompts"])],
        )
        for vals, g in groups(t1, ["method.name", "_k", "_L"]):
            meth, k, L = vals["method.name"], vals["_k"], vals["_L"]
            if is_missing(meth):  # a child run killed before its params were logged: nothing to tabulate
                continue
            vis = next(iter(g.get("vision.name", pd.Series(dtype=object)).dropna()), None)
            prow = paper.table1_row(meth, k, vis)
            p = paper.TABLE1.get(prow, ("–", "–", "–", "–"))
            name = meth + (
                f" (k={fmt_value(k)})" if not is_missing(k) else f" (L={fmt_value(L)})" if not is_missing(L) else ""
            )
            rows.append(
                [
                    name,
                    _agg_cell(g, metric),
                    _mean_cell(g, "cost/trainable_params", "{:,.0f}"),
                    prow or "(no paper row)",
                    *p,
                ]
            )
        out.append(
            Table(
                "table1",
                "Table 1: methods",
                ["method", ours, "ours: trainable params", "paper row", "paper: Param", *_paper_cols()],
                rows,
                note,
            )
        )
    mope = runs[runs["method.name"] == "mope"]
    flags = [f for f in ("mope.use_static", "mope.use_dynamic", "mope.use_mapped") if f in mope]
    if flags and any(len(set(mope[f].dropna())) > 1 for f in flags):
        m2 = mope.assign(prompts=mope.apply(prompt_set, axis=1))
        order = list(paper.TABLE2)
        rows = [
            [p, _agg_cell(g, metric), *paper.TABLE2.get(p, ("–", "–", "–"))]
            for vals, g in sorted(
                groups(m2, ["prompts"]), key=lambda t: order.index(t[0]["prompts"]) if t[0]["prompts"] in order else 99
            )
            for p in [vals["prompts"]]
        ]
        out.append(
            Table(
                "table2",
                "Table 2: prompt ablation",
                ["prompts", ours, *_paper_cols()],
                rows,
                note + " Paper: Swin-B, k=16.",
            )
        )
    for key, col, mapping, ptable, title in (
        ("table3", "mope.routing", paper.ROUTING_ROWS, paper.TABLE3, "Table 3: routing"),
        ("table4", "mope.routing_keys", paper.KEY_ROWS, paper.TABLE4, "Table 4: routing embedding (keys)"),
    ):
        if col in mope and len(set(mope[col].dropna())) > 1:
            other = "mope.routing_keys" if col == "mope.routing" else "mope.routing"
            by = [col] + ([other] if other in mope and len(set(mope[other].dropna())) > 1 else [])
            rows = []
            for vals, g in groups(mope, by):
                prow = mapping.get(vals[col])
                rows.append(
                    [
                        ", ".join(fmt_value(v) for v in vals.values()),
                        _agg_cell(g, metric),
                        prow or "(no paper row)",
                        *ptable.get(prow, ("–", "–", "–")),
                    ]
                )
            out.append(
                Table(
                    key,
                    title,
                    [" / ".join(c.split(".")[-1] for c in by), ours, "paper row", *_paper_cols()],
                    rows,
                    note + " The paper prints no std here.",
                )
            )
    return out


def table7(runs: pd.DataFrame) -> Table:
    """Table 7 (referring segmentation): ours per method on val / testA / testB (mIoU and oIoU, mean ± std over
    seeds), the text-free chance levels the dataset states, then the paper's RefCOCO and RefCOCO+ mIoU."""
    ok = runs[runs["status"] == "FINISHED"]
    splits = paper.RIS_SPLITS
    rows = []
    for vals, g in groups(ok, ["method.name"]):
        meth = vals["method.name"]
        if is_missing(meth):
            continue
        k = next(iter(g.get("mope.num_experts", pd.Series(dtype=object)).dropna()), None) if meth == "mope" else None
        prow = paper.TABLE7_ROWS.get(meth)
        rows.append(
            [
                meth + (f" (k={fmt_value(k)})" if k is not None else ""),
                *(_agg_cell(g, f"final/{sp}_miou") for sp in splits),
                *(_agg_cell(g, f"final/{sp}_oiou") for sp in splits),
                _mean_cell(g, "cost/trainable_params", "{:,.0f}"),
                prow or "(no paper row)",
                *paper.TABLE7.get(prow, ("–",) * 7),
            ]
        )
    for name, label in (
        ("all_objects_miou", "chance: every object"),
        ("random_object_miou", "chance: a random object"),
    ):
        cells = [_mean_cell(ok, f"chance/{sp}/{name}", "{:.3f}") for sp in splits]
        if any(c != "–" for c in cells):
            rows.append([label, *cells, *("–",) * 3, "–", "(text-free baseline)", *("–",) * 7])
    return Table(
        "table7",
        "Table 7: referring image segmentation (mIoU)",
        [
            "method",
            *(f"ours: {sp} mIoU" for sp in splits),
            *(f"ours: {sp} oIoU" for sp in splits),
            "ours: trainable params",
            "paper row",
            "paper: Param",
            *(f"paper: RefCOCO {sp}" for sp in splits),
            *(f"paper: RefCOCO+ {sp}" for sp in splits),
        ],
        rows,
        f"Ours: {datasets_label(ok)}, {backbones_label(ok, 'vision')} backbone, mean ± std over seeds of the adapter "
        f"selected on val mIoU (fractions; the paper prints percent). Paper columns: {paper.TABLE7_SOURCE}, not our "
        "data. mIoU = mean of per-sample IoU, oIoU = total intersection / total union. Chance rows: the IoU of a "
        "text-free answer (every object of the scene, or one at random), from the dataset's own statement.",
    )


__all__ = ["Table", "pairs_table", "paper_tables", "results_table", "table7"]
