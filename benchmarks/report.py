"""Human-readable tables, the JSON result file (and its schema check), the throughput plot and
the comparison of two result files."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from effiseg.runtime.model_info import describe_tta
from effiseg.runtime.images import atomic_write_text

from .analysis import SCHEMA
from .runner import was_left_out_for_time
from .stats import geometric_mean, ratio

# Required keys of a result file and of each result entry, with their types (None allowed where
# listed as a tuple with type(None)).
NUM = (int, float)
OPT_NUM = (int, float, type(None))
TOP_LEVEL_KEYS = {
    "schema": str, "created": str, "command": list, "machine": dict, "model": dict,
    "settings": dict, "results": list, "skipped": list, "notes": list, "headline": list,
    "load_average_before": (list, type(None)), "load_average_after": (list, type(None)),
    "duration_s": NUM,
}
RESULT_KEYS = {
    "mode": str, "key": str, "backend": str, "device": str, "label": str, "precision": str,
    "batch_size": int, "height": int, "width": int, "input_format": str, "timing": str,
    "latency": (dict, type(None)), "samples_ms": list, "round_p50_ms": list,
    "memory": dict, "error": (str, type(None)), "speedup_vs_baseline": OPT_NUM,
    "baseline_key": (str, type(None)),
}
LATENCY_KEYS = {"samples": int, "mean_ms": NUM, "p50_ms": NUM, "p90_ms": NUM, "p99_ms": NUM,
                "min_ms": NUM, "max_ms": NUM, "throughput_ips": NUM}
MEMORY_KEYS = {"host_rss_peak_mb": OPT_NUM, "host_rss_added_mb": OPT_NUM, "device_peak_mb": OPT_NUM,
               "device_source": str}


class SchemaError(ValueError):
    pass


def _type_names(kind) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join("null" if k is type(None) else k.__name__ for k in kinds)


def _check(obj: dict, spec: dict, where: str, problems: list[str]) -> None:
    for key, kind in spec.items():
        if key not in obj:
            problems.append(f"{where}: missing key {key!r}")
        elif isinstance(obj[key], bool) or not isinstance(obj[key], kind):
            # bool is an int subclass in Python; no key of the schema is a boolean.
            problems.append(f"{where}.{key}: expected {_type_names(kind)}, got {type(obj[key]).__name__}")


def validate_result_file(data: dict) -> None:
    """Raise SchemaError listing every missing key or wrong type."""
    problems: list[str] = []
    if not isinstance(data, dict):
        raise SchemaError("a result file is a JSON object")
    _check(data, TOP_LEVEL_KEYS, "file", problems)
    if data.get("schema") not in (None, SCHEMA) and isinstance(data.get("schema"), str):
        problems.append(f"file.schema: expected {SCHEMA!r}, got {data['schema']!r}")
    for i, r in enumerate(data.get("results") or []):
        where = f"results[{i}]"
        if not isinstance(r, dict):
            problems.append(f"{where}: not an object")
            continue
        _check(r, RESULT_KEYS, where, problems)
        if isinstance(r.get("latency"), dict):
            _check(r["latency"], LATENCY_KEYS, where + ".latency", problems)
        if isinstance(r.get("memory"), dict):
            _check(r["memory"], MEMORY_KEYS, where + ".memory", problems)
        if r.get("mode") not in ("model", "compute", "e2e"):
            problems.append(f"{where}.mode: expected 'model', 'compute' or 'e2e', got {r.get('mode')!r}")
    if problems:
        raise SchemaError("; ".join(problems))


def load_result_file(path: str | Path) -> dict:
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise SchemaError(f"cannot read {path}: {e}") from e
    except UnicodeDecodeError as e:
        raise SchemaError(f"{path} is not UTF-8 text (effiseg-bench writes its JSON as UTF-8): {e}") from e
    except json.JSONDecodeError as e:
        raise SchemaError(f"{path} is not JSON: {e}") from e
    try:
        validate_result_file(data)
    except SchemaError as e:
        raise SchemaError(f"{path}: {e}") from e
    return data


def _clean(value):
    """JSON cannot hold NaN/inf: write null instead."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def write_json(data: dict, path: Path) -> Path:
    validate_result_file(data)
    atomic_write_text(path, json.dumps(_clean(data), indent=1, sort_keys=False, default=str))
    return path


