"""A mask at an image's size from a model-sized map: interpolate every pixel, or decide by cells?

    python -m effiseg.benchmarks.lab.mask_upscale --output mask_upscale.json

``resize_bilinear(map, H, W) > cut`` (every pixel interpolated, the runtime's path before
2026-12-08) against ``resize_and_cut`` (cells whose 2x2 values agree decided at the map's size,
only the outline interpolated), for a 352 x 352 map and image sizes from the model's own to 1080p.
Two maps: one round polyp-like blob (what the model outputs on most Kvasir images), and the
blocky random blobs host_profile uses (far more outline). Median ms of ``--repeats`` calls of each,
in turn, on one thread; both results are checked equal.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import click
import numpy as np

SIZES = [(352, 352), (400, 400), (576, 720), (1080, 1350), (1080, 1920)]


def _interleaved_median_ms(first, second, repeats: int) -> tuple[float, float]:
    """Median ms of each, the two called in turn (so that load from elsewhere hits both alike)."""
    times: tuple[list, list] = ([], [])
    for _ in range(repeats):
        for fn, out in ((first, times[0]), (second, times[1])):
            t0 = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t0) * 1000)
    return round(float(np.median(times[0])), 3), round(float(np.median(times[1])), 3)


@click.command()
@click.option("--repeats", type=click.IntRange(3, 1000), default=21, show_default=True)
@click.option("--output", type=click.Path(path_type=Path), default=None)
def main(repeats: int, output: Path | None) -> None:
    from effiseg.benchmarks.host_profile import smooth_logits
    from effiseg.runtime.postprocess import resize_and_cut, resize_bilinear
    yy, xx = np.mgrid[0:352, 0:352]
    maps = {"one_blob": (4 * (1 - np.hypot(yy - 150, xx - 200) / 80)).astype(np.float32),
            "random_blobs": smooth_logits(np.random.default_rng(0), 352)}
    result = {}
    for name, values in maps.items():
        for h, w in SIZES:
            plain = resize_bilinear(values, h, w) > 0.0
            if not np.array_equal(plain, resize_and_cut(values, h, w, 0.0)):
                raise click.ClickException(f"{name} at {h}x{w}: the two paths differ")
            every, cells = _interleaved_median_ms(lambda: resize_bilinear(values, h, w) > 0.0,
                                                  lambda: resize_and_cut(values, h, w, 0.0), repeats)
            result[f"{name}@{h}x{w}"] = {"every_pixel_ms": every, "by_cells_ms": cells,
                                         "speedup": round(every / cells, 2) if cells else None}
            click.echo(f"{name:>13} {h:>5}x{w:<5} every pixel {every:8.3f} ms   by cells {cells:8.3f} ms")
    if output:
        output.write_text(json.dumps(result, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
