#!/usr/bin/env bash
# Copy a run's evaluations and each defense's summary and losses (not its weights, not its model card) from a
# working --out of benchmarks/efficacy.py into the committed results, then pack them (evaluations.json.xz per cell,
# metrics.jsonl.xz per stage), and their answer-quality rows where the run scored them (--answer-quality):
# copy_run.sh RUN_DIR CELL VARIANT-SEED...
set -euo pipefail
run=$1; cell=$2; shift 2
dest=$(dirname "$0")/$cell
for name in "$@"; do
  if [ -d "$run/$cell/eval-$name" ]; then  # the runner's evaluation directory
    mkdir -p "$dest/eval-$name" && cp "$run/$cell/eval-$name/results.json" "$dest/eval-$name/"
  else
    cp "$run/$cell/eval-$name.json" "$dest/"
  fi
  mkdir -p "$dest/$name"
  cp "$run/$cell/$name/train_summary.json" "$run/$cell/$name/metrics.jsonl" "$dest/$name/"
done
if [ -f "$run/$cell/answer-quality.json" ]; then  # the rows of exactly these answers, not rescored
  names=$(IFS=,; echo "$*")
  python "$(dirname "$0")/../../answer_quality.py" --copy-from "$run/$cell" --cells "$dest" --models "$names" > /dev/null
fi
python "$(dirname "$0")/../../efficacy.py" --pack --report --out "$(dirname "$0")" > /dev/null
