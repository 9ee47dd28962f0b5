"""TensorRT backend: builds (or loads from the cache) an engine from an effiseg ONNX file and runs
it double-buffered on one GPU.

Supported TensorRT releases: 8.5.3 (the last one for Maxwell, SM 5.x, e.g. the Quadro M6000), 8.6.1
(the last for Pascal), 10.0-10.4 (the last for Volta) and 10.5+ (Turing and newer); which GPU takes
which is the rule of ``tensorrt_rules.tensorrt_gpu_problem``, checked before any engine is built.
One code path serves them through the tensor-name API (``num_io_tensors``, ``set_input_shape``,
``set_tensor_address``, ``execute_async_v3``, introduced in 8.5); :func:`select_io_api` asks the
engine and context objects whether they have it and otherwise takes the bindings +
``execute_async_v2`` branch, so an 8.5 build without the tensor-name API in Python still runs.
TensorRT 11 removed weak typing (``BuilderFlag.FP16``): there the engine computes in the ONNX
file's own types and the backend says so.

Design of the slots (why n identical optimisation profiles): TensorRT lets several execution
contexts of one engine run at once on different streams, but with dynamic shapes an optimisation
profile may be used by only one context at a time (TensorRT 8.x documents this; relying on later
relaxations would break 8.5 on Maxwell). So the engine is built with ``n_slots`` identical
profiles and slot ``s`` owns context ``s`` bound to profile ``s``, its own stream, event, pinned
host buffers and device buffers. Two slots therefore overlap fully (copies and compute), unlike
one shared context, which would serialise every batch. The extra profiles cost almost nothing to
build: they have the same shapes, so the timing cache answers for them.

The CUDA runtime's current device is per thread: every entry point (``submit``, ``collect``,
``close``) first makes this backend's device current in the calling thread.

``import`` of this module needs neither TensorRT nor a CUDA binding; they are imported when a
backend is constructed.
"""
from __future__ import annotations

import logging
import threading
import warnings
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..cuda_memory import CudaApi, CudaError, CudaUnavailable, DeviceInfo, open_cuda, parse_cuda_device
from ..model_info import ModelInfo
from ..tensorrt_rules import parse_trt_version, tensorrt_gpu_problem
from ..trt_engine_cache import (EngineKey, atomic_write_bytes, engine_path, fast_fp16_answer_path, file_sha256,
                                load_or_build_engine, read_bytes_or_none, read_fast_fp16_answer,
                                resolve_cache_dir, timing_cache_path, write_fast_fp16_answer)
from .base import Backend, BackendUnavailable
from .gpu_precision import PrecisionChoice, choose_gpu_precision, fast_fp16_from_compute_capability
from .gpu_precision import validate_precision_request as _validate_precision

log = logging.getLogger(__name__)

TENSORRT_INSTALL_MESSAGE = (
    "TensorRT is not installed: pip install \"effiseg[trt]\" for Turing and newer GPUs (TensorRT 10.5+); "
    "Volta \"effiseg[trt-volta]\", Pascal \"effiseg[trt-pascal]\", Maxwell TensorRT 8.5.3 from NVIDIA's "
    "zip/tar and \"effiseg[trt85]\" (runtime/INSTALL.md; effiseg-doctor names the command for this machine)")

DEFAULT_WORKSPACE_MB = 1024


# =============================================================================================
# Pure decisions (no TensorRT needed; unit-tested in tests/test_tensorrt_logic.py)
# =============================================================================================

def uint8_rule_hint(onnx_path) -> str:
    """When TensorRT's parser refuses a file: which of its uint8 rules the graph breaks, and the fix
    (effiseg's exporter once transposed the uint8 input before casting it). Empty when onnx is not
    installed or the graph keeps to the rules: the parser's own errors then stand alone."""
    try:
        from effiseg.runtime.tensorrt_rules import tensorrt_uint8_problems
        problems = tensorrt_uint8_problems(onnx_path)
    except Exception:  # onnx missing, or a file onnx cannot read either
        return ""
    if not problems:
        return ""
    more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
    return (". The graph breaks TensorRT's uint8 rules: " + "; ".join(problems[:3]) + more
            + ". Re-export it with this version's effiseg-export, which casts uint8 to float first")


_TENSOR_API_ENGINE = ("num_io_tensors", "get_tensor_name", "get_tensor_mode", "get_tensor_dtype")
_TENSOR_API_CONTEXT = ("set_input_shape", "set_tensor_address", "execute_async_v3")
_BINDING_API_ENGINE = ("num_bindings", "get_binding_name", "binding_is_input")
_BINDING_API_CONTEXT = ("set_binding_shape", "execute_async_v2")


