"""Tiny effiseg-shaped ONNX models for the TensorRT tests, built with onnx.helper (no torch).

Each graph does what an effiseg export does at its edges (uint8 NHWC in, normalise, NCHW, one
conv, a logits / fp16 probabilities / uint8 mask out) so that engine building, buffer shapes,
dtype handling and the (N,1,H,W) squeeze are exercised in seconds. Opset 17 and IR version 8 keep
the files readable by TensorRT 8.6's parser.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from effiseg.runtime.model_info import ModelInfo


def tiny_info(size: int = 32, input_format: str = "uint8-nhwc", output_format: str = "logits",
              dynamic_hw: bool = False, variant: str = "tiny-test") -> ModelInfo:
    output_name = {"logits": "logits", "probabilities": "probabilities", "mask": "mask"}[output_format]
    return ModelInfo(path=None, variant=variant, input_height=size, input_width=size,
                     input_format=input_format, output_format=output_format,
                     mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), threshold=0.5,
                     dynamic_hw=dynamic_hw, input_name="images", output_name=output_name)


def make_tiny_onnx(path: Path, info: ModelInfo, seed: int = 0, static_batch: int | None = None) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    batch = static_batch if static_batch else "batch"
    h = "height" if info.dynamic_hw else info.input_height
    w = "width" if info.dynamic_hw else info.input_width
    nodes, inits = [], []
    weight = rng.normal(0, 0.5, size=(1, 3, 3, 3)).astype(np.float32)
    bias = np.array([0.1], np.float32)
    inits += [numpy_helper.from_array(weight, "conv_w"), numpy_helper.from_array(bias, "conv_b")]
    if info.input_format == "uint8-nhwc":
        inp = helper.make_tensor_value_info("images", TensorProto.UINT8, [batch, h, w, 3])
        mean = (np.array(info.mean, np.float32) * 255).reshape(1, 3, 1, 1)
        std = (np.array(info.std, np.float32) * 255).reshape(1, 3, 1, 1)
        inits += [numpy_helper.from_array(mean, "mean255"), numpy_helper.from_array(std, "std255")]
        nodes += [
            helper.make_node("Cast", ["images"], ["images_f"], to=TensorProto.FLOAT),
            helper.make_node("Transpose", ["images_f"], ["nchw"], perm=[0, 3, 1, 2]),
            helper.make_node("Sub", ["nchw", "mean255"], ["centred"]),
            helper.make_node("Div", ["centred", "std255"], ["normed"]),
        ]
        conv_in = "normed"
    else:
        inp = helper.make_tensor_value_info("images", TensorProto.FLOAT, [batch, 3, h, w])
        conv_in = "images"
    nodes.append(helper.make_node("Conv", [conv_in, "conv_w", "conv_b"], ["logits_raw"], pads=[1, 1, 1, 1]))
    if info.output_format == "logits":
        nodes.append(helper.make_node("Identity", ["logits_raw"], ["logits"]))
        out = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 1, h, w])
    elif info.output_format == "probabilities":
        nodes += [helper.make_node("Sigmoid", ["logits_raw"], ["prob32"]),
                  helper.make_node("Cast", ["prob32"], ["probabilities"], to=TensorProto.FLOAT16)]
        out = helper.make_tensor_value_info("probabilities", TensorProto.FLOAT16, [batch, 1, h, w])
    else:
        inits.append(numpy_helper.from_array(np.array(info.threshold, np.float32), "threshold"))
        nodes += [helper.make_node("Sigmoid", ["logits_raw"], ["prob32"]),
                  helper.make_node("Greater", ["prob32", "threshold"], ["above"]),
                  # bool -> float -> uint8, as effiseg's exporter does: TensorRT 8.6 casts to uint8 from float only.
                  helper.make_node("Cast", ["above"], ["above_f"], to=TensorProto.FLOAT),
                  helper.make_node("Cast", ["above_f"], ["mask"], to=TensorProto.UINT8)]
        out = helper.make_tensor_value_info("mask", TensorProto.UINT8, [batch, 1, h, w])
    graph = helper.make_graph(nodes, "tiny_effiseg", [inp], [out], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                              producer_name="effiseg-tests")
    model.ir_version = 8
    for key, value in info.to_metadata().items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(model)
    path = Path(path)
    onnx.save(model, str(path))
    return path


def random_batch(info: ModelInfo, n: int, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if info.input_format == "uint8-nhwc":
        return rng.integers(0, 256, size=(n, info.input_height, info.input_width, 3), dtype=np.uint8)
    return rng.normal(0, 1, size=(n, 3, info.input_height, info.input_width)).astype(np.float32)


def onnxruntime_reference(path: Path, batch: np.ndarray) -> np.ndarray:
    """The model's output on the CPU, squeezed to (N, H, W) like the backends return it."""
    import onnxruntime as ort
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = session.run(None, {session.get_inputs()[0].name: batch})[0]
    return out.reshape(out.shape[0], out.shape[-2], out.shape[-1])


def export_effisegnet_onnx(path: Path, variant: str = "effisegnet-lite0", size: int = 64,
                           output_format: str = "logits") -> tuple[Path, ModelInfo]:
    """A real (untrained, deterministic) EffiSegNet exported by effiseg's own exporter (the graph
    effiseg-export writes: uint8 NHWC in, normalisation in the graph, dynamic batch)."""
    import torch

    from effiseg.export.onnx_export import export_checkpoint
    from effiseg.training.checkpoint import model_config, save_checkpoint
    from effiseg.training.model import build_model

    torch.manual_seed(0)
    checkpoint = Path(path).with_suffix("")
    save_checkpoint(checkpoint, build_model(variant).eval(), model_config(variant, input_size=size))
    export_checkpoint(checkpoint, path, output_format=output_format, verify_count=1, log=lambda *a, **k: None)
    return Path(path), ModelInfo.from_onnx(path)
