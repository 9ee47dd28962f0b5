"""Controlled image shifts that mimic another hospital's endoscope, for the robustness study.

Kvasir-SEG comes from one centre's scopes; a user's frames come from other scopes, video
processors, light sources and recorders. Each shift here imitates one way such a device differs,
with a ``strength`` in [0, 1]: 0 is the identity (the image and mask come back unchanged), 1 is the
far end of what a different device plausibly does (the physical value at 1 is in each shift's
``at_full``). Strengths in between scale the physical parameter.

Randomness (a warm or cool light, a noise pattern, the axis of an aspect change) is drawn per
image from ``(seed, shift name, image stem)``, never from the strength: the levels of one shift
reuse the same draws, so a curve over strengths changes only in how far the image is moved.

Masks: geometric shifts (``aspect``) move the mask with the image. Photometric shifts leave it.
``border`` paints black over parts of the frame (another scope's round field of view and its
overlay box); the mask is cleared under the paint, as for the overlay-box augmentation: nobody can
segment a polyp under a black mask, and the question is whether the new layout confuses the model
(false positives at the edge of the field, polyps near it lost), not whether it sees through paint.
"""
from __future__ import annotations

import io
import zlib
from dataclasses import dataclass
from typing import Callable

import numpy as np
from PIL import Image

# Scale factor: the images' values as floats in [0, 1].
_U8 = 255.0


def _to_float(image: np.ndarray) -> np.ndarray:
    return image.astype(np.float32) / _U8


def _to_u8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x * _U8), 0, 255).astype(np.uint8)


def _signed(rng: np.random.Generator) -> float:
    return 1.0 if rng.random() < 0.5 else -1.0


def colour_temperature(image, mask, s, rng):
    """A warmer or cooler light source and white balance: red and blue gains in opposite directions
    (up to +-30 %) with a green/magenta tint up to +-8 %, direction drawn per image."""
    warm = _signed(rng) * 0.30 * s
    tint = rng.uniform(-0.08, 0.08) * s
    gains = np.array([1.0 + warm, 1.0 + tint, 1.0 - warm], dtype=np.float32)
    return _to_u8(_to_float(image) * gains), mask


def gamma(image, mask, s, rng):
    """Another processor's tone curve: out = in ** g with g = 1.8 ** (+-s), lighter or darker per image."""
    g = 1.8 ** (_signed(rng) * s)
    return _to_u8(_to_float(image) ** g), mask


def contrast(image, mask, s, rng):
    """Contrast scaled about the image mean by 1 +- 0.5 s (flatter or harsher per image)."""
    factor = 1.0 + _signed(rng) * 0.5 * s
    x = _to_float(image)
    mean = x.mean(axis=(0, 1), keepdims=True)
    return _to_u8((x - mean) * factor + mean), mask


def jpeg(image, mask, s, rng):
    """Re-encoded as JPEG (4:2:0) at quality 95 - 85 s (10 at full strength): a recorder's codec."""
    if s <= 0:
        return image, mask
    quality = int(round(95 - 85 * s))
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality, subsampling=2)
    buf.seek(0)
    with Image.open(buf) as im:
        return np.asarray(im.convert("RGB")).copy(), mask


def _disc_kernel(radius: float) -> np.ndarray:
    """A defocus (pillbox) kernel, its edge anti-aliased by 4 x 4 supersampling."""
    r = int(np.ceil(radius))
    sub = (np.arange(4) + 0.5) / 4 - 0.5
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1].astype(np.float64)
    inside = sum(((yy + dy) ** 2 + (xx + dx) ** 2 <= radius ** 2) for dy in sub for dx in sub) / 16.0
    return inside / inside.sum()


def defocus(image, mask, s, rng):
    """Out of focus: a pillbox blur of radius 4 s pixels (of a 352-pixel frame)."""
    radius = 4.0 * s
    if radius < 0.25:
        return image, mask
    from scipy.ndimage import convolve
    k = _disc_kernel(radius).astype(np.float32)
    x = _to_float(image)
    out = np.stack([convolve(x[..., c], k, mode="reflect") for c in range(3)], axis=-1)
    return _to_u8(out), mask


def sensor_noise(image, mask, s, rng):
    """Shot and read noise of a smaller or older sensor: Gaussian with standard deviation
    0.06 s * sqrt(0.1 + 0.9 x) per channel (x the value in [0, 1]): 6 % of full scale in the highlights."""
    x = _to_float(image)
    sigma = 0.06 * s * np.sqrt(0.1 + 0.9 * x)
    return _to_u8(x + sigma * rng.standard_normal(x.shape, dtype=np.float32)), mask


def resolution(image, mask, s, rng):
    """A lower-resolution sensor or a downscaled recording: area-downscaled by 1 + 3 s (4x at full
    strength), then upscaled bilinearly back to the frame's size."""
    factor = 1.0 + 3.0 * s
    h, w = image.shape[:2]
    small = (max(1, int(round(w / factor))), max(1, int(round(h / factor))))
    if small == (w, h):
        return image, mask
    im = Image.fromarray(image).resize(small, Image.BOX).resize((w, h), Image.BILINEAR)
    return np.asarray(im).copy(), mask


