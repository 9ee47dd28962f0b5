"""The TensorRT backend's former one-module home, kept so that ``from
effiseg.runtime.backends.tensorrt_backend import TensorRTBackend`` (effiseg-doctor, user code)
still works: the code lives in the package ``effiseg.runtime.backends.tensorrt``."""
from __future__ import annotations

from .tensorrt import (TensorRTBackend, BuildSettings, DEFAULT_WORKSPACE_MB, build_engine_file,
                        engine_from_cache_or_build, engine_metadata_path, TENSORRT_INSTALL_MESSAGE,
                        import_tensorrt, tensorrt_logger, network_from_onnx_bytes, engine_bytes_from_network,
                        engine_from_bytes, ProfileShapes, choose_precision, input_axes,
                        network_creation_flags, numpy_dtype, parse_trt_version, platform_has_fast_fp16,
                        profile_shapes, select_io_api, squeeze_output_shape, uint8_rule_hint,
                        validate_precision_request)

__all__ = ["TensorRTBackend", "BuildSettings", "DEFAULT_WORKSPACE_MB", "build_engine_file",
           "engine_from_cache_or_build", "engine_metadata_path", "TENSORRT_INSTALL_MESSAGE",
           "import_tensorrt", "tensorrt_logger", "network_from_onnx_bytes", "engine_bytes_from_network",
           "engine_from_bytes", "ProfileShapes", "choose_precision", "input_axes", "network_creation_flags",
           "numpy_dtype", "parse_trt_version", "platform_has_fast_fp16", "profile_shapes", "select_io_api",
           "squeeze_output_shape", "uint8_rule_hint", "validate_precision_request"]
