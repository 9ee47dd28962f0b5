"""Files that travel with an effiseg ONNX model: its int8 twin for the CPU.

``effiseg-export --quantize int8`` writes ``NAME.int8.onnx`` beside ``NAME.onnx``; ``--precision int8``
runs that file. Kept beside the float model rather than inside it so that an inference install
that never asks for int8 loads no quantised weights, and a user sees both files for what they are.
"""
from __future__ import annotations

from pathlib import Path

INT8_SUFFIX = ".int8.onnx"


def int8_sibling(onnx_path) -> Path:
    """``model.onnx`` -> ``model.int8.onnx`` (an int8 file names itself)."""
    path = Path(onnx_path)
    if path.name.endswith(INT8_SUFFIX):
        return path
    return path.with_name(path.name[: -len(path.suffix)] + INT8_SUFFIX if path.suffix else path.name + INT8_SUFFIX)


def is_int8_model(onnx_path) -> bool:
    return Path(onnx_path).name.endswith(INT8_SUFFIX)


def resolve_int8(onnx_path) -> Path:
    """The int8 file for ``onnx_path``, or FileNotFoundError saying how to make it."""
    path = int8_sibling(onnx_path)
    if not path.is_file():
        raise FileNotFoundError(f"--precision int8 runs {path.name}, which is not beside {Path(onnx_path).name}: "
                                f"make it with effiseg-export {onnx_path} --quantize int8")
    return path
