"""The highest frame rate effiseg-stream sustains with no dropped frame on this machine.

    python -m effiseg.benchmarks.video_stream --images ../shared/data/kvasir-seg/test/images \
        --out benchmarks/results/video-stream-2026-12-08

Builds a clip from endoscopy images (resized to --size, as a capture card delivers SD video), then
plays it through ``effiseg.runtime.stream.run_stream`` at rising frame rates, one frame at a time, as
``effiseg-stream --rate R`` does. A rate is sustained when no frame of the clip was dropped. Each rate's
summary (latency p50/p90/p99/max, processed, dropped) goes to ``stream_rates.json``, with the machine
and its load average (the machine may be shared: a busy neighbour lowers the figure).
"""
from __future__ import annotations

import json
import tempfile
from fractions import Fraction
from pathlib import Path

import click
import numpy as np
from PIL import Image

from effiseg.runtime.console import Command


def build_clip(images: list[Path], path: Path, size: tuple[int, int], n_frames: int, seed: int = 0) -> Path:
    """An H.264 clip of ``n_frames`` frames at ``size`` (width, height) from ``images`` (in turn),
    or from smooth synthetic frames when no image is given."""
    import av
    rng = np.random.default_rng(seed)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        stream.options = {"crf": "18"}
        for i in range(n_frames):
            if images:
                with Image.open(images[i % len(images)]) as im:
                    rgb = np.asarray(im.convert("RGB").resize(size, Image.BILINEAR))
            else:
                rgb = (rng.random((size[1] // 16, size[0] // 16, 3)) * 255).astype(np.uint8).repeat(16, 0).repeat(16, 1)
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
            frame.pts, frame.time_base = i, Fraction(1, 25)
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


@click.command(cls=Command)
@click.option("--images", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Folder of frames for the clip [default: synthetic frames].")
@click.option("--model", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="[default: the bundled one-pass model]")
@click.option("--backend", default="auto")
@click.option("--size", default="720x576", help="Frame size WIDTHxHEIGHT.")
@click.option("--frames", "n_frames", type=click.IntRange(10), default=60, help="Frames played per rate.")
@click.option("--rates", default="3,4,5,6,8,10,12,15,20,25,30", help="Frame rates tried, rising.")
@click.option("--out", type=click.Path(path_type=Path, file_okay=False), required=True)
def main(images, model, backend, size, n_frames, rates, out):
    from effiseg.benchmarks.machine import load_average, machine_info
    from effiseg.runtime.cli import DEFAULT_MODEL
    from effiseg.runtime.segmenter import Segmenter
    from effiseg.runtime.stream import run_stream

    width, height = (int(v) for v in size.lower().split("x"))
    files = sorted(images.glob("*.jpg"))[:n_frames] if images else []
    out.mkdir(parents=True, exist_ok=True)
    results = []
    with tempfile.TemporaryDirectory() as tmp, \
            Segmenter.from_model(model or DEFAULT_MODEL, backend=backend, max_batch=1, workers=1, writers=1) as seg:
        clip = build_clip(files, Path(tmp) / "clip.mp4", (width, height), n_frames)
        for rate in (float(r) for r in rates.split(",")):
            load_before = load_average()
            summary = run_stream(seg, clip, rate=rate)
            summary.update(load_average_before=load_before, load_average_after=load_average())
            results.append(summary)
            lat = summary["latency_ms"]
            click.echo(f"{rate:5.1f} fps: {summary['frames_processed']} processed, {summary['frames_dropped']} dropped; "
                       f"latency ms p50 {lat['p50']} p90 {lat['p90']} p99 {lat['p99']} max {lat['max']}")
            if summary["frames_dropped"] and len([r for r in results if r["frames_dropped"]]) >= 2:
                break  # two rates with drops: the ceiling is below
        sustained = [r["played_rate"] for r in results if r["frames_dropped"] == 0]
        report = {"machine": machine_info(), "model": str(model or DEFAULT_MODEL), "backend": seg.backend_name,
                  "precision": seg.precision, "frame_size": [width, height], "frames_per_rate": n_frames,
                  "clip_source": str(images) if images else "synthetic",
                  "highest_rate_without_drops": max(sustained) if sustained else None, "rates": results}
    (out / "stream_rates.json").write_text(json.dumps(report, indent=2, default=str), encoding="utf-8")
    click.echo(f"highest rate with no drop: {report['highest_rate_without_drops']} fps ({seg.backend_name}, "
               f"{seg.precision}); {out / 'stream_rates.json'}")


if __name__ == "__main__":
    main()
