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


def main(argv: list[str] | None = None) -> int:
    from harness.compose import ConfigValidationError, compose, validate

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
    from harness.run_setup import run_dir_of

    run_dir = run_dir_of(cfg)
    if not cfg.get("resume") and list_checkpoints(run_dir):
        print(
            f"harness train: {run_dir} already holds checkpoints of this exact configuration (run "
            f"{cfg['run_name']}); add resume=true to continue it, or set run_name=<new name> for a separate run "
            "(nothing was changed)",
            file=sys.stderr,
        )
        return 2
    from harness.checkpoint import CheckpointError
    from harness.recipe import TrainingDiverged, train
    from harness.run_setup import DataMismatchError
    from harness.tracking import TrackingUnavailable

    try:
        s = train(cfg)
    except (TrainingDiverged, CheckpointError, TrackingUnavailable) as e:  # each message names the cause and fix
        print(f"harness train: FAILED: {e}", file=sys.stderr)
        return 1
    except DataMismatchError as e:
        print(f"harness train: {e}", file=sys.stderr)
        return 2
    keys = [k for k in s if k.startswith("final/")]
    print(f"run {cfg['run_name']} ({s.get('run_id')}): " + ", ".join(f"{k[6:]}={s[k]:.4f}" for k in sorted(keys)))
    return 0
