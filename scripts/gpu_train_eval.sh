#!/usr/bin/env bash
# One device command: install detectron2 from the carried kit if needed, train CONFIG, evaluate on
# its test sets with the full metrics suite, and leave results under $OUT (at most 8 files).
#
#   bash scripts/gpu_train_eval.sh CONFIG RUN_NAME [KEY VALUE ...]
#
# Expects (docs/REPRODUCING.md): .device/kit (copy of shared/device-kit) and .device/data
# (tnbc/, kumar/ as in shared/data) carried beside the working tree. On a machine that already has
# detectron2 (this project's .venv) the kit is skipped, so the same script is tried on the CPU first:
#   OUT=/tmp/out PYTHON=.venv/bin/python NUCSEG_DATASETS=../shared/data \
#     bash scripts/gpu_train_eval.sh configs/tnbc.yaml cpu-check SOLVER.MAX_ITER 2 MODEL.DEVICE cpu
# Training stops by SOLVER.NUCLEI.TIME_LIMIT_S at DEADLINE_S (default 540) less EVAL_S (default 90)
# seconds after the start: EVAL_S covers what the time limit does not count (train_net's start-up:
# imports, model, data; the evaluation; the copies to $OUT), so that the files still come back
# inside one command's 10 minutes. A TIME_LIMIT_S among the options overrides it. A stop cuts
# the lr schedule short: gpu_timed_runs.sh sizes the schedule to the deadline instead.
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${1:?usage: gpu_train_eval.sh CONFIG RUN_NAME [KEY VALUE ...]}; RUN_NAME=${2:?usage: gpu_train_eval.sh CONFIG RUN_NAME [KEY VALUE ...]}; shift 2
OUT=${OUT:?set OUT to the folder whose files come back}
DEADLINE_S=${DEADLINE_S:-540}; EVAL_S=${EVAL_S:-90}
mkdir -p "$OUT"
source scripts/device_env.sh
use_detectron2
phase install
time_limit=$((DEADLINE_S - EVAL_S - $(elapsed)))
if (( time_limit < 1 )); then echo "error: no time left to train (DEADLINE_S=$DEADLINE_S, EVAL_S=$EVAL_S)" >&2; exit 2; fi
echo "SOLVER.NUCLEI.TIME_LIMIT_S $time_limit (unless the options set another)"

WORK=/tmp/nucseg_runs/$RUN_NAME
# A run of the same name before (the CPU check, a warm device) would leave its label maps in the
# tar and its lines in metrics.json, which Detectron2 appends to.
rm -rf "$WORK"
mkdir -p "$WORK"
status=0
"$PYTHON" train_net.py --config-file "$CONFIG" OUTPUT_DIR "$WORK" SOLVER.NUCLEI.TIME_LIMIT_S "$time_limit" "$@" > "$WORK/train_eval.log" 2>&1 || status=$?
grep -E "iter: |copypaste|Evaluation results|^error" "$WORK/train_eval.log" | cut -c1-220 | tail -n 60 || true
phase train_and_eval
if [[ $status -ne 0 ]]; then tail -n 40 "$WORK/train_eval.log"; tail -c 4000000 "$WORK/train_eval.log" > "$OUT/train_eval.log"; exit "$status"; fi

# What comes back: the config, the log, Detectron2's training metrics, and per test set its
# metrics.json, per_image.csv and predicted label maps (one tar, small uint16 PNGs).
cp "$WORK/config.yaml" "$OUT/config.yaml"
tail -c 4000000 "$WORK/train_eval.log" > "$OUT/train_eval.log"
cp "$WORK/metrics.json" "$OUT/training_metrics.json"
tar -C "$WORK" -cf "$OUT/inference.tar" inference
ls -la "$OUT"
phase collect
