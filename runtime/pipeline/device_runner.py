"""The device runner: a host slot -> the backend (submit, collect) -> output rows for the writers.

One runner per backend (per device), on that backend's ``DeviceThread``. It submits full batches as
soon as they are ready and keeps up to ``n_slots`` batches in flight, so with two or more slots the
host fills one slot while the device copies and computes another. It copies each image's output row
out of the slot (or what ``condense`` makes of the batch: masks cut at once, postprocess.cut_batch),
returns the slot to the shared free list and hands the rows to the writer pool.

A batch the backend fails on fails its images (per-file errors, the run goes on: one bad batch, e.g.
an out-of-memory at an odd size, should not cost the folder). ``max_failed_batches`` failures in a
row mean the backend or its device is gone. With other backends still running, it is given up for
the rest of the run: its slots leave circulation, a batch it still computes is written, the batches
waiting on its slots move to the others (``move.py``), and the others take the remaining work. So
that a batch moved at the end still runs, a runner that has read its end-of-input marker stops only
once every runner has and no moved batch is unsettled. The last backend standing stops the run with
``BackendLost`` instead of marking every remaining file failed.
"""
from __future__ import annotations

import queue
import time
from collections import deque

import numpy as np

from ..backends.base import Backend
from .move import move_batch
from .run_state import RunState
from .slots import FILL_FAILED, Batch, HostSlots
from .write import WriterPool


class BackendLost(RuntimeError):
    """A backend failed ``max_failed_batches`` batches in a row: it (or its device) is not coming back."""


class _GivenUp(Exception):
    """Raised in a runner whose backend is lost while other backends run on."""


_NOTHING_READY = object()


