"""Training checkpoints: exact resume (optimizer, scheduler, RNG), atomic layout, keep-last-K, corrupt files, and a
DeepSpeed CPU smoke test (ZeRO-2, fp32, one process) of save_engine/load_engine."""

from __future__ import annotations

import random
import socket
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from harness import checkpoint as ck
from harness.ds_config import deepspeed_config, trainable_param_groups
from mope.model import task_loss
from tests.helpers.tinymodels import make_batch, tiny_cfg

LRS = {"vision": 4e-4, "text": 5e-4}


@pytest.fixture(autouse=True)
def _threads(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)


def _model(seed=0):
    from mope import build_model

    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_model(tiny_cfg("mope"))


def _setup(seed=0):
    model = _model(seed)
    opt = torch.optim.AdamW(trainable_param_groups(model, LRS, weight_decay=1e-3))
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[2, 4], gamma=0.4)
    return model, opt, sched


def _step(model, opt, sched, seed):
    b = make_batch(4, 32, seed=seed)
    out = model(b)
    loss = task_loss(out.logits, b["label"], model.cfg.task) + out.aux_loss
    opt.zero_grad()
    loss.backward()
    opt.step()
    sched.step()
    return loss.item()


def _trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _draws():
    return torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)], np.random.randn(1)


def test_round_trip_resumes_exactly(tmp_path):
    model, opt, sched = _setup()
    for s in range(2):
        _step(model, opt, sched, seed=s)
    np.random.randn()  # leaves numpy's cached gaussian set, which must round-trip too
    path = ck.save_checkpoint(
        tmp_path,
        2,
        model=model,
        optimizer=opt,
        scheduler=sched,
        epoch=1,
        data_state={"epoch": 1, "batch_in_epoch": 2, "shard_order": [3, 1, 2]},
        best={"metric": "val/acc", "value": 0.5, "step": 2},
    )
    assert path == tmp_path / "checkpoints" / "step-2"
    assert {p.name for p in path.iterdir()} == {"adapter.safetensors", "mope_config.json", "train_state.pt"}
    expected_draws = _draws()
    _step(model, opt, sched, seed=2)
    expected_params, expected_lr = _trainable(model), [g["lr"] for g in opt.param_groups]

    # a fresh process: same frozen weights, trainable parts scrambled, RNG elsewhere
    model2, opt2, sched2 = _setup()
    with torch.no_grad():
        for p in model2.parameters():
            if p.requires_grad:
                p.add_(1.0)
    torch.manual_seed(123)
    np.random.seed(123)
    random.seed(123)
    found = ck.load_latest(tmp_path)
    assert found is not None
    d, state = found
    assert d == path and state["step"] == 2 and state["epoch"] == 1
    assert state["data"] == {"epoch": 1, "batch_in_epoch": 2, "shard_order": [3, 1, 2]}
    assert state["best"]["value"] == 0.5
    ck.restore(d, state, model=model2, optimizer=opt2, scheduler=sched2)

    got = _draws()
    for a, b in zip(got, expected_draws):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    _step(model2, opt2, sched2, seed=2)
    assert [g["lr"] for g in opt2.param_groups] == expected_lr
    for n, p in _trainable(model2).items():
        torch.testing.assert_close(p, expected_params[n], rtol=0, atol=0, msg=n)


def test_keep_last_and_temp_dirs_ignored(tmp_path):
    model, opt, sched = _setup()
    root = tmp_path / "checkpoints"
    root.mkdir()
    # a crashed save of a later step by a process that no longer exists: ignored, then cleaned
    stale = root / ".tmp-step-99-999999999"
    stale.mkdir()
    (stale / "train_state.pt").write_bytes(b"partial")
    for step in (10, 20, 30, 40):
        ck.save_checkpoint(tmp_path, step, model=model, optimizer=opt, scheduler=sched, keep_last=2)
        if step == 10:
            assert not stale.exists()
            stale.mkdir()  # leave one behind for load_latest
    assert [s for s, _ in ck.list_checkpoints(tmp_path)] == [30, 40]
    d, state = ck.load_latest(tmp_path)
    assert d.name == "step-40" and state["step"] == 40
    assert ck.load_latest(tmp_path / "nothing-here") is None
    # re-saving an existing step replaces it atomically
    ck.save_checkpoint(tmp_path, 40, model=model, optimizer=opt, scheduler=sched, keep_last=2, extra={"again": True})
    assert ck.load_latest(tmp_path)[1]["extra"] == {"again": True}
    assert [s for s, _ in ck.list_checkpoints(tmp_path)] == [30, 40]


