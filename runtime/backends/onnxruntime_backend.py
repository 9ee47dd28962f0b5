"""ONNX Runtime backend: CPU, CUDA (with I/O binding) or TensorRT execution provider.

Which provider runs is decided by ONNX Runtime when the session is created; a provider that
fails to load (missing CUDA libraries, no GPU) makes ONNX Runtime fall back silently to the CPU.
This backend therefore reads ``session.get_providers()`` back, reports the provider it actually
got in ``messages``/``describe()``, and raises :class:`BackendUnavailable` when a GPU device was
asked for but ONNX Runtime would run on the CPU (so ``auto`` can move on honestly).

Slots: ONNX Runtime's Python API runs a batch synchronously, so ``submit`` does the work and
``collect`` returns it; the overlap the pipeline gets is between host decoding (other threads,
while ``run`` releases the GIL) and inference. On CUDA each slot owns device input/output
buffers bound once per batch size through I/O binding, so no device memory is allocated per
batch and the output is copied to the host once.
"""
from __future__ import annotations

import contextlib
import io
import os
import threading
from pathlib import Path

import numpy as np

from ..model_files import is_int8_model, resolve_int8
from ..model_info import ModelInfo
from .base import Backend, BackendUnavailable
from .gpu_precision import (PrecisionChoice, choose_gpu_precision, fast_fp16_from_compute_capability,
                            validate_precision_request)

ORT_INSTALL_MESSAGE = ("ONNX Runtime is not installed: pip install \"effiseg[ort]\" (CPU) or "
                       "pip install \"effiseg[ort-gpu]\" (NVIDIA GPUs)")
PROVIDER_CHOICES = ("auto", "cpu", "cuda", "tensorrt")
_ELEMENT_TYPES = {"uint8-nhwc": np.uint8, "float32-nchw": np.float32}
_OUTPUT_TYPES = {"logits": np.float32, "probabilities": np.float16, "mask": np.uint8}


def import_onnxruntime():
    try:
        import onnxruntime
    except ImportError as e:
        raise BackendUnavailable(f"{ORT_INSTALL_MESSAGE} [import failed: {e}]") from e
    return onnxruntime


_preload_lock = threading.Lock()
_preload_said: list[str] | None = None  # what onnxruntime.preload_dlls printed; None: not run yet


def preload_cuda_libraries(ort) -> list[str]:
    """Let onnxruntime-gpu (1.21+) load the CUDA and cuDNN libraries it needs from pip's
    ``nvidia-*`` packages (``pip install "onnxruntime-gpu[cuda,cudnn]"``) or a compatible PyTorch,
    once per process, before the first GPU session. On Windows those DLLs are otherwise found only
    on PATH, and a missing cuDNN makes the CUDA provider fail to load. What preload_dlls prints
    (it reports by print) is kept, not shown, and returned, so that a provider that still fails can
    say why. ``EFFISEG_ORT_PRELOAD=0`` turns it off (for libraries placed on PATH by hand)."""
    global _preload_said
    with _preload_lock:
        if _preload_said is None:
            _preload_said = []
            if os.environ.get("EFFISEG_ORT_PRELOAD", "1") != "0" and hasattr(ort, "preload_dlls"):
                printed = io.StringIO()
                try:
                    with contextlib.redirect_stdout(printed):
                        ort.preload_dlls()
                except Exception as e:  # a failed preload only loses the help; the session says the rest
                    printed.write(f"preload_dlls failed: {e}\n")
                # drop the terminal colour codes some messages carry
                text = printed.getvalue().replace("\033[33m", "").replace("\033[0m", "")
                _preload_said = [line.strip() for line in text.splitlines() if line.strip()]
        return list(_preload_said)


def _device_index(device: str) -> int | None:
    if device == "cpu":
        return None
    if device == "cuda":
        return 0
    if device.startswith("cuda:") and device[5:].isdigit():
        return int(device[5:])
    raise ValueError(f"unknown device {device!r}; use cpu, cuda or cuda:N")


