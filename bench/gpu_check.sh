#!/usr/bin/env bash
# The GPU check, one script: <= 8 minutes on one H100, prints ONE JSON object on stdout (progress on stderr).
#
#   bench/gpu_check.sh [--official DIR] [--out DIR]      # on a GPU machine, from the repository root
#   bench/gpu_check.sh --dry-run                          # tiny sizes on CPU: what the test suite runs (CI)
#
# Steps (each one's result, exit code and wall time go into the JSON; a failing step does not stop the others):
#   1. gpu_tests   pytest -m gpu tests/harness/test_gpu.py   (DeepSpeed bf16 ZeRO-2 on 1 GPU; skipped with --dry-run)
#   2. step        bench/gpu_step.py: Swin-B-384 + BERT-base, MoPE k=16, batch 32, fp32 and bf16: samples/s, peak
#                  memory, MFU from the counted FLOPs
#   3. zero2_train harness train experiment=demo_mope deepspeed=zero2, 100 steps (bf16 on a GPU; 3 fp32 steps on CPU
#                  with --dry-run), its MLflow run's final metrics
#   4. vs_official bench/vs_official.py --official DIR (only with --official; skipped otherwise)
# Environment: GPU_CHECK_DATA=SHARD_DIR uses an existing demo build (else the demo is built, ~1 min); PYTHON (default
# .venv/bin/python, else python3).
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
OFFICIAL=""
OUT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --official) OFFICIAL="$2"; shift ;;
    --out) OUT="$2"; shift ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "bench/gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
OUT="${OUT:-$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")}"
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR=false
unset MLFLOW_TRACKING_URI

# run NAME CMD...: runs a step, logs to $OUT/NAME.log, records rc and seconds in $OUT/NAME.status
run() {
  local name="$1"; shift
  echo "gpu_check: $name: $*" >&2
  local t0; t0=$(date +%s%N)
  "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  local ms=$((($(date +%s%N) - t0) / 1000000))
  printf '{"rc": %d, "seconds": %d.%03d}\n' "$rc" $((ms / 1000)) $((ms % 1000)) >"$OUT/$name.status"
  echo "gpu_check: $name: rc=$rc ($(cut -c1-60 "$OUT/$name.status"))" >&2
}
skip() { printf '{"skipped": "%s"}\n' "$2" >"$OUT/$1.status"; echo "gpu_check: $1: skipped ($2)" >&2; }

# 1. the GPU tests
if [ "$DRY" = 1 ]; then
  skip gpu_tests "dry run: no GPU"
else
  run gpu_tests "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/harness/test_gpu.py
fi

# 2. a paper-scale step
if [ "$DRY" = 1 ]; then
  run step "$PY" bench/gpu_step.py --dry-run --json "$OUT/step.json"
else
  run step "$PY" bench/gpu_step.py --json "$OUT/step.json"
fi

# 3. a 1-GPU DeepSpeed ZeRO-2 trial through `harness train`
TRAIN=(experiment=demo_mope deepspeed=zero2 "paths.run_root=$OUT/runs" trainer.epochs=1 run_name=gpu-check-zero2)
if [ -n "${GPU_CHECK_DATA:-}" ]; then
  TRAIN+=("data.shard_dir=$GPU_CHECK_DATA" "vision.weights=$GPU_CHECK_DATA/vision_encoder")
fi
if [ "$DRY" = 1 ]; then
  TRAIN+=(trainer.precision=fp32 trainer.max_steps_per_epoch=3 trainer.threads=1 trainer.num_workers=0)
else
  TRAIN+=(trainer.precision=bf16 trainer.max_steps_per_epoch=100)
fi
run zero2_train "$PY" -m harness.cli train "${TRAIN[@]}"

# 4. against the official code
if [ -n "$OFFICIAL" ]; then
  if [ -f bench/vs_official.py ]; then
    run vs_official "$PY" bench/vs_official.py --official "$OFFICIAL" --json "$OUT/vs_official.json"
  else
    skip vs_official "bench/vs_official.py not in this checkout"
  fi
else
  skip vs_official "no --official DIR given"
fi

"$PY" - "$OUT" "$DRY" <<'EOF'
import json, sys
from pathlib import Path

out, dry = Path(sys.argv[1]), sys.argv[2] == "1"
res = {"gpu_check": 1, "dry_run": dry, "out": str(out), "steps": {}}
for name in ("gpu_tests", "step", "zero2_train", "vs_official"):
    st = json.loads((out / f"{name}.status").read_text())
    log = out / f"{name}.log"
    if log.is_file():
        st["log_tail"] = log.read_text(errors="replace").splitlines()[-5:]
    data = out / f"{name}.json"
    if data.is_file():
        st["result"] = json.loads(data.read_text())
    res["steps"][name] = st
# the ZeRO-2 trial's MLflow run: status and final metrics
db = out / "runs" / "mlflow.db"
if db.is_file():
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{db}")
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    if runs:
        r = runs[0]
        res["steps"]["zero2_train"]["run"] = {
            "status": r.info.status,
            "params": {k: r.data.params.get(k) for k in ("deepspeed.zero_stage", "trainer.precision")},
            "metrics": {k: v for k, v in sorted(r.data.metrics.items()) if k.startswith(("final/", "perf/"))},
        }
ran = [s for s in res["steps"].values() if "rc" in s]
res["ok"] = all(s["rc"] == 0 for s in ran)
print(json.dumps(res, indent=2, default=str))
sys.exit(0 if res["ok"] else 1)
EOF
