"""``effiseg-run --input DIR --ray [auto|ADDRESS]``: the folder job on Ray Data, on one machine or a cluster.

* ``--ray`` alone starts a local Ray (all of this machine's CPUs and GPUs); ``--ray auto`` joins the
  cluster this machine belongs to (``ray start`` / ``RAY_ADDRESS``); ``--ray ray://HEAD:10001`` (Ray
  Client) or ``--ray HEAD:6379`` joins that one. Every node needs effiseg with its backend installed.
* ``--input`` and ``--output`` are local folders or any URI pyarrow's file systems read (s3://BUCKET/DIR,
  gs://, hdfs://, file://); the driver lists the images, Ray Data hands them out in batches of
  ``--batch`` to a pool of actors (a callable class, ``SegmentBatch``), each of which opens one effiseg
  ``Segmenter`` once and keeps it: one actor per GPU (``num_gpus=1``) where the cluster has GPUs and the
  backend uses them, else one CPU actor per CPU (``cpus_per_actor`` in ``run_ray``); ``--ray-actors``
  overrides the count. With ``--backend onnxruntime`` or ``openvino`` each CPU actor keeps its engine to its
  share of threads (``auto`` takes no thread option).
* Masks are named, computed and encoded as a local ``effiseg-run`` does (the same functions), so they
  are identical file for file; per-file errors land in the summary (``effiseg_summary.json``/``.csv`` in
  the output location); ``--resume`` skips images whose mask is complete (PNG signature and IEND trailer)
  when the recorded settings (``effiseg_ray_settings.json``) match.

Ray is the ``ray`` extra: ``pip install "effiseg[ray]"``. Ray on Windows is beta (Ray's own statement):
run the cluster on Linux where you can.
"""
from __future__ import annotations

import contextlib
import json
import tempfile
import time
from pathlib import Path, PurePosixPath

import numpy as np

from .folder import ROW_FIELDS, plan_jobs
from .folder_lock import OutputFolderLock
from .images import (IMAGE_EXTENSIONS, encode_mask_png, natural_key, read_image, remove_stale_temp_files,
                     write_mask_png)
from .postprocess import count_regions, output_to_mask
from .rows_csv import rows_csv_text

SUMMARY_STEM = "effiseg_summary"
# Not effiseg_run_settings.json: a local run records its settings from the opened backends, which the
# driver does not open; one kind of run never takes the other's record for its own (it redoes the masks).
SETTINGS_NAME = "effiseg_ray_settings.json"
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"


class RayJobError(ValueError):
    """A Ray run that cannot start (no Ray, bad input or output location); the message says why."""


def import_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as e:
        raise RayJobError(f'--ray needs Ray Data: pip install "effiseg[ray]" ({e})') from None
    return ray


def is_uri(location) -> bool:
    text = str(location)
    return "://" in text and not (len(text) > 1 and text[1] == ":")  # C:\ is a drive, not a scheme


def open_location(location):
    """(pyarrow file system, path inside it, local Path or None) for a folder or a URI."""
    import pyarrow.fs as pafs
    if is_uri(location):
        try:
            fs, path = pafs.FileSystem.from_uri(str(location))
        except Exception as e:  # unknown scheme, missing credentials, a file system pyarrow lacks
            raise RayJobError(f"cannot open {location}: {e}") from None
        local = Path(path) if isinstance(fs, pafs.LocalFileSystem) else None
        return fs, path.rstrip("/"), local
    local = Path(location).resolve()
    return pafs.LocalFileSystem(), local.as_posix(), local


def list_image_files(fs, root: str, recursive: bool) -> list[str]:
    """Paths relative to ``root`` ("/" separators) of the image files under it, in effiseg-run's order."""
    import pyarrow.fs as pafs
    info = fs.get_file_info(root)
    if info.type != pafs.FileType.Directory:
        raise RayJobError(f"input folder not found: {root}")
    rels = []
    for entry in fs.get_file_info(pafs.FileSelector(root, recursive=recursive)):
        if entry.type == pafs.FileType.File and PurePosixPath(entry.path).suffix.lower() in IMAGE_EXTENSIONS:
            rels.append(PurePosixPath(entry.path).relative_to(PurePosixPath(root)).as_posix())
    return sorted(rels, key=natural_key)


