"""TensorRT backend logic without TensorRT or a GPU.

The pure decisions (profile shapes, cache key, precision incl. the Maxwell fallback, API branch,
cache folder, corrupt-cache handling) are tested directly. The backend class itself is then run
end to end against a fake ``tensorrt`` module and a fake CUDA binding: the fake engine computes
with ONNX Runtime on the bytes the backend copied into fake device memory, enforces TensorRT's
"one context per optimisation profile" rule and refuses work from a thread whose current device
was never set, so buffer plumbing, slots, dtype handling, caching and cleanup are all checked.
Run: .venv/bin/python -m pytest tests/test_tensorrt_logic.py -q
"""
from __future__ import annotations

import base64
import dataclasses
import json
import logging
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from effiseg.runtime.backends.base import BackendUnavailable
from effiseg.runtime.backends.gpu_precision import fast_fp16_from_compute_capability
from effiseg.runtime.backends.tensorrt import (
    TensorRTBackend, choose_precision, network_creation_flags,
    parse_trt_version, platform_has_fast_fp16, profile_shapes, select_io_api, squeeze_output_shape)
from effiseg.runtime.cuda_memory import (CudaApi, CudaError, DeviceBuffer, DeviceInfo, Event,
                                          HostBuffer, Stream, check_cuda_result, parse_cuda_device)
from effiseg.runtime.tensorrt_rules import tensorrt_gpu_problem
from effiseg.runtime.trt_engine_cache import (CACHE_ENV_VAR, EngineKey, atomic_write_bytes,
                                              default_cache_dir, engine_path, load_or_build_engine,
                                              resolve_cache_dir, timing_cache_path)

sys.path.insert(0, str(Path(__file__).parent))
from tensorrt_test_models import make_tiny_onnx, onnxruntime_reference, random_batch, tiny_info  # noqa: E402

MAXWELL = DeviceInfo(0, "Quadro M6000", (5, 2), 12 << 30)
AMPERE = DeviceInfo(0, "NVIDIA RTX A4000", (8, 6), 16 << 30)


# =============================================================================================
# Pure decisions
# =============================================================================================

def test_profile_shapes_static_hw_nhwc():
    info = tiny_info(32)
    p = profile_shapes(None, info, min_batch=1, opt_batch=4, max_batch=8)
    assert (p.min, p.opt, p.max, p.static_batch) == ((1, 32, 32, 3), (4, 32, 32, 3), (8, 32, 32, 3), None)
    assert profile_shapes((-1, 32, 32, 3), info, max_batch=8).opt == (8, 32, 32, 3)  # opt defaults to max


def test_profile_shapes_float_nchw_and_dynamic_hw():
    info = tiny_info(48, input_format="float32-nchw", dynamic_hw=True)
    p = profile_shapes((-1, 3, -1, -1), info, min_batch=2, max_batch=4)
    assert (p.min, p.opt, p.max) == ((2, 3, 48, 48), (4, 3, 48, 48), (4, 3, 48, 48))
    # metadata-only view of a dynamic-H/W model: H/W pinned to the model's input size
    assert profile_shapes(None, info, max_batch=4).max == (4, 3, 48, 48)


def test_profile_shapes_static_batch_and_errors():
    info = tiny_info(32)
    p = profile_shapes((1, 32, 32, 3), info, max_batch=8)
    assert p.static_batch == 1 and p.min == p.opt == p.max == (1, 32, 32, 3)
    with pytest.raises(ValueError, match="height is 64"):
        profile_shapes((-1, 64, 32, 3), info)
    with pytest.raises(ValueError, match="4-D"):
        profile_shapes((-1, 32, 32), info)
    with pytest.raises(ValueError, match="min_batch <= opt_batch"):
        profile_shapes(None, info, min_batch=4, opt_batch=2, max_batch=8)


def _key(**changes) -> EngineKey:
    base = EngineKey(onnx_sha256="ab" * 32, tensorrt_version="8.5.3.1", gpu_name="Quadro M6000",
                     compute_capability="5.2", precision="fp32",
                     profile=(("images", (1, 32, 32, 3), (8, 32, 32, 3), (8, 32, 32, 3)),), n_profiles=2)
    return dataclasses.replace(base, **changes)


_KEY_IN_A_CHILD = """
import sys
from effiseg.runtime.trt_engine_cache import EngineKey
key = EngineKey(onnx_sha256="ab" * 32, tensorrt_version="8.5.3.1", gpu_name="Quadro M6000", compute_capability="5.2",
                precision="fp32", profile=(("images", (1, 32, 32, 3), (8, 32, 32, 3), (8, 32, 32, 3)),), n_profiles=2,
                platform="linux")
print(key.digest())
"""


