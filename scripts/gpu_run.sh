#!/usr/bin/env bash
# The one script a GPU machine without network runs: install, kernel check, GPU tests, benchmarks, the targets table.
#
# Usage (from the repository root):
#   bash scripts/gpu_run.sh kernels      # part 1 (~7 min on an H100): install, nvidia-smi, kernel benchmark (D=64)
#   bash scripts/gpu_run.sh model        # part 2 (~6 min): install, pytest -m gpu, model benchmark, targets
#   bash scripts/gpu_run.sh kernels128   # optional part 3: kernel benchmark at head dim 128
#   bash scripts/gpu_run.sh tuned        # optional part 4: our kernels autotuned (--autotune) against SDPA-flash
#   bash scripts/gpu_run.sh all          # parts 1 and 2 in one go (more than 10 minutes: not for the device tool)
#   QUICK=1 bash scripts/gpu_run.sh ...  # fewer timed iterations, `kernels.check --quick`
#   SMOKE=1 PYTHON=.venv/bin/python bash scripts/gpu_run.sh all   # dry run of this script on a CPU (tiny shapes)
# Every part first runs `python -m faithful_vit.kernels.check` (the kernels against their float64 references on this
# GPU, one PASS/FAIL line per case, in the part's log; about a minute more, unmeasured); a failure there is logged
# and the part goes on.
#
# The device tool allows 10 minutes per command and 30 minutes per session, so a session runs the parts as separate
# commands, e.g. run(command="bash scripts/gpu_run.sh kernels", timeout_s=600, carry=[".whl"]), then the same with
# "model". Every step has its own timeout and the benchmarks write their results after each configuration, so a part
# cut short still returns what it measured.
#
# Outputs: benchmarks/results/<UTC date>_<gpu>/ (attention.json/.csv, model.json/.csv, PNGs, logs, targets.md) and,
# when $OUT is set (the device tool), a compact copy there: <part>_results.tar.gz plus the JSON, targets.md and logs
# (at most 8 files). Back on the development machine: untar both parts into one folder and run
# `python -m benchmarks.targets <folder>` for the combined PASS/MISS table, `python -m benchmarks.plot <folder>`
# for the PNGs.
#
# Optional wheels (no network there): put them in .whl/ (ignored by git: `echo /.whl/ >> .git/info/exclude`) and
# carry .whl; e.g. xformers, which the machine lacks:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 -d .whl xformers==0.0.35     # 3.2 MB, needs torch >= 2.10
set -uo pipefail

PART="${1:-all}"
case "$PART" in kernels|model|kernels128|tuned|all) ;; *) echo "usage: $0 kernels|model|kernels128|tuned|all" >&2; exit 2;; esac
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1

if compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "installing the carried wheels failed" >&2; exit 1; }
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
"$PY" -m pip install -q --no-deps --no-build-isolation -e . || { echo "pip install -e . failed" >&2; exit 1; }

GPU="$("$PY" -c 'import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else "nogpu")')"
if [ "$GPU" = "nogpu" ] && [ -z "${SMOKE:-}" ]; then
  echo "no CUDA GPU visible: this script is for the GPU machine (SMOKE=1 for a dry run)" >&2; exit 1
fi
RES="benchmarks/results/$(date -u +%Y%m%d)_$(echo "$GPU" | tr -c 'A-Za-z0-9._-' '_' | sed 's/_*$//')"
QUICK_FLAG="" CHECK_FLAG=""
[ -n "${QUICK:-}" ] && QUICK_FLAG="--quick"
[ -n "${QUICK:-}${SMOKE:-}" ] && CHECK_FLAG="--quick"
KERNEL_SMOKE="" MODEL_SMOKE=""
[ -n "${SMOKE:-}" ] && { KERNEL_SMOKE="--smoke"; MODEL_SMOKE="--cpu-tiny --smoke"; RES="$RES-smoke"; }
mkdir -p "$RES"
LOG="$RES/run_${PART}.log"

copy_out() {
  [ -n "${OUT:-}" ] || return 0
  tar -czf "$OUT/${PART}_results.tar.gz" "$RES" 2>/dev/null
  for f in attention.json model.json targets.md "run_${PART}.log" pytest_gpu.log; do
    [ -f "$RES/$f" ] && cp "$RES/$f" "$OUT/"
  done
  return 0
}
trap copy_out EXIT

step() {  # step <seconds> <description> <command...>: run with a time limit, log, never abort the script
  local limit="$1" what="$2"; shift 2
  echo "=== $what (limit ${limit}s) $(date -u +%H:%M:%S)" | tee -a "$LOG"
  timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  echo "=== $what: exit $rc" | tee -a "$LOG"
}

{ nvidia-smi; "$PY" -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'; \
  "$PY" -c 'import xformers; print("xformers", xformers.__version__)' 2>&1 | tail -1; } 2>&1 | tee -a "$LOG"

# On a SMOKE run without a GPU the check runs under the Triton interpreter (it re-executes itself with it on).
step 150 "kernel check" "$PY" -m faithful_vit.kernels.check $CHECK_FLAG

if [ "$PART" = "kernels" ] || [ "$PART" = "all" ]; then
  step 480 "kernel benchmark, head dim 64" "$PY" -m benchmarks.bench_attention --head-dim 64 --out "$RES" $QUICK_FLAG $KERNEL_SMOKE
fi
if [ "$PART" = "kernels128" ]; then
  step 480 "kernel benchmark, head dim 128" "$PY" -m benchmarks.bench_attention --head-dim 128 --n 197,1374 \
    --out "$RES/d128" $QUICK_FLAG $KERNEL_SMOKE
fi
if [ "$PART" = "tuned" ]; then
  step 480 "kernel benchmark, autotuned" "$PY" -m benchmarks.bench_attention --autotune --head-dim 64,128 \
    --n 197,1374 --providers ours_masked,ours_masked_compact,ours_varlen,sdpa_flash_dense --out "$RES/tuned" \
    $QUICK_FLAG $KERNEL_SMOKE
fi
if [ "$PART" = "model" ] || [ "$PART" = "all" ]; then
  echo "=== pytest -m gpu $(date -u +%H:%M:%S)" | tee -a "$LOG"
  timeout 150 "$PY" -m pytest -m gpu -q -p no:cacheprovider ${SMOKE:+-k benchmarks} 2>&1 | tee "$RES/pytest_gpu.log" | tail -15 | tee -a "$LOG"
  step 330 "model benchmark" "$PY" -m benchmarks.bench_model --out "$RES" $QUICK_FLAG $MODEL_SMOKE
fi
step 60 "targets" "$PY" -m benchmarks.targets "$RES"
echo "results in $RES"
