"""The TensorRT backend's pure decisions: no TensorRT, no CUDA, tested directly
(tests/runtime/test_tensorrt_build.py).

Which I/O API an engine offers, the network flags of a release, whether to build FP16, the
optimisation profile of the effiseg input, and how output shapes and TensorRT types map to numpy:
kept apart from the calls into TensorRT so that every release's answer can be checked here.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from ...model_info import ModelInfo
from ...tensorrt_rules import parse_trt_version
from ..base import BackendUnavailable
from ..gpu_precision import PrecisionChoice, choose_gpu_precision, fast_fp16_from_compute_capability
from ..gpu_precision import validate_precision_request as _validate_precision

__all__ = ["uint8_rule_hint", "select_io_api", "network_creation_flags", "platform_has_fast_fp16",
           "validate_precision_request", "choose_precision", "ProfileShapes", "input_axes", "profile_shapes",
           "squeeze_output_shape", "numpy_dtype", "parse_trt_version"]


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

