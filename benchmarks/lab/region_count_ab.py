"""Region counting, SciPy's labelling against the runtime's numpy one, on 1 and 2 threads.

    python -m effiseg.benchmarks.lab.region_count_ab /work/shared/data/kvasir-seg/test/masks --output region_count.json

Masks: the folder's ground-truth masks (cut at 128) and as many smooth random blob masks (the
stand-in host_profile thresholds). Per labelling and thread count: the best masks/s of 5 passes.
``--base REV`` adds the numpy labelling of that git revision (its runtime/postprocess.py), after
checking that it counts the same regions on every mask as the working tree's:

    python -m effiseg.benchmarks.lab.region_count_ab /work/shared/data/kvasir-seg/test/masks --base 4fbda96 \
        --output benchmarks/results/host-pipeline-2026-12-08/round2/region_count_forest.json
"""
from __future__ import annotations

import json
import subprocess
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


def _count_regions_at(revision: str):
    """count_regions_numpy as runtime/postprocess.py had it at ``revision`` (git show)."""
    source = subprocess.check_output(["git", "show", f"{revision}:runtime/postprocess.py"], text=True)
    source = source.replace("from .model_info", "from effiseg.runtime.model_info")
    import sys
    import types
    module = types.ModuleType(f"postprocess_at_{revision}")
    sys.modules[module.__name__] = module  # its dataclasses look their module up
    exec(compile(source, f"{revision}:runtime/postprocess.py", "exec"), module.__dict__)
    return module.count_regions_numpy


@click.command()
@click.argument("folder", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--output", type=click.Path(path_type=Path), default=None)
@click.option("--base", default=None, help="also time the numpy labelling of this git revision")
def main(folder: Path, output: Path | None, base: str | None) -> None:
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
    if base:
        ways[f"numpy_at_{base}"] = _count_regions_at(base)
        for masks in (real, blobs):
            for mask in masks:
                if ways[f"numpy_at_{base}"](mask) != count_regions_numpy(mask):
                    raise click.ClickException(f"the counts differ from {base}'s on a mask")
    result = {name: {way: {f"{k}_threads": rate(fn, masks, k) for k in (1, 2)} for way, fn in ways.items()}
              for name, masks in (("ground_truth_masks", real), ("blob_masks", blobs))}
    click.echo(json.dumps(result, indent=2))
    if output:
        output.write_text(json.dumps(result, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
