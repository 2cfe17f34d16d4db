"""Parameter counts of the paper presets (Table 1) and of the reference structure (mope-reference §8 test 4)."""

import json
import os
import subprocess
import sys

import pytest

from harness.inspect_cmd import inspect_preset

TABLE1 = {  # preset -> Table 1 "Param" (trainable)
    "paper/mope_swin_b_k4": 1.6e6,
    "paper/mope_swin_b_k16": 2.6e6,
    "paper/mope_vit_b_k4": 1.6e6,
    "paper/p_sequential_fuse_swin_b": 1.1e6,
}


@pytest.mark.parametrize("preset,target", sorted(TABLE1.items()))
def test_paper_presets_within_10_percent_of_table1(preset, target):
    rep = inspect_preset(preset)
    assert isinstance(rep["trainable"], int)
    assert abs(rep["trainable"] - target) / target <= 0.10, rep["trainable"]
    assert rep["components"]["vision encoder"]["trainable"] == 0
    assert rep["components"]["text encoder"]["trainable"] == 0


def test_reference_structure_matches_spec_count_exactly():
    rep = inspect_preset("reference/mope_swin_b_k4")
    c = rep["components"]
    encoder_side = c["vision prompts"]["trainable"] + c["router"]["trainable"] + c["mapper"]["trainable"]
    # 1,569,648 allocated by the official code - 57,600 unused block-0 prompt slots - 28,456 unused block-0 routers
    assert encoder_side == 1_483_592
    assert c["text prompts"]["trainable"] == 12 * 4 * 768  # BERT deep prompts l'=4
    assert rep["routed_blocks"] == [1, 3] + list(range(5, 22)) + [23]  # 20 routed blocks, block 0 of each stage not
    assert rep["attention_length_per_layer"]["vision"] == [49 + 13] * 24  # 62 tokens per window at l=6


def test_paper_preset_routes_every_block_and_counts_what_reference_allocates():
    rep = inspect_preset("paper/mope_swin_b_k4")
    c = rep["components"]
    encoder_side = c["vision prompts"]["trainable"] + c["router"]["trainable"] + c["mapper"]["trainable"]
    assert len(rep["routed_blocks"]) == 24
    assert encoder_side == 1_569_648 - 13 * 128  # the reference's allocation minus its (now unneeded) shallow prompt


def test_baselines_trainable_sets():
    img = inspect_preset("paper/img_only_swin_b")
    assert img["components"]["vision encoder"]["trainable"] > 80e6  # Swin-B fine-tuned
    assert "text encoder" not in img["components"]
    late = inspect_preset("paper/late_concat_swin_b")
    assert late["trainable"] > 190e6  # both encoders + head (Table 1: 196.0M)


def test_cli_json_has_integer_trainable():
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    out = subprocess.run(
        [sys.executable, "-m", "harness.cli", "inspect", "--preset", "paper/p_img_only_swin_b", "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    rep = json.loads(out.stdout)
    assert (
        isinstance(rep["trainable"], int)
        and rep["trainable"] == 6 * (128 * 2 + 256 * 2 + 512 * 18 + 1024 * 2) + 3 * 1024 + 3
    )
    bad = subprocess.run(
        [sys.executable, "-m", "harness.cli", "inspect", "--preset", "nope"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert bad.returncode == 2 and "available" in bad.stderr


def test_mustard_preset_text_main_audio_video_complementary():
    rep = inspect_preset("paper/mustard_mope_bert_b_k4")
    c = rep["components"]
    assert rep["main"] == "text" and rep["complementary"] == ["audio", "video"] and rep["num_classes"] == 2
    assert c["audio+video encoder"]["trainable"] == 0 and c["text encoder"]["trainable"] == 0
    assert c["text prompts"]["trainable"] == 12 * (6 + 4 * 6 + 1) * 768 - 12 * 768  # static + 4 experts per layer
    # the mapper reads psi = [wav2vec2-base 768, ViT-B 768]: bottleneck 768 by default (complementary dim // 2)
    assert c["mapper"]["trainable"] > 1536 * 768
    attn = rep["attention_length_per_layer"]
    assert attn["text"] == [512 + 13] * 12 and attn["audio"] == [499] * 12 and attn["video"] == [197] * 12
    assert rep["trainable"] == sum(x["trainable"] for x in c.values())


def test_inspect_list_shows_counts_for_every_preset():
    import io
    from contextlib import redirect_stdout

    from harness.inspect_cmd import main
    from mope.presets import list_presets

    buf = io.StringIO()
    with redirect_stdout(buf):
        assert main(["--list"]) == 0
    lines = buf.getvalue().splitlines()
    assert len(lines) == len(list_presets())
    mustard = next(x for x in lines if x.startswith("paper/mustard_promptfuse_bert_b"))
    assert "main=text" in mustard and "comp=audio,video" in mustard and "trainable" in mustard
