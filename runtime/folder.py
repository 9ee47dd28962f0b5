"""Folder runs: every image of a folder -> one 0/255 PNG mask at the image's own size.

Layout of the output folder (default: a sibling of the input named ``<input>_masks``):
* ``<relative path>.png`` for each input ``<relative path>.<ext>`` (sub-folders mirrored with
  ``recursive``); when two inputs would share a mask name (``a.jpg`` and ``a.png``), both keep
  their extension: ``a.jpg.png`` and ``a.png.png``;
* ``overlays/<relative path>.jpg`` with ``overlay`` (the image, a translucent fill and an outline);
* ``effiseg_summary.csv`` and ``effiseg_summary.json`` (per image: size, polyp area fraction,
  number of 8-connected regions, maximum probability, error; per run: backend, devices,
  precision, images/s, counts and a timing breakdown);
* ``effiseg_journal.jsonl``: one line per finished image, appended as the run goes, so that a
  resumed run can report the images an earlier run finished;
* ``effiseg_run.lock``: held by the run writing the folder (``folder_lock``), empty between runs.

Every file is written to a temporary name in its folder and renamed into place, so a run killed
at any moment leaves no partial mask; ``resume`` skips images whose mask is complete (PNG
signature and IEND trailer present) *and* was made with the settings recorded in
``effiseg_run_settings.json`` (model content, threshold, output format, input size, TTA; a resume with
others is refused): the journal says so, or, for a mask renamed into place just before a kill, its
time is after the settings took effect. It redoes the rest, failed ones included. A run that starts
afresh replaces the settings record and the journal before it writes a mask, so masks an earlier
run left with other settings are never taken for this one's.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .folder_lock import OutputFolderLock
from .images import (DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, allow_pixels, atomic_write_text, list_images, overlay_image,
                     png_is_complete, read_image, remove_stale_temp_files, write_jpeg, write_mask_png)
from .model_info import describe_tta
from .postprocess import count_regions, output_to_mask
from .rows_csv import write_summary_csv
from .trt_engine_cache import file_sha256  # pure Python; the hash the engine cache keys on

SUMMARY_STEM = "effiseg_summary"
JOURNAL_NAME = "effiseg_journal.jsonl"
SETTINGS_NAME = "effiseg_run_settings.json"
OVERLAY_DIR = "overlays"
ROW_FIELDS = ("file", "mask", "status", "width", "height", "area_fraction", "regions", "max_probability",
              "error")


class FolderError(ValueError):
    """A folder run that cannot start (bad input/output folders); the message says why."""


class RecordWriteError(RuntimeError):
    """Writing the run's journal or summary failed once the run had started (a full disk, say):
    the masks written so far are complete, and a resumed run finishes the folder."""


@dataclass
class FileJob:
    index: int
    source: Path
    rel: str                  # input path relative to the input folder, with "/" separators
    mask_path: Path
    mask_rel: str
    overlay_path: Path | None


def default_output_dir(input_dir: Path) -> Path:
    input_dir = Path(input_dir).resolve()
    if not input_dir.name:  # C:\, \\server\share\ or /: no sibling folder to put the masks in
        raise FolderError(f"{input_dir} is the root of a drive or share: name the mask folder with --output")
    return input_dir.with_name(input_dir.name + "_masks")


def check_folders(input_dir: Path, output_dir: Path, recursive: bool) -> tuple[Path, Path]:
    """The input and output folders, resolved, if a run can use them; else FolderError saying why."""
    try:
        return _check_folders(Path(input_dir), Path(output_dir), recursive)
    except OSError as e:  # e.g. a folder this user may not list (is_dir() raises on Python 3.11)
        raise FolderError(f"cannot use {e.filename or input_dir}: {e.strerror or e}") from None


def _check_folders(input_dir: Path, output_dir: Path, recursive: bool) -> tuple[Path, Path]:
    if not input_dir.is_dir():
        if input_dir.exists():
            raise FolderError(f"--input takes a folder of images; {input_dir} is a file")
        raise FolderError(f"input folder not found: {input_dir}")
    src, dst = input_dir.resolve(), output_dir.resolve()
    if src == dst:
        raise FolderError(f"the output folder may not be the input folder ({src}); pick another --output")
    if recursive and src in dst.parents:
        raise FolderError(f"with --recursive the output folder may not be inside the input folder "
                          f"({dst} is inside {src}): its masks would be read as input next time")
    if dst.exists() and not dst.is_dir():
        raise FolderError(f"the output path exists and is not a folder: {dst}")
    _probe_writable(dst)
    return src, dst


def _probe_writable(dst: Path) -> None:
    """Before any model is loaded (an engine build can take minutes): ``dst`` must take a file.

    Probed by doing it: os.access says yes to any folder on Windows. A missing ``dst`` is created
    for the probe and removed again, because a folder may allow new folders but not new files:
    on Windows a user may create C:\\frames_masks but no file directly in C:\\. The real writes
    still report their own errors.
    """
    existing = next((d for d in (dst, *dst.parents) if d.exists()), None)
    if existing is not None and not existing.is_dir():
        raise FolderError(f"cannot write the results to {dst}: {existing} is a file")
    missing = [d for d in (dst, *dst.parents) if not d.exists()]
    created: list[Path] = []
    try:
        for folder in reversed(missing):
            try:
                folder.mkdir()
            except FileExistsError:  # made meanwhile by someone else: fine, not ours to remove
                continue
            except OSError as e:
                raise FolderError(f"cannot write the results to {dst}: cannot create {folder} "
                                  f"({e.strerror or e})") from None
            created.append(folder)
        try:
            with tempfile.TemporaryFile(dir=dst):
                pass
        except OSError as e:
            raise FolderError(f"cannot write the results to {dst}: {existing if dst == existing else dst} "
                              f"is not writable ({e.strerror or e})") from None
    finally:
        for folder in reversed(created):
            for attempt in range(5):  # Windows: a scanner may still hold the probe file's folder
                try:
                    folder.rmdir()
                    break
                except OSError:
                    time.sleep(0.02 * (attempt + 1))


def plan_jobs(input_dir: Path, output_dir: Path, files: list[Path], overlay: bool) -> list[FileJob]:
    rels = [f.relative_to(input_dir).as_posix() for f in files]
    mask_rels = [str(Path(r).with_suffix(".png").as_posix()) for r in rels]
    # Case-folded: on Windows and macOS a.JPG and a.png would collide as well.
    taken = Counter(m.casefold() for m in mask_rels)
    used: set[str] = set()
    jobs = []
    for i, (f, rel, mask_rel) in enumerate(zip(files, rels, mask_rels)):
        if taken[mask_rel.casefold()] > 1:
            mask_rel = rel + ".png"
        # The renamed name can itself clash (a.png -> a.png.png beside an input a.png.png): number it.
        base, n = mask_rel[:-len(".png")], 1
        while mask_rel.casefold() in used:
            n += 1
            mask_rel = f"{base}.{n}.png"
        used.add(mask_rel.casefold())
        overlay_path = output_dir / OVERLAY_DIR / (mask_rel[:-len(".png")] + ".jpg") if overlay else None
        jobs.append(FileJob(i, f, rel, output_dir / mask_rel, mask_rel, overlay_path))
    return jobs


def _read_journal(path: Path) -> dict[str, dict]:
    rows: dict[str, dict] = {}
    if not path.is_file():
        return rows
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # the line a killed run was writing
        if isinstance(row, dict) and "file" in row:
            rows[row["file"]] = row
    return rows


def _empty_row(job: FileJob, status: str, error: str = "") -> dict:
    return {"file": job.rel, "mask": job.mask_rel, "status": status, "width": None, "height": None,
            "area_fraction": None, "regions": None, "max_probability": None, "error": error}


def _row_from_mask(job: FileJob, regions: bool) -> dict:
    """Statistics of an existing mask for a summary row (the probability is not recoverable): a mask
    renamed into place just before a kill, whose journal line was never written."""
    row = _empty_row(job, "skipped")
    try:
        with Image.open(job.mask_path) as im:
            mask = np.asarray(im.convert("L")) > 127
    except Exception as e:  # complete by its trailer but undecodable: report, do not stop
        row["error"] = f"existing mask unreadable: {e}"
        return row
    row.update(width=mask.shape[1], height=mask.shape[0], area_fraction=round(float(mask.mean()), 6),
               regions=count_regions(mask) if regions else None)
    return row


def _write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=str, allow_nan=False))


_hash_cache: dict[tuple, str] = {}
_hash_cache_lock = threading.Lock()


def content_sha256(path: Path) -> str:
    """``file_sha256`` of a model file, remembered while its size, times and inode stay the same.

    Why: every folder run records the model's hash, and hashing the default checkpoint's 18 MB of
    weights cost ~15 ms per run on the 2-core EPYC, a fixed cost that a process running many
    folders (the benchmark's end-to-end rounds, a service) paid again every time. A file replaced
    or rewritten in place (retrained) gets new times, and is hashed again (file systems keep times
    to a few ms or finer: only a same-size rewrite within one tick of the hashed version would be
    missed, which no training run does)."""
    stat = os.stat(path)
    # ctime too: a copy that keeps the source's modification time (cp -p, rsync -a) still changes
    # it (on Windows it is the creation time, which a rewrite in place keeps: mtime covers that).
    key = (str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, getattr(stat, "st_ino", 0))
    with _hash_cache_lock:
        digest = _hash_cache.get(key)
    if digest is None:
        digest = file_sha256(path)
        with _hash_cache_lock:
            _hash_cache[key] = digest
    return digest


def _run_settings(segmenter) -> tuple[dict, list[Path]]:
    """What made a folder's masks, so that a resumed run refuses to mix in masks of another model,
    threshold or input size, and the model files behind it. The model's content is hashed: its ONNX
    file, or a checkpoint's weights and config (a checkpoint folder retrained in place keeps its name)."""
    import hashlib
    path = getattr(segmenter, "model_path", None)
    files: list[Path] = []
    for backend in segmenter.backends:
        files += [Path(f) for f in getattr(backend, "model_files", None) or []]
    if not files and path is not None and Path(path).is_file():
        files = [Path(path)]
    files = sorted(set(files), key=lambda f: f.name)
    if len(files) == 1:
        digest = content_sha256(files[0])
    elif files:
        digest = hashlib.sha256("".join(f"{f.name}:{content_sha256(f)};" for f in files).encode()).hexdigest()
    else:
        digest = None
    info = segmenter.info
    return {"model": Path(path).name if path else None, "model_sha256": digest,
            "threshold": float(segmenter.threshold), "output_format": info.output_format,
            "input_size": [int(info.input_height), int(info.input_width)],
            # Masks of --tta none and --tta multiscale must not mix in one folder either.
            "tta": describe_tta(info.tta, info.tta_sizes)}, files


def run_folder(segmenter, input_dir, output_dir=None, *, recursive: bool = False, resume: bool = False,
               overlay: bool = False, max_pixels: int = DEFAULT_MAX_PIXELS, regions: bool = False,
               progress: bool = False, log=None) -> dict:
    """Segment every image under ``input_dir``; returns the summary (also written as JSON).

    ``regions``: count each mask's 8-connected regions for its summary row (None otherwise). Off by
    default: the count is Python work under the GIL, and it cost the host pipeline a quarter of its
    images/s on the 2-core CPU (benchmarks/RESULTS.md, "Region counting made a choice").
    ``log``: a callable for one-line messages (the CLI passes click.echo to stderr).
    """
    input_dir = Path(input_dir)
    output_dir = Path(output_dir) if output_dir is not None else default_output_dir(input_dir)
    input_dir, output_dir = check_folders(input_dir, output_dir, recursive)
    say = log or (lambda message: None)
    output_dir.mkdir(parents=True, exist_ok=True)
    # Held before anything in the folder is touched: another run's temporary files are not stale.
    with OutputFolderLock(output_dir, say):
        return _segment_folder(segmenter, input_dir, output_dir, say, recursive=recursive, resume=resume,
                               overlay=overlay, max_pixels=max_pixels, regions=regions, progress=progress)


def _segment_folder(segmenter, input_dir: Path, output_dir: Path, say, *, recursive: bool, resume: bool,
                    overlay: bool, max_pixels: int, regions: bool, progress: bool) -> dict:
    """run_folder's work, in a checked output folder this run holds, step by step."""
    jobs = _plan_folder(input_dir, output_dir, recursive, overlay, max_pixels, say)
    settings_since = _load_resume_state(segmenter, output_dir, resume, say)
    _clear_earlier_records(segmenter, output_dir, fresh=settings_since is None)
    rows, todo = _split_done(jobs, output_dir, resume, settings_since, regions)
    if resume:
        say(f"resume: {len(jobs) - len(todo)} of {len(jobs)} image(s) already have a mask")
        _repair_journal(output_dir / JOURNAL_NAME)
    pipe, wall = _segment_jobs(segmenter, todo, rows, output_dir / JOURNAL_NAME, resume, max_pixels, regions,
                               progress)
    for device, why in pipe.lost.items():
        say(f"gave up on {device} part-way: {why}; the other device(s) finished the run, including the images "
            "waiting for it; the images of the batches it failed are listed as failed (--resume redoes them)")
    summary = _summary(segmenter, input_dir, output_dir, jobs, todo, rows, pipe, wall,
                       dict(recursive=recursive, resume=resume, overlay=overlay, max_pixels=max_pixels,
                            regions=regions))
    return _write_summary(summary, output_dir, say)


def _plan_folder(input_dir: Path, output_dir: Path, recursive: bool, overlay: bool, max_pixels: int,
                 say) -> list[FileJob]:
    """The folder's images as jobs; the output folder cleared of an interrupted run's temporary files."""
    files = list_images(input_dir, recursive)
    jobs = plan_jobs(input_dir, output_dir, files, overlay)
    if not jobs:
        say(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) in {input_dir}"
            + ("" if recursive else " (add --recursive for sub-folders)"))
    stale = remove_stale_temp_files(output_dir)
    if stale:
        say(f"removed {stale} temporary file(s) left by an interrupted run")
    allow_pixels(max_pixels)
    return jobs


