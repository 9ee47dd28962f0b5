"""Which devices a run uses when none are named: every GPU the driver shows (the user's two Quadro
M6000 both work without --devices), a GPU that fails to open left out with a note while another
runs; devices the user named must all open."""
from __future__ import annotations

import ctypes

import pytest

from effiseg.runtime import backends as registry
from effiseg.runtime.backends import BackendUnavailable, open_onnx_backends
from effiseg.runtime.cuda_memory import driver_devices, driver_pci_bus_id
from effiseg.runtime.model_info import ModelInfo

INFO = ModelInfo(path=None, variant="t", input_height=8, input_width=8)


class FakeDriver:
    """The CUDA driver API calls driver_devices makes, for a list of (name, (major, minor))."""

    def __init__(self, gpus, init_status=0, bus_ids=()):
        self.gpus, self.init_status, self.bus_ids = gpus, init_status, list(bus_ids)

    @staticmethod
    def _set(ref, value):
        ctypes.cast(ref, ctypes.POINTER(ctypes.c_int)).contents.value = value

    def cuInit(self, flags):
        return self.init_status

    def cuDeviceGetCount(self, ref):
        self._set(ref, len(self.gpus))
        return 0

    def cuDeviceGet(self, ref, ordinal):
        self._set(ref, ordinal)
        return 0

    def cuDeviceGetName(self, buffer, length, handle):
        buffer.value = self.gpus[handle.value][0].encode()
        return 0

    def cuDeviceGetAttribute(self, ref, attribute, handle):
        major, minor = self.gpus[handle.value][1]
        self._set(ref, {75: major, 76: minor}[attribute])
        return 0

    def cuDeviceGetPCIBusId(self, buffer, length, handle):
        buffer.value = self.bus_ids[handle.value].encode()
        return 0


M6000 = ("Quadro M6000", (5, 2))


def test_driver_devices_asks_the_driver_library(monkeypatch):
    monkeypatch.setattr(ctypes, "CDLL", lambda name: FakeDriver([M6000, M6000]))
    assert driver_devices() == [M6000, M6000]
    monkeypatch.setattr(ctypes, "CDLL", lambda name: FakeDriver([M6000], init_status=100))  # no device
    assert driver_devices() == []

    class OldDriver:  # loads, but without the calls we make: no traceback, just "unknown"
        def cuInit(self, flags):
            return 0
    monkeypatch.setattr(ctypes, "CDLL", lambda name: OldDriver())
    assert driver_devices() is None

    def no_library(name):
        raise OSError(f"{name}: cannot open shared object file")
    monkeypatch.setattr(ctypes, "CDLL", no_library)
    assert driver_devices() is None


def test_the_pci_bus_id_names_the_card_behind_a_cuda_index(monkeypatch):
    """With CUDA_VISIBLE_DEVICES=1 the driver numbers the second card cuda:0; its bus id is what
    NVML and nvidia-smi know it by."""
    monkeypatch.setattr(ctypes, "CDLL", lambda name: FakeDriver([M6000], bus_ids=["0000:82:00.0"]))
    assert driver_pci_bus_id(0) == "0000:82:00.0"
    assert driver_pci_bus_id(1) is None  # no such device in this process
    monkeypatch.setattr(ctypes, "CDLL", lambda name: FakeDriver([M6000], init_status=100))
    assert driver_pci_bus_id(0) is None

    class OldDriver(FakeDriver):  # answers the rest, but has no cuDeviceGetPCIBusId
        cuDeviceGetPCIBusId = property(lambda self: (_ for _ in ()).throw(AttributeError("no such symbol")))
    monkeypatch.setattr(ctypes, "CDLL", lambda name: OldDriver([M6000]))
    assert driver_pci_bus_id(0) is None


