"""The improvement protocol of issue 5: arms x seeds, choices on validation, test used once.

    python -m effiseg.training.protocol train    --out runs/protocol --epochs 60 --parallel 12
    python -m effiseg.training.protocol evaluate --out runs/protocol
    python -m effiseg.training.protocol report   --out runs/protocol
    python -m effiseg.training.protocol ship     --out runs/protocol   # the winner becomes the default

* ``train`` trains every (arm, seed) with the same epochs, several processes at once (small models
  at batch 8 leave most of a large GPU idle, so concurrent runs cost little). ``--devices`` spreads
  them over GPUs (default: every visible GPU; on a two-GPU machine both work), each run on one
  GPU: the paper's batch of 8 is too small to split, so runs, not batches, are what get spread.
  ``--time-budget`` first measures the speed of concurrent runs and picks the epochs that fit.
* ``evaluate`` scores each run's best-on-validation checkpoint on validation and test under the
  inference-time candidates (flip TTA, a threshold chosen on validation, removal of small regions)
  and stores per-image test scores.
* ``report`` picks the winning configuration on validation alone, then reports test means and
  standard deviations over seeds and a paired bootstrap interval of the per-image Dice difference
  against the baseline.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import click
import numpy as np

from effiseg.runtime.console import Group

from .data import DEFAULT_DATA_ROOT
from .protocol_common import config_key, inference_configs, multiscale_sizes

# Training-time candidate fixes, each a config switch (``effiseg-train --set ...``).
ARMS: dict[str, list[str]] = {
    "baseline": [],
    "overlay_box": ["augment.overlay_box_p=0.5"],
    "boundary_loss": ["loss.boundary_weight=2.0"],
    "overlay_box+boundary_loss": ["augment.overlay_box_p=0.5", "loss.boundary_weight=2.0"],
    # Issue 21: augmentation matched to the shifts that cost the default Dice (training/reports/
    # robustness-default-32ep: loss of detail most, colour and tone a little; vignetting, border and
    # aspect nothing), trained when named with --arms; the default list stays issue 5's.
    "device_photometric": ["augment.wb_p=0.3", "augment.gamma_p=0.3", "augment.blur_p=0.3", "augment.jpeg_p=0.3",
                           "augment.noise_p=0.3"],
    "device_scale": ["augment.lowres_p=0.3"],
    # The robustness study's resolution shift as a training-time augmentation: area-downscaled by a
    # factor drawn over its whole range, 1 + 3 s for strengths s in [0, 1] (1x-4x), half the samples.
    "resolution_shift": ["augment.lowres_p=0.5", "augment.lowres_factor=[1.0,4.0]"],
    # Input resolution: 416 against the baseline's 352 (the multi-scale TTA's second size).
    "input_416": ["input_size=416"],
    # Distillation from the TTA ensemble: a teacher checkpoint's multi-scale + flip probability maps of
    # the training images (written once by `train --teacher`, stored in <out>/teacher/) beside the labels.
    "distill": ["loss.distill_weight=0.5", "teacher_maps={teacher_maps}"],
}
TEACHER_MAPS = "{teacher_maps}"  # the placeholder in an arm's switches, filled with the maps' path
DEFAULT_ARMS = ["baseline", "overlay_box", "boundary_loss", "overlay_box+boundary_loss"]


def _train_cmd(data, out_dir: Path, variant, input_size, epochs, seed, overrides, extra) -> list[str]:
    cmd = [sys.executable, "-c", "from effiseg.training.cli import train_command; train_command()",
           "--data", str(data), "--variant", variant, "--epochs", str(epochs), "--seed", str(seed),
           "--output", str(out_dir), "--no-progress"]
    if input_size:
        cmd += ["--input-size", str(input_size)]
    for o in overrides:
        cmd += ["--set", o]
    return cmd + list(extra)


def arm_switches(arm: str, teacher_maps: Path | None) -> list[str]:
    """An arm's effiseg-train --set switches, the teacher's maps filled in where it takes them."""
    switches = ARMS[arm]
    if any(TEACHER_MAPS in o for o in switches):
        if teacher_maps is None:
            raise click.UsageError(f"arm {arm!r} distils from a teacher: give --teacher CHECKPOINT")
        switches = [o.replace(TEACHER_MAPS, Path(teacher_maps).as_posix()) for o in switches]
    return switches


def write_teacher_maps(data, out: Path, teacher: Path, size: int, device: str, limit: int | None = None,
                       log=print) -> dict:
    """The teacher's TTA-ensemble maps of the training images at the training size, once, in
    ``<out>/teacher/`` (kept when a file of the same teacher and size is there: a resumed protocol).
    The teacher's recommended multi-scale TTA when its config has one, else flips at its input size
    and 64 px more (the protocol's multi-scale candidate). Returns what plan.json records."""
    from effiseg.runtime.model_info import parse_tta_recommendation

    from .checkpoint import read_config_file, resolve_checkpoint
    from .protocol_common import multiscale_sizes
    _, cfg_path = resolve_checkpoint(teacher)
    cfg = read_config_file(cfg_path)
    sizes = parse_tta_recommendation(cfg.tta_recommended).get("sizes") or list(multiscale_sizes(cfg.input_size))
    folder = out / "teacher"
    maps = folder / "teacher-train.npz"
    record = {"checkpoint": str(teacher), "maps": str(maps), "size": int(size), "tta": "multiscale",
              "tta_sizes": [int(v) for v in sizes], "limit": limit}
    record_path = folder / "teacher.json"
    if maps.is_file() and record_path.is_file() and json.loads(record_path.read_text(encoding="utf-8")) == record:
        log(f"teacher maps: {maps} (already written)")
        return record
    folder.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "effiseg.training.distill", str(teacher), "--data", str(data), "--split", "train",
           "--output", str(maps), "--size", str(size), "--tta", "multiscale",
           "--tta-sizes", ",".join(map(str, sizes)), "--device", device, *(["--limit", str(limit)] if limit else [])]
    log(f"teacher maps of {teacher} (flips at {'+'.join(map(str, sizes))}) on {device} ...")
    t0 = time.perf_counter()
    with (folder / "distill.log").open("w", encoding="utf-8") as fh:
        code = subprocess.call(cmd, stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONIOENCODING": "utf-8"})
    if code:
        raise click.ClickException(f"the teacher's maps failed (exit {code}); see {folder / 'distill.log'}")
    record["seconds"] = round(time.perf_counter() - t0, 1)
    record_path.write_text(json.dumps({k: v for k, v in record.items() if k != "seconds"}, indent=2), encoding="utf-8")
    return record


def _extra_value(extra, name: str) -> str | None:
    """The value of ``--name V`` or ``--name=V`` among the extra effiseg-train arguments (the last one)."""
    value = None
    for i, e in enumerate(extra):
        if e == name and i + 1 < len(extra):
            value = extra[i + 1]
        elif e.startswith(name + "="):
            value = e.split("=", 1)[1]
    return value


def resolve_devices(spec: str) -> list[str]:
    """``--devices`` -> the devices runs are spread over.

    ``auto``: every visible CUDA GPU (a machine with two GPUs trains on both), else the CPU;
    ``cpu``; ``0,1`` or ``cuda:0,cuda:1``. A device may be named twice to weight it.
    """
    import torch
    spec = (spec or "auto").strip()
    n_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if spec == "auto":
        if not n_gpus:
            from .trainer import warn_if_gpus_go_unused
            warn_if_gpus_go_unused()
        return [f"cuda:{i}" for i in range(n_gpus)] or ["cpu"]
    from effiseg.runtime.backends import parse_devices  # effiseg-run's device syntax, one item at a time
    devices = []
    for item in (x.strip() for x in spec.split(",")):
        if not item:
            continue
        try:
            (device,) = parse_devices(item)  # item by item: a device named twice is a weight here
        except ValueError:
            raise click.BadParameter(f"{item!r} is not a device: use auto, cpu, N or cuda:N",
                                     param_hint="--devices") from None
        if device != "cpu" and int(device[len("cuda:"):]) >= n_gpus:
            raise click.BadParameter(f"{item!r}: this machine has {n_gpus} CUDA GPU(s) visible"
                                     + (f" (cuda:0..cuda:{n_gpus - 1})" if n_gpus else ""), param_hint="--devices")
        devices.append(device)
    if not devices:
        raise click.BadParameter("no device given", param_hint="--devices")
    return devices


def _launch_all(jobs: list[tuple[str, list[str], Path]], parallel: int, log=print,
                devices: list[str] | None = None, placed: dict[str, str] | None = None,
                poll_s: float = 1.0) -> dict[str, int]:
    """Run (name, cmd, log_path) jobs, ``parallel`` at a time; returns exit codes.

    With ``devices``, each job gets ``--device D`` for the device running the fewest jobs at its
    start (earliest in the list on a tie), so N GPUs share the work evenly however long each job
    takes; ``placed`` receives name -> device.
    """
    pending, running, codes = list(jobs), {}, {}
    while pending or running:
        while pending and len(running) < parallel:
            name, cmd, log_path = pending.pop(0)
            device = None
            if devices:
                busy = [d for (_, _, _, d) in running.values()]
                device = min(dict.fromkeys(devices), key=lambda d: busy.count(d) / devices.count(d))
                cmd = [*cmd, "--device", device]
                if placed is not None:
                    placed[name] = device
            log_path.parent.mkdir(parents=True, exist_ok=True)
            fh = log_path.open("w", encoding="utf-8")
            # The child writes its log in UTF-8 on every system: on Windows a redirected stdout would
            # otherwise use the ANSI code page, which cannot print every path or symbol.
            child_env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
            running[name] = (subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=child_env), fh,
                             time.perf_counter(), device)
            log(f"started {name}" + (f" on {device}" if device else ""))
        for name, (proc, fh, t0, _) in list(running.items()):
            if proc.poll() is not None:
                fh.close()
                codes[name] = proc.returncode
                log(f"finished {name} (exit {proc.returncode}, {time.perf_counter() - t0:.0f}s)")
                del running[name]
        time.sleep(poll_s)
    return codes


