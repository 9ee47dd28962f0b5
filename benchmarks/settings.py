"""What one ``effiseg-bench`` run measures: its settings as one frozen object, and the plan of
measurements (which backend, batch, size and input format is timed in which mode).

``bench_command`` (benchmarks/cli.py) reads as a short sequence of steps: settings from the
options (defaults depend on whether a GPU runs), the backends that can run, the models, the plan,
the interleaved rounds, the result files. The settings are recorded in the result JSON as
``settings`` (see :meth:`BenchSettings.to_json`), so a result file says how it was measured.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# --mode to the measurement kinds it runs; "compute" (pure torch compute) is added with --compute.
MODES = {"model": ("model",), "e2e": ("e2e",), "both": ("model", "e2e")}


@dataclass(frozen=True)
class BenchSettings:
    """The options of one run with every default resolved (GPU and CPU runs default differently).

    Args:
        devices: devices of the backends that run on several; the first one's torch-eager is the baseline.
        batches: batch sizes, ascending.
        input_formats: ONNX input formats for model-only runs (end-to-end runs use the first).
        modes: measurement kinds, from "model", "e2e", "compute".
        rounds, warmup: interleaved rounds; warm-up batches per configuration.
        iters: timed batches per configuration per round (None: enough for ``min_time_s``).
        min_time_s: seconds per configuration per round when ``iters`` is None.
        settle_s: pause before each configuration's turn.
        n_images: images in the end-to-end folder.
        images_from: folder the end-to-end images are copied from (None: the default sources).
        workers: pipeline decoder/writer threads in end-to-end runs (None: the runtime's).
        slots: slots per backend, as ``effiseg-run --slots``.
        threads: CPU threads for torch and ONNX Runtime (None: each library's own).
        main_thread: time in the main thread instead of one thread per backend.
        time_budget_s: seconds for the whole run (None: no limit).
        tta: the run-time TTA choice for every backend (None: each model's own).
    """

    devices: tuple[str, ...]
    batches: tuple[int, ...]
    input_formats: tuple[str, ...]
    modes: tuple[str, ...]
    rounds: int
    warmup: int
    iters: int | None
    min_time_s: float
    settle_s: float
    n_images: int
    images_from: Path | None = None
    workers: int | None = None
    slots: int = 2
    threads: int | None = None
    main_thread: bool = False
    time_budget_s: float | None = None
    tta: str | None = None

    @property
    def on_gpu(self) -> bool:
        return any(d.startswith("cuda") for d in self.devices)

    @classmethod
    def resolve(cls, devices: list[str], *, batches: list[int] | None, input_formats: list[str], mode: str,
                compute: bool | None, rounds: int | None, warmup: int | None, iters: int | None,
                min_time_s: float | None, settle_s: float | None, n_images: int | None, **rest) -> "BenchSettings":
        """The settings with each None replaced by its default for the devices (GPU or CPU only)."""
        gpu = any(d.startswith("cuda") for d in devices)
        modes = MODES[mode] + (("compute",) if (gpu if compute is None else compute) else ())
        return cls(
            devices=tuple(devices), batches=tuple(batches or ((1, 8, 32) if gpu else (1, 8))),
            input_formats=tuple(input_formats), modes=modes, rounds=rounds or (5 if gpu else 3),
            warmup=warmup or (10 if gpu else 1), iters=iters,
            min_time_s=(1.0 if gpu else 0.5) if min_time_s is None else min_time_s,
            settle_s=(0.0 if gpu else 0.1) if settle_s is None else settle_s,
            n_images=n_images or (256 if gpu else 16), **rest)

    @property
    def baseline_device(self) -> str:
        return self.devices[0]

    def iteration_plan(self):
        """How many batches a model-only configuration times per round."""
        from .runner import IterationPlan
        return IterationPlan(iters=self.iters, min_time_s=self.min_time_s, min_iters=10 if self.on_gpu else 2)

    def to_json(self, targets, baseline_label: str, sizes, image_source: dict | None) -> dict:
        """The ``settings`` of the result file (its schema's names and layout)."""
        return {"backends": [t.label for t in targets], "baseline": baseline_label,
                "batch_sizes": list(self.batches), "input_sizes": [list(s) for s in sizes],
                "input_formats": list(self.input_formats), "modes": list(self.modes), "rounds": self.rounds,
                "warmup": self.warmup, "iters": self.iters, "min_time_s": self.min_time_s, "settle_s": self.settle_s,
                "timing_thread": "main" if self.main_thread else "per-backend", "images": self.n_images,
                "image_source": image_source, "workers": self.workers, "slots": self.slots,
                "threads": self.threads, "devices": list(self.devices), "time_budget_s": self.time_budget_s}


@dataclass(frozen=True)
class EndToEndFolders:
    """Where end-to-end measurements read their images and write their masks."""
    images: Path
    warmup: Path
    masks: Path


def formats_for(target, input_formats, size, onnx_runnable) -> list[str]:
    """The input formats ``target`` is timed in at ``size``: torch backends take uint8 images; ONNX
    backends every asked format their file exists for; int8 only its uint8-nhwc twin."""
    if target.spec.source == "checkpoint":
        fmts = ["uint8-nhwc"]
    else:
        fmts = [f for f in input_formats if (f, size) in onnx_runnable]
    if target.spec.precision == "int8":  # the int8 twin is a uint8-nhwc file
        fmts = [f for f in fmts if f == "uint8-nhwc"]
    return fmts


def plan_measurements(settings: BenchSettings, targets, sizes, onnx_runnable, pool,
                      folders: EndToEndFolders | None) -> list:
    """One measurement per (size, batch, target, format, mode), in the order the rounds run them."""
    from .runner import ComputeOnly, Config, ModelOnly
    measurements = []
    for size in sizes:
        for batch in settings.batches:
            for target in targets:
                fmts = formats_for(target, settings.input_formats, size, onnx_runnable)
                if not fmts:
                    continue
                if "model" in settings.modes:
                    measurements += [ModelOnly(Config("model", target, batch, *size, f), pool) for f in fmts]
                if "compute" in settings.modes and target.spec.source == "checkpoint":
                    measurements.append(ComputeOnly(Config("compute", target, batch, *size, fmts[0]), pool))
                if "e2e" in settings.modes:
                    from .e2e import EndToEnd
                    measurements.append(EndToEnd(Config("e2e", target, batch, *size, fmts[0]), pool, folders.images,
                                                 folders.warmup, folders.masks, settings.workers, settings.workers))
    return measurements
