"""``effiseg-run``: segment a folder of images into PNG masks.

    effiseg-run --input frames/                       # -> frames_masks/, bundled model, backend auto
    effiseg-run --input frames/ --output out/ --model model.onnx --backend onnxruntime --devices cpu
    effiseg-run --input frames/ --model runs/best/ --backend torch --precision fp16 --devices 0,1

Exit status: 0 when every image got a mask, 1 when any image failed (listed in the summary), 2 for
bad options, 3 when the run could not start (model missing, no backend, bad folders), 4 when the run
started but stopped part-way (a backend or device failure -- three failed batches in a row -- or an
internal error: every mask file present is complete, and ``--resume`` continues), 130 when
interrupted with Ctrl-C (same: ``--resume``).
"""
from __future__ import annotations

import importlib.util
import sys
import warnings
from pathlib import Path

import click

from .backends import BACKEND_CHOICES, parse_devices
from .console import Command, print_backend_notes_live, unprinted_messages
from .hub import KIND_FOR_BACKEND, HubError, ModelLocation, resolve_model
from .images import DEFAULT_MAX_PIXELS
from .model_info import describe_tta, parse_tta_sizes
from .tta import TTA_CHOICES

DEFAULT_MODEL = Path(__file__).resolve().parent / "models" / "effisegnet-default.onnx"
EXIT_FAILED_FILES = 1
EXIT_CANNOT_START = 3
EXIT_RUN_STOPPED = 4
EXIT_INTERRUPTED = 130


def tta_sizes_option(ctx, param, value):
    """click callback shared by the commands that take ``--tta-sizes`` ("352,416", or "none");
    None (option not given) stays None: the model's own setting applies."""
    if value is None:
        return None
    try:
        return parse_tta_sizes(value)
    except ValueError as e:
        raise click.BadParameter(str(e), ctx=ctx, param=param) from None


# ``--tta-sizes`` as effiseg-export, -eval, -analyze and -model-card take it (one definition).
TTA_SIZES_OPTION = click.option(
    "--tta-sizes", default=None, callback=tta_sizes_option, metavar="SIZES",
    help="Multi-scale TTA: square sizes the network also runs at, e.g. 352,416 (multiples of 32; 'none': "
         "the input size only) [default: the model's setting].")


# ``--tta`` as effiseg-run, -eval and -bench take it (one definition; runtime/tta.py runs it).
TTA_CHOICE_OPTION = click.option(
    "--tta", "tta", type=click.Choice(TTA_CHOICES), default="none",
    help="Test-time augmentation: none (one network pass per image), flip (4 passes: the image and its "
         "flips) or multiscale (the setting chosen on validation, from the model's metadata: 352+416 with "
         "flips, 8 passes, for the bundled model). Extra passes buy accuracy with time and memory.")


class RunStopped(click.ClickException):
    exit_code = EXIT_RUN_STOPPED


class CannotStart(click.ClickException):
    exit_code = EXIT_CANNOT_START


def _echo(message: str) -> None:
    click.echo(message, err=True)