def _load_resume_state(segmenter, output_dir: Path, resume: bool, say) -> float | None:
    """With ``resume``: the recorded settings checked against this run's (FolderError where a mask of
    another model, threshold or input size would be mixed in), and when they took effect (the
    settings file's time). None: the run starts afresh.

    The settings file and the journal go together: a run that starts afresh replaces both before it
    writes any mask, so every journal row, and every mask newer than the settings file, was made with
    the settings it records."""
    settings_path = output_dir / SETTINGS_NAME
    if not resume:
        return None
    if not settings_path.is_file():
        say(f"resume: {output_dir} has no record of the settings that made its masks: every image is done again")
        return None
    settings, model_files = _run_settings(segmenter)
    before = json.loads(settings_path.read_text(encoding="utf-8"))
    # An older effiseg recorded no hash for a checkpoint folder (None), or hashed its weights file
    # alone: not a difference, only less on record.
    older_record = {k for k in settings if before.get(k) is None and settings[k] is not None}
    if before.get("model_sha256") in {content_sha256(f) for f in model_files if len(model_files) > 1}:
        older_record.add("model_sha256")
    changed = [k for k in settings if k in before and k not in older_record and before[k] != settings[k]]
    if changed:
        raise FolderError(f"--resume: the masks in {output_dir} were made with other settings ("
                          + "; ".join(f"{k}: {before.get(k)} then, {settings[k]} now" for k in changed)
                          + "); resume with the same model and threshold, or use another --output")
    unrecorded = [k for k in settings if k not in before or k in older_record]
    if unrecorded:
        say(f"resume: {', '.join(unrecorded)} not recorded (or recorded another way) by the older effiseg "
            "that made the masks; assumed unchanged")
    return settings_path.stat().st_mtime


