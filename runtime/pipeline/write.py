"""The writer pool: a computed output row -> the job's result (a mask file, for folder runs).

``writers`` threads run ``finish(job, meta, output)`` (resize to the image's size, threshold, count,
encode and write) and put the result on the run's results queue. Whoever hands rows over
(the device runners) blocks while ``2 * writers`` outputs are waiting, so slow disks push back too.
Room for a whole batch more was tried and measured worse (benchmarks/RESULTS.md, "The writers'
queue"): the small queue keeps the writers from crowding out the decoders of the next batch, and the
runner's wait on it overlaps a batch already on the device.
"""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from .run_state import POLL_S, RunState


class WriterPool:
    def __init__(self, finish: Callable, writers: int, run: RunState):
        self.finish = finish
        self.run = run
        self._room = threading.Semaphore(2 * writers)
        self._pool = ThreadPoolExecutor(writers, thread_name_prefix="effiseg-write")

    def put(self, job, meta, output) -> None:
        """Hand one output row to a writer, waiting while the writers' queue is full."""
        t0 = time.perf_counter()
        while not self._room.acquire(timeout=POLL_S):
            self.run.check_abort()
        self.run.stats.add(wait_for_writer_s=time.perf_counter() - t0)
        self._pool.submit(self._write, job, meta, output)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True)

    def _write(self, job, meta, output) -> None:
        run = self.run
        t0 = time.perf_counter()
        try:
            try:
                result = self.finish(job, meta, output)
            except Exception as e:
                result = run.fail(job, e, "write")
        except BaseException as e:
            # fail() itself broke, or an interrupt arrived in this thread: a writer-pool future would
            # swallow it and the job would vanish, so stop the run and re-raise it from run().
            run.stop(e)
            return
        finally:
            self._room.release()
            run.stats.add(write_s=time.perf_counter() - t0)
        run.results.put((job, result))
