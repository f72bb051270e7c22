#!/usr/bin/env bash
# The CPU route (no GPU): train CONFIG on this machine with a schedule of ITERS iterations
# (default 1,100: about 1 h for the baseline and 1.5-2 h for the proposed model on 2 cores),
# evaluating on the validation set every ITERS/4 iterations (the accuracy/iterations curve),
# then score the test set once, with the final weights, and keep all but checkpoints under
# results/RUN_NAME (scripts/collect_results.sh).
#
#   bash scripts/cpu_train_eval.sh CONFIG RUN_NAME [KEY VALUE ...]
#   e.g. bash scripts/cpu_train_eval.sh configs/tnbc.yaml tnbc_proposed_repro SEED 55304682
#
# Environment: ITERS (1100), VAL (tnbc_val), TEST (tnbc_test), PYTHON (.venv/bin/python),
# NUCSEG_DATASETS (where tnbc/ and kumar/ lie), RUNS_DIR (output), RESULTS_DIR (results), FORCE.
# A RESULTS_DIR/RUN_NAME holding another collected run (another config.yaml) is refused before
# training, as collect_results.sh would refuse it after; FORCE=1 replaces it.
# Run again after an interruption:
# training resumes from the last checkpoint with the config the run started with (its saved
# config.yaml, not CONFIG as it reads now), and a finished training goes straight to the test
# evaluation. A training stopped by SOLVER.NUCLEI.TIME_LIMIT_S short of ITERS is not finished: the
# script says so and stops before the test evaluation; run it again to continue.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ $# -lt 2 ]]; then
  echo "usage: $0 CONFIG RUN_NAME [KEY VALUE ...]" >&2
  exit 2
fi
CONFIG=$1; RUN=$2; shift 2
PYTHON=${PYTHON:-.venv/bin/python}
ITERS=${ITERS:-1100}; VAL=${VAL:-tnbc_val}; TEST=${TEST:-tnbc_test}
OUT=${RUNS_DIR:-output}/$RUN
DEST=${RESULTS_DIR:-results}/$RUN
if ! [[ $ITERS =~ ^[0-9]+$ ]] || (( ITERS < 12 )); then
  echo "ITERS must be a whole number >= 12 (the schedule needs warm-up, two lr steps and 4 evaluations), got '$ITERS'" >&2
  exit 2
fi
# The anchor run's schedule, scaled: warm-up 1/11, lr steps at 3/4 and 10/11, eval every 1/4.
WARMUP=$((ITERS / 11)); STEP1=$((ITERS * 3 / 4)); STEP2=$((ITERS * 10 / 11)); PERIOD=$((ITERS / 4))

# 1 + the last training iteration in the run's metrics.json (0 without one). Training rows only (with
# a total_loss): a final evaluation is logged under the number of iterations done, one past the last.
trained_iterations() {
  local last
  last=$(grep '"total_loss"' "$OUT/metrics.json" 2>/dev/null | grep -o '"iteration": [0-9]*' | awk '{print $2}' \
    | sort -n | tail -n 1 || true)
  echo $(( ${last:--1} + 1 ))
}

# Asked now, not after hours of training: collect_results.sh collects into DEST only the run
# already there (the same config.yaml), unless FORCE=1.
if [[ ${FORCE:-0} != 1 && -e $DEST ]] && [[ ! -d $DEST || -n $(ls -A "$DEST") ]] \
    && ! { [[ -f $OUT/config.yaml && -f $DEST/config.yaml ]] && cmp -s "$OUT/config.yaml" "$DEST/config.yaml"; }; then
  echo "error: $DEST holds another collected run (a published one?); give another RUN_NAME, or FORCE=1 to" \
    "replace it when this run is collected" >&2
  exit 2
fi

SECONDS=0
# A time limit before commit b4e0802 saved model_final before the schedule's end (now model_<iteration>):
# a model_final with a metrics.json that stops short of ITERS is resumed (without a metrics.json,
# weights put there by hand, it is used).
if [[ -f $OUT/model_final.pth ]] && { [[ ! -f $OUT/metrics.json ]] || (( $(trained_iterations) >= ITERS )); }; then
  echo "$OUT/model_final.pth exists: training is done (another RUN_NAME, or deleting $OUT, trains again)"
else
  RESUME=(); TRAIN_CONFIG=$CONFIG
  if [[ -f $OUT/last_checkpoint ]]; then
    # A default changed since the start (in CONFIG or a _BASE_ of it) would otherwise change the
    # run half-way; train_net saved the run's full config when it started.
    RESUME=(--resume); [[ -f $OUT/config.yaml ]] && TRAIN_CONFIG=$OUT/config.yaml
    # Another ITERS would rescale the lr steps half-way (a finished run would even restart at the
    # base lr): the run keeps the schedule it started with.
    scheduled=$(sed -n 's/^  MAX_ITER: \([0-9]*\)$/\1/p' "$OUT/config.yaml" 2>/dev/null | head -n 1 || true)
    if [[ -n $scheduled && $scheduled != "$ITERS" ]]; then
      echo "error: $OUT was started for $scheduled iterations; ITERS=$ITERS would change its schedule half-way" \
        "(ITERS=$scheduled continues it; another RUN_NAME trains anew)" >&2
      exit 2
    fi
  fi
  "$PYTHON" train_net.py --config-file "$TRAIN_CONFIG" ${RESUME[@]+"${RESUME[@]}"} \
    SOLVER.MAX_ITER "$ITERS" SOLVER.WARMUP_ITERS "$WARMUP" SOLVER.STEPS "($STEP1, $STEP2)" \
    SOLVER.CHECKPOINT_PERIOD "$PERIOD" TEST.EVAL_PERIOD "$PERIOD" DATASETS.TEST "(\"$VAL\",)" \
    DATALOADER.NUM_WORKERS 1 OUTPUT_DIR "$OUT" "$@"
  echo "phase train+validation: ${SECONDS} s"
  if (( $(trained_iterations) < ITERS )); then
    echo "$OUT: training stopped after $(trained_iterations) of $ITERS iterations (time limit): run the same" \
      "command again to continue; the test set is scored when the schedule is complete"
    exit 0
  fi
fi

SECONDS=0
# The saved config is the run's full config; only the data set and the weights change.
"$PYTHON" train_net.py --config-file "$OUT/config.yaml" --eval-only \
  MODEL.WEIGHTS "$OUT/model_final.pth" DATASETS.TEST "(\"$TEST\",)" OUTPUT_DIR "$OUT/test_eval"
echo "phase test evaluation: ${SECONDS} s"

mkdir -p "$OUT/inference"
rm -rf "${OUT:?}/inference/$TEST"
cp -r "$OUT/test_eval/inference/$TEST" "$OUT/inference/$TEST"
bash scripts/collect_results.sh "$OUT" "$RUN"
gzip -9 -n -c "$OUT/test_eval/log.txt" > "$DEST/test_eval_log.txt.gz"
rm -f "$DEST/test_eval_log.txt"  # an uncompressed log from an earlier run would be read first
"$PYTHON" -m nucseg_d2.evaluation.results_table --dataset "$VAL" --curve --run "$RUN=$DEST"
"$PYTHON" -m nucseg_d2.evaluation.results_table --dataset "$TEST" --run "$RUN=$DEST"
