"""Output naming and the resume journal of effiseg-run's folder mode."""
import json
from pathlib import Path

import numpy as np
import pytest
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


def test_mask_png_reads_back_as_the_mask_in_every_reader_mode(tmp_path):
    import io
    import zlib

    from effiseg.runtime.images import encode_mask_png, png_is_complete, write_mask_png
    rng = np.random.default_rng(0)
    cases = [rng.random((37, 53)) < 0.4, np.ones((1, 1), bool), np.zeros((3, 700), bool),
             (rng.random((300, 2)) < 0.5).astype(np.uint8) * 255,  # 0/255 uint8 counts as a mask too
             rng.random((64, 64)) - 0.5]                           # and so does any nonzero value
    for i, mask in enumerate(cases):
        data = encode_mask_png(mask)
        with Image.open(io.BytesIO(data)) as im:
            im.load()  # PIL checks every chunk's CRC and the zlib stream while loading
            assert (im.mode, im.size) == ("L", (mask.shape[1], mask.shape[0]))
            np.testing.assert_array_equal(np.asarray(im), np.where(mask != 0, 255, 0))
        path = tmp_path / f"{i}.png"
        write_mask_png(path, mask)
        assert path.read_bytes() == data and png_is_complete(path)
    # 8-bit grayscale, one IDAT, no filtering: what any PNG reader takes.
    data = encode_mask_png(cases[0])
    assert data[12:16] == b"IHDR" and data[24:29] == bytes([8, 0, 0, 0, 0])
    idat_len = int.from_bytes(data[33:37], "big")
    assert data[37:41] == b"IDAT"
    rows = np.frombuffer(zlib.decompress(data[41:41 + idat_len]), np.uint8).reshape(37, 54)
    assert (rows[:, 0] == 0).all()
    for bad in (np.ones((2, 2, 2), bool), np.zeros((0, 5), bool)):
        with pytest.raises(ValueError, match="2-D"):
            encode_mask_png(bad)


def test_mask_png_splits_a_long_stream_over_idat_chunks(monkeypatch):
    import io

    from effiseg.runtime import images
    mask = np.random.default_rng(1).random((40, 30)) < 0.5
    monkeypatch.setattr(images, "_IDAT_MAX", 64)  # stands in for the format's 2**31 - 1 bytes
    data = images.encode_mask_png(mask)
    assert data.count(b"IDAT") > 3
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        np.testing.assert_array_equal(np.asarray(im), np.where(mask, 255, 0))


def test_resume_redoes_masks_an_earlier_run_made_with_other_settings(tiny_onnx, tmp_path):
    """Run A (threshold 0.5) finished; run B (threshold 0.3, not a resume) got through two images
    and stopped; resuming B must redo the other two, whose masks are still A's."""
    import shutil
    src = write_noise_images(tmp_path / "in", 4, shape=(40, 50))
    part = tmp_path / "part"  # what run B got through before it stopped
    part.mkdir()
    for name in ("0.png", "1.png"):
        shutil.copyfile(src / name, part / name)
    out = tmp_path / "out"
    with Segmenter.from_onnx(tiny_onnx, max_batch=2) as seg:
        assert seg.run_folder(src, out, progress=False)["n_ok"] == 4
    with Segmenter.from_onnx(tiny_onnx, max_batch=2, threshold=0.3) as seg:
        seg.run_folder(part, out, progress=False)
        resumed = seg.run_folder(src, out, resume=True, progress=False)
        fresh = seg.run_folder(src, tmp_path / "fresh", progress=False)
    status = {r["file"]: r["status"] for r in resumed["files"]}
    assert status == {"0.png": "skipped", "1.png": "skipped", "2.png": "ok", "3.png": "ok"}
    for i in range(4):  # every mask is now run B's
        assert (out / f"{i}.png").read_bytes() == (tmp_path / "fresh" / f"{i}.png").read_bytes()


