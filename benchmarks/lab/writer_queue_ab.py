"""The writers' queue, 2 x writers against 2 x writers + one batch, side by side in one process.

Run from the repository root: python benchmarks/results/cpu-epyc-2core-writer-room/ab_room.py OUT.json
(with the Kvasir-SEG test images at ../shared/data/kvasir-seg/test/images). The shipped pipeline builds
its queue as threading.Semaphore(2 * writers); the variant is made by patching the Semaphore that
runtime/pipeline.py constructs (only that one is larger than 2 x writers here: 2 writers -> 4).
"""
import json
import sys
import threading
from pathlib import Path

import effiseg.runtime.pipeline as pipeline
from effiseg.benchmarks.host_profile import fill_and_drain

BATCH, DEVICE_MS, THREADS = 32, 110.0, 2
images = sorted(Path("../shared/data/kvasir-seg/test/images").glob("*.jpg"))
shipped = threading.Semaphore


class _PipelineThreading:
    """runtime/pipeline.py's view of ``threading``: a writers' queue one batch larger."""

    def __getattr__(self, name):
        return getattr(threading, name)

    @staticmethod
    def Semaphore(value=1):
        return shipped(value + BATCH if value == 2 * THREADS else value)


results = {}
for rep in range(2):
    for kind in ("2x_writers", "2x_writers_plus_batch"):
        pipeline.threading = _PipelineThreading() if kind == "2x_writers_plus_batch" else threading
        try:
            r = fill_and_drain(images, DEVICE_MS, BATCH, [256, 1024], THREADS, slots=2, repeats=3)
        finally:
            pipeline.threading = threading
        print(rep, kind, [(f["images"], f["efficiency"], f["idle_between_batches_ms"]) for f in r["folders"]], flush=True)
        results.setdefault(kind, []).append(r)
json.dump(results, open(sys.argv[1], "w", encoding="utf-8"), indent=1)
