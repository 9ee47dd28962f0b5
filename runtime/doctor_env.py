"""What ``effiseg-doctor`` finds on a machine, as plain data, and the probes that find it.

The report and its decisions (``doctor.py``) read only an :class:`Environment`, so tests describe a
machine (a Maxwell GPU with TensorRT 8.6, a Turing GPU with a CPU-only ONNX Runtime...) as data,
without faking imports. :func:`probe_environment` fills one in on the real machine; every probe is
guarded, so a broken install is reported, never a traceback. GPUs are asked of the NVIDIA driver
itself (``nvcuda.dll`` / ``libcuda.so.1`` through ctypes; NVML, ``nvml.dll`` / ``libnvidia-ml.so.1``,
for the driver's version), in the CUDA numbering the backends use: no torch is needed to see them.
"""
from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import json
import os
import platform
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

from .cuda_memory import driver_devices, driver_library, load_first_library


@dataclass(frozen=True)
class Gpu:
    index: int                      # as effiseg numbers it: cuda:<index>
    name: str
    compute_capability: tuple[int, int]
    memory_bytes: int | None = None


@dataclass(frozen=True)
class TorchInfo:
    version: str
    cuda: str | None = None         # torch.version.cuda: None for a CPU-only build
    arch_list: tuple[str, ...] = () # torch.cuda.get_arch_list(): the GPUs its kernels are built for
    cuda_available: bool = False
    cudnn: str | None = None        # torch.backends.cudnn.version(), e.g. "90100"
    error: str | None = None        # set when `import torch` failed


@dataclass(frozen=True)
class OnnxRuntimeInfo:
    version: str
    providers: tuple[str, ...] = ()
    built_cuda: str | None = None   # the CUDA / cuDNN this onnxruntime was built with
    built_cudnn: str | None = None
    cuda_loads: bool | None = None  # a session on the CUDA provider started (None: not tried)
    cuda_error: str | None = None   # why it did not
    error: str | None = None        # set when `import onnxruntime` failed


@dataclass(frozen=True)
class OpenVinoInfo:
    version: str
    native_bf16: bool = False       # the CPU computes bfloat16 natively (OpenVINO's "BF16" capability)
    error: str | None = None        # set when `import openvino` or asking the CPU plugin failed


@dataclass(frozen=True)
class TensorRTInfo:
    version: str | None             # None: installed but `import tensorrt` failed
    has_fp16_flag: bool = True      # BuilderFlag.FP16 exists (weak typing; gone in TensorRT 11)
    error: str | None = None


@dataclass(frozen=True)
class Environment:
    system: str                     # "Windows-10-10.0.19045", "Linux-6.8.0-x86_64"
    python: str                     # "3.11.9"
    windows: bool
    driver_version: str | None = None   # "552.22"; None: no NVIDIA driver found
    driver_cuda: str | None = None      # the newest CUDA the driver runs, "12.4"
    gpus: tuple[Gpu, ...] = ()
    torch: TorchInfo | None = None      # None: not installed
    onnxruntime: OnnxRuntimeInfo | None = None
    openvino: OpenVinoInfo | None = None  # None: not installed
    tensorrt: TensorRTInfo | None = None
    cuda_bindings: dict[str, str] = field(default_factory=dict)  # "cuda-python"/"pycuda" -> version
    cudnn_library: str | None = None    # the cuDNN library the loader finds, with its version

    @property
    def python_tag(self) -> str:
        """"311" for Python 3.11: the tag of the wheel to take from a TensorRT archive."""
        return "".join(self.python.split(".")[:2])


def _one_line(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}".strip()
    return text.splitlines()[0][:300] if text else type(error).__name__


def _cuda_version_text(number: int) -> str:
    """12040 -> "12.4" (the driver API's encoding: 1000 * major + 10 * minor)."""
    return f"{number // 1000}.{(number % 1000) // 10}"


