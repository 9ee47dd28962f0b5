"""``effiseg-stream``: segment a live source frame by frame, dropping what cannot be kept up with.

    effiseg-stream clip.mp4                                   # played at its own frame rate
    effiseg-stream clip.mp4 --rate 15 --json run.json         # played at 15 fps (every frame, 1/15 s apart)
    effiseg-stream video=USB2.0 --format dshow                # Windows capture device (FFmpeg dshow)
    effiseg-stream /dev/video0 --format v4l2 --option video_size=1280x720   # Linux (PyAV's Linux wheel has v4l2)
    effiseg-stream "testsrc2=size=720x576:rate=30,realtime" --format lavfi  # FFmpeg's virtual device: a test pattern

A capture thread delivers frames as they arrive (a file is paced by its timestamps, a device paces
itself). Batch 1: each frame goes to the device as soon as the pipeline can take it. Frames that
arrive while it is busy wait in a queue of ``--queue`` frames (default 1); when it is full the oldest
waiting frame is dropped and counted, so memory and latency stay bounded whatever the source's rate.
Latency is capture (the frame's arrival) to mask (its result back on the host), per frame; p50, p90,
p99 and max, frames processed and dropped are shown live (once a second) and written as JSON at the
end (``--json``), with one CSV row per processed frame (``--csv``).

Exit status: 0 when the source was played to its end (or --max-frames stopped it) with every frame
processed or dropped, 1 when some frames failed, 130 after Ctrl-C (the summary is written all the
same), 3 when the source or model cannot be opened, 4 when the source or the run failed part-way
(``MAX_FAILURES_IN_A_ROW`` frames failing in a row, a dead device, stop the stream).
"""
from __future__ import annotations

import csv
import json
import sys
import threading
import time
from collections import deque
from pathlib import Path

import click
import numpy as np

from .backends import BACKEND_CHOICES
from .console import Command

EXIT_CANNOT_START = 3
EXIT_RUN_STOPPED = 4
CAPTURE_JOIN_S = 5.0  # how long the end of a stream waits for the capture thread's decode to return
MAX_FAILURES_IN_A_ROW = 10  # a dead device fails every frame: stop instead of playing the source to its end


class FrameMailbox:
    """Frames handed from the capture thread to the pipeline: at most ``capacity`` wait; one more
    arriving pushes the oldest out (counted as dropped). ``__next__`` blocks until a frame or the end."""

    def __init__(self, capacity: int = 1):
        if capacity < 1:
            raise ValueError("the queue holds at least one frame")
        self.waiting: deque = deque()
        self.capacity = capacity
        self.dropped = 0
        self.captured = 0
        self.closed = False
        self.cond = threading.Condition()

    def put(self, item) -> None:
        with self.cond:
            self.captured += 1
            if len(self.waiting) >= self.capacity:
                self.waiting.popleft()
                self.dropped += 1
            self.waiting.append(item)
            self.cond.notify()

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()

    def __iter__(self):
        return self

    def __next__(self):
        with self.cond:
            while not self.waiting:
                if self.closed:
                    raise StopIteration
                self.cond.wait(0.1)
            return self.waiting.popleft()


class _Capture(threading.Thread):
    """Reads the source into the mailbox. A file is played in real time: frame i is delivered when
    its timestamp (or i / ``rate``) comes due on the wall clock; decoding ahead of that is not
    counted as latency, as a capture card hands over a frame only once it is complete."""

    def __init__(self, reader, mailbox: FrameMailbox, paced: bool, rate: float | None, max_frames: int | None):
        super().__init__(name="effiseg-capture", daemon=True)
        self.reader, self.mailbox, self.paced, self.rate, self.max_frames = reader, mailbox, paced, rate, max_frames
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.started_at: float | None = None
        self._close_lock = threading.Lock()
        self._finished = False
        self._close_on_exit = False

    def close_reader_when_done(self) -> None:
        """Close the reader now if this thread has ended, else when it ends: closing the container
        while a decode inside it is still running (a device that hangs) would pull it from under FFmpeg."""
        with self._close_lock:
            if not self._finished:
                self._close_on_exit = True
                return
        self.reader.close()

    def run(self) -> None:
        first_time = None
        try:
            for frame in self.reader:
                if self.stop.is_set() or (self.max_frames is not None and frame.index >= self.max_frames):
                    break
                if self.paced:
                    now = time.perf_counter()
                    if self.started_at is None:
                        self.started_at, first_time = now, frame.time_s or 0.0
                    due_in = (frame.index / self.rate if self.rate
                              else (frame.time_s or 0.0) - first_time) - (now - self.started_at)
                    if due_in > 0:
                        self.stop.wait(due_in)
                elif self.started_at is None:
                    self.started_at = time.perf_counter()
                self.mailbox.put((frame, time.perf_counter()))
        except BaseException as e:  # a source that fails part-way: reported, what arrived is kept
            self.error = e
        finally:
            self.mailbox.close()
            with self._close_lock:
                self._finished = True
                close = self._close_on_exit
            if close:
                self.reader.close()


