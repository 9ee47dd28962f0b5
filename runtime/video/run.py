"""effiseg-run over video files: every decoded frame gets exactly one mask, in order.

Input: one video file, or a folder of them (``recursive``: sub-folders too). Output (default: a
sibling of the input named ``<input stem>_masks``), for each video in its own folder (the output
folder itself for a single file; ``<relative path without extension>/`` for a folder of videos):

* ``masks.mkv``: the masks, 0/255 grey, FFV1 in Matroska (lossless: decoding gives them back exactly);
* ``frames.csv``: one row per frame: index, presentation timestamp (stream units and seconds),
  polyp area fraction, 8-connected regions, maximum probability;
* ``frames.json``: the same rows, the stream's description and the settings that made them. Written
  last: it marks the video as complete, and ``resume`` skips a video whose record says so with the
  same settings and whose outputs are all there;
* ``overlay.mp4`` with ``overlay`` (H.264), ``frames/000000.png ...`` with ``frames``;
* in the output folder: ``effiseg_summary.csv``/``.json``, one row per video, and the run's lock.

Frames go through ``Segmenter.pipeline`` (the same batched, double-buffered decode -> device -> write
pipeline as still images): the decoder threads take frames one at a time from the video's decoder,
resize them in parallel, and results are put back in frame order before they are written. A video
that cannot be opened, fails to decode part-way or ends before its header says (truncated) is a
per-file error: its outputs are not written, and the run goes on with the next video.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..folder_lock import OutputFolderLock
from ..images import overlay_image
from ..pipeline import BackendLost, PipelineAborted
from ..postprocess import count_regions, output_to_mask
from ..replace_file import replace_with_retry
from ..rows_csv import rows_csv_text, write_summary_csv
from ..trt_engine_cache import file_sha256
from ..windows_names import windows_path_key
from . import VideoError, import_av, is_video_path, list_videos
from .reader import VideoReader
from .writers import MaskVideoWriter, OverlayVideoWriter, remove_stale, replace_outputs, temp_path

MASK_VIDEO = "masks.mkv"
OVERLAY_VIDEO = "overlay.mp4"
FRAMES_CSV = "frames.csv"
FRAMES_JSON = "frames.json"
FRAMES_DIR = "frames"
SUMMARY_STEM = "effiseg_summary"
FRAME_FIELDS = ("frame", "pts", "time_s", "area_fraction", "regions", "max_probability")
VIDEO_FIELDS = ("file", "output", "status", "frames", "width", "height", "average_rate", "frames_with_polyp",
                "mean_area_fraction", "max_probability", "error")


class VideoInputError(ValueError):
    """A video run that cannot start (no such file, no videos, output inside input); says why."""


@dataclass
class VideoJob:
    source: Path
    rel: str             # relative to the input folder ("/" separators); the file name for one file
    out_dir: Path
    conflict: str = ""   # why this video cannot have its folder (another video's would be the same or nest)


def default_video_output(input_path: Path) -> Path:
    input_path = Path(input_path).resolve()
    if not input_path.name:  # E:\ (a recorder's USB stick), \\server\share\ or /: it has no sibling
        raise VideoInputError(f"{input_path} is the root of a drive or share: name the output folder with --output")
    return input_path.with_name((input_path.stem if input_path.is_file() else input_path.name) + "_masks")


def folder_has_videos(folder: Path, recursive: bool) -> bool:
    return bool(list_videos(folder, recursive))


def check_video_output(input_path: Path, output_dir: Path) -> None:
    """VideoInputError unless ``output_dir`` can take a run's results for ``input_path``."""
    src, dst = Path(input_path).resolve(), Path(output_dir).resolve()
    if src.is_dir() and (src == dst or src in dst.parents):
        raise VideoInputError(f"the output folder {dst} may not be the input folder or inside it")
    if dst.exists() and not dst.is_dir():
        raise VideoInputError(f"the output path exists and is not a folder: {dst}")


