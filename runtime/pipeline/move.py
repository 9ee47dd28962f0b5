"""Moving batches off a given-up backend: the rows of a batch that waits on its slot (decoded, not
yet submitted) are copied, in host memory, into free slots of backends that run on.

A batch is split where the others' batches are smaller, and moved on again if the backend it was
moved to is given up too. Rows that no running backend can take (none left, or none whose host
buffers have this input layout) fail with the given-up backend's error.
"""
from __future__ import annotations

import queue

from .run_state import POLL_S
from .slots import Batch, HostSlots


def move_batch(slots: HostSlots, batch: Batch, error: Exception) -> None:
    """Copy ``batch``'s claimed rows into free slots of backends that run on, as many rows per slot
    as each takes, and queue them there; fail the rows none can take."""
    backends, run = slots.backends, slots.run
    entries = batch.entries[:batch.claimed]
    unfit: set[int] = set()  # backends whose slots cannot hold these rows (another input layout)
    held: list[tuple[int, int]] = []  # their free slots, kept aside until this move is done
    start = 0
    while start < len(entries):
        run.check_abort()
        with slots.cond:
            taken = slots.lost | slots.stopped | unfit
            if len(taken) == len(backends):
                break
        try:
            b_index, slot = slots.free.get(timeout=POLL_S)
        except queue.Empty:
            continue
        if b_index in slots.lost or b_index in slots.stopped:
            continue  # a given-up or stopped backend's slot leaves circulation
        if b_index in unfit:
            held.append((b_index, slot))
            continue
        target = backends[b_index]
        k = min(len(entries) - start, target.max_batch)
        try:
            rows = target.host_input(slot)
            fits = rows.shape[1:] == batch.rows.shape[1:] and rows.dtype == batch.rows.dtype and len(rows) >= k
            if fits:
                rows[:k] = batch.rows[start:start + k]
        except Exception:  # a buffer that cannot be read or written any more
            fits = False
        with slots.cond:
            if b_index in slots.lost or b_index in slots.stopped:
                continue  # given up or stopped while the rows were copied: try another
            if not fits:
                unfit.add(b_index)
                held.append((b_index, slot))
                continue
            chunk = entries[start:start + k] + [None] * (len(rows) - k)
            slots.ready[b_index].put(Batch(b_index, slot, rows, chunk, claimed=k, done=k, sealed=True, moved=True))
            slots.moves_pending += 1
            slots.cond.notify_all()
        start += k
    for free_slot in held:
        slots.free.put(free_slot)
    if start < len(entries):
        rest = entries[start:]
        slots.fail_batch(Batch(batch.backend_index, batch.slot, batch.rows, rest, claimed=len(rest)), error,
                         give_back=False)
    if batch.moved:
        slots.settle_move()