def probe_gpus() -> tuple[str | None, tuple[Gpu, ...]]:
    """(CUDA version the driver supports, the GPUs) from the driver library; (None, ()) without one."""
    found = driver_library()
    names = driver_devices()
    if not found or not found[0] or names is None:
        return None, ()
    lib = found[0]
    cuda = None
    try:
        number = ctypes.c_int(0)
        if lib.cuDriverGetVersion(ctypes.byref(number)) == 0:
            cuda = _cuda_version_text(number.value)
    except (AttributeError, OSError):
        pass
    gpus = []
    for index, (name, capability) in enumerate(names):
        memory = None
        try:
            handle, total = ctypes.c_int(0), ctypes.c_size_t(0)
            if (lib.cuDeviceGet(ctypes.byref(handle), index) == 0
                    and lib.cuDeviceTotalMem_v2(ctypes.byref(total), handle) == 0):
                memory = total.value
        except (AttributeError, OSError):
            pass
        gpus.append(Gpu(index, name, tuple(capability), memory))
    return cuda, tuple(gpus)


def probe_driver_version() -> str | None:
    """The driver's version string ("552.22") from NVML; None where NVML does not load."""
    # Windows drivers put nvml.dll in System32; older ones only under NVSMI.
    nvsmi = Path(os.environ.get("ProgramFiles", "C:\\Program Files")) / "NVIDIA Corporation" / "NVSMI" / "nvml.dll"
    names = ("nvml.dll", str(nvsmi)) if os.name == "nt" else ("libnvidia-ml.so.1", "libnvidia-ml.so")
    found = load_first_library(names)
    if found is None:
        return None
    nvml = found[1]
    try:
        if nvml.nvmlInit_v2() != 0:
            return None
        text = ctypes.create_string_buffer(96)
        ok = nvml.nvmlSystemGetDriverVersion(text, 96) == 0
        nvml.nvmlShutdown()
        return text.value.decode(errors="replace") if ok else None
    except (AttributeError, OSError):
        return None


