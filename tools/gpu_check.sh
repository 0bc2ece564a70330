#!/usr/bin/env bash
# tools/gpu_check.sh OUTDIR: the prepared check for a fresh GPU machine (H100/H200; torch cu13x,
# triton, nvcc, cmake, ninja, pybind11, pytest, compute-sanitizer; no package registry).
#
#   bash tools/gpu_check.sh [--dry-run] [--only s1,s2] [--skip s1,s2] OUTDIR
#
# Stages, in order. Each runs under its own `timeout` (SIGINT first, so pytest and the bench
# stop cleanly and keep what they measured), writes OUTDIR/<stage>.log and appends a JSON line
# to OUTDIR/stages.jsonl as soon as it ends; a stage that fails or times out never stops the
# next one. OUTDIR/summary.{json,txt} are written at the end.
#
#   stage               what                                               min/max s  here*  GPU est.
#   env                 nvidia-smi, versions, git commit -> env.json           5/20       6       3
#   build               pip install -e . for this GPU's arch only, all cores  60/150    134      60-90
#                       (TORCH_CUDA_ARCH_LIST from nvidia-smi), then segnext_kernels.info
#   selftest            python -m segnext_kernels.selftest --device cuda: the  10/40      11      5-20
#                       GPU kernels vs the reference ("absent" without it)
#   gpu-tests           pytest -m gpu -v --maxfail=10 (not -x: each GPU run   40/150     13      60-150
#                       is precious) on the CUDA/Triton test files
#   sanitize-memcheck   compute-sanitizer memcheck, tools/sanitize_msca.py    25/60       0      20-40
#   sanitize-racecheck  compute-sanitizer racecheck, same driver              25/60       0      20-50
#   bench-fp16          MSCA fwd / fwd+bwd (B16 C64 128^2, C320 32^2,          60/150    121      70-110
#                       channels_last), NMF2D T and B heads, SegNeXt-T train
#                       step and its peak memory; float16, no compile
#   bench-bf16          the MSCA cases in bfloat16                            20/45      13      20-30
#   bench-compile       torch.compile baselines: MSCA fwd, NMF2D T fwd         30/90      44      40-90
#   * one run on the 2-core AMD EPYC dev machine at load average 11, no GPU: GPU stages skip
#     (gpu-tests: all skipped), the bench runs --smoke sizes; 342 s in all. docs/gpu_check.md.
#
# Time: the whole script stays within GPU_CHECK_BUDGET seconds (default 450, i.e. 7.5 min): a
# stage gets min(its max, what is left after reserving the later stages' minimums). Force a
# stage's limit with GPU_CHECK_TIMEOUT_<stage, '-' as '_'>=SECONDS (e.g. to test timeouts).
# Exit status: 0 when every stage that ran passed (absent/skipped count as passed), else 1.
set -uo pipefail

usage() {
  sed -n '2,6p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
}

DRY=0
ONLY=""
SKIP=""
OUT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --only) ONLY=",$2,"; shift ;;
    --skip) SKIP=",$2,"; shift ;;
    -h|--help) usage ;;
    -*) echo "unknown option $1" >&2; usage ;;
    *) [ -z "$OUT" ] || usage; OUT="$1" ;;
  esac
  shift
done
[ -n "$OUT" ] || usage

cd "$(dirname "$0")/.." || exit 2
ROOT="$PWD"
mkdir -p "$OUT" || exit 2
OUT="$(cd "$OUT" && pwd)"
PY="${PYTHON:-python}"
BUDGET="${GPU_CHECK_BUDGET:-450}"
NPROC="$(nproc 2>/dev/null || echo 4)"

STAGES=(env build selftest gpu-tests sanitize-memcheck sanitize-racecheck bench-fp16 bench-bf16 bench-compile)
declare -A MIN=([env]=5 [build]=60 [selftest]=10 [gpu-tests]=40 [sanitize-memcheck]=25
                [sanitize-racecheck]=25 [bench-fp16]=60 [bench-bf16]=20 [bench-compile]=30)
declare -A MAX=([env]=20 [build]=150 [selftest]=40 [gpu-tests]=150 [sanitize-memcheck]=60
                [sanitize-racecheck]=60 [bench-fp16]=150 [bench-bf16]=45 [bench-compile]=90)

HAS_GPU=0
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then HAS_GPU=1; fi
ARCH=""
if [ "$HAS_GPU" = 1 ]; then
  ARCH="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n1 | tr -d ' ')"
fi
# Without a GPU the bench stages run their tiny sizes: the CPU side of this script stays testable.
BENCH_SIZE=""
[ "$HAS_GPU" = 1 ] || BENCH_SIZE="--smoke"
SANITIZER="$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")"

# Exit codes a stage command uses for "not applicable here".
ABSENT=90
SKIPPED=91

