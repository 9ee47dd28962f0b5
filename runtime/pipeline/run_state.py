"""What every stage of one pipeline run shares: the abort flag, the fatal error that stops the run,
the queue of finished jobs' results, the timing, and the caller's ``fail`` that turns an exception
into a job's result.

Every blocking wait in the pipeline goes through :meth:`RunState.get` or polls :meth:`check_abort`
every ``POLL_S``: on Windows an untimed lock wait cannot be interrupted, so Ctrl-C (or a fatal error
in another thread) would otherwise land only when the wait ends, or never.
"""
from __future__ import annotations

import queue
import threading
from typing import Callable

from .stats import PipelineStats

POLL_S = 0.1  # how often blocked threads look at the abort flag


class PipelineAborted(RuntimeError):
    pass


class RunState:
    def __init__(self, fail: Callable):
        self.fail = fail
        self.stats = PipelineStats()
        self.abort = threading.Event()
        self.fatal: list[BaseException] = []
        self.results: queue.Queue = queue.Queue()  # lists of (job, result): a writer's chunk, or one failure

    def check_abort(self) -> None:
        if self.abort.is_set():
            raise PipelineAborted()

    def stop(self, error: BaseException) -> None:
        """A bug, a dead device or an interrupt: stop every stage; ``Pipeline.run`` re-raises it."""
        self.fatal.append(error)
        self.abort.set()

    def guard(self, target, *args) -> None:
        """Run a stage's loop; whatever escapes it stops the run (and is re-raised by run())."""
        try:
            target(*args)
        except PipelineAborted:
            pass
        except BaseException as e:
            self.stop(e)

    def get(self, q: queue.Queue):
        """The next item of ``q``, waiting as long as the run is not aborted."""
        while True:
            self.check_abort()
            try:
                return q.get(timeout=POLL_S)
            except queue.Empty:
                continue

    def failed(self, job, error: BaseException, stage: str) -> None:
        self.results.put([(job, self.fail(job, error, stage))])
