"""Attribute extractors and post-processing on synthetic images with known answers (+ a Kvasir sanity check)."""
import math

import numpy as np
import pytest
from scipy import ndimage

from _paths import KVASIR, needs_kvasir
from effiseg.training.analysis import attributes as A
from effiseg.training.analysis import postprocess as P


def disc(shape, centre, radius):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius ** 2


def mucosa(shape=(200, 200), seed=0):
    """A reddish, textured, mid-bright image: no overlay, no highlights, nothing near-black."""
    rng = np.random.default_rng(seed)
    img = np.empty(shape + (3,), dtype=np.uint8)
    noise = rng.normal(0, 12, shape)
    img[..., 0] = np.clip(180 + noise, 0, 255)
    img[..., 1] = np.clip(100 + noise, 0, 255)
    img[..., 2] = np.clip(90 + noise, 0, 255)
    return img


def octagon_corners(img, leg):
    """Black triangles in the four corners, like the endoscope's octagonal frame."""
    h, w = img.shape[:2]
    yy, xx = np.mgrid[:h, :w]
    corners = ((xx + yy < leg) | ((w - 1 - xx) + yy < leg) | (xx + (h - 1 - yy) < leg)
               | ((w - 1 - xx) + (h - 1 - yy) < leg))
    img[corners] = 0
    return img


# ---------------------------------------------------------------- regions

def test_count_polyps_ignores_specks_and_uses_8_connectivity():
    m = np.zeros((100, 100), bool)
    m |= disc(m.shape, (20, 20), 8)
    m |= disc(m.shape, (70, 70), 10)
    m[5:8, 90:93] = True                      # 9 px speck < MIN_REGION_PIXELS
    m[50:55, 10:15] = True                    # 25 px square ...
    m[55:60, 15:20] = True                    # ... touching another only at a corner: one region
    assert A.MIN_REGION_PIXELS > 9
    assert A.count_polyps(m) == 3
    assert A.count_polyps(m, min_pixels=1) == 4
    labels, n = A.connected_regions(m)
    assert n == 3 and set(np.unique(labels)) == {0, 1, 2, 3}


def test_area_fraction():
    m = np.zeros((50, 40), bool)
    m[:10, :20] = True
    assert A.polyp_area_fraction(m) == pytest.approx(200 / 2000)


def test_region_detection_found_missed_and_false_positive_regions():
    shape = (120, 120)
    gt1 = disc(shape, (30, 30), 12)
    gt2 = np.zeros(shape, bool)
    gt2[70:90, 70:90] = True                  # 400 px
    gt = gt1 | gt2
    pred = gt1.copy()                         # first polyp fully found
    pred[70:76, 70:90] = True                 # 120 / 400 = 30% of the second: missed
    pred[100:110, 5:15] = True                # a 100 px blob touching no ground truth
    pred[2:4, 110:112] = True                 # a 4 px speck: not a region at all
    det = A.region_detection(gt, pred)
    assert det.n_gt_regions == 2 and det.n_found == 1 and det.n_missed == 1
    assert det.coverage == pytest.approx([1.0, 0.3])
    assert det.region_iou[0] == pytest.approx(1.0)
    assert det.region_iou[1] == pytest.approx(120 / 400)
    assert det.n_pred_regions == 3 and det.n_fp_regions == 1 and det.fp_region_pixels == 100
    # A bigger overlap threshold changes the verdict; the stated default is 0.5.
    assert A.region_detection(gt, pred, min_coverage=0.25).n_found == 2


def test_region_detection_empty_cases():
    z = np.zeros((30, 30), bool)
    det = A.region_detection(z, z)
    assert (det.n_gt_regions, det.n_found, det.n_fp_regions) == (0, 0, 0)
    assert math.isnan(det.as_dict()["min_region_coverage"])
    with pytest.raises(ValueError, match="shapes differ"):
        A.region_detection(z, np.zeros((30, 31), bool))


# ---------------------------------------------------------------- error location

def test_boundary_errors_from_a_slightly_dilated_prediction_are_all_near():
    gt = np.zeros((80, 80), bool)
    gt[20:60, 20:60] = True
    pred = ndimage.binary_dilation(gt, iterations=2)
    out = A.boundary_error_split(gt, pred, band_px=5)
    assert out["error_px"] == np.count_nonzero(pred & ~gt)
    assert out["boundary_error_fraction"] == 1.0 and out["far_error_px"] == 0


