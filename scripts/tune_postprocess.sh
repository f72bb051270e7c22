#!/usr/bin/env bash
# Choose a trained run's post-processing thresholds on its validation split, then score the
# validation and test splits once with them (issue 6: tune on val, never on test).
#
#   bash scripts/tune_postprocess.sh RUN_NAME [VAL [TEST]]    # VAL tnbc_val; TEST: VAL's set's _test
#
# Reads output/RUN_NAME/{config.yaml,model_final.pth} (what scripts/cpu_train_eval.sh trained).
# Writes results/postprocess_sweeps/RUN_NAME_VAL/{sweep.csv,best.json} and results/RUN_NAME_pp/
# (per data set metrics.json, per_image.csv, label_maps/ but kumar_val's; the config with the chosen thresholds;
# the evaluation log; the sweep's best.json as postprocess_sweep.json). PYTHON (.venv/bin/python),
# RUNS_DIR (output) and RESULTS_DIR (results) move the folders.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=$1; VAL=${2:-tnbc_val}; TEST=${3:-${VAL%_val}_test}
PYTHON=${PYTHON:-.venv/bin/python}
RUNS_DIR=${RUNS_DIR:-output}; RESULTS_DIR=${RESULTS_DIR:-results}
SRC=$RUNS_DIR/$RUN
for f in "$SRC/config.yaml" "$SRC/model_final.pth"; do
  [[ -f $f ]] || { echo "error: $f not found (train the run first: scripts/cpu_train_eval.sh)" >&2; exit 2; }
done
SWEEP=$RESULTS_DIR/postprocess_sweeps/${RUN}_$VAL
"$PYTHON" -m nucseg_d2.evaluation.postprocess_sweep --config-file "$SRC/config.yaml" \
  --weights "$SRC/model_final.pth" --dataset "$VAL" --output-dir "$SWEEP"
read -r -a overrides < <("$PYTHON" -c "import json, sys; print(json.load(open(sys.argv[1]))['overrides'])" \
  "$SWEEP/best.json")

# A fresh folder each time: Detectron2 appends to an existing log.txt.
EVAL=$RUNS_DIR/${RUN}_pp
rm -rf "$EVAL"
"$PYTHON" train_net.py --config-file "$SRC/config.yaml" --eval-only MODEL.WEIGHTS "$SRC/model_final.pth" \
  DATASETS.TEST "(\"$VAL\", \"$TEST\")" OUTPUT_DIR "$EVAL" "${overrides[@]}"
# Assembled beside the results folder and moved in whole, so an error leaves the old one as it was.
DEST=$RESULTS_DIR/${RUN}_pp
rm -rf "$DEST.partial"; mkdir -p "$DEST.partial"
cp -r "$EVAL/inference/$VAL" "$EVAL/inference/$TEST" "$DEST.partial/"
rm -rf "$DEST.partial/kumar_val/label_maps"  # as collect_results.sh: room in a Kumar device carry
find "$DEST.partial" -name label_maps.json -delete  # as collect_results.sh
cp "$EVAL/config.yaml" "$DEST.partial/config.yaml"
gzip -9 -n -c "$EVAL/log.txt" > "$DEST.partial/eval_log.txt.gz"  # compressed, as collect_results.sh keeps logs
cp "$SWEEP/best.json" "$DEST.partial/postprocess_sweep.json"
rm -rf "$DEST"; mv "$DEST.partial" "$DEST"
tuned_run="$RUN with thresholds chosen on $VAL=$DEST"
if [[ -f $RESULTS_DIR/$RUN/$TEST/per_image.csv ]]; then  # the run's own results, at the config's thresholds
  "$PYTHON" -m nucseg_d2.evaluation.results_table --dataset "$TEST" --run "$RUN=$RESULTS_DIR/$RUN" --run "$tuned_run"
else
  "$PYTHON" -m nucseg_d2.evaluation.results_table --dataset "$TEST" --run "$tuned_run"
fi
