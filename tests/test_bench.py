"""effiseg-bench: statistics, derived ratios, the result-file schema, --compare, the interleaved
runner (with a test double) and one tiny real CPU run through the CLI. No timing assertions."""
from __future__ import annotations

import copy
import importlib.util
import json
import math
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from effiseg.benchmarks.analysis import SCHEMA, attach_efficiency, attach_speedups, headline, unequal_work_note
from effiseg.benchmarks.cli import bench_command, parse_sizes
from effiseg.benchmarks.report import (SchemaError, compare_results, format_report, results_table,
                                       validate_result_file)
from effiseg.benchmarks.runner import BackendPool, Config, IterationPlan, ModelOnly, run_rounds
from effiseg.benchmarks.stats import geometric_mean, percentile, ratio, speedup, summarize_latencies
from effiseg.benchmarks.targets import TARGETS, Target, resolve_targets
from effiseg.runtime.backends.base import Backend
from effiseg.runtime.model_info import ModelInfo


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


# -- the runner with a test double ---------------------------------------------------------------

class RecordingBackend(Backend):
    """Doubles the output of a uint8 batch; logs every submit so the test sees the visiting order."""
    name = "double"

    def __init__(self, info, max_batch, log, tag, fail_after=None):
        super().__init__(info, "cpu", "fp32", max_batch)
        self.buffers = [np.zeros((max_batch, info.input_height, info.input_width, 3), np.uint8)
                        for _ in range(self.n_slots)]
        self.out = [None] * self.n_slots
        self.log, self.tag, self.fail_after, self.calls = log, tag, fail_after, 0

    def host_input(self, slot):
        return self.buffers[slot]

    def submit(self, slot, n):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise RuntimeError("device lost")
        self.log.append(self.tag)
        self.out[slot] = self.buffers[slot][:n, :, :, 0].astype(np.float32) * 2

    def collect(self, slot):
        return self.out[slot]


def _targets():
    return [Target(TARGETS["torch-eager"], "cpu"), Target(TARGETS["ort-cpu"], "cpu")]


def test_rounds_interleave_configurations_and_count_samples():
    info = ModelInfo(path=None, variant="test", input_height=8, input_width=8)
    calls: list[str] = []

    def factory(target, fmt, batch, size):
        return RecordingBackend(info, batch, calls, f"{target.name}/b{batch}")

    pool = BackendPool(factory, log=lambda m: None)
    configs = [Config("model", t, b, 8, 8, "uint8-nhwc") for b in (1, 2) for t in _targets()]
    results = run_rounds([ModelOnly(c, pool) for c in configs], rounds=3, warmup=2,
                         plan=IterationPlan(iters=2), log=lambda m: None)
    pool.close()
    tags = [f"{c.target.name}/b{c.batch_size}" for c in configs]
    warm, timed = calls[:8], calls[8:]
    assert warm == [t for t in tags for _ in range(2)]
    # Round r visits the configurations rotated by r, two samples each.
    expected = []
    for r in range(3):
        order = tags[r:] + tags[:r]
        expected += [t for t in order for _ in range(2)]
    assert timed == expected
    for res, cfg in zip(results, configs):
        assert res["key"] == cfg.key and res["error"] is None
        assert len(res["samples_ms"]) == 6 and len(res["round_p50_ms"]) == 3
        assert res["latency"]["samples"] == 6
        assert res["bytes_in_per_image"] == 8 * 8 * 3 and res["bytes_out_per_image"] == 8 * 8 * 4
        assert res["latency_with_host_prep"]["p50_ms"] >= res["latency"]["p50_ms"] * 0.999


def test_each_backend_is_built_and_timed_on_a_thread_of_its_own():
    """As the runtime drives each backend from its own device thread; measurements that share a
    backend (model-only, compute) share its thread."""
    info = ModelInfo(path=None, variant="test", input_height=8, input_width=8)
    seen: dict[str, set] = {}

    class ThreadNotingBackend(RecordingBackend):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            seen.setdefault(self.tag, set()).add(threading.current_thread())  # built here

        def submit(self, slot, n):
            seen[self.tag].add(threading.current_thread())
            super().submit(slot, n)

    pool = BackendPool(lambda target, fmt, batch, size: ThreadNotingBackend(info, batch, [], f"{target.name}/b{batch}"),
                       log=lambda m: None)
    configs = [Config("model", t, b, 8, 8, "uint8-nhwc") for b in (1, 2) for t in _targets()]
    results = run_rounds([ModelOnly(c, pool) for c in configs], rounds=2, warmup=1, plan=IterationPlan(iters=2),
                         log=lambda m: None)
    pool.close()
    assert all(r["error"] is None for r in results)
    assert len(seen) == 4 and all(len(threads) == 1 for threads in seen.values())
    threads = [next(iter(t)) for t in seen.values()]
    assert len(set(threads)) == 4 and threading.current_thread() not in threads
    assert not any(t.is_alive() for t in threads)  # ended with the run


def test_ctrl_c_leaves_open_a_backend_whose_call_has_not_returned(monkeypatch):
    """Closing a backend while its thread is still inside submit would free (device) memory under
    running work; the others are closed as usual."""
    import _thread
    from effiseg.benchmarks import runner
    monkeypatch.setattr(runner, "CLOSE_WAIT_S", 0.3)
    info = ModelInfo(path=None, variant="test", input_height=8, input_width=8)
    entered, release, closed = threading.Event(), threading.Event(), []

    class HangingBackend(RecordingBackend):
        def submit(self, slot, n):
            if self.tag == "ort-cpu" and self.calls >= 1:  # the first timed batch never returns...
                entered.set()
                release.wait(20)  # ...until the test lets it
            super().submit(slot, n)

        def close(self):
            closed.append(self.tag)

    pool = BackendPool(lambda target, fmt, batch, size: HangingBackend(info, batch, [], target.name),
                       log=lambda m: None)
    configs = [Config("model", t, 1, 8, 8, "uint8-nhwc") for t in _targets()]
    threading.Thread(target=lambda: entered.wait(20) and _thread.interrupt_main(), daemon=True).start()
    try:
        with pytest.raises(KeyboardInterrupt):  # Ctrl-C while ort-cpu's round is running
            run_rounds([ModelOnly(c, pool) for c in configs], rounds=2, warmup=1, plan=IterationPlan(iters=1),
                       log=lambda m: None)
        assert pool.left_open == {configs[1].backend_key}
        pool.close()
        assert closed == ["torch-eager"]
    finally:
        release.set()