# -- tables ---------------------------------------------------------------------------------

def _fmt(value, spec: str = ".2f", missing: str = "-") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return missing
    return format(value, spec)


def _short_format(fmt: str) -> str:
    return {"uint8-nhwc": "uint8", "float32-nchw": "float32"}.get(fmt, fmt)


def results_table(results: list[dict], mode: str) -> str:
    """One line per configuration of ``mode``."""
    rows = [r for r in results if r["mode"] == mode]
    if not rows:
        return ""
    title = {"model": "Model-only (submit+collect on prepared host buffers; GPU figures include H2D/D2H)",
             "compute": "Pure compute (torch module on a device-resident batch; CUDA events on GPUs)",
             "e2e": ("End-to-end (image files -> mask files through the pipeline; e2e/model: mean images/s "
                     "over the model-only mean, per round: the same ratio round by round)")}[mode]
    head = (f"{'backend':<22} {'prec':<5} {'input':<7} {'batch':>5} {'size':>9} {'p50 ms':>10} "
            f"{'p90 ms':>10} {'p99 ms':>10} {'img/s':>9} {'vs base':>8}")
    if mode == "model":
        head += f" {'+prep img/s':>11} {'in B/img':>9} {'+RSS MB':>8} {'+dev MB':>8} {'dev MB':>8}"
    elif mode == "e2e":
        head += f" {'e2e/model':>9} {'per round':>11} {'+RSS MB':>8}"
    else:
        head += f" {'+dev MB':>8} {'dev MB':>8}"
    lines = [title, head, "-" * len(head)]
    for r in sorted(rows, key=lambda r: (r["height"], r["batch_size"], r["label"], r["input_format"])):
        lat = r.get("latency") or {}
        line = (f"{r['label']:<22} {r['precision']:<5} {_short_format(r['input_format']):<7} "
                f"{r['batch_size']:>5} {str(r['height']) + 'x' + str(r['width']):>9} "
                f"{_fmt(lat.get('p50_ms')):>10} {_fmt(lat.get('p90_ms')):>10} {_fmt(lat.get('p99_ms')):>10} "
                f"{_fmt(lat.get('throughput_ips')):>9} {_fmt(r.get('speedup_vs_baseline'), '.2f') + 'x' if r.get('speedup_vs_baseline') else '-':>8}")
        mem = r.get("memory") or {}
        if mode == "model":
            prep = r.get("latency_with_host_prep") or {}
            line += (f" {_fmt(prep.get('throughput_ips')):>11} {_fmt(r.get('bytes_in_per_image'), 'd'):>9} "
                     f"{_fmt(mem.get('host_rss_added_mb'), '.0f'):>8} {_fmt(mem.get('device_added_mb'), '.0f'):>8} "
                     f"{_fmt(mem.get('device_peak_mb'), '.0f'):>8}")
        elif mode == "e2e":
            per_round = r.get("pipeline_efficiency_rounds") or []
            spread = f"{min(per_round):.2f}-{max(per_round):.2f}" if len(per_round) > 1 else "-"
            line += (f" {_fmt(r.get('pipeline_efficiency')):>9} {spread:>11} "
                     f"{_fmt(mem.get('host_rss_added_mb'), '.0f'):>8}")
        else:
            line += f" {_fmt(mem.get('device_added_mb'), '.0f'):>8} {_fmt(mem.get('device_peak_mb'), '.0f'):>8}"
        if r.get("error"):
            # A configuration the time budget left out is not an error of the backend.
            line += ("  not opened: time budget" if was_left_out_for_time(r)
                     else f"  ERROR: {r['error'][:80]}")
        lines.append(line)
    if mode != "e2e":
        lines.append("+RSS/+dev MB: memory this configuration added itself (built and warmed up; on GPUs with torch, "
                     "CUDA-graph pools included, plus its rounds' peak above that); dev MB: the device's peak during "
                     "its rounds, other backends of this run included")
    else:
        lines.append("+RSS MB: host memory the configuration's pipeline added while it was set up and warmed up")
    return "\n".join(lines)


PIPELINE_FIELDS = (("bench_wall_s", "call"), ("wall_s", "wall"), ("decode_s", "decode"), ("infer_s", "infer"),
                   ("write_s", "write"), ("runner_idle_s", "run idle"), ("wait_for_slot_s", "dec wait"),
                   ("wait_for_writer_s", "wr wait"))