def mask_is_complete(fs, path: str) -> bool:
    try:
        with fs.open_input_file(path) as f:
            size = f.size()
            if size < len(_PNG_SIGNATURE) + len(_PNG_IEND):
                return False
            head = f.read(len(_PNG_SIGNATURE))
            f.seek(size - len(_PNG_IEND))
            return head == _PNG_SIGNATURE and f.read() == _PNG_IEND
    except (OSError, FileNotFoundError):
        return False


def _mtime_ns(fs, path: str) -> int | None:
    info = fs.get_file_info(path)
    return None if info.mtime_ns is None else int(info.mtime_ns)


def _newer_than(fs, path: str, since_ns: int | None) -> bool:
    """The file at ``path`` was written after ``since_ns`` (a file system without times: trusted)."""
    if since_ns is None:
        return True
    mtime = _mtime_ns(fs, path)
    return mtime is None or mtime > since_ns


def run_settings(model: Path, threshold, tta: str, input_size) -> dict:
    """What makes the masks, as recorded beside them: a resumed run with other settings is refused."""
    from .model_info import ModelInfo
    from .trt_engine_cache import file_sha256
    info = ModelInfo.from_onnx(model) if model.suffix.lower() == ".onnx" else None
    return {"model": model.name, "model_sha256": file_sha256(model) if model.is_file() else None,
            "threshold": threshold if threshold is not None else (info.threshold if info else None),
            "tta": tta, "input_size": input_size}


class SegmentBatch:
    """Ray Data's callable class: one Segmenter per actor, opened once, then batch after batch of
    files -> masks written to the output location -> one summary row (JSON) per file."""

    def __init__(self, model: str, output: str, max_pixels: int, segmenter_options: dict):
        from .images import allow_pixels
        from .segmenter import Segmenter
        self.segmenter = Segmenter.from_model(Path(model), **segmenter_options)
        self.out_fs, self.out_root, self.out_local = open_location(output)
        self.max_pixels = max_pixels
        allow_pixels(max_pixels)

    def _read(self, source: str) -> np.ndarray:
        fs, path, local = open_location(source)
        if local is not None:
            return read_image(local, self.max_pixels)
        # Fetched to a local file so that decoding, and its errors, are a local run's own.
        with tempfile.TemporaryDirectory() as tmp:
            copy = Path(tmp) / PurePosixPath(path).name
            with fs.open_input_stream(path) as src, open(copy, "wb") as dst:
                dst.write(src.read())
            return read_image(copy, self.max_pixels)

    def _write(self, mask_rel: str, mask: np.ndarray) -> None:
        if self.out_local is not None:
            target = self.out_local / mask_rel
            target.parent.mkdir(parents=True, exist_ok=True)
            write_mask_png(target, mask)  # atomic: a temporary name, then renamed
            return
        path = f"{self.out_root}/{mask_rel}"
        self.out_fs.create_dir(str(PurePosixPath(path).parent), recursive=True)
        with self.out_fs.open_output_stream(path) as f:  # object stores publish an object whole
            f.write(encode_mask_png(mask))

    def __call__(self, batch: dict) -> dict:
        seg = self.segmenter
        fmt, threshold = seg.info.output_format, seg.threshold
        jobs = list(zip(batch["file"], batch["mask"], batch["source"]))

        def load(job):
            rgb = self._read(job[2])
            return seg.prepare(rgb), rgb.shape[:2]

        def finish(job, size, output):
            h, w = size
            mask, max_prob = output_to_mask(output, fmt, threshold, h, w)
            self._write(job[1], mask)
            return {"file": job[0], "mask": job[1], "status": "ok", "width": w, "height": h,
                    "area_fraction": round(float(np.count_nonzero(mask)) / mask.size, 6),
                    "regions": count_regions(mask),
                    "max_probability": None if max_prob is None else round(max_prob, 6), "error": ""}

        def fail(job, error, stage):
            text = str(error) or type(error).__name__
            return _row(job[0], job[1], "error", f"{stage}: {text}" if stage != "read" else text)

        rows = {}
        for job, row in seg.pipeline(load, finish, fail).run(jobs):
            rows[job[0]] = row
        return {"row": [json.dumps(rows[j[0]]) for j in jobs]}


