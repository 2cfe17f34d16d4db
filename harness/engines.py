"""The training engines, one interface (``forward(batch)``, ``backward_step(loss)``, ``module``) over DeepSpeed
(:class:`DeepSpeedEngine`) or a plain torch loop with the same semantics (:class:`TorchEngine`), and the evaluation
loop over an engine (:func:`evaluate`)."""

from __future__ import annotations

import os
import socket
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any

import torch

from harness.ds_config import deepspeed_config
from mope import predictions
from mope.config import Task
from mope.heads import iou_counts, seg_metrics
from mope.model import task_target

if TYPE_CHECKING:
    from harness.feature_cache import FeatureCache


def to_device(batch: dict, device: torch.device, float_dtype: torch.dtype | None = None) -> dict:
    """Moves the batch's tensors (nested dicts included, e.g. tokenised text) onto `device` **in place**, so the
    caller's ``batch["label"]`` is the moved one; floating inputs are cast to `float_dtype` (a DeepSpeed bf16/fp16
    module has half-precision weights), labels keep their dtype (the loss is computed in fp32)."""

    def move(v, cast: bool):
        if isinstance(v, torch.Tensor):
            if cast and float_dtype is not None and v.is_floating_point():
                return v.to(device=device, dtype=float_dtype, non_blocking=True)
            return v.to(device, non_blocking=True)
        if isinstance(v, dict):
            return {k: move(x, cast) for k, x in v.items()}
        return v

    for k in list(batch):
        batch[k] = move(batch[k], cast=k != "label")
    return batch


class TorchEngine:
    """Plain torch loop: autocast for bf16/fp16 on the model's device, grad-norm clipping, optimizer step."""

    def __init__(self, model, optimizer, precision: str, grad_clip: float):
        self.module, self.optimizer, self.grad_clip = model, optimizer, grad_clip
        self.device = next(model.parameters()).device
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        self.autocast = (lambda: torch.autocast(self.device.type, dtype=dtype)) if dtype else nullcontext
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=precision == "fp16")
        self.params = [p for g in optimizer.param_groups for p in g["params"]]

    def forward(self, batch):
        if self.device.type != "cpu":
            to_device(batch, self.device)
        with self.autocast():
            return self.module(batch)

    def backward_step(self, loss) -> None:
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)


class DeepSpeedEngine:
    """`deepspeed.initialize` with only the trainable parameters (via the optimizer's groups); DeepSpeed does the
    clipping, precision and ZeRO (≤ 2). The LR scheduler is stepped per epoch by the recipe, not by DeepSpeed."""

    def __init__(self, model, optimizer, cfg: dict[str, Any], world_size: int):
        import deepspeed

        tr = cfg["trainer"]
        _init_single_process_dist(world_size)
        ds_cfg = deepspeed_config(
            micro_batch=int(tr["batch_size"]),
            grad_accum=int(tr["grad_accum"]),
            world_size=world_size,
            precision=tr["precision"],
            zero_stage=int(cfg["deepspeed"]["zero_stage"]),
            grad_clip=float(tr["grad_clip"]),
        )
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_cfg)
        self.module = self.engine.module
        self.device = torch.device(self.engine.device)
        self.float_dtype = (
            torch.bfloat16 if self.engine.bfloat16_enabled() else torch.float16 if self.engine.fp16_enabled() else None
        )

    def forward(self, batch):
        return self.engine(to_device(batch, self.device, self.float_dtype))

    def backward_step(self, loss) -> None:
        self.engine.backward(loss)
        self.engine.step()


def _init_single_process_dist(world_size: int) -> None:
    """A single `harness train` process: give DeepSpeed a 1-rank process group (gloo on CPU, nccl on GPU).

    Under Ray Train the group exists already (created by Ray), and nothing is done here (pitfall 1)."""
    if world_size != 1 or (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(
            RANK="0",
            LOCAL_RANK="0",
            WORLD_SIZE="1",
            LOCAL_WORLD_SIZE="1",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
        )
    if not torch.cuda.is_available():
        # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce op on first start (~70 s, g++/ninja); one
        # rank never all-reduces, so skip the build.
        import importlib

        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo", verbose=False)


def evaluate(engine, loader, task: Task, cache: FeatureCache | None, split: str, world_size: int) -> dict[str, float]:
    """Loss and the task's metrics on one split (accuracy; F1 macro/micro for multi-label; mIoU, oIoU and prec@X of
    :func:`mope.heads.seg_metrics` for segmentation), gathered over the ranks."""
    model = engine.module
    was_training = model.training
    model.eval()
    seg = task == Task.SEGMENTATION
    preds, labels, loss_sum, n = [], [], 0.0, 0
    with torch.no_grad():
        for batch in loader:
            if cache is not None:
                batch["comp_feat"] = cache.lookup(split, batch["key"])
            out = engine.forward(batch)
            logits = out.logits.float()
            target = task_target(batch, task).to(logits.device)
            loss_sum += float(model.loss(logits, target)) * logits.shape[0]
            n += logits.shape[0]
            if seg:  # per-sample pixel counts, never whole masks: a split's masks would not fit in memory
                inter, union = iou_counts(logits, target)
                preds.append(inter.cpu())
                labels.append(union.cpu())
            else:
                preds.append(predictions(logits, task).cpu())
                labels.append(target.cpu())
    model.train(was_training)
    p, y = torch.cat(preds), torch.cat(labels)
    if world_size > 1:  # eval splits differ per rank: gather everything (small) on all ranks
        gathered: list[Any] = [None] * world_size
        torch.distributed.all_gather_object(gathered, (p, y, loss_sum, n))
        p = torch.cat([g[0] for g in gathered])
        y = torch.cat([g[1] for g in gathered])
        loss_sum, n = sum(g[2] for g in gathered), sum(g[3] for g in gathered)
    res = {"loss": loss_sum / max(n, 1), "n": float(n)}
    if seg:
        res.update(seg_metrics(p, y))
        # collapse detector of segmentation: the share of samples whose predicted mask misses the object entirely
        res["miss_frac"] = float(((p == 0) & (y > 0)).double().mean()) if len(p) else 0.0
        res["inter_px"], res["union_px"] = float(p.double().sum()), float(y.double().sum())  # pooled oIoU over splits
        return res
    res["pred_class_frac_max"] = pred_class_frac_max(p)
    if task == Task.MULTI_LABEL:
        from sklearn.metrics import f1_score

        res["f1_macro"] = float(f1_score(y.numpy(), p.numpy(), average="macro", zero_division=0))
        res["f1_micro"] = float(f1_score(y.numpy(), p.numpy(), average="micro", zero_division=0))
    else:
        res["acc"] = float((p == y).float().mean())
    return res


def pred_class_frac_max(preds: torch.Tensor) -> float:
    """Collapse detector: the share of the split given the most frequent prediction (a class, or a multi-label
    vector). A run at ~1.0 answers the same for everything; `harness report` flags it as collapsed, not a result."""
    if len(preds) == 0:
        return 0.0
    return float(torch.unique(preds, dim=0, return_counts=True)[1].max()) / len(preds)
