"""The host pipeline's ceiling, two revisions interleaved: CPU time per image as well as images/s.

On a machine other sessions load, wall-clock images/s swings by 2x from run to run; the CPU time the
process spends per image (every thread, user + system, from ``time.process_time``) is what the host
pipeline costs whatever else runs, and ``cores / cpu_s_per_image`` is the ceiling it implies on an
idle machine where its stages scale. Each round runs a fresh process per revision (order alternating)
doing ``Segmenter.run_folder`` with the zero-cost backend of ``host_profile`` (``InstantBackend``) over
``--images`` copies of the folder's images, with k decoder + k writer threads for each ``--threads``:

    python -m effiseg.benchmarks.lab.ceiling_ab --base 4fbda96 --images ../shared/data/kvasir-seg/test/images \\
        --out benchmarks/results/host-pipeline-2026-12-08/round2/ceiling_ab.json

BASE is any git revision that has ``benchmarks/host_profile.py`` with ``InstantBackend``; it is checked
out in a temporary git worktree and imported through PYTHONPATH (a folder of symlinks named
``effiseg``: needs symlinks, so Linux/macOS, or Windows with developer mode).
"""
from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import click

_PARTS = ("training", "export", "runtime", "benchmarks")


def _child(images_dir: str, n_images: int, threads: list[int], runs: int, workdir: str | None = None) -> dict:
    """In the measured revision's process: per thread count, ``runs`` folder runs after a warm-up, the
    images copied to and the masks written in a temporary folder under ``workdir`` (None: the system's)."""
    import time

    from effiseg.benchmarks.host_profile import InstantBackend, _copy_cycled, _stand_in_model
    from effiseg.runtime.images import list_images
    from effiseg.runtime.segmenter import Segmenter
    sources = list_images(images_dir)
    info, outputs = _stand_in_model("ceiling-ab", 352)
    out = {}
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        folder = _copy_cycled(sources, Path(tmp) / "images", n_images)
        for k in threads:
            rates, cpu_ms = [], []
            with Segmenter([InstantBackend(info, outputs, 8)], workers=k, writers=k) as segmenter:
                for r in range(runs + 1):
                    cpu0, wall0 = time.process_time(), time.perf_counter()
                    summary = segmenter.run_folder(folder, Path(tmp) / f"masks_{k}_{r}")
                    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
                    if summary["n_failed"]:
                        raise RuntimeError(f"{summary['n_failed']} image(s) failed")
                    if r:  # run 0 warms threads and codecs up
                        rates.append(round(n_images / wall, 1))
                        cpu_ms.append(round(cpu / n_images * 1000, 4))
            out[str(k)] = {"images_per_s_runs": rates, "cpu_ms_per_image_runs": cpu_ms,
                           "images_per_s": max(rates), "cpu_ms_per_image": statistics.median(cpu_ms)}
    return out


@contextlib.contextmanager
def revision_sites(base: str):
    """(work folder, {"base"|"head": PYTHONPATH entry}, {side: commit}, uncommitted files in head):
    ``base`` checked out in a temporary git worktree, each side importable as ``effiseg`` from a
    folder of symlinks to its parts; the worktree is removed on exit."""
    root = Path(subprocess.check_output(["git", "rev-parse", "--show-toplevel"], text=True).strip())
    revs = {"base": subprocess.check_output(["git", "-C", str(root), "rev-parse", base], text=True).strip(),
            "head": subprocess.check_output(["git", "-C", str(root), "rev-parse", "HEAD"], text=True).strip()}
    dirty = len(subprocess.check_output(["git", "-C", str(root), "status", "--porcelain"], text=True).splitlines())
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        subprocess.check_call(["git", "-C", str(root), "worktree", "add", "-q", "--detach", str(work / "base"),
                               revs["base"]])
        try:
            sites = {}
            for side, src in (("base", work / "base"), ("head", root)):
                pkg = work / f"site_{side}" / "effiseg"
                pkg.mkdir(parents=True)
                for part in _PARTS:
                    (pkg / part).symlink_to(src / part, target_is_directory=True)
                sites[side] = pkg.parent
            yield work, sites, revs, dirty
        finally:
            subprocess.call(["git", "-C", str(root), "worktree", "remove", "--force", str(work / "base")])


def _syscalls_per_image(table: str, images: int) -> dict:
    """futex and all system calls per image from the table ``strace -c`` writes."""
    counts = {}
    for line in table.splitlines():
        fields = line.split()
        if len(fields) >= 5 and fields[3].isdigit():
            counts[fields[-1]] = int(fields[3])
    return {"futex_per_image": round(counts.get("futex", 0) / images, 2),
            "all_per_image": round(counts.get("total", 0) / images, 2), "images": images}


def _load_average():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


@click.command()
@click.option("--base", required=True, help="git revision to compare the working tree with")
@click.option("--images", "images_dir", type=click.Path(exists=True, file_okay=False), required=True)
@click.option("--n-images", type=click.IntRange(8), default=400, show_default=True,
              help="images per folder run (the folder's images, cycled)")
