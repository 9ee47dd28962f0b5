"""Running TensorRT engines, without TensorRT or a GPU: the real backend against the fake
``tensorrt`` module and CUDA binding of tests/tensorrt_fakes.py (outputs equal ONNX Runtime's, slots
from several threads, fixed and padded batches, cleanup, the CUDA binding's context handling), and
``effiseg-run --backend tensorrt`` through the CLI on a simulated Quadro M6000.
Run: .venv/bin/python -m pytest tests/runtime/test_tensorrt_run.py -q
"""
from __future__ import annotations

import json
import logging
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from effiseg.runtime.cuda_memory import CudaError, check_cuda_result, parse_cuda_device
from effiseg.runtime.trt_engine_cache import CACHE_ENV_VAR

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the shared fakes
from tensorrt_fakes import MAXWELL, FakeCuda, backend_on_fakes, fake_env, make_fake_trt  # noqa: E402
from tensorrt_test_models import onnxruntime_reference, random_batch, tiny_info  # noqa: E402


@pytest.fixture
def env(tmp_path):
    return fake_env(tmp_path)


def test_parse_cuda_device():
    assert parse_cuda_device("cuda") == 0
    assert parse_cuda_device("cuda:1") == 1
    assert parse_cuda_device(" CUDA:3 ") == 3
    assert parse_cuda_device(2) == 2
    for bad in ("cpu", "cuda:x", "gpu:0", -1):
        with pytest.raises(ValueError):
            parse_cuda_device(bad)


def test_check_cuda_result_with_a_fake_runtime():
    class Err(int):
        name = "cudaErrorMemoryAllocation"

    class Runtime:
        @staticmethod
        def cudaGetErrorString(err):
            return (0, b"out of memory")

    assert check_cuda_result(Runtime, (0,), "cudaFree") is None
    assert check_cuda_result(Runtime, (0, 1234), "cudaMalloc") == 1234
    assert check_cuda_result(Runtime, (0, 1, 2), "cudaX") == (1, 2)
    with pytest.raises(CudaError, match=r"cudaMalloc\(64\) failed: cudaErrorMemoryAllocation \(out of memory\)"):
        check_cuda_result(Runtime, (Err(2), None), "cudaMalloc(64)")


def test_check_cuda_result_with_cuda_python_enums():
    try:
        from cuda.bindings import runtime as rt
    except ImportError:
        pytest.skip("cuda-python is not installed (pip install cuda-python)")
    assert check_cuda_result(rt, (rt.cudaError_t.cudaSuccess, 7), "x") == 7
    with pytest.raises(CudaError, match="cudaErrorInsufficientDriver.*newer NVIDIA driver"):
        check_cuda_result(rt, (rt.cudaError_t.cudaErrorInsufficientDriver,), "cudaSetDevice(0)")
    # the names the CUDA wrapper calls exist in this cuda-python
    for name in ("cudaSetDevice", "cudaGetDeviceCount", "cudaGetDeviceProperties", "cudaMallocHost",
                 "cudaFreeHost", "cudaMalloc", "cudaFree", "cudaMemcpyAsync", "cudaStreamCreateWithFlags",
                 "cudaStreamSynchronize", "cudaStreamDestroy", "cudaEventCreateWithFlags",
                 "cudaEventRecord", "cudaEventSynchronize", "cudaEventDestroy", "cudaGetErrorString",
                 "cudaStreamNonBlocking", "cudaEventDisableTiming"):
        assert hasattr(rt, name), name


@pytest.mark.parametrize("output_format,dtype", [("logits", np.float32), ("probabilities", np.float32),
                                                 ("mask", np.uint8)])
def test_backend_matches_onnxruntime(env, output_format, dtype):
    info, onnx_path, cuda, trt, make = env(tiny_info(16, output_format=output_format))
    batch = random_batch(info, 5)
    with make(max_batch=4) as backend:
        out = backend.infer(batch)  # 4 + 1: a full and a partial batch
    assert out.shape == (5, 16, 16) and out.dtype == dtype
    ref = onnxruntime_reference(onnx_path, batch)
    np.testing.assert_allclose(out, ref.astype(dtype), rtol=1e-6, atol=1e-6)