def select_io_api(version: str, engine, context) -> str:
    """``"tensor"`` (tensor names + execute_async_v3, TensorRT >= 8.5) when the objects have it,
    else ``"bindings"`` (binding indices + execute_async_v2, older releases)."""
    has_tensor = (all(hasattr(engine, a) for a in _TENSOR_API_ENGINE)
                  and all(hasattr(context, a) for a in _TENSOR_API_CONTEXT))
    has_bindings = (all(hasattr(engine, a) for a in _BINDING_API_ENGINE)
                    and all(hasattr(context, a) for a in _BINDING_API_CONTEXT))
    parsed = parse_trt_version(version)
    version_has_tensor = parsed >= (8, 5, 0) or parsed == (0, 0, 0)  # unknown: trust the objects
    if has_tensor and (version_has_tensor or not has_bindings):
        return "tensor"
    if has_bindings:
        return "bindings"
    raise BackendUnavailable(
        f"TensorRT {version}: the engine offers neither the tensor-name API (8.5+) nor the "
        "bindings API; install a TensorRT release from runtime/INSTALL.md")


def network_creation_flags(trt) -> int:
    """EXPLICIT_BATCH is required before TensorRT 10 and deprecated/ignored (later removed) after."""
    major = parse_trt_version(getattr(trt, "__version__", "0"))[0]
    flag_enum = getattr(trt, "NetworkDefinitionCreationFlag", None)
    if major < 10 and flag_enum is not None and hasattr(flag_enum, "EXPLICIT_BATCH"):
        return 1 << int(flag_enum.EXPLICIT_BATCH)
    return 0


def platform_has_fast_fp16(builder, compute_capability: tuple[int, int]) -> bool:
    """The builder's own answer where the property still exists (deprecated in 10.x, removed in 11),
    else the compute-capability rule."""
    if builder is not None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                return bool(builder.platform_has_fast_fp16)
        except Exception:  # removed (AttributeError), or listed but no longer implemented
            pass
    return fast_fp16_from_compute_capability(*compute_capability)


def validate_precision_request(requested: str) -> str:
    return _validate_precision(requested, "TensorRT")


def choose_precision(requested: str, fast_fp16: bool, device_label: str,
                     fp16_flag_available: bool = True, trt_version: str = "") -> PrecisionChoice:
    """The project's rule (``gpu_precision.choose_gpu_precision``), and TensorRT's own case: a release
    without the FP16 builder flag computes in the ONNX file's types."""
    requested = validate_precision_request(requested)
    if requested == "fp32":
        return PrecisionChoice("fp32", None)
    if not fp16_flag_available:
        text = (f"TensorRT {trt_version} builds strongly typed networks only (no FP16 builder flag): "
                "the engine computes in the ONNX file's own types (fp32 for a float32 export)")
        return PrecisionChoice("fp32", text, warning=requested == "fp16")
    return choose_gpu_precision(requested, fast_fp16, device_label, "building an FP32 engine instead")


@dataclass(frozen=True)
class ProfileShapes:
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]
    static_batch: int | None = None     # the ONNX's fixed batch size, if it has one

    def as_key(self, input_name: str) -> tuple:
        return ((input_name, self.min, self.opt, self.max),)


def input_axes(info: ModelInfo) -> tuple[int, int, int]:
    """(height axis, width axis, channel axis) of the network input for the model's input format."""
    return (1, 2, 3) if info.input_format == "uint8-nhwc" else (2, 3, 1)


