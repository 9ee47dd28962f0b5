#!/usr/bin/env bash
# Prepared GPU session for the issue-5 protocol (run from the repo root on a CUDA machine):
#   train:    every (arm, seed) trained at once on the one GPU, for EPOCHS epochs (or epochs chosen
#             to fit TRAIN_BUDGET seconds by a calibration, which costs ~90 s of its own);
#   evaluate: each run's best-on-validation checkpoint scored under the inference candidates;
#   report:   the protocol report (choices on validation, seed-paired bootstrap intervals);
#   pack:     results.tgz and the checkpoints to ship (split in 15 MB parts) into $OUT.
# PHASES picks the steps (default: all four), so that one session can train in one device call and
# evaluate in the next (WORK is inside the repo's git-ignored .gpu_work/, which stays on a warm
# machine between calls). The GPU benchmark has its own script: benchmarks/gpu/bench_session.sh.
# Needs: torch with CUDA, timm, safetensors, scipy, pillow, click, tqdm; the Lite2 weights wheel and
# the data under .carry/ (see benchmarks/gpu/README.md). DRY=1 runs a tiny version on the CPU.
set -u
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
ROOT=$(pwd)
OUT=${OUT:-$ROOT/.gpu_out}
WORK=${WORK:-$ROOT/.gpu_work}
DATA=${DATA:-$ROOT/.carry/kvasir-seg}
TRAIN_BUDGET=${TRAIN_BUDGET:-290}
PARALLEL=${PARALLEL:-12}
SEEDS=${SEEDS:-0,1,2}
ARMS=${ARMS:-baseline,overlay_box,boundary_loss,overlay_box+boundary_loss}
EPOCHS=${EPOCHS:-}                  # fixed epochs for every run; empty: chosen from TRAIN_BUDGET
PHASES=${PHASES:-train,evaluate,report,pack}
DEADLINE=${DEADLINE:-570}           # seconds after start by which packing must begin (one call <= 600 s)
has_phase() { case ",$PHASES," in *",$1,"*) return 0;; esac; return 1; }
mkdir -p "$OUT" "$WORK"
exec > >(tee -a "$OUT/session.log") 2>&1
T0=$(date +%s)
elapsed() { echo $(( $(date +%s) - T0 )); }
stamp() { echo "[$(elapsed)s] $*"; }

. "$ROOT/benchmarks/gpu/effiseg_site.sh"
if ls "$ROOT"/.carry/wheels/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$ROOT"/.carry/wheels/*.whl || exit 1
fi
EXTRA=()
DEVICES=${DEVICES:-auto}   # the protocol's --devices: auto = every visible GPU
if [ "${DRY:-0}" = 1 ]; then
  EXTRA=(--extra=--limit-train --extra=16 --extra=--limit-val --extra=4 --extra=--limit-test --extra=4
         --extra=--input-size --extra=64 --extra=--variant --extra=effisegnet-lite0)
  DEVICES=cpu
  TRAIN_BUDGET=${TRAIN_BUDGET_DRY:-40}; PARALLEL=2; SEEDS=0,1; ARMS=baseline,overlay_box
  [ -n "$EPOCHS" ] && EPOCHS=2
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
if has_phase train; then
  # Many training processes share the CPU cores: one thread each avoids oversubscription.
  export OMP_NUM_THREADS=1
  if [ -n "$EPOCHS" ]; then
    stamp "protocol: train ($EPOCHS epochs, ${PARALLEL} at once, arms $ARMS, seeds $SEEDS)"
    EPOCH_ARGS=(--epochs "$EPOCHS")
  else
    stamp "protocol: train (budget ${TRAIN_BUDGET}s, ${PARALLEL} at once, arms $ARMS, seeds $SEEDS)"
    EPOCH_ARGS=(--time-budget "$TRAIN_BUDGET" --min-epochs 1 --max-epochs 150)
  fi
  # Killed at the deadline if slower than planned: then evaluate/report/pack still run, on each run's
  # best checkpoint so far (the log and plan.json say so), instead of losing the whole call.
  # 120 s: evaluating every run took ~40 s for 12 runs with plain + flip inference on the H100; the
  # multi-scale candidate (352+416 with flips) adds ~1.9x those passes.
  RESERVE=0; has_phase evaluate && RESERVE=120
  timeout $(( DEADLINE - RESERVE - $(elapsed) )) "$PY" -m effiseg.training.protocol train --data "$DATA" \
    --out "$PROTO" --arms "$ARMS" --seeds "$SEEDS" --parallel "$PARALLEL" --devices "$DEVICES" "${EPOCH_ARGS[@]}" "${EXTRA[@]}"
  stamp "protocol: train exit $? (124: stopped at the deadline)"
  unset OMP_NUM_THREADS
fi

if has_phase evaluate; then
  stamp "protocol: evaluate"
  LIMIT=(); [ "${DRY:-0}" = 1 ] && LIMIT=(--limit 6)
  timeout $(( DEADLINE - 15 - $(elapsed) )) "$PY" -m effiseg.training.protocol evaluate --data "$DATA" \
    --out "$PROTO" --parallel 6 --devices "$DEVICES" "${LIMIT[@]}"
  stamp "protocol: evaluate exit $?"
fi
if has_phase report; then
  "$PY" -m effiseg.training.protocol report --out "$PROTO" --n-boot 10000
  stamp "protocol: report exit $?"
fi

if has_phase pack; then
  stamp "pack"
  cd "$WORK"
  # Small results: everything but checkpoints and resume states.
  tar czf "$OUT/results.tgz" --exclude='*.safetensors' --exclude='*.pt' --exclude='*.onnx' protocol env.json 2>/dev/null
  SHIP=$("$PY" -c "import json;print(json.load(open('protocol/protocol_results.json'))['winner']['ship_run'])" 2>/dev/null || echo baseline_s0)
  CK=()
  for run in baseline_s0 "$SHIP"; do
    for f in best.safetensors best.json; do [ -f "protocol/runs/$run/$f" ] && CK+=("protocol/runs/$run/$f"); done
  done
  printf '%s\n' "${CK[@]}" | sort -u > ship_list.txt
  tar cf - -T ship_list.txt | split -b 15m - "$OUT/checkpoints.tar.part-"
  stamp "done; files:"; ls -la "$OUT"
fi