def test_backend_float_nchw_and_dynamic_hw(env):
    info, onnx_path, cuda, trt, make = env(tiny_info(24, input_format="float32-nchw", dynamic_hw=True))
    batch = random_batch(info, 3)
    with make(max_batch=4, n_slots=2) as backend:
        assert backend.host_input(1).shape == (4, 3, 24, 24) and backend.host_input(1).dtype == np.float32
        out = backend.infer(batch)
    np.testing.assert_allclose(out, onnxruntime_reference(onnx_path, batch), rtol=1e-6, atol=1e-6)


def test_two_slots_interleaved_from_two_threads(env):
    info, onnx_path, cuda, trt, make = env()
    a, b = random_batch(info, 3, seed=10), random_batch(info, 2, seed=11)
    with make(max_batch=4, n_slots=2) as backend:
        contexts = [s.context for s in backend._slots]
        assert [s.profile for s in backend._slots] == [0, 1] and contexts[0] is not contexts[1]
        backend.host_input(0)[:3] = a
        backend.submit(0, 3)
        backend.host_input(1)[:2] = b
        backend.submit(1, 2)
        results = {}

        def collect_elsewhere(slot):
            # a fresh thread has no current device: the fake raises unless the backend sets it
            try:
                results[slot] = backend.collect(slot).copy()
            except BaseException as e:  # surfaced below; a thread would swallow it
                results[slot] = e

        for slot in (1, 0):  # out of submission order, as a pipeline may do
            worker = threading.Thread(target=collect_elsewhere, args=(slot,))
            worker.start()
            worker.join()
        assert all(isinstance(r, np.ndarray) for r in results.values()), results
        np.testing.assert_allclose(results[0], onnxruntime_reference(onnx_path, a), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(results[1], onnxruntime_reference(onnx_path, b), rtol=1e-6, atol=1e-6)


def test_slot_misuse_is_reported(env):
    info, onnx_path, cuda, trt, make = env()
    with make(max_batch=2) as backend:
        with pytest.raises(RuntimeError, match="without a submitted batch"):
            backend.collect(0)
        with pytest.raises(ValueError, match="1..2"):
            backend.submit(0, 3)
        backend.submit(0, 1)
        with pytest.raises(RuntimeError, match="in flight"):
            backend.submit(0, 1)
        with pytest.raises(IndexError):
            backend.host_input(2)


def test_tensorrt_853_runs_on_a_maxwell_gpu_in_fp32(env):
    info, onnx_path, cuda, trt, make = env(device=MAXWELL, version="8.5.3.1", fast_fp16=False)
    batch = random_batch(info, 3)
    with make(precision="auto", max_batch=2) as backend:
        assert backend.precision == "fp32" and backend.io_api == "tensor"
        np.testing.assert_allclose(backend.infer(batch), onnxruntime_reference(onnx_path, batch), rtol=1e-6, atol=1e-6)
    assert trt.stats["network_flags"] == [1]  # explicit batch, required before TensorRT 10


def test_static_batch_onnx_lowers_max_batch(env):
    info, onnx_path, cuda, trt, make = env(static_batch=1)
    with make(max_batch=4) as backend:
        assert backend.max_batch == 1 and backend.static_batch == 1
        assert any("fixed batch of 1" in m for m in backend.messages)
        batch = random_batch(info, 3)
        ref = np.concatenate([onnxruntime_reference(onnx_path, batch[i:i + 1]) for i in range(3)])
        np.testing.assert_allclose(backend.infer(batch), ref, rtol=1e-6, atol=1e-6)


def test_close_frees_everything_and_is_idempotent(env):
    info, onnx_path, cuda, trt, make = env()
    backend = make(max_batch=2, n_slots=3)
    assert cuda.memory and cuda.host_live == 3 * 2 and cuda.handles_live == 3 * 2
    backend.close()
    backend.close()
    assert cuda.memory == {} and cuda.host_live == 0 and cuda.handles_live == 0
    with pytest.raises(RuntimeError, match="closed"):
        backend.submit(0, 1)


def test_missing_onnx_file_is_named(env, tmp_path):
    info, onnx_path, cuda, trt, make = env()
    with pytest.raises(FileNotFoundError, match="nowhere.onnx"):
        backend_on_fakes(info, tmp_path / "nowhere.onnx", fake_trt=trt, fake_cuda=cuda,
                            cache_dir=tmp_path / "cache")
    assert cuda.memory == {}


def test_pycuda_contexts_are_popped_by_the_thread_that_pushed_them(monkeypatch):
    """With pycuda (the fallback binding) a thread that ends with a context still pushed aborts the
    process ("The context stack was not empty"). Every block pops what it pushed: blocks of two GPUs
    nest, a worker thread ends with an empty stack, and close() gives back the retained context."""
    import types

    from effiseg.runtime.cuda_memory import PyCudaApi

    per_thread = threading.local()  # the driver keeps one context stack per thread

    def stack():
        if not hasattr(per_thread, "contexts"):
            per_thread.contexts = []
        return per_thread.contexts

    class Error(Exception):
        pass

    detached = []

    class Context:
        def __init__(self, index):
            self.index = index

        def push(self):
            stack().append(self)

        @staticmethod
        def pop():
            if not stack():
                raise Error("context stack is empty")
            stack().pop()

        def detach(self):
            detached.append(self.index)

    class Device:
        def __init__(self, index):
            self.index = index

        @staticmethod
        def count():
            return 2

        def retain_primary_context(self):
            return Context(self.index)

    drv = types.ModuleType("pycuda.driver")
    drv.Error, drv.Context, drv.Device, drv.init = Error, Context, Device, lambda: None
    package = types.ModuleType("pycuda")
    package.driver = drv
    monkeypatch.setitem(sys.modules, "pycuda", package)
    monkeypatch.setitem(sys.modules, "pycuda.driver", drv)

    first, second = PyCudaApi(0), PyCudaApi(1)
    with first.current():
        assert [c.index for c in stack()] == [0]
        with first.current():  # nested on the same GPU: nothing more pushed
            assert [c.index for c in stack()] == [0]
        with second.current():  # another GPU's call inside: its context on top, then popped
            assert [c.index for c in stack()] == [0, 1]
        assert [c.index for c in stack()] == [0]
    assert stack() == []
    with pytest.raises(RuntimeError, match="current"):
        first.activate()  # an unbalanced push is refused
    with pytest.raises(ValueError), first.current():
        raise ValueError("a failing call inside the block")
    assert stack() == []  # popped all the same
    seen = []

    def work():
        with second.current():
            seen.append([c.index for c in stack()])
        seen.append(list(stack()))

    worker = threading.Thread(target=work)
    worker.start()
    worker.join()
    assert seen == [[1], []]  # the worker ends with an empty stack of its own
    second.close()
    first.close()
    first.close()  # twice is harmless
    assert detached == [1, 0] and stack() == []


def test_a_last_batch_below_min_batch_is_padded(env):
    info, onnx_path, cuda, trt, make = env()
    batch = random_batch(info, 5)
    with make(max_batch=4, min_batch=2) as backend:
        out = backend.infer(batch)  # 4 + 1: the single image runs as a batch of 2
    assert out.shape == (5, 16, 16)
    np.testing.assert_allclose(out, onnxruntime_reference(onnx_path, batch), rtol=1e-6, atol=1e-6)


def test_fixed_batch_with_dynamic_height_width_pads_the_last_batch(env):
    info, onnx_path, cuda, trt, make = env(tiny_info(16, dynamic_hw=True), static_batch=2)
    batch = random_batch(info, 3)
    with make(max_batch=4) as backend:
        assert backend.max_batch == 2
        out = backend.infer(batch)  # 2 + 1: the single image runs padded to the fixed batch
    ref = np.concatenate([onnxruntime_reference(onnx_path, batch[:2]),
                          onnxruntime_reference(onnx_path, batch[[2, 2]])[:1]])  # ONNX Runtime takes only 2
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6)


