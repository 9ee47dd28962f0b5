"""The pipeline ceiling of one revision with its files in different folders, and what creating a file
costs in each: how much of the ceiling is the folder's file system rather than effiseg's host work.

Found while profiling issue 23's ceiling (py-spy, 1 decoder + 1 writer): in this project's VM the
``os.open(..., O_CREAT)`` of each mask's temporary file took a quarter of the pipeline's samples when the
masks went under ``/tmp`` (where ``ceiling_ab`` and ``host_profile`` put them), several times less under a
folder of the project's own checkout on the same ext4 disk, and next to nothing on tmpfs. The code
is the same; only where the files go differs. Each round runs a fresh process per folder (order
rotating) doing what ``ceiling_ab``'s child does, then times ``--probe-files`` bare file creations
(open with O_CREAT|O_EXCL, close) in a new folder there:

    python -m effiseg.benchmarks.lab.ceiling_by_folder --images ../shared/data/kvasir-seg/test/images \\
        --folder /tmp --folder . --folder /dev/shm --out benchmarks/results/host-pipeline-2026-12-08/round4/ceiling_by_folder.json
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click

from .ceiling_ab import _load_average


def _create_cost_us(folder: Path, n: int) -> float:
    """Microseconds per empty file created (and closed) in a fresh folder under ``folder``."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        t0 = time.perf_counter()
        for i in range(n):
            os.close(os.open(os.path.join(tmp, f"{i}.png.tmp"), flags, 0o666))
        return (time.perf_counter() - t0) / n * 1e6


@click.command()
@click.option("--images", "images_dir", type=click.Path(exists=True, file_okay=False), required=True)
@click.option("--folder", "folders", multiple=True, required=True,
              type=click.Path(exists=True, file_okay=False, path_type=Path), help="a folder to put the files under (repeat)")
@click.option("--n-images", type=click.IntRange(8), default=400, show_default=True)
@click.option("--threads", default="1,2", show_default=True, help="k decoder + k writer threads, comma-separated")
@click.option("--runs", type=click.IntRange(1), default=3, show_default=True, help="timed runs per process")
@click.option("--rounds", type=click.IntRange(1), default=4, show_default=True)
@click.option("--probe-files", type=click.IntRange(10), default=400, show_default=True)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True, help="result JSON")
def main(images_dir, folders, n_images, threads, runs, rounds, probe_files, out):
    from effiseg.benchmarks.machine import cpu_model
    folders = [f.resolve() for f in folders]
    ks = [x.strip() for x in threads.split(",") if x.strip()]
    raw = {str(f): [] for f in folders}
    create_us = {str(f): [] for f in folders}
    loads = []
    for r in range(rounds):
        for f in folders[r % len(folders):] + folders[:r % len(folders)]:  # rotate the order each round
            click.echo(f"round {r + 1}/{rounds}: {f}", err=True)
            text = subprocess.check_output(
                [sys.executable, "-m", "effiseg.benchmarks.lab.ceiling_ab", "--child", "--base", "-", "--images",
                 str(Path(images_dir).resolve()), "--n-images", str(n_images), "--threads", threads, "--runs",
                 str(runs), "--out", "-", "--workdir", str(f)], text=True)
            raw[str(f)].append(json.loads(text))
            create_us[str(f)].append(round(_create_cost_us(f, probe_files), 1))
            loads.append(_load_average())
    summary = {}
    for f in map(str, folders):
        row = {"file_create_us_median": statistics.median(create_us[f])}
        for k in ks:
            runs_k = [x[k] for x in raw[f]]
            row[f"{k}+{k}"] = {
                "images_per_s_median": round(statistics.median(x["images_per_s"] for x in runs_k), 1),
                "images_per_s_best": max(x["images_per_s"] for x in runs_k),
                "images_per_s_median_of_all_runs": round(statistics.median(
                    v for x in runs_k for v in x["images_per_s_runs"]), 1),
                "cpu_ms_per_image_median": round(statistics.median(x["cpu_ms_per_image"] for x in runs_k), 4)}
        summary[f] = row
        click.echo(f"{f}: file creation {row['file_create_us_median']} us; " + "; ".join(
            f"{k} + {k} threads: {row[f'{k}+{k}']['images_per_s_median']} img/s median of process bests "
            f"({row[f'{k}+{k}']['images_per_s_median_of_all_runs']} of all runs), CPU "
            f"{row[f'{k}+{k}']['cpu_ms_per_image_median']} ms/image" for k in ks))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "revision": subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip(),
        "cpu": cpu_model(), "cpus": os.cpu_count(), "python": platform.python_version(), "n_images": n_images,
        "runs_per_process": runs, "rounds": rounds, "load_average_after_each_process": loads,
        "file_create_us": create_us, "summary": summary, "raw": raw}, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
