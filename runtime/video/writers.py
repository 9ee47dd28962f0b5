"""Writing a video's results: a lossless mask video, an overlay video, one PNG per frame.

Every output is written under a temporary name in its final folder and renamed into place by the
caller once the whole video is done (``replace_outputs``: all of a video's outputs or none), so a run
killed at any moment leaves no half-written file under a final name; ``remove_stale`` deletes what a
killed run left.

* Masks: FFV1 (lossless) in Matroska, 8-bit grey, 0 or 255 per pixel: decoding gives back the
  masks bit for bit (``read_mask_video``; the tests check it).
* Overlays: H.264 (libx264, which PyAV's wheels carry) in MP4, else MPEG-4 Part 2; 4:2:0 needs even
  sizes, so an odd row or column is padded by repeating the edge.
Timestamps are milliseconds from the source's own (variable frame rates keep their timing), made
strictly increasing where rounding would merge two frames, so that the muxer takes every frame.
"""
from __future__ import annotations

import os
import shutil
from fractions import Fraction
from itertools import count
from pathlib import Path

import numpy as np

from ..replace_file import replace_with_retry
from . import import_av

TEMP_MARK = ".effiseg-video-tmp"
MILLISECOND = Fraction(1, 1000)
OVERLAY_CODECS = ("libx264", "mpeg4")
_temp_counter = count()


def temp_path(final: Path) -> Path:
    """A hidden name beside ``final`` (same folder: the rename stays on one file system)."""
    return final.with_name(f".{final.name}.{os.getpid()}-{next(_temp_counter)}{TEMP_MARK}")


def remove_stale(folder: Path) -> int:
    """Delete the temporary files and folders a killed run left under ``folder``; returns how many."""
    removed = 0
    if not Path(folder).is_dir():
        return 0
    for p in sorted(Path(folder).rglob(f"*{TEMP_MARK}"), key=lambda p: len(p.parts), reverse=True):
        try:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
            removed += 1
        except OSError:
            pass
    return removed


def commit(temp: Path, final: Path) -> None:
    """Rename a finished temporary file or folder onto its final name (a folder replaces the old one)."""
    replace_outputs(final.parent, {final.name: temp})


def replace_outputs(folder: Path, new: dict) -> None:
    """Put finished outputs in place, all of them or none: ``new`` maps each name in ``folder``, in
    order, to its finished temporary file or folder, or to None for an earlier output to remove.

    The earlier outputs are first renamed aside, then the new ones renamed in, then the earlier ones
    deleted. On Windows a file open in another program (a video player, an image viewer, Excel), or a
    folder holding one, cannot be renamed: that stops the commit before anything is replaced or deleted
    (deleting frames/ first would leave it half-deleted), and any failure renames the earlier outputs
    back. An OSError then names the file and what to do; the temporary files are removed."""
    aside: list[tuple[Path, Path]] = []
    placed: list[Path] = []
    current = folder
    try:
        for name in new:
            current = folder / name
            if current.exists() or current.is_symlink():
                moved = temp_path(current)
                replace_with_retry(current, moved)
                aside.append((current, moved))
        for name, temp in new.items():
            current = folder / name
            if temp is not None:
                replace_with_retry(temp, current)
                placed.append(current)
    except BaseException as e:
        for path in placed + [t for t in new.values() if t is not None]:
            _remove(path)
        kept = True
        for final, moved in reversed(aside):
            try:
                os.replace(moved, final)
            except OSError:
                kept = False  # left under its temporary name
        if not isinstance(e, OSError):
            raise
        held = ("; if it is open in another program (a video player, an image viewer, Excel), close it and run "
                "again" if isinstance(e, PermissionError) else "")
        raise OSError(f"could not replace {current} ({e.strerror or e}){held}"
                      + ("; the earlier outputs are kept" if kept else "")) from e
    for _, moved in aside:
        _remove(moved)  # one still held open stays under its temporary name: the next run's remove_stale


