"""Interleaved measurement of every configuration: model-only, pure compute and end-to-end.

Every configuration is opened (backend built, warmed up) first; then ``rounds`` rounds run, each
visiting every configuration once, the visiting order rotated by one per round so that no
configuration is always first after a pause or always right after the heaviest one. Slow drift
of the machine (thermal throttling, another user's job, a GPU clock change) thus lands on all
configurations alike, and the speed-ups computed afterwards compare samples from one stretch of
time. Configurations of one backend at one batch size share one backend instance (model-only and
end-to-end use the same engine, so their ratio is the pipeline's own cost).

What one sample is, per mode:

* ``model``: ``t0`` host preparation of a batch into the backend's buffer (copy of uint8 RGB for
  uint8-nhwc models, the runtime's numpy normalisation for float32-nchw models), ``t1``
  ``submit(0, n)`` + ``collect(0)``, ``t2``. Latency = ``t2 - t1``: collect() returns when the
  output is in host memory, so on GPU backends it includes the host->device and device->host
  copies and the wall clock is a synchronised measurement. ``t2 - t0`` is the latency with host
  preprocessing, which compares preprocessing in the graph against preprocessing on the host.
* ``compute`` (torch backends): the backend's own module on an input already on the device, no
  copies; timed with CUDA events on GPUs (replaying a CUDA graph of the module when the backend
  uses CUDA graphs), with the wall clock on the CPU.
* ``e2e`` (see e2e.py): one run of the folder through the runtime's pipeline; the sample is the
  run's wall time per batch, i.e. ``wall * batch / images``.
"""
from __future__ import annotations

import math
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from effiseg.runtime.console import unprinted_messages
from effiseg.runtime.device_thread import CLOSE_WAIT_S, DeviceThread

from .hostprep import fill_host_input, synthetic_images
from .memory import (GpuMemoryProbe, PeakSampler, current_rss_mb, torch_cuda_allocated_mb,
                     torch_cuda_graph_pools_unallocated_mb, torch_cuda_held_mb, torch_cuda_peak_mb, torch_cuda_peak_reset)
from .stats import summarize_latencies
from .targets import Target

TIMING_NOTES = {
    "model": ("wall clock around submit()+collect() on one slot; collect() waits until the output "
              "is in host memory, so GPU figures include host->device and device->host copies"),
    "compute": ("the backend's torch module on a device-resident input, no copies: CUDA events on "
                "GPUs (CUDA-graph replay where the backend uses CUDA graphs), wall clock on the CPU"),
    "e2e": ("wall clock of one pipeline run (read, decode, resize, infer, resize back, threshold, "
            "write mask files) divided into per-batch time: wall * batch / images"),
}


@dataclass(frozen=True)
class Config:
    mode: str                 # "model", "compute" or "e2e"
    target: Target
    batch_size: int
    height: int
    width: int
    input_format: str

    @property
    def key(self) -> str:
        return config_key(self.mode, self.target.label, self.input_format, self.batch_size, self.height, self.width)

    @property
    def backend_key(self) -> tuple:
        return (self.target.label, self.input_format, self.batch_size, self.height, self.width)


def config_key(mode: str, label: str, input_format: str, batch: int, height: int, width: int) -> str:
    return f"{mode}|{label}|{input_format}|b{batch}|{height}x{width}"


# factory(target, input_format, batch_size, (height, width)) -> an open Backend
BackendFactory = Callable[[Target, str, int, tuple[int, int]], object]


@dataclass
class IterationPlan:
    """How many timed iterations per round: ``iters`` when given, else enough to fill
    ``min_time_s`` at the warm-up latency, within [min_iters, max_iters]."""
    iters: int | None = None
    min_time_s: float = 1.0
    min_iters: int = 2
    max_iters: int = 200

    def for_latency(self, latency_s: float | None) -> int:
        if self.iters is not None:
            return max(1, int(self.iters))
        if not latency_s or latency_s <= 0:
            return self.min_iters
        return int(min(self.max_iters, max(self.min_iters, math.ceil(self.min_time_s / latency_s))))


@dataclass
class BuiltBackend:
    backend: object = None
    build_s: float = 0.0
    rss_added_mb: float | None = None
    error: str | None = None


