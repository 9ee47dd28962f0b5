"""Kvasir-SEG on disk -> decoded arrays in memory.

Two layouts are read: the official split ``ROOT/{train,validation,test}/{images,masks}/`` and any
folder pair ``DIR/images`` + ``DIR/masks``. Images and masks are paired by file stem, never by
listing order. Masks are binarised at 127 (they are JPEG, so edges carry compression noise).
Every problem found (missing partner, unreadable file, size mismatch) is collected and reported
together in one :class:`DatasetError`, so a user fixes a folder in one pass.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from effiseg.runtime.images import to_rgb
from effiseg.runtime.postprocess import resize_rgb as _runtime_resize_rgb

# Where every command looks for Kvasir-SEG unless told: $EFFISEG_DATA, else the workplace layout
# (the dataset beside the repository, ../shared/data/kvasir-seg from its root).
DEFAULT_DATA_ROOT = os.environ.get("EFFISEG_DATA") or "../shared/data/kvasir-seg"

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"}
SPLITS = ("train", "validation", "test")
MASK_THRESHOLD = 127


class DatasetError(ValueError):
    def __init__(self, folder: Path, problems: list[str]):
        self.folder = folder
        self.problems = problems
        listing = "\n  - ".join(problems[:50])
        more = f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else ""
        super().__init__(f"{len(problems)} problem(s) in dataset {folder}:\n  - {listing}{more}")


@dataclass
class Sample:
    stem: str
    image: np.ndarray      # (H, W, 3) uint8 RGB
    mask: np.ndarray       # (H, W) bool
    image_path: Path
    mask_path: Path


def split_dir(root: str | Path, split: str | None) -> Path:
    """The folder holding images/ and masks/ for a split (or ``root`` itself when split is None)."""
    root = Path(root)
    folder = root / split if split else root
    if not (folder / "images").is_dir() or not (folder / "masks").is_dir():
        hint = f" (expected {root}/<{'|'.join(SPLITS)}>/images and masks)" if split else ""
        raise FileNotFoundError(f"{folder} has no images/ and masks/ folders{hint}")
    return folder


def _by_stem(folder: Path, problems: list[str]) -> dict[str, Path]:
    files: dict[str, Path] = {}
    # Compared case-folded: IMG.jpg and img.png would write one mask file on Windows and macOS.
    seen: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if not p.is_file() or p.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        if p.stem.casefold() in seen:
            problems.append(f"{p}: duplicate stem '{p.stem}' (also {seen[p.stem.casefold()].name})")
            continue
        seen[p.stem.casefold()] = files[p.stem] = p
    return files


def pair_files(folder: str | Path, problems: list[str] | None = None) -> list[tuple[str, Path, Path]]:
    """(stem, image_path, mask_path) for every image in ``folder/images`` with its mask. Given a
    ``problems`` list, pairing problems are added to it and the complete pairs returned (so that a
    caller can report them with the problems it finds in the files); otherwise they raise."""
    folder = Path(folder)
    collect = problems is not None
    problems = problems if collect else []
    images = _by_stem(folder / "images", problems)
    masks = _by_stem(folder / "masks", problems)
    for stem in sorted(set(images) - set(masks)):
        problems.append(f"{images[stem]}: no mask with stem '{stem}' in {folder / 'masks'}")
    for stem in sorted(set(masks) - set(images)):
        problems.append(f"{masks[stem]}: no image with stem '{stem}' in {folder / 'images'}")
    if not images and not masks:
        problems.append(f"{folder}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
    if problems and not collect:
        raise DatasetError(folder, problems)
    return [(s, images[s], masks[s]) for s in sorted(set(images) & set(masks), key=_natural_key)]


def _natural_key(stem: str):
    return (0, int(stem), "") if stem.isdigit() else (1, 0, stem)


def read_rgb(path: Path) -> np.ndarray:
    # The runtime's decoding policy (16-bit scaled by the image's maximum, alpha dropped), so that
    # training, evaluation and inference see the same pixels.
    with Image.open(path) as im:
        im.load()
        return to_rgb(im)


def read_mask(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        im.load()
        return np.asarray(im.convert("L"), dtype=np.uint8) > MASK_THRESHOLD


def read_or_note(read, path: Path, what: str, problems: list[str]):
    """``read(path)``, or None with "<path>: unreadable <what> (why)" added to ``problems``."""
    try:
        return read(path)
    except (OSError, UnidentifiedImageError, ValueError) as e:
        problems.append(f"{path}: unreadable {what} ({e.__class__.__name__}: {e})")
        return None


def load_pairs(folder: str | Path, limit: int | None = None) -> list[Sample]:
    folder = Path(folder)
    problems: list[str] = []
    samples: list[Sample] = []
    # Pairing problems and unreadable or mismatched files, all in one report.
    for stem, ip, mp in pair_files(folder, problems)[:limit]:
        image = read_or_note(read_rgb, ip, "image", problems)
        if image is None:
            continue
        mask = read_or_note(read_mask, mp, "mask", problems)
        if mask is None:
            continue
        if image.shape[:2] != mask.shape:
            problems.append(f"{ip}: image size {image.shape[1]}x{image.shape[0]} differs from mask "
                            f"{mp.name} size {mask.shape[1]}x{mask.shape[0]}")
            continue
        samples.append(Sample(stem, image, mask, ip, mp))
    if problems:
        raise DatasetError(folder, problems)
    return samples


def load_split(root: str | Path, split: str | None = None, limit: int | None = None) -> list[Sample]:
    """Decode a split (or an images/ + masks/ folder when split is None) into memory; ``limit``
    keeps the first N pairs in natural stem order."""
    return load_pairs(split_dir(root, split), limit)


def resize_rgb(image: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """PIL bilinear, the very function the runtime uses to fill its batch buffers."""
    h, w = (size, size) if isinstance(size, int) else size
    return _runtime_resize_rgb(image, h, w)


def resize_mask(mask: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    h, w = (size, size) if isinstance(size, int) else size
    if mask.shape == (h, w):
        return mask
    as_float = Image.fromarray(mask.astype(np.float32))
    return np.asarray(as_float.resize((w, h), Image.BILINEAR)) >= 0.5


def stack_samples(samples: list[Sample], size: int) -> tuple[np.ndarray, np.ndarray]:
    """(N, 3, S, S) uint8 images and (N, 1, S, S) uint8 {0,1} masks at the training size."""
    images = np.stack([resize_rgb(s.image, size) for s in samples]).transpose(0, 3, 1, 2)
    masks = np.stack([resize_mask(s.mask, size) for s in samples]).astype(np.uint8)[:, None]
    return np.ascontiguousarray(images), np.ascontiguousarray(masks)