def _installed(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


# Asked in a child interpreter: effiseg.runtime never imports torch itself (an inference install has
# none), and a torch whose CUDA libraries are broken can take its process down with it.
_TORCH_PROBE = textwrap.dedent("""
    import importlib, json
    torch = importlib.import_module("torch")  # spelled so: effiseg.runtime has no torch import at all
    info = {"version": torch.__version__, "cuda": torch.version.cuda}
    try:
        info["cuda_available"] = bool(torch.cuda.is_available())
        info["arch_list"] = list(torch.cuda.get_arch_list()) if torch.version.cuda else []
        cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
        info["cudnn"] = str(cudnn) if cudnn else None
    except Exception as e:  # a broken CUDA install inside torch
        info["error"] = f"{type(e).__name__}: {e}".strip()
    print(json.dumps(info))
""")


def probe_torch() -> TorchInfo | None:
    if importlib.util.find_spec("torch") is None:
        return None
    version = _installed("torch") or "?"
    try:
        # The child writes UTF-8 and is read as UTF-8: on Windows a pipe is otherwise in the ANSI code page
        # (or UTF-8 under PYTHONIOENCODING), and a torch failing under C:\Users\Łukasz\ broke the decoding.
        child = subprocess.run([sys.executable, "-c", _TORCH_PROBE], capture_output=True, encoding="utf-8",
                               errors="replace", env={**os.environ, "PYTHONIOENCODING": "utf-8"}, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as e:
        return TorchInfo(version=version, error=_one_line(e))
    lines = child.stdout.strip().splitlines()
    if child.returncode != 0 or not lines:
        last = (child.stderr.strip().splitlines() or [f"exit status {child.returncode}"])[-1]
        return TorchInfo(version=version, error=f"import torch failed: {last}")
    info = json.loads(lines[-1])
    if info.get("error"):
        return TorchInfo(version=info["version"], cuda=info["cuda"], error=info["error"])
    return TorchInfo(version=info["version"], cuda=info["cuda"], arch_list=tuple(info["arch_list"]),
                     cuda_available=info["cuda_available"], cudnn=info["cudnn"])


# A one-node ONNX model (Identity on a float tensor), enough for ONNX Runtime to load its CUDA
# provider and the CUDA/cuDNN libraries it was built with; written by onnx.helper, kept as bytes so
# the probe needs no onnx package.
_IDENTITY_ONNX = bytes.fromhex(
    "0807120e656666697365672d646f63746f723a3b0a100a017812017922084964656e746974791205"
    "70726f62655a0f0a0178120a0a08080112040a020801620f0a0179120a0a08080112040a02080142"
    "040a00100d")


def probe_onnxruntime(gpus: tuple[Gpu, ...]) -> OnnxRuntimeInfo | None:
    if importlib.util.find_spec("onnxruntime") is None:
        return None
    try:
        import onnxruntime as ort
    except Exception as e:
        return OnnxRuntimeInfo(version=_installed("onnxruntime") or _installed("onnxruntime-gpu") or "?",
                               error=_one_line(e))
    providers = tuple(ort.get_available_providers())
    try:
        from onnxruntime.capi import build_and_package_info as build
        built_cuda, built_cudnn = getattr(build, "cuda_version", None), getattr(build, "cudnn_version", None)
    except Exception:
        built_cuda = built_cudnn = None
    loads, error = None, None
    if "CUDAExecutionProvider" in providers and gpus:
        from .backends.onnxruntime_backend import preload_cuda_libraries
        said = preload_cuda_libraries(ort)  # as the backend does before its first GPU session
        try:
            session = ort.InferenceSession(_IDENTITY_ONNX, providers=[("CUDAExecutionProvider", {"device_id": 0})])
            loads = session.get_providers()[0] == "CUDAExecutionProvider"
            if not loads:
                error = ("; ".join(said[-2:])
                         or "the CUDA provider did not start (its CUDA or cuDNN libraries are missing)")
        except Exception as e:
            loads, error = False, _one_line(e)
    return OnnxRuntimeInfo(version=ort.__version__, providers=providers, built_cuda=built_cuda or None,
                           built_cudnn=built_cudnn or None, cuda_loads=loads, cuda_error=error)


def probe_openvino() -> OpenVinoInfo | None:
    if importlib.util.find_spec("openvino") is None:
        return None
    version = _installed("openvino") or "?"
    try:
        import openvino
        capabilities = openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    except Exception as e:  # a broken install says so instead of stopping the report
        return OpenVinoInfo(version=version, error=_one_line(e))
    return OpenVinoInfo(version=version, native_bf16="BF16" in capabilities)


def probe_tensorrt() -> TensorRTInfo | None:
    if importlib.util.find_spec("tensorrt") is None:
        return None
    try:
        import tensorrt
    except Exception as e:  # on Windows: the wheel is there but TensorRT's DLLs are not on PATH
        return TensorRTInfo(version=None, error=_one_line(e))
    return TensorRTInfo(version=str(getattr(tensorrt, "__version__", "unknown")),
                        has_fp16_flag=hasattr(getattr(tensorrt, "BuilderFlag", None), "FP16"))


def probe_cudnn_library() -> str | None:
    """The cuDNN library the system loader finds (PATH / LD_LIBRARY_PATH), with its version."""
    names = (("cudnn64_9.dll", "cudnn64_8.dll") if os.name == "nt"
             else ("libcudnn.so.9", "libcudnn.so.8", "libcudnn.so"))
    found = load_first_library(names)
    if found is None:
        return None
    name, lib = found
    try:
        lib.cudnnGetVersion.restype = ctypes.c_size_t
        return f"{name} (version {lib.cudnnGetVersion()})"
    except (AttributeError, OSError):
        return name


def probe_environment() -> Environment:
    """The real machine, each part asked in its own guarded probe. The system's cuDNN is looked
    for first: once ONNX Runtime has preloaded its CUDA libraries, the loader would find that copy."""
    cudnn_library = probe_cudnn_library()
    driver_cuda, gpus = probe_gpus()
    bindings = {name: v for name in ("cuda-python", "cuda-bindings", "pycuda") if (v := _installed(name))}
    return Environment(
        system=platform.platform(), python=platform.python_version(), windows=os.name == "nt",
        driver_version=probe_driver_version() if gpus else None, driver_cuda=driver_cuda, gpus=gpus,
        torch=probe_torch(), onnxruntime=probe_onnxruntime(gpus), openvino=probe_openvino(), tensorrt=probe_tensorrt(),
        cuda_bindings=bindings, cudnn_library=cudnn_library)


__all__ = ["Environment", "Gpu", "OnnxRuntimeInfo", "OpenVinoInfo", "TensorRTInfo", "TorchInfo", "probe_environment"]
