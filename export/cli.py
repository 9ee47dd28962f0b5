"""``effiseg-export``: a training checkpoint -> a verified ONNX file that runs on its own.

    effiseg-export runs/best/ -o model.onnx
    effiseg-export runs/best/ -o model-mask.onnx --output-format mask --dynamic-hw
    effiseg-export model.onnx --engine model.engine --precision fp16   (a TensorRT engine, built ahead of time)

Exit status 0 when the ONNX file was written and matches PyTorch, 1 otherwise (nothing written).
"""
from __future__ import annotations

from pathlib import Path

import click

from effiseg.runtime.cli import TTA_SIZES_OPTION
from effiseg.runtime.console import Command
from effiseg.runtime.hub import HubError, HubModel, ModelLocation, resolve_model
from effiseg.runtime.model_info import INPUT_FORMATS, OUTPUT_FORMATS

from .tensorrt_engine import build_engine_or_exit


def _fmt_bytes(n: int) -> str:
    return f"{n:,} B"


@click.command(cls=Command, context_settings={"show_default": True, "help_option_names": ["-h", "--help"]})
@click.argument("checkpoint", type=ModelLocation(exists=True))
@click.option("--output", "-o", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="ONNX file to write [default: model.onnx beside the checkpoint; for a Hub model, "
                   "./NAME.onnx].")
@click.option("--input-format", type=click.Choice(INPUT_FORMATS), default="uint8-nhwc",
              help="uint8-nhwc: raw RGB bytes, preprocessing in the graph; float32-nchw: the host normalises.")
@click.option("--output-format", type=click.Choice(OUTPUT_FORMATS), default="logits",
              help="logits (float32), probabilities (float16 sigmoid) or mask (uint8 0/1 at the threshold); "
                   "always shaped (N, H, W).")
@click.option("--dynamic-hw", is_flag=True, help="Dynamic height and width as well as batch (any size).")
@click.option("--dynamic-hw-x32", is_flag=True,
              help="Dynamic height and width, multiples of 32 only: keeps the fast graph of a fixed size and runs "
                   "at the recommended multi-scale TTA sizes (what effiseg-run --tta multiscale needs).")
@click.option("--input-size", type=click.IntRange(32), default=None,
              help="Square input size [default: the checkpoint's].")
@click.option("--threshold", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=None,
              help="Threshold stored in the metadata (and baked into mask outputs) [default: the checkpoint's].")
@click.option("--tta/--no-tta", default=None,
              help="Flip test-time augmentation inside the graph (4x compute) [default: the checkpoint's setting].")
@TTA_SIZES_OPTION
@click.option("--fold/--no-fold", default=True,
              help="Trace the network rewritten for inference (BatchNorm folded into convolutions, the decoder's sum "
                   "and first pointwise layers at half resolution; same output up to float rounding, checked).")
@click.option("--opset", type=click.IntRange(17), default=17)
@click.option("--verify-images", type=click.Path(path_type=Path), default=None,
              help="Folder of images for the parity check [default: Kvasir-SEG validation images].")
@click.option("--verify-count", type=click.IntRange(1, 64), default=4, help="Images used for the parity check.")
@click.option("--quantize", type=click.Choice(["int8"]), default=None,
              help="Also write NAME.int8.onnx for the CPU (--precision int8): static int8, calibrated on real images "
                   "and checked against the float model. CHECKPOINT may then be an exported .onnx file.")
