"""The folder of image files the end-to-end benchmark reads.

Sources, first that exists: an explicit folder (``--images-from``), the Kvasir-SEG test split
(``$EFFISEG_DATA/test/images``, else ``../shared/data/kvasir-seg/test/images`` beside the
repository), images bundled with the runtime (``effiseg/runtime/samples``), else synthetic JPEGs.
The folder gets exactly ``n`` files: sources are cycled when they are fewer than ``n``. Each copy
keeps its source's name after a running number, so a failure in the end-to-end run names the file,
and every source file is decoded before it is copied, so an unreadable one stops the benchmark
before any timing, with its name and the reason.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from .hostprep import synthetic_images

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
MAX_NAMED = 10  # unreadable files named in an error; the count says how many more


def _images_in(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    from effiseg.runtime.images import list_images
    return list_images(folder)


def unreadable_images(files: list[Path]) -> list[tuple[Path, str]]:
    """(file, reason) for each file the pipeline's own decoder refuses (the reasons are its messages)."""
    from effiseg.runtime.images import ImageError, read_image
    bad = []
    for path in files:
        try:
            read_image(path)
        except ImageError as e:
            bad.append((path, str(e)))
    return bad


def candidate_sources(explicit: str | Path | None = None) -> list[tuple[str, Path]]:
    sources: list[tuple[str, Path]] = []
    if explicit:
        sources.append(("given folder", Path(explicit)))
    env = os.environ.get("EFFISEG_DATA")
    if env:
        sources.append(("Kvasir-SEG test split ($EFFISEG_DATA)", Path(env) / "test" / "images"))
    repo = Path(__file__).resolve().parents[1]
    sources.append(("Kvasir-SEG test split", repo.parent / "shared" / "data" / "kvasir-seg" / "test" / "images"))
    try:
        import effiseg.runtime as runtime_pkg
        sources.append(("bundled sample images", Path(runtime_pkg.__file__).parent / "samples"))
    except ImportError:
        pass
    return sources


def prepare_image_folder(dest: str | Path, n: int, height: int, width: int,
                         source: str | Path | None = None) -> dict:
    """Fill ``dest`` (created, must be empty or absent) with ``n`` images; returns where they came
    from. A given ``source`` that holds no images is an error, not a silent fallback."""
    if n < 1:
        raise ValueError("the end-to-end benchmark needs at least one image")
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    if any(dest.iterdir()):
        raise ValueError(f"{dest} is not empty")
    for name, folder in candidate_sources(source):
        files = _images_in(folder)
        if not files:
            if name == "given folder":
                raise ValueError(f"--images-from {folder}: no image files there")
            continue
        used = files[:n]
        unreadable = unreadable_images(used)
        if unreadable:
            where = f"--images-from {folder}" if name == "given folder" else f"{name} {folder}"
            listed = "; ".join(f"{path.name}: {reason}" for path, reason in unreadable[:MAX_NAMED])
            more = f"; and {len(unreadable) - MAX_NAMED} more" if len(unreadable) > MAX_NAMED else ""
            raise ValueError(f"{where}: {len(unreadable)} of {len(used)} image files cannot be read: {listed}{more}")
        for i in range(n):
            src = files[i % len(files)]
            shutil.copyfile(src, dest / f"{i:06d}_{src.stem}{src.suffix.lower()}")
        return {"source": name, "folder": str(folder), "files": n, "distinct": len(used)}
    from PIL import Image
    for i, rgb in enumerate(synthetic_images(n, height, width, seed=1234)):
        Image.fromarray(rgb).save(dest / f"{i:06d}.jpg", quality=90)
    return {"source": "synthetic", "folder": None, "files": n, "distinct": n}
