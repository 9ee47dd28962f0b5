"""``effiseg-run --input DIR --ray [auto|ADDRESS]``: the folder job on Ray Data, on one machine or a cluster.

* ``--ray`` alone starts a local Ray (all of this machine's CPUs and GPUs); ``--ray auto`` joins the
  cluster this machine belongs to (``ray start`` / ``RAY_ADDRESS``); ``--ray ray://HEAD:10001`` (Ray
  Client) or ``--ray HEAD:6379`` joins that one. Every node needs effiseg with its backend installed.
* ``--input`` and ``--output`` are local folders or any URI pyarrow's file systems read (s3://BUCKET/DIR,
  gs://, hdfs://, file://; ``ray_store`` says what each guarantee rests on there); the driver lists the
  images, Ray Data hands them out in batches of ``--batch`` to a pool of actors (a callable class,
  ``SegmentBatch``), each of which opens one effiseg ``Segmenter`` once and keeps it: one actor per GPU
  (``num_gpus=1``) where the cluster has GPUs and the backend uses them, else one CPU actor per CPU (``cpus_per_actor`` in ``run_ray``); ``--ray-actors``
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
from urllib.parse import urlsplit

import numpy as np

from . import windows_names
from .folder import ROW_FIELDS, plan_jobs
from .folder_lock import OutputFolderLock
from .images import IMAGE_EXTENSIONS, encode_mask_png, natural_key, read_image, remove_stale_temp_files
from .postprocess import count_regions, output_to_mask
from .ray_store import RayJobError, Store, is_uri  # noqa: F401 (RayJobError, is_uri: this module's API)
from .rows_csv import write_summary_csv

SUMMARY_STEM = "effiseg_summary"
# Not effiseg_run_settings.json: a local run records its settings from the opened backends, which the
# driver does not open; one kind of run never takes the other's record for its own (it redoes the masks).
SETTINGS_NAME = "effiseg_ray_settings.json"
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"


def import_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as e:
        raise RayJobError(f'--ray needs Ray Data: pip install "effiseg[ray]" ({e})') from None
    return ray


def list_image_files(store: Store, recursive: bool) -> list[str]:
    """Paths relative to the store's root ("/" separators) of the image files under it, in effiseg-run's order."""
    import pyarrow.fs as pafs
    if store.fs.get_file_info(store.root).type != pafs.FileType.Directory:
        raise RayJobError(f"input folder not found: {store.location}")
    rels = [rel for rel in store.files(recursive) if PurePosixPath(rel).suffix.lower() in IMAGE_EXTENSIONS]
    return sorted(rels, key=natural_key)


def mask_is_complete(store: Store, rel: str) -> bool:
    """PNG signature and IEND trailer: what a finished mask looks like (read whole: masks are small)."""
    try:
        data = store.read(rel)
    except (OSError, FileNotFoundError):
        return False
    return len(data) >= len(_PNG_SIGNATURE) + len(_PNG_IEND) and data.startswith(_PNG_SIGNATURE) \
        and data.endswith(_PNG_IEND)


def trusted_on_resume(store: Store, rel: str, listed: dict, since_ns: int | None) -> bool:
    """A complete mask written after the settings record (a store without times: complete is enough)."""
    info = listed.get(rel)
    if info is None:
        return False
    newer = since_ns is None or info.mtime_ns is None or int(info.mtime_ns) > since_ns
    return newer and mask_is_complete(store, rel)


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

    def __init__(self, model: str, input: str, output: str, max_pixels: int, segmenter_options: dict,
                 regions: bool = False):
        from .images import allow_pixels
        from .segmenter import Segmenter
        self.segmenter = Segmenter.from_model(Path(model), **segmenter_options)
        self.input, self.output = Store(input), Store(output)
        self.max_pixels = max_pixels
        self.regions = regions
        allow_pixels(max_pixels)

    def _read(self, rel: str) -> np.ndarray:
        if self.input.local is not None:
            return read_image(self.input.local / rel, self.max_pixels)
        # Fetched to a local file so that decoding, and its errors, are a local run's own. Not named
        # after the key: Windows refuses a name with ':' or '?', or con.jpg (the suffix is an image's).
        with tempfile.TemporaryDirectory() as tmp:
            copy = Path(tmp) / ("image" + PurePosixPath(rel).suffix)
            copy.write_bytes(self.input.read(rel))
            return read_image(copy, self.max_pixels)

    def __call__(self, batch: dict) -> dict:
        seg = self.segmenter
        fmt, threshold = seg.info.output_format, seg.threshold
        jobs = list(zip(batch["file"], batch["mask"]))

        def load(job):
            rgb = self._read(job[0])
            return seg.prepare(rgb), rgb.shape[:2]

        def finish(job, size, output):
            h, w = size
            mask, max_prob = output_to_mask(output, fmt, threshold, h, w)
            self.output.put(job[1], encode_mask_png(mask))  # whole or not at all, on any store
            return {"file": job[0], "mask": job[1], "status": "ok", "width": w, "height": h,
                    "area_fraction": round(float(np.count_nonzero(mask)) / mask.size, 6),
                    "regions": count_regions(mask) if self.regions else None,
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
            regions: bool = False, progress: bool = False, log=None) -> dict:
    """Segment every image under ``input_location`` on Ray Data; returns the summary (also written as
    ``effiseg_summary.json``/``.csv`` in the output location)."""
    say = log or (lambda message: None)
    ray = import_ray()
    source = Store(input_location)
    if output_location is None:
        if source.local is None:
            raise RayJobError("with an input URI, name the output location with --output")
        from .folder import default_output_dir
        output_location = default_output_dir(source.local)
    out = Store(output_location)
    _refuse_output_inside_input(source, out, recursive)
    rels = list_image_files(source, recursive)
    jobs = plan_jobs(PurePosixPath("in"), PurePosixPath("out"), [PurePosixPath("in") / r for r in rels], False)
    try:
        if not out.object_store:  # an object store has no folders (pyarrow would add an empty marker object)
            out.fs.create_dir(out.root, recursive=True)
        listed = out.files() if resume else {}
    except OSError as e:  # a bucket that does not exist, no permission
        raise RayJobError(f"cannot write to {output_location}: {e}") from None

    # A local output folder: the same lock as a local run (two runs never write one folder), and the
    # temporary files a killed run left there are removed. An object store has neither: no temporary
    # objects (a PUT is whole), and no lock (pyarrow has no conditional PUT to take one with): run one
    # job per output location there.
    with (OutputFolderLock(out.local, say) if out.local is not None else contextlib.nullcontext()):
        if out.local is not None:
            stale = remove_stale_temp_files(out.local)
            if stale:
                say(f"removed {stale} temporary file(s) left by an interrupted run")
        settings = run_settings(Path(model), threshold, tta, input_size)
        if resume:
            try:
                before = json.loads(out.read(SETTINGS_NAME).decode("utf-8"))
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
        settings_since = out.mtime_ns(SETTINGS_NAME) if resume else None
        if not resume:
            try:
                out.put(SETTINGS_NAME, json.dumps(settings, indent=2).encode("utf-8"))
            except OSError as e:
                raise RayJobError(f"cannot write to {output_location}: {e}") from None
            if not out.tick_past(SETTINGS_NAME):
                say(f"note: the clock of {output_location} did not move past the settings record: "
                    "a --resume may redo some masks")

        rows: dict[str, dict] = {}
        todo = []
        for job in jobs:
            unwritable = _unwritable_mask_name(out, job.mask_rel)
            if unwritable:
                rows[job.rel] = _row(job.rel, job.mask_rel, "error", unwritable)
                continue
            if resume and trusted_on_resume(out, job.mask_rel, listed, settings_since):
                rows[job.rel] = _row(job.rel, job.mask_rel, "skipped")
                continue
            todo.append({"file": job.rel, "mask": job.mask_rel})
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
                fn_constructor_kwargs={"model": str(model), "input": source.location, "output": out.location,
                                       "max_pixels": max_pixels, "regions": regions,
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
        summary["summary_json"] = out.uri(f"{SUMMARY_STEM}.json")
        summary["summary_csv"] = write_summary_csv(  # first: the JSON then says whether it was written
            lambda text: out.put(f"{SUMMARY_STEM}.csv", text.encode("utf-8")), out.uri(f"{SUMMARY_STEM}.csv"),
            ordered, ROW_FIELDS, f"{SUMMARY_STEM}.json", say)
        out.put(f"{SUMMARY_STEM}.json", json.dumps(summary, indent=2, default=str).encode("utf-8"))
        return summary


def _unwritable_mask_name(out: Store, mask_rel: str) -> str | None:
    """Why the mask ``mask_rel``, named after an object key, cannot be written to ``out``, a local folder
    on Windows, or None. Checked there alone: elsewhere such names are valid (keys with ISO times, 10:30:00,
    are common). Left to Windows, each would fail with a bare [WinError 123], or lose a trailing dot and
    land on another image's mask."""
    if not (windows_names.ON_WINDOWS and out.local is not None):
        return None
    problem = windows_names.windows_name_problem(mask_rel)
    return None if problem is None else (f"the mask {mask_rel} cannot be written to a Windows folder: {problem}; "
                                         "rename the object, or write the masks to an object store")


def _refuse_output_inside_input(source: Store, out: Store, recursive: bool) -> None:
    if source.local is not None and out.local is not None:
        same, inside = source.local == out.local, source.local in out.local.parents
    elif source.local is None and out.local is None and source.fs.type_name == out.fs.type_name \
            and urlsplit(source.location).query == urlsplit(out.location).query:  # not two stores' endpoints
        same, inside = source.root == out.root, out.root.startswith(source.root + "/")
    else:
        return
    if same or (recursive and inside):
        raise RayJobError(f"the output location {out.location} may not be the input location (or inside it "
                          "with --recursive)")
