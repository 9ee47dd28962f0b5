"""effiseg-stream: frames arriving while the device is busy are dropped and counted (bounded), every
frame is processed, dropped or failed, and the summary reports latency percentiles."""
import json
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("av")

from click.testing import CliRunner  # noqa: E402
from test_video import write_clip  # noqa: E402

from effiseg.runtime.stream import FrameMailbox, percentiles_ms, run_stream, stream_command  # noqa: E402


def test_mailbox_keeps_the_newest_frames_and_counts_the_dropped():
    box = FrameMailbox(capacity=2)
    for i in range(5):
        box.put(i)
    box.close()
    assert list(box) == [3, 4]
    assert (box.captured, box.dropped) == (5, 3)
    with pytest.raises(ValueError):
        FrameMailbox(0)


def test_percentiles_are_ordered_and_in_milliseconds():
    p = percentiles_ms([0.010] * 98 + [0.020, 0.500])
    assert p["p50"] == 10.0 and p["max"] == 500.0 and p["p50"] <= p["p90"] <= p["p99"] <= p["max"]
    assert percentiles_ms([])["p99"] is None


class BusySegmenter:
    """A device that is busy with the first frame until the source has delivered all the others."""

    backend_name, precision = "fake", "fp32"
    backends = [SimpleNamespace(device="cpu")]

    def __init__(self):
        self.calls = 0
        self.frames = []

    def segment(self, images):
        self.calls += 1
        if self.calls == 2:  # the first stream frame (call 1 warms up)
            while any(t.name == "effiseg-capture" and t.is_alive() for t in threading.enumerate()):
                time.sleep(0.01)
        self.frames.append(images[0])
        return [images[0][..., 0] > 127]


def test_frames_arriving_while_busy_are_dropped_not_queued(tmp_path):
    clip = write_clip(tmp_path / "c.mp4", 12)
    seg = BusySegmenter()
    rows = []
    summary = run_stream(seg, clip, paced=False, queue=1, on_frame=rows.append)
    # The first frame taken (0, or 1 if 1 arrived before the device took 0) went to the device; the
    # others arrived while it was busy and each pushed the one before out; frame 11 waited and ran next.
    assert len(rows) == 2 and rows[0]["frame"] in (0, 1) and rows[1]["frame"] == 11
    assert summary["frames_captured"] == 12 and summary["frames_dropped"] == 10 and summary["frames_processed"] == 2
    lat = summary["latency_ms"]
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]


def test_stream_cli_writes_the_summary_and_one_row_per_processed_frame(tiny_onnx, tmp_path):
    clip = write_clip(tmp_path / "c.mkv", 15, vfr=True)
    out, rows = tmp_path / "s.json", tmp_path / "s.csv"
    result = CliRunner().invoke(stream_command, [str(clip), "--model", str(tiny_onnx), "--backend", "onnxruntime",
                                                 "--max-frames", "10", "--json", str(out), "--csv", str(rows)])
    assert result.exit_code == 0, result.output
    summary = json.loads(out.read_text())
    assert summary["frames_captured"] == 10
    assert summary["frames_processed"] + summary["frames_dropped"] + summary["frames_failed"] == 10
    assert len(rows.read_text().splitlines()) == 1 + summary["frames_processed"]
    assert summary["latency_ms"]["p99"] >= summary["latency_ms"]["p50"] > 0
    missing = CliRunner().invoke(stream_command, [str(tmp_path / "nope.mp4"), "--model", str(tiny_onnx)])
    assert missing.exit_code == 3 and "nope.mp4" in missing.output


class InterruptedSegmenter(BusySegmenter):
    def segment(self, images):
        self.calls += 1
        if self.calls == 4:  # warm-up, two frames, then Ctrl-C
            raise KeyboardInterrupt
        return [images[0][..., 0] > 127]


def test_ctrl_c_ends_the_stream_with_the_summary_of_what_ran(tmp_path):
    clip = write_clip(tmp_path / "c.mp4", 12)
    summary = run_stream(InterruptedSegmenter(), clip, paced=False, queue=12)
    assert summary["interrupted"] and not summary["complete"]
    assert summary["frames_processed"] == 2 and summary["latency_ms"]["max"] > 0


class DeadDeviceSegmenter(BusySegmenter):
    """Warms up, then fails every frame, as a device that was lost mid-stream."""

    def segment(self, images):
        self.calls += 1
        if self.calls > 1:
            raise RuntimeError("CUDA error: device lost (simulated)")
        return [images[0][..., 0] > 127]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass


