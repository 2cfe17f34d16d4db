"""The paper's figures from a :class:`~reports.data.SweepData` (matplotlib, Agg backend; PNG + SVG each).

Each builder returns a :class:`Figure` or, when the sweep lacks the runs or metrics it needs, a :class:`Skipped` that
says why. Means ± std over seeds; n is given in every legend entry.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd

from reports.claims import importance_matrix
from reports.data import (
    SweepData,
    add_derived,
    aggregate,
    backbones_label,
    datasets_label,
    fmt_value,
    groups,
    is_missing,
    metric_label,
)
from reports.stats import cv

COLORS = {
    "mope": "#1f6fb4",
    "vanilla_prompt": "#d95f02",
    "sequential_fuse": "#2a9d55",
    "p_sequential_fuse": "#7b3294",
    "dense": "#1f6fb4",
    "top1_scaled": "#d95f02",
    "top1_hard": "#7b3294",
}
FALLBACK = ["#1f6fb4", "#d95f02", "#2a9d55", "#7b3294", "#e7298a", "#66a61e", "#a6761d", "#666666"]
METHOD_NAMES = {
    "mope": "MoPE",
    "vanilla_prompt": "vanilla prompt",
    "sequential_fuse": "SequentialFuse (FT)",
    "p_sequential_fuse": "P-SequentialFuse",
    "late_concat": "LateConcat (FT)",
    "p_late_concat": "P-LateConcat",
    "img_only": "ImgOnly (FT)",
    "text_only": "TextOnly (FT)",
    "p_img_only": "P-ImgOnly",
    "p_text_only": "P-TextOnly",
    "promptfuse": "PromptFuse",
}


@dataclass
class Figure:
    key: str  # file stem, e.g. fig4_expert_vs_length
    title: str
    caption: str
    fig: Any  # matplotlib Figure

    def save(self, out_dir: Path) -> dict[str, Path]:
        paths = {}
        for ext in ("png", "svg"):
            p = out_dir / f"{self.key}.{ext}"
            self.fig.savefig(p, dpi=150 if ext == "png" else None, bbox_inches="tight")
            paths[ext] = p
        plt.close(self.fig)
        return paths


@dataclass
class Skipped:
    key: str
    title: str
    reason: str


FIGURE_TITLES = {
    "fig4_expert_vs_length": "Fig. 4: expert scaling vs length scaling",
    "fig5_data_scaling": "Fig. 5: data scaling",
    "fig6_routing_entropy": "Fig. 6: routing entropy over training",
    "fig7_expert_importance": "Fig. 7: expert importance over training",
    "masks_val": "Predicted masks on val images (referring segmentation)",
}


def build_figures(data: SweepData, metric: str) -> list[Figure | Skipped]:
    runs = add_derived(data.runs)
    if "data.task" in runs and "segmentation" in set(runs["data.task"].dropna()):
        return [fig_masks(data, runs), fig6(data, runs), fig7(data, runs)]
    return [fig4(runs, metric), fig5(runs, metric), fig6(data, runs), fig7(data, runs)]


MASK_ROWS = 6


def fig_masks(data: SweepData, runs: pd.DataFrame, rows: int = MASK_ROWS) -> Figure | Skipped:
    """A grid: one val sample per row (image with its expression, ground truth), then each arm's predicted mask
    (sigmoid > 0.5 over the image, with that sample's IoU). The same samples for every arm (val order is fixed)."""
    import numpy as np

    key, title = "masks_val", FIGURE_TITLES["masks_val"]
    by_run = {r["run_id"]: r for _, r in runs.iterrows() if r.get("run_id") in data.mask_examples}
    if not by_run:
        return Skipped(key, title, "no finished segmentation run logged its mask examples (mask_examples/)")
    order = {m: i for i, m in enumerate(["mope", "sequential_fuse", "p_sequential_fuse"])}
    arms = sorted(by_run.items(), key=lambda kv: (order.get(kv[1].get("method.name"), 9), str(kv[1].get("arm"))))
    ref = data.mask_examples[arms[0][0]]
    n = min(rows, len(ref["keys"]))
    cols = 2 + len(arms)
    fig, axes = plt.subplots(n, cols, figsize=(1.9 * cols, 1.9 * n + 0.3), squeeze=False)

    def spotlight(ax, img, mask):
        """The image at full brightness inside `mask` and dimmed to a quarter outside: a tint would blend with the
        objects' own colours (a yellow mask over a yellow shape vanishes), a spotlight reads the same on any image."""
        im = np.asarray(img, dtype=np.float32)
        im = im / 255.0 if im.max() > 1.0 else im
        keep = (np.asarray(mask) > 0)[..., None] if im.ndim == 3 else np.asarray(mask) > 0
        ax.imshow(np.where(keep, im, 0.25 * im), interpolation="nearest")

    for i in range(n):
        k = ref["keys"][i]
        img, gt = ref["image"][i], ref["mask"][i]
        axes[i][0].imshow(img, interpolation="nearest")
        axes[i][0].set_title(_wrap(ref["texts"][i]), fontsize=7)
        spotlight(axes[i][1], img, gt)
        axes[i][1].set_title("ground truth" if i == 0 else "", fontsize=8)
        for j, (run_id, r) in enumerate(arms):
            ex = data.mask_examples[run_id]
            if k not in ex["keys"]:
                axes[i][2 + j].text(0.5, 0.5, "sample not logged", ha="center", va="center", fontsize=7)
                continue
            idx = ex["keys"].index(k)
            meth = str(r.get("method.name"))
            spotlight(axes[i][2 + j], img, ex["prob"][idx] > 127)
            if gt.any():  # the ground truth's outline over every prediction
                axes[i][2 + j].contour(gt, levels=[0.5], colors="white", linewidths=0.9)
            for side in axes[i][2 + j].spines.values():  # the arm's colour on the frame, as in the other figures
                side.set_edgecolor(COLORS.get(meth, FALLBACK[j % len(FALLBACK)]))
                side.set_linewidth(2.0)
            head = f"{METHOD_NAMES.get(meth, meth)} (s{fmt_value(r.get('seed'))})\n" if i == 0 else ""
            axes[i][2 + j].set_title(f"{head}IoU {ex['iou'][idx]:.2f}", fontsize=7)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"{title}: {_setting(runs)}", fontsize=9)
    fig.tight_layout()
    caption = (
        f"The first {n} val samples in the split's fixed order (not picked): the image with its referring expression, "
        "the ground-truth mask, and each arm's prediction (sigmoid > 0.5) of its lowest-seed run with the adapter "
        "selected on val, with that sample's IoU. A mask is shown lit and the rest of the image dimmed; each "
        "prediction is framed in its arm's colour with the ground truth outlined in white."
    )
    return Figure(key, title, caption, fig)


