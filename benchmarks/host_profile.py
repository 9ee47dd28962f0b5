"""Host-side cost of the inference pipeline, per image and per stage, on this machine's CPU.

The GPU finishes a batch long before the host has decoded and written it (benchmarks/RESULTS.md);
this measures what each host stage costs, single-threaded, so the ceiling of the double-buffered
pipeline can be read off without a GPU:

    python -m effiseg.benchmarks.host_profile --images ../shared/data/kvasir-seg/test/images

Stages are the runtime's own functions, in the order the pipeline calls them.
"""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import click
import numpy as np


def profile(images: list[Path], size: int = 352, threshold: float = 0.5, repeats: int = 3) -> dict:
    from effiseg.runtime.images import list_images, read_image, write_mask_png  # noqa: F401
    from effiseg.runtime.model_info import ModelInfo
    from effiseg.runtime.postprocess import count_regions, fill_host_row, output_to_mask, resize_rgb
    info = ModelInfo(path=None, variant="profile", input_height=size, input_width=size)
    row = np.zeros((size, size, 3), np.uint8)
    rng = np.random.default_rng(0)
    stages = {"decode": [], "resize_into_slot": [], "mask_from_logits": [], "count_regions": [], "png_write": []}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(repeats):
            for i, path in enumerate(images):
                t0 = time.perf_counter()
                rgb = read_image(path)
                t1 = time.perf_counter()
                fill_host_row(row, resize_rgb(rgb, size, size), info)  # what the decoder threads do
                t2 = time.perf_counter()
                # A smooth random logit map stands in for the network's output (same shape/dtype).
                logits = (rng.standard_normal((size // 16, size // 16)).repeat(16, 0).repeat(16, 1) * 4).astype(np.float32)
                mask, _ = output_to_mask(logits, "logits", threshold, rgb.shape[0], rgb.shape[1])
                t3 = time.perf_counter()
                count_regions(mask)
                t4 = time.perf_counter()
                write_mask_png(Path(tmp) / f"{i}.png", mask)
                t5 = time.perf_counter()
                for k, (a, b) in zip(stages, ((t0, t1), (t1, t2), (t2, t3), (t3, t4), (t4, t5))):
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

    from effiseg.runtime.images import read_image, write_mask_png
    from effiseg.runtime.model_info import ModelInfo
    from effiseg.runtime.postprocess import count_regions, fill_host_row, output_to_mask, resize_rgb
    info = ModelInfo(path=None, variant="profile", input_height=size, input_width=size)
    rng = np.random.default_rng(0)
    decoded = [read_image(p) for p in images]
    logits = [(rng.standard_normal((size // 16, size // 16)).repeat(16, 0).repeat(16, 1) * 4).astype(np.float32)
              for _ in images]
    masks = [output_to_mask(lg, "logits", threshold, rgb.shape[0], rgb.shape[1])[0]
             for lg, rgb in zip(logits, decoded)]
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
            "png_write": lambda i: write_mask_png(out / f"{i}.png", masks[i]),
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


@click.command()
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
        result = {"per_image_ms": result, "thread_scaling": scaling, "threads": threads}
    if output:
        output.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