def test_cache_key_is_stable_across_processes():
    """A cached engine is found by a later run only if every process computes the same key: no
    per-process hash (Python randomises str hashes per process) may leak into it."""
    import os
    import subprocess
    here = _key(platform="linux").digest()
    assert len(here) == 64
    json.dumps(_key().components())  # serialisable for the sidecar file
    for seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        child = subprocess.run([sys.executable, "-c", _KEY_IN_A_CHILD], capture_output=True, text=True, env=env,
                               timeout=120)
        assert child.returncode == 0, child.stderr
        assert child.stdout.strip() == here


@pytest.mark.parametrize("change", [
    {"onnx_sha256": "cd" * 32}, {"tensorrt_version": "10.3.0"}, {"gpu_name": "Tesla M40"},
    {"compute_capability": "6.1"}, {"precision": "fp16"}, {"n_profiles": 3}, {"schema": 999},
    {"workspace_mb": 2048}, {"platform": "win32" if sys.platform != "win32" else "linux"},
    {"profile": (("images", (1, 32, 32, 3), (4, 32, 32, 3), (8, 32, 32, 3)),)},
    {"profile": (("images", (1, 32, 32, 3), (8, 32, 32, 3), (16, 32, 32, 3)),)},
])
def test_cache_key_changes_with_every_component(change, tmp_path):
    assert _key(**change).digest() != _key().digest()
    assert engine_path(tmp_path, "m", _key(**change)) != engine_path(tmp_path, "m", _key())


def test_engine_and_timing_cache_names(tmp_path):
    p = engine_path(tmp_path, "effisegnet lite0/v1", _key())
    assert p.parent == tmp_path and p.suffix == ".engine" and "fp32" in p.name and " " not in p.name
    t = timing_cache_path(tmp_path, "8.5.3.1", "Quadro M6000", "5.2")
    assert t.parent == tmp_path and "sm52" in t.name and "8.5.3.1" in t.name


def test_platform_has_fast_fp16_prefers_builder_then_compute_capability():
    class Builder86:
        platform_has_fast_fp16 = False

    class Builder10:  # property removed
        pass

    class BrokenBuilder:
        @property
        def platform_has_fast_fp16(self):
            raise RuntimeError("gone")

    assert platform_has_fast_fp16(Builder86(), (8, 6)) is False       # the builder knows best
    assert platform_has_fast_fp16(Builder10(), (8, 6)) is True
    assert platform_has_fast_fp16(Builder10(), (5, 2)) is False
    assert platform_has_fast_fp16(BrokenBuilder(), (5, 2)) is False
    assert platform_has_fast_fp16(None, (7, 5)) is True


def test_precision_maxwell_fp16_request_falls_back_loudly():
    label = "Quadro M6000 (compute capability 5.2)"
    choice = choose_precision("fp16", fast_fp16_from_compute_capability(5, 2), label)
    assert choice.precision == "fp32" and choice.warning
    assert "Quadro M6000" in choice.message and "5.2" in choice.message and "FP32" in choice.message


def test_precision_auto_and_explicit():
    auto_maxwell = choose_precision("auto", False, "Quadro M6000 (compute capability 5.2)")
    assert auto_maxwell.precision == "fp32" and not auto_maxwell.warning and "fp32" in auto_maxwell.message
    assert choose_precision("auto", True, "A4000").precision == "fp16"
    assert choose_precision("FP16", True, "A4000") == choose_precision("fp16", True, "A4000")
    assert choose_precision("fp32", True, "A4000").precision == "fp32"
    assert choose_precision("fp32", True, "A4000").message is None
    no_flag = choose_precision("fp16", True, "H100", fp16_flag_available=False, trt_version="11.0.0")
    assert no_flag.precision == "fp32" and no_flag.warning and "strongly typed" in no_flag.message
    with pytest.raises(ValueError, match="INT8"):
        choose_precision("int8", True, "A4000")
    with pytest.raises(ValueError, match="unknown precision"):
        choose_precision("bf16", True, "A4000")


@pytest.mark.parametrize("text,parsed", [("8.6.1", (8, 6, 1)), ("8.6.1.post1", (8, 6, 1)),
                                         ("10.13.0.35", (10, 13, 0)), ("10", (10, 0, 0)),
                                         ("", (0, 0, 0)), ("unknown", (0, 0, 0))])
def test_parse_trt_version(text, parsed):
    assert parse_trt_version(text) == parsed


class _TensorEngine:
    num_io_tensors = 2

    def get_tensor_name(self, i): ...
    def get_tensor_mode(self, n): ...
    def get_tensor_dtype(self, n): ...


class _TensorContext:
    def set_input_shape(self, n, s): ...
    def set_tensor_address(self, n, p): ...
    def execute_async_v3(self, h): ...