def _wrap(text: str, width: int = 26) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(f'"{text}"', width)[:3])


def _setting(runs: pd.DataFrame) -> str:
    """'timm_vit demo/vision_encoder + minilm on demo' from the runs' configs."""
    return f"{backbones_label(runs, 'vision')} + {backbones_label(runs, 'text')} on {datasets_label(runs)}"


def _errorbar(ax, agg: pd.DataFrame, x: str, color: str, label: str, marker: str = "o", ls: str = "-") -> None:
    agg = agg.sort_values(x)
    ax.errorbar(
        agg[x].astype(float),
        agg["mean"],
        yerr=agg["std"].fillna(0.0),
        color=color,
        marker=marker,
        ls=ls,
        capsize=3,
        lw=1.6,
        ms=5,
        label=label,
    )


def _n_text(agg: pd.DataFrame) -> str:
    ns = sorted({int(n) for n in agg["n"]})
    return f"n={ns[0]}" if len(ns) == 1 else f"n={min(ns)}–{max(ns)}"


# -- Fig. 4 -----------------------------------------------------------------------------------------------------------
def fig4(runs: pd.DataFrame, metric: str) -> Figure | Skipped:
    key = "fig4_expert_vs_length"
    title = FIGURE_TITLES[key]
    m = (
        runs[runs.get("method.name", pd.Series(dtype=object)).isin(["mope", "vanilla_prompt"])]
        if "method.name" in runs
        else runs.iloc[0:0]
    )
    have = (
        {
            meth: sorted(
                {int(x) for x in m[(m["method.name"] == meth) & m["tunable_prompts"].notna()]["tunable_prompts"]}
            )
            for meth in ("mope", "vanilla_prompt")
        }
        if not m.empty
        else {"mope": [], "vanilla_prompt": []}
    )
    if len(have["mope"]) < 2 and len(have["vanilla_prompt"]) < 2:
        return Skipped(
            key,
            title,
            "needs MoPE runs over ≥ 2 expert counts and/or vanilla-prompt runs over ≥ 2 "
            f"lengths (this sweep has MoPE counts {have['mope']}, vanilla "
            f"{have['vanilla_prompt']})",
        )
    if "data.shots" in m and len(set(m["data.shots"].dropna())) > 1:
        return Skipped(key, title, "the sweep varies data.shots: see Fig. 5 (Fig. 4 is drawn at one data size)")
    agg = aggregate(m, ["method.name", "tunable_prompts", "mope.num_experts", "attended_prompts"], metric)
    if agg.empty:
        return Skipped(key, title, f"no FINISHED run has {metric}")
    speed = aggregate(m, ["method.name", "tunable_prompts"], "step_time_ms")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    ax, ax2 = axes
    for meth, marker in (("mope", "o"), ("vanilla_prompt", "s")):
        a = agg[agg["method.name"] == meth]
        if a.empty:
            continue
        if meth == "mope":
            lab = f"MoPE (k experts, l={_fmt_l(m)}; attends {fmt_value(a['attended_prompts'].iloc[0])}), {_n_text(a)}"
        else:
            lab = f"vanilla prompt (length L, attends all L), {_n_text(a)}"
        _errorbar(ax, a, "tunable_prompts", COLORS[meth], lab, marker)
        for _, r in a.iterrows():
            txt = f"k={fmt_value(r['mope.num_experts'])}" if meth == "mope" else f"L={r['tunable_prompts']:g}"
            ax.annotate(
                txt,
                (r["tunable_prompts"], r["mean"]),
                textcoords="offset points",
                xytext=(4, 6 if meth == "mope" else -12),
                fontsize=7,
                color=COLORS[meth],
            )
        s = speed[speed["method.name"] == meth]
        if not s.empty:
            _errorbar(ax2, s, "tunable_prompts", COLORS[meth], f"{METHOD_NAMES[meth]}, {_n_text(s)}", marker)
    # pairs: the same tunable count on both arms
    both = sorted(
        set(agg[agg["method.name"] == "mope"]["tunable_prompts"])
        & set(agg[agg["method.name"] == "vanilla_prompt"]["tunable_prompts"])
    )
    for c in both:
        ys = agg[agg["tunable_prompts"] == c]["mean"]
        ax.plot([c, c], [ys.min(), ys.max()], color="#999999", lw=0.8, ls=":", zorder=0)
    for a_ in axes:
        a_.set_xscale("log", base=2)
        a_.margins(x=0.1)  # room for the k=/L= labels of the last point
        xs = sorted(set(agg["tunable_prompts"]))
        a_.set_xticks(xs, [f"{x:g}" for x in xs])
        a_.minorticks_off()
        a_.set_xlabel("tunable prompts per layer (MoPE: (k+1)·l+1; vanilla: L)")
        a_.grid(alpha=0.3)
    ax.set_ylabel(metric_label(metric))
    ax.set_title("accuracy vs tunable prompts (dotted: paired points)", fontsize=10)
    ax.legend(fontsize=7, loc="best")
    if speed.empty or speed["mean"].isna().all():
        ax2.text(
            0.5, 0.5, "no perf/train_samples_per_s in these runs", ha="center", va="center", transform=ax2.transAxes
        )
    else:
        ax2.set_ylabel("train step time (ms per step)")
        ax2.set_title(f"step time (batch {_fmt_col(m, 'trainer.batch_size')})", fontsize=10)
        ax2.legend(fontsize=7, loc="best")
    fig.suptitle(f"{title} — {_setting(m)}", fontsize=11)
    fig.tight_layout()
    cap = (
        f"{metric_label(metric)} (mean ± std over seeds) against the number of tunable prompts per layer, MoPE "
        "(grows k at fixed l, attention length fixed at 2l+1) and a vanilla prompt of the same tunable count "
        "(attention length L); right: training step time from perf/train_samples_per_s."
    )
    return Figure(key, title, cap, fig)


