"""What a thread that has never driven the backend costs: one batch, and one whole run, in a fresh
thread against the same in the backend's long-lived device thread, interleaved in one process.

The runtime drives each backend from one thread for the life of its ``Segmenter``
(``runtime/device_thread.py``) because PyTorch caches cuDNN execution plans per thread: a fresh
thread rebuilds them. This probe measures that cost where it exists (eager PyTorch on a GPU), so the
fix is a measured ratio rather than an argument from the logs:

* ``batch``: ``submit`` + ``collect`` of one prepared batch, in a new thread each time, against the
  same call on the device thread (warm);
* ``run``: ``Segmenter.segment`` over ``--images`` images with a new runner thread for that run
  (what every run did before), against the Segmenter's own device thread.

    python -m effiseg.benchmarks.thread_probe --checkpoint training/weights/default --device cuda:0 \\
        --images DIR --precision fp32 --batch 8 --rounds 3 --output thread_probe.json

On a CPU it runs the same steps (its test does); there the two are expected to match.
"""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import click
import numpy as np

from effiseg.runtime.console import Command
from effiseg.runtime.images import atomic_write_text


def _in_fresh_thread(fn):
    """fn() on a brand-new thread; returns (result, seconds)."""
    box: dict = {}

    def target():
        t0 = time.perf_counter()
        try:
            box["result"] = fn()
        except BaseException as e:  # re-raised in the caller
            box["error"] = e
        box["s"] = time.perf_counter() - t0

    t = threading.Thread(target=target, name="effiseg-probe-fresh", daemon=True)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["result"], box["s"]


def _on_device_thread(segmenter, fn):
    def timed():
        t0 = time.perf_counter()
        result = fn()
        return result, time.perf_counter() - t0
    return segmenter.runner_threads[0].submit(timed).result()


def probe(segmenter, images: list[np.ndarray], rounds: int) -> dict:
    """Interleaved rounds of the four measurements; seconds per sample and their medians."""
    from effiseg.runtime.device_thread import DeviceThread
    backend = segmenter.backends[0]
    n = min(backend.max_batch, len(images))
    batch = np.stack([segmenter.prepare(im) for im in images[:n]])

    def one_batch():
        backend.host_input(0)[:n] = batch
        backend.submit(0, n)
        return np.array(backend.collect(0), copy=True)

    def fresh_run():
        own = segmenter.runner_threads
        segmenter.runner_threads = [DeviceThread("effiseg-probe-run")]  # a new runner thread for this run
        try:
            t0 = time.perf_counter()
            segmenter.segment(images)
            return time.perf_counter() - t0
        finally:
            segmenter.runner_threads[0].close()
            segmenter.runner_threads = own

    def device_thread_run():
        t0 = time.perf_counter()
        segmenter.segment(images)
        return time.perf_counter() - t0

    # Warm the device thread (its first batch is a fresh thread's too) and the pipeline's codecs.
    reference, _ = _on_device_thread(segmenter, one_batch)
    device_thread_run()
    samples: dict[str, list[float]] = {"batch_fresh_thread_s": [], "batch_device_thread_s": [],
                                       "run_fresh_thread_s": [], "run_device_thread_s": []}
    for _ in range(rounds):
        out, s = _in_fresh_thread(one_batch)
        if not np.allclose(out, reference, rtol=1e-3, atol=1e-3):
            raise RuntimeError("a batch computed on a fresh thread differs from the device thread's")
        samples["batch_fresh_thread_s"].append(s)
        samples["batch_device_thread_s"].append(_on_device_thread(segmenter, one_batch)[1])
        samples["run_fresh_thread_s"].append(fresh_run())
        samples["run_device_thread_s"].append(device_thread_run())
    medians = {k: float(np.median(v)) for k, v in samples.items()}
    return {
        "batch": n, "images_per_run": len(images), "rounds": rounds,
        "samples": {k: [round(x, 5) for x in v] for k, v in samples.items()},
        "median_s": {k: round(v, 5) for k, v in medians.items()},
        "fresh_over_device_thread": {
            "batch": round(medians["batch_fresh_thread_s"] / medians["batch_device_thread_s"], 3),
            "run": round(medians["run_fresh_thread_s"] / medians["run_device_thread_s"], 3)},
    }


@click.command(cls=Command)
@click.option("--checkpoint", type=click.Path(path_type=Path, exists=True), required=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--precision", type=click.Choice(["fp32", "auto", "fp16"]), default="fp32", show_default=True,
              help="fp32: eager PyTorch, the path with per-thread cuDNN plans; auto/fp16: the fast mode "
                   "(CUDA-graph replay on GPUs).")
@click.option("--images", "folder", type=click.Path(path_type=Path, exists=True, file_okay=False), required=True)
@click.option("--limit", type=click.IntRange(1, 100000), default=32, show_default=True,
              help="Images per run.")
@click.option("--batch", type=click.IntRange(1, 1024), default=8, show_default=True)
@click.option("--rounds", type=click.IntRange(1, 1000), default=3, show_default=True)
@click.option("--threads", type=click.IntRange(1, 1024), default=None, help="torch.set_num_threads (CPU).")
@click.option("--output", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Also write the result as JSON.")
def main(checkpoint, device, precision, folder, limit, batch, rounds, threads, output):
    """Fresh thread against the device thread: one batch and one whole run, interleaved."""
    from effiseg.runtime.images import list_images, read_image
    from effiseg.runtime.segmenter import Segmenter
    from effiseg.benchmarks.machine import machine_info
    files = list_images(folder)[:limit]
    if not files:
        raise click.ClickException(f"no images in {folder}")
    if threads:
        import torch
        torch.set_num_threads(threads)
    images = [read_image(p) for p in files]
    with Segmenter.from_checkpoint(checkpoint, devices=device, precision=precision, max_batch=batch) as seg:
        result = probe(seg, images, rounds)
        result.update(checkpoint=str(checkpoint), device=device, precision=seg.precision,
                      backend=seg.backends[0].describe(), machine=machine_info())
    m, r = result["median_s"], result["fresh_over_device_thread"]
    batch_label = f"one batch of {result['batch']}"
    run_label = f"segment() of {len(images)} images"
    click.echo(f"{'median seconds':<30} {'fresh thread':>13} {'device thread':>14} {'fresh/device':>13}")
    click.echo(f"{batch_label:<30} {m['batch_fresh_thread_s']:>13.4f} "
               f"{m['batch_device_thread_s']:>14.4f} {r['batch']:>12.2f}x")
    click.echo(f"{run_label:<30} {m['run_fresh_thread_s']:>13.4f} "
               f"{m['run_device_thread_s']:>14.4f} {r['run']:>12.2f}x")
    if output:
        atomic_write_text(output, json.dumps(result, indent=1) + "\n")
        click.echo(f"wrote {output}")


if __name__ == "__main__":
    main()
