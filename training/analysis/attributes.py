"""Per-image attributes that may explain where a segmentation goes wrong.

Every extractor is a small pure function of the image (H, W, 3) uint8 RGB, the ground-truth mask
(H, W) bool and/or the predicted mask (H, W) bool, computed at the image's native resolution
(Kvasir-SEG here: 352 x 352). Pixel constants below are stated for that resolution.

Conventions
* Regions are connected components with 8-connectivity; components smaller than
  :data:`MIN_REGION_PIXELS` are ignored when counting (JPEG-compressed masks carry specks).
* The *field of view* (FOV) is the endoscope's lit area: everything except the near-black frame
  that touches the image border (the octagonal vignette, side margins) and the scope-position
  overlay box. Photometric attributes (luminance, blur, highlights) are computed inside the FOV so
  that an image's frame shape and overlay do not masquerade as "dark" or "sharp".
* Luminance is Rec. 601 luma ``0.299 R + 0.587 G + 0.114 B`` scaled to [0, 1].
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

# Components smaller than this many pixels (at 352 x 352: a 4 x 4 speck) are not polyps.
MIN_REGION_PIXELS = 16
# A ground-truth polyp counts as found when the prediction covers at least this fraction of it.
DETECTION_MIN_COVERAGE = 0.5
# Error pixels within this many pixels of the true polyp boundary are "boundary" errors.
BOUNDARY_BAND_PX = 5
# Overlay box: dark = every channel at most this; green = hue 90-180 deg, saturation >= 0.5.
OVERLAY_DARK_MAX = 40
OVERLAY_GREEN_HUE = (90.0, 180.0)
OVERLAY_GREEN_MIN_SATURATION = 0.5
OVERLAY_GREEN_MIN_VALUE = 0.35
# A box must be filled to OVERLAY_MIN_FILL with dark/green pixels overall and to
# OVERLAY_MIN_EDGE_FILL along its top row and right column, and each side must be
# between these fractions of the image (Kvasir's box is about a third of the image side).
OVERLAY_MIN_FILL = 0.95
OVERLAY_MIN_SIDE_FRACTION = 0.2
OVERLAY_MAX_SIDE_FRACTION = 0.6
OVERLAY_MIN_EDGE_FILL = 0.9
OVERLAY_CLOSING_PX = 5
# Specular highlight: HSV value >= 0.9 and saturation <= 0.2 (near-white, whatever the tint).
SPECULAR_MIN_VALUE = 0.9
SPECULAR_MAX_SATURATION = 0.2
# Frame: near-black (max channel <= this) connected to the image border.
FRAME_DARK_MAX = 25
# The blur measure ignores this many pixels inside the FOV edge (the frame's edge is sharp).
BLUR_FOV_MARGIN_PX = 4
# Width of the ring around the polyp used for its contrast against the surrounding mucosa.
CONTRAST_RING_PX = 15

_EIGHT = np.ones((3, 3), dtype=bool)


def _as_bool(mask: np.ndarray) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"expected a 2-D mask, got shape {mask.shape}")
    return mask.astype(bool, copy=False)


def _as_rgb(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 RGB image, got {image.shape} {image.dtype}")
    return image


# ----------------------------------------------------------------------------------------------
# Regions
# ----------------------------------------------------------------------------------------------

def connected_regions(mask: np.ndarray, min_pixels: int = MIN_REGION_PIXELS) -> tuple[np.ndarray, int]:
    """Label 8-connected components of ``mask``, dropping those below ``min_pixels``.

    Returns ``(labels, n)``: labels are 1..n (consecutive) for kept regions, 0 elsewhere.
    """
    labels, n = ndimage.label(_as_bool(mask), structure=_EIGHT)
    if n == 0:
        return labels, 0
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    keep = sizes >= min_pixels
    keep[0] = False
    remap = np.zeros(n + 1, dtype=labels.dtype)
    remap[keep] = np.arange(1, int(keep.sum()) + 1, dtype=labels.dtype)
    return remap[labels], int(keep.sum())


def polyp_area_fraction(mask: np.ndarray) -> float:
    """Fraction of the image's pixels that are polyp (all ground-truth pixels, specks included)."""
    mask = _as_bool(mask)
    return float(np.count_nonzero(mask)) / mask.size


