"""Where one batch's time goes, per operator category, for the torch baseline and the fast mode.

``effiseg-bench`` says *how much* faster the fast torch path is; this says *why* it is not faster
still, from a profile instead of a guess. For each variant it times the backend's own module on a
device-resident batch (CUDA events; CUDA-graph replay where the backend replays graphs, as the
bench's ``compute`` mode does) and records one ``torch.profiler`` trace, whose per-operator device
time is summed into categories (convolutions, elementwise, upsampling, normalisation, copies and
layout changes, ...). The speed-up of the fast mode over the baseline is then the ratio of two sums,
and the categories that shrink least are the ones that cap it.

Variants (the two the bench compares, plus two that isolate a factor each):

* ``fp32-eager``: the bench's baseline, PyTorch as it comes. Note that PyTorch lets cuDNN use TF32
  tensor cores for FP32 convolutions by default (``torch.backends.cudnn.allow_tf32``) on Ampere and
  newer GPUs, so this "FP32" baseline already runs its convolutions on tensor cores there;
* ``fp32-eager-no-tf32``: the same with TF32 off, i.e. true FP32 convolutions -- the difference
  between the two is what TF32 gives the baseline;
* ``fp32-folded``: the baseline's precision and execution with the network rewritten for inference
  (``training/inference_model.py``: BatchNorm folded, the decoder's sum at half resolution), which
  isolates what the rewrite gives from what half precision and CUDA graphs give; runs on CPUs too;
* ``fp16-fast``: the fast mode (the rewritten network, half precision, channels_last, cuDNN
  autotuning; the trace is taken from eager calls of the same module, the timing from CUDA-graph
  replay as the backend runs it).

    python -m effiseg.benchmarks.op_profile --checkpoint training/weights/default --batch-sizes 32,1

On a CPU-only machine it profiles the CPU (``fp32-eager`` and ``fp32-folded``; the CUDA variants are
skipped with the reason), which is what its test exercises.
"""
from __future__ import annotations

import json
import re
import time
from pathlib import Path

import click
import numpy as np

from effiseg.runtime.console import Command
from effiseg.runtime.images import atomic_write_text

# Operator name (aten::...) -> category. First match wins; anything else is "other".
CATEGORIES: tuple[tuple[str, str], ...] = (
    ("convolution", r"conv|cudnn_convolution|mkldnn_convolution|thnn_conv|slow_conv"),
    ("matmul", r"addmm|::mm$|matmul|linear|bmm"),
    ("upsample", r"upsample|interpolate"),
    ("normalisation", r"batch_norm|layer_norm|group_norm|native_norm"),
    ("activation", r"relu|silu|sigmoid|hardtanh|hardswish|gelu|tanh|clamp|threshold"),
    ("elementwise arithmetic", r"::add|::sub|::mul|::div|::neg|::where|::rsub|::pow|::sqrt|::exp|::log"),
    ("copy / layout / dtype", r"copy_|::to$|_to_copy|contiguous|clone|::flip|permute|transpose|cat$|::cat|stack"),
    ("reduction", r"::mean|::sum|::amax|::max|::min|::argmax|::softmax"),
)
VARIANTS = ("fp32-eager", "fp32-eager-no-tf32", "fp32-folded", "fp16-fast")
CPU_VARIANTS = ("fp32-eager", "fp32-folded")
# (baseline, faster variant) pairs compared category by category where both ran.
COMPARISONS = (("fp32-eager", "fp32-folded"), ("fp32-eager", "fp16-fast"), ("fp32-eager-no-tf32", "fp16-fast"))


def categorise(op_name: str) -> str:
    for category, pattern in CATEGORIES:
        if re.search(pattern, op_name):
            return category
    return "other"


def _self_time_us(event, on_cuda: bool) -> float:
    if on_cuda:
        for attr in ("self_device_time_total", "self_cuda_time_total"):
            value = getattr(event, attr, None)
            if value is not None:
                return float(value)
        return 0.0
    return float(event.self_cpu_time_total)


def summarise_ops(op_times_us: dict[str, float], iterations: int) -> dict:
    """Per-operator self time (µs, summed over ``iterations`` batches) -> per-batch milliseconds
    by category and the top operators. Pure function: tested with known numbers."""
    if iterations < 1:
        raise ValueError("iterations must be >= 1")
    by_category: dict[str, float] = {}
    for name, us in op_times_us.items():
        cat = categorise(name)
        by_category[cat] = by_category.get(cat, 0.0) + us
    total = sum(by_category.values())
    per_batch = {c: v / 1000.0 / iterations for c, v in sorted(by_category.items(), key=lambda kv: -kv[1])}
    top = sorted(op_times_us.items(), key=lambda kv: -kv[1])[:15]
    return {
        "total_ms_per_batch": total / 1000.0 / iterations,
        "by_category_ms_per_batch": per_batch,
        "by_category_share": {c: (v * 1000.0 * iterations / total if total else 0.0) for c, v in per_batch.items()},
        "top_ops_ms_per_batch": [{"op": n, "category": categorise(n), "ms": us / 1000.0 / iterations}
                                 for n, us in top],
    }