def _fmt_l(runs: pd.DataFrame) -> str:
    return _fmt_col(runs[runs["method.name"] == "mope"], "mope.prompt_len")


def _fmt_col(runs: pd.DataFrame, col: str) -> str:
    vals = sorted({fmt_value(v) for v in runs.get(col, pd.Series(dtype=object)).tolist() if not is_missing(v)})
    return "/".join(vals) or "?"


# -- Fig. 5 -----------------------------------------------------------------------------------------------------------
def fig5(runs: pd.DataFrame, metric: str) -> Figure | Skipped:
    key = "fig5_data_scaling"
    title = FIGURE_TITLES[key]
    if "data.shots" not in runs:
        return Skipped(key, title, "the sweep has no data.shots values (not a data-scaling sweep)")
    shots = runs["data.shots"]
    distinct = set(shots.dropna()) | ({None} if shots.isna().any() else set())
    if len(distinct) < 2:
        return Skipped(key, title, f"needs ≥ 2 shot counts; this sweep has {sorted(map(str, distinct))}")
    finite = sorted(float(s) for s in shots.dropna())
    full_x = (max(finite) * 4) if finite else 1.0
    r = runs.assign(shots_x=shots.astype(float).fillna(full_x))
    r = r.assign(series=r.apply(_series_label, axis=1))
    agg = aggregate(r, ["series", "method.name", "shots_x"], metric)
    if agg.empty:
        return Skipped(key, title, f"no FINISHED run has {metric}")
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for i, (vals, a) in enumerate(groups(agg, ["series"])):
        meth = a["method.name"].iloc[0]
        _errorbar(
            ax,
            a,
            "shots_x",
            COLORS.get(meth, FALLBACK[i % len(FALLBACK)]),
            f"{vals['series']}, {_n_text(a)}",
            "osD^v<>"[i % 7],
        )
    ax.set_xscale("log")
    xs = sorted(set(agg["shots_x"]))
    ax.set_xticks(xs, ["full" if (shots.isna().any() and x == full_x) else f"{x:g}" for x in xs])
    ax.minorticks_off()
    ax.set_xlabel("training examples (#shots, log scale; seeded nested subsets)")
    ax.set_ylabel(metric_label(metric))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    ax.set_title(
        f"{title} ({datasets_label(r)}): {metric_label(metric)} vs training examples\n"
        f"{backbones_label(r, 'vision')} + {backbones_label(r, 'text')}",
        fontsize=10,
    )
    fig.tight_layout()
    cap = (
        f"{metric_label(metric)} (mean ± std over seeds) against the number of training examples, one line per method."
    )
    return Figure(key, title, cap, fig)


