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
set -euo pipefail
SRC=$(realpath "$1"); RUN=$2
cd "$(dirname "$0")/.."
DEST=${RESULTS_DIR:-results}/$RUN
if [[ -f $SRC ]]; then
  unpacked=$(mktemp -d); trap 'rm -rf "$unpacked"' EXIT
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
mkdir -p "$DEST"
if [[ -f "$SRC/inference.tar" ]]; then
  tar -C "$DEST" -xf "$SRC/inference.tar" && cp -r "$DEST"/inference/. "$DEST"/ && rm -r "$DEST/inference"
else
  cp -r "$SRC"/inference/. "$DEST"/
fi
cp "$SRC/$training_metrics" "$DEST/training_metrics.json"
gzip -9 -n -c "$SRC/$log" > "$DEST/log.txt.gz"
rm -f "$DEST/log.txt"  # an uncompressed log from an earlier collection would be read first
cp "$SRC/config.yaml" "$DEST/config.yaml"
find "$DEST" -name '*.pth' -delete
# Kumar's validation label maps stay behind (metrics and per-image CSV are kept): a Kumar device
# command carries the tree beside 44.5 MiB of data, 64 MiB at most (docs/REPRODUCING.md).
rm -rf "$DEST/kumar_val/label_maps"
du -sh "$DEST"
