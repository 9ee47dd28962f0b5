"""Counting regions on the model-size mask instead of the image-size one: same counts, little to gain.

Round 3 of issue 23 asked whether the writers could count regions on the 352 x 352 mask the model
gives rather than on the mask resized to the image (fewer pixels). Without a trained model here, the
model's output is stood in for by each Kvasir-SEG ground-truth mask resized to the model's size as
logits of +-4; the image-size mask is what the writers make of it (``resize_and_cut``). The script
counts both, reports how many counts differ and the time per mask of each count:

    python -m effiseg.benchmarks.lab.region_count_model_size /work/shared/data/kvasir-seg/test/masks \\
        --out benchmarks/results/host-pipeline-2026-12-08/round3/region_count_model_size.json
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import click
import numpy as np
from PIL import Image


@click.command()
@click.argument("masks_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--size", type=click.IntRange(8), default=352, show_default=True, help="the model's output size")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True, help="result JSON")
def main(masks_dir, size, out):
    from effiseg.benchmarks.machine import cpu_model
    from effiseg.runtime.images import list_images, read_image
    from effiseg.runtime.postprocess import count_regions, resize_and_cut
    differ, full_s, small_s, n = [], 0.0, 0.0, 0
    for path in list_images(masks_dir):
        truth = read_image(path)[..., 0]
        h, w = truth.shape
        logits = np.asarray(Image.fromarray(truth).resize((size, size), Image.BILINEAR)).astype(np.float32) / 255 * 8 - 4
        full = resize_and_cut(logits, h, w, 0.0)
        small = logits > 0
        t0 = time.perf_counter()
        a = count_regions(full)
        t1 = time.perf_counter()
        b = count_regions(small)
        t2 = time.perf_counter()
        full_s, small_s, n = full_s + t1 - t0, small_s + t2 - t1, n + 1
        if a != b:
            differ.append({"file": path.name, "image_size": a, "model_size": b})
    result = {"cpu": cpu_model(), "cpus": os.cpu_count(), "masks": n, "counts_differ": len(differ),
              "differing": differ, "ms_per_mask_image_size": round(full_s / n * 1000, 4),
              "ms_per_mask_model_size": round(small_s / n * 1000, 4)}
    click.echo(f"{n} masks: counts differ on {len(differ)}; {result['ms_per_mask_image_size']} ms per mask at the "
               f"image's size, {result['ms_per_mask_model_size']} ms at the model's")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
