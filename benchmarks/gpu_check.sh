#!/usr/bin/env bash
# The one-GPU check (issues 12, 29), end to end in at most 6 minutes on one H100-class GPU: an import check, the
# gpu-marked tests, fused AdamW load/resume, pure bf16, the pinning fallback, TinyLlama-1.1B peak memory of every
# method against the estimate, one LLaMA-2-7B GRASS step if memory allows. Each arm has its own time bound and its
# own ok/skip/fail line; a summary line ends it. Arms, bounds and outputs: benchmarks/gpu_check.py.
#
#   bash benchmarks/gpu_check.sh            # a machine with a CUDA GPU (bare and offline is fine: the package is
#                                           # taken from this checkout's src/, models are random-weight configs)
#   bash benchmarks/gpu_check.sh --smoke    # the CPU rehearsal: the same arms and lines
#
# Outputs in $OUT (default runs/gpu_check): summary.json, gpu_check.txt, logs.tar.gz. PYTHON picks the interpreter
# (one with torch). Exit code: 0 no arm failed, 1 an arm failed, 2 bad arguments or no CUDA without --smoke.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$(command -v python3 || command -v python || echo python3)}"
if ! command -v "$PY" >/dev/null 2>&1; then
  echo "gpu_check.sh: no python interpreter '$PY'; set PYTHON=/path/to/python (one with torch)" >&2
  exit 2
fi
exec "$PY" benchmarks/gpu_check.py "$@"
