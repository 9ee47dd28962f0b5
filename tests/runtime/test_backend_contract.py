"""The backend contract, checked once for every backend that runs here.

``BackendContract`` holds the tests; each ``Test...`` class below only says how to open its
backend (as segmentation_models_pytorch reuses one base tester for every model). What the pipeline
relies on: one host buffer per slot; ``collect`` gives (n, H, W) in the documented dtype (float32,
uint8 masks; fp16 converted); batches in flight on two slots stay apart; misuse (collect without
submit, a second batch on a busy slot, a slot or batch out of range, a closed backend) raises the
same error on every backend. TensorRT runs simulated (tests/tensorrt_fakes.py); on a GPU machine
tests/runtime/test_tensorrt_integration.py runs the real one.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the shared fakes
from tensorrt_test_models import make_tiny_onnx, tiny_info  # noqa: E402

DTYPES = {"logits": np.float32, "probabilities": np.float32, "mask": np.uint8}


def images(n: int, size: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


class BackendContract:
    """The contract tests; a subclass writes ``open`` (and narrows ``output_formats``)."""

    output_formats = ("logits", "probabilities", "mask")
    atol = 1e-5   # the same images through two slots: same arithmetic, up to batch-size kernels

    def open(self, request, tmp_path: Path, output_format: str, max_batch: int, n_slots: int):
        raise NotImplementedError

    @pytest.fixture
    def opened(self, request, tmp_path):
        backends = []

        def make(output_format: str = "logits", max_batch: int = 3, n_slots: int = 2):
            backend = self.open(request, tmp_path, output_format, max_batch, n_slots)
            backends.append(backend)
            return backend
        yield make
        for backend in backends:
            backend.close()

    @staticmethod
    def run(backend, slot: int, batch: np.ndarray) -> np.ndarray:
        backend.host_input(slot)[:len(batch)] = batch
        backend.submit(slot, len(batch))
        return np.array(backend.collect(slot), copy=True)

    def test_each_slot_has_its_own_host_buffer(self, opened):
        backend = opened(max_batch=3, n_slots=2)
        h, w = backend.info.input_height, backend.info.input_width
        first, second = backend.host_input(0), backend.host_input(1)
        assert first.shape == (3, h, w, 3) and first.dtype == np.uint8
        assert second.shape == first.shape and not np.shares_memory(first, second)

    @pytest.mark.parametrize("output_format", ["logits", "probabilities", "mask"])
    def test_collect_gives_n_maps_in_the_documented_dtype(self, opened, output_format):
        if output_format not in self.output_formats:
            pytest.skip(f"this backend serves {', '.join(self.output_formats)}")
        backend = opened(output_format)
        out = self.run(backend, 0, images(2, backend.info.input_height, seed=1))
        assert out.shape == (2, backend.info.input_height, backend.info.input_width)
        assert out.dtype == DTYPES[output_format]
        if output_format == "probabilities":
            assert 0.0 <= out.min() and out.max() <= 1.0
        if output_format == "mask":
            assert set(np.unique(out)) <= {0, 1}

    def test_two_slots_in_flight_keep_their_batches_apart(self, opened):
        backend = opened(max_batch=3, n_slots=2)
        size = backend.info.input_height
        a, b = images(3, size, seed=2), images(2, size, seed=3)
        alone_a, alone_b = self.run(backend, 0, a), self.run(backend, 0, b)
        backend.host_input(0)[:3] = a
        backend.submit(0, 3)
        backend.host_input(1)[:2] = b
        backend.submit(1, 2)
        together_b = np.array(backend.collect(1), copy=True)   # out of submission order
        together_a = np.array(backend.collect(0), copy=True)
        np.testing.assert_allclose(together_a, alone_a, rtol=1e-5, atol=self.atol)
        np.testing.assert_allclose(together_b, alone_b, rtol=1e-5, atol=self.atol)
        assert not np.allclose(alone_a[:2], alone_b)  # the check above could tell the batches apart

    def test_collect_without_a_submitted_batch_is_refused(self, opened):
        backend = opened()
        with pytest.raises(RuntimeError, match=r"collect\(1\) without a submitted batch"):
            backend.collect(1)
        self.run(backend, 1, images(1, backend.info.input_height, seed=4))
        with pytest.raises(RuntimeError, match="without a submitted batch"):  # collected once only
            backend.collect(1)

    def test_a_slot_takes_one_batch_at_a_time(self, opened):
        backend = opened()
        backend.host_input(0)[:1] = images(1, backend.info.input_height, seed=5)
        backend.submit(0, 1)
        with pytest.raises(RuntimeError, match="slot 0 still has a batch in flight"):
            backend.submit(0, 1)
        backend.collect(0)
        backend.submit(0, 1)  # free again
        backend.collect(0)

    def test_slots_and_batch_sizes_out_of_range_are_refused(self, opened):
        backend = opened(max_batch=3, n_slots=2)
        for slot in (2, -1):
            with pytest.raises(IndexError, match=f"slot {slot} out of range"):
                backend.submit(slot, 1)
            with pytest.raises(IndexError, match=f"slot {slot} out of range"):
                backend.collect(slot)
        for n in (0, 4):
            with pytest.raises(ValueError, match=r"1\.\.3"):
                backend.submit(0, n)
        assert self.run(backend, 0, images(3, backend.info.input_height, seed=6)).shape[0] == 3  # nothing stuck

    def test_a_closed_backend_refuses_work_and_closes_once(self, opened):
        backend = opened()
        backend.close()
        backend.close()
        with pytest.raises(RuntimeError, match="closed"):
            backend.submit(0, 1)
        with pytest.raises(RuntimeError, match="closed"):
            backend.collect(0)


def _tiny_onnx(tmp_path: Path, output_format: str, dynamic_hw: bool = False):
    info = tiny_info(16, output_format=output_format, dynamic_hw=dynamic_hw)
    return info, make_tiny_onnx(tmp_path / f"tiny-{output_format}{'-dyn' if dynamic_hw else ''}.onnx", info)


class TestOnnxRuntimeCpu(BackendContract):
    io_binding = False

    def open(self, request, tmp_path, output_format, max_batch, n_slots):
        pytest.importorskip("onnxruntime")
        from effiseg.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend
        info, path = _tiny_onnx(tmp_path, output_format)
        return OnnxRuntimeBackend(info, path, "cpu", max_batch=max_batch, n_slots=n_slots, io_binding=self.io_binding)


class TestOnnxRuntimeCpuIoBinding(TestOnnxRuntimeCpu):
    io_binding = True   # the CUDA path's I/O binding, run on the CPU


class TestOpenVinoCpu(BackendContract):
    atol = 1e-4  # OpenVINO picks kernels per batch size

    def open(self, request, tmp_path, output_format, max_batch, n_slots):
        pytest.importorskip("openvino")
        from effiseg.runtime.backends.openvino_backend import OpenVinoBackend
        info, path = _tiny_onnx(tmp_path, output_format)
        return OpenVinoBackend(info, path, "cpu", precision="fp32", max_batch=max_batch, n_slots=n_slots)


class TestTorchCpu(BackendContract):
    atol = 1e-4

    def open(self, request, tmp_path, output_format, max_batch, n_slots):
        pytest.importorskip("torch")
        from effiseg.runtime.backends.torch_backend import TorchBackend
        return TorchBackend(request.getfixturevalue("tiny_checkpoint"), "cpu", precision="fp32", max_batch=max_batch,
                            n_slots=n_slots, output_format=output_format)


class TestTTAWrapper(BackendContract):
    """Run-time flip TTA (runtime/tta.py) around ONNX Runtime: averaged logits only."""

    output_formats = ("logits",)

    def open(self, request, tmp_path, output_format, max_batch, n_slots):
        pytest.importorskip("onnxruntime")
        from effiseg.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend
        from effiseg.runtime.tta import TTABackend, TTAPlan
        info, path = _tiny_onnx(tmp_path, output_format)
        inner = OnnxRuntimeBackend(info, path, "cpu", max_batch=4 * max_batch, n_slots=n_slots)
        return TTABackend(TTAPlan("flip", flips=True), info, {None: inner}, max_batch, n_slots)


class TestTensorRTSimulated(BackendContract):
    """The real TensorRT backend on the fake tensorrt module and CUDA binding."""

    def open(self, request, tmp_path, output_format, max_batch, n_slots):
        pytest.importorskip("onnxruntime")  # the fake engine computes with ONNX Runtime
        from tensorrt_fakes import AMPERE, FakeCuda, backend_on_fakes, make_fake_trt
        info, path = _tiny_onnx(tmp_path, output_format)
        cuda = FakeCuda(AMPERE)
        return backend_on_fakes(info, path, make_fake_trt(cuda), cuda, max_batch=max_batch, n_slots=n_slots,
                                cache_dir=tmp_path / "cache")
