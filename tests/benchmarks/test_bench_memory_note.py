"""effiseg-bench says when the host memory peaks are the baseline's own (issue 23, part 3)."""
from __future__ import annotations

from effiseg.benchmarks.memory import baseline_memory_note


def _result(label, mode, batch, added, peak):
    return {"label": label, "mode": mode, "batch_size": batch,
            "memory": {"host_rss_added_mb": added, "host_rss_peak_mb": peak}}


def test_the_note_names_the_baseline_and_its_own_memory():
    baseline = "torch-eager@cpu"
    results = [_result(baseline, "model", 1, 900.0, 1500.0), _result(baseline, "model", 8, 7300.0, 7900.0),
               _result("ort@cpu", "model", 8, 250.0, 8100.0), _result("openvino@cpu", "e2e", 8, 120.0, 8000.0)]
    note = baseline_memory_note(results, baseline)
    assert note is not None
    assert "7300 MB" in note and baseline in note and "batch 8" in note
    assert "ort@cpu" in note and "openvino@cpu" in note and "host_rss_added_mb" in note


def test_no_note_without_the_baseline_s_memory():
    assert baseline_memory_note([_result("ort@cpu", "model", 8, 250.0, 400.0)], "torch-eager@cpu") is None
    unmeasured = [{"label": "torch-eager@cpu", "mode": "model", "batch_size": 8, "memory": {"host_rss_added_mb": None}}]
    assert baseline_memory_note(unmeasured, "torch-eager@cpu") is None