def profile_shapes(network_shape, info: ModelInfo, min_batch: int = 1, opt_batch: int | None = None,
                   max_batch: int = 8) -> ProfileShapes:
    """The optimisation profile for the network input.

    ``network_shape`` is the parsed ONNX input shape with -1 for dynamic axes, or None for "what
    the metadata promises" (dynamic batch; H/W fixed unless ``info.dynamic_hw``). The batch axis
    spans min/opt/max batch; a dynamic height/width is pinned to the model's input size, because
    the pipeline resizes every image to that size and the host buffers have that shape. A fixed
    batch in the ONNX gives a one-point profile at that batch (see ``static_batch``).
    """
    min_batch = int(min_batch)
    max_batch = int(max_batch)
    opt_batch = max_batch if opt_batch is None else int(opt_batch)
    if not 1 <= min_batch <= opt_batch <= max_batch:
        raise ValueError(f"need 1 <= min_batch <= opt_batch <= max_batch, got "
                         f"{min_batch}/{opt_batch}/{max_batch}")
    h_axis, w_axis, c_axis = input_axes(info)
    if network_shape is None:
        network_shape = [-1, 0, 0, 0]
        network_shape[c_axis] = 3
        network_shape[h_axis] = -1 if info.dynamic_hw else info.input_height
        network_shape[w_axis] = -1 if info.dynamic_hw else info.input_width
    shape = [int(d) for d in network_shape]
    if len(shape) != 4:
        raise ValueError(f"the model input must be 4-D ({info.input_format}), the ONNX has shape {shape}")
    expected = {h_axis: ("height", info.input_height), w_axis: ("width", info.input_width),
                c_axis: ("channels", 3)}
    fixed = [0, 0, 0, 0]
    for axis, (what, value) in expected.items():
        if shape[axis] < 0:
            fixed[axis] = value
        elif shape[axis] != value:
            raise ValueError(f"the ONNX input {what} is {shape[axis]} but its metadata says {value} "
                             f"(input format {info.input_format}, shape {shape})")
        else:
            fixed[axis] = value
    if shape[0] >= 1:
        b = shape[0]
        return ProfileShapes(tuple([b] + fixed[1:]), tuple([b] + fixed[1:]), tuple([b] + fixed[1:]),
                             static_batch=b)
    return ProfileShapes(tuple([min_batch] + fixed[1:]), tuple([opt_batch] + fixed[1:]),
                         tuple([max_batch] + fixed[1:]))


def squeeze_output_shape(shape) -> tuple[int, int]:
    """(H, W) of an output shaped (N, H, W), (N, 1, H, W) or (N, H, W, 1)."""
    shape = tuple(int(d) for d in shape)
    if len(shape) == 3:
        return shape[1], shape[2]
    if len(shape) == 4 and shape[1] == 1:
        return shape[2], shape[3]
    if len(shape) == 4 and shape[3] == 1:
        return shape[1], shape[2]
    raise ValueError(f"the model output must be (N,H,W), (N,1,H,W) or (N,H,W,1), got {shape}")


_DTYPE_BY_NAME = {"FLOAT": np.float32, "HALF": np.float16, "INT8": np.int8, "UINT8": np.uint8,
                  "INT32": np.int32, "INT64": np.int64, "BOOL": np.bool_, "DOUBLE": np.float64}


def numpy_dtype(trt, trt_dtype) -> np.dtype:
    name = getattr(trt_dtype, "name", str(trt_dtype)).split(".")[-1].upper()
    if name in _DTYPE_BY_NAME:
        return np.dtype(_DTYPE_BY_NAME[name])
    try:
        return np.dtype(trt.nptype(trt_dtype))
    except Exception as e:
        raise ValueError(f"unsupported TensorRT tensor type {trt_dtype}") from e


# =============================================================================================
# TensorRT glue
# =============================================================================================

_SEVERITY_LEVELS = {0: logging.CRITICAL, 1: logging.ERROR, 2: logging.WARNING, 3: logging.INFO,
                    4: logging.DEBUG}
_logger_lock = threading.Lock()
_shared_logger = None


def _tensorrt_logger(trt, verbose: bool):
    """One ILogger per process (TensorRT warns when runtimes get different loggers) that forwards
    to Python logging and remembers the recent errors, so exceptions can quote TensorRT's reason."""
    global _shared_logger
    with _logger_lock:
        if _shared_logger is None or _shared_logger.trt_module is not trt:
            class _ForwardingLogger(trt.ILogger):
                def __init__(self):
                    trt.ILogger.__init__(self)
                    self.trt_module = trt
                    self.verbose = False
                    self.errors = deque(maxlen=8)

                def log(self, severity, msg):
                    level = int(severity)
                    if level <= 1:
                        self.errors.append(str(msg))
                    if level >= 3 and not self.verbose:
                        return
                    log.log(_SEVERITY_LEVELS.get(level, logging.DEBUG), "TensorRT: %s", msg)

                def take_errors(self) -> str:
                    text = " | ".join(self.errors)
                    self.errors.clear()
                    return text

            _shared_logger = _ForwardingLogger()
        _shared_logger.verbose = _shared_logger.verbose or bool(verbose)
        return _shared_logger


def _to_bytes(buffer) -> bytes:
    if buffer is None:
        raise RuntimeError("TensorRT returned no data")
    return buffer if isinstance(buffer, bytes) else bytes(memoryview(buffer))


