"""A fake ``tensorrt`` module and a fake CUDA binding, handed to the real TensorRT backend.

The fake engine computes with ONNX Runtime on the bytes the backend copied into fake device
memory, enforces TensorRT's "one context per optimisation profile" rule and refuses work from a
thread whose current device was never set, so buffer plumbing, slots, dtype handling, caching and
cleanup are all checked without TensorRT or a GPU (tests/runtime/test_tensorrt_build.py, _run.py and the
backend contract tests).
"""
from __future__ import annotations

import base64
import json
import sys
import threading
from pathlib import Path

import numpy as np

from effiseg.runtime.backends.tensorrt import TensorRTBackend
from effiseg.runtime.cuda_memory import CudaApi, DeviceBuffer, DeviceInfo, Event, HostBuffer, Stream

sys.path.insert(0, str(Path(__file__).parent))
from tensorrt_test_models import make_tiny_onnx, tiny_info  # noqa: E402

MAXWELL = DeviceInfo(0, "Quadro M6000", (5, 2), 12 << 30)
AMPERE = DeviceInfo(0, "NVIDIA RTX A4000", (8, 6), 16 << 30)


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


def fake_env(tmp_path: Path):
    """``make(info=None, device=AMPERE, static_batch=None, **fake_trt_options)`` -> (info, onnx_path,
    cuda, trt, backend(**kwargs)): a tiny ONNX file, the fakes, and a backend factory on them whose
    engine cache is under ``tmp_path``. Test modules wrap it in their ``env`` fixture."""
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
