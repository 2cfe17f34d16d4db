"""Benchmark: samples/s of the streaming training pipeline (harness.data), on the demo or on MUStARD shards.

    .venv/bin/python bench/loader.py [--data data/demo] [--workers 2] [--batch 64] [--epochs 2] [--build]
    .venv/bin/python bench/loader.py --data data/mustard            # MUStARD shards (audio, and frames if written)
    .venv/bin/python bench/loader.py --mustard-replica 96 [--frames 8] [--frame-size 224] [--replica-seconds 4]

Iterates ``make_train_loader`` (resampled shards -> decode + transform + MiniLM tokenisation in the workers ->
unbatch/shuffle/rebatch in the main process) without any model, so the number is the loader's ceiling. Reports the
steady-state rate (first batch excluded: worker start-up and tokenizer loading) and the first-batch latency per epoch.
Prints one JSON object per measurement; ``cpu_s_per_sample`` (CPU of the main process and the workers per sample
delivered) stays comparable when the machine is busy. ``--build`` builds the demo first when it is missing
(``ensure_demo``; a few minutes).

The demo decodes PNG images. MUStARD decodes the stored 16 kHz PCM16 wav (the 22.05 kHz -> 16 kHz resampling is done
once at prep, not here) and, with frames, T PNG frames per sample, each resized/cropped/normalised like an image
(``"frames"`` (B, T, 3, 224, 224)). ``--mustard-replica N`` writes a synthetic raw replica of N clips (22.05 kHz
stereo wav + mp4, ``tests/datasets_prep/prep_helpers.py``) in a temporary dir, converts it twice with
``harness prep mustard`` (``frames=0``, then ``frames=F``; the prep time is reported) and measures both shard sets.

"Data never waits" (issue #28 item 3): does the loader keep up with the training step, and how many workers does it
take to keep the data wait under 5 %?

    .venv/bin/python bench/loader.py --wait [--workers-list 0,1,2] [--steps 40] [--warmup 20]   # local shards only
    .venv/bin/python bench/loader.py --s3   [--workers-list 0,1,2] [--steps 40] [--warmup 20]   # local and s3://

``--s3`` starts a real S3-compatible server on 127.0.0.1 (moto, started as a subprocess), uploads the demo
with ``datasets_prep.upload.upload_dataset`` to ``s3://bench/demo``, puts the server's AWS_* variables in
``os.environ`` (so loader workers inherit them) and measures ``s3://bench/demo`` exactly like the local shards
(streamed by ``TarSamples``, sha256-checked). Per (source, workers) it measures, side by side:

- ``loader_samples_per_s``: the loader alone (no model), after ``--warmup`` batches;
- ``step_samples_per_s``: the training step alone on one pre-collected batch repeated: the embedded default model
  (``experiment=demo_mope``, ``fusion_config``, ``build_model``), black-box MiniLM features looked up in the
  trainer's :class:`harness.feature_cache.FeatureCache`, forward + loss + backward + clip + AdamW
  (``TorchEngine``), ``torch.set_num_threads(--threads)`` (1: the sweep profile's ``trainer.threads``);
- ``data_wait_frac``: the real loop (loader + step) for ``--steps`` steps after ``--warmup``: time in ``next(it)``
  / total step time, the definition of the trainer's ``perf/run_data_wait_frac`` (harness/recipe.py);
  ``data_wait_frac_incl_warmup`` includes the warm-up steps (worker start-up, first batch, shuffle-buffer fill).

One JSON object per measurement on stdout, progress on stderr, then a summary naming per source the smallest worker
count with ``data_wait_frac < --target`` (null when none reaches it, with the per-worker numbers beside it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path


def _cpu_s() -> float:
    import resource

    a, b = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime


def measure(
    data: str, *, workers: int, batch: int, epochs: int, shuffle_buffer: int | None = None, extra: dict | None = None
) -> dict:
    import torch

    from mope_data import LoaderConfig, make_train_loader

    kw = {} if shuffle_buffer is None else {"shuffle_buffer": shuffle_buffer}
    cfg = LoaderConfig(data_dir=data, batch_size=batch, num_workers=workers, seed=0, **kw)
    loader, per_epoch = make_train_loader(cfg, 0, 1)
    first, steady_t, steady_n, total_n = [], 0.0, 0, 0
    cpu0 = _cpu_s()
    t_all = time.perf_counter()
    for _ in range(epochs):
        t0 = time.perf_counter()
        for i, batch_ in enumerate(loader):
            n = len(batch_["key"])
            total_n += n
            if i == 0:
                t1 = time.perf_counter()
                first.append(t1 - t0)
            else:
                steady_n += n
        steady_t += time.perf_counter() - t1
    wall = time.perf_counter() - t_all
    cpu = _cpu_s() - cpu0  # workers are not persistent: reaped after each epoch, so their CPU time is counted
    out = {
        "bench": "loader",
        "dataset": str(data),
        **(extra or {}),
        "num_workers": workers,
        "batch_size": batch,
        "shuffle_buffer": cfg.shuffle_buffer,
        "batches_per_epoch": per_epoch,
        "epochs": epochs,
        "samples": total_n,
        "samples_per_s": round(steady_n / steady_t, 1) if steady_t > 0 and steady_n else None,
        "samples_per_s_incl_startup": round(total_n / wall, 1),
        "first_batch_s": [round(x, 2) for x in first],
        # CPU seconds (main + workers, user + sys) per sample, start-up included: comparable on a busy machine
        "cpu_s_per_sample": round(cpu / total_n, 4) if total_n else None,
    }
    for k in ("image", "frames"):
        if k in batch_:
            out[f"{k}_shape"] = list(batch_[k].shape[1:])
    if "audio" in batch_:
        out["audio_samples_max"] = int(batch_["audio"].shape[1])
        out["audio_s_mean"] = round(float(batch_["audio_mask"].sum(1).float().mean()) / cfg.audio_sample_rate, 2)
    out.update(
        {
            "cpu_count": os.cpu_count(),
            "load_avg_1min": round(os.getloadavg()[0], 2),
            "torch": torch.__version__,
            "python": platform.python_version(),
        }
    )
    return out


def mustard_replica(a) -> int:
    from datasets_prep.mustard import convert
    from datasets_prep.replica import make_mustard_replica

    side = int(a.replica_size)
    with tempfile.TemporaryDirectory(prefix="bench-mustard-") as tmp:
        t0 = time.perf_counter()
        src = make_mustard_replica(
            Path(tmp) / "raw",
            n=a.mustard_replica,
            seconds=a.replica_seconds,
            fps=a.replica_fps,
            size=(side * 3 // 2 // 2 * 2, side),
        )
        replica_s = time.perf_counter() - t0
        for frames in (0, a.frames) if a.frames else (0,):
            out = Path(tmp) / f"shards-f{frames}"
            t0 = time.perf_counter()
            summary = convert(
                src, out, shard_size=1000, skip_bad=False, expect_entries=0, frames=frames, frame_size=a.frame_size
            )
            prep_s = time.perf_counter() - t0
            extra = {
                "config": f"audio+frames={frames}" if frames else "audio",
                "replica": {
                    "clips": a.mustard_replica,
                    "seconds": [a.replica_seconds, a.replica_seconds * 1.5],
                    "wav_sr": 22050,
                    "video": f"{side * 3 // 2 // 2 * 2}x{side}@{a.replica_fps}fps",
                    "write_s": round(replica_s, 1),
                },
                "prep_s": round(prep_s, 1),
                "prep_samples": sum(summary["splits"].values()),  # train + test + val (= test)
                "frame_size": a.frame_size if frames else None,
            }
            res = measure(
                str(out),
                workers=a.workers,
                batch=a.batch,
                epochs=a.epochs,
                shuffle_buffer=a.shuffle_buffer,
                extra=extra,
            )
            print(json.dumps(res), flush=True)
    return 0


# ---------------------------------------------------------------------------------------------------------------------
# "Data never waits": loader vs training step, local and s3://
# ---------------------------------------------------------------------------------------------------------------------
WAIT_TARGET = 0.05


def progress(msg: str) -> None:
    print(f"[bench loader] {msg}", file=sys.stderr, flush=True)


class StepBench:
    """The demo trial's model and training step (``experiment=demo_mope``), built as ``harness.recipe.Trial`` does,
    without its loader: :meth:`step` = feature-cache lookup + forward + task loss (+ importance loss) + backward +
    clip + AdamW step."""

    def __init__(self, local: str | Path, *, batch: int, threads: int = 1, overrides: tuple[str, ...] = ()):
        import torch

        from harness.compose import compose, fusion_config
        from harness.ds_config import trainable_param_groups
        from harness.engines import TorchEngine
        from harness.feature_cache import FeatureCache
        from harness.node_cache import feature_cache_root
        from harness.recipe import learning_rates
        from harness.run_setup import loader_config
        from mope import build_model
        from mope.model import task_loss

        local = Path(local).resolve()
        self._tmp = tempfile.TemporaryDirectory(prefix="bench-loader-")
        self.cfg = compose(
            [
                "experiment=demo_mope",
                f"data.shard_dir={local}",
                f"vision.weights={local}/vision_encoder",
                f"paths.run_root={self._tmp.name}",
                "data.auto_prepare=false",
                "deepspeed=off",
                f"trainer.batch_size={batch}",
                f"trainer.threads={threads}",
                *overrides,
            ]
        )
        tr = self.cfg["trainer"]
        self.threads = int(threads)
        torch.set_num_threads(self.threads)
        torch.manual_seed(int(self.cfg["seed"]))
        fcfg = fusion_config(self.cfg)
        self.model = build_model(fcfg)
        self.task = fcfg.task
        self._task_loss = task_loss
        self.lcfg = loader_config(self.cfg, local)  # the trainer's LoaderConfig; data_dir / num_workers set per run
        self.cache = None
        if self.model.comp_is_blackbox:  # the demo: frozen MiniLM features, computed once per dataset (train split)
            t0 = time.perf_counter()
            key = FeatureCache.key_for(self.model, local, self.lcfg)
            self.cache = FeatureCache(feature_cache_root(local), key)
            self.cache.build(self.model, self.lcfg, ["train"], rank=0, world_size=1)
            progress(f"feature cache {key} (train) ready in {time.perf_counter() - t0:.1f}s")
        groups = trainable_param_groups(self.model, learning_rates(tr), weight_decay=float(tr["weight_decay"]))
        self.engine = TorchEngine(self.model, torch.optim.AdamW(groups), tr["precision"], float(tr["grad_clip"]))
        self.model.train()

    def loader_cfg(self, data: str, workers: int, *, min_batches: int | None = None):
        import dataclasses

        return dataclasses.replace(self.lcfg, data_dir=data, num_workers=workers, min_batches_per_epoch=min_batches)

    def step(self, batch: dict) -> float:
        if self.cache is not None:
            batch["comp_feat"] = self.cache.lookup("train", batch["key"])
        out = self.engine.forward(batch)
        loss = self._task_loss(out.logits.float(), batch["label"], self.task) + out.aux_loss
        self.engine.backward_step(loss)
        return float(loss.detach())

    def close(self) -> None:
        self._tmp.cleanup()


def first_batches(lcfg, n: int, *, epoch: int = 0) -> list[dict]:
    """The first ``n`` batches of epoch ``epoch`` of the training loader of ``lcfg``."""
    from mope_data import make_train_loader

    loader, _ = make_train_loader(lcfg, 0, 1)
    loader.set_epoch(epoch)
    it, out = iter(loader), []
    for _ in range(n):
        out.append(next(it))
    del it
    return out


def loader_rate(lcfg, *, warmup: int, steps: int, label: str = "") -> dict:
    """The loader alone over one epoch iterator: ``warmup`` batches (worker start-up, first batch), then ``steps``
    timed batches -> samples/s."""
    from mope_data import make_train_loader

    loader, _ = make_train_loader(lcfg, 0, 1)
    it = iter(loader)
    t0 = time.perf_counter()
    for _ in range(warmup):
        next(it)
    t1, c1 = time.perf_counter(), time.process_time()
    n = 0
    for i in range(steps):
        n += len(next(it)["key"])
        if (i + 1) % 20 == 0:
            progress(f"{label} loader-only {i + 1}/{steps} batches, {n / (time.perf_counter() - t1):.0f} samples/s")
    dt, cpu = time.perf_counter() - t1, time.process_time() - c1
    del it
    return {
        "loader_samples_per_s": round(n / dt, 1),
        "loader_warmup_s": round(t1 - t0, 2),
        # CPU of the main process per batch (with workers: unbatch / shuffle / rebatch / collate / unpickling), the
        # part of the loader that competes with the step in the training process
        "loader_main_cpu_ms_per_batch": round(1000 * cpu / max(steps, 1), 1),
    }


def step_rate(sb: StepBench, batch: dict, *, warmup: int, steps: int) -> dict:
    """The training step alone on one pre-collected batch repeated -> samples/s of the step."""
    for _ in range(warmup):
        sb.step(dict(batch))
    t0 = time.perf_counter()
    for _ in range(steps):
        sb.step(dict(batch))
    dt = time.perf_counter() - t0
    n = steps * len(batch["key"])
    return {"step_samples_per_s": round(n / dt, 1), "step_ms": round(1000 * dt / steps, 1)}


def loop_wait(sb: StepBench, lcfg, *, warmup: int, steps: int, label: str = "") -> dict:
    """The real loop, as ``harness.recipe.Trial.run_epoch``: ``t0; batch = next(it); t1; step; t2``; data wait =
    sum(t1 - t0) / sum(t2 - t0) over the ``steps`` steps after ``warmup`` (and including them)."""
    from mope_data import make_train_loader

    loader, _ = make_train_loader(lcfg, 0, 1)
    it = iter(loader)
    wait = total = wait_all = total_all = 0.0
    n = 0
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        batch = next(it)
        t1 = time.perf_counter()
        sb.step(batch)
        t2 = time.perf_counter()
        wait_all += t1 - t0
        total_all += t2 - t0
        if i >= warmup:
            wait += t1 - t0
            total += t2 - t0
            n += len(batch["key"])
            k = i + 1 - warmup
            if k % 10 == 0:
                progress(f"{label} loop step {k}/{steps}: data_wait_frac so far {wait / total:.3f}")
    del it
    return {
        "data_wait_frac": round(wait / max(total, 1e-9), 4),
        "data_wait_frac_incl_warmup": round(wait_all / max(total_all, 1e-9), 4),
        "loop_samples_per_s": round(n / max(total, 1e-9), 1),
        "wait_ms_per_step": round(1000 * wait / max(steps, 1), 1),
        "loop_ms_per_step": round(1000 * total / max(steps, 1), 1),
    }


def smallest_workers(rows: list[dict], target: float = WAIT_TARGET) -> dict[str, int | None]:
    """Per source (in first-seen order), the smallest ``num_workers`` whose row has ``data_wait_frac < target``;
    ``None`` when no row of that source does."""
    out: dict[str, int | None] = {}
    for r in rows:
        src = r["source"]
        out.setdefault(src, None)
        f = r.get("data_wait_frac")
        if f is not None and f < target and (out[src] is None or r["num_workers"] < out[src]):
            out[src] = int(r["num_workers"])
    return out


def summarize(rows: list[dict], target: float = WAIT_TARGET) -> dict:
    pick = smallest_workers(rows, target)
    per: dict[str, dict] = {}
    for r in rows:
        per.setdefault(r["source"], {})[str(r["num_workers"])] = {
            k: r.get(k) for k in ("data_wait_frac", "loader_samples_per_s", "step_samples_per_s", "loader_over_step")
        }
    reasons = {}
    for src, w in pick.items():
        if w is None:
            best = min((r for r in rows if r["source"] == src), key=lambda r: r["data_wait_frac"])
            reasons[src] = (
                f"no worker count reached data_wait_frac < {target}: best {best['data_wait_frac']} at "
                f"num_workers={best['num_workers']} (loader {best['loader_samples_per_s']} vs step "
                f"{best['step_samples_per_s']} samples/s, {os.cpu_count()} CPU cores shared by the step "
                f"({best.get('threads')} thread) and {best['num_workers']} worker(s), load avg "
                f"{best.get('load_avg_1min')})"
            )
    return {
        "bench": "loader_wait_summary",
        "target_data_wait_frac": target,
        "smallest_workers_under_target": pick,
        "per_source": per,
        "why_none": reasons,
        "cpu_count": os.cpu_count(),
        "load_avg_1min": round(os.getloadavg()[0], 2),
    }


AWS_KEYS = (
    "AWS_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_SESSION_TOKEN",
)


def _clear_s3fs_cache() -> None:
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()


class _MotoServer:
    """moto's S3 server on 127.0.0.1 (a free port) as a subprocess, dummy credentials (the bench's own copy of what
    tests/helpers/s3.py starts for the tests: bench never imports tests)."""

    def start(self) -> _MotoServer:
        import socket
        import subprocess
        import urllib.request

        with socket.socket() as so:
            so.bind(("127.0.0.1", 0))
            self.port = so.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        for _ in range(300):
            try:
                urllib.request.urlopen(self.endpoint, timeout=1)
                return self
            except OSError:
                if self.proc.poll() is not None:
                    break
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"moto S3 server did not start on {self.endpoint}")

    def env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": "bench",
            "AWS_SECRET_ACCESS_KEY": "bench",
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def make_bucket(self, name: str) -> None:
        import s3fs

        s3fs.S3FileSystem(client_kwargs={"endpoint_url": self.endpoint}, key="bench", secret="bench").mkdir(name)

    def url(self, bucket: str, path: str) -> str:
        return f"s3://{bucket}/{path}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except Exception:
                self.proc.kill()


class S3Demo:
    """A moto S3 server on 127.0.0.1 holding an upload of ``local`` at ``s3://<bucket>/demo``; its AWS_* variables
    in ``os.environ`` while open (restored on close)."""

    def __init__(self, local: str | Path, bucket: str = "bench"):
        self.local, self.bucket = Path(local), bucket

    def __enter__(self) -> S3Demo:
        from datasets_prep.upload import upload_dataset

        self._clear = _clear_s3fs_cache
        self.server = _MotoServer().start()
        self._saved = {k: os.environ.get(k) for k in AWS_KEYS}
        for k in AWS_KEYS:
            os.environ.pop(k, None)
        os.environ.update(self.server.env())
        _clear_s3fs_cache()
        self.server.make_bucket(self.bucket)
        self.url = self.server.url(self.bucket, "demo")
        t0 = time.perf_counter()
        self.upload = upload_dataset(self.local, self.url, verbose=False)
        progress(
            f"uploaded {self.upload.get('files')} files ({self.upload.get('bytes', 0) / 1e6:.1f} MB) to {self.url} "
            f"({self.server.endpoint}) in {time.perf_counter() - t0:.1f}s"
        )
        return self

    def __exit__(self, *exc) -> None:
        self.server.stop()
        for k, v in self._saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        self._clear()


def measure_wait(
    sb: StepBench,
    sources: dict[str, str],
    *,
    workers: list[int],
    warmup: int,
    steps: int,
    emit=None,
) -> list[dict]:
    """For every (source, workers): loader alone, step alone, then the loop; one row each (``emit(row)`` as soon as it
    is measured)."""
    import torch

    batch = first_batches(sb.loader_cfg(next(iter(sources.values())), 0), 1)[0]  # the step's repeated batch
    rows = []
    need = warmup + steps
    for src, data in sources.items():
        for w in workers:
            label = f"{src} workers={w}:"
            lcfg = sb.loader_cfg(data, w, min_batches=need)
            cpu0 = _cpu_s()
            progress(f"{label} loader alone")
            lr = loader_rate(lcfg, warmup=warmup, steps=steps, label=label)
            progress(f"{label} step alone")
            sr = step_rate(sb, batch, warmup=2, steps=steps)
            progress(f"{label} loop (loader + step)")
            lw = loop_wait(sb, lcfg, warmup=warmup, steps=steps, label=label)
            row = {
                "bench": "loader_wait",
                "source": src,
                "data": data,
                "num_workers": w,
                "batch_size": lcfg.batch_size,
                "threads": sb.threads,
                "sharing_strategy": torch.multiprocessing.get_sharing_strategy(),
                "warmup_steps": warmup,
                "steps": steps,
                **lr,
                **sr,
                **lw,
                "loader_over_step": round(lr["loader_samples_per_s"] / sr["step_samples_per_s"], 2),
                "cpu_s": round(_cpu_s() - cpu0, 1),
                "cpu_count": os.cpu_count(),
                "load_avg_1min": round(os.getloadavg()[0], 2),
                "torch": torch.__version__,
            }
            rows.append(row)
            progress(
                f"{label} loader {row['loader_samples_per_s']} / step {row['step_samples_per_s']} samples/s, "
                f"data_wait_frac {row['data_wait_frac']}"
            )
            if emit is not None:
                emit(row)
    return rows


def wait_study(a) -> int:
    workers = [int(x) for x in str(a.workers_list).split(",") if x.strip()]
    if a.sharing_strategy:
        import torch.multiprocessing

        torch.multiprocessing.set_sharing_strategy(a.sharing_strategy)
    t0 = time.perf_counter()
    sb = StepBench(a.data, batch=a.batch, threads=a.threads)
    progress(f"model built in {time.perf_counter() - t0:.1f}s; sources: local{' + s3' if a.s3 else ''}")

    def emit(row):
        print(json.dumps(row), flush=True)

    try:
        sources = {"local": str(Path(a.data).resolve())}
        if a.s3:
            with S3Demo(a.data) as s3:
                sources["s3"] = s3.url
                rows = measure_wait(sb, sources, workers=workers, warmup=a.warmup, steps=a.steps, emit=emit)
        else:
            rows = measure_wait(sb, sources, workers=workers, warmup=a.warmup, steps=a.steps, emit=emit)
    finally:
        sb.close()
    summary = summarize(rows, a.target)
    summary["wall_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(summary), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="data/demo")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--build", action="store_true", help="build the demo first if it is missing")
    ap.add_argument(
        "--shuffle-buffer",
        type=int,
        default=None,
        help="LoaderConfig.shuffle_buffer (default: its default, 1000). The main-process buffer fills to "
        "100 samples before the first batch, then takes two samples per sample out until full, so an "
        "epoch shorter than the buffer processes up to ~2x its samples",
    )
    ap.add_argument(
        "--mustard-replica",
        type=int,
        default=0,
        metavar="N",
        help="build a synthetic MUStARD replica of N clips, prep it, measure (ignores --data)",
    )
    ap.add_argument("--frames", type=int, default=8, help="with --mustard-replica: frames per clip (0: audio only)")
    ap.add_argument("--frame-size", type=int, default=224)
    ap.add_argument("--replica-seconds", type=float, default=4.0, help="clip length (x1, x1.25, x1.5 by entry)")
    ap.add_argument("--replica-fps", type=int, default=10)
    ap.add_argument("--replica-size", type=int, default=64, help="clip height in px (width 1.5x)")
    ap.add_argument("--wait", action="store_true", help="the data-wait study (loader vs training step) on --data")
    ap.add_argument("--s3", action="store_true", help="the data-wait study on --data and on an s3:// copy (moto)")
    ap.add_argument("--workers-list", default="0,1,2", help="with --wait/--s3: loader worker counts")
    ap.add_argument("--steps", type=int, default=40, help="with --wait/--s3: timed batches/steps per measurement")
    ap.add_argument(
        "--warmup",
        type=int,
        default=20,
        help="with --wait/--s3: untimed batches/steps first (>= ~15: past the main-process shuffle-buffer fill, "
        "during which each batch pulls ~2x its samples)",
    )
    ap.add_argument("--threads", type=int, default=1, help="with --wait/--s3: torch threads of the step")
    ap.add_argument("--target", type=float, default=WAIT_TARGET, help="with --wait/--s3: data_wait_frac target")
    ap.add_argument(
        "--sharing-strategy",
        choices=("file_descriptor", "file_system"),
        default=None,
        help="with --wait/--s3: torch.multiprocessing sharing strategy for tensors sent by the workers (default: "
        "torch's, file_descriptor on Linux: one round trip to the worker per shared tensor)",
    )
    a = ap.parse_args(argv)

    if a.mustard_replica:
        return mustard_replica(a)
    if a.build:
        from datasets_prep.demo import ensure_demo

        ensure_demo(a.data)
    if not os.path.isfile(os.path.join(a.data, "train", "manifest.json")):
        print(
            f"{a.data}: no shards; run `harness prep demo --out {a.data}` (or pass --build for the demo)",
            file=sys.stderr,
        )
        return 2
    if a.wait or a.s3:
        return wait_study(a)
    print(
        json.dumps(measure(a.data, workers=a.workers, batch=a.batch, epochs=a.epochs, shuffle_buffer=a.shuffle_buffer))
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