@click.option("--calibration-images", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Images to calibrate int8 ranges on [default: Kvasir-SEG train images].")
@click.option("--calibration-count", type=click.IntRange(4, 512), default=32, help="Calibration images used.")
@click.option("--int8-min-agreement", type=click.FloatRange(0, 1), default=0.98,
              help="Refuse the int8 twin when its masks agree with the float model's on fewer pixels of some "
                   "verification image.")
@click.option("--engine", "engine_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also build a TensorRT engine of the ONNX file into this file (needs TensorRT and the GPU it is "
                   "for; runtime/README.md). CHECKPOINT may then be an exported .onnx file: then only that.")
@click.option("--precision", type=click.Choice(["auto", "fp16", "fp32"]), default="auto",
              help="Precision of the --engine build (auto: fp16 where the GPU has fast FP16).")
@click.option("--engine-batch", type=click.IntRange(1), default=8, help="Largest batch of the --engine build.")
@click.option("--engine-slots", type=click.IntRange(1, 8), default=2,
              help="Slots the --engine build serves (effiseg-run --slots; one optimisation profile each).")
@click.option("--device", default="cuda:0", help="GPU of the --engine build.")
def export_command(checkpoint, output, input_format, output_format, dynamic_hw, dynamic_hw_x32, input_size, threshold,
                   tta, tta_sizes, fold, opset, verify_images, verify_count, quantize, calibration_images,
                   calibration_count, int8_min_agreement, engine_path, precision, engine_batch, engine_slots, device):
    """Export CHECKPOINT (folder, config.json or .safetensors, or a Hugging Face Hub model
    hf://OWNER/NAME[@REVISION]) to ONNX with effiseg metadata, check it with onnx.checker and compare
    it with PyTorch in ONNX Runtime; writes OUTPUT and OUTPUT.export.json. With --quantize int8, also
    NAME.int8.onnx (CHECKPOINT may be an .onnx file: then only that)."""
    from .onnx_export import ExportError, export_checkpoint

    if dynamic_hw and dynamic_hw_x32:
        raise click.UsageError("--dynamic-hw (any size) and --dynamic-hw-x32 (multiples of 32) exclude each other")
    if isinstance(checkpoint, HubModel):
        # Never beside the checkpoint: that is the Hugging Face cache.
        output = output or Path(f"{checkpoint.name}.onnx")
        try:
            checkpoint = resolve_model(checkpoint, "checkpoint")
        except HubError as e:
            click.echo(f"export failed; {output} was not written or changed: {e}", err=True)
            raise SystemExit(1)
    elif checkpoint.suffix.lower() == ".onnx":
        if quantize is None and engine_path is None:
            raise click.UsageError(f"{checkpoint} is already an ONNX file: add --quantize int8 to make its int8 "
                                   "twin, --engine FILE to build a TensorRT engine, or pass a training checkpoint "
                                   "to export")
        if quantize:
            _quantize(checkpoint, calibration_images, calibration_count, verify_images, verify_count,
                      int8_min_agreement)
        if engine_path is not None:
            build_engine_or_exit(checkpoint, engine_path, precision, engine_batch, engine_slots, device)
        return
    if output is None:
        output = (checkpoint if checkpoint.is_dir() else checkpoint.parent) / "model.onnx"
    click.echo(f"exporting {checkpoint} -> {output} ({input_format} -> {output_format}, "
               f"{'dynamic batch/height/width' if dynamic_hw else 'dynamic batch, height/width multiples of 32' if dynamic_hw_x32 else 'dynamic batch'}, opset {opset})", err=True)
    try:
        report = export_checkpoint(checkpoint, output, input_format=input_format, output_format=output_format,
                                   dynamic_hw=dynamic_hw, input_size=input_size, opset=opset,
                                   hw_multiple=32 if dynamic_hw_x32 else 1, threshold=threshold, tta=tta,
                                   tta_sizes=tta_sizes, fold=fold,
                                   verify_dir=verify_images, verify_count=verify_count,
                                   log=lambda message: click.echo(message, err=True))
    except ExportError as e:
        if e.model_written:
            click.echo(f"export incomplete: {e}", err=True)
            raise SystemExit(1)
        failed = output.with_name(output.name + ".export-failed.json")
        details = f" (what was tried: {failed})" if failed.is_file() else ""
        click.echo(f"export failed; {output} was not written or changed{details}: {e}", err=True)
        raise SystemExit(1)
    b = report["bytes_per_image"]
    h, w = report["input_size"]
    parity = report["parity"]
    click.echo(f"bytes per image at {h}x{w}: input {_fmt_bytes(b['chosen_input'])} ({input_format}; "
               f"float32-nchw would be {_fmt_bytes(b['input']['float32-nchw'])}), output "
               f"{_fmt_bytes(b['chosen_output'])} ({output_format}; logits would be "
               f"{_fmt_bytes(b['output']['logits'])}): {b['saving_vs_float32']:.1f}x less than float32 in and out")
    unit = "pixels" if output_format == "mask" else "max abs error"
    click.echo(f"parity with PyTorch on {parity['n_images']} image(s) from {report['verify_images']}: "
               f"{unit} {parity['max_abs_error']:.3g}, mask agreement {parity['min_mask_agreement']:.6f} "
               f"({len(parity['checks'])} checks: sizes {sorted({tuple(c['size']) for c in parity['checks']})}, "
               f"batches {sorted({c['batch'] for c in parity['checks']})})")
    click.echo(f"wrote {output} ({report['onnx_bytes']:,} bytes, sha256 {report['sha256'][:16]}...) and "
               f"{output.name}.export.json in {report['seconds']} s")
    if quantize:
        _quantize(output, calibration_images, calibration_count, verify_images, verify_count, int8_min_agreement)
    if engine_path is not None:
        build_engine_or_exit(output, engine_path, precision, engine_batch, engine_slots, device)


def _quantize(onnx_path: Path, calibration_dir, count: int, verify_dir, verify_count: int,
              min_agreement: float) -> None:
    """--quantize int8: the int8 twin of ``onnx_path``, compared with it on the verification images."""
    from effiseg.runtime.model_info import ModelInfo

    from .onnx_export import ExportError, load_verify_images
    from .quantize import QuantizeError, quantize_int8

    try:
        info = ModelInfo.from_onnx(onnx_path)
        images, source, _ = load_verify_images(verify_dir, max(verify_count, 8), info.input_height, info.input_width)
        report = quantize_int8(onnx_path, calibration_dir, count, verify_images=images, min_agreement=min_agreement,
                               log=lambda message: click.echo(message, err=True))
    except (QuantizeError, ExportError, ValueError, OSError) as e:
        click.echo(f"int8 quantisation failed; no int8 model written: {e}", err=True)
        raise SystemExit(1)
    agreement = report["agreement_with_fp32"]
    click.echo(f"wrote {report['model']} ({report['onnx_bytes']:,} bytes) in {report['seconds']} s: masks agree with "
               f"the float model on {agreement['mean_mask_agreement']:.4%} of pixels (worst image "
               f"{agreement['min_mask_agreement']:.4%}) over {agreement['n_images']} image(s) from {source}")


if __name__ == "__main__":  # pragma: no cover
    export_command()
