#!/usr/bin/env bash
# Choose a trained run's post-processing thresholds on its validation split, then score the
# validation and test splits once with them (issue 6: tune on val, never on test).
#
#   bash scripts/tune_postprocess.sh RUN_NAME [VAL [TEST]]      # defaults tnbc_val tnbc_test
#
# Reads output/RUN_NAME/{config.yaml,model_final.pth} (what scripts/cpu_train_eval.sh trained).
# Writes results/postprocess_sweeps/RUN_NAME_VAL/{sweep.csv,best.json} and results/RUN_NAME_pp/
# (per data set metrics.json, per_image.csv, label_maps/; the config with the chosen thresholds;
# the evaluation log; the sweep's best.json as postprocess_sweep.json). PYTHON (.venv/bin/python),
# RUNS_DIR (output) and RESULTS_DIR (results) move the folders.
# A sweep newer than the weights is reused.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=$1; VAL=${2:-tnbc_val}; TEST=${3:-tnbc_test}
PYTHON=${PYTHON:-.venv/bin/python}
RUNS_DIR=${RUNS_DIR:-output}; RESULTS_DIR=${RESULTS_DIR:-results}
SRC=$RUNS_DIR/$RUN
for f in "$SRC/config.yaml" "$SRC/model_final.pth"; do
  [[ -f $f ]] || { echo "error: $f not found (train the run first: scripts/cpu_train_eval.sh)" >&2; exit 2; }
done
SWEEP=$RESULTS_DIR/postprocess_sweeps/${RUN}_$VAL
if [[ -f $SWEEP/best.json && $SWEEP/best.json -nt $SRC/model_final.pth ]]; then
  echo "$SWEEP/best.json is newer than the weights: the sweep is not repeated"
else
  "$PYTHON" -m nucseg_d2.evaluation.postprocess_sweep --config-file "$SRC/config.yaml" \
    --weights "$SRC/model_final.pth" --dataset "$VAL" --output-dir "$SWEEP"
fi
read -r -a overrides < <("$PYTHON" -c "import json, sys; print(json.load(open(sys.argv[1]))['overrides'])" \
  "$SWEEP/best.json")

EVAL=$RUNS_DIR/${RUN}_pp
"$PYTHON" train_net.py --config-file "$SRC/config.yaml" --eval-only MODEL.WEIGHTS "$SRC/model_final.pth" \
  DATASETS.TEST "(\"$VAL\", \"$TEST\")" OUTPUT_DIR "$EVAL" "${overrides[@]}"
DEST=$RESULTS_DIR/${RUN}_pp
rm -rf "$DEST"; mkdir -p "$DEST"
cp -r "$EVAL/inference/$VAL" "$EVAL/inference/$TEST" "$DEST/"
cp "$EVAL/config.yaml" "$DEST/config.yaml"
cp "$EVAL/log.txt" "$DEST/eval_log.txt"
cp "$SWEEP/best.json" "$DEST/postprocess_sweep.json"
"$PYTHON" -m nucseg_d2.evaluation.results_table --dataset "$TEST" --run "$RUN=$RESULTS_DIR/$RUN" \
  --run "$RUN with thresholds chosen on $VAL=$DEST"