# Above this share of a run, what the run pays once (measured) is called out: e2e/model is then below
# what a longer folder would show (at batch 32 with an emulated device on the 2-core EPYC: 0.86 of the
# device's speed over 8 batches, 0.95 over 32).
ONCE_PER_RUN_NOTE_SHARE = 0.10


def once_per_run_share(timing: dict) -> float | None:
    """The share of one end-to-end call in which no device can work, whatever the folder's length:
    the call's own time outside the pipeline (listing the folder, the settings record, the summary
    files), the pipeline's fill (decoding the first batch) and its drain (writing the last masks).
    None where the runtime that made the file did not measure fill and drain."""
    call = timing.get("bench_wall_s") or timing.get("wall_s")
    if timing.get("fill_s") is None or timing.get("drain_s") is None or not call:
        return None
    outside = max(0.0, call - timing.get("wall_s", call))
    return (outside + timing["fill_s"] + timing["drain_s"]) / call


def pipeline_table(results: list[dict]) -> str:
    """Where end-to-end time goes: the runtime's PipelineStats per image (median over runs).
    'call' is the whole run_folder call as timed, 'wall' its threaded pipeline (the rest lists the
    folder, records the settings and writes the summary files); decode/write are thread-seconds
    summed over their threads; 'run idle' is the runner waiting for a filled batch (decoding is the
    bottleneck), 'dec wait' decoders waiting for a free slot (the backend is the bottleneck), 'wr
    wait' the runner waiting for room in the writers' queue (writing is the bottleneck); 'once %' the
    share of the call before the first batch reached the device and after the last left it
    (:func:`once_per_run_share`)."""
    rows = [r for r in results if r["mode"] == "e2e" and r.get("pipeline_timing")]
    if not rows:
        return ""
    head = f"{'configuration':<48} " + " ".join(f"{name:>9}" for _, name in PIPELINE_FIELDS) + f" {'once %':>6}"
    lines = ["Pipeline breakdown (ms per image, median over runs; decode/write summed over threads)",
             head, "-" * len(head)]
    heavy = []
    for r in rows:
        runs = r["pipeline_timing"]
        cells = []
        for field_name, _ in PIPELINE_FIELDS:
            values = [t[field_name] * 1000.0 / t["images"] for t in runs if t.get("images") and field_name in t]
            cells.append(f"{_fmt(float(np.median(values)) if values else None, '.1f'):>9}")
        shares = [x for x in (once_per_run_share(t) for t in runs) if x is not None]
        share = float(np.median(shares)) if shares else None
        cells.append(f"{_fmt(100.0 * share if share is not None else None, '.0f'):>6}")
        lines.append(f"{r['key']:<48} " + " ".join(cells))
        if share is not None and share >= ONCE_PER_RUN_NOTE_SHARE:
            heavy.append(f"{r['key']} {100.0 * share:.0f}%")
    if heavy:
        lines.append("What a run pays once (its set-up and reports, decoding the first batch, writing the last) "
                     "takes " + ", ".join(heavy) + " of these runs, so e2e/model there is below the steady "
                     "state; a longer folder (--images) shows it")
    return "\n".join(lines)


def headline_table(rows: list[dict]) -> str:
    if not rows:
        return ""
    lines = ["Headline (per batch and input size: fastest model-only configuration, ranked with its host input "
             "preparation; +prep img/s includes it, img/s and vs base do not)",
             f"{'batch':>5} {'size':>9}  {'best model-only':<48} {'+prep img/s':>11} {'img/s':>9} {'vs base':>8} "
             f"{'e2e/model':>9}"]
    for h in rows:
        with_prep = h.get("best_model_only_ips_with_prep", h["best_model_only_ips"])
        lines.append(f"{h['batch_size']:>5} {h.get('input_size', '-'):>9}  {h['best_model_only']:<48} "
                     f"{_fmt(with_prep):>11} {_fmt(h['best_model_only_ips']):>9} "
                     f"{_fmt(h['speedup_vs_baseline']):>8} {_fmt(h['pipeline_efficiency_of_best']):>9}")
    return "\n".join(lines)


