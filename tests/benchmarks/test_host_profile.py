"""The host-side profile of the pipeline: every stage is timed, per image and across threads, through
its command (no timing assertions)."""
from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner
from conftest import write_noise_images

import numpy as np
import pytest

from effiseg.benchmarks.host_profile import InstantBackend, main
from effiseg.runtime.model_info import ModelInfo

STAGES = {"decode", "resize_into_slot", "mask_from_logits", "count_regions", "png_encode", "file_write"}


def test_host_profile_times_every_stage_and_its_thread_scaling(tmp_path):
    folder = write_noise_images(tmp_path / "images", 3, shape=(60, 80), ext="jpg")
    out = tmp_path / "profile.json"
    res = CliRunner().invoke(main, ["--images", str(folder), "--threads", "2", "--output", str(out)])
    assert res.exit_code == 0, res.output + repr(res.exception)
    data = json.loads(out.read_text())
    assert data["threads"] == 2
    assert set(data["per_image_ms"]) == STAGES | {"total_ms_per_image", "images_per_s_per_thread"}
    assert data["per_image_ms"]["total_ms_per_image"] == sum(data["per_image_ms"][s] for s in STAGES)
    assert set(data["thread_scaling"]) == STAGES | {"all"}
    for stage in data["thread_scaling"].values():
        assert stage["images_per_s_1_thread"] > 0 and stage["images_per_s_2_threads"] > 0
        assert stage["scaling"] == stage["images_per_s_2_threads"] / stage["images_per_s_1_thread"]
    assert "scaling" in res.output
    ceiling = data["pipeline_ceiling"]
    assert ceiling["images"] == 3 and set(ceiling["threads"]) == {"1", "2"}
    for k, run in ceiling["threads"].items():
        assert len(run["images_per_s_runs"]) == 3 and run["images_per_s"] == max(run["images_per_s_runs"]) > 0
        assert run["timing"]["images"] == 3 and run["timing"]["workers"] == int(k)
    assert "pipeline ceiling" in res.output


def test_host_profile_puts_its_files_under_workdir(tmp_path, monkeypatch):
    # The folder is part of what is measured (a file creation costs 7 us on tmpfs, ~500 us on this
    # project's VM disk): the copies and masks must land where the user pointed, and the record says where.
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", None)  # main() sets the module's default; undone after the test
    folder = write_noise_images(tmp_path / "images", 2, shape=(40, 40), ext="jpg")
    workdir = tmp_path / "work"
    workdir.mkdir()
    seen = []
    real = tempfile.TemporaryDirectory

    def recording(*args, **kwargs):
        made = real(*args, **kwargs)
        seen.append(Path(made.name).parent)
        return made

    monkeypatch.setattr(tempfile, "TemporaryDirectory", recording)
    out = tmp_path / "profile.json"
    res = CliRunner().invoke(main, ["--images", str(folder), "--workdir", str(workdir), "--output", str(out)])
    assert res.exit_code == 0, res.output + repr(res.exception)
    data = json.loads(out.read_text())
    assert data["workdir"] == str(workdir.resolve())
    assert set(data["per_image_ms"]) == STAGES | {"total_ms_per_image", "images_per_s_per_thread"}
    assert seen and all(parent == workdir.resolve() for parent in seen)


def test_instant_backend_hands_back_the_prepared_maps_in_turn():
    info = ModelInfo(path=None, variant="t", input_height=4, input_width=5)
    maps = np.arange(3 * 4 * 5, dtype=np.float32).reshape(3, 4, 5)
    backend = InstantBackend(info, maps, max_batch=2)
    assert backend.host_input(1).shape == (2, 4, 5, 3) and backend.host_input(1).dtype == np.uint8
    backend.submit(0, 2)
    backend.submit(1, 2)
    np.testing.assert_array_equal(backend.collect(0), maps[[0, 1]])
    np.testing.assert_array_equal(backend.collect(1), maps[[2, 0]])
    backend.submit(0, 1)
    with pytest.raises(RuntimeError, match="in flight"):
        backend.submit(0, 1)