def _series_label(row: pd.Series) -> str:
    meth = row.get("method.name")
    name = METHOD_NAMES.get(meth, str(meth))
    if meth == "mope" and not is_missing(row.get("mope.num_experts")):
        return f"{name} k={fmt_value(row['mope.num_experts'])}"
    if meth == "vanilla_prompt" and not is_missing(row.get("tunable_prompts")):
        return f"{name} L={row['tunable_prompts']:g}"
    return name


# -- Fig. 6 -----------------------------------------------------------------------------------------------------------
def _curve(history: pd.DataFrame, run_ids: list[str], key: str) -> pd.DataFrame:
    """step -> mean, std, n of one metric over runs (steps every run logged)."""
    h = history[(history["key"] == key) & history["run_id"].isin(run_ids)]
    if h.empty:
        return pd.DataFrame(columns=["step", "mean", "std", "n"])
    g = h.groupby("step")["value"]
    return pd.DataFrame({"mean": g.mean(), "std": g.std(ddof=1), "n": g.count()}).reset_index()


def fig6(data: SweepData, runs: pd.DataFrame) -> Figure | Skipped:
    key = "fig6_routing_entropy"
    title = FIGURE_TITLES[key]
    m = (
        runs[(runs.get("method.name", pd.Series(dtype=object)) == "mope") & runs["run_id"].notna()]
        if "method.name" in runs
        else runs.iloc[0:0]
    )
    ent = data.history[data.history["key"] == "routing/entropy"] if not data.history.empty else data.history
    have = set(ent["run_id"]) if not ent.empty else set()
    m = m[m["run_id"].isin(have)]
    if m.empty:
        return Skipped(
            key,
            title,
            "no MoPE run logged routing/entropy (old runs, or trainer.routing_stats_every_steps larger than the run)",
        )
    by = [
        c
        for c in ("mope.routing", "mope.routing_keys", "mope.imp_loss_weight", "mope.num_experts")
        if c in m and len(set(map(str, m[c]))) > 1
    ]
    if not by:
        return Skipped(
            key,
            title,
            "every MoPE run has the same routing settings: Fig. 6 compares dense vs top-1 "
            "(and frozen vs learned keys); run sweeps/routing.yaml",
        )
    fig, ax = plt.subplots(figsize=(9.0, 4.4))
    kmax = 0
    drawn: dict[str, set[str | None]] = {}  # line style -> the routing keys of the lines drawn in it
    for i, (vals, g) in enumerate(groups(m, by)):
        c = _curve(data.history, list(g["run_id"]), "routing/entropy")
        if c.empty:
            continue
        color = COLORS.get(vals.get("mope.routing"), FALLBACK[i % len(FALLBACK)])
        keys = _routing_keys(g)
        ls = "--" if keys == "learned" else "-"
        drawn.setdefault(ls, set()).add(keys)
        lab = ", ".join(fmt_value(v) for v in vals.values()) + f" (n={int(c['n'].max())})"
        ax.plot(c["step"], c["mean"], color=color, ls=ls, lw=1.5, label=lab)
        ax.fill_between(
            c["step"], c["mean"] - c["std"].fillna(0), c["mean"] + c["std"].fillna(0), color=color, alpha=0.12, lw=0
        )
        kmax = max([kmax] + [int(k) for k in g.get("mope.num_experts", pd.Series(dtype=float)).dropna()])
    if kmax:
        ax.axhline(math.log2(kmax), color="#999999", lw=0.8, ls=":", label=f"uniform over k={kmax}: log2 k")
    ax.set_xlabel("training step")
    ax.set_ylabel("routing entropy H(r) (bits; mean over batch and routed blocks)")
    ax.grid(alpha=0.3)
    ax.legend(
        fontsize=7,
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
        title=" / ".join(b.split(".")[-1] for b in by),
        title_fontsize=7,
    )
    ax.set_title(f"{title} — {_setting(m)}", fontsize=10)
    fig.tight_layout()
    cap = (
        "Routing entropy −Σ r log2 r on the pre-top-1 softmax scores, averaged over the batch and all routed "
        "blocks, against the training step; mean ± std over seeds (band)." + _keys_caption(drawn)
    )
    return Figure(key, title, cap, fig)


