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

``Backend.submit``/``collect`` check the call and convert the output once, for every backend (as
Polygraphy's runners check state in ``infer`` and call the ``infer_impl`` each runner writes); a
backend writes ``_submit``/``_collect``, so a new engine cannot forget a check or hand out fp16.
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
_AS_DOCUMENTED = frozenset("fB")  # dtype.char of float32 and uint8: handed out as they are


class BackendUnavailable(RuntimeError):
    """The backend cannot run here; the message says what to install (which extra) or why."""


class Backend(abc.ABC):
    """One inference engine on one device, fed through ``n_slots`` double-buffering slots.

    The public ``submit``/``collect`` are written here, once: they check the call (slot range,
    batch size, a batch still in flight, collect without submit, a closed backend), keep the
    slot's bookkeeping and hand the caller the documented dtype (float32, or uint8 for masks;
    an fp16 or bool output is converted here). A backend writes only what differs between
    engines: ``host_input``, ``_submit``, ``_collect`` and, for resources, ``_close``
    (runtime/README.md, "The backend contract").

    Args:
        info (ModelInfo): the model the backend runs (input size and format, output format).
        device (str): "cpu", "cuda:0", ...
        precision (str): the precision actually used ("fp32", "fp16", "bf16", "int8"); a backend
            that falls back sets it to what runs, never just the one asked for.
        max_batch (int): the most images one ``submit`` takes (>= 1).
        n_slots (int): how many batches may be in flight at once (>= 1).

    Raises:
        ValueError: ``max_batch`` or ``n_slots`` below 1.
    """

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
        self._in_flight: list[int | None] = [None] * n_slots   # images submitted on each slot, not yet collected
        self._float_out: list[np.ndarray | None] = [None] * n_slots  # float32 targets for other output types
        self._closed = False

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
        """The host buffer of ``slot`` that the decoder fills.

        Args:
            slot (int): 0 .. n_slots - 1.

        Returns:
            np.ndarray: (max_batch, H, W, 3) uint8, or (max_batch, 3, H, W) float32 for a
            float32-nchw model; the first ``n`` rows are what ``submit(slot, n)`` runs.
        """

    def submit(self, slot: int, n: int) -> None:
        """Start inference on the first ``n`` images of ``slot``'s host buffer (may return at once).

        Args:
            slot (int): 0 .. n_slots - 1; its previous batch must have been collected.
            n (int): images in the batch, 1 .. max_batch.

        Raises:
            RuntimeError: the backend is closed, or ``slot`` still has a batch in flight.
            IndexError: ``slot`` out of range.
            ValueError: ``n`` outside 1 .. max_batch.
        """
        # The checks inline, their messages in the helpers: this runs once per batch.
        if self._closed or not 0 <= slot < self.n_slots:
            self._check_slot(slot)
        if not 1 <= n <= self.max_batch or self._in_flight[slot] is not None:
            self._check_submit(slot, n, self._in_flight[slot] is not None)
        self._submit(slot, n)
        self._in_flight[slot] = n   # only once the batch is on its way: a failed start leaves the slot free

    def collect(self, slot: int) -> np.ndarray:
        """Wait for ``slot``'s batch and return its output.

        Args:
            slot (int): a slot given to ``submit`` and not collected since.

        Returns:
            np.ndarray: shape (n, H, W); float32 (logits or probabilities, see ``info.output_format``)
            or uint8 for mask outputs. A view of the slot's buffers, valid until the next ``submit``
            on ``slot``: copy it to keep it.

        Raises:
            RuntimeError: the backend is closed, or nothing was submitted on ``slot``.
            IndexError: ``slot`` out of range.
        """
        if self._closed or not 0 <= slot < self.n_slots:
            self._check_slot(slot)
        n = self._in_flight[slot]
        if n is None:
            raise RuntimeError(f"collect({slot}) without a submitted batch")
        self._in_flight[slot] = None  # collected, even if waiting fails: the batch is gone either way
        return self._documented_dtype(slot, self._collect(slot, n))

    def _submit(self, slot: int, n: int) -> None:
        """Start the batch (the checks are done). What every backend writes."""
        raise NotImplementedError(f"{type(self).__name__} must write _submit(slot, n)")

    def _collect(self, slot: int, n: int) -> np.ndarray:
        """Wait for the batch of ``n`` images on ``slot`` and return its (n, H, W) output in the
        engine's own dtype (the caller converts fp16 and bool). What every backend writes."""
        raise NotImplementedError(f"{type(self).__name__} must write _collect(slot, n)")

    def _check_slot(self, slot: int) -> None:
        if self._closed:
            raise RuntimeError(f"the {self.name} backend is closed")
        if not 0 <= slot < self.n_slots:
            raise IndexError(f"slot {slot} out of range (n_slots={self.n_slots})")

    def _check_submit(self, slot: int, n: int, in_flight: bool) -> None:
        """The argument checks of ``submit`` (also for a backend that writes its own ``submit``)."""
        if not 1 <= n <= self.max_batch:
            raise ValueError(f"batch of {n} images; this backend takes 1..{self.max_batch}")
        if in_flight:
            raise RuntimeError(f"slot {slot} still has a batch in flight; collect() it first")

    def _documented_dtype(self, slot: int, out: np.ndarray) -> np.ndarray:
        """float32 and uint8 pass as they are; bool masks are viewed as uint8; any other type (an fp16
        output of the probabilities export or of an fp16 engine) is converted into a float32 buffer
        the slot keeps, so no batch allocates."""
        kind = out.dtype.char
        if kind in _AS_DOCUMENTED:
            return out
        if kind == "?":  # bool
            return out.view(np.uint8)
        target = self._float_out[slot]
        if target is None or target.shape[1:] != out.shape[1:] or len(target) < len(out):
            target = self._float_out[slot] = np.empty((max(self.max_batch, len(out)),) + out.shape[1:], np.float32)
        np.copyto(target[:len(out)], out, casting="unsafe")
        return target[:len(out)]

    # -- convenience ------------------------------------------------------------------------
    def infer(self, batch: np.ndarray) -> np.ndarray:
        """Synchronous inference of any number of images (split into max_batch chunks).

        Args:
            batch (np.ndarray): images shaped like ``host_input`` rows, any count.

        Returns:
            np.ndarray: (len(batch), H, W), a new array (not a view of the slot buffers).

        Example:
            >>> with OnnxRuntimeBackend(ModelInfo.from_onnx(path), path) as backend:  # doctest: +SKIP
            ...     logits = backend.infer(images)   # (N, 352, 352, 3) uint8 -> (N, 352, 352) float32
        """
        outs = []
        for start in range(0, len(batch), self.max_batch):
            chunk = batch[start:start + self.max_batch]
            buf = self.host_input(0)
            buf[: len(chunk)] = chunk
            self.submit(0, len(chunk))
            outs.append(np.array(self.collect(0), copy=True))
        return np.concatenate(outs, axis=0) if outs else np.empty((0,), np.float32)

    def close(self) -> None:
        """Free the backend's device, memory and sessions; a second call does nothing. Afterwards
        ``submit``/``collect`` raise RuntimeError."""
        if self._closed:
            return
        self._closed = True
        self._close()

    def _close(self) -> None:
        """Free what the backend holds (called once, by ``close``); nothing by default."""

    def describe(self) -> dict:
        """What runs: backend, device, precision, batch, slots and the decisions in ``messages``
        (run summaries and ``effiseg-run --verbose`` print it); backends add their own keys."""
        return {"backend": self.name, "device": self.device, "precision": self.precision,
                "max_batch": self.max_batch, "slots": self.n_slots, "messages": list(self.messages)}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