def compare_categories(base: dict, fast: dict) -> list[dict]:
    """Per category: baseline ms, fast ms, their ratio and each category's part of the time the fast
    mode still spends -- the categories with a low ratio and a large part are what caps the speed-up."""
    rows = []
    b, f = base["by_category_ms_per_batch"], fast["by_category_ms_per_batch"]
    fast_total = fast["total_ms_per_batch"] or float("nan")
    for cat in sorted(set(b) | set(f), key=lambda c: -(b.get(c, 0.0))):
        bm, fm = b.get(cat, 0.0), f.get(cat, 0.0)
        rows.append({"category": cat, "baseline_ms": bm, "fast_ms": fm,
                     "speedup": (bm / fm) if fm > 0 else None, "share_of_fast_time": fm / fast_total})
    return rows


class _Variant:
    """One variant's backend, opened once and kept open so that every variant is timed before any
    is traced: a profiler session can leave CUPTI attached and slow what runs after it."""

    def __init__(self, name: str, checkpoint: Path, device: str, batch: int, cache_dir: Path | None, log):
        import torch

        from .factory import make_factory
        from .models import resolve_models
        from .runner import BackendPool, ComputeOnly, Config
        from .targets import TARGETS, Target
        self.torch, self.name, self.batch = torch, name, batch
        self.on_cuda = device.startswith("cuda")
        self.target = Target(TARGETS["torch-fast" if name == "fp16-fast" else "torch-eager"], device)
        models = resolve_models(None, checkpoint, cache_dir, log=log)
        self.size = models.native_size
        self.pool = BackendPool(make_factory(models), log=log)
        self.cfg = Config("compute", self.target, batch, *self.size, "uint8-nhwc")
        self.measurement = ComputeOnly(self.cfg, self.pool)

    def flags(self):
        """TF32 off for the no-TF32 variant, cuDNN autotuning as the bench sets it; restored after."""
        from contextlib import contextmanager

        from .runner import torch_flags

        @contextmanager
        def scope():
            torch = self.torch
            previous = torch.backends.cudnn.allow_tf32
            if self.name == "fp32-eager-no-tf32":
                torch.backends.cudnn.allow_tf32 = False
            try:
                with torch_flags(self.cfg):
                    yield
            finally:
                torch.backends.cudnn.allow_tf32 = previous
        return scope()

    def _sync(self):
        if self.on_cuda:
            self.torch.cuda.synchronize(self.measurement.device)

    def open_and_time(self, warmup: int, iters: int) -> dict:
        with self.flags():
            self.measurement.open(warmup)
            if self.name == "fp32-folded":
                from effiseg.training.inference_model import fold_for_inference
                graph = self.measurement.module
                graph.model = fold_for_inference(graph.model, probe_size=self.size)
                for _ in range(max(1, warmup)):
                    self.measurement.sample()
            timed = [self.measurement.sample()[1] for _ in range(iters)]
            # Eager wall time without a profiler (the denominator of the busy fraction).
            module, x = self.measurement.module, self.measurement.x
            with self.torch.inference_mode():
                module(x)
                self._sync()
                t0 = time.perf_counter()
                for _ in range(iters):
                    module(x)
                self._sync()
                eager_wall_ms = (time.perf_counter() - t0) * 1000.0 / iters
            tf32 = bool(self.torch.backends.cudnn.allow_tf32)
        median = float(np.median(timed))
        # The precision that ran: "fp16-fast" computes in FP32 on a GPU without fast FP16 (Maxwell).
        return {"variant": self.name, "backend": self.target.label, "precision": self.measurement.backend.precision,
                "batch_size": self.batch,
                "input_size": list(self.size), "timing": self.measurement.extra.get("compute_timer"),
                "ms_per_batch_p50": median, "ms_per_batch_samples": [round(t, 4) for t in timed],
                "images_per_s": self.batch * 1000.0 / median, "eager_wall_ms_per_batch": eager_wall_ms,
                "cudnn_allow_tf32": tf32}

    def trace(self, iters: int) -> dict:
        """Per-operator self time over ``iters`` eager calls (a CUDA-graph replay hides operators)."""
        torch = self.torch
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.on_cuda:
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        module, x = self.measurement.module, self.measurement.x
        with self.flags(), torch.inference_mode():
            module(x)
            self._sync()
            with torch.profiler.profile(activities=activities) as prof:
                for _ in range(iters):
                    module(x)
                self._sync()
        ops: dict[str, float] = {}
        for event in prof.key_averages():
            if event.key.startswith("aten::"):  # kernels count through the operator that launched them
                us = _self_time_us(event, self.on_cuda)
                if us > 0:
                    ops[event.key] = ops.get(event.key, 0.0) + us
        result = summarise_ops(ops, iters)
        if self.on_cuda:
            device_events = [e for e in prof.events() if str(getattr(e, "device_type", "")).endswith("CUDA")]
            kernels = [e for e in device_events if not e.name.startswith(("Memcpy", "Memset"))]
            recorded_us = sum(e.time_range.elapsed_us() for e in device_events)
            if recorded_us <= 0:
                raise RuntimeError("the profiler recorded no CUDA kernels (is CUPTI available?)")
            result["kernels_per_batch"] = len(kernels) / iters
            result["device_events_ms_per_batch"] = recorded_us / 1000.0 / iters
            # Share of the recorded device time that the per-operator sums account for (should be ~1).
            result["attributed_fraction"] = result["total_ms_per_batch"] * 1000.0 * iters / recorded_us
        else:
            result["kernels_per_batch"] = None
        return result

    def close(self):
        self.measurement.close()
        self.pool.close()


