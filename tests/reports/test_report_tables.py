"""Reports computed from hand-built tables (no MLflow): routing, importance loss, prompt ablation, baselines, the
statistics behind the verdicts, and the collapse detector."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from reports.build import build_report
from reports.claims import evaluate_claims
from reports.data import SweepData
from reports.stats import diff


def _run(i, seed, status="FINISHED", **cfg):
    base = {
        "trial_key": f"t/{i}/{seed}",
        "point_id": str(i),
        "label": f"p{i}",
        "arm": cfg.pop("arm", ""),
        "seed": seed,
        "run_id": f"r{i}_{seed}",
        "status": status,
        "error": None,
        "wall_s": 30.0,
        "method.name": "mope",
        "data.name": "demo",
        "data.task": "single_label",
        "mope.num_experts": 16,
        "mope.prompt_len": 6,
        "trainer.batch_size": 64,
        "perf/train_samples_per_s": 400.0,
        "cost/trainable_params": 2e5,
        "val/pred_class_frac_max": 0.55,
    }
    base.update(cfg)
    return base


def _data(rows, axes, history=None, name="synthetic"):
    h = pd.DataFrame(history or [], columns=["run_id", "key", "step", "value"])
    return SweepData(
        {"sweep_id": f"{name}-00000000", "spec_name": name, "axes": axes, "status": "FINISHED", "seeds": [0, 1, 2]},
        pd.DataFrame(rows),
        h,
    )


def _verdicts(claims):
    return {c.key: c.verdict for c in claims}


# -- statistics -------------------------------------------------------------------------------------------------------
def test_paired_diff_is_student_t_over_seed_differences():
    a, b = {0: 0.61, 1: 0.63, 2: 0.62}, {0: 0.58, 1: 0.59, 2: 0.60}
    d = diff(a, b)
    x = np.array([0.03, 0.04, 0.02])
    half = 4.302652729911275 * x.std(ddof=1) / math.sqrt(3)  # t(0.975, 2 df)
    assert d.paired and d.n == 3
    assert d.mean == pytest.approx(x.mean()) and d.lo == pytest.approx(x.mean() - half)
    assert d.hi == pytest.approx(x.mean() + half) and d.above_zero
    assert d.boot_lo >= x.min() - 1e-12 and d.boot_hi <= x.max() + 1e-12  # a bootstrap of 3 spans min..max only


def test_unpaired_and_too_small_samples():
    d = diff({0: 0.6, 1: 0.62}, {5: 0.5, 6: 0.52, 7: 0.51})
    assert not d.paired and d.has_ci and d.lo > 0  # Welch interval when no seed is shared
    one = diff({0: 0.6}, {0: 0.5})
    assert not one.has_ci and one.mean == pytest.approx(0.1)  # no interval from one seed: never significant


# -- routing (Table 3/4, Fig. 6) --------------------------------------------------------------------------------------
def _routing_rows(dense=0.62, top1=0.58, learned_shift=0.0):
    rows, hist = [], []
    i = 0
    for routing in ("dense", "top1_scaled", "top1_hard"):
        for keys in ("frozen_orthogonal", "learned"):
            for seed in range(3):
                acc = (
                    (dense if routing == "dense" else top1)
                    + (learned_shift if keys == "learned" else 0)
                    + (-0.002, 0.0, 0.002)[seed]
                )
                r = _run(i, seed, **{"mope.routing": routing, "mope.routing_keys": keys, "final/test_acc": acc})
                rows.append(r)
                for step in range(10, 160, 10):
                    hist.append(
                        {
                            "run_id": r["run_id"],
                            "key": "routing/entropy",
                            "step": step,
                            "value": 4.0 - step / (50 if routing == "dense" else 500),
                        }
                    )
            i += 1
    return rows, hist


def test_routing_claims_tables_and_fig6(tmp_path):
    rows, hist = _routing_rows()
    data = _data(
        rows,
        {"mope.routing": ["dense", "top1_scaled", "top1_hard"], "mope.routing_keys": ["frozen_orthogonal", "learned"]},
        hist,
        "routing",
    )
    rep = build_report(data, tmp_path)
    v = rep.verdicts
    assert v["dense_vs_top1"] == "supported" and v["frozen_vs_learned"] == "supported"
    assert (tmp_path / "fig6_routing_entropy.png").stat().st_size > 5000
    titles = [t.title for t in rep.tables]
    assert "Table 3: routing" in titles and "Table 4: routing embedding (keys)" in titles
    t3 = next(t for t in rep.tables if t.key == "table3")
    dense_row = next(r for r in t3.rows if r[0].startswith("dense"))
    assert dense_row[2] == "Dense" and dense_row[3] == "73.55"  # the paper's number in the paper's column
    assert dense_row[1].startswith("0.620 ± 0.002 (n=3)")  # ours: never mixed with the paper's


def test_routing_claims_flip(tmp_path):
    rows, hist = _routing_rows(dense=0.56, top1=0.60, learned_shift=0.05)
    data = _data(
        rows,
        {"mope.routing": ["dense", "top1_scaled", "top1_hard"], "mope.routing_keys": ["frozen_orthogonal", "learned"]},
        hist,
    )
    v = _verdicts(evaluate_claims(data, "final/test_acc"))
    assert v["dense_vs_top1"] == "not supported" and v["frozen_vs_learned"] == "not supported"


# -- importance loss (Fig. 7) -----------------------------------------------------------------------------------------
def _importance_data(balanced_with: bool):
    rows, hist = [], []
    for i, w in enumerate((0.01, 0.0)):
        for seed in range(3):
            r = _run(i, seed, **{"mope.imp_loss_weight": w, "final/test_acc": 0.6})
            rows.append(r)
            skewed = (w == 0.0) == balanced_with
            for step in range(5, 155, 5):
                imp = np.full(16, 1 / 16)
                if skewed:
                    imp = np.r_[0.7 + 0.01 * seed, np.full(15, (0.3 - 0.01 * seed) / 15)]
                for j, val in enumerate(imp):
                    hist.append(
                        {
                            "run_id": r["run_id"],
                            "key": f"routing/importance_last/e{j}",
                            "step": step,
                            "value": float(val) + 1e-4 * ((j + step) % 3),
                        }
                    )
                hist.append({"run_id": r["run_id"], "key": "routing/entropy", "step": step, "value": 3.0})
    return _data(rows, {"mope.imp_loss_weight": [0.01, 0.0]}, hist, "importance_loss")


def test_importance_claim_and_fig7(tmp_path):
    rep = build_report(_importance_data(balanced_with=True), tmp_path)
    assert rep.verdicts == {"importance_loss": "supported"}
    assert (tmp_path / "fig7_expert_importance.png").stat().st_size > 5000
    assert (tmp_path / "fig7_expert_importance.svg").stat().st_size > 5000
    flipped = evaluate_claims(_importance_data(balanced_with=False), "final/test_acc")
    assert _verdicts(flipped) == {"importance_loss": "not supported"}


# -- prompt ablation (Table 2) ----------------------------------------------------------------------------------------
SETS = {
    "s": (1, 0, 0),
    "d": (0, 1, 0),
    "m": (0, 0, 1),
    "s_d": (1, 1, 0),
    "s_m": (1, 0, 1),
    "d_m": (0, 1, 1),
    "s_d_m": (1, 1, 1),
}


def _ablation(full_best=True):
    rows = []
    for i, (arm, (s, d, m)) in enumerate(SETS.items()):
        acc = 0.50 + 0.03 * (s + d + m) if full_best else (0.66 if arm == "d_m" else 0.55)
        for seed in range(3):
            rows.append(
                _run(
                    i,
                    seed,
                    arm=arm,
                    **{
                        "mope.use_static": bool(s),
                        "mope.use_dynamic": bool(d),
                        "mope.use_mapped": bool(m),
                        "final/test_acc": acc + (-0.002, 0.0, 0.002)[seed],
                    },
                )
            )
    return _data(rows, {}, name="prompt_ablation")


def test_prompt_ablation_table2_and_claim(tmp_path):
    rep = build_report(_ablation(), tmp_path)
    assert rep.verdicts == {"prompt_ablation": "supported"}
    t2 = next(t for t in rep.tables if t.key == "table2")
    assert [r[0] for r in t2.rows] == [
        "[P_s]",
        "[P_d]",
        "[P_m]",
        "[P_s, P_d]",
        "[P_s, P_m]",
        "[P_d, P_m]",
        "[P_s, P_d, P_m]",
    ]  # the paper's row order
    assert t2.rows[-1][1].startswith("0.590 ± 0.002") and t2.rows[-1][2] == "73.59±.15"
    assert _verdicts(evaluate_claims(_ablation(full_best=False), "final/test_acc")) == {
        "prompt_ablation": "not supported"
    }
    # rows without P_d have no router: their missing routing history is not reported; a routed row's is
    from reports.build import missing_items

    data = _ablation()
    routed = data.runs[data.runs["mope.use_dynamic"]]["run_id"]
    data.history = pd.DataFrame([{"run_id": r, "key": "routing/entropy", "step": 10, "value": 1.0} for r in routed])
    assert not [m for m in missing_items(data, "final/test_acc")[0] if "routing/entropy" in m]
    data.history = data.history.iloc[3:]
    assert any(
        "routing/entropy history absent from 3 FINISHED MoPE run(s)" in m
        for m in missing_items(data, "final/test_acc")[0]
    )


# -- baselines (Table 1) and the collapse flag ------------------------------------------------------------------------
def test_table1_rows_and_collapsed_runs_are_flagged(tmp_path):
    rows = []
    methods = {"img_only": 0.5, "text_only": 0.5, "sequential_fuse": 0.5, "p_sequential_fuse": 0.56, "mope": 0.6}
    for i, (meth, acc) in enumerate(methods.items()):
        for seed in range(3):
            frac = 1.0 if meth == "sequential_fuse" else 0.52
            rows.append(
                _run(
                    i,
                    seed,
                    arm=meth,
                    **{
                        "method.name": meth,
                        "mope.num_experts": 4,
                        "final/test_acc": acc,
                        "val/pred_class_frac_max": frac,
                    },
                )
            )
    data = _data(rows, {}, name="baselines")
    rep = build_report(data, tmp_path)
    t1 = next(t for t in rep.tables if t.key == "table1")
    by_name = {r[0]: r for r in t1.rows}
    assert by_name["mope (k=4)"][3] == "Ours (Swin-B, k=4)" and by_name["mope (k=4)"][4] == "1.6M"
    assert by_name["sequential_fuse"][3] == "SequentialFuse (FT)" and by_name["sequential_fuse"][5] == "74.28±.46"
    assert len(rep.warnings) == 3 and all("collapsed" in w for w in rep.warnings)
    res = next(t for t in rep.tables if t.key == "results")
    marks = dict(zip([r[0] for r in res.rows], res.marks))
    assert "collapsed" in marks["sequential_fuse"] and marks["mope"] == ""
    assert "## Warnings" in (tmp_path / "report.md").read_text()


def test_collapse_detector_fires_on_a_constant_predictor_only():
    from harness.engines import pred_class_frac_max

    assert pred_class_frac_max(torch.zeros(200, dtype=torch.long)) == 1.0
    learning = torch.tensor([0, 1] * 100)
    assert pred_class_frac_max(learning) == 0.5
    multi = torch.tensor([[1, 0, 1]] * 9 + [[0, 1, 0]])  # multi-label: identical label vectors
    assert pred_class_frac_max(multi) == pytest.approx(0.9)


def test_claims_json_matches_the_report(tmp_path):
    rep = build_report(_ablation(), tmp_path)
    saved = json.loads((tmp_path / "claims.json").read_text())
    assert [(c["key"], c["verdict"]) for c in saved] == [(c.key, c.verdict) for c in rep.claims]
    assert all(c["rule"] for c in saved)
    row = saved[0]["rows"][0]["diff"]  # the deciding difference, with both intervals
    assert row["paired"] and row["n"] == 3 and row["ci_lo"] > 0
    assert row["bootstrap_lo"] >= row["ci_lo"]  # at n=3 the t interval is the wider, conservative one


def test_table1_skips_a_run_killed_before_its_params_were_logged(tmp_path):
    """Seen on an interrupted data_scaling sweep: a child run KILLED right after creation has no params (method.name
    missing); Table 1 is built from the others instead of failing with a TypeError."""
    rows = [
        _run(i, seed, arm=meth, **{"method.name": meth, "mope.num_experts": 4, "final/test_acc": 0.6})
        for i, meth in enumerate(("mope", "vanilla_prompt", "sequential_fuse"))
        for seed in range(2)
    ]
    rows.append(_run(9, 2, status="KILLED", arm="vanilla", **{"method.name": None}))
    rep = build_report(_data(rows, {}, name="data_scaling"), tmp_path)
    t1 = next(t for t in rep.tables if t.key == "table1")
    assert [r[0] for r in t1.rows] == ["mope (k=4)", "vanilla_prompt (L=31)", "sequential_fuse"]


def test_encoder_label_ignores_a_run_without_params():
    """Fig. 5's title read '?/demo/vision_encoder + ?/minilm' on that sweep: the killed run's missing params must not
    add a '?' to the label of the runs that have them (a label of nothing known is still '?')."""
    from reports.data import backbones_label, datasets_label

    known = {"vision.name": "auto", "vision.weights": "/x/data/demo/vision_encoder", "text.name": "/opt/m/minilm"}
    runs = pd.DataFrame(
        [
            _run(0, 0, **known),
            _run(1, 1, **known),
            _run(2, 2, status="KILLED", **{"vision.name": None, "text.name": None, "data.name": None}),
        ]
    )
    assert backbones_label(runs, "vision") == "demo/vision_encoder"
    assert backbones_label(runs, "text") == "minilm"
    assert datasets_label(runs) == "demo"
    assert backbones_label(runs.iloc[2:], "vision") == "?"
