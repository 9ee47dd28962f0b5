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

    python -m effiseg.benchmarks.lab.thread_probe --checkpoint training/weights/default --device cuda:0 \\
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


def minor_faults(scope: str) -> int | None:
    """Minor page faults so far of the calling thread (``thread``) or the process (``process``);
    None where the OS does not count them per thread (RUSAGE_THREAD is Linux-only) or at all."""
    try:
        import resource
        who = resource.RUSAGE_THREAD if scope == "thread" else resource.RUSAGE_SELF
        return int(resource.getrusage(who).ru_minflt)
    except (ImportError, AttributeError, OSError):
        return None


def _timed(fn):
    """(result, seconds, minor page faults of this thread during fn or None)."""
    f0, t0 = minor_faults("thread"), time.perf_counter()
    result = fn()
    s, f1 = time.perf_counter() - t0, minor_faults("thread")
    return result, s, (f1 - f0 if f0 is not None and f1 is not None else None)


def _in_fresh_thread(fn):
    """_timed(fn) on a brand-new thread."""
    box: dict = {}

    def target():
        try:
            box["value"] = _timed(fn)
        except BaseException as e:  # re-raised in the caller
            box["error"] = e

    t = threading.Thread(target=target, name="effiseg-probe-fresh", daemon=True)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


def _on_device_thread(segmenter, fn):
    return segmenter.runner_threads[0].call(_timed, fn)


def _timed_run(fn):
    """(seconds, minor page faults of the whole process) for a pipeline run, which spreads its
    work over decoder, runner and writer threads."""
    f0, t0 = minor_faults("process"), time.perf_counter()
    fn()
    s, f1 = time.perf_counter() - t0, minor_faults("process")
    return s, (f1 - f0 if f0 is not None and f1 is not None else None)


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
            return _timed_run(lambda: segmenter.segment(images))
        finally:
            segmenter.runner_threads[0].close()
            segmenter.runner_threads = own

    def device_thread_run():
        return _timed_run(lambda: segmenter.segment(images))

    # Warm the device thread (its first batch is a fresh thread's too) and the pipeline's codecs.
    reference = _on_device_thread(segmenter, one_batch)[0]
    device_thread_run()
    keys = ("batch_fresh_thread", "batch_device_thread", "run_fresh_thread", "run_device_thread")
    seconds: dict[str, list[float]] = {k: [] for k in keys}
    faults: dict[str, list] = {k: [] for k in keys}

    def note(key, s, f):
        seconds[key].append(s)
        faults[key].append(f)

    for _ in range(rounds):
        out, s, f = _in_fresh_thread(one_batch)
        if not np.allclose(out, reference, rtol=1e-3, atol=1e-3):
            raise RuntimeError("a batch computed on a fresh thread differs from the device thread's")
        note("batch_fresh_thread", s, f)
        note("batch_device_thread", *_on_device_thread(segmenter, one_batch)[1:])
        note("run_fresh_thread", *fresh_run())
        note("run_device_thread", *device_thread_run())
    medians = {k: float(np.median(v)) for k, v in seconds.items()}
    return {
        "batch": n, "images_per_run": len(images), "rounds": rounds,
        "samples": {f"{k}_s": [round(x, 5) for x in v] for k, v in seconds.items()},
        "median_s": {f"{k}_s": round(v, 5) for k, v in medians.items()},
        # Minor page faults per sample: of the thread that ran the batch, of the whole process for a
        # run; None where the OS does not count them.
        "minor_page_faults": faults,
        "median_minor_page_faults": {k: (int(np.median(v)) if v and None not in v else None)
                                     for k, v in faults.items()},
        "fresh_over_device_thread": {
            "batch": round(medians["batch_fresh_thread"] / medians["batch_device_thread"], 3),
            "run": round(medians["run_fresh_thread"] / medians["run_device_thread"], 3)},
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
    m, r, pf = result["median_s"], result["fresh_over_device_thread"], result["median_minor_page_faults"]

    def faults(key):
        return "-" if pf[key] is None else str(pf[key])

    click.echo(f"{'median':<30} {'fresh thread':>13} {'device thread':>14} {'fresh/device':>13} "
               f"{'minor page faults fresh / device':>34}")
    for label, key in ((f"one batch of {result['batch']}", "batch"), (f"segment() of {len(images)} images", "run")):
        click.echo(f"{label:<30} {m[f'{key}_fresh_thread_s']:>12.4f}s {m[f'{key}_device_thread_s']:>13.4f}s "
                   f"{r[key]:>12.2f}x {faults(f'{key}_fresh_thread') + ' / ' + faults(f'{key}_device_thread'):>34}")
    if output:
        atomic_write_text(output, json.dumps(result, indent=1) + "\n")
        click.echo(f"wrote {output}")


if __name__ == "__main__":
    main()
