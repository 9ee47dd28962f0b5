"""Region counting, SciPy's labelling against the runtime's numpy one, on 1 and 2 threads.

    python -m effiseg.benchmarks.lab.region_count_ab /work/shared/data/kvasir-seg/test/masks --output region_count.json

Masks: the folder's ground-truth masks (cut at 128) and as many smooth random blob masks (the
stand-in host_profile thresholds). Per labelling and thread count: the best masks/s of 5 passes.
"""
from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import click
import numpy as np
from PIL import Image


def rate(fn, masks, threads: int, repeats: int = 5) -> float:
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(fn, masks))
        best = 0.0
        for _ in range(repeats):
            t0 = time.perf_counter()
            list(pool.map(fn, masks))
            best = max(best, len(masks) / (time.perf_counter() - t0))
    return round(best, 1)


@click.command()
@click.argument("folder", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--output", type=click.Path(path_type=Path), default=None)
def main(folder: Path, output: Path | None) -> None:
    from scipy.ndimage import label
    from effiseg.benchmarks.host_profile import smooth_logits
    from effiseg.runtime.images import list_images
    from effiseg.runtime.postprocess import count_regions_numpy
    eight = np.ones((3, 3), bool)
    real = []
    for p in list_images(folder):
        with Image.open(p) as im:
            real.append(np.asarray(im.convert("L")) > 127)
    rng = np.random.default_rng(0)
    blobs = [smooth_logits(rng, real[0].shape[0]) > 0 for _ in real]
    ways = {"scipy": lambda m: label(m, structure=eight)[1], "numpy": count_regions_numpy}
    result = {name: {way: {f"{k}_threads": rate(fn, masks, k) for k in (1, 2)} for way, fn in ways.items()}
              for name, masks in (("ground_truth_masks", real), ("blob_masks", blobs))}
    click.echo(json.dumps(result, indent=2))
    if output:
        output.write_text(json.dumps(result, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
