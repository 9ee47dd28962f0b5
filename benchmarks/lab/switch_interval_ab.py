"""The interpreter's thread switch interval during a pipeline run: 5 ms (Python's default) against others.

Round 3 of issue 23. A thread that hands the GIL over for I/O (a file read, a decode, a write) may
wait up to the switch interval for it to come back while another thread runs Python code, so a
shorter interval could let the decoder and writer threads overlap better. Measured in one process,
one ``Segmenter`` (the zero-cost backend of ``host_profile``), runs over the same folder alternating
between the intervals in every round (the order reversed each round), so that the machine's drift
from minute to minute falls on both sides alike; the figure to read is the median of the per-round
ratios against the first interval:

    python -m effiseg.benchmarks.lab.switch_interval_ab --images ../shared/data/kvasir-seg/test/images \\
        --out benchmarks/results/host-pipeline-2026-12-08/round3/switch_interval_ab.json

The pipeline itself leaves the interval as it is (the result: no gain outside the noise).
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import click


@click.command()
@click.option("--images", "images_dir", type=click.Path(exists=True, file_okay=False), required=True)
@click.option("--n-images", type=click.IntRange(8), default=400, show_default=True)
@click.option("--threads", default="1,2", show_default=True, help="k decoder + k writer threads, comma-separated")
@click.option("--intervals", default="0.005,0.001,0.0002,0.02", show_default=True,
              help="switch intervals in seconds; the first is the reference")
@click.option("--rounds", type=click.IntRange(1), default=8, show_default=True)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True, help="result JSON")
def main(images_dir, n_images, threads, intervals, rounds, out):
    from effiseg.benchmarks.host_profile import InstantBackend, _copy_cycled, _stand_in_model
    from effiseg.benchmarks.machine import cpu_model
    from effiseg.runtime.images import list_images
    from effiseg.runtime.segmenter import Segmenter
    ivs = [float(x) for x in intervals.split(",")]
    ks = [int(x) for x in threads.split(",")]
    default = sys.getswitchinterval()
    info, outputs = _stand_in_model("switch-interval-ab", 352)
    summary, raw = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = _copy_cycled(list_images(images_dir), Path(tmp) / "images", n_images)
        for k in ks:
            rates = {iv: [] for iv in ivs}
            cpu = {iv: [] for iv in ivs}
            with Segmenter([InstantBackend(info, outputs, 8)], workers=k, writers=k) as segmenter:
                segmenter.run_folder(folder, Path(tmp) / f"warm_{k}")
                for r in range(rounds):
                    click.echo(f"{k} + {k} threads, round {r + 1}/{rounds}", err=True)
                    for iv in ivs if r % 2 == 0 else ivs[::-1]:
                        sys.setswitchinterval(iv)
                        try:
                            c0, w0 = time.process_time(), time.perf_counter()
                            segmenter.run_folder(folder, Path(tmp) / f"masks_{k}_{r}_{iv}")
                            wall, c = time.perf_counter() - w0, time.process_time() - c0
                        finally:
                            sys.setswitchinterval(default)
                        rates[iv].append(round(n_images / wall, 1))
                        cpu[iv].append(round(c / n_images * 1000, 4))
            ref = ivs[0]
            summary[str(k)] = {str(iv): {
                "images_per_s_median": round(statistics.median(rates[iv]), 1), "images_per_s_best": max(rates[iv]),
                "cpu_ms_per_image_median": round(statistics.median(cpu[iv]), 4),
                "images_per_s_ratio_to_reference_median": round(statistics.median(
                    a / b for a, b in zip(rates[iv], rates[ref])), 3),
                "cpu_ratio_to_reference_median": round(statistics.median(
                    a / b for a, b in zip(cpu[iv], cpu[ref])), 3)} for iv in ivs}
            raw[str(k)] = {str(iv): {"images_per_s": rates[iv], "cpu_ms_per_image": cpu[iv]} for iv in ivs}
            for iv in ivs:
                s = summary[str(k)][str(iv)]
                click.echo(f"{k} + {k} threads, interval {iv * 1000:g} ms: {s['images_per_s_median']} img/s median "
                           f"(best {s['images_per_s_best']}), CPU {s['cpu_ms_per_image_median']} ms/image; against "
                           f"{ref * 1000:g} ms: img/s x{s['images_per_s_ratio_to_reference_median']}, "
                           f"CPU x{s['cpu_ratio_to_reference_median']}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"cpu": cpu_model(), "cpus": os.cpu_count(), "python": platform.python_version(),
                               "n_images": n_images, "rounds": rounds, "reference_interval_s": ivs[0],
                               "load_average_at_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
                               "summary": summary, "raw": raw}, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