def print_video_summary(summary: dict, echo) -> None:
    echo(f"{summary['n_videos']} video(s): {summary['n_ok']} ok, {summary['n_failed']} failed, "
         f"{summary['n_skipped']} skipped (resume); {summary['n_frames_processed']} frames, "
         f"{summary['frames_per_s']:.1f} frames/s")
    failed = [r for r in summary["files"] if r["status"] == "error"]
    for row in failed[:10]:
        echo(f"  FAILED {row['file']}: {row['error']}")
    if len(failed) > 10:
        echo(f"  ... and {len(failed) - 10} more (see the summary)")
    echo(f"outputs: {summary['output_dir']}")
    echo("summary: " + " and ".join(p for p in (summary["summary_csv"], summary["summary_json"]) if p))


def plan_video_jobs(input_path: Path, output_dir: Path, recursive: bool) -> list[VideoJob]:
    input_path = Path(input_path)
    if input_path.is_file():
        if not is_video_path(input_path):
            raise VideoInputError(f"{input_path} is not a video file this run knows by its extension")
        return [VideoJob(input_path, input_path.name, output_dir)]
    if not input_path.is_dir():
        raise VideoInputError(f"input not found: {input_path}")
    check_video_output(input_path, output_dir)
    files = list_videos(input_path, recursive)
    rels = [f.relative_to(input_path).as_posix() for f in files]
    stems = [r.rsplit(".", 1)[0] for r in rels]
    # clip.mp4 and clip.mkv in one folder: both keep their extension in the folder name. So do
    # clip.mp4 and clip..mp4: Windows drops the trailing dot, so clip/ and clip./ are one folder there.
    keys = Counter(windows_path_key(s) for s in stems)
    jobs = [VideoJob(f, rel, output_dir / (rel.replace(".", "_") if keys[windows_path_key(stem)] > 1 else stem))
            for f, rel, stem in zip(files, rels, stems)]
    _mark_folder_conflicts(jobs, output_dir)
    return jobs


def _mark_folder_conflicts(jobs: list[VideoJob], output_dir: Path) -> None:
    """Two videos whose folders would be one (clip.mp4 + clip.mkv -> clip_mp4, beside clip_mp4.avi), or
    where one's folder would be an output of the other (x.mp4 -> x/, x/frames.mp4 -> x/frames/: redoing
    x would delete the other's outputs), get a per-file error naming the other. Compared as Windows
    names folders: Clip/ and clip/, or "case 12 /" and "case 12/", are one folder there."""
    outputs = {name.casefold() for name in (MASK_VIDEO, OVERLAY_VIDEO, FRAMES_CSV, FRAMES_JSON, FRAMES_DIR)}
    owner: dict[str, VideoJob] = {}
    for job in jobs:
        owner.setdefault(windows_path_key(job.out_dir.relative_to(output_dir).as_posix()), job)
    for job in jobs:
        key = windows_path_key(job.out_dir.relative_to(output_dir).as_posix())
        parts = key.split("/")
        clashing = [key] + ["/".join(parts[:i]) for i in range(1, len(parts)) if parts[i] in outputs]
        for other_key in clashing:
            other = owner.get(other_key)
            if other is not None and other is not job:
                for a, b in ((job, other), (other, job)):
                    a.conflict = a.conflict or (f"its output folder {a.out_dir} would be, or hold, that of {b.rel}"
                                                f" ({b.out_dir}); rename one of the two")


def video_settings(segmenter) -> dict:
    """What made a video's masks (a resumed run redoes videos made with anything else)."""
    files = sorted({Path(f) for b in segmenter.backends for f in (getattr(b, "model_files", None) or [])},
                   key=lambda f: f.name)
    path = getattr(segmenter, "model_path", None)
    if not files and path is not None and Path(path).is_file():
        files = [Path(path)]
    digest = hashlib.sha256("".join(f"{f.name}:{file_sha256(f)};" for f in files).encode()).hexdigest() if files else None
    info = segmenter.info
    settings = {"model": Path(path).name if path else None, "model_sha256": digest,
                "threshold": float(segmenter.threshold), "output_format": info.output_format,
                "input_size": [int(info.input_height), int(info.input_width)], "tta": [info.tta, info.tta_sizes]}
    return json.loads(json.dumps(settings))  # as a record read back compares it (tuples become lists)