class BackendPool:
    """One backend per (target, input format, batch, size), built on first use, closed at the end."""

    def __init__(self, factory: BackendFactory, log: Callable[[str], None] = print):
        self.factory = factory
        self.log = log
        self.built: dict[tuple, BuiltBackend] = {}
        self.left_open: set[tuple] = set()  # backends still in use on a thread that did not stop

    def leave_open(self, key: tuple) -> None:
        """``close`` will not close this backend (a thread may still be inside one of its calls)."""
        self.left_open.add(key)

    def get(self, cfg: Config) -> BuiltBackend:
        key = cfg.backend_key
        if key in self.built:
            return self.built[key]
        self.log(f"  building {cfg.target.label} ({cfg.input_format}, batch {cfg.batch_size}, "
                 f"{cfg.height}x{cfg.width}) ...")
        entry = BuiltBackend()
        rss_before = current_rss_mb()
        t = time.perf_counter()
        try:
            entry.backend = self.factory(cfg.target, cfg.input_format, cfg.batch_size, (cfg.height, cfg.width))
            entry.build_s = time.perf_counter() - t
            info = entry.backend.info
            if info.input_format != cfg.input_format:
                raise RuntimeError(f"backend takes {info.input_format} input, {cfg.input_format} was asked for")
            if (info.input_height, info.input_width) != (cfg.height, cfg.width):
                raise RuntimeError(f"backend runs at {info.input_height}x{info.input_width}, "
                                   f"{cfg.height}x{cfg.width} was asked for")
            for message in unprinted_messages(entry.backend):
                self.log(f"    {message}")
        except Exception as e:
            entry.error = describe_error(e)
            self.log(f"    cannot build it: {entry.error}")
            self._close(entry)
        rss_after = current_rss_mb()
        if entry.error is None and rss_before is not None and rss_after is not None:
            entry.rss_added_mb = rss_after - rss_before
        self.built[key] = entry
        return entry

    @staticmethod
    def _close(entry: BuiltBackend) -> None:
        backend, entry.backend = entry.backend, None
        if backend is not None:
            try:
                backend.close()
            except Exception:
                pass

    def close(self) -> None:
        for key, entry in self.built.items():
            if key in self.left_open:
                self.log(f"  left open (a call on it had not returned): {entry.backend.label if entry.backend else key}")
                continue
            self._close(entry)


@contextmanager
def torch_flags(cfg: Config):
    """cuDNN autotuning for the torch target being timed, restored afterwards.

    The fast torch backend turns ``torch.backends.cudnn.benchmark`` on, and that flag is
    process-wide: left on, it would also autotune the eager baseline (and the first baseline batch
    after the switch would pay the tuning). The baseline is PyTorch as it comes: off. Fast mode: on."""
    torch = sys.modules.get("torch")
    if torch is None or cfg.target.spec.module != "torch" or not cfg.target.device.startswith("cuda"):
        yield
        return
    previous = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = cfg.target.name == "torch-fast"
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = previous


