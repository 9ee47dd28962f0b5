"""The writer pool: computed output rows -> the jobs' results (mask files, for folder runs).

``writers`` plain threads drain one queue of *chunks*: the device runner hands over a whole
collected batch at once (``put_batch``), split into one chunk per writer, and each writer runs
``finish(job, meta, output)`` (resize to the image's size, threshold, count, encode and write) over
its chunk and puts the chunk's results on the run's results queue as one list. Handing batches
rather than single images is what this module is for: every hand-off between threads is a lock
wait and a GIL hand-over, and per image (a future, a semaphore, a results-queue wake-up each) they
cost more CPU than the PNG encode (benchmarks/results/host-pipeline-2026-12-08/round2/).

Back-pressure: the runner blocks while ``writers`` chunks are waiting (one batch, with the chunks
being written), so slow disks push back on the device and the decoders. Whatever was handed over is
written even when the run is aborted (the coordinator ends the pool with ``shutdown``), as the
executor this replaces did.
"""
from __future__ import annotations

import queue
import threading
import time
from typing import Callable

from .run_state import POLL_S, RunState

_STOP = object()  # one per writer thread, from shutdown()


class WriterPool:
    def __init__(self, finish: Callable, writers: int, run: RunState):
        self.finish = finish
        self.run = run
        self.writers = writers
        self._room = threading.Semaphore(writers)  # chunks that may wait for a writer
        self._chunks: queue.SimpleQueue = queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._loop, name=f"effiseg-write-{i}", daemon=True)
                         for i in range(writers)]
        for t in self._threads:
            t.start()

    def put_batch(self, items: list) -> None:
        """Hand ``items`` ((job, meta, output) each) to the writers, one chunk per writer, waiting
        while the writers' queue is full."""
        if not items:
            return
        size = -(-len(items) // self.writers)
        for start in range(0, len(items), size):
            t0 = time.perf_counter()
            while not self._room.acquire(timeout=POLL_S):
                self.run.check_abort()
            self.run.stats.add(wait_for_writer_s=time.perf_counter() - t0)
            self._chunks.put(items[start:start + size])

    def shutdown(self) -> None:
        """Write what was handed over, then end the threads."""
        for _ in self._threads:
            self._chunks.put(_STOP)
        for t in self._threads:
            t.join()

    def _loop(self) -> None:
        chunks, run, finish = self._chunks, self.run, self.finish
        while True:
            # A timed wait, not for the abort flag (what was handed over is written) but so that
            # the thread never sits in an untimed lock wait (Windows cannot interrupt one).
            try:
                chunk = chunks.get(timeout=POLL_S)
            except queue.Empty:
                continue
            if chunk is _STOP:
                return
            t0 = time.perf_counter()
            results = []
            try:
                for job, meta, output in chunk:
                    try:
                        result = finish(job, meta, output)
                    except Exception as e:
                        result = run.fail(job, e, "write")
                    results.append((job, result))
            except BaseException as e:
                # fail() itself broke, or an interrupt arrived in this thread: stop the run and
                # re-raise it from run(); what this chunk finished is still reported.
                run.stop(e)
                return
            finally:
                self._room.release()
                run.stats.add(write_s=time.perf_counter() - t0)
                if results:
                    run.results.put(results)