class FakeClock:
    """perf_counter/sleep on a virtual clock: the delayed backend's bookkeeping, without timing."""

    def __init__(self):
        self.now = 100.0

    def perf_counter(self):
        return self.now

    def sleep(self, seconds):
        assert seconds > 0
        self.now += seconds


def test_delayed_backend_runs_batches_one_after_another_and_traces_idle_time(monkeypatch):
    import effiseg.benchmarks.host_profile as host_profile
    clock = FakeClock()
    monkeypatch.setattr(host_profile, "time", clock)
    info = ModelInfo(path=None, variant="t", input_height=4, input_width=5)
    maps = np.arange(2 * 4 * 5, dtype=np.float32).reshape(2, 4, 5)
    backend = host_profile.DelayedBackend(info, maps, max_batch=2, device_ms=10.0)
    backend.submit(0, 2)
    clock.now += 0.004
    backend.submit(1, 1)  # queued behind slot 0: done 10 ms after it, not after its own submit
    np.testing.assert_array_equal(backend.collect(0), maps[[0, 1]])
    assert clock.now == pytest.approx(100.010)
    np.testing.assert_array_equal(backend.collect(1), maps[[0]])
    assert clock.now == pytest.approx(100.020)
    assert backend.first_submit_at == pytest.approx(100.0) and backend.idle_between_batches_s == 0.0
    clock.now += 0.003  # the device waits 3 ms for the next batch
    backend.submit(0, 1)
    assert backend.collect(0).shape == (1, 4, 5) and clock.now == pytest.approx(100.033)
    assert backend.idle_between_batches_s == pytest.approx(0.003) and backend.last_done_at == pytest.approx(100.033)
    backend.reset_trace()
    assert backend.first_submit_at is None and backend.idle_between_batches_s == 0.0


def test_fill_and_drain_takes_each_run_apart(tmp_path):
    folder = write_noise_images(tmp_path / "images", 3, shape=(60, 80), ext="jpg")
    out = tmp_path / "fill_drain.json"
    res = CliRunner().invoke(main, ["--images", str(folder), "--device-ms", "2", "--batch", "2",
                                    "--folder-sizes", "3,5", "--slots", "3", "--output", str(out)])
    assert res.exit_code == 0, res.output + repr(res.exception)
    runs = json.loads(out.read_text())["fill_and_drain"]
    assert (runs["device_ms_per_batch"], runs["batch"], runs["slots"]) == (2.0, 2, 3)
    assert [(row["images"], row["batches"]) for row in runs["folders"]] == [(3, 2), (5, 3)]
    for row in runs["folders"]:
        assert row["device_busy_s"] == pytest.approx(row["batches"] * 0.002)
        assert row["wall_s"] == min(row["wall_s_runs"]) and row["wall_s"] >= row["pipeline_wall_s"]
        assert row["efficiency"] == pytest.approx(row["device_busy_s"] / row["wall_s"], abs=1e-4)
        # the run's wall time is its fill, the device's busy and idle time, and its drain
        assert row["overhead_ms"] == pytest.approx(row["fill_ms"] + row["idle_between_batches_ms"] + row["drain_ms"],
                                                   abs=0.1)
        assert min(row["fill_ms"], row["idle_between_batches_ms"], row["drain_ms"]) >= 0
    assert "fill and drain" in res.output and "efficiency" in res.output


def test_fill_and_drain_refuses_folder_sizes_that_are_not_counts(tmp_path):
    folder = write_noise_images(tmp_path / "images", 1, shape=(60, 80), ext="jpg")
    for sizes in ("8,x", "0"):
        res = CliRunner().invoke(main, ["--images", str(folder), "--device-ms", "2", "--folder-sizes", sizes])
        assert res.exit_code == 2 and "--folder-sizes" in res.output