def _row(file: str, mask: str, status: str, error: str = "") -> dict:
    row = {k: None for k in ROW_FIELDS}
    row.update(file=file, mask=mask, status=status, error=error)
    return row


def connect(ray, address: str | None, log) -> None:
    """``local`` (or None): a Ray on this machine; ``auto`` or an address: that cluster. A Ray already
    started in this process (a test, a notebook) is used as it is."""
    if ray.is_initialized():
        return
    if address in (None, "", "local"):
        log("starting a local Ray (no cluster named; --ray auto joins this machine's cluster)")
        ray.init(include_dashboard=False, log_to_driver=False)
    else:
        log(f"joining the Ray cluster at {address}")
        ray.init(address=address, log_to_driver=False)


def pool_for(resources: dict, use_gpus: bool, cpus_per_actor: int, actors: int | None) -> tuple[int, dict]:
    """(actors, Ray resources per actor) from the cluster's resources: one per GPU, else per CPUs."""
    gpus = int(resources.get("GPU", 0))
    if use_gpus and gpus:
        return (actors or gpus), {"num_gpus": 1}
    cpus = int(resources.get("CPU", 1))
    return (actors or max(1, cpus // cpus_per_actor)), {"num_cpus": cpus_per_actor}


def run_ray(input_location, output_location=None, *, model: Path, address: str | None = None,
            backend: str = "auto", devices=None, precision: str = "auto", batch: int = 8, threshold=None,
            tta: str = "none", input_size=None, recursive: bool = False, resume: bool = False,
            max_pixels: int = 178956970, actors: int | None = None, cpus_per_actor: int = 1,
            progress: bool = False, log=None) -> dict:
    """Segment every image under ``input_location`` on Ray Data; returns the summary (also written as
    ``effiseg_summary.json``/``.csv`` in the output location)."""
    say = log or (lambda message: None)
    ray = import_ray()
    in_fs, in_root, in_local = open_location(input_location)
    if output_location is None:
        if in_local is None:
            raise RayJobError("with an input URI, name the output location with --output")
        from .folder import default_output_dir
        output_location = default_output_dir(in_local)
    out_fs, out_root, out_local = open_location(output_location)
    if in_local is not None and out_local is not None and (
            in_local == out_local or (recursive and in_local in out_local.parents)):
        raise RayJobError(f"the output folder {out_local} may not be the input folder (or inside it with --recursive)")
    rels = list_image_files(in_fs, in_root, recursive)
    jobs = plan_jobs(PurePosixPath("in"), PurePosixPath("out"), [PurePosixPath("in") / r for r in rels], False)
    out_fs.create_dir(out_root, recursive=True)

    # A local output folder: the same lock as a local run (two runs never write one folder), and the
    # temporary files a killed run left there are removed.
    with (OutputFolderLock(out_local, say) if out_local is not None else contextlib.nullcontext()):
        if out_local is not None:
            stale = remove_stale_temp_files(out_local)
            if stale:
                say(f"removed {stale} temporary file(s) left by an interrupted run")
        settings = run_settings(Path(model), threshold, tta, input_size)
        settings_path = f"{out_root}/{SETTINGS_NAME}"
        if resume:
            try:
                with out_fs.open_input_stream(settings_path) as f:
                    before = json.loads(f.read().decode("utf-8"))
            except (OSError, FileNotFoundError, ValueError):
                before = None
            changed = [k for k in settings if before is not None and before.get(k) != settings[k]]
            if changed:
                raise RayJobError(f"--resume: the masks in {output_location} were made with other settings ("
                                  + "; ".join(f"{k}: {before.get(k)} then, {settings[k]} now" for k in changed) + ")")
            if before is None:
                say("resume: no record of the settings that made the masks: every image is done again")
                resume = False
        # As a local folder run: a run that starts afresh writes the record before any mask, and a resumed
        # run keeps it as it is, so only masks newer than the record were made with the settings it holds
        # (an interrupted fresh run leaves the older run's masks behind, older than the record).
        settings_since = _mtime_ns(out_fs, settings_path) if resume else None
        if not resume:
            with out_fs.open_output_stream(settings_path) as f:
                f.write(json.dumps(settings, indent=2).encode("utf-8"))

        rows: dict[str, dict] = {}
        todo = []
        for job in jobs:
            mask_path = f"{out_root}/{job.mask_rel}"
            if resume and mask_is_complete(out_fs, mask_path) and _newer_than(out_fs, mask_path, settings_since):
                rows[job.rel] = _row(job.rel, job.mask_rel, "skipped")
                continue
            source = (in_local / job.rel).as_posix() if in_local is not None else _join_uri(str(input_location), job.rel)
            todo.append({"file": job.rel, "mask": job.mask_rel, "source": source})
        if resume:
            say(f"resume: {len(jobs) - len(todo)} of {len(jobs)} image(s) already have a mask")

        connect(ray, address, say)
        use_gpus = backend != "openvino" and devices != "cpu"
        n_actors, per_actor = pool_for(ray.cluster_resources(), use_gpus, cpus_per_actor, actors)
        segmenter_options = {"backend": backend, "devices": "0" if "num_gpus" in per_actor else "cpu",
                             "precision": precision, "max_batch": batch, "threshold": threshold, "tta": tta,
                             "input_size": input_size, "workers": max(1, per_actor.get("num_cpus", 2))}
        if "num_cpus" in per_actor and backend in ("onnxruntime", "openvino"):
            # Each CPU actor keeps to its share: N actors with all cores each would fight over them.
            segmenter_options["intra_op_threads" if backend == "onnxruntime" else "threads"] = per_actor["num_cpus"]
        say(f"Ray: {n_actors} actor(s), each {per_actor} and one Segmenter ({backend}); {len(todo)} image(s) to do")
        from ray.data import DataContext
        DataContext.get_current().enable_progress_bars = progress
        started = time.perf_counter()
        if todo:
            ds = ray.data.from_items(todo).map_batches(
                SegmentBatch, batch_size=batch, compute=ray.data.ActorPoolStrategy(size=n_actors), batch_format="numpy",
                fn_constructor_kwargs={"model": str(model), "output": str(output_location), "max_pixels": max_pixels,
                                       "segmenter_options": segmenter_options}, **per_actor)
            for item in ds.iter_rows():
                row = json.loads(item["row"])
                rows[row["file"]] = row
        wall = time.perf_counter() - started
        ordered = [rows[job.rel] for job in jobs]
        summary = {"input_dir": str(input_location), "output_dir": str(output_location), "model": str(model),
                   "backend": backend, "ray": {"address": address or "local", "actors": n_actors, "per_actor": per_actor,
                                               "cluster_resources": {k: v for k, v in ray.cluster_resources().items()
                                                                     if k in ("CPU", "GPU", "memory")}},
                   "settings": settings, "batch": batch, "recursive": recursive, "resume": resume,
                   "n_images": len(jobs), "n_ok": sum(r["status"] == "ok" for r in ordered),
                   "n_failed": sum(r["status"] == "error" for r in ordered),
                   "n_skipped": sum(r["status"] == "skipped" for r in ordered), "n_processed": len(todo),
                   "wall_s": round(wall, 4), "images_per_s": round(len(todo) / wall, 3) if todo and wall > 0 else 0.0,
                   "files": ordered}
        summary["summary_json"] = f"{output_location}/{SUMMARY_STEM}.json".replace("\\", "/")
        summary["summary_csv"] = f"{output_location}/{SUMMARY_STEM}.csv".replace("\\", "/")
        with out_fs.open_output_stream(f"{out_root}/{SUMMARY_STEM}.json") as f:
            f.write(json.dumps(summary, indent=2, default=str).encode("utf-8"))
        with out_fs.open_output_stream(f"{out_root}/{SUMMARY_STEM}.csv") as f:
            f.write(rows_csv_text(ordered, ROW_FIELDS).encode("utf-8"))
        return summary


def _join_uri(base: str, rel: str) -> str:
    return base.rstrip("/") + "/" + rel