def format_report(data: dict) -> str:
    parts = []
    m = data["machine"]
    gpus = ", ".join(f"{g.get('name')} (cc {g.get('compute_capability')})" for g in m["gpu"]["gpus"]) or "none"
    parts.append(f"Machine: {m['cpu_model']}, {m['cpu_count'].get('usable')} usable CPU(s); GPU: {gpus}; "
                 f"load average before/after: {data.get('load_average_before')} / {data.get('load_average_after')}")
    model = data["model"]
    # The passes per image belong beside the model: a TTA model does 4x the work of the plain network.
    passes = ", " + describe_tta(model["tta"], model.get("tta_sizes") or ()) if model.get("tta") is not None else ""
    parts.append(f"Model: {model.get('variant')} at {model.get('input_sizes')}{passes}"
                 + (f" -- {model['note']}" if model.get("note") else ""))
    for mode in ("model", "compute", "e2e"):
        table = results_table(data["results"], mode)
        if table:
            parts.append(table)
    pipe = pipeline_table(data["results"])
    if pipe:
        parts.append(pipe)
    head = headline_table(data.get("headline") or [])
    if head:
        parts.append(head)
    for s in data.get("skipped") or []:
        parts.append(f"skipped {s['backend']}@{s['device']}: {s['reason']}")
    for note in data.get("notes") or []:
        parts.append(f"note: {note}")
    return "\n\n".join(parts)


# -- plot -----------------------------------------------------------------------------------

MODE_NAMES = {"model": "model-only", "compute": "compute", "e2e": "end-to-end"}
LINE_STYLES = {"model": "-", "compute": ":", "e2e": "--"}

class NoPlot(Exception):
    """Why no plot was written (said to the user; the table and JSON stand without it)."""


