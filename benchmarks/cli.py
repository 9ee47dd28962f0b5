"""``effiseg-bench``: latency and throughput of every inference backend against PyTorch FP32
eager, model-only and end to end, in interleaved rounds; table + JSON + PNG."""
from __future__ import annotations

import datetime as _dt
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import click

from effiseg.runtime.cli import TTA_CHOICE_OPTION
from effiseg.runtime.console import Command, print_backend_notes_live
from effiseg.runtime.hub import HubError, ModelLocation, resolve_model

from .analysis import SCHEMA, attach_efficiency, attach_speedups, headline, unequal_work_note
from .factory import SLOTS
from .machine import load_average, machine_info
from .memory import baseline_memory_note
from .report import (NoPlot, SchemaError, compare_results, format_comparison, format_report, load_result_file,
                     plot_throughput, write_json)
from .settings import BenchSettings, EndToEndFolders, plan_measurements
from .targets import BASELINE, TARGETS, default_devices, parse_names, resolve_targets

JSON_NAME, TEXT_NAME, PLOT_NAME = "effiseg_bench.json", "effiseg_bench.txt", "effiseg_bench.png"
FORMATS = {"uint8": "uint8-nhwc", "uint8-nhwc": "uint8-nhwc", "float32": "float32-nchw",
           "float32-nchw": "float32-nchw"}


class BenchError(click.ClickException):
    pass


class BenchInterrupted(click.ClickException):
    exit_code = 130


def _log(message: str) -> None:
    click.echo(message, err=True)


