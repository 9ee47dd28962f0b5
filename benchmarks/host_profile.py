"""Host-side cost of the inference pipeline, per image and per stage, on this machine's CPU.

The GPU finishes a batch long before the host has decoded and written it (benchmarks/RESULTS.md);
this measures what each host stage costs, single-threaded, so the ceiling of the double-buffered
pipeline can be read off without a GPU:

    python -m effiseg.benchmarks.host_profile --images ../shared/data/kvasir-seg/test/images --threads 2

Stages are the runtime's own functions, in the order the pipeline calls them. ``--threads`` adds
how each stage scales across threads, and the *pipeline ceiling*: the whole ``run_folder`` (decoder
threads, slots, writer threads, summary files) over the images with a backend whose inference
costs nothing (:class:`InstantBackend`). Its images/s is the most any device can get end to end on
this machine with that many threads: a GPU whose model-only rate is above it is host-bound.
"""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import click
import numpy as np

from effiseg.runtime.backends.base import Backend
from effiseg.runtime.console import Command


def smooth_logits(rng: np.random.Generator, size: int) -> np.ndarray:
    """A stand-in for the network's output: a smooth random (size, size) float32 logit map, so that
    thresholding, region counting and PNG compression see blobs rather than noise."""
    return (rng.standard_normal((size // 16, size // 16)).repeat(16, 0).repeat(16, 1) * 4).astype(np.float32)


class InstantBackend(Backend):
    """A backend whose inference costs nothing: ``submit`` copies prepared output maps into the
    slot's output buffer, where a GPU backend's device-to-host copy would land them. Under the
    pipeline it leaves only the host's work."""

    name = "instant"

    def __init__(self, info, outputs: np.ndarray, max_batch: int, n_slots: int = 2):
        super().__init__(info, "host", "none", max_batch, n_slots)
        shape = (max_batch, info.input_height, info.input_width)
        self._inputs = [np.zeros(shape + (3,), np.uint8) for _ in range(n_slots)]
        self._outputs = [np.empty(shape, np.float32) for _ in range(n_slots)]
        self._pending = [0] * n_slots
        self._source = np.asarray(outputs, np.float32)
        self._next = 0

    def host_input(self, slot: int) -> np.ndarray:
        return self._inputs[slot]

    def submit(self, slot: int, n: int) -> None:
        self._check_submit(slot, n, self._pending[slot] > 0)
        rows = (self._next + np.arange(n)) % len(self._source)
        self._next += n
        np.take(self._source, rows, axis=0, out=self._outputs[slot][:n])
        self._pending[slot] = n

    def collect(self, slot: int) -> np.ndarray:
        n, self._pending[slot] = self._pending[slot], 0
        return self._outputs[slot][:n]


def profile(images: list[Path], size: int = 352, threshold: float = 0.5, repeats: int = 3) -> dict:
    from effiseg.runtime.images import atomic_write, encode_mask_png, read_image
    from effiseg.runtime.model_info import ModelInfo
    from effiseg.runtime.postprocess import count_regions, fill_host_row, output_to_mask, resize_rgb
    info = ModelInfo(path=None, variant="profile", input_height=size, input_width=size)
    row = np.zeros((size, size, 3), np.uint8)
    rng = np.random.default_rng(0)
    stages = {"decode": [], "resize_into_slot": [], "mask_from_logits": [], "count_regions": [], "png_encode": [],
              "file_write": []}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(repeats):
            for i, path in enumerate(images):
                t0 = time.perf_counter()
                rgb = read_image(path)
                t1 = time.perf_counter()
                fill_host_row(row, resize_rgb(rgb, size, size), info)  # what the decoder threads do
                t2 = time.perf_counter()
                logits = smooth_logits(rng, size)
                mask, _ = output_to_mask(logits, "logits", threshold, rgb.shape[0], rgb.shape[1])
                t3 = time.perf_counter()
                count_regions(mask)
                t4 = time.perf_counter()
                data = encode_mask_png(mask)  # write_mask_png's two steps, timed apart
                t5 = time.perf_counter()
                atomic_write(Path(tmp) / f"{i}.png", lambda f: f.write(data))
                t6 = time.perf_counter()
                for k, (a, b) in zip(stages, ((t0, t1), (t1, t2), (t2, t3), (t3, t4), (t4, t5), (t5, t6))):
                    stages[k].append((b - a) * 1000)
    out = {k: float(np.median(v)) for k, v in stages.items()}
    out["total_ms_per_image"] = float(sum(out.values()))
    out["images_per_s_per_thread"] = 1000.0 / out["total_ms_per_image"]
    return out


def thread_scaling(images: list[Path], threads: int, size: int = 352, threshold: float = 0.5,
                   repeats: int = 3) -> dict:
    """Per host stage: images/s with 1 thread and with ``threads`` threads working at once on the
    same images, and their ratio. On a machine with at least ``threads`` idle cores a stage that
    releases the GIL scales towards ``threads``; a stage that holds it stays near 1.0 however many
    threads the pipeline gives it. This is what bounds the pipeline's host side on a many-core GPU
    machine, measured here rather than guessed. Also "all": the whole per-image chain."""
    from concurrent.futures import ThreadPoolExecutor

    from effiseg.runtime.images import atomic_write, encode_mask_png, read_image, write_mask_png
    from effiseg.runtime.model_info import ModelInfo
    from effiseg.runtime.postprocess import count_regions, fill_host_row, output_to_mask, resize_rgb
    info = ModelInfo(path=None, variant="profile", input_height=size, input_width=size)
    rng = np.random.default_rng(0)
    decoded = [read_image(p) for p in images]
    logits = [smooth_logits(rng, size) for _ in images]
    masks = [output_to_mask(lg, "logits", threshold, rgb.shape[0], rgb.shape[1])[0]
             for lg, rgb in zip(logits, decoded)]
    pngs = [encode_mask_png(m) for m in masks]
    local = __import__("threading").local()

    def row():
        if not hasattr(local, "row"):
            local.row = np.zeros((size, size, 3), np.uint8)
        return local.row

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)

        def whole(i):
            rgb = read_image(images[i])
            fill_host_row(row(), resize_rgb(rgb, size, size), info)
            mask, _ = output_to_mask(logits[i], "logits", threshold, rgb.shape[0], rgb.shape[1])
            count_regions(mask)
            write_mask_png(out / f"all{i}.png", mask)

        stages = {
            "decode": lambda i: read_image(images[i]),
            "resize_into_slot": lambda i: fill_host_row(row(), resize_rgb(decoded[i], size, size), info),
            "mask_from_logits": lambda i: output_to_mask(logits[i], "logits", threshold, *decoded[i].shape[:2]),
            "count_regions": lambda i: count_regions(masks[i]),
            "png_encode": lambda i: encode_mask_png(masks[i]),
            "file_write": lambda i: atomic_write(out / f"{i}.png", lambda f: f.write(pngs[i])),
            "all": whole,
        }
        result = {}
        for name, fn in stages.items():
            rates = {}
            for k in (1, threads):
                with ThreadPoolExecutor(k) as pool:
                    list(pool.map(fn, range(len(images))))  # warm-up: codecs, thread start
                    best = 0.0
                    for _ in range(repeats):
                        t0 = time.perf_counter()
                        list(pool.map(fn, range(len(images))))
                        best = max(best, len(images) / (time.perf_counter() - t0))
                rates[k] = best
            result[name] = {"images_per_s_1_thread": rates[1], f"images_per_s_{threads}_threads": rates[threads],
                            "scaling": rates[threads] / rates[1]}
    return result


def pipeline_ceiling(images: list[Path], thread_counts: list[int], size: int = 352, batch: int = 8,
                     repeats: int = 3) -> dict:
    """images/s of the whole folder run (``Segmenter.run_folder``: decoder threads, double-buffered
    slots, writer threads, masks and summary files) with :class:`InstantBackend`, with k decoder
    and k writer threads for each k of ``thread_counts``; best of ``repeats`` runs after a
    warm-up run, and the pipeline's timing breakdown of that run."""
    import shutil

    from effiseg.runtime.model_info import ModelInfo
    from effiseg.runtime.segmenter import Segmenter
    info = ModelInfo(path=None, variant="host-ceiling", input_height=size, input_width=size)
    rng = np.random.default_rng(0)
    outputs = np.stack([smooth_logits(rng, size) for _ in range(16)])
    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "images"
        folder.mkdir()
        for i, path in enumerate(images):  # copies: a folder of exactly these images, on any OS
            shutil.copyfile(path, folder / f"{i:05d}{path.suffix.lower()}")
        for k in thread_counts:
            runs = []
            with Segmenter([InstantBackend(info, outputs, batch)], workers=k, writers=k) as segmenter:
                for r in range(repeats + 1):
                    summary = segmenter.run_folder(folder, Path(tmp) / f"masks_{k}_{r}")
                    if summary["n_failed"]:
                        raise RuntimeError(f"the ceiling run failed on {summary['n_failed']} image(s): "
                                           + "; ".join(f"{row['file']}: {row['error']}" for row in summary["files"]
                                                       if row["error"])[:500])
                    if r:  # run 0 warms threads and codecs up
                        runs.append(summary)
            best = max(runs, key=lambda s: s["images_per_s"])
            result[str(k)] = {"images_per_s": best["images_per_s"],
                              "images_per_s_runs": [s["images_per_s"] for s in runs],
                              "timing": best["timing"]}
    return {"batch": batch, "images": len(images), "threads": result}


@click.command(cls=Command)
@click.option("--images", "folder", type=click.Path(path_type=Path, exists=True, file_okay=False), required=True)
@click.option("--limit", type=int, default=50)
@click.option("--threads", type=click.IntRange(2, 256), default=None,
              help="Also measure how each stage scales from 1 to this many threads (GIL-bound stages "
                   "stay near 1x); use at most the number of idle cores.")
@click.option("--output", type=click.Path(path_type=Path), default=None, help="Also write the result as JSON.")
def main(folder, limit, threads, output):
    from effiseg.runtime.images import list_images
    images = list_images(folder)[:limit]
    if not images:
        raise click.ClickException(f"no images in {folder}")
    result = profile(images)
    for k, v in result.items():
        click.echo(f"{k:26s} {v:8.2f}")
    if threads:
        scaling = thread_scaling(images, threads)
        click.echo(f"\n{'stage':<18} {'1 thread img/s':>15} {f'{threads} threads img/s':>17} {'scaling':>8}")
        for name, r in scaling.items():
            click.echo(f"{name:<18} {r['images_per_s_1_thread']:>15.0f} "
                       f"{r[f'images_per_s_{threads}_threads']:>17.0f} {r['scaling']:>7.2f}x")
        click.echo("\npipeline ceiling (run_folder with a backend that costs nothing; k decoder + k writer threads):")
        ceiling = pipeline_ceiling(images, [1, threads])
        for k, r in ceiling["threads"].items():
            runs = ", ".join(f"{x:.0f}" for x in r["images_per_s_runs"])
            click.echo(f"  {k:>3} + {k:<3} threads: {r['images_per_s']:8.0f} img/s (runs: {runs})")
        result = {"per_image_ms": result, "thread_scaling": scaling, "threads": threads,
                  "pipeline_ceiling": ceiling}
    if output:
        output.write_text(json.dumps(result, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
