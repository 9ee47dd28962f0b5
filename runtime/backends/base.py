"""The backend interface every inference engine implements (TensorRT, ONNX Runtime, PyTorch).

The pipeline (``effiseg.runtime.pipeline``) owns threads and files; a backend owns a device, its
memory and its streams. Double buffering is expressed with *slots*: each slot has its own host
input buffer (pinned on GPU backends), device buffers, stream and event, so that while slot A's
batch is copied/run/copied back, the decoder threads fill slot B's host buffer.

Life of a batch on slot ``s``:
    buf = backend.host_input(s)        # (max_batch, H, W, 3) uint8, or float32 NCHW for float models
    ... decoder threads write images into buf[:n] ...
    backend.submit(s, n)               # async: H2D copy, inference, D2H copy, event record
    out = backend.collect(s)           # blocks on the slot's event; (n, H, W) float32 view of the
                                       # model output, valid until the next submit on slot s
"""
from __future__ import annotations

import abc
import logging

import numpy as np

from ..model_info import ModelInfo


# The LogRecord attribute that marks a backend's decision (``Backend.note``); its value names the
# backend and device ("tensorrt [cuda:0]"). A front end prints these as they happen and then does not
# print them again from ``Backend.messages`` (runtime/console.py).
BACKEND_MESSAGE = "effiseg_backend"
log = logging.getLogger(__name__)


class BackendUnavailable(RuntimeError):
    """The backend cannot run here; the message says what to install (which extra) or why."""


class Backend(abc.ABC):
    name: str = "base"

    def __init__(self, info: ModelInfo, device: str, precision: str, max_batch: int, n_slots: int = 2):
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        if n_slots < 1:
            raise ValueError("n_slots must be >= 1")
        self.info = info
        self.device = device          # "cpu", "cuda:0", ...
        self.precision = precision    # the precision actually used ("fp32"/"fp16"), never just the one asked for
        self.max_batch = max_batch
        self.n_slots = n_slots
        self.messages: list[str] = []  # decisions worth telling the user (fallbacks, chosen providers)

    @property
    def label(self) -> str:
        return f"{self.name} [{self.device}]"

    def note(self, message: str, warning: bool = False) -> None:
        """A decision worth telling the user: kept in ``messages`` (``describe()``, run summaries) and
        logged as it happens (a TensorRT engine build can take minutes; its notes must not wait)."""
        self.messages.append(message)
        log.log(logging.WARNING if warning else logging.INFO, "%s", message, extra={BACKEND_MESSAGE: self.label})

    # -- double-buffered API -------------------------------------------------------------
    @abc.abstractmethod
    def host_input(self, slot: int) -> np.ndarray:
        """The host buffer of ``slot`` that the decoder fills (first axis: max_batch)."""

    @abc.abstractmethod
    def submit(self, slot: int, n: int) -> None:
        """Start inference on the first ``n`` images of ``slot``'s host buffer (may return at once)."""

    @abc.abstractmethod
    def collect(self, slot: int) -> np.ndarray:
        """Wait for ``slot``'s batch and return its output, shape (n, H, W), float32 (logits or
        probabilities, see ``info.output_format``) or uint8 for mask outputs."""

    def _check_submit(self, slot: int, n: int, in_flight: bool) -> None:
        """The argument checks every backend's ``submit`` starts with."""
        if not 1 <= n <= self.max_batch:
            raise ValueError(f"batch of {n} images; this backend takes 1..{self.max_batch}")
        if in_flight:
            raise RuntimeError(f"slot {slot} still has a batch in flight; collect() it first")

    # -- convenience ------------------------------------------------------------------------
    def infer(self, batch: np.ndarray) -> np.ndarray:
        """Synchronous inference of any number of images (split into max_batch chunks)."""
        outs = []
        for start in range(0, len(batch), self.max_batch):
            chunk = batch[start:start + self.max_batch]
            buf = self.host_input(0)
            buf[: len(chunk)] = chunk
            self.submit(0, len(chunk))
            outs.append(np.array(self.collect(0), copy=True))
        return np.concatenate(outs, axis=0) if outs else np.empty((0,), np.float32)

    def close(self) -> None:
        pass

    def describe(self) -> dict:
        return {"backend": self.name, "device": self.device, "precision": self.precision,
                "max_batch": self.max_batch, "slots": self.n_slots, "messages": list(self.messages)}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
