"""Test-time augmentation chosen at run time (``--tta none|flip|multiscale``) for ONNX backends.

The bundled model is the plain network; the TTA setting chosen on validation is a recommendation in
its metadata (``ModelInfo.tta_recommended``), not part of the graph. ``TTABackend`` runs the extra
passes through ordinary backends, so TensorRT, ONNX Runtime CPU and CUDA all get them unchanged:

* flips: the batch of n images and its horizontal, vertical and double flips go to the device as
  one batch of 4n uint8 images; the 4 logit maps per image are flipped back and averaged.
* sizes (multi-scale): one inner backend per size, each a plain backend of the same ONNX file at
  that size (a graph exported with ``--dynamic-hw-x32`` runs at every multiple of 32; TensorRT
  builds one engine per size, its profile pinned there). The images are resized bilinearly to the
  size on the host, their logits resized back and averaged over the sizes. All sizes are submitted
  before any is collected, so on a GPU they run back to back.

The arithmetic is training/tta.py's (the code evaluation and the torch backend run): per size, the
flips' mean; logits resized back with half-pixel bilinear interpolation (PyTorch's
``align_corners=False``); the sizes' mean. One difference: here the resized input is rounded to
uint8 (the graph's input type) where PyTorch resizes the normalised float image. The network is
sensitive to that rounding: on Kvasir-SEG test images the 416 pass's logits move by up to ~1.3
(mean 0.05), the 8-pass average by up to ~0.5, and about 0.1% of mask pixels flip at the cut;
runtime/README.md gives the test Dice of both.
"""
from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image

from .backends.base import Backend
from .model_info import ModelInfo, describe_tta

TTA_CHOICES = ("none", "flip", "multiscale")


@dataclasses.dataclass(frozen=True)
class TTAPlan:
    """What a run computes per image: ``flips`` (4 passes per size) at ``sizes`` (squares; () =
    the input size only), and the threshold the recommendation pairs with it (None: none given)."""
    choice: str
    flips: bool = False
    sizes: tuple[int, ...] = ()
    threshold: float | None = None

    @property
    def extra_passes(self) -> bool:
        return self.flips or bool(self.sizes)

    def describe(self) -> str:
        return f"--tta {self.choice}: {describe_tta(self.flips, self.sizes)}"


def plan_tta(choice: str, info: ModelInfo) -> TTAPlan:
    """The run-time TTA of ``choice`` for a model; ValueError when the model cannot serve it, saying why.

    ``multiscale`` is the setting chosen on validation (``info.tta_recommended``: its sizes, and its
    flips when it has them: 352+416 with flips, 8 passes, for the default model)."""
    if choice not in TTA_CHOICES:
        raise ValueError(f"--tta must be one of {', '.join(TTA_CHOICES)}, not {choice!r}")
    if choice == "none":
        return TTAPlan("none")
    where = f"{info.path}" if info.path else "this model"
    if info.tta or info.tta_sizes:
        raise ValueError(f"{where} has TTA in its graph ({describe_tta(info.tta, info.tta_sizes)}); --tta {choice} "
                         "needs the plain network: export it without --tta/--tta-sizes")
    if info.input_format != "uint8-nhwc":
        raise ValueError(f"{where} takes {info.input_format}; --tta {choice} flips and resizes uint8 images: "
                         "export it with --input-format uint8-nhwc")
    if info.output_format != "logits":
        raise ValueError(f"{where} outputs {info.output_format}; --tta {choice} averages logits: export it with "
                         "--output-format logits")
    recommended = info.tta_recommended or {}
    if choice == "flip":
        return TTAPlan("flip", flips=True, threshold=recommended.get("threshold"))
    sizes = tuple(recommended.get("sizes") or ())
    if not sizes:
        raise ValueError(f"{where} records no multi-scale sizes chosen on validation (metadata "
                         "effiseg.tta_recommended); --tta flip is available")
    return TTAPlan("multiscale", flips=bool(recommended.get("flips")), sizes=sizes,
                   threshold=recommended.get("threshold"))


def check_sizes_runnable(plan: TTAPlan, info: ModelInfo) -> None:
    """ValueError unless the graph runs at every size of the plan at the model's own input size."""
    if not plan.sizes:
        return
    where = f"{info.path}" if info.path else "this model"
    native = (info.input_height, info.input_width)
    other = [s for s in plan.sizes if (s, s) != native]
    if other and not info.dynamic_hw:
        raise ValueError(f"{where} has a fixed input size {native[0]}x{native[1]}; --tta multiscale runs it at "
                         f"{'+'.join(map(str, plan.sizes))}: export with --dynamic-hw-x32")
    bad = [s for s in other if s % max(1, info.hw_multiple)]
    if bad:
        raise ValueError(f"{where} runs only at multiples of {info.hw_multiple}, not {bad}")