def percentiles_ms(latencies_s) -> dict:
    if not len(latencies_s):
        return {"p50": None, "p90": None, "p99": None, "max": None, "mean": None}
    a = np.asarray(latencies_s, dtype=np.float64) * 1000.0
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    return {"p50": round(float(p50), 3), "p90": round(float(p90), 3), "p99": round(float(p99), 3),
            "max": round(float(a.max()), 3), "mean": round(float(a.mean()), 3)}


def run_stream(segmenter, source, *, format: str | None = None, options: dict | None = None,
               rate: float | None = None, paced: bool | None = None, queue: int = 1,
               max_frames: int | None = None, on_frame=None, live=None, live_every_s: float = 1.0) -> dict:
    """Play ``source`` through ``segmenter`` one frame at a time; returns the summary.

    ``paced`` (default: a plain file is, a device or URL is not): deliver frames at their timestamps
    (or ``rate`` frames per second). ``on_frame(row)`` gets each processed frame's row, ``live(summary)``
    the running summary every ``live_every_s``."""
    from .video.reader import VideoReader
    if paced is None:
        paced = format is None and "://" not in str(source)
    reader = VideoReader(source, options=options, format=format)
    try:
        # The first call builds the backend's plans (ONNX Runtime, TensorRT): not the stream's latency.
        segmenter.segment([np.zeros((reader.height or 64, reader.width or 64, 3), np.uint8)])
    except BaseException:
        reader.close()
        raise
    mailbox = FrameMailbox(queue)
    capture = _Capture(reader, mailbox, paced, rate, max_frames)

    latencies: list[float] = []
    failed = 0
    failed_in_a_row = 0
    stopped_by: str | None = None
    interrupted = False
    last_live = time.perf_counter()
    summary: dict = {}

    def snapshot(done: bool) -> dict:
        started = capture.started_at
        wall = (time.perf_counter() - started) if started else 0.0
        summary.update({
            "source": str(source), "format": format, "paced": paced,
            "source_rate": None if reader.average_rate is None else round(float(reader.average_rate), 3),
            "played_rate": rate if rate else (None if reader.average_rate is None else round(float(reader.average_rate), 3)),
            "width": reader.width, "height": reader.height, "queue": queue, "batch": 1,
            "frames_captured": mailbox.captured, "frames_processed": len(latencies), "frames_failed": failed,
            "frames_dropped": mailbox.dropped,
            "drop_fraction": round(mailbox.dropped / mailbox.captured, 4) if mailbox.captured else 0.0,
            "latency_ms": percentiles_ms(latencies), "wall_s": round(wall, 3),
            "processed_per_s": round(len(latencies) / wall, 3) if wall > 0 else 0.0,
            "backend": segmenter.backend_name, "devices": [b.device for b in segmenter.backends],
            "precision": segmenter.precision, "complete": done})
        return summary

    capture.start()
    try:
        # One frame at a time, taken from the mailbox only when the device is free: a frame that waited
        # inside a deeper pipeline (double buffering) would come back one frame time older.
        for frame, captured_at in mailbox:
            try:
                mask = segmenter.segment([frame.rgb])[0]
            except RuntimeError as e:  # this frame's batch failed (segment says which stage); the stream goes on
                failed += 1
                failed_in_a_row += 1
                if failed_in_a_row >= MAX_FAILURES_IN_A_ROW:
                    stopped_by = f"{failed_in_a_row} frames in a row failed, the last with {type(e).__name__}: {e}"
                    break
                continue
            failed_in_a_row = 0
            result = float(np.count_nonzero(mask)) / mask.size
            latency = time.perf_counter() - captured_at
            latencies.append(latency)
            if on_frame is not None:
                on_frame({"frame": frame.index, "pts": frame.pts, "time_s": frame.time_s,
                          "latency_ms": round(latency * 1000, 3), "area_fraction": round(result, 6)})
            if live is not None and time.perf_counter() - last_live >= live_every_s:
                last_live = time.perf_counter()
                live(snapshot(False))
    except KeyboardInterrupt:  # Ctrl-C ends a live stream: the summary of what ran is still wanted
        interrupted = True
    finally:
        capture.stop.set()
        mailbox.close()
        if capture.is_alive():
            capture.join(CAPTURE_JOIN_S)
        capture.close_reader_when_done()
    if capture.error is not None:
        summary["source_error"] = f"{type(capture.error).__name__}: {capture.error}"
    summary["interrupted"] = interrupted
    if stopped_by is not None:
        summary["stopped"] = stopped_by
    return snapshot(not interrupted and stopped_by is None)