class DeviceRunner:
    def __init__(self, b_index: int, backend: Backend, slots: HostSlots, writers: WriterPool, run: RunState,
                 max_failed_batches: int, condense=None):
        self.b_index, self.backend = b_index, backend
        self.condense = condense
        self.slots, self.writers, self.run = slots, writers, run
        self.max_failed_batches = max_failed_batches
        self.failed_in_a_row = 0

    def loop(self) -> None:
        """Until the end of input (and of batches moved here): submit, collect, hand over."""
        run, slots, backend = self.run, self.slots, self.backend
        ready = slots.ready[self.b_index]
        in_flight: deque[Batch] = deque()
        finished = False  # the end-of-input marker is read; only batches moved here can still come
        try:
            while True:
                run.check_abort()
                if not in_flight and finished:
                    # Waiting for the other runners, not for decoding: not counted as idle.
                    batch = slots.next_moved(self.b_index)
                    if batch is None:
                        return  # nothing on the device, and no batch can be moved here any more
                elif not in_flight:
                    t0 = time.perf_counter()
                    batch = run.get(ready)
                    run.stats.add(runner_idle_s=time.perf_counter() - t0)
                else:
                    # Something is on the device: submit the next batch behind it if one is ready
                    # (its copies overlap the running compute), otherwise wait for the oldest.
                    try:
                        batch = ready.get_nowait()
                    except queue.Empty:
                        batch = _NOTHING_READY
                if batch is None:
                    finished = True
                    slots.end_read()
                elif batch is _NOTHING_READY:
                    self._complete(in_flight.popleft())
                else:
                    t0 = time.perf_counter()
                    run.stats.mark_submit(t0)
                    try:
                        backend.submit(batch.slot, batch.claimed)
                    except Exception as e:
                        run.stats.add(infer_s=time.perf_counter() - t0)
                        self._failed(batch, e)
                        continue
                    run.stats.add(infer_s=time.perf_counter() - t0, batches=1)
                    in_flight.append(batch)
        except _GivenUp as given_up:
            self._drain(in_flight, given_up, finished)
        finally:
            slots.mark_stopped(self.b_index)
            # On abort, leave no batch pending on the backend so that it can be reused or closed.
            for batch in in_flight:
                try:
                    backend.collect(batch.slot)
                except Exception:
                    pass

    def _collect_rows(self, batch: Batch) -> list:
        """Wait for ``batch`` and copy its outputs out of the slot, one per claimed row: what
        ``condense(outputs, metas)`` makes of them (e.g. masks cut for the whole batch at once), else
        a copy of each row's output."""
        out = self.backend.collect(batch.slot)
        if self.condense is not None:
            metas = [None if meta is FILL_FAILED else meta for _, meta in batch.entries[:batch.claimed]]
            try:
                return self.condense(out[:batch.claimed], metas)
            except Exception:
                pass  # the backend did its part: each writer's finish handles (or reports) its own row
        return [np.array(out[i], copy=True) for i in range(batch.claimed)]

    def _complete(self, batch: Batch) -> None:
        run = self.run
        t0 = time.perf_counter()
        try:
            rows = self._collect_rows(batch)
        except Exception as e:
            run.stats.add(infer_s=time.perf_counter() - t0)
            self._failed(batch, e)
            return
        collected = time.perf_counter()
        run.stats.add(infer_s=collected - t0)
        run.stats.mark_collect(collected)
        self.failed_in_a_row = 0
        self.slots.give_back(batch)  # outputs copied: the slot may refill
        self._deliver(batch, rows)

    def _deliver(self, batch: Batch, rows: list[np.ndarray]) -> None:
        """Hand a computed batch's outputs to the writers (rows already copied out of the slot)."""
        self.writers.put_batch([(job, meta, output) for (job, meta), output in zip(batch.entries[:batch.claimed], rows)
                                if meta is not FILL_FAILED])  # a row that failed its fill is already reported
        if batch.moved:
            self.slots.settle_move()

    def _failed(self, batch: Batch, error: Exception) -> None:
        """Fail the batch's images; after ``max_failed_batches`` in a row, give the backend up
        while others run, else stop the run."""
        slots, backend = self.slots, self.backend
        failure = error
        if len(slots.backends) > 1:  # each failed file says which device failed it
            failure = RuntimeError(f"on {backend.device}: {type(error).__name__}: {error}")
            failure.__cause__ = error
        self.failed_in_a_row += 1
        if self.failed_in_a_row < self.max_failed_batches:
            slots.fail_batch(batch, failure)
            return
        reason = (f"{backend.name} on {backend.device} failed {self.failed_in_a_row} batches in a row "
                  f"(last: {type(error).__name__}: {error})")
        give_up, sealed_now = slots.give_up(self.b_index, reason)
        slots.fail_batch(batch, failure, give_back=not give_up)
        if give_up:
            if sealed_now is not None:
                slots.ready[self.b_index].put(sealed_now)
            raise _GivenUp(reason)
        earlier = "".join(f"; given up earlier: {device}: {why}" for device, why in slots.lost_reasons.items())
        raise BackendLost(reason + earlier)

    def _drain(self, in_flight: deque, given_up: _GivenUp, finished: bool) -> None:
        """A given-up backend's runner until the end of the run, so that every job gets a result:
        a batch it had in flight is written if it still comes back, else failed; every batch that
        reaches its queue (decoded onto its slots, or moved to it before it was given up) moves to
        a backend that runs on, and fails only where none can take it. Its slots are never given back."""
        slots, run = self.slots, self.run
        error = BackendLost(f"given up part-way: {given_up}")
        while in_flight:
            batch = in_flight.popleft()
            try:
                rows = self._collect_rows(batch)
            except Exception:
                slots.fail_batch(batch, error, give_back=False)
                continue
            run.stats.mark_collect(time.perf_counter())
            self._deliver(batch, rows)
        while True:
            batch = slots.next_moved(self.b_index) if finished else run.get(slots.ready[self.b_index])
            if batch is None:
                if finished:
                    return
                finished = True
                slots.end_read()
                continue
            move_batch(slots, batch, error)
