"""Where PyTorch's CPU time goes besides arithmetic: page faults from its memory allocator (Linux).

PyTorch eager on the CPU allocates every activation with the C library's malloc; glibc hands
allocations above its mmap threshold (at most 32 MB) straight to the kernel and returns them on free,
so each large activation is faulted in again, 4 KB page by 4 KB page, on every forward pass. ONNX
Runtime plans its memory and reuses one arena. This probe measures wall time and minor page faults
per batch for both, in fresh processes under different ``GLIBC_TUNABLES`` settings (read by glibc at
process start, so each setting needs its own process), in alternating order:

    python -m effiseg.benchmarks.lab.alloc_probe --checkpoint training/weights/default \\
        --onnx runtime/models/effisegnet-default.onnx --images ../shared/data/kvasir-seg/test/images \\
        --tunables "" --tunables glibc.malloc.hugetlb=1 --output alloc_probe.json

``glibc.malloc.hugetlb=1`` (glibc 2.35+) asks for transparent huge pages on malloc's large
allocations: 2 MB per fault instead of 4 KB. Linux with glibc only; elsewhere the probe says so.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import click
import numpy as np

from effiseg.runtime.console import Command

from ..cli import parse_int_list
from ..machine import cpu_model, load_average


def _child(checkpoint: Path, onnx: Path | None, images: Path, batch_sizes: list[int], reps: int, threads: int) -> dict:
    import resource

    import torch

    from effiseg.runtime.backends.torch_backend import TorchBackend
    from effiseg.runtime.images import list_images, read_image
    from effiseg.runtime.postprocess import resize_rgb

    torch.set_num_threads(threads)
    backend = TorchBackend(checkpoint, device="cpu", max_batch=max(batch_sizes), n_slots=1)
    h, w = backend.info.input_height, backend.info.input_width
    files = list_images(images)[:max(batch_sizes)]
    if len(files) < max(batch_sizes):
        raise SystemExit(f"{images} holds {len(files)} images; the largest batch needs {max(batch_sizes)}")
    batch_all = np.stack([resize_rgb(read_image(f), h, w) for f in files])
    session = None
    if onnx is not None:
        import onnxruntime as ort
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(str(onnx), options, providers=["CPUExecutionProvider"])

    def faults() -> int:
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

    def measure(run) -> dict:
        run()  # warm-up
        wall, minor = [], []
        for _ in range(reps):
            f0, t0 = faults(), time.perf_counter()
            run()
            wall.append((time.perf_counter() - t0) * 1000.0)
            minor.append(faults() - f0)
        return {"wall_ms": wall, "minor_faults": minor}

    result = {}
    for n in batch_sizes:
        def torch_run(n=n):
            backend.host_input(0)[:n] = batch_all[:n]
            backend.submit(0, n)
            backend.collect(0)
        entry = {"torch-eager": measure(torch_run)}
        if session is not None:
            entry["onnxruntime"] = measure(lambda n=n: session.run(None, {session.get_inputs()[0].name: batch_all[:n]}))
        result[str(n)] = entry
    return result


def _summary(runs: list[dict]) -> dict:
    """Per tunables setting, batch and backend: median wall ms per batch and median minor faults."""
    out: dict = {}
    for run in runs:
        for batch, backends in run["result"].items():
            for name, m in backends.items():
                slot = out.setdefault(run["tunables"] or "(default)", {}).setdefault(batch, {}).setdefault(
                    name, {"wall_ms": [], "minor_faults": []})
                slot["wall_ms"] += m["wall_ms"]
                slot["minor_faults"] += m["minor_faults"]
    for by_batch in out.values():
        for backends in by_batch.values():
            for name, m in backends.items():
                backends[name] = {"median_wall_ms": float(np.median(m["wall_ms"])),
                                  "median_minor_faults": int(np.median(m["minor_faults"])), "samples": len(m["wall_ms"])}
    return out


@click.command(cls=Command, context_settings={"show_default": True, "help_option_names": ["-h", "--help"]})
@click.option("--checkpoint", type=click.Path(exists=True, path_type=Path), required=True,
              help="Checkpoint run by the torch FP32 eager backend.")
@click.option("--onnx", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="The same model as ONNX, run by ONNX Runtime for comparison.")
@click.option("--images", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True)
@click.option("--batch-sizes", default="1,8")
@click.option("--reps", type=click.IntRange(1), default=3, help="Timed batches per backend, batch size and process.")
@click.option("--rounds", type=click.IntRange(1), default=2, help="Processes per setting, in alternating order.")
@click.option("--threads", type=click.IntRange(1), default=1)
@click.option("--tunables", "tunables", multiple=True, default=("", "glibc.malloc.hugetlb=1"),
              help="GLIBC_TUNABLES values to compare ('' = glibc's defaults); repeat the option.")
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path), default=None)
@click.option("--child", is_flag=True, hidden=True)
def main(checkpoint, onnx, images, batch_sizes, reps, rounds, threads, tunables, output, child):
    """Wall time and minor page faults per batch: PyTorch eager vs ONNX Runtime, under glibc settings."""
    sizes = parse_int_list(batch_sizes, "--batch-sizes")
    if child:
        click.echo(json.dumps(_child(checkpoint, onnx, images, sizes, reps, threads)))
        return
    if not sys.platform.startswith("linux") or not platform.libc_ver()[0] == "glibc":
        raise click.ClickException("this probe measures glibc's allocator on Linux; here it has nothing to measure")
    runs = []
    for r in range(rounds):
        order = list(tunables) if r % 2 == 0 else list(reversed(tunables))
        for setting in order:
            env = dict(os.environ, GLIBC_TUNABLES=setting) if setting else {
                k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
            cmd = [sys.executable, "-m", "effiseg.benchmarks.lab.alloc_probe", "--child", "--checkpoint", str(checkpoint),
                   "--images", str(images), "--batch-sizes", batch_sizes, "--reps", str(reps), "--threads", str(threads)]
            if onnx is not None:
                cmd += ["--onnx", str(onnx)]
            click.echo(f"round {r + 1}/{rounds}: GLIBC_TUNABLES={setting or '(unset)'} ...", err=True)
            done = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if done.returncode != 0:
                raise click.ClickException(f"the measuring process failed (GLIBC_TUNABLES={setting!r}):\n"
                                           + done.stderr[-2000:])
            runs.append({"tunables": setting, "round": r, "result": json.loads(done.stdout.strip().splitlines()[-1])})
    summary = _summary(runs)
    for setting, by_batch in summary.items():
        for batch, backends in by_batch.items():
            for name, m in backends.items():
                click.echo(f"{setting:40s} batch {batch:>3s} {name:12s} {m['median_wall_ms']:9.0f} ms/batch "
                           f"{m['median_minor_faults']:>10,} minor faults/batch ({m['samples']} samples)")
    if output:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps({
            "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "load_average_after": load_average(),
                        "libc": "-".join(platform.libc_ver()), "python": platform.python_version()},
            "checkpoint": str(checkpoint), "onnx": str(onnx) if onnx else None, "images": str(images),
            "threads": threads, "reps": reps, "rounds": rounds, "summary": summary, "runs": runs}, indent=2),
            encoding="utf-8")
        click.echo(f"wrote {output}", err=True)


if __name__ == "__main__":
    main()
