import numpy as np
import pytest
from PIL import Image

from effiseg.training.data import DatasetError, load_pairs, load_split, pair_files, read_mask

from _paths import KVASIR, needs_kvasir


def _write(folder, name, array):
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(folder / name)


def _pair_folder(tmp_path, stems, size=(16, 20)):
    rng = np.random.default_rng(0)
    for i, stem in enumerate(stems):
        img = np.full((*size, 3), 10 * i, np.uint8)
        mask = np.zeros(size, np.uint8)
        mask[: i + 1, : i + 1] = 255
        _write(tmp_path / "images", f"{stem}.png", img)
        _write(tmp_path / "masks", f"{stem}.png", mask)
    return tmp_path


def test_pairs_by_stem_not_listing_order(tmp_path):
    _pair_folder(tmp_path, ["10", "2", "1"])
    # A mask saved under another extension still pairs by stem.
    (tmp_path / "masks" / "2.png").rename(tmp_path / "masks" / "2.bmp")
    pairs = pair_files(tmp_path)
    assert [p[0] for p in pairs] == ["1", "2", "10"]
    for stem, ip, mp in pairs:
        assert ip.stem == mp.stem == stem
    samples = load_pairs(tmp_path)
    # The mask content follows its stem: stem "10" was written with index 0 (one pixel).
    by_stem = {s.stem: s for s in samples}
    assert by_stem["10"].mask.sum() == 1 and by_stem["1"].mask.sum() == 9


def test_all_problems_reported_together(tmp_path):
    _pair_folder(tmp_path, ["a", "b", "c", "d"])
    (tmp_path / "masks" / "a.png").unlink()                       # image without mask
    _write(tmp_path / "masks", "orphan.png", np.zeros((16, 20), np.uint8))  # mask without image
    (tmp_path / "images" / "b.png").write_bytes(b"not an image")  # unreadable image
    _write(tmp_path / "masks", "c.png", np.zeros((8, 8), np.uint8))  # size mismatch
    with pytest.raises(DatasetError) as err:
        load_pairs(tmp_path)
    msg = str(err.value)
    assert "a.png: no mask with stem 'a'" in msg
    assert "orphan.png: no image with stem 'orphan'" in msg
    # One pass: the files that do pair are decoded and their problems listed in the same report.
    assert "b.png: unreadable image" in msg
    assert "c.png" in msg and "differs from mask" in msg and "20x16" in msg
    assert len(err.value.problems) == 4
    with pytest.raises(DatasetError):
        pair_files(tmp_path)  # on its own, pairing problems raise


def test_stems_that_differ_only_by_case_are_duplicates(tmp_path):
    """IMG.jpg beside img.png: on Windows and macOS their masks (IMG.png, img.png) are one file."""
    _pair_folder(tmp_path, ["img", "other"])
    _write(tmp_path / "images", "IMG.jpg", np.zeros((16, 20, 3), np.uint8))
    with pytest.raises(DatasetError) as err:
        pair_files(tmp_path)
    assert "duplicate stem" in str(err.value) and "IMG.jpg" in str(err.value) and "img.png" in str(err.value)


def test_masks_binarised_at_127(tmp_path):
    m = np.array([[0, 126, 127, 128, 255]], np.uint8)
    _write(tmp_path, "m.png", m)
    assert read_mask(tmp_path / "m.png").tolist() == [[False, False, False, True, True]]


def test_missing_layout_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="no images/ and masks/"):
        load_split(tmp_path, "train")


@needs_kvasir
def test_official_split_layout():
    samples = load_split(KVASIR, "validation", limit=3)
    assert len(samples) == 3
    s = samples[0]
    assert s.image.shape == (352, 352, 3) and s.image.dtype == np.uint8
    assert s.mask.shape == (352, 352) and s.mask.dtype == bool and 0 < s.mask.mean() < 1
    assert len(pair_files(KVASIR / "train")) == 800
