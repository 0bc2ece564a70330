#!/usr/bin/env bash
# Every supported Triton against the kernels, without a GPU: each version is installed side by
# side (pip --target, one folder per version, kept between runs) and put first on PYTHONPATH for:
#   - the compile-only tests (every kernel launch the launchers make, compiled for sm_80 and
#     sm_90 with ptxas: no compile error, no register spill), for every version;
#   - the interpreter tests of the Triton kernels, for the oldest version (the newest is the one
#     requirements-dev.txt installs, which the main test suite runs).
# Triton 3.5 and 3.6's interpreters cannot run with numpy >= 2.4 (they turn 1-element arrays
# into loop bounds with int(), which numpy 2.4 refuses), so the oldest version's interpreter
# run gets numpy < 2.4 from its own folder, in this job only.
# The compiled kernels are cached (Triton's own cache, keyed by Triton version, kernel source and
# launch) in the same folder, so a rerun only compiles what changed; remove
# $TMPDIR/segnext-triton-matrix/triton-cache for a cold run. It is emptied above 3 GB.
# Run from a virtual environment that has the package and its test requirements
# Usage: tools/triton_matrix.sh [--skip-installed] [VERSION ...]; --skip-installed (what .ci/run
# passes, after the main suite) leaves out the compile-only run of the version installed in the
# environment, which the main suite has just run.
set -euo pipefail
cd "$(dirname "$0")/.."

# the newest patch release of each supported minor (the range is declared in
# segnext_kernels/_triton_compat.py; tests/test_triton_range.py keeps this list equal to it)
VERSIONS=(3.5.1 3.6.0 3.7.1 3.8.0 3.9.0)
OLD_NUMPY="numpy<2.4"
skip=""
if [ "${1:-}" = "--skip-installed" ]; then
    skip="$(python -c 'import triton; print(triton.__version__)')"
    shift
fi
if [ $# -gt 0 ]; then VERSIONS=("$@"); fi
ROOT="${TMPDIR:-/tmp}/segnext-triton-matrix"
mkdir -p "$ROOT"
export TRITON_CACHE_DIR="$ROOT/triton-cache"
if [ -d "$TRITON_CACHE_DIR" ] && [ "$(du -sm "$TRITON_CACHE_DIR" | cut -f1)" -gt 3072 ]; then
    rm -rf "$TRITON_CACHE_DIR"
fi

install() {  # install DIR REQUIREMENT: pip --target, once (a finished install leaves a stamp)
    if [ ! -f "$1/.installed" ]; then
        rm -rf "$1"
        pip install -q --no-deps --target "$1" "$2"
        touch "$1/.installed"
    fi
}

start=$SECONDS
for v in "${VERSIONS[@]}"; do
    install "$ROOT/triton-$v" "triton==$v"
done
install "$ROOT/old-numpy" "$OLD_NUMPY"
echo "triton matrix: installs took $((SECONDS - start)) s"

for v in "${VERSIONS[@]}"; do
    if [ "$v" = "$skip" ]; then
        echo "== triton $v: compile-only tests already run by the main suite"
        continue
    fi
    t=$SECONDS
    echo "== triton $v: compile-only tests (sm_80, sm_90)"
    PYTHONPATH="$ROOT/triton-$v" python -m pytest -q -p no:cacheprovider \
        tests/test_msca_triton.py tests/test_nmf2d_triton.py -k kernels_compile_for
    echo "== triton $v: $((SECONDS - t)) s"
done

oldest="${VERSIONS[0]}"
t=$SECONDS
echo "== triton $oldest: interpreter tests (numpy from '$OLD_NUMPY')"
PYTHONPATH="$ROOT/triton-$oldest:$ROOT/old-numpy" python -m pytest -q -p no:cacheprovider \
    tests/test_msca_triton.py tests/test_nmf2d_triton.py -k "not kernels_compile_for"
echo "== triton $oldest interpreter: $((SECONDS - t)) s; triton matrix: $((SECONDS - start)) s"
