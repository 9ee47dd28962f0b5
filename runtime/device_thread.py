"""A long-lived thread that makes one backend's device calls, run after run.

Why not a fresh thread per run: PyTorch keeps its cuDNN execution plans in a *thread-local* cache
(``aten/src/ATen/native/cudnn/Conv_v8.cpp``: "use thread local caches as cuDNN Execution Plans are
not guaranteed to be thread safe across all engines"). A thread that has never run a convolution
of a given shape builds the plan again (with ``cudnn.benchmark``, times every candidate again).
Eager PyTorch on a GPU therefore paid that search at the start of every ``run_folder`` or
``segment`` call when each run started its own runner thread: on the H200 about 4 s per run for
the two-size default model (5.5 s for the very first batch), on the H100 about 2 s for the
flip-only model, whatever the number of images (benchmarks/RESULTS.md). CUDA-graph replay, ONNX
Runtime and TensorRT do not go through that cache, but gain nothing from a new thread either, so
every backend gets one device thread for the life of its ``Segmenter``.

A daemon thread, not a ``ThreadPoolExecutor``: the interpreter joins executor threads at exit, so
a device call that never returns (a hung GPU) would keep the process from exiting after Ctrl-C.
"""
from __future__ import annotations

import queue
import threading
from concurrent.futures import Future
from typing import Any, Callable

_STOP = object()


class DeviceThread:
    """``submit(fn, *args) -> Future``: runs calls one at a time, in order, on one thread that is
    started by the first call and lives until ``close()``."""

    def __init__(self, name: str):
        self.name = name
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._closed = False

    @property
    def ident(self) -> int | None:
        """The thread's identifier once started (tests and diagnostics)."""
        return self._thread.ident if self._thread is not None else None

    def submit(self, fn: Callable, *args: Any) -> Future:
        with self._lock:
            if self._closed:
                raise RuntimeError(f"{self.name} is closed: its Segmenter was closed, so it runs no more batches")
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
                self._thread.start()
            future: Future = Future()
            self._calls.put((future, fn, args))
        return future

    def _loop(self) -> None:
        while True:
            item = self._calls.get()
            if item is _STOP:
                return
            future, fn, args = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                result = fn(*args)
            except BaseException as e:  # handed to whoever waits on the future, never lost here
                future.set_exception(e)
            else:
                future.set_result(result)

    def close(self, timeout: float | None = None) -> None:
        """Stop after the calls already submitted; waits up to ``timeout`` seconds (None: until they
        are done) for the thread to end. Closing twice is harmless."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            thread = self._thread
            if thread is not None:
                self._calls.put(_STOP)
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
