"""effiseg-bench's settings: option parsing, the iteration plan, which backends run here, and the
resolved settings with their plan of measurements."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from effiseg.benchmarks.cli import bench_command, parse_sizes
from effiseg.benchmarks.runner import ComputeOnly, IterationPlan, ModelOnly
from effiseg.benchmarks.settings import BenchSettings, EndToEndFolders, plan_measurements
from effiseg.benchmarks.targets import TARGETS, Target, resolve_targets


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


# -- the resolved settings and their plan -------------------------------------------------------------

def _resolve(devices, **options):
    base = dict(batches=None, input_formats=["uint8-nhwc", "float32-nchw"], mode="both", compute=None, rounds=None,
                warmup=None, iters=None, min_time_s=None, settle_s=None, n_images=None)
    return BenchSettings.resolve(devices, **{**base, **options})


def test_defaults_follow_the_devices_and_given_options_win():
    cpu = _resolve(["cpu"])
    assert (cpu.batches, cpu.rounds, cpu.warmup, cpu.min_time_s, cpu.settle_s, cpu.n_images) == ((1, 8), 3, 1, 0.5,
                                                                                                  0.1, 16)
    assert cpu.modes == ("model", "e2e") and not cpu.on_gpu
    gpu = _resolve(["cuda:0", "cuda:1"])
    assert (gpu.batches, gpu.rounds, gpu.warmup, gpu.min_time_s, gpu.settle_s, gpu.n_images) == ((1, 8, 32), 5, 10,
                                                                                                  1.0, 0.0, 256)
    assert gpu.modes == ("model", "e2e", "compute") and gpu.baseline_device == "cuda:0"
    given = _resolve(["cuda:0"], batches=[4], mode="model", compute=False, rounds=2, min_time_s=0.0, settle_s=0.5)
    assert (given.batches, given.modes, given.rounds, given.min_time_s, given.settle_s) == ((4,), ("model",), 2, 0.0,
                                                                                            0.5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        given.rounds = 3
    assert cpu.iteration_plan().min_iters == 2 and gpu.iteration_plan().min_iters == 10


def test_the_recorded_settings_have_the_result_files_fields():
    """Result files written before the settings were an object have the same ``settings`` keys."""
    committed = sorted((Path(__file__).resolve().parents[2] / "benchmarks" / "results").rglob("effiseg_bench.json"))
    recorded = json.loads(committed[-1].read_text(encoding="utf-8"))["settings"]
    targets = [Target(TARGETS["torch-eager"], "cpu")]
    written = _resolve(["cpu"], threads=2).to_json(targets, "torch-eager@cpu", [(352, 352)], None)
    assert set(written) == set(recorded)
    assert written["input_sizes"] == [[352, 352]] and written["backends"] == ["torch-eager@cpu"]
    assert written["timing_thread"] == "per-backend" and written["threads"] == 2


def test_the_plan_times_each_backend_in_the_formats_it_has(tmp_path):
    torch_eager, ort, ort_int8 = (Target(TARGETS[n], "cpu") for n in ("torch-eager", "ort-cpu", "ort-cpu-int8"))
    settings = _resolve(["cpu"], batches=[1, 2], compute=True)
    runnable = {("uint8-nhwc", (64, 64)), ("float32-nchw", (64, 64))}
    folders = EndToEndFolders(tmp_path / "images", tmp_path / "warmup", tmp_path / "masks")
    plan = plan_measurements(settings, [torch_eager, ort, ort_int8], [(64, 64)], runnable, pool=None, folders=folders)
    keys = [(m.config.mode, m.config.target.name, m.config.batch_size, m.config.input_format) for m in plan]
    for batch in (1, 2):
        assert ("model", "torch-eager", batch, "uint8-nhwc") in keys  # torch takes uint8 images only
        assert ("compute", "torch-eager", batch, "uint8-nhwc") in keys  # pure compute: torch backends only
        assert ("model", "ort-cpu", batch, "float32-nchw") in keys and ("e2e", "ort-cpu", batch, "uint8-nhwc") in keys
        assert ("model", "ort-cpu-int8", batch, "float32-nchw") not in keys  # its twin is a uint8 file
    assert not any(k[0] == "compute" and k[1] != "torch-eager" for k in keys)
    assert len(plan) == 2 * (3 + 3 + 2)  # per batch: torch model+compute+e2e, ort 2 formats+e2e, int8 model+e2e
    assert isinstance(plan[0], ModelOnly) and any(isinstance(m, ComputeOnly) for m in plan)
    # A size the ONNX file cannot run gives the ONNX backends nothing to time there.
    assert all(m.config.target.name == "torch-eager" for m in
               plan_measurements(settings, [torch_eager, ort], [(96, 96)], runnable, pool=None, folders=folders))