def bilinear_weights(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(low index, high index, weight of high) per output position: half-pixel bilinear
    interpolation without antialiasing, PyTorch's ``F.interpolate(mode="bilinear",
    align_corners=False)`` (source positions below 0 clamp to 0)."""
    scale = np.float32(n_in / n_out)
    src = (np.arange(n_out, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)
    src = np.maximum(src, np.float32(0.0))
    low = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    high = np.minimum(low + 1, n_in - 1)
    return low, high, (src - low).astype(np.float32)


def resize_bilinear(a: np.ndarray, height: int, width: int) -> np.ndarray:
    """(N, H, W) or (N, H, W, C) resized on axes 1 and 2 to ``height`` x ``width``, float32."""
    a = a.astype(np.float32, copy=False)
    lo, hi, w = bilinear_weights(a.shape[1], height)
    shape = (1, -1) + (1,) * (a.ndim - 2)
    a = a[:, lo] * (1 - w).reshape(shape) + a[:, hi] * w.reshape(shape)
    lo, hi, w = bilinear_weights(a.shape[2], width)
    shape = (1, 1, -1) + (1,) * (a.ndim - 3)
    return a[:, :, lo] * (1 - w).reshape(shape) + a[:, :, hi] * w.reshape(shape)


def resize_uint8(images: np.ndarray, height: int, width: int, out: np.ndarray) -> None:
    """(n, h, w, 3) uint8 images resized bilinearly into ``out`` (n, height, width, 3), rounded.
    Enlarging, PIL's bilinear filter is this interpolation (its triangle spans one input pixel, the
    weights renormalised at the border as PyTorch's clamp does) and 10x faster than numpy here;
    shrinking, PIL would antialias, so numpy computes it."""
    if height >= images.shape[1] and width >= images.shape[2]:
        for row, image in zip(out, images):
            row[...] = np.asarray(Image.fromarray(image).resize((width, height), Image.BILINEAR))
        return
    out[...] = np.clip(np.rint(resize_bilinear(images, height, width)), 0, 255)


def flip_mean(logits: np.ndarray, n: int) -> np.ndarray:
    """Mean of the 4n logit maps of a flip batch (original, horizontal, vertical, both), each
    flipped back: training/tta.py's order of summation."""
    acc = logits[:n] + logits[n:2 * n][:, :, ::-1]
    acc = acc + logits[2 * n:3 * n][:, ::-1]
    acc = acc + logits[3 * n:4 * n][:, ::-1, ::-1]
    return acc / np.float32(4.0)


