"""What TensorRT refuses, checked without TensorRT: GPUs a release no longer supports, and uint8
tensors its ONNX parser does not take.

**GPUs.** Each TensorRT release supports compute capabilities from a minimum on (NVIDIA's release
notes and support matrices; runtime/INSTALL.md cites them): 8.6 dropped Maxwell (SM 5.x), so 8.5.3 is
Maxwell's last release; 10.0 needs SM 7.0, so 8.6.1 is Pascal's last; 10.5 removed Volta (SM 7.0),
so 10.4 is Volta's last. A newer TensorRT on an older GPU fails only at engine build ("Unsupported
SM"), after minutes of work and with a message that names no fix: :func:`tensorrt_gpu_problem` says
so up front, in one line that names the release that works. The TensorRT backend and
``effiseg-doctor`` both ask it.

**uint8.**
effiseg's graphs take uint8 images and may return uint8 masks, and uint8 is where TensorRT is
strict. The rules below are those of the onnx-tensorrt parser that TensorRT 8.6 and 10.x ship
(``ModelImporter.cpp``: "TensorRT does not support UINT8 types for intermediate tensors!";
``builtin_op_importers.cpp``, Cast: uint8 converts only to or from float/half); 8.5's parser, the
one for Maxwell, was not read: the same rules are assumed for it.

1. a uint8 tensor may be a network input or output, never an intermediate (a Transpose of the
   uint8 input, for example, is refused at node 0: cast first);
2. a Cast to uint8 must read float or half, and a Cast from uint8 must write float or half
   (bool -> uint8 is refused by TensorRT 8.6).

No TensorRT can be installed where effiseg is developed, so every export is checked against these
rules here (``effiseg-export`` records the result) and the TensorRT backend quotes them when its
parser fails. Only the uint8 rules are covered: TensorRT may refuse other things. It lives in the
runtime (it needs only onnx) because both use it, and the runtime never imports the export package.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from .install_matrix import LAST_TENSORRT, gpu_generation, install_command

# The first TensorRT release that no longer runs on each generation.
_TENSORRT_DROPPED = {"Maxwell": (8, 6, 0), "Pascal": (10, 0, 0), "Volta": (10, 5, 0)}


def parse_trt_version(version: str) -> tuple[int, int, int]:
    """``"8.6.1.post1"`` -> (8, 6, 1); ``"10.13.0.35"`` -> (10, 13, 0); unparsable -> (0, 0, 0)."""
    parts = re.findall(r"\d+", str(version).split("+")[0])[:3]
    if not parts:
        return (0, 0, 0)
    nums = [int(p) for p in parts] + [0, 0]
    return (nums[0], nums[1], nums[2])


def tensorrt_gpu_problem(trt_version: str, compute_capability: tuple[int, int], windows: bool | None = None,
                         python_tag: str = "311", gpu_name: str | None = None) -> str | None:
    """Why TensorRT ``trt_version`` cannot run on a GPU of this compute capability, in one line that
    names the last release for it and the command that installs it; None when it can (or the
    version cannot be read: then TensorRT itself decides)."""
    version = parse_trt_version(trt_version)
    generation = gpu_generation(tuple(compute_capability))
    dropped = _TENSORRT_DROPPED.get(generation)
    if version == (0, 0, 0) or dropped is None or version < dropped:
        return None
    windows = os.name == "nt" if windows is None else windows
    major, minor = compute_capability
    which = f"{generation}, {gpu_name}" if gpu_name else generation
    return (f"TensorRT {trt_version} does not support compute capability {major}.{minor} ({which}); "
            f"TensorRT {LAST_TENSORRT[generation]} is the last release for {generation} GPUs: "
            f"{install_command('tensorrt', generation, windows, python_tag)} (see runtime/INSTALL.md)")


_FLOATS = ("FLOAT", "FLOAT16")


def _type_names():
    from onnx import TensorProto
    return {v: k for k, v in TensorProto.DataType.items()}


def tensorrt_uint8_problems(model) -> list[str]:
    """Rule violations of an ONNX model (a ``ModelProto`` or a path), one readable line each;
    an empty list when the graph keeps to the rules."""
    import onnx

    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(Path(model)), load_external_data=False)
    graph = onnx.shape_inference.infer_shapes(model).graph
    names = _type_names()
    types: dict[str, str] = {}
    for value in [*graph.input, *graph.output, *graph.value_info]:
        if value.type.HasField("tensor_type"):
            types[value.name] = names.get(value.type.tensor_type.elem_type, "UNDEFINED")
    for init in graph.initializer:
        types[init.name] = names.get(init.data_type, "UNDEFINED")
    outputs = {o.name for o in graph.output}
    problems = []
    for index, node in enumerate(graph.node):
        label = f"node {index} ({node.op_type} '{node.name or node.output[0]}')"
        if node.op_type == "Cast":
            to = next((names.get(a.i, "UNDEFINED") for a in node.attribute if a.name == "to"), "UNDEFINED")
            source = types.get(node.input[0], "UNKNOWN")
            if to == "UINT8" and source not in (*_FLOATS, "UNKNOWN"):
                problems.append(f"{label} casts {source} to UINT8: TensorRT casts to UINT8 only from FLOAT or FLOAT16")
            if source == "UINT8" and to not in _FLOATS:
                problems.append(f"{label} casts UINT8 to {to}: TensorRT casts UINT8 only to FLOAT or FLOAT16")
        if node.op_type == "Constant":
            continue
        for name in node.output:
            if name and types.get(name) == "UINT8" and name not in outputs:
                problems.append(f"{label} produces the UINT8 intermediate '{name}': TensorRT takes UINT8 only "
                                "as a network input or output")
    return problems
