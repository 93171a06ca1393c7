#!/usr/bin/env bash
# The one-GPU check of issue 12, sized to finish in under 8 minutes on one GPU (H100/H200 class):
#   1. the CUDA tests: pytest -m gpu                                         (at most 150 s)
#   2. benchmarks/gpu_memory.py on TinyLlama-1.1B shapes, every arm            (at most 140 s)
#   3. benchmarks/gpu_memory.py on LLaMA-2-7B shapes, FFT/LoRA/LISA/GRASS arms (at most 170 s)
# each benchmark arm: 2 warm-up steps (GRASS's 1 probe step among them) + 3 measured, batch 4 x 1024, bf16,
# gradient checkpointing on, fused AdamW for the torch arms (the setting docs/gpu_memory.md validates).
#
#   bash benchmarks/gpu_check.sh            # on a machine with a CUDA GPU; outputs in $OUT (default runs/gpu_check)
#   bash benchmarks/gpu_check.sh --smoke    # CPU: the same sequence, the benchmark in its tiny --smoke mode and
#                                           # the GPU tests only collected (they skip without CUDA)
#
# Writes $OUT/gpu_check.md (what ran, exit codes, seconds), $OUT/pytest_gpu.txt, $OUT/gpu_memory_<model>.md and
# .jsonl. Exit code: 0 when every part passed, 1 when one failed (see gpu_check.md), 2 without CUDA (no --smoke).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-runs/gpu_check}"
PY="${PYTHON:-python}"
mkdir -p "$OUT"
SMOKE=0
case "${1:-}" in
  --smoke) SMOKE=1 ;;
  "") ;;
  *) echo "gpu_check.sh: unknown argument '$1' (allowed: --smoke)" >&2; exit 2 ;;
esac
if (( ! SMOKE )) && ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check.sh: no CUDA device is available; run with --smoke to check the script on a CPU" >&2
  exit 2
fi

REPORT="$OUT/gpu_check.md"
echo "# GPU check ($( (( SMOKE )) && echo "smoke, CPU" || echo "CUDA")), $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)" > "$REPORT"
echo "" >> "$REPORT"
FAILED=0
T0=$SECONDS

# run NAME TIMEOUT_S CMD...: runs CMD under a timeout, stdout+stderr to $OUT/NAME.log, one line in the report
run() {
  local name=$1 limit=$2; shift 2
  local t=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  (( rc != 0 )) && FAILED=1
  echo "- $name: exit $rc in $((SECONDS - t)) s (limit ${limit} s): \`$*\`" >> "$REPORT"
  echo "[gpu_check] $name: exit $rc in $((SECONDS - t)) s" >&2
}

BENCH=(benchmarks/gpu_memory.py --warmup 2 --probe-steps 1 --steps 3 --checkpointing on)
if (( SMOKE )); then
  run pytest_gpu 300 "$PY" -m pytest -q --collect-only -m gpu tests
  run gpu_memory_smoke 300 "$PY" "${BENCH[@]}" --smoke --methods fft,lisa,grass --out "$OUT/gpu_memory_smoke.md"
else
  nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
  run pytest_gpu 150 "$PY" -m pytest -q -m gpu tests
  run gpu_memory_tinyllama 140 "$PY" "${BENCH[@]}" --models tinyllama --budget 125 --arm-timeout 60 \
    --methods fft,lora,dora,lisa,grass-no-offload,grass,grass-static,grass-head --out "$OUT/gpu_memory_tinyllama.md"
  run gpu_memory_llama2-7b 170 "$PY" "${BENCH[@]}" --models llama2-7b --budget 155 --arm-timeout 70 \
    --methods fft,lora,lisa,grass --out "$OUT/gpu_memory_llama2-7b.md"
fi
echo "" >> "$REPORT"
echo "total: $((SECONDS - T0)) s; $( (( FAILED )) && echo "SOMETHING FAILED (see the .log files)" || echo "all parts passed")" >> "$REPORT"
cat "$REPORT" >&2
exit $FAILED