def run_profile(checkpoint: Path, device: str, batch: int, iters: int, warmup: int,
                variants: tuple[str, ...] = VARIANTS, cache_dir: Path | None = None, log=print,
                save=None) -> dict:
    """Time every variant (no profiler running), then trace every variant; ``save(data)`` is called
    after each step, so a failure or a time limit keeps what was finished. A variant that fails gets
    its error recorded and the others go on."""
    import torch
    on_cuda = device.startswith("cuda")
    if on_cuda and not torch.cuda.is_available():
        raise click.ClickException(f"--device {device}: torch sees no CUDA GPU")
    data = {"device": device, "batch_size": batch, "iterations": iters,
            "device_name": torch.cuda.get_device_name(torch.device(device)) if on_cuda else "CPU",
            "torch": torch.__version__, "cuda": torch.version.cuda, "variants": [], "comparisons": []}
    save = save or (lambda d: None)
    opened: dict[str, _Variant] = {}
    entries: dict[str, dict] = {}
    try:
        for name in variants:
            if not on_cuda and name not in CPU_VARIANTS:
                entries[name] = {"variant": name, "error": "CUDA variants only (TF32 and the fast mode's "
                                 "fp16 + CUDA graphs exist on GPUs)"}
                data["variants"] = [entries[n] for n in variants if n in entries]
                continue
            log(f"timing {name} at batch {batch} on {device} ...")
            try:
                v = _Variant(name, checkpoint, device, batch, cache_dir, log)
                opened[name] = v
                entries[name] = v.open_and_time(warmup, iters)
            except Exception as e:
                entries[name] = {"variant": name, "error": f"{type(e).__name__}: {e}"}
                log(f"  {name} failed: {entries[name]['error']}")
            data["variants"] = [entries[n] for n in variants if n in entries]
            save(data)
        for name, v in opened.items():
            if entries[name].get("error"):
                continue
            log(f"tracing {name} at batch {batch} ...")
            try:
                traced = v.trace(iters)
                wall = entries[name]["eager_wall_ms_per_batch"]
                # Device time / eager wall time (no profiler): well below 1 means the GPU waits for the
                # host to launch kernels (launch-bound), which CUDA graphs remove and batching hides.
                traced["eager_device_busy_fraction"] = (traced["total_ms_per_batch"] / wall) if wall > 0 else None
                entries[name].update(traced)
            except Exception as e:
                entries[name]["error"] = f"tracing failed: {type(e).__name__}: {e}"
                log(f"  {name}: {entries[name]['error']}")
            save(data)
    finally:
        for v in opened.values():
            v.close()
    done = {n: e for n, e in entries.items() if not e.get("error") and "total_ms_per_batch" in e}
    for base, fast in COMPARISONS:
        if base in done and fast in done:
            b, f = done[base], done[fast]
            data["comparisons"].append({"baseline": base, "fast": fast,
                                        "speedup": b["ms_per_batch_p50"] / f["ms_per_batch_p50"],
                                        "categories": compare_categories(b, f)})
    save(data)
    return data


