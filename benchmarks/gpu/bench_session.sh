#!/usr/bin/env bash
# Prepared GPU session for the benchmark (issue 4), at most DEADLINE=300 s; run from the repo root:
#   1. effiseg-bench on the shipped default model: PyTorch FP32 eager (baseline) against the fast
#      torch path, batch 1/8/32, model-only + pure compute + end to end (SciPy labelling present),
#      with a time budget; the JSON is rewritten after every round, so a limit keeps finished rounds;
#   2. the operator profile (benchmarks/op_profile.py) at batch 32 and 1: why the fast mode gains
#      what it gains (TF32 in the baseline, per-category device time, launch-bound fraction);
#   3. the host-side pipeline profile on this machine's CPU (per stage, 1 vs 8 threads, and the
#      pipeline ceiling: run_folder with a backend that costs nothing), fill and drain with an
#      emulated device at 2 and 3 slots;
#   4. if time is left, end to end over a long folder (1024 images) at batch 8 and 32;
#   5. the thread probe (benchmarks/lab/thread_probe.py): what a fresh thread costs eager PyTorch on the
#      GPU, against the backend's long-lived device thread; then the GPU-marked tests;
#   6. everything in $OUT/bench_results.tgz (re-packed after every step) plus the log.
# Needs torch with CUDA, timm, safetensors, scipy, pillow, click, matplotlib (optional: plot), and
# the Kvasir-SEG test images under .carry/ (see benchmarks/gpu/README.md). DRY=1: a tiny CPU run
# of the same steps, to check the script before spending device time.
set -u
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
ROOT=$(pwd)
OUT=${OUT:-$ROOT/.gpu_out}
WORK=${WORK:-/tmp/effiseg_bench_gpu}
DATA=${DATA:-$ROOT/.carry/kvasir-seg}
# seconds after start by which everything is packed; a DRY run on a 2-core CPU needs ~150-250 s
DEADLINE=${DEADLINE:-$([ "${DRY:-0}" = 1 ] && echo 600 || echo 300)}
BENCH_BUDGET=${BENCH_BUDGET:-170}   # seconds for effiseg-bench (it stops between rounds)
CKPT=${CKPT:-$ROOT/training/weights/default}
SESSION=bench
. "$ROOT/benchmarks/gpu/session_clock.sh"   # the log, the clock (stamp, left), RES, pack

. "$ROOT/benchmarks/gpu/effiseg_site.sh"

DEV=cuda:0; BATCHES=1,8,32; ROUNDS=5; IMAGES=256; PROFILE_BATCHES=32,1; PROFILE_ITERS=20; HOST_THREADS=8
PROBE_IMAGES=32; PROBE_BATCH=8; PROBE_ROUNDS=3; FILL_SIZES=64,256; LONG_IMAGES=1024; LONG_BATCHES=8,32
EXTRA=(--min-time 0.4)
if [ "${DRY:-0}" = 1 ]; then
  DEV=cpu; BATCHES=1; ROUNDS=2; IMAGES=2; PROFILE_BATCHES=1; PROFILE_ITERS=1; HOST_THREADS=2
  PROBE_IMAGES=2; PROBE_BATCH=2; PROBE_ROUNDS=1; FILL_SIZES=4; LONG_IMAGES=4; LONG_BATCHES=2
  BENCH_BUDGET=${BENCH_BUDGET_DRY:-60}  # enough to open every configuration on a 2-core CPU
  EXTRA=(--iters 1 --warmup 1 --devices cpu --threads 1 --no-compute)
fi

stamp "environment"
nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap,clocks.max.sm --format=csv 2>&1 | tee "$RES/gpu.csv"
"$PY" -c "import json,platform,torch,scipy;print(json.dumps({'python':platform.python_version(),'torch':torch.__version__,'cuda':torch.version.cuda,'scipy':scipy.__version__,'cudnn_allow_tf32':torch.backends.cudnn.allow_tf32,'matmul_allow_tf32':torch.backends.cuda.matmul.allow_tf32,'gpu':torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}))" | tee "$RES/env.json"
pack

# effiseg-bench on the default model and the carried test images: bench LIMIT_S BUDGET_S OUTPUT_NAME ARGS...
bench() {
  local limit=$1 budget=$2 name=$3; shift 3
  timeout "$limit" "$PY" -c "from effiseg.benchmarks.cli import bench_command; bench_command()" \
    --checkpoint "$CKPT" --images-from "$DATA/test/images" --time-budget "$budget" \
    --output "$RES/$name" --cache-dir "$WORK/bench-cache" "$@" "${EXTRA[@]}"
}

stamp "effiseg-bench (budget ${BENCH_BUDGET}s)"
bench $((BENCH_BUDGET + 60)) "$BENCH_BUDGET" bench --backends torch-eager,torch-fast --batch-sizes "$BATCHES" \
  --mode both --rounds "$ROUNDS" --images "$IMAGES"
stamp "effiseg-bench exit $?"
pack

