"""The public inference API: ``Segmenter``.

    from effiseg.runtime import Segmenter
    with Segmenter.from_onnx("model.onnx") as seg:          # backend="auto": TensorRT > ORT CUDA > ORT CPU
        masks = seg.segment([rgb1, rgb2])                  # bool (H, W) per image, at its own size
        summary = seg.run_folder("images/", "masks/")      # PNG masks + effiseg_summary.csv/.json

    Segmenter.from_checkpoint("runs/best/")                # PyTorch (fp16 + CUDA graphs on GPUs)
"""
from __future__ import annotations

import dataclasses
import weakref
from pathlib import Path

import numpy as np

from .backends import BackendUnavailable, open_checkpoint_backends, open_onnx_backends
from .backends.base import Backend
from .model_info import ModelInfo
from .tta import open_onnx_tta_backends, plan_tta
from .device_thread import CLOSE_WAIT_S, DeviceThread
from .pipeline import Pipeline, default_workers
from .postprocess import cut_batch, fill_host_row, output_to_mask, output_to_probabilities, resize_rgb

__all__ = ["Segmenter", "BackendUnavailable", "as_rgb", "is_onnx_path"]


def is_onnx_path(path) -> bool:
    path = Path(path)
    return path.is_file() and path.suffix.lower() == ".onnx"


def as_rgb(image: np.ndarray, name: str = "image") -> np.ndarray:
    """(H, W, 3) uint8 from an in-memory uint8 array: RGB, grayscale (H, W) / (H, W, 1) or RGBA
    (alpha dropped, as for files)."""
    a = np.asarray(image)
    if a.dtype != np.uint8:
        raise ValueError(f"{name}: expected a uint8 array, got {a.dtype}")
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[2] not in (1, 3, 4) or a.shape[0] == 0 or a.shape[1] == 0:
        raise ValueError(f"{name}: expected (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got {a.shape}")
    if a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    elif a.shape[2] == 4:
        a = a[..., :3]
    return np.ascontiguousarray(a)


