"""Synthetic MLflow stores shaped exactly like a real sweep's: the shipped spec is planned and composed as
`harness sweep` does, the parent run is opened by `harness.sweep_runs.open_parent_run` and every child run by
`harness.recipe.open_tracker` with `harness.sweep_runs.child_tags`; only the metrics are made up (known values)."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mope.config import tunable_prompts_per_layer

ROOT = Path(__file__).resolve().parents[2]


def trial_values(t: dict[str, Any]) -> dict[str, Any]:
    """The composed config values a metric function may read."""
    cfg = t["cfg"]
    return {
        "method": cfg["method"]["name"],
        "k": cfg["mope"]["num_experts"],
        "l": cfg["mope"]["prompt_len"],
        "L": cfg["model"]["vanilla_prompt_len"],
        "shots": cfg["data"]["shots"],
        "seed": t["seed"],
        "routing": cfg["mope"]["routing"],
        "keys": cfg["mope"]["routing_keys"],
        "w_imp": cfg["mope"]["imp_loss_weight"],
        "arm": t["arm"],
        "label": t["label"],
    }


def make_store(
    tmp: Path,
    spec: str,
    acc: Callable[[dict[str, Any]], float],
    *,
    skip: Callable[[dict[str, Any]], bool] = lambda v: False,
    status: Callable[[dict[str, Any]], str] = lambda v: "FINISHED",
    omit_metrics: Callable[[dict[str, Any]], set[str]] = lambda v: set(),
    history: Callable[[dict[str, Any]], dict[str, list[tuple[int, float]]]] | None = None,
    extra: Callable[[dict[str, Any]], dict[str, float]] = lambda v: {},
    finish_parent: bool = True,
    overrides: list[str] | None = None,
) -> tuple[str, Any, list[dict]]:
    """Writes a store under `tmp` for sweeps/<spec>.yaml; returns (tracking URI, spec, trials).

    acc(values) -> final/test_acc of a trial (val best = acc − 0.005, last weights = acc − 0.002); `skip` leaves a
    planned trial without a child run; `status` is the child's final status; `omit_metrics` drops final metrics by
    name; `history` gives extra metric series {key: [(step, value), ...]}; `extra` adds final metrics."""
    from harness.recipe import open_tracker
    from harness.sweep_cmd import plan
    from harness.sweep_runs import child_tags, open_parent_run

    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    spec_obj, trials = plan(str(ROOT / "sweeps" / f"{spec}.yaml"), overrides or [], check_paths=False)
    for t in trials:
        t["cfg"]["tracking"]["uri"] = uri
        t["cfg"]["paths"]["run_root"] = str(tmp)
    parent = open_parent_run(spec_obj, trials[0]["cfg"], trials)
    for t in trials:
        v = trial_values(t)
        if skip(v):
            continue
        tr = open_tracker(
            t["cfg"],
            rank=0,
            trial_key=t["trial_key"],
            parent_run_id=parent.run_id,
            tags=child_tags(t, spec_obj.spec_hash),
        )
        a = acc(v)
        tunable = tunable_prompts_per_layer(v["k"], v["l"]) if v["method"] in ("mope", "vanilla_prompt") else 0
        final = {
            "final/test_acc": a,
            "final/val_acc_best": a - 0.005,
            "final/test_acc_last": a - 0.002,
            "perf/train_samples_per_s": 6400.0 / (20 + (tunable if v["method"] == "vanilla_prompt" else 13)),
            "cost/trainable_params": 1000.0 * (v["k"] or 1),
            "perf/wall_s": 30.0,
            "val/pred_class_frac_max": 0.55,
            **extra(v),
        }
        for k in omit_metrics(v):
            final.pop(k, None)
        st = status(v)
        if st == "FINISHED":
            tr.log_metrics(final, step=150)
        for key, series in (history(v) if history else {}).items():
            for step, val in series:
                if not math.isnan(val):
                    tr.log_metrics({key: val}, step=step)
        if st == "FAILED":
            tr.set_tags({"harness.error": "TrainingDiverged: non-finite loss nan at step 12 (epoch 0, batch 11)"})
        if st != "RUNNING":
            tr.finish(st)
    if finish_parent:
        parent.finish("FINISHED")
    return uri, spec_obj, trials


def noise(seed: int) -> float:
    return (-0.002, 0.0, 0.002)[seed % 3]
