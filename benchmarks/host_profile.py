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

``--device-ms`` adds *fill and drain*: folder runs of several lengths with a device that takes a
known time per batch (:class:`DelayedBackend`, a stand-in for a GPU at the latency effiseg-bench
measured), so that the end-to-end/model-only ratio can be taken apart without a GPU: time before
the first batch reaches the device, device idle between batches, and time after the last one.
"""
from __future__ import annotations

import json
import os
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


class DelayedBackend(InstantBackend):
    """:class:`InstantBackend` with a fixed device time per batch, on one in-order queue the way a
    GPU stream runs: ``submit`` returns at once, the batch is done ``device_ms`` after the previous
    one (or after its own submit, if the device was idle) and ``collect`` sleeps until then, which
    releases the GIL as a stream synchronisation does. Under the pipeline it leaves the host's work
    plus a device of known speed, so an end-to-end run can be compared with the exact model-only
    time it would have: ``batches * device_ms``."""

    name = "delayed"

    def __init__(self, info, outputs: np.ndarray, max_batch: int, device_ms: float, n_slots: int = 2):
        super().__init__(info, outputs, max_batch, n_slots)
        self.device_s = device_ms / 1000.0
        self._done_at = [0.0] * n_slots
        self._device_free_at = 0.0
        self.reset_trace()

    def reset_trace(self) -> None:
        """Forget the last run's trace: when the first batch arrived, how long the device then sat
        idle between batches, and when the last batch was done."""
        self.first_submit_at: float | None = None
        self.idle_between_batches_s = 0.0

    @property
    def last_done_at(self) -> float:
        return self._device_free_at

    def submit(self, slot: int, n: int) -> None:
        super().submit(slot, n)
        now = time.perf_counter()
        if self.first_submit_at is None:
            self.first_submit_at = now
        elif now > self._device_free_at:
            self.idle_between_batches_s += now - self._device_free_at
        self._device_free_at = max(now, self._device_free_at) + self.device_s
        self._done_at[slot] = self._device_free_at

    def collect(self, slot: int) -> np.ndarray:
        wait = self._done_at[slot] - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        return super().collect(slot)


def _stand_in_model(variant: str, size: int):
    """The model description and output maps the stand-in backends hand back."""
    from effiseg.runtime.model_info import ModelInfo
    info = ModelInfo(path=None, variant=variant, input_height=size, input_width=size)
    rng = np.random.default_rng(0)
    return info, np.stack([smooth_logits(rng, size) for _ in range(16)])


def _copy_cycled(images: list[Path], folder: Path, n: int) -> Path:
    """A folder of exactly ``n`` copies of ``images``, cycled (plain copies: works on any OS)."""
    import shutil
    folder.mkdir()
    for i in range(n):
        src = images[i % len(images)]
        shutil.copyfile(src, folder / f"{i:06d}{src.suffix.lower()}")
    return folder


def _checked_run(segmenter, folder: Path, output: Path, what: str) -> dict:
    """One ``run_folder``; an image that fails makes the measurement meaningless, so it stops it."""
    from .e2e import failed_files
    summary = segmenter.run_folder(folder, output)
    if summary["n_failed"]:
        raise RuntimeError(f"the {what} run failed on {summary['n_failed']} image(s): {failed_files(summary)}")
    return summary


def fill_and_drain(images: list[Path], device_ms: float, batch: int, folder_sizes: list[int], threads: int,
                   slots: int = 2, size: int = 352, repeats: int = 3) -> dict:
    """End-to-end efficiency against folder length, with a device of known speed (:class:`DelayedBackend`).

    A folder run cannot hide everything: before the first batch reaches the device, its images must
    be decoded (fill), and after the last batch leaves it, its masks must be written (drain); the run
    also starts and ends its threads. Those costs are paid once per run, so ``efficiency`` (the
    device's busy time ``batches * device_ms`` over the run's wall time) grows with the number of
    batches, up to the host's ceiling. ``overhead_ms`` = wall - busy time, per run; near-constant
    across folder sizes when the device is the bottleneck. Best of ``repeats`` runs after a warm-up run.
    """
    from effiseg.runtime.segmenter import Segmenter
    info, outputs = _stand_in_model("fill-drain", size)
    rows = []
    device = DelayedBackend(info, outputs, batch, device_ms, n_slots=slots)
    with tempfile.TemporaryDirectory() as tmp, \
            Segmenter([device], workers=threads, writers=threads) as segmenter:
        for n in folder_sizes:
            folder = _copy_cycled(images, Path(tmp) / f"images_{n}", n)
            busy_s = -(-n // batch) * device_ms / 1000.0
            walls, pipeline_walls, traces = [], [], []
            for r in range(repeats + 1):
                device.reset_trace()
                t0 = time.perf_counter()  # the whole call, as the benchmark's end-to-end mode times it
                summary = _checked_run(segmenter, folder, Path(tmp) / f"masks_{n}_{r}", "fill/drain")
                t1 = time.perf_counter()
                elapsed = t1 - t0
                if r:  # run 0 warms threads and codecs up
                    walls.append(round(elapsed, 4))
                    pipeline_walls.append(summary["timing"]["wall_s"])
                    # Where the time beyond the device's busy time went: before the first batch
                    # reached the device (fill), between batches, and after the last one (drain).
                    traces.append({"fill_ms": round((device.first_submit_at - t0) * 1000, 2),
                                   "idle_between_batches_ms": round(device.idle_between_batches_s * 1000, 2),
                                   "drain_ms": round((t1 - device.last_done_at) * 1000, 2)})
            best = int(np.argmin(walls))
            wall = walls[best]
            rows.append({"images": n, "batches": -(-n // batch), "device_busy_s": round(busy_s, 4),
                         "wall_s": wall, "wall_s_runs": walls,
                         # the threaded pipeline alone; the rest of the call lists, summarises and writes its reports
                         "pipeline_wall_s": pipeline_walls[best],
                         "overhead_ms": round((wall - busy_s) * 1000, 2), **traces[best],
                         "efficiency": round(busy_s / wall, 4)})
    return {"device_ms_per_batch": device_ms, "batch": batch, "threads": threads, "slots": slots, "folders": rows}


def profile(images: list[Path], size: int = 352, threshold: float = 0.5, repeats: int = 3) -> dict:
    from effiseg.runtime.images import encode_mask_png, read_image, write_whole
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
                logits = smooth_logits(rng, size)  # the stand-in's making is not the runtime's cost
                t2 = time.perf_counter()
                mask, _ = output_to_mask(logits, "logits", threshold, rgb.shape[0], rgb.shape[1])
                t3 = time.perf_counter()
                count_regions(mask)
                t4 = time.perf_counter()
                data = encode_mask_png(mask)  # write_mask_png's two steps, timed apart
                t5 = time.perf_counter()
                write_whole(Path(tmp) / f"{i}.png", data)
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

    from effiseg.runtime.images import encode_mask_png, read_image, write_mask_png, write_whole
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
            "file_write": lambda i: write_whole(out / f"{i}.png", pngs[i]),
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
    from effiseg.runtime.segmenter import Segmenter
    info, outputs = _stand_in_model("host-ceiling", size)
    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = _copy_cycled(images, Path(tmp) / "images", len(images))
        for k in thread_counts:
            runs, cpu_ms = [], []
            with Segmenter([InstantBackend(info, outputs, batch)], workers=k, writers=k) as segmenter:
                for r in range(repeats + 1):
                    before = os.times()
                    summary = _checked_run(segmenter, folder, Path(tmp) / f"masks_{k}_{r}", "ceiling")
                    after = os.times()
                    if r:  # run 0 warms threads and codecs up
                        runs.append(summary)
                        cpu = (after.user - before.user) + (after.system - before.system)
                        cpu_ms.append(round(cpu / len(images) * 1000, 3))
            best = max(runs, key=lambda s: s["images_per_s"])
            result[str(k)] = {"images_per_s": best["images_per_s"],
                              "images_per_s_runs": [s["images_per_s"] for s in runs],
                              # CPU time of the whole process (every thread) per image: less swayed than
                              # wall time by what else the machine runs, though lock and GIL contention
                              # still show in it.
                              "cpu_ms_per_image": float(np.median(cpu_ms)), "cpu_ms_per_image_runs": cpu_ms,
                              "timing": best["timing"]}
    return {"batch": batch, "images": len(images), "threads": result}


@click.command(cls=Command)
@click.option("--images", "folder", type=click.Path(path_type=Path, exists=True, file_okay=False), required=True)
@click.option("--limit", type=int, default=50)
@click.option("--threads", type=click.IntRange(2, 256), default=None,
              help="Also measure how each stage scales from 1 to this many threads (GIL-bound stages "
                   "stay near 1x); use at most the number of idle cores.")
@click.option("--device-ms", type=click.FloatRange(0.0, min_open=True), default=None,
              help="Also measure end-to-end efficiency against folder length with a device that takes this "
                   "many ms per batch (e.g. a GPU's model-only latency from effiseg-bench).")
@click.option("--batch", type=click.IntRange(1, 1024), default=8, show_default=True,
              help="Batch size of the --device-ms runs.")
@click.option("--folder-sizes", default="32,64,128,256", show_default=True,
              help="Folder lengths (images) of the --device-ms runs, comma-separated.")
@click.option("--slots", type=click.IntRange(1, 8), default=2, show_default=True,
              help="Slots of the --device-ms runs' backend (effiseg-run --slots; the runtime's default is 2).")
@click.option("--output", type=click.Path(path_type=Path), default=None, help="Also write the result as JSON.")
@click.option("--workdir", type=click.Path(path_type=Path, exists=True, file_okay=False), default=None,
              help="Folder for the image copies and masks [default: the system's temporary folder]. Creating a "
                   "file can cost far more on one disk than on another (on this project's VM: ~500 us on ext4, 7 us "
                   "on tmpfs; benchmarks/results/host-pipeline-2026-12-08/round4): name the disk you mean to measure.")
def main(folder, limit, threads, device_ms, batch, folder_sizes, slots, output, workdir):
    from effiseg.runtime.images import list_images
    from effiseg.runtime.pipeline import default_workers
    try:
        sizes = [int(x) for x in folder_sizes.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(f"{folder_sizes!r}: expected whole numbers such as 32,64,128",
                                 param_hint="--folder-sizes") from None
    if not sizes or min(sizes) < 1:
        raise click.BadParameter(f"{folder_sizes!r}: expected folder lengths of at least 1 image",
                                 param_hint="--folder-sizes")
    images = list_images(folder)[:limit]
    if not images:
        raise click.ClickException(f"no images in {folder}")
    if workdir is not None:
        tempfile.tempdir = str(workdir.resolve())  # every TemporaryDirectory below lands there
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
            click.echo(f"  {k:>3} + {k:<3} threads: {r['images_per_s']:8.0f} img/s (runs: {runs}), "
                       f"{r['cpu_ms_per_image']:.2f} CPU ms per image")
        result = {"per_image_ms": result, "thread_scaling": scaling, "threads": threads,
                  "pipeline_ceiling": ceiling}
    if device_ms:
        k = threads or default_workers()  # the segmenter's own default, as effiseg-bench runs it
        click.echo(f"\nfill and drain: a device of {device_ms:g} ms per batch of {batch}, {slots} slots, "
                   f"{k} decoder + {k} writer threads:")
        runs = fill_and_drain(images, device_ms, batch, sizes, k, slots)
        click.echo(f"{'images':>7} {'batches':>8} {'device busy ms':>15} {'wall ms':>9} {'overhead ms':>12} "
                   f"{'= fill':>7} {'+ idle':>7} {'+ drain':>8} {'efficiency':>11}")
        for row in runs["folders"]:
            click.echo(f"{row['images']:>7} {row['batches']:>8} {row['device_busy_s'] * 1000:>15.1f} "
                       f"{row['wall_s'] * 1000:>9.1f} {row['overhead_ms']:>12.1f} {row['fill_ms']:>7.1f} "
                       f"{row['idle_between_batches_ms']:>7.1f} {row['drain_ms']:>8.1f} {row['efficiency']:>11.3f}")
        result = result if "per_image_ms" in result else {"per_image_ms": result}
        result["fill_and_drain"] = runs
    if output:
        result = result if "per_image_ms" in result else {"per_image_ms": result}
        result["workdir"] = tempfile.gettempdir()
        output.write_text(json.dumps(result, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
