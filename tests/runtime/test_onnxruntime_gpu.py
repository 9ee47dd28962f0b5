"""ONNX Runtime on NVIDIA GPUs, with a stand-in onnxruntime-gpu (no GPU here): the TensorRT EP
follows effiseg's precision rule (no FP16 on the Quadro M6000), and the CUDA/cuDNN libraries are
preloaded once, with what went wrong told when the provider still does not start."""
from __future__ import annotations

import types

import pytest

from effiseg.runtime.backends.base import BackendUnavailable
from effiseg.runtime.model_info import ModelInfo

INFO = ModelInfo(path=None, variant="t", input_height=8, input_width=8)


class FakeOrtSession:
    """What OnnxRuntimeBackend asks of an InferenceSession, recording the providers it was given."""

    def __init__(self, path, sess_options=None, providers=()):
        self.providers_asked = list(providers)
        FakeOrt.sessions.append(self)

    def get_providers(self):
        asked = [p[0] if isinstance(p, tuple) else p for p in self.providers_asked]
        return asked if FakeOrt.starts is None else [p for p in asked if p in FakeOrt.starts]

    def get_inputs(self):
        return [types.SimpleNamespace(name="images", shape=["n", 8, 8, 3])]

    def get_outputs(self):
        return [types.SimpleNamespace(name="logits", shape=["n", 8, 8])]


class FakeOrt:
    """onnxruntime-gpu with the TensorRT EP, on a machine without a GPU. ``starts``: the providers a
    session really gets (None: all it is given); ``preload_prints``: what preload_dlls prints."""
    __version__ = "1.22.0-fake"
    cuda_version = "12.8"
    sessions: list = []
    preloads = 0
    starts = None
    preload_prints = ""
    InferenceSession = FakeOrtSession
    SessionOptions = types.SimpleNamespace
    GraphOptimizationLevel = types.SimpleNamespace(ORT_ENABLE_ALL=99)

    @staticmethod
    def get_available_providers():
        return ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]

    @classmethod
    def preload_dlls(cls):
        cls.preloads += 1
        print(cls.preload_prints, end="")


@pytest.fixture
def fake_ort(monkeypatch, tmp_path):
    from effiseg.runtime.backends import onnxruntime_backend

    monkeypatch.setattr(onnxruntime_backend, "import_onnxruntime", lambda: FakeOrt)
    monkeypatch.setattr(onnxruntime_backend, "_preload_said", None)  # a fresh process
    monkeypatch.delenv("EFFISEG_ORT_PRELOAD", raising=False)
    monkeypatch.setenv("EFFISEG_TRT_CACHE", str(tmp_path / "trt-cache"))
    monkeypatch.setattr(FakeOrt, "sessions", [])
    monkeypatch.setattr(FakeOrt, "preloads", 0)
    monkeypatch.setattr(FakeOrt, "starts", None)
    monkeypatch.setattr(FakeOrt, "preload_prints", "")
    return FakeOrt


def open_backend(device, **kwargs):
    from effiseg.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend

    return OnnxRuntimeBackend(INFO, "m.onnx", device=device, io_binding=False, **kwargs)


@pytest.mark.parametrize("gpus,requested,precision,fp16_flag,warned", [
    ([("Quadro M6000", (5, 2))] * 2, "auto", "fp32", False, False),
    ([("Quadro M6000", (5, 2))] * 2, "fp16", "fp32", False, True),
    ([("NVIDIA GeForce RTX 2080", (7, 5))] * 2, "auto", "fp16", True, False),
    ([("NVIDIA GeForce RTX 2080", (7, 5))] * 2, "fp32", "fp32", False, False),
    (None, "fp16", "fp32", False, True),   # the driver did not answer
])
def test_onnxruntime_tensorrt_ep_asks_for_fp16_only_where_the_gpu_has_it(
        gpus, requested, precision, fp16_flag, warned, fake_ort, monkeypatch):
    """ONNX Runtime's TensorRT EP on the Quadro M6000: no FP16 flag and no "fp16" in the run's
    report; a request for fp16 there says it runs fp32 (the device is cuda:1, the second card)."""
    from effiseg.runtime import cuda_memory

    monkeypatch.setattr(cuda_memory, "driver_devices", lambda: gpus)
    backend = open_backend("cuda:1", precision=requested)
    trt_name, trt_options = FakeOrt.sessions[0].providers_asked[0]
    assert trt_name == "TensorrtExecutionProvider" and trt_options["device_id"] == 1
    assert trt_options["trt_fp16_enable"] is fp16_flag
    assert backend.precision == precision and backend.describe()["precision"] == precision
    fp32_told = [m for m in backend.messages if "fp32" in m]
    assert bool(fp32_told) is (precision == "fp32" and requested != "fp32")
    assert any("FP16 requested" in m or "precision fp16" in m for m in fp32_told) is warned


