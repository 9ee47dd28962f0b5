"""Small TensorRT steps named by what they take and give: ONNX bytes -> network -> serialised
engine bytes -> deserialised engine.

Each step can be run, saved and inspected alone (as Polygraphy's loaders can), and each takes the
``tensorrt`` module as an argument, so tests hand in a fake one. None of them decides anything:
the choices (precision, profile, flags) come from ``decisions`` and ``BuildSettings``.
"""
from __future__ import annotations

import logging
import threading
from collections import deque
from pathlib import Path
from typing import Callable

from ...trt_engine_cache import atomic_write_bytes, read_bytes_or_none
from ..base import BackendUnavailable
from .decisions import ProfileShapes, network_creation_flags, uint8_rule_hint

log = logging.getLogger(__name__)

TENSORRT_INSTALL_MESSAGE = (
    "TensorRT is not installed: pip install \"effiseg[trt]\" for Turing and newer GPUs (TensorRT 10.5+); "
    "Volta \"effiseg[trt-volta]\", Pascal \"effiseg[trt-pascal]\", Maxwell TensorRT 8.5.3 from NVIDIA's "
    "zip/tar and \"effiseg[trt85]\" (runtime/INSTALL.md; effiseg-doctor names the command for this machine)")

# A note for the user: (message, warning). The backend's ``note``; ``print`` for a command.
Report = Callable[[str, bool], None]


def import_tensorrt():
    """The ``tensorrt`` module.

    Raises:
        BackendUnavailable: it is not installed, or its libraries do not load (the message names
            the extra to install for each GPU generation).
    """
    try:
        import tensorrt
    except Exception as e:  # ImportError; OSError/FileNotFoundError or others when the wheel is there
        # but its DLLs are not on PATH (the Windows loaders raise assorted types): all mean "absent".
        raise BackendUnavailable(f"{TENSORRT_INSTALL_MESSAGE} [import failed: {type(e).__name__}: {e}]") from e
    return tensorrt


_SEVERITY_LEVELS = {0: logging.CRITICAL, 1: logging.ERROR, 2: logging.WARNING, 3: logging.INFO,
                    4: logging.DEBUG}
_logger_lock = threading.Lock()
_shared_logger = None


def tensorrt_logger(trt, verbose: bool = False):
    """One ILogger per process (TensorRT warns when runtimes get different loggers) that forwards
    to Python logging and remembers the recent errors, so exceptions can quote TensorRT's reason
    (``take_errors()``)."""
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


def to_bytes(buffer) -> bytes:
    """TensorRT's ``IHostMemory`` (or any buffer) as bytes."""
    if buffer is None:
        raise RuntimeError("TensorRT returned no data")
    return buffer if isinstance(buffer, bytes) else bytes(memoryview(buffer))


def network_from_onnx_bytes(trt, builder, logger, onnx_bytes: bytes, source: Path):
    """Parse an ONNX graph into a new TensorRT network.

    Args:
        trt: the tensorrt module.
        builder: a ``trt.Builder``.
        logger: ``tensorrt_logger(trt)`` (its errors are quoted when parsing fails).
        onnx_bytes (bytes): the ONNX file's bytes, read by Python.
        source (Path): where they came from: named in errors and given to TensorRT for weights
            stored beside the model, where TensorRT can open that path.

    Returns:
        tuple: (network, parser); the parser must live as long as the network.

    Raises:
        RuntimeError: the parser refused the graph (its errors, and the uint8 rule the graph breaks
            with the fix, when that is the reason).
        ValueError: the graph has more than one input.
    """
    network = builder.create_network(network_creation_flags(trt))
    parser = trt.OnnxParser(network, logger)
    # The bytes, read by Python, rather than parse_from_file: TensorRT's native code opens a path
    # in the ANSI code page on Windows, so a model under C:\\Users\\Jörg\\ was "not found". The
    # path is only needed for weights stored beside the model (effiseg exports have none), and
    # only given where TensorRT can open it.
    path_for_external_weights = str(source) if str(source).isascii() else None
    if not parser.parse(onnx_bytes, path_for_external_weights):
        errors = []
        for i in range(int(parser.num_errors)):
            err = parser.get_error(i)
            errors.append(err.desc() if hasattr(err, "desc") else str(err))
        raise RuntimeError(f"TensorRT could not parse {source}: "
                           + ("; ".join(errors) or logger.take_errors() or "no reason given")
                           + uint8_rule_hint(source)
                           + ("" if path_for_external_weights else
                              " (if its weights are stored in separate files: TensorRT cannot open them "
                              "under a path with non-ASCII characters; move the model)"))
    if int(network.num_inputs) != 1:
        raise ValueError(f"{source}: expected one input, the ONNX has {network.num_inputs}")
    return network, parser


