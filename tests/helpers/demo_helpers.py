"""A small demo build and a training configuration over it, shared by the worker tests (CPU) and the GPU test."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.compose import compose


def build_small_demo(out: Path) -> Path:
    from datasets_prep.demo import DemoConfig, build_demo
    from datasets_prep.pretrain_vision import PretrainConfig

    cfg = DemoConfig(
        train_pairs=512,
        val_pairs=128,
        test_pairs=128,
        pretrain=PretrainConfig(
            embed_dim=32, depth=2, num_heads=2, epochs=1, grids_per_epoch=256, val_grids=64, batch_size=64, threads=1
        ),
    )
    build_demo(out, cfg, shard_size=32, verbose=False)
    return out


def cfg_for(demo: Path, run_root: Path, *extra: str) -> dict:
    return compose(
        [
            "experiment=demo_mope",
            f"data.shard_dir={demo}",
            f"vision.weights={demo}/vision_encoder",
            f"paths.run_root={run_root}",
            "data.auto_prepare=false",
            "deepspeed=off",
            "trainer.num_workers=0",
            "trainer.batch_size=32",
            "trainer.log_every_steps=4",
            "trainer.routing_stats_every_steps=4",
            "trainer.threads=1",
            "trainer.lr_vision=1e-2",
            "trainer.lr_text=1e-2",
            *extra,
        ]
    )


@pytest.fixture(scope="session")
def small_demo(tmp_path_factory):
    """The small demo build, once per test session (conftests of tests/harness and tests/reliability import it)."""
    return build_small_demo(tmp_path_factory.mktemp("demo") / "demo")
