#!/usr/bin/env bash
# Second, short GPU session: one baseline run alone on the GPU (no time-slicing with other runs),
# epochs chosen to fit TRAIN_BUDGET seconds; packs the run folder into $OUT.
set -u
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
ROOT=$(pwd); OUT=${OUT:-$ROOT/.gpu_out}; WORK=${WORK:-/tmp/effiseg_solo}; DATA=${DATA:-$ROOT/.carry/kvasir-seg}
TRAIN_BUDGET=${TRAIN_BUDGET:-175}
mkdir -p "$OUT" "$WORK/site/effiseg"
exec > >(tee "$OUT/solo.log") 2>&1
for part in training export runtime benchmarks; do ln -sfn "$ROOT/$part" "$WORK/site/effiseg/$part"; done
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" "$ROOT"/.carry/wheels/*.whl || exit 1
export PYTHONPATH=$WORK/site
timeout $((TRAIN_BUDGET + 30)) "$PY" -m effiseg.training.protocol train --data "$DATA" --out "$WORK/solo" --arms baseline \
  --seeds 0 --time-budget "$TRAIN_BUDGET" --parallel 1 --min-epochs 5 --max-epochs 150
echo "train exit $?"
cd "$WORK"
tar czf "$OUT/solo_results.tgz" --exclude='*.safetensors' --exclude='*.pt' solo
tar cf - solo/runs/baseline_s0/best.safetensors solo/runs/baseline_s0/best.json | split -b 15m - "$OUT/solo_ckpt.tar.part-"
ls -la "$OUT"
