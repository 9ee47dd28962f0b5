#!/usr/bin/env bash
# Issue 20, parts 1-2, in ONE device call of <= 10 minutes (run from the repo root on a CUDA machine):
#   1. python -m effiseg.benchmarks.train_speed: the eager train step against the CUDA-graph step,
#      effisegnet-lite2 at 352, batch 8, 1/3/6 runs at once in one process and in separate processes;
#   2. 3 seeds of effisegnet-lite2 at 352 trained with the fast trainer, the paper's recipe, for as
#      many epochs as fit before DEADLINE (at most 300; epochs from step 1's measured speed, the cosine
#      schedule over those epochs), stopping early if validation Dice plateaus (PATIENCE epochs);
#      the runs share the GPU the way step 1 found faster (one process, a stream each, or 3 processes);
#   3. $OUT: train_session.log, train_results.tgz (train_speed, every run's metrics/config/log, no
#      checkpoints), and the 3 best-on-validation checkpoints in 15 MB parts (train_ckpt.tar.part-*).
# The test split is scored later, on the CPU (benchmarks/gpu/README.md, "issue 20"). Needs torch with
# CUDA, timm, safetensors, pillow, click, tqdm; .carry/kvasir-seg (train + validation) and the Lite2
# weights wheel in .carry/wheels (fill_carry.sh). DRY=1: the same steps, tiny, on the CPU.
set -u
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
ROOT=$(pwd)
OUT=${OUT:-$ROOT/.gpu_out}
WORK=${WORK:-$ROOT/.gpu_work/i20}
DATA=${DATA:-$ROOT/.carry/kvasir-seg}
DEADLINE=${DEADLINE:-570}          # seconds after start by which everything is packed (one call <= 600 s)
SPEED_BUDGET=${SPEED_BUDGET:-150}  # seconds for train_speed
SEEDS=${SEEDS:-0,1,2}
MAX_EPOCHS=${MAX_EPOCHS:-300}      # the paper's
PATIENCE=${PATIENCE:-40}           # plateau stop: no validation gain for this many epochs
SAVE_EVERY=${SAVE_EVERY:-25}       # last.* + resume state every N epochs (best.* whenever it improves)
HOST_S_PER_EPOCH=${HOST_S_PER_EPOCH:-0.25}  # per run and epoch: validation, best checkpoint, metrics files
WAY=${WAY:-}                       # in-process | processes; empty: the faster in train_speed
START_S=${START_S:-45}             # process start, data decode, model build, graph capture
PACK_S=${PACK_S:-25}
mkdir -p "$OUT" "$WORK"
exec > >(tee "$OUT/train_session.log") 2>&1
T0=$(date +%s)
elapsed() { echo $(( $(date +%s) - T0 )); }
stamp() { echo "[$(elapsed)s] $*"; }
left() { echo $(( DEADLINE - $(elapsed) )); }
RES=$WORK/results
PROTO=$RES/protocol                # the protocol's layout: evaluate and report run on it later, on the CPU
rm -rf "$RES"; mkdir -p "$PROTO/runs" "$PROTO/logs"
pack() {
  tar czf "$OUT/train_results.tgz.tmp" -C "$WORK" --exclude='*.safetensors' --exclude='*.pt' --exclude='*.tmp' results \
    && mv "$OUT/train_results.tgz.tmp" "$OUT/train_results.tgz"
}

. "$ROOT/benchmarks/gpu/effiseg_site.sh"
if ls "$ROOT"/.carry/wheels/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$ROOT"/.carry/wheels/*.whl || exit 1
fi

DEV=cuda:0; VARIANT=effisegnet-lite2; SIZE=352; N_TRAIN=800
SPEED=(--steps 25 --warmup 1 --rounds 3 --runs 1,3,6 --no-eager-in-process)
TIMED=graph                        # the fast mode train_speed times (and the runs train with)
TRAIN_EXTRA=()
if [ "${DRY:-0}" = 1 ]; then
  DEV=cpu; VARIANT=effisegnet-lite0; SIZE=64; N_TRAIN=16; MAX_EPOCHS=${DRY_EPOCHS:-3}; SAVE_EVERY=2; START_S=20
  SPEED=(--steps 4 --warmup 1 --rounds 1 --runs 1,3 --no-eager-in-process); TIMED=fast
  TRAIN_EXTRA=(--limit-train 16 --limit-val 4 --no-pretrained --step fast)  # the last --step counts
  DEADLINE=${DRY_DEADLINE:-600}; SPEED_BUDGET=240
fi

stamp "environment"
nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap,clocks.max.sm --format=csv 2>&1 | tee "$RES/gpu.csv"
"$PY" -c "import json,platform,torch;print(json.dumps({'python':platform.python_version(),'torch':torch.__version__,'cuda':torch.version.cuda,'gpu':torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,'capability':torch.cuda.get_device_capability(0) if torch.cuda.is_available() else None}))" | tee "$RES/env.json"
pack

# The graph step against the eager one on this GPU (tests/training/test_fast_step.py, gpu-marked, ~30 s). If it
# fails, the runs train with the fast step uncaptured (--step fast) rather than losing the call.
STEP=auto
if [ "${DRY:-0}" != 1 ]; then
  stamp "gpu tests of the fast step"
  EFFISEG_DATA=$DATA timeout 120 "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/training/test_fast_step.py 2>&1 | tail -8 | tee "$RES/gpu_tests.txt"
  SUMMARY=$(tail -n 1 "$RES/gpu_tests.txt")   # pytest's last line: "2 passed, 16 deselected in ..."
  case "$SUMMARY" in *failed*|*error*|*"no tests ran"*) STEP=fast;; *passed*) ;; *) STEP=fast;; esac
  [ "$STEP" = fast ] && TIMED=fast
  stamp "gpu tests done; training step: $STEP"
