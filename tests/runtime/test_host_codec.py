"""The host side's fast paths give exactly what the plain paths gave: JPEG decoding (simplejpeg
against Pillow), the mask from logits at an image's size (decided by cells against interpolating
every pixel), and the mask PNG (read back by Pillow as the same 0/255 mask)."""
from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
from PIL import Image

from effiseg.runtime import images
from effiseg.runtime.images import ImageError, encode_mask_png, read_image
from effiseg.runtime.postprocess import output_to_mask, resize_and_cut, resize_bilinear


def _photo(h=90, w=120) -> Image.Image:
    yy, xx = np.mgrid[0:h, 0:w]
    rgb = np.stack([xx * 2, yy * 2, (xx * yy) % 256], axis=2).astype(np.uint8)
    rgb[30:60, 40:90] = (230, 80, 60)
    return Image.fromarray(rgb)


def _pillow_rgb(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


@pytest.mark.parametrize("mode, options", [("RGB", {}), ("RGB", {"progressive": True}),
                                           ("RGB", {"subsampling": 0}), ("L", {}), ("CMYK", {})])
def test_jpeg_decodes_to_pillows_pixels(tmp_path, mode, options):
    path = tmp_path / "image.jpg"
    _photo().convert(mode).save(path, quality=90, **options)
    np.testing.assert_array_equal(read_image(path), _pillow_rgb(path))


def test_jpeg_fast_path_is_taken_for_plain_jpeg(tmp_path, monkeypatch):
    """Not only equal pixels: simplejpeg decodes the file (and Pillow is not asked)."""
    if images.simplejpeg is None:
        pytest.skip("simplejpeg not installed: Pillow decodes everything")
    path = tmp_path / "image.JPEG"
    _photo().save(path, quality=90)
    expected = _pillow_rgb(path)

    def no_pillow(*args, **kwargs):
        raise AssertionError("Pillow was asked to decode a plain JPEG")
    monkeypatch.setattr(images.Image, "open", no_pillow)
    np.testing.assert_array_equal(read_image(path), expected)


def test_a_png_named_jpg_and_a_truncated_jpeg_go_to_pillow(tmp_path):
    png_named_jpg = tmp_path / "really_a.png.jpg"
    _photo().save(png_named_jpg, format="PNG")
    np.testing.assert_array_equal(read_image(png_named_jpg), np.asarray(_photo()))
    buf = io.BytesIO()
    _photo().save(buf, format="JPEG", quality=90)
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ImageError, match="truncated"):
        read_image(truncated)


def test_a_jpeg_over_the_pixel_limit_is_refused_with_the_limit(tmp_path):
    path = tmp_path / "big.jpg"
    _photo().save(path)
    with pytest.raises(ImageError, match="over the limit of"):
        read_image(path, max_pixels=90 * 120 - 1)


