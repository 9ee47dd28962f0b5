"""What TensorRT's ONNX parser refuses about uint8, checked without TensorRT.

effiseg's graphs take uint8 images and may return uint8 masks, and uint8 is where TensorRT is
strict. The rules below are those of the onnx-tensorrt parser that TensorRT 8.6 and 10.x ship
(``ModelImporter.cpp``: "TensorRT does not support UINT8 types for intermediate tensors!";
``builtin_op_importers.cpp``, Cast: uint8 converts only to or from float/half):

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

from pathlib import Path

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
