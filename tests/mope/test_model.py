"""Fusion model: every method's trainable set and gradients, identity with prompts off, batch independence, I/O."""

import pytest
import torch

from mope import AdapterMismatchError, load_adapter, save_adapter, task_loss
from mope.config import Method, Task
from mope.methods import METHODS
from tests.helpers.tinymodels import IMG, TINY_SWIN, TINY_VIT, build, make_batch, tiny_cfg

ALL_METHODS = list(Method)


@pytest.mark.parametrize("method", ALL_METHODS, ids=lambda m: m.value)
def test_gradients_reach_every_trainable_tensor_and_no_frozen_one(method):
    model = build(tiny_cfg(method))
    model.train()
    batch = make_batch(4, 32)
    out = model(batch)
    loss = task_loss(out.logits, batch["label"], Task.SINGLE_LABEL) + out.aux_loss
    loss.backward()
    spec = METHODS[method]
    for name, p in model.named_parameters():
        if p.requires_grad:
            if name.startswith("comp_encoder.model.pooler") and model.comp_encoder.pool != "pooler":
                continue  # BERT's pooler is unused when ψ is the [CLS] state
            assert p.grad is not None and torch.count_nonzero(p.grad) > 0, f"{method.value}: no grad for {name}"
        else:
            assert p.grad is None, f"{method.value}: frozen {name} got a gradient"
    groups = {model.component_of(n) for n, p in model.named_parameters() if p.requires_grad}
    assert ("vision encoder" in groups) == spec.train_main
    assert ("text encoder" in groups) == spec.train_comp
    assert "head" in groups
    if method == Method.MOPE:
        assert {"vision prompts", "router", "mapper", "text prompts"} <= groups
        assert out.routing is not None and out.imp_loss is not None


@pytest.mark.parametrize("vision", [TINY_VIT, TINY_SWIN], ids=["vit", "swin"])
def test_all_prompt_kinds_off_is_the_frozen_backbone(vision):
    model = build(tiny_cfg("mope", vision, use_static=False, use_dynamic=False, use_mapped=False))
    model.eval()
    batch = make_batch(3, IMG[vision.kind])
    out = model(batch)
    m = model.main_encoder.model
    ref = m.forward_head(m.forward_features(batch["image"]), pre_logits=True)
    if vision.kind == "timm_vit":
        assert torch.equal(out.features, ref)  # the ViT adapter calls timm's own blocks: bit-exact
    else:  # the Swin adapter computes window attention itself (SDPA with padded bias): float-rounding level
        torch.testing.assert_close(out.features, ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("vision", [TINY_VIT, TINY_SWIN], ids=["vit", "swin"])
def test_batch_independence_eval(vision):
    model = build(tiny_cfg("mope", vision))
    model.eval()
    size = IMG[vision.kind]
    big = make_batch(16, size, seed=1)
    with torch.no_grad():
        full = model(big).logits
        for i in (0, 7, 15):
            alone = model({k: v[i : i + 1] for k, v in big.items()}).logits
            torch.testing.assert_close(alone, full[i : i + 1], atol=1e-5, rtol=0)
        other = dict(big)
        other["image"] = big["image"].clone()
        other["image"][3:] = torch.randn_like(other["image"][3:])
        torch.testing.assert_close(model(other).logits[:3], full[:3], atol=1e-5, rtol=0)


def test_reference_window_layout_leaks_across_the_batch():
    diffs = {}
    for layout in ("correct", "reference"):
        # large prompts so that the instance-conditioned prompts dominate the tiny random Swin
        model = build(tiny_cfg("mope", TINY_SWIN, window_prompt_layout=layout, prompt_init_scale=2.0))
        model.eval()
        big = make_batch(16, 56, seed=1)
        with torch.no_grad():
            full = model(big).features
            alone = model({k: v[:1] for k, v in big.items()}).features
        diffs[layout] = (alone - full[:1]).abs().max().item()
    assert diffs["correct"] <= 1e-5
    assert diffs["reference"] > 100 * max(diffs["correct"], 1e-6)


def test_eval_is_deterministic_with_vmoe_noise():
    model = build(tiny_cfg("mope", router_noise="vmoe"))
    batch = make_batch(4, 32)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(batch).logits, model(batch).logits)


def test_multilabel_loss_and_predictions():
    from mope import predictions

    logits = torch.tensor([[2.0, -1.0, 0.1]])
    target = torch.tensor([[1, 0, 1]])
    assert predictions(logits, Task.MULTI_LABEL).tolist() == [[1, 0, 1]]
    assert task_loss(logits, target, Task.MULTI_LABEL).item() > 0