def run_videos(segmenter, input_path, output_dir=None, *, recursive: bool = False, resume: bool = False,
               overlay: bool = False, frames: bool = False, max_pixels: int | None = None,
               progress: bool = False, log=None) -> dict:
    """Segment every frame of one video, or of each video in a folder; returns the summary (also
    written as ``effiseg_summary.json``/``.csv`` in the output folder)."""
    say = log or (lambda message: None)
    input_path = Path(input_path)
    output_dir = Path(output_dir) if output_dir is not None else default_video_output(input_path)
    jobs = plan_video_jobs(input_path, output_dir, recursive)
    if not jobs:
        say(f"no video files in {input_path}" + ("" if recursive else " (add --recursive for sub-folders)"))
    output_dir.mkdir(parents=True, exist_ok=True)
    settings = video_settings(segmenter)
    av_error = import_av().error.FFmpegError  # an encoder that refuses this video: its message names no file
    started = time.perf_counter()
    rows = []
    with OutputFolderLock(output_dir, say):
        stale = remove_stale(output_dir)
        if stale:
            say(f"removed {stale} temporary file(s) left by an interrupted run")
        for n, job in enumerate(jobs, 1):
            if job.conflict:
                rows.append(_video_row(job, "error", None, f"{job.rel}: {job.conflict}"))
                say(f"  FAILED {job.rel}: {job.conflict}")
                continue
            done = _complete_record(job, settings, overlay, frames) if resume else None
            if done is not None:
                rows.append(_video_row(job, "skipped", done))
                continue
            say(f"[{n}/{len(jobs)}] {job.rel}")
            try:
                record = segment_video(segmenter, job, settings, overlay=overlay, frames=frames,
                                       max_pixels=max_pixels, progress=progress)
                rows.append(_video_row(job, "ok", record))
            except (BackendLost, PipelineAborted):
                raise  # the device or the run is gone: no later video would fare better
            except Exception as e:  # this video alone: an encoder that refuses it, a frame PyAV cannot convert
                reason = str(e) if isinstance(e, (VideoError, OSError, av_error)) else f"{type(e).__name__}: {e}"
                if job.rel not in reason and str(job.source) not in reason:
                    reason = f"{job.rel}: {reason}"
                rows.append(_video_row(job, "error", None, reason))
                say(f"  FAILED {job.rel}: {reason}")
                if job.out_dir != output_dir:
                    try:
                        job.out_dir.rmdir()  # only when empty: a failed first attempt leaves no folder
                    except OSError:
                        pass
    wall = time.perf_counter() - started
    processed = [r for r in rows if r["status"] == "ok"]
    n_frames = sum(r["frames"] or 0 for r in processed)
    summary = {"input": str(input_path), "output_dir": str(output_dir), "kind": "video",
               "backend": segmenter.backend_name, "devices": [b.device for b in segmenter.backends],
               "precision": segmenter.precision, "settings": settings, "resume": resume, "overlay": overlay,
               "frames_png": frames, "n_videos": len(rows), "n_ok": len(processed),
               "n_failed": sum(r["status"] == "error" for r in rows),
               "n_skipped": sum(r["status"] == "skipped" for r in rows), "n_frames_processed": n_frames,
               "wall_s": round(wall, 4), "frames_per_s": round(n_frames / wall, 3) if wall > 0 and n_frames else 0.0,
               "files": rows}
    summary["summary_json"] = str(output_dir / f"{SUMMARY_STEM}.json")
    csv_path = output_dir / f"{SUMMARY_STEM}.csv"  # first: the JSON then says whether it was written
    summary["summary_csv"] = write_summary_csv(lambda text: _atomic_text(csv_path, text), str(csv_path), rows,
                                               VIDEO_FIELDS, SUMMARY_STEM + ".json", say)
    _atomic_text(output_dir / f"{SUMMARY_STEM}.json", json.dumps(summary, indent=2, default=str))
    return summary


