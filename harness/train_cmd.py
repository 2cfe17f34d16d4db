"""`harness train [overrides...]`: one training run of one configuration, tracked in MLflow.

    harness train experiment=demo_mope
    harness train experiment=demo_mope mope.num_experts=16 seed=1
    harness train experiment=demo_mope resume=true        # continue from the last checkpoint of the same run

The tracking store defaults to SQLite under the run root (`mlflow ui --host 127.0.0.1 --backend-store-uri sqlite:///<run_root>/mlflow.db`);
set MLFLOW_TRACKING_URI or tracking.uri for a server.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Any


def open_tracker(cfg: dict[str, Any], *, rank: int = 0, trial_key: str | None = None, parent_run_id: str | None = None,
                 tags: dict | None = None):
    from harness.tracking import default_tracking_uri, flatten_config, make_tracker
    from harness.worker import RUN_CONTROL_KEYS, config_id

    t = cfg["tracking"]
    uri = t.get("uri") or default_tracking_uri(cfg["paths"]["run_root"])
    # run-control keys are not part of the configuration's identity (a resumed run keeps its params)
    params = {k: v for k, v in cfg.items() if k not in RUN_CONTROL_KEYS}
    return make_tracker(
        rank,
        tracking_uri=uri,
        experiment=t["experiment"],
        run_name=cfg["run_name"],
        trial_key=trial_key or f"train/{cfg['run_name']}/{config_id(cfg)}",
        parent_run_id=parent_run_id,
        tags={"harness.method": cfg["method"]["name"], "harness.dataset": cfg["data"]["name"], **(tags or {})},
        params=flatten_config(params),
        enabled=bool(t.get("enabled", True)),
    )


def log_run_artifacts(tracker, cfg: dict[str, Any]) -> None:
    import yaml

    from harness.provenance import provenance

    manifests = sorted(Path(cfg["data"]["shard_dir"]).glob("*/manifest.json"))
    tracker.log_dict(provenance(manifests), "provenance.json")
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "config.yaml"
        p.write_text(yaml.safe_dump(cfg, sort_keys=False))
        tracker.log_artifact(str(p))


def run(cfg: dict[str, Any], *, rank: int = 0, world_size: int = 1, tracker=None, **kw) -> dict[str, Any]:
    """Runs `cfg` with a tracker that is always closed with the right status (FINISHED / FAILED / KILLED)."""
    from harness.worker import train

    own = tracker is None
    tracker = tracker or open_tracker(cfg, rank=rank)
    try:
        if rank == 0:
            log_run_artifacts(tracker, cfg)
        summary = train(cfg, rank=rank, world_size=world_size, tracker=tracker, **kw)
    except KeyboardInterrupt:
        if own:
            tracker.finish("KILLED")
        raise
    except BaseException as e:
        if own:
            tracker.set_tags({"harness.error": f"{type(e).__name__}: {e}"[:5000]})
            tracker.finish("FAILED")
        raise
    if own:
        tracker.finish("FINISHED" if summary.get("finished") else "KILLED")
    summary["run_id"] = tracker.run_id
    return summary


def main(argv: list[str] | None = None) -> int:
    from harness.compose import ConfigValidationError, compose, validate
    from harness.worker import DataMismatchError, TrainingDiverged

    argv = list(argv or [])
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        cfg = compose(argv)
        validate(cfg)
    except ConfigValidationError as e:
        print(f"harness train: {e}", file=sys.stderr)
        return 2
    from harness.checkpoint import list_checkpoints
    from harness.worker import run_dir_of

    run_dir = run_dir_of(cfg)
    if not cfg.get("resume") and list_checkpoints(run_dir):
        print(f"harness train: {run_dir} already holds checkpoints of this exact configuration (run {cfg['run_name']}); "
              "add resume=true to continue it, or set run_name=<new name> for a separate run (nothing was changed)",
              file=sys.stderr)
        return 2
    from harness.checkpoint import CheckpointError
    from harness.tracking import TrackingUnavailable

    try:
        s = run(cfg)
    except (TrainingDiverged, CheckpointError, TrackingUnavailable) as e:  # each message names the cause and fix
        print(f"harness train: FAILED: {e}", file=sys.stderr)
        return 1
    except DataMismatchError as e:
        print(f"harness train: {e}", file=sys.stderr)
        return 2
    keys = [k for k in s if k.startswith("final/")]
    print(f"run {cfg['run_name']} ({s.get('run_id')}): " + ", ".join(f"{k[6:]}={s[k]:.4f}" for k in sorted(keys)))
    return 0
