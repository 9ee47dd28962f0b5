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
    from effiseg.runtime.postprocess import count_regions, fill_host_row, output_to_mask
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
                fill_host_row(row, rgb, info)
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


@click.command()
@click.option("--images", "folder", type=click.Path(path_type=Path, exists=True, file_okay=False), required=True)
@click.option("--limit", type=int, default=50)
@click.option("--output", type=click.Path(path_type=Path), default=None, help="Also write the result as JSON.")
def main(folder, limit, output):
    from effiseg.runtime.images import list_images
    result = profile(list_images(folder)[:limit])
    for k, v in result.items():
        click.echo(f"{k:26s} {v:8.2f}")
    if output:
        output.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