def test_non_main_process_writes_nothing(tmp_path):
    model, opt, _ = _setup()
    p = ck.save_checkpoint(tmp_path, 5, model=model, optimizer=opt, is_main_process=False)
    assert p.name == "step-5" and not (tmp_path / "checkpoints").exists()


def test_corrupt_file_named(tmp_path):
    model, opt, sched = _setup()
    ck.save_checkpoint(tmp_path, 1, model=model, optimizer=opt, scheduler=sched)
    d = ck.save_checkpoint(tmp_path, 2, model=model, optimizer=opt, scheduler=sched)
    f = d / "train_state.pt"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(ck.CheckpointError, match=f"checkpoint file {f} is corrupt"):
        ck.load_latest(tmp_path)
    f.unlink()
    with pytest.raises(ck.CheckpointError, match="train_state.pt is missing"):
        ck.load_latest(tmp_path)


def test_unsafe_state_refused_before_writing(tmp_path):
    model, opt, _ = _setup()
    with pytest.raises(TypeError, match=r"state\['data'\]\['perm'\].*numpy"):
        ck.save_checkpoint(tmp_path, 1, model=model, optimizer=opt, data_state={"perm": np.arange(3)})
    assert ck.list_checkpoints(tmp_path) == []


# -- DeepSpeed (CPU accelerator, single process) ----------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ds_single_process(monkeypatch):
    import importlib

    deepspeed = pytest.importorskip("deepspeed")
    # (`import deepspeed.comm.torch as m` would bind the torch package: deepspeed.comm re-exports the name `torch`)
    ds_torch_comm = importlib.import_module("deepspeed.comm.torch")

    for k, v in dict(
        RANK="0",
        LOCAL_RANK="0",
        WORLD_SIZE="1",
        LOCAL_WORLD_SIZE="1",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(_free_port()),
    ).items():
        monkeypatch.setenv(k, v)
    # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce op on first use (~70 s on 2 cores, needs g++ and
    # ninja; cached in ~/.cache/torch_extensions). One process never uses it, so the test skips the build.
    monkeypatch.setattr(ds_torch_comm, "build_shm_op", lambda: None)
    yield deepspeed
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _engine(deepspeed, seed=0):
    model = _model(seed)
    opt = torch.optim.AdamW(trainable_param_groups(model, LRS, weight_decay=1e-3))
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[100], gamma=0.4)
    cfg = deepspeed_config(micro_batch=4, grad_accum=1, world_size=1, precision="fp32", zero_stage=2, grad_clip=1.0)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched, config=cfg)
    return engine


def _ds_step(engine, seed):
    b = make_batch(4, 32, seed=seed)
    torch.manual_seed(1000 + seed)  # same dropout masks in both engines
    out = engine(b)
    loss = task_loss(out.logits, b["label"], engine.module.cfg.task) + out.aux_loss
    engine.backward(loss)
    engine.step()
    return loss.item()


