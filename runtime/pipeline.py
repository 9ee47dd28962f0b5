"""The threaded pipeline every backend runs under: decode -> host slot -> device -> write.

Threads and what bounds them:

* ``workers`` decoder threads take the next job, decode and resize it (PIL releases the GIL), then
  claim a row of the slot being filled and copy the image straight into the backend's host buffer
  (``backend.host_input(slot)``, pinned memory on GPU backends). A failed decode claims no row, so
  batches have no holes. Decoders block while no slot is free: that is the back-pressure that
  keeps memory bounded whatever the number of files.
* One runner per backend (per device) submits full batches as soon as they are ready and
  keeps up to ``n_slots`` batches in flight, so with two or more slots the host fills one slot
  while the device copies and computes another. It copies each image's output row out of the
  slot, returns the slot to the shared free list and hands the rows to the writers. The runner
  runs on the backend's ``DeviceThread`` (``runner_threads``), the same thread run after run where
  the caller keeps them (``Segmenter`` does): PyTorch's cuDNN plans are cached per thread
  (``device_thread.py``).
* ``writers`` threads resize outputs to each image's size, threshold and write (``finish``). The
  runner blocks when ``2 * writers`` outputs are waiting, so slow disks also push back. Room for a
  whole batch more was tried and measured worse (benchmarks/RESULTS.md, "The writers' queue"): the
  small queue keeps the writers from crowding out the decoders of the next batch, and the runner's
  wait on it overlaps a batch already on the device.

A batch the backend fails on fails its images (per-file errors, the run goes on: one bad batch, e.g.
an out-of-memory at an odd size, should not cost the folder). ``max_failed_batches`` failures in a
row on one backend mean the backend or its device is gone. With other backends still running, it
is given up for the rest of the run (``lost``): its slots leave circulation, a batch it still
computes is written, the batches waiting on its slots (decoded, not yet submitted) are copied into
the others' free slots (split where their batches are smaller; moved on again if that backend is
given up too), and the others take the remaining work. So that a batch moved at the end still runs,
a runner that has read its end-of-input marker stops only once every runner has and no moved batch
is unsettled. The last backend standing stops the run with ``BackendLost`` instead of marking every
remaining file failed.

Several backends (devices=[0, 1]) share one free-slot queue: whichever device frees a slot first
gets the next batch. Results come back keyed by job, in completion order.

Timing (``PipelineStats``) is summed over threads: ``decode_s`` (reading + resizing),
``wait_for_slot_s`` (decoders blocked on a free slot: the device is the bottleneck),
``infer_s`` (runner time inside submit/collect), ``runner_idle_s`` (runners waiting for a batch:
decoding is the bottleneck), ``write_s`` and ``wait_for_writer_s``. With overlap, wall time is
close to the largest of decode_s/workers, infer_s/devices and write_s/writers rather than their sum.
Two are not summed but spans of the run: ``fill_s`` (start to the first submit: decoding the first
batch, when no device works yet) and ``drain_s`` (the last collect to the end: the last masks
written, no device working any more). Every run pays them once, so they weigh on short runs.
"""
from __future__ import annotations

import os
import queue
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from .backends.base import Backend
from .device_thread import DeviceThread

_POLL_S = 0.1  # how often blocked threads look at the abort flag
_FILL_FAILED = object()  # the meta of a claimed row whose image could not be written into it


def default_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