def test_resume_trusts_an_unjournaled_mask_of_this_run_but_not_a_failed_row(tiny_onnx, tmp_path):
    src = write_noise_images(tmp_path / "in", 4, shape=(40, 50))
    out = tmp_path / "out"
    with Segmenter.from_onnx(tiny_onnx, max_batch=2) as seg:
        seg.run_folder(src, out, progress=False)
        journal = out / JOURNAL_NAME
        rows = [json.loads(line) for line in journal.read_text().splitlines()]
        by_file = {r["file"]: r for r in rows}
        # 3.png: killed after its mask was renamed into place, before its journal line;
        # 2.png: the journal says it failed (a mask of an earlier run may lie there).
        by_file["2.png"].update(status="error", error="inference: device lost")
        journal.write_text("".join(json.dumps(r) + "\n" for f, r in by_file.items() if f != "3.png"))
        # Masks are newer than the settings record by milliseconds here; a coarse file clock (NTFS, a
        # fast machine) could make them tie. The record's time is set well before them.
        import os
        settings = out / "effiseg_run_settings.json"
        os.utime(settings, (settings.stat().st_atime, settings.stat().st_mtime - 10))
        resumed = seg.run_folder(src, out, resume=True, progress=False)
    status = {r["file"]: r["status"] for r in resumed["files"]}
    assert status == {"0.png": "skipped", "1.png": "skipped", "2.png": "ok", "3.png": "skipped"}


def test_resume_without_a_record_of_the_settings_does_every_image_again(tiny_onnx, tmp_path):
    from effiseg.runtime.folder import SETTINGS_NAME
    src = write_noise_images(tmp_path / "in", 3, shape=(40, 50))
    out = tmp_path / "out"
    with Segmenter.from_onnx(tiny_onnx, max_batch=2) as seg:
        seg.run_folder(src, out, progress=False)
        (out / SETTINGS_NAME).unlink()
        said = []
        resumed = seg.run_folder(src, out, resume=True, progress=False, log=said.append)
    assert resumed["n_ok"] == 3 and any("no record of the settings" in m for m in said)
    assert (out / SETTINGS_NAME).is_file()


