"""Each ``--tta`` choice, on each CPU engine, as a user runs it: test Dice, images/s end to end and
peak RSS, in one run.

    python -m effiseg.benchmarks.tta_choices --images DATA/test/images --data DATA --out results/
    python -m effiseg.benchmarks.tta_choices ... --compare old-default.onnx   # a row for another model
    python -m effiseg.benchmarks.tta_choices ... --choices none --engines onnxruntime:fp32,openvino:bf16

Every row is ``effiseg-run`` in its own process (what a user starts: imports, model load, decoding,
inference, PNG writing) on the image folder, its masks scored by ``effiseg-score``: Dice independent
of the training code's evaluation. Seconds are the process's wall time; images/s is the run's own
summary (the pipeline, without start-up). Peak RSS is the kernel's high-water mark of that process
(``os.wait4``; not measured where it does not exist, e.g. Windows). ``--compare`` adds rows for other
ONNX files (the old default with TTA in its graph, a fixed-size export) run with ``--tta none``,
side by side in the same run. ``--repeats`` runs every row that many times, in turn, and keeps each
run; the table shows medians.

Writes ``tta_choices.json`` and ``tta_choices.csv`` (one line per run), each run's effiseg-run
summary, log and score beside them, and prints the table.
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click

from effiseg.runtime.cli import DEFAULT_MODEL
from effiseg.runtime.tta import TTA_CHOICES


def _run(cmd: list[str], log: Path) -> tuple[float, int | None, int]:
    """(wall seconds, peak RSS in bytes or None, exit status) of one command, its output in ``log``."""
    started = time.perf_counter()
    with open(log, "w", encoding="utf-8") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        if hasattr(os, "wait4"):
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
            peak = usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)
        else:
            proc.wait()
            peak = None
    return time.perf_counter() - started, peak, proc.returncode


def _tool(name: str) -> list[str]:
    """The console script of this environment (beside the running Python), else by name."""
    here = Path(sys.executable).parent
    for candidate in (here / name, here / f"{name}.exe"):
        if candidate.exists():
            return [str(candidate)]
    return [name]


@click.command(context_settings={"show_default": True, "help_option_names": ["-h", "--help"]})
@click.option("--images", type=click.Path(path_type=Path, exists=True, file_okay=False), required=True,
              help="Image folder (the test images).")
@click.option("--data", "data_root", type=click.Path(path_type=Path, exists=True, file_okay=False), required=True,
              help="Dataset root for effiseg-score (with --split).")
@click.option("--split", default="test")
@click.option("--model", type=click.Path(path_type=Path, exists=True, dir_okay=False), default=DEFAULT_MODEL,
              help="The model every --tta choice runs.")
@click.option("--choices", default=",".join(TTA_CHOICES), help="Comma-separated --tta choices.")
@click.option("--compare", "compare", multiple=True, type=(str, click.Path(path_type=Path, exists=True, dir_okay=False)),
              metavar="LABEL FILE", help="Also run FILE with --tta none as row LABEL (repeatable).")
@click.option("--engines", default="onnxruntime:fp32",
              help="Comma-separated BACKEND:PRECISION pairs each --tta choice runs on (CPU backends: "
                   "onnxruntime:fp32, onnxruntime:int8, openvino:fp32, openvino:bf16, openvino:int8).")
@click.option("--repeats", type=click.IntRange(1, 20), default=1)
@click.option("--batch", type=click.IntRange(1, 64), default=8)
@click.option("--out", "out_dir", type=click.Path(path_type=Path, file_okay=False), required=True)
def main(images, data_root, split, model, choices, compare, engines, repeats, batch, out_dir):
    """Run effiseg-run + effiseg-score for every --tta choice on every engine (and --compare models), one
    process each."""
    out_dir.mkdir(parents=True, exist_ok=True)
    pairs = [tuple(e.split(":", 1)) for e in engines.split(",") if e.strip()]
    if any(len(pair) != 2 for pair in pairs):
        raise click.BadParameter(f"--engines takes BACKEND:PRECISION pairs, not {engines!r}")
    default_engine = pairs == [("onnxruntime", "fp32")]  # rows keep their short labels
    rows = [(f"--tta {c}" + ("" if default_engine else f" {b} {p}"), model, c, b, p)
            for b, p in pairs for c in choices.split(",")]
    rows += [(label, path, "none", *pairs[0]) for label, path in compare]
    records = []
    with tempfile.TemporaryDirectory(prefix="effiseg-tta-") as scratch:
        for repeat in range(repeats):
            for label, path, choice, backend, precision in rows:
                slug = label.replace("--tta ", "tta-").replace(" ", "-")
                masks = Path(scratch) / f"{slug}-{repeat}"
                cmd = _tool("effiseg-run") + ["--input", str(images), "--output", str(masks), "--model", str(path),
                                              "--backend", backend, "--precision", precision, "--devices", "cpu",
                                              "--batch", str(batch),
                                              "--tta", choice, "--no-progress"]
                click.echo(f"[{repeat + 1}/{repeats}] {label}: {' '.join(cmd[1:])}", err=True)
                seconds, peak, status = _run(cmd, out_dir / f"{slug}-run{repeat}.log")
                record = {"label": label, "model": str(path), "tta": choice, "backend": backend,
                          "precision": precision, "repeat": repeat, "exit_status": status,
                          "seconds": round(seconds, 2), "peak_rss_bytes": peak,
                          # Other work on the machine slows every row: said beside each run.
                          "load_average_1min_after": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None}
                summary_file = masks / "effiseg_summary.json"
                if status == 0 and summary_file.is_file():
                    summary = json.loads(summary_file.read_text(encoding="utf-8"))
                    shutil.copy(summary_file, out_dir / f"{slug}-run{repeat}.summary.json")
                    record.update(n_images=summary["n_images"], images_per_s=summary["images_per_s"])
                    score = out_dir / f"{slug}-run{repeat}.score.json"
                    _, _, score_status = _run(_tool("effiseg-score") + [str(masks), "--data", str(data_root),
                                                                        "--split", split, "--output", str(score)],
                                              out_dir / f"{slug}-run{repeat}.score.log")
                    if score_status == 0:
                        record["mean_dice"] = json.loads(score.read_text(encoding="utf-8"))["mean_dice"]
                records.append(record)
                click.echo(f"    {json.dumps(record)}", err=True)
                shutil.rmtree(masks, ignore_errors=True)
    (out_dir / "tta_choices.json").write_text(json.dumps({"command": sys.argv, "records": records}, indent=2),
                                              encoding="utf-8")
    with open(out_dir / "tta_choices.csv", "w", newline="", encoding="utf-8") as f:
        fields = ["label", "tta", "backend", "precision", "repeat", "exit_status", "seconds", "images_per_s", "peak_rss_bytes", "mean_dice",
                  "n_images", "load_average_1min_after", "model"]
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(records)
    click.echo("| run | test Dice | seconds (process) | images/s (pipeline) | peak RSS GB |")
    click.echo("|---|---|---|---|---|")
    failed = False
    for label, *_ in rows:
        mine = [r for r in records if r["label"] == label and r["exit_status"] == 0 and "mean_dice" in r]
        if not mine:
            failed = True
            click.echo(f"| {label} | failed | | | |")
            continue
        rss = [r["peak_rss_bytes"] for r in mine if r["peak_rss_bytes"]]
        rss_text = f"{statistics.median(rss) / 1e9:.2f}" if rss else "n/a"
        click.echo(f"| {label} | {statistics.median(r['mean_dice'] for r in mine):.4f} | "
                   f"{statistics.median(r['seconds'] for r in mine):.1f} | "
                   f"{statistics.median(r['images_per_s'] for r in mine):.2f} | {rss_text} |")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":  # pragma: no cover
    main()