def vignetting(image, mask, s, rng):
    """Light falling off towards the corners: gain 1 - 0.6 s r^2 (r = 1 at the corners)."""
    h, w = image.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    r2 = ((xx - (w - 1) / 2) / (w / 2)) ** 2 + ((yy - (h - 1) / 2) / (h / 2)) ** 2
    gain = 1.0 - 0.6 * s * r2 / 2.0
    return _to_u8(_to_float(image) * gain[..., None]), mask


def border(image, mask, s, rng):
    """Another scope's layout: a round field of view (black outside an ellipse whose semi-axes
    shrink from 1.45 to 1.0 of the half-frame, which is the inscribed ellipse at full strength) and
    a black overlay box with light text bars in the upper right (Kvasir's sits lower left), up to
    28 % x 14 % of the frame. The mask is cleared under the black."""
    h, w = image.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    radius = 1.45 - 0.45 * s
    r2 = ((xx - (w - 1) / 2) / (w / 2)) ** 2 + ((yy - (h - 1) / 2) / (h / 2)) ** 2
    black = r2 > radius ** 2
    bw, bh = int(round(0.28 * s * w)), int(round(0.14 * s * h))
    out = image.copy()
    if bw > 0 and bh > 0:
        y0, x0 = int(0.03 * h), w - bw - int(0.03 * w)
        black[y0:y0 + bh, x0:x0 + bw] = True
        out[black] = 0
        # Text: light bars, three lines down the box.
        for row in range(y0 + bh // 10, y0 + bh, max(2, bh // 3)):
            out[row:row + max(1, bh // 8), x0 + bw // 10:x0 + bw - bw // 10] = 220
    else:
        out[black] = 0
    return out, mask & ~black


def aspect(image, mask, s, rng):
    """A frame of another aspect ratio squeezed into this one (the network sees a square): the
    content is stretched by 1 + 0.5 s along one axis (horizontal or vertical, drawn per image) and
    centre-cropped back to the frame's size. The mask is transformed the same way."""
    factor = 1.0 + 0.5 * s
    h, w = image.shape[:2]
    horizontal = rng.random() < 0.5
    nw, nh = (int(round(w * factor)), h) if horizontal else (w, int(round(h * factor)))
    if (nw, nh) == (w, h):
        return image, mask
    im = np.asarray(Image.fromarray(image).resize((nw, nh), Image.BILINEAR))
    mk = np.asarray(Image.fromarray(mask.astype(np.float32)).resize((nw, nh), Image.BILINEAR)) >= 0.5
    y0, x0 = (nh - h) // 2, (nw - w) // 2
    return im[y0:y0 + h, x0:x0 + w].copy(), mk[y0:y0 + h, x0:x0 + w].copy()


@dataclass(frozen=True)
class Shift:
    name: str
    kind: str            # "photometric" (mask kept), "geometric" (mask moved), "occluding" (mask cleared)
    at_full: str         # the physical change at strength 1
    apply: Callable


SHIFTS: dict[str, Shift] = {s.name: s for s in (
    Shift("colour_temperature", "photometric", "R/B gains 1.3/0.7 or 0.7/1.3, tint +-8 %", colour_temperature),
    Shift("gamma", "photometric", "gamma 1.8 or 1/1.8", gamma),
    Shift("contrast", "photometric", "contrast x1.5 or x0.5", contrast),
    Shift("jpeg", "photometric", "JPEG quality 10 (4:2:0)", jpeg),
    Shift("defocus", "photometric", "pillbox blur, radius 4 px", defocus),
    Shift("sensor_noise", "photometric", "noise sd 6 % of full scale in highlights", sensor_noise),
    Shift("resolution", "photometric", "4x downscale, then upscale", resolution),
    Shift("vignetting", "photometric", "corners at 40 % brightness", vignetting),
    Shift("border", "occluding", "round field of view + top-right overlay box", border),
    Shift("aspect", "geometric", "content stretched x1.5 on one axis", aspect),
)}


def parse_shifts(spec: str | None) -> list[str]:
    """'all' / None -> every shift; else a comma-separated list of names, checked."""
    if spec is None or spec.strip() in ("", "all"):
        return list(SHIFTS)
    names = [n.strip() for n in spec.split(",") if n.strip()]
    unknown = [n for n in names if n not in SHIFTS]
    if unknown:
        raise ValueError(f"unknown shift(s) {', '.join(unknown)}; known: {', '.join(SHIFTS)}")
    return list(dict.fromkeys(names))


def shift_rng(seed: int, shift: str, stem: str) -> np.random.Generator:
    """The per-image random stream: the same for every strength of one shift (see module docstring)."""
    return np.random.default_rng([int(seed), zlib.crc32(shift.encode()), zlib.crc32(stem.encode())])


def apply_shift(name: str, image: np.ndarray, mask: np.ndarray, strength: float, seed: int = 0,
                stem: str = "") -> tuple[np.ndarray, np.ndarray]:
    """``image`` (H, W, 3) uint8 and ``mask`` (H, W) bool under shift ``name`` at ``strength``."""
    if name not in SHIFTS:
        raise ValueError(f"unknown shift {name!r}; known: {', '.join(SHIFTS)}")
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"shift strength must be in [0, 1], got {strength}")
    if strength == 0:
        return image, mask
    return SHIFTS[name].apply(image, mask, float(strength), shift_rng(seed, name, stem))
