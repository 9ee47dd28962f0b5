"""Two ONNX files of the same model, timed side by side on ONNX Runtime (CPU): did a re-export change
the speed? Rounds alternate their order (A B, B A, ...) so drift on a shared machine hits both alike.

    git show 2194797:runtime/models/effisegnet-default.onnx > /tmp/before.onnx
    python -m effiseg.benchmarks.lab.compare_onnx /tmp/before.onnx runtime/models/effisegnet-default.onnx \
        --images ../shared/data/kvasir-seg/test/images --rounds 16 --output compare.json

Both files must take the same input (name, format and size); the outputs are compared too.
"""
from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import click
import numpy as np

from effiseg.runtime.console import Command

from ..cli import parse_int_list


def compare(a: Path, b: Path, images: Path, batch_sizes: list[int], rounds: int, threads: int,
            log=print) -> dict:
    import onnxruntime as ort

    from effiseg.runtime.images import list_images, read_image
    from effiseg.runtime.model_info import ModelInfo
    from effiseg.runtime.postprocess import resize_rgb

    infos = {name: ModelInfo.from_onnx(path) for name, path in (("a", a), ("b", b))}
    shapes = {name: (i.input_name, i.input_format, i.input_height, i.input_width) for name, i in infos.items()}
    if shapes["a"] != shapes["b"]:
        raise click.UsageError(f"the two files take different inputs: {shapes['a']} and {shapes['b']}")
    info = infos["a"]
    if info.input_format != "uint8-nhwc":
        raise click.UsageError("only uint8-nhwc models (the exporter's default) are compared")
    files = list_images(images)[:max(batch_sizes)]
    if len(files) < max(batch_sizes):
        raise click.UsageError(f"{images} holds {len(files)} images; the largest batch needs {max(batch_sizes)}")
    batch_all = np.stack([resize_rgb(read_image(f), info.input_height, info.input_width) for f in files])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    sessions = {name: ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
                for name, path in (("a", a), ("b", b))}
    result = {"a": str(a), "b": str(b), "threads": threads, "rounds": rounds, "images": str(images),
              "machine": {"cpu": platform.processor() or platform.machine(), "python": platform.python_version(),
                          "onnxruntime": ort.__version__}, "batches": {}}
    for batch in batch_sizes:
        feed = {info.input_name: batch_all[:batch]}
        outputs = {name: s.run(None, feed)[0] for name, s in sessions.items()}  # also the warm-up
        times = {"a": [], "b": []}
        for r in range(rounds):
            for name in (("a", "b") if r % 2 == 0 else ("b", "a")):
                t0 = time.perf_counter()
                sessions[name].run(None, feed)
                times[name].append((time.perf_counter() - t0) * 1000.0)
        med = {name: float(np.median(v)) for name, v in times.items()}
        result["batches"][str(batch)] = {
            "median_ms_a": med["a"], "median_ms_b": med["b"], "b_over_a": med["b"] / med["a"],
            "samples_ms_a": times["a"], "samples_ms_b": times["b"],
            "max_abs_output_difference": float(np.abs(outputs["a"].astype(np.float64)
                                                      - outputs["b"].astype(np.float64)).max())}
        log(f"batch {batch}: A {med['a']:.1f} ms, B {med['b']:.1f} ms per batch (median of {rounds}); "
            f"B/A {med['b'] / med['a']:.3f}; outputs differ by at most "
            f"{result['batches'][str(batch)]['max_abs_output_difference']:.3g}")
    return result


@click.command(cls=Command, context_settings={"show_default": True, "help_option_names": ["-h", "--help"]})
@click.argument("a", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("b", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--images", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True,
              help="Folder of images fed to both (at least the largest batch).")
@click.option("--batch-sizes", default="1,8", help="Comma-separated.")
@click.option("--rounds", type=click.IntRange(2), default=16, help="Interleaved rounds per batch size.")
@click.option("--threads", type=click.IntRange(1), default=1, help="ONNX Runtime intra-op threads.")
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path), default=None, help="JSON to write.")
def main(a, b, images, batch_sizes, rounds, threads, output):
    """Time ONNX files A and B side by side on ONNX Runtime (CPU)."""
    sizes = parse_int_list(batch_sizes, "--batch-sizes")
    result = compare(a, b, images, sizes, rounds, threads, log=lambda m: click.echo(m, err=True))
    if output:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(result, indent=2), encoding="utf-8")
        click.echo(f"wrote {output}", err=True)


if __name__ == "__main__":
    main()
