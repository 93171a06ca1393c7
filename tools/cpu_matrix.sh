#!/usr/bin/env bash
# Run tests as they would run on other x86 CPUs. PyTorch picks its CPU kernels by the instruction set it finds
# (ATEN_CPU_CAPABILITY=default|avx2|avx512) and reduces in another order with another number of threads, so a
# tolerance tuned on one machine can fail on the next (issue 28: a test passed under avx2 and failed under avx512).
# This runs a pytest selection under each kernel set and thread count this CPU supports, one line per cell, and
# exits non-zero if any cell fails. A capability the CPU lacks is skipped: the tolerances must hold there by their
# derivation (written beside each one), not by observation.
#
# usage (from anywhere in the checkout):  tools/cpu_matrix.sh [PYTEST ARGS...]     (default: -m "not slow")
#        make cpu-matrix                                       the same, through the project's virtualenv
#        tools/cpu_matrix.sh -m "not slow" tests/test_loss.py tests/test_offload.py
# env:   PYTHON (default: the project's .venv/bin/python, else python3), CAPS (default "default avx2 avx512"),
#        THREADS (default "1 2")
set -u
cd "$(dirname "$0")/.." || exit 2
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
CAPS=${CAPS:-"default avx2 avx512"}
THREADS=${THREADS:-"1 2"}
[ $# -gt 0 ] || set -- -m "not slow"
flags=$(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null)
echo "cpu: $(grep -m1 '^model name' /proc/cpuinfo 2>/dev/null | cut -d: -f2- | sed 's/^ *//'); python: $PYTHON; pytest $*"
fail=0
for cap in $CAPS; do
  case $cap in
    avx2) echo "$flags" | grep -qw avx2 || { echo "skip  capability=$cap: this CPU lacks it"; continue; } ;;
    avx512) echo "$flags" | grep -qw avx512f || { echo "skip  capability=$cap: this CPU lacks it"; continue; } ;;
  esac
  for t in $THREADS; do
    log=$(mktemp)
    start=$(date +%s)
    if ATEN_CPU_CAPABILITY=$cap OMP_NUM_THREADS=$t MKL_NUM_THREADS=$t "$PYTHON" -m pytest -q -p no:cacheprovider "$@" >"$log" 2>&1; then
      echo "ok    capability=$cap threads=$t ($(( $(date +%s) - start )) s): $(tail -n 1 "$log")"
    else
      fail=1
      echo "FAIL  capability=$cap threads=$t ($(( $(date +%s) - start )) s): $(tail -n 1 "$log")"
      grep -E '^(FAILED|ERROR) ' "$log" | head -n 20 | sed 's/^/      /'
    fi
    rm -f "$log"
  done
done
exit $fail