def segment_video(segmenter, job: VideoJob, settings: dict, *, overlay: bool = False, frames: bool = False,
                  max_pixels: int | None = None, progress: bool = False) -> dict:
    """One video -> its outputs in ``job.out_dir``; returns its record (what ``frames.json`` holds).
    Raises VideoError (nothing written under a final name) for a video that cannot be read whole."""
    out = job.out_dir
    out.mkdir(parents=True, exist_ok=True)
    source_stat = _source_stat(job.source)  # before reading: a file changed while read is redone next time
    marker = out / FRAMES_JSON
    with VideoReader(job.source, max_pixels) as reader:
        rate = reader.average_rate
        writers = []
        png_dir = temp_path(out / FRAMES_DIR) if frames else None
        csv_temp = temp_path(out / FRAMES_CSV)
        rows: list[dict] = []
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=reader.declared_frames or None, unit="frame", desc=job.rel, dynamic_ncols=True,
                       leave=False)
        try:
            writers.append(MaskVideoWriter(out / MASK_VIDEO, reader.width, reader.height, rate))
            if overlay:
                writers.append(OverlayVideoWriter(out / OVERLAY_VIDEO, reader.width, reader.height, rate))
            if png_dir is not None:
                png_dir.mkdir()

            def per_frame(frame, mask):
                # Anything that does not depend on the order runs here, in the pipeline's writer threads.
                if png_dir is not None:
                    Image.fromarray(np.where(mask, np.uint8(255), np.uint8(0)), mode="L").save(
                        png_dir / f"{frame.index:06d}.png")
                return overlay_image(frame.rgb, mask) if overlay else None

            def write(frame, mask, max_probability, regions, overlay_rgb):
                writers[0].write(mask, frame.index, frame.time_s)
                if overlay_rgb is not None:
                    writers[1].write(overlay_rgb, frame.index, frame.time_s)
                rows.append({"frame": frame.index, "pts": frame.pts,
                             "time_s": None if frame.time_s is None else round(frame.time_s, 6),
                             "area_fraction": round(float(np.count_nonzero(mask)) / mask.size, 6),
                             "regions": regions,
                             "max_probability": None if max_probability is None else round(max_probability, 6)})
                if bar is not None:
                    bar.update(1)

            segment_frames(segmenter, reader, write, per_frame)
            temps = [w.close() for w in writers]
            csv_temp.write_bytes(rows_csv_text(rows, FRAME_FIELDS).encode("utf-8"))
        except BaseException:
            for w in writers:
                w.abort()
            csv_temp.unlink(missing_ok=True)
            if png_dir is not None:
                shutil.rmtree(png_dir, ignore_errors=True)
            raise
        finally:
            if bar is not None:
                bar.close()
        stream = reader.describe()
    # Everything decoded and encoded: into place all together or not at all, the earlier record
    # first out (until the new one lands the folder vouches for nothing, should the run be killed),
    # an earlier overlay or frames/ that this run does not make removed. A failure (an earlier
    # masks.mkv open in a video player on Windows) leaves the earlier outputs and record as they were.
    replace_outputs(out, {FRAMES_JSON: None, MASK_VIDEO: temps[0], OVERLAY_VIDEO: temps[1] if overlay else None,
                          FRAMES_DIR: png_dir, FRAMES_CSV: csv_temp})
    record = {"video": job.rel, "source": str(job.source), "source_stat": source_stat, "complete": True,
              "settings": settings,
              "stream": stream, "n_frames": len(rows),
              "outputs": {"masks": MASK_VIDEO, "csv": FRAMES_CSV, "overlay": OVERLAY_VIDEO if overlay else None,
                          "frames": FRAMES_DIR if frames else None},
              "frames": rows}
    _atomic_text(marker, json.dumps(record, indent=1))
    return record


class _FrameFailed(Exception):
    pass


class _StopOnError:
    """The reader as the pipeline's job iterator: a decoding error ends the iteration (the frames
    already taken still finish) and is kept for the caller, so the pipeline never sees it."""

    def __init__(self, reader):
        self.reader, self.error = reader, None

    def __iter__(self):
        return self

    def __next__(self):
        if self.error is not None:
            raise StopIteration
        try:
            return next(self.reader)
        except VideoError as e:
            self.error = e
            raise StopIteration from None