def plot_throughput(data: dict, path: Path, baseline_label: str | None) -> Path:
    """Throughput (images/s, log scale) against batch size, one line per backend and input
    format; model-only solid, compute dotted, end-to-end dashed; the baseline thick black.
    Raises NoPlot, with the reason, when there is nothing to plot or no matplotlib to plot with."""
    try:
        import matplotlib
        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError as e:
        reason = ("matplotlib is not installed" if e.name == "matplotlib"
                  else f"matplotlib cannot be imported ({e})")
        raise NoPlot(f"{reason}: pip install matplotlib (\"effiseg[train]\" has it)") from e
    results = [r for r in data["results"] if r.get("latency")]
    if not results:
        raise NoPlot("nothing was measured")
    sizes = sorted({(r["height"], r["width"]) for r in results})
    fig, axes = plt.subplots(1, len(sizes), figsize=(7 * len(sizes), 5), squeeze=False)
    for ax, (h, w) in zip(axes[0], sizes):
        series: dict[tuple, list] = {}
        for r in results:
            if (r["height"], r["width"]) != (h, w):
                continue
            series.setdefault((r["label"], r["input_format"], r["mode"]), []).append(
                (r["batch_size"], r["latency"]["throughput_ips"]))
        # One colour per backend and input format; the mode is the line style.
        palette = plt.rcParams["axes.prop_cycle"].by_key().get("color", ["C0", "C1", "C2", "C3"])
        colours: dict[tuple, str] = {}
        for (label, fmt, mode), points in sorted(series.items()):
            points.sort()
            xs, ys = zip(*points)
            is_base = label == baseline_label
            if not is_base and (label, fmt) not in colours:
                colours[(label, fmt)] = palette[len(colours) % len(palette)]
            name = f"{label} ({_short_format(fmt)}) {MODE_NAMES[mode]}"
            if is_base:
                name += " [baseline]"
            ax.plot(xs, ys, linestyle=LINE_STYLES[mode], marker="o",
                    color="black" if is_base else colours[(label, fmt)],
                    linewidth=3 if is_base else 1.5, label=name)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        batches = sorted({r["batch_size"] for r in results})
        ax.set_xticks(batches)
        ax.set_xticklabels([str(b) for b in batches])
        ax.set_xlabel("batch size")
        ax.set_ylabel("images / s (p50 latency)")
        ax.set_title(f"{data['model'].get('variant')} {h}x{w}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    m = data["machine"]
    gpus = ", ".join(g.get("name", "?") for g in m["gpu"]["gpus"]) or "no GPU"
    fig.suptitle(f"effiseg-bench: {m['cpu_model']} ({m['cpu_count'].get('usable')} CPUs), {gpus}", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# -- compare --------------------------------------------------------------------------------

def _differences(a: dict, b: dict) -> dict:
    return {k: [a.get(k), b.get(k)] for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def _machine_identity(data: dict) -> dict:
    m = data.get("machine") or {}
    return {"cpu_model": m.get("cpu_model"), "usable_cpus": (m.get("cpu_count") or {}).get("usable"),
            "gpus": [g.get("name") for g in (m.get("gpu") or {}).get("gpus") or []]}


def compare_results(a: dict, b: dict) -> dict:
    """Per configuration key present in both files: throughput of A and B and B/A ratios
    (throughput ratio >1: B faster; p50 ratio <1: B faster)."""
    index_a = {r["key"]: r for r in a["results"] if r.get("latency")}
    index_b = {r["key"]: r for r in b["results"] if r.get("latency")}
    rows = []
    for key in [k for k in index_a if k in index_b]:
        ra, rb = index_a[key], index_b[key]
        la, lb = ra["latency"], rb["latency"]
        # What makes this row's ratio something other than the change being compared.
        caveats = [f"{side} failed part-way" for side, r in (("A", ra), ("B", rb)) if r.get("error")]
        if ra.get("precision") != rb.get("precision"):
            caveats.append(f"precision {ra.get('precision')} in A, {rb.get('precision')} in B")
        rows.append({"key": key, "a_ips": la["throughput_ips"], "b_ips": lb["throughput_ips"],
                     "throughput_ratio": ratio(lb["throughput_ips"], la["throughput_ips"]),
                     "a_p50_ms": la["p50_ms"], "b_p50_ms": lb["p50_ms"],
                     "p50_ratio": ratio(lb["p50_ms"], la["p50_ms"]),
                     "p99_ratio": ratio(lb["p99_ms"], la["p99_ms"]), "caveats": caveats})
    # Settings that change what a configuration's figure means (slots, threads, rounds...), so that
    # a ratio is read as the effect of the change that was meant, or not read at all.
    settings_a, settings_b = a.get("settings") or {}, b.get("settings") or {}
    differ = _differences(settings_a, settings_b)
    model_differs = _differences(a.get("model") or {}, b.get("model") or {})
    machine_differs = _differences(_machine_identity(a), _machine_identity(b))
    incomplete = [side for side, d in (("A", a), ("B", b)) if d.get("complete") is False]
    return {"rows": rows, "settings_that_differ": differ, "model_that_differs": model_differs,
            "machine_that_differs": machine_differs, "incomplete": incomplete,
            "only_in_a": sorted(k for k in index_a if k not in index_b),
            "only_in_b": sorted(k for k in index_b if k not in index_a),
            "geomean_throughput_ratio": geometric_mean(r["throughput_ratio"] for r in rows)}


def format_comparison(cmp: dict, name_a: str, name_b: str) -> str:
    head = f"{'configuration':<52} {'A img/s':>9} {'B img/s':>9} {'B/A ips':>8} {'B/A p50':>8} {'B/A p99':>8}"
    lines = [f"A = {name_a}", f"B = {name_b}", head, "-" * len(head)]
    for r in cmp["rows"]:
        lines.append(f"{r['key']:<52} {_fmt(r['a_ips']):>9} {_fmt(r['b_ips']):>9} "
                     f"{_fmt(r['throughput_ratio'], '.3f'):>8} {_fmt(r['p50_ratio'], '.3f'):>8} "
                     f"{_fmt(r['p99_ratio'], '.3f'):>8}")
    if not cmp["rows"]:
        lines.append("(no configuration in common)")
    lines.append(f"geometric mean of B/A throughput: {_fmt(cmp['geomean_throughput_ratio'], '.3f')}")
    for r in cmp["rows"]:
        for caveat in r.get("caveats") or []:
            lines.append(f"caveat {r['key']}: {caveat}")
    for what, field in (("setting", "settings_that_differ"), ("model", "model_that_differs"),
                        ("machine", "machine_that_differs")):
        for k, (va, vb) in (cmp.get(field) or {}).items():
            lines.append(f"{what} {k}: A {va!r}, B {vb!r}")
    for side in cmp.get("incomplete") or []:
        lines.append(f"{side} is incomplete (stopped before its last round)")
    for k in cmp["only_in_a"]:
        lines.append(f"only in A: {k}")
    for k in cmp["only_in_b"]:
        lines.append(f"only in B: {k}")
    return "\n".join(lines)