class _BindingEngine:
    num_bindings = 2

    def get_binding_name(self, i): ...
    def binding_is_input(self, i): ...


class _BindingContext:
    def set_binding_shape(self, i, s): ...
    def execute_async_v2(self, b, h): ...


class _BothEngine(_TensorEngine, _BindingEngine):
    pass


class _BothContext(_TensorContext, _BindingContext):
    pass


def test_select_io_api():
    assert select_io_api("10.0.1", _TensorEngine(), _TensorContext()) == "tensor"
    assert select_io_api("8.6.1", _BothEngine(), _BothContext()) == "tensor"
    assert select_io_api("8.4.3", _BothEngine(), _BothContext()) == "bindings"  # v3 not trusted before 8.5
    assert select_io_api("8.2.5", _BindingEngine(), _BindingContext()) == "bindings"
    assert select_io_api("weird", _TensorEngine(), _TensorContext()) == "tensor"
    assert select_io_api("10.0.1", _TensorEngine, _TensorContext) == "tensor"  # classes work too
    with pytest.raises(BackendUnavailable, match="neither"):
        select_io_api("8.6.1", object(), object())


def test_network_creation_flags():
    class Flags:
        EXPLICIT_BATCH = 0

    class Trt86:
        __version__ = "8.6.1"
        NetworkDefinitionCreationFlag = Flags

    class Trt10:
        __version__ = "10.3.0"
        NetworkDefinitionCreationFlag = Flags

    assert network_creation_flags(Trt86) == 1
    assert network_creation_flags(Trt10) == 0


@pytest.mark.parametrize("shape,hw", [((4, 1, 32, 48), (32, 48)), ((4, 32, 48), (32, 48)),
                                      ((4, 32, 48, 1), (32, 48))])
def test_squeeze_output_shape(shape, hw):
    assert squeeze_output_shape(shape) == hw


def test_squeeze_output_shape_rejects_multichannel():
    with pytest.raises(ValueError, match="output"):
        squeeze_output_shape((4, 2, 32, 32))


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


# -- cache folder ---------------------------------------------------------------------------------

def test_cache_dir_resolution(tmp_path):
    home = tmp_path / "home"
    assert resolve_cache_dir(tmp_path / "x", environ={CACHE_ENV_VAR: "/elsewhere"}) == tmp_path / "x"
    assert resolve_cache_dir(None, environ={CACHE_ENV_VAR: str(tmp_path / "env")}) == tmp_path / "env"
    assert resolve_cache_dir(None, environ={CACHE_ENV_VAR: "  "}, platform="linux", home=home) == \
        home / ".cache" / "effiseg" / "trt"
    assert default_cache_dir({}, "linux", home) == home / ".cache" / "effiseg" / "trt"
    assert default_cache_dir({"XDG_CACHE_HOME": str(tmp_path / "xdg")}, "linux", home) == \
        tmp_path / "xdg" / "effiseg" / "trt"
    assert default_cache_dir({"LOCALAPPDATA": str(tmp_path / "Local")}, "win32", home) == \
        tmp_path / "Local" / "effiseg" / "trt"
    assert default_cache_dir({}, "win32", home) == home / "AppData" / "Local" / "effiseg" / "trt"


# -- corrupt-cache handling -----------------------------------------------------------------------

class _FakeDeserializer:
    """Accepts bytes that start with b"ENGINE"; b"RAISE" makes it raise like a picky runtime."""

    def __init__(self):
        self.calls = 0

    def __call__(self, data: bytes):
        self.calls += 1
        if data.startswith(b"RAISE"):
            raise RuntimeError("magic tag mismatch")
        return ("engine", data) if data.startswith(b"ENGINE") else None


def test_load_or_build_builds_then_reuses(tmp_path):
    path = tmp_path / "sub" / "m.engine"
    builds = []
    deser = _FakeDeserializer()
    first = load_or_build_engine(path, deser, lambda: builds.append(1) or b"ENGINE-1",
                                 metadata={"precision": "fp32"})
    assert first.built and first.engine == ("engine", b"ENGINE-1") and path.read_bytes() == b"ENGINE-1"
    assert json.loads(path.with_name(path.name + ".json").read_text())["precision"] == "fp32"
    second = load_or_build_engine(path, deser, lambda: builds.append(1) or b"ENGINE-2")
    assert not second.built and second.engine == ("engine", b"ENGINE-1") and len(builds) == 1