def test_gpu_libraries_are_preloaded_once_and_quietly_and_a_failure_says_what_was_missing(fake_ort, monkeypatch, capsys):
    """Windows without cuDNN on PATH: the CUDA provider does not start. preload_dlls runs once per
    process, before the first GPU session, prints nothing into effiseg's output, and what it said
    goes into the error that lets --backend auto move on."""
    fake_ort.starts = ["CPUExecutionProvider"]
    fake_ort.preload_prints = "\033[33mFailed to load cudnn64_9.dll: [WinError 126]\033[0m\n"
    for device in ("cuda:0", "cuda:1"):
        with pytest.raises(BackendUnavailable) as failed:
            open_backend(device, provider="cuda")
        message = str(failed.value)
        assert f"could not start CUDAExecutionProvider on {device}" in message
        assert "onnxruntime-gpu[cuda,cudnn]" in message and "CUDA 12.8" in message
        assert message.endswith("onnxruntime.preload_dlls said: Failed to load cudnn64_9.dll: [WinError 126]")
    assert fake_ort.preloads == 1
    assert capsys.readouterr().out == ""


def test_no_preload_for_the_cpu_or_when_turned_off(fake_ort, monkeypatch):
    open_backend("cpu")
    assert fake_ort.preloads == 0
    monkeypatch.setenv("EFFISEG_ORT_PRELOAD", "0")
    backend = open_backend("cuda:0", provider="cuda")
    assert fake_ort.preloads == 0 and backend.provider == "CUDAExecutionProvider"


def test_the_tensorrt_ep_cache_folder_is_handed_over_in_a_form_windows_can_open():
    """ONNX Runtime opens the TensorRT EP's cache with a code-page path on Windows: a folder under
    C:\\Users\\José\\AppData\\Local goes over by its 8.3 short name, or the cache is off."""
    from pathlib import PureWindowsPath

    from effiseg.runtime.backends.onnxruntime_backend import cache_path_for_tensorrt_ep

    jose = PureWindowsPath(r"C:\Users\José\AppData\Local\effiseg\onnxruntime-trt")
    short = r"C:\Users\JOS~1\AppData\Local\effiseg\ONNXRU~1"
    assert cache_path_for_tensorrt_ep(jose, on_windows=True, short_path=lambda f: short) == short
    assert cache_path_for_tensorrt_ep(jose, on_windows=True, short_path=lambda f: None) is None
    assert cache_path_for_tensorrt_ep(jose, on_windows=True, short_path=lambda f: str(jose)) is None
    assert cache_path_for_tensorrt_ep(jose, on_windows=False) == str(jose)  # Linux paths are bytes: fine
    ascii_folder = PureWindowsPath(r"D:\trt-cache")
    assert cache_path_for_tensorrt_ep(ascii_folder, on_windows=True, short_path=None) == r"D:\trt-cache"


def test_without_a_usable_cache_path_the_tensorrt_ep_runs_uncached_and_says_so(fake_ort, tmp_path, monkeypatch):
    from effiseg.runtime import cuda_memory
    from effiseg.runtime.backends import onnxruntime_backend

    real = onnxruntime_backend.cache_path_for_tensorrt_ep
    monkeypatch.setattr(onnxruntime_backend, "cache_path_for_tensorrt_ep",
                        lambda folder: real(folder, on_windows=True, short_path=lambda f: None))
    monkeypatch.setattr(cuda_memory, "driver_devices", lambda: [("Quadro M6000", (5, 2))])
    monkeypatch.setenv("EFFISEG_TRT_CACHE", str(tmp_path / "José"))
    backend = open_backend("cuda:0")
    _, trt_options = fake_ort.sessions[0].providers_asked[0]
    assert trt_options["trt_engine_cache_enable"] is False and trt_options["trt_timing_cache_enable"] is False
    assert any("engine cache off" in m and "EFFISEG_TRT_CACHE" in m for m in backend.messages)
