"""Run effiseg-bench from two source trees in alternation (A B, B A, A B, ...) and
record each run's wall time and the bench result it wrote: a before/after check of a refactoring
on the same machine in one sitting, so load from other jobs falls on both sides alike.

A source tree is a folder holding effiseg's parts (benchmarks/, export/, runtime/, training/),
e.g. ``git archive <commit> | tar -x -C /tmp/before``. The installed (editable) effiseg is
pointed at each tree in turn in a child interpreter, so both sides run in the same environment.

    python benchmarks/lab/source_ab.py --a /tmp/before --b . --pairs 2 --out results/ab -- \\
        --backends onnxruntime --batch-sizes 1 --rounds 2 --no-plot
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import click

PARTS = ("benchmarks", "export", "runtime", "training")

# The child: point the editable install's finder at the tree, then run effiseg-bench's entry point.
CHILD = """
import sys
import importlib
finder = next(m for name, m in list(sys.modules.items()) if name.startswith("__editable__") and hasattr(m, "MAPPING"))
root = sys.argv.pop(1)
for key in list(finder.MAPPING):
    finder.MAPPING[key] = root + "/" + key.split(".", 1)[1]
from effiseg.benchmarks.cli import bench_command
bench_command.main(sys.argv[1:], prog_name="effiseg-bench")
"""


@click.command()
@click.option("--a", "tree_a", type=click.Path(path_type=Path, file_okay=False, exists=True), required=True,
              help="Source tree A (the baseline).")
@click.option("--b", "tree_b", type=click.Path(path_type=Path, file_okay=False, exists=True), required=True,
              help="Source tree B.")
@click.option("--pairs", type=click.IntRange(1, 20), default=2, help="A/B pairs, run alternately.")
@click.option("--out", type=click.Path(path_type=Path, file_okay=False), required=True,
              help="Folder for each run's bench output and source_ab.json.")
@click.argument("bench_args", nargs=-1, type=click.UNPROCESSED)
def main(tree_a, tree_b, pairs, out, bench_args):
    """Alternate effiseg-bench BENCH_ARGS between two source trees; write source_ab.json."""
    for tree in (tree_a, tree_b):
        missing = [p for p in PARTS if not (tree / p).is_dir()]
        if missing:
            raise click.BadParameter(f"{tree} lacks {', '.join(missing)}: not an effiseg source tree")
    out.mkdir(parents=True, exist_ok=True)
    runs = []
    for pair in range(pairs):
        # A B, then B A: a drift of the machine's load over the sitting falls on both sides alike.
        order = (("a", tree_a), ("b", tree_b))
        for side, tree in (order if pair % 2 == 0 else order[::-1]):
            folder = out / f"{side}{pair}"
            cmd = [sys.executable, "-c", CHILD, str(tree.resolve()), *bench_args, "-o", str(folder)]
            click.echo(f"run {side}{pair}: {tree}", err=True)
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            wall = time.perf_counter() - t0
            (out / f"{side}{pair}.log").write_text(proc.stdout + proc.stderr, encoding="utf-8")
            if proc.returncode != 0:
                raise click.ClickException(f"run {side}{pair} failed (exit {proc.returncode}); see {side}{pair}.log")
            data = json.loads((folder / "effiseg_bench.json").read_text(encoding="utf-8"))
            runs.append({"side": side, "pair": pair, "tree": str(tree), "wall_s": round(wall, 2),
                         "throughput": {r["key"]: r["latency"]["throughput_ips"] for r in data["results"]
                                        if r.get("latency")}})
    summary = {}
    for side in ("a", "b"):
        mine = [r for r in runs if r["side"] == side]
        keys = mine[0]["throughput"]
        summary[side] = {"wall_s_median": statistics.median(r["wall_s"] for r in mine),
                         "throughput_ips_median": {k: statistics.median(r["throughput"][k] for r in mine) for k in keys}}
    ratios = {"wall_b_over_a": round(summary["b"]["wall_s_median"] / summary["a"]["wall_s_median"], 3),
              "throughput_b_over_a": {k: round(summary["b"]["throughput_ips_median"][k] / v, 3)
                                      for k, v in summary["a"]["throughput_ips_median"].items() if v}}
    result = {"command": ["effiseg-bench", *bench_args], "tree_a": str(tree_a), "tree_b": str(tree_b),
              "pairs": pairs, "runs": runs, "summary": summary, "ratios": ratios}
    (out / "source_ab.json").write_text(json.dumps(result, indent=1), encoding="utf-8")
    click.echo(json.dumps(ratios, indent=1))


if __name__ == "__main__":
    main()