def test_far_errors_are_counted_by_kind():
    gt = np.zeros((100, 100), bool)
    gt[10:50, 10:50] = True
    pred = gt.copy()
    pred[25:35, 25:35] = False                # a hole 15 px inside the boundary: far FN (100 px)
    pred[80:90, 80:90] = True                 # a blob 30+ px away: far FP (100 px)
    pred[10:50, 50:52] = True                 # 80 px bleeding right at the boundary: near FP
    out = A.boundary_error_split(gt, pred, band_px=5)
    assert out["far_fn_px"] == 100 and out["far_fp_px"] == 100
    assert out["boundary_error_px"] == 80
    assert out["boundary_error_fraction"] == pytest.approx(80 / 280)


def test_polyp_cut_by_the_image_border_has_no_boundary_there():
    gt = np.zeros((40, 40), bool)
    gt[:, :10] = True                         # a band along the whole left side: its only edge is column 9
    edge = A.boundary(gt)
    assert edge[:, 9].all() and edge.sum() == 40
    pred = gt.copy()
    pred[:, :3] = False                       # FN in columns 0-2, at least 7 px from the true edge
    out = A.boundary_error_split(gt, pred, band_px=5)
    assert out["far_fn_px"] == 120 and out["boundary_error_px"] == 0


def test_empty_ground_truth_makes_every_error_far():
    gt = np.zeros((30, 30), bool)
    pred = np.zeros_like(gt)
    pred[5:10, 5:10] = True
    out = A.boundary_error_split(gt, pred)
    assert out["far_fp_px"] == 25 and out["boundary_error_px"] == 0
    assert math.isnan(A.boundary_error_split(gt, gt)["boundary_error_fraction"])


def test_border_proximity():
    m = disc((100, 200), (50, 100), 10)          # rows 40..60: 39 px above the last row (99)
    out = A.border_proximity(m)
    assert out["border_distance"] == pytest.approx(39 / 100) and out["touches_border"] is False
    m2 = np.zeros((100, 200), bool)
    m2[90:100, 50:60] = True
    assert A.border_proximity(m2) == {"border_distance": 0.0, "touches_border": True}
    m3 = np.zeros((100, 200), bool)
    m3[3:10, 191:198] = True                  # 2 px from the right border (col 199), 3 from the top
    assert A.border_proximity(m3)["border_distance"] == pytest.approx(2 / 100)
    empty = A.border_proximity(np.zeros((10, 10), bool))
    assert math.isnan(empty["border_distance"]) and math.isnan(empty["touches_border"])  # no polyp: neither bucket


# ---------------------------------------------------------------- overlay box

def test_no_overlay_on_plain_or_octagonal_frames():
    assert not A.detect_overlay_box(mucosa()).present
    assert not A.detect_overlay_box(octagon_corners(mucosa(), 70)).present


def test_black_box_in_lower_left_is_detected_with_its_bbox():
    img = octagon_corners(mucosa(), 40)
    img[140:, :60] = 0
    box = A.detect_overlay_box(img)
    assert box.present and box.kind == "black"
    assert box.bbox == (0, 140, 60, 200)
    assert box.mask(img.shape[:2]).sum() == 60 * 60


def test_green_box_with_drawing_and_light_border_is_detected_as_green():
    img = mucosa()
    img[136:, :70] = 0                        # black margin around the box, as on Kvasir
    img[140:196, 6:66] = (16, 163, 134)       # the ScopeGuide green
    img[140, 6:66] = 200                      # a thin light frame line
    img[140:196, 6] = 200
    rr = np.arange(150, 190)
    img[rr, rr - 130] = 255                   # a line drawing of the scope
    box = A.detect_overlay_box(img)
    assert box.present and box.kind == "green"
    x0, y0, x1, y1 = box.bbox
    assert x0 == 0 and y1 == 200 and abs(y0 - 136) <= 2 and abs(x1 - 70) <= 2


