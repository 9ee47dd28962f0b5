"""``effiseg-run --engine FILE``: a TensorRT engine built ahead of time (effiseg-export MODEL.onnx --engine
FILE) runs through the CLI without a build or the engine cache, on the fake TensorRT and CUDA of
tests/tensorrt_fakes.py; any backend but tensorrt is refused with a usage error before a model loads."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np
from click.testing import CliRunner
from PIL import Image

from effiseg.runtime.cli import run_command
from effiseg.runtime.trt_engine_cache import CACHE_ENV_VAR

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the shared fakes
from tensorrt_fakes import MAXWELL, FakeCuda, make_fake_trt  # noqa: E402


def _frames(folder: Path) -> Path:
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def test_effiseg_run_runs_a_prebuilt_engine_without_building(tiny_onnx, tmp_path, monkeypatch):
    from effiseg.runtime.backends.tensorrt import BuildSettings, build_engine_file
    from effiseg.runtime.backends.tensorrt import backend as backend_module

    cuda = FakeCuda(MAXWELL)
    trt = make_fake_trt(cuda, version="8.5.3", fast_fp16=False)
    engine_file = tmp_path / "tiny.engine"
    build_engine_file(tiny_onnx, engine_file, BuildSettings(max_batch=2, cache_dir=tmp_path / "build-cache"),
                      tensorrt=trt, open_cuda_device=lambda index: cuda)
    monkeypatch.setattr(backend_module, "import_tensorrt", lambda: trt)  # the CLI makes the backend itself
    monkeypatch.setattr(backend_module, "open_cuda_for_tensorrt", lambda index: cuda)
    monkeypatch.setenv(CACHE_ENV_VAR, str(tmp_path / "run-cache"))
    monkeypatch.setattr(logging.root, "handlers", [])
    frames = _frames(tmp_path / "frames")
    common = ["--input", str(frames), "--model", str(tiny_onnx), "--batch", "2", "--no-progress"]
    result = CliRunner().invoke(run_command, [*common, "--output", str(tmp_path / "trt"), "--backend", "tensorrt",
                                              "--devices", "0", "--engine", str(engine_file)])
    assert result.exit_code == 0, result.output
    assert trt.stats["builds"] == 1  # the ahead-of-time build only
    assert not (tmp_path / "run-cache").exists()
    reference = CliRunner().invoke(run_command, [*common, "--output", str(tmp_path / "ort"), "--backend", "onnxruntime"])
    assert reference.exit_code == 0, reference.output
    for i in range(3):
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "trt" / f"{i}.png")),
                                      np.asarray(Image.open(tmp_path / "ort" / f"{i}.png")))


def test_effiseg_run_refuses_an_engine_for_another_backend(tiny_onnx, tmp_path):
    engine_file = tmp_path / "tiny.engine"
    engine_file.write_bytes(b"not looked at")
    frames = _frames(tmp_path / "frames")
    for backend in ("onnxruntime", "auto"):
        result = CliRunner().invoke(run_command, ["--input", str(frames), "--model", str(tiny_onnx), "--backend", backend,
                                                  "--engine", str(engine_file), "--no-progress"])
        assert result.exit_code == 2, result.output
        assert "--engine runs a TensorRT engine, which needs --backend tensorrt" in result.output
        assert f"--backend {backend}" in result.output
    assert not (tmp_path / "frames_masks").exists()  # refused before anything was written


def test_effiseg_run_says_a_missing_engine_file(tiny_onnx, tmp_path):
    frames = _frames(tmp_path / "frames")
    result = CliRunner().invoke(run_command, ["--input", str(frames), "--model", str(tiny_onnx), "--backend", "tensorrt",
                                              "--engine", str(tmp_path / "nowhere.engine")])
    assert result.exit_code == 2 and "nowhere.engine" in result.output