def test_resume_refuses_another_input_size_and_a_retrained_checkpoint(tiny_onnx_dynamic, tiny_checkpoint, tmp_path):
    from effiseg.runtime.folder import FolderError
    src = write_noise_images(tmp_path / "in", 2, shape=(40, 50))
    out = tmp_path / "out"
    with Segmenter.from_onnx(tiny_onnx_dynamic, max_batch=2) as seg:
        seg.run_folder(src, out, progress=False)
    with Segmenter.from_onnx(tiny_onnx_dynamic, max_batch=2, input_size=(96, 96)) as seg:
        with pytest.raises(FolderError, match="input_size"):
            seg.run_folder(src, out, resume=True, progress=False)
    # A checkpoint folder retrained in place keeps its name: its content decides.
    import shutil
    ckpt = tmp_path / "best"
    shutil.copytree(tiny_checkpoint, ckpt)
    out2 = tmp_path / "out2"
    with Segmenter.from_checkpoint(ckpt, devices=["cpu"], max_batch=2) as seg:
        seg.run_folder(src, out2, progress=False)
    weights = next(ckpt.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # other weights, same name
    weights.write_bytes(bytes(data))
    with Segmenter.from_checkpoint(ckpt, devices=["cpu"], max_batch=2) as seg:
        with pytest.raises(FolderError, match="model_sha256"):
            seg.run_folder(src, out2, resume=True, progress=False)


def test_resume_accepts_a_checkpoint_folder_recorded_by_an_older_effiseg(tiny_checkpoint, tmp_path):
    """Older records hold no hash for a checkpoint folder (or the weights file's alone): less on
    record, not a different model."""
    import shutil
    from effiseg.runtime.folder import SETTINGS_NAME
    from effiseg.runtime.trt_engine_cache import file_sha256
    src = write_noise_images(tmp_path / "in", 2, shape=(40, 50))
    ckpt = tmp_path / "best"
    shutil.copytree(tiny_checkpoint, ckpt)
    for old_hash in (None, file_sha256(next(ckpt.glob("*.safetensors")))):
        out = tmp_path / f"out-{old_hash is None}"
        with Segmenter.from_checkpoint(ckpt, devices=["cpu"], max_batch=2) as seg:
            seg.run_folder(src, out, progress=False)
            record = json.loads((out / SETTINGS_NAME).read_text())
            record["model_sha256"] = old_hash
            del record["input_size"]  # not recorded then either
            (out / SETTINGS_NAME).write_text(json.dumps(record))
            said = []
            resumed = seg.run_folder(src, out, resume=True, progress=False, log=said.append)
        assert resumed["n_skipped"] == 2
        assert any("model_sha256" in m and "input_size" in m and "assumed unchanged" in m for m in said)


def test_a_fresh_run_refused_at_an_open_summary_leaves_the_folder_resumable(tiny_onnx, tmp_path, monkeypatch):
    from effiseg.runtime.folder import SUMMARY_STEM, FolderError
    src = write_noise_images(tmp_path / "in", 3, shape=(40, 50))
    out = tmp_path / "out"
    with Segmenter.from_onnx(tiny_onnx, max_batch=2) as seg:
        seg.run_folder(src, out, progress=False)
        real_unlink = Path.unlink

        def locked(self, missing_ok=False):  # Windows: the CSV summary is open in Excel
            if self.name == f"{SUMMARY_STEM}.csv":
                raise PermissionError(13, "Permission denied", str(self))
            return real_unlink(self, missing_ok=missing_ok)
        monkeypatch.setattr(Path, "unlink", locked)
        with pytest.raises(FolderError, match="close it and run again"):
            seg.run_folder(src, out, progress=False)
        monkeypatch.setattr(Path, "unlink", real_unlink)
        assert len(_read_journal(out / JOURNAL_NAME)) == 3  # the journal was not thrown away
        resumed = seg.run_folder(src, out, resume=True, progress=False)
    assert resumed["n_skipped"] == 3


def test_a_csv_summary_that_cannot_be_written_is_a_warning_when_the_json_has_the_rows(tiny_onnx, tmp_path,
                                                                                       monkeypatch):
    from effiseg.runtime import folder
    src = write_noise_images(tmp_path / "in", 2, shape=(40, 50))

    real_write = folder.atomic_write_text

    def full_disk_for_the_csv(path, text):
        if str(path).endswith(".csv"):
            raise OSError(28, "No space left on device", str(path))
        real_write(path, text)
    monkeypatch.setattr(folder, "atomic_write_text", full_disk_for_the_csv)
    said = []
    with Segmenter.from_onnx(tiny_onnx, max_batch=2) as seg:
        summary = seg.run_folder(src, tmp_path / "out", progress=False, log=said.append)
    assert summary["n_ok"] == 2 and summary["summary_csv"] is None and summary["summary_json"]
    assert any("No space left on device" in m and "same rows" in m for m in said)


def test_a_model_file_is_hashed_once_per_version(tmp_path, monkeypatch):
    """Every folder run records the model's hash; an unchanged file is not read again for it, and
    a file rewritten in place (retrained) is."""
    import os
    import effiseg.runtime.folder as folder
    reads = []
    real = folder.file_sha256
    monkeypatch.setattr(folder, "file_sha256", lambda path: reads.append(path) or real(path))
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"first weights")
    first = folder.content_sha256(weights)
    assert folder.content_sha256(weights) == first and len(reads) == 1
    weights.write_bytes(b"other weights")  # same size, same name
    stat = os.stat(weights)
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))  # a later write's time
    second = folder.content_sha256(weights)
    assert len(reads) == 2 and second != first and second == real(weights)
