"""Derived figures computed from one run's results: speed-up over the baseline and the
pipeline's efficiency (end-to-end images/s over model-only images/s)."""
from __future__ import annotations

from effiseg.runtime.model_info import describe_tta

from .stats import ratio, speedup

SCHEMA = "effiseg-bench/1"


def _ips(result: dict) -> float | None:
    latency = result.get("latency")
    return latency.get("throughput_ips") if latency else None


def _p50(result: dict) -> float | None:
    latency = result.get("latency")
    return latency.get("p50_ms") if latency else None


def _ips_as_served(result: dict) -> float | None:
    """Model-only images/s including the host's input preparation where it was timed: a
    float32-nchw input is normalised on the host, a uint8 one is only copied, so ranking formats by
    the device side alone would favour the one that left work out of the timing."""
    with_prep = result.get("latency_with_host_prep")
    return with_prep.get("throughput_ips") if with_prep else _ips(result)


def _failed_part_way(result: dict | None) -> bool:
    return bool(result and result.get("error"))


def find_baseline(results: list[dict], baseline_label: str, mode: str, batch: int, height: int,
                  width: int) -> dict | None:
    """The baseline's result of the same mode, batch and size (input format ignored: the
    baseline has its own); the uint8 one first where several exist."""
    matches = [r for r in results if r["label"] == baseline_label and r["mode"] == mode
               and r["batch_size"] == batch and r["height"] == height and r["width"] == width
               and r.get("latency")]
    matches.sort(key=lambda r: r["input_format"] != "uint8-nhwc")
    return matches[0] if matches else None


def attach_speedups(results: list[dict], baseline_label: str) -> None:
    """Set ``speedup_vs_baseline`` (baseline p50 / this p50, >1 = faster) and ``baseline_key`` on
    every result; model-only results compare against model-only, e2e against e2e."""
    for r in results:
        base = find_baseline(results, baseline_label, r["mode"], r["batch_size"], r["height"], r["width"])
        r["baseline_key"] = base["key"] if base else None
        r["speedup_vs_baseline"] = speedup(_p50(r), _p50(base)) if base else None
        r.pop("speedup_withheld", None)
        failed = [x["key"] for x in (base, r) if base and _failed_part_way(x)]
        if failed:
            # Samples from fewer rounds (or none after a failure) are not the same stretch of time
            # as the other side's: no ratio rather than a skewed one.
            r["speedup_vs_baseline"] = None
            r["speedup_withheld"] = f"failed part-way: {', '.join(dict.fromkeys(failed))}"


def _mean_ips(result: dict) -> float | None:
    latency = result.get("latency")
    return latency.get("throughput_mean_ips") if latency else None


def attach_efficiency(results: list[dict]) -> None:
    """On every e2e result: ``pipeline_efficiency`` = its images/s over the model-only images/s
    of the same backend, device, input format, batch and size.

    Both rates are *mean* rates (images over total time). An e2e sample is already a mean: one
    pipeline run's wall time over its images. Setting it against the model-only *median* batch
    would compare a mean with a median, which on a machine whose batch times are right-skewed
    (preemption, a shared CPU) reads as a pipeline loss that is only the skew; the median-based
    ratio is kept as ``pipeline_efficiency_p50`` for comparison with older files.
    ``pipeline_efficiency_rounds`` pairs the two modes round by round (same stretch of time):
    its spread shows how much of a shortfall is noise."""
    model = {(r["label"], r["input_format"], r["batch_size"], r["height"], r["width"]): r
             for r in results if r["mode"] == "model"}
    for r in results:
        if r["mode"] != "e2e":
            continue
        m = model.get((r["label"], r["input_format"], r["batch_size"], r["height"], r["width"]))
        r["model_only_key"] = m["key"] if m else None
        if _failed_part_way(r) or _failed_part_way(m):
            m = None  # rounds that do not pair up: no efficiency (the failure is in the result's error)
        r["pipeline_efficiency"] = ratio(_mean_ips(r), _mean_ips(m)) if m else None
        r["pipeline_efficiency_p50"] = ratio(_ips(r), _ips(m)) if m else None
        e2e_rounds, model_rounds = r.get("round_mean_ms") or [], (m or {}).get("round_mean_ms") or []
        paired = [ratio(mm, em) for em, mm in zip(e2e_rounds, model_rounds)]
        r["pipeline_efficiency_rounds"] = [round(x, 4) for x in paired if x is not None]


def best_backend(results: list[dict], mode: str, batch: int, height: int, width: int) -> dict | None:
    """The fastest configuration of ``mode`` at this batch and size that ran to the end (model-only
    ranked with its host preparation, see ``_ips_as_served``)."""
    candidates = [r for r in results if r["mode"] == mode and r["batch_size"] == batch and r["height"] == height
                  and r["width"] == width and _ips(r) and not _failed_part_way(r)]
    return max(candidates, key=_ips_as_served) if candidates else None


def headline(results: list[dict], baseline_label: str) -> list[dict]:
    """Per batch size and input size: the fastest model-only configuration, its speed-up over the
    baseline and the pipeline efficiency of its e2e twin (where measured)."""
    rows = []
    for batch, height, width in sorted({(r["batch_size"], r["height"], r["width"]) for r in results}):
        best = best_backend(results, "model", batch, height, width)
        if best is None:
            continue
        # Its end-to-end twin: the same input format where measured, else the same backend at the
        # same batch and size in the format e2e runs use (the first of --input-formats).
        twin = next((r for r in results if r["mode"] == "e2e" and r.get("model_only_key") == best["key"]), None)
        twin = twin or next((r for r in results if r["mode"] == "e2e" and r["label"] == best["label"]
                             and r["batch_size"] == batch and r["height"] == best["height"]
                             and r["width"] == best["width"] and r.get("pipeline_efficiency") is not None), None)
        best_e2e = best_backend(results, "e2e", batch, height, width)
        rows.append({
            "batch_size": batch,
            "input_size": f"{height}x{width}",
            "best_model_only": best["key"],
            "best_model_only_ips": _ips(best),
            "best_model_only_ips_with_prep": _ips_as_served(best),  # what it was ranked by
            "speedup_vs_baseline": best.get("speedup_vs_baseline"),
            "pipeline_efficiency_of_best": twin.get("pipeline_efficiency") if twin else None,
            "best_e2e": best_e2e["key"] if best_e2e else None,
            "best_e2e_ips": _ips(best_e2e) if best_e2e else None,
            "best_e2e_efficiency": best_e2e.get("pipeline_efficiency") if best_e2e else None,
        })
    return rows


def unequal_work_note(results: list[dict]) -> str | None:
    """A note when the results do not all run the same amount of work per image (each records the
    TTA settings of the model its backend ran), since their speed-ups would then compare unlike things."""
    work = {r["key"]: (bool(r["tta"]), tuple(r.get("tta_sizes") or ())) for r in results if r.get("tta") is not None}
    if len(set(work.values())) < 2:
        return None
    groups: dict[tuple, list[str]] = {}
    for key, setting in sorted(work.items()):
        groups.setdefault(setting, []).append(key)
    described = "; ".join(f"{describe_tta(*setting)} in {', '.join(keys)}" for setting, keys in groups.items())
    return f"the backends do not all run the same model ({described}), so their speed-ups compare unequal work"
