"""effiseg-run over video files: one result per decoded frame, in order; lossless mask videos;
per-file errors; atomic outputs and resume."""
import json
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

av = pytest.importorskip("av")

from click.testing import CliRunner  # noqa: E402

from effiseg.runtime.cli import run_command  # noqa: E402
from effiseg.runtime.segmenter import Segmenter  # noqa: E402
from effiseg.runtime.video.reader import VideoReader  # noqa: E402
from effiseg.runtime.video.run import FRAMES_JSON, MASK_VIDEO, run_videos  # noqa: E402
from effiseg.runtime.video.writers import TEMP_MARK, MaskVideoWriter, commit, read_mask_video  # noqa: E402

VFR_STEPS_MS = (20, 70, 33)  # frame durations in turn: a variable frame rate


def distinct_frame(i: int, size=(48, 64)) -> np.ndarray:
    """A frame unlike its neighbours (a bright square that moves, a level that changes), so that
    masks put out of order would not match."""
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([(xx * 4 + i * 9) % 256, (yy * 5) % 256, np.full_like(xx, (i * 37) % 256)], axis=-1)
    img[(i * 3) % (h - 16):(i * 3) % (h - 16) + 16, (i * 5) % (w - 16):(i * 5) % (w - 16) + 16] = 255
    return img.astype(np.uint8)


def write_clip(path: Path, n: int, *, vfr: bool = False, bframes: bool = False, container: str | None = None) -> Path:
    """A tiny H.264 clip; ``bframes``: coded with B-frames (decode order differs from display order);
    ``vfr``: frame durations 20/70/33 ms in turn."""
    with av.open(str(path), "w", format=container) as out:
        stream = out.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.codec_context.time_base = Fraction(1, 1000)
        stream.options = {"bf": "2", "g": "12"} if bframes else {"bf": "0"}
        t = 0
        for i in range(n):
            frame = av.VideoFrame.from_ndarray(distinct_frame(i), format="rgb24")
            frame.pts, frame.time_base = t, Fraction(1, 1000)
            t += VFR_STEPS_MS[i % 3] if vfr else 40
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def decoded(path: Path):
    """(pts, picture type) of every frame FFmpeg decodes, in presentation order, and the RGB frames."""
    with av.open(str(path)) as c:
        frames = list(c.decode(video=0))
        return [f.pts for f in frames], [int(f.pict_type) for f in frames], [f.to_ndarray(format="rgb24") for f in frames]


@pytest.fixture
def clips(tmp_path):
    folder = tmp_path / "clips"
    folder.mkdir()
    write_clip(folder / "bframes.mp4", 26, bframes=True)
    write_clip(folder / "vfr.mkv", 23, vfr=True)
    return folder


def test_every_frame_gets_one_mask_in_order_with_b_frames_and_variable_rate(tiny_onnx, clips, tmp_path):
    bframes_pts, types, _ = decoded(clips / "bframes.mp4")
    assert int(av.video.frame.PictureType.B) in types  # the clip really has B-frames
    vfr_pts, _, _ = decoded(clips / "vfr.mkv")
    assert len(set(np.diff(vfr_pts))) > 1  # and this one really has a variable frame rate
    out = tmp_path / "out"
    with Segmenter.from_onnx(tiny_onnx, max_batch=4) as seg:
        summary = run_videos(seg, clips, out, frames=True)
        assert summary["n_ok"] == 2 and summary["n_failed"] == 0
        for name, stem, pts in (("bframes.mp4", "bframes", bframes_pts), ("vfr.mkv", "vfr", vfr_pts)):
            record = __import__("json").loads((out / stem / FRAMES_JSON).read_text())
            assert [r["frame"] for r in record["frames"]] == list(range(len(pts)))
            assert [r["pts"] for r in record["frames"]] == pts
            masks = read_mask_video(out / stem / MASK_VIDEO)
            # The masks of the frames, one by one and in order, exactly (the mask video is lossless).
            _, _, rgb = decoded(clips / name)
            expected = seg.segment(rgb)
            assert len(masks) == len(expected) == len(pts)
            for i, (got, want) in enumerate(zip(masks, expected)):
                assert np.array_equal(got, want), f"{name} frame {i}"
            pngs = sorted((out / stem / "frames").glob("*.png"))
            assert len(pngs) == len(pts)
            from PIL import Image
            assert np.array_equal(np.asarray(Image.open(pngs[-1])) > 127, expected[-1])
            areas = [r["area_fraction"] for r in record["frames"]]
            assert areas == [round(float(m.mean()), 6) for m in expected]
            assert 0 < np.mean(areas) < 1  # the test means something: masks are neither empty nor full
    # The mask video keeps the source's timing (milliseconds of a variable-rate clip).
    with av.open(str(out / "vfr" / MASK_VIDEO)) as c:
        assert [f.pts for f in c.decode(video=0)] == vfr_pts