# The bench subsets (the filter matches 'level/pass/variant/layout/shape').
F16='^msca/[^/]+/[^/]+/cl/|^nmf/|^model/train/[^/]+/cl/SegNeXt-T|^memory/train peak/[^/]+/cl/SegNeXt-T|^memory/msca saved/[^/]+/cl/'
BF16='^msca/[^/]+/[^/]+/cl/'
COMPILE='^msca/fwd/[^/]+/cl/|^nmf/fwd/[^/]+/-/SegNeXt-T'

stage_cmd() {
  case "$1" in
    env)
      cat <<EOF
date -u; hostname; echo "nproc $NPROC"; nvidia-smi || true
nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total,clocks.max.sm,clocks.max.mem,power.limit --format=csv || true
nvcc --version || true; "$SANITIZER" --version || true; git rev-parse HEAD; git status --short | head -n 20
"$PY" - <<'PYEOF'
import json, platform, subprocess, sys
import torch
info = {"python": sys.version.split()[0], "platform": platform.platform(), "torch": torch.__version__,
        "torch_cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "capability": torch.cuda.get_device_capability() if torch.cuda.is_available() else None}
try:
    import triton
    info["triton"] = triton.__version__
except Exception as exc:
    info["triton"] = f"not importable: {exc}"
info["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
json.dump(info, open("$OUT/env.json", "w"), indent=1)
print(json.dumps(info, indent=1))
PYEOF
EOF
      ;;
    build)
      local arch_env=""
      [ -n "$ARCH" ] && arch_env="TORCH_CUDA_ARCH_LIST=$ARCH SEGNEXT_CUDA=1"
      echo "env $arch_env MAX_JOBS=$NPROC CMAKE_BUILD_PARALLEL_LEVEL=$NPROC \"$PY\" -m pip install -v --no-index --no-build-isolation --no-deps -e . && \"$PY\" -m segnext_kernels.info | tee \"$OUT/info.txt\""
      ;;
    selftest)
      echo "if \"$PY\" -c 'import importlib.util, sys; sys.exit(0 if importlib.util.find_spec(\"segnext_kernels.selftest\") else 1)'; then \"$PY\" -m segnext_kernels.selftest --device cuda --json \"$OUT/selftest.json\"; else echo 'segnext_kernels.selftest: absent'; exit $ABSENT; fi"
      ;;
    gpu-tests)
      echo "\"$PY\" -m pytest -m gpu -v -rfEs -p no:cacheprovider --maxfail=10 --junitxml=\"$OUT/gpu_tests.xml\" -k 'not compute_sanitizer' tests/test_msca_cuda.py tests/test_msca_triton.py tests/test_nmf2d_triton.py tests/test_train.py"
      ;;
    sanitize-memcheck|sanitize-racecheck)
      local tool="${1#sanitize-}"
      echo "[ $HAS_GPU = 1 ] || { echo 'no GPU: skipped'; exit $SKIPPED; }; [ -x \"$SANITIZER\" ] || { echo 'compute-sanitizer not found: skipped'; exit $SKIPPED; }; filter=''; \"$SANITIZER\" --help 2>&1 | grep -q -- '--kernel-name' && filter='--kernel-name kns=msca'; \"$SANITIZER\" --tool $tool --error-exitcode 3 \$filter \"$PY\" tools/sanitize_msca.py"
      ;;
    bench-fp16)
      echo "\"$PY\" -m bench $BENCH_SIZE --dtype float16 --no-compile --levels msca,nmf,model,memory --filter '$F16' --out \"$OUT/bench\""
      ;;
    bench-bf16)
      echo "\"$PY\" -m bench $BENCH_SIZE --dtype bfloat16 --no-compile --levels msca --filter '$BF16' --out \"$OUT/bench\""
      ;;
    bench-compile)
      echo "\"$PY\" -m bench $BENCH_SIZE --dtype float16 --compile --compile-budget 45 --levels msca,nmf --filter '$COMPILE' --out \"$OUT/bench\""
      ;;
  esac
}

selected() {
  [ -z "$ONLY" ] || [[ "$ONLY" == *",$1,"* ]] || return 1
  [ -z "$SKIP" ] || [[ "$SKIP" != *",$1,"* ]] || return 1
  return 0
}

json_str() {  # a JSON string literal
  local s="${1//\\/\\\\}"
  s="${s//\"/\\\"}"
  s="${s//$'\n'/\\n}"
  s="${s//$'\t'/ }"
  printf '"%s"' "$s"
}

# Seconds this stage may take: its max, less whatever the later stages' minimums need.
stage_limit() {
  local name="$1" after=0 reserve=0 s
  for s in "${STAGES[@]}"; do
    if [ "$after" = 1 ] && selected "$s"; then reserve=$((reserve + MIN[$s])); fi
    [ "$s" = "$name" ] && after=1
  done
  local left=$((BUDGET - (SECONDS - START) - reserve))
  local limit=${MAX[$name]}
  [ "$left" -lt "$limit" ] && limit=$left
  local forced="GPU_CHECK_TIMEOUT_${name//-/_}"
  [ -n "${!forced:-}" ] && limit="${!forced}"
  echo "$limit"
}

