"""The operator profile that explains GPU speed-ups: its category arithmetic on known numbers and a
tiny CPU run through its command (no timing assertions)."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from effiseg.benchmarks.op_profile import categorise, compare_categories, main, summarise_ops


def test_operators_fall_into_the_categories_that_explain_a_speed_up():
    assert categorise("aten::cudnn_convolution") == "convolution"
    assert categorise("aten::mkldnn_convolution") == "convolution"
    assert categorise("aten::upsample_nearest2d") == "upsample"
    assert categorise("aten::cudnn_batch_norm") == "normalisation"
    assert categorise("aten::silu_") == "activation"
    assert categorise("aten::add_") == "elementwise arithmetic"
    assert categorise("aten::copy_") == "copy / layout / dtype"
    assert categorise("aten::flip") == "copy / layout / dtype"
    assert categorise("aten::mean") == "reduction"
    assert categorise("aten::something_new") == "other"


def test_summary_and_comparison_on_known_numbers():
    # Two batches traced: per batch, convolutions 3 ms, upsampling 1 ms, additions 0.5 + 0.5 ms.
    base = summarise_ops({"aten::cudnn_convolution": 6000.0, "aten::upsample_nearest2d": 2000.0,
                          "aten::add": 1000.0, "aten::add_": 1000.0}, iterations=2)
    assert base["total_ms_per_batch"] == pytest.approx(5.0)
    assert base["by_category_ms_per_batch"] == pytest.approx(
        {"convolution": 3.0, "upsample": 1.0, "elementwise arithmetic": 1.0})
    assert base["by_category_share"]["convolution"] == pytest.approx(0.6)
    assert base["top_ops_ms_per_batch"][0] == {"op": "aten::cudnn_convolution", "category": "convolution", "ms": 3.0}
    # The fast mode: convolutions 3x faster, upsampling only 1.25x, a new cast appears.
    fast = summarise_ops({"aten::cudnn_convolution": 2000.0, "aten::upsample_nearest2d": 1600.0,
                          "aten::add": 400.0, "aten::add_": 400.0, "aten::_to_copy": 600.0}, iterations=2)
    rows = {r["category"]: r for r in compare_categories(base, fast)}
    assert rows["convolution"]["speedup"] == pytest.approx(3.0)
    assert rows["upsample"]["speedup"] == pytest.approx(1.25)
    casts = rows["copy / layout / dtype"]  # time the baseline did not spend at all
    assert casts["baseline_ms"] == 0.0 and casts["fast_ms"] == pytest.approx(0.3) and casts["speedup"] == 0.0
    assert sum(r["share_of_fast_time"] for r in rows.values()) == pytest.approx(1.0)
    assert rows["upsample"]["share_of_fast_time"] == pytest.approx(0.8 / 2.5)
    with pytest.raises(ValueError):
        summarise_ops({}, iterations=0)


def test_cpu_profile_writes_json_and_table_and_skips_the_cuda_variants(tiny_checkpoint, tmp_path):
    out = tmp_path / "profile"
    res = CliRunner().invoke(main, ["--checkpoint", str(tiny_checkpoint), "--device", "cpu", "--batch-sizes", "2,1",
                                    "--iters", "2", "--warmup", "1", "--output", str(out),
                                    "--cache-dir", str(tmp_path / "cache")])
    assert res.exit_code == 0, res.output + repr(res.exception)
    data = json.loads((out / "op_profile_b2.json").read_text())
    by_name = {v["variant"]: v for v in data["variants"]}
    eager = by_name["fp32-eager"]
    assert eager["backend"] == "torch-eager@cpu" and eager["batch_size"] == 2 and eager["precision"] == "fp32" and eager["input_size"] == [64, 64]
    assert len(eager["ms_per_batch_samples"]) == 2
    assert eager["by_category_ms_per_batch"]["convolution"] > 0
    assert sum(eager["by_category_ms_per_batch"].values()) == pytest.approx(eager["total_ms_per_batch"])
    assert "CUDA variants only" in by_name["fp16-fast"]["error"]
    assert "CUDA variants only" in by_name["fp32-eager-no-tf32"]["error"]
    # The rewritten network runs on CPUs too, and is compared with the baseline category by category.
    folded = by_name["fp32-folded"]
    assert folded["precision"] == "fp32" and folded["by_category_ms_per_batch"]["convolution"] > 0
    (pair,) = data["comparisons"]
    assert (pair["baseline"], pair["fast"]) == ("fp32-eager", "fp32-folded")
    assert pair["speedup"] == pytest.approx(eager["ms_per_batch_p50"] / folded["ms_per_batch_p50"])
    assert eager["eager_wall_ms_per_batch"] > 0 and eager["eager_device_busy_fraction"] > 0
    assert "fp32-eager" in (out / "op_profile_b2.txt").read_text()
    assert json.loads((out / "op_profile_b1.json").read_text())["batch_size"] == 1
    bad = CliRunner().invoke(main, ["--checkpoint", str(tiny_checkpoint), "--variants", "fp8-magic"])
    assert bad.exit_code != 0 and "fp8-magic" in bad.output


def test_a_failing_variant_is_recorded_and_the_finished_ones_are_saved(tiny_checkpoint, tmp_path, monkeypatch):
    from effiseg.benchmarks import op_profile

    def broken_open(self, warmup, iters):
        raise RuntimeError("CUDA out of memory (simulated)")
    monkeypatch.setattr(op_profile._Variant, "open_and_time", broken_open)
    saved = []
    data = op_profile.run_profile(tiny_checkpoint, "cpu", 1, 1, 1, ("fp32-eager",), tmp_path / "cache",
                                  log=lambda m: None, save=lambda d: saved.append(json.dumps(d)))
    assert "out of memory (simulated)" in data["variants"][0]["error"]
    assert saved and "simulated" in saved[-1]
    res = CliRunner().invoke(main, ["--checkpoint", str(tiny_checkpoint), "--device", "cpu", "--batch-sizes", "1",
                                    "--iters", "1", "--warmup", "1", "--output", str(tmp_path / "out"),
                                    "--cache-dir", str(tmp_path / "cache")])
    assert res.exit_code != 0 and "2 variant(s) failed" in res.output  # both CPU variants
    assert "simulated" in (tmp_path / "out" / "op_profile_b1.json").read_text()
