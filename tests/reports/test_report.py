"""`harness report` end to end on synthetic MLflow stores shaped like real sweeps (known values)."""

from __future__ import annotations

import csv
import json
import math
import statistics
from pathlib import Path

import pytest

from harness.cli import main as cli_main
from tests.helpers.store_helpers import make_store, noise


def _acc_scaling(v):
    """MoPE improves with k, the vanilla prompt degrades with L (the paper's Fig. 4 shape)."""
    if v["method"] == "mope":
        return 0.60 + 0.01 * math.log2(v["k"]) + noise(v["seed"])
    return 0.58 - 0.01 * math.log2(v["k"]) + noise(v["seed"] + 1)


def _read_csv(p: Path) -> list[dict[str, str]]:
    with p.open() as f:
        return list(csv.DictReader(f))


def _report(uri: str, out: Path, *args: str) -> int:
    return cli_main(["report", "--tracking-uri", uri, "--out", str(out), *args])


@pytest.fixture(scope="module")
def evl(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("evl")
    uri, spec, trials = make_store(tmp, "expert_vs_length", _acc_scaling)
    out = tmp / "report"
    assert _report(uri, out, "--sweep", "expert_vs_length") == 0
    return uri, spec, trials, out


def test_results_csv_has_one_row_per_trial_with_the_logged_values(evl):
    uri, spec, trials, out = evl
    rows = _read_csv(out / "results.csv")
    assert len(rows) == len(trials) == 18
    by_key = {r["trial_key"]: r for r in rows}
    for t in trials:
        r = by_key[t["trial_key"]]
        k, seed = t["cfg"]["mope"]["num_experts"], t["seed"]
        assert r["arm"] == t["arm"] and int(r["seed"]) == seed and r["status"] == "FINISHED"
        assert float(r["final/test_acc"]) == pytest.approx(
            _acc_scaling({"method": t["cfg"]["method"]["name"], "k": k, "seed": seed})
        )
        assert float(r["final/test_acc_last"]) == pytest.approx(float(r["final/test_acc"]) - 0.002)
        assert float(r["cost/trainable_params"]) == 1000.0 * k
        assert r["wall_s"] != ""
        tunable = float(r["tunable_prompts"])
        assert tunable == (k + 1) * 6 + 1  # MoPE (k+1)*l+1 and the vanilla arm's L are the same count: the pair


def test_results_table_means_stds_and_pairs(evl):
    _, _, _, out = evl
    md = (out / "report.md").read_text()
    vals = [0.60 + 0.03 + d for d in (-0.002, 0.0, 0.002)]  # MoPE k=8, seeds 0..2
    cell = f"{statistics.mean(vals):.3f} ± {statistics.stdev(vals):.3f} (n=3)"
    assert cell in md
    pairs = [ln for ln in md.splitlines() if ln.startswith("| 55 | 8 |")]
    assert len(pairs) == 1  # 55 tunable prompts: MoPE k=8 beside vanilla L=55
    cells = [c.strip() for c in pairs[0].strip("|").split("|")]
    assert cells[4] == "55" and cells[2] == cell
    van = [0.58 - 0.03 + noise(s + 1) for s in range(3)]
    assert cells[5] == f"{statistics.mean(van):.3f} ± {statistics.stdev(van):.3f} (n=3)"
    diff = statistics.mean(a - b for a, b in zip(vals, van))
    assert cells[7].startswith(f"{diff:+.3f} [")


def test_figures_exist_as_png_and_svg(evl):
    _, _, _, out = evl
    for ext in ("png", "svg"):
        p = out / f"fig4_expert_vs_length.{ext}"
        assert p.is_file() and p.stat().st_size > 5000, p
    assert (out / "fig4_expert_vs_length.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html and "<script" not in html and "http://" not in html
    md = (out / "report.md").read_text()
    assert "Fig. 5: data scaling: needs ≥ 2 shot counts" in md  # skipped, with the reason


def test_report_is_logged_to_the_parent_run(evl):
    from mlflow.tracking import MlflowClient

    uri, spec, _, _ = evl
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("mope-expert-vs-length")
    parent = client.search_runs([exp.experiment_id], filter_string="tags.`harness.role` = 'sweep'")[0]
    names = {Path(a.path).name for a in client.list_artifacts(parent.info.run_id, "report")}
    assert {"report.md", "report.html", "results.csv", "fig4_expert_vs_length.png"} <= names


def test_claims_supported_on_the_papers_shape(evl):
    import json

    _, _, _, out = evl
    claims = {c["key"]: c for c in json.loads((out / "claims.json").read_text())}
    assert claims["expert_scaling"]["verdict"] == "supported"
    assert claims["length_scaling"]["verdict"] == "supported"  # vanilla deteriorates with L
    assert claims["matched_count"]["verdict"] == "supported"
    assert len(claims["matched_count"]["rows"]) == 3
    assert "Claims" in (out / "report.md").read_text()


def test_claim_verdicts_flip_when_the_data_contradicts_them(tmp_path):
    import json

    def contra(v):  # MoPE gets worse with k and falls behind; the vanilla prompt improves with L
        if v["method"] == "mope":
            return 0.60 - 0.02 * math.log2(v["k"]) + noise(v["seed"])
        return 0.60 + 0.02 * math.log2(v["k"]) + noise(v["seed"] + 1)

    (
        uri,
        _,
        _,
    ) = make_store(tmp_path, "expert_vs_length", contra)[:3]
    assert _report(uri, tmp_path / "r", "--sweep", "expert_vs_length", "--no-log") == 0
    claims = {c["key"]: c["verdict"] for c in json.loads((tmp_path / "r" / "claims.json").read_text())}
    assert claims == {
        "expert_scaling": "not supported",
        "length_scaling": "not supported",
        "matched_count": "not supported",
    }


def test_noisy_three_seeds_are_inconclusive(tmp_path):
    import json

    jitter = {2: (0.04, -0.03, 0.01), 4: (-0.02, 0.05, -0.04), 8: (0.03, -0.05, 0.02)}

    def noisy(v):  # a small effect inside a seed spread that differs per k: the report must not call it
        return 0.60 + (0.003 * math.log2(v["k"]) if v["method"] == "mope" else 0.0) + jitter[v["k"]][v["seed"]]

    uri = make_store(tmp_path, "expert_vs_length", noisy)[0]
    assert _report(uri, tmp_path / "r", "--sweep", "expert_vs_length", "--no-log") == 0
    claims = {c["key"]: c["verdict"] for c in json.loads((tmp_path / "r" / "claims.json").read_text())}
    assert claims["expert_scaling"] == "inconclusive"


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ds")

    def acc(v):
        base = {"mope": 0.58, "vanilla_prompt": 0.55, "sequential_fuse": 0.52}[v["method"]]
        return base + 0.01 * math.log2(v["shots"] / 128) + noise(v["seed"])

    uri, spec, trials = make_store(tmp, "data_scaling", acc)
    return tmp, uri, trials


def test_data_scaling_report(ds):
    import json

    tmp, uri, trials = ds
    out = tmp / "report"
    assert _report(uri, out, "--sweep", "data_scaling") == 0
    rows = _read_csv(out / "results.csv")
    assert len(rows) == len(trials) == 27
    assert {r["method.name"] for r in rows} == {"mope", "vanilla_prompt", "sequential_fuse"}
    assert sorted({int(r["data.shots"]) for r in rows}) == [128, 512, 2048]
    for ext in ("png", "svg"):
        assert (out / f"fig5_data_scaling.{ext}").stat().st_size > 5000
    claims = {c["key"]: c for c in json.loads((out / "claims.json").read_text())}
    assert claims["data_scaling"]["verdict"] == "supported"
    assert [r["comparison"] for r in claims["data_scaling"]["rows"]] == ["shots = 128", "shots = 512", "shots = 2048"]
    assert "Fig. 4" in (out / "report.md").read_text().split("Not drawn:")[1]  # Fig. 4 skipped, reason given


def test_data_scaling_claim_flips_at_one_shot_count(tmp_path):
    import json

    def acc(v):
        base = {"mope": 0.58, "vanilla_prompt": 0.55, "sequential_fuse": 0.52}[v["method"]]
        if v["shots"] == 512 and v["method"] == "vanilla_prompt":
            base = 0.62  # vanilla ahead at 512 shots
        return base + noise(v["seed"])

    uri = make_store(tmp_path, "data_scaling", acc)[0]
    assert _report(uri, tmp_path / "r", "--sweep", "data_scaling", "--no-log") == 0
    c = next(c for c in json.loads((tmp_path / "r" / "claims.json").read_text()) if c["key"] == "data_scaling")
    assert c["verdict"] == "not supported"
    assert {r["comparison"]: r["verdict"] for r in c["rows"]}["shots = 512"] == "not supported"


def test_parent_run_page_tells_the_story(evl):
    """The parent run's MLflow page: the experiment opens on the runs table (model-development kind), the run's
    description states every claim's verdict and points at the report, summary series a chart can draw (step = the
    tunable-prompt count, MoPE's k and vanilla's L meeting as in Fig. 4), Fig. 4 under figures/; re-running the
    report adds no second value to any series; children carry the swept values under short names."""
    from mlflow.tracking import MlflowClient

    uri, _, trials, out = evl
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("mope-expert-vs-length")
    assert exp.tags.get("mlflow.experimentKind") == "custom_model_development"
    parent = client.search_runs([exp.experiment_id], filter_string="tags.`harness.role` = 'sweep'")[0]
    note = parent.data.tags["mlflow.note.content"]
    assert "report/report.html" in note and "18 of 18 FINISHED" in note
    for c in json.loads((out / "claims.json").read_text()):
        assert f"**{c['verdict']}**: {c['claim']}" in note
    pid = parent.info.run_id
    mope = {m.step: m.value for m in client.get_metric_history(pid, "summary/mope/test_acc_mean")}
    van = {m.step: m.value for m in client.get_metric_history(pid, "summary/vanilla/test_acc_mean")}
    assert sorted(mope) == sorted(van) == [19, 31, 55]
    for k, steps in ((2, 19), (4, 31), (8, 55)):
        want = statistics.mean(_acc_scaling({"method": "mope", "k": k, "seed": s}) for s in range(3))
        assert mope[steps] == pytest.approx(want)
    assert van[55] < van[19] < mope[19]
    assert [a.path for a in client.list_artifacts(pid, "figures")] == ["figures/fig4_expert_vs_length.png"]
    assert _report(uri, out, "--sweep", "expert_vs_length") == 0
    assert len(client.get_metric_history(pid, "summary/mope/test_acc_mean")) == 3  # nothing logged twice
    child = client.search_runs([exp.experiment_id], filter_string="tags.`axis.num_experts` = '8'")
    assert len(child) == 6 and {r.data.tags["harness.arm"] for r in child} == {"mope", "vanilla"}


def test_data_wait_per_point_and_a_starved_trial_is_flagged(tmp_path):
    """The results table shows each point's share of step time spent waiting for data (mean and max over seeds);
    a trial above 5 % is marked on its row and named in the warnings."""

    def wait(v):
        starved = v["method"] == "mope" and v["k"] == 4 and v["seed"] == 1
        return {"perf/run_data_wait_frac": 0.12 if starved else 0.01 + 0.001 * v["seed"]}

    uri = make_store(tmp_path, "expert_vs_length", _acc_scaling, extra=wait)[0]
    out = tmp_path / "report"
    assert _report(uri, out, "--sweep", "expert_vs_length") == 0
    md = (out / "report.md").read_text()
    header = next(ln for ln in md.splitlines() if ln.startswith("| arm |") and "data wait" in ln)
    col = [c.strip() for c in header.strip("|").split("|")].index("data wait")
    rows = [ln for ln in md.splitlines() if ln.startswith("| mope | 4 |") or ln.startswith("| mope | 2 |")]
    cells = {ln.split("|")[2].strip(): [c.strip() for c in ln.strip("|").split("|")] for ln in rows}
    assert cells["4"][col] == f"{statistics.mean([0.01, 0.12, 0.012]):.1%} (max 12.0%)"
    assert cells["2"][col] == "1.1% (max 1.2%)"
    assert "1 run(s) waited > 5% of step time for data" in md
    warn = [ln for ln in md.splitlines() if "waited 12.0% of its time for data" in ln]
    assert len(warn) == 1 and "seed 1" in warn[0] and "trainer.num_workers" in warn[0]
