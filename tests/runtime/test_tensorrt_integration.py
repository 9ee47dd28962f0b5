"""TensorRT backend on a real GPU: engine build, parity with ONNX Runtime (CPU), engine cache,
double-buffered slots.

Needs the tensorrt package, a CUDA binding (cuda-python or pycuda), onnx, onnxruntime and an NVIDIA
GPU (torch only for the tests that export EffiSegNet); skipped with the reason otherwise. Run with:

    python -m pytest -m tensorrt tests/runtime/test_tensorrt_integration.py -v -rs

EFFISEG_TEST_CUDA_DEVICE picks the GPU (default cuda:0). Engines are built into pytest's tmp
folders, never into the user's cache. Tolerances: fp32 engines must match ONNX Runtime closely
(TensorRT may pick different but exact-in-fp32 kernels); fp16 engines loosely.
"""
from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from effiseg.runtime.cuda_memory import CudaError, CudaUnavailable, open_cuda

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the shared fakes
from tensorrt_test_models import (export_effisegnet_onnx, make_tiny_onnx, onnxruntime_reference,  # noqa: E402
                                  random_batch, tiny_info)

# Not marked ``gpu``: that mark asks torch for CUDA, and a TensorRT install needs no torch; the
# ``gpu`` fixture below checks the GPU through the runtime's own CUDA binding and says why it skips.
pytestmark = [pytest.mark.tensorrt]

DEVICE = os.environ.get("EFFISEG_TEST_CUDA_DEVICE", "cuda:0")
FP32_TOL = dict(rtol=1e-3, atol=1e-3)
FP16_TOL = dict(rtol=2e-2, atol=2e-2)


@pytest.fixture(scope="module")
def gpu():
    # The tests build their models with onnx and compare with ONNX Runtime on the CPU.
    pytest.importorskip("onnx", reason="the TensorRT tests build ONNX models: pip install onnx")
    pytest.importorskip("onnxruntime", reason="the TensorRT tests compare with ONNX Runtime: pip install \"effiseg[ort]\"")
    try:
        import tensorrt
    except Exception as e:  # ImportError, or OSError when the TensorRT libraries are missing
        pytest.skip(f"TensorRT is not importable ({e}); install it with pip install -e '.[trt]' "
                    "(runtime/INSTALL.md names the extra for older GPUs: trt-volta, trt-pascal, trt85 for Maxwell)")
    try:
        cuda = open_cuda(DEVICE)
        with cuda.current():
            device = cuda.device_info()
        cuda.close()
    except (CudaUnavailable, CudaError, ValueError) as e:
        pytest.skip(f"no usable CUDA GPU at {DEVICE}: {e}")
    return device, tensorrt.__version__


@pytest.fixture
def backend_factory(gpu, tmp_path):
    from effiseg.runtime.backends.tensorrt import TensorRTBackend
    made = []

    def make(info, onnx_path, **kwargs):
        kwargs.setdefault("cache_dir", tmp_path / "engines")
        kwargs.setdefault("device", DEVICE)
        backend = TensorRTBackend(info, onnx_path, **kwargs)
        made.append(backend)
        return backend
    yield make
    for backend in made:
        backend.close()


def _tiny(tmp_path, **info_kwargs):
    info = tiny_info(**info_kwargs)
    path = make_tiny_onnx(tmp_path / f"tiny-{info.input_format}-{info.output_format}.onnx", info)
    return info, path


@pytest.mark.parametrize("output_format", ["logits", "probabilities", "mask"])
def test_fp32_engine_matches_onnxruntime(backend_factory, tmp_path, output_format):
    info, path = _tiny(tmp_path, size=32, output_format=output_format)
    backend = backend_factory(info, path, precision="fp32", max_batch=4)
    assert backend.precision == "fp32" and backend.engine_built
    batch = random_batch(info, 7)          # one full batch of 4 and a partial one of 3
    out = backend.infer(batch)
    ref = onnxruntime_reference(path, batch)
    assert out.shape == (7, 32, 32)
    if output_format == "mask":
        assert out.dtype == np.uint8
        # pixels whose probability sits on the threshold may flip; nearly all must agree
        assert np.mean(out == ref) > 0.995
    else:
        assert out.dtype == np.float32
        np.testing.assert_allclose(out, ref.astype(np.float32), **FP32_TOL)