def _effiseg_run_on_a_fake_maxwell(tiny_onnx, tmp_path, monkeypatch, *options, build_fails=False):
    """effiseg-run through the real CLI with --backend tensorrt on a simulated Quadro M6000."""
    from click.testing import CliRunner
    from PIL import Image

    from effiseg.runtime.backends.tensorrt import backend as backend_module
    from effiseg.runtime.cli import run_command

    cuda = FakeCuda(MAXWELL)
    trt = make_fake_trt(cuda, version="8.5.3", fast_fp16=False)  # Maxwell's last TensorRT
    if build_fails:  # TensorRT returns no engine (out of memory, an unsupported layer, ...)
        trt.Builder.build_serialized_network = lambda self, network, config: None

    def open_fake_cuda(device_index):
        cuda.device_index = device_index
        return cuda

    # The CLI makes the backend itself, so the two entry points it calls are given the fakes here.
    monkeypatch.setattr(backend_module, "import_tensorrt", lambda: trt)
    monkeypatch.setattr(backend_module, "open_cuda_for_tensorrt", open_fake_cuda)
    monkeypatch.setenv(CACHE_ENV_VAR, str(tmp_path / "cache"))
    # As on a command line: no handler on the root logger (pytest installs its own).
    monkeypatch.setattr(logging.root, "handlers", [])
    frames = tmp_path / "frames"
    frames.mkdir(exist_ok=True)
    for i in range(3):
        Image.fromarray(np.full((40, 48, 3), 60 * i, np.uint8)).save(frames / f"{i}.png")
    return trt, CliRunner().invoke(run_command, ["--input", str(frames), "--model", str(tiny_onnx), "--backend",
                                                 "tensorrt", "--devices", "0", "--batch", "2", "--no-progress",
                                                 *options])


