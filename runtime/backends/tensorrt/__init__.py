"""TensorRT backend: an engine built (or loaded from the cache, or prebuilt) from an effiseg ONNX
file, run double-buffered on one GPU.

The package follows the work's steps, each in its own module, as Polygraphy splits loaders from
runners:

* ``settings``: :class:`BuildSettings`, everything that changes an engine, one frozen object;
* ``decisions``: the pure choices (precision, profile, network flags, I/O API), no TensorRT needed;
* ``loaders``: ONNX bytes -> network -> engine bytes -> engine, each step alone;
* ``build``: the precision for the GPU, the engine cache in front of the loaders, and
  :func:`build_engine_file`, the same build ahead of time (``effiseg-export MODEL.onnx --engine``);
* ``io_api``: the two I/O flavours (TensorRT 10's tensor names, 8.5's binding indices);
* ``backend``: :class:`TensorRTBackend`, the slots that run the engine.

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

``import`` of this package needs neither TensorRT nor a CUDA binding; they are imported when a
backend is constructed or an engine built, and tests hand in fakes of both (``tensorrt=``,
``open_cuda=``).
"""
from __future__ import annotations

from .backend import TensorRTBackend
from .build import build_engine_file, engine_from_cache_or_build, engine_metadata_path
from .decisions import (ProfileShapes, choose_precision, input_axes, network_creation_flags, numpy_dtype,
                        parse_trt_version, platform_has_fast_fp16, profile_shapes, select_io_api,
                        squeeze_output_shape, uint8_rule_hint, validate_precision_request)
from .loaders import (TENSORRT_INSTALL_MESSAGE, engine_bytes_from_network, engine_from_bytes, import_tensorrt,
                      network_from_onnx_bytes, tensorrt_logger)
from .settings import DEFAULT_WORKSPACE_MB, BuildSettings

__all__ = ["TensorRTBackend", "BuildSettings", "DEFAULT_WORKSPACE_MB", "build_engine_file",
           "engine_from_cache_or_build", "engine_metadata_path", "TENSORRT_INSTALL_MESSAGE", "import_tensorrt",
           "tensorrt_logger", "network_from_onnx_bytes", "engine_bytes_from_network", "engine_from_bytes",
           "ProfileShapes", "choose_precision", "input_axes", "network_creation_flags", "numpy_dtype",
           "parse_trt_version", "platform_has_fast_fp16", "profile_shapes", "select_io_api",
           "squeeze_output_shape", "uint8_rule_hint", "validate_precision_request"]
