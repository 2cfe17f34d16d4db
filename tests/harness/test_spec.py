"""Sweep specs: expansion counts, paired arms, safe expressions, stable identities."""

from __future__ import annotations

import copy

import pytest

from harness.spec import SpecError, build_spec, config_lookup, hydra_value, load_spec, safe_eval

PAIRED = {
    "name": "evl",
    "experiment": "demo_mope",
    "overrides": {"mope.prompt_len": 6, "trainer.epochs": 1},
    "axes": {"mope.num_experts": [2, 4, 8, 16, 32]},
    "arms": {
        "mope": {"method": "mope"},
        "vanilla": {
            "method": "vanilla_prompt",
            "model.vanilla_prompt_len": "=(mope.num_experts + 1) * mope.prompt_len + 1",
        },
    },
    "seeds": [0, 1, 2],
}


def test_counts_axes_times_arms_times_seeds():
    spec = build_spec(
        {
            **PAIRED,
            "axes": {"mope.num_experts": [2, 4], "mope.prompt_len": [4, 6, 8]},
            "overrides": {"trainer.epochs": 1},
        }
    )
    trials = spec.expand()
    assert len(trials) == 2 * 3 * 2 * 3
    assert len({t.point_id for t in trials}) == 2 * 3 * 2
    assert len({t.trial_key for t in trials}) == len(trials)
    assert len({t.run_name for t in trials}) == len(trials)
    # seeds innermost, then arms, then the axis product in the spec's order
    assert [t.seed for t in trials[:3]] == [0, 1, 2]
    assert [t.arm for t in trials[:6]] == ["mope"] * 3 + ["vanilla"] * 3
    assert trials[0].values == {"mope.num_experts": 2, "mope.prompt_len": 4, "method": "mope"}


def test_seed_count_and_no_arms():
    spec = build_spec({"name": "s", "axes": {"data.shots": [8, 16]}, "seeds": 4})
    trials = spec.expand()
    assert len(trials) == 8 and {t.seed for t in trials} == {0, 1, 2, 3} and trials[0].arm is None
    assert "seed=3" in trials[-1].overrides and trials[-1].label == "shots16"


def test_constraints_filter_points():
    spec = build_spec(
        {
            **PAIRED,
            "constraints": [
                "mope.num_experts * mope.prompt_len <= 96",
                "arm == 'mope' or model.vanilla_prompt_len < 100",
            ],
        }
    )
    trials = spec.expand()
    mope = sorted({t.values["mope.num_experts"] for t in trials if t.arm == "mope"})
    van = sorted({t.values["mope.num_experts"] for t in trials if t.arm == "vanilla"})
    assert mope == [2, 4, 8, 16]  # 32*6 > 96
    assert van == [2, 4, 8]  # 16 -> L = 103 >= 100
    assert len(trials) == (4 + 3) * 3


def test_paired_arm_arithmetic():
    trials = build_spec(PAIRED).expand()
    got = {t.values["mope.num_experts"]: t.values["model.vanilla_prompt_len"] for t in trials if t.arm == "vanilla"}
    assert got == {2: 19, 4: 31, 8: 55, 16: 103, 32: 199}
    t = next(t for t in trials if t.arm == "vanilla" and t.values["mope.num_experts"] == 2)
    assert "model.vanilla_prompt_len=19" in t.overrides and "method=vanilla_prompt" in t.overrides
    assert t.label == "vanilla-num_experts2-vanilla_prompt_len19"
    # the shipped specs' form: the one formula (mope.config.tunable_prompts_per_layer) gives the same lengths
    fn = {
        **PAIRED["arms"]["vanilla"],
        "model.vanilla_prompt_len": "=tunable_prompts(mope.num_experts, mope.prompt_len)",
    }
    trials_fn = build_spec({**PAIRED, "arms": {**PAIRED["arms"], "vanilla": fn}}).expand()
    assert {
        t.values["mope.num_experts"]: t.values["model.vanilla_prompt_len"] for t in trials_fn if t.arm == "vanilla"
    } == got


