"""effiseg-stream --csv on Windows, simulated on Linux: a CSV open in Excel is refused before the model
loads (a first TensorRT engine build takes minutes), and an earlier CSV is kept until the stream starts."""
import json

import pytest

pytest.importorskip("av")

from click.testing import CliRunner  # noqa: E402
from test_video import write_clip  # noqa: E402

from effiseg.runtime import segmenter, stream  # noqa: E402
from effiseg.runtime.stream import stream_command  # noqa: E402


def test_a_csv_open_in_excel_is_refused_before_the_model_loads(tmp_path, monkeypatch):
    clip = write_clip(tmp_path / "clip.mp4", 3)
    rows = tmp_path / "rows.csv"
    rows.write_text("frame\n0\n")
    real_open = open

    def excel_holds(path, *args, **kwargs):  # Windows: a file open in Excel cannot be opened for writing
        if str(path) == str(rows) and "r" not in (args[0] if args else kwargs.get("mode", "r")):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    loaded = []
    monkeypatch.setattr(stream, "open", excel_holds, raising=False)
    monkeypatch.setattr(segmenter.Segmenter, "from_model", classmethod(lambda cls, *a, **k: loaded.append(a)))
    result = CliRunner().invoke(stream_command, [str(clip), "--csv", str(rows), "--json", str(tmp_path / "s.json")])
    assert result.exit_code == 3, result.output
    assert f"cannot write {rows}" in result.output and "Excel" in result.output
    assert loaded == [] and rows.read_text() == "frame\n0\n"


def test_an_earlier_csv_is_kept_when_the_model_fails_and_replaced_when_the_stream_runs(tiny_onnx, tmp_path):
    clip = write_clip(tmp_path / "clip.mp4", 4)
    rows = tmp_path / "rows.csv"
    rows.write_text("an earlier stream's rows\n")
    failed = CliRunner().invoke(stream_command, [str(clip), "--model", str(tmp_path / "missing.onnx"), "--csv",
                                                 str(rows), "--json", str(tmp_path / "s.json")])
    assert failed.exit_code == 3 and rows.read_text() == "an earlier stream's rows\n"
    fresh = tmp_path / "fresh.csv"
    CliRunner().invoke(stream_command, [str(clip), "--model", str(tmp_path / "missing.onnx"), "--csv", str(fresh)])
    assert not fresh.exists()  # nothing of a stream that never started is left behind
    ran = CliRunner().invoke(stream_command, [str(clip), "--model", str(tiny_onnx), "--backend", "onnxruntime",
                                              "--rate", "200", "--queue", "8", "--csv", str(rows), "--json",
                                              str(tmp_path / "s.json"), "--quiet"])
    assert ran.exit_code == 0, ran.output
    lines = rows.read_text().splitlines()
    assert lines[0].startswith("frame,pts,time_s") and "earlier" not in rows.read_text()
    assert len(lines) - 1 == json.loads((tmp_path / "s.json").read_text())["frames_processed"]