def calibrate(data, out: Path, variant, input_size, parallel: int, extra=(), log=print,
              devices: list[str] | None = None) -> dict:
    """Seconds per full epoch when ``parallel`` runs share the machine (spread over ``devices``)."""
    jobs = []
    for i in range(parallel):
        d = out / "calibration" / f"c{i}"
        jobs.append((f"calibration-{i}", _train_cmd(data, d, variant, input_size, 2, 100 + i, [],
                                                   ["--limit-train", "160", "--no-test", *extra]), d / "train.log"))
    t0 = time.perf_counter()
    codes = _launch_all(jobs, parallel, log, devices)
    wall = time.perf_counter() - t0
    if any(codes.values()):
        raise RuntimeError(f"calibration runs failed: {codes} (see {out / 'calibration'})")
    ips, val_s = [], []
    for i in range(parallel):
        hist = json.loads((out / "calibration" / f"c{i}" / "metrics.json").read_text(encoding="utf-8"))
        last = hist[-1]  # the second epoch: after cudnn autotuning
        ips.append(last["train_images_per_s"])
        val_s.append(max(0.0, last["epoch_seconds"] - last.get("train_images", 160) / last["train_images_per_s"]))
    n_train = 800
    epoch_s = n_train / float(np.median(ips)) + float(np.median(val_s))
    result = {"parallel": parallel, "images_per_s_per_run": float(np.median(ips)),
              "aggregate_images_per_s": float(np.sum(ips)), "val_seconds": float(np.median(val_s)),
              "seconds_per_epoch": epoch_s, "calibration_wall_s": wall}
    (out / "calibration.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    return result


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """The improvement protocol: train arms x seeds, evaluate inference-time candidates, report with
    choices made on validation and paired bootstrap intervals, ship the winner as the default model."""


@main.command("train")
@click.option("--data", default=DEFAULT_DATA_ROOT, show_default=True, help="Kvasir-SEG root ($EFFISEG_DATA).")
@click.option("--out", type=click.Path(path_type=Path), required=True)
@click.option("--variant", default="effisegnet-lite2")
@click.option("--input-size", type=int, default=None)
@click.option("--arms", default=",".join(DEFAULT_ARMS), show_default=True,
              help="Training arms, comma-separated (each a set of effiseg-train --set switches).")
@click.option("--seeds", default="0,1,2", show_default=True, help="Seeds, comma-separated; every arm runs each.")
@click.option("--epochs", type=int, default=None, help="Same for every run (or chosen by --time-budget).")
@click.option("--time-budget", type=float, default=None, help="Seconds for all training; picks --epochs.")
@click.option("--min-epochs", type=int, default=10)
@click.option("--max-epochs", type=int, default=100)
@click.option("--parallel", type=int, default=4, help="Runs at once, over all devices together.")
@click.option("--devices", default="auto", show_default=True,
              help="Where runs train: auto (every visible GPU, else the CPU), cpu, 0,1 or cuda:0,cuda:1. "
                   "Each run starts on the device with the fewest runs at that moment.")
@click.option("--extra", multiple=True, help="Extra effiseg-train arguments for every run.")
@click.option("--runs-per-process", type=click.IntRange(1), default=1, show_default=True,
              help="Seeds of one arm trained together in one process (effiseg-train --seeds: one CUDA graph per "
                   "run, each on its own stream); --parallel then counts processes. Its log is the first run's.")
@click.option("--teacher", type=click.Path(path_type=Path, exists=True), default=None,
              help="Teacher checkpoint of the distill arm: its TTA-ensemble maps of the training images are written "
                   "once into <out>/teacher/ before the runs start.")
def train_cmd(data, out, variant, input_size, arms, seeds, epochs, time_budget, min_epochs, max_epochs, parallel,
              devices, extra, runs_per_process, teacher):
    """Train every (arm, seed) with the same epochs, several runs at once."""
    if any(e == "--device" or e.startswith("--device=") for e in extra):
        raise click.UsageError("give devices with --devices, not --extra --device")
    device_list = resolve_devices(devices)
    arm_names = [a for a in arms.split(",") if a]
    for a in arm_names:
        if a not in ARMS:
            raise click.UsageError(f"unknown arm {a!r}; known: {', '.join(ARMS)}")
    try:
        seed_list = [int(s) for s in seeds.split(",") if s.strip()]
    except ValueError:
        raise click.BadParameter(f"expected whole numbers separated by commas, got {seeds!r}", param_hint="--seeds") from None
    if not arm_names or not seed_list:
        raise click.UsageError("give at least one arm and one seed")
    distilling = [a for a in arm_names if any(TEACHER_MAPS in o for o in ARMS[a])]
    if distilling and teacher is None:
        raise click.UsageError(f"arm {distilling[0]!r} distils from a teacher: give --teacher CHECKPOINT")
    out.mkdir(parents=True, exist_ok=True)
    teacher_record = None
    if distilling:
        from .variants import get_variant
        limit = _extra_value(extra, "--limit-train")
        teacher_record = write_teacher_maps(data, out, teacher, int(input_size or get_variant(variant).input_size),
                                            device_list[0], int(limit) if limit else None, log=click.echo)
    n_runs = len(arm_names) * len(seed_list)
    parallel = max(1, min(parallel, n_runs))
    if epochs is None:
        if time_budget is None:
            raise click.UsageError("give --epochs or --time-budget")
        t0 = time.perf_counter()
        cal = calibrate(data, out, variant, input_size, parallel, extra, devices=device_list)
        left = time_budget - (time.perf_counter() - t0)
        waves = int(np.ceil(n_runs / parallel))
        startup_s = 25.0  # process start, data decode, model build, final test evaluation
        epochs = int((left / waves - startup_s) / cal["seconds_per_epoch"])
        click.echo(f"calibration: {cal}; {left:.0f}s left for {waves} wave(s) -> {epochs} epochs")
        epochs = max(min_epochs, min(max_epochs, epochs))
    maps = Path(teacher_record["maps"]) if teacher_record else None
    plan = {"variant": variant, "input_size": input_size, "arms": {a: arm_switches(a, maps) for a in arm_names},
            "seeds": seed_list, "epochs": epochs, "parallel": parallel, "runs_per_process": runs_per_process, "devices": device_list, "extra": list(extra)}
    if teacher_record:
        plan["teacher"] = teacher_record
    (out / "plan.json").write_text(json.dumps(plan, indent=2), encoding="utf-8")
    jobs = []
    groups = [seed_list[i:i + runs_per_process] for i in range(0, len(seed_list), runs_per_process)]
    for group in groups:            # seed-major order: every arm gets seed 0 first
        for arm in arm_names:
            d = out / "runs" / f"{arm}_s{group[0]}"
            cmd = _train_cmd(data, d, variant, input_size, epochs, group[0], plan["arms"][arm], extra)
            if len(group) > 1:
                cmd[cmd.index("--seed"):cmd.index("--seed") + 2] = ["--seeds", ",".join(map(str, group))]
                cmd[cmd.index("--output") + 1] = str(out / "runs" / f"{arm}_s{{seed}}")
            jobs.append(("+".join(f"{arm}_s{s}" for s in group), cmd, d / "train.log"))
    t0 = time.perf_counter()
    placed: dict[str, str] = {}
    codes = _launch_all(jobs, parallel, devices=device_list, placed=placed)
    plan.update(exit_codes=codes, run_devices=placed, train_wall_s=time.perf_counter() - t0)
    (out / "plan.json").write_text(json.dumps(plan, indent=2), encoding="utf-8")
    if any(codes.values()):
        click.echo(f"some runs failed: {codes}", err=True)
        sys.exit(1)


ROBUSTNESS_STRENGTH = 0.5  # effiseg-robustness's default --score-strength


def run_robustness_score(model, cfg: dict, samples, device, strength: float = ROBUSTNESS_STRENGTH) -> dict:
    """effiseg-robustness's score of a run (every shift at ``strength``, one network pass, the
    checkpoint's threshold, seed 0) on ``samples`` (validation): the score, its clean Dice and the
    per-image scores, in the samples' order, for paired comparisons of arms."""
    from .analysis.robustness import run_robustness
    from .analysis.shifts import SHIFTS
    result = run_robustness(model, cfg, samples, list(SHIFTS), [strength], strength, seed=0, device=device,
                            batch_size=16)
    score = result["score"]
    return {"score": score["robustness_score"], "clean_dice": score["clean_dice"], "strength": strength,
            "shifts": list(SHIFTS), "seed": 0, "threshold": result["settings"]["threshold"],
            "per_image": [score["per_image"][s.stem] for s in samples],
            "per_shift_drop": {n: d["mean_diff"] for n, d in score["per_shift_drop"].items()}}


def evaluate_run(run_dir: Path, data, device: str, limit: int | None = None, robustness: bool = True) -> dict:
    """Validation/test scores of a run's best checkpoint under each inference-time candidate, and
    (``robustness``) its robustness score on validation, one pass (effiseg-robustness's score)."""
    import torch
    from .checkpoint import load_model
    from .data import load_split
    from .evaluate import predict_logits, score_logits
    from .trainer import resolve_amp
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is not None:
        torch.cuda.set_device(dev)  # as a training run does: nothing lands on cuda:0 by default
    model, cfg = load_model(run_dir / "best.safetensors", device=dev)
    amp = resolve_amp("auto", dev)  # bf16/fp16 where the GPU has it, none on Maxwell/Pascal
    out = {"run": run_dir.name, "limit": limit, "val": {}, "test": {}}
    for split in ("validation", "test"):
        samples = load_split(data, split, limit)
        out[f"{split}_stems"] = [s.stem for s in samples]
        for tta, sizes in ((False, ()), (True, ()), (True, multiscale_sizes(cfg.input_size))):
            logits = predict_logits(model, cfg, [s.image for s in samples], dev, 16, tta, amp, sizes)
            for thr, mr in inference_configs():
                rows = score_logits(samples, logits, thr, mr)
                key = config_key(tta, thr, mr, sizes)
                entry = {k: [r[k] for r in rows] for k in ("dice", "iou", "precision", "recall")}
                if split == "validation":
                    out["val"][key] = float(np.mean(entry["dice"]))
                else:
                    out["test"][key] = entry
        if split == "validation" and robustness:
            out["robustness"] = run_robustness_score(model, cfg, samples, dev)
    return out


@main.command("evaluate")
@click.option("--data", default=DEFAULT_DATA_ROOT, show_default=True, help="Kvasir-SEG root ($EFFISEG_DATA).")
@click.option("--out", type=click.Path(path_type=Path, exists=True), required=True)
@click.option("--devices", "--device", "devices", default="auto", show_default=True,
              help="auto (every visible GPU, else the CPU), cpu, 0,1 or cuda:0,cuda:1.")
@click.option("--parallel", type=int, default=None,
              help="Runs evaluated at once, as separate processes [default: one per device].")
@click.option("--run", "only_run", default=None, help="Evaluate this one run folder name only.")
@click.option("--limit", type=int, default=None, help="Only the first N images of each split (smoke tests).")
@click.option("--robustness/--no-robustness", default=True, show_default=True,
              help="Also the robustness score on validation (effiseg-robustness's: every shift at strength 0.5, one "
                   "pass): 10 more passes over the validation images per run.")
def evaluate_cmd(data, out, devices, parallel, only_run, limit, robustness):
    """Score each run's best checkpoint under every inference-time candidate, and its robustness score."""
    device_list = resolve_devices(devices)
    if parallel is None:
        parallel = len(device_list)
    dest = out / "evaluations"
    dest.mkdir(exist_ok=True)
    runs = [d for d in sorted((out / "runs").iterdir()) if (d / "best.safetensors").exists()]
    if only_run:
        runs = [d for d in runs if d.name == only_run]
        if not runs:
            raise click.UsageError(f"no run {only_run!r} with a best checkpoint in {out / 'runs'}")
    if parallel > 1 and len(runs) > 1:
        jobs = [(f"eval-{d.name}", [sys.executable, "-m", "effiseg.training.protocol", "evaluate", "--data", str(data),
                                    "--out", str(out), "--run", d.name, "--parallel", "1",
                                    *(["--limit", str(limit)] if limit else []),
                                    *([] if robustness else ["--no-robustness"])],
                 dest / f"{d.name}.log") for d in runs]
        codes = _launch_all(jobs, parallel, devices=device_list)
        if any(codes.values()):
            click.echo(f"some evaluations failed: {codes}", err=True)
            sys.exit(1)
        return
    for run_dir in runs:
        t0 = time.perf_counter()
        res = evaluate_run(run_dir, data, device_list[0], limit, robustness)
        (dest / f"{run_dir.name}.json").write_text(json.dumps(res), encoding="utf-8")
        click.echo(f"evaluated {run_dir.name} in {time.perf_counter() - t0:.0f}s")


@main.command("report")
@click.option("--out", type=click.Path(path_type=Path, exists=True), required=True)
@click.option("--n-boot", type=click.IntRange(100), default=10000, show_default=True,
              help="Bootstrap resamples for the confidence intervals.")
def report_cmd(out, n_boot):
    from .protocol_report import build_protocol_report
    path = build_protocol_report(out, n_boot=n_boot)
    click.echo(f"wrote {path}")


@main.command("ship")
@click.option("--out", type=click.Path(path_type=Path, exists=True, file_okay=False), required=True,
              help="The protocol folder (protocol_results.json, runs/<winner>/best.safetensors).")
@click.option("--data", default=DEFAULT_DATA_ROOT, show_default=True, help="Kvasir-SEG root: the card's metrics are measured on it.")
@click.option("--to", "destination", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Model folder to replace [default: the package's training/weights/default].")
@click.option("--onnx", "onnx_path", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="ONNX file to replace [default: the runtime's bundled effisegnet-default.onnx].")
@click.option("--device", default="cpu", help="Where the card's metrics are measured (cpu reproduces effiseg-eval on a CPU).")
@click.option("--force", is_flag=True,
              help="Ship even a smoke-test protocol (limited runs or evaluations) or a model whose validation "
                   "Dice is below the current default's.")
@click.option("--speeds", "speeds_file", type=click.Path(path_type=Path, exists=True, dir_okay=False), default=None,
              help="tta_choices.json (python -m effiseg.benchmarks.tta_choices on the winner's model): images/s per "
                   "--tta choice for the card.")
def ship_cmd(out, data, destination, onnx_path, device, force, speeds_file):
    """Make the protocol's winner the default model: card folder + bundled ONNX (the plain network, one pass,
    TTA as a recommendation), swapped in only when both built."""
    from .model_card import read_speeds
    from .ship import ShipError, ship_winner
    if destination is None:
        destination = Path(__file__).resolve().parent / "weights" / "default"
    if onnx_path is None:
        from effiseg.runtime.cli import DEFAULT_MODEL
        onnx_path = Path(DEFAULT_MODEL)
    try:
        speeds = read_speeds(speeds_file) if speeds_file else None
        summary = ship_winner(out, destination, onnx_path, data, device, log=lambda m: click.echo(m, err=True),
                              force=force, speeds=speeds)
    except (ShipError, FileNotFoundError, ValueError) as e:
        raise click.ClickException(str(e)) from None
    (out / "shipped.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    click.echo(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