def _check_devices(ctx, param, value):
    """A device list that cannot be parsed is a usage error (exit 2), found before a model loads."""
    try:
        parse_devices(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None
    return value


@click.command(cls=Command, context_settings={"show_default": True, "help_option_names": ["-h", "--help"]})
# Strings, made Paths in the command: with --ray they may be URIs, which Path would mangle (s3:// -> s3:/).
@click.option("--input", "-i", "input_dir", required=True, type=click.Path(),
              help="Folder of images (jpg, jpeg, png, bmp, tif, tiff), or a video file or a folder of videos "
                   "(mp4, mkv, mov, avi, ...; needs effiseg[video]): a mask video, per-frame CSV/JSON.")
@click.option("--output", "-o", "output_dir", type=click.Path(), default=None,
              help="Mask folder [default: a sibling of the input named INPUT_masks]. Not the input "
                   "folder, nor inside it with --recursive.")
@click.option("--model", "-m", "model_path", type=ModelLocation(), default=None,
              help="An effiseg ONNX file, a training checkpoint folder for --backend torch, or a Hugging Face "
                   "Hub model hf://OWNER/NAME[@REVISION] (fetched once into the Hugging Face cache; needs "
                   "effiseg[hub]) [default: the bundled runtime/models/effisegnet-default.onnx].")
@click.option("--backend", type=click.Choice(BACKEND_CHOICES), default="auto",
              help="auto: TensorRT, else ONNX Runtime on the GPU, else ONNX Runtime on the CPU.")
@click.option("--devices", default=None, callback=_check_devices,
              help="cpu, a GPU index, or several (0,1: one backend per GPU) [default: auto and tensorrt: "
                   "every GPU like the first one (same model); torch: the same among the GPUs torch sees; "
                   "onnxruntime, or no GPU: the CPU].")
@click.option("--batch", type=click.IntRange(1, 1024), default=8, help="Images per batch (max batch size).")
@click.option("--precision", type=click.Choice(["auto", "fp32", "fp16", "bf16", "int8"]), default="auto",
              help="auto: fp16 where the backend and GPU run it fast, else fp32. bf16: OpenVINO on a CPU with native "
                   "bfloat16. int8: the CPU, running MODEL.int8.onnx (effiseg-export --quantize int8). The precision "
                   "used is reported.")
@click.option("--threshold", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=None,
              help="Probability cut [default: the model's own].")
@click.option("--overlay", is_flag=True, help="Also write OUTPUT/overlays/<image>.jpg: outline + translucent fill.")
@click.option("--frames", "frames_png", is_flag=True, help="Videos: also write one PNG mask per frame (frames/).")
@click.option("--regions", is_flag=True,
              help="Count each mask's 8-connected regions (polyps) in the summary [default: not counted: on a 2-core "
                   "CPU the count cost a quarter of the host side's images/s]. Videos count them always.")
@click.option("--recursive", "-r", is_flag=True, help="Include sub-folders (mirrored in the output).")
@click.option("--resume", is_flag=True, help="Skip images whose mask already exists and is complete.")
@click.option("--slots", type=click.IntRange(1, 8), default=2,
              help="Host/device buffers in rotation (2: preparing one batch overlaps running the other).")
@click.option("--workers", type=click.IntRange(1, 256), default=None,
              help="Decoder threads (also writer threads) [default: half the CPU count, 1 to 8].")
@click.option("--max-pixels", type=click.IntRange(1), default=DEFAULT_MAX_PIXELS,
              help="Larger images are refused with a per-file error (bounds memory; PIL's default limit).")
@click.option("--input-size", type=int, default=None,
              help="Run a --dynamic-hw model at this square input size instead of its export size.")
@click.option("--engine", "engine_file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="With --backend tensorrt: run this TensorRT engine, built ahead of time with effiseg-export "
                   "MODEL.onnx --engine FILE (checked against --model, the GPU and the TensorRT version), instead "
                   "of the engine cache.")
@TTA_CHOICE_OPTION
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@click.option("--ray", "ray_address", is_flag=False, flag_value="local", default=None, metavar="[auto|ADDRESS]",
              help="Run on Ray Data (needs effiseg[ray]): alone, a local Ray; auto, this machine's cluster; or "
                   "ray://HEAD:10001 / HEAD:6379. --input/--output may then be URIs (s3://, gs://, hdfs://).")
@click.option("--ray-actors", type=click.IntRange(1), default=None,
              help="With --ray: actors (one Segmenter each) [default: one per GPU, else one per CPU].")
@print_backend_notes_live()
def run_command(input_dir, output_dir, model_path, backend, devices, batch, precision, threshold, overlay,
                recursive, resume, slots, workers, max_pixels, input_size, engine_file, tta, no_progress, frames_png,
                ray_address, ray_actors, regions):
    """Segment every image of INPUT into 0/255 PNG masks at each image's own size, with a summary
    CSV/JSON (area fraction, regions, maximum probability, errors, throughput)."""
    from .backends import BackendUnavailable
    from .folder import FolderError, check_folders, default_output_dir
    from .folder_lock import FolderLockedError, OutputFolderLock
    from .segmenter import Segmenter

    # Images over --max-pixels get a per-file error from us; PIL's own warning adds nothing.
    from PIL import Image
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)

    if engine_file is not None:
        _check_engine_options(backend, ray_address)
    if ray_address is not None and frames_png:
        raise click.UsageError("--frames writes one PNG per video frame; --ray runs folders of images")
    if ray_address is not None:  # before anything treats INPUT as a local folder
        _print_folder_summary(_run_on_ray(input_dir, output_dir, model_path, backend, devices, precision, batch,
                                          threshold, tta, input_size, recursive, resume, overlay, max_pixels,
                                          ray_address, ray_actors, no_progress, regions))
        return
    input_dir, output_dir = Path(input_dir), None if output_dir is None else Path(output_dir)
    from .video import count_videos, is_video_input
    video = is_video_input(input_dir, recursive)
    if frames_png and not video:  # an image run already writes one PNG per image: say so, do not ignore it
        raise click.UsageError(f"--frames is for video input (one PNG per frame); {input_dir} is not a video "
                               "or a folder of videos, and an image run writes one mask PNG per image anyway")
    if not video and count_videos(input_dir, recursive):
        _echo(f"note: {count_videos(input_dir, recursive)} video file(s) in {input_dir} are left out: a run "
              "takes images or videos; give the videos a folder of their own, or --input one video")
    try:
        if video:
            out = _check_video_run(input_dir, output_dir)
        else:
            out = output_dir if output_dir is not None else default_output_dir(input_dir)
            check_folders(input_dir, out, recursive)
        # One run per output folder, checked before the model loads (a TensorRT build takes minutes)
        # and held until the command ends (run_folder enters it again). A folder that does not exist
        # yet is left uncreated until the model is ready; run_folder takes the lock then.
        if Path(out).is_dir():
            click.get_current_context().call_on_close(OutputFolderLock(out, _echo).acquire().release)
    except (FolderError, FolderLockedError) as e:
        raise CannotStart(str(e)) from None
    try:  # a Hub id becomes the file in the Hugging Face cache that this backend runs
        model = resolve_model(model_path, KIND_FOR_BACKEND.get(backend, "auto")) if model_path else DEFAULT_MODEL
    except HubError as e:
        raise CannotStart(str(e)) from None
    if not model.exists():
        if model_path is None:
            raise CannotStart(f"the bundled model {DEFAULT_MODEL} is not installed in this copy of effiseg; "
                              "pass --model MODEL.onnx (make one with effiseg-export)")
        raise CannotStart(f"model not found: {model}")
    if engine_file is None and backend in ("auto", "tensorrt") and importlib.util.find_spec("tensorrt") is not None:
        # The backend's own notes are printed once it is ready; a first engine build must not look
        # like a hang.
        _echo("preparing TensorRT: the first engine build for this model, GPU and batch can take several "
              "minutes (it is cached for later runs) ...")
    try:
        # A TensorRT engine build can take minutes: Ctrl-C there is an interruption too, not a crash.
        segmenter = Segmenter.from_model(model, backend=backend, devices=devices, precision=precision,
                                         max_batch=batch, slots=slots, threshold=threshold, workers=workers,
                                         input_size=input_size, tta=tta,
                                         **({} if engine_file is None else {"engine": engine_file}))
    except (BackendUnavailable, OSError, ValueError, RuntimeError) as e:  # no usable model/backend
        raise CannotStart(f"cannot start on {model}: {e}") from None
    except KeyboardInterrupt:
        _echo("interrupted while the backend was being prepared; nothing was written")
        sys.exit(EXIT_INTERRUPTED)
    with segmenter:
        for note in segmenter.selection_notes:
            _echo(note)
        for b in segmenter.backends:
            for message in unprinted_messages(b):
                _echo(f"{b.label}: {message}")
        _echo(f"model {model} ({segmenter.info.variant}, {segmenter.info.input_height}x"
              f"{segmenter.info.input_width}, {segmenter.info.output_format}); backend {segmenter.backend_name} "
              f"on {','.join(b.device for b in segmenter.backends)}, {segmenter.precision}, batch {batch}, "
              f"slots {slots}, {describe_tta(segmenter.info.tta, segmenter.info.tta_sizes)}"
              f"{'' if tta == 'none' else ' (--tta ' + tta + ')'}, threshold {segmenter.threshold:g}")
        recommended = segmenter.info.tta_recommended
        if tta == "none" and recommended:
            # The accuracy a user can buy with more passes is said once, never spent unasked.
            _echo(f"more accurate and slower: --tta multiscale runs this model's validation-chosen TTA, "
                  f"{describe_tta(recommended['flips'], recommended['sizes'])}")
        try:
            if video:
                from .video.run import run_videos
                summary = run_videos(segmenter, input_dir, out, recursive=recursive, resume=resume, overlay=overlay,
                                     frames=frames_png, max_pixels=max_pixels, progress=not no_progress, log=_echo)
            else:
                summary = segmenter.run_folder(input_dir, out, recursive=recursive, resume=resume, overlay=overlay,
                                               max_pixels=max_pixels, regions=regions, progress=not no_progress,
                                               log=_echo)
        except (FolderError, FolderLockedError) as e:
            raise CannotStart(str(e)) from None
        except OSError as e:  # e.g. an output folder that cannot be created or written (before any mask;
            # a write that fails once masks exist is a RecordWriteError: the run stopped part-way)
            raise CannotStart(f"cannot write the results to {out}: {e}") from None
        except KeyboardInterrupt:
            _echo(f"interrupted: every mask file in {out} is complete; run the same command with --resume "
                  "to finish")
            sys.exit(EXIT_INTERRUPTED)
        except Exception as e:  # not a per-file problem: a lost backend/device (BackendLost) or a bug
            raise RunStopped(f"the run stopped part-way: {type(e).__name__}: {e}. Every mask file in {out} "
                             "is complete; fix the cause and run the same command with --resume to finish") from None
    failed = [r for r in summary["files"] if r["status"] == "error"]
    if video:
        from .video.run import print_video_summary
        print_video_summary(summary, click.echo)
        sys.exit(EXIT_FAILED_FILES if failed else 0)
    _print_folder_summary(summary)