def test_default_gpu_devices_are_the_gpus_like_the_first(monkeypatch):
    import effiseg.runtime.cuda_memory as cuda_memory
    monkeypatch.setattr(cuda_memory, "driver_devices", lambda: [M6000, M6000])
    notes = []
    assert registry.default_gpu_devices(notes) == ["cuda:0", "cuda:1"] and notes == []
    monkeypatch.setattr(cuda_memory, "driver_devices", lambda: [M6000, ("NVIDIA GeForce GT 710", (3, 5)), M6000])
    assert registry.default_gpu_devices(notes) == ["cuda:0", "cuda:2"]
    assert notes == ["by default only GPUs like cuda:0 (Quadro M6000, 5.2) are used; not cuda:1 "
                     "(NVIDIA GeForce GT 710, 3.5): name them with --devices"]
    for unknown in ([], None):
        monkeypatch.setattr(cuda_memory, "driver_devices", lambda: unknown)
        assert registry.default_gpu_devices() == ["cuda:0"]


def test_a_cpu_only_install_never_initialises_the_cuda_driver(monkeypatch, tmp_path):
    import effiseg.runtime.cuda_memory as cuda_memory

    def must_not_run():
        raise AssertionError("the CUDA driver was initialised although no GPU backend is installed")
    monkeypatch.setattr(cuda_memory, "driver_devices", must_not_run)
    monkeypatch.setattr(registry, "_gpu_backend_installed", lambda: False)
    fake_backends(monkeypatch, broken={"tensorrt": {"cuda:0"}, "onnxruntime": {"cuda:0"}}, gpus=None)
    notes = []
    backends = open_onnx_backends(tmp_path / "m.onnx", "auto", None, info=INFO, selection_notes=notes)
    assert [(b.name, b.device) for b in backends] == [("onnxruntime", "cpu")]


def fake_backends(monkeypatch, broken: dict[str, set[str]], gpus=("cuda:0", "cuda:1"), openvino: bool = False):
    """The registry with TensorRT/ONNX Runtime/OpenVINO stand-ins; ``broken[name]`` lists the devices on
    which that backend fails to open (an engine that does not build, a GPU out of memory...);
    ``openvino``: whether OpenVINO counts as installed."""
    opened = []

    def make_class(name):
        class Fake:
            def __init__(self, info, path, device, precision, max_batch, n_slots, **options):
                if device in broken.get(name, set()):
                    raise RuntimeError(f"{name} cannot open on {device}")
                self.name, self.device = name, device
                opened.append(self)

            def close(self):
                pass
        return Fake

    monkeypatch.setattr(registry, "backend_class", make_class)
    monkeypatch.setattr(registry, "_openvino_installed", lambda: openvino)
    if gpus is not None:
        monkeypatch.setattr(registry, "default_gpu_devices", lambda notes=None: list(gpus))
        monkeypatch.setattr(registry, "_gpu_backend_installed", lambda: True)
    return opened


def test_on_the_cpu_auto_takes_openvino_where_installed_and_onnxruntime_when_it_fails(monkeypatch, tmp_path):
    monkeypatch.setattr(registry, "_gpu_backend_installed", lambda: False)
    fake_backends(monkeypatch, broken={}, gpus=None, openvino=True)
    backends = open_onnx_backends(tmp_path / "m.onnx", "auto", "cpu", info=INFO)
    assert [(b.name, b.device) for b in backends] == [("openvino", "cpu")]
    fake_backends(monkeypatch, broken={"openvino": {"cpu"}}, gpus=None, openvino=True)
    notes = []
    backends = open_onnx_backends(tmp_path / "m.onnx", "auto", "cpu", info=INFO, selection_notes=notes)
    assert [(b.name, b.device) for b in backends] == [("onnxruntime", "cpu")]
    assert any("openvino on cpu failed" in n for n in notes)


def test_a_cpu_precision_never_tries_a_gpu(monkeypatch, tmp_path):
    fake_backends(monkeypatch, broken={})
    backends = open_onnx_backends(tmp_path / "m.onnx", "auto", None, precision="int8", info=INFO)
    assert [(b.name, b.device) for b in backends] == [("onnxruntime", "cpu")]


def test_auto_uses_both_gpus_by_default(monkeypatch, tmp_path):
    fake_backends(monkeypatch, broken={})
    notes = []
    backends = open_onnx_backends(tmp_path / "m.onnx", "auto", None, info=INFO, selection_notes=notes)
    assert [(b.name, b.device) for b in backends] == [("tensorrt", "cuda:0"), ("tensorrt", "cuda:1")]
    assert notes == ["auto: chose tensorrt on cuda:0,cuda:1"]


