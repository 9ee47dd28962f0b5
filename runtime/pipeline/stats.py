"""``PipelineStats``: where a run's time went, summed over the threads of each stage.

``decode_s`` (reading + resizing), ``wait_for_slot_s`` (decoders blocked on a free slot: the device
is the bottleneck), ``infer_s`` (runner time inside submit/collect), ``runner_idle_s`` (runners
waiting for a batch: decoding is the bottleneck), ``write_s`` and ``wait_for_writer_s``. With
overlap, wall time is close to the largest of decode_s/workers, infer_s/devices and write_s/writers
rather than their sum. Two are not summed but spans of the run: ``fill_s`` (start to the first
submit: decoding the first batch, when no device works yet) and ``drain_s`` (the last collect to the
end: the last masks written, no device working any more). Every run pays them once, so they weigh on
short runs.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field


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
