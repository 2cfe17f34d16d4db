"""`harness report` when the store is not in a clean state: the report is still written, "Missing" names what and
why; unknown sweeps and empty stores exit 2 naming what exists; never a traceback."""

from __future__ import annotations

import csv
import math

import pytest

from harness.cli import main as cli_main
from tests.helpers.store_helpers import make_store, noise


def _acc(v):
    return (0.60 + 0.01 * math.log2(v["k"]) if v["method"] == "mope" else 0.56) + noise(v["seed"])


@pytest.fixture(scope="module")
def messy(tmp_path_factory):
    """A sweep still running: one trial FAILED, one RUNNING, one never started, one FINISHED run without its test
    metric and one without perf metrics (an older worker)."""
    tmp = tmp_path_factory.mktemp("messy")

    def status(v):
        if v["label"].startswith("vanilla") and v["k"] == 8 and v["seed"] == 0:
            return "FAILED"
        if v["label"].startswith("vanilla") and v["k"] == 8 and v["seed"] == 1:
            return "RUNNING"
        return "FINISHED"

    def omit(v):
        if v["method"] == "mope" and v["k"] == 2 and v["seed"] == 2:
            return {"final/test_acc"}
        if v["method"] == "mope" and v["k"] == 4 and v["seed"] == 0:
            return {"perf/train_samples_per_s", "val/pred_class_frac_max"}
        return set()

    uri, spec, trials = make_store(
        tmp,
        "expert_vs_length",
        _acc,
        status=status,
        omit_metrics=omit,
        skip=lambda v: v["label"].startswith("vanilla") and v["k"] == 8 and v["seed"] == 2,
        finish_parent=False,
    )
    out = tmp / "r"
    rc = cli_main(["report", "--tracking-uri", uri, "--out", str(out), "--sweep", "expert_vs_length"])
    return rc, out, trials


def test_report_is_written_for_a_running_sweep_with_failures(messy):
    rc, out, trials = messy
    assert rc == 0
    for f in ("report.md", "report.html", "results.csv", "fig4_expert_vs_length.png", "fig4_expert_vs_length.svg"):
        assert (out / f).stat().st_size > 0, f
    with (out / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(trials)  # the never-started trial is a row too
    status = {(r["label"], r["seed"]): r["status"] for r in rows}
    assert status[("vanilla-num_experts8-vanilla_prompt_len55", "0")] == "FAILED"
    assert status[("vanilla-num_experts8-vanilla_prompt_len55", "1")] == "RUNNING"
    assert status[("vanilla-num_experts8-vanilla_prompt_len55", "2")] == "MISSING"


def test_missing_section_names_trials_metrics_and_causes(messy):
    _, out, _ = messy
    md = (out / "report.md").read_text()
    missing = md.split("## Missing")[1]
    assert "still running (parent run RUNNING)" in missing
    assert "vanilla-num_experts8-vanilla_prompt_len55 seed 0: FAILED" in missing
    assert "TrainingDiverged: non-finite loss nan at step 12" in missing  # the cause, from harness.error
    assert "seed 1: still RUNNING" in missing
    assert "seed 2: no MLflow child run" in missing
    assert "final/test_acc (the report's metric) absent from 1 FINISHED run(s): mope-num_experts2-s2" in missing
    assert (
        "perf/train_samples_per_s (Fig. 4 step-time panel) absent from 1 FINISHED run(s): mope-num_experts4-s0"
        in missing
    )
    # the means use only runs that have the metric, and say n
    assert "0.609 ± 0.001 (n=2)" in md.split("## Tables")[1]  # MoPE k=2: seeds 0 and 1 (0.608, 0.610)


def test_unknown_sweep_exits_2_naming_the_existing_ones(messy, capsys):
    _, out, _ = messy
    uri = f"sqlite:///{out.parent / 'mlflow.db'}"
    assert cli_main(["report", "--tracking-uri", uri, "--out", str(out.parent / "x"), "--sweep", "nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown sweep 'nope'" in err and "expert_vs_length" in err and "Traceback" not in err
    assert cli_main(["report", "--tracking-uri", uri, "--out", str(out.parent / "x"), "--sweep-id", "ffff"]) == 2
    assert "no sweep with id 'ffff'" in capsys.readouterr().err
    assert cli_main(["report", "--tracking-uri", uri, "--list"]) == 0
    assert "expert_vs_length-" in capsys.readouterr().out


def test_no_store_and_empty_store_exit_2_without_creating_one(tmp_path, capsys):
    db = tmp_path / "none" / "mlflow.db"
    assert (
        cli_main(
            [
                "report",
                "--tracking-uri",
                f"sqlite:///{db}",
                "--out",
                str(tmp_path / "o"),
                "--sweep",
                "expert_vs_length",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert f"no MLflow store at {db}" in err and "harness sweep" in err
    assert not db.exists()  # reading never creates an empty store
    from mlflow.tracking import MlflowClient

    empty = tmp_path / "empty.db"
    MlflowClient(tracking_uri=f"sqlite:///{empty}").search_experiments()  # creates the schema, no runs
    assert (
        cli_main(
            [
                "report",
                "--tracking-uri",
                f"sqlite:///{empty}",
                "--out",
                str(tmp_path / "o"),
                "--sweep",
                "expert_vs_length",
            ]
        )
        == 2
    )
    assert "holds no sweep" in capsys.readouterr().err


def test_bad_arguments_exit_2(capsys):
    assert cli_main(["report", "--bogus"]) == 2
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err
    assert cli_main(["report", "--tracking-uri", "sqlite:////nonexistent/x.db", "--out", "/tmp/x"]) == 2
    assert "name a sweep" in capsys.readouterr().err


def test_all_reports_every_sweep(tmp_path):
    uri = make_store(tmp_path, "expert_vs_length", _acc)[0]
    make_store(tmp_path, "importance_loss", lambda v: 0.6 + noise(v["seed"]))
    assert cli_main(["report", "--tracking-uri", uri, "--out", str(tmp_path / "all"), "--all", "--no-log"]) == 0
    dirs = sorted(p.name.split("-")[0] for p in (tmp_path / "all").iterdir())
    assert dirs == ["expert_vs_length", "importance_loss"]
    md = next((tmp_path / "all").glob("importance_loss-*")).joinpath("report.md").read_text()
    assert "routing/entropy history absent from 6 FINISHED MoPE run(s)" in md  # said, not crashed
    assert "Fig. 7: expert importance over training: routing/importance_last/e* history is missing" in md


def test_a_sweep_that_has_just_started_reports_every_trial_missing(tmp_path):
    uri, _, trials = make_store(tmp_path, "data_scaling", _acc, skip=lambda v: True, finish_parent=False)
    out = tmp_path / "r"
    assert cli_main(["report", "--tracking-uri", uri, "--out", str(out), "--sweep", "data_scaling", "--no-log"]) == 0
    with (out / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(trials) and {r["status"] for r in rows} == {"MISSING"}
    md = (out / "report.md").read_text()
    assert "0 of 27 trials FINISHED" in md and "No claim of the paper can be decided" in md
    assert "Fig. 5: data scaling: no FINISHED run has final/test_acc" in md
