#!/usr/bin/env bash
# One prepared GPU session (run from the repo root on a CUDA machine; ~9 minutes on an H100):
#   1. the issue-5 protocol: every (arm, seed) trained at once on the one GPU, epochs chosen to fit
#      TRAIN_BUDGET seconds, then each run's best checkpoint scored under the inference candidates;
#   2. the GPU benchmarks: PyTorch FP32 eager (the baseline) against the fast torch path, model-only
#      and end to end through the double-buffered pipeline;
#   3. everything packed into $OUT (results.tgz, the checkpoints to ship split in 15 MB parts, the log).
# Needs: torch with CUDA, timm, safetensors, scipy, pillow, click, tqdm; the Lite2 weights wheel and
# the data under .carry/ (see benchmarks/gpu/README.md). DRY=1 runs a tiny version on the CPU.
set -u
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
ROOT=$(pwd)
OUT=${OUT:-$ROOT/.gpu_out}
WORK=${WORK:-/tmp/effiseg_gpu}
DATA=${DATA:-$ROOT/.carry/kvasir-seg}
TRAIN_BUDGET=${TRAIN_BUDGET:-290}
PARALLEL=${PARALLEL:-12}
SEEDS=${SEEDS:-0,1,2}
ARMS=${ARMS:-baseline,overlay_box,boundary_loss,overlay_box+boundary_loss}
DEADLINE=${DEADLINE:-570}          # seconds after start by which packing must begin
mkdir -p "$OUT" "$WORK"
exec > >(tee "$OUT/session.log") 2>&1
T0=$(date +%s)
elapsed() { echo $(( $(date +%s) - T0 )); }
stamp() { echo "[$(elapsed)s] $*"; }

# effiseg without pip: a namespace folder whose parts point at the repo's folders.
SITE=$WORK/site
mkdir -p "$SITE/effiseg"
for part in training export runtime benchmarks; do ln -sfn "$ROOT/$part" "$SITE/effiseg/$part"; done
if ls "$ROOT"/.carry/wheels/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$ROOT"/.carry/wheels/*.whl || exit 1
fi
export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
EXTRA=()
if [ "${DRY:-0}" = 1 ]; then
  EXTRA=(--extra=--limit-train --extra=16 --extra=--limit-val --extra=4 --extra=--limit-test --extra=4
         --extra=--device --extra=cpu --extra=--input-size --extra=64 --extra=--variant --extra=effisegnet-lite0)
  TRAIN_BUDGET=${TRAIN_BUDGET_DRY:-40}; PARALLEL=2; SEEDS=0,1; ARMS=baseline,overlay_box
fi

stamp "environment"
nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv 2>&1 | tee "$OUT/gpu.csv"
"$PY" - <<'PY' | tee "$WORK/env.json"
import json, platform, torch, timm
info = {"python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__,
        "cuda": torch.version.cuda, "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "capability": torch.cuda.get_device_capability(0) if torch.cuda.is_available() else None}
print(json.dumps(info))
PY

PROTO=$WORK/protocol
# Many training processes share the CPU cores: one thread each avoids oversubscription.
export OMP_NUM_THREADS=1
stamp "protocol: train (budget ${TRAIN_BUDGET}s, ${PARALLEL} at once)"
"$PY" -m effiseg.training.protocol train --data "$DATA" --out "$PROTO" --arms "$ARMS" --seeds "$SEEDS" \
  --time-budget "$TRAIN_BUDGET" --parallel "$PARALLEL" --min-epochs 1 --max-epochs 150 "${EXTRA[@]}"
stamp "protocol: train exit $?"

stamp "protocol: evaluate"
LIMIT=(); [ "${DRY:-0}" = 1 ] && LIMIT=(--limit 6)
"$PY" -m effiseg.training.protocol evaluate --data "$DATA" --out "$PROTO" --parallel 6 "${LIMIT[@]}"
stamp "protocol: evaluate exit $?"
"$PY" -m effiseg.training.protocol report --out "$PROTO" --n-boot 10000
stamp "protocol: report exit $?"

unset OMP_NUM_THREADS
# The checkpoint used for the speed measurements (timings do not depend on the weights).
CKPT=$PROTO/runs/baseline_s0/best.safetensors
BENCH=$WORK/bench
if [ -f "$CKPT" ] && [ "$(elapsed)" -lt $((DEADLINE - 90)) ]; then
  stamp "benchmarks"
  BARGS=(--backends torch-eager,torch-fast --batch-sizes 1,8,32 --mode both --rounds 2 --images 128
         --images-from "$DATA/test/images" --checkpoint "$CKPT" --output "$BENCH" --cache-dir "$WORK/bench-cache")
  [ "${DRY:-0}" = 1 ] && BARGS=(--backends torch-eager,torch-fast --batch-sizes 1 --mode both --rounds 1 --images 4
         --iters 2 --warmup 1 --images-from "$DATA/test/images" --checkpoint "$CKPT" --output "$BENCH" --cache-dir "$WORK/bench-cache")
  timeout $((DEADLINE - 60 - $(elapsed))) "$PY" -c "from effiseg.benchmarks.cli import bench_command; bench_command()" "${BARGS[@]}"
  stamp "benchmarks exit $?"
fi

# The GPU-marked tests (torch fast mode, CUDA pipeline): their first run on a GPU.
if [ "$(elapsed)" -lt $((DEADLINE - 45)) ]; then
  stamp "gpu tests"
  timeout $((DEADLINE - 15 - $(elapsed))) "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/test_runtime_pipeline.py tests/test_run_cli.py 2>&1 | tail -25 | tee "$WORK/gpu_tests.txt"
  stamp "gpu tests done"
fi

stamp "pack"
cd "$WORK"
# Small results: everything but checkpoints and resume states.
tar czf "$OUT/results.tgz" --exclude='*.safetensors' --exclude='*.pt' --exclude='*.onnx' protocol bench env.json gpu_tests.txt 2>/dev/null
SHIP=$("$PY" -c "import json;print(json.load(open('protocol/protocol_results.json'))['winner']['ship_run'])" 2>/dev/null || echo baseline_s0)
CK=()
for run in baseline_s0 "$SHIP"; do
  for f in best.safetensors best.json; do [ -f "protocol/runs/$run/$f" ] && CK+=("protocol/runs/$run/$f"); done
done
printf '%s\n' "${CK[@]}" | sort -u > ship_list.txt
tar cf - -T ship_list.txt | split -b 15m - "$OUT/checkpoints.tar.part-"
stamp "done; files:"; ls -la "$OUT"
