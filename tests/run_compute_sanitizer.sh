#!/usr/bin/env bash
# Runs the MSCA CUDA kernels under compute-sanitizer (memcheck, racecheck, synccheck) on small
# odd shapes, every dtype and both memory formats. Needs a GPU, a CUDA build of segnext_kernels._C
# and compute-sanitizer (CUDA toolkit). Usage: bash tests/run_compute_sanitizer.sh [tool ...]
set -euo pipefail
cd "$(dirname "$0")/.."
SAN="$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")"
[ -x "$SAN" ] || { echo "compute-sanitizer not found" >&2; exit 2; }
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
status=0
for tool in "${@:-memcheck racecheck synccheck}"; do
  for t in $tool; do
    echo "== compute-sanitizer --tool=$t"
    "$SAN" --tool="$t" --error-exitcode=3 "${PYTHON:-python}" tests/test_msca_cuda.py sanitize-case || status=1
  done
done
exit $status
