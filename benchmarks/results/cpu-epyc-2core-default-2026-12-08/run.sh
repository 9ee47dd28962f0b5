#!/usr/bin/env bash
# effiseg-run with the defaults (and ONNX Runtime, and --workers 1) over the 100 Kvasir-SEG test images,
# the session's start (0064b4c, a worktree with its own editable install) against the head, interleaved,
# 3 rounds, each run under /usr/bin/time -v; then one score per configuration.
# Usage: run.sh BASE_VENV HEAD_VENV DATA OUT
set -euo pipefail
BASE=$1 HEAD=$2 DATA=$3 OUT=$4
mkdir -p "$OUT"
for round in 1 2 3; do
  for side in base head; do
    venv=$BASE; [ $side = head ] && venv=$HEAD
    for cfg in defaults ort workers1; do
      extra=""
      [ $cfg = ort ] && extra="--backend onnxruntime"
      [ $cfg = workers1 ] && extra="--workers 1"
      masks=/tmp/effiseg-masks-$side-$cfg
      rm -rf "$masks"
      /usr/bin/time -v "$venv/bin/effiseg-run" --input "$DATA/test/images" --output "$masks" --no-progress $extra \
        > "$OUT/$side-$cfg-r$round.log" 2>&1
      if [ $round = 1 ]; then
        "$HEAD/bin/effiseg-score" "$masks" --data "$DATA" --split test --output "$OUT/$side-$cfg.score.json" > /dev/null 2>&1 || true
      fi
    done
  done
done
