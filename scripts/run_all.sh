#!/usr/bin/env bash
# The whole CNN-vs-ViT comparison on BloodMNIST, one stage after another:
#   data (download; --from FILE imports one; offline, the embedded sample of real PBC
#   blood-cell images, or --synthetic data) -> train resnet18 and
#   vit -> evaluate both -> explain both (Grad-CAM, attention rollout; ROAD faithfulness) ->
#   aggregate -> HTML pages (report; the comparison page also writes where the two look,
#   side by side on the same cells, into OUT/maps/ as aggregate --maps does).
# Each stage's duration goes to logs/run_all_<time>.log; the first failure stops the script
# with that stage's exit code.
#
# Usage: scripts/run_all.sh [--reduced] [--from FILE] [--sample] [--synthetic] [--size N]
#                           [--root DIR] [--runs-dir DIR] [--out DIR] [-- extra train options]
# stdout: the comparison folder; the log names the runs and the data they trained on.
# Environment: MEDCLI, the command to run (default: medcli); MEDCLI_DATA, the default --root
# (else ~/.medmnist).
set -euo pipefail

REDUCED=""
FROM=""
SYNTHETIC=0
SAMPLE=0
SIZE=28
USER_HOME=${HOME:-$(echo ~)}  # unquoted ~ without HOME: bash reads the home from the password database
ROOT="${MEDCLI_DATA:-$USER_HOME/.medmnist}"
RUNS="runs"
OUT=""
EXTRA=()
need_value() {  # an option that takes a value must have one: a usage error (exit 2), not a shell one
  if [ $# -lt 2 ]; then echo "run_all.sh: $1 needs a value (see --help)" >&2; exit 2; fi
}
while [ $# -gt 0 ]; do
  case "$1" in
    --reduced) REDUCED="--reduced" ;;
    --from) need_value "$@"; FROM="$2"; shift ;;
    --synthetic) SYNTHETIC=1 ;;
    --sample) SAMPLE=1 ;;
    --size) need_value "$@"; SIZE="$2"; shift ;;
    --root) need_value "$@"; ROOT="$2"; shift ;;
    --runs-dir) need_value "$@"; RUNS="$2"; shift ;;
    --out) need_value "$@"; OUT="$2"; shift ;;
    --) shift; EXTRA=("$@"); break ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) echo "run_all.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
if [ "$SAMPLE" -eq 1 ] && [ -z "$FROM" ] && [ "$SYNTHETIC" -eq 0 ] && [ "$SIZE" != 28 ]; then
  echo "run_all.sh: --sample is the embedded 28-px sample; leave out --size $SIZE, or use --from FILE" >&2
  exit 2
fi

MEDCLI=${MEDCLI:-medcli}
STAMP=$(date +%Y%m%d-%H%M%S)
mkdir -p logs
LOG="logs/run_all_${STAMP}.log"
OUT=${OUT:-"$RUNS/comparison_${STAMP}"}

log() { printf '%s %s\n' "$(date '+%F %T')" "$*" | tee -a "$LOG" >&2; }

# stage NAME COMMAND...: run a stage, log its duration; on failure log and exit with its code.
# The stage's own results go to stderr: this script's stdout is only the comparison folder.
stage() {
  local name=$1; shift
  local start=$SECONDS rc=0
  log "start $name: $*"
  if [ -n "${STAGE_OUT:-}" ]; then "$@" > "$STAGE_OUT" || rc=$?; else "$@" >&2 || rc=$?; fi
  if [ "$rc" -ne 0 ]; then
    log "FAILED $name (exit $rc) after $((SECONDS - start)) s"
    exit "$rc"
  fi
  log "done $name in $((SECONDS - start)) s"
}

# capture VAR NAME COMMAND...: like stage, and keep the command's stdout (a run directory).
capture() {
  local var=$1 name=$2; shift 2
  local tmp; tmp=$(mktemp)
  STAGE_OUT=$tmp stage "$name" "$@"
  printf -v "$var" '%s' "$(tail -n 1 "$tmp")"
  rm -f "$tmp"
}

log "medcli run_all: log $LOG"
if [ -n "$FROM" ]; then
  stage data "$MEDCLI" download bloodmnist --size "$SIZE" --root "$ROOT" --from "$FROM" --allow-unofficial
elif [ "$SYNTHETIC" -eq 1 ]; then
  stage data "$MEDCLI" download bloodmnist --size "$SIZE" --root "$ROOT" --synthetic
  ROOT="$ROOT/synthetic"
elif [ "$SAMPLE" -eq 1 ]; then
  stage data "$MEDCLI" download bloodmnist --root "$ROOT" --sample
  ROOT="$ROOT/sample"
else
  rc=0
  "$MEDCLI" download bloodmnist --size "$SIZE" --root "$ROOT" >&2 || rc=$?
  if [ "$rc" -eq 1 ] && [ "$SIZE" = 28 ]; then
    log "the official BloodMNIST could not be downloaded: falling back to the embedded sample of real PBC"
    log "blood-cell images in $ROOT/sample (not the official split; numbers are not BloodMNIST results)"
    stage data "$MEDCLI" download bloodmnist --root "$ROOT" --sample
    ROOT="$ROOT/sample"
  elif [ "$rc" -eq 1 ]; then
    log "the official BloodMNIST at $SIZE px could not be downloaded: falling back to SYNTHETIC data"
    log "(numbers below are a demo of the pipeline, not BloodMNIST results; use --from FILE for real data)"
    stage data "$MEDCLI" download bloodmnist --size "$SIZE" --root "$ROOT" --synthetic
    ROOT="$ROOT/synthetic"
  elif [ "$rc" -ne 0 ]; then
    log "FAILED data (exit $rc)"
    exit "$rc"
  fi
fi

capture RUN_CNN train-resnet18 "$MEDCLI" train --model resnet18 --size "$SIZE" --root "$ROOT" --runs-dir "$RUNS" $REDUCED ${EXTRA[@]+"${EXTRA[@]}"}
capture RUN_VIT train-vit "$MEDCLI" train --model vit --size "$SIZE" --root "$ROOT" --runs-dir "$RUNS" $REDUCED ${EXTRA[@]+"${EXTRA[@]}"}
stage evaluate-resnet18 "$MEDCLI" evaluate "$RUN_CNN" --tta --calibrate
stage evaluate-vit "$MEDCLI" evaluate "$RUN_VIT" --tta --calibrate
stage explain-resnet18 "$MEDCLI" explain "$RUN_CNN" --method gradcam
stage explain-vit "$MEDCLI" explain "$RUN_VIT" --method rollout
stage aggregate "$MEDCLI" aggregate "$RUN_CNN" "$RUN_VIT" --out "$OUT" --format md
stage report-resnet18 "$MEDCLI" report "$RUN_CNN"
stage report-vit "$MEDCLI" report "$RUN_VIT"
stage report-comparison "$MEDCLI" report "$RUN_CNN" "$RUN_VIT" --out "$OUT"
log "all stages done; comparison in $OUT, runs $RUN_CNN and $RUN_VIT, trained on $ROOT"
echo "$OUT"
