#!/usr/bin/env bash
# Score a trained run on a split once per RPN proposal budget (the number of proposals kept per
# level before NMS and per image after it, MODEL.RPN.PRE_/POST_NMS_TOPK_TEST), to see whether the
# budget limits how many nuclei can be found. Any split but a test split: a budget is chosen on
# validation only (issue 6). The guard goes by name (a split with 'test' in it is refused), so a
# test set registered under another name is the caller's to keep out.
#
#   bash scripts/sweep_proposal_budget.sh RUN_NAME VAL BUDGET [BUDGET ...]
#   e.g. bash scripts/sweep_proposal_budget.sh kumar_ab3_cpu1100 kumar_val 2000 4000 6000
#
# Reads output/RUN_NAME/{config.yaml,model_final.pth} (what scripts/cpu_train_eval.sh trained).
# Writes results/proposal_budget/RUN_NAME_VAL/budget_B/ (VAL/metrics.json, VAL/per_image.csv,
# config.yaml, eval_log.txt.gz with the evaluator's inference time per image) and prints the
# table of all budgets against the first. PYTHON (.venv/bin/python), RUNS_DIR (output) and
# RESULTS_DIR (results) move the folders.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ $# -lt 3 ]]; then
  echo "usage: $0 RUN_NAME VAL BUDGET [BUDGET ...]" >&2
  exit 2
fi
RUN=$1; VAL=$2; shift 2
for name in "$RUN" "$VAL"; do  # both end up in paths that are replaced, and VAL in a config literal
  [[ $name =~ ^[A-Za-z0-9_.-]+$ && $name != .* ]] \
    || { echo "error: run and split names are letters, digits, '_', '.' and '-', got '$name'" >&2; exit 2; }
done
if [[ $VAL == *test* ]]; then
  echo "error: '$VAL' looks like a test split; the proposal budget is chosen on validation only" >&2
  exit 2
fi
for budget in "$@"; do
  [[ $budget =~ ^[1-9][0-9]*$ ]] || { echo "error: a budget is a positive whole number, got '$budget'" >&2; exit 2; }
done
PYTHON=${PYTHON:-.venv/bin/python}
RUNS_DIR=${RUNS_DIR:-output}; RESULTS_DIR=${RESULTS_DIR:-results}
SRC=$RUNS_DIR/$RUN
for f in "$SRC/config.yaml" "$SRC/model_final.pth"; do
  [[ -f $f ]] || { echo "error: $f not found (train the run first: scripts/cpu_train_eval.sh)" >&2; exit 2; }
done
table_runs=()
partial=""
trap 'if [[ -n $partial ]]; then rm -rf "$partial"; fi' EXIT  # a failed copy leaves no half folder
for budget in "$@"; do
  # A fresh folder each time: Detectron2 appends to an existing log.txt.
  EVAL=$RUNS_DIR/${RUN}_${VAL}_budget_$budget
  rm -rf "$EVAL"
  "$PYTHON" train_net.py --config-file "$SRC/config.yaml" --eval-only MODEL.WEIGHTS "$SRC/model_final.pth" \
    DATASETS.TEST "(\"$VAL\",)" MODEL.RPN.PRE_NMS_TOPK_TEST "$budget" MODEL.RPN.POST_NMS_TOPK_TEST "$budget" \
    OUTPUT_DIR "$EVAL"
  # Assembled beside the results folder and moved in whole, so an error leaves the old one as it was.
  DEST=$RESULTS_DIR/proposal_budget/${RUN}_$VAL/budget_$budget
  partial=$DEST.partial
  rm -rf "$partial"; mkdir -p "$partial/$VAL"
  cp "$EVAL/inference/$VAL/metrics.json" "$EVAL/inference/$VAL/per_image.csv" "$partial/$VAL/"
  cp "$EVAL/config.yaml" "$partial/config.yaml"
  gzip -9 -n -c "$EVAL/log.txt" > "$partial/eval_log.txt.gz"  # compressed, as collect_results.sh keeps logs
  rm -rf "$DEST"; mv "$partial" "$DEST"; partial=""
  grep -h "Total inference time" "$EVAL/log.txt" | sed "s/^/budget $budget: /" || true
  table_runs+=(--run "budget $budget=$DEST")
done
"$PYTHON" -m nucseg_d2.evaluation.results_table --dataset "$VAL" "${table_runs[@]}"