def count_polyps(mask: np.ndarray, min_pixels: int = MIN_REGION_PIXELS) -> int:
    """Number of 8-connected polyp regions of at least ``min_pixels`` pixels."""
    return connected_regions(mask, min_pixels)[1]


@dataclass
class RegionDetection:
    """Polyp-level detection of one image.

    ``coverage[i]`` is the fraction of ground-truth region i's pixels that are predicted;
    ``region_iou[i]`` is the IoU of region i with the union of predicted regions touching it.
    A region is found when its coverage is at least ``min_coverage``. A false-positive region is
    a predicted region (>= MIN_REGION_PIXELS) that shares no pixel with any ground truth.
    """
    n_gt_regions: int
    n_found: int
    n_missed: int
    n_pred_regions: int
    n_fp_regions: int
    fp_region_pixels: int
    coverage: list[float]
    region_iou: list[float]

    def as_dict(self) -> dict:
        return {
            "n_gt_regions": self.n_gt_regions, "n_found": self.n_found, "n_missed": self.n_missed,
            "n_pred_regions": self.n_pred_regions, "n_fp_regions": self.n_fp_regions,
            "fp_region_pixels": self.fp_region_pixels,
            "min_region_coverage": min(self.coverage) if self.coverage else float("nan"),
            "min_region_iou": min(self.region_iou) if self.region_iou else float("nan"),
        }


def region_detection(gt: np.ndarray, pred: np.ndarray, min_coverage: float = DETECTION_MIN_COVERAGE,
                     min_pixels: int = MIN_REGION_PIXELS) -> RegionDetection:
    """Which ground-truth polyps the prediction finds, and its false-positive regions."""
    gt, pred = _as_bool(gt), _as_bool(pred)
    if gt.shape != pred.shape:
        raise ValueError(f"mask shapes differ: ground truth {gt.shape}, prediction {pred.shape}")
    gt_labels, n_gt = connected_regions(gt, min_pixels)
    pred_labels, n_pred = connected_regions(pred, min_pixels)
    coverage, ious = [], []
    for i in range(1, n_gt + 1):
        region = gt_labels == i
        area = int(np.count_nonzero(region))
        covered = int(np.count_nonzero(region & pred))
        coverage.append(covered / area)
        touching = np.unique(pred_labels[region])
        touching = touching[touching > 0]
        pred_union = np.isin(pred_labels, touching) if touching.size else np.zeros_like(pred)
        union = int(np.count_nonzero(region | pred_union))
        ious.append(int(np.count_nonzero(region & pred_union)) / union if union else 0.0)
    n_found = sum(c >= min_coverage for c in coverage)
    fp_regions = 0
    fp_pixels = 0
    if n_pred:
        # A predicted region is a false positive when no ground-truth pixel (specks included) lies in it.
        hits = np.bincount(pred_labels[gt].ravel(), minlength=n_pred + 1)
        sizes = np.bincount(pred_labels.ravel(), minlength=n_pred + 1)
        fp = (hits == 0)
        fp[0] = False
        fp_regions = int(fp.sum())
        fp_pixels = int(sizes[fp].sum())
    return RegionDetection(n_gt, int(n_found), int(n_gt - n_found), n_pred, fp_regions, fp_pixels,
                           coverage, ious)


# ----------------------------------------------------------------------------------------------
# Where the errors are
# ----------------------------------------------------------------------------------------------

def boundary(mask: np.ndarray) -> np.ndarray:
    """Inner boundary of ``mask``: its pixels with a 4-neighbour outside the mask.

    The image border is not a boundary (a polyp cut by the frame has no true edge there).
    """
    mask = _as_bool(mask)
    return mask & ~ndimage.binary_erosion(mask, border_value=1)


def distance_to_boundary(mask: np.ndarray) -> np.ndarray:
    """Euclidean distance (pixels) from every pixel to the nearest boundary pixel of ``mask``.

    Infinite everywhere when the mask has no boundary (empty, or covering the whole image).
    """
    edge = boundary(mask)
    if not edge.any():
        return np.full(edge.shape, np.inf)
    return ndimage.distance_transform_edt(~edge)


