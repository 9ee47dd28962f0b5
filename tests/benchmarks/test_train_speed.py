"""benchmarks/train_speed.py: every (mode, runs, way) configuration is timed and written as JSON + table."""
import json
import os

import pytest
import torch
from click.testing import CliRunner

from effiseg.benchmarks.train_speed import default_modes, main, time_processes


def test_train_speed_times_each_configuration_and_writes_json_and_table(tmp_path):
    threads = torch.get_num_threads()
    try:
        res = CliRunner().invoke(main, ["--modes", "eager,fast", "--runs", "1,2", "--steps", "4", "--rounds", "1",
                                        "--input-size", "32", "--batch-size", "2", "--concurrency", "both",
                                        "--output", str(tmp_path)], catch_exceptions=False)
    finally:
        torch.set_num_threads(threads)
    assert res.exit_code == 0, res.output
    result = json.loads((tmp_path / "train_speed.json").read_text(encoding="utf-8"))
    rows = result["results"]
    assert [(r["mode"], r["runs"], r["concurrency"]) for r in rows] == [
        ("eager", 1, "in-process"), ("fast", 1, "in-process"),
        ("eager", 2, "in-process"), ("fast", 2, "in-process"),
        ("eager", 2, "processes"), ("fast", 2, "processes")]
    for r in rows:
        assert r["aggregate_images_per_s"] > 0
        assert r["images_per_s_per_run"] * r["runs"] == pytest.approx(r["aggregate_images_per_s"])
    assert len(rows[-1]["seconds"]) == 2  # one list of rounds per process
    assert "train step: fast" in rows[1]["step"]
    assert result["settings"]["input_size"] == 32 and result["machine"] and result["failures"] == []
    table = (tmp_path / "train_speed.md").read_text(encoding="utf-8")
    assert table.count("| fast |") == 3 and "x |" in table


def test_graphs_are_timed_on_cuda_and_the_uncaptured_step_on_the_cpu():
    assert default_modes("cuda:0") == ["eager", "graph"]
    assert default_modes("cpu") == ["eager", "fast"]


def test_a_failing_configuration_is_recorded_and_the_others_still_measured(tmp_path):
    threads = torch.get_num_threads()
    try:
        res = CliRunner().invoke(main, ["--modes", "graph,eager", "--runs", "1", "--steps", "4", "--rounds", "1",
                                        "--input-size", "32", "--batch-size", "2", "--output", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    assert res.exit_code == 1
    result = json.loads((tmp_path / "train_speed.json").read_text(encoding="utf-8"))
    assert [r["mode"] for r in result["results"]] == ["eager"]
    assert result["failures"][0]["mode"] == "graph" and "needs a CUDA device" in result["failures"][0]["error"]


def _dies_without_an_answer(*args):
    os._exit(3)  # as a process killed by the system, or crashing in native code, ends: no answer, no cleanup


def test_a_timing_process_that_dies_without_an_answer_fails_its_configuration_instead_of_hanging():
    """The parent waited for every process's answer with an untimed queue.get(): a process that died
    without one (killed, a crash in a CUDA library) hung the benchmark for good, and on Windows an
    untimed wait cannot even be interrupted by Ctrl-C."""
    with pytest.raises(RuntimeError, match="exit status 3"):
        time_processes({}, 2, 0, 1, 1, worker=_dies_without_an_answer)