def test_an_engine_built_ahead_of_time_runs_without_a_build(backend_factory, tmp_path):
    """effiseg-export --engine's build (build_engine_file), then the backend given the file."""
    from effiseg.runtime.backends.tensorrt import BuildSettings, build_engine_file
    info, path = _tiny(tmp_path, size=32)
    record = build_engine_file(path, tmp_path / "tiny.engine", BuildSettings(precision="fp32", max_batch=4),
                               device=DEVICE)
    assert record["precision"] == "fp32" and (tmp_path / "tiny.engine.json").is_file()
    backend = backend_factory(info, path, engine=tmp_path / "tiny.engine", max_batch=4)
    assert not backend.engine_built and backend.precision == "fp32"
    batch = random_batch(info, 5)
    np.testing.assert_allclose(backend.infer(batch), onnxruntime_reference(path, batch), **FP32_TOL)


def test_fp16_engine_or_documented_fallback(backend_factory, tmp_path, gpu):
    device, _ = gpu
    info, path = _tiny(tmp_path, size=32)
    backend = backend_factory(info, path, precision="fp16", max_batch=4)
    if backend.precision == "fp32":   # e.g. Maxwell: never silently
        assert any("FP16" in m or "strongly typed" in m for m in backend.messages), backend.messages
    batch = random_batch(info, 4)
    np.testing.assert_allclose(backend.infer(batch), onnxruntime_reference(path, batch), **FP16_TOL)


def test_float_input_with_dynamic_height_width(backend_factory, tmp_path):
    info, path = _tiny(tmp_path, size=40, input_format="float32-nchw", dynamic_hw=True)
    backend = backend_factory(info, path, precision="fp32", max_batch=3)
    assert backend.host_input(0).shape == (3, 3, 40, 40)
    batch = random_batch(info, 5)
    np.testing.assert_allclose(backend.infer(batch), onnxruntime_reference(path, batch), **FP32_TOL)


