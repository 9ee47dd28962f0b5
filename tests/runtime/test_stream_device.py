"""effiseg-stream on a capture device: FFmpeg's device path (--format FMT SOURCE, unpaced: a device
paces itself), run on lavfi, the virtual input device every PyAV wheel's FFmpeg carries. A camera
(v4l2, dshow, avfoundation) takes the same path; none is attached here."""
import json

import pytest

pytest.importorskip("av")

from click.testing import CliRunner  # noqa: E402

from effiseg.runtime.stream import EXIT_CANNOT_START, stream_command  # noqa: E402
from effiseg.runtime.video import input_format_available  # noqa: E402

if not input_format_available("lavfi"):
    pytest.skip("this PyAV's FFmpeg has no lavfi input device", allow_module_level=True)

# "realtime" delivers each frame when its timestamp comes due, as a camera does; without it lavfi
# hands frames over as fast as they are read, a source far faster than the model.
CAMERA = "testsrc2=size=96x96:rate=30,realtime"
FLOOD = "testsrc2=size=96x96:rate=30"


def _stream(tiny_onnx, tmp_path, source, *args):
    out, rows = tmp_path / "s.json", tmp_path / "s.csv"
    result = CliRunner().invoke(stream_command, [source, "--format", "lavfi", "--model", str(tiny_onnx),
                                                 "--backend", "onnxruntime", "--json", str(out), "--csv", str(rows),
                                                 "--quiet", *args])
    return result, out, rows


def test_a_device_stream_accounts_for_every_frame_with_latency_percentiles(tiny_onnx, tmp_path):
    result, out, rows = _stream(tiny_onnx, tmp_path, CAMERA, "--max-frames", "24")
    assert result.exit_code == 0, result.output
    summary = json.loads(out.read_text())
    assert summary["format"] == "lavfi" and summary["paced"] is False  # the device's own pace, not effiseg's
    assert summary["source_rate"] == 30.0 and (summary["width"], summary["height"]) == (96, 96)
    assert summary["frames_captured"] == 24 and summary["frames_failed"] == 0 and summary["complete"]
    assert summary["frames_processed"] + summary["frames_dropped"] == 24
    assert summary["frames_processed"] >= 1
    lat = summary["latency_ms"]
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
    lines = rows.read_text().splitlines()
    assert len(lines) == 1 + summary["frames_processed"]
    indices = [int(line.split(",")[0]) for line in lines[1:]]
    assert indices == sorted(set(indices)) and indices[-1] <= 23  # each frame once, in order


def test_a_device_faster_than_the_model_drops_and_counts_instead_of_queueing(tiny_onnx, tmp_path):
    result, out, _ = _stream(tiny_onnx, tmp_path, FLOOD, "--max-frames", "40", "--queue", "2")
    assert result.exit_code == 0, result.output
    summary = json.loads(out.read_text())
    assert summary["frames_captured"] == 40
    assert summary["frames_processed"] + summary["frames_dropped"] == 40 and summary["frames_failed"] == 0


def test_a_wrong_device_or_format_names_the_source_and_exits_3(tiny_onnx, tmp_path):
    result, out, _ = _stream(tiny_onnx, tmp_path, "nosuchsource=size=8x8", "--max-frames", "3")
    assert result.exit_code == EXIT_CANNOT_START and "cannot open nosuchsource=size=8x8" in result.output
    assert not out.exists()
    missing = "dshow" if not input_format_available("dshow") else "avfoundation"
    if input_format_available(missing):
        pytest.skip("this FFmpeg has every device input")
    result = CliRunner().invoke(stream_command, ["video=USB Capture", "--format", missing, "--model", str(tiny_onnx)])
    assert result.exit_code == EXIT_CANNOT_START
    assert "video=USB Capture" in result.output and f"{missing!r} is not in this PyAV's FFmpeg" in result.output


@pytest.mark.skipif(not input_format_available("v4l2"), reason="this PyAV's FFmpeg has no v4l2")
def test_a_v4l2_device_that_is_not_there_exits_3_naming_it(tiny_onnx, tmp_path):
    device = str(tmp_path / "video9")  # no such device node
    result = CliRunner().invoke(stream_command, [device, "--format", "v4l2", "--model", str(tiny_onnx),
                                                 "--backend", "onnxruntime", "--json", str(tmp_path / "s.json")])
    assert result.exit_code == EXIT_CANNOT_START and f"cannot open {device}" in result.output