def _trt_cache_dir() -> Path:
    base = os.environ.get("EFFISEG_TRT_CACHE")
    if base:
        return Path(base) / "onnxruntime"
    root = os.environ.get("LOCALAPPDATA") or os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "effiseg" / "onnxruntime-trt"


def tensorrt_ep_precision(requested: str, device_id: int) -> PrecisionChoice:
    """What ONNX Runtime's TensorRT EP computes in on ``cuda:device_id``: fp16 only where the GPU has
    fast FP16, as for effiseg's own TensorRT backend. The compute capability is asked of the CUDA
    driver; the TensorRT EP cannot be asked before it builds, and some ONNX Runtime releases set
    FP16 whether or not the GPU has it, so "fp16" would be reported for fp32 arithmetic on Maxwell."""
    from ..cuda_memory import driver_devices

    devices = driver_devices() or []
    label = f"cuda:{device_id}"
    if device_id < len(devices):
        name, (major, minor) = devices[device_id]
        label = f"{label} ({name}, compute capability {major}.{minor})"
        fast = fast_fp16_from_compute_capability(major, minor)
    else:  # the driver did not answer: claim nothing the GPU may not do
        requested = validate_precision_request(requested, "ONNX Runtime")
        if requested == "fp32":
            return PrecisionChoice("fp32", None)
        return PrecisionChoice("fp32", f"precision {requested}: fp32, because the CUDA driver did not say "
                                       f"whether {label} has fast FP16", warning=requested == "fp16")
    return tensorrt_ep_choice(requested, fast, label)


def tensorrt_ep_choice(requested: str, fast_fp16: bool, device_label: str) -> PrecisionChoice:
    """The precision rule of the TensorRT EP (shared with effiseg-doctor): gpu_precision's."""
    return choose_gpu_precision(requested, fast_fp16, device_label, "the TensorRT EP builds fp32")


def _built_for(ort) -> str:
    """" 12.x" when this onnxruntime says which CUDA it was built with, else ""."""
    version = getattr(ort, "cuda_version", "") or ""
    return f" {version}" if version else ""


def _windows_short_path(folder: Path) -> str | None:
    """The 8.3 form of an existing folder (ASCII on volumes that keep short names), else None."""
    import ctypes

    buffer = ctypes.create_unicode_buffer(32768)
    length = ctypes.windll.kernel32.GetShortPathNameW(str(folder), buffer, len(buffer))
    return buffer.value if 0 < length < len(buffer) else None


def cache_path_for_tensorrt_ep(folder: Path, on_windows: bool | None = None, short_path=None) -> str | None:
    """The TensorRT EP's cache folder as ONNX Runtime can open it, or None where it cannot.

    The EP takes the folder as a narrow string and opens files with it; on Windows that is read in
    the ANSI code page, so a user profile with a name such as "José" in it (the default cache lives
    under %LOCALAPPDATA%) names a folder that does not exist. The folder's 8.3 short name is ASCII
    and names the same folder; volumes without short names leave no safe form (None)."""
    text = str(folder)
    if text.isascii() or not (os.name == "nt" if on_windows is None else on_windows):
        return text
    short = (short_path or _windows_short_path)(folder)
    return short if short and short.isascii() else None


def _provider_name(provider) -> str:
    return provider[0] if isinstance(provider, tuple) else provider