def describe_error(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


class Measurement:
    """One configuration's way of producing samples. ``open`` builds and warms up (raise to
    mark the configuration failed); ``sample`` returns (host_prep_ms, timed_ms) for one batch."""

    def __init__(self, config: Config, pool: BackendPool):
        self.config = config
        self.pool = pool
        self.built: BuiltBackend | None = None
        self.extra: dict = {}

    @property
    def backend(self):
        return self.built.backend if self.built else None

    def open(self, warmup: int) -> list[float]:
        """Build and warm up; returns the warm-up samples' timed_ms (the first one included)."""
        self.built = self.pool.get(self.config)
        if self.built.error:
            raise RuntimeError(self.built.error)
        return [self.sample()[1] for _ in range(max(1, warmup))]

    def sample(self) -> tuple[float, float]:
        raise NotImplementedError

    def after_round(self) -> None:
        """Called after each round's samples (outside the timed region)."""

    def warm_note(self) -> str | None:
        """One line for the log after warm-up, where the measurement has more to say than its
        warm-up latency (end to end: where the pipeline's time went)."""
        return None

    def close(self) -> None:
        pass


class ModelOnly(Measurement):
    def open(self, warmup: int) -> list[float]:
        self.built = self.pool.get(self.config)
        if self.built.error:
            raise RuntimeError(self.built.error)
        cfg = self.config
        buf = self.backend.host_input(0)
        if buf.shape[0] < cfg.batch_size:
            raise RuntimeError(f"host buffer holds {buf.shape[0]} images, batch is {cfg.batch_size}")
        self.images = synthetic_images(cfg.batch_size, cfg.height, cfg.width, seed=cfg.batch_size)
        self.extra["bytes_in_per_image"] = int(buf[0].nbytes)
        return [self.sample()[1] for _ in range(max(1, warmup))]

    def sample(self) -> tuple[float, float]:
        backend, n = self.backend, self.config.batch_size
        t0 = time.perf_counter()
        fill_host_input(backend.host_input(0), self.images, backend.info)
        t1 = time.perf_counter()
        backend.submit(0, n)
        out = backend.collect(0)
        t2 = time.perf_counter()
        self.extra["bytes_out_per_image"] = int(np.asarray(out).nbytes // n)
        return (t1 - t0) * 1000.0, (t2 - t1) * 1000.0


class ComputeOnly(Measurement):
    """Pure compute of a torch backend: its public ``graph`` module (preprocessing + network +
    output formatting, in the backend's precision and memory layout) on a device-resident uint8
    batch. Where the backend replays CUDA graphs, this captures the module into its own graph the
    same way, so that launch overhead is what the backend pays."""

    def open(self, warmup: int) -> list[float]:
        self.built = self.pool.get(self.config)
        if self.built.error:
            raise RuntimeError(self.built.error)
        backend, cfg = self.backend, self.config
        module = getattr(backend, "graph", None)
        torch = getattr(backend, "torch", None)
        if module is None or torch is None:
            raise RuntimeError(f"{cfg.target.name} exposes no torch module to time")
        self.torch, self.module = torch, module
        device = torch.device(getattr(backend, "torch_device", cfg.target.device))
        self.device = device
        images = synthetic_images(cfg.batch_size, cfg.height, cfg.width, seed=cfg.batch_size)
        self.x = torch.from_numpy(images).to(device)
        self.cuda = device.type == "cuda"
        if self.cuda:
            torch.cuda.synchronize(device)  # the copy ran on the default stream; timing uses another
        self.cuda_graph = None
        if self.cuda:
            self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.stream = torch.cuda.Stream(device)
            if getattr(backend, "cuda_graphs", False):
                with torch.cuda.device(device):
                    side = torch.cuda.Stream(device)
                    side.wait_stream(torch.cuda.current_stream(device))
                    with torch.no_grad(), torch.cuda.stream(side):
                        for _ in range(3):
                            module(self.x)
                    torch.cuda.current_stream(device).wait_stream(side)
                    graph = torch.cuda.CUDAGraph()
                    with torch.no_grad(), torch.cuda.graph(graph):
                        self.graph_out = module(self.x)
                    torch.cuda.synchronize(device)
                self.cuda_graph = graph
        self.extra["compute_timer"] = ("cuda events" + (" + cuda graph replay" if self.cuda_graph else "")
                                       if self.cuda else "perf_counter")
        return [self.sample()[1] for _ in range(max(1, warmup))]

    def sample(self) -> tuple[float, float]:
        torch = self.torch
        if not self.cuda:
            t0 = time.perf_counter()
            with torch.inference_mode():
                self.module(self.x)
            return 0.0, (time.perf_counter() - t0) * 1000.0
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream), torch.no_grad():
            self.start.record(self.stream)
            if self.cuda_graph is not None:
                self.cuda_graph.replay()
            else:
                self.module(self.x)
            self.end.record(self.stream)
        self.end.synchronize()
        return 0.0, float(self.start.elapsed_time(self.end))

    def close(self) -> None:
        self.cuda_graph = None
        self.x = None


@dataclass
class _Record:
    measurement: Measurement
    iters: int = 0
    prep_ms: list = field(default_factory=list)
    timed_ms: list = field(default_factory=list)
    round_p50_ms: list = field(default_factory=list)
    round_mean_ms: list = field(default_factory=list)
    first_ms: float | None = None
    rss_peak_mb: float | None = None
    rss_open_added_mb: float | None = None     # RSS growth while this configuration was built + warmed up
    device_open_added_mb: float | None = None  # torch: memory it left held then (weights, buffers, graph pools)
    device_round_extra_mb: float | None = None  # torch: its rounds' peak above what was allocated before them
    device_peak_mb: float | None = None
    device_source: str = "n/a"
    error: str | None = None


NOT_OPENED = "not opened"  # the start of a result's error when the time budget left it out


def was_left_out_for_time(result: dict) -> bool:
    """A configuration the time budget left unopened: reported, but not a failure."""
    return str(result.get("error") or "").startswith(NOT_OPENED + ":")


def run_rounds(measurements: list[Measurement], rounds: int, warmup: int, plan: IterationPlan,
               settle_s: float = 0.0, log: Callable[[str], None] = print,
               sample_memory: bool = True, plan_for: Callable[[Config], IterationPlan] | None = None,
               worker_thread: bool = True, deadline: float | None = None,
               on_round: Callable[[list[dict], int], None] | None = None,
               open_deadline: float | None = None) -> list[dict]:
    """Open every measurement, run the interleaved rounds, return one result dict each.
    ``plan_for(config)`` may give a mode its own iteration plan (e2e: one run per round).

    ``on_round(results, rounds_done)`` is called after every complete round with the results so
    far, so that a caller can save them: a run stopped by a time limit, Ctrl-C or a crash keeps
    every finished round. ``deadline`` (a ``time.perf_counter()`` value): no new round starts
    when the last one's duration would carry it past the deadline; the first round always runs
    (without it there is nothing to report), and rounds are never cut in the middle, because an
    incomplete round would compare configurations measured at different times.

    ``open_deadline`` (same clock): no configuration is opened after it; the ones left are
    reported with an error that says so, and the rounds run with those opened (the first is
    always opened). Opening means building and warming up, which on a GPU can take minutes for
    many configurations; without this a budgeted run could spend its whole budget there and
    save nothing.

    ``worker_thread``: build, warm up and time each backend on a long-lived thread of its own (each
    round's samples are one task, so the hand-over is outside the timed region), the way the
    runtime drives every backend from one device thread (``runtime/device_thread.py``), so the
    figures describe the calls the pipeline makes. Measurements of one backend (model-only,
    compute) share its thread; an end-to-end measurement's pipeline runs the backend on its
    segmenter's device thread. One thread per backend rather than one for all: on the 2-core EPYC
    the eager baseline ran batch 1 in 1120 ms on a thread of its own against 1485 ms on a thread
    shared with the other backends, and eager PyTorch's cost in a thread is largely page faults
    for memory that thread has not used yet (benchmarks/RESULTS.md, the per-backend-thread and
    thread-probe sections).
    ``worker_thread=False`` times everything on the calling thread (a diagnosis)."""
    if rounds < 1:
        raise ValueError("rounds must be >= 1")
    if not worker_thread:
        return _run_rounds(measurements, rounds, warmup, plan, settle_s, log, sample_memory, plan_for,
                           lambda fn, cfg: fn(), deadline, on_round, open_deadline)
    threads: dict[tuple, DeviceThread] = {}

    def call(fn, cfg: Config):
        thread = threads.get(cfg.backend_key)
        if thread is None:
            thread = threads[cfg.backend_key] = DeviceThread(
                f"effiseg-bench-{cfg.target.label}-{cfg.input_format}-b{cfg.batch_size}")
        return thread.call(fn)

    try:
        results = _run_rounds(measurements, rounds, warmup, plan, settle_s, log, sample_memory, plan_for,
                              call, deadline, on_round, open_deadline)
    except BaseException:
        # Ctrl-C: each thread stops after its current task (one configuration's round), waited for
        # a short while (a second Ctrl-C ends the wait). The backend of a thread still inside
        # submit/collect after that is left open: closing it would free device memory under work
        # that is still running.
        try:
            end = time.monotonic() + CLOSE_WAIT_S  # one bound for all of them
            for t in threads.values():
                t.close(timeout=max(0.0, end - time.monotonic()))
        finally:
            busy = {key for key, t in threads.items() if t.thread is not None and t.thread.is_alive()}
            for m in measurements:
                if m.config.backend_key in busy:
                    m.pool.leave_open(m.config.backend_key)
        raise
    for t in threads.values():
        t.close(timeout=CLOSE_WAIT_S)
    return results


def _run_rounds(measurements, rounds, warmup, plan, settle_s, log, sample_memory, plan_for, call,
                deadline=None, on_round=None, open_deadline=None) -> list[dict]:
    records = [_Record(m) for m in measurements]
    gpu_probes: dict[str, GpuMemoryProbe] = {}

    for i, rec in enumerate(records):
        m, cfg = rec.measurement, rec.measurement.config
        if i > 0 and open_deadline is not None and time.perf_counter() > open_deadline:
            rec.error = (f"{NOT_OPENED}: the time budget ran out before its turn to be built and warmed up "
                         f"(give a larger --time-budget, or fewer backends / batch sizes)")
            log(f"  skipping {cfg.key}: {rec.error}")
            continue
        log(f"  opening {cfg.key}")
        torch_device = cfg.target.spec.module == "torch"
        rss_before = current_rss_mb()
        held_before = torch_cuda_held_mb(cfg.target.device) if torch_device else None
        try:
            def open_it(m=m, cfg=cfg):
                with torch_flags(cfg):
                    return m.open(warmup)
            warm = call(open_it, cfg)
        except Exception as e:  # one configuration that cannot run does not stop the others
            rec.error = describe_error(e)
            log(f"    failed: {rec.error}")
            continue
        # What this configuration alone adds, as the process-wide peaks cannot say (they include
        # every backend the interleaved run keeps loaded). A measurement that shares a backend
        # already built (compute next to model-only) adds only its warm-up.
        rss_after = current_rss_mb()
        if rss_before is not None and rss_after is not None:
            rec.rss_open_added_mb = rss_after - rss_before
        held_after = torch_cuda_held_mb(cfg.target.device) if torch_device else None
        if held_before is not None and held_after is not None:
            rec.device_open_added_mb = held_after - held_before
        rec.first_ms = warm[0]
        reference = float(np.median(warm[1:])) if len(warm) > 1 else warm[0]
        rec.iters = (plan_for(cfg) if plan_for else plan).for_latency(reference / 1000.0)
        log(f"    first batch {warm[0]:.1f} ms, warm {reference:.1f} ms -> {rec.iters} sample(s) per round")
        note = m.warm_note()
        if note:
            log(f"    {note}")
        if sample_memory and cfg.target.device.startswith("cuda") and cfg.target.spec.module != "torch":
            index = int(cfg.target.device.partition(":")[2] or 0)
            if cfg.target.device not in gpu_probes:
                gpu_probes[cfg.target.device] = GpuMemoryProbe(index)

    live = [r for r in records if r.error is None]
    for r in range(rounds):
        round_started = time.perf_counter()
        shift = r % len(live) if live else 0
        order = live[shift:] + live[:shift]
        log(f"  round {r + 1}/{rounds}")
        for rec in order:
            if rec.error is not None:
                continue
            m, cfg = rec.measurement, rec.measurement.config
            if settle_s > 0:
                time.sleep(settle_s)
            torch_tracked = cfg.target.spec.module == "torch" and torch_cuda_peak_reset(cfg.target.device)
            allocated_at_reset = torch_cuda_allocated_mb(cfg.target.device) if torch_tracked else None
            sampler = PeakSampler(gpu_probe=gpu_probes.get(cfg.target.device)) if sample_memory else None
            round_ms = []
            try:
                if sampler:
                    sampler.start()
                def one_round(m=m, cfg=cfg, rec=rec, round_ms=round_ms):
                    with torch_flags(cfg):
                        for _ in range(rec.iters):
                            prep, timed = m.sample()
                            rec.prep_ms.append(prep)
                            rec.timed_ms.append(timed)
                            round_ms.append(timed)
                call(one_round, cfg)
            except Exception as e:
                rec.error = describe_error(e)
                log(f"    {cfg.key} failed: {rec.error}")
            finally:
                if sampler:
                    sampler.stop()
            try:
                m.after_round()
            except Exception as e:
                rec.error = rec.error or describe_error(e)
                log(f"    {cfg.key} failed after the round: {rec.error}")
            if sampler and sampler.peak_rss_mb is not None:
                rec.rss_peak_mb = max(rec.rss_peak_mb or 0.0, sampler.peak_rss_mb)
            if torch_tracked:
                peak = torch_cuda_peak_mb(cfg.target.device)
                pools = torch_cuda_graph_pools_unallocated_mb(cfg.target.device)
                if peak is not None:
                    # Graph pools are held all along (a replay allocates nothing), so they add to the peak.
                    rec.device_peak_mb = max(rec.device_peak_mb or 0.0, peak + (pools or 0.0))
                    rec.device_source = "torch.cuda.max_memory_allocated + CUDA-graph pools (torch.cuda.memory_snapshot)"
                    if allocated_at_reset is not None:
                        rec.device_round_extra_mb = max(rec.device_round_extra_mb or 0.0, peak - allocated_at_reset)
            elif sampler and sampler.peak_gpu_mb is not None:
                rec.device_peak_mb = max(rec.device_peak_mb or 0.0, sampler.peak_gpu_mb)
                rec.device_source = f"{sampler.gpu_probe.source} (device-wide used memory, {sampler.gpu_probe.card})"
            if round_ms:
                rec.round_p50_ms.append(float(np.median(round_ms)))
                rec.round_mean_ms.append(float(np.mean(round_ms)))
                log(f"    {cfg.key:<48} p50 {np.median(round_ms):10.2f} ms  ({len(round_ms)} samples)")
        if on_round is not None:
            on_round([_result(rec) for rec in records], r + 1)
        took = time.perf_counter() - round_started
        if deadline is not None and r + 1 < rounds and time.perf_counter() + took > deadline:
            log(f"  stopping after round {r + 1} of {rounds}: another round (~{took:.0f} s) would pass "
                f"the time budget")
            break

    results = [_result(rec) for rec in records]
    for rec in records:
        try:
            call(rec.measurement.close, rec.measurement.config)
        except Exception:
            pass
    return results


def _result(rec: _Record) -> dict:
    m = rec.measurement
    cfg = m.config
    describe: dict = {}
    precision = cfg.target.spec.precision
    backend = m.backend
    tta = None
    tta_sizes = None
    if backend is not None:
        try:
            describe = backend.describe()
            precision = describe.get("precision", precision)
        except Exception:
            pass
        # Read from the model each backend actually runs: flip TTA is 4 network passes per image,
        # so rows that differ in it do not compare the same work.
        info = getattr(backend, "info", None)
        tta = getattr(info, "tta", None)
        tta_sizes = list(getattr(info, "tta_sizes", ()) or ()) if info is not None else None
    built = m.built
    result = {
        "mode": cfg.mode,
        "key": cfg.key,
        "backend": cfg.target.name,
        "device": cfg.target.device,
        "label": cfg.target.label,
        "precision": precision,
        "batch_size": cfg.batch_size,
        "height": cfg.height,
        "width": cfg.width,
        "input_format": cfg.input_format,
        "tta": tta,
        "tta_sizes": tta_sizes,
        "timing": TIMING_NOTES[cfg.mode],
        "latency": None,
        "samples_ms": [round(x, 4) for x in rec.timed_ms],
        "round_p50_ms": [round(x, 4) for x in rec.round_p50_ms],
        "round_mean_ms": [round(x, 4) for x in rec.round_mean_ms],
        "samples_per_round": rec.iters,
        "first_batch_ms": rec.first_ms,
        "build_s": built.build_s if built else None,
        # *_peak_mb: the process's (or device's) peak while this configuration ran, other backends
        # included; *_added_mb: what this configuration alone added (see _Record).
        "memory": {"host_rss_peak_mb": rec.rss_peak_mb,
                   "host_rss_added_mb": rec.rss_open_added_mb,
                   "host_rss_added_building_mb": built.rss_added_mb if built else None,
                   "device_peak_mb": rec.device_peak_mb, "device_source": rec.device_source,
                   "device_added_mb": (rec.device_open_added_mb + (rec.device_round_extra_mb or 0.0)
                                       if rec.device_open_added_mb is not None else None)},
        "backend_info": describe,
        "error": rec.error,
    }
    result.update(m.extra)
    if rec.timed_ms:
        result["latency"] = summarize_latencies(rec.timed_ms, cfg.batch_size)
        if cfg.mode == "model":
            result["host_prep"] = summarize_latencies([max(p, 1e-6) for p in rec.prep_ms], cfg.batch_size)
            result["latency_with_host_prep"] = summarize_latencies(
                [p + t for p, t in zip(rec.prep_ms, rec.timed_ms)], cfg.batch_size)
    return result