@dataclass
class PipelineStats:
    decode_s: float = 0.0
    wait_for_slot_s: float = 0.0
    infer_s: float = 0.0
    runner_idle_s: float = 0.0
    write_s: float = 0.0
    wait_for_writer_s: float = 0.0
    batches: int = 0
    images: int = 0
    wall_s: float = 0.0
    fill_s: float | None = None   # start -> first submit (None: nothing was submitted)
    drain_s: float | None = None  # last collect -> end
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _first_submit_at: float | None = field(default=None, repr=False)
    _last_collect_at: float | None = field(default=None, repr=False)

    def mark_submit(self, at: float) -> None:
        with self._lock:
            if self._first_submit_at is None or at < self._first_submit_at:
                self._first_submit_at = at

    def mark_collect(self, at: float) -> None:
        with self._lock:
            if self._last_collect_at is None or at > self._last_collect_at:
                self._last_collect_at = at

    def close_spans(self, started: float, ended: float) -> None:
        """Turn the marks into fill_s and drain_s once the run has ended."""
        self.wall_s = ended - started
        if self._first_submit_at is not None:
            self.fill_s = self._first_submit_at - started
        if self._last_collect_at is not None:
            self.drain_s = ended - self._last_collect_at

    def add(self, **amounts) -> None:
        with self._lock:
            for k, v in amounts.items():
                setattr(self, k, getattr(self, k) + v)

    def as_dict(self) -> dict:
        return {k: (round(v, 4) if isinstance(v, float) else v)
                for k, v in self.__dict__.items() if not k.startswith("_")}


@dataclass
class _Batch:
    backend_index: int
    slot: int
    rows: np.ndarray                      # the backend's host buffer for this slot
    entries: list                         # (job, meta) per claimed row
    claimed: int = 0
    done: int = 0
    sealed: bool = False
    moved: bool = False                   # copied here from a given-up backend (counted in _moves_pending)


class PipelineAborted(RuntimeError):
    pass


class BackendLost(RuntimeError):
    """A backend failed ``max_failed_batches`` batches in a row: it (or its device) is not coming back."""


class _GivenUp(Exception):
    """Raised in a runner whose backend is lost while other backends run on."""