def _live_line(summary: dict) -> str:
    lat = summary["latency_ms"]
    fmt = (lambda v: "-" if v is None else f"{v:.1f}")
    return (f"{summary['frames_processed']} processed, {summary['frames_dropped']} dropped "
            f"({100 * summary['drop_fraction']:.1f}%), {summary['frames_failed']} failed, "
            f"{summary['processed_per_s']:.1f} fps; latency ms "
            f"p50 {fmt(lat['p50'])} p90 {fmt(lat['p90'])} p99 {fmt(lat['p99'])} max {fmt(lat['max'])}")


def _open_rows_file(csv_path: Path | None, echo):
    """The ``--csv`` file, opened before the model loads (a first TensorRT build takes minutes): on
    Windows a CSV still open in Excel cannot be written, and that is said now, exit 3. Opened for
    appending, so an earlier CSV keeps its rows until the stream starts (``truncate`` then)."""
    if csv_path is None:
        return None
    try:
        return open(csv_path, "a", newline="", encoding="utf-8")
    except OSError as e:
        echo(f"error: cannot write {csv_path} ({e.strerror or e}): if it is open in another program (Excel), "
             "close it and run again")
        sys.exit(EXIT_CANNOT_START)


def _parse_options(ctx, param, values):
    options = {}
    for value in values:
        key, sep, val = value.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"expected KEY=VALUE, got {value!r}")
        options[key] = val
    return options


@click.command(cls=Command, context_settings={"show_default": True, "help_option_names": ["-h", "--help"]})
@click.argument("source")
@click.option("--model", "-m", "model_path", type=click.Path(path_type=Path), default=None,
              help="An effiseg ONNX file [default: the bundled one-pass model].")
@click.option("--backend", type=click.Choice(BACKEND_CHOICES), default="auto")
@click.option("--devices", default=None, help="cpu or one GPU index [default: as effiseg-run, first device only].")
@click.option("--precision", type=click.Choice(["auto", "fp32", "fp16", "bf16", "int8"]), default="auto")
@click.option("--threshold", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=None)
@click.option("--format", "input_format", default=None,
              help="FFmpeg input format for a capture device: dshow (Windows), v4l2 (Linux), avfoundation "
                   "(macOS), lavfi (a virtual test device), where the installed PyAV's FFmpeg has it. Without "
                   "it SOURCE is a file played at its frame rate (or a URL, read as it comes).")
@click.option("--option", "input_options", multiple=True, callback=_parse_options, metavar="KEY=VALUE",
              help="FFmpeg input option, repeatable (video_size=1280x720, framerate=30, rtsp_transport=tcp).")
@click.option("--rate", type=click.FloatRange(0, min_open=True), default=None,
              help="Play a file at this many frames per second instead of its own timestamps.")
@click.option("--queue", type=click.IntRange(1, 64), default=1,
              help="Frames that may wait while the device is busy; beyond that the oldest is dropped.")
@click.option("--max-frames", type=click.IntRange(1), default=None, help="Stop after this many frames.")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None,
              help="Summary JSON [default: effiseg_stream.json in the current folder].")
