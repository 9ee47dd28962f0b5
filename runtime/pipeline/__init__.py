"""The pipeline every backend runs under, by stage of the data flow:

    image file --(decode.py: DecoderPool)--> row of a host slot (slots.py: HostSlots)
               --(device_runner.py: DeviceRunner, one per backend)--> output rows
               --(write.py: WriterPool)--> the job's result (a mask file)

``Pipeline`` wires the stages for one run and yields ``(job, result)`` in completion order;
``run_state.py`` holds what the stages share (abort flag, fatal error, results, timing), ``move.py``
moves batches off a backend that is given up. Each module's opening comment says what it owns.

Several backends (devices=[0, 1]) share one free-slot queue: whichever device frees a slot first
gets the next batch.

Threads, not processes, by measurement: on the 2-core EPYC the GIL-free codecs (simplejpeg, zlib,
file I/O) in threads beat worker processes with shared-memory buffers
(benchmarks/results/host-pipeline-2026-12-08/workers_ab.json; runtime/README.md, "Host pipeline").

Timing (``PipelineStats``, stats.py) is summed over threads; ``Pipeline.timing()`` adds how far the
stages overlapped.
"""
from __future__ import annotations

import os
import queue
import threading
import time
from typing import Any, Callable, Iterable, Iterator

from ..backends.base import Backend
from ..device_thread import DeviceThread
from .decode import DecoderPool
from .device_runner import BackendLost, DeviceRunner
from .run_state import POLL_S, PipelineAborted, RunState
from .slots import HostSlots
from .stats import PipelineStats
from .write import WriterPool

__all__ = ["Pipeline", "PipelineStats", "PipelineAborted", "BackendLost", "default_workers"]

_END = object()  # the last item of a run's results queue