def _set_workspace(trt, config, nbytes: int) -> None:
    if hasattr(config, "set_memory_pool_limit") and hasattr(trt, "MemoryPoolType"):
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(nbytes))
    else:  # TensorRT < 8.4
        config.max_workspace_size = int(nbytes)


class _TensorNameIO:
    """I/O through tensor names (TensorRT >= 8.5): the profile is chosen per context."""

    def __init__(self, trt, engine):
        self.engine = engine
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]

    def dtype(self, name):
        return self.engine.get_tensor_dtype(name)

    def engine_shape(self, name):
        return tuple(int(d) for d in self.engine.get_tensor_shape(name))

    def profile_shape(self, name, profile):
        lo, opt, hi = self.engine.get_tensor_profile_shape(name, profile)
        return tuple(int(d) for d in lo), tuple(int(d) for d in opt), tuple(int(d) for d in hi)

    def select_profile(self, context, profile, stream):
        if not context.set_optimization_profile_async(profile, stream.handle):
            raise RuntimeError(f"TensorRT refused optimisation profile {profile}")

    def set_input_shape(self, context, profile, name, shape):
        if context.set_input_shape(name, tuple(shape)) is False:
            raise RuntimeError(f"TensorRT refused input shape {tuple(shape)} for {name!r}")

    def output_shape(self, context, profile, name):
        return tuple(int(d) for d in context.get_tensor_shape(name))

    def bind(self, context, profile, name, ptr):
        if context.set_tensor_address(name, int(ptr)) is False:
            raise RuntimeError(f"TensorRT refused the device address of {name!r}")

    def execute(self, context, profile, stream) -> bool:
        return bool(context.execute_async_v3(stream.handle))


class _BindingIO:
    """I/O through binding indices (TensorRT < 8.5). Profile p owns bindings
    [p * per_profile, (p + 1) * per_profile)."""

    def __init__(self, trt, engine):
        self.engine = engine
        self.n_profiles = max(1, int(engine.num_optimization_profiles))
        self.per_profile = int(engine.num_bindings) // self.n_profiles
        names = [engine.get_binding_name(i) for i in range(self.per_profile)]
        self.index = {n: i for i, n in enumerate(names)}
        self.inputs = [n for n in names if engine.binding_is_input(self.index[n])]
        self.outputs = [n for n in names if n not in self.inputs]
        self._bindings: dict[int, list[int]] = {}

    def _at(self, profile, name):
        return profile * self.per_profile + self.index[name]

    def dtype(self, name):
        return self.engine.get_binding_dtype(self.index[name])

    def engine_shape(self, name):
        return tuple(int(d) for d in self.engine.get_binding_shape(self.index[name]))

    def profile_shape(self, name, profile):
        lo, opt, hi = self.engine.get_profile_shape(profile, self.index[name])
        return tuple(int(d) for d in lo), tuple(int(d) for d in opt), tuple(int(d) for d in hi)

    def select_profile(self, context, profile, stream):
        if hasattr(context, "set_optimization_profile_async"):
            if not context.set_optimization_profile_async(profile, stream.handle):
                raise RuntimeError(f"TensorRT refused optimisation profile {profile}")
        else:
            context.active_optimization_profile = profile

    def set_input_shape(self, context, profile, name, shape):
        if context.set_binding_shape(self._at(profile, name), tuple(shape)) is False:
            raise RuntimeError(f"TensorRT refused input shape {tuple(shape)} for {name!r}")

    def output_shape(self, context, profile, name):
        return tuple(int(d) for d in context.get_binding_shape(self._at(profile, name)))

    def bind(self, context, profile, name, ptr):
        table = self._bindings.setdefault(id(context), [0] * int(self.engine.num_bindings))
        table[self._at(profile, name)] = int(ptr)

    def execute(self, context, profile, stream) -> bool:
        return bool(context.execute_async_v2(self._bindings[id(context)], stream.handle))


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
    output_float: np.ndarray | None   # float32 conversion target for fp16/other outputs
    bound_batch: int = 0          # the batch the context's input shape is set to
    pending: int | None = None    # images submitted and not yet collected


