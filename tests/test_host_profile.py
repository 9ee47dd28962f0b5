"""The host-side profile of the pipeline: every stage is timed, per image and across threads, through
its command (no timing assertions)."""
from __future__ import annotations

import json

from click.testing import CliRunner
from conftest import write_noise_images

from effiseg.benchmarks.host_profile import main

STAGES = {"decode", "resize_into_slot", "mask_from_logits", "count_regions", "png_write"}


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