def test_expression_reads_defaults_through_lookup():
    spec = build_spec({**PAIRED, "overrides": {}})  # prompt_len not set by the spec: from the composed base
    with pytest.raises(SpecError, match="mope.prompt_len"):
        spec.expand()
    trials = spec.expand(lookup=config_lookup({"mope": {"prompt_len": 6}, "method": {"name": "mope"}}))
    assert {t.values["model.vanilla_prompt_len"] for t in trials if t.arm == "vanilla"} >= {19, 199}


@pytest.mark.parametrize(
    "expr",
    [
        "__import__('os').system('true')",
        "open('/etc/passwd')",
        "(lambda: 1)()",
        "mope.__class__",
        "[x for x in (1,)]",
        "2 ** 1000",
        "exec('1')",
        "mope.num_experts.bit_length()",
        "{'a': 1}",
    ],
)
def test_safe_eval_rejects_code(expr):
    with pytest.raises(SpecError):
        safe_eval(expr, {"mope.num_experts": 2, "mope": 1})


def test_safe_eval_whitelist():
    ns = {"a.b": 3, "c": 2.5, "method": "mope"}
    assert safe_eval("max(a.b, 4) * 2 + a.b // 2 - abs(-1) + int(c)", ns) == 10
    assert safe_eval("method in ('mope', 'x') and not a.b > 3", ns) is True
    assert safe_eval("1 if method == 'mope' else 2", ns) == 1
    assert safe_eval("1 < a.b <= 3", ns) is True
    with pytest.raises(SpecError, match="unknown name 'd.e'"):
        safe_eval("d.e + 1", ns)
    with pytest.raises(SpecError, match="ZeroDivisionError"):
        safe_eval("a.b / 0", ns)


def test_spec_hash_stable_and_sensitive():
    a = build_spec(PAIRED)
    b = build_spec(copy.deepcopy(PAIRED))
    assert a.spec_hash == b.spec_hash and a.sweep_id == b.sweep_id == f"evl-{a.spec_hash[:8]}"
    # key order of mappings does not matter
    reordered = {**PAIRED, "overrides": {"trainer.epochs": 1, "mope.prompt_len": 6}}
    assert build_spec(reordered).spec_hash == a.spec_hash
    # anything defining trials does
    for change in (
        {"seeds": [0, 1]},
        {"axes": {"mope.num_experts": [2, 4]}},
        {"overrides": {"trainer.epochs": 2}},
        {"experiment": "demo_vanilla_prompt"},
        {"constraints": ["mope.num_experts < 9"]},
    ):
        assert build_spec({**PAIRED, **change}).spec_hash != a.spec_hash, change
    arms = copy.deepcopy(PAIRED["arms"])
    arms["vanilla"]["model.vanilla_prompt_len"] = "=(mope.num_experts + 1) * mope.prompt_len"
    assert build_spec({**PAIRED, "arms": arms}).spec_hash != a.spec_hash
    # command-line overrides and the profile are part of the identity; resources are not
    assert build_spec(PAIRED, extra_overrides=["data=mmimdb"]).spec_hash != a.spec_hash
    assert build_spec({**PAIRED, "resources": {"cpus_per_worker": 2}}).spec_hash == a.spec_hash
    prof = {**PAIRED, "profiles": {"big": {"resources": {"workers": 2}}}}
    assert build_spec(prof).spec_hash == a.spec_hash
    assert build_spec(prof, profile="big").spec_hash != a.spec_hash


def test_point_id_and_trial_key_stable():
    t1 = build_spec(PAIRED).expand()
    # a different spec with the same point gets the same point_id (hash of the point's overrides), another sweep_id
    other = build_spec({**PAIRED, "name": "other", "axes": {"mope.num_experts": [32, 2]}}).expand()
    p1 = {(t.arm, t.values["mope.num_experts"]): t.point_id for t in t1}
    p2 = {(t.arm, t.values["mope.num_experts"]): t.point_id for t in other}
    assert p1[("vanilla", 2)] == p2[("vanilla", 2)] and p1[("mope", 32)] == p2[("mope", 32)]
    assert t1[0].trial_key == f"{t1[0].sweep_id}/{t1[0].point_id}/0"
    assert [t.trial_key for t in t1] == [t.trial_key for t in build_spec(PAIRED).expand()]
    assert len(t1[0].point_id) == 12 and t1[0].run_name == f"{t1[0].sweep_id}/mope-num_experts2-s0"