@click.option("--threads", default="1,2", show_default=True, help="k decoder + k writer threads, comma-separated")
@click.option("--runs", type=click.IntRange(1), default=3, show_default=True, help="timed runs per process")
@click.option("--rounds", type=click.IntRange(1), default=4, show_default=True)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True, help="result JSON")
@click.option("--strace/--no-strace", "count_calls", default=False,
              help="Also run each side once more under `strace -f -c` (Linux) and report its system calls per image, "
                   "futex (lock waits and wake-ups: GIL hand-overs) apart: counts, unlike times, do not depend on "
                   "what else the machine runs (they include the child's start and the folder's copying).")
@click.option("--workdir", type=click.Path(exists=True, file_okay=False), default=None,
              help="Folder under which the image copies and masks go [default: the system's temporary folder]. "
                   "Creating a file costs 20x more in this VM's /tmp than elsewhere on the same disk "
                   "(benchmarks/lab/ceiling_by_folder.py).")
@click.option("--child", is_flag=True, hidden=True)
def main(base, images_dir, n_images, threads, runs, rounds, out, child, count_calls, workdir):
    from effiseg.benchmarks.machine import cpu_model
    ks = [int(x) for x in threads.split(",") if x.strip()]
    if child:
        json.dump(_child(images_dir, n_images, ks, runs, workdir), sys.stdout)
        return
    with revision_sites(base) as (work, sites, revs, dirty):
        results = {"base": [], "head": []}
        loads = []
        for r in range(rounds):
            order = ("base", "head") if r % 2 == 0 else ("head", "base")
            for side in order:
                click.echo(f"round {r + 1}/{rounds}: {side}", err=True)
                env = dict(os.environ, PYTHONPATH=str(sites[side]))
                text = subprocess.check_output(
                    [sys.executable, __file__, "--child", "--base", base, "--images", str(Path(images_dir).resolve()),
                     "--n-images", str(n_images), "--threads", threads, "--runs", str(runs), "--out", "-",
                     *(["--workdir", str(Path(workdir).resolve())] if workdir else [])],
                    env=env, cwd=work, text=True)
                results[side].append(json.loads(text))
                loads.append(_load_average())
        calls = {}
        if count_calls:
            for side in ("base", "head"):
                click.echo(f"system calls: {side}", err=True)
                trace = work / f"strace_{side}.txt"
                subprocess.check_call(
                    ["strace", "-f", "-c", "-o", str(trace), sys.executable, __file__, "--child", "--base", base,
                     "--images", str(Path(images_dir).resolve()), "--n-images", str(n_images), "--threads", threads,
                     "--runs", str(runs), "--out", "-",
                     *(["--workdir", str(Path(workdir).resolve())] if workdir else [])],
                    env=dict(os.environ, PYTHONPATH=str(sites[side])), cwd=work, stdout=subprocess.DEVNULL)
                calls[side] = _syscalls_per_image(trace.read_text(encoding="utf-8"), n_images * (runs + 1) * len(ks))
    summary = {}
    for k in map(str, ks):
        row = {}
        cores = min(int(k), os.cpu_count() or 1)
        for side in ("base", "head"):
            cpu = statistics.median(x[k]["cpu_ms_per_image"] for x in results[side])
            # Other processes only add to a run's CPU time (cache, frequency, hand-overs): the least
            # of all runs is the estimate least disturbed by them.
            least = min(c for x in results[side] for c in x[k]["cpu_ms_per_image_runs"])
            row[side] = {"cpu_ms_per_image_median": round(cpu, 4), "cpu_ms_per_image_least": round(least, 4),
                         "images_per_s_median": round(statistics.median(x[k]["images_per_s"] for x in results[side]), 1),
                         "images_per_s_best": max(x[k]["images_per_s"] for x in results[side]),
                         "implied_ceiling_images_per_s": round(cores / cpu * 1000, 1),
                         "implied_ceiling_images_per_s_from_least": round(cores / least * 1000, 1)}
        row["cpu_head_over_base_per_round"] = [round(h[k]["cpu_ms_per_image"] / b[k]["cpu_ms_per_image"], 3)
                                               for b, h in zip(results["base"], results["head"])]
        row["images_per_s_head_over_base_per_round"] = [round(h[k]["images_per_s"] / b[k]["images_per_s"], 3)
                                                        for b, h in zip(results["base"], results["head"])]
        summary[k] = row
        b, h = row["base"], row["head"]
        click.echo(f"{k} + {k} threads: CPU ms/image median base {b['cpu_ms_per_image_median']} -> head "
                   f"{h['cpu_ms_per_image_median']}, least {b['cpu_ms_per_image_least']} -> {h['cpu_ms_per_image_least']} "
                   f"(implied ceiling {b['implied_ceiling_images_per_s_from_least']} -> "
                   f"{h['implied_ceiling_images_per_s_from_least']} img/s); wall img/s median {b['images_per_s_median']} "
                   f"-> {h['images_per_s_median']}, best {b['images_per_s_best']} -> {h['images_per_s_best']}")
    for side, c in calls.items():
        click.echo(f"{side}: {c['futex_per_image']} futex calls per image, {c['all_per_image']} system calls in all")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"revisions": revs, "head_uncommitted_files": dirty, "cpu": cpu_model(), "cpus": os.cpu_count(), "python": platform.python_version(),
                               "n_images": n_images, "runs_per_process": runs, "workdir": workdir or tempfile.gettempdir(), "rounds": rounds,
                               "load_average_after_each_process": loads, "summary": summary,
                               "syscalls_per_image": calls, "raw": results},
                              indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