@click.option("--csv", "csv_path", type=click.Path(path_type=Path), default=None,
              help="One row per processed frame: index, timestamp, latency, polyp area fraction.")
@click.option("--quiet", is_flag=True, help="No live line.")
def stream_command(source, model_path, backend, devices, precision, threshold, input_format, input_options, rate,
                   queue, max_frames, json_path, csv_path, quiet):
    """Segment a video file (played at its own frame rate) or a capture device live, one frame at a
    time; report latency percentiles and dropped frames."""
    from .backends import BackendUnavailable
    from .cli import DEFAULT_MODEL
    from .segmenter import Segmenter
    from .video import VideoError, check_input_format, import_av

    def echo(message):
        click.echo(message, err=True)

    try:
        import_av()
        if input_format is not None:  # before the model loads: a device input this FFmpeg lacks
            check_input_format(source, input_format)
    except (ImportError, VideoError) as e:
        echo(f"error: {e}")
        sys.exit(EXIT_CANNOT_START)
    if input_format is None and "://" not in source and not Path(source).is_file():
        echo(f"error: {source} is not a file (a capture device needs --format, e.g. dshow or v4l2)")
        sys.exit(EXIT_CANNOT_START)
    model = model_path or DEFAULT_MODEL
    csv_is_new = csv_path is not None and not csv_path.exists()
    rows_file = _open_rows_file(csv_path, echo)
    try:
        segmenter = Segmenter.from_model(model, backend=backend, devices=devices, precision=precision, max_batch=1,
                                         threshold=threshold, workers=1, writers=1)
    except (BackendUnavailable, OSError, ValueError, RuntimeError) as e:
        echo(f"error: cannot start on {model}: {e}")
        if rows_file is not None:
            rows_file.close()
            if csv_is_new:  # nothing of this stream in it: no empty file left behind
                csv_path.unlink(missing_ok=True)
        sys.exit(EXIT_CANNOT_START)
    if len(segmenter.backends) > 1:
        echo("note: a stream runs one frame at a time; the frames go to whichever device is free")
    json_path = json_path or Path("effiseg_stream.json")
    writer = None
    if rows_file is not None:
        rows_file.truncate(0)  # the model is ready: the earlier CSV's rows give way to this stream's
        writer = csv.DictWriter(rows_file, ["frame", "pts", "time_s", "latency_ms", "area_fraction"],
                                lineterminator="\n")
        writer.writeheader()
    live_end = "\r" if sys.stderr.isatty() else "\n"

    def live(summary):
        click.echo(_live_line(summary), err=True, nl=False)
        click.echo(live_end, err=True, nl=False)

    with segmenter:
        echo(f"{source}: model {model}, backend {segmenter.backend_name} on "
             f"{','.join(b.device for b in segmenter.backends)}, {segmenter.precision}, batch 1, queue {queue}")
        try:
            summary = run_stream(segmenter, source, format=input_format, options=input_options, rate=rate,
                                 queue=queue, max_frames=max_frames, on_frame=writer.writerow if writer else None,
                                 live=None if quiet else live)
        except VideoError as e:
            echo(f"error: {e}")
            sys.exit(EXIT_CANNOT_START)
        except Exception as e:
            echo(f"error: the stream stopped part-way: {type(e).__name__}: {e}")
            sys.exit(EXIT_RUN_STOPPED)
        finally:
            if rows_file is not None:
                rows_file.close()
    summary["model"] = str(model)
    json_path.write_text(json.dumps(summary, indent=2), encoding="utf-8")
    if live_end == "\r" and not quiet:
        echo("")
    click.echo(_live_line(summary))
    if summary.get("source_error"):
        click.echo(f"the source failed part-way: {summary['source_error']}")
    click.echo(f"summary: {json_path}" + (f", frames: {csv_path}" if csv_path else ""))
    if summary.get("stopped"):
        click.echo(f"the stream stopped: {summary['stopped']}")
    if summary.get("source_error") or summary.get("stopped"):
        sys.exit(EXIT_RUN_STOPPED)
    if summary["interrupted"]:
        sys.exit(130)
    if summary["frames_failed"]:
        sys.exit(1)  # the source played to its end, but not every frame got a mask


def main() -> None:  # pragma: no cover
    stream_command()


if __name__ == "__main__":  # pragma: no cover
    main()
