"""effiseg-bench results: latency statistics, derived ratios (speed-ups, pipeline efficiency,
headline), the result-file schema (the committed result files included) and --compare."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from effiseg.benchmarks.analysis import SCHEMA, attach_efficiency, attach_speedups, headline, unequal_work_note
from effiseg.benchmarks.cli import bench_command
from effiseg.benchmarks.report import SchemaError, compare_results, format_report, results_table, validate_result_file
from effiseg.benchmarks.stats import geometric_mean, percentile, ratio, speedup, summarize_latencies


# -- statistics --------------------------------------------------------------------------------

def test_percentiles_interpolate_linearly():
    samples = list(range(1, 11))  # 1..10
    assert percentile(samples, 50) == pytest.approx(5.5)
    assert percentile(samples, 90) == pytest.approx(9.1)
    assert percentile(samples, 99) == pytest.approx(9.91)
    assert percentile([7.0], 99) == 7.0
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_summary_throughput_comes_from_the_median():
    s = summarize_latencies([10.0, 20.0, 30.0, 40.0], batch_size=8)
    assert s["p50_ms"] == pytest.approx(25.0)
    assert s["throughput_ips"] == pytest.approx(8 * 1000 / 25.0)
    assert s["throughput_mean_ips"] == pytest.approx(8 * 1000 / 25.0)
    assert s["min_ms"] == 10.0 and s["max_ms"] == 40.0 and s["samples"] == 4
    assert s["std_ms"] == pytest.approx(np.std([10, 20, 30, 40], ddof=1))
    skewed = summarize_latencies([10.0, 10.0, 10.0, 1000.0], batch_size=1)
    assert skewed["throughput_ips"] == pytest.approx(100.0)  # one preempted sample does not move it
    assert skewed["throughput_mean_ips"] < 10
    for bad in ([], [1.0, -1.0], [float("nan")]):
        with pytest.raises(ValueError):
            summarize_latencies(bad, 1)


def test_ratios_and_speedups():
    assert ratio(3.0, 2.0) == 1.5
    assert ratio(1.0, 0.0) is None and ratio(None, 1.0) is None and ratio(1.0, float("inf")) is None
    assert speedup(candidate_p50_ms=10.0, baseline_p50_ms=25.0) == pytest.approx(2.5)
    assert geometric_mean([2.0, 8.0]) == pytest.approx(4.0)
    assert geometric_mean([None, 0.0]) is None


# -- synthetic results -------------------------------------------------------------------------

def _result(mode, label, batch, p50, fmt="uint8-nhwc", size=352):
    backend, device = label.split("@")
    lat = summarize_latencies([p50 * 0.9, p50, p50 * 1.1], batch)
    return {"mode": mode, "key": f"{mode}|{label}|{fmt}|b{batch}|{size}x{size}", "backend": backend,
            "device": device, "label": label, "precision": "fp32", "batch_size": batch, "height": size,
            "width": size, "input_format": fmt, "timing": "test", "latency": lat,
            "samples_ms": [p50 * 0.9, p50, p50 * 1.1], "round_p50_ms": [p50], "memory": {
                "host_rss_peak_mb": 100.0, "host_rss_added_mb": 5.0, "device_peak_mb": None,
                "device_source": "n/a"}, "error": None}


def _result_file(results):
    results = copy.deepcopy(results)
    attach_speedups(results, "torch-eager@cpu")
    attach_efficiency(results)
    return {"schema": SCHEMA, "created": "2025-01-01T00:00:00+00:00", "command": ["effiseg-bench"],
            "machine": {"cpu_model": "Test CPU", "cpu_count": {"usable": 2}, "gpu": {"gpus": []}},
            "model": {"variant": "effisegnet-lite2", "input_sizes": ["352x352"]}, "settings": {},
            "results": results, "skipped": [], "notes": [], "headline": headline(results, "torch-eager@cpu"),
            "load_average_before": [1.0, 1.0, 1.0], "load_average_after": None, "duration_s": 1.0}


SYNTHETIC = [
    _result("model", "torch-eager@cpu", 8, 1000.0),
    _result("model", "ort-cpu@cpu", 8, 500.0),
    _result("model", "ort-cpu@cpu", 8, 800.0, fmt="float32-nchw"),
    _result("e2e", "torch-eager@cpu", 8, 1250.0),
    _result("e2e", "ort-cpu@cpu", 8, 625.0),
]


def test_speedups_and_pipeline_efficiency():
    data = _result_file(SYNTHETIC)
    by_key = {r["key"]: r for r in data["results"]}
    assert by_key["model|torch-eager@cpu|uint8-nhwc|b8|352x352"]["speedup_vs_baseline"] == pytest.approx(1.0)
    assert by_key["model|ort-cpu@cpu|uint8-nhwc|b8|352x352"]["speedup_vs_baseline"] == pytest.approx(2.0)
    assert by_key["model|ort-cpu@cpu|float32-nchw|b8|352x352"]["speedup_vs_baseline"] == pytest.approx(1.25)
    e2e = by_key["e2e|ort-cpu@cpu|uint8-nhwc|b8|352x352"]
    assert e2e["speedup_vs_baseline"] == pytest.approx(2.0)  # against the baseline's e2e
    assert e2e["pipeline_efficiency"] == pytest.approx(0.8)
    assert e2e["model_only_key"] == "model|ort-cpu@cpu|uint8-nhwc|b8|352x352"
    (row,) = data["headline"]
    assert row["best_model_only"] == "model|ort-cpu@cpu|uint8-nhwc|b8|352x352"
    assert row["pipeline_efficiency_of_best"] == pytest.approx(0.8)
    text = format_report(data)
    assert "2.00x" in text and "ort-cpu@cpu" in text


def test_pipeline_efficiency_sets_mean_rate_against_mean_rate_and_pairs_rounds():
    """An e2e sample is a run's mean time per batch; the model-only side must be a mean too, or a
    right-skewed model-only distribution reads as a pipeline loss."""
    model = _result("model", "ort-cpu@cpu", 8, 100.0)
    model["latency"] = summarize_latencies([100.0, 100.0, 100.0, 300.0], 8)  # p50 100, mean 150
    model["round_mean_ms"] = [100.0, 200.0]
    e2e = _result("e2e", "ort-cpu@cpu", 8, 150.0)
    e2e["latency"] = summarize_latencies([150.0, 150.0], 8)
    e2e["round_mean_ms"] = [125.0, 200.0]
    results = [model, e2e]
    attach_efficiency(results)
    assert e2e["pipeline_efficiency"] == pytest.approx(1.0)          # 150 ms mean against 150 ms mean
    assert e2e["pipeline_efficiency_p50"] == pytest.approx(100 / 150)  # the old median-based figure
    assert e2e["pipeline_efficiency_rounds"] == pytest.approx([0.8, 1.0])
    text = results_table(results, "e2e")
    assert "0.80-1.00" in text


def test_headline_finds_the_end_to_end_twin_when_the_fastest_model_only_format_has_none():
    # float32 model-only is (by noise) the fastest; end-to-end runs only in uint8.
    results = [_result("model", "torch-eager@cpu", 8, 1000.0), _result("model", "ort-cpu@cpu", 8, 500.0),
               _result("model", "ort-cpu@cpu", 8, 490.0, fmt="float32-nchw"), _result("e2e", "ort-cpu@cpu", 8, 625.0)]
    data = _result_file(results)
    (row,) = data["headline"]
    assert row["best_model_only"] == "model|ort-cpu@cpu|float32-nchw|b8|352x352"
    assert row["pipeline_efficiency_of_best"] == pytest.approx(0.8)  # the uint8 twin: 500 / 625


def test_headline_ranks_like_with_like_per_batch_and_size_with_host_preparation():
    """A smaller input is always faster, and a float32 input leaves its normalisation out of the
    device-side figure: neither may win a headline row by that alone."""
    uint8 = _result("model", "ort-cpu@cpu", 8, 500.0)
    uint8["latency_with_host_prep"] = summarize_latencies([510.0, 510.0, 510.0], 8)
    float32 = _result("model", "ort-cpu@cpu", 8, 450.0, fmt="float32-nchw")
    float32["latency_with_host_prep"] = summarize_latencies([560.0, 560.0, 560.0], 8)
    results = [_result("model", "torch-eager@cpu", 8, 1000.0), uint8, float32,
               _result("model", "torch-eager@cpu", 8, 300.0, size=256), _result("model", "ort-cpu@cpu", 8, 200.0, size=256)]
    rows = {(r["batch_size"], r["input_size"]): r for r in _result_file(results)["headline"]}
    assert set(rows) == {(8, "352x352"), (8, "256x256")}
    assert rows[(8, "352x352")]["best_model_only"] == "model|ort-cpu@cpu|uint8-nhwc|b8|352x352"
    assert rows[(8, "256x256")]["best_model_only"] == "model|ort-cpu@cpu|uint8-nhwc|b8|256x256"
    assert rows[(8, "256x256")]["speedup_vs_baseline"] == pytest.approx(1.5)
    assert rows[(8, "352x352")]["best_model_only_ips_with_prep"] == pytest.approx(8 * 1000 / 510.0)
    text = format_report(_result_file(results))
    assert "+prep img/s" in text and "256x256" in text.split("Headline")[1]


def test_no_ratio_against_a_configuration_that_failed_part_way():
    """Its samples stop at the failure: they are not the same rounds as the other side's."""
    base = _result("model", "torch-eager@cpu", 8, 1000.0)
    base["error"] = "round 2: RuntimeError: CUDA error"
    ort, ort_e2e = _result("model", "ort-cpu@cpu", 8, 500.0), _result("e2e", "ort-cpu@cpu", 8, 600.0)
    broken_e2e = _result("e2e", "torch-eager@cpu", 8, 1300.0)
    data = _result_file([base, ort, ort_e2e, broken_e2e])
    by_key = {r["key"]: r for r in data["results"]}
    assert by_key[ort["key"]]["speedup_vs_baseline"] is None
    assert by_key[ort["key"]]["speedup_withheld"] == f"failed part-way: {base['key']}"
    assert by_key[ort_e2e["key"]]["pipeline_efficiency"] is not None  # both sides of it ran to the end
    assert by_key[broken_e2e["key"]]["pipeline_efficiency"] is None    # against the failed model-only run
    (row,) = data["headline"]
    assert row["best_model_only"] == ort["key"]  # the failed one is not a candidate


