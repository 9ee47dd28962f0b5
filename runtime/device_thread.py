"""A long-lived thread that makes one backend's device calls, run after run.

Why not a fresh thread per run: PyTorch keeps its cuDNN execution plans in a *thread-local* cache
(``aten/src/ATen/native/cudnn/Conv_v8.cpp``: "use thread local caches as cuDNN Execution Plans are
not guaranteed to be thread safe across all engines"). A thread that has never run a convolution
of a given shape builds the plan again (with ``cudnn.benchmark``, times every candidate again).
Eager PyTorch on a GPU therefore paid that search at the start of every ``run_folder`` or
``segment`` call when each run started its own runner thread: by the logged benchmark figures,
about 4 s per run on the H200 for the two-size default model (4-5.5 s for a first batch), about
2 s on the H100 for the flip-only model, whatever the number of images (benchmarks/RESULTS.md). CUDA-graph replay, ONNX
Runtime and TensorRT do not go through that cache, but gain nothing from a new thread either, so
every backend gets one device thread for the life of its ``Segmenter``.

A daemon thread, not a ``ThreadPoolExecutor``: the interpreter joins executor threads at exit, so
a device call that never returns (a hung GPU) would keep the process from exiting after Ctrl-C.
The thread holds nothing of a call once it is done (so a dropped Segmenter can be freed; its
finalizer closes the thread), and a forked child that uses the object starts a thread of its own.
"""
from __future__ import annotations

import os
import queue
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, Callable

_STOP = object()
_WAIT_STEP_S = 0.1  # waits go in steps: on Windows an untimed wait cannot be interrupted by Ctrl-C
CLOSE_WAIT_S = 5.0  # how long an owner's close() waits for a call still running (a hung device)


class DeviceThread:
    """``submit(fn, *args) -> Future``: runs calls one at a time, in order, on one thread that is
    started by the first call and lives until ``close()``."""

    def __init__(self, name: str):
        self.name = name
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._closed = False

    @property
    def thread(self) -> threading.Thread | None:
        """The thread once started (tests and diagnostics)."""
        return self._thread

    def submit(self, fn: Callable, *args: Any) -> Future:
        with self._lock:
            if self._closed:
                raise RuntimeError(f"{self.name} is closed: its Segmenter was closed, so it runs no more batches")
            if self._pid != os.getpid():
                # A forked child inherits this object but not its thread: start afresh there.
                self._calls, self._thread, self._pid = queue.SimpleQueue(), None, os.getpid()
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
                self._thread.start()
            future: Future = Future()
            self._calls.put((future, fn, args))
        return future

    def call(self, fn: Callable, *args: Any) -> Any:
        """``fn(*args)`` on this thread; waits for it in short steps, so Ctrl-C gets through."""
        future = self.submit(fn, *args)
        while True:
            try:
                return future.result(timeout=_WAIT_STEP_S)
            except FutureTimeout:
                continue

    def _loop(self) -> None:
        calls = self._calls
        while True:
            item = calls.get()
            if item is _STOP:
                return
            future, fn, args = item
            result = None
            if future.set_running_or_notify_cancel():
                try:
                    result = fn(*args)
                except BaseException as e:  # handed to whoever waits on the future, never lost here
                    future.set_exception(e)
                else:
                    future.set_result(result)
            # Drop the finished call before waiting for the next: held here, the last call (a
            # pipeline, and through it the Segmenter and its backends) could never be freed.
            item = future = fn = args = result = None

    def close(self, timeout: float | None = None) -> None:
        """Stop after the calls already submitted; waits up to ``timeout`` seconds (None: until they
        are done) for the thread to end, in short steps so that Ctrl-C gets through. Closing twice
        is harmless."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            thread = self._thread if self._pid == os.getpid() else None
            if thread is not None:
                self._calls.put(_STOP)
        if thread is None or thread is threading.current_thread():
            return
        deadline = None if timeout is None else time.monotonic() + timeout
        while thread.is_alive():
            step = _WAIT_STEP_S if deadline is None else min(_WAIT_STEP_S, deadline - time.monotonic())
            if step <= 0:
                return  # a call that does not return (a hung device): the daemon thread is left behind
            thread.join(step)
