"""Three loose ends of `harness report`, each on a synthetic MLflow store shaped like a real sweep: Fig. 6's caption
names only the line styles drawn, Table 1 labels the vanilla prompt by its length L (it has no expert count), and
Fig. 5's title says what it plots."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest

from harness.cli import main as cli_main
from reports.data import SweepData, add_derived
from reports.figures import fig5, fig6
from reports.mlflow_source import list_sweeps, load_sweep, select_sweeps
from tests.helpers.store_helpers import make_store, noise


def _report(uri: str, out: Path, sweep: str) -> str:
    assert cli_main(["report", "--tracking-uri", uri, "--out", str(out), "--sweep", sweep, "--no-log"]) == 0
    return (out / "report.md").read_text()


def _caption(md: str, png: str) -> str:
    """The caption line under a figure's image in report.md."""
    lines = md.splitlines()
    i = next(i for i, line in enumerate(lines) if f"]({png})" in line)
    return next(line for line in lines[i + 1 :] if line.strip())


# -- Fig. 6: the caption explains only the line styles drawn ----------------------------------------------------------
def _entropy(v):
    if v["method"] != "mope":
        return {}
    h0 = math.log2(v["k"])
    return {"routing/entropy": [(s, h0 * (1 - s / 400) + 0.01 * v["seed"]) for s in range(0, 151, 25)]}


def test_fig6_caption_has_no_dashed_learned_keys_when_no_run_learned_them(tmp_path):
    uri = make_store(
        tmp_path,
        "expert_vs_length",
        lambda v: 0.6 + 0.01 * math.log2(v["k"]) + noise(v["seed"]),
        history=_entropy,
    )[0]
    md = _report(uri, tmp_path / "report", "expert_vs_length")
    cap = _caption(md, "fig6_routing_entropy.png")
    assert cap.startswith("Routing entropy")
    assert "dashed" not in cap.lower() and "learned" not in cap.lower()  # no learned-keys arm: no dashed line
    assert "All runs use frozen orthogonal keys." in cap
    html = (tmp_path / "report" / "report.html").read_text()
    assert "All runs use frozen orthogonal keys." in html and "dashed: learned keys" not in html


def _routing_data(keys: list[str]) -> SweepData:
    rows, hist = [], []
    for i, (routing, key) in enumerate((r, k) for r in ("dense", "top1_scaled") for k in keys):
        for seed in (0, 1):
            rid = f"r{i}_{seed}"
            rows.append(
                {
                    "trial_key": f"t/{i}/{seed}",
                    "point_id": str(i),
                    "label": f"p{i}",
                    "arm": "",
                    "seed": seed,
                    "run_id": rid,
                    "status": "FINISHED",
                    "method.name": "mope",
                    "data.name": "demo",
                    "mope.num_experts": 16,
                    "mope.prompt_len": 6,
                    "mope.routing": routing,
                    "mope.routing_keys": key,
                    "final/test_acc": 0.6,
                }
            )
            hist += [(rid, "routing/entropy", s, 4.0 - s / 100 - 0.5 * i) for s in range(0, 101, 50)]
    return SweepData(
        {"sweep_id": "routing-00000000", "spec_name": "routing", "axes": {}, "status": "FINISHED", "seeds": [0, 1]},
        pd.DataFrame(rows),
        pd.DataFrame(hist, columns=["run_id", "key", "step", "value"]),
    )


def test_fig6_caption_names_both_styles_only_when_both_are_drawn():
    data = _routing_data(["frozen_orthogonal", "learned"])
    f = fig6(data, add_derived(data.runs))
    styles = {ln.get_linestyle() for ln in f.fig.axes[0].get_lines() if ln.get_label().startswith(("dense", "top1"))}
    assert styles == {"-", "--"}
    assert f.caption.endswith("Solid: frozen orthogonal keys, dashed: learned keys.")

    data = _routing_data(["learned"])  # every run learns its keys: all lines dashed, and the caption says so
    f = fig6(data, add_derived(data.runs))
    assert {ln.get_linestyle() for ln in f.fig.axes[0].get_lines() if ln.get_label().startswith("dense")} == {"--"}
    assert f.caption.endswith("All runs use learned keys.") and "Solid" not in f.caption


# -- Table 1 and Fig. 5 on a data-scaling store -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ds_loose")

    def acc(v):
        base = {"mope": 0.58, "vanilla_prompt": 0.55, "sequential_fuse": 0.52}[v["method"]]
        return base + 0.01 * math.log2(v["shots"] / 128) + noise(v["seed"])

    uri = make_store(tmp, "data_scaling", acc)[0]
    return uri, _report(uri, tmp / "report", "data_scaling")


def _table_rows(md: str, heading: str) -> list[list[str]]:
    lines = md.splitlines()
    i = lines.index(f"### {heading}")
    body = []
    for line in lines[i + 4 :]:  # heading, blank, header row, separator
        if not line.startswith("|"):
            break
        body.append([c.strip() for c in line.strip("|").split("|")])
    return body


def test_table1_labels_the_vanilla_prompt_by_its_length_not_an_expert_count(ds):
    _, md = ds
    names = [r[0] for r in _table_rows(md, "Table 1: methods")]
    assert names == ["mope (k=4)", "vanilla_prompt (L=31)", "sequential_fuse"]  # L = (k+1)*l+1 = 31 at k=4, l=6


def test_fig5_title_says_what_it_plots(ds):
    uri, md = ds
    data = load_sweep(uri, select_sweeps(list_sweeps(uri), name="data_scaling")[0])
    f = fig5(add_derived(data.runs), "final/test_acc")
    title = f.fig.axes[0].get_title()
    first, second = title.split("\n")
    assert first == "Fig. 5: data scaling (demo): test accuracy (adapter selected on val) vs training examples"
    assert second == "demo/vision_encoder + minilm"  # the backbones; the dataset is named on the first line
    assert "### Fig. 5: data scaling" in md  # the report's heading keeps the short name, as Fig. 4's does
