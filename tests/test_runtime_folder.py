"""Output naming and the resume journal of effiseg-run's folder mode."""
import json
from pathlib import Path

import numpy as np
from PIL import Image
from conftest import write_noise_images

from effiseg.runtime.folder import JOURNAL_NAME, _read_journal, plan_jobs
from effiseg.runtime.segmenter import Segmenter


def test_mask_names_never_collide():
    root = Path("in")
    files = [root / "a.jpg", root / "a.png", root / "a.png.png", root / "b.JPG", root / "B.png", root / "c.tif"]
    jobs = plan_jobs(root, Path("out"), files, overlay=True)
    names = [j.mask_rel.casefold() for j in jobs]
    assert len(set(names)) == len(names), names
    assert jobs[-1].mask_rel == "c.png"  # no clash, no renaming
    overlays = [str(j.overlay_path).casefold() for j in jobs]
    assert len(set(overlays)) == len(overlays)


def test_resume_after_a_half_written_journal_line(tiny_onnx, tmp_path):
    src = write_noise_images(tmp_path / "in", 5, shape=(40, 50))
    out = tmp_path / "out"
    with Segmenter.from_onnx(tiny_onnx, max_batch=2) as seg:
        first = seg.run_folder(src, out, progress=False)
        journal = out / JOURNAL_NAME
        lines = journal.read_text().splitlines()
        assert len(lines) == 5
        # A kill in the middle of writing the last line, before its mask was renamed into place.
        last = json.loads(lines[-1])
        (out / last["mask"]).unlink()
        journal.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][: len(lines[-1]) // 2])
        second = seg.run_folder(src, out, resume=True, progress=False)
    rows = _read_journal(journal)
    assert set(rows) == {f"{i}.png" for i in range(5)}  # the resumed row did not merge into the broken line
    assert all(r["max_probability"] is not None for r in rows.values())
    assert first["n_ok"] == 5 and second["n_ok"] == 1  # only the unfinished image ran again
    assert len(second["files"]) == 5


def test_resume_refuses_other_settings_and_redoes_missing_overlays(tiny_onnx, tmp_path):
    import pytest

    from effiseg.runtime.folder import FolderError
    src = tmp_path / "in"
    src.mkdir()
    for i in range(3):
        Image.fromarray(np.full((30, 30, 3), 40 * i, np.uint8)).save(src / f"{i}.png")
    out = tmp_path / "out"
    with Segmenter.from_onnx(tiny_onnx, max_batch=2) as seg:
        seg.run_folder(src, out, progress=False)
        again = seg.run_folder(src, out, resume=True, overlay=True, progress=False)
    assert again["n_ok"] == 3  # no overlay existed for any finished mask: all three are redone
    assert len(list((out / "overlays").glob("*.jpg"))) == 3
    with Segmenter.from_onnx(tiny_onnx, max_batch=2, threshold=0.3) as seg:
        with pytest.raises(FolderError, match="threshold: 0.5 then, 0.3 now"):
            seg.run_folder(src, out, resume=True, progress=False)