def test_host_memory_added_is_the_configurations_own():
    """The process's peak RSS includes every backend the interleaved run keeps loaded; the added
    figure is what building and warming up this configuration took."""
    info = ModelInfo(path=None, variant="test", input_height=8, input_width=8)

    class HeavyBackend(RecordingBackend):
        ballast = None

        def submit(self, slot, n):
            # Like a backend that sizes its workspace on its first batch (warm-up): 96 MiB, touched.
            if self.tag == "torch-eager" and self.ballast is None:
                self.ballast = np.ones(96 * 2**20, np.uint8)
            super().submit(slot, n)

    pool = BackendPool(lambda target, fmt, batch, size: HeavyBackend(info, batch, [], target.name), log=lambda m: None)
    configs = [Config("model", t, 1, 8, 8, "uint8-nhwc") for t in _targets()]
    results = run_rounds([ModelOnly(c, pool) for c in configs], rounds=1, warmup=1, plan=IterationPlan(iters=1),
                         log=lambda m: None)
    pool.close()
    heavy, light = (r["memory"] for r in results)
    if heavy["host_rss_added_mb"] is None:
        pytest.skip("no RSS reader on this platform")
    assert heavy["host_rss_added_mb"] > 80 and light["host_rss_added_mb"] < 40
    assert light["host_rss_peak_mb"] > 80  # the process peak still holds the other backend
    assert heavy["device_added_mb"] is None and heavy["device_peak_mb"] is None  # no GPU in this run


class _FakeCudaAllocator:
    """torch.cuda's memory counters as the bench reads them, for a GPU that is not here."""
    MB = 2**20

    def __init__(self):
        self.allocated = 0
        self.peak = 0
        self.segments = []  # memory_snapshot() entries

    def capture_graph(self, pool_mb: int, static_mb: int):
        # After capture: the pool stays reserved, only the static tensors count as allocated.
        self.segments.append({"device": 0, "segment_pool_id": (1, 0), "total_size": pool_mb * self.MB,
                              "allocated_size": static_mb * self.MB})
        self.allocated += static_mb * self.MB
        self.peak = max(self.peak, self.allocated)

    def install(self, monkeypatch):
        import effiseg.benchmarks.memory as memory

        class Cuda:
            memory_allocated = staticmethod(lambda device=None: self.allocated)
            max_memory_allocated = staticmethod(lambda device=None: self.peak)
            memory_snapshot = staticmethod(lambda: list(self.segments))
            current_device = staticmethod(lambda: 0)

            @staticmethod
            def reset_peak_memory_stats(device=None):
                self.peak = self.allocated

        fake_torch = type("FakeTorch", (), {"cuda": Cuda})
        monkeypatch.setattr(memory, "_torch_cuda", lambda device: fake_torch if str(device).startswith("cuda") else None)


def test_graph_pools_count_what_they_hold_beyond_live_tensors_on_that_device_only(monkeypatch):
    import effiseg.benchmarks.memory as memory
    allocator = _FakeCudaAllocator()
    mb = allocator.MB
    allocator.segments = [
        {"device": 0, "segment_pool_id": (0, 0), "total_size": 900 * mb, "allocated_size": 100 * mb},  # the cache
        {"device": 0, "segment_pool_id": [1, 0], "total_size": 300 * mb, "allocated_size": 20 * mb},  # as a list
        {"device": 0, "segment_pool_id": (2, 0), "total_size": 50 * mb, "allocated_size": 0},
        {"device": 1, "segment_pool_id": (1, 0), "total_size": 700 * mb, "allocated_size": 0},       # another GPU
        {"device": 0, "total_size": 64 * mb, "allocated_size": 0},  # no pool id: the default pool
    ]
    allocator.install(monkeypatch)
    assert memory.torch_cuda_graph_pools_unallocated_mb("cuda:0") == pytest.approx(280 + 50)
    assert memory.torch_cuda_graph_pools_unallocated_mb("cuda:1") == pytest.approx(700)
    assert memory.torch_cuda_graph_pools_unallocated_mb("cpu") is None


@pytest.mark.gpu
def test_a_captured_graph_pool_is_seen_on_a_real_gpu():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    from effiseg.benchmarks.memory import torch_cuda_graph_pools_unallocated_mb
    before = torch_cuda_graph_pools_unallocated_mb("cuda:0")
    x = torch.randn(64, 256, 256, device="cuda:0")
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        (x * 2).sum()  # warm-up before capture, as torch's documentation asks
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ((x * 2) + 1).sum()  # 16 MiB intermediates, freed into the graph's pool after capture
    held = torch_cuda_graph_pools_unallocated_mb("cuda:0") - before
    assert held >= 16, held
    del graph, out


def test_a_cuda_graph_configuration_is_charged_for_its_graph_pool(monkeypatch):
    """A captured graph's intermediate tensors leave ``memory_allocated`` when capture ends but stay
    reserved in its private pool: the H200 run showed +63 MB for the fast mode at batch 32."""
    allocator = _FakeCudaAllocator()
    allocator.install(monkeypatch)
    info = ModelInfo(path=None, variant="test", input_height=8, input_width=8)

    class GraphBackend(RecordingBackend):
        captured = False

        def submit(self, slot, n):
            if not self.captured:  # the first (warm-up) batch captures the graph
                allocator.capture_graph(pool_mb=2048, static_mb=10)
                self.captured = True
            super().submit(slot, n)

    pool = BackendPool(lambda target, fmt, batch, size: GraphBackend(info, batch, [], target.name), log=lambda m: None)
    config = Config("model", Target(TARGETS["torch-fast"], "cuda:0"), 1, 8, 8, "uint8-nhwc")
    (result,) = run_rounds([ModelOnly(config, pool)], rounds=1, warmup=1, plan=IterationPlan(iters=1),
                           log=lambda m: None)
    pool.close()
    assert result["error"] is None
    memory = result["memory"]
    assert memory["device_added_mb"] == pytest.approx(2048)  # 10 MB static tensors + 2038 MB free in the pool
    assert memory["device_peak_mb"] == pytest.approx(2048)
    assert "CUDA-graph pools" in memory["device_source"]