def _clear_earlier_records(segmenter, output_dir: Path, fresh: bool) -> None:
    """Remove an earlier run's summary; for a fresh run, also its journal, and record this run's settings.

    A summary left by an earlier run would contradict this one if this one stops part-way (it is
    written only at the end); the journal keeps every finished row, so nothing is lost. Checked
    before the journal and settings are replaced: a refusal here leaves a folder --resume can finish."""
    for suffix in (".json", ".csv"):
        earlier_summary = output_dir / f"{SUMMARY_STEM}{suffix}"
        try:
            earlier_summary.unlink(missing_ok=True)
        except PermissionError as e:  # Windows: open in Excel; nothing of this run is done yet
            raise FolderError(f"cannot replace {earlier_summary} ({e.strerror or e}): if it is open in another "
                              "program (Excel), close it and run again") from None
    if not fresh:
        return
    journal_path = output_dir / JOURNAL_NAME
    try:
        journal_path.unlink(missing_ok=True)  # its rows vouch for masks made with other settings
    except PermissionError as e:
        raise FolderError(f"cannot replace {journal_path} ({e.strerror or e}): close the program that "
                          "has it open and run again") from None
    _write_json(output_dir / SETTINGS_NAME, _run_settings(segmenter)[0])


def _split_done(jobs: list[FileJob], output_dir: Path, resume: bool, settings_since: float | None,
                regions: bool = False) -> tuple[dict[int, dict], list[FileJob]]:
    """(rows of the images an earlier run finished with these settings, the jobs left to do). A row
    kept from the journal keeps what that run counted: its regions only if it was asked to."""
    earlier = _read_journal(output_dir / JOURNAL_NAME) if resume else {}
    rows: dict[int, dict] = {}
    todo: list[FileJob] = []
    for job in jobs:
        overlay_missing = job.overlay_path is not None and not job.overlay_path.is_file()
        if resume and png_is_complete(job.mask_path) and not overlay_missing:
            before = earlier.get(job.rel)
            if before and before.get("status") in ("ok", "skipped") and before.get("mask") == job.mask_rel:
                rows[job.index] = dict(before, status="skipped")
                continue
            # No journal line: trusted only when written since these settings took effect (strictly
            # after: a FAT disk keeps times to 2 s). A row that says the image failed is redone.
            if before is None and settings_since is not None and job.mask_path.stat().st_mtime > settings_since:
                rows[job.index] = _row_from_mask(job, regions)
                continue
        todo.append(job)
    return rows, todo


