#!/usr/bin/env bash
# Prepared GPU session for issue 24's GPU target, at most DEADLINE=240 s; run from the repo root:
#   effiseg-stream's path (runtime/stream.py: a paced clip, batch 1, frames dropped while the device is
#   busy, latency from the frame's arrival to its mask) on the GPU with the one-pass model, through
#   python -m effiseg.benchmarks.video_stream: 1,000 frames per rate (HoloHub's colonoscopy app
#   reports its percentiles over 1,000), at 30 fps (the target: p99 under 33 ms, no dropped frame) and
#   60 fps (headroom), for SD frames (720x576, an endoscopy capture card) and HD frames (1920x1080,
#   an HD scope processor); results/stream_*/stream_rates.json packed into $OUT/stream_results.tgz.
# The device has torch (CUDA) but neither onnxruntime-gpu nor TensorRT: the torch backend runs the
# shipped weights, carried in float16 (.carry/teacher, made by fill_carry.sh; the loader casts them
# back to float32) because the call's 64 MiB must also hold PyAV's wheel (.carry/stream). Before it:
#   bash benchmarks/gpu/fill_carry.sh; bash benchmarks/gpu/travel.sh slim
#   DRY=1 bash benchmarks/gpu/stream_session.sh      # the same steps, tiny, on the CPU (~1 min)
# then the call, carry [".carry/stream", ".carry/teacher"], timeout_s 300:
#   bash benchmarks/gpu/stream_session.sh
# and `bash benchmarks/gpu/travel.sh restore` here afterwards.
set -u
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
ROOT=$(pwd)
OUT=${OUT:-$ROOT/.gpu_out}
WORK=${WORK:-/tmp/effiseg_stream_gpu}
CARRY=${CARRY:-$ROOT/.carry/stream}
MODEL=${MODEL:-$ROOT/.carry/teacher/config.json}
DEADLINE=${DEADLINE:-240}
SESSION=stream
. "$ROOT/benchmarks/gpu/session_clock.sh"   # the log, the clock (stamp, left), RES, pack

. "$ROOT/benchmarks/gpu/effiseg_site.sh"
if ! "$PY" -c "import av" 2>/dev/null; then
  ls "$CARRY"/av-*.whl >/dev/null 2>&1 || { stamp "no PyAV here and no wheel in $CARRY (bash benchmarks/gpu/fill_carry.sh)"; exit 2; }
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "$CARRY"/av-*.whl || exit 2
fi
[ -f "$MODEL" ] || { stamp "no model at $MODEL (bash benchmarks/gpu/fill_carry.sh makes .carry/teacher)"; exit 2; }

BACKEND=torch; FRAMES=1000; RATES=30,60; SIZES=(720x576 1920x1080)
if [ "${DRY:-0}" = 1 ]; then
  FRAMES=12; RATES=2,3; SIZES=(720x576)
fi
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null || echo "no nvidia-smi"; } > "$RES/gpu.csv"
"$PY" -c "import sys, torch, av; print({'python': sys.version.split()[0], 'torch': torch.__version__, 'cuda': torch.version.cuda, 'av': av.__version__, 'gpu': torch.cuda.get_device_name(0) if torch.cuda.is_available() else None})" > "$RES/env.txt" 2>&1
cat "$RES/env.txt"

for SIZE in "${SIZES[@]}"; do
  [ "$(left)" -gt 30 ] || { stamp "out of time before $SIZE"; break; }
  stamp "stream at $SIZE, rates $RATES, $FRAMES frames each"
  timeout $(( $(left) - 10 )) "$PY" -m effiseg.benchmarks.video_stream --images "$CARRY/images" --model "$MODEL" \
    --backend "$BACKEND" --size "$SIZE" --frames "$FRAMES" --rates "$RATES" --out "$RES/stream_$SIZE"
  stamp "stream at $SIZE exit $?"
  pack
done
pack
stamp "done; files:"
ls -la "$OUT"
