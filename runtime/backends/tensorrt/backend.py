"""The slot-running TensorRT backend: an engine (from the cache, a build, or a prebuilt file) run
double-buffered on one GPU. What the slots are, and why one profile each: the package docstring.

The CUDA runtime's current device is per thread: every entry point (``submit``, ``collect``,
``close``) first makes this backend's device current in the calling thread.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...cuda_memory import CudaApi, CudaError, DeviceInfo, parse_cuda_device
from ...model_info import ModelInfo
from ...trt_engine_cache import file_sha256
from ..base import Backend, BackendUnavailable
from .build import (check_gpu_supported, engine_from_cache_or_build, engine_metadata_path,
                    open_cuda_for_tensorrt)
from .decisions import input_axes, numpy_dtype, select_io_api, squeeze_output_shape
from .io_api import io_for
from .loaders import engine_from_bytes, import_tensorrt, tensorrt_logger
from .settings import BuildSettings

log = logging.getLogger(__name__)


@dataclass
class _Slot:
    context: object
    profile: int
    stream: object
    event: object
    host_input: object            # HostBuffer
    device_input: object          # DeviceBuffer
    host_output: object           # HostBuffer of the main output, in the engine's dtype
    device_outputs: dict          # name -> DeviceBuffer (every output needs an address)
    bound_batch: int = 0          # the batch the context's input shape is set to


class TensorRTBackend(Backend):
    """A TensorRT engine on one GPU with ``n_slots`` double-buffering slots.

    The engine comes from ``engine`` (built ahead of time: ``effiseg-export MODEL.onnx --engine
    OUT.engine``), else from the engine cache, else it is built from ``onnx_path`` and cached.

    Args:
        info (ModelInfo): the model's metadata (``ModelInfo.from_onnx``).
        onnx_path (str | Path | None): the effiseg ONNX file to build from; may be None when
            ``engine`` is given (else it is checked against the engine's record).
        device (str): "cuda:N".
        precision (str | None): "auto", "fp16" or "fp32" (see ``BuildSettings``); None: the
            settings'. ``self.precision`` is what was built, ``self.requested_precision`` what was asked.
        max_batch (int | None): largest batch; None: the settings' (8). A fixed-batch ONNX or a
            smaller engine profile lowers it, with a note.
        n_slots (int | None): slots, and so identical optimisation profiles; None: the settings' (2).
        settings (BuildSettings | None): how the engine is built; the three arguments above, and
            ``build_options``, replace its fields.
        engine (bytes | str | Path | None): a serialised engine, or the file holding one.
        tensorrt: the tensorrt module (tests hand in a fake); None: imported.
        open_cuda: ``device_index -> CudaApi`` (tests hand in a fake); None: the installed binding.
        **build_options: fields of ``BuildSettings`` (``cache_dir``, ``min_batch``, ``opt_batch``,
            ``workspace_mb``, ``timing_cache``, ``verbose``), as ``effiseg-run`` passes them.

    Raises:
        ValueError: bad settings (INT8, batch range), before TensorRT is imported; an engine that
            does not fit the model or was made from another ONNX file.
        TypeError: an unknown build option.
        BackendUnavailable: TensorRT or a CUDA binding is missing, the GPU is not usable, this
            TensorRT does not support the GPU, or a prebuilt engine is for another TensorRT or GPU.
        FileNotFoundError: ``onnx_path`` (or the engine file) does not exist.
        RuntimeError: TensorRT could not parse, build or load the engine (its reason quoted).

    Example:
        >>> info = ModelInfo.from_onnx("model.onnx")                      # doctest: +SKIP
        >>> with TensorRTBackend(info, "model.onnx", "cuda:0", "fp16", max_batch=8) as backend:
        ...     logits = backend.infer(images)
    """

    name = "tensorrt"

    def __init__(self, info: ModelInfo, onnx_path=None, device: str = "cuda:0", precision: str | None = None,
                 max_batch: int | None = None, n_slots: int | None = None, *, settings: BuildSettings | None = None,
                 engine=None, tensorrt=None, open_cuda=None, **build_options):
        unknown = sorted(set(build_options) - set(BuildSettings.field_names()))
        if unknown:
            raise TypeError(f"unknown TensorRT backend option(s) {', '.join(unknown)}; "
                            f"BuildSettings has {', '.join(BuildSettings.field_names())}")
        given = {"precision": precision, "max_batch": max_batch, "n_profiles": n_slots}
        # Validated here, before any heavy import: INT8, the batch range, the model's 4-D input.
        self.settings = (settings or BuildSettings()).replace(
            **build_options, **{k: v for k, v in given.items() if v is not None})
        self.settings.profile(info)
        super().__init__(info, device, self.settings.precision, self.settings.max_batch, self.settings.n_profiles)
        if onnx_path is None and engine is None:
            raise ValueError("the TensorRT backend needs an ONNX file to build from, or a prebuilt engine")
        self.requested_precision = self.settings.precision
        self.onnx_path = Path(onnx_path) if onnx_path is not None else None
        self.engine_file = Path(engine) if engine is not None and not isinstance(engine, (bytes, bytearray)) else None
        self._prebuilt = engine
        self._slots: list[_Slot] = []
        self._cuda: CudaApi | None = None
        self._engine = None
        self._runtime = None
        self.cache_dir: Path | None = None
        self.engine_path: Path | None = None
        self.engine_built = False
        self.build_seconds = 0.0
        self.static_batch: int | None = None
        self.trt_version = "unknown"
        self.gpu: DeviceInfo | None = None
        self.io_api = ""
        try:
            self._open(tensorrt, open_cuda)
        except BaseException:
            self.close()
            raise

    @property
    def min_batch(self) -> int:
        return self.settings.min_batch

    @property
    def _model_label(self) -> str:
        return str(self.onnx_path or self.engine_file or "the given engine")

    # -- construction ---------------------------------------------------------------------------
    def _open(self, tensorrt, open_cuda) -> None:
        trt = tensorrt if tensorrt is not None else import_tensorrt()
        self.trt_version = str(getattr(trt, "__version__", "unknown"))
        try:
            device_index = parse_cuda_device(self.device)
        except ValueError as e:
            raise ValueError(f"the TensorRT backend runs on CUDA devices: {e}") from e
        self._cuda = (open_cuda or open_cuda_for_tensorrt)(device_index)
        # The engine, buffers and streams are made with the device current in this thread, in a
        # block that ends here whatever happens (a pycuda context left pushed aborts the process
        # when its thread ends).
        entered = False
        try:
            with self._cuda.current():
                entered = True
                self._open_on_device(trt)
        except CudaError as e:
            if entered:
                raise
            raise BackendUnavailable(f"CUDA device {self.device} is not usable: {e}") from e

    def _open_on_device(self, trt) -> None:
        try:
            self.gpu = self._cuda.device_info()
        except CudaError as e:
            raise BackendUnavailable(f"CUDA device {self.device} is not usable: {e}") from e
        check_gpu_supported(self.trt_version, self.gpu)
        self._logger = tensorrt_logger(trt, self.settings.verbose)
        self._runtime = trt.Runtime(self._logger)
        if self._prebuilt is not None:
            self._engine = self._load_prebuilt(trt)
        else:
            source = engine_from_cache_or_build(
                trt, self._runtime, self._logger, self.onnx_path, self.info, self.settings, self.gpu,
                self.trt_version, lambda engine: self._check_engine(trt, engine), self.note)
            self.precision = source.precision.precision
            self.cache_dir = source.cache_dir
            result = source.result
            self._engine, self.engine_path = result.engine, result.path
            self.engine_built, self.build_seconds = result.built, result.build_seconds
            if result.built:
                self.note(f"built TensorRT engine {result.path.name} in {result.build_seconds:.1f} s "
                          f"({self.precision}, cached in {self.cache_dir})")
            else:
                self.note(f"loaded cached TensorRT engine {result.path}")
        self._make_slots(trt)

    def _load_prebuilt(self, trt):
        """The engine given to the constructor, checked against its record (``OUT.engine.json``)
        where there is one: built for this TensorRT and GPU, from this ONNX file."""
        if self.engine_file is not None:
            if not self.engine_file.is_file():
                raise FileNotFoundError(f"TensorRT engine file not found: {self.engine_file}")
            data = self.engine_file.read_bytes()
            record = _read_record(engine_metadata_path(self.engine_file))
        else:
            data, record = bytes(self._prebuilt), {}
        label = self._model_label if self.engine_file is None else str(self.engine_file)
        built_for = (record.get("tensorrt_version"), record.get("compute_capability"))
        if record and built_for != (self.trt_version, self.gpu.cc_string):
            raise BackendUnavailable(
                f"{label} was built with TensorRT {built_for[0]} for compute capability {built_for[1]} "
                f"({record.get('gpu_name')}); this is TensorRT {self.trt_version} on {self.gpu.name} "
                f"({self.gpu.cc_string}): build it here with effiseg-export MODEL.onnx --engine {label}")
        if record and self.onnx_path is not None and self.onnx_path.is_file() \
                and record.get("onnx_sha256") != file_sha256(self.onnx_path):
            raise ValueError(f"{label} was built from another ONNX file than {self.onnx_path} "
                             f"(its record names {record.get('onnx_path')}); build it again from this one")
        engine = engine_from_bytes(self._runtime, data)
        if engine is None:
            raise RuntimeError(f"TensorRT {self.trt_version} could not load the engine {label} "
                               f"({self._logger.take_errors() or 'no reason given'}): an engine runs only with the "
                               "TensorRT version, GPU model and operating system it was built on")
        self._check_engine(trt, engine)
        self.engine_path = self.engine_file
        self.precision = record.get("precision") or (self.requested_precision
                                                     if self.requested_precision != "auto" else "unknown")
        self.note(f"loaded prebuilt TensorRT engine {label} ({self.precision})")
        return engine

    def _check_engine(self, trt, engine) -> None:
        """Raise ValueError when an engine does not fit this backend's settings."""
        # The context class answers the API question without allocating a context's memory.
        api = select_io_api(self.trt_version, engine, trt.IExecutionContext)
        io = io_for(trt, engine, api)
        if len(io.inputs) != 1:
            raise ValueError(f"engine has {len(io.inputs)} inputs, expected 1")
        shape = io.engine_shape(io.inputs[0])
        if any(d < 0 for d in shape) and int(engine.num_optimization_profiles) < self.n_slots:
            raise ValueError(f"engine has {engine.num_optimization_profiles} optimisation profiles, "
                             f"{self.n_slots} slots need {self.n_slots}")

    def _make_slots(self, trt) -> None:
        engine = self._engine
        first_context = engine.create_execution_context()
        if first_context is None:
            raise RuntimeError("TensorRT could not create an execution context (out of GPU memory?): "
                               + self._logger.take_errors())
        self.io_api = select_io_api(self.trt_version, engine, first_context)
        io = self._io = io_for(trt, engine, self.io_api)
        in_name = self.info.input_name if self.info.input_name in io.inputs else io.inputs[0]
        if self.info.output_name in io.outputs:
            out_name = self.info.output_name
        elif len(io.outputs) == 1:
            out_name = io.outputs[0]
        else:
            raise ValueError(f"{self._model_label}: output {self.info.output_name!r} not among the "
                             f"engine outputs {io.outputs}")
        self._in_name, self._out_name = in_name, out_name
        dynamic, max_shape = self._fit_batch(io.engine_shape(in_name), io, in_name)
        h_axis, w_axis, c_axis = input_axes(self.info)
        if (max_shape[h_axis], max_shape[w_axis], max_shape[c_axis]) != (
                self.info.input_height, self.info.input_width, 3):
            raise ValueError(f"engine input shape {max_shape} does not match the model's "
                             f"{self.info.input_format} {self.info.input_height}x{self.info.input_width}")
        in_dtype = numpy_dtype(trt, io.dtype(in_name))
        if self.info.input_format == "uint8-nhwc" and in_dtype != np.uint8:
            raise ValueError(f"{self._model_label}: metadata says uint8 input, the engine wants {in_dtype}")
        self._input_tail = tuple(max_shape[1:])
        n_profiles = int(engine.num_optimization_profiles)
        for index in range(self.n_slots):
            context = first_context if index == 0 else engine.create_execution_context()
            first_context = None
            if context is None:
                raise RuntimeError(f"TensorRT could not create execution context {index} "
                                   "(out of GPU memory?): " + self._logger.take_errors())
            profile = index if (dynamic and n_profiles >= self.n_slots) else 0
            self._add_slot(trt, io, context, profile, dynamic and n_profiles > 1, dynamic, in_dtype)

    def _fit_batch(self, engine_shape, io, in_name) -> tuple[bool, tuple]:
        """(whether the input is dynamic, the largest input shape), lowering ``max_batch`` to what
        the engine takes (a profile's maximum, or a fixed batch: smaller batches are padded)."""
        dynamic = any(d < 0 for d in engine_shape)
        if dynamic:
            _, _, hi = io.profile_shape(in_name, 0)
            if hi[0] < self.max_batch:
                self.note(f"engine profile allows batches up to {hi[0]}; max_batch lowered from "
                          f"{self.max_batch}", warning=True)
                self.max_batch = hi[0]
            if engine_shape[0] >= 0:  # a fixed batch with dynamic height/width: pad smaller batches
                self.static_batch = engine_shape[0]
            return True, hi
        self.static_batch = engine_shape[0]
        if self.static_batch != self.max_batch:
            name = self.onnx_path.name if self.onnx_path else self._model_label
            self.note(f"{name} has a fixed batch of {self.static_batch}; max_batch set to {self.static_batch} "
                      "(smaller batches are padded)", warning=self.static_batch < self.max_batch)
            self.max_batch = self.static_batch
        return False, engine_shape

    def _add_slot(self, trt, io, context, profile: int, select_profile: bool, dynamic: bool, in_dtype) -> None:
        cuda = self._cuda
        stream = cuda.create_stream()
        slot = _Slot(context=context, profile=profile, stream=stream, event=None, host_input=None,
                     device_input=None, host_output=None, device_outputs={})
        self._slots.append(slot)  # registered first, so close() frees whatever gets allocated
        slot.event = cuda.create_event()
        if select_profile:
            io.select_profile(context, profile, stream)
            stream.synchronize()
        run_batch = self.static_batch or self.max_batch
        full_shape = (run_batch,) + self._input_tail
        if dynamic:
            io.set_input_shape(context, profile, self._in_name, full_shape)
        slot.bound_batch = run_batch
        slot.host_input = cuda.alloc_host(full_shape, in_dtype)
        slot.device_input = cuda.alloc_device(slot.host_input.nbytes)
        io.bind(context, profile, self._in_name, slot.device_input.ptr)
        for name in io.outputs:
            shape = io.output_shape(context, profile, name)
            if any(d < 0 for d in shape):
                raise ValueError(f"output {name!r} has a data-dependent shape {shape}")
            dtype = numpy_dtype(trt, io.dtype(name))
            buffer = cuda.alloc_device(int(np.prod(shape, dtype=np.int64)) * dtype.itemsize)
            slot.device_outputs[name] = buffer
            io.bind(context, profile, name, buffer.ptr)
            if name == self._out_name:
                self._out_hw = squeeze_output_shape(shape)
                slot.host_output = cuda.alloc_host(shape, dtype)

    # -- double-buffered API -------------------------------------------------------------------
    def host_input(self, slot: int) -> np.ndarray:
        self._check_slot(slot)
        return self._slots[slot].host_input.array

    def _submit(self, slot: int, n: int) -> None:
        with self._cuda.current():  # this thread may never have touched the device
            self._enqueue(self._slots[slot], slot, n)

    def _enqueue(self, s: _Slot, slot: int, n: int) -> None:
        # Below the profile's minimum (min_batch > 1) the batch is padded with the slot's stale rows,
        # whose outputs are never returned: TensorRT refuses a shape outside the profile.
        run = self.static_batch or max(n, self.min_batch)
        if run != s.bound_batch:
            self._io.set_input_shape(s.context, s.profile, self._in_name, (run,) + self._input_tail)
            s.bound_batch = run
        self._cuda.copy_to_device_async(s.device_input, s.host_input.array[:run], s.stream)
        if not self._io.execute(s.context, s.profile, s.stream):
            raise RuntimeError(f"TensorRT failed to enqueue a batch of {run} on slot {slot}: "
                               + (self._logger.take_errors() or "no reason given"))
        self._cuda.copy_to_host_async(s.host_output.array[:run], s.device_outputs[self._out_name], s.stream)
        s.event.record(s.stream)

    def _collect(self, slot: int, n: int) -> np.ndarray:
        s = self._slots[slot]
        with self._cuda.current():
            s.event.synchronize()
        return s.host_output.array[:n].reshape((n,) + self._out_hw)

    # -- lifetime ---------------------------------------------------------------------------------
    def _close(self) -> None:
        cuda = self._cuda
        try:
            if cuda is None:
                self._release()
            else:
                with cuda.current():  # TensorRT frees its device memory as the engine goes
                    self._release()
        except Exception as e:  # the device could not be made current (lost): free what can be freed
            log.warning("TensorRT backend close: %s", e)
            self._release()
        if cuda is not None:
            try:
                cuda.close()
            except Exception:
                pass

    def _release(self) -> None:
        """Free the slots' buffers, streams and contexts, then the engine (once: a second call finds
        nothing left)."""
        for s in self._slots:
            try:
                s.stream.synchronize()  # nothing may still read or write the buffers
            except Exception as e:
                log.warning("TensorRT backend close: stream synchronize failed: %s", e)
        for s in self._slots:
            s.context = None            # contexts go before the engine that owns them
            for resource in [s.event, s.stream, s.host_input, s.device_input, s.host_output,
                             *s.device_outputs.values()]:
                if resource is None:
                    continue
                try:
                    resource.free()
                except Exception as e:
                    log.warning("TensorRT backend close: could not free a CUDA resource: %s", e)
        self._slots = []
        self._io = None
        self._engine = None
        self._runtime = None

    def describe(self) -> dict:
        """``Backend.describe`` and the engine's story: TensorRT version, GPU, engine file, whether it
        was built now (and how long that took), the I/O API and the CUDA binding."""
        d = super().describe()
        d.update({
            "requested_precision": self.requested_precision,
            "tensorrt_version": self.trt_version,
            "gpu": self.gpu.name if self.gpu else None,
            "compute_capability": self.gpu.cc_string if self.gpu else None,
            "engine_path": str(self.engine_path) if self.engine_path else None,
            "prebuilt_engine": self._prebuilt is not None,
            "cache_dir": str(self.cache_dir) if self.cache_dir else None,
            "engine_built": self.engine_built,
            "build_seconds": round(self.build_seconds, 3),
            "io_api": self.io_api,
            "cuda_binding": self._cuda.binding if self._cuda else None,
        })
        return d


def _read_record(path: Path) -> dict:
    """The JSON record beside an engine file, or {} when there is none or it is unreadable (the
    engine then loads unchecked, as TensorRT itself refuses a foreign one)."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}
