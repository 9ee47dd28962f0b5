"""How long the host pipeline holds the GIL per image: the serial part that caps it on many cores.

On 16 cores the pipeline ceiling is not CPU time over cores but the work only one thread at a time
can do: Python code and the C calls that keep the GIL. If the GIL is held g ms per image, no number
of threads goes past 1000/g images/s (issue 23 asks 4,000 on 16 cores: g well under 0.25 ms). This
measures g on any machine, two cores included: a child process runs ``Segmenter.run_folder`` with
the zero-cost backend of ``host_profile`` over the same folder again and again (its files under
``--workdir``, tmpfs by default: file creation on this project's VM costs ~0.45 ms of kernel time,
results/host-pipeline-2026-12-08/round4), and py-spy samples it from outside for ``--seconds``
with ``--gil`` (a sample only when some thread holds the GIL, naming that thread's stack):

    GIL-held share = samples / (seconds x rate);  g = share / images per second

plus which functions hold it. Two revisions, interleaved, fresh processes (``--base``, as
``ceiling_ab``):

    pip install py-spy   # a lab tool, not a dependency of effiseg; needs ptrace rights (root or the same user)
    python -m effiseg.benchmarks.lab.gil_probe --base HEAD~1 --images ../shared/data/kvasir-seg/test/images \\
        --out benchmarks/results/host-pipeline-2026-12-08/round4/gil_probe.json

Sampling misses some ticks (py-spy reports them as errors) and its reads slow the process a little,
so read g as an estimate; the ratio of two revisions measured the same way is what it is for.
"""
from __future__ import annotations

import collections
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

from .ceiling_ab import _load_average, revision_sites


def _child(images_dir: str, n_images: int, k: int, seconds: float, workdir: str) -> None:
    """Folder runs for ``seconds`` after a warm-up; START and END (images/s) lines on stderr."""
    from effiseg.benchmarks.host_profile import InstantBackend, _copy_cycled, _stand_in_model
    from effiseg.runtime.images import list_images
    from effiseg.runtime.segmenter import Segmenter
    info, outputs = _stand_in_model("gil-probe", 352)
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        folder = _copy_cycled(list_images(images_dir), Path(tmp) / "images", n_images)
        with Segmenter([InstantBackend(info, outputs, 8)], workers=k, writers=k) as segmenter:
            segmenter.run_folder(folder, Path(tmp) / "warm-up")
            print("START", flush=True, file=sys.stderr)
            t0, done, r = time.perf_counter(), 0, 0
            while time.perf_counter() - t0 < seconds:
                out = Path(tmp) / f"masks_{r}"
                summary = segmenter.run_folder(folder, out)
                if summary["n_failed"]:
                    raise RuntimeError(f"{summary['n_failed']} image(s) failed")
                done, r = done + n_images, r + 1  # the masks stay until the end: deleting them holds the GIL too
            print(f"END {done / (time.perf_counter() - t0):.1f}", flush=True, file=sys.stderr)


def _measure(site: Path, images_dir: str, n_images: int, k: int, seconds: float, rate: int, workdir: str,
             py_spy: str, scratch: Path) -> dict:
    cmd = [sys.executable, "-m", "effiseg.benchmarks.lab.gil_probe", "--child", "--images", images_dir,
           "--n-images", str(n_images), "--threads", str(k), "--seconds", str(seconds + 2), "--workdir", workdir,
           "--out", "-"]
    child = subprocess.Popen(cmd, env=dict(os.environ, PYTHONPATH=str(site)), stderr=subprocess.PIPE, text=True,
                             cwd=scratch)
    try:
        for line in child.stderr:
            if line.startswith("START"):
                break
        else:
            raise click.ClickException(f"the measured process ended before it started (exit {child.wait()})")
        trace = scratch / f"gil_{child.pid}.txt"
        spy = subprocess.run([py_spy, "record", "--pid", str(child.pid), "--gil", "--nonblocking", "--format", "raw",
                              "--rate", str(rate), "--duration", str(int(seconds)), "--output", str(trace)],
                             capture_output=True, text=True)
        rest = child.stderr.read()
        if child.wait() != 0:
            raise click.ClickException(f"the measured process failed:\n{rest[-2000:]}")
    finally:
        if child.poll() is None:
            child.kill()
    if spy.returncode != 0 or not trace.is_file():
        raise click.ClickException(f"py-spy failed (exit {spy.returncode}): {(spy.stderr or spy.stdout)[-1000:]}")
    images_per_s = float(next(x.split()[1] for x in rest.splitlines() if x.startswith("END")))
    samples, holders, lines = 0, collections.Counter(), collections.Counter()
    for line in trace.read_text(encoding="utf-8").splitlines():
        stack, _, n = line.rpartition(" ")
        samples += int(n)
        leaf = stack.split(";")[-1]
        holders[leaf.split(" (")[0]] += int(n)
        lines[leaf] += int(n)
    share = samples / (int(seconds) * rate)
    return {"images_per_s": images_per_s, "gil_samples": samples, "gil_share": round(share, 4),
            "gil_ms_per_image": round(share / images_per_s * 1000, 4),
            "top_gil_holders": {name: n for name, n in holders.most_common(15)},
            "top_gil_lines": {name: n for name, n in lines.most_common(30)}}


