"""The decoder pool: image file -> a row of a host slot.

``workers`` threads take the next job, decode and resize it (``load``: JPEG by simplejpeg, other
formats by Pillow; both release the GIL while they decode), then claim a row of the slot being filled
and write the image straight into the backend's host buffer (``fill``). A failed decode claims no row,
so batches have no holes. Decoders block while no slot is free: that back-pressure keeps memory
bounded whatever the number of files.
"""
from __future__ import annotations

import threading
import time
from typing import Any, Callable, Iterable

from .run_state import RunState
from .slots import FILL_FAILED, HostSlots

_END = object()


class DecoderPool:
    def __init__(self, jobs: Iterable[Any], load: Callable, fill: Callable, workers: int, slots: HostSlots,
                 run: RunState):
        self._jobs = iter(jobs)
        self._jobs_lock = threading.Lock()
        self.load, self.fill = load, fill
        self.slots, self.run = slots, run
        self.threads = [threading.Thread(target=run.guard, args=(self._decode_loop,), name=f"effiseg-decode-{i}",
                                         daemon=True) for i in range(workers)]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def join(self, only_alive: bool = False) -> None:
        for t in self.threads:
            if not only_alive or t.is_alive():
                t.join()

    def _next_job(self):
        with self._jobs_lock:
            return next(self._jobs, _END)

    def _decode_loop(self) -> None:
        run, slots = self.run, self.slots
        # Summed here and added to the run's stats once, at the end: a lock per image is a GIL hand-over.
        decode_s = wait_s = 0.0
        try:
            while True:
                run.check_abort()
                job = self._next_job()
                if job is _END:
                    return
                t0 = time.perf_counter()
                try:
                    image, meta = self.load(job)
                except Exception as e:
                    decode_s += time.perf_counter() - t0
                    run.failed(job, e, "read")
                    continue
                t1 = time.perf_counter()
                batch, row = slots.claim_row()
                t2 = time.perf_counter()
                try:
                    self.fill(batch.rows[row], image)
                except Exception as e:
                    # The row is claimed and will be computed; the marker tells the runner to skip it.
                    batch.entries[row] = (job, FILL_FAILED)
                    run.failed(job, e, "prepare")
                    slots.row_done(batch)
                    continue
                batch.entries[row] = (job, meta)
                decode_s += (t1 - t0) + (time.perf_counter() - t2)
                wait_s += t2 - t1
                slots.row_done(batch)
        finally:
            run.stats.add(decode_s=decode_s, wait_for_slot_s=wait_s)