def set_workspace(trt, config, nbytes: int) -> None:
    if hasattr(config, "set_memory_pool_limit") and hasattr(trt, "MemoryPoolType"):
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(nbytes))
    else:  # TensorRT < 8.4
        config.max_workspace_size = int(nbytes)


def attach_timing_cache(config, timing_path: Path | None, report: Report) -> None:
    """Give the builder config the timing cache saved at ``timing_path`` (a fresh one when there is
    none, it is unusable, or ``timing_path`` is None)."""
    if not hasattr(config, "create_timing_cache"):
        return
    data = (read_bytes_or_none(timing_path) if timing_path is not None else None) or b""
    try:
        cache = config.create_timing_cache(data)
    except Exception:
        cache = None
    if cache is None or not config.set_timing_cache(cache, False):
        if data:
            report(f"TensorRT timing cache {timing_path} is unusable; starting a new one", True)
        config.set_timing_cache(config.create_timing_cache(b""), False)


def engine_bytes_from_network(trt, builder, logger, network, profile: ProfileShapes, precision: str,
                              n_profiles: int, workspace_bytes: int, timing_path: Path | None = None,
                              report: Report = lambda message, warning: None, source: str = "") -> bytes:
    """Build a serialised engine from a parsed network.

    Args:
        trt: the tensorrt module.
        builder: the ``trt.Builder`` that made ``network``.
        logger: ``tensorrt_logger(trt)``.
        network: from :func:`network_from_onnx_bytes`.
        profile (ProfileShapes): the input's min/opt/max shapes.
        precision (str): "fp16" sets the builder's FP16 flag; "fp32" builds in the graph's types.
        n_profiles (int): identical optimisation profiles for a dynamic input (one per slot).
        workspace_bytes (int): the builder's workspace limit.
        timing_path (Path | None): timing cache read before and written after the build; None: none.
        report: called with (message, warning) for what the user should hear of.
        source (str): the model's name for error messages.

    Returns:
        bytes: the serialised engine (``trt.Runtime.deserialize_cuda_engine`` takes it).

    Raises:
        RuntimeError: TensorRT rejected the profile or built no engine (TensorRT's reason quoted).
    """
    tensor = network.get_input(0)
    config = builder.create_builder_config()
    set_workspace(trt, config, workspace_bytes)
    if precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    if any(int(d) < 0 for d in tuple(tensor.shape)):
        # One identical profile per slot: see the package docstring.
        for _ in range(n_profiles):
            shapes = builder.create_optimization_profile()
            shapes.set_shape(tensor.name, profile.min, profile.opt, profile.max)
            if config.add_optimization_profile(shapes) < 0:
                raise RuntimeError(f"TensorRT rejected the optimisation profile {profile}")
    attach_timing_cache(config, timing_path, report)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine{f' from {source}' if source else ''} "
                           f"({precision}, profile {profile.min}..{profile.max}): "
                           f"{logger.take_errors() or 'see the TensorRT log (verbose=True)'}")
    if timing_path is not None:
        try:
            timing = config.get_timing_cache()
            if timing is not None:
                atomic_write_bytes(timing_path, to_bytes(timing.serialize()))
        except Exception as e:  # the engine is fine without a saved timing cache
            report(f"could not save the TensorRT timing cache {timing_path}: {e}", True)
    return to_bytes(serialized)


def engine_from_bytes(runtime, data: bytes):
    """Deserialise an engine; None when TensorRT refuses the bytes (another TensorRT version, GPU
    or platform, or not an engine at all).

    Args:
        runtime: a ``trt.Runtime``.
        data (bytes): a serialised engine.
    """
    return runtime.deserialize_cuda_engine(data)