@click.command()
@click.option("--base", default=None, help="a git revision to compare the working tree with [default: the tree alone]")
@click.option("--images", "images_dir", type=click.Path(exists=True, file_okay=False), required=True)
@click.option("--n-images", type=click.IntRange(8), default=400, show_default=True)
@click.option("--threads", type=click.IntRange(1, 64), default=1, show_default=True,
              help="k decoder + k writer threads")
@click.option("--seconds", type=click.IntRange(1, 60), default=3, show_default=True, help="sampled per process")
@click.option("--rate", type=click.IntRange(10, 5000), default=500, show_default=True, help="py-spy samples per second")
@click.option("--rounds", type=click.IntRange(1), default=4, show_default=True)
@click.option("--workdir", type=click.Path(exists=True, file_okay=False), default=None,
              help="where the image copies and masks go [default: /dev/shm where it exists, else the temporary folder]")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True, help="result JSON")
@click.option("--child", is_flag=True, hidden=True)
def main(base, images_dir, n_images, threads, seconds, rate, rounds, workdir, out, child):
    images_dir = str(Path(images_dir).resolve())
    if workdir is None:
        workdir = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()
    if child:
        _child(images_dir, n_images, threads, float(seconds), workdir)
        return
    py_spy = shutil.which("py-spy")
    if py_spy is None:
        raise click.ClickException("py-spy is not installed: pip install py-spy (a lab tool, not an effiseg dependency)")
    from effiseg.benchmarks.machine import cpu_model
    results: dict[str, list] = {}
    loads = []
    with revision_sites(base or "HEAD") as (work, sites, revs, dirty):
        sides = ("base", "head") if base else ("head",)
        for r in range(rounds):
            for side in (sides if r % 2 == 0 else sides[::-1]):
                click.echo(f"round {r + 1}/{rounds}: {side}", err=True)
                results.setdefault(side, []).append(
                    _measure(sites[side], images_dir, n_images, threads, seconds, rate, workdir, py_spy, work))
                loads.append(_load_average())
    summary = {}
    for side, runs in results.items():
        summary[side] = {"gil_ms_per_image_median": round(statistics.median(x["gil_ms_per_image"] for x in runs), 4),
                         "gil_share_median": round(statistics.median(x["gil_share"] for x in runs), 4),
                         "images_per_s_median": round(statistics.median(x["images_per_s"] for x in runs), 1)}
        s = summary[side]
        click.echo(f"{side}: GIL held {s['gil_ms_per_image_median']} ms per image ({s['gil_share_median']:.1%} of the "
                   f"time at {s['images_per_s_median']} images/s): at most ~{1000 / s['gil_ms_per_image_median']:.0f} "
                   f"images/s on any number of cores")
    if base:
        summary["head_over_base_gil_ms_per_round"] = [
            round(h["gil_ms_per_image"] / b["gil_ms_per_image"], 3) for b, h in zip(results["base"], results["head"])]
        click.echo(f"head / base, GIL ms per image, per round: {summary['head_over_base_gil_ms_per_round']}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"revisions": revs if base else {"head": revs["head"]}, "head_uncommitted_files": dirty,
                               "cpu": cpu_model(), "cpus": os.cpu_count(), "python": sys.version.split()[0],
                               "threads": threads, "n_images": n_images, "seconds": seconds, "rate": rate,
                               "workdir": workdir, "load_average_after_each_process": loads, "summary": summary,
                               "raw": results}, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