def test_adapter_roundtrip_exact_and_mismatch(tmp_path):
    cfg = tiny_cfg("mope")
    a = build(cfg, seed=0)
    with torch.no_grad():
        for p in a.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    save_adapter(a, tmp_path / "ad")
    b = build(cfg, seed=1)  # another init; copy the frozen encoders, then the adapter must restore the rest
    b.main_encoder.load_state_dict(a.main_encoder.state_dict())
    b.comp_encoder.load_state_dict(a.comp_encoder.state_dict())
    load_adapter(b, tmp_path / "ad")
    for (n, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(pa, pb), n
    a.eval(), b.eval()
    batch = make_batch(2, 32)
    with torch.no_grad():
        assert torch.equal(a(batch).logits, b(batch).logits)
    wrong = build(tiny_cfg("mope", num_experts=8))
    with pytest.raises(AdapterMismatchError, match="num_experts"):
        load_adapter(wrong, tmp_path / "ad")
    with pytest.raises(AdapterMismatchError, match="shape"):
        load_adapter(wrong, tmp_path / "ad", check_config=False)


def test_adapter_file_holds_only_adapter_tensors(tmp_path):
    from safetensors.torch import load_file

    model = build(tiny_cfg("mope"))
    save_adapter(model, tmp_path)
    keys = set(load_file(str(tmp_path / "adapter.safetensors")))
    assert keys and all(k.split(".")[0] in ("main_prompts", "comp_prompts", "head") for k in keys)
    assert any(k.endswith(".keys") for k in keys)  # frozen routing keys travel with the adapter


def test_custom_blackbox_complementary_encoder_bag_of_words():
    from mope import build_model
    from mope.backbones.blackbox import BagOfWordsEncoder

    emb = torch.nn.Embedding(100, 24)
    for proj, blackbox in ((None, True), (16, False)):
        bow = BagOfWordsEncoder(emb, proj_dim=proj)
        model = build_model(tiny_cfg("mope"), comp_module=bow)
        assert model.comp_is_blackbox == blackbox and model.comp_prompts is None
        model.train()
        batch = make_batch(4, 32)
        out = model(batch)
        (out.logits.sum() + out.aux_loss).backward()
        assert bow.embeddings.weight.grad is None
        if proj:
            assert bow.proj.weight.grad is not None  # the BoW projector trains (Table 5 "BoW*")
        assert model.main_prompts.mapper.down.weight.grad is not None


def test_adapter_refuses_other_frozen_backbone_and_missing_config(tmp_path):
    from safetensors.torch import load_file, save_file

    cfg = tiny_cfg("mope")
    a = build(cfg, seed=0)
    save_adapter(a, tmp_path / "ad")
    other = build(cfg, seed=5)  # same config, different frozen encoder weights
    with pytest.raises(AdapterMismatchError, match="frozen main_encoder weights differ"):
        load_adapter(other, tmp_path / "ad")
    state = load_file(str(tmp_path / "ad" / "adapter.safetensors"))
    save_file(state, str(tmp_path / "ad" / "adapter.safetensors"))  # no metadata
    with pytest.raises(AdapterMismatchError, match="no model config"):
        load_adapter(a, tmp_path / "ad")
    load_adapter(a, tmp_path / "ad", check_config=False)


def test_new_model_keeps_frozen_timm_encoder_in_eval():
    model = build(tiny_cfg("mope", TINY_SWIN))
    assert model.training and not model.main_encoder.training
    assert model.main_prompts.training


TABLE2_ROWS = {  # mope-reference Table 2: which of [P_s, P_d, P_m] the main encoder gets
    "P_s": (True, False, False),
    "P_d": (False, True, False),
    "P_m": (False, False, True),
    "P_s+P_d": (True, True, False),
    "P_s+P_m": (True, False, True),
    "P_d+P_m": (False, True, True),
    "all": (True, True, True),
}


@pytest.mark.parametrize("main", ["vision", "text"])
@pytest.mark.parametrize("row", list(TABLE2_ROWS), ids=str)
def test_every_trainable_tensor_gets_a_gradient_for_every_table2_row(row, main):
    s, d, m = TABLE2_ROWS[row]
    cfg = tiny_cfg("mope", TINY_VIT, use_static=s, use_dynamic=d, use_mapped=m)
    cfg = type(cfg)(**{**cfg.__dict__, "main": main})
    model = build(cfg)
    model.train()
    batch = make_batch(4, 32)
    out = model(batch)
    (task_loss(out.logits, batch["label"], Task.SINGLE_LABEL) + out.aux_loss).backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            if ".pooler." in name and getattr(model.comp_encoder, "pool", "pooler") != "pooler":
                continue  # BERT's pooler is unused when ψ is the [CLS] state
            assert p.grad is not None and torch.count_nonzero(p.grad) > 0, f"{row}/{main}: no grad for {name}"
    comps = model.parameter_report()["components"]
    comp_prompts = f"{model.comp_modality} prompts"
    if row == "P_s":  # ψ is read by nothing: no complementary encoder, no complementary prompts, none counted
        assert model.comp_encoder is None and model.comp_prompts is None
        assert comp_prompts not in comps and f"{model.comp_modality} encoder" not in comps
    else:
        assert comps[comp_prompts]["trainable"] > 0


def test_frozen_complementary_swin_runs_in_eval_so_psi_is_deterministic_in_training():
    """main=text: the complementary Swin carries l' prompts (so it is not a cacheable black box), yet it is frozen:
    its DropPath must stay off in training (reference train() override, mope-reference §1.8)."""
    swin = type(TINY_SWIN)(kind="timm_swin", name=TINY_SWIN.name, kwargs={**TINY_SWIN.kwargs, "drop_path_rate": 0.5})
    cfg = tiny_cfg("mope", swin)
    cfg = type(cfg)(**{**cfg.__dict__, "main": "text", "comp_prompt_dropout": 0.0})
    model = build(cfg)
    model.train()
    assert model.comp_prompts is not None and not model.comp_is_blackbox
    assert not model.comp_encoder.training and model.comp_prompts.training
    batch = make_batch(4, IMG["timm_swin"])
    psi1 = model.complementary_feature(batch)
    psi2 = model.complementary_feature(batch)
    assert torch.equal(psi1, psi2)
    model.train()  # a later train() call (every epoch) keeps the policy
    assert not model.comp_encoder.training
