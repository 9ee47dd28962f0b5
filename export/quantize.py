"""INT8 for the CPU: an effiseg ONNX file -> a statically quantised twin, ``<name>.int8.onnx``.

ONNX Runtime's static quantisation in QDQ form: weights per output channel (int8), activations
per tensor (uint8), their ranges calibrated on real training images prepared exactly as the runtime
prepares them (``resize_rgb`` to the model's input size). The file keeps the effiseg metadata, so it
runs on its own; the runtime picks it with ``--precision int8``.

Why some nodes stay float: timm's TensorFlow-style "same" padding computes each strided
convolution's padding from the input's shape in float arithmetic (Shape -> Sub/Mul/Add -> Concat ->
Pad). Left to the quantiser, that Concat of pad sizes is quantised too, the pads round to other
integers and the feature maps shift by a pixel: test Dice fell from 0.9224 to 0.8478 on the bundled
one-pass model (measured on the 2-core EPYC, ``benchmarks/results/cpu-epyc-2core-int8-openvino``).
Every node that feeds a shape-like input (Pad's pads, Reshape's shape, Resize's scales/sizes, Slice's
bounds) is therefore kept out of quantisation, up to the Shape node that reads the data tensor.
"""
from __future__ import annotations

import contextlib
import json
import logging
import time
from pathlib import Path

import numpy as np

from effiseg.runtime.images import ImageError, list_images, read_image
from effiseg.runtime.model_files import int8_sibling
from effiseg.runtime.model_info import ModelInfo
from effiseg.runtime.postprocess import resize_rgb
from effiseg.runtime.replace_file import replace_with_retry

# Inputs (by position) that carry shapes, sizes or indices, not data, for the operators that have them.
_SHAPE_INPUTS = {"Pad": (1, 2, 3), "Reshape": (1,), "Resize": (1, 2, 3), "Slice": (1, 2, 3, 4),
                 "Expand": (1,), "Tile": (1,), "ConstantOfShape": (0,), "Upsample": (1,)}
DEFAULT_CALIBRATION_IMAGES = 32
# A quantised model that disagrees with its float original on more pixels than this (on real images)
# is refused: the shift bug above disagreed on ~9% of pixels, the working model on well under 1%.
MIN_MASK_AGREEMENT = 0.98


class QuantizeError(RuntimeError):
    """Quantisation failed or the result disagrees with the float model; nothing was written."""


def shape_arithmetic_nodes(graph) -> list[str]:
    """Names of the nodes whose outputs only feed shape-like inputs (see the module docstring)."""
    producer = {out: node for node in graph.node for out in node.output}
    keep_float: set[str] = set()
    todo = [node.input[i] for node in graph.node for i in _SHAPE_INPUTS.get(node.op_type, ())
            if i < len(node.input) and node.input[i]]
    while todo:
        node = producer.get(todo.pop())
        if node is None or node.name in keep_float:
            continue
        keep_float.add(node.name)
        if node.op_type != "Shape":  # a Shape reads only its input's size: stop before the data path
            todo.extend(node.input)
    return sorted(keep_float)


