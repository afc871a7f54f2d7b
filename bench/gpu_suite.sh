#!/usr/bin/env bash
# The GPU checks of issue 19 in one command, at most 9 minutes on one H100 or H200:
#
#   bench/gpu_suite.sh                 # on the GPU machine: writes bench/results/gpu-<date>.md and .json
#   bench/gpu_suite.sh --dry-run       # the same code on the CPU with tiny shapes, in under 2 minutes
#   bench/gpu_suite.sh --out DIR       # write the report elsewhere (the dry-run test does)
#
# Parts, each under its own time budget (a slow part is cut off and reported, never eats the others' time), the
# report rewritten after every part so a cut-off run still leaves what it measured:
#   gpu_tests      tests/finetune/test_gpu.py (every method trains a few steps in bf16)
#   memory         bench/memory_estimate.py --section estimate: predicted vs measured peak, 1B/8B llama shapes
#   select_caps    bench/memory_estimate.py --section select: the selector's plans under 16/24/40/80 GB caps
#   train_speed    bench/train_speed.py: 1B LoRA and QLoRA against plain peft
#   serving        bench/serving_speed.py: the built-in server's throughput
#   multi_gpu      tests/finetune/test_distributed_gpu.py on 2 GPUs (NCCL DDP, FSDP2); said skipped on one GPU
# Needs no Django. What the device image lacks (bitsandbytes, liger-kernel) comes from wheels in .whl/
# (../shared/gpu/fetch-wheels.sh), installed into /tmp/site.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
DRY=0
OUT=bench/results
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --out) OUT=$2; shift ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
mkdir -p "$OUT"
STAMP=$(date -u +%Y-%m-%d)
[ "$DRY" = 1 ] && STAMP="$STAMP-dry-run"
REPORT="$OUT/gpu-$STAMP"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
if [ "$DRY" = 0 ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    > "$WORK/install.log" 2>&1 || echo "wheel install failed; see the report" >&2
  export PYTHONPATH=/tmp/site:$ROOT:$ROOT/tests
else
  export PYTHONPATH=$ROOT:$ROOT/tests${PYTHONPATH:+:$PYTHONPATH}
fi

# name, seconds, command...: runs one part under its budget and records its exit status and time.
# GPU_SUITE_BUDGET_SCALE stretches every budget (the dry-run test uses it on a shared, busy CPU).
part() {
  local name=$1 budget=$(( $2 * ${GPU_SUITE_BUDGET_SCALE:-1} ))
  shift 2
  local start=$SECONDS
  echo "== $name (budget ${budget}s)"
  timeout --kill-after=10 "$budget" "$@" > "$WORK/$name.log" 2>&1
  local rc=$?
  echo "{\"name\": \"$name\", \"rc\": $rc, \"seconds\": $((SECONDS - start)), \"budget\": $budget}" > "$WORK/$name.status"
  echo "   rc=$rc in $((SECONDS - start))s"
  "$PY" bench/gpu_report.py "$WORK" "$REPORT" $([ "$DRY" = 1 ] && echo --dry-run)
}

if [ "$DRY" = 1 ]; then
  part gpu_tests 30 "$PY" -m pytest -q --noconftest -p no:cacheprovider -m gpu tests/finetune/test_gpu.py
  part memory 50 "$PY" bench/memory_estimate.py --cpu-smoke --quick --section estimate --json "$WORK/memory.json"
  part select_caps 25 "$PY" bench/memory_estimate.py --cpu-smoke --quick --section select --json "$WORK/select_caps.json"
  part serving 15 "$PY" bench/serving_speed.py --devices cpu --requests 2 --max-tokens 4 --adapter-counts 1
else
  part gpu_tests 60 "$PY" -m pytest -q -s --noconftest -p no:cacheprovider -m gpu tests/finetune/test_gpu.py
  part memory 170 "$PY" bench/memory_estimate.py --quick --section estimate --json "$WORK/memory.json"
  part select_caps 90 "$PY" bench/memory_estimate.py --quick --section select --json "$WORK/select_caps.json"
  # needs SmolLM2's tokenizer for the random-weight shapes: TUNEDECK_SMOLLM_DIR or var/test-models (carry it)
  part train_speed 150 "$PY" bench/train_speed.py --shapes llama-1b --methods lora,qlora --seq 1024 --lengths mixed \
    --rounds 5 --steps 3 --warmup 1 --json "$WORK/train_speed.json"
  part serving 30 "$PY" bench/serving_speed.py --devices cuda
  # Issue 36: training on several ranks, on 2 GPUs when the device has them (NCCL DDP against one GPU, FSDP2).
  GPU_COUNT=$("$PY" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
  if [ "${GPU_COUNT:-0}" -ge 2 ]; then
    part multi_gpu 150 "$PY" -m pytest -q -s --noconftest -p no:cacheprovider -m gpu tests/finetune/test_distributed_gpu.py
  else
    echo "== multi_gpu: skipped: the device has ${GPU_COUNT:-0} GPU(s), the 2-GPU DDP and FSDP2 smoke needs 2 or more"
  fi
fi
echo "report: $REPORT.md and $REPORT.json"