class Pipeline:
    """Run ``jobs`` through ``backends``.

    ``load(job) -> (model_input_rgb, meta)`` decodes one job to the model's input size (raise to
    fail that job); ``fill(row, model_input_rgb)`` writes it into one host-buffer row;
    ``finish(job, meta, output_row) -> result`` post-processes one output; ``fail(job, exc, stage)
    -> result`` turns an exception into that job's result. ``run`` yields ``(job, result)``.
    ``runner_threads``: one ``DeviceThread`` per backend, kept by the caller from run to run; without
    them each run starts its own and closes them at its end.
    """

    def __init__(self, backends: list[Backend], load: Callable, fill: Callable, finish: Callable,
                 fail: Callable, workers: int | None = None, writers: int | None = None,
                 max_failed_batches: int = 3, runner_threads: list[DeviceThread] | None = None):
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

    # ------------------------------------------------------------------------------------------
    def run(self, jobs: Iterable[Any]) -> Iterator[tuple[Any, Any]]:
        self.stats = PipelineStats()
        self.lost = {}
        self._lost_indices: set[int] = set()
        self._jobs = iter(jobs)
        self._jobs_lock = threading.Lock()
        self._abort = threading.Event()
        self._fatal: list[BaseException] = []
        self._results: queue.Queue = queue.Queue()
        self._free: queue.Queue = queue.Queue()
        for b_index, backend in enumerate(self.backends):
            for slot in range(backend.n_slots):
                self._free.put((b_index, slot))
        self._ready = [queue.Queue() for _ in self.backends]
        # Moving a given-up backend's waiting batches: runners that have not yet read their
        # end-of-input marker (only they can still move a batch), and runners that have stopped.
        self._readers_left = len(self.backends)
        self._moves_pending = 0  # moved batches not yet written, failed or moved on
        self._stopped: set[int] = set()
        self._failed_in_a_row = [0] * len(self.backends)  # each touched by its own runner thread only
        self._cond = threading.Condition()
        self._current: _Batch | None = None
        self._fetching = False
        self._writer_room = threading.Semaphore(2 * self.writers)
        self._writer_pool = ThreadPoolExecutor(self.writers, thread_name_prefix="effiseg-write")
        end = object()
        self._end = end
        started = time.perf_counter()
        coordinator = threading.Thread(target=self._coordinate, name="effiseg-pipeline", daemon=True)
        coordinator.start()
        try:
            while True:
                # Waits with a timeout: on Windows an untimed lock wait cannot be interrupted, so
                # Ctrl-C would only land when the next result arrives (or never, if none does).
                try:
                    item = self._results.get(timeout=_POLL_S)
                except queue.Empty:
                    continue
                if item is end:
                    break
                self.stats.add(images=1)
                yield item
        finally:
            if coordinator.is_alive():
                self._abort.set()
            while coordinator.is_alive():
                coordinator.join(_POLL_S)
            self.stats.close_spans(started, time.perf_counter())
        if self._fatal:
            raise self._fatal[0]

    # ------------------------------------------------------------------------------------------
    def _coordinate(self) -> None:
        decoders = [threading.Thread(target=self._guard, args=(self._decode_loop,),
                                     name=f"effiseg-decode-{i}", daemon=True) for i in range(self.workers)]
        owned = self.runner_threads is None
        threads = ([DeviceThread(f"effiseg-run-{b.device}") for b in self.backends] if owned
                   else self.runner_threads)
        runners = []
        try:
            for t in decoders:
                t.start()
            for i, t in enumerate(threads):
                # _guard keeps every exception in _fatal, so these futures always end with a result.
                runners.append(t.submit(self._guard, self._runner_loop, i))
            for t in decoders:
                t.join()
            if not self._abort.is_set():
                self._flush_partial()
            for q in self._ready:
                q.put(None)
        except BaseException as e:  # e.g. a closed runner thread: stop everything, report it from run()
            self._fatal.append(e)
            self._abort.set()
            for t in decoders:
                if t.is_alive():
                    t.join()
        finally:
            for r in runners:
                r.result()
            if owned:
                for t in threads:
                    t.close()
            self._writer_pool.shutdown(wait=True)
            self._results.put(self._end)

    def _guard(self, target, *args) -> None:
        try:
            target(*args)
        except PipelineAborted:
            pass
        except BaseException as e:  # a bug or a dead device: stop everything and re-raise in run()
            self._fatal.append(e)
            self._abort.set()

    def _check_abort(self) -> None:
        if self._abort.is_set():
            raise PipelineAborted()

    # -- decoders ------------------------------------------------------------------------------
    def _next_job(self):
        with self._jobs_lock:
            return next(self._jobs, self._end)

    def _decode_loop(self) -> None:
        while True:
            self._check_abort()
            job = self._next_job()
            if job is self._end:
                return
            t0 = time.perf_counter()
            try:
                image, meta = self.load(job)
            except Exception as e:
                self.stats.add(decode_s=time.perf_counter() - t0)
                self._results.put((job, self.fail(job, e, "read")))
                continue
            t1 = time.perf_counter()
            batch, row = self._claim_row()
            t2 = time.perf_counter()
            try:
                self.fill(batch.rows[row], image)
            except Exception as e:
                # The row is claimed and will be computed; the marker tells the runner to skip it.
                batch.entries[row] = (job, _FILL_FAILED)
                self._results.put((job, self.fail(job, e, "prepare")))
                self._row_done(batch)
                continue
            batch.entries[row] = (job, meta)
            self.stats.add(decode_s=(t1 - t0) + (time.perf_counter() - t2), wait_for_slot_s=t2 - t1)
            self._row_done(batch)

    def _claim_row(self) -> tuple[_Batch, int]:
        while True:
            with self._cond:
                while True:
                    self._check_abort()
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
                    self._cond.wait(_POLL_S)
            # Wait for a free slot without holding the lock: rows of a sealed batch must still be
            # able to report completion, or a single slot would deadlock.
            try:
                b_index, slot = self._get(self._free)
            except BaseException:
                with self._cond:
                    self._fetching = False
                    self._cond.notify_all()
                raise
            backend = self.backends[b_index]
            with self._cond:
                if b_index not in self._lost_indices:  # a given-up backend's slot leaves circulation
                    self._current = _Batch(b_index, slot, backend.host_input(slot), [None] * backend.max_batch)
                self._fetching = False
                self._cond.notify_all()

    def _row_done(self, batch: _Batch) -> None:
        with self._cond:
            batch.done += 1
            ready = batch.sealed and batch.done == batch.claimed
        if ready:
            self._ready[batch.backend_index].put(batch)

    def _flush_partial(self) -> None:
        """After the last decoder: send the partly filled batch, or give its slot back."""
        with self._cond:
            cur, self._current = self._current, None
        if cur is None:
            return
        if cur.claimed == 0:
            self._free.put((cur.backend_index, cur.slot))
            return
        cur.sealed = True
        self._ready[cur.backend_index].put(cur)

    def _get(self, q: queue.Queue):
        while True:
            self._check_abort()
            try:
                return q.get(timeout=_POLL_S)
            except queue.Empty:
                continue

    # -- runners --------------------------------------------------------------------------------
    def _runner_loop(self, b_index: int) -> None:
        backend = self.backends[b_index]
        ready = self._ready[b_index]
        in_flight: deque[_Batch] = deque()
        nothing_ready = object()
        finished = False  # the end-of-input marker is read; only batches moved here can still come
        try:
            while True:
                self._check_abort()
                if not in_flight and finished:
                    # Waiting for the other runners, not for decoding: not counted as idle.
                    batch = self._next_moved(b_index)
                    if batch is None:
                        return  # nothing on the device, and no batch can be moved here any more
                elif not in_flight:
                    t0 = time.perf_counter()
                    batch = self._get(ready)
                    self.stats.add(runner_idle_s=time.perf_counter() - t0)
                else:
                    # Something is on the device: submit the next batch behind it if one is ready
                    # (its copies overlap the running compute), otherwise wait for the oldest.
                    try:
                        batch = ready.get_nowait()
                    except queue.Empty:
                        batch = nothing_ready
                if batch is None:
                    finished = True
                    self._end_read()
                elif batch is nothing_ready:
                    self._complete(backend, in_flight.popleft())
                else:
                    t0 = time.perf_counter()
                    self.stats.mark_submit(t0)
                    try:
                        backend.submit(batch.slot, batch.claimed)
                    except Exception as e:
                        self.stats.add(infer_s=time.perf_counter() - t0)
                        self._backend_failed(batch, e)
                        continue
                    self.stats.add(infer_s=time.perf_counter() - t0, batches=1)
                    in_flight.append(batch)
        except _GivenUp as given_up:
            self._drain(b_index, in_flight, given_up, finished)
        finally:
            with self._cond:
                self._stopped.add(b_index)  # no batch may be moved here any more
            # On abort, leave no batch pending on the backend so that it can be reused or closed.
            for batch in in_flight:
                try:
                    backend.collect(batch.slot)
                except Exception:
                    pass

    def _end_read(self) -> None:
        """A runner read its end-of-input marker: every batch decoded onto its slots has reached it.
        (Batches moved to it may still come, and be moved on if it is given up.)"""
        with self._cond:
            self._readers_left -= 1
            self._cond.notify_all()

    def _settle_move(self) -> None:
        """A moved batch was written, failed or moved on."""
        with self._cond:
            self._moves_pending -= 1
            self._cond.notify_all()

    def _next_moved(self, b_index: int) -> _Batch | None:
        """After the end-of-input marker: the next batch moved here from a given-up backend, or None
        once none can come: every runner has read its marker and no moved batch is unsettled (one
        could still fail its backend and be moved on, here)."""
        ready = self._ready[b_index]
        with self._cond:
            while True:
                self._check_abort()
                try:
                    return ready.get_nowait()
                except queue.Empty:
                    pass
                if self._readers_left == 0 and self._moves_pending == 0:
                    # Marked under the lock that made the decision, so that no move chooses this
                    # runner between here and the runner's finally (which marks it again).
                    self._stopped.add(b_index)
                    return None
                self._cond.wait(_POLL_S)

    def _drain(self, b_index: int, in_flight: deque, given_up: _GivenUp, finished: bool) -> None:
        """A given-up backend's runner until the end of the run, so that every job gets a result:
        a batch it had in flight is written if it still comes back, else failed; every batch that
        reaches its queue (decoded onto its slots, or moved to it before it was given up) moves to
        a backend that runs on, and fails only where none can take it. Its slots are never given back."""
        backend = self.backends[b_index]
        error = BackendLost(f"given up part-way: {given_up}")
        while in_flight:
            batch = in_flight.popleft()
            try:
                rows = self._collect_rows(backend, batch)
            except Exception:
                self._fail_batch(batch, error, give_back=False)
                continue
            self.stats.mark_collect(time.perf_counter())
            self._deliver(batch, rows)
        while True:
            batch = self._next_moved(b_index) if finished else self._get(self._ready[b_index])
            if batch is None:
                if finished:
                    return
                finished = True
                self._end_read()
                continue
            self._move(batch, error)

    def _move(self, batch: _Batch, error: Exception) -> None:
        """Copy a waiting batch's rows (host memory) into free slots of backends that run on, as many
        rows per slot as each takes, and queue them there. Rows that no running backend can take
        (none left, or none with this input layout) fail."""
        entries = batch.entries[:batch.claimed]
        unfit: set[int] = set()  # backends whose slots cannot hold these rows (another input layout)
        held: list[tuple[int, int]] = []  # their free slots, kept aside until this move is done
        start = 0
        while start < len(entries):
            self._check_abort()
            with self._cond:
                taken = self._lost_indices | self._stopped | unfit
                if len(taken) == len(self.backends):
                    break
            try:
                b_index, slot = self._free.get(timeout=_POLL_S)
            except queue.Empty:
                continue
            if b_index in self._lost_indices or b_index in self._stopped:
                continue  # a given-up or stopped backend's slot leaves circulation
            if b_index in unfit:
                held.append((b_index, slot))
                continue
            target = self.backends[b_index]
            k = min(len(entries) - start, target.max_batch)
            try:
                rows = target.host_input(slot)
                fits = rows.shape[1:] == batch.rows.shape[1:] and rows.dtype == batch.rows.dtype and len(rows) >= k
                if fits:
                    rows[:k] = batch.rows[start:start + k]
            except Exception:  # a buffer that cannot be read or written any more
                fits = False
            with self._cond:
                if b_index in self._lost_indices or b_index in self._stopped:
                    continue  # given up or stopped while the rows were copied: try another
                if not fits:
                    unfit.add(b_index)
                    held.append((b_index, slot))
                    continue
                chunk = entries[start:start + k] + [None] * (len(rows) - k)
                self._ready[b_index].put(_Batch(b_index, slot, rows, chunk, claimed=k, done=k, sealed=True,
                                                moved=True))
                self._moves_pending += 1
                self._cond.notify_all()
            start += k
        for free_slot in held:
            self._free.put(free_slot)
        if start < len(entries):
            rest = entries[start:]
            self._fail_batch(_Batch(batch.backend_index, batch.slot, batch.rows, rest, claimed=len(rest)), error,
                             give_back=False)
        if batch.moved:
            self._settle_move()

    @staticmethod
    def _collect_rows(backend: Backend, batch: _Batch) -> list[np.ndarray]:
        """Wait for ``batch`` and copy its outputs out of the slot, one array per claimed row."""
        out = backend.collect(batch.slot)
        return [np.array(out[i], copy=True) for i in range(batch.claimed)]

    def _complete(self, backend: Backend, batch: _Batch) -> None:
        t0 = time.perf_counter()
        try:
            rows = self._collect_rows(backend, batch)
        except Exception as e:
            self.stats.add(infer_s=time.perf_counter() - t0)
            self._backend_failed(batch, e)
            return
        collected = time.perf_counter()
        self.stats.add(infer_s=collected - t0)
        self.stats.mark_collect(collected)
        self._failed_in_a_row[batch.backend_index] = 0
        self._free.put((batch.backend_index, batch.slot))  # outputs copied: the slot may refill
        self._deliver(batch, rows)

    def _deliver(self, batch: _Batch, rows: list[np.ndarray]) -> None:
        """Hand a computed batch's outputs to the writers (rows already copied out of the slot)."""
        for (job, meta), output in zip(batch.entries[:batch.claimed], rows):
            if meta is _FILL_FAILED:
                continue  # already reported
            t1 = time.perf_counter()
            while not self._writer_room.acquire(timeout=_POLL_S):
                self._check_abort()
            self.stats.add(wait_for_writer_s=time.perf_counter() - t1)
            self._writer_pool.submit(self._write, job, meta, output)
        if batch.moved:
            self._settle_move()

    def _backend_failed(self, batch: _Batch, error: Exception) -> None:
        """Fail the batch's images; after ``max_failed_batches`` in a row, give the backend up
        while others run, else stop the run."""
        b = batch.backend_index
        backend = self.backends[b]
        failure = error
        if len(self.backends) > 1:  # each failed file says which device failed it
            failure = RuntimeError(f"on {backend.device}: {type(error).__name__}: {error}")
            failure.__cause__ = error
        self._failed_in_a_row[b] += 1
        if self._failed_in_a_row[b] < self.max_failed_batches:
            self._fail_batch(batch, failure)
            return
        reason = (f"{backend.name} on {backend.device} failed {self._failed_in_a_row[b]} batches in a row "
                  f"(last: {type(error).__name__}: {error})")
        sealed_now = None
        with self._cond:
            give_up = any(i != b and i not in self._lost_indices for i in range(len(self.backends)))
            if give_up:
                self._lost_indices.add(b)
                self.lost[backend.device] = reason
                # No more rows on its slot being filled: seal it; it is drained with the others
                # (now if every claimed row is in, else when the last one is, by _row_done).
                cur = self._current
                if cur is not None and cur.backend_index == b:
                    self._current = None
                    cur.sealed = True
                    if cur.claimed and cur.done == cur.claimed:
                        sealed_now = cur
        self._fail_batch(batch, failure, give_back=not give_up)
        if give_up:
            if sealed_now is not None:
                self._ready[b].put(sealed_now)
            raise _GivenUp(reason)
        earlier = "".join(f"; given up earlier: {device}: {why}" for device, why in self.lost.items())
        raise BackendLost(reason + earlier)

    def _fail_batch(self, batch: _Batch, error: Exception, give_back: bool = True) -> None:
        for job, meta in batch.entries[:batch.claimed]:
            if meta is not _FILL_FAILED:
                self._results.put((job, self.fail(job, error, "inference")))
        if give_back:
            self._free.put((batch.backend_index, batch.slot))
        if batch.moved:
            self._settle_move()

    def _write(self, job, meta, output) -> None:
        t0 = time.perf_counter()
        try:
            try:
                result = self.finish(job, meta, output)
            except Exception as e:
                result = self.fail(job, e, "write")
        except BaseException as e:
            # fail() itself broke, or an interrupt arrived in this thread: a writer-pool future would
            # swallow it and the job would vanish, so stop the run and re-raise it from run().
            self._fatal.append(e)
            self._abort.set()
            return
        finally:
            self._writer_room.release()
            self.stats.add(write_s=time.perf_counter() - t0)
        self._results.put((job, result))
