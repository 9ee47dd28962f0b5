"""effiseg-run over a video file against the same frames as a folder of JPEGs: what reading and writing
video costs next to still images.

    python -m effiseg.benchmarks.video_files --images ../shared/data/kvasir-seg/test/images \
        --out benchmarks/results/video-stream-2026-12-08

One clip (Kvasir frames at --size, H.264, built as the stream benchmark builds it) and the same frames,
decoded from that clip, saved as JPEG files; then, with one Segmenter (same backend, batch, threads), in
turn: the folder of JPEGs, the video, the video with --overlay, and the folder again (the spread of the
two folder runs shows how much a shared machine moved meanwhile). Writes ``video_files.json``.
"""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import click
import numpy as np
from PIL import Image

from effiseg.runtime.console import Command


@click.command(cls=Command)
@click.option("--images", type=click.Path(path_type=Path, file_okay=False), default=None)
@click.option("--frames", "n_frames", type=click.IntRange(8), default=60)
@click.option("--size", default="720x576")
@click.option("--backend", default="auto")
@click.option("--batch", type=int, default=8)
@click.option("--out", type=click.Path(path_type=Path, file_okay=False), required=True)
def main(images, n_frames, size, backend, batch, out):
    import av

    from effiseg.benchmarks.machine import load_average, machine_info
    from effiseg.benchmarks.video_stream import build_clip
    from effiseg.runtime.cli import DEFAULT_MODEL
    from effiseg.runtime.segmenter import Segmenter
    from effiseg.runtime.video.run import run_videos

    width, height = (int(v) for v in size.lower().split("x"))
    files = sorted(images.glob("*.jpg"))[:n_frames] if images else []
    out.mkdir(parents=True, exist_ok=True)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        clip = build_clip(files, tmp / "clip.mp4", (width, height), n_frames)
        stills = tmp / "stills"
        stills.mkdir()
        with av.open(str(clip)) as c:
            for i, frame in enumerate(c.decode(video=0)):
                Image.fromarray(frame.to_ndarray(format="rgb24")).save(stills / f"{i:04d}.jpg", quality=95)
        with Segmenter.from_model(DEFAULT_MODEL, backend=backend, max_batch=batch) as seg:
            seg.segment([np.asarray(Image.open(stills / "0000.jpg"))])  # warm-up, not timed

            def timed(label, run):
                t0 = time.perf_counter()
                n = run(tmp / label)
                wall = time.perf_counter() - t0
                results.append({"config": label, "frames": n, "wall_s": round(wall, 3),
                                "frames_per_s": round(n / wall, 3), "load_average": load_average()})
                click.echo(f"{label:>14}: {n / wall:.2f} frames/s ({n} in {wall:.1f} s)")

            timed("jpeg-folder", lambda o: seg.run_folder(stills, o)["n_ok"])
            timed("video", lambda o: run_videos(seg, clip, o)["n_frames_processed"])
            timed("video-overlay", lambda o: run_videos(seg, clip, o, overlay=True)["n_frames_processed"])
            timed("jpeg-folder-2", lambda o: seg.run_folder(stills, o)["n_ok"])
            backend_name, precision = seg.backend_name, seg.precision
    base = (results[0]["frames_per_s"] + results[-1]["frames_per_s"]) / 2
    for r in results:
        r["relative_to_folder"] = round(r["frames_per_s"] / base, 3)
    report = {"machine": machine_info(), "backend": backend_name, "precision": precision, "batch": batch,
              "frame_size": [width, height], "frames": n_frames, "results": results}
    (out / "video_files.json").write_text(json.dumps(report, indent=2, default=str), encoding="utf-8")


if __name__ == "__main__":
    main()