def test_effiseg_run_prints_each_backend_decision_once(tiny_onnx, tmp_path, monkeypatch):
    """The Maxwell fallback (a warning), the engine build and its result (information): each printed
    once, labelled with backend and device, although the backend both logs them and keeps them in
    its messages; the summary records the precision that ran."""
    trt, result = _effiseg_run_on_a_fake_maxwell(tiny_onnx, tmp_path, monkeypatch, "--precision", "fp16")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    for needle in ("has no fast FP16; building an FP32 engine instead", "building a TensorRT fp32 engine",
                   "built TensorRT engine"):
        found = [line for line in lines if needle in line]
        assert len(found) == 1 and found[0].startswith("tensorrt [cuda:0]: "), (needle, result.output)
    summary = json.loads((tmp_path / "frames_masks" / "effiseg_summary.json").read_text())
    assert summary["precision"] == "fp32" and summary["n_ok"] == 3


def test_decisions_made_before_a_failed_start_are_still_shown(tiny_onnx, tmp_path, monkeypatch):
    """The engine build fails after the FP16 fallback was decided: the user still sees the fallback
    (the decision explains the engine that was being built), then the reason the run cannot start."""
    trt, result = _effiseg_run_on_a_fake_maxwell(tiny_onnx, tmp_path, monkeypatch, "--precision", "fp16",
                                                 build_fails=True)
    assert result.exit_code == 3, result.output
    assert "tensorrt [cuda:0]: FP16 requested, but Quadro M6000" in result.output
    assert "cannot start" in result.output


def test_console_handler_rules(monkeypatch, capsys):
    """Backend decisions print live and labelled, other effiseg warnings once, other INFO records
    not at all; the handler and the logger level are put back; a program with its own logging
    configuration (root handlers) keeps it."""
    from effiseg.runtime.backends.base import BACKEND_MESSAGE
    from effiseg.runtime.console import print_backend_notes_live, printed_live

    monkeypatch.setattr(logging.root, "handlers", [])
    log = logging.getLogger("effiseg.runtime.backends.tensorrt_backend")
    effiseg_logger = logging.getLogger("effiseg")
    before = (list(effiseg_logger.handlers), effiseg_logger.level)
    with print_backend_notes_live():
        log.warning("TensorRT: an error of its own")
        log.info("building an engine", extra={BACKEND_MESSAGE: "tensorrt [cuda:1]"})
        log.info("an internal detail")
        assert printed_live("tensorrt [cuda:1]", "building an engine")
        assert not printed_live("tensorrt [cuda:0]", "building an engine")
    err = capsys.readouterr().err
    assert err.count("TensorRT: an error of its own") == 1
    assert err.count("tensorrt [cuda:1]: building an engine") == 1 and "an internal detail" not in err
    assert (list(effiseg_logger.handlers), effiseg_logger.level) == before
    assert not printed_live("tensorrt [cuda:1]", "building an engine")  # only while the command runs

    root_handler = logging.StreamHandler()
    monkeypatch.setattr(logging.root, "handlers", [root_handler])
    with print_backend_notes_live():
        assert list(effiseg_logger.handlers) == before[0]  # nothing added beside the program's own


