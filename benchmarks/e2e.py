"""End-to-end measurement: a folder of image files -> mask files, through the runtime's own
``Segmenter.run_folder`` (decoder threads, double-buffered backend slots, writer threads).

The Segmenter wraps the very backend instance the model-only measurement of the same
configuration uses, so ``e2e images/s / model-only images/s`` isolates the pipeline's cost
(reading, decoding, resizing, host preparation, resizing back, thresholding, PNG writing and
whatever of it does not overlap with inference). Each sample is one complete run over the folder;
the run's per-stage timing (``PipelineStats``) is kept per sample, which is the profile that says
where end-to-end time goes when the pipeline falls short of the model.
"""
from __future__ import annotations

import time
from pathlib import Path

from effiseg.runtime.device_thread import CLOSE_WAIT_S

from .runner import Measurement


MAX_NAMED = 5  # failed files named in a result's error; the count says how many more
# Warm-up runs over the warm-up folder, whatever --warmup says (which counts batches): the backend
# is already built and warm, so two runs start the threads and codecs (and build whatever the
# segmenter's device thread caches, such as PyTorch's cuDNN plans); ten (the GPU default) took minutes
# on the H200, where the eager baseline then ran end to end at about 130 ms per image.
E2E_WARMUP_RUNS = 2


def failed_files(summary: dict) -> str:
    """"file: reason; ..." for the files a folder run failed on, each named whole (not cut at a
    character count, which could leave a reason without its file); the copies in the benchmark's
    folder keep their source's name after a running number (``imagesets``)."""
    failed = [r for r in summary["files"] if r["error"]]
    text = "; ".join(f"{r['file']}: {r['error']}" for r in failed[:MAX_NAMED])
    return text + (f"; and {len(failed) - MAX_NAMED} more" if len(failed) > MAX_NAMED else "")


def describe_pipeline_timing(timing: dict | None) -> str | None:
    """One line from a run's ``PipelineStats`` timing: wall time, then each stage's time summed over
    its threads (decoders, the runner(s), writers), so a stage that takes the wall time shows."""
    if not timing or not timing.get("wall_s"):
        return None
    parts = [f"{label} {timing[key]:.3f} s" for key, label in (
        ("decode_s", "decode"), ("wait_for_slot_s", "decoders waiting for a slot"),
        ("infer_s", "runner in submit/collect"), ("runner_idle_s", "runner waiting for a batch"),
        ("write_s", "write")) if timing.get(key) is not None]
    threads = f"{timing.get('workers', '?')} decoder(s), {timing.get('writers', '?')} writer(s)"
    return f"pipeline, last warm-up run ({threads}): wall {timing['wall_s']:.3f} s; " + ", ".join(parts)


class EndToEnd(Measurement):
    def __init__(self, config, pool, images_dir: Path, warmup_dir: Path, output_root: Path,
                 workers: int | None = None, writers: int | None = None):
        super().__init__(config, pool)
        self.images_dir = Path(images_dir)
        self.warmup_dir = Path(warmup_dir)
        self.output_dir = Path(output_root) / config.key.replace("|", "_").replace(":", "-")
        self.workers, self.writers = workers, writers
        self.segmenter = None
        self.n_images = 0
        self.extra["pipeline_timing"] = []

    def open(self, warmup: int) -> list[float]:
        from effiseg.runtime.images import list_images
        from effiseg.runtime.segmenter import Segmenter
        self.built = self.pool.get(self.config)
        if self.built.error:
            raise RuntimeError(self.built.error)
        self.n_images = len(list_images(self.images_dir))
        if self.n_images == 0:
            raise RuntimeError(f"no images in {self.images_dir}")
        # The segmenter borrows the pool's backend: it is closed by the pool, never by close() here.
        self.segmenter = Segmenter([self.backend], workers=self.workers, writers=self.writers)
        self.extra.update({"images": self.n_images, "workers": self.segmenter.workers,
                           "writers": self.segmenter.writers, "slots": self.backend.n_slots})
        warm = []
        for _ in range(max(1, min(warmup, E2E_WARMUP_RUNS))):
            # A short run over a few images: threads, PIL codecs and the backend's slots warm up.
            t0 = time.perf_counter()
            summary = self.segmenter.run_folder(self.warmup_dir, self.output_dir.with_name(self.output_dir.name + "_warmup"))
            n = summary["n_ok"]
            if summary["n_failed"]:
                raise RuntimeError(f"warm-up run failed on {summary['n_failed']} image(s): {failed_files(summary)}")
            warm.append((time.perf_counter() - t0) * 1000.0 * self.config.batch_size / max(1, n))
            self.extra["warmup_pipeline_timing"] = dict(summary.get("timing") or {})
        return warm

    def warm_note(self) -> str | None:
        """Where the last warm-up run's time went, so that a log cut short before the first round
        still says which stage a slow end-to-end figure comes from."""
        return describe_pipeline_timing(self.extra.get("warmup_pipeline_timing"))

    def sample(self) -> tuple[float, float]:
        t0 = time.perf_counter()
        summary = self.segmenter.run_folder(self.images_dir, self.output_dir)
        wall = time.perf_counter() - t0
        if summary["n_ok"] != self.n_images:
            raise RuntimeError(f"{summary['n_ok']} of {self.n_images} images segmented: {failed_files(summary)}")
        timing = dict(summary.get("timing") or {})
        timing["bench_wall_s"] = round(wall, 4)
        self.extra["pipeline_timing"].append(timing)
        return 0.0, wall * 1000.0 * self.config.batch_size / self.n_images

    def close(self) -> None:
        if self.segmenter is not None:
            # Its device thread ends here; the backend is the pool's to close.
            for t in self.segmenter.runner_threads:
                t.close(timeout=CLOSE_WAIT_S)
        self.segmenter = None