def _repair_journal(journal_path: Path) -> None:
    """End the half line a killed run can leave, so that the next row starts on a line of its own."""
    if not (journal_path.is_file() and journal_path.stat().st_size):
        return
    with open(journal_path, "rb") as existing:
        existing.seek(-1, os.SEEK_END)
        needs_newline = existing.read(1) != b"\n"
    if needs_newline:
        with open(journal_path, "a", encoding="utf-8") as journal:
            journal.write("\n")


def _image_steps(segmenter, max_pixels: int, regions: bool):
    """The pipeline's per-image callbacks for folder jobs: load (file -> model input), finish (output
    -> mask file and summary row) and fail (an exception -> an error row)."""
    info, threshold = segmenter.info, segmenter.threshold
    fmt = info.output_format

    def load(job: FileJob):
        rgb = read_image(job.source, max_pixels)
        return segmenter.prepare(rgb), rgb.shape[:2]

    def finish(job: FileJob, size, output: np.ndarray) -> dict:
        h, w = size
        mask, max_prob = output_to_mask(output, fmt, threshold, h, w)
        if job.overlay_path is not None:
            # Re-read rather than keep every original in memory while it waits for the device.
            write_jpeg(job.overlay_path, overlay_image(read_image(job.source, max_pixels), mask))
        write_mask_png(job.mask_path, mask)  # last: the mask marks the image as done
        area = float(np.count_nonzero(mask)) / mask.size
        return {"file": job.rel, "mask": job.mask_rel, "status": "ok", "width": w, "height": h,
                "area_fraction": round(area, 6), "regions": count_regions(mask) if regions else None,
                "max_probability": None if max_prob is None else round(max_prob, 6), "error": ""}

    def fail(job: FileJob, error: BaseException, stage: str) -> dict:
        text = str(error) or type(error).__name__  # MemoryError() says nothing by itself
        return _empty_row(job, "error", f"{stage}: {text}" if stage != "read" else text)

    return load, finish, fail


