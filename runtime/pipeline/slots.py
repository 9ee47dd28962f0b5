"""Host slots: the backends' host buffers, and which batch is where.

Each backend has ``n_slots`` host buffers (``backend.host_input(slot)``, pinned memory on GPU
backends) of ``max_batch`` rows. This module owns their circulation:

* the free list, shared by every backend: whichever device frees a slot first gets the next batch;
* the batch being filled: decoders claim its rows one by one, so batches have no holes (a failed
  decode claims none); a full batch is sealed and, once every claimed row is written, queued for
  its backend's runner (``ready``);
* which backends are given up (``lost``: their slots leave circulation) or have stopped, and the
  bookkeeping that lets a batch moved off a given-up backend still run at the end: runners that
  have not yet read their end-of-input marker, and moved batches not yet settled.

One condition lock guards all of it; the free and ready queues are thread-safe by themselves.
"""
from __future__ import annotations

import queue
import threading
from dataclasses import dataclass

import numpy as np

from .run_state import POLL_S, RunState

FILL_FAILED = object()  # the meta of a claimed row whose image could not be written into it


@dataclass
class Batch:
    backend_index: int
    slot: int
    rows: np.ndarray                      # the backend's host buffer for this slot
    entries: list                         # (job, meta) per claimed row
    claimed: int = 0
    done: int = 0
    sealed: bool = False
    moved: bool = False                   # copied here from a given-up backend (counted in moves_pending)


class HostSlots:
    def __init__(self, backends: list, run: RunState):
        self.backends = backends
        self.run = run
        self.free: queue.Queue = queue.Queue()
        for b_index, backend in enumerate(backends):
            for slot in range(backend.n_slots):
                self.free.put((b_index, slot))
        self.ready = [queue.Queue() for _ in backends]  # per backend: sealed batches; None ends its input
        self.cond = threading.Condition()
        self.lost: set[int] = set()              # given-up backends
        self.lost_reasons: dict[str, str] = {}   # device -> why it was given up
        self.stopped: set[int] = set()           # runners that take no batch any more
        # Moving a given-up backend's waiting batches: runners that have not yet read their
        # end-of-input marker (only they can still move a batch), and moved batches not yet settled.
        self.readers_left = len(backends)
        self.moves_pending = 0
        self._current: Batch | None = None
        self._fetching = False

    # -- filling (decoder threads) ------------------------------------------------------------
    def claim_row(self) -> tuple[Batch, int]:
        """A row of the batch being filled, starting a new batch on the next free slot when needed."""
        while True:
            with self.cond:
                while True:
                    self.run.check_abort()
                    cur = self._current
                    if cur is not None:
                        row = cur.claimed
                        cur.claimed += 1
                        if cur.claimed == len(cur.entries):
                            cur.sealed = True
                            self._current = None
                        return cur, row
                    if not self._fetching:
                        self._fetching = True
                        break
                    self.cond.wait(POLL_S)
            # Wait for a free slot without holding the lock: rows of a sealed batch must still be
            # able to report completion, or a single slot would deadlock.
            try:
                b_index, slot = self.run.get(self.free)
            except BaseException:
                with self.cond:
                    self._fetching = False
                    self.cond.notify_all()
                raise
            backend = self.backends[b_index]
            with self.cond:
                if b_index not in self.lost:  # a given-up backend's slot leaves circulation
                    self._current = Batch(b_index, slot, backend.host_input(slot), [None] * backend.max_batch)
                self._fetching = False
                self.cond.notify_all()

    def row_done(self, batch: Batch) -> None:
        with self.cond:
            batch.done += 1
            ready = batch.sealed and batch.done == batch.claimed
        if ready:
            self.ready[batch.backend_index].put(batch)

    def flush_partial(self) -> None:
        """After the last decoder: send the partly filled batch, or give its slot back."""
        with self.cond:
            cur, self._current = self._current, None
        if cur is None:
            return
        if cur.claimed == 0:
            self.free.put((cur.backend_index, cur.slot))
            return
        cur.sealed = True
        self.ready[cur.backend_index].put(cur)

    def end_of_input(self) -> None:
        for q in self.ready:
            q.put(None)

    # -- leaving circulation (runner threads) ---------------------------------------------------
    def give_back(self, batch: Batch) -> None:
        """The batch's outputs are copied out (or it failed): its slot may refill."""
        self.free.put((batch.backend_index, batch.slot))

    def fail_batch(self, batch: Batch, error: Exception, give_back: bool = True) -> None:
        for job, meta in batch.entries[:batch.claimed]:
            if meta is not FILL_FAILED:
                self.run.failed(job, error, "inference")
        if give_back:
            self.give_back(batch)
        if batch.moved:
            self.settle_move()

    def give_up(self, b_index: int, reason: str) -> tuple[bool, Batch | None]:
        """Give backend ``b_index`` up if another backend still runs: (given up, the batch being
        filled on its slot, sealed now and to be queued for it when every claimed row is in)."""
        sealed_now = None
        with self.cond:
            give_up = any(i != b_index and i not in self.lost for i in range(len(self.backends)))
            if give_up:
                self.lost.add(b_index)
                self.lost_reasons[self.backends[b_index].device] = reason
                # No more rows on its slot being filled: seal it; it is drained with the others
                # (now if every claimed row is in, else when the last one is, by row_done).
                cur = self._current
                if cur is not None and cur.backend_index == b_index:
                    self._current = None
                    cur.sealed = True
                    if cur.claimed and cur.done == cur.claimed:
                        sealed_now = cur
        return give_up, sealed_now

    # -- the end of input, with batches still moving ---------------------------------------------
    def end_read(self) -> None:
        """A runner read its end-of-input marker: every batch decoded onto its slots has reached it.
        (Batches moved to it may still come, and be moved on if it is given up.)"""
        with self.cond:
            self.readers_left -= 1
            self.cond.notify_all()

    def settle_move(self) -> None:
        """A moved batch was written, failed or moved on."""
        with self.cond:
            self.moves_pending -= 1
            self.cond.notify_all()

    def next_moved(self, b_index: int) -> Batch | None:
        """After the end-of-input marker: the next batch moved here from a given-up backend, or None
        once none can come: every runner has read its marker and no moved batch is unsettled (one
        could still fail its backend and be moved on, here)."""
        ready = self.ready[b_index]
        with self.cond:
            while True:
                self.run.check_abort()
                try:
                    return ready.get_nowait()
                except queue.Empty:
                    pass
                if self.readers_left == 0 and self.moves_pending == 0:
                    # Marked under the lock that made the decision, so that no move chooses this
                    # runner between here and the runner's finally (which marks it again).
                    self.stopped.add(b_index)
                    return None
                self.cond.wait(POLL_S)

    def mark_stopped(self, b_index: int) -> None:
        with self.cond:
            self.stopped.add(b_index)  # no batch may be moved here any more