fi

if [ "$SPEED_BUDGET" -gt 0 ]; then
  stamp "train_speed (budget ${SPEED_BUDGET}s)"
  timeout "$SPEED_BUDGET" "$PY" -m effiseg.benchmarks.train_speed --device "$DEV" --variant "$VARIANT" --input-size "$SIZE" \
    --batch-size 8 --modes "eager,$TIMED" "${SPEED[@]}" --output "$RES/train_speed"
  stamp "train_speed exit $? (124: cut at its budget; the configurations measured before are in its JSON)"
  pack
fi

# Epochs that fit, from the measured aggregate speed of 3 fast runs (the faster way, unless WAY is
# set); the targets (1500 images/s for 3 runs) when the benchmark gave nothing. One epoch of all
# runs = their images at that speed + each run's end of epoch (counted in full, although it overlaps
# the other runs' training).
N_SEEDS=$(echo "$SEEDS" | tr ',' '\n' | grep -c .)
TRAIN_S=$(( $(left) - START_S - PACK_S ))
read -r WAY AGG3 EPOCHS < <("$PY" - "$RES/train_speed/train_speed.json" "$WAY" "$N_SEEDS" "$N_TRAIN" \
    "$HOST_S_PER_EPOCH" "$TRAIN_S" "$MAX_EPOCHS" "$TIMED" <<'PY'
import json, sys
path, way, n_runs, n_train, host_s, train_s, max_epochs, timed = sys.argv[1:]
n_runs, n_train, host_s, train_s, max_epochs = int(n_runs), int(n_train), float(host_s), float(train_s), int(max_epochs)
try:
    rows = json.load(open(path))["results"]
except (OSError, ValueError, KeyError):
    rows = []
fast = [r for r in rows if r["mode"] == timed and r["runs"] == n_runs and (not way or r["concurrency"] == way)]
best = max(fast, key=lambda r: r["aggregate_images_per_s"], default=None)
way, aggregate = (way or "in-process", 1500.0) if best is None else (best["concurrency"], best["aggregate_images_per_s"])
epoch_s = n_runs * n_train / aggregate + n_runs * host_s
print(way, round(aggregate, 1), max(1, min(max_epochs, int(train_s / epoch_s))))
PY
)
stamp "$N_SEEDS runs at once: ${AGG3} images/s in all ($WAY); ${TRAIN_S}s to train -> $EPOCHS epochs (at most $MAX_EPOCHS)"
"$PY" -c "import json,sys; json.dump({'variant': '$VARIANT', 'input_size': $SIZE, 'arms': {'baseline': []}, 'seeds': [int(s) for s in '$SEEDS'.split(',')], 'epochs': $EPOCHS, 'parallel': $N_SEEDS, 'way': '$WAY', 'aggregate_images_per_s_planned': $AGG3, 'plateau_patience': $PATIENCE, 'train_step': '$STEP'}, open('$PROTO/plan.json', 'w'), indent=2)"

TRAIN=("$PY" -c "from effiseg.training.cli import train_command; train_command()")
COMMON=(--data "$DATA" --variant "$VARIANT" --input-size "$SIZE" --epochs "$EPOCHS" --no-progress --no-test
        --plateau-patience "$PATIENCE" --set "save_every=$SAVE_EVERY" --device "$DEV" --step "$STEP" "${TRAIN_EXTRA[@]}")
# Several training processes share the CPU cores: one thread each (the GPU does the work).
export OMP_NUM_THREADS=1
# Cut at the deadline if slower than planned: each run's best checkpoint so far and its metrics stay.
if [ "$WAY" = processes ]; then
  stamp "training seeds $SEEDS, one process each"
  PIDS=()
  for S in $(echo "$SEEDS" | tr ',' ' '); do
    timeout $(( $(left) - PACK_S )) "${TRAIN[@]}" "${COMMON[@]}" --seed "$S" \
      --output "$PROTO/runs/baseline_s$S" > "$PROTO/logs/baseline_s$S.log" 2>&1 &
    PIDS+=($!)
  done
  RC=0   # waited for by id: a bare wait would also wait for the log's tee, which never ends
  for P in "${PIDS[@]}"; do wait "$P" || RC=$?; done
else
  stamp "training seeds $SEEDS in one process (a CUDA stream each)"
  timeout $(( $(left) - PACK_S )) "${TRAIN[@]}" "${COMMON[@]}" --seeds "$SEEDS" \
    --output "$PROTO/runs/baseline_s{seed}" > "$PROTO/logs/train.log" 2>&1
  RC=$?
fi
stamp "training done (exit $RC; 124: cut at the deadline)"
tail -n 4 "$PROTO"/logs/*.log
pack

stamp "pack checkpoints"
cd "$WORK"
ls results/protocol/runs/*/best.safetensors results/protocol/runs/*/best.json 2>/dev/null > ckpt_list.txt
[ -s ckpt_list.txt ] && tar cf - -T ckpt_list.txt | split -b 15m - "$OUT/train_ckpt.tar.part-"
stamp "done; files:"; ls -la "$OUT"