def _segment_jobs(segmenter, todo: list[FileJob], rows: dict[int, dict], journal_path: Path, resume: bool,
                  max_pixels: int, regions: bool, progress: bool):
    """The run: every job through the pipeline, each finished row into ``rows`` and the journal as
    it comes. Returns the pipeline (its timing, the devices given up) and the wall time."""
    started = time.perf_counter()
    pipe = segmenter.pipeline(*_image_steps(segmenter, max_pixels, regions), condense=segmenter.cut_masks)
    bar = None
    if progress and todo:
        from tqdm import tqdm
        bar = tqdm(total=len(todo), unit="img", desc="effiseg-run", dynamic_ncols=True)
    try:
        with open(journal_path, "a" if resume else "w", encoding="utf-8") as journal:
            n_failed_so_far = 0
            try:
                for finished in pipe.run_batches(todo):
                    for job, row in finished:
                        rows[job.index] = row
                        journal.write(json.dumps(row) + "\n")
                    # Once per writer's chunk: a kill loses at most these lines, and --resume rebuilds
                    # the row of any mask renamed into place without one (_split_done).
                    journal.flush()
                    if bar is not None:
                        bar.update(len(finished))
                        failed_now = sum(row["status"] == "error" for _, row in finished)
                        if failed_now:
                            n_failed_so_far += failed_now
                            bar.set_postfix(failed=n_failed_so_far)
            finally:
                if bar is not None:
                    bar.close()
    except OSError as e:
        raise RecordWriteError(f"could not write the journal {journal_path}: {e}") from e
    wall = time.perf_counter() - started
    segmenter.last_stats = pipe.stats
    return pipe, wall