KEY_NAMES = {"frozen_orthogonal": "frozen orthogonal keys", "learned": "learned keys"}


def _routing_keys(runs: pd.DataFrame) -> str | None:
    """The one mope.routing_keys value of a group of runs (None: not logged, or mixed)."""
    vals = {str(v) for v in runs.get("mope.routing_keys", pd.Series(dtype=object)) if not is_missing(v)}
    return vals.pop() if len(vals) == 1 else None


def _keys_caption(drawn: dict[str, set[str | None]]) -> str:
    """What the line styles of Fig. 6 mean, naming only the styles drawn (dashed = learned keys, solid = the rest);
    nothing where no line's keys are known."""

    def names(ls: str) -> str:
        ks = sorted(drawn[ls], key=lambda k: (k is None, str(k)))
        return " / ".join("keys not logged" if k is None else KEY_NAMES.get(k, f"{k} keys") for k in ks)

    if "-" in drawn and "--" in drawn:
        return f" Solid: {names('-')}, dashed: {names('--')}."
    if len(drawn) != 1 or None in next(iter(drawn.values())):
        return ""  # nothing drawn, or keys unknown for some lines: no line style to explain
    return f" All runs use {names(next(iter(drawn)))}."


# -- Fig. 7 -----------------------------------------------------------------------------------------------------------
def fig7(data: SweepData, runs: pd.DataFrame) -> Figure | Skipped:
    key = "fig7_expert_importance"
    title = FIGURE_TITLES[key]
    m = (
        runs[(runs.get("method.name", pd.Series(dtype=object)) == "mope") & runs["run_id"].notna()]
        if "method.name" in runs
        else runs.iloc[0:0]
    )
    if "mope.imp_loss_weight" not in m or len(set(m["mope.imp_loss_weight"].dropna())) < 2:
        return Skipped(
            key,
            title,
            "needs MoPE runs with and without the importance loss (mope.imp_loss_weight "
            "axis); run sweeps/importance_loss.yaml",
        )
    mats: dict[float, list[pd.DataFrame]] = {}
    for _, r in m.iterrows():
        mat = importance_matrix(data.history, r["run_id"])
        if not mat.empty:
            mats.setdefault(float(r["mope.imp_loss_weight"]), []).append(mat)
    if len(mats) < 2:
        return Skipped(
            key,
            title,
            f"routing/importance_last/e* history is missing for one side (runs with weights {sorted(mats)} have it)",
        )
    ws = sorted(mats, reverse=True)
    fig, axes = plt.subplots(
        1,
        len(ws) + 2,
        figsize=(4.2 * (len(ws) + 1) + 0.6, 4.0),
        layout="constrained",
        gridspec_kw={"width_ratios": [1] * len(ws) + [0.05, 1.1]},
    )
    mean_mats = {}
    for w in ws:
        steps = sorted(set.intersection(*[set(x.index) for x in mats[w]]))
        mean_mats[w] = sum(x.loc[steps] for x in mats[w]) / len(mats[w])
    vmax = max(float(x.to_numpy().max()) for x in mean_mats.values())
    for ax, w in zip(axes, ws):
        mm = mean_mats[w]
        im = ax.imshow(
            mm.to_numpy().T,
            aspect="auto",
            origin="lower",
            cmap="viridis",
            vmin=0,
            vmax=vmax,
            extent=[mm.index.min(), mm.index.max(), -0.5, mm.shape[1] - 0.5],
            interpolation="nearest",
        )
        ax.set_title(f"w_imp = {w:g} (mean of n={len(mats[w])} seeds)", fontsize=9)
        ax.set_xlabel("training step")
        ax.set_ylabel("expert (last routed block)")
    fig.colorbar(im, cax=axes[-2], label="importance (mean routing score)")
    ax = axes[-1]
    for i, w in enumerate(ws):
        cvs = [x.apply(lambda row: cv(row.to_numpy()), axis=1) for x in mats[w]]
        df = pd.concat(cvs, axis=1)
        mu, sd = df.mean(axis=1), df.std(axis=1, ddof=1)
        color = FALLBACK[i % len(FALLBACK)]
        ax.plot(df.index, mu, color=color, label=f"w_imp = {w:g} (n={df.shape[1]})")
        ax.fill_between(df.index, mu - sd.fillna(0), mu + sd.fillna(0), color=color, alpha=0.15, lw=0)
    ax.set_xlabel("training step")
    ax.set_ylabel("CV of importance over experts")
    ax.set_title("expert-usage imbalance (lower = balanced)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.suptitle(f"{title} — {_setting(m)}", fontsize=11)
    cap = (
        "Importance (average routing score per expert over the batch) of the last routed block against the "
        "training step, averaged over seeds, with and without the importance loss; right: its coefficient of "
        "variation over experts (mean ± std over seeds)."
    )
    return Figure(key, title, cap, fig)


__all__ = ["FIGURE_TITLES", "Figure", "Skipped", "build_figures", "fig4", "fig5", "fig6", "fig7"]