# -- schema ------------------------------------------------------------------------------------

def test_schema_accepts_a_complete_file_and_names_what_is_wrong():
    data = _result_file(SYNTHETIC)
    validate_result_file(json.loads(json.dumps(data)))
    broken = copy.deepcopy(data)
    del broken["machine"]
    broken["results"][0]["batch_size"] = "8"
    del broken["results"][1]["latency"]["p99_ms"]
    broken["results"][2]["mode"] = "fast"
    with pytest.raises(SchemaError) as err:
        validate_result_file(broken)
    message = str(err.value)
    for fragment in ("missing key 'machine'", "results[0].batch_size", "results[1].latency: missing key 'p99_ms'",
                     "results[2].mode"):
        assert fragment in message
    flagged = copy.deepcopy(data)
    flagged["results"][0]["batch_size"] = True  # a bool is not a batch size
    with pytest.raises(SchemaError):
        validate_result_file(flagged)


# -- compare -----------------------------------------------------------------------------------

def test_compare_two_result_files(tmp_path):
    a = _result_file(SYNTHETIC)
    faster = [copy.deepcopy(r) for r in SYNTHETIC if r["backend"] != "torch-eager"]
    for r in faster:
        p50 = r["latency"]["p50_ms"] / 2
        r["latency"] = summarize_latencies([p50 * 0.9, p50, p50 * 1.1], r["batch_size"])
    faster.append(_result("model", "torch-eager@cpu", 8, 1000.0))
    faster.append(_result("model", "ort-cpu@cpu", 1, 100.0))
    b = _result_file(faster)
    a["settings"], b["settings"] = {"slots": 2, "rounds": 3}, {"slots": 3, "rounds": 3}
    b["model"] = dict(a["model"], variant="effisegnet-lite0")
    b["complete"] = False
    next(r for r in b["results"] if r["key"] == "model|ort-cpu@cpu|uint8-nhwc|b8|352x352")["precision"] = "fp16"
    cmp = compare_results(a, b)
    assert cmp["settings_that_differ"] == {"slots": [2, 3]}
    assert cmp["model_that_differs"] == {"variant": ["effisegnet-lite2", "effisegnet-lite0"]}
    assert cmp["machine_that_differs"] == {} and cmp["incomplete"] == ["B"]
    rows = {r["key"]: r for r in cmp["rows"]}
    assert rows["model|ort-cpu@cpu|uint8-nhwc|b8|352x352"]["throughput_ratio"] == pytest.approx(2.0)
    assert rows["model|ort-cpu@cpu|uint8-nhwc|b8|352x352"]["p50_ratio"] == pytest.approx(0.5)
    assert rows["model|torch-eager@cpu|uint8-nhwc|b8|352x352"]["throughput_ratio"] == pytest.approx(1.0)
    assert cmp["only_in_a"] == ["e2e|torch-eager@cpu|uint8-nhwc|b8|352x352"]
    assert cmp["only_in_b"] == ["model|ort-cpu@cpu|uint8-nhwc|b1|352x352"]

    pa, pb = tmp_path / "a.json", tmp_path / "b.json"
    pa.write_text(json.dumps(a))
    pb.write_text(json.dumps(b))
    res = CliRunner().invoke(bench_command, ["--compare", str(pa), str(pb), "--output", str(tmp_path / "cmp")])
    assert res.exit_code == 0, res.output
    assert "model|ort-cpu@cpu|uint8-nhwc|b8|352x352" in res.output and "2.000" in res.output
    assert "setting slots: A 2, B 3" in res.output and "setting rounds" not in res.output
    assert "model variant: A 'effisegnet-lite2', B 'effisegnet-lite0'" in res.output
    assert "caveat model|ort-cpu@cpu|uint8-nhwc|b8|352x352: precision fp32 in A, fp16 in B" in res.output
    assert "B is incomplete" in res.output
    saved = json.loads((tmp_path / "cmp" / "effiseg_bench_compare.json").read_text())
    assert len(saved["rows"]) == 4

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"schema": SCHEMA}))
    res = CliRunner().invoke(bench_command, ["--compare", str(pa), str(bad)])
    assert res.exit_code != 0 and "missing key" in res.output
    utf16 = tmp_path / "utf16.json"
    utf16.write_text(json.dumps(a), encoding="utf-16")  # e.g. saved by PowerShell's > redirection
    res = CliRunner().invoke(bench_command, ["--compare", str(pa), str(utf16)])
    assert res.exit_code == 1 and "not UTF-8" in res.output and str(utf16) in res.output