def _summary(segmenter, input_dir: Path, output_dir: Path, jobs: list[FileJob], todo: list[FileJob],
             rows: dict[int, dict], pipe, wall: float, options: dict) -> dict:
    """The run's summary: what ran where, the counts, the timing and one row per image in folder order."""
    ordered = [rows[job.index] for job in jobs]
    desc = segmenter.describe()
    return {
        "input_dir": str(input_dir), "output_dir": str(output_dir),
        "model": desc["model"], "backend": desc["backend"], "devices": desc["devices"],
        "precision": desc["precision"], "threshold": segmenter.threshold,
        "batch": max(b.max_batch for b in segmenter.backends),
        "slots": max(b.n_slots for b in segmenter.backends),
        "workers": segmenter.workers, "writers": segmenter.writers,
        **options,
        "n_images": len(jobs), "n_ok": sum(r["status"] == "ok" for r in ordered),
        "n_failed": sum(r["status"] == "error" for r in ordered),
        "n_skipped": sum(r["status"] == "skipped" for r in ordered),
        "n_processed": len(todo), "wall_s": round(wall, 4),
        "images_per_s": round(len(todo) / wall, 3) if wall > 0 and todo else 0.0,
        "timing": pipe.timing(), "devices_given_up": dict(pipe.lost),
        "selection": desc["selection"], "backends": desc["backends"], "model_info": desc["model_info"],
        "files": ordered,
    }


def _write_summary(summary: dict, output_dir: Path, say) -> dict:
    """effiseg_summary.json, then .csv (a CSV that cannot be written is said, not fatal: the JSON has
    the same rows). Returns the summary with the paths written."""
    try:
        _write_json(output_dir / f"{SUMMARY_STEM}.json", _finite(summary))
    except OSError as e:
        raise RecordWriteError(f"every image is done, but the summary could not be written: {e}") from e
    summary["summary_json"] = str(output_dir / f"{SUMMARY_STEM}.json")
    csv_path = output_dir / f"{SUMMARY_STEM}.csv"
    summary["summary_csv"] = write_summary_csv(lambda text: atomic_write_text(csv_path, text), str(csv_path),
                                               summary["files"], ROW_FIELDS, f"{SUMMARY_STEM}.json", say)
    return summary


def _finite(obj):
    """JSON has no NaN/inf: write them as null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj
