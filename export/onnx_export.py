"""Checkpoint -> verified ONNX file with effiseg metadata.

Exporter: torch's TorchScript-based exporter (``dynamo=False``). In torch 2.14 the default is the
torch.export-based ("dynamo") exporter; for this network it takes minutes on a CPU instead of about
a second, and the TorchScript exporter already traces timm's dynamic "same" padding of the
tf_efficientnet_lite encoders as shape arithmetic (Shape/Ceil/Pad nodes), so one graph with
dynamic batch (and, with ``dynamic_hw``, dynamic height/width) is exact at every size, including
sizes that are not multiples of 32. Parity is checked at such a size whenever ``dynamic_hw`` is
set. (pyproject pins torch < 2.15, where the TorchScript exporter is still shipped.)

The decoder's nearest upsampling is the other size-dependent part. Traced as is, it becomes an ONNX
``Resize``, which at some sizes picks a neighbouring row or column of a feature map where PyTorch
does not (PyTorch rounds its index arithmetic to float32; at 369x341, for example, the default
Lite2 model's logits differed by up to ~2.4 in whole rows and columns). Dynamic-size exports, and
fixed sizes where that would happen, therefore trace the upsampling as gathers with PyTorch's own
index arithmetic (``training.model.upsample_nearest_like``); fixed sizes where Resize agrees (every
multiple of 32, the training size included) keep the faster Resize. The report says which.

``hw_multiple=32`` (``--dynamic-hw-x32``): dynamic height and width restricted to multiples of the
encoder's stride 32. There Resize agrees with PyTorch at every size and every feature map is the
input over an exact power of two, so the graph keeps the fast Resize upsampling and the folded
decoder's half-resolution sum; the metadata says so (``hw_multiple``) and the runtime runs such a
graph only at multiples of 32. This is what run-time multi-scale TTA (``--tta multiscale``) needs:
one plain network that also runs at the validation-chosen sizes (352 and 416 for the default).

Nothing is written at ``output`` unless the exported graph passes ``onnx.checker`` and matches
PyTorch in ONNX Runtime on real images: the file is built under a temporary name in the same
folder and renamed at the end. ``<output>.export.json`` records what was exported and the parity
numbers; a failed export writes ``<output>.export-failed.json`` instead.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from effiseg.runtime.images import (IMAGE_EXTENSIONS, TEMP_SUFFIX, ImageError, atomic_write_text, list_images,
                                    read_image)
from effiseg.runtime.model_config import TTA_SIZE_STEP as SIZE_STEP, ModelConfig, parse_tta_sizes
from effiseg.runtime.model_info import ModelInfo
from effiseg.runtime.replace_file import replace_with_retry
from effiseg.runtime.postprocess import fill_host_row, logit_threshold, resize_rgb
from effiseg.runtime.tensorrt_rules import tensorrt_uint8_problems

EXPORT_INSTALL_MESSAGE = "effiseg-export needs torch, timm, onnx and onnxruntime: pip install \"effiseg[export]\""
DEFAULT_OPSET = 17
INPUT_NAME = "images"
# Parity tolerances: float32 logits may differ by accumulated rounding, relative to their scale;
# float16 probabilities by about one half-precision step near 1.
LOGIT_RTOL = 1e-3
PROBABILITY_ATOL = 2e-3
BYTES_PER_VALUE_IN = {"uint8-nhwc": 1, "float32-nchw": 4}
BYTES_PER_VALUE_OUT = {"logits": 4, "probabilities": 2, "mask": 1}


class ExportError(RuntimeError):
    """The export failed or did not match PyTorch; nothing was written at the output path, unless
    ``model_written`` (a verified model whose report alone could not be written)."""

    def __init__(self, message: str, model_written: bool = False):
        super().__init__(message)
        self.model_written = model_written


def default_verify_dirs() -> list[Path]:
    """Where Kvasir-SEG validation images usually are: $EFFISEG_DATA, ../shared/data/kvasir-seg
    from the working folder (training's default) or beside the repository."""
    roots = []
    if os.environ.get("EFFISEG_DATA"):
        roots.append(Path(os.environ["EFFISEG_DATA"]))
    roots.append(Path("../shared/data/kvasir-seg"))
    roots.append(Path(__file__).resolve().parents[2] / "shared" / "data" / "kvasir-seg")
    return [r / "validation" / "images" for r in roots]


def bytes_per_image(height: int, width: int, input_format: str, output_format: str) -> dict:
    """Host<->device traffic per image for every format, and what the chosen pair saves."""
    pixels = height * width
    inputs = {fmt: 3 * pixels * b for fmt, b in BYTES_PER_VALUE_IN.items()}
    outputs = {fmt: pixels * b for fmt, b in BYTES_PER_VALUE_OUT.items()}
    chosen = inputs[input_format] + outputs[output_format]
    widest = inputs["float32-nchw"] + outputs["logits"]
    return {"input": inputs, "output": outputs, "chosen_input": inputs[input_format],
            "chosen_output": outputs[output_format], "chosen_total": chosen, "float32_total": widest,
            "saving_vs_float32": round(widest / chosen, 3),
            # The (N,H,W) layout versus (N,1,H,W) changes no byte count, only the shape.
            "output_layout": "NHW"}


def _synthetic_images(n: int, height: int, width: int) -> list[np.ndarray]:
    """Deterministic stand-ins (gradients, a bright ellipse, noise) when no real images exist."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    images = []
    for i in range(n):
        cy, cx = rng.uniform(0.3, 0.7) * height, rng.uniform(0.3, 0.7) * width
        blob = ((yy - cy) / (0.2 * height)) ** 2 + ((xx - cx) / (0.25 * width)) ** 2 < 1
        base = np.stack([xx / width * 180 + 40, yy / height * 120 + 60, np.full_like(xx, 90 + 20 * i)], axis=2)
        base[blob] += 60
        base += rng.normal(0, 8, base.shape)
        images.append(np.clip(base, 0, 255).astype(np.uint8))
    return images


def _read_readable(files: list[Path], count: int) -> tuple[list[np.ndarray], list[str]]:
    """Up to ``count`` decoded images, skipping (and naming) the ones that cannot be read."""
    images, skipped = [], []
    for f in files:
        if len(images) == count:
            break
        try:
            images.append(read_image(f))
        except ImageError as e:
            skipped.append(f"{f}: {e}")
    return images, skipped


def load_verify_images(verify_dir: Path | None, count: int, height: int,
                       width: int) -> tuple[list[np.ndarray], str, list[str]]:
    """(RGB images, where they came from, unreadable files skipped). ``verify_dir`` None: the
    default Kvasir folders, else synthetic images (said so in the report)."""
    if verify_dir is not None:
        verify_dir = Path(verify_dir)
        if not verify_dir.is_dir():
            raise ExportError(f"--verify-images folder not found: {verify_dir}")
        files = list_images(verify_dir)
        if not files:
            raise ExportError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {verify_dir}")
        images, skipped = _read_readable(files, count)
        if not images:
            raise ExportError(f"no readable image in {verify_dir}: " + "; ".join(skipped[:5]))
        return images, str(verify_dir.resolve()), skipped
    for candidate in default_verify_dirs():
        if candidate.is_dir():
            images, skipped = _read_readable(list_images(candidate), count)
            if images:
                return images, str(candidate.resolve()), skipped
    return _synthetic_images(count, height, width), "synthetic (no Kvasir-SEG validation images found)", []


class ExportStack(NamedTuple):
    """The libraries an export needs, imported once (an inference install lacks them)."""
    torch: object
    onnx: object
    ort: object
    effiseg_version: object
    SegmentationGraph: object


def _import_export_stack() -> ExportStack:
    try:
        import onnx
        import onnxruntime
        import torch
        from effiseg.training.checkpoint import effiseg_version

        from .wrapper import SegmentationGraph
    except ImportError as e:
        raise ExportError(f"{EXPORT_INSTALL_MESSAGE} [import failed: {e}]") from e
    return ExportStack(torch, onnx, onnxruntime, effiseg_version, SegmentationGraph)


def _trace_to_onnx(torch, graph, example, path: Path, info: ModelInfo, opset: int, dynamic_hw: bool) -> str:
    """TorchScript export with a dynamic batch axis (and height/width with ``dynamic_hw``)."""
    axes_in = {0: "batch"}
    axes_out = {0: "batch"}
    if dynamic_hw:
        h_axis, w_axis = (1, 2) if info.input_format == "uint8-nhwc" else (2, 3)
        axes_in.update({h_axis: "height", w_axis: "width"})
        axes_out.update({1: "height", 2: "width"})
    common = dict(input_names=[INPUT_NAME], output_names=[info.output_name], opset_version=opset)
    with warnings.catch_warnings():
        # The TorchScript exporter announces its deprecation, and the tracer warns about the
        # Python arithmetic of timm's padding, which the exported Shape/Ceil nodes reproduce.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        kwargs = dict(do_constant_folding=True, dynamic_axes={INPUT_NAME: axes_in, info.output_name: axes_out},
                      **common)
        try:
            torch.onnx.export(graph, (example,), str(path), dynamo=False, **kwargs)
        except TypeError as e:  # torch < 2.5 has no `dynamo` argument; its only exporter is this one
            if "dynamo" not in str(e):
                raise
            torch.onnx.export(graph, (example,), str(path), **kwargs)
    return "torchscript"


def _choose_upsampling(torch, model, height: int, width: int, dynamic_hw: bool) -> str | None:
    """How the EffiSegNet decoder's nearest upsampling is traced (``EffiSegNet.onnx_upsampling``):
    "gather" with dynamic height/width (exact at every size), else "resize" where an ONNX Resize
    picks PyTorch's rows and columns for every feature map at ``height`` x ``width`` and "gather"
    where it does not. None: the model has no EffiSegNet decoder."""
    from effiseg.training.model import resize_matches_interpolate

    nets = _decoders(model)
    if not nets:
        return None
    if dynamic_hw:
        return "gather"
    with torch.no_grad():
        feats = nets[0].encoder(torch.zeros(1, 3, height, width))
    agree = all(resize_matches_interpolate(f.shape[-2], height) and resize_matches_interpolate(f.shape[-1], width)
                for f in feats)
    return "resize" if agree else "gather"


def _decoders(model) -> list:
    """The EffiSegNet networks (original or folded for inference) inside ``model``."""
    from effiseg.training.inference_model import FoldedEffiSegNet
    from effiseg.training.model import EffiSegNet

    return [m for m in model.modules() if isinstance(m, (EffiSegNet, FoldedEffiSegNet))]


def _set_upsampling(model, mode: str | None) -> None:
    for m in _decoders(model):
        if mode is None:
            m.__dict__.pop("onnx_upsampling", None)  # back to the class default
        else:
            m.onnx_upsampling = mode


def _set_metadata(onnx, path: Path, info: ModelInfo) -> None:
    model = onnx.load(str(path))
    del model.metadata_props[:]
    for key, value in info.to_metadata().items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    # The tracer names the output's spatial dims after internal shape arithmetic (Castlogits_dim_1);
    # state what they are: the input's height and width (fixed numbers unless dynamic_hw).
    out_dims = model.graph.output[0].type.tensor_type.shape.dim
    for dim, value in zip(out_dims, ("batch", "height" if info.dynamic_hw else info.input_height,
                                     "width" if info.dynamic_hw else info.input_width)):
        if isinstance(value, str):
            dim.dim_param = value
        else:
            dim.dim_value = value
    model.producer_name = "effiseg"
    model.producer_version = info.version
    model.doc_string = (f"EffiSegNet {info.variant}: input {INPUT_NAME} {info.input_format}, output "
                        f"{info.output_name} (N,H,W) {info.output_format}")
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))


def _compare(ort_out: np.ndarray, ref_logits: np.ndarray, output_format: str, threshold: float) -> dict:
    """Parity of one batch: max abs error in the output's own units, mask agreement, pass/fail."""
    cut = logit_threshold(threshold)
    ref_mask = ref_logits > cut
    scale = max(1.0, float(np.abs(ref_logits).max()))
    logit_tol = LOGIT_RTOL * scale
    if output_format == "logits":
        err = float(np.abs(ort_out - ref_logits).max())
        ort_mask, ok = ort_out > cut, err <= logit_tol
    elif output_format == "probabilities":
        ref_prob = 1.0 / (1.0 + np.exp(-ref_logits.astype(np.float64)))
        err = float(np.abs(ort_out.astype(np.float64) - ref_prob).max())
        ort_mask, ok = ort_out.astype(np.float32) > threshold, err <= PROBABILITY_ATOL
    else:
        ort_mask = ort_out.astype(bool)
        err = float(np.count_nonzero(ort_mask != ref_mask))  # pixels, for mask outputs
        ok = True
    disagree = ort_mask != ref_mask
    # A mask may differ only where the reference logit sits within tolerance of the cut.
    if np.any(disagree & (np.abs(ref_logits - cut) > logit_tol)):
        ok = False
    return {"max_abs_error": err, "mask_agreement": float(1.0 - disagree.mean()),
            "mask_disagreeing_pixels": int(disagree.sum()), "logit_tolerance": logit_tol, "ok": bool(ok)}


def export_checkpoint(checkpoint, output, *, input_format: str = "uint8-nhwc", output_format: str = "logits",
                      dynamic_hw: bool = False, input_size: int | tuple[int, int] | None = None,
                      opset: int = DEFAULT_OPSET, hw_multiple: int = 1,
                      threshold: float | None = None, verify_dir: Path | None = None, verify_count: int = 4,
                      tta: bool | None = None, tta_sizes=None, fold: bool = True, log=print) -> dict:
    """Export a checkpoint to a verified ONNX file with effiseg metadata.

    The steps: load the checkpoint and apply the overrides to its config (:func:`load_for_export`),
    describe the graph to make (:func:`describe_graph`), fold the network for inference
    (:func:`prepare_graphs`), trace it to a temporary file with the metadata (:func:`trace_graph`),
    check it against PyTorch in ONNX Runtime (:func:`verify_graph`), and move it into place with
    its report (:func:`write_verified`). Nothing is left at ``output`` unless every step passed.

    Args:
        checkpoint: a checkpoint folder, its config.json or its .safetensors file.
        output: the ONNX file to write; ``<output>.export.json`` gets the report.
        input_format: "uint8-nhwc" (normalisation in the graph) or "float32-nchw".
        output_format: "logits", "probabilities" or "mask".
        dynamic_hw: dynamic height and width (any size) besides the dynamic batch.
        input_size: one side or (height, width) [default: the checkpoint's].
        opset: ONNX opset, 17 or newer.
        hw_multiple: 32 makes height and width dynamic for multiples of 32 only, keeping the fast
            graph (see the module docstring); 1: no restriction.
        threshold: replaces the checkpoint's threshold [default: the checkpoint's].
        verify_dir: images for the parity check [default: Kvasir-SEG validation images when
            found, else synthetic ones, said so in the report].
        verify_count: images in the parity check.
        tta: flip TTA in the graph [default: the checkpoint's].
        tta_sizes: multi-scale TTA sizes in the graph ("none" or () for none) [default: the checkpoint's].
        fold: trace the network rewritten for inference (``training.inference_model``: BatchNorm
            folded, the decoder's sum and first pointwise layers at half resolution), checked
            against the original network like everything else.
        log: receives progress lines and warnings.

    Returns:
        The report (also written as ``<output>.export.json``): formats, sizes, metadata, parity
        per size and batch, sha256 and size of the file.

    Raises:
        ExportError: anything failed; nothing was written at ``output`` (unless
            ``model_written``: a verified model whose report alone could not be written). A
            failed export after tracing writes ``<output>.export-failed.json``.

    Example:
        >>> report = export_checkpoint("training/weights/default", "model.onnx",
        ...                            hw_multiple=32, log=lambda line: None)  # doctest: +SKIP
        >>> report["ok"], report["parity"]["max_abs_error"] < 1e-2  # doctest: +SKIP
        (True, True)
    """
    dynamic_hw = _check_graph_options(opset, hw_multiple, dynamic_hw)
    stack = _import_export_stack()
    started = time.perf_counter()
    output = Path(output)
    _prepare_output(output)
    model, config = load_for_export(checkpoint, threshold=threshold, tta=tta, tta_sizes=tta_sizes)
    info = describe_graph(config, output, input_format=input_format, output_format=output_format,
                          dynamic_hw=dynamic_hw, input_size=input_size, hw_multiple=hw_multiple, log=log)
    info.version = stack.effiseg_version()
    info.extra = {"output_layout": "NHW", "opset": opset, "checkpoint": Path(checkpoint).name,
                  "torch": stack.torch.__version__, "encoder": config.encoder}
    graphs = prepare_graphs(stack, model, info, fold, checkpoint)
    # Before tracing (tens of seconds): a wrong --verify-images folder fails at once.
    h, w = info.input_height, info.input_width
    try:
        verify_images, verify_source, verify_skipped = load_verify_images(verify_dir, verify_count, h, w)
    except OSError as e:
        raise ExportError(f"cannot read the verification images ({e.filename or verify_dir}): "
                          f"{e.strerror or e}") from None
    for skipped in verify_skipped:
        log(f"warning: parity check skips an unreadable image: {skipped}")

    tmp = output.with_name(f".{output.name}.{os.getpid()}{TEMP_SUFFIX}")
    report = _start_report(checkpoint, output, opset, info, graphs)
    try:
        trace_graph(stack, graphs, info, tmp, opset, report, log)
        log(f"traced in {time.perf_counter() - started:.1f} s; checking and verifying against PyTorch")
        verify_graph(stack, graphs, info, tmp, verify_images, verify_source, verify_skipped, report, log)
        report["seconds"] = round(time.perf_counter() - started, 2)
        write_verified(tmp, output, report)
    except BaseException as e:
        try:
            tmp.unlink()
        except OSError:
            pass
        report["error"] = f"{type(e).__name__}: {e}"
        report.setdefault("seconds", round(time.perf_counter() - started, 2))
        _write_report(output.with_name(output.name + ".export-failed.json"), report)
        if isinstance(e, ExportError):
            raise
        if isinstance(e, Exception):
            raise ExportError(f"export of {checkpoint} failed: {type(e).__name__}: {e}") from e
        raise
    report_path = output.with_name(output.name + ".export.json")
    try:
        _write_report(report_path, report)
    except OSError as e:  # the model is written and verified; only its description is missing
        raise ExportError(f"{output} was written and verified, but its report {report_path} could not be "
                          f"written: {e.strerror or e}", model_written=True) from None
    return report


def _check_graph_options(opset: int, hw_multiple: int, dynamic_hw: bool) -> bool:
    """Refuse what no export can make; returns ``dynamic_hw`` (implied by ``hw_multiple`` 32)."""
    if opset < 17:
        raise ExportError(f"opset {opset} is too old; effiseg exports opset 17 or newer")
    if hw_multiple not in (1, SIZE_STEP):
        raise ExportError(f"hw_multiple must be 1 (any size) or {SIZE_STEP}, not {hw_multiple}")
    return dynamic_hw or hw_multiple != 1


def _prepare_output(output: Path) -> None:
    """The output folder exists, and a failure report from an earlier attempt is gone (it must not
    be read as this one's)."""
    stale_failure = output.with_name(output.name + ".export-failed.json")
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        stale_failure.unlink(missing_ok=True)
    except OSError as e:
        raise ExportError(f"cannot write to {output.parent}: {e.strerror or e} ({e.filename or output})") from None


def load_for_export(checkpoint, *, threshold: float | None = None, tta: bool | None = None,
                    tta_sizes=None) -> tuple:
    """(model on the CPU, its ``ModelConfig`` with the given overrides applied by ``dataclasses.replace``).

    Raises:
        ExportError: the checkpoint cannot be loaded, or an override is invalid.
    """
    from effiseg.training.checkpoint import load_model
    try:
        model, config = load_model(checkpoint, device="cpu")
    except Exception as e:  # missing files, a damaged safetensors file, weights of another variant...
        raise ExportError(f"cannot load the checkpoint {checkpoint}: {type(e).__name__}: {e}") from None
    overrides = {"threshold": threshold, "tta": tta}
    try:
        if tta_sizes is not None:
            overrides["tta_sizes"] = parse_tta_sizes(tta_sizes)
    except ValueError as e:
        raise ExportError(f"multi-scale TTA: {e}") from None
    try:
        config = dataclasses.replace(config, **{k: v for k, v in overrides.items() if v is not None})
    except ValueError as e:  # e.g. a threshold outside (0, 1)
        raise ExportError(f"cannot export {checkpoint}: {e}") from None
    return model, config


def describe_graph(config: ModelConfig, output: Path, *, input_format: str, output_format: str, dynamic_hw: bool,
                   input_size, hw_multiple: int, log) -> ModelInfo:
    """The ``ModelInfo`` of the graph to make from ``config``, after refusing what would not run as
    evaluated (baked-in multi-scale TTA at dynamic sizes, sizes off the ``hw_multiple`` grid) and
    warning about what the graph leaves out (small-region removal, recommended sizes)."""
    if config.tta_sizes and dynamic_hw:
        raise ExportError(f"multi-scale TTA (sizes {', '.join(map(str, config.tta_sizes))}) baked into the graph "
                          "needs a fixed input size: the sizes are squares chosen for the model's input size; export "
                          "without --dynamic-hw, or with --tta-sizes none (run-time --tta multiscale then uses the "
                          "recommendation in the metadata)")
    if config.min_region_px > 0:
        # The runtime thresholds the graph's output and does not remove small regions, so the ONNX
        # model would not reproduce the checkpoint's evaluated setting: say so rather than differ silently.
        log(f"warning: the checkpoint removes predicted regions below {config.min_region_px} px at evaluation; "
            "the exported model and effiseg-run do not, so their masks can differ from effiseg-eval's")
    try:
        info = ModelInfo.from_config(config, path=output, input_format=input_format, output_format=output_format,
                                     dynamic_hw=dynamic_hw, input_size=input_size)
    except ValueError as e:
        raise ExportError(str(e)) from None
    if hw_multiple != 1 and (info.input_height % hw_multiple or info.input_width % hw_multiple):
        raise ExportError(f"--dynamic-hw-x32 needs an input size that is a multiple of {hw_multiple}, not "
                          f"{info.input_height}x{info.input_width}")
    info.hw_multiple = hw_multiple if dynamic_hw else 1
    recommended = info.tta_recommended.get("sizes") or []
    if recommended and not dynamic_hw and any(s != info.input_height or s != info.input_width for s in recommended):
        log(f"note: the recommended multi-scale sizes {'+'.join(map(str, recommended))} need a graph that runs at "
            "them: this fixed-size export serves --tta none and flip only (export with --dynamic-hw-x32 for all)")
    return info


@dataclass
class Graphs:
    """What is traced and what it is checked against: ``traced`` (the network, folded for
    inference or not) wrapped as ``graph`` with the I/O formats, and ``reference`` (the network as
    trained, uint8 in, logits out), so a fold is verified end to end."""
    model: object
    traced: object
    graph: object
    reference: object

    @property
    def folded(self) -> bool:
        return self.traced is not self.model


def prepare_graphs(stack, model, info: ModelInfo, fold: bool, checkpoint) -> Graphs:
    """Fold the network for inference (``fold``) and wrap it and the reference with the pre- and
    post-processing the graph carries. Raises ExportError when the fold or the wrapping fails."""
    traced = model
    if fold:
        from effiseg.training.inference_model import FoldedEffiSegNet, FoldError, fold_for_inference
        try:
            traced = fold_for_inference(model, probe_size=(info.input_height, info.input_width))
        except FoldError as e:
            raise ExportError(f"folding the network for inference failed (export with --no-fold): {e}") from None
        if info.dynamic_hw and info.hw_multiple == 1 and isinstance(traced, FoldedEffiSegNet):
            # The half-resolution sum is exact only at multiples of 32: a graph for every size
            # must not freeze the traced size's choice (with hw_multiple 32 it is exact everywhere).
            traced.merge = "direct"
    info.extra["folded_for_inference"] = traced is not model
    # Traced on the CPU, so the flips' batching is said explicitly: one batch of 4N in the graph.
    try:
        graph = stack.SegmentationGraph(traced, info.mean, info.std, info.input_format, info.output_format,
                                        info.threshold, tta=info.tta, tta_sizes=info.tta_sizes,
                                        batch_flips=True).eval()
        reference = stack.SegmentationGraph(model, info.mean, info.std, "uint8-nhwc", "logits", info.threshold,
                                            tta=info.tta, tta_sizes=info.tta_sizes).eval()
    except ValueError as e:
        raise ExportError(f"cannot export {checkpoint}: {e}") from None
    return Graphs(model, traced, graph, reference)


def _start_report(checkpoint, output: Path, opset: int, info: ModelInfo, graphs: Graphs) -> dict:
    h, w = info.input_height, info.input_width
    return {"checkpoint": str(Path(checkpoint).resolve()), "onnx": str(output.resolve()), "opset": opset,
            "input_name": INPUT_NAME, "output_name": info.output_name, "input_format": info.input_format,
            "output_format": info.output_format, "input_size": [h, w], "dynamic_hw": info.dynamic_hw,
            "dynamic_axes": ["batch"] + (["height", "width"] if info.dynamic_hw else []),
            "hw_multiple": info.hw_multiple, "tta_recommended": info.tta_recommended,
            "output_shape": "(N, H, W)", "threshold": info.threshold, "tta": info.tta,
            "tta_sizes": list(info.tta_sizes),
            "bytes_per_image": bytes_per_image(h, w, info.input_format, info.output_format),
            "metadata": info.to_metadata(), "ok": False,
            "folded": graphs.folded, "decoder_merge": graphs.traced.merge if graphs.folded else None}


def trace_graph(stack, graphs: Graphs, info: ModelInfo, tmp: Path, opset: int, report: dict, log) -> None:
    """Trace ``graphs.graph`` to ``tmp`` (choosing the decoder's upsampling for the size), write the
    metadata and check the file against ``onnx.checker`` and TensorRT's uint8 rules (advisory)."""
    torch = stack.torch
    h, w = info.input_height, info.input_width
    if info.input_format == "uint8-nhwc":
        example = torch.randint(0, 256, (2, h, w, 3), dtype=torch.uint8)
    else:
        example = torch.randn(2, 3, h, w)
    report["upsampling"] = _choose_upsampling(torch, graphs.traced, h, w, info.dynamic_hw and info.hw_multiple == 1)
    _set_upsampling(graphs.traced, report["upsampling"])
    try:
        with torch.no_grad():
            report["exporter"] = _trace_to_onnx(torch, graphs.graph, example, tmp, info, opset, info.dynamic_hw)
    finally:
        _set_upsampling(graphs.traced, None)
    info.extra["exporter"] = report["exporter"]
    report["metadata"] = info.to_metadata()
    _set_metadata(stack.onnx, tmp, info)
    # TensorRT cannot be installed everywhere effiseg is exported: check its uint8 rules here.
    try:
        report["tensorrt_uint8_problems"] = tensorrt_uint8_problems(tmp)
    except Exception as e:  # advisory only: the export itself stands or falls on parity
        report["tensorrt_uint8_problems"] = None
        log(f"warning: could not check the graph against TensorRT's uint8 rules: {type(e).__name__}: {e}")
    for problem in report["tensorrt_uint8_problems"] or []:
        log(f"warning: TensorRT's ONNX parser would refuse this graph: {problem}")


def verify_graph(stack, graphs: Graphs, info: ModelInfo, tmp: Path, images: list[np.ndarray], source: str,
                 skipped: list[str], report: dict, log) -> None:
    """Parity of the traced file against the reference on ``images`` (see :func:`_verify`); raises
    ExportError when ONNX Runtime disagrees with PyTorch beyond tolerance."""
    report["parity"] = _verify(stack.torch, stack.ort, tmp, graphs.graph, graphs.reference, info, images, source)
    report["verify_images"] = report["parity"].pop("source")
    report["verify_images_skipped"] = skipped
    if report["verify_images"].startswith("synthetic"):
        log("warning: no Kvasir-SEG validation images found; parity checked on synthetic images "
            "(pass --verify-images DIR for real ones)")
    report["ok"] = all(p["ok"] for p in report["parity"]["checks"])
    if not report["ok"]:
        bad = [p for p in report["parity"]["checks"] if not p["ok"]]
        raise ExportError(f"ONNX Runtime disagrees with PyTorch beyond float32 tolerance: {bad}")


def write_verified(tmp: Path, output: Path, report: dict) -> None:
    """Move the verified ``tmp`` to ``output``, recording its size and digest in ``report``.

    The report of an earlier export is moved aside first: if it cannot be (open in a program on
    Windows), the old model stays as well; if the model then cannot be replaced, it goes back.
    Either way the model and the report beside it agree."""
    data = tmp.read_bytes()
    report["onnx_bytes"] = len(data)
    report["sha256"] = hashlib.sha256(data).hexdigest()
    old_report = output.with_name(output.name + ".export.json")
    report_aside = old_report.with_name(f".{old_report.name}.{os.getpid()}{TEMP_SUFFIX}")
    try:
        if old_report.exists():
            os.replace(old_report, report_aside)
    except OSError as e:
        raise ExportError(f"cannot replace {old_report} ({e.strerror or e}): close the program that has it "
                          f"open and export again; {output} was not changed") from None
    try:
        replace_with_retry(tmp, output)
    except BaseException:
        if report_aside.exists():
            os.replace(report_aside, old_report)
        raise
    report_aside.unlink(missing_ok=True)


def _write_report(path: Path, report: dict) -> None:
    atomic_write_text(path, json.dumps(report, indent=2, sort_keys=True, default=str))


def _verify(torch, ort, path: Path, graph, reference, info: ModelInfo, images: list[np.ndarray], source: str) -> dict:
    """Run the ONNX file in ONNX Runtime (CPU) and the PyTorch graph on the same resized images."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    h, w = info.input_height, info.input_width
    sizes = [(h, w)]
    if info.dynamic_hw and info.hw_multiple == 1:
        # Odd sizes, not multiples of 32: timm's 'same' padding differs there from the traced size,
        # and at 352 + 17 = 369 a Resize would upsample some rows from a neighbouring one.
        sizes.append((max(33, h + 17), max(33, w - 11)))
    elif info.dynamic_hw:
        # Multiples of 32 only: another one, and the recommended multi-scale sizes (what --tta
        # multiscale runs), each checked like the export size.
        extra = [(h + 2 * info.hw_multiple, w + 2 * info.hw_multiple)]
        extra += [(s, s) for s in info.tta_recommended.get("sizes") or []]
        sizes += [size for size in dict.fromkeys(extra) if size != (h, w)]
    checks = []
    for size in sizes:
        batch = np.stack([resize_rgb(im, *size) for im in images])
        if info.input_format == "uint8-nhwc":
            feed = batch
        else:
            feed = np.zeros((len(batch), 3) + size, np.float32)
            for row, rgb in zip(feed, batch):
                fill_host_row(row, rgb, info)
        with torch.no_grad():
            ref_logits = reference(torch.from_numpy(batch)).numpy()
        for n in sorted({1, len(batch)}):
            out = session.run(None, {INPUT_NAME: feed[:n]})[0]
            if out.shape != (n,) + size:
                checks.append({"size": list(size), "batch": n, "ok": False,
                               "error": f"output shape {out.shape}, expected {(n,) + size}"})
                continue
            check = _compare(out, ref_logits[:n], info.output_format, info.threshold)
            checks.append({"size": list(size), "batch": n, **check})
    return {"source": source, "n_images": len(images), "checks": checks,
            "max_abs_error": max(c.get("max_abs_error", float("inf")) for c in checks),
            "min_mask_agreement": min(c.get("mask_agreement", 0.0) for c in checks)}