def format_profile(data: dict) -> str:
    lines = [f"Operator profile, batch {data['batch_size']}, {data['device_name']} ({data['device']})", ""]
    lines.append(f"{'variant':<20} {'ms/batch':>9} {'img/s':>9} {'device ms':>10} {'busy':>6} {'kernels':>8}  timing")
    for v in data["variants"]:
        if "ms_per_batch_p50" not in v:
            lines.append(f"{v['variant']:<20} skipped: {v.get('error')}")
            continue
        busy, kernels, device_ms = (v.get("eager_device_busy_fraction"), v.get("kernels_per_batch"),
                                    v.get("total_ms_per_batch"))
        lines.append(f"{v['variant']:<20} {v['ms_per_batch_p50']:>9.3f} {v['images_per_s']:>9.1f} "
                     f"{'-' if device_ms is None else f'{device_ms:.3f}':>10} "
                     f"{'-' if busy is None else f'{busy:.2f}':>6} {'-' if kernels is None else round(kernels):>8}  "
                     f"{v['timing']}" + (f"  ({v['error']})" if v.get("error") else ""))
    for pair in data.get("comparisons", []):
        lines += ["", f"{pair['baseline']} -> {pair['fast']}: {pair['speedup']:.2f}x per batch (timed); "
                      "by category of profiled device time:",
                  f"  {'category':<24} {'base ms':>9} {'fast ms':>9} {'ratio':>7} {'part of fast':>13}"]
        for row in pair["categories"]:
            ratio = "-" if row["speedup"] is None else f"{row['speedup']:.2f}x"
            lines.append(f"  {row['category']:<24} {row['baseline_ms']:>9.3f} {row['fast_ms']:>9.3f} {ratio:>7} "
                         f"{row['share_of_fast_time'] * 100:>12.1f}%")
    return "\n".join(lines)


def _write(data: dict, output: Path) -> Path:
    from .report import _clean  # JSON has no NaN/inf
    output.mkdir(parents=True, exist_ok=True)
    stem = output / f"op_profile_b{data['batch_size']}"
    atomic_write_text(stem.with_suffix(".json"), json.dumps(_clean(data), indent=1))
    stem.with_suffix(".txt").write_text(format_profile(data) + "\n", encoding="utf-8")
    return stem


@click.command(cls=Command, context_settings={"show_default": True, "help_option_names": ["-h", "--help"]})
@click.option("--checkpoint", type=click.Path(path_type=Path, exists=True), required=True,
              help="A training checkpoint folder or .safetensors file.")
@click.option("--device", default="cuda:0", help="cuda:N, or cpu (fp32-eager only).")
@click.option("--batch-sizes", default="32", help="Comma-separated; one profile file per batch size.")
@click.option("--iters", type=click.IntRange(1, 10000), default=20, help="Timed and traced batches per variant.")
@click.option("--warmup", type=click.IntRange(1, 10000), default=10)
@click.option("--variants", default=",".join(VARIANTS), help="Comma-separated: " + ", ".join(VARIANTS))
@click.option("--cache-dir", type=click.Path(path_type=Path, file_okay=False), default=None)
@click.option("--output", "-o", type=click.Path(path_type=Path, file_okay=False), default=Path("effiseg-op-profile"),
              help="Folder for op_profile_b<N>.json and .txt (rewritten after every step).")
def main(checkpoint, device, batch_sizes, iters, warmup, variants, cache_dir, output):
    """Per-operator-category profile of the torch baseline against the fast mode."""
    names = tuple(v.strip() for v in variants.split(",") if v.strip())
    unknown = [n for n in names if n not in VARIANTS]
    if unknown or not names:
        raise click.BadParameter(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}",
                                 param_hint="--variants")
    try:
        batches = [int(b) for b in batch_sizes.split(",") if b.strip()]
    except ValueError:
        batches = []
    if not batches or min(batches) < 1:
        raise click.BadParameter(f"expected positive integers, got {batch_sizes!r}", param_hint="--batch-sizes")
    failed = 0
    for batch in batches:
        data = run_profile(checkpoint, device, batch, iters, warmup, names, cache_dir,
                           log=lambda m: click.echo(m, err=True), save=lambda d: _write(d, output))
        stem = _write(data, output)
        click.echo(format_profile(data))
        click.echo(f"wrote {stem.with_suffix('.json')}, {stem.with_suffix('.txt')}", err=True)
        failed += sum(1 for v in data["variants"] if v.get("error") and "CUDA variants only" not in v["error"])
    if failed:
        raise click.ClickException(f"{failed} variant(s) failed (their errors are in the files)")


if __name__ == "__main__":
    main()
