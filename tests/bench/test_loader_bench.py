"""bench/loader.py's data-wait study ("data never waits", issue #28 item 3): its functions on the small demo, from
local shards and from a real moto S3 server, and its worker-count selection on hand-made rows."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_loader", ROOT / "bench" / "loader.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


bl = _load_bench()


def _row(src: str, w: int, frac: float | None) -> dict:
    return {
        "source": src,
        "num_workers": w,
        "data_wait_frac": frac,
        "loader_samples_per_s": 100.0,
        "step_samples_per_s": 50.0,
        "loader_over_step": 2.0,
        "threads": 1,
    }


def test_smallest_workers_picks_the_smallest_qualifying_count_per_source():
    rows = [
        _row("local", 2, 0.01),
        _row("local", 0, 0.30),
        _row("local", 1, 0.049),
        _row("local", 3, 0.0),
        _row("s3", 0, 0.05),  # not < 0.05
        _row("s3", 2, 0.2),
        _row("s3", 1, None),  # not measured
        _row("http", 4, 0.02),
        _row("http", 3, 0.04),
    ]
    assert bl.smallest_workers(rows) == {"local": 1, "s3": None, "http": 3}
    assert bl.smallest_workers(rows, target=0.051) == {"local": 1, "s3": 0, "http": 3}
    assert bl.smallest_workers(rows, target=0.35) == {"local": 0, "s3": 0, "http": 3}
    assert bl.smallest_workers(rows, target=0.0) == {"local": None, "s3": None, "http": None}
    assert bl.smallest_workers([]) == {}


def test_summary_names_the_pick_and_explains_a_null_with_the_numbers():
    rows = [_row("local", 0, 0.02), _row("local", 1, 0.01), _row("s3", 0, 0.4), _row("s3", 1, 0.3)]
    s = bl.summarize(rows)
    assert s["smallest_workers_under_target"] == {"local": 0, "s3": None}
    assert set(s["why_none"]) == {"s3"}
    assert "best 0.3 at num_workers=1" in s["why_none"]["s3"]
    assert s["per_source"]["s3"]["1"]["data_wait_frac"] == 0.3


@pytest.fixture(scope="module")
def step_bench(small_demo):  # noqa: F811
    sb = bl.StepBench(small_demo, batch=32, threads=1)
    yield sb
    sb.close()


@pytest.fixture(scope="module")
def s3_demo(small_demo):  # noqa: F811
    before = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID")}
    with bl.S3Demo(small_demo, bucket="benchtest") as s3:
        assert os.environ["AWS_ENDPOINT_URL"] == s3.server.endpoint
        yield s3
    assert {k: os.environ.get(k) for k in before} == before  # the AWS_* variables are restored


@pytest.mark.parametrize("workers", [0, 2])
def test_s3_and_local_loaders_deliver_the_same_keys(step_bench, s3_demo, small_demo, workers):  # noqa: F811
    assert s3_demo.url.startswith("s3://benchtest/")
    for epoch in (0, 1):
        loc = bl.first_batches(step_bench.loader_cfg(str(small_demo), workers, min_batches=4), 4, epoch=epoch)
        rem = bl.first_batches(step_bench.loader_cfg(s3_demo.url, workers, min_batches=4), 4, epoch=epoch)
        keys_loc, keys_rem = [b["key"] for b in loc], [b["key"] for b in rem]
        assert keys_loc == keys_rem
        assert all(len(k) == 32 for k in keys_loc)
        assert (loc[0]["image"] == rem[0]["image"]).all()
    other = bl.first_batches(step_bench.loader_cfg(str(small_demo), workers, min_batches=4), 4, epoch=2)
    assert [b["key"] for b in other] != keys_loc  # the comparison can fail: another epoch gives another order


def test_measure_wait_rows_local_and_s3(step_bench, s3_demo, small_demo):  # noqa: F811
    seen = []
    rows = bl.measure_wait(
        step_bench,
        {"local": str(small_demo), "s3": s3_demo.url},
        workers=[0, 1],
        warmup=2,
        steps=3,
        emit=seen.append,
    )
    assert seen == rows
    assert [(r["source"], r["num_workers"]) for r in rows] == [("local", 0), ("local", 1), ("s3", 0), ("s3", 1)]
    for r in rows:
        assert 0.0 <= r["data_wait_frac"] <= 1.0, r
        assert 0.0 <= r["data_wait_frac_incl_warmup"] <= 1.0, r
        assert r["loader_samples_per_s"] > 0 and r["step_samples_per_s"] > 0 and r["loop_samples_per_s"] > 0
        # the loop cannot run faster than its step alone by much (same step, plus the wait); generous for noise
        assert r["loop_samples_per_s"] < 3 * r["step_samples_per_s"], r
        assert r["batch_size"] == 32 and r["threads"] == 1 and r["steps"] == 3
    s = bl.summarize(rows)
    assert s["smallest_workers_under_target"] == bl.smallest_workers(rows)
    for src in ("local", "s3"):
        pick = s["smallest_workers_under_target"][src]
        ok = [r["num_workers"] for r in rows if r["source"] == src and r["data_wait_frac"] < bl.WAIT_TARGET]
        assert pick == (min(ok) if ok else None)
        assert (pick is None) == (src in s["why_none"])
