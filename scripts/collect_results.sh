#!/usr/bin/env bash
# Keep what a training run produced, minus checkpoints, under results/<run-name>/ so anyone can
# regenerate the tables (python -m nucseg_d2.evaluation.results_table) and re-score the predicted
# label maps (nucseg-eval --dataset <set> --pred results/<run>/<set>/label_maps -o ...); kumar_val's
# label maps stay behind (see below).
#
#   bash scripts/collect_results.sh OUTPUT_DIR RUN_NAME      # a train_net.py OUTPUT_DIR
#   bash scripts/collect_results.sh OUT_FOLDER RUN_NAME      # what gpu_train_eval.sh left in $OUT
#   bash scripts/collect_results.sh OUT_FOLDER/NAME.tar RUN  # one run of gpu_timed_runs.sh
# RESULTS_DIR (default results/ of the repository) is where RUN_NAME/ goes.
#
# The folder is assembled as RUN_NAME.partial and moved into place whole, so an error or an
# interruption leaves an existing results/RUN_NAME as it was. Collecting the same run again (the
# same config.yaml) replaces its data-set folders and collected files (stale ones go) and keeps the
# files added beside them since (device_output.txt, test_eval_log.txt.gz). A RUN_NAME holding
# another run (another config.yaml, or none) is refused; FORCE=1 replaces it whole.
set -euo pipefail
SRC=$(realpath "$1"); RUN=$2
cd "$(dirname "$0")/.."
DEST=${RESULTS_DIR:-results}/$RUN
PARTIAL=$DEST.partial
unpacked=
trap 'rm -rf ${unpacked:+"$unpacked"} "$PARTIAL"' EXIT  # after a successful move PARTIAL is gone already
if [[ -f $SRC ]]; then
  unpacked=$(mktemp -d)
  tar -C "$unpacked" -xf "$SRC"; SRC=$unpacked
fi
# The run's log goes along as log.txt.gz: results_table --cost reads the timings from it, and it
# names the machine and the software the run had. Logs are kept gzip-compressed (zless reads them)
# because a GPU command carries the whole working tree, results/ included, within 64 MiB.
if [[ -f "$SRC/train_eval.log" ]]; then  # what a device script returned
  log=train_eval.log; training_metrics=training_metrics.json
else  # a train_net.py OUTPUT_DIR
  log=log.txt; training_metrics=metrics.json
fi
# A run interrupted before its evaluation has no inference/: say so instead of collecting half.
missing=()
[[ -f "$SRC/inference.tar" || -d "$SRC/inference" ]] || missing+=("inference/ (the evaluation)")
for name in "$training_metrics" "$log" config.yaml; do [[ -f "$SRC/$name" ]] || missing+=("$name"); done
if (( ${#missing[@]} )); then
  echo "error: $1 lacks ${missing[*]}; nothing collected into $DEST" >&2
  exit 1
fi
# Refused before anything is written: collecting another run over this one would lose it.
same_run=0
if [[ -e $DEST ]]; then
  if [[ -f $DEST/config.yaml ]] && cmp -s "$SRC/config.yaml" "$DEST/config.yaml"; then
    same_run=1
  elif [[ ${FORCE:-0} != 1 ]] && [[ ! -d $DEST || -n $(ls -A "$DEST") ]]; then
    if [[ -f $DEST/config.yaml ]]; then why="its config.yaml differs from $1's"; else why="it has no config.yaml"; fi
    echo "error: $DEST holds another run ($why); nothing collected (FORCE=1 replaces it)" >&2
    exit 1
  fi
fi
rm -rf "$PARTIAL"  # what an interrupted collection left
mkdir -p "$PARTIAL"
if [[ -f "$SRC/inference.tar" ]]; then
  tar -C "$PARTIAL" -xf "$SRC/inference.tar"
  cp -r "$PARTIAL"/inference/. "$PARTIAL"/
  rm -r "$PARTIAL/inference"
else
  cp -r "$SRC"/inference/. "$PARTIAL"/
fi
cp "$SRC/$training_metrics" "$PARTIAL/training_metrics.json"
gzip -9 -n -c "$SRC/$log" > "$PARTIAL/log.txt.gz"
cp "$SRC/config.yaml" "$PARTIAL/config.yaml"
find "$PARTIAL" -name '*.pth' -delete
find "$PARTIAL" -name label_maps.json -delete  # the evaluator's note of the maps it wrote, for its next run
# Kumar's validation label maps stay behind (metrics and per-image CSV are kept): a Kumar device
# command carries the tree beside 44.5 MiB of data, 64 MiB at most (docs/REPRODUCING.md).
rm -rf "$PARTIAL/kumar_val/label_maps"
if (( same_run )); then
  # Files put beside an earlier collection of this run come from nowhere else (the device's console,
  # cpu_train_eval.sh's test log). Data-set folders are not kept: the source has the current ones.
  # An uncompressed log.txt from an earlier collection would be read before log.txt.gz.
  for kept in "$DEST"/*; do
    name=$(basename "$kept")
    if [[ -f $kept && ! -L $kept && ! -e $PARTIAL/$name && $name != log.txt && $name != *.pth ]]; then
      cp -p "$kept" "$PARTIAL/"
    fi
  done
fi
# As scripts/tune_postprocess.sh: the old folder goes only once the new one is complete.
rm -rf "$DEST"; mv "$PARTIAL" "$DEST"
du -sh "$DEST"