def _check_engine_options(backend: str, ray_address: str | None) -> None:
    """``--engine`` is a TensorRT engine: only the TensorRT backend, on this machine, can run it."""
    if backend != "tensorrt":
        raise click.UsageError(f"--engine runs a TensorRT engine, which needs --backend tensorrt (got --backend "
                               f"{backend}); leave --engine out to run the ONNX model on {backend}")
    if ray_address is not None:
        raise click.UsageError("--engine is not available with --ray (each Ray actor uses the engine cache of its "
                               "own machine)")


def _print_folder_summary(summary: dict) -> None:
    """The end of an image run (local or on Ray): counts, the first failures, where the results are;
    exit 1 when any image failed."""
    failed = [r for r in summary["files"] if r["status"] == "error"]
    click.echo(f"{summary['n_images']} image(s): {summary['n_ok']} ok, {summary['n_failed']} failed, "
               f"{summary['n_skipped']} skipped (resume); {summary['images_per_s']:.1f} images/s "
               f"over {summary['n_processed']} processed")
    for row in failed[:10]:
        click.echo(f"  FAILED {row['file']}: {row['error']}")
    if len(failed) > 10:
        click.echo(f"  ... and {len(failed) - 10} more (see the summary)")
    click.echo(f"masks: {summary['output_dir']}")
    click.echo("summary: " + " and ".join(p for p in (summary["summary_csv"], summary["summary_json"]) if p))
    if failed:
        sys.exit(EXIT_FAILED_FILES)