class Segmenter:
    """Backends (one per device) + the pipeline + the model's conventions.

    Usually made with :meth:`from_onnx`, :meth:`from_checkpoint` or :meth:`from_model`; use it as a
    context manager (or call :meth:`close`) so the device threads and device memory are released.

    Args:
        backends (list[Backend]): open backends of one model, one per device.
        threshold (float | None): cut applied to probabilities, in (0, 1) [default: the model's own].
            Mask-output models have their threshold baked in and accept only that one.
        workers (int | None): decoder threads [default: the runtime's, from the CPU count].
        writers (int | None): post-processing/writer threads [default: as many as workers].
        selection_notes (list[str] | None): why these backends were chosen (``describe()`` reports them).
        model_path (Path | None): the model file, for reports.

    Raises:
        ValueError: no backend, a threshold outside (0, 1), or another threshold than a mask model's.

    Example:
        >>> with Segmenter.from_model("runtime/models/effisegnet-default.onnx") as seg:  # doctest: +SKIP
        ...     masks = seg.segment([rgb])
    """

    def __init__(self, backends: list[Backend], threshold: float | None = None, workers: int | None = None,
                 writers: int | None = None, selection_notes: list[str] | None = None,
                 model_path: Path | None = None):
        if not backends:
            raise ValueError("a Segmenter needs at least one backend")
        self.backends = backends
        self.info: ModelInfo = backends[0].info
        self.model_path = model_path
        self.selection_notes = list(selection_notes or [])
        if threshold is None:
            threshold = self.info.threshold
        threshold = float(threshold)
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {threshold}")
        if self.info.output_format == "mask" and abs(threshold - self.info.threshold) > 1e-9:
            raise ValueError(f"this model outputs masks cut at {self.info.threshold} inside the graph; "
                             f"threshold {threshold} needs a logits or probabilities export")
        self.threshold = threshold
        self.workers = workers or default_workers()
        self.writers = writers or self.workers
        self.last_stats = None
        # One device thread per backend for the Segmenter's life: every run calls each backend from
        # the same thread, so per-thread caches (PyTorch's cuDNN plans) are built once, not per run.
        self.runner_threads = [DeviceThread(f"effiseg-run-{b.device}") for b in backends]
        # A Segmenter dropped without close() still ends its threads (without waiting for them).
        self._finalizer = weakref.finalize(self, _stop_threads, list(self.runner_threads))

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_onnx(cls, path, backend: str = "auto", devices=None, precision: str = "auto", max_batch: int = 8,
                  slots: int = 2, threshold: float | None = None, workers: int | None = None,
                  writers: int | None = None, input_size: int | tuple[int, int] | None = None,
                  tta: str = "none", **backend_options) -> "Segmenter":
        """An effiseg ONNX file on ``backend``; its metadata (``ModelInfo``) says everything else.

        Args:
            path: the ONNX file effiseg-export wrote.
            backend: "auto" (TensorRT > ONNX Runtime CUDA > OpenVINO/ONNX Runtime CPU, whichever is
                installed and runs here), or a backend name ("tensorrt", "onnxruntime", "openvino", ...).
            devices: "cpu", "cuda:0", a list of them [default: every GPU like the first for GPU
                backends, see ``open_onnx_backends``].
            precision: "auto", "fp32", "fp16", "bf16" or "int8", as the backend supports.
            max_batch: largest batch per device call.
            slots: host + device buffer sets per backend (batches in flight).
            threshold: cut for masks [default: the model's, or the TTA recommendation's with TTA].
            workers, writers: decoder and writer threads [default: the runtime's].
            input_size: one side or (height, width) [default: the file's]; other sizes need a
                dynamic-size export.
            tta: "none" (one network pass), "flip" or "multiscale" (the setting chosen on
                validation, from the metadata), run by the backend (runtime/tta.py).
            **backend_options: passed to the backend (e.g. ``threads`` for CPU backends).

        Returns:
            The open Segmenter.

        Raises:
            FileNotFoundError: no file at ``path``.
            ValueError: no effiseg metadata, an input size the file cannot run, a TTA choice the
                file cannot serve.
            BackendUnavailable: the backend is not installed or cannot run here (the message names
                the extra to install).

        Example:
            >>> seg = Segmenter.from_onnx("model.onnx", backend="onnxruntime", devices="cpu")  # doctest: +SKIP
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"model file not found: {path}")
        info = ModelInfo.from_onnx(path)
        native = (info.input_height, info.input_width)
        if input_size is not None:
            h, w = (input_size, input_size) if isinstance(input_size, int) else input_size
            if (h, w) != (info.input_height, info.input_width):
                if not info.dynamic_hw:
                    raise ValueError(f"{path} has a fixed input size {info.input_height}x{info.input_width}; "
                                     "export with --dynamic-hw to run other sizes")
                info = dataclasses.replace(info, input_height=int(h), input_width=int(w))
        notes: list[str] = []
        plan = plan_tta(tta, info)
        if plan.sizes and (info.input_height, info.input_width) != native:
            raise ValueError(f"--tta {tta} runs the sizes {'+'.join(map(str, plan.sizes))} chosen for the model's own "
                             "input size; drop --input-size")
        if plan.extra_passes:
            backends = open_onnx_tta_backends(path, plan, info, backend, devices, precision, max_batch, slots,
                                              selection_notes=notes, **backend_options)
        else:
            backends = open_onnx_backends(path, backend, devices, precision, max_batch, slots, info=info,
                                          selection_notes=notes, **backend_options)
        if threshold is None and plan.threshold is not None:
            threshold = plan.threshold
        return cls(backends, threshold, workers, writers, notes, model_path=path)

    @classmethod
    def from_checkpoint(cls, path, devices=None, precision: str = "auto", max_batch: int = 8, slots: int = 2,
                        threshold: float | None = None, workers: int | None = None, writers: int | None = None,
                        input_size: int | tuple[int, int] | None = None, tta: str | None = "none",
                        **backend_options) -> "Segmenter":
        """A training checkpoint on the torch backend (needs the train extra).

        Args:
            path: a checkpoint folder, its config.json or its .safetensors file.
            devices: as for :meth:`from_onnx` [default: every GPU torch sees that is like the first,
                else the CPU].
            precision, max_batch, slots, threshold, workers, writers, input_size: as for :meth:`from_onnx`.
            tta: as for :meth:`from_onnx`, run on the device inside the torch graph (None: the
                checkpoint config's own ``tta``/``tta_sizes``).
            **backend_options: passed to the torch backend (e.g. ``cuda_graphs``).

        Returns:
            The open Segmenter.

        Raises:
            BackendUnavailable: torch or timm is not installed, or no kernels for the GPU.
            FileNotFoundError, ValueError: the checkpoint is missing or its config is invalid.
        """
        notes: list[str] = []
        backends = open_checkpoint_backends(path, devices, precision, max_batch, slots, selection_notes=notes,
                                            input_size=input_size, tta=tta, **backend_options)
        plan = getattr(backends[0], "tta_plan", None)
        if threshold is None and plan is not None and plan.threshold is not None:
            threshold = plan.threshold
        return cls(backends, threshold, workers, writers, notes, model_path=Path(path))

    @classmethod
    def from_model(cls, path, backend: str = "auto", **kwargs) -> "Segmenter":
        """An ONNX file (:meth:`from_onnx`), or a checkpoint for the torch backend (:meth:`from_checkpoint`).

        Args:
            path: an ``.onnx`` file, or a checkpoint folder, config.json or .safetensors file.
            backend: for ONNX files as in :meth:`from_onnx`; checkpoints run on "torch" ("auto" too).
            **kwargs: the chosen constructor's other arguments.

        Returns:
            The open Segmenter.

        Raises:
            FileNotFoundError: nothing at ``path``.
            ValueError: a backend other than torch asked for a checkpoint.

        Example:
            >>> with Segmenter.from_model("training/weights/default") as seg:  # doctest: +SKIP
            ...     seg.backend_name
            'torch'
        """
        path = Path(path)
        if is_onnx_path(path):
            return cls.from_onnx(path, backend=backend, **kwargs)
        if not path.exists():
            raise FileNotFoundError(f"model not found: {path}")
        if backend not in ("auto", "torch"):
            raise ValueError(f"{path} is not an .onnx file; only the torch backend runs checkpoints "
                             f"(asked for {backend!r})")
        return cls.from_checkpoint(path, **kwargs)

    # -- use ------------------------------------------------------------------------------------
    @property
    def precision(self) -> str:
        return ",".join(sorted({b.precision for b in self.backends}))

    @property
    def backend_name(self) -> str:
        return ",".join(sorted({b.name for b in self.backends}))

    def pipeline(self, load, finish, fail, condense=None) -> Pipeline:
        info = self.info
        return Pipeline(self.backends, load, lambda row, rgb: fill_host_row(row, rgb, info), finish, fail,
                        workers=self.workers, writers=self.writers, runner_threads=self.runner_threads,
                        condense=condense)

    def cut_masks(self, outputs: np.ndarray, sizes: list) -> list:
        """A pipeline's ``condense`` for mask results: each image's output cut at once for the batch
        where the image has the model's output size (``postprocess.cut_batch``); metas are sizes."""
        return cut_batch(outputs, self.info.output_format, self.threshold, sizes)

    def prepare(self, rgb: np.ndarray) -> np.ndarray:
        """An RGB image resized to the model's input (what a host-buffer row receives)."""
        return resize_rgb(rgb, self.info.input_height, self.info.input_width)

    def segment(self, images, output: str = "mask") -> list[np.ndarray]:
        """Segment in-memory images.

        Args:
            images: uint8 arrays, RGB (H, W, 3), grayscale (H, W) or (H, W, 1), or RGBA (alpha dropped).
            output: "mask" (bool, H x W) or "probabilities" (float32, H x W).

        Returns:
            One array per image, at the image's own size, in the order given.

        Raises:
            ValueError: an unknown ``output``, probabilities from a mask model, or an image that is
                not a uint8 RGB/gray array (named by its index).
            RuntimeError: an image failed in the pipeline (named by its index and stage).

        Example:
            >>> masks = seg.segment([rgb1, rgb2])  # doctest: +SKIP
            >>> masks[0].dtype, masks[0].shape == rgb1.shape[:2]  # doctest: +SKIP
            (dtype('bool'), True)
        """
        if output not in ("mask", "probabilities"):
            raise ValueError("output must be 'mask' or 'probabilities'")
        if output == "probabilities" and self.info.output_format == "mask":
            raise ValueError("this model outputs masks; export with --output-format logits for probabilities")
        arrays = [as_rgb(im, f"image {i}") for i, im in enumerate(images)]
        fmt, threshold = self.info.output_format, self.threshold

        def load(i):
            return self.prepare(arrays[i]), arrays[i].shape[:2]

        def finish(i, size, out):
            if output == "mask":
                return output_to_mask(out, fmt, threshold, *size)[0]
            return output_to_probabilities(out, fmt, *size)

        def fail(i, error, stage):
            return _Failure(i, stage, error)

        results: list = [None] * len(arrays)
        pipe = self.pipeline(load, finish, fail, condense=self.cut_masks if output == "mask" else None)
        for i, result in pipe.run(range(len(arrays))):
            results[i] = result
        self.last_stats = pipe.stats
        for r in results:
            if isinstance(r, _Failure):
                raise RuntimeError(f"image {r.index}: {r.stage} failed: {r.error}") from r.error
        return results

    def run_folder(self, input_dir, output_dir=None, **options) -> dict:
        """Segment every image of a folder into PNG masks (``effiseg.runtime.folder.run_folder``).

        Args:
            input_dir: the folder of images.
            output_dir: where the masks go [default: ``<input_dir>_masks`` beside it].
            **options: ``recursive``, ``resume``, ``overlay``, ``max_pixels``, ``regions`` (count each
                mask's regions; off by default), ``progress``, ``log`` (see ``run_folder``).

        Returns:
            The summary (counts, failures, throughput), also written as effiseg_summary.json/.csv
            in ``output_dir``.

        Raises:
            FolderError: the folders are unusable (missing input, output inside input, ...; named).
            FolderLockedError: another run holds ``output_dir``.
            RecordWriteError: the journal or summary could not be written once the run had
                started (the masks written so far are complete; a resumed run finishes the folder).

        Example:
            >>> summary = seg.run_folder("images/", "masks/", resume=True)  # doctest: +SKIP
        """
        from .folder import run_folder
        return run_folder(self, input_dir, output_dir, **options)

    def describe(self) -> dict:
        return {"model": str(self.model_path) if self.model_path else None,
                "backend": self.backend_name, "devices": [b.device for b in self.backends],
                "precision": self.precision, "threshold": self.threshold,
                "workers": self.workers, "writers": self.writers,
                "selection": list(self.selection_notes),
                "backends": [b.describe() for b in self.backends],
                "model_info": {k: v for k, v in dataclasses.asdict(self.info).items() if k != "path"}}

    def close(self) -> None:
        # Between runs the threads are idle and end at once; a device call that never returns is
        # waited for a bounded time, then left to its daemon thread.
        for t in self.runner_threads:
            t.close(timeout=CLOSE_WAIT_S)
        self._finalizer.detach()
        failures = []
        for b in self.backends:  # one backend that fails to close must not keep the others' memory
            try:
                b.close()
            except Exception as e:
                failures.append(e)
        if failures:
            raise failures[0]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _stop_threads(threads: list[DeviceThread]) -> None:
    for t in threads:
        t.close(timeout=0)


@dataclasses.dataclass
class _Failure:
    index: int
    stage: str
    error: BaseException