def test_deepspeed_zero2_cpu_save_load(tmp_path, ds_single_process):
    deepspeed = ds_single_process
    eng = _engine(deepspeed)
    frozen_before = {n: p.clone() for n, p in eng.module.named_parameters() if not p.requires_grad}
    trainable_before = _trainable(eng.module)
    for s in range(2):
        loss = _ds_step(eng, s)
        assert np.isfinite(loss)
    assert eng.global_steps == 2
    moved = [n for n, p in _trainable(eng.module).items() if not torch.equal(p, trainable_before[n])]
    assert moved, "no trainable parameter changed"
    for n, p in eng.module.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen_before[n]), f"frozen {n} changed"

    ckdir = tmp_path / "engine"
    ck.save_engine(eng, ckdir, client_state={"step": 2, "data": {"batch": 2}})
    saved = torch.load(next(ckdir.glob("*/mp_rank_00_model_states.pt")), map_location="cpu", weights_only=False)
    saved_keys = set(saved["module"])
    assert not any(
        k.startswith(("main_encoder.", "comp_encoder.")) and k in dict(eng.module.named_parameters())
        for k in saved_keys
    ), "frozen encoder parameters were saved"

    eng2 = _engine(deepspeed)
    client = ck.load_engine(eng2, ckdir)
    assert client["step"] == 2 and client["data"] == {"batch": 2}
    assert eng2.global_steps == 2
    for n, p in _trainable(eng2.module).items():
        torch.testing.assert_close(p, _trainable(eng.module)[n], rtol=0, atol=0, msg=n)
    # the next step is identical: optimizer moments came back too
    _ds_step(eng, 2)
    _ds_step(eng2, 2)
    for n, p in _trainable(eng2.module).items():
        torch.testing.assert_close(p, _trainable(eng.module)[n], rtol=0, atol=0, msg=n)
    with pytest.raises(ck.CheckpointError, match="no DeepSpeed checkpoint"):
        ck.load_engine(eng2, tmp_path / "empty")


class _FakeEngine:
    """Writes a DeepSpeed-like layout (<dir>/latest, <dir>/<tag>/mp_rank_00_model_states.pt) and records loads."""

    def __init__(self):
        self.loaded = []

    def save_checkpoint(self, d, tag=None, client_state=None, exclude_frozen_parameters=False):
        tag = tag or "global_step2"
        (Path(d) / tag).mkdir(parents=True, exist_ok=True)
        torch.save(
            {"module": {"w": torch.ones(2)}, "client": client_state}, Path(d) / tag / "mp_rank_00_model_states.pt"
        )
        (Path(d) / "latest").write_text(tag)

    def load_checkpoint(self, d, tag=None, **kw):
        self.loaded.append((d, tag))
        return d, {"step": 2}


class _Planted:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # runs on unpickling: proves whether anything unpickled the file
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("attack", ["replaced", "added", "no_digests", "tag_escape"])
def test_planted_pickle_in_a_deepspeed_checkpoint_is_refused_without_unpickling(tmp_path, attack):
    import pickle

    ckdir, marker = tmp_path / "engine", tmp_path / "PWNED"
    ck.save_engine(_FakeEngine(), ckdir, client_state={"step": 2})
    tdir = ckdir / "global_step2"
    assert (tdir / ck.ENGINE_DIGESTS_FILE).is_file()
    ok = _FakeEngine()
    assert ck.load_engine(ok, ckdir) == {"step": 2} and ok.loaded  # an untouched checkpoint loads
    payload = pickle.dumps({"module": _Planted(marker)})
    if attack == "replaced":
        (tdir / "mp_rank_00_model_states.pt").write_bytes(payload)
        match = "does not match the SHA-256"
    elif attack == "added":
        (tdir / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(payload)
        match = "not part of the checkpoint written by this harness"
    elif attack == "no_digests":
        (tdir / ck.ENGINE_DIGESTS_FILE).unlink()
        (tdir / "mp_rank_00_model_states.pt").write_bytes(payload)
        match = "has no mope_digests.json"
    else:
        (ckdir / "latest").write_text("../elsewhere")
        match = "not a plain directory name"
    victim = _FakeEngine()
    with pytest.raises(ck.CheckpointError, match=match):
        ck.load_engine(victim, ckdir)
    assert not victim.loaded, "DeepSpeed's (unpickling) loader was called"
    assert not marker.exists()


def test_planted_pickle_as_train_state_is_refused_without_unpickling(tmp_path):
    """The trainer's resume path (harness.recipe, DeepSpeed on or off) reads only train_state.pt (weights_only) and the
    safetensors adapter: a pickle planted in a run's newest checkpoint does not run."""
    import pickle

    marker = tmp_path / "PWNED"
    d = tmp_path / "run" / ck.CHECKPOINT_DIR / "step-9"
    d.mkdir(parents=True)
    (d / ck.TRAIN_STATE_FILE).write_bytes(pickle.dumps({"format": ck.STATE_FORMAT, "x": _Planted(marker)}))
    with pytest.raises(ck.CheckpointError, match="corrupt or unreadable"):
        ck.load_latest(tmp_path / "run")
    assert not marker.exists()