def test_profiles_and_cli_overrides():
    spec = build_spec(
        {
            **PAIRED,
            "profiles": {
                "paper": {
                    "experiment": "paper_food101_mope_swin_b_k4",
                    "overrides": {"trainer.epochs": 15},
                    "axes": {"mope.num_experts": [4, 16]},
                    "resources": {"gpus_per_worker": 1},
                }
            },
        },
        profile="paper",
        extra_overrides=["data=mmimdb"],
    )
    assert spec.experiment == "paper_food101_mope_swin_b_k4" and spec.resources.gpus_per_worker == 1
    assert spec.overrides == {"mope.prompt_len": 6, "trainer.epochs": 15, "data": "mmimdb"}
    assert len(spec.expand()) == 2 * 2 * 3
    with pytest.raises(SpecError, match="profile='nope'"):
        build_spec(PAIRED, profile="nope")
    with pytest.raises(SpecError, match="sets an axis"):
        build_spec(PAIRED, extra_overrides=["mope.num_experts=3"])


@pytest.mark.parametrize(
    "bad,match",
    [
        ({"axes": {"mope.num_experts": []}}, "non-empty list"),
        ({"axes": {"mope.num_experts": [2, 2]}}, "duplicate"),
        ({"seeds": [0, 0]}, "duplicates"),
        ({"seeds": 0}, "seeds"),
        ({"overrides": {"seed": 1}}, "reserved"),
        ({"overrides": {"mope.k": "=1+1"}}, "only allowed in arms"),
        ({"arms": {"a": {"mope.num_experts": 3}}}, "which are axes"),
        ({"arms": {"a": {"method": "mope"}, "b": {"method": "mope"}}}, "duplicate trials"),
        ({"constraints": ["mope.num_experts > 100"]}, "exclude every point"),
        ({"constraints": ["mope.num_experts +"]}, "not valid"),
        ({"resources": {"gpus_per_worker": 1.5}}, "fractions only below 1"),
        ({"resources": {"gpu": 1}}, "unknown key"),
        ({"objective": {"metric": "val/acc", "mode": "up"}}, "mode"),
        ({"bogus": 1}, "unknown top-level"),
        ({"name": "has space"}, "name="),
    ],
)
def test_bad_specs_are_named(bad, match):
    with pytest.raises(SpecError, match=match):
        build_spec({**PAIRED, **bad}).expand()


def test_hydra_values_are_quoted():
    assert hydra_value("vanilla_prompt") == "vanilla_prompt"
    assert hydra_value("a b") == "'a b'" and hydra_value("null") == "'null'" and hydra_value(None) == "null"
    assert hydra_value([3, 6]) == "[3,6]" and hydra_value(True) == "true" and hydra_value(0.001) == "0.001"


def test_resources_concurrency():
    from harness.spec import Resources

    assert Resources().max_concurrent_for(2) == 2
    assert Resources(workers=2, cpus_per_worker=1).max_concurrent_for(2) == 1
    assert Resources(gpus_per_worker=0.25, cpus_per_worker=2).max_concurrent_for(16, 1) == 4
    assert Resources(workers=2, gpus_per_worker=1, cpus_per_worker=4).max_concurrent_for(64, 8) == 4
    assert Resources(max_concurrent=1).max_concurrent_for(8) == 1


def test_load_spec_yaml(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text(
        "name: t\nexperiment: demo_mope\noverrides: ['trainer.epochs=2', 'data.shots=8']\n"
        "axes: {mope.num_experts: [2, 4]}\nprofiles: {p: {seeds: [5]}}\n"
    )
    spec = load_spec(p, ["profile=p", "trainer.lr_vision=0.01"])
    assert spec.overrides == {"trainer.epochs": 2, "data.shots": 8, "trainer.lr_vision": 0.01}
    assert spec.seeds == [5] and spec.profile == "p" and len(spec.expand()) == 2
    p.write_text("name: t\n!!python/object:os.system ['true']\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(p)
