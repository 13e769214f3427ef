#!/usr/bin/env bash
# One prepared GPU session: under 8 minutes on one H100/H200, every result under $OUT.
#
#   OUT=/some/dir bash bench/gpu_session.sh            on the device machine (the `run` tool sets $OUT);
#                                                      with wheels fetched by bench/fetch_wheels.sh, pass
#                                                      carry [".whl"] so diffusers/Opacus take part
#   OUT=/some/dir bash bench/gpu_session.sh --dry-run  on a CPU at tiny sizes, well under a minute (the test)
#
# Sections (bench/gpu_session.py says what each measures) run in this order, each in its own process
# under `timeout`: env, kernels, train64, scan, peers, train128. A global deadline (465 s; 120 s with
# --dry-run; GPU_SESSION_BUDGET_S overrides) caps each section's time; a section that cannot get its
# minimum is skipped and says so. After every section the results are merged, so $OUT always holds:
#   results.json   every figure, per section, with its status
#   summary.md     the short table
#   session.log    everything printed
# Needs only python3 with torch (and Triton on the GPU): no DeepSpeed, DALI, open_clip, diffusers, Opacus.
set -u -o pipefail
cd "$(dirname "$0")/.."

DRY=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
    *) echo "gpu_session.sh: unknown argument '$arg' (expected --dry-run)" >&2; exit 2 ;;
  esac
done
if [ -z "${OUT:-}" ]; then
  echo "gpu_session.sh: set OUT to the folder for the results" >&2
  exit 2
fi
mkdir -p "$OUT"
PY=${PYTHON:-python3}
LOG="$OUT/session.log"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_session.XXXXXX")
if [ "$DRY" = 1 ]; then BUDGET=${GPU_SESSION_BUDGET_S:-120}; DRYFLAG=--dry-run; else BUDGET=${GPU_SESSION_BUDGET_S:-465}; DRYFLAG=; fi
START=$(date +%s)
DEADLINE=$((START + BUDGET))
export PYTHONUNBUFFERED=1

say() { echo "[gpu_session $(date +%H:%M:%S)] $*" | tee -a "$LOG"; }
merge() { "$PY" bench/gpu_session.py merge --work "$WORK" --out "$OUT" >>"$LOG" 2>&1 || say "merge failed"; }

say "start: budget ${BUDGET}s, dry run $DRY, python $($PY -c 'import sys; print(sys.version.split()[0])'), work $WORK"
if [ "$DRY" = 0 ]; then
  nvidia-smi 2>&1 | tee -a "$LOG" || say "nvidia-smi failed"
  # wheels carried in .whl (bench/fetch_wheels.sh): diffusers, Opacus and what they need beyond the image
  if compgen -G ".whl/*.whl" >/dev/null; then
    if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        >>"$LOG" 2>&1; then
      export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
      say "installed carried wheels: $(cd .whl && ls *.whl | tr '\n' ' ')"
    else
      say "installing the carried wheels failed (see above); peers run without them"
    fi
  else
    say "no wheels carried (.whl/): train_step vs diffusers and dp_step vs opacus will say so"
  fi
fi

FAILED=0
# run_section NAME WANT_S MIN_S: the section gets min(WANT, time left) seconds, or is skipped below MIN
run_section() {
  local name=$1 want=$2 need=$3 now left t rc status
  now=$(date +%s)
  left=$((DEADLINE - now - 5))
  [ "$DRY" = 1 ] && need=3   # tiny sizes: every section fits in seconds
  if [ "$left" -lt "$need" ]; then
    say "$name: skipped (${left}s left of the ${BUDGET}s budget, it needs ${need}s)"
    echo "$name skipped: ${left}s left of the ${BUDGET}s budget, needs ${need}s" >>"$WORK/status.txt"
    merge
    return
  fi
  t=$(( want < left ? want : left ))
  say "$name: up to ${t}s"
  local envs=()
  if [ "$DRY" = 1 ] && [ "$name" = kernels ]; then envs=(TRITON_INTERPRET=1); fi   # Triton kernels on the CPU
  env ${envs[@]+"${envs[@]}"} timeout -k 5 "$t" "$PY" bench/gpu_session.py "$name" --work "$WORK" --deadline $((now + t - 3)) \
    $DRYFLAG 2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  case $rc in
    0) status=ok ;;
    124|137) status="timed out after ${t}s (the figures it finished are kept)"; FAILED=1 ;;
    *) status="failed (exit $rc)"; FAILED=1 ;;
  esac
  echo "$name $status" >>"$WORK/status.txt"
  say "$name: $status after $(( $(date +%s) - now ))s"
  merge
}

run_section env 45 20
run_section kernels 75 30
run_section train64 130 60
run_section scan 60 20
run_section peers 60 30
run_section train128 150 60

TOTAL=$(( $(date +%s) - START ))
echo "session done in ${TOTAL}s of a ${BUDGET}s budget" >>"$WORK/status.txt"
merge
[ "$DRY" = 0 ] && nvidia-smi --query-gpu=clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv >>"$LOG" 2>&1
say "done in ${TOTAL}s; results in $OUT (results.json, summary.md, session.log)"
cat "$OUT/summary.md"
rm -rf "$WORK"
exit $FAILED