def _smooth_map(rng, h, w, scale):
    coarse = rng.standard_normal((max(1, h // 8), max(1, w // 8)))
    return (np.kron(coarse, np.ones((8, 8)))[:h, :w] * scale).astype(np.float32) if h >= 8 and w >= 8 \
        else (rng.standard_normal((h, w)) * scale).astype(np.float32)


def test_resize_and_cut_is_resize_then_threshold_pixel_for_pixel():
    rng = np.random.default_rng(0)
    cases = [((352, 352), (1080, 1920)), ((352, 352), (576, 720)), ((44, 44), (300, 97)), ((17, 23), (400, 401)),
             ((30, 30), (20, 200)), ((1, 1), (50, 50)), ((1, 9), (40, 90)), ((64, 64), (64, 64))]
    for (h, w), (height, width) in cases:
        for scale in (1e-3, 1.0, 40.0):
            values = _smooth_map(rng, h, w, scale)
            if scale == 1.0:
                values = np.round(values * 4) / 4  # many values exactly at the cuts below
            for cut in (0.0, 0.25, -1.0, float(values.flat[0])):
                expected = resize_bilinear(values, height, width) > cut
                np.testing.assert_array_equal(resize_and_cut(values, height, width, cut), expected)


def test_resize_and_cut_with_nan_and_infinite_values():
    rng = np.random.default_rng(1)
    values = _smooth_map(rng, 40, 40, 3.0)
    values[5, 5], values[20, 30], values[39, 0] = np.nan, np.inf, -np.inf
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        expected = resize_bilinear(values, 300, 310) > 0.0
        got = resize_and_cut(values, 300, 310, 0.0)
    np.testing.assert_array_equal(got, expected)


def test_output_to_mask_at_a_larger_size_matches_the_plain_path():
    values = _smooth_map(np.random.default_rng(2), 88, 88, 4.0)
    mask, max_prob = output_to_mask(values, "logits", 0.5, 700, 900)
    np.testing.assert_array_equal(mask, resize_bilinear(values, 700, 900) > 0.0)
    probs = 1 / (1 + np.exp(-values))
    mask_p, _ = output_to_mask(probs, "probabilities", 0.3, 700, 900)
    np.testing.assert_array_equal(mask_p, resize_bilinear(probs, 700, 900) > 0.3)


@pytest.mark.parametrize("shape", [(1, 1), (7, 300), (352, 352), (33, 1)])
def test_mask_png_reads_back_as_the_same_0_255_mask(tmp_path, shape):
    rng = np.random.default_rng(3)
    mask = rng.random(shape) < 0.4
    path = tmp_path / "mask.png"
    path.write_bytes(encode_mask_png(mask))
    with Image.open(path) as im:
        assert im.mode == "L" and im.format == "PNG"
        read_back = np.asarray(im)
    assert set(np.unique(read_back)) <= {0, 255}
    np.testing.assert_array_equal(read_back == 255, mask)


@pytest.mark.parametrize("output_format, threshold", [("logits", 0.5), ("logits", 0.3), ("probabilities", 0.4),
                                                      ("mask", 0.5)])
def test_masks_cut_for_a_batch_are_output_to_mask_s(output_format, threshold):
    """The device runner's batch cut (rows of the model's size cut at once, others copied for the
    writers) gives every image the mask and maximum probability output_to_mask gives it alone."""
    from effiseg.runtime.postprocess import cut_batch
    rng = np.random.default_rng(4)
    logits = (rng.standard_normal((8, 44, 44)) * 3).astype(np.float32)
    fresh = {"logits": logits, "probabilities": 1 / (1 + np.exp(-logits)), "mask": (logits > 0).astype(np.float32)}
    outputs = fresh[output_format].copy()  # stands for the slot's output buffer
    sizes = [(44, 44), (50, 60), None, (44, 44), (44, 44), (10, 10), (44, 44)]  # 7 of 8 rows claimed
    rows = cut_batch(outputs, output_format, threshold, sizes)
    outputs[:] = 0  # the slot is reused once the rows are out: nothing may still point into it
    for row, size, original in zip(rows, sizes, fresh[output_format]):
        if size is None:
            continue
        mask, top = output_to_mask(row, output_format, threshold, *size)
        expected_mask, expected_top = output_to_mask(original, output_format, threshold, *size)
        np.testing.assert_array_equal(mask, expected_mask)
        assert top == expected_top


@pytest.mark.parametrize("map_size, image_size", [((352, 352), (1080, 1920)), ((120, 160), (600, 700)),
                                                  ((176, 176), (900, 120))])
def test_a_polyp_like_map_is_decided_by_cells_with_the_same_pixels(monkeypatch, map_size, image_size):
    """One round blob (most cells agree): the cell path is taken (interpolating every pixel is not
    called) and gives resize-then-threshold's pixels, at cuts on and off the blob's values."""
    from effiseg.runtime import postprocess
    h, w = map_size
    yy, xx = np.mgrid[0:h, 0:w]
    values = (4 * (1 - np.hypot(yy - h * 0.45, xx - w * 0.55) / (0.3 * min(h, w)))).astype(np.float32)
    cuts = (0.0, 1.0, float(values[h // 2, w // 2]), -0.5)
    expected = [resize_bilinear(values, *image_size) > cut for cut in cuts]

    def every_pixel(*args):
        raise AssertionError("interpolated every pixel of a map whose cells mostly agree")
    monkeypatch.setattr(postprocess, "resize_bilinear", every_pixel)
    for cut, want in zip(cuts, expected):
        np.testing.assert_array_equal(resize_and_cut(values, *image_size, cut), want)