def test_mask_video_gives_masks_back_exactly(tmp_path):
    rng = np.random.default_rng(0)
    masks = [rng.random((37, 51)) > 0.5 for _ in range(7)]  # odd sizes, noise: the hardest case for a codec
    final = tmp_path / "masks.mkv"
    writer = MaskVideoWriter(final, 51, 37, Fraction(25))
    for i, m in enumerate(masks):
        writer.write(m, i, i / 25)
    temp = writer.close()
    assert not final.exists() and TEMP_MARK in temp.name  # nothing under the final name before commit
    commit(temp, final)
    back = read_mask_video(final)
    assert len(back) == len(masks) and all(np.array_equal(a, b) for a, b in zip(back, masks))


def test_corrupt_and_truncated_videos_are_per_file_errors(tiny_onnx, clips, tmp_path):
    (clips / "noise.mp4").write_bytes(np.random.default_rng(1).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    whole = (clips / "vfr.mkv").read_bytes()
    (clips / "cut.mkv").write_bytes(whole[: len(whole) // 2])  # FFmpeg decodes the first part without a word
    whole = (clips / "bframes.mp4").read_bytes()
    (clips / "cut.mp4").write_bytes(whole[: len(whole) * 2 // 3])
    out = tmp_path / "out"
    with Segmenter.from_onnx(tiny_onnx, max_batch=4) as seg:
        summary = run_videos(seg, clips, out)
    status = {r["file"]: (r["status"], r["error"]) for r in summary["files"]}
    assert status["bframes.mp4"][0] == status["vfr.mkv"][0] == "ok"  # the run went on
    for bad in ("noise.mp4", "cut.mkv", "cut.mp4"):
        assert status[bad][0] == "error" and bad in status[bad][1], status[bad]
    assert "truncated" in status["cut.mkv"][1]
    for stem in ("noise", "cut"):
        assert not (out / stem).exists()
    assert summary["n_failed"] == 3


def test_a_killed_run_leaves_no_output_under_final_names_and_resume_finishes(tiny_onnx, clips, tmp_path,
                                                                              monkeypatch):
    out = tmp_path / "out"
    real_write = MaskVideoWriter.write

    def write_then_die(self, mask, index, time_s):
        if index == 9 and self.final.parent.name == "vfr":
            raise KeyboardInterrupt  # Ctrl-C (or a kill) in the middle of the second video
        real_write(self, mask, index, time_s)

    with Segmenter.from_onnx(tiny_onnx, max_batch=4) as seg:
        run_videos(seg, clips / "bframes.mp4", out / "bframes")  # one complete video
        monkeypatch.setattr(MaskVideoWriter, "write", write_then_die)
        with pytest.raises(KeyboardInterrupt):
            run_videos(seg, clips, out, overlay=True)
        monkeypatch.setattr(MaskVideoWriter, "write", real_write)
        assert (out / "bframes" / FRAMES_JSON).exists()  # the first video was done again, completely
        assert not list((out / "vfr").iterdir())  # the second: nothing under a final name, no temporary file
        summary = run_videos(seg, clips, out, resume=True)
        assert [r["status"] for r in summary["files"]] == ["skipped", "ok"]
        again = run_videos(seg, clips, out, resume=True)
        assert [r["status"] for r in again["files"]] == ["skipped", "skipped"]
        assert again["files"][1]["frames"] == 23
        # The killed run made bframes' overlay; vfr's was never made: asking for it redoes vfr alone.
        overlay = run_videos(seg, clips, out, resume=True, overlay=True)
        assert [r["status"] for r in overlay["files"]] == ["skipped", "ok"]
        redone = run_videos(seg, clips / "vfr.mkv", out / "vfr")  # without --resume: made again
        assert redone["files"][0]["status"] == "ok" and not (out / "vfr" / "overlay.mp4").exists()
    assert not list(out.rglob(f"*{TEMP_MARK}"))


def test_cli_runs_a_video_file_with_overlay_and_frames(tiny_onnx, clips, tmp_path):
    out = tmp_path / "clip_out"
    result = CliRunner().invoke(run_command, ["--input", str(clips / "vfr.mkv"), "--output", str(out), "--model",
                                              str(tiny_onnx), "--backend", "onnxruntime", "--overlay", "--frames",
                                              "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "1 video(s): 1 ok" in result.output
    with VideoReader(out / "overlay.mp4") as overlay:
        assert sum(1 for _ in overlay) == 23
    assert len(list((out / "frames").glob("*.png"))) == 23
    assert (out / "effiseg_summary.csv").read_text().splitlines()[1].startswith("vfr.mkv,")
    (clips / "bad.mkv").write_bytes(b"not a video")
    result = CliRunner().invoke(run_command, ["--input", str(clips), "--output", str(tmp_path / "o2"), "--model",
                                              str(tiny_onnx), "--backend", "onnxruntime", "--no-progress"])
    assert result.exit_code == 1 and "FAILED bad.mkv" in result.output


def test_resume_redoes_a_video_made_with_other_settings(tiny_onnx, clips, tmp_path):
    out = tmp_path / "out"
    with Segmenter.from_onnx(tiny_onnx, max_batch=4) as seg:
        run_videos(seg, clips / "vfr.mkv", out)
    with Segmenter.from_onnx(tiny_onnx, max_batch=4, threshold=0.3) as seg:
        again = run_videos(seg, clips / "vfr.mkv", out, resume=True)
        assert again["files"][0]["status"] == "ok"  # not skipped: its masks were cut at another threshold
        record = __import__("json").loads((out / FRAMES_JSON).read_text())
        assert record["settings"]["threshold"] == 0.3
        assert run_videos(seg, clips / "vfr.mkv", out, resume=True)["files"][0]["status"] == "skipped"


def test_valid_videos_with_fewer_frames_than_the_header_count_are_read_whole(tmp_path):
    # An MP4 cut with an edit list (frames before 0, as `ffmpeg -ss ... -c copy` makes) and an AVI with
    # empty chunks for dropped frames: both decode fewer frames than the header's nb_frames, and are whole.
    edited = tmp_path / "edited.mp4"
    with av.open(str(edited), "w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.codec_context.time_base = Fraction(1, 1000)
        stream.options = {"bf": "0"}
        for i in range(20):
            frame = av.VideoFrame.from_ndarray(distinct_frame(i), format="rgb24")
            frame.pts, frame.time_base = -120 + 40 * i, Fraction(1, 1000)
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    gaps = tmp_path / "gaps.avi"
    with av.open(str(gaps), "w", format="avi") as out:
        stream = out.add_stream("mpeg4", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.codec_context.time_base = Fraction(1, 25)
        for k, i in enumerate([0, 1, 2, 5, 6, 7, 10, 11]):  # frames 3, 4, 8, 9 dropped by the capture
            frame = av.VideoFrame.from_ndarray(distinct_frame(k), format="rgb24")
            frame.pts, frame.time_base = i, Fraction(1, 25)
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    for path in (edited, gaps):
        pts, _, _ = decoded(path)
        with av.open(str(path)) as c:
            assert c.streams.video[0].frames > len(pts)  # the case: the header counts more than decode
        with VideoReader(path) as reader:
            assert [f.pts for f in reader] == pts


def test_videos_whose_output_folders_collide_are_per_file_errors_naming_each_other(tiny_onnx, tmp_path):
    src = tmp_path / "clips"
    (src / "x").mkdir(parents=True)
    for name in ("clip.mp4", "clip.mkv", "clip_MP4.avi", "x.mp4", "x/frames.mp4", "x/other.mp4", "Case.mp4",
                 "case.mkv.mp4"):
        write_clip(src / name, 3)
    out = tmp_path / "out"
    with Segmenter.from_onnx(tiny_onnx, max_batch=4) as seg:
        summary = run_videos(seg, src, out, recursive=True)
        rows = {r["file"]: r for r in summary["files"]}
        # clip.mp4 -> clip_mp4/ (beside clip.mkv), the folder clip_MP4.avi would have on Windows: neither is written.
        for a, b in (("clip.mp4", "clip_MP4.avi"), ("x.mp4", "x/frames.mp4")):
            assert rows[a]["status"] == rows[b]["status"] == "error"
            assert b in rows[a]["error"] and a in rows[b]["error"]
        assert rows["clip.mkv"]["status"] == rows["x/other.mp4"]["status"] == "ok"  # nested, but harmless
        assert not (out / "x" / "frames").exists() and not (out / "clip_mp4").exists() and not (out / "clip_MP4").exists()
        # Case.mp4 -> Case/, case.mkv.mp4 -> case.mkv/: distinct; a record of another video is not resumed.
        assert rows["Case.mp4"]["status"] == "ok"
        record = json.loads((out / "Case" / FRAMES_JSON).read_text())
        record["video"] = "someone_else.mp4"
        (out / "Case" / FRAMES_JSON).write_text(json.dumps(record))
        again = {r["file"]: r["status"] for r in run_videos(seg, src, out, recursive=True, resume=True)["files"]}
        assert again["Case.mp4"] == "ok" and again["clip.mkv"] == "skipped"


def test_any_error_of_one_video_is_its_row_and_the_run_goes_on(tiny_onnx, clips, tmp_path, monkeypatch):
    from effiseg.runtime.video import reader as reader_module
    from effiseg.runtime.video import writers
    real_overlay_codec = writers.overlay_codec
    real_next = reader_module.VideoReader.__next__

    def no_encoder():
        raise RuntimeError("no H.264 or MPEG-4 encoder in this FFmpeg")

    def unconvertible(self):
        frame = real_next(self)
        if self.path.name == "vfr.mkv" and frame.index == 5:
            raise ValueError("Conversion to numpy array with format `rgb24` is not yet supported")
        return frame

    with Segmenter.from_onnx(tiny_onnx, max_batch=4) as seg:
        monkeypatch.setattr(writers, "overlay_codec", no_encoder)
        summary = run_videos(seg, clips, tmp_path / "o1", overlay=True)
        assert [r["status"] for r in summary["files"]] == ["error", "error"]
        assert all(r["file"] in r["error"] and "no H.264" in r["error"] for r in summary["files"])
        monkeypatch.setattr(writers, "overlay_codec", real_overlay_codec)
        monkeypatch.setattr(reader_module.VideoReader, "__next__", unconvertible)
        rows = {r["file"]: r for r in run_videos(seg, clips, tmp_path / "o2")["files"]}
        assert rows["bframes.mp4"]["status"] == "ok"
        assert rows["vfr.mkv"]["status"] == "error" and "ValueError" in rows["vfr.mkv"]["error"]
        assert "vfr.mkv" in rows["vfr.mkv"]["error"] and not (tmp_path / "o2" / "vfr").exists()


def test_a_failed_rerun_keeps_the_earlier_complete_record(tiny_onnx, clips, tmp_path, monkeypatch):
    out = tmp_path / "out"
    with Segmenter.from_onnx(tiny_onnx, max_batch=4) as seg:
        run_videos(seg, clips / "vfr.mkv", out)
        before = (out / FRAMES_JSON).read_bytes()

        def fail(self, mask, index, time_s):
            raise OSError("disk full")

        monkeypatch.setattr(MaskVideoWriter, "write", fail)
        assert run_videos(seg, clips / "vfr.mkv", out)["files"][0]["status"] == "error"
        monkeypatch.undo()
        assert (out / FRAMES_JSON).read_bytes() == before  # the earlier video's outputs are still vouched for
        assert run_videos(seg, clips / "vfr.mkv", out, resume=True)["files"][0]["status"] == "skipped"


def test_resume_redoes_a_video_whose_record_is_malformed_or_whose_source_changed(tiny_onnx, clips, tmp_path):
    import os
    out = tmp_path / "out"
    with Segmenter.from_onnx(tiny_onnx, max_batch=4) as seg:
        run_videos(seg, clips / "vfr.mkv", out)
        record = json.loads((out / FRAMES_JSON).read_text())
        assert record["source_stat"]["size"] == (clips / "vfr.mkv").stat().st_size
        for bad in (None, "23", 0):
            (out / FRAMES_JSON).write_text(json.dumps(dict(record, n_frames=bad)))
            assert run_videos(seg, clips / "vfr.mkv", out, resume=True)["files"][0]["status"] == "ok", bad
        assert run_videos(seg, clips / "vfr.mkv", out, resume=True)["files"][0]["status"] == "skipped"
        write_clip(clips / "vfr.mkv", 11)  # another recording under the same name
        stat = (clips / "vfr.mkv").stat()
        os.utime(clips / "vfr.mkv", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
        again = run_videos(seg, clips / "vfr.mkv", out, resume=True)["files"][0]
        assert again["status"] == "ok" and again["frames"] == 11


def test_frames_on_an_image_run_is_a_usage_error_not_ignored(tiny_onnx, tmp_path):
    from PIL import Image
    src = tmp_path / "images"
    src.mkdir()
    Image.fromarray(distinct_frame(0)).save(src / "0.png")
    result = CliRunner().invoke(run_command, ["--input", str(src), "--output", str(tmp_path / "out"), "--model",
                                              str(tiny_onnx), "--frames", "--no-progress"])
    assert result.exit_code == 2 and "--frames is for video input" in result.output
    assert not (tmp_path / "out").exists()  # refused before anything ran