def test_dark_regions_that_are_not_a_lower_left_box_are_ignored():
    img = mucosa()
    img[:60, 140:] = 0                        # a box in the upper right
    assert not A.detect_overlay_box(img).present
    img = mucosa()
    img[:, :50] = 0                           # a full-height side panel, not a picture-in-picture
    assert not A.detect_overlay_box(img).present
    img = mucosa()
    img[185:, :] = 0                          # a thin bottom strip
    assert not A.detect_overlay_box(img).present
    img = mucosa()
    img[170:, :30] = 0                        # a box too small to be the overlay (< 20% of the side)
    assert not A.detect_overlay_box(img).present


@needs_kvasir
def test_overlay_detection_on_real_kvasir_images():
    from effiseg.training.data import read_rgb
    images = KVASIR / "validation" / "images"
    black = A.detect_overlay_box(read_rgb(images / "0.jpg"))       # blanked box, viewed by eye
    assert black.present and black.kind == "black"
    x0, y0, x1, y1 = black.bbox
    assert x0 == 0 and y1 == 352 and 100 <= x1 <= 130 and 225 <= y0 <= 250
    green = A.detect_overlay_box(read_rgb(images / "95.jpg"))      # ScopeGuide green box
    assert green.present and green.kind == "green"
    assert not A.detect_overlay_box(read_rgb(images / "20.jpg")).present  # octagon corner only


# ---------------------------------------------------------------- photometry

def test_field_of_view_excludes_border_frame_text_and_overlay():
    img = mucosa()
    img[:, :20] = 0
    img[:15, :] = 0
    img[30:34, 5:12] = 255                    # "text" printed on the frame
    box_img = img.copy()
    box_img[140:, :60] = 0
    fov = A.field_of_view(img)
    assert not fov[:, :20].any() and not fov[:15].any()
    assert fov[15:, 20:].all()
    box = A.detect_overlay_box(box_img)
    fov_box = A.field_of_view(box_img, box)
    assert not fov_box[140:, :60].any()


def test_specular_fractions_are_exact_on_a_drawn_highlight():
    img = mucosa()
    img[50:60, 50:60] = (250, 245, 240)       # 100 near-white pixels
    gt = np.zeros(img.shape[:2], bool)
    gt[50:60, 55:75] = True                   # half of the polyp's 200 px is not highlight, 50 are
    out = A.specular_fractions(img, gt)
    assert out["specular_fraction"] == pytest.approx(100 / img[..., 0].size)
    assert out["polyp_specular_fraction"] == pytest.approx(50 / 200)
    fov = np.zeros(gt.shape, bool)
    fov[:100] = True
    assert A.specular_fractions(img, gt, fov)["specular_fraction"] == pytest.approx(100 / fov.sum())
    saturated_red = np.full((10, 10, 3), (255, 40, 40), np.uint8)   # bright but coloured: no highlight
    assert not A.specular_mask(saturated_red).any()


def test_luminance_and_contrast():
    grey = np.full((20, 20, 3), 128, np.uint8)
    assert A.mean_luminance(grey) == pytest.approx(128 / 255, abs=1e-6)
    img = np.full((60, 60, 3), 100, np.uint8)
    gt = disc((60, 60), (30, 30), 8)
    img[gt] = 200
    assert A.polyp_contrast(img, gt) == pytest.approx(100 / 255, abs=1e-6)
    assert math.isnan(A.polyp_contrast(img, np.zeros_like(gt)))


def test_blur_measure_orders_by_sharpness():
    rng = np.random.default_rng(1)
    base = rng.integers(0, 256, (120, 120)).astype(np.float64)
    values = []
    for sigma in (0.0, 1.0, 2.0, 4.0):
        g = ndimage.gaussian_filter(base, sigma) if sigma else base
        img = np.repeat(np.clip(g, 0, 255).astype(np.uint8)[..., None], 3, axis=2)
        values.append(A.laplacian_variance(img))
    assert values == sorted(values, reverse=True) and values[0] > 10 * values[-1]
    flat = np.full((50, 50, 3), 90, np.uint8)
    assert A.laplacian_variance(flat) == 0.0