def test_a_dead_device_stops_the_stream_with_its_error_and_exit_4(tmp_path, monkeypatch):
    from effiseg.runtime import stream
    from effiseg.runtime.segmenter import Segmenter
    clip = write_clip(tmp_path / "c.mp4", 40)
    summary = run_stream(DeadDeviceSegmenter(), clip, paced=False, queue=64)
    assert summary["frames_failed"] == stream.MAX_FAILURES_IN_A_ROW and summary["frames_processed"] == 0
    assert not summary["complete"] and "device lost" in summary["stopped"]
    monkeypatch.setattr(Segmenter, "from_model", classmethod(lambda cls, *a, **k: DeadDeviceSegmenter()))
    out = tmp_path / "s.json"
    result = CliRunner().invoke(stream_command, [str(clip), "--json", str(out)])
    assert result.exit_code == stream.EXIT_RUN_STOPPED, result.output
    assert "device lost" in result.output and f"{stream.MAX_FAILURES_IN_A_ROW} failed" in result.output
    assert json.loads(out.read_text())["frames_failed"] == stream.MAX_FAILURES_IN_A_ROW


class FlakySegmenter(BusySegmenter):
    def segment(self, images):
        self.calls += 1
        if self.calls == 3:  # one frame fails, the others do not
            raise RuntimeError("one bad frame")
        return [images[0][..., 0] > 127]


def test_a_stream_with_a_failed_frame_exits_non_zero(tmp_path, monkeypatch):
    from effiseg.runtime.segmenter import Segmenter
    clip = write_clip(tmp_path / "c.mp4", 6)
    monkeypatch.setattr(Segmenter, "from_model", classmethod(lambda cls, *a, **k: FlakySegmenter()))
    monkeypatch.setattr(FlakySegmenter, "__enter__", lambda self: self, raising=False)
    monkeypatch.setattr(FlakySegmenter, "__exit__", lambda self, *e: None, raising=False)
    out = tmp_path / "s.json"
    result = CliRunner().invoke(stream_command, [str(clip), "--json", str(out), "--rate", "200", "--queue", "8"])
    summary = json.loads(out.read_text())
    assert summary["frames_failed"] == 1 and summary["complete"]
    assert result.exit_code == 1, result.output


class HangingReader:
    """A capture device: one frame, then a decode that hangs until ``release`` is set."""

    def __init__(self, *args, **kwargs):
        self.width, self.height, self.average_rate, self.path = 64, 48, None, "dev"
        self.release, self.inside, self.closed, self.closed_while_decoding = threading.Event(), False, False, False
        self.sent = False
        HangingReader.last = self

    def __iter__(self):
        return self

    def __next__(self):
        if not self.sent:
            self.sent = True
            return SimpleNamespace(index=0, pts=0, time_s=0.0, rgb=np.zeros((48, 64, 3), np.uint8))
        self.inside = True
        self.release.wait(30)
        self.inside = False
        raise StopIteration

    def close(self):
        self.closed_while_decoding |= self.inside
        self.closed = True


class InterruptedAtFirstFrame(BusySegmenter):
    def segment(self, images):
        self.calls += 1
        if self.calls == 2:
            raise KeyboardInterrupt
        return [images[0][..., 0] > 127]


class WarmUpFails(BusySegmenter):
    def segment(self, images):
        raise RuntimeError("cannot build the engine")


def test_the_reader_is_closed_only_after_the_capture_thread_ends_and_after_a_failed_warm_up(monkeypatch):
    from effiseg.runtime import stream
    from effiseg.runtime.video import reader
    monkeypatch.setattr(reader, "VideoReader", HangingReader)
    monkeypatch.setattr(stream, "CAPTURE_JOIN_S", 0.2)
    summary = run_stream(InterruptedAtFirstFrame(), "dev", format="fake")  # Ctrl-C while a decode hangs
    assert summary["interrupted"]
    hanging = HangingReader.last
    assert not hanging.closed  # not pulled from under the decode still running
    hanging.release.set()
    for t in threading.enumerate():
        if t.name == "effiseg-capture":
            t.join(10)
    assert hanging.closed and not hanging.closed_while_decoding
    with pytest.raises(RuntimeError, match="engine"):
        run_stream(WarmUpFails(), "dev", format="fake")
    assert HangingReader.last.closed
