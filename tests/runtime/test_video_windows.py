"""effiseg-run over videos on Windows, simulated on Linux: a drive root as input, a summary CSV open in
Excel, names Windows folds together, outputs held open by a video player or an image viewer."""
import json
import os
import shutil
from pathlib import Path

import pytest

pytest.importorskip("av")

from click.testing import CliRunner  # noqa: E402
from test_video import write_clip  # noqa: E402

from effiseg.runtime.cli import run_command  # noqa: E402
from effiseg.runtime.segmenter import Segmenter  # noqa: E402
from effiseg.runtime.video.run import (FRAMES_JSON, MASK_VIDEO, OVERLAY_VIDEO, VideoInputError,  # noqa: E402
                                       default_video_output, run_videos)
from effiseg.runtime.video.writers import TEMP_MARK  # noqa: E402
from effiseg.runtime.windows_names import windows_path_key  # noqa: E402

HELD = "The process cannot access the file because it is being used by another process"


def hold_open(monkeypatch, held: Path):
    """What Windows does to a file open in another program without delete sharing (a video player,
    Excel, an image viewer): it cannot be renamed or replaced, nor can a folder holding it be renamed;
    deleting such a folder deletes its other files and then fails at that one."""
    real_replace, real_rmtree = os.replace, shutil.rmtree
    folder = held.parent if held.suffix == ".png" else held

    def replace(src, dst, **kw):
        for path in (Path(src), Path(dst)):
            if path in (held, folder):
                raise PermissionError(13, HELD, str(path))
        return real_replace(src, dst, **kw)

    def rmtree(path, *args, **kw):
        if Path(path) == folder and folder != held:
            for f in sorted(folder.iterdir()):
                if f == held:
                    raise PermissionError(13, HELD, str(f))
                f.unlink()
        return real_rmtree(path, *args, **kw)

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(shutil, "rmtree", rmtree)


def test_a_drive_root_as_input_needs_output_named(tiny_onnx, monkeypatch):
    # E:\ (a recorder's USB stick of videos) has no name to put "_masks" after, nor a sibling folder; / here.
    root = Path(Path.cwd().anchor)
    with pytest.raises(VideoInputError, match="root of a drive or share.*--output"):
        default_video_output(root)
    from effiseg.runtime import video
    monkeypatch.setattr(video, "is_video_input", lambda path, recursive: True)  # as E:\ holding clips would be
    result = CliRunner().invoke(run_command, ["--input", str(root), "--model", str(tiny_onnx), "--no-progress"])
    assert result.exit_code == 3, result.output  # a one-line refusal before any model loads, not a traceback
    assert "root of a drive or share" in result.output


def test_a_summary_csv_open_in_excel_is_said_and_the_exit_status_is_the_videos(tiny_onnx, tmp_path, monkeypatch):
    src = tmp_path / "clips"
    src.mkdir()
    write_clip(src / "a.mp4", 4)
    out = tmp_path / "out"
    out.mkdir()
    hold_open(monkeypatch, out / "effiseg_summary.csv")  # the earlier run's CSV, open in Excel
    result = CliRunner().invoke(run_command, ["--input", str(src), "--output", str(out), "--model", str(tiny_onnx),
                                              "--backend", "onnxruntime", "--no-progress"])
    assert result.exit_code == 0, result.output  # the video is done: not "could not start" (exit 3)
    assert f"could not write {out / 'effiseg_summary.csv'}" in result.output and "Excel" in result.output
    summary = json.loads((out / "effiseg_summary.json").read_text())
    assert summary["n_ok"] == 1 and summary["summary_csv"] is None
    assert not list(out.rglob(f"*{TEMP_MARK}"))


def test_names_windows_folds_together_get_output_folders_of_their_own(tiny_onnx, tmp_path):
    # Windows drops trailing dots and spaces: clip./ is clip/, "case 12 /" is "case 12/".
    src = tmp_path / "clips"
    (src / "x.").mkdir(parents=True)
    names = ("clip.mp4", "clip..mp4", "case 12.mp4", "case 12 .mp4", "x.mp4", "x./frames.mp4")
    for name in names:
        write_clip(src / name, 3)
    with Segmenter.from_onnx(tiny_onnx, max_batch=4) as seg:
        rows = {r["file"]: r for r in run_videos(seg, src, tmp_path / "out", recursive=True)["files"]}
    folders = [windows_path_key(Path(rows[n]["output"]).relative_to(tmp_path / "out").as_posix()) for n in names[:4]]
    assert len(set(folders)) == 4 and all(rows[n]["status"] == "ok" for n in names[:4])
    # x./frames.mp4's folder would be x/frames/ on Windows: the frames/ output of x.mp4.
    assert rows["x.mp4"]["status"] == rows["x./frames.mp4"]["status"] == "error"
    assert "x./frames.mp4" in rows["x.mp4"]["error"] and "x.mp4" in rows["x./frames.mp4"]["error"]


def _outputs(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("held_name", [MASK_VIDEO, OVERLAY_VIDEO])
def test_an_output_open_in_a_video_player_keeps_the_earlier_outputs(tiny_onnx, tmp_path, monkeypatch, held_name):
    clip = write_clip(tmp_path / "clip.mp4", 5)
    out = tmp_path / "out"
    with Segmenter.from_onnx(tiny_onnx, max_batch=4) as seg:
        run_videos(seg, clip, out, overlay=True, frames=True)
        before = _outputs(out)
        hold_open(monkeypatch, out / held_name)
        row = run_videos(seg, clip, out, overlay=True, frames=True)["files"][0]
        monkeypatch.undo()
        assert row["status"] == "error"
        assert str(out / held_name) in row["error"] and "close it" in row["error"]
        assert "earlier outputs are kept" in row["error"]
        after = _outputs(out)
        # Every earlier output is still there, byte for byte, and still vouched for by its record.
        assert {k: v for k, v in after.items() if not k.startswith("effiseg_")} == \
            {k: v for k, v in before.items() if not k.startswith("effiseg_")}
        assert FRAMES_JSON in after and not list(out.rglob(f"*{TEMP_MARK}"))
        assert run_videos(seg, clip, out, overlay=True, frames=True, resume=True)["files"][0]["status"] == "skipped"


def test_a_frame_png_open_in_a_viewer_leaves_frames_whole(tiny_onnx, tmp_path, monkeypatch):
    clip = write_clip(tmp_path / "clip.mp4", 8)
    out = tmp_path / "out"
    with Segmenter.from_onnx(tiny_onnx, max_batch=4) as seg:
        run_videos(seg, clip, out, frames=True)
        before = _outputs(out)
        hold_open(monkeypatch, out / "frames" / "000005.png")  # open in an image viewer
        row = run_videos(seg, clip, out, frames=True)["files"][0]
        monkeypatch.undo()
    assert row["status"] == "error" and str(out / "frames") in row["error"] and "close it" in row["error"]
    after = _outputs(out)
    assert sorted(k for k in after if k.startswith("frames/")) == [f"frames/{i:06d}.png" for i in range(8)]
    assert {k: after[k] for k in before if not k.startswith("effiseg_")} == \
        {k: v for k, v in before.items() if not k.startswith("effiseg_")}
    assert not list(out.rglob(f"*{TEMP_MARK}"))
