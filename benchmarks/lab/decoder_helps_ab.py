"""A decoder that writes a waiting chunk instead of waiting for a free slot: measured, not kept.

Round 3 of issue 23. With one decoder and one writer on two cores the writer's share of the work is
the larger (resize and cut, count, encode, write against decode and fill), so the idea was to let a
decoder that finds no free host slot (the device runner is held up by the writers) take the chunk
waiting for a writer and write it itself, balancing the two threads. The variant is made here by
wrapping ``RunState.get`` for the slots' free queue only (the shipped code is untouched); the two
variants alternate run by run in one process (order reversed each round), one ``Segmenter`` with
the zero-cost backend of ``host_profile``:

    python -m effiseg.benchmarks.lab.decoder_helps_ab --images ../shared/data/kvasir-seg/test/images \\
        --out benchmarks/results/host-pipeline-2026-12-08/round3/decoder_helps_ab.json
"""
from __future__ import annotations

import json
import os
import queue
import statistics
import tempfile
import time
from pathlib import Path

import click

import effiseg.runtime.pipeline as pipeline
from effiseg.runtime.pipeline import run_state, slots as slots_module, write

_shipped_get = run_state.RunState.get
_shipped_slots_init = slots_module.HostSlots.__init__
_shipped_writers_init = write.WriterPool.__init__


class _Variant:
    """The run's writer pool and host slots (recorded as they are made), and whether decoders help."""
    helps = False
    writers = None
    slots = None


def _record_writers(self, *args, **kwargs):
    _shipped_writers_init(self, *args, **kwargs)
    _Variant.writers = self


def _record_slots(self, *args, **kwargs):
    _shipped_slots_init(self, *args, **kwargs)
    _Variant.slots = self


def _write_waiting_chunk(writers) -> bool:
    """What a writer thread does with one chunk (write.py's loop), on the calling decoder's thread."""
    try:
        chunk = writers._chunks.get_nowait()
    except queue.Empty:
        return False
    if chunk is write._STOP:
        writers._chunks.put(chunk)
        return False
    t0, results = time.perf_counter(), []
    try:
        for job, meta, output in chunk:
            try:
                result = writers.finish(job, meta, output)
            except Exception as e:
                result = writers.run.fail(job, e, "write")
            results.append((job, result))
    finally:
        writers._room.release()
        writers.run.stats.add(write_s=time.perf_counter() - t0)
        if results:
            writers.run.results.put(results)
    return True


def _get_helping(self, q):
    slots = _Variant.slots
    if _Variant.helps and slots is not None and q is slots.free:
        while True:
            try:
                return q.get_nowait()
            except queue.Empty:
                pass
            if not _write_waiting_chunk(_Variant.writers):
                break
    return _shipped_get(self, q)


@click.command()
@click.option("--images", "images_dir", type=click.Path(exists=True, file_okay=False), required=True)
@click.option("--n-images", type=click.IntRange(8), default=400, show_default=True)
@click.option("--threads", default="1,2", show_default=True, help="k decoder + k writer threads, comma-separated")
@click.option("--rounds", type=click.IntRange(1), default=8, show_default=True)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True, help="result JSON")
def main(images_dir, n_images, threads, rounds, out):
    from effiseg.benchmarks.host_profile import InstantBackend, _copy_cycled, _stand_in_model
    from effiseg.benchmarks.machine import cpu_model
    from effiseg.runtime.images import list_images
    from effiseg.runtime.segmenter import Segmenter
    run_state.RunState.get = _get_helping
    pipeline.WriterPool.__init__ = _record_writers  # the class Pipeline builds (the same object as write's)
    pipeline.HostSlots.__init__ = _record_slots
    info, outputs = _stand_in_model("decoder-helps-ab", 352)
    summary, raw = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = _copy_cycled(list_images(images_dir), Path(tmp) / "images", n_images)
        for k in (int(x) for x in threads.split(",")):
            rates = {"shipped": [], "decoder_helps": []}
            cpu = {"shipped": [], "decoder_helps": []}
            with Segmenter([InstantBackend(info, outputs, 8)], workers=k, writers=k) as segmenter:
                segmenter.run_folder(folder, Path(tmp) / f"warm_{k}")
                for r in range(rounds):
                    click.echo(f"{k} + {k} threads, round {r + 1}/{rounds}", err=True)
                    for name in ("shipped", "decoder_helps") if r % 2 == 0 else ("decoder_helps", "shipped"):
                        _Variant.helps = name == "decoder_helps"
                        c0, w0 = time.process_time(), time.perf_counter()
                        result = segmenter.run_folder(folder, Path(tmp) / f"masks_{k}_{r}_{name}")
                        wall, c = time.perf_counter() - w0, time.process_time() - c0
                        if result["n_failed"]:
                            raise click.ClickException(f"{result['n_failed']} image(s) failed")
                        rates[name].append(round(n_images / wall, 1))
                        cpu[name].append(round(c / n_images * 1000, 4))
            row = {name: {"images_per_s_median": round(statistics.median(v), 1), "images_per_s_best": max(v),
                          "cpu_ms_per_image_median": round(statistics.median(cpu[name]), 4)}
                   for name, v in rates.items()}
            row["images_per_s_helps_over_shipped_median"] = round(statistics.median(
                a / b for a, b in zip(rates["decoder_helps"], rates["shipped"])), 3)
            row["cpu_helps_over_shipped_median"] = round(statistics.median(
                a / b for a, b in zip(cpu["decoder_helps"], cpu["shipped"])), 3)
            summary[str(k)], raw[str(k)] = row, {"images_per_s": rates, "cpu_ms_per_image": cpu}
            click.echo(f"{k} + {k} threads: shipped {row['shipped']['images_per_s_median']} img/s, decoder helps "
                       f"{row['decoder_helps']['images_per_s_median']}; per-round ratio "
                       f"x{row['images_per_s_helps_over_shipped_median']}, CPU x{row['cpu_helps_over_shipped_median']}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"cpu": cpu_model(), "cpus": os.cpu_count(), "n_images": n_images, "rounds": rounds,
                               "load_average_at_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
                               "summary": summary, "raw": raw}, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