START=$SECONDS
if [ "$DRY" = 1 ]; then
  echo "gpu_check dry run: OUTDIR=$OUT, budget ${BUDGET}s, GPU: $([ "$HAS_GPU" = 1 ] && echo "yes (compute capability $ARCH)" || echo "none visible (bench stages at --smoke size)")"
  status=0
  for s in "${STAGES[@]}"; do
    selected "$s" || { echo "== $s: not selected"; continue; }
    echo "== $s (min ${MIN[$s]}s, max ${MAX[$s]}s, limit now $(stage_limit "$s")s)"
    stage_cmd "$s" | sed 's/^/   /'
  done
  # What can be checked without running: the modules import, the test files collect, every bench
  # filter selects something.
  echo "== checks"
  "$PY" -c "import segnext_kernels, bench" && echo "   imports: ok" || { echo "   imports: FAILED"; status=1; }
  "$PY" -m pytest -m gpu --collect-only -q -p no:cacheprovider tests/test_msca_cuda.py tests/test_msca_triton.py \
    tests/test_nmf2d_triton.py tests/test_train.py > "$OUT/dry_run_collect.log" 2>&1 \
    && echo "   gpu tests collect: $(tail -n1 "$OUT/dry_run_collect.log")" || { echo "   gpu tests collect: FAILED"; status=1; }
  for spec in "float16@msca,nmf,model,memory@$F16@--no-compile" "bfloat16@msca@$BF16@--no-compile" \
              "float16@msca,nmf@$COMPILE@--compile"; do
    IFS='@' read -r dt lv flt cmp <<<"$spec"
    n="$("$PY" -m bench $BENCH_SIZE --dtype "$dt" $cmp --levels "$lv" --filter "$flt" --list 2>/dev/null | tail -n1)"
    case "$n" in
      *" variants") [ "${n%% *}" -gt 0 ] && echo "   bench $dt $lv: $n" || { echo "   bench $dt $lv: no variant"; status=1; } ;;
      *) echo "   bench $dt $lv: --list failed"; status=1 ;;
    esac
  done
  [ -f "$ROOT/tools/sanitize_msca.py" ] && echo "   sanitizer driver: tools/sanitize_msca.py" || status=1
  exit $status
fi

: > "$OUT/stages.jsonl"
overall=0
for s in "${STAGES[@]}"; do
  selected "$s" || continue
  limit="$(stage_limit "$s")"
  log="$OUT/$s.log"
  cmd="$(stage_cmd "$s")"
  if [ "$limit" -lt 3 ]; then
    status="no-time"; rc=-1; took=0
    echo "[gpu_check] $s: no time left in the ${BUDGET}s budget" | tee "$log"
  else
    echo "[gpu_check] $s: up to ${limit}s ... (log: $log)"
    t0=$SECONDS
    timeout -s INT -k 10 "$limit" bash -c "$cmd" > "$log" 2>&1
    rc=$?
    took=$((SECONDS - t0))
    case "$rc" in
      0) status="ok" ;;
      124|137) status="timeout" ;;
      $ABSENT) status="absent" ;;
      $SKIPPED) status="skipped" ;;
      *) status="failed" ;;
    esac
  fi
  [ "$status" = "failed" ] || [ "$status" = "timeout" ] && overall=1
  echo "[gpu_check] $s: $status (exit $rc, ${took}s of ${limit}s)"
  printf '{"stage": %s, "status": %s, "exit": %s, "seconds": %s, "limit_s": %s, "log": %s, "command": %s}\n' \
    "$(json_str "$s")" "$(json_str "$status")" "$rc" "$took" "$limit" "$(json_str "$log")" \
    "$(json_str "$cmd")" >> "$OUT/stages.jsonl"
done

wall=$((SECONDS - START))
"$PY" - "$OUT" "$wall" "$BUDGET" <<'PYEOF' || echo "[gpu_check] could not write summary.json (stages.jsonl has everything)"
import json, pathlib, sys
out, wall, budget = pathlib.Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
stages = [json.loads(line) for line in (out / "stages.jsonl").read_text().splitlines() if line.strip()]
env = json.loads((out / "env.json").read_text()) if (out / "env.json").exists() else {}
bench = sorted(p.name for p in (out / "bench").glob("*.json")) if (out / "bench").exists() else []
summary = {"wall_s": wall, "budget_s": budget, "environment": env, "stages": stages, "bench_results": bench}
(out / "summary.json").write_text(json.dumps(summary, indent=1))
lines = [f"gpu_check on {env.get('gpu') or 'no GPU'} (torch {env.get('torch')}, triton {env.get('triton')}): "
         f"{wall}s of a {budget}s budget", f"{'stage':<20}{'status':<10}{'seconds':>8}{'limit':>8}"]
lines += [f"{s['stage']:<20}{s['status']:<10}{s['seconds']:>8}{s['limit_s']:>8}" for s in stages]
lines += [f"bench results: {', '.join(bench) or 'none'}"]
(out / "summary.txt").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
PYEOF
exit $overall
