"""What a mask PNG costs to encode, and how large it is, for zlib levels and strategies.

    python -m effiseg.benchmarks.lab.png_settings /work/shared/data/kvasir-seg/test/masks --output png_settings.json

Each setting encodes the masks (ground-truth masks of the folder, cut at 128) as an 8-bit 0/255
grayscale PNG with filter 0 (what ``encode_mask_png`` writes); per setting the median ms per mask
over ``--repeats`` passes and the mean file size. One thread, on whatever else the machine runs.
"""
from __future__ import annotations

import json
import time
import zlib
from pathlib import Path

import click
import numpy as np
from PIL import Image

SETTINGS = {"level1_default": (1, zlib.Z_DEFAULT_STRATEGY), "level1_rle": (1, zlib.Z_RLE),
            "level1_huffman": (1, zlib.Z_HUFFMAN_ONLY), "level6_default": (6, zlib.Z_DEFAULT_STRATEGY),
            "level0_stored": (0, zlib.Z_DEFAULT_STRATEGY)}


def _scanlines(mask: np.ndarray) -> np.ndarray:
    rows = np.zeros((mask.shape[0], mask.shape[1] + 1), np.uint8)
    rows[:, 1:] = mask.astype(np.uint8) * 255
    return rows


def _scanlines_1bit(mask: np.ndarray) -> np.ndarray:
    packed = np.packbits(mask, axis=1)
    rows = np.zeros((mask.shape[0], packed.shape[1] + 1), np.uint8)
    rows[:, 1:] = packed
    return rows


def measure(masks: list[np.ndarray], repeats: int) -> dict:
    lines = [_scanlines(m) for m in masks]
    out = {}
    # A 1-bit grayscale PNG, scanlines made from the bool mask inside the timing (8-bit: outside, as the
    # runtime's 0/255 multiply is cheap); Pillow reads it back as mode "1" (True/False), not 0/255.
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        sizes = []
        for m in masks:
            packer = zlib.compressobj(1, zlib.DEFLATED, 15, 8, zlib.Z_RLE)
            sizes.append(len(packer.compress(_scanlines_1bit(m).data) + packer.flush()))
        times.append((time.perf_counter() - t0) / len(masks) * 1000)
    out["1bit_level1_rle"] = {"ms_per_mask": round(float(np.median(times)), 4), "mean_bytes": round(float(np.mean(sizes)), 1)}
    for name, (level, strategy) in SETTINGS.items():
        def encode(data):
            packer = zlib.compressobj(level, zlib.DEFLATED, 15, 8, strategy)
            return packer.compress(data) + packer.flush()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            sizes = [len(encode(x.data)) for x in lines]
            times.append((time.perf_counter() - t0) / len(lines) * 1000)
        out[name] = {"ms_per_mask": round(float(np.median(times)), 4), "mean_bytes": round(float(np.mean(sizes)), 1)}
    return out


@click.command()
@click.argument("folder", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--repeats", type=int, default=7, show_default=True)
@click.option("--output", type=click.Path(path_type=Path), default=None, help="Also write the result as JSON.")
def main(folder: Path, repeats: int, output: Path | None) -> None:
    from effiseg.runtime.images import list_images
    masks = []
    for path in list_images(folder):
        with Image.open(path) as im:
            masks.append(np.asarray(im.convert("L")) > 127)
    if not masks:
        raise click.ClickException(f"no masks in {folder}")
    result = {"masks": len(masks), "settings": measure(masks, repeats)}
    for name, r in result["settings"].items():
        click.echo(f"{name:16s} {r['ms_per_mask']:.4f} ms/mask {r['mean_bytes']:>10.0f} bytes")
    if output:
        output.write_text(json.dumps(result, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