def segment_frames(segmenter, reader, write, per_frame=None) -> int:
    """Every frame of ``reader`` through the segmenter's pipeline; ``write(frame, mask, max_probability,
    regions, extra)`` is called once per frame, in frame order, with ``extra = per_frame(frame, mask)``
    computed before, in the pipeline's writer threads, in any order. Returns the number of frames."""
    info, threshold = segmenter.info, segmenter.threshold

    def load(frame):
        return segmenter.prepare(frame.rgb), None

    def finish(frame, meta, output):
        mask, max_probability = output_to_mask(output, info.output_format, threshold, *frame.rgb.shape[:2])
        extra = per_frame(frame, mask) if per_frame is not None else None
        return mask, max_probability, count_regions(mask), extra

    def fail(frame, error, stage):
        return _FrameFailed(f"frame {frame.index}: {stage} failed: {error}")

    frames = _StopOnError(reader)
    waiting: dict[int, tuple] = {}
    next_index = 0
    for frame, result in segmenter.pipeline(load, finish, fail).run(frames):
        if isinstance(result, _FrameFailed):
            raise VideoError(f"{reader.path}: {result}")
        waiting[frame.index] = (frame, result)
        while next_index in waiting:  # results come back in completion order
            frame, (mask, max_probability, regions, extra) = waiting.pop(next_index)
            write(frame, mask, max_probability, regions, extra)
            next_index += 1
    if frames.error is not None:
        raise frames.error
    if waiting:  # cannot happen while the pipeline returns one result per frame; never write a gap
        raise VideoError(f"{reader.path}: frames {sorted(waiting)[:5]} came back without frame {next_index}")
    return next_index


def _complete_record(job: VideoJob, settings: dict, overlay: bool, frames: bool) -> dict | None:
    """The record of a video finished earlier with these settings and every output asked for now."""
    try:
        record = json.loads((job.out_dir / FRAMES_JSON).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not (isinstance(record, dict) and record.get("complete") and record.get("settings") == settings
            and record.get("video") == job.rel):  # another video's record (its folder name was this one's)
        return None
    n = record.get("n_frames")
    if not (isinstance(n, int) and n > 0 and isinstance(record.get("frames"), list) and len(record["frames"]) == n
            and isinstance(record.get("outputs"), dict) and isinstance(record.get("stream"), dict)):
        return None  # a record this code did not write whole: the video is done again
    try:
        if record.get("source_stat") != _source_stat(job.source):
            return None  # the source was replaced or changed since its masks were made
    except OSError:
        return None
    needed = [job.out_dir / MASK_VIDEO, job.out_dir / FRAMES_CSV] + ([job.out_dir / OVERLAY_VIDEO] if overlay else [])
    if not all(p.is_file() for p in needed):
        return None
    if frames and not (record["outputs"].get("frames") and (job.out_dir / FRAMES_DIR / f"{n - 1:06d}.png").is_file()):
        return None
    return record


def _source_stat(path: Path) -> dict:
    stat = Path(path).stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _video_row(job: VideoJob, status: str, record: dict | None, error: str = "") -> dict:
    row = {k: None for k in VIDEO_FIELDS}
    row.update(file=job.rel, output=str(job.out_dir), status=status, error=error)
    if record:
        per_frame = record["frames"]
        probs = [r["max_probability"] for r in per_frame if r["max_probability"] is not None]
        row.update(frames=record["n_frames"], width=record["stream"]["width"], height=record["stream"]["height"],
                   average_rate=record["stream"]["average_rate"],
                   frames_with_polyp=sum(r["area_fraction"] > 0 for r in per_frame),
                   mean_area_fraction=round(sum(r["area_fraction"] for r in per_frame) / max(1, len(per_frame)), 6),
                   max_probability=max(probs) if probs else None)
    return row


def _atomic_text(path: Path, text: str) -> None:
    temp = temp_path(path)
    try:
        temp.write_bytes(text.encode("utf-8"))
        replace_with_retry(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