class TensorRTBackend(Backend):
    """TensorRT engine on one GPU with ``n_slots`` double-buffering slots.

    ``TensorRTBackend(info, onnx_path, device="cuda:0", precision="auto", max_batch=8, n_slots=2,
    cache_dir=None, min_batch=1, opt_batch=None, workspace_mb=1024, verbose=False)``

    ``precision``: "auto" (fp16 where the GPU has fast FP16, else fp32), "fp16" (falls back to fp32
    with a warning on GPUs without fast FP16, e.g. Maxwell) or "fp32"; ``self.precision`` is what
    was built. ``opt_batch`` defaults to ``max_batch`` (the pipeline fills whole batches).
    ``cache_dir`` defaults to EFFISEG_TRT_CACHE, else the per-user cache folder.
    """

    name = "tensorrt"

    def __init__(self, info: ModelInfo, onnx_path, device: str = "cuda:0", precision: str = "auto",
                 max_batch: int = 8, n_slots: int = 2, cache_dir=None, min_batch: int = 1,
                 opt_batch: int | None = None, workspace_mb: int = DEFAULT_WORKSPACE_MB,
                 verbose: bool = False):
        super().__init__(info, device, validate_precision_request(precision), max_batch, n_slots)
        self.requested_precision = self.precision
        self.onnx_path = Path(onnx_path)
        self.min_batch = int(min_batch)
        self.opt_batch = None if opt_batch is None else int(opt_batch)
        self.workspace_bytes = int(workspace_mb) << 20
        self.verbose = bool(verbose)
        # Sanity of the batch range before any heavy import.
        profile_shapes(None, info, self.min_batch, self.opt_batch, self.max_batch)
        self._slots: list[_Slot] = []
        self._cuda: CudaApi | None = None
        self._engine = None
        self._runtime = None
        self._closed = False
        self.cache_dir: Path | None = None
        self.engine_path: Path | None = None
        self.engine_built = False
        self.build_seconds = 0.0
        self.static_batch: int | None = None
        self.trt_version = "unknown"
        self.gpu: DeviceInfo | None = None
        self.io_api = ""
        try:
            self._open(cache_dir)
        except BaseException:
            self.close()
            raise

    # -- construction ---------------------------------------------------------------------------
    def _import_tensorrt(self):
        """The tensorrt module (a hook: tests substitute a fake)."""
        try:
            import tensorrt
        except Exception as e:  # ImportError; OSError/FileNotFoundError or others when the wheel is there
            # but its DLLs are not on PATH (the Windows loaders raise assorted types): all mean "absent".
            raise BackendUnavailable(f"{TENSORRT_INSTALL_MESSAGE} [import failed: {type(e).__name__}: {e}]") from e
        return tensorrt

    def _open_cuda(self, device_index: int) -> CudaApi:
        """A CUDA binding on the device (a hook: tests substitute a fake)."""
        try:
            return open_cuda(device_index)
        except CudaUnavailable as e:
            raise BackendUnavailable(f"the TensorRT backend needs a CUDA binding: {e}") from e

    def _open(self, cache_dir) -> None:
        trt = self._import_tensorrt()
        self._trt = trt
        self.trt_version = str(getattr(trt, "__version__", "unknown"))
        try:
            device_index = parse_cuda_device(self.device)
        except ValueError as e:
            raise ValueError(f"the TensorRT backend runs on CUDA devices: {e}") from e
        self._cuda = self._open_cuda(device_index)
        # The engine, buffers and streams are made with the device current in this thread, in a
        # block that ends here whatever happens (a pycuda context left pushed aborts the process
        # when its thread ends).
        entered = False
        try:
            with self._cuda.current():
                entered = True
                self._open_on_device(trt, cache_dir)
        except CudaError as e:
            if entered:
                raise
            raise BackendUnavailable(f"CUDA device {self.device} is not usable: {e}") from e

    def _open_on_device(self, trt, cache_dir) -> None:
        try:
            self.gpu = self._cuda.device_info()
        except CudaError as e:
            raise BackendUnavailable(f"CUDA device {self.device} is not usable: {e}") from e
        unsupported = tensorrt_gpu_problem(self.trt_version, self.gpu.compute_capability, gpu_name=self.gpu.name)
        if unsupported:
            raise BackendUnavailable(unsupported)
        if not self.onnx_path.is_file():
            raise FileNotFoundError(f"ONNX file not found: {self.onnx_path}")
        logger = _tensorrt_logger(trt, self.verbose)
        self._logger = logger

        device_label = f"{self.gpu.name} (compute capability {self.gpu.cc_string})"
        fp16_flag = hasattr(getattr(trt, "BuilderFlag", None), "FP16")
        self.cache_dir = resolve_cache_dir(cache_dir)
        builder = None
        fast = False
        if self.requested_precision != "fp32" and fp16_flag:
            # The builder's answer decides, but creating a Builder loads TensorRT's builder library
            # (seconds on 8.x): it is asked once per GPU and TensorRT version, and the answer kept
            # beside the engines, so a run whose engine is cached starts without a Builder.
            answer_path = fast_fp16_answer_path(self.cache_dir, self.trt_version, self.gpu.name, self.gpu.cc_string)
            fast = read_fast_fp16_answer(answer_path)
            if fast is None:
                builder = trt.Builder(logger)
                fast = platform_has_fast_fp16(builder, self.gpu.compute_capability)
                write_fast_fp16_answer(answer_path, fast)
        choice = choose_precision(self.requested_precision, fast, device_label, fp16_flag, self.trt_version)
        self.precision = choice.precision
        if choice.message:
            self.note(choice.message, warning=choice.warning)

        requested = profile_shapes(None, self.info, self.min_batch, self.opt_batch, self.max_batch)
        key = EngineKey(
            onnx_sha256=file_sha256(self.onnx_path), tensorrt_version=self.trt_version,
            gpu_name=self.gpu.name, compute_capability=self.gpu.cc_string, precision=self.precision,
            profile=requested.as_key(self.info.input_name), n_profiles=self.n_slots,
            workspace_mb=self.workspace_bytes >> 20)
        path = engine_path(self.cache_dir, f"{self.info.variant}-{self.onnx_path.stem}", key)
        self._runtime = trt.Runtime(logger)

        def deserialize(data: bytes):
            engine = self._runtime.deserialize_cuda_engine(data)
            if engine is None:
                return None
            self._check_engine(trt, engine)   # a stale or foreign engine counts as unusable
            return engine

        def build() -> bytes:
            return self._build(trt, logger, builder if builder is not None else trt.Builder(logger), path)

        metadata = dict(key.components(), onnx_path=str(self.onnx_path), variant=self.info.variant,
                        requested_precision=self.requested_precision)
        result = load_or_build_engine(path, deserialize, build,
                                      report=lambda m: self.note(m, warning=True), metadata=metadata)
        self._engine = result.engine
        self.engine_path = result.path
        self.engine_built = result.built
        self.build_seconds = result.build_seconds
        if result.built:
            self.note(f"built TensorRT engine {path.name} in {result.build_seconds:.1f} s "
                       f"({self.precision}, cached in {self.cache_dir})")
        else:
            self.note(f"loaded cached TensorRT engine {path}")
        self._make_slots(trt)

    def _build(self, trt, logger, builder, path: Path) -> bytes:
        network = builder.create_network(network_creation_flags(trt))
        parser = trt.OnnxParser(network, logger)
        # The bytes, read by Python, rather than parse_from_file: TensorRT's native code opens a path
        # in the ANSI code page on Windows, so a model under C:\\Users\\Jörg\\ was "not found". The
        # path is only needed for weights stored beside the model (effiseg exports have none), and
        # only given where TensorRT can open it.
        path_for_external_weights = str(self.onnx_path) if str(self.onnx_path).isascii() else None
        if not parser.parse(self.onnx_path.read_bytes(), path_for_external_weights):
            errors = []
            for i in range(int(parser.num_errors)):
                err = parser.get_error(i)
                errors.append(err.desc() if hasattr(err, "desc") else str(err))
            raise RuntimeError(f"TensorRT could not parse {self.onnx_path}: "
                               + ("; ".join(errors) or logger.take_errors() or "no reason given")
                               + uint8_rule_hint(self.onnx_path)
                               + ("" if path_for_external_weights else
                                  " (if its weights are stored in separate files: TensorRT cannot open them "
                                  "under a path with non-ASCII characters; move the model)"))
        if int(network.num_inputs) != 1:
            raise ValueError(f"{self.onnx_path}: expected one input, the ONNX has {network.num_inputs}")
        tensor = network.get_input(0)
        shapes = profile_shapes(tuple(tensor.shape), self.info, self.min_batch, self.opt_batch,
                                self.max_batch)
        config = builder.create_builder_config()
        _set_workspace(trt, config, self.workspace_bytes)
        if self.precision == "fp16":
            config.set_flag(trt.BuilderFlag.FP16)
        dynamic = any(int(d) < 0 for d in tuple(tensor.shape))
        if dynamic:
            # One identical profile per slot: see the module docstring.
            for _ in range(self.n_slots):
                profile = builder.create_optimization_profile()
                profile.set_shape(tensor.name, shapes.min, shapes.opt, shapes.max)
                if config.add_optimization_profile(profile) < 0:
                    raise RuntimeError(f"TensorRT rejected the optimisation profile {shapes}")
        timing_path = timing_cache_path(self.cache_dir, self.trt_version, self.gpu.name,
                                        self.gpu.cc_string)
        self._attach_timing_cache(config, timing_path)
        self.note(f"building a TensorRT {self.precision} engine for {self.onnx_path.name} on "
                   f"{self.gpu.name} (batch {shapes.min[0]}..{shapes.max[0]}); this takes from "
                   "seconds to several minutes and is done once per GPU and TensorRT version")
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise RuntimeError(f"TensorRT failed to build an engine from {self.onnx_path} "
                               f"({self.precision}, profile {shapes.min}..{shapes.max}): "
                               f"{logger.take_errors() or 'see the TensorRT log (verbose=True)'}")
        try:
            timing = config.get_timing_cache()
            if timing is not None:
                atomic_write_bytes(timing_path, _to_bytes(timing.serialize()))
        except Exception as e:  # the engine is fine without a saved timing cache
            self.note(f"could not save the TensorRT timing cache {timing_path}: {e}", warning=True)
        return _to_bytes(serialized)

    def _attach_timing_cache(self, config, timing_path: Path) -> None:
        if not hasattr(config, "create_timing_cache"):
            return
        data = read_bytes_or_none(timing_path) or b""
        cache = None
        try:
            cache = config.create_timing_cache(data)
        except Exception:
            cache = None
        if cache is None or not config.set_timing_cache(cache, False):
            if data:
                self.note(f"TensorRT timing cache {timing_path} is unusable; starting a new one",
                           warning=True)
            config.set_timing_cache(config.create_timing_cache(b""), False)

    def _check_engine(self, trt, engine) -> None:
        """Raise ValueError when a (cached) engine does not fit this backend's settings."""
        # The context class answers the API question without allocating a context's memory.
        api = select_io_api(self.trt_version, engine, trt.IExecutionContext)
        io = _TensorNameIO(trt, engine) if api == "tensor" else _BindingIO(trt, engine)
        if len(io.inputs) != 1:
            raise ValueError(f"engine has {len(io.inputs)} inputs, expected 1")
        shape = io.engine_shape(io.inputs[0])
        if any(d < 0 for d in shape) and int(engine.num_optimization_profiles) < self.n_slots:
            raise ValueError(f"engine has {engine.num_optimization_profiles} optimisation profiles, "
                             f"{self.n_slots} slots need {self.n_slots}")

    def _make_slots(self, trt) -> None:
        engine = self._engine
        cuda = self._cuda
        first_context = engine.create_execution_context()
        if first_context is None:
            raise RuntimeError("TensorRT could not create an execution context (out of GPU memory?): "
                               + self._logger.take_errors())
        self.io_api = select_io_api(self.trt_version, engine, first_context)
        io = _TensorNameIO(trt, engine) if self.io_api == "tensor" else _BindingIO(trt, engine)
        self._io = io
        in_name = self.info.input_name if self.info.input_name in io.inputs else io.inputs[0]
        if self.info.output_name in io.outputs:
            out_name = self.info.output_name
        elif len(io.outputs) == 1:
            out_name = io.outputs[0]
        else:
            raise ValueError(f"{self.onnx_path}: output {self.info.output_name!r} not among the "
                             f"engine outputs {io.outputs}")
        self._in_name, self._out_name = in_name, out_name

        engine_shape = io.engine_shape(in_name)
        dynamic = any(d < 0 for d in engine_shape)
        if dynamic:
            _, _, hi = io.profile_shape(in_name, 0)
            max_shape = hi
            if hi[0] < self.max_batch:
                self.note(f"engine profile allows batches up to {hi[0]}; max_batch lowered from "
                           f"{self.max_batch}", warning=True)
                self.max_batch = hi[0]
            if engine_shape[0] >= 0:  # a fixed batch with dynamic height/width: pad smaller batches
                self.static_batch = engine_shape[0]
        else:
            max_shape = engine_shape
            self.static_batch = engine_shape[0]
            if self.static_batch != self.max_batch:
                self.note(f"{self.onnx_path.name} has a fixed batch of {self.static_batch}; "
                           f"max_batch set to {self.static_batch} (smaller batches are padded)",
                           warning=self.static_batch < self.max_batch)
                self.max_batch = self.static_batch
        h_axis, w_axis, c_axis = input_axes(self.info)
        if (max_shape[h_axis], max_shape[w_axis], max_shape[c_axis]) != (
                self.info.input_height, self.info.input_width, 3):
            raise ValueError(f"engine input shape {max_shape} does not match the model's "
                             f"{self.info.input_format} {self.info.input_height}x{self.info.input_width}")
        in_dtype = numpy_dtype(trt, io.dtype(in_name))
        if self.info.input_format == "uint8-nhwc" and in_dtype != np.uint8:
            raise ValueError(f"{self.onnx_path}: metadata says uint8 input, the engine wants {in_dtype}")
        out_dtype = numpy_dtype(trt, io.dtype(out_name))
        self._out_dtype = out_dtype
        self._input_tail = tuple(max_shape[1:])
        n_profiles = int(engine.num_optimization_profiles)

        for index in range(self.n_slots):
            context = first_context if index == 0 else engine.create_execution_context()
            first_context = None
            if context is None:
                raise RuntimeError(f"TensorRT could not create execution context {index} "
                                   "(out of GPU memory?): " + self._logger.take_errors())
            profile = index if (dynamic and n_profiles >= self.n_slots) else 0
            stream = cuda.create_stream()
            slot = _Slot(context=context, profile=profile, stream=stream, event=None,
                         host_input=None, device_input=None, host_output=None, device_outputs={},
                         output_float=None)
            self._slots.append(slot)  # registered first, so close() frees whatever gets allocated
            slot.event = cuda.create_event()
            if dynamic and n_profiles > 1:
                io.select_profile(context, profile, stream)
                stream.synchronize()
            run_batch = self.static_batch or self.max_batch
            full_shape = (run_batch,) + self._input_tail
            if dynamic:
                io.set_input_shape(context, profile, in_name, full_shape)
            slot.bound_batch = run_batch
            slot.host_input = cuda.alloc_host(full_shape, in_dtype)
            slot.device_input = cuda.alloc_device(slot.host_input.nbytes)
            io.bind(context, profile, in_name, slot.device_input.ptr)
            for name in io.outputs:
                shape = io.output_shape(context, profile, name)
                if any(d < 0 for d in shape):
                    raise ValueError(f"output {name!r} has a data-dependent shape {shape}")
                dtype = numpy_dtype(trt, io.dtype(name))
                buffer = cuda.alloc_device(int(np.prod(shape, dtype=np.int64)) * dtype.itemsize)
                slot.device_outputs[name] = buffer
                io.bind(context, profile, name, buffer.ptr)
                if name == out_name:
                    self._out_hw = squeeze_output_shape(shape)
                    slot.host_output = cuda.alloc_host(shape, dtype)
                    if dtype not in (np.float32, np.uint8, np.bool_):
                        slot.output_float = np.empty((run_batch,) + self._out_hw, np.float32)

    # -- double-buffered API -------------------------------------------------------------------
    def _slot(self, slot: int) -> _Slot:
        if self._closed:
            raise RuntimeError("the TensorRT backend is closed")
        if not 0 <= slot < len(self._slots):
            raise IndexError(f"slot {slot} out of range (n_slots={self.n_slots})")
        return self._slots[slot]

    def host_input(self, slot: int) -> np.ndarray:
        return self._slot(slot).host_input.array

    def submit(self, slot: int, n: int) -> None:
        s = self._slot(slot)
        self._check_submit(slot, n, s.pending is not None)
        with self._cuda.current():  # this thread may never have touched the device
            self._enqueue(s, slot, n)

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
        self._cuda.copy_to_host_async(s.host_output.array[:run], s.device_outputs[self._out_name],
                                      s.stream)
        s.event.record(s.stream)
        s.pending = n

    def collect(self, slot: int) -> np.ndarray:
        s = self._slot(slot)
        if s.pending is None:
            raise RuntimeError(f"collect({slot}) without a submitted batch")
        n, s.pending = s.pending, None
        with self._cuda.current():
            s.event.synchronize()
        out = s.host_output.array[:n].reshape((n,) + self._out_hw)
        if out.dtype == np.bool_:
            return out.view(np.uint8)
        if s.output_float is not None:
            np.copyto(s.output_float[:n], out, casting="unsafe")
            return s.output_float[:n]
        return out

    # -- lifetime ---------------------------------------------------------------------------------
    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
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
        d = super().describe()
        d.update({
            "requested_precision": self.requested_precision,
            "tensorrt_version": self.trt_version,
            "gpu": self.gpu.name if self.gpu else None,
            "compute_capability": self.gpu.cc_string if self.gpu else None,
            "engine_path": str(self.engine_path) if self.engine_path else None,
            "cache_dir": str(self.cache_dir) if self.cache_dir else None,
            "engine_built": self.engine_built,
            "build_seconds": round(self.build_seconds, 3),
            "io_api": self.io_api,
            "cuda_binding": self._cuda.binding if self._cuda else None,
        })
        return d
