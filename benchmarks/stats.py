"""Summary statistics of timing samples, and ratios between configurations.

Percentiles use linear interpolation between order statistics (numpy's default "linear" method,
i.e. Hyndman & Fan type 7), so p50 of an even number of samples is the mean of the middle two.
Throughput is computed from the *median* batch latency (images per second at p50), which is
robust against the occasional preempted iteration on a shared machine; the mean-based figure is
kept too, because it is what a long run would actually deliver.
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np

PERCENTILES = (50, 90, 99)


def percentile(samples: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) of ``samples`` with linear interpolation."""
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be within 0..100, got {q}")
    data = np.asarray(list(samples), dtype=np.float64)
    if data.size == 0:
        raise ValueError("no samples")
    return float(np.percentile(data, q, method="linear"))


def summarize_latencies(latencies_ms: Iterable[float], batch_size: int) -> dict:
    """Latency percentiles (ms per batch) and throughput (images/s) of one configuration."""
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    data = np.asarray(list(latencies_ms), dtype=np.float64)
    if data.size == 0:
        raise ValueError("no samples")
    if not np.all(np.isfinite(data)) or np.any(data <= 0):
        raise ValueError("latencies must be positive and finite")
    p = {f"p{q}_ms": float(np.percentile(data, q, method="linear")) for q in PERCENTILES}
    mean = float(data.mean())
    return {
        "samples": int(data.size),
        "mean_ms": mean,
        "std_ms": float(data.std(ddof=1)) if data.size > 1 else 0.0,
        "min_ms": float(data.min()),
        "max_ms": float(data.max()),
        **p,
        "throughput_ips": batch_size * 1000.0 / p["p50_ms"],
        "throughput_mean_ips": batch_size * 1000.0 / mean,
    }


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """``numerator / denominator``, or None where either is missing, zero or not finite."""
    if numerator is None or denominator is None:
        return None
    try:
        num, den = float(numerator), float(denominator)
    except (TypeError, ValueError):
        return None
    if not (math.isfinite(num) and math.isfinite(den)) or den == 0:
        return None
    return num / den


def speedup(candidate_p50_ms: float | None, baseline_p50_ms: float | None) -> float | None:
    """How many times faster than the baseline (>1: faster), from median latencies of one run."""
    return ratio(baseline_p50_ms, candidate_p50_ms)


def geometric_mean(values: Iterable[float | None]) -> float | None:
    """Geometric mean of the positive finite values (the right average of ratios), else None."""
    logs = [math.log(v) for v in values if v is not None and math.isfinite(v) and v > 0]
    return math.exp(sum(logs) / len(logs)) if logs else None