def _run_on_ray(input_location, output_location, model_path, backend, devices, precision, batch, threshold, tta,
                input_size, recursive, resume, overlay, max_pixels, address, actors, no_progress,
                regions) -> dict:
    from .ray_job import RayJobError, run_ray
    if overlay:
        raise click.UsageError("--overlay is not available with --ray (masks and the summary only)")
    try:
        model = resolve_model(model_path, KIND_FOR_BACKEND.get(backend, "auto")) if model_path else DEFAULT_MODEL
    except HubError as e:
        raise CannotStart(str(e)) from None
    if not Path(model).exists():
        raise CannotStart(f"model not found: {model}")
    try:
        return run_ray(str(input_location), None if output_location is None else str(output_location), model=model,
                       address=address, backend=backend, devices=devices, precision=precision, batch=batch,
                       threshold=threshold, tta=tta, input_size=input_size, recursive=recursive, resume=resume,
                       max_pixels=max_pixels, actors=actors, regions=regions, progress=not no_progress, log=_echo)
    except RayJobError as e:
        raise CannotStart(str(e)) from None
    except KeyboardInterrupt:
        _echo("interrupted: every mask file written is complete; run the same command with --resume to finish")
        sys.exit(EXIT_INTERRUPTED)
    except Exception as e:  # an actor that cannot open the model, a lost node...
        raise RunStopped(f"the Ray run stopped part-way: {type(e).__name__}: {e}. Every mask written is complete; "
                         "fix the cause and run the same command with --resume to finish") from None


def _check_video_run(input_path: Path, output_dir: Path | None) -> Path:
    """The output folder of a video run, checked before a model loads (CannotStart says why not)."""
    from .video import import_av
    from .video.run import VideoInputError, check_video_output, default_video_output
    try:
        import_av()
        out = output_dir if output_dir is not None else default_video_output(input_path)
        check_video_output(input_path, out)
    except (ImportError, VideoInputError) as e:
        raise CannotStart(str(e)) from None
    return out


def main() -> None:  # pragma: no cover - console entry convenience
    run_command()


if __name__ == "__main__":  # pragma: no cover
    main()