class OnnxRuntimeBackend(Backend):
    """An effiseg ONNX file in an ONNX Runtime session on the CPU or one GPU.

    Precision: the graph is float32; fp16 is available only through the TensorRT EP
    (``trt_fp16_enable``), and only on a GPU with fast FP16 (the rule of gpu_precision.py); asking for
    fp16 elsewhere runs fp32 and says so. ``int8`` (or an ``.int8.onnx`` file) runs the quantised twin
    on the CPU.

    Args:
        info (ModelInfo): the model's metadata (``ModelInfo.from_onnx``).
        onnx_path (str | Path): the ONNX file.
        device (str): "cpu", "cuda" or "cuda:N".
        precision (str): "auto", "fp32", "fp16" or "int8".
        max_batch (int): the most images per batch.
        n_slots (int): batches in flight (each slot has its own buffers).
        provider (str): "auto" (TensorRT EP if this ONNX Runtime has it and the device is a GPU, else
            CUDA EP on GPUs, else CPU), or "cpu" / "cuda" / "tensorrt" to insist.
        intra_op_threads (int | None): ONNX Runtime's threads per run; None: its own (one per core).
        io_binding (bool | None): bind per-slot device buffers; None: on GPUs only.
        session_of (OnnxRuntimeBackend | None): share that backend's session (``sibling``).

    Raises:
        ValueError: an unknown precision or provider; a graph without one input and one output.
        BackendUnavailable: ONNX Runtime is not installed, has no provider for the device, would
            fall back to the CPU on a GPU device, or int8 is asked of a GPU (the message says why).
        RuntimeError: ONNX Runtime cannot load the file.

    Example:
        >>> info = ModelInfo.from_onnx("model.onnx")                                  # doctest: +SKIP
        >>> with OnnxRuntimeBackend(info, "model.onnx", "cpu", max_batch=4) as backend:
        ...     logits = backend.infer(images)
    """

    name = "onnxruntime"

    def __init__(self, info: ModelInfo, onnx_path, device: str = "cpu", precision: str = "auto",
                 max_batch: int = 8, n_slots: int = 2, provider: str = "auto",
                 intra_op_threads: int | None = None, io_binding: bool | None = None,
                 session_of: "OnnxRuntimeBackend | None" = None):
        if precision not in ("auto", "fp32", "fp16", "int8"):
            raise ValueError(f"precision must be auto, fp32, fp16 or int8, not {precision!r}")
        if provider not in PROVIDER_CHOICES:
            raise ValueError(f"provider must be one of {', '.join(PROVIDER_CHOICES)}, not {provider!r}")
        super().__init__(info, device, "fp32", max_batch, n_slots)
        ort = import_onnxruntime()
        self.onnx_path = Path(onnx_path)
        self.device_id = _device_index(device)
        if precision == "int8" or is_int8_model(self.onnx_path):
            # The quantised twin (effiseg-export --quantize int8): QDQ kernels are the CPU provider's.
            if self.device_id is not None:
                raise BackendUnavailable(f"int8 runs on the CPU (ONNX Runtime's CPU provider), not {device}; "
                                         "GPUs run fp16/fp32")
            try:
                self.onnx_path = resolve_int8(self.onnx_path)
            except FileNotFoundError as e:
                raise BackendUnavailable(str(e)) from None
            self.precision, precision = "int8", "fp32"
        if session_of is not None:
            self._share_session(session_of, ort, io_binding)
            return
        available = ort.get_available_providers()
        self._trt_precision: PrecisionChoice | None = None  # set when the TensorRT EP is asked for
        providers = self._provider_list(provider, precision, available)
        preload_said = preload_cuda_libraries(ort) if self.device_id is not None else []
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if intra_op_threads:
            options.intra_op_num_threads = int(intra_op_threads)
        try:
            self.session = ort.InferenceSession(str(self.onnx_path), sess_options=options, providers=providers)
        except Exception as e:
            raise RuntimeError(f"ONNX Runtime cannot load {self.onnx_path}: {e}") from e
        self.providers = self.session.get_providers()
        self.provider = self.providers[0]
        if self.device_id is not None and self.provider == "CPUExecutionProvider":
            said = f"; onnxruntime.preload_dlls said: {' '.join(preload_said)}" if preload_said else ""
            raise BackendUnavailable(
                f"ONNX Runtime could not start {_provider_name(providers[0])} on {device} (it would run on "
                f"the CPU); onnxruntime-gpu {ort.__version__} needs the CUDA{_built_for(ort)} and cuDNN "
                "libraries it was built with: pip install \"onnxruntime-gpu[cuda,cudnn]\" brings them "
                f"(ONNX Runtime 1.21+), or put them on PATH{said}")
        if self.provider == "TensorrtExecutionProvider" and self._trt_precision is not None:
            self.precision = self._trt_precision.precision
            if self._trt_precision.message:
                self.note(self._trt_precision.message, warning=self._trt_precision.warning)
        elif precision == "fp16":
            self.note(f"fp16 needs ONNX Runtime's TensorRT provider; {self.provider} runs the fp32 graph")
        self.note(f"ONNX Runtime {ort.__version__}: {self.provider} on {device}")
        self.ort_version = ort.__version__
        self._check_io()
        self._host_inputs = [np.zeros(self._input_shape(max_batch), self._in_dtype) for _ in range(n_slots)]
        self._outputs: list[np.ndarray | None] = [None] * n_slots
        # I/O binding pays off when the session runs on a GPU; it also works on the CPU (tests use
        # that to exercise the same code path).
        self.io_binding = self.device_id is not None if io_binding is None else bool(io_binding)
        if self.io_binding:
            self._make_bindings(ort)

    # -- construction ---------------------------------------------------------------------------
    def sibling(self, info: ModelInfo, max_batch: int) -> "OnnxRuntimeBackend":
        """A backend of the same file and session at another input size (a dynamic-size graph), with
        its own buffers: run-time multi-scale TTA (runtime/tta.py). One session holds one memory arena,
        which both sizes reuse; two sessions would each keep their own peak (measured on the CPU:
        8.8 GB peak RSS for --tta multiscale with two sessions)."""
        return OnnxRuntimeBackend(info, self.onnx_path, self.device, max_batch=max_batch, n_slots=self.n_slots,
                                  io_binding=self.io_binding, session_of=self)

    def _share_session(self, other: "OnnxRuntimeBackend", ort, io_binding: bool | None) -> None:
        if other.device != self.device or other.onnx_path != self.onnx_path:
            raise ValueError("a shared ONNX Runtime session serves the same file on the same device")
        self.session, self.providers, self.provider = other.session, other.providers, other.provider
        self.precision, self.ort_version = other.precision, other.ort_version
        self.messages = []  # the session's decisions were told by the backend that opened it
        self._check_io()
        self._host_inputs = [np.zeros(self._input_shape(self.max_batch), self._in_dtype) for _ in range(self.n_slots)]
        self._outputs = [None] * self.n_slots
        self.io_binding = self.device_id is not None if io_binding is None else bool(io_binding)
        if self.io_binding:
            self._make_bindings(ort)

    def _provider_list(self, provider: str, precision: str, available: list[str]) -> list:
        if self.device_id is None:
            if provider not in ("auto", "cpu"):
                raise BackendUnavailable(f"provider {provider!r} needs a GPU device, not {self.device!r}")
            return ["CPUExecutionProvider"]
        has_cuda = "CUDAExecutionProvider" in available
        has_trt = "TensorrtExecutionProvider" in available
        if provider == "cpu":
            raise BackendUnavailable(f"provider 'cpu' cannot run on {self.device!r}")
        if not has_cuda:
            raise BackendUnavailable(f"this ONNX Runtime has no CUDA provider (it has {', '.join(available)}): "
                                     "pip install \"effiseg[ort-gpu]\" (and uninstall the CPU-only onnxruntime)")
        cuda = ("CUDAExecutionProvider", {"device_id": self.device_id})
        if provider == "tensorrt" and not has_trt:
            raise BackendUnavailable("this ONNX Runtime has no TensorRT provider")
        if provider in ("auto", "tensorrt") and has_trt:
            cache = _trt_cache_dir()
            self._trt_precision = tensorrt_ep_precision(precision, self.device_id)
            trt_options = {"device_id": self.device_id, "trt_engine_cache_enable": True,
                           "trt_engine_cache_path": str(cache), "trt_timing_cache_enable": True,
                           "trt_fp16_enable": self._trt_precision.precision == "fp16"}
            try:
                cache.mkdir(parents=True, exist_ok=True)
            except OSError:
                trt_options["trt_engine_cache_enable"] = False
            else:
                usable = cache_path_for_tensorrt_ep(cache)
                if usable is None:
                    trt_options["trt_engine_cache_enable"] = False
                    trt_options["trt_timing_cache_enable"] = False
                    self.note(f"TensorRT EP engine cache off: {cache} is not an ASCII path, which ONNX Runtime "
                              "opens in the Windows code page; engines are rebuilt each run. Set "
                              "EFFISEG_TRT_CACHE to an ASCII folder to keep them", warning=True)
                else:
                    trt_options["trt_engine_cache_path"] = usable
            return [("TensorrtExecutionProvider", trt_options), cuda, "CPUExecutionProvider"]
        return [cuda, "CPUExecutionProvider"]

    def _input_shape(self, n: int) -> tuple[int, ...]:
        h, w = self.info.input_height, self.info.input_width
        return (n, h, w, 3) if self.info.input_format == "uint8-nhwc" else (n, 3, h, w)

    def _check_io(self) -> None:
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or len(outputs) != 1:
            raise ValueError(f"{self.onnx_path}: expected one input and one output, found "
                             f"{len(inputs)} and {len(outputs)}")
        self._in_name, self._out_name = inputs[0].name, outputs[0].name
        self._in_dtype = _ELEMENT_TYPES[self.info.input_format]
        self._out_dtype = _OUTPUT_TYPES[self.info.output_format]
        shape = outputs[0].shape
        if len(shape) not in (3, 4) or (len(shape) == 4 and isinstance(shape[1], int) and shape[1] != 1):
            raise ValueError(f"{self.onnx_path}: output {self._out_name!r} has shape {shape}; expected (N,H,W) "
                             "or (N,1,H,W)")
        # What a bound output buffer must look like per image: I/O binding checks the rank.
        h, w = self.info.input_height, self.info.input_width
        self._out_tail = (h, w) if len(shape) == 3 else (1, h, w)

    def _make_bindings(self, ort) -> None:
        device_type = "cpu" if self.device_id is None else "cuda"
        device_id = self.device_id or 0
        self._ort_device = (device_type, device_id)
        self._device_inputs = [ort.OrtValue.ortvalue_from_shape_and_type(
            self._input_shape(self.max_batch), self._in_dtype, device_type, device_id) for _ in range(self.n_slots)]
        self._device_outputs = [ort.OrtValue.ortvalue_from_shape_and_type(
            (self.max_batch,) + self._out_tail, self._out_dtype, device_type, device_id) for _ in range(self.n_slots)]
        self._bindings = [self.session.io_binding() for _ in range(self.n_slots)]

    # -- double-buffered API ------------------------------------------------------------------
    def host_input(self, slot: int) -> np.ndarray:
        return self._host_inputs[slot]

    def _submit(self, slot: int, n: int) -> None:
        # ONNX Runtime's Python API runs synchronously: the work is done here, collect hands it out.
        if self.io_binding:
            out = self._run_bound(slot, n)
        else:
            out = self.session.run([self._out_name], {self._in_name: self._host_inputs[slot][:n]})[0]
        self._outputs[slot] = out.reshape(n, self.info.input_height, self.info.input_width)

    def _run_bound(self, slot: int, n: int) -> np.ndarray:
        device_type, device_id = self._ort_device
        dev_in, dev_out, binding = self._device_inputs[slot], self._device_outputs[slot], self._bindings[slot]
        # Whole-buffer copy: batches are full except the last one of a run.
        dev_in.update_inplace(self._host_inputs[slot])
        binding.bind_input(self._in_name, device_type, device_id, self._in_dtype, list(self._input_shape(n)),
                           dev_in.data_ptr())
        binding.bind_output(self._out_name, device_type, device_id, self._out_dtype, [n, *self._out_tail],
                            dev_out.data_ptr())
        self.session.run_with_iobinding(binding)
        return dev_out.numpy()[:n]

    def _collect(self, slot: int, n: int) -> np.ndarray:
        return self._outputs[slot]

    def _close(self) -> None:
        self._bindings = []
        self._device_inputs = []
        self._device_outputs = []
        self.session = None

    def describe(self) -> dict:
        d = super().describe()
        d.update({"provider": self.provider, "providers": list(self.providers),
                  "onnxruntime_version": self.ort_version, "io_binding": self.io_binding,
                  "model": str(self.onnx_path)})
        return d