@pytest.mark.parametrize("garbage", [b"\x00\x01truncated", b"RAISE-this", b""])
def test_load_or_build_rebuilds_corrupt_engine(tmp_path, garbage):
    path = tmp_path / "m.engine"
    path.write_bytes(garbage)
    messages = []
    result = load_or_build_engine(path, _FakeDeserializer(), lambda: b"ENGINE-new", report=messages.append)
    assert result.built and result.engine == ("engine", b"ENGINE-new")
    assert path.read_bytes() == b"ENGINE-new"
    assert len(messages) == 1 and str(path) in messages[0] and "rebuilding" in messages[0]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_load_or_build_fails_clearly_when_fresh_engine_is_unusable(tmp_path):
    with pytest.raises(RuntimeError, match="just built"):
        load_or_build_engine(tmp_path / "m.engine", _FakeDeserializer(), lambda: b"not an engine")


def test_atomic_write_replaces_whole_file(tmp_path):
    target = tmp_path / "a" / "f.bin"
    atomic_write_bytes(target, b"one")
    atomic_write_bytes(target, b"two-two")
    assert target.read_bytes() == b"two-two"
    assert [p.name for p in target.parent.iterdir()] == ["f.bin"]


def test_missing_tensorrt_raises_backend_unavailable(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` now raises ImportError
    info = tiny_info(16)
    with pytest.raises(BackendUnavailable, match=r'pip install "effiseg\[trt\]".*Maxwell TensorRT 8\.5\.3.*"effiseg\[trt85\]"'):
        TensorRTBackend(info, tmp_path / "missing.onnx", cache_dir=tmp_path)


def test_int8_is_refused_before_anything_is_imported(tmp_path):
    with pytest.raises(ValueError, match="INT8"):
        TensorRTBackend(tiny_info(16), tmp_path / "m.onnx", precision="int8")


# =============================================================================================
# The backend against a fake TensorRT and a fake CUDA
# =============================================================================================

class FakeCuda(CudaApi):
    """Device memory is numpy byte arrays keyed by fake pointers; copies happen at once."""

    binding = "fake"

    def __init__(self, device: DeviceInfo):
        super().__init__(device.index)
        self.device = device
        self.memory: dict[int, np.ndarray] = {}
        self.host_live = 0
        self.handles_live = 0
        self._next = 0x10000
        self._current = threading.local()
        self.activated_threads: set[int] = set()

    def _ptr(self, nbytes):
        self._next += max(int(nbytes), 1) + 256
        return self._next

    def activate(self):
        self._current.device = self.device_index
        self.activated_threads.add(threading.get_ident())

    def require_current(self):
        if getattr(self._current, "device", None) != self.device_index:
            raise AssertionError("CUDA work from a thread whose current device was never set")

    def device_count(self):
        return 1

    def device_info(self):
        return self.device

    def alloc_host(self, shape, dtype):
        array = np.zeros(shape, dtype)
        self.host_live += 1

        def release():
            self.host_live -= 1
        return HostBuffer(array, array.ctypes.data, release)

    def alloc_device(self, nbytes):
        ptr = self._ptr(nbytes)
        self.memory[ptr] = np.zeros(int(nbytes), np.uint8)
        return DeviceBuffer(ptr, int(nbytes), lambda: self.memory.pop(ptr))

    def _handle(self):
        self.handles_live += 1

        def release():
            self.handles_live -= 1
        return release

    def create_stream(self):
        return Stream(None, self._ptr(1), lambda: None, self._handle())

    def create_event(self):
        return Event(None, lambda stream: self.require_current(), self.require_current, self._handle())

    def copy_to_device_async(self, dst, src, stream):
        self.require_current()
        assert src.flags.c_contiguous and src.nbytes <= dst.nbytes
        self.memory[dst.ptr][:src.nbytes] = src.reshape(-1).view(np.uint8)

    def copy_to_host_async(self, dst, src, stream):
        self.require_current()
        assert dst.flags.c_contiguous and dst.nbytes <= src.nbytes
        dst.reshape(-1).view(np.uint8)[:] = self.memory[src.ptr][:dst.nbytes]


class _DType:
    def __init__(self, name):
        self.name = name


def make_fake_trt(cuda: FakeCuda, version="8.6.1", fast_fp16=True, fp16_flag=True):
    """A module-like object with the slice of the TensorRT Python API the backend uses."""
    import onnx
    import onnxruntime as ort

    from effiseg.runtime.tensorrt_rules import tensorrt_uint8_problems

    onnx_types = {onnx.TensorProto.UINT8: "UINT8", onnx.TensorProto.FLOAT: "FLOAT",
                  onnx.TensorProto.FLOAT16: "HALF", onnx.TensorProto.BOOL: "BOOL"}
    np_types = {"UINT8": np.uint8, "FLOAT": np.float32, "HALF": np.float16, "BOOL": np.bool_}

    class trt:  # noqa: N801 - mimics the module name
        __version__ = version
        stats = {"builds": 0, "fp16_builds": 0, "network_flags": [], "timing_loaded": []}

        class ILogger:
            def __init__(self):
                pass

        class TensorIOMode:
            INPUT, OUTPUT = "INPUT", "OUTPUT"

        class DataType:
            FLOAT, HALF, UINT8, BOOL = _DType("FLOAT"), _DType("HALF"), _DType("UINT8"), _DType("BOOL")

        class MemoryPoolType:
            WORKSPACE = "WORKSPACE"

        class NetworkDefinitionCreationFlag:
            EXPLICIT_BATCH = 0

    if fp16_flag:
        class BuilderFlag:
            FP16 = "FP16"
        trt.BuilderFlag = BuilderFlag
    else:
        trt.BuilderFlag = type("BuilderFlag", (), {})

    class Tensor:
        def __init__(self, name, shape, dtype):
            self.name, self.shape, self.dtype = name, tuple(shape), dtype

    class Network:
        def __init__(self, flags):
            self.flags = flags
            self.inputs, self.outputs, self.model = [], [], None

        @property
        def num_inputs(self):
            return len(self.inputs)

        def get_input(self, i):
            return self.inputs[i]

    def dims(value_info):
        return [d.dim_value if d.HasField("dim_value") else -1 for d in value_info.type.tensor_type.shape.dim]

    class Parser:
        def __init__(self, network, logger):
            self.network = network
            self.num_errors = 0

        def parse_from_file(self, path):
            # As on Windows: the native code opens the path in the ANSI code page.
            if not str(path).isascii():
                self.num_errors, self.errors = 1, [f"Failed to open file: {path}"]
                return False
            return self.parse(Path(path).read_bytes(), str(path))

        def parse(self, data, path=None):
            model = onnx.load_from_string(bytes(data))
            # Like the real parser, refuse uint8 intermediates and casts between uint8 and non-floats.
            refused = tensorrt_uint8_problems(model)
            if refused:
                self.num_errors = len(refused)
                self.errors = [f"ModelImporter.cpp: TensorRT does not support UINT8 types for intermediate tensors! "
                               f"({r})" for r in refused]
                return False
            self.network.model = bytes(data)
            for vi in model.graph.input:
                self.network.inputs.append(Tensor(vi.name, dims(vi), onnx_types[vi.type.tensor_type.elem_type]))
            for vi in model.graph.output:
                self.network.outputs.append(Tensor(vi.name, dims(vi), onnx_types[vi.type.tensor_type.elem_type]))
            return True

        def get_error(self, i):
            return self.errors[i]

    class Profile:
        def set_shape(self, name, lo, opt, hi):
            self.shape = (name, list(lo), list(opt), list(hi))

    class TimingCache:
        def __init__(self, data):
            self.data = data

        def serialize(self):
            return memoryview(b"FAKETC" + self.data[6:] + b"+")

    class Config:
        def __init__(self):
            self.flags, self.profiles, self.workspace, self.timing = set(), [], None, None

        def set_memory_pool_limit(self, pool, size):
            self.workspace = size

        def set_flag(self, flag):
            self.flags.add(flag)

        def add_optimization_profile(self, profile):
            self.profiles.append(profile.shape)
            return len(self.profiles) - 1

        def create_timing_cache(self, data):
            data = bytes(data)
            if data and not data.startswith(b"FAKETC"):
                return None  # like TensorRT refusing a foreign blob
            trt.stats["timing_loaded"].append(data)
            return TimingCache(data or b"FAKETC")

        def set_timing_cache(self, cache, ignore_mismatch):
            self.timing = cache
            return True

        def get_timing_cache(self):
            return self.timing

    class Builder:
        def __init__(self, logger):
            trt.stats["builders"] = trt.stats.get("builders", 0) + 1

        def create_network(self, flags):
            trt.stats["network_flags"].append(flags)
            return Network(flags)

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            trt.stats["builds"] += 1
            fp16 = "FP16" in config.flags
            trt.stats["fp16_builds"] += fp16
            spec = {"model": base64.b64encode(network.model).decode(), "fp16": fp16, "profiles": config.profiles,
                    "inputs": [[t.name, list(t.shape), t.dtype] for t in network.inputs],
                    "outputs": [[t.name, list(t.shape), t.dtype] for t in network.outputs]}
            return memoryview(b"FAKETRT1" + json.dumps(spec).encode())

    if fast_fp16 is not None:
        Builder.platform_has_fast_fp16 = fast_fp16

    class Engine:
        def __init__(self, spec):
            self.spec = spec
            self.session = ort.InferenceSession(base64.b64decode(spec["model"]), providers=["CPUExecutionProvider"])
            self.tensors = {n: (tuple(s), d, "INPUT") for n, s, d in spec["inputs"]}
            self.tensors.update({n: (tuple(s), d, "OUTPUT") for n, s, d in spec["outputs"]})
            self.names = list(self.tensors)
            self.profile_owner: dict[int, object] = {}

        @property
        def num_io_tensors(self):
            return len(self.names)

        @property
        def num_optimization_profiles(self):
            return max(1, len(self.spec["profiles"]))

        def get_tensor_name(self, i):
            return self.names[i]

        def get_tensor_mode(self, name):
            return self.tensors[name][2]

        def get_tensor_dtype(self, name):
            return getattr(trt.DataType, self.tensors[name][1])

        def get_tensor_shape(self, name):
            return self.tensors[name][0]

        def get_tensor_profile_shape(self, name, profile):
            _, lo, opt, hi = self.spec["profiles"][profile]
            return [tuple(lo), tuple(opt), tuple(hi)]

        def create_execution_context(self):
            return Context(self)

    class Context:
        def __init__(self, engine):
            self.engine = engine
            self.profile = 0
            self.shapes, self.addresses = {}, {}

        def set_optimization_profile_async(self, profile, stream_handle):
            owner = self.engine.profile_owner.get(profile)
            if owner is not None and owner is not self:
                raise AssertionError(f"profile {profile} is already used by another context")
            self.engine.profile_owner[profile] = self
            self.profile = profile
            return True

        def set_input_shape(self, name, shape):
            if self.engine.spec["profiles"]:
                _, lo, _, hi = self.engine.spec["profiles"][self.profile]
                if not all(a <= s <= b for a, s, b in zip(lo, shape, hi)):
                    return False
            self.shapes[name] = tuple(shape)
            return True

        def get_tensor_shape(self, name):
            shape, _, mode = self.engine.tensors[name]
            if mode == "INPUT":
                return self.shapes.get(name, shape)
            # shape inference, as TensorRT does it: run the graph once on zeros of the input shape
            feeds = {n: np.zeros(self.shapes.get(n, s), np_types[d])
                     for n, (s, d, m) in self.engine.tensors.items() if m == "INPUT"}
            outputs = self.engine.session.run(None, feeds)
            index = [n for n, _, _ in self.engine.spec["outputs"]].index(name)
            return tuple(outputs[index].shape)

        def set_tensor_address(self, name, ptr):
            self.addresses[name] = ptr
            return True

        def execute_async_v3(self, stream_handle):
            cuda.require_current()
            feeds = {}
            for name, (_, dtype, mode) in self.engine.tensors.items():
                if mode == "INPUT":
                    shape = self.get_tensor_shape(name)
                    count = int(np.prod(shape)) * np.dtype(np_types[dtype]).itemsize
                    raw = cuda.memory[self.addresses[name]][:count]
                    feeds[name] = raw.view(np_types[dtype]).reshape(shape).copy()
            outputs = self.engine.session.run(None, feeds)
            for (name, _, _), value in zip(self.engine.spec["outputs"], outputs):
                data = np.ascontiguousarray(value).reshape(-1).view(np.uint8)
                cuda.memory[self.addresses[name]][:data.nbytes] = data
            return True

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, data):
            data = bytes(data)
            if not data.startswith(b"FAKETRT1"):
                return None
            return Engine(json.loads(data[8:]))

    trt.Builder, trt.OnnxParser, trt.Runtime, trt.IExecutionContext = Builder, Parser, Runtime, Context
    return trt


def backend_on_fakes(info, onnx_path, fake_trt, fake_cuda, **kwargs) -> TensorRTBackend:
    """The real backend, handed the fake tensorrt module and the fake CUDA binding."""
    def open_fake_cuda(device_index):
        fake_cuda.device_index = device_index
        return fake_cuda
    return TensorRTBackend(info, onnx_path, tensorrt=fake_trt, open_cuda=open_fake_cuda, **kwargs)


@pytest.fixture
def env(tmp_path):
    def make(info=None, device=AMPERE, static_batch=None, **trt_options):
        info = info or tiny_info(16)
        onnx_path = make_tiny_onnx(tmp_path / f"{info.variant}-{info.output_format}.onnx", info,
                                   static_batch=static_batch)
        cuda = FakeCuda(device)
        trt = make_fake_trt(cuda, **trt_options)

        def backend(**kwargs):
            kwargs.setdefault("cache_dir", tmp_path / "cache")
            return backend_on_fakes(info, onnx_path, fake_trt=trt, fake_cuda=cuda, **kwargs)
        return info, onnx_path, cuda, trt, backend
    return make


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


def test_engine_cache_reused_then_rebuilt_when_corrupt(env):
    info, onnx_path, cuda, trt, make = env()
    first = make(max_batch=2)
    assert first.engine_built and trt.stats["builds"] == 1
    engine_file = first.engine_path
    first.close()
    assert engine_file.is_file() and engine_file.with_name(engine_file.name + ".json").is_file()
    assert any(p.name.startswith("timing-") for p in engine_file.parent.iterdir())

    second = make(max_batch=2)
    assert not second.engine_built and trt.stats["builds"] == 1 and second.engine_path == engine_file
    second.close()

    engine_file.write_bytes(b"\x00garbage")
    third = make(max_batch=2)
    assert third.engine_built and trt.stats["builds"] == 2
    assert any("unusable" in m and "rebuilding" in m for m in third.messages)
    assert third.infer(random_batch(info, 1)).shape == (1, 16, 16)
    third.close()

    fourth = make(max_batch=4)  # another profile: another engine file
    assert fourth.engine_built and fourth.engine_path != engine_file
    fourth.close()


def test_timing_cache_is_reused_and_a_corrupt_one_is_replaced(env, tmp_path):
    info, onnx_path, cuda, trt, make = env()
    make(max_batch=2, precision="fp32").close()
    timing = [p for p in (tmp_path / "cache").iterdir() if p.name.startswith("timing-")]
    assert len(timing) == 1 and timing[0].read_bytes().startswith(b"FAKETC")
    make(max_batch=3, precision="fp32").close()  # new engine, timing cache read back
    assert trt.stats["timing_loaded"][-1].startswith(b"FAKETC+")
    timing[0].write_bytes(b"junk")
    backend = make(max_batch=1, precision="fp32")
    assert any("timing cache" in m and "unusable" in m for m in backend.messages)
    backend.close()


def test_maxwell_fp16_request_builds_fp32_and_says_so(env):
    info, onnx_path, cuda, trt, make = env(device=MAXWELL, version="8.5.3", fast_fp16=False)
    with make(precision="fp16", max_batch=2) as backend:
        assert backend.precision == "fp32" and backend.requested_precision == "fp16"
        assert trt.stats["fp16_builds"] == 0
        assert any("Quadro M6000" in m and "5.2" in m and "FP32" in m for m in backend.messages)
        assert "fp32" in backend.engine_path.name
        assert backend.describe()["compute_capability"] == "5.2"


@pytest.mark.parametrize("version,capability,last", [
    ("8.6.1", (5, 2), "8.5.3"),          # 8.6 dropped Maxwell: the Quadro M6000 needs 8.5.3
    ("10.3.0", (5, 2), "8.5.3"),
    ("10.0.1", (6, 1), "8.6.1"),         # 10.0 needs compute capability 7.0: Pascal stops at 8.6.1
    ("11.0.0", (6, 0), "8.6.1"),
    ("10.5.0", (7, 0), "10.4"),          # 10.5 removed Volta
])
def test_tensorrt_gate_refuses_a_release_too_new_for_the_gpu_naming_the_last_one(version, capability, last):
    message = tensorrt_gpu_problem(version, capability, windows=False)
    assert message and "\n" not in message
    assert f"TensorRT {last} is the last release" in message and f"{capability[0]}.{capability[1]}" in message


@pytest.mark.parametrize("version,capability", [
    ("8.5.3.1", (5, 2)), ("8.5.2", (5, 0)), ("8.6.1.post1", (6, 1)), ("10.4.0", (7, 0)),
    ("10.3.0", (7, 0)), ("10.16.1", (7, 5)), ("11.4.0", (8, 6)), ("unknown", (5, 2)),
])
def test_tensorrt_gate_lets_supported_pairs_through(version, capability):
    assert tensorrt_gpu_problem(version, capability) is None


def test_maxwell_gate_names_the_windows_zip_wheel_and_the_trt85_extra():
    message = tensorrt_gpu_problem("8.6.1", (5, 2), windows=True, python_tag="310")
    assert "tensorrt-8.5.3.1-cp310-none-win_amd64.whl" in message and "effiseg[trt85]" in message
    assert "trt86" not in message


@pytest.mark.parametrize("version", ["8.6.1", "10.3.0"])
def test_tensorrt_too_new_for_a_maxwell_gpu_is_refused_before_any_build(env, version):
    """A newer TensorRT would fail only at engine build ("Unsupported SM: 0x502"); say so before,
    and what to install, so that auto selection moves on to another backend."""
    info, onnx_path, cuda, trt, make = env(device=MAXWELL, version=version)
    with pytest.raises(BackendUnavailable) as raised:
        make(precision="fp32", max_batch=2)
    message = str(raised.value)
    assert "Quadro M6000" in message and "5.2" in message and "8.5.3" in message and "effiseg[trt85]" in message
    assert trt.stats.get("builds", 0) == 0 and not (onnx_path.parent / "cache").exists()


def test_tensorrt_853_runs_on_a_maxwell_gpu_in_fp32(env):
    info, onnx_path, cuda, trt, make = env(device=MAXWELL, version="8.5.3.1", fast_fp16=False)
    batch = random_batch(info, 3)
    with make(precision="auto", max_batch=2) as backend:
        assert backend.precision == "fp32" and backend.io_api == "tensor"
        np.testing.assert_allclose(backend.infer(batch), onnxruntime_reference(onnx_path, batch), rtol=1e-6, atol=1e-6)
    assert trt.stats["network_flags"] == [1]  # explicit batch, required before TensorRT 10


def test_fp16_on_a_fast_gpu_and_tensorrt10_without_builder_property(env):
    info, onnx_path, cuda, trt, make = env(version="10.3.0", fast_fp16=None)  # property removed
    with make(precision="auto", max_batch=2) as backend:
        assert backend.precision == "fp16" and trt.stats["fp16_builds"] == 1
        assert trt.stats["network_flags"] == [0]
        assert backend.io_api == "tensor"


def test_tensorrt86_uses_explicit_batch_flag(env):
    info, onnx_path, cuda, trt, make = env(version="8.6.1")
    with make(precision="fp32", max_batch=2):
        assert trt.stats["network_flags"] == [1]


def test_strongly_typed_tensorrt_reports_fp32(env):
    info, onnx_path, cuda, trt, make = env(version="11.0.0", fast_fp16=None, fp16_flag=False)
    with make(precision="fp16", max_batch=2) as backend:
        assert backend.precision == "fp32"
        assert any("strongly typed" in m for m in backend.messages)


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


def test_parser_refusal_of_an_old_uint8_graph_names_the_node_and_the_fix(env, tmp_path):
    """ONNX files from before the exporter cast first (uint8 Transpose at node 0) are refused by
    TensorRT's parser; the error says which node and how to re-export."""
    onnx = pytest.importorskip("onnx")
    info, onnx_path, cuda, trt, make = env()
    model = onnx.load(str(onnx_path))
    cast, transpose = model.graph.node[0], model.graph.node[1]
    assert (cast.op_type, transpose.op_type) == ("Cast", "Transpose")
    transpose.input[0], transpose.output[0] = "images", "nhwc_u8_t"   # transpose the bytes first...
    cast.input[0], cast.output[0] = "nhwc_u8_t", "nchw"                # ...then cast them
    model.graph.node.remove(cast)
    model.graph.node.insert(1, cast)
    old_style = tmp_path / "old-style.onnx"
    onnx.save(model, str(old_style))
    with pytest.raises(RuntimeError) as raised:
        backend_on_fakes(info, old_style, fake_trt=trt, fake_cuda=cuda, cache_dir=tmp_path / "cache")
    message = str(raised.value)
    assert "could not parse" in message and str(old_style) in message
    assert "node 0 (Transpose" in message and "Re-export it with this version's effiseg-export" in message


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


def test_a_cached_engine_starts_without_a_builder(env):
    """The fast-FP16 answer is asked of a Builder once per GPU and TensorRT version (creating one
    loads TensorRT's builder library); with the engine cached, later starts need no Builder."""
    info, onnx_path, cuda, trt, make = env(device=MAXWELL, version="8.5.3", fast_fp16=False)
    with make(precision="auto") as first:
        assert first.precision == "fp32"
    assert trt.stats["builders"] == 1 and trt.stats["builds"] == 1
    with make(precision="auto") as second:
        assert second.precision == "fp32"  # the recorded answer: Maxwell has no fast FP16
    assert trt.stats["builders"] == 1 and trt.stats["builds"] == 1


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


def test_a_model_under_a_non_ascii_path_builds(env, tmp_path):
    """Windows: TensorRT's parse_from_file opens paths in the ANSI code page (the fake does the same),
    so a model under C:\\Users\\Jörg\\ was not found; the backend hands TensorRT the bytes."""
    info, onnx_path, cuda, trt, make = env()
    moved = tmp_path / "Jörg Δ" / "model.onnx"
    moved.parent.mkdir()
    moved.write_bytes(onnx_path.read_bytes())
    batch = random_batch(info, 3)
    with backend_on_fakes(info, moved, fake_trt=trt, fake_cuda=cuda, cache_dir=tmp_path / "cache",
                             max_batch=4) as backend:
        out = backend.infer(batch)
    np.testing.assert_allclose(out, onnxruntime_reference(onnx_path, batch), rtol=1e-6, atol=1e-6)


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