if [ "$(left)" -gt 40 ]; then
  stamp "operator profile, batches $PROFILE_BATCHES"
  timeout $(( $(left) - 30 )) "$PY" -m effiseg.benchmarks.op_profile --checkpoint "$CKPT" --device "$DEV" \
    --batch-sizes "$PROFILE_BATCHES" --iters "$PROFILE_ITERS" --output "$RES/op_profile" --cache-dir "$WORK/bench-cache"
  stamp "operator profile exit $?"
  pack
fi


if [ "$(left)" -gt 25 ]; then
  stamp "host profile (this machine's CPU)"
  timeout $(( $(left) - 15 )) "$PY" -m effiseg.benchmarks.host_profile --images "$DATA/test/images" --limit 100 \
    --threads "$HOST_THREADS" --output "$RES/host_profile.json"
  stamp "host profile exit $?"
  # The same on tmpfs: on the 2-core VM creating each mask file cost ~0.45 ms of kernel CPU on ext4
  # and 7 us on tmpfs, and decided the ceiling there (results/host-pipeline-2026-12-08/round4).
  if [ -d /dev/shm ] && [ -w /dev/shm ] && [ "$(left)" -gt 40 ]; then
    timeout $(( $(left) - 15 )) "$PY" -m effiseg.benchmarks.host_profile --images "$DATA/test/images" --limit 100 \
      --threads "$HOST_THREADS" --workdir /dev/shm --output "$RES/host_profile_tmpfs.json"
    stamp "host profile on tmpfs exit $?"
  fi
  # Issue 23 asks threads against worker processes with shared memory on many cores (threads won
  # on 2 cores, 0.62x for processes); the same lab comparison at HOST_THREADS workers per pool.
  if [ "$(left)" -gt 60 ]; then
    TMPDIR=$([ -w /dev/shm ] && echo /dev/shm || echo "${TMPDIR:-/tmp}") timeout $(( $(left) - 15 )) \
      "$PY" -m effiseg.benchmarks.lab.workers_ab --images "$DATA/test/images" --workers "$HOST_THREADS" \
      --rounds "$([ "${DRY:-0}" = 1 ] && echo 1 || echo 3)" --output "$RES/workers_ab_${HOST_THREADS}.json"
    stamp "threads against processes exit $?"
  fi
  # Fill and drain with an emulated 5 ms-per-image device, 2 slots against 3 (CPU only, ~10 s):
  # on the 2-core EPYC two slots left such a device idle ~10% of a batch-1 run (benchmarks/RESULTS.md).
  for S in 2 3; do
    [ "$(left)" -gt 20 ] || break
    timeout $(( $(left) - 10 )) "$PY" -m effiseg.benchmarks.host_profile --images "$DATA/test/images" --limit 100 \
      --device-ms 5 --batch 1 --folder-sizes "$FILL_SIZES" --slots $S --output "$RES/fill_drain_b1_5ms_${S}slots.json"
    stamp "fill and drain, $S slots, exit $?"
  done
  pack
fi

if [ "$(left)" -gt 120 ]; then
  # Long folders: end to end at batch 8 and 32 over LONG_IMAGES images (32 batches of 32), to set
  # against step 1's 256-image runs (8 batches of 32), whose fill and drain weigh on e2e/model
  # (0.77 at batch 32 on the H200; benchmarks/RESULTS.md). Not interleaved with step 1: compare the
  # two files with --compare, with that caveat. The bench adds the eager baseline (its end-to-end
  # runs take ~6 s each here), so the time budget may leave fewer than 3 rounds.
  stamp "effiseg-bench, end to end over $LONG_IMAGES images, batches $LONG_BATCHES"
  bench $(( $(left) - 20 )) $(( $(left) - 60 )) bench_long_folder --backends torch-fast \
    --batch-sizes "$LONG_BATCHES" --mode both --no-compute --rounds 3 --images "$LONG_IMAGES"
  stamp "effiseg-bench (long folder) exit $?"
  pack
fi

if [ "$(left)" -gt 70 ]; then
  # A fresh thread against the backend's device thread (runtime/device_thread.py): eager PyTorch on
  # the GPU, one batch of 8 and one 32-image segment() run each way, 3 interleaved rounds (~40 s).
  stamp "thread probe (eager fp32, batch 8)"
  timeout $(( $(left) - 30 )) "$PY" -m effiseg.benchmarks.lab.thread_probe --checkpoint "$CKPT" --device "$DEV" \
    --precision fp32 --images "$DATA/test/images" --limit "$PROBE_IMAGES" --batch "$PROBE_BATCH" \
    --rounds "$PROBE_ROUNDS" --output "$RES/thread_probe.json"
  stamp "thread probe exit $?"
  pack
fi

if [ "${DRY:-0}" != 1 ] && [ "$(left)" -gt 30 ]; then
  stamp "gpu tests"
  timeout $(( $(left) - 10 )) "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/runtime/test_runtime_pipeline.py \
    tests/runtime/test_run_cli.py tests/training/test_augment.py tests/benchmarks/test_bench.py 2>&1 | tail -25 | tee "$RES/gpu_tests.txt"
  stamp "gpu tests done"
  pack
fi
stamp "done"; ls -la "$OUT"
