"""What one ``submit`` + ``collect`` costs the host beside the model: two source trees side by side.

``Backend.submit``/``collect`` check every call (closed backend, slot range, batch size, a batch in
flight) and convert the output; before, each backend did its own checks. This measures the cost of
the call itself on a model that costs almost nothing (ONNX Runtime CPU on a 16x16 graph: a cast and
a channel mean), so that a few microseconds of checks would show, and compares source trees in
alternating child processes (the machine is shared: interleaving spreads its load over both):

    python -m effiseg.benchmarks.lab.backend_call_overhead --tree before=/tmp/before-path \\
        --tree after= --rounds 6 --calls 3000 --output overhead.json

A tree is ``NAME=PYTHONPATH`` (empty: the installed effiseg). Each child makes the tiny model,
warms up, and times ``--calls`` submit+collect pairs of one image on slot 0; the report gives
microseconds per call for every round, and the median and the minimum of the rounds per tree (on
a busy machine the minimum is the steadier estimate of what the code itself costs).
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click

CHILD = r"""
import json, sys, time
import numpy as np
import onnx
from onnx import TensorProto, helper
from effiseg.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend
from effiseg.runtime.model_info import ModelInfo

path, calls = sys.argv[1], int(sys.argv[2])
nodes = [helper.make_node("Cast", ["images"], ["f"], to=TensorProto.FLOAT),
         helper.make_node("ReduceMean", ["f"], ["logits"], axes=[3], keepdims=0)]
graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("images", TensorProto.UINT8, ["n", 16, 16, 3])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 16, 16])])
onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)
info = ModelInfo(path=None, variant="tiny", input_height=16, input_width=16, input_name="images", output_name="logits")
backend = OnnxRuntimeBackend(info, path, "cpu", max_batch=1, n_slots=2, intra_op_threads=1)
backend.host_input(0)[:] = 7
for _ in range(200):
    backend.submit(0, 1); backend.collect(0)
start = time.perf_counter()
for _ in range(calls):
    backend.submit(0, 1); backend.collect(0)
print(json.dumps({"us_per_call": (time.perf_counter() - start) / calls * 1e6,
                  "module": sys.modules[type(backend).__module__].__file__}))
"""


def measure(pythonpath: str, calls: int, workdir: Path) -> dict:
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    done = subprocess.run([sys.executable, "-c", CHILD, str(workdir / "tiny.onnx"), str(calls)], env=env,
                          capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise click.ClickException(f"child failed: {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


@click.command()
@click.option("--tree", "trees", multiple=True, required=True, help="NAME=PYTHONPATH (empty: installed).")
@click.option("--rounds", type=click.IntRange(1), default=6)
@click.option("--calls", type=click.IntRange(1), default=3000)
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path), default=None)
def main(trees, rounds, calls, output):
    parsed = [tuple(t.split("=", 1)) for t in trees]
    results = {name: [] for name, _ in parsed}
    modules = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            for name, path in (parsed if r % 2 == 0 else parsed[::-1]):   # alternate who goes first
                got = measure(path, calls, Path(tmp))
                results[name].append(round(got["us_per_call"], 2))
                modules[name] = got["module"]
                click.echo(f"round {r + 1}/{rounds} {name}: {got['us_per_call']:.2f} us per submit+collect", err=True)
    report = {"calls_per_round": calls, "rounds": rounds, "python": sys.version.split()[0],
              "trees": {name: {"us_per_call": results[name], "median_us": statistics.median(results[name]),
                               "min_us": min(results[name]),
                               "backend_module": modules[name]} for name, _ in parsed},
              "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    first = parsed[0][0]
    for name, _ in parsed[1:]:
        report["trees"][name][f"median_ratio_to_{first}"] = round(
            report["trees"][name]["median_us"] / report["trees"][first]["median_us"], 4)
    text = json.dumps(report, indent=2)
    click.echo(text)
    if output:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":  # pragma: no cover
    main()