def _remove(path: Path) -> None:
    """Delete a file or folder if it is there and can be deleted."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    except OSError:
        pass


class _Timestamps:
    """Source timestamps -> strictly increasing milliseconds."""

    def __init__(self, average_rate: Fraction | None):
        self.period_ms = float(1000 / average_rate) if average_rate else 40.0
        self.last: int | None = None

    def next(self, index: int, time_s: float | None) -> int:
        ms = round(time_s * 1000) if time_s is not None else round(index * self.period_ms)
        if self.last is not None and ms <= self.last:
            ms = self.last + 1
        self.last = ms
        return ms


class _VideoFileWriter:
    def __init__(self, final: Path, codec: str, container_format: str, pix_fmt: str, width: int, height: int,
                 average_rate: Fraction | None, options: dict | None = None):
        av = import_av()
        self.final, self.temp = Path(final), temp_path(Path(final))
        self.width, self.height = width, height
        self.container = av.open(str(self.temp), "w", format=container_format)
        try:
            self.stream = self.container.add_stream(codec, rate=average_rate or 25)
            self.stream.width, self.stream.height, self.stream.pix_fmt = width, height, pix_fmt
            self.stream.codec_context.time_base = MILLISECOND
            if options:
                self.stream.options = options
        except BaseException:
            self.abort()
            raise
        self.clock = _Timestamps(average_rate)

    def _write(self, array: np.ndarray, fmt: str, index: int, time_s: float | None) -> None:
        av = import_av()
        frame = av.VideoFrame.from_ndarray(array, format=fmt)
        frame.pts, frame.time_base = self.clock.next(index, time_s), MILLISECOND
        for packet in self.stream.encode(frame):
            self.container.mux(packet)

    def close(self) -> Path:
        """Flush and close; returns the temporary file, complete, for ``commit``."""
        for packet in self.stream.encode():
            self.container.mux(packet)
        self.container.close()
        return self.temp

    def abort(self) -> None:
        try:
            self.container.close()
        except Exception:
            pass
        self.temp.unlink(missing_ok=True)


class MaskVideoWriter(_VideoFileWriter):
    """0/255 grey masks, FFV1 in Matroska (lossless)."""

    def __init__(self, final: Path, width: int, height: int, average_rate: Fraction | None):
        super().__init__(final, "ffv1", "matroska", "gray", width, height, average_rate)

    def write(self, mask: np.ndarray, index: int, time_s: float | None) -> None:
        self._write(np.where(mask, np.uint8(255), np.uint8(0)), "gray", index, time_s)


def overlay_codec() -> str:
    av = import_av()
    for name in OVERLAY_CODECS:
        try:
            av.codec.Codec(name, "w")
            return name
        except Exception:
            continue
    raise RuntimeError(f"this FFmpeg build has none of the encoders {', '.join(OVERLAY_CODECS)} for the overlay video")


class OverlayVideoWriter(_VideoFileWriter):
    """RGB overlay frames as H.264 (or MPEG-4) in MP4, sized up to even numbers for 4:2:0."""

    def __init__(self, final: Path, width: int, height: int, average_rate: Fraction | None):
        codec = overlay_codec()
        options = {"crf": "20", "preset": "veryfast"} if codec == "libx264" else {"qscale": "3"}
        super().__init__(final, codec, "mp4", "yuv420p", width + width % 2, height + height % 2, average_rate,
                         options)

    def write(self, rgb: np.ndarray, index: int, time_s: float | None) -> None:
        h, w = rgb.shape[:2]
        if (h, w) != (self.height, self.width):
            rgb = np.pad(rgb, ((0, self.height - h), (0, self.width - w), (0, 0)), mode="edge")
        self._write(np.ascontiguousarray(rgb), "rgb24", index, time_s)


def read_mask_video(path: Path) -> list[np.ndarray]:
    """The masks of a mask video as bool arrays, in order (for checks and for users' scripts)."""
    av = import_av()
    with av.open(str(path)) as container:
        return [frame.to_ndarray(format="gray") > 127 for frame in container.decode(video=0)]
