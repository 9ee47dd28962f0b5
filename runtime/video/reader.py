"""Reading a video's frames in presentation order, each exactly once, with its timestamp.

FFmpeg's decoder returns frames in presentation order whatever the coding order (B-frames), and
nothing here resamples the frame rate: a variable-frame-rate clip gives every frame it stores, with
its own timestamp. A file that cannot be opened, or whose decoding fails part-way, raises
``VideoError``; so does a file whose frames end before the duration its header declares (a truncated
copy), since FFmpeg itself stops quietly at the cut. The header's frame count is only a hint: valid
files decode fewer frames than it says (an MP4 cut with an edit list, whose leading frames are
decoded but not shown; an AVI with empty chunks for dropped frames).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

from . import VideoError, check_input_format, import_av


@dataclass
class DecodedFrame:
    index: int                 # 0, 1, 2, ... in presentation order
    pts: int | None            # presentation timestamp in the stream's time base
    time_s: float | None       # the same in seconds
    rgb: np.ndarray            # (H, W, 3) uint8


class VideoReader:
    """One video file's first video stream. ``frames()`` may be iterated from several threads: each
    call of ``next`` hands out the next frame under a lock (the pipeline's decoder threads share it)."""

    def __init__(self, path: Path, max_pixels: int | None = None, options: dict | None = None,
                 format: str | None = None):
        av = import_av()
        self.path = Path(path)
        if format is not None:
            check_input_format(path, format)
        try:
            self.container = av.open(str(path), format=format, options=options or {})
        except (av.error.FFmpegError, OSError) as e:
            raise VideoError(f"cannot open {path}: {_reason(e)}") from None
        if not self.container.streams.video:
            self.container.close()
            raise VideoError(f"{path} has no video stream")
        self.stream = self.container.streams.video[0]
        # Frame threads decode ahead in parallel; the decoder still returns frames in order.
        self.stream.thread_type = "AUTO"
        self.width, self.height = self.stream.codec_context.width, self.stream.codec_context.height
        if max_pixels is not None and self.width * self.height > max_pixels:
            self.container.close()
            raise VideoError(f"{path}: frames of {self.width}x{self.height} exceed --max-pixels {max_pixels}")
        self.time_base: Fraction | None = self.stream.time_base
        rate = self.stream.average_rate or self.stream.guessed_rate
        self.average_rate: Fraction | None = Fraction(rate) if rate else None
        self.declared_frames = int(self.stream.frames or 0)
        self.declared_duration_s = (float(self.stream.duration * self.time_base)
                                    if self.stream.duration and self.time_base else None)
        self.start_s = (float(self.stream.start_time * self.time_base)
                        if self.stream.start_time is not None and self.time_base else 0.0)
        self.n_decoded = 0
        self._lock = threading.Lock()
        self._decoder = None
        self._last_time_s: float | None = None

    def describe(self) -> dict:
        return {"codec": self.stream.codec_context.name, "width": self.width, "height": self.height,
                "average_rate": None if self.average_rate is None else str(self.average_rate),
                "time_base": None if self.time_base is None else str(self.time_base),
                "declared_frames": self.declared_frames or None, "declared_duration_s": self.declared_duration_s}

    def __iter__(self):
        return self

    def __next__(self) -> DecodedFrame:
        with self._lock:
            av = import_av()
            if self._decoder is None:
                self._decoder = self.container.decode(self.stream)
            try:
                frame = next(self._decoder)
            except StopIteration:
                self._check_complete()
                raise
            except (av.error.FFmpegError, OSError) as e:
                raise VideoError(f"{self.path}: decoding failed after {self.n_decoded} frame(s): {_reason(e)}") from None
            index = self.n_decoded
            self.n_decoded += 1
            time_s = None if frame.pts is None or frame.time_base is None else float(frame.pts * frame.time_base)
            self._last_time_s = time_s if time_s is not None else self._last_time_s
            return DecodedFrame(index, frame.pts, time_s, frame.to_ndarray(format="rgb24"))

    def _check_complete(self) -> None:
        # Not the declared frame count: edit lists and dropped-frame chunks make valid files fall short of it.
        if self.declared_duration_s and self._last_time_s is not None:
            # The last frame starts one frame period before the end; two periods and a bit of slack
            # keep rounding and a short last frame from being taken for a cut.
            period = float(1 / self.average_rate) if self.average_rate else 0.1
            end = self.start_s + self.declared_duration_s
            if self._last_time_s + 2 * period + 0.05 < end:
                raise VideoError(f"{self.path} is truncated or damaged: its frames end at {self._last_time_s:.3f} s, "
                                 f"its header declares {end:.3f} s")
        if self.n_decoded == 0:
            raise VideoError(f"{self.path}: no frame could be decoded")

    def close(self) -> None:
        self.container.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _reason(error: BaseException) -> str:
    text = getattr(error, "strerror", None) or str(error) or type(error).__name__
    return text