def test_every_finished_round_is_handed_out_and_a_deadline_stops_between_rounds():
    info = ModelInfo(path=None, variant="test", input_height=8, input_width=8)
    pool = BackendPool(lambda target, fmt, batch, size: RecordingBackend(info, batch, [], target.name),
                       log=lambda m: None)
    configs = [Config("model", t, 1, 8, 8, "uint8-nhwc") for t in _targets()]
    saved = []
    results = run_rounds([ModelOnly(c, pool) for c in configs], rounds=3, warmup=1, plan=IterationPlan(iters=2),
                         log=lambda m: None, on_round=lambda res, done: saved.append((done, res)))
    assert [done for done, _ in saved] == [1, 2, 3]
    assert all(len(r["samples_ms"]) == 2 for r in saved[0][1])  # round 1's results hold round 1 only
    assert all(len(r["round_mean_ms"]) == 3 for r in results)

    saved.clear()
    messages = []
    results = run_rounds([ModelOnly(c, pool) for c in configs], rounds=3, warmup=1, plan=IterationPlan(iters=2),
                         log=messages.append, deadline=0.0, on_round=lambda res, done: saved.append(done))
    pool.close()
    assert saved == [1]  # the first round always runs; the budget is spent, so no second one starts
    assert all(len(r["samples_ms"]) == 2 and r["error"] is None for r in results)
    assert any("stopping after round 1 of 3" in m for m in messages)


def test_no_configuration_is_opened_after_the_opening_deadline_and_the_opened_ones_still_run():
    info = ModelInfo(path=None, variant="test", input_height=8, input_width=8)
    calls: list[str] = []
    pool = BackendPool(lambda target, fmt, batch, size: RecordingBackend(info, batch, calls, f"{target.name}/b{batch}"),
                       log=lambda m: None)
    configs = [Config("model", t, b, 8, 8, "uint8-nhwc") for b in (1, 2) for t in _targets()]
    messages, saved = [], []
    results = run_rounds([ModelOnly(c, pool) for c in configs], rounds=2, warmup=1, plan=IterationPlan(iters=2),
                         log=messages.append, open_deadline=0.0, on_round=lambda res, done: saved.append(done))
    pool.close()
    first, rest = results[0], results[1:]
    assert first["error"] is None and len(first["samples_ms"]) == 4  # the first is always opened, and runs
    assert set(calls) == {"torch-eager/b1"}  # no other backend was even built
    for r in rest:
        assert r["samples_ms"] == [] and r["latency"] is None
        assert r["error"].startswith("not opened: the time budget ran out")
    assert saved == [1, 2]
    assert sum("skipping" in m for m in messages) == 3


def test_end_to_end_warms_up_in_two_folder_runs_and_logs_where_the_time_went(tmp_path):
    from PIL import Image
    from effiseg.benchmarks.e2e import E2E_WARMUP_RUNS, EndToEnd
    info = ModelInfo(path=None, variant="test", input_height=8, input_width=8)
    calls: list[str] = []
    runner_threads: set[threading.Thread] = set()

    class ThreadNotingBackend(RecordingBackend):
        def submit(self, slot, n):
            runner_threads.add(threading.current_thread())
            super().submit(slot, n)

    pool = BackendPool(lambda target, fmt, batch, size: ThreadNotingBackend(info, batch, calls, "b"), log=lambda m: None)
    images, warm = tmp_path / "images", tmp_path / "warm"
    images.mkdir(), warm.mkdir()
    for i in range(4):
        Image.new("RGB", (12, 10), (i * 40, 90, 30)).save(images / f"{i}.png")
    for i in range(2):
        Image.new("RGB", (12, 10), (i * 40, 90, 30)).save(warm / f"{i}.png")
    m = EndToEnd(Config("e2e", _targets()[0], 2, 8, 8, "uint8-nhwc"), pool, images, warm, tmp_path / "masks",
                 workers=1, writers=1)
    messages = []
    results = run_rounds([m], rounds=1, warmup=10, plan=IterationPlan(iters=1), log=messages.append)
    pool.close()
    assert E2E_WARMUP_RUNS == 2 and len(calls) == 2 + 2  # two warm-up runs of one batch, then 4 images
    assert results[0]["error"] is None and results[0]["warmup_pipeline_timing"]["images"] == 2
    note = [x for x in messages if "pipeline, last warm-up run" in x]
    assert len(note) == 1 and "1 decoder(s), 1 writer(s)" in note[0] and "runner in submit/collect" in note[0]
    # Every run drove the backend from the segmenter's one device thread, which ends with the measurement.
    (runner,) = runner_threads
    assert not runner.is_alive()


def test_a_failing_backend_is_reported_and_the_others_go_on():
    info = ModelInfo(path=None, variant="test", input_height=8, input_width=8)

    def factory(target, fmt, batch, size):
        if target.name == "ort-cpu" and batch == 2:
            raise RuntimeError("cannot build")
        return RecordingBackend(info, batch, [], target.name, fail_after=3 if target.name == "torch-eager" else None)

    pool = BackendPool(factory, log=lambda m: None)
    configs = [Config("model", t, b, 8, 8, "uint8-nhwc") for b in (1, 2) for t in _targets()]
    results = {r["key"]: r for r in run_rounds([ModelOnly(c, pool) for c in configs], rounds=2, warmup=1,
                                               plan=IterationPlan(iters=2), log=lambda m: None)}
    pool.close()
    assert "cannot build" in results[configs[3].key]["error"] and results[configs[3].key]["latency"] is None
    assert "device lost" in results[configs[0].key]["error"]
    assert results[configs[1].key]["error"] is None and len(results[configs[1].key]["samples_ms"]) == 4