def boundary_error_split(gt: np.ndarray, pred: np.ndarray, band_px: float = BOUNDARY_BAND_PX) -> dict:
    """Split error pixels (FP + FN) into those within ``band_px`` of the true boundary and the rest.

    ``boundary_error_fraction`` is the share of error pixels in the band (NaN without errors);
    ``far_fp_px`` / ``far_fn_px`` are far errors by kind: far FPs are spurious blobs or bleeding,
    far FNs are missed polyp bodies. With an empty ground truth every error is far.
    """
    gt, pred = _as_bool(gt), _as_bool(pred)
    dist = distance_to_boundary(gt)
    near = dist <= band_px
    fp = pred & ~gt
    fn = gt & ~pred
    n_fp, n_fn = int(np.count_nonzero(fp)), int(np.count_nonzero(fn))
    near_fp, near_fn = int(np.count_nonzero(fp & near)), int(np.count_nonzero(fn & near))
    errors = n_fp + n_fn
    return {
        "error_px": errors,
        "boundary_error_px": near_fp + near_fn,
        "far_error_px": errors - near_fp - near_fn,
        "far_fp_px": n_fp - near_fp,
        "far_fn_px": n_fn - near_fn,
        "boundary_error_fraction": (near_fp + near_fn) / errors if errors else float("nan"),
    }


def border_proximity(mask: np.ndarray) -> dict:
    """Distance from the polyp to the image border.

    ``border_distance`` is the smallest number of pixels between a polyp pixel and the image's
    outermost rows/columns (0 = on the border), divided by the shorter image side, so it lies in
    [0, 0.5]; NaN without polyp. ``touches_border`` is True when a polyp pixel lies on the border,
    NaN without polyp (an image with nothing to touch the border belongs in neither bucket).
    """
    mask = _as_bool(mask)
    h, w = mask.shape
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        return {"border_distance": float("nan"), "touches_border": float("nan")}
    d = int(min(ys.min(), xs.min(), h - 1 - ys.max(), w - 1 - xs.max()))
    return {"border_distance": d / min(h, w), "touches_border": d == 0}


# ----------------------------------------------------------------------------------------------
# Image content
# ----------------------------------------------------------------------------------------------