def test_a_default_gpu_that_fails_is_left_out_and_said(monkeypatch, tmp_path):
    fake_backends(monkeypatch, broken={"tensorrt": {"cuda:1"}})
    notes = []
    backends = open_onnx_backends(tmp_path / "m.onnx", "auto", None, info=INFO, selection_notes=notes)
    assert [(b.name, b.device) for b in backends] == [("tensorrt", "cuda:0")]
    assert notes[0] == "left out cuda:1: RuntimeError: tensorrt cannot open on cuda:1"
    assert notes[-1] == "auto: chose tensorrt on cuda:0"
    notes = []
    backends = open_onnx_backends(tmp_path / "m.onnx", "tensorrt", None, info=INFO, selection_notes=notes)
    assert [b.device for b in backends] == ["cuda:0"] and "left out cuda:1" in notes[0]


def test_named_devices_must_all_open(monkeypatch, tmp_path):
    fake_backends(monkeypatch, broken={"tensorrt": {"cuda:1"}})
    with pytest.raises(RuntimeError, match="tensorrt cannot open on cuda:1"):
        open_onnx_backends(tmp_path / "m.onnx", "tensorrt", "0,1", info=INFO)
    notes = []  # auto moves on to the next backend rather than run on fewer GPUs than named
    backends = open_onnx_backends(tmp_path / "m.onnx", "auto", "0,1", info=INFO, selection_notes=notes)
    assert [(b.name, b.device) for b in backends] == [("onnxruntime", "cuda:0"), ("onnxruntime", "cuda:1")]


def test_every_gpu_failing_moves_auto_to_the_next_backend(monkeypatch, tmp_path):
    fake_backends(monkeypatch, broken={"tensorrt": {"cuda:0", "cuda:1"}, "onnxruntime": {"cuda:0", "cuda:1"}})
    notes = []
    backends = open_onnx_backends(tmp_path / "m.onnx", "auto", None, info=INFO, selection_notes=notes)
    assert [(b.name, b.device) for b in backends] == [("onnxruntime", "cpu")]
    assert any("tensorrt on cuda:0,cuda:1 failed" in n for n in notes)


def test_unavailable_backend_is_not_a_device_failure(monkeypatch, tmp_path):
    def make_class(name):
        class Missing:
            def __init__(self, *args, **kwargs):
                raise BackendUnavailable(f"{name} is not installed: pip install something")
        return Missing
    monkeypatch.setattr(registry, "backend_class", make_class)
    monkeypatch.setattr(registry, "default_gpu_devices", lambda notes=None: ["cuda:0", "cuda:1"])
    with pytest.raises(BackendUnavailable, match="tensorrt is not installed"):
        open_onnx_backends(tmp_path / "m.onnx", "tensorrt", None, info=INFO)


def test_torch_checkpoints_run_on_every_gpu_torch_sees(monkeypatch, tmp_path):
    torch = pytest.importorskip("torch")
    from effiseg.runtime.backends import open_checkpoint_backends

    class FakeTorchBackend:
        def __init__(self, checkpoint, device, precision, max_batch, n_slots, **options):
            if device == "cuda:1" and broken:
                raise RuntimeError("CUDA out of memory")
            self.device = device

        def close(self):
            pass
    monkeypatch.setattr(registry, "backend_class", lambda name: FakeTorchBackend)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: "Quadro M6000")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: (5, 2))
    broken = False
    notes = []
    assert [b.device for b in open_checkpoint_backends(tmp_path, selection_notes=notes)] == ["cuda:0", "cuda:1"]
    assert notes == ["torch backend on cuda:0,cuda:1"]
    broken = True
    notes = []
    assert [b.device for b in open_checkpoint_backends(tmp_path, selection_notes=notes)] == ["cuda:0"]
    assert notes == ["left out cuda:1: RuntimeError: CUDA out of memory", "torch backend on cuda:0"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert [b.device for b in open_checkpoint_backends(tmp_path)] == ["cpu"]