def test_iteration_plan_and_argument_parsing():
    plan = IterationPlan(min_time_s=1.0, min_iters=2, max_iters=50)
    assert plan.for_latency(0.3) == 4
    assert plan.for_latency(5.0) == 2
    assert plan.for_latency(0.001) == 50
    assert IterationPlan(iters=7).for_latency(5.0) == 7
    assert parse_sizes("352") == [(352, 352)]
    assert parse_sizes("384x320,256") == [(384, 320), (256, 256)]


def test_backend_names_and_sizes_are_each_taken_once_and_all_stands_alone():
    from effiseg.benchmarks.targets import parse_names
    assert parse_names("ort-cpu, torch-fast,ort-cpu") == ["ort-cpu", "torch-fast"]
    with pytest.raises(ValueError, match="alone"):
        parse_names("all,ort-cpu")
    assert parse_sizes("64,64x64,96") == [(64, 64), (96, 96)]
    res = CliRunner().invoke(bench_command, ["--backends", "all,ort-cpu"])
    assert res.exit_code == 2 and "alone" in res.output, res.output  # a usage error, not a KeyError


def test_gpu_backends_need_a_gpu_not_just_a_gpu_build(monkeypatch):
    """onnxruntime-gpu lists its CUDA provider on machines without a GPU; a default run there must
    not pick ort-cuda (and fail), nor TensorRT where it is installed."""
    import effiseg.benchmarks.targets as targets
    monkeypatch.setattr(targets, "ort_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(targets, "missing_modules", lambda names: [])
    monkeypatch.setattr(targets, "cuda_available", lambda: False)
    monkeypatch.setattr(targets, "cuda_gpu_count", lambda: 0)
    chosen, skipped = resolve_targets(["all"], ["cpu"], explicit=False)
    assert not [t for t in chosen if t.device.startswith("cuda")]
    reasons = {s["backend"]: s["reason"] for s in skipped}
    for name in ("ort-cuda", "trt-fp32", "trt-fp16"):
        assert "no CUDA GPU here" in reasons[name]
    monkeypatch.setattr(targets, "cuda_gpu_count", lambda: 1)
    chosen, skipped = resolve_targets(["ort-cuda"], ["cuda:0", "cuda:1"], explicit=True)
    assert [t.label for t in chosen] == ["ort-cuda@cuda:0"]
    assert [(s["device"], s["reason"]) for s in skipped] == [("cuda:1", "no CUDA GPU cuda:1 here (the NVIDIA driver shows 1)")]


def test_a_backend_asked_for_by_name_that_cannot_run_stops_the_run_before_any_timing(tmp_path):
    from effiseg.benchmarks.targets import missing_modules
    if not missing_modules(["tensorrt"]):
        pytest.skip("tensorrt is installed here")
    res = CliRunner().invoke(bench_command, ["--backends", "trt-fp16", "--devices", "cpu",
                                             "--output", str(tmp_path / "out")])
    assert res.exit_code == 2, res.output
    assert "trt-fp16" in res.output and "cannot run here" in res.output and "effiseg[trt]" in res.output
    assert not (tmp_path / "out").exists()


def test_targets_that_cannot_run_here_are_skipped_with_a_reason():
    chosen, skipped = resolve_targets(["ort-cuda", "trt-fp16"], ["cpu"], explicit=True)
    assert all(s["reason"] for s in skipped)
    assert {s["backend"] for s in skipped} | {t.name for t in chosen} == {"ort-cuda", "trt-fp16"}
    # The torch fast mode runs on CPUs too (the rewritten network in fp32), where torch is installed.
    chosen_fast, skipped_fast = resolve_targets(["torch-fast"], ["cpu"], explicit=True)
    if skipped_fast:
        assert "torch is not installed" in skipped_fast[0]["reason"]
    else:
        assert [t.label for t in chosen_fast] == ["torch-fast@cpu"]


# -- one tiny real run -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("onnxruntime")
    from effiseg.training.checkpoint import model_config, save_checkpoint
    from effiseg.training.model import build_model
    folder = tmp_path_factory.mktemp("ckpt")
    save_checkpoint(folder, build_model("effisegnet-lite0").eval(), model_config("effisegnet-lite0", input_size=64))
    return folder


def test_tiny_cpu_run_writes_table_json_and_plot(tiny_checkpoint, tmp_path):
    out = tmp_path / "out"
    args = ["--checkpoint", str(tiny_checkpoint), "--backends", "ort-cpu,torch-eager", "--batch-sizes", "1,2",
            "--rounds", "1", "--warmup", "1", "--iters", "2", "--mode", "both", "--images", "3",
            "--settle", "0", "--devices", "cpu", "--slots", "3", "--output", str(out),
            "--cache-dir", str(tmp_path / "cache")]
    res = CliRunner().invoke(bench_command, args)
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert {p.name for p in out.iterdir()} >= {"effiseg_bench.json", "effiseg_bench.txt", "effiseg_bench.png"}
    assert (out / "effiseg_bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads((out / "effiseg_bench.json").read_text())
    validate_result_file(data)
    keys = {r["key"] for r in data["results"]}
    for batch in (1, 2):
        assert f"model|torch-eager@cpu|uint8-nhwc|b{batch}|64x64" in keys
        assert f"model|ort-cpu@cpu|uint8-nhwc|b{batch}|64x64" in keys
        assert f"model|ort-cpu@cpu|float32-nchw|b{batch}|64x64" in keys
        assert f"e2e|ort-cpu@cpu|uint8-nhwc|b{batch}|64x64" in keys
        assert f"e2e|torch-eager@cpu|uint8-nhwc|b{batch}|64x64" in keys
    for r in data["results"]:
        assert r["error"] is None, r["error"]
        assert len(r["samples_ms"]) == (1 if r["mode"] == "e2e" else 2)
        assert r["speedup_vs_baseline"] is not None and math.isfinite(r["speedup_vs_baseline"])
        if r["backend"] == "torch-eager":
            assert r["speedup_vs_baseline"] == pytest.approx(1.0)
        if r["mode"] == "e2e":
            assert r["pipeline_efficiency"] is not None and r["images"] == 3
            assert r["pipeline_timing"][0]["images"] == 3
            assert r["slots"] == 3  # the backends were built with the slots asked for
    assert data["settings"]["slots"] == 3
    by_key = {r["key"]: r for r in data["results"]}
    assert by_key["model|ort-cpu@cpu|float32-nchw|b1|64x64"]["bytes_in_per_image"] == 4 * 64 * 64 * 3
    assert by_key["model|ort-cpu@cpu|uint8-nhwc|b1|64x64"]["bytes_in_per_image"] == 64 * 64 * 3
    assert data["machine"]["cpu_model"] and data["machine"]["libraries"]["numpy"]
    assert data["model"]["variant"] == "effisegnet-lite0"
    text = (out / "effiseg_bench.txt").read_text()
    assert "Model-only" in text and "End-to-end" in text and "torch-eager@cpu" in text
    assert "once %" in text
    assert all(t["fill_s"] is not None and t["drain_s"] is not None
               for r in data["results"] if r["mode"] == "e2e" for t in r["pipeline_timing"])


def test_pipeline_breakdown_shows_the_calls_own_time_and_where_fill_and_drain_weigh():
    from effiseg.benchmarks.report import pipeline_table

    def row(batch, fill_s, drain_s):
        timing = {"bench_wall_s": 0.5, "wall_s": 0.49, "decode_s": 0.1, "infer_s": 0.4, "write_s": 0.2,
                  "runner_idle_s": 0.0, "wait_for_slot_s": 0.3, "wait_for_writer_s": 0.05,
                  "fill_s": fill_s, "drain_s": drain_s, "batches": 256 // batch, "images": 256}
        return {"mode": "e2e", "key": f"e2e|x|b{batch}", "batch_size": batch, "pipeline_timing": [timing]}

    light = pipeline_table([row(8, 0.01, 0.01), row(32, 0.02, 0.01)])
    line = next(l for l in light.splitlines() if l.startswith("e2e|x|b8"))
    assert line.split()[1:3] == [f"{500 / 256:.1f}", f"{490 / 256:.1f}"]  # call, then the pipeline's wall
    assert line.split()[-1] == "6"  # (10 ms outside the pipeline + 10 fill + 10 drain) of the 500 ms call
    assert "wr wait" in light and "pays once" not in light
    heavy = pipeline_table([row(8, 0.01, 0.01), row(32, 0.04, 0.03)])
    assert "pays once" in heavy and "e2e|x|b32 16%" in heavy and "b8 6%" not in heavy
    older = row(8, None, None)  # a file from a runtime that did not measure them
    assert pipeline_table([older]).splitlines()[-1].split()[-1] == "-"


def test_time_budget_keeps_the_finished_rounds_and_says_so(tiny_checkpoint, tmp_path):
    out = tmp_path / "out"
    args = ["--checkpoint", str(tiny_checkpoint), "--backends", "ort-cpu", "--batch-sizes", "1",
            "--rounds", "4", "--warmup", "1", "--iters", "2", "--mode", "model", "--input-formats", "uint8",
            "--settle", "0", "--devices", "cpu", "--output", str(out), "--cache-dir", str(tmp_path / "cache"),
            "--time-budget", "0.01", "--no-plot"]
    res = CliRunner().invoke(bench_command, args)  # preparing alone takes longer than 10 ms
    assert res.exit_code == 0, res.output + repr(res.exception)
    data = json.loads((out / "effiseg_bench.json").read_text())
    validate_result_file(data)
    assert data["complete"] is True and data["rounds_completed"] == 1
    assert data["settings"]["time_budget_s"] == 0.01
    assert any("1 of 4 rounds" in n for n in data["notes"])
    by_backend = {r["backend"]: r for r in data["results"]}
    assert set(by_backend) == {"torch-eager", "ort-cpu"}
    # The budget was spent opening the baseline: ONNX Runtime is listed, not opened, and says why.
    assert len(by_backend["torch-eager"]["samples_ms"]) == 2 and by_backend["torch-eager"]["error"] is None
    assert by_backend["ort-cpu"]["samples_ms"] == [] and "time budget" in by_backend["ort-cpu"]["error"]
    assert "not opened" in res.output  # said, and noted in the file; a budget's cut is not a failure (exit 0)
    assert any("1 configuration(s) were not opened" in n and "model|ort-cpu@cpu" in n for n in data["notes"])


def test_ctrl_c_keeps_the_finished_rounds_and_exits_130(tiny_checkpoint, tmp_path, monkeypatch):
    from effiseg.benchmarks import runner
    real_sample, calls = runner.ModelOnly.sample, []

    def sample(self):
        calls.append(1)
        if len(calls) == 7:  # 2 warm-up + 4 round-1 samples, then the first of round 2
            raise KeyboardInterrupt
        return real_sample(self)
    monkeypatch.setattr(runner.ModelOnly, "sample", sample)
    out = tmp_path / "out"
    (out).mkdir()
    (out / "effiseg_bench.png").write_bytes(b"a plot of an earlier run")
    args = ["--checkpoint", str(tiny_checkpoint), "--backends", "ort-cpu", "--batch-sizes", "1", "--rounds", "3",
            "--warmup", "1", "--iters", "2", "--mode", "model", "--input-formats", "uint8", "--settle", "0",
            "--devices", "cpu", "--output", str(out), "--cache-dir", str(tmp_path / "cache")]
    res = CliRunner().invoke(bench_command, args)
    assert res.exit_code == 130, res.output + repr(res.exception)
    assert "1 finished round(s)" in res.output
    data = json.loads((out / "effiseg_bench.json").read_text())
    validate_result_file(data)
    assert data["complete"] is False and data["rounds_completed"] == 1
    assert all(len(r["samples_ms"]) == 2 for r in data["results"])
    assert "1 of 3 rounds" in (out / "effiseg_bench.txt").read_text()
    assert not (out / "effiseg_bench.png").exists()  # the stale plot is gone, not passed off as this run's


# -- what the twin of an ONNX file reproduces --------------------------------------------------------

@pytest.fixture(scope="module")
def tta_onnx(tiny_checkpoint, verify_images_dir, tmp_path_factory):
    """The tiny checkpoint exported as the bundled default is: flip TTA in the graph, threshold 0.45."""
    from conftest import export_tiny
    return export_tiny(tiny_checkpoint, tmp_path_factory.mktemp("tta_onnx") / "tta.onnx", verify_images_dir,
                       tta=True, threshold=0.45)


@pytest.fixture(scope="module")
def bench_cache(tmp_path_factory):
    """One cache for the tests below, holding a twin as the benchmark used to cache it: named without
    its TTA setting, and without TTA in its config."""
    from effiseg.training.checkpoint import model_config, save_checkpoint
    from effiseg.training.model import build_model
    cache = tmp_path_factory.mktemp("bench_cache")
    save_checkpoint(cache / "untrained-effisegnet-lite0-64-chdefault", build_model("effisegnet-lite0").eval(),
                    model_config("effisegnet-lite0", input_size=64, untrained=True))
    return cache


def test_the_twin_of_a_tta_onnx_runs_the_same_four_passes_in_torch_and_float32(tta_onnx, bench_cache):
    from effiseg.benchmarks.factory import make_factory
    from effiseg.benchmarks.models import resolve_models
    from effiseg.training.checkpoint import load_config
    models = resolve_models(tta_onnx, None, bench_cache, log=lambda m: None)
    assert models.checkpoint.name != "untrained-effisegnet-lite0-64-chdefault"  # the cached TTA-less twin
    config = load_config(models.checkpoint)
    assert config.tta is True and config.threshold == pytest.approx(0.45)
    assert config.variant == "effisegnet-lite0" and config.input_size == 64
    assert models.onnx_for("uint8-nhwc", (64, 64)) == tta_onnx
    float32 = models.onnx_for("float32-nchw", (64, 64))
    info = ModelInfo.from_onnx(float32)
    assert info.input_format == "float32-nchw" and info.tta is True and info.threshold == pytest.approx(0.45)
    assert "-tta-" in float32.name

    torch_eager = make_factory(models)(Target(TARGETS["torch-eager"], "cpu"), "uint8-nhwc", 1, (64, 64))
    try:
        assert torch_eager.info.tta is True and torch_eager.graph.tta is True
    finally:
        torch_eager.close()

    described = models.describe()
    assert described["tta"] is True and described["network_passes_per_image"] == 4
    assert described["twin"]["tta"] is True and described["twin"]["decoder_channels"] == 32
    assert "flip TTA (4 network passes per image)" in described["note"]
    assert "threshold 0.45" in described["note"] and "decoder channels 32" in described["note"]
    assert "same architecture" not in described["note"]


def test_twins_and_their_exports_are_cached_apart_by_their_tta_setting(bench_cache, tmp_path, monkeypatch):
    from effiseg.benchmarks import models
    from effiseg.export import onnx_export
    from effiseg.training.checkpoint import load_config
    plain = models.untrained_checkpoint(bench_cache, "effisegnet-lite0", 64, log=lambda m: None)
    with_tta = models.untrained_checkpoint(bench_cache, "effisegnet-lite0", 64, log=lambda m: None, tta=True)
    assert plain != with_tta
    assert load_config(plain).tta is False and load_config(with_tta).tta is True

    exported = []

    def export_checkpoint(checkpoint, output, **options):  # the cache's naming only, no export
        exported.append(checkpoint)
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_bytes(b"")
    monkeypatch.setattr(onnx_export, "export_checkpoint", export_checkpoint)
    log = lambda m: None  # noqa: E731
    paths = [models.export_cached(c, tmp_path, "float32-nchw", (64, 64), log=log) for c in (plain, with_tta)]
    assert paths[0] != paths[1] and "-tta-" in paths[1].name and "-tta-" not in paths[0].name
    assert exported == [plain, with_tta]


def test_a_file_whose_network_this_copy_exports_differently_is_noted(tta_onnx, bench_cache, tmp_path):
    import onnx

    from effiseg.benchmarks.models import resolve_models
    models = resolve_models(tta_onnx, None, bench_cache, log=lambda m: None)
    models.onnx_for("float32-nchw", (64, 64))  # the formats' own operators are no difference
    assert not any("operators" in n for n in models.notes)

    # A file from another version of the code: its first convolution traced as another operator
    # (only the operator names are compared; the file is never run).
    other = onnx.load(str(tta_onnx))
    next(n for n in other.graph.node if n.op_type == "Conv").op_type = "ConvTranspose"
    older = tmp_path / "older.onnx"
    onnx.save(other, str(older))
    models = resolve_models(older, None, bench_cache, log=lambda m: None)
    models.onnx_for("float32-nchw", (64, 64))
    (note,) = [n for n in models.notes if "operators" in n]
    assert "only in older.onnx: ConvTranspose" in note and "only in this copy's export: none" in note


def test_an_onnx_file_and_a_checkpoint_that_differ_in_tta_are_refused(tta_onnx, tiny_checkpoint, bench_cache, tmp_path):
    import shutil

    from effiseg.benchmarks.models import resolve_models
    with pytest.raises(ValueError, match=r"tta \(True in tta.onnx, False in the checkpoint\)"):
        resolve_models(tta_onnx, tiny_checkpoint, bench_cache, log=lambda m: None)
    matching = shutil.copytree(tiny_checkpoint, tmp_path / "ckpt_tta")
    config = json.loads((matching / "config.json").read_text())
    (matching / "config.json").write_text(json.dumps({**config, "tta": True, "threshold": 0.45}))
    models = resolve_models(tta_onnx, matching, bench_cache, log=lambda m: None)
    assert models.tta is True and models.onnx_for("uint8-nhwc", (64, 64)) == tta_onnx


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


def test_a_run_on_a_tta_onnx_times_four_passes_in_every_backend(tta_onnx, bench_cache, tmp_path):
    out = tmp_path / "out"
    args = ["--model", str(tta_onnx), "--backends", "ort-cpu", "--batch-sizes", "1", "--rounds", "1",
            "--warmup", "1", "--iters", "1", "--mode", "model", "--settle", "0", "--devices", "cpu",
            "--output", str(out), "--cache-dir", str(bench_cache), "--no-plot"]
    res = CliRunner().invoke(bench_command, args)
    assert res.exit_code == 0, res.output + repr(res.exception)
    data = json.loads((out / "effiseg_bench.json").read_text())
    validate_result_file(data)
    assert {r["key"]: r["tta"] for r in data["results"]} == {
        "model|torch-eager@cpu|uint8-nhwc|b1|64x64": True, "model|ort-cpu@cpu|uint8-nhwc|b1|64x64": True,
        "model|ort-cpu@cpu|float32-nchw|b1|64x64": True}
    assert data["model"]["tta"] is True and data["model"]["given_onnx"] == str(tta_onnx)
    assert any("flip TTA (4 network passes per image)" in n for n in data["notes"])
    assert not any("unequal work" in n for n in data["notes"])
    assert "flip TTA (4 network passes per image)" in (out / "effiseg_bench.txt").read_text()


# -- unreadable end-to-end images ------------------------------------------------------------------

def _readable_images(folder):
    from conftest import write_noise_images
    return write_noise_images(folder, 2, ext="jpg")  # 0.jpg, 1.jpg


def _images_with_two_broken(folder):
    _readable_images(folder)
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a JPEG")
    (folder / "empty.png").write_bytes(b"")
    return folder


def test_unreadable_images_from_a_given_folder_are_named(tmp_path):
    from effiseg.benchmarks.imagesets import prepare_image_folder
    source = _images_with_two_broken(tmp_path / "given")
    with pytest.raises(ValueError) as err:
        prepare_image_folder(tmp_path / "dest", 8, 64, 64, source=source)
    message = str(err.value)
    assert "2 of 4 image files cannot be read" in message
    assert "corrupt.jpg: " in message and "empty.png: empty file (0 bytes)" in message
    assert "0.jpg" not in message and "1.jpg" not in message

    info = prepare_image_folder(tmp_path / "dest_ok", 5, 64, 64, source=_readable_images(tmp_path / "ok"))
    assert info["distinct"] == 2
    assert sorted(p.name for p in (tmp_path / "dest_ok").iterdir()) == [
        "000000_0.jpg", "000001_1.jpg", "000002_0.jpg", "000003_1.jpg", "000004_0.jpg"]


def test_the_cli_stops_on_unreadable_images_naming_them(tiny_checkpoint, tmp_path):
    source = _images_with_two_broken(tmp_path / "given")
    args = ["--checkpoint", str(tiny_checkpoint), "--backends", "ort-cpu", "--mode", "e2e", "--images", "4",
            "--images-from", str(source), "--devices", "cpu", "--output", str(tmp_path / "out"),
            "--cache-dir", str(tmp_path / "cache")]
    res = CliRunner().invoke(bench_command, args)
    assert res.exit_code != 0 and not isinstance(res.exception, ValueError), repr(res.exception)
    assert "corrupt.jpg" in res.output and "empty.png: empty file (0 bytes)" in res.output


def test_a_failed_end_to_end_run_names_its_files():
    from effiseg.benchmarks.e2e import failed_files
    rows = [{"file": f"{i:06d}_img{i}.jpg", "error": "" if i % 2 else f"corrupt or truncated image: #{i}"}
            for i in range(20)]
    text = failed_files({"files": rows})
    assert text.startswith("000000_img0.jpg: corrupt or truncated image: #0; 000002_img2.jpg: ")
    assert "000008_img8.jpg" in text and "000010_img10.jpg" not in text and text.endswith("; and 5 more")


def test_machine_info_on_windows_finds_the_cpu_name_and_nvidia_smi(tmp_path, monkeypatch):
    """Windows: the CPU's name is in the registry (platform.processor() says "Intel64 Family 6 ..."),
    and older drivers keep nvidia-smi.exe in Program Files\\NVIDIA Corporation\\NVSMI, off PATH."""
    import types

    from effiseg.benchmarks import machine

    fake_winreg = types.SimpleNamespace(HKEY_LOCAL_MACHINE="HKLM")

    class Key:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False
    fake_winreg.OpenKey = lambda root, path: Key()
    fake_winreg.QueryValueEx = lambda key, name: ("Intel(R) Xeon(R) CPU E5-2690 v4 @ 2.60GHz  ", 1)
    monkeypatch.setitem(sys.modules, "winreg", fake_winreg)
    monkeypatch.setattr(machine.sys, "platform", "win32")
    assert machine.cpu_model() == "Intel(R) Xeon(R) CPU E5-2690 v4 @ 2.60GHz"

    smi = tmp_path / "NVIDIA Corporation" / "NVSMI" / "nvidia-smi.exe"
    smi.parent.mkdir(parents=True)
    smi.write_bytes(b"")
    monkeypatch.setattr(machine.shutil, "which", lambda name: None)
    monkeypatch.setenv("ProgramW6432", str(tmp_path))
    monkeypatch.setenv("SystemRoot", str(tmp_path / "Windows"))
    assert machine.find_nvidia_smi() == str(smi)
    smi.unlink()
    assert machine.find_nvidia_smi() is None


def test_the_gpu_memory_probe_reads_the_card_that_runs_not_the_one_with_the_same_index(tmp_path, monkeypatch):
    """With CUDA_VISIBLE_DEVICES=1 (or mixed cards) "cuda:0" is not NVML's or nvidia-smi's GPU 0:
    the probe finds the card by its PCI bus id. Without a bus id it falls back to the index and
    says so."""
    import types

    from effiseg.benchmarks import memory
    from effiseg.runtime import cuda_memory

    used = {"0000:03:00.0": 100, "0000:82:00.0": 5000}  # MiB in use: GPU 0 idle, GPU 1 busy
    order = list(used)  # NVML's numbering: PCI order
    fake_nvml = types.SimpleNamespace(
        nvmlInit=lambda: None,
        nvmlDeviceGetHandleByIndex=lambda i: order[i],
        nvmlDeviceGetHandleByPciBusId=lambda bus: bus.decode(),
        nvmlDeviceGetMemoryInfo=lambda handle: types.SimpleNamespace(used=used[handle] * 1024 * 1024))
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml)
    monkeypatch.setattr(cuda_memory, "driver_pci_bus_id", lambda index: ["0000:82:00.0"][index])
    probe = memory.GpuMemoryProbe(0)
    assert (probe.source, probe.card, probe.read()) == ("nvml", "PCI 0000:82:00.0", 5000 * 1024 * 1024)

    monkeypatch.setattr(cuda_memory, "driver_pci_bus_id", lambda index: None)
    probe = memory.GpuMemoryProbe(0)
    assert probe.read() == 100 * 1024 * 1024 and "assumed" in probe.card

    # no pynvml: nvidia-smi, asked for the same card by its bus id
    monkeypatch.setitem(sys.modules, "pynvml", None)
    monkeypatch.setattr(cuda_memory, "driver_pci_bus_id", lambda index: ["0000:82:00.0"][index])
    monkeypatch.setattr(memory, "find_nvidia_smi", lambda: "nvidia-smi")
    asked = []

    def fake_smi(args, **kwargs):
        card = args[1].partition("=")[2]
        asked.append(card)
        return types.SimpleNamespace(stdout=f"{used[card]}\n")
    monkeypatch.setattr(memory.subprocess, "run", fake_smi)
    probe = memory.GpuMemoryProbe(0)
    assert (probe.source, probe.read()) == ("nvidia-smi", 5000 * 1024 * 1024)
    assert set(asked) == {"0000:82:00.0"}


# -- an inference install: no torch, timm, onnx or matplotlib ------------------------------------------

BENCH_SCRIPT = """
from pathlib import Path
import effiseg.benchmarks.models as models
from effiseg.benchmarks.cli import bench_command
if sys.argv[1] == "no-bundled-model":
    models.bundled_default_model = lambda: Path("not-in-this-copy.onnx")
bench_command.main(sys.argv[2:], prog_name="effiseg-bench")
"""


@pytest.fixture(scope="module")
def plain_onnx(tiny_checkpoint, verify_images_dir, tmp_path_factory):
    from conftest import export_tiny
    return export_tiny(tiny_checkpoint, tmp_path_factory.mktemp("plain_onnx") / "plain.onnx", verify_images_dir)


def _bench_without_torch(tmp_path, mode: str, *args: str):
    from conftest import run_as_inference_install
    return run_as_inference_install(tmp_path, BENCH_SCRIPT, mode, *args)


def test_without_torch_the_onnx_backends_run_and_the_missing_baseline_is_explained(plain_onnx, tmp_path):
    out = tmp_path / "out"
    proc = _bench_without_torch(tmp_path, "given", "--model", str(plain_onnx), "--batch-sizes", "1,2",
                                "--rounds", "1", "--warmup", "1", "--iters", "2", "--mode", "both",
                                "--images", "3", "--settle", "0", "--output", str(out),
                                "--cache-dir", str(tmp_path / "cache"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads((out / "effiseg_bench.json").read_text(encoding="utf-8"))
    validate_result_file(data)
    # The file as it is (uint8), model-only and end to end, on every CPU engine installed; the float32
    # variant needs an export, int8 a quantised twin.
    engines = ["ort-cpu"] + (["ov-cpu", "ov-cpu-bf16"] if importlib.util.find_spec("openvino") else [])
    assert {(r["mode"], r["backend"], r["input_format"], r["batch_size"]) for r in data["results"]} == {
        (m, e, "uint8-nhwc", b) for m in ("model", "e2e") for b in (1, 2) for e in engines}
    assert all(r["error"] is None and r["speedup_vs_baseline"] is None for r in data["results"])
    skipped = {s["backend"]: s["reason"] for s in data["skipped"]}
    assert "effiseg[train]" in skipped["torch-eager"]
    assert "--quantize int8" in skipped["ort-cpu-int8"]
    notes = " | ".join(data["notes"])
    assert "no PyTorch baseline" in notes and "not timed on ONNX backends: float32-nchw at 64x64" in notes
    assert "speed-ups are not available" in notes
    assert not (out / "effiseg_bench.png").exists()
    assert "matplotlib is not installed" in proc.stderr + proc.stdout
    assert "Traceback" not in proc.stderr


def test_without_torch_a_missing_bundled_model_or_a_checkpoint_is_a_clear_error(tiny_checkpoint, tmp_path):
    common = ["--rounds", "1", "--output", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache")]
    proc = _bench_without_torch(tmp_path, "no-bundled-model", *common)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "not-in-this-copy.onnx" in proc.stderr and "--model" in proc.stderr and "Traceback" not in proc.stderr
    proc = _bench_without_torch(tmp_path, "given", "--checkpoint", str(tiny_checkpoint), *common)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert str(tiny_checkpoint) in proc.stderr and "effiseg[export]" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_without_torch_sizes_the_file_cannot_run_are_left_out_with_the_reason(plain_onnx, tmp_path):
    """A fixed-size file runs at its own size only when no other can be exported."""
    out = tmp_path / "out"
    common = ["--model", str(plain_onnx), "--batch-sizes", "1", "--rounds", "1", "--warmup", "1", "--iters", "1",
              "--mode", "model", "--settle", "0", "--no-plot", "--output", str(out), "--cache-dir", str(tmp_path / "c")]
    proc = _bench_without_torch(tmp_path, "given", *common, "--input-size", "64,48")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads((out / "effiseg_bench.json").read_text(encoding="utf-8"))
    assert {(r["input_format"], r["height"]) for r in data["results"]} == {("uint8-nhwc", 64)}
    assert any("uint8-nhwc at 48x48" in n and "no checkpoint to export them from" in n for n in data["notes"])
    proc = _bench_without_torch(tmp_path, "given", *common, "--input-size", "48")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stdout + proc.stderr
    assert "no backend can run here" in proc.stderr and "uint8-nhwc at 48x48" in proc.stderr


COMMITTED_RESULTS = sorted((Path(__file__).resolve().parents[1] / "benchmarks" / "results").rglob("effiseg_bench.json"))


@pytest.mark.parametrize("path", COMMITTED_RESULTS, ids=lambda p: p.parent.relative_to(p.parents[2]).as_posix())
def test_every_committed_result_file_follows_the_bench_schema(path):
    """The numbers RESULTS.md quotes come from these files; --compare and the docs read them."""
    try:
        validate_result_file(json.loads(path.read_text(encoding="utf-8")))
    except SchemaError as e:
        pytest.fail(f"{path}: {e}")