def test_results_that_differ_in_tta_are_said_to_compare_unequal_work():
    same = [dict(_result("model", "torch-eager@cpu", 1, 900.0), tta=True),
            dict(_result("model", "ort-cpu@cpu", 1, 350.0), tta=True)]
    assert unequal_work_note(same) is None
    assert unequal_work_note([_result("model", "ort-cpu@cpu", 1, 350.0)]) is None  # files from before the field
    mixed = same + [dict(_result("model", "ort-cpu@cpu", 1, 100.0, fmt="float32-nchw"), tta=False)]
    note = unequal_work_note(mixed)
    assert "unequal work" in note
    # Each group of rows is named with the work it did.
    assert "flip TTA (4 network passes per image) in model|ort-cpu@cpu|uint8-nhwc|b1|352x352" in note
    assert "no TTA (1 network pass per image) in model|ort-cpu@cpu|float32-nchw|b1|352x352" in note
    # Same flips, different multi-scale sizes: unequal too (8 passes against 4).
    multiscale = same[:1] + [dict(same[1], tta_sizes=[352, 416])]
    note = unequal_work_note(multiscale)
    assert note and "sizes 352+416 (8 network passes per image) in model|ort-cpu@cpu" in note


COMMITTED_RESULTS = sorted((Path(__file__).resolve().parents[2] / "benchmarks" / "results").rglob("effiseg_bench.json"))


@pytest.mark.parametrize("path", COMMITTED_RESULTS, ids=lambda p: p.parent.relative_to(p.parents[2]).as_posix())
def test_every_committed_result_file_follows_the_bench_schema(path):
    """The numbers RESULTS.md quotes come from these files; --compare and the docs read them."""
    try:
        validate_result_file(json.loads(path.read_text(encoding="utf-8")))
    except SchemaError as e:
        pytest.fail(f"{path}: {e}")
