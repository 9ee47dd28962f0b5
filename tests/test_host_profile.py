"""The host-side profile of the pipeline: every stage is timed, per image and across threads, through
its command (no timing assertions)."""
from __future__ import annotations

import json

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