def calibration_images(folder: Path, count: int, height: int, width: int) -> tuple[list[np.ndarray], list[str]]:
    """``count`` images spread evenly over ``folder`` (sorted by name), resized as the runtime does;
    unreadable files are skipped and named."""
    files = list_images(folder)
    if not files:
        raise QuantizeError(f"no images in the calibration folder {folder}")
    step = max(1, len(files) // count)
    images, skipped = [], []
    for path in files[::step]:
        if len(images) == count:
            break
        try:
            images.append(resize_rgb(read_image(path), height, width))
        except ImageError as e:
            skipped.append(f"{path}: {e}")
    if not images:
        raise QuantizeError(f"no readable image in {folder}: " + "; ".join(skipped[:3]))
    return images, skipped


def default_calibration_dirs() -> list[Path]:
    """Kvasir-SEG training images where the export looks for validation images."""
    from .onnx_export import default_verify_dirs
    return [d.parent.parent / "train" / "images" for d in default_verify_dirs()]


def quantize_int8(fp32_path, calibration_dir=None, count: int = DEFAULT_CALIBRATION_IMAGES,
                  verify_images: list[np.ndarray] | None = None, min_agreement: float = MIN_MASK_AGREEMENT,
                  log=None) -> dict:
    """Write ``int8_sibling(fp32_path)`` and its ``.export.json`` report; returns the report.

    ``calibration_dir``: images to calibrate on (default: Kvasir-SEG train). ``verify_images``: RGB
    images at any size to compare the two models on (default: the calibration images' neighbours).
    Raises QuantizeError (nothing written) when, on some image, the two models' masks agree on fewer
    than ``min_agreement`` of the pixels.
    """
    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    say = log or (lambda message: None)
    started = time.perf_counter()
    fp32_path = Path(fp32_path)
    info = ModelInfo.from_onnx(fp32_path)
    if info.input_format != "uint8-nhwc":
        raise QuantizeError("int8 quantisation takes a uint8-nhwc export (the default)")
    # A file with dynamic height and width is calibrated at its own input size, the size it runs at
    # unless run-time multi-scale TTA asks for others; those reuse the same ranges.
    h, w = info.input_height, info.input_width
    if calibration_dir is None:
        calibration_dir = next((d for d in default_calibration_dirs() if d.is_dir()), None)
        if calibration_dir is None:
            raise QuantizeError("no calibration images: pass --calibration-images DIR (Kvasir-SEG train images "
                                "are the default, found through $EFFISEG_DATA)")
    calibration_dir = Path(calibration_dir)
    images, skipped = calibration_images(calibration_dir, count, h, w)
    say(f"calibrating int8 ranges on {len(images)} image(s) from {calibration_dir}")

    class Batches(CalibrationDataReader):
        def __init__(self):
            self._batches = iter([np.stack(images[i:i + 4]) for i in range(0, len(images), 4)])

        def get_next(self):
            batch = next(self._batches, None)
            return None if batch is None else {info.input_name: batch}

    out = int8_sibling(fp32_path)
    work = out.with_name(out.name + ".pre.tmp")
    tmp = out.with_name(out.name + ".tmp")
    try:
        # Shape inference and constant folding first, as ONNX Runtime advises; the symbolic pass
        # does not finish on the dynamic padding, and is not needed for a fixed-size graph.
        quant_pre_process(str(fp32_path), str(work), skip_symbolic_shape=True)
        keep_float = shape_arithmetic_nodes(onnx.load(str(work)).graph)
        with _quiet_root_logger():  # one warning per 1-D BatchNorm weight it leaves alone, on the root logger
            quantize_static(str(work), str(tmp), Batches(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=CalibrationMethod.MinMax, nodes_to_exclude=keep_float)
        model = onnx.load(str(tmp))
        meta = {p.key: p.value for p in model.metadata_props}
        meta["effiseg.precision"] = "int8"
        meta["effiseg.quantized_from"] = fp32_path.name
        del model.metadata_props[:]
        for key, value in meta.items():
            model.metadata_props.add(key=key, value=value)
        onnx.save(model, str(tmp))

        check = verify_images if verify_images is not None else images
        agreement = compare_models(ort, fp32_path, tmp, info, check)
        if agreement["min_mask_agreement"] < min_agreement:
            raise QuantizeError(f"the int8 model's masks agree with the float model's on only "
                                f"{agreement['min_mask_agreement']:.4f} of the pixels of one image (needs "
                                f"{min_agreement}); the float model stays the only one")
        replace_with_retry(tmp, out)  # Windows: a scanner holding the earlier twin for a moment
    finally:
        for leftover in (work, tmp, work.with_name(work.name + ".data")):
            leftover.unlink(missing_ok=True)
    report = {"model": out.name, "quantized_from": fp32_path.name, "method": "onnxruntime static QDQ, "
              "per-channel int8 weights, per-tensor uint8 activations, MinMax calibration",
              "calibration_dir": str(calibration_dir.resolve()), "calibration_images": len(images),
              "calibration_skipped": skipped, "nodes_kept_float": len(keep_float),
              "agreement_with_fp32": agreement, "min_agreement_required": min_agreement, "onnx_bytes": out.stat().st_size,
              "seconds": round(time.perf_counter() - started, 1)}
    out.with_name(out.name + ".export.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return report


@contextlib.contextmanager
def _quiet_root_logger():
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def compare_models(ort, fp32_path: Path, int8_path: Path, info: ModelInfo, images: list[np.ndarray]) -> dict:
    """Mask agreement (at the model's threshold) and the largest output difference, image by image."""
    h, w = info.input_height, info.input_width
    batch = np.stack([resize_rgb(im, h, w) for im in images])
    outputs = []
    for path in (fp32_path, int8_path):
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        outputs.append(session.run(None, {info.input_name: batch})[0].reshape(len(images), h, w).astype(np.float32))
    ref, q = outputs
    if info.output_format == "mask":
        agree = (ref > 0) == (q > 0)
        max_error = None
    else:
        cut = float(np.log(info.threshold / (1 - info.threshold))) if info.output_format == "logits" else info.threshold
        agree = (ref > cut) == (q > cut)
        max_error = float(np.abs(ref - q).max())
    per_image = agree.reshape(len(images), -1).mean(axis=1)
    return {"n_images": len(images), "min_mask_agreement": round(float(per_image.min()), 6),
            "mean_mask_agreement": round(float(per_image.mean()), 6), "max_abs_error": max_error}