def rgb_to_hsv(image: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hue in degrees [0, 360), saturation and value in [0, 1] (float32 arrays)."""
    rgb = _as_rgb(image).astype(np.float32) / 255.0
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    v = rgb.max(axis=2)
    c = v - rgb.min(axis=2)
    s = np.where(v > 0, c / np.maximum(v, 1e-12), 0.0)
    safe_c = np.maximum(c, 1e-12)
    hue = np.where(v == r, ((g - b) / safe_c) % 6.0,
                   np.where(v == g, (b - r) / safe_c + 2.0, (r - g) / safe_c + 4.0))
    hue = np.where(c > 0, hue * 60.0, 0.0)
    return hue.astype(np.float32), s.astype(np.float32), v


def luminance(image: np.ndarray) -> np.ndarray:
    """Rec. 601 luma in [0, 1] (float32)."""
    rgb = _as_rgb(image).astype(np.float32)
    return (0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]) / 255.0


@dataclass
class OverlayBox:
    """The scope-position picture-in-picture box in the lower-left corner.

    ``bbox`` is (x0, y0, x1, y1) with exclusive x1/y1, in pixels; ``kind`` is "green" (the
    ScopeGuide drawing is visible) or "black" (blanked); ``fill`` is the fraction of the box that
    is dark or green.
    """
    present: bool
    bbox: tuple[int, int, int, int] | None = None
    kind: str | None = None
    fill: float = 0.0

    def mask(self, shape: tuple[int, int]) -> np.ndarray:
        out = np.zeros(shape, dtype=bool)
        if self.present and self.bbox is not None:
            x0, y0, x1, y1 = self.bbox
            out[y0:y1, x0:x1] = True
        return out


def overlay_pixels(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(dark, green): pixels that could belong to the overlay box."""
    image = _as_rgb(image)
    dark = image.max(axis=2) <= OVERLAY_DARK_MAX
    hue, sat, val = rgb_to_hsv(image)
    green = ((hue >= OVERLAY_GREEN_HUE[0]) & (hue <= OVERLAY_GREEN_HUE[1])
             & (sat >= OVERLAY_GREEN_MIN_SATURATION) & (val >= OVERLAY_GREEN_MIN_VALUE))
    return dark, green


def detect_overlay_box(image: np.ndarray, min_fill: float = OVERLAY_MIN_FILL,
                       min_side_fraction: float = OVERLAY_MIN_SIDE_FRACTION,
                       max_side_fraction: float = OVERLAY_MAX_SIDE_FRACTION) -> OverlayBox:
    """Find a rectangle of near-uniform dark or saturated-green pixels anchored at the lower-left.

    Candidates are the rectangles ``[H - h, H) x [0, w)`` that are at least ``min_fill`` dark-or-
    green overall *and* along their top row and right column (a rectangle has straight filled
    edges; the octagonal frame's corner triangle, or a dark lumen, does not), with both sides at
    least ``min_side_fraction`` of the shorter image side. The largest by area wins (one pass over
    a summed-area table). If it spans more than ``max_side_fraction`` of the image height or width
    it is a side panel or a dark frame, not a picture-in-picture box, and the answer is "absent".
    """
    image = _as_rgb(image)
    h_img, w_img = image.shape[:2]
    dark, green = overlay_pixels(image)
    # The green box has thin light border lines and a line drawing of the scope: a closing
    # absorbs features up to OVERLAY_CLOSING_PX - 1 pixels wide.
    closing = np.ones((OVERLAY_CLOSING_PX, OVERLAY_CLOSING_PX), dtype=bool)
    candidate = ndimage.binary_closing(dark | green, structure=closing, border_value=1)
    candidate = candidate[::-1, :]               # flip so the anchor corner is at (0, 0)
    # sat[h, w] = overlay pixels in the h x w rectangle at the anchor (zero row/column in front).
    sat = np.zeros((h_img + 1, w_img + 1), dtype=np.int64)
    sat[1:, 1:] = candidate.astype(np.int64).cumsum(axis=0).cumsum(axis=1)
    hs = np.arange(1, h_img + 1)[:, None]
    ws = np.arange(1, w_img + 1)[None, :]
    inside = sat[1:, 1:]
    fill = inside / (hs * ws)
    top_row_fill = (inside - sat[:-1, 1:]) / ws
    right_col_fill = (inside - sat[1:, :-1]) / hs
    min_side = int(np.ceil(min_side_fraction * min(h_img, w_img)))
    ok = ((fill >= min_fill) & (top_row_fill >= OVERLAY_MIN_EDGE_FILL)
          & (right_col_fill >= OVERLAY_MIN_EDGE_FILL)
          & (hs >= min_side) & (ws >= min_side))
    if not ok.any():
        return OverlayBox(False)
    score = np.where(ok, hs * ws, 0)
    hi, wi = np.unravel_index(int(np.argmax(score)), score.shape)
    h, w = int(hi) + 1, int(wi) + 1
    if h > max_side_fraction * h_img or w > max_side_fraction * w_img:
        return OverlayBox(False)
    box = (0, h_img - h, w, h_img)
    green_share = float(green[h_img - h:, :w].mean())
    # The green box sits inside a thin black margin, so a quarter green is already unmistakable.
    kind = "green" if green_share >= 0.25 else "black"
    return OverlayBox(True, box, kind, float(fill[hi, wi]))


def field_of_view(image: np.ndarray, overlay: OverlayBox | None = None) -> np.ndarray:
    """The lit endoscopic area: not near-black frame connected to the border, not the overlay box.

    Text printed on the frame (date, patient fields) forms small islands; only the largest
    connected lit component is kept, with its holes filled (dark lumen inside the FOV stays in).
    """
    image = _as_rgb(image)
    dark = image.max(axis=2) <= FRAME_DARK_MAX
    labels, n = ndimage.label(dark, structure=_EIGHT)
    border_labels = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    frame = np.isin(labels, border_labels[border_labels > 0])
    if overlay is not None and overlay.present:
        frame |= overlay.mask(frame.shape)
    lit, n_lit = ndimage.label(~frame, structure=_EIGHT)
    if n_lit == 0:
        return np.zeros(frame.shape, dtype=bool)
    largest = int(np.argmax(np.bincount(lit.ravel())[1:])) + 1
    return ndimage.binary_fill_holes(lit == largest) & ~frame


def specular_mask(image: np.ndarray) -> np.ndarray:
    """Specular highlights: near-white pixels (HSV value >= 0.9, saturation <= 0.2)."""
    _, sat, val = rgb_to_hsv(image)
    return (val >= SPECULAR_MIN_VALUE) & (sat <= SPECULAR_MAX_SATURATION)


def specular_fractions(image: np.ndarray, gt: np.ndarray, fov: np.ndarray | None = None) -> dict:
    """Share of highlight pixels in the FOV (or whole image) and inside the polyp (NaN if none)."""
    spec = specular_mask(image)
    gt = _as_bool(gt)
    region = fov if fov is not None and fov.any() else np.ones_like(gt)
    return {
        "specular_fraction": float(spec[region].mean()),
        "polyp_specular_fraction": float(spec[gt].mean()) if gt.any() else float("nan"),
    }


def mean_luminance(image: np.ndarray, region: np.ndarray | None = None) -> float:
    """Mean Rec. 601 luma in [0, 1] over ``region`` (whole image when None; NaN if empty)."""
    y = luminance(image)
    if region is None:
        return float(y.mean())
    region = _as_bool(region)
    return float(y[region].mean()) if region.any() else float("nan")


def polyp_contrast(image: np.ndarray, gt: np.ndarray, fov: np.ndarray | None = None,
                   ring_px: int = CONTRAST_RING_PX) -> float:
    """Mean luma inside the polyp minus that of a ``ring_px``-wide ring around it (inside the FOV).

    Near zero for flat, mucosa-coloured polyps; NaN without polyp or without a ring.
    """
    gt = _as_bool(gt)
    if not gt.any():
        return float("nan")
    ring = ndimage.binary_dilation(gt, structure=_EIGHT, iterations=ring_px) & ~gt
    if fov is not None:
        ring &= fov
    if not ring.any():
        return float("nan")
    y = luminance(image)
    return float(y[gt].mean() - y[ring].mean())


def laplacian_variance(image: np.ndarray, region: np.ndarray | None = None) -> float:
    """Blur measure: variance of the Laplacian of the luma, larger = sharper.

    Scale: luma in 0-255 units, the 5-point Laplacian ``[[0,1,0],[1,-4,1],[0,1,0]]`` at the image's
    native resolution (values depend on resolution and JPEG quality; compare within one dataset).
    Inside ``region`` only, shrunk by BLUR_FOV_MARGIN_PX so the frame's edge does not count.
    """
    y = luminance(image).astype(np.float64) * 255.0
    lap = ndimage.laplace(y, mode="reflect")
    if region is None:
        return float(lap.var())
    inner = ndimage.binary_erosion(_as_bool(region), iterations=BLUR_FOV_MARGIN_PX)
    return float(lap[inner].var()) if inner.any() else float("nan")


# ----------------------------------------------------------------------------------------------
# Everything for one image
# ----------------------------------------------------------------------------------------------

def image_attributes(image: np.ndarray, gt: np.ndarray, pred: np.ndarray,
                     band_px: float = BOUNDARY_BAND_PX) -> dict:
    """All attributes of one image as a flat dict of scalars (see the module docstring)."""
    image, gt, pred = _as_rgb(image), _as_bool(gt), _as_bool(pred)
    if image.shape[:2] != gt.shape or gt.shape != pred.shape:
        raise ValueError(f"shapes differ: image {image.shape[:2]}, ground truth {gt.shape}, "
                         f"prediction {pred.shape}")
    overlay = detect_overlay_box(image)
    fov = field_of_view(image, overlay)
    detection = region_detection(gt, pred)
    out: dict = {
        # NaN without a polyp: such an image is not the smallest polyp ("n/a" in the buckets).
        "area_fraction": polyp_area_fraction(gt) if gt.any() else float("nan"),
        "pred_area_fraction": polyp_area_fraction(pred),
        "n_polyps": detection.n_gt_regions,
    }
    out.update(detection.as_dict())
    out.update(boundary_error_split(gt, pred, band_px))
    out.update(border_proximity(gt))
    out.update({
        "overlay_present": overlay.present,
        "overlay_kind": overlay.kind or "",
        "overlay_bbox": "" if overlay.bbox is None else " ".join(map(str, overlay.bbox)),
        "overlay_area_fraction": float(overlay.mask(gt.shape).mean()),
        "fov_fraction": float(fov.mean()),
    })
    out.update(specular_fractions(image, gt, fov))
    out["luminance"] = mean_luminance(image, fov)
    out["polyp_luminance"] = mean_luminance(image, gt) if gt.any() else float("nan")
    out["polyp_contrast"] = polyp_contrast(image, gt, fov)
    out["blur_laplacian_var"] = laplacian_variance(image, fov)
    return out
