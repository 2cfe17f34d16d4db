"""Every shipped experiment composes and validates; bad values are named."""

from pathlib import Path

import pytest

from harness.compose import ConfigValidationError, compose, fusion_config, validate

EXPERIMENTS = sorted(
    p.stem for p in (Path(__file__).resolve().parents[2] / "harness/configs/experiment").glob("*.yaml")
)


@pytest.mark.parametrize("exp", EXPERIMENTS)
def test_every_experiment_composes_and_validates(exp):
    cfg = compose([f"experiment={exp}"])
    fcfg = validate(cfg, check_paths=False)
    assert fcfg.method.value == cfg["method"]["name"]
    assert Path(cfg["paths"]["run_root"]).is_absolute() and Path(cfg["data"]["shard_dir"]).is_absolute()


def test_paper_settings():
    cfg = compose(["experiment=paper_food101_mope_swin_b_k16"])
    tr = cfg["trainer"]
    assert (tr["lr_vision"], tr["lr_text"], tr["weight_decay"]) == (4e-4, 5e-4, 1e-3)
    assert (tr["milestones"], tr["gamma"], tr["epochs"], tr["batch_size"]) == ([3, 6], 0.4, 15, 38)
    f = fusion_config(cfg)
    assert f.num_classes == 101 and f.mope.num_experts == 16 and f.vision.kind == "timm_swin"
    assert compose(["experiment=paper_mmimdb_mope_swin_b_k4"])["data"]["task"] == "multi_label"


@pytest.mark.parametrize(
    "override,field",
    [
        ("mope.routing=sparse", "mope.routing"),
        ("trainer.precision=fp8", "trainer.precision"),
        ("deepspeed.zero_stage=3", "deepspeed.zero_stage"),
        ("data.shots=0", "data.shots"),
        ("method=moe", "method"),
    ],
)
def test_bad_values_are_named(override, field):
    with pytest.raises(ConfigValidationError, match=field.split(".")[-1]):
        validate(compose(["experiment=demo_mope", override]), check_paths=False)


def test_missing_shards_name_the_fix(tmp_path):
    cfg = compose(["experiment=paper_snli_ve_mope_swin_b_k4", f"paths.data_root={tmp_path}"])
    with pytest.raises(ConfigValidationError, match="harness prep snli_ve"):
        validate(cfg)


def test_weights_are_checked_only_for_the_encoders_the_model_builds(tmp_path):
    from harness.compose import ConfigValidationError, compose, validate

    shards = tmp_path / "shards"
    shards.mkdir()
    missing = str(tmp_path / "nowhere")
    # MUStARD: text main + audio/video complementary: the vision encoder is never built, its weights are not read
    validate(compose(["experiment=mustard_tiny_mope", f"data.shard_dir={shards}", f"vision.weights={missing}"]))
    with pytest.raises(ConfigValidationError, match=r"video\.weights=.*nowhere does not exist"):
        validate(compose(["experiment=mustard_tiny_mope", f"data.shard_dir={shards}", f"video.weights={missing}"]))
    with pytest.raises(ConfigValidationError, match=r"vision\.weights=.*nowhere does not exist"):
        validate(
            compose(
                [
                    "experiment=demo_mope",
                    f"data.shard_dir={shards}",
                    "data.auto_prepare=false",
                    f"vision.weights={missing}",
                ]
            )
        )