def test_engine_cache_reused_then_rebuilt_after_corruption(backend_factory, tmp_path):
    info, path = _tiny(tmp_path, size=32)
    batch = random_batch(info, 2)
    first = backend_factory(info, path, precision="fp32", max_batch=2)
    assert first.engine_built
    engine_file = first.engine_path
    expected = first.infer(batch)
    first.close()

    second = backend_factory(info, path, precision="fp32", max_batch=2)
    assert not second.engine_built and second.engine_path == engine_file
    np.testing.assert_array_equal(second.infer(batch), expected)
    second.close()

    data = engine_file.read_bytes()
    engine_file.write_bytes(data[: len(data) // 3])     # a truncated file, as after a crash
    third = backend_factory(info, path, precision="fp32", max_batch=2)
    assert third.engine_built
    assert any("unusable" in m for m in third.messages), third.messages
    np.testing.assert_allclose(third.infer(batch), expected, **FP32_TOL)


def test_two_slots_interleaved(backend_factory, tmp_path):
    info, path = _tiny(tmp_path, size=32)
    backend = backend_factory(info, path, precision="fp32", max_batch=4, n_slots=2)
    batches = [random_batch(info, n, seed=100 + i) for i, n in enumerate([4, 1, 3, 4, 2, 4, 1, 3])]
    outputs = [None] * len(batches)
    in_flight: list[tuple[int, int]] = []   # (slot, batch index)
    # Pipelined as the runtime does it: fill and submit one slot while the other still runs.
    for i, batch in enumerate(batches):
        slot = i % 2
        if len(in_flight) == 2:
            done_slot, done_index = in_flight.pop(0)
            outputs[done_index] = backend.collect(done_slot).copy()
        backend.host_input(slot)[: len(batch)] = batch
        backend.submit(slot, len(batch))
        in_flight.append((slot, i))
    for done_slot, done_index in in_flight:
        outputs[done_index] = backend.collect(done_slot).copy()
    for batch, out in zip(batches, outputs):
        np.testing.assert_allclose(out, onnxruntime_reference(path, batch), **FP32_TOL)


def test_submit_and_collect_on_other_threads(backend_factory, tmp_path):
    info, path = _tiny(tmp_path, size=32)
    backend = backend_factory(info, path, precision="fp32", max_batch=2)
    batch = random_batch(info, 2)
    result = {}

    def run():
        try:
            backend.host_input(1)[:2] = batch
            backend.submit(1, 2)
            result["out"] = backend.collect(1).copy()
        except BaseException as e:  # re-raised below; a thread would swallow it
            result["error"] = e

    worker = threading.Thread(target=run)
    worker.start()
    worker.join()
    assert "error" not in result, result.get("error")
    np.testing.assert_allclose(result["out"], onnxruntime_reference(path, batch), **FP32_TOL)


def test_bundled_default_model(backend_factory):
    """The ONNX file effiseg-run uses by default (Lite2, 352x352, flip TTA in the graph) builds and
    matches ONNX Runtime: the graph effiseg's exporter writes, not a hand-made one."""
    from effiseg.runtime.cli import DEFAULT_MODEL
    from effiseg.runtime.model_info import ModelInfo
    info = ModelInfo.from_onnx(Path(DEFAULT_MODEL))
    batch = random_batch(info, 2)
    ref = onnxruntime_reference(Path(DEFAULT_MODEL), batch)
    scale = max(1.0, float(np.abs(ref).max()))
    fp32 = backend_factory(info, Path(DEFAULT_MODEL), precision="fp32", max_batch=2)
    np.testing.assert_allclose(fp32.infer(batch), ref, rtol=1e-3, atol=2e-3 * scale)


@pytest.mark.parametrize("output_format", ["logits", "mask"])
def test_real_effisegnet_lite0(backend_factory, tmp_path, output_format):
    pytest.importorskip("torch", reason="exporting EffiSegNet needs torch (pip install \"effiseg[export]\")")
    pytest.importorskip("timm", reason="exporting EffiSegNet needs timm (pip install \"effiseg[export]\")")
    path, info = export_effisegnet_onnx(tmp_path / "effisegnet-lite0-64.onnx", size=64, output_format=output_format)
    batch = random_batch(info, 3)
    if output_format == "mask":
        ref = onnxruntime_reference(path, batch)
        got = backend_factory(info, path, precision="fp32", max_batch=2).infer(batch)
        assert got.dtype == np.uint8
        assert (got == ref).mean() > 0.999  # pixels on the threshold may fall either way
        return
    ref = onnxruntime_reference(path, batch)
    scale = max(1.0, float(np.abs(ref).max()))
    fp32 = backend_factory(info, path, precision="fp32", max_batch=2)
    np.testing.assert_allclose(fp32.infer(batch), ref, rtol=1e-3, atol=2e-3 * scale)
    auto = backend_factory(info, path, precision="auto", max_batch=2)
    np.testing.assert_allclose(auto.infer(batch), ref, rtol=5e-2, atol=5e-2 * scale)


@pytest.fixture
def two_gpus(gpu):
    """Skips, with the reason, on a machine with fewer than two CUDA GPUs."""
    try:
        count = open_cuda(DEVICE).device_count()
    except CudaError as e:
        pytest.skip(str(e))
    if count < 2:
        pytest.skip("only one CUDA GPU: cuda:1 and the two-GPU pipeline are not testable here")


def test_second_gpu_when_present(two_gpus, tmp_path):
    from effiseg.runtime.backends.tensorrt import TensorRTBackend
    info, path = _tiny(tmp_path, size=32)
    with TensorRTBackend(info, path, device="cuda:1", precision="fp32", max_batch=2,
                         cache_dir=tmp_path / "engines") as backend:
        batch = random_batch(info, 2)
        np.testing.assert_allclose(backend.infer(batch), onnxruntime_reference(path, batch), **FP32_TOL)
        assert backend.describe()["device"] == "cuda:1"


def test_two_gpus_segment_one_folder(two_gpus, tmp_path):
    """effiseg-run --devices 0,1: one engine per GPU, both fed from one queue by the pipeline's
    threads; every mask matches ONNX Runtime's."""
    from PIL import Image

    from effiseg.runtime.segmenter import Segmenter
    info, path = _tiny(tmp_path, size=32)
    images = tmp_path / "in"
    images.mkdir()
    batch = random_batch(info, 24, seed=5)
    for i, rgb in enumerate(batch):
        Image.fromarray(rgb).save(images / f"{i:02d}.png")
    with Segmenter.from_model(path, backend="tensorrt", devices="0,1", precision="fp32", max_batch=4) as seg:
        assert sorted(b.device for b in seg.backends) == ["cuda:0", "cuda:1"]
        summary = seg.run_folder(images, tmp_path / "out", progress=False)
    assert summary["n_ok"] == 24 and summary["n_failed"] == 0
    ref = onnxruntime_reference(path, batch) > 0  # logits; the tiny model's threshold is 0.5
    for i in range(24):
        mask = np.asarray(Image.open(tmp_path / "out" / f"{i:02d}.png")) > 0
        assert (mask == ref[i]).mean() > 0.999
