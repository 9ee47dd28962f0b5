"""Video files through effiseg-run: frames decoded with PyAV (its wheels carry FFmpeg), segmented by the
same ``Segmenter`` pipeline as still images, written as a lossless mask video, per-frame statistics,
and optionally an overlay video and one PNG per frame (``run.py``).

PyAV is the ``video`` extra: ``pip install "effiseg[video]"``.
"""
from __future__ import annotations

from pathlib import Path

VIDEO_EXTENSIONS = (".mp4", ".m4v", ".mov", ".mkv", ".avi", ".webm", ".mpg", ".mpeg", ".ts", ".mts", ".wmv")


class VideoError(RuntimeError):
    """One video that cannot be read (corrupt, truncated, no video stream); the message says why."""


def import_av():
    """The ``av`` module, or an ImportError that names the extra to install."""
    try:
        import av
    except ImportError as e:
        raise ImportError('video input needs PyAV: pip install "effiseg[video]" (the av package; its wheels '
                          f"bundle FFmpeg) ({e})") from None
    return av


# FFmpeg's device inputs (libavdevice), by platform; which of them a PyAV build carries varies.
DEVICE_FORMATS = ("dshow", "gdigrab", "vfwcap", "v4l2", "x11grab", "kmsgrab", "fbdev", "avfoundation", "lavfi",
                  "decklink")


def device_formats_available() -> list[str]:
    """The device inputs of the installed PyAV's FFmpeg (the Linux wheel: fbdev, kmsgrab, lavfi, v4l2, x11grab)."""
    return [name for name in DEVICE_FORMATS if input_format_available(name)]


def input_format_available(name: str) -> bool:
    av = import_av()
    try:
        return bool(av.ContainerFormat(name, "r").input)
    except ValueError:  # "no container format": not in this build
        return False


def check_input_format(source, name: str) -> None:
    """A VideoError naming ``source`` when the FFmpeg inside PyAV has no input format ``name``."""
    if not input_format_available(name):
        raise VideoError(f"cannot open {source}: FFmpeg input format {name!r} is not in this PyAV's FFmpeg "
                         f"(its device inputs: {', '.join(device_formats_available()) or 'none'}; dshow exists only in "
                         "Windows builds of FFmpeg, avfoundation only in macOS builds): install PyAV built "
                         "against an FFmpeg that has it")


def is_video_path(path) -> bool:
    return Path(path).suffix.lower() in VIDEO_EXTENSIONS


def list_videos(folder: Path, recursive: bool) -> list[Path]:
    """Video files of ``folder`` (and its sub-folders with ``recursive``), sorted by relative path;
    hidden files (a run's temporary files among them) are left out."""
    folder = Path(folder)
    candidates = folder.rglob("*") if recursive else folder.iterdir()
    found = [p for p in candidates if p.is_file() and is_video_path(p)
             and not any(part.startswith(".") for part in p.relative_to(folder).parts)]
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def is_video_input(input_path, recursive: bool) -> bool:
    """effiseg-run's dispatch: a video file, or a folder with video files and no image files (a folder
    with both stays an image run, as before videos were read; the run says how many videos it left)."""
    input_path = Path(input_path)
    try:
        if input_path.is_file():
            return is_video_path(input_path)
        if not input_path.is_dir():
            return False
        from ..images import list_images
        return bool(list_videos(input_path, recursive)) and not list_images(input_path, recursive)
    except OSError:  # a folder this user may not list: the folder checks say so
        return False


def count_videos(folder, recursive: bool) -> int:
    """Video files in ``folder`` (0 for a file, a missing folder or one this user may not list)."""
    try:
        return len(list_videos(Path(folder), recursive)) if Path(folder).is_dir() else 0
    except OSError:
        return 0