def parse_int_list(text: str, what: str) -> list[int]:
    try:
        values = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise click.BadParameter(f"{what}: expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise click.BadParameter(f"{what}: expected positive integers, got {text!r}")
    return sorted(set(values))


def parse_sizes(text: str | None) -> list[tuple[int, int]] | None:
    """"352", "256,352" or "384x320" (height x width) -> [(h, w), ...]."""
    if not text:
        return None
    sizes = []
    for part in text.split(","):
        part = part.strip().lower()
        if not part:
            continue
        try:
            h, _, w = part.partition("x")
            size = (int(h), int(w or h))
        except ValueError:
            raise click.BadParameter(f"--input-size: expected N or HxW, got {part!r}") from None
        if min(size) < 32:
            raise click.BadParameter(f"--input-size: {part} is below 32 pixels")
        sizes.append(size)
    return list(dict.fromkeys(sizes))  # "352,352x352" is one size: one configuration, one key


def parse_formats(text: str) -> list[str]:
    out = []
    for t in text.split(","):
        t = t.strip().lower()
        if not t:
            continue
        if t not in FORMATS:
            raise click.BadParameter(f"--input-formats: {t!r} is not one of uint8, float32")
        if FORMATS[t] not in out:
            out.append(FORMATS[t])
    if not out:
        raise click.BadParameter("--input-formats is empty")
    return out


def run_compare(paths: tuple[Path, Path], output: Path | None) -> None:
    try:
        a, b = (load_result_file(p) for p in paths)
    except SchemaError as e:
        raise BenchError(str(e)) from None
    cmp = compare_results(a, b)
    click.echo(format_comparison(cmp, str(paths[0]), str(paths[1])))
    if output is not None:
        import json
        output.mkdir(parents=True, exist_ok=True)
        target = output / "effiseg_bench_compare.json"
        target.write_text(json.dumps({"a": str(paths[0]), "b": str(paths[1]), **cmp}, indent=1), encoding="utf-8")
        _log(f"wrote {target}")


@click.command(cls=Command, context_settings={"show_default": True, "help_option_names": ["-h", "--help"]})
@click.option("--backends", default="all",
              help=f"Comma-separated: {', '.join(TARGETS)}, or all (those that can run here). "
                   f"{BASELINE} is the baseline and is always added when torch is installed.")
@click.option("--batch-sizes", default=None,
              help="Comma-separated batch sizes [default: 1,8,32 with a CUDA GPU, 1,8 on CPU-only machines].")
@click.option("--input-size", "input_size", default=None,
              help="Input size(s): N, HxW or a comma-separated list [default: the model's].")
@click.option("--input-formats", default="uint8,float32",
              help="ONNX input formats for model-only runs (uint8: preprocessing in the graph; float32: "
                   "numpy normalisation on the host). End-to-end runs use the first.")
@click.option("--rounds", type=click.IntRange(1, 1000), default=None,
              help="Interleaved rounds [default: 5 with a GPU, 3 on CPU].")
@click.option("--warmup", type=click.IntRange(1, 10000), default=None,
              help="Warm-up batches per configuration before the rounds [default: 10 GPU, 1 CPU]; "
                   "end-to-end configurations make at most 2 warm-up runs over a small folder.")
@click.option("--iters", type=click.IntRange(1, 100000), default=None,
              help="Timed batches per configuration per round [default: enough for --min-time, "
                   "at least 10 on GPUs / 2 on CPU, at most 200].")
@click.option("--min-time", type=click.FloatRange(0, None), default=None,
              help="Seconds per configuration per round when --iters is not given [default: 1.0 GPU, 0.5 CPU].")
@click.option("--mode", type=click.Choice(["model", "e2e", "both"]), default="both",
              help="model: tensors prepared, time submit+collect; e2e: image files -> mask files through "
                   "the pipeline; both (their ratio is the pipeline's efficiency).")
@click.option("--compute/--no-compute", default=None,
              help="Also time pure compute of torch backends (CUDA events, no copies) [default: on GPUs].")
@click.option("--images", "n_images", type=click.IntRange(1, 1000000), default=None,
              help="Images in the end-to-end folder [default: 256 with a GPU, 16 on CPU].")
@click.option("--images-from", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Folder to copy end-to-end images from [default: Kvasir-SEG test split when present, "
                   "else bundled samples, else synthetic images].")
@click.option("--workers", type=click.IntRange(1, 256), default=None,
              help="Pipeline decoder (and writer) threads in e2e runs [default: the runtime's].")
@click.option("--slots", type=click.IntRange(1, 8), default=SLOTS, show_default=True,
              help="Slots (host + device buffer sets) per backend, as effiseg-run --slots: end-to-end runs keep "
                   "up to this many batches in flight; model-only runs use one. More slots cost memory "
                   "(on GPUs, a set of activations each) and can keep a fast device busier at small batches.")
@click.option("--output", "-o", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Folder for effiseg_bench.json/.txt/.png [default: ./effiseg-bench].")
@click.option("--model", "-m", "model", type=ModelLocation(), default=None,
              help="An effiseg ONNX file (or a checkpoint folder), or a Hugging Face Hub model "
                   "hf://OWNER/NAME[@REVISION] (its ONNX file, else its checkpoint) [default: the runtime's "
                   "bundled model; without one, an untrained effisegnet-lite2 at 352 (timings only)].")
@click.option("--checkpoint", type=ModelLocation(), default=None,
              help="A training checkpoint, or a Hub model's (hf://OWNER/NAME[@REVISION]): torch backends run it, "
                   "ONNX variants are exported from it.")
@click.option("--devices", default=None,
              help="Devices for backends that run on several (torch): cpu, cuda:0, ... "
                   "[default: cuda:0 when torch sees a GPU, else cpu]. The first one's torch-eager is the baseline.")
@click.option("--threads", type=click.IntRange(1, 1024), default=None,
              help="CPU threads for both torch (torch.set_num_threads) and ONNX Runtime (intra-op), so CPU "
                   "backends compete with equal means [default: each library's own, one per core]. On a "
                   "shared machine fewer threads than cores make timings less sensitive to other jobs.")
@click.option("--settle", type=click.FloatRange(0, 10), default=None,
              help="Pause in seconds before each configuration's turn in a round, so that idle-spinning "
                   "thread pools of the previous backend stop first [default: 0.1 CPU, 0 GPU].")
@click.option("--cache-dir", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Exported ONNX files and untrained checkpoints [default: $EFFISEG_BENCH_CACHE or the "
                   "per-user cache folder].")
@click.option("--main-thread", is_flag=True,
              help="Time in the main thread instead of one thread per backend like the pipeline's runners "
                   "(a diagnosis: torch's CPU threading differs between the two).")
@click.option("--time-budget", type=click.FloatRange(0, None, min_open=True), default=None,
              help="Seconds for the whole run: no configuration is opened (built and warmed up) after "
                   "it, and no new round starts when it would end past it (the first round always runs, "
                   "with the configurations opened by then). The JSON is rewritten after every round, so a run "
                   "stopped by a limit or Ctrl-C keeps its finished rounds [default: no limit].")
@click.option("--no-plot", is_flag=True, help="Do not write the PNG plot.")
@TTA_CHOICE_OPTION
@click.option("--compare", "compare", nargs=2, type=click.Path(path_type=Path, dir_okay=False, exists=True),
              default=None, help="Compare two result files A.json B.json (ratios B/A per configuration) and exit.")
@print_backend_notes_live()
def bench_command(backends, batch_sizes, input_size, input_formats, rounds, warmup, iters, min_time, mode,
                  compute, n_images, images_from, workers, slots, output, model, checkpoint, devices, threads,
                  settle, cache_dir, main_thread, time_budget, no_plot, tta, compare):
    """Benchmark effiseg's inference backends against PyTorch FP32 eager."""
    if compare:
        run_compare(compare, output)
        return
    started, load_before = time.perf_counter(), load_average()
    settings = resolve_settings(devices, batch_sizes=batch_sizes, input_formats=input_formats, mode=mode,
                                compute=compute, rounds=rounds, warmup=warmup, iters=iters, min_time_s=min_time,
                                settle_s=settle, n_images=n_images, images_from=images_from, workers=workers,
                                slots=slots, threads=threads, main_thread=main_thread, time_budget_s=time_budget,
                                tta=tta)
    choice = choose_targets(backends, settings.devices)
    _set_torch_threads(settings.threads)
    _log("effiseg-bench: preparing models")
    models = prepare_models(model, checkpoint, cache_dir)
    sizes = parse_sizes(input_size) or [models.native_size]
    onnx_runnable = leave_out_what_cannot_run(choice, models, settings.input_formats, sizes)
    result_file = ResultFile(output or Path("effiseg-bench"), settings, models, choice, sizes, started, load_before)
    results = measure(settings, models, choice.targets, sizes, onnx_runnable, result_file)
    result_file.write_final(results, plot=not no_plot)
    failed = [r for r in results if r.get("error") and not _left_out_for_time(r)]
    if failed:
        raise BenchError(f"{len(failed)} configuration(s) failed: "
                         + "; ".join(f"{r['key']}: {r['error']}" for r in failed)[:2000])


def resolve_settings(devices: str | None, *, batch_sizes: str | None, input_formats: str, **options) -> BenchSettings:
    """The options as a :class:`BenchSettings`, defaults resolved for the devices (GPU or CPU)."""
    from effiseg.runtime.backends import parse_devices
    try:
        device_list = parse_devices(devices) if devices else default_devices()
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--devices") from None
    return BenchSettings.resolve(device_list, batches=parse_int_list(batch_sizes, "--batch-sizes") if batch_sizes else None,
                                 input_formats=parse_formats(input_formats), **options)


@dataclass
class TargetChoice:
    """The backends to time (``targets``), those left out with the reason (``skipped``, each marked
    ``explicit`` when asked for by name), and the names asked for (``asked``)."""
    targets: list
    skipped: list[dict]
    asked: set[str]
    baseline_label: str


def choose_targets(backends: str, devices: tuple[str, ...]) -> TargetChoice:
    """The backends that can run here; one asked for by name that cannot is an error (measuring the
    others and exiting 0 would read as a result for it)."""
    try:
        names = parse_names(backends)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--backends") from None
    explicit = bool(names) and names != ["all"]
    asked = set(names) if explicit else set()
    if explicit and BASELINE not in names:
        names = [BASELINE] + names  # added, not asked for: without torch it is skipped with the reason
    targets, skipped = resolve_targets(names, list(devices), explicit)
    for s in skipped:
        s["explicit"] = s["backend"] in asked
    refused = [s for s in skipped if s["explicit"]]
    if refused:
        raise click.BadParameter("; ".join(f"{s['backend']} on {s['device']} cannot run here: {s['reason']}"
                                           for s in refused) + ". Leave it out, or install what it needs.",
                                 param_hint="--backends")
    if not targets:
        raise BenchError("no backend can run here: " + "; ".join(f"{s['backend']}: {s['reason']}" for s in skipped))
    return TargetChoice(targets, skipped, asked, f"{BASELINE}@{devices[0]}")


def _set_torch_threads(threads: int | None) -> None:
    if threads:
        try:
            import torch
            torch.set_num_threads(threads)
        except ImportError:
            pass


def prepare_models(model, checkpoint, cache_dir):
    """The models every backend runs (``benchmarks.models.ModelSet``): Hub ids become files in the
    Hugging Face cache (--model its ONNX file, else its checkpoint)."""
    from .models import resolve_models
    try:
        model = resolve_model(model, "auto") if model else None
        checkpoint = resolve_model(checkpoint, "checkpoint") if checkpoint else None
        return resolve_models(model, checkpoint, cache_dir, log=_log)
    except (OSError, ValueError, KeyError, HubError) as e:
        raise BenchError(f"cannot prepare the model: {e}") from None


def leave_out_what_cannot_run(choice: TargetChoice, models, formats, sizes) -> set:
    """Move the targets that have no model to run into ``choice.skipped`` (an inference install
    without torch, timm or onnx runs what it can and says what it left out); returns the (format,
    size) pairs the ONNX backends can run. A target asked for by name that cannot run is an error."""
    targets, skipped = choice.targets, choice.skipped
    onnx_runnable, onnx_note = set(), None
    if any(t.spec.source == "onnx" for t in targets):
        onnx_runnable, onnx_note = models.onnx_configs(formats, sizes)
        if onnx_note:
            models.notes.append(onnx_note)
            _log(f"  {onnx_note}")
    left_out = [(t, onnx_note) for t in targets if t.spec.source == "onnx" and not onnx_runnable]
    left_out += [(t, "no checkpoint to run: building one needs torch and timm (pip install \"effiseg[train]\")")
                 for t in targets if t.spec.source == "checkpoint" and models.checkpoint is None]
    if any(t.spec.precision == "int8" for t in targets) and onnx_runnable:
        from effiseg.runtime.model_files import int8_sibling
        no_twin = [s for s in sizes if ("uint8-nhwc", s) not in onnx_runnable
                   or not int8_sibling(models.onnx_for("uint8-nhwc", s)).is_file()]
        if no_twin:
            left_out += [(t, "no int8 twin of the uint8 model beside it (effiseg-export MODEL.onnx --quantize int8)")
                         for t in targets if t.spec.precision == "int8"]
    for t, reason in left_out:
        skipped.append({"backend": t.name, "device": t.device, "reason": reason, "explicit": t.name in choice.asked})
        targets.remove(t)
    refused = [(t, reason) for t, reason in left_out if t.name in choice.asked]
    if refused:
        raise BenchError("; ".join(f"{t.label} cannot run: {reason}" for t, reason in refused))
    if not targets:
        raise BenchError("no backend can run here: " + "; ".join(f"{s['backend']}: {s['reason']}" for s in skipped))
    return onnx_runnable


def prepare_end_to_end_folders(settings: BenchSettings, work: Path, size: tuple[int, int]) -> tuple[EndToEndFolders, dict]:
    """The end-to-end image folder (and a small warm-up copy) in ``work``; returns the folders and
    where the images came from."""
    from .imagesets import prepare_image_folder
    folders = EndToEndFolders(work / "images", work / "warmup", work / "masks")
    try:
        source = prepare_image_folder(folders.images, settings.n_images, *size, source=settings.images_from)
    except ValueError as e:  # no images, or unreadable ones (named): the user's to fix, not a crash
        raise BenchError(str(e)) from None
    _log(f"  end-to-end folder: {settings.n_images} images from {source['source']}")
    folders.warmup.mkdir()
    for f in sorted(folders.images.iterdir())[:max(settings.batches)]:
        shutil.copyfile(f, folders.warmup / f.name)
    return folders, source


def measure(settings: BenchSettings, models, targets, sizes, onnx_runnable, result_file: "ResultFile") -> list[dict]:
    """Plan the measurements and run them in interleaved rounds, each finished round saved by
    ``result_file``; the backends are closed and the work folder removed at the end."""
    from .factory import make_factory
    from .runner import BackendPool, IterationPlan, run_rounds
    work = Path(tempfile.mkdtemp(prefix="effiseg-bench-"))
    pool = BackendPool(make_factory(models, settings.threads, settings.slots, tta=settings.tta), log=_log)
    try:
        folders, image_source = None, None
        if "e2e" in settings.modes:
            folders, image_source = prepare_end_to_end_folders(settings, work, sizes[0])
        measurements = plan_measurements(settings, targets, sizes, onnx_runnable, pool, folders)
        _log(f"effiseg-bench: {len(measurements)} configuration(s), {settings.rounds} round(s), "
             f"backends {', '.join(t.label for t in targets)}, batches {list(settings.batches)}, "
             f"sizes {['%dx%d' % s for s in sizes]}")
        result_file.begin(image_source)
        plan, e2e_plan = settings.iteration_plan(), IterationPlan(iters=1)
        deadline = result_file.started + settings.time_budget_s if settings.time_budget_s else None
        try:
            return run_rounds(measurements, settings.rounds, settings.warmup, plan, settle_s=settings.settle_s,
                              log=_log, plan_for=lambda cfg: e2e_plan if cfg.mode == "e2e" else plan,
                              worker_thread=not settings.main_thread, deadline=deadline,
                              on_round=result_file.save_round, open_deadline=deadline)
        except KeyboardInterrupt:
            done = result_file.rounds_done
            raise BenchInterrupted(f"interrupted; {done} finished round(s) are in {result_file.json_path}"
                                   if done else "interrupted before the first round finished; nothing was saved") from None
    finally:
        pool.close()
        if pool.left_open:
            # Its pipeline may still be writing masks there.
            _log(f"  the work folder {work} is left in place: a measurement was still running")
        else:
            shutil.rmtree(work, ignore_errors=True)


def _left_out_for_time(result: dict) -> bool:
    from .runner import was_left_out_for_time
    return was_left_out_for_time(result)


class ResultFile:
    """The result files of one run in ``output``: the JSON (schema ``SCHEMA``) and the table after
    every round, so a killed run keeps its finished rounds, then the plot at the end."""

    def __init__(self, output: Path, settings: BenchSettings, models, choice: TargetChoice, sizes,
                 started: float, load_before):
        self.output, self.settings, self.models, self.choice, self.sizes = output, settings, models, choice, sizes
        self.started, self.load_before = started, load_before
        self.json_path = output / JSON_NAME
        self.rounds_done = 0
        self.settings_json: dict = {}
        self.machine: dict = {}
        output.mkdir(parents=True, exist_ok=True)

    def begin(self, image_source: dict | None) -> None:
        """Called once the plan stands, just before the rounds: what the file's header records."""
        self.settings_json = self.settings.to_json(self.choice.targets, self.choice.baseline_label, self.sizes,
                                                   image_source)
        self.machine = machine_info()

    def assemble(self, results: list[dict], rounds_done: int, complete: bool) -> dict:
        """The result file's content: the results with their speed-ups and efficiencies, and notes
        on anything that makes them partial or unequal."""
        baseline_label = self.choice.baseline_label
        attach_speedups(results, baseline_label)
        attach_efficiency(results)
        data = {
            "schema": SCHEMA,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "command": ["effiseg-bench"] + sys.argv[1:],
            "machine": self.machine,
            "model": {**self.models.describe(), "input_sizes": [f"{h}x{w}" for h, w in self.sizes]},
            "settings": self.settings_json,
            "complete": complete,
            "rounds_completed": rounds_done,
            "results": results,
            "skipped": self.choice.skipped,
            "notes": list(self.models.notes),
            "headline": headline(results, baseline_label),
            "load_average_before": self.load_before,
            "load_average_after": load_average(),
            "duration_s": round(time.perf_counter() - self.started, 1),
        }
        data["notes"] += self._notes(results, rounds_done, complete)
        return data

    def _notes(self, results: list[dict], rounds_done: int, complete: bool) -> list[str]:
        notes = []
        rounds = self.settings.rounds
        if rounds_done < rounds:
            notes.append(f"{rounds_done} of {rounds} rounds were completed"
                         + ("" if complete else " (the run did not finish)"))
        left_out = [r["key"] for r in results if _left_out_for_time(r)]
        if left_out:
            notes.append(f"{len(left_out)} configuration(s) were not opened: the time budget ran out "
                         f"while opening the others ({', '.join(left_out)})")
        unequal = unequal_work_note(results)
        if unequal:
            notes.append(unequal)
        baseline_label = self.choice.baseline_label
        baseline_memory = baseline_memory_note(results, baseline_label)
        if baseline_memory:
            notes.append(baseline_memory)
        if not any(r["label"] == baseline_label and r.get("latency") for r in results):
            notes.append(f"the baseline {baseline_label} has no result: speed-ups are not available")
        return notes

    def save_round(self, partial: list[dict], rounds_done: int) -> None:
        """Rewritten after every round (atomically): a killed run keeps its finished rounds. The
        table goes with it; a plot from an earlier run in this folder would no longer match."""
        data = self.assemble(partial, rounds_done, complete=False)
        write_json(data, self.json_path)
        (self.output / TEXT_NAME).write_text(format_report(data) + "\n", encoding="utf-8")
        if rounds_done == 1:
            (self.output / PLOT_NAME).unlink(missing_ok=True)
        self.rounds_done = rounds_done
        _log(f"  saved {rounds_done} round(s) to {self.json_path}")

    def write_final(self, results: list[dict], plot: bool) -> None:
        """The complete JSON and table (the table also on stdout) and the throughput plot."""
        data = self.assemble(results, self.rounds_done, complete=True)
        json_path = write_json(data, self.json_path)
        text = format_report(data)
        (self.output / TEXT_NAME).write_text(text + "\n", encoding="utf-8")
        click.echo(text)
        _log(f"wrote {json_path}, {self.output / TEXT_NAME}")
        if plot:
            try:
                _log(f"wrote {plot_throughput(data, self.output / PLOT_NAME, self.choice.baseline_label)}")
            except NoPlot as e:
                _log(f"no plot: {e}")