def default_workers() -> int:
    """Decoder (and writer) threads: one per two cores, at least 1 and at most 8. The stages still
    hand the GIL to each other, so k decoders + k writers + the device runner want 2k+1 cores: on the
    2-core EPYC, 1 + 1 threads reached a 1.41x higher pipeline ceiling than 2 + 2 (915 against 647
    images/s, median of 5 rounds; benchmarks/RESULTS.md)."""
    return max(1, min(8, (os.cpu_count() or 1) // 2))


class Pipeline:
    """Run ``jobs`` through ``backends``.

    ``load(job) -> (model_input_rgb, meta)`` decodes one job to the model's input size (raise to
    fail that job); ``fill(row, model_input_rgb)`` writes it into one host-buffer row;
    ``finish(job, meta, output_row) -> result`` post-processes one output; ``fail(job, exc, stage)
    -> result`` turns an exception into that job's result. ``run`` yields ``(job, result)`` (``run_batches``: lists of them).
    ``condense(outputs, metas) -> rows`` (optional) makes what the writers get of a collected batch
    (``outputs``: the claimed rows, still in the slot; ``metas``: their metas, None for a row whose
    fill failed), on the runner's thread before the slot is reused; without it, a copy of each row.
    ``workers``: decoder threads; ``writers``: writer threads (default: as many as workers).
    ``runner_threads``: one ``DeviceThread`` per backend, kept by the caller from run to run; without
    them each run starts its own and closes them at its end.
    """

    def __init__(self, backends: list[Backend], load: Callable, fill: Callable, finish: Callable,
                 fail: Callable, workers: int | None = None, writers: int | None = None,
                 max_failed_batches: int = 3, runner_threads: list[DeviceThread] | None = None,
                 condense: Callable | None = None):
        if not backends:
            raise ValueError("the pipeline needs at least one backend")
        if max_failed_batches < 1:
            raise ValueError("max_failed_batches must be >= 1")
        if runner_threads is not None and len(runner_threads) != len(backends):
            raise ValueError(f"one runner thread per backend: {len(runner_threads)} for {len(backends)} backend(s)")
        self.runner_threads = runner_threads
        self.backends = backends
        self.max_failed_batches = max_failed_batches
        self.load, self.fill, self.finish, self.fail = load, fill, finish, fail
        self.condense = condense
        self.workers = max(1, workers or default_workers())
        self.writers = max(1, writers or self.workers)
        self.stats = PipelineStats()
        self.lost: dict[str, str] = {}  # device -> why it was given up (last run)

    def timing(self) -> dict:
        """The stats plus two derived figures for checking overlap: ``serial_estimate_s`` is the
        time the stages would take one after another (each stage's summed time divided by its
        thread count), ``overlap_factor`` = serial_estimate_s / wall_s; above 1 the stages ran
        concurrently (decoding the next batch while the device ran this one)."""
        d = self.stats.as_dict()
        serial = (self.stats.decode_s / self.workers + self.stats.infer_s / len(self.backends)
                  + self.stats.write_s / self.writers)
        d["serial_estimate_s"] = round(serial, 4)
        d["overlap_factor"] = round(serial / self.stats.wall_s, 3) if self.stats.wall_s > 0 else None
        d.update(workers=self.workers, writers=self.writers, devices=len(self.backends))
        return d

    def run(self, jobs: Iterable[Any]) -> Iterator[tuple[Any, Any]]:
        for results in self.run_batches(jobs):
            yield from results

    def run_batches(self, jobs: Iterable[Any]) -> Iterator[list[tuple[Any, Any]]]:
        """``run``, yielding the results as they arrive together: a list of ``(job, result)`` per
        writer's chunk (or per failure), so that a caller recording them (a journal) can flush once
        per list instead of once per image."""
        run = RunState(self.fail)
        self.stats = run.stats
        slots = HostSlots(self.backends, run)
        self.lost = slots.lost_reasons
        writers = WriterPool(self.finish, self.writers, run)
        decoders = DecoderPool(jobs, self.load, self.fill, self.workers, slots, run)
        runners = [DeviceRunner(i, b, slots, writers, run, self.max_failed_batches, self.condense)
                   for i, b in enumerate(self.backends)]
        started = time.perf_counter()
        coordinator = threading.Thread(target=self._coordinate, args=(run, slots, decoders, runners, writers),
                                       name="effiseg-pipeline", daemon=True)
        coordinator.start()
        try:
            while True:
                # Waits with a timeout: on Windows an untimed lock wait cannot be interrupted, so
                # Ctrl-C would only land when the next result arrives (or never, if none does).
                try:
                    results = run.results.get(timeout=POLL_S)
                except queue.Empty:
                    continue
                if results is _END:
                    break
                run.stats.add(images=len(results))
                yield results
        finally:
            if coordinator.is_alive():
                run.abort.set()
            while coordinator.is_alive():
                coordinator.join(POLL_S)
            run.stats.close_spans(started, time.perf_counter())
        if run.fatal:
            raise run.fatal[0]

    def _coordinate(self, run: RunState, slots: HostSlots, decoders: DecoderPool, runners: list[DeviceRunner],
                    writers: WriterPool) -> None:
        """Start the stages, end the input once every decoder is done, and end the run's results
        once every runner and writer is."""
        owned = self.runner_threads is None
        threads = ([DeviceThread(f"effiseg-run-{b.device}") for b in self.backends] if owned
                   else self.runner_threads)
        futures = []
        try:
            decoders.start()
            for runner, t in zip(runners, threads):
                # guard keeps every exception in run.fatal, so these futures always end with a result.
                futures.append(t.submit(run.guard, runner.loop))
            decoders.join()
            if not run.abort.is_set():
                slots.flush_partial()
            slots.end_of_input()
        except BaseException as e:  # e.g. a closed runner thread: stop everything, report it from run()
            run.stop(e)
            decoders.join(only_alive=True)
        finally:
            for f in futures:
                f.result()
            if owned:
                for t in threads:
                    t.close()
            writers.shutdown()
            run.results.put(_END)
