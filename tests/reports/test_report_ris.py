"""The referring-segmentation report from hand-built tables: Table 7 (ours per split beside the paper's RefCOCO /
RefCOCO+ numbers, chance rows), the Table 7 claim, and the mask figure drawn from logged examples
(harness.mask_examples files, written and read back)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from mope_data.mask_examples import read, write
from reports.build import build_report
from reports.data import SweepData, primary_metric

MIOU = {"mope": 0.62, "p_sequential_fuse": 0.48, "sequential_fuse": 0.55}


def _rows(chance=0.30):
    rows = []
    for i, (meth, base) in enumerate(MIOU.items()):
        for seed in (0, 1, 2):
            m = base + 0.01 * seed
            rows.append(
                {
                    "trial_key": f"t/{i}/{seed}",
                    "point_id": str(i),
                    "label": meth,
                    "arm": meth,
                    "seed": seed,
                    "run_id": f"r{i}_{seed}",
                    "status": "FINISHED",
                    "error": None,
                    "wall_s": 40.0,
                    "method.name": meth,
                    "data.name": "ris_demo",
                    "data.task": "segmentation",
                    "mope.num_experts": 4,
                    "mope.prompt_len": 6,
                    "cost/trainable_params": 1e5,
                    "val/miss_frac": 0.1,
                    "final/val_miou": m + 0.02,
                    "final/testA_miou": m + 0.01,
                    "final/testB_miou": m - 0.01,
                    "final/test_miou": m,
                    "final/val_oiou": m + 0.05,
                    "final/testA_oiou": m + 0.04,
                    "final/testB_oiou": m + 0.03,
                    "final/val_miou_best": m + 0.02,
                    "chance/testA/all_objects_miou": chance,
                    "chance/testB/all_objects_miou": chance - 0.02,
                    "chance/testA/random_object_miou": 0.25,
                    "chance/testB/random_object_miou": 0.25,
                    "chance/val/all_objects_miou": chance,
                    "chance/val/random_object_miou": 0.25,
                }
            )
    return rows


def _examples(tmp_path, rng, shift):
    n, side = 6, 16
    img = rng.integers(0, 255, (n, side, side, 3), dtype=np.uint8)
    gt = np.zeros((n, side, side), np.uint8)
    gt[:, 4:10, 4:10] = 1
    prob = np.roll(gt, shift, axis=2).astype(np.uint8) * 255
    import torch

    ex = {
        "image": torch.from_numpy(img),
        "mask": torch.from_numpy(gt),
        "prob": torch.from_numpy(prob),
        "keys": [f"k{i}" for i in range(n)],
        "texts": [f"the red circle number {i}" for i in range(n)],
        "iou": [
            float(((np.roll(gt[i], shift, 1) & gt[i]).sum()) / (np.roll(gt[i], shift, 1) | gt[i]).sum())
            for i in range(n)
        ],
    }
    return read(write(tmp_path / f"ex{shift}", ex))


def _data(tmp_path, examples=True):
    rng = np.random.default_rng(0)
    mask_examples = (
        {f"r{i}_0": _examples(tmp_path, rng, shift) for i, shift in enumerate((0, 2, 4))} if examples else {}
    )
    meta = {"sweep_id": "ris-00000000", "spec_name": "ris", "axes": {}, "status": "FINISHED", "seeds": [0, 1, 2]}
    return SweepData(meta, pd.DataFrame(_rows()), mask_examples=mask_examples)


def test_table7_claim_and_mask_figure(tmp_path):
    data = _data(tmp_path)
    assert primary_metric(data.runs) == "final/test_miou"
    rep = build_report(data, tmp_path / "report")
    t7 = next(t for t in rep.tables if t.key == "table7")
    assert not any(t.key == "table1" for t in rep.tables)  # the classification paper columns do not apply
    rows = {r[0]: r for r in t7.rows}
    assert set(rows) == {
        "mope (k=4)",
        "p_sequential_fuse",
        "sequential_fuse",
        "chance: every object",
        "chance: a random object",
    }
    assert rows["mope (k=4)"][1].startswith("0.650")  # val mIoU mean of 0.64/0.65/0.66
    assert "58.40" in rows["mope (k=4)"] and "47.69" in rows["p_sequential_fuse"]  # the paper's RefCOCO val
    assert rows["chance: every object"][2] == "0.300" and rows["chance: every object"][3] == "0.280"
    claim = next(c for c in rep.claims if c.key == "ris")
    assert claim.verdict == "supported"
    assert [r.verdict for r in claim.rows] == ["supported"] * 3
    assert "chance 0.300" in claim.rows[2].statistic
    assert "masks_val" in rep.figures and rep.figures["masks_val"].is_file()
    assert {"fig4_expert_vs_length", "fig5_data_scaling"}.isdisjoint(s.key for s in rep.skipped)
    html = (tmp_path / "report" / "report.html").read_text()
    assert "Table 7" in html and "Predicted masks" in html


def test_mope_below_chance_is_not_supported(tmp_path):
    data = _data(tmp_path, examples=False)
    data.runs["chance/testA/all_objects_miou"] = 0.9
    data.runs["chance/testB/all_objects_miou"] = 0.9
    rep = build_report(data, tmp_path / "r2")
    claim = next(c for c in rep.claims if c.key == "ris")
    assert claim.rows[-1].verdict == "not supported" and claim.verdict == "not supported"
    assert any(s.key == "masks_val" for s in rep.skipped)


def test_examples_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="examples.safetensors"):
        read(tmp_path)


def test_segmentation_collapse_uses_miss_frac(tmp_path):
    """val/miss_frac is the segmentation runs' collapse detector: its presence is not reported missing, and a run
    whose masks miss the object on >= 99% of val is flagged as collapsed with that share."""
    data = _data(tmp_path, examples=False)
    rep = build_report(data, tmp_path / "r3")
    assert not any("collapse detector" in m for m in rep.missing)
    assert not any("collapsed" in w for w in rep.warnings)
    data.runs.loc[data.runs["run_id"] == "r0_1", "val/miss_frac"] = 0.995
    rep = build_report(data, tmp_path / "r4")
    hit = [w for w in rep.warnings if "collapsed" in w]
    assert len(hit) == 1 and "mope seed 1" in hit[0] and "miss the referred object on 99.5% of val" in hit[0]
