"""The writers' queue, 2 x writers against 2 x writers + one batch, side by side in one process.

Answered once (benchmarks/RESULTS.md, "The writers' queue"): the larger queue left the device idle
longer, so the pipeline keeps 2 x writers. Kept to reproduce that finding:

    python -m effiseg.benchmarks.lab.writer_queue_ab --images ../shared/data/kvasir-seg/test/images \\
        --output ab_room_b32_110ms.json

The shipped pipeline builds its queue as ``threading.Semaphore(2 * writers)``; the variant is made by
patching the Semaphore that ``runtime/pipeline.py`` constructs (only that one equals 2 x writers here:
2 writers -> 4) for the duration of one measurement.

Historical: since the pipeline became the package runtime/pipeline/ its writers' queue lives in
runtime/pipeline/write.py, which this patch does not reach, and since round 2 of issue 23 the queue
holds chunks of a batch (``writers`` of them: one batch), not single images; this script no longer
makes a variant, and its two runs both measure the shipped queue.
"""
from __future__ import annotations

import json
import threading
from pathlib import Path

import click

import effiseg.runtime.pipeline as pipeline
from effiseg.runtime.console import Command

from ..host_profile import fill_and_drain

BATCH, DEVICE_MS, THREADS = 32, 110.0, 2
_SHIPPED_SEMAPHORE = threading.Semaphore


class _PipelineThreading:
    """runtime/pipeline.py's view of ``threading``: a writers' queue one batch larger."""

    def __getattr__(self, name):
        return getattr(threading, name)

    @staticmethod
    def Semaphore(value=1):
        return _SHIPPED_SEMAPHORE(value + BATCH if value == 2 * THREADS else value)


@click.command(cls=Command)
@click.option("--images", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True,
              help="Folder of JPEGs, cycled to the folder sizes (the Kvasir-SEG test images).")
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path), required=True, help="JSON to write.")
@click.option("--rounds", type=click.IntRange(min=1), default=2, show_default=True)
def main(images: Path, output: Path, rounds: int) -> None:
    files = sorted(images.glob("*.jpg"))
    if not files:
        raise click.UsageError(f"{images}: no .jpg files")
    results: dict[str, list] = {}
    for rep in range(rounds):
        for kind in ("2x_writers", "2x_writers_plus_batch"):
            pipeline.threading = _PipelineThreading() if kind == "2x_writers_plus_batch" else threading
            try:
                r = fill_and_drain(files, DEVICE_MS, BATCH, [256, 1024], THREADS, slots=2, repeats=3)
            finally:
                pipeline.threading = threading
            click.echo(f"round {rep + 1}/{rounds} {kind}: "
                       + ", ".join(f"{f['images']} images: efficiency {f['efficiency']:.3f}, "
                                   f"idle {f['idle_between_batches_ms']:.0f} ms" for f in r["folders"]))
            results.setdefault(kind, []).append(r)
    output.write_text(json.dumps(results, indent=1), encoding="utf-8")
    click.echo(f"wrote {output}")


if __name__ == "__main__":
    main()