def test_image_attributes_has_every_key_and_checks_shapes():
    img = octagon_corners(mucosa(), 30)
    img[140:, :60] = 0
    gt = disc(img.shape[:2], (80, 100), 20)
    pred = disc(img.shape[:2], (82, 100), 20)
    out = A.image_attributes(img, gt, pred)
    for key in ("area_fraction", "n_polyps", "n_found", "n_missed", "n_fp_regions", "boundary_error_fraction",
                "border_distance", "touches_border", "overlay_present", "overlay_bbox", "specular_fraction",
                "polyp_specular_fraction", "luminance", "polyp_contrast", "blur_laplacian_var"):
        assert key in out
    assert out["overlay_present"] and out["overlay_bbox"] == "0 140 60 200"
    assert out["n_polyps"] == 1 and out["n_found"] == 1
    assert all(not isinstance(v, np.ndarray) for v in out.values())
    with pytest.raises(ValueError, match="shapes differ"):
        A.image_attributes(img, gt[:-1], pred[:-1])


# ---------------------------------------------------------------- post-processing

def test_remove_small_regions():
    m = np.zeros((50, 50), bool)
    m[5:15, 5:15] = True                      # 100 px
    m[30:33, 30:33] = True                    # 9 px
    out = P.remove_small_regions(m, 10)
    assert out.sum() == 100 and not out[30:33, 30:33].any()
    assert P.remove_small_regions(m, 9).sum() == 109
    assert P.remove_small_regions(m, 0).sum() == 109 and P.remove_small_regions(m, 0) is not m


def test_fill_holes_and_keep_largest():
    m = np.zeros((30, 30), bool)
    m[5:20, 5:20] = True
    m[10:12, 10:12] = False                   # enclosed hole
    m[0:5, 25:30] = True                      # small second region on the border
    filled = P.fill_holes(m)
    assert filled[10:12, 10:12].all() and filled.sum() == 15 * 15 + 25
    largest = P.keep_largest_region(m)
    assert not largest[0:5, 25:30].any() and largest[5:20, 5:20].sum() == 15 * 15 - 4


def test_threshold_sweep_and_choice_have_known_answers():
    mask = np.zeros((10, 10), bool)
    mask[:, :5] = True
    prob = np.where(mask, 0.7, 0.2).astype(np.float32)
    prob[0, 5:] = 0.4                         # 5 background pixels that only low thresholds pick up
    sweep = P.threshold_sweep([prob], [mask], grid=(0.1, 0.3, 0.5, 0.8))
    dice = [r["mean_dice"] for r in sweep]
    assert dice[0] == pytest.approx(2 * 50 / (2 * 50 + 50))        # everything: 50 TP, 50 FP
    assert dice[1] == pytest.approx(2 * 50 / (2 * 50 + 5))         # 50 TP + 5 FP
    assert dice[2] == pytest.approx(1.0)
    assert dice[3] == pytest.approx(0.0)
    assert P.choose_threshold([prob], [mask], grid=(0.1, 0.3, 0.5, 0.8)) == 0.5
    # Ties go to the threshold nearest 0.5: 0.45, 0.5 and 0.6 all give Dice 1 here.
    assert P.choose_threshold([prob], [mask], grid=(0.45, 0.6, 0.5)) == 0.5
    assert P.choose_threshold([prob], [mask], grid=(0.45, 0.6)) == 0.45


def test_sweep_matches_direct_thresholding_and_metrics():
    from effiseg.training.metrics import image_scores
    rng = np.random.default_rng(3)
    probs = [rng.random((16, 16)).astype(np.float32) for _ in range(3)]
    masks = [rng.random((16, 16)) > 0.6 for _ in range(3)]
    grid = (0.25, 0.5, 0.75)
    sweep = P.threshold_sweep(probs, masks, grid)
    for row, t in zip(sweep, grid):
        direct = np.mean([image_scores(p > t, m)["dice"] for p, m in zip(probs, masks)])
        assert row["mean_dice"] == pytest.approx(direct)
    with pytest.raises(ValueError, match="differ in shape"):
        P.threshold_sweep([probs[0]], [masks[0][:-1]])


def test_choose_min_region_prefers_removing_specks():
    mask = np.zeros((40, 40), bool)
    mask[10:30, 10:30] = True
    prob = np.where(mask, 0.9, 0.1)
    prob[0:3, 0:3] = 0.9                      # a 9 px false positive
    assert P.choose_min_region([prob], [mask], grid=(0, 5, 20, 1000)) == 20
