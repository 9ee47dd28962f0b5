#!/usr/bin/env bash
# The pipeline's host side, two revisions side by side on this machine: BASE (any git revision)
# against the working tree. Each round runs `python -m effiseg.benchmarks.host_profile --threads 2`
# (per-stage cost, thread scaling and the pipeline ceiling) for both, in fresh processes and
# alternating order, once with SciPy importable and once with it hidden (the runtime's region count
# has a path for each; an inference install has no SciPy unless the user adds it).
#
#   bash benchmarks/lab/host_ab.sh BASE IMAGES_DIR OUT_DIR [ROUNDS]
#
# Writes OUT_DIR/{base,head}-{scipy,numpy}-ROUND.json, meta.json (revisions, machine) and
# summary.json (medians over rounds, and the head/base ratio of the pipeline ceiling paired round by
# round). Linux/macOS shell; the tools it times are the same on Windows.
set -eu
[ $# -ge 3 ] || { echo "usage: bash benchmarks/lab/host_ab.sh BASE IMAGES_DIR OUT_DIR [ROUNDS]" >&2; exit 2; }
BASE=$1; IMAGES=$(cd "$2" && pwd); OUT=$3; ROUNDS=${4:-5}; THREADS=${THREADS:-2}; LABELLINGS=${LABELLINGS:-scipy numpy}
PY=${PYTHON:-python}
[ "$THREADS" -ge 2 ] || { echo "THREADS must be 2 or more (1 thread is always measured)" >&2; exit 2; }
ROOT=$(cd "$(dirname "$0")" && git rev-parse --show-toplevel)
# Both sides must have the pipeline ceiling (a97d860 and later), or the summary has nothing to pair.
git -C "$ROOT" show "$BASE:benchmarks/host_profile.py" 2>/dev/null | grep -q "def pipeline_ceiling" || {
  echo "BASE $BASE has no benchmarks/host_profile.py with the pipeline ceiling (added in a97d860)" >&2; exit 2; }
WORK=$(mktemp -d)
trap 'git -C "$ROOT" worktree remove --force "$WORK/base" 2>/dev/null || true; rm -rf "$WORK"' EXIT
git -C "$ROOT" worktree add -q --detach "$WORK/base" "$BASE"
# effiseg from each tree through PYTHONPATH (a namespace folder of symlinks, as the GPU scripts do).
for side in base head; do
  src=$ROOT; [ "$side" = base ] && src=$WORK/base
  mkdir -p "$WORK/site_$side/effiseg"
  for part in training export runtime benchmarks; do ln -sfn "$src/$part" "$WORK/site_$side/effiseg/$part"; done
done
mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
PYTHONPATH="$WORK/site_head" "$PY" - "$OUT/meta.json" "$(git -C "$ROOT" rev-parse "$BASE")" "$(git -C "$ROOT" rev-parse HEAD)" \
  "$(git -C "$ROOT" status --porcelain | wc -l)" "$ROUNDS" "$THREADS" <<'EOF'
import json, os, platform, sys
from effiseg.benchmarks.machine import cpu_model, load_average
path, base, head, dirty, rounds, threads = sys.argv[1:]
json.dump({"base": base, "head": head, "head_uncommitted_files": int(dirty), "rounds": int(rounds),
           "threads": int(threads), "cpu": cpu_model(), "cpus": os.cpu_count(), "python": platform.python_version(),
           "load_average_at_start": load_average()}, open(path, "w"), indent=2)
EOF
for r in $(seq 1 "$ROUNDS"); do
  for labelling in $LABELLINGS; do
    for side in base head; do
      hide=""; [ "$labelling" = numpy ] && hide="sys.modules['scipy'] = None;"
      echo "round $r/$ROUNDS: $side, $labelling labelling" >&2
      (cd "$WORK" && PYTHONPATH="$WORK/site_$side" "$PY" -c "import runpy, sys; $hide
sys.argv = ['host_profile', '--images', sys.argv[1], '--limit', '100', '--threads', sys.argv[2], '--output', sys.argv[3]]
runpy.run_module('effiseg.benchmarks.host_profile', run_name='__main__')" \
        "$IMAGES" "$THREADS" "$OUT/$side-$labelling-$r.json" > /dev/null)
    done
  done
done
"$PY" - "$OUT" "$ROUNDS" "$THREADS" $LABELLINGS <<'EOF'
import json, statistics, sys
from pathlib import Path
out, rounds, threads, labellings = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4:]
load = lambda name: json.loads((out / name).read_text())
summary = {}
for labelling in labellings:
    for side in ("base", "head"):
        runs = [load(f"{side}-{labelling}-{r}.json") for r in range(1, rounds + 1)]
        med = lambda values: round(statistics.median(values), 3)
        summary[f"{side}-{labelling}"] = {
            "per_image_ms": {k: med([d["per_image_ms"][k] for d in runs]) for k in runs[0]["per_image_ms"]},
            "images_per_s_1_thread": {k: med([d["thread_scaling"][k]["images_per_s_1_thread"] for d in runs])
                                      for k in runs[0]["thread_scaling"]},
            f"images_per_s_{threads}_threads": {k: med([d["thread_scaling"][k][f"images_per_s_{threads}_threads"]
                                                        for d in runs]) for k in runs[0]["thread_scaling"]},
            "pipeline_ceiling": {k: med([d["pipeline_ceiling"]["threads"][k]["images_per_s"] for d in runs])
                                 for k in ("1", threads)}}
    for k in ("1", threads):
        ratios = [load(f"head-{labelling}-{r}.json")["pipeline_ceiling"]["threads"][k]["images_per_s"]
                  / load(f"base-{labelling}-{r}.json")["pipeline_ceiling"]["threads"][k]["images_per_s"]
                  for r in range(1, rounds + 1)]
        summary[f"ceiling_head_over_base-{labelling}-{k}_threads"] = {
            "median": round(statistics.median(ratios), 3), "per_round": [round(x, 3) for x in ratios]}
(out / "summary.json").write_text(json.dumps(summary, indent=2))
for key, value in summary.items():
    if key.startswith("ceiling_"):
        print(f"{key}: {value['median']}x (rounds: {', '.join(map(str, value['per_round']))})")
    else:
        print(f"{key}: pipeline ceiling {value['pipeline_ceiling']} img/s")
EOF
