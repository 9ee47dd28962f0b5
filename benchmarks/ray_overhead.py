"""What Ray Data costs on one machine: images/s of a local effiseg-run against ``--ray`` with 1 and 2 CPU actors.

    python -m effiseg.benchmarks.ray_overhead --images ../shared/data/kvasir-seg/test/images --n 60 \
        --out benchmarks/results/ray-overhead-2026-12-08

Same model, backend (ONNX Runtime on the CPU, whose thread count can be set per actor), batch and images in
every configuration; each job's wall time counts its model loading (the local Segmenter's, the actors')
so that the figures compare whole jobs. Ray is started once (its start-up is reported on its own). Order:
local, Ray 1 actor (2 CPUs, 2 threads), Ray 2 actors (1 CPU, 1 thread each), local again (the spread of
the two local runs shows how much a shared machine moved meanwhile).
"""
from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

import click

from effiseg.runtime.console import Command


@click.command(cls=Command)
@click.option("--images", type=click.Path(path_type=Path, file_okay=False), required=True)
@click.option("--n", "n_images", type=click.IntRange(1), default=60)
@click.option("--model", type=click.Path(path_type=Path, dir_okay=False), default=None)
@click.option("--batch", type=int, default=8)
@click.option("--out", type=click.Path(path_type=Path, file_okay=False), required=True)
def main(images, n_images, model, batch, out):
    import ray

    from effiseg.benchmarks.machine import load_average, machine_info
    from effiseg.runtime.cli import DEFAULT_MODEL
    from effiseg.runtime.ray_job import run_ray
    from effiseg.runtime.segmenter import Segmenter

    model = model or DEFAULT_MODEL
    out.mkdir(parents=True, exist_ok=True)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "in"
        src.mkdir()
        for f in sorted(images.glob("*.jpg"))[:n_images]:
            shutil.copy(f, src / f.name)

        def local(label):
            t0 = time.perf_counter()
            with Segmenter.from_onnx(model, backend="onnxruntime", max_batch=batch) as seg:
                loaded = time.perf_counter()
                s = seg.run_folder(src, Path(tmp) / label)
            wall = time.perf_counter() - t0
            return {"config": label, "wall_s": round(wall, 3), "model_load_s": round(loaded - t0, 3),
                    "images": s["n_ok"], "images_per_s": round(s["n_ok"] / wall, 3), "load_average": load_average()}

        def on_ray(label, actors, cpus_per_actor):
            t0 = time.perf_counter()
            s = run_ray(src, Path(tmp) / label, model=model, backend="onnxruntime", batch=batch, actors=actors,
                        cpus_per_actor=cpus_per_actor)
            wall = time.perf_counter() - t0
            return {"config": label, "wall_s": round(wall, 3), "actors": actors, "cpus_per_actor": cpus_per_actor,
                    "images": s["n_ok"], "images_per_s": round(s["n_ok"] / wall, 3), "load_average": load_average()}

        results.append(local("local"))
        t0 = time.perf_counter()
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        ray_start_s = time.perf_counter() - t0
        results.append(on_ray("ray-1-actor", 1, 2))
        results.append(on_ray("ray-2-actors", 2, 1))
        ray.shutdown()
        results.append(local("local-again"))
    base = (results[0]["images_per_s"] + results[-1]["images_per_s"]) / 2
    for r in results:
        r["relative_to_local"] = round(r["images_per_s"] / base, 3)
        click.echo(f"{r['config']:>13}: {r['images_per_s']:.2f} images/s ({r['relative_to_local']:.2f}x local), "
                   f"wall {r['wall_s']:.1f} s")
    click.echo(f"ray.init (local, 2 CPUs): {ray_start_s:.1f} s, not in the walls above")
    report = {"machine": machine_info(), "model": str(model), "backend": "onnxruntime", "batch": batch,
              "images": n_images, "ray_version": ray.__version__, "ray_init_s": round(ray_start_s, 3),
              "results": results}
    (out / "ray_overhead.json").write_text(json.dumps(report, indent=2, default=str), encoding="utf-8")


if __name__ == "__main__":
    main()
