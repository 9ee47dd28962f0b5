"""Does the fast JPEG path decode the same pixels as Pillow? Every image of a folder tree, both ways.

    python -m effiseg.benchmarks.lab.decode_identity /work/shared/data/kvasir-seg --output decode_identity.json

``read_image`` (simplejpeg for JPEG, runtime/images.py) against Pillow's own decode of the same file
(``Image.open(...).convert("RGB")``, the path every file took before): per file the largest absolute
difference of any channel value and the number of differing values; in total the largest difference,
the fraction of values that differ and the files that differ at all.
"""
from __future__ import annotations

import json
import platform
from pathlib import Path

import click
import numpy as np
from PIL import Image


def compare(paths: list[Path]) -> dict:
    from effiseg.runtime.images import read_image, to_rgb
    import simplejpeg
    max_abs, differing, values, files_differing = 0, 0, 0, []
    for path in paths:
        fast = read_image(path)
        with Image.open(path) as im:
            im.load()
            reference = to_rgb(im)
        if fast.shape != reference.shape:
            files_differing.append({"file": str(path), "shape": [list(fast.shape), list(reference.shape)]})
            continue
        diff = np.abs(fast.astype(np.int16) - reference.astype(np.int16))
        n = int(np.count_nonzero(diff))
        values += diff.size
        differing += n
        max_abs = max(max_abs, int(diff.max()))
        if n:
            files_differing.append({"file": str(path), "max_abs_diff": int(diff.max()), "values_differing": n})
    return {"files": len(paths), "values_compared": values, "max_abs_diff": max_abs,
            "fraction_of_values_differing": differing / values if values else 0.0,
            "files_differing": files_differing, "simplejpeg": simplejpeg.__version__,
            "pillow": Image.__version__, "python": platform.python_version()}


@click.command()
@click.argument("root", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--output", type=click.Path(path_type=Path), default=None, help="Also write the result as JSON.")
def main(root: Path, output: Path | None) -> None:
    from effiseg.runtime.images import list_images
    paths = list_images(root, recursive=True)
    if not paths:
        raise click.ClickException(f"no images under {root}")
    click.echo(f"comparing {len(paths)} image(s) under {root} ...", err=True)
    result = compare(paths)
    click.echo(f"{result['files']} files: max abs diff {result['max_abs_diff']}, "
               f"{result['fraction_of_values_differing']:.3g} of values differ, "
               f"{len(result['files_differing'])} file(s) differ")
    if output:
        output.write_text(json.dumps(result, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
