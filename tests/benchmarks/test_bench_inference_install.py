"""effiseg-bench in an inference install (no torch, timm, onnx or matplotlib): the ONNX backends
run, and what cannot run is explained."""
from __future__ import annotations

import importlib.util
import json

import pytest

from effiseg.benchmarks.report import validate_result_file


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