class TTABackend(Backend):
    """A backend that runs ``plan``'s passes through inner backends, one per size (same device).

    The pipeline sees an ordinary backend of the model's input size returning (n, H, W) float32
    logits; ``Backend`` checks its calls, the inner backends check theirs.

    Args:
        plan (TTAPlan): the flips and sizes to run (``plan_tta``).
        info (ModelInfo): the model's metadata at its own size.
        inner (dict): {size: backend}, each opened at that square size (the model's own size keyed
            by None when the plan has no sizes) with ``max_batch`` x 4 when the plan has flips.
        max_batch (int): the most images per batch, before the flips.
        n_slots (int): batches in flight (the inner backends' slots are used one to one).

    Raises:
        ValueError: an inner backend takes fewer than ``max_batch`` x 4 images (with flips).
    """

    name = "tta"

    def __init__(self, plan: TTAPlan, info: ModelInfo, inner: dict, max_batch: int, n_slots: int):
        first = next(iter(inner.values()))
        super().__init__(dataclasses.replace(info, tta=plan.flips, tta_sizes=plan.sizes), first.device,
                         first.precision, max_batch, n_slots)
        self.name = first.name  # what runs the passes: tensorrt, onnxruntime
        self.plan = plan
        self.inner = inner
        self.factor = 4 if plan.flips else 1
        self.height, self.width = info.input_height, info.input_width
        for backend in inner.values():
            if backend.max_batch < max_batch * self.factor:
                raise ValueError(f"an inner backend takes {backend.max_batch} images; TTA needs "
                                 f"{max_batch * self.factor}")
        own = inner[None] if None in inner else inner.get(self.height) if self.height == self.width else None
        # The decoder threads write straight into the rows of the model-size backend where there is
        # one (its flips are written after them), so the original images are never copied.
        self._own_input = own
        self._host = ([own.host_input(s)[:max_batch] for s in range(n_slots)] if own is not None else
                      [np.zeros((max_batch, self.height, self.width, 3), np.uint8) for _ in range(n_slots)])
        self._out = [np.zeros((max_batch, self.height, self.width), np.float32) for _ in range(n_slots)]
        self.messages = [m for b in inner.values() for m in b.messages]
        self.messages.append(plan.describe())

    def host_input(self, slot: int) -> np.ndarray:
        return self._host[slot]

    def _submit(self, slot: int, n: int) -> None:
        src = self._host[slot][:n]
        for size, backend in self.inner.items():
            buf = backend.host_input(slot)
            if backend is not self._own_input:
                resize_uint8(src, size, size, buf[:n])
            if self.factor == 4:
                first = buf[:n]
                buf[n:2 * n] = first[:, :, ::-1]
                buf[2 * n:3 * n] = first[:, ::-1]
                buf[3 * n:4 * n] = first[:, ::-1, ::-1]
            backend.submit(slot, n * self.factor)

    def _collect(self, slot: int, n: int) -> np.ndarray:
        total = None
        for size, backend in self.inner.items():
            logits = backend.collect(slot)
            out = flip_mean(logits, n) if self.factor == 4 else logits[:n]
            if out.shape[1:] != (self.height, self.width):
                out = resize_bilinear(out, self.height, self.width)
            total = out if total is None else total + out
        result = self._out[slot][:n]
        if len(self.inner) > 1:
            np.divide(total, np.float32(len(self.inner)), out=result)
        else:
            np.copyto(result, total)
        return result

    def _close(self) -> None:
        for backend in self.inner.values():
            backend.close()

    def describe(self) -> dict:
        d = super().describe()
        d.update({"tta": self.plan.choice, "tta_flips": self.plan.flips, "tta_sizes": list(self.plan.sizes),
                  "inner": {str(k): b.describe() for k, b in self.inner.items()}})
        return d


def info_at_size(info: ModelInfo, size: int | None) -> ModelInfo:
    """The model's info for an inner backend at the square ``size`` (None: the model's own size)."""
    if size is None or (info.input_height, info.input_width) == (size, size):
        return info
    return dataclasses.replace(info, input_height=int(size), input_width=int(size))


def wrap_per_device(plan: TTAPlan, info: ModelInfo, open_at_size, max_batch: int, n_slots: int) -> list[Backend]:
    """One :class:`TTABackend` per device. ``open_at_size(size_info, batch, first)`` opens the
    backends (one per device) of one size; ``first`` is None for the first size, else the backends
    opened for it, whose choice (backend, devices) the later sizes follow."""
    sizes = plan.sizes or (None,)
    factor = 4 if plan.flips else 1
    per_size: dict = {}
    try:
        first = None
        for size in sizes:
            per_size[size] = open_at_size(info_at_size(info, size), max_batch * factor, first)
            first = first or per_size[size]
            if len(per_size[size]) != len(first):
                raise RuntimeError(f"TTA at size {size} opened on {len(per_size[size])} device(s), "
                                   f"the first size on {len(first)}")
    except BaseException:
        for opened in per_size.values():
            for backend in opened:
                backend.close()
        raise
    return [TTABackend(plan, info, {size: per_size[size][i] for size in sizes}, max_batch, n_slots)
            for i in range(len(first))]


def open_onnx_tta_backends(onnx_path, plan: TTAPlan, info: ModelInfo, backend: str, devices, precision: str,
                           max_batch: int, n_slots: int, selection_notes: list[str] | None = None,
                           **options) -> list[Backend]:
    """The ONNX backends of ``plan`` (``open_onnx_backends`` once per size), wrapped per device."""
    from .backends import open_onnx_backends

    check_sizes_runnable(plan, info)

    def open_at_size(size_info, batch, first):
        if first is None:
            return open_onnx_backends(onnx_path, backend, devices, precision, batch, n_slots, info=size_info,
                                      selection_notes=selection_notes, **options)
        return [at_size(b, size_info, batch, lambda b=b: open_onnx_backends(
            onnx_path, b.name, [b.device], precision, batch, n_slots, info=size_info, **options)[0]) for b in first]

    return wrap_per_device(plan, info, open_at_size, max_batch, n_slots)


def at_size(backend: Backend, size_info: ModelInfo, batch: int, open_new) -> Backend:
    """A backend like ``backend`` at another size: ONNX Runtime shares the session (one memory arena
    for all sizes), others open their own (``open_new()``: TensorRT builds an engine per size)."""
    sibling = getattr(backend, "sibling", None)
    return sibling(size_info, batch) if sibling is not None else open_new()