def test_run_time_tta_on_tensorrt_builds_one_engine_per_size_and_matches_onnxruntime(env, tmp_path):
    """--tta multiscale on TensorRT: one engine per size from the same dynamic-size ONNX file, each
    profile pinned at its size for 4x the batch (the flips); the averaged logits equal ONNX Runtime's
    through the same TTA code."""
    from effiseg.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend
    from effiseg.runtime.tta import TTAPlan, wrap_per_device

    info, onnx_path, cuda, trt, make = env(tiny_info(16, dynamic_hw=True))
    plan = TTAPlan("multiscale", flips=True, sizes=(16, 24))
    batch = random_batch(info, 5)
    [trt_tta] = wrap_per_device(plan, info, lambda size_info, n, first: [backend_on_fakes(
        size_info, onnx_path, fake_trt=trt, fake_cuda=cuda, max_batch=n, cache_dir=tmp_path / "cache")], 3, 2)
    [ort_tta] = wrap_per_device(plan, info, lambda size_info, n, first: [OnnxRuntimeBackend(
        size_info, onnx_path, max_batch=n)], 3, 2)
    with trt_tta, ort_tta:
        assert trt_tta.name == "tensorrt" and trt_tta.info.tta_sizes == (16, 24)
        for size, inner in trt_tta.inner.items():
            lo, opt, hi = inner._io.profile_shape("images", 0)
            assert tuple(lo) == (1, size, size, 3) and tuple(hi) == (12, size, size, 3)
        out = trt_tta.infer(batch)
        np.testing.assert_allclose(out, ort_tta.infer(batch), rtol=1e-6, atol=1e-6)
    assert out.shape == (5, 16, 16)


def test_segmenter_opens_an_engine_built_ahead_of_time(tiny_onnx, tmp_path, monkeypatch):
    """runtime/README.md's call: Segmenter.from_onnx(..., backend="tensorrt", engine=FILE) runs the
    prebuilt engine (no build, no cache) and segments as ONNX Runtime does."""
    from effiseg.runtime import Segmenter
    from effiseg.runtime.backends.tensorrt import BuildSettings, build_engine_file
    from effiseg.runtime.backends.tensorrt import backend as backend_module

    cuda = FakeCuda(MAXWELL)
    trt = make_fake_trt(cuda, version="8.5.3", fast_fp16=False)
    engine_file = tmp_path / "tiny.engine"
    build_engine_file(tiny_onnx, engine_file, BuildSettings(max_batch=2, cache_dir=tmp_path / "build-cache"),
                      tensorrt=trt, open_cuda_device=lambda index: cuda)
    monkeypatch.setattr(backend_module, "import_tensorrt", lambda: trt)  # Segmenter makes the backend itself
    monkeypatch.setattr(backend_module, "open_cuda_for_tensorrt", lambda index: cuda)
    monkeypatch.setenv(CACHE_ENV_VAR, str(tmp_path / "run-cache"))
    image = np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    with Segmenter.from_onnx(tiny_onnx, backend="tensorrt", devices="0", max_batch=2, engine=engine_file) as trt_run, \
            Segmenter.from_onnx(tiny_onnx, backend="onnxruntime", max_batch=2) as ort_run:
        [backend] = trt_run.backends
        assert backend.engine_path == engine_file and not backend.engine_built and trt_run.precision == "fp32"
        [mask] = trt_run.segment([image])
        [expected] = ort_run.segment([image])
    np.testing.assert_array_equal(mask, expected)
    assert trt.stats["builds"] == 1 and not (tmp_path / "run-cache").exists()
