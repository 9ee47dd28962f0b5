"""Worker processes with shared-memory buffers against threads, for the pipeline's host work.

    python -m effiseg.benchmarks.lab.workers_ab --images /work/shared/data/kvasir-seg/test/images \\
        --workers 2 --rounds 5 --output workers_ab.json

The same control flow runs on two kinds of pool, so that only the executor differs: a decoder pool
(read_image + resize, written into a shared ring of model-sized RGB buffers), a parent that copies
each decoded image into a host-slot row and hands a stand-in output map (a smooth logit map) to a
writer pool through a second ring, and a writer pool (mask at the image's size, region count, PNG
encode, atomic file write). Threads: ``multiprocessing.pool.ThreadPool``, the rings plain arrays.
Processes: ``multiprocessing.get_context("spawn").Pool`` (spawn-safe, as on Windows), the rings in
``multiprocessing.shared_memory`` blocks the workers map once; per image only indices and the small
result cross the process boundary. Rounds alternate the order; images/s per round, best and median.
"""
from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from collections import deque
from multiprocessing import get_context
from multiprocessing.pool import ThreadPool
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path

import click
import numpy as np

SIZE = 352
_rings: dict = {}


def _attach(in_name, out_name, n_buffers, local_arrays=None):
    """Pool initializer: map the two rings (processes) or take them as they are (threads)."""
    if local_arrays is not None:
        _rings["in"], _rings["out"] = local_arrays
        return
    blocks = (SharedMemory(name=in_name), SharedMemory(name=out_name))
    _rings["blocks"] = blocks  # kept alive as long as the worker
    _rings["in"] = np.ndarray((n_buffers, SIZE, SIZE, 3), np.uint8, buffer=blocks[0].buf)
    _rings["out"] = np.ndarray((n_buffers, SIZE, SIZE), np.float32, buffer=blocks[1].buf)


def decode_into(path: str, index: int):
    from effiseg.runtime.images import read_image
    from effiseg.runtime.postprocess import resize_rgb
    rgb = read_image(path)
    _rings["in"][index] = resize_rgb(rgb, SIZE, SIZE)
    return index, rgb.shape[0], rgb.shape[1]


def write_from(index: int, mask_path: str, height: int, width: int) -> dict:
    from effiseg.runtime.images import write_mask_png
    from effiseg.runtime.postprocess import count_regions, output_to_mask
    mask, max_prob = output_to_mask(_rings["out"][index], "logits", 0.5, height, width)
    write_mask_png(Path(mask_path), mask)
    return {"area": float(np.count_nonzero(mask)) / mask.size, "regions": count_regions(mask), "max": max_prob}


def run_once(decoders, writers, rings, paths: list[str], logits: np.ndarray, out_dir: Path) -> float:
    in_ring, out_ring = rings
    n_buffers = len(in_ring)
    slot_row = np.zeros((SIZE, SIZE, 3), np.uint8)  # stands for a backend's host buffer row
    free_in, free_out = list(range(n_buffers)), list(range(n_buffers))
    decoding, writing = deque(), deque()
    submitted = done = 0
    t0 = time.perf_counter()
    while done < len(paths):
        while submitted < len(paths) and free_in:
            decoding.append(decoders.apply_async(decode_into, (paths[submitted], free_in.pop())))
            submitted += 1
        if decoding and free_out and (decoding[0].ready() or not writing):
            index, h, w = decoding.popleft().get()
            slot_row[...] = in_ring[index]  # the fill into the host slot
            free_in.append(index)
            out = free_out.pop()
            out_ring[out] = logits[done % len(logits)]  # where the device's output lands
            writing.append((out, writers.apply_async(write_from, (out, str(out_dir / f"{done}.png"), h, w))))
        else:
            out, result = writing.popleft()
            result.get()
            free_out.append(out)
            done += 1
    return len(paths) / (time.perf_counter() - t0)


def measure(kind: str, paths: list[str], workers: int, repeats: int, logits: np.ndarray, tmp: Path) -> list[float]:
    n_buffers = 4 * workers
    in_bytes, out_bytes = n_buffers * SIZE * SIZE * 3, n_buffers * SIZE * SIZE * 4
    if kind == "threads":
        rings = (np.zeros((n_buffers, SIZE, SIZE, 3), np.uint8), np.zeros((n_buffers, SIZE, SIZE), np.float32))
        make = lambda: ThreadPool(workers, _attach, (None, None, n_buffers, rings))  # noqa: E731
        blocks = ()
    else:
        blocks = (SharedMemory(create=True, size=in_bytes), SharedMemory(create=True, size=out_bytes))
        rings = (np.ndarray((n_buffers, SIZE, SIZE, 3), np.uint8, buffer=blocks[0].buf),
                 np.ndarray((n_buffers, SIZE, SIZE), np.float32, buffer=blocks[1].buf))
        ctx = get_context("spawn")
        make = lambda: ctx.Pool(workers, _attach, (blocks[0].name, blocks[1].name, n_buffers))  # noqa: E731
    try:
        with make() as decoders, make() as writers:
            rates = []
            for r in range(repeats + 1):
                out_dir = tmp / f"{kind}_{r}"
                out_dir.mkdir()
                rate = run_once(decoders, writers, rings, paths, logits, out_dir)
                if r:  # run 0 starts the workers and warms the codecs
                    rates.append(round(rate, 1))
            return rates
    finally:
        del rings
        for b in blocks:
            b.close()
            b.unlink()


@click.command()
@click.option("--images", "folder", type=click.Path(path_type=Path, exists=True, file_okay=False), required=True)
@click.option("--workers", type=click.IntRange(1, 64), default=None, help="Per pool (default: the cores).")
@click.option("--rounds", type=click.IntRange(1, 50), default=5, show_default=True)
@click.option("--repeats", type=click.IntRange(1, 20), default=3, show_default=True)
@click.option("--output", type=click.Path(path_type=Path), default=None)
def main(folder, workers, rounds, repeats, output):
    from effiseg.benchmarks.host_profile import smooth_logits
    from effiseg.benchmarks.machine import cpu_model, load_average
    from effiseg.runtime.images import list_images
    workers = workers or os.cpu_count() or 1
    paths = [str(p) for p in list_images(folder)]
    rng = np.random.default_rng(0)
    logits = np.stack([smooth_logits(rng, SIZE) for _ in range(16)])
    per_round = {"threads": [], "processes": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            order = ("threads", "processes") if r % 2 == 0 else ("processes", "threads")
            for kind in order:
                round_dir = Path(tmp) / f"{r}"
                round_dir.mkdir(exist_ok=True)
                rates = measure(kind, paths, workers, repeats, logits, round_dir)
                per_round[kind].append(max(rates))
                click.echo(f"round {r + 1}/{rounds} {kind:9s} {max(rates):7.0f} img/s (runs {rates})", err=True)
    result = {"images": len(paths), "workers_per_pool": workers, "cpus": os.cpu_count(), "cpu": cpu_model(),
              "load_average_at_end": load_average(),
              **{kind: {"best_per_round": v, "median": statistics.median(v)} for kind, v in per_round.items()},
              "processes_over_threads_per_round": [round(p / t, 3) for p, t in
                                                   zip(per_round["processes"], per_round["threads"])]}
    result["processes_over_threads_median"] = statistics.median(result["processes_over_threads_per_round"])
    click.echo(f"threads {result['threads']['median']:.0f} img/s, processes {result['processes']['median']:.0f} "
               f"img/s: processes/threads {result['processes_over_threads_median']:.2f}x (median of {rounds} rounds)")
    if output:
        output.write_text(json.dumps(result, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
