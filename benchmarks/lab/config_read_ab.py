"""Time what the typed model config added to every model load, from two source trees in
alternation (A B, B A, ...): reading the bundled ONNX file's metadata into a ``ModelInfo`` and a
checkpoint's config.json, in child interpreters pointed at each tree (as benchmarks/lab/source_ab.py).

    python benchmarks/lab/config_read_ab.py --a /tmp/before --b . --pairs 4 --out results/x/config_read_ab.json
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import click

CHILD = """
import json, sys, time
finder = next(m for name, m in list(sys.modules.items()) if name.startswith("__editable__") and hasattr(m, "MAPPING"))
root, onnx_path, config_path, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
for key in list(finder.MAPPING):
    finder.MAPPING[key] = root + "/" + key.split(".", 1)[1]
t0 = time.perf_counter()
from effiseg.runtime.model_info import ModelInfo
import_s = time.perf_counter() - t0
t0 = time.perf_counter()
for _ in range(n):
    ModelInfo.from_onnx(onnx_path)
onnx_us = (time.perf_counter() - t0) / n * 1e6
t0 = time.perf_counter()
for _ in range(n):
    ModelInfo.from_checkpoint_config(json.loads(open(config_path, encoding="utf-8").read()))
config_us = (time.perf_counter() - t0) / n * 1e6
print(json.dumps({"import_runtime_model_info_s": import_s, "from_onnx_us": onnx_us, "from_checkpoint_config_us": config_us}))
"""


@click.command()
@click.option("--a", "tree_a", type=click.Path(path_type=Path, file_okay=False, exists=True), required=True)
@click.option("--b", "tree_b", type=click.Path(path_type=Path, file_okay=False, exists=True), required=True)
@click.option("--pairs", type=click.IntRange(1, 50), default=4)
@click.option("--repeat", type=click.IntRange(1, 100000), default=200, help="Reads per measurement.")
@click.option("--out", type=click.Path(path_type=Path, dir_okay=False), required=True)
def main(tree_a, tree_b, pairs, repeat, out):
    """Alternate the two trees; write medians per side and their B/A ratios as JSON."""
    repo = Path(__file__).resolve().parents[2]
    onnx_path = repo / "runtime" / "models" / "effisegnet-default.onnx"
    config_path = repo / "training" / "weights" / "default" / "config.json"
    runs = []
    for pair in range(pairs):
        order = (("a", tree_a), ("b", tree_b))
        for side, tree in (order if pair % 2 == 0 else order[::-1]):
            proc = subprocess.run([sys.executable, "-c", CHILD, str(tree.resolve()), str(onnx_path), str(config_path),
                                   str(repeat)], capture_output=True, text=True)
            if proc.returncode != 0:
                raise click.ClickException(f"{side}{pair} failed: {proc.stderr[-2000:]}")
            runs.append({"side": side, "pair": pair, **json.loads(proc.stdout)})
    keys = [k for k in runs[0] if k not in ("side", "pair")]
    medians = {side: {k: statistics.median(r[k] for r in runs if r["side"] == side) for k in keys} for side in "ab"}
    result = {"tree_a": str(tree_a), "tree_b": str(tree_b), "pairs": pairs, "repeat": repeat, "runs": runs,
              "median": medians, "b_over_a": {k: round(medians["b"][k] / medians["a"][k], 3) for k in keys}}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1), encoding="utf-8")
    click.echo(json.dumps({"median": medians, "b_over_a": result["b_over_a"]}, indent=1))


if __name__ == "__main__":
    main()
