"""Device memory, pinned host memory, streams and events for the GPU backends, without PyTorch.

Two Python bindings of CUDA are supported, tried in this order by :func:`open_cuda`:

* **cuda-python** (``cuda.bindings.runtime``; ``cuda.cudart`` in releases before 12.6): NVIDIA's
  official bindings, shipped as wheels for Windows and Linux, so nothing is compiled on install.
  cuda-python 13.x needs a CUDA 13 driver, and CUDA 13 no longer supports Maxwell/Pascal/Volta:
  on Pascal and Volta (TensorRT 8.6.1 / 10.0-10.4) install ``cuda-python>=12,<13``; on Maxwell, whose
  last TensorRT (8.5.3) is built on CUDA 11.8, ``cuda-python>=11.8,<12`` (the extras of
  runtime/INSTALL.md pin them).
* **pycuda**, where it is already installed (it usually has to be compiled, hence second choice).

Every failing call raises :class:`CudaError` naming the call and CUDA's error name and text.

The CUDA runtime's *current device is per host thread*. ``with api.current():`` makes this
object's device current in the calling thread for the calls inside the block; a backend wraps every
method that a pipeline thread may call in it, because a thread that never did would otherwise work
on device 0. With pycuda the block pushes the device's context and pops it at its end: a pycuda
thread that ends with a context still pushed aborts the whole process ("The context stack was not
empty"; NVIDIA/TensorRT issues #1107 and #2357 hit it with worker threads).

Nothing here imports a binding at module import time: ``import effiseg.runtime.cuda_memory`` works
on a machine without CUDA.
"""
from __future__ import annotations

import ctypes
import os
import threading
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

INSTALL_HINT = ("install the TensorRT extra of runtime/INSTALL.md for this GPU (\"effiseg[trt]\", "
                "\"effiseg[trt-volta]\", \"effiseg[trt-pascal]\" or \"effiseg[trt85]\"; each brings the "
                "cuda-python that matches its TensorRT), or install pycuda")


class CudaError(RuntimeError):
    """A CUDA call failed; the message names the call and CUDA's error."""


class CudaUnavailable(ImportError):
    """No CUDA binding (cuda-python or pycuda) can be imported."""


def parse_cuda_device(device: str | int) -> int:
    """``"cuda"`` -> 0, ``"cuda:1"`` -> 1, ``1`` -> 1; anything else is a ValueError."""
    if isinstance(device, int) and not isinstance(device, bool):
        index = device
    else:
        text = str(device).strip().lower()
        if text == "cuda":
            return 0
        prefix, _, number = text.partition(":")
        if prefix != "cuda" or not number.isdigit():
            raise ValueError(f"not a CUDA device: {device!r} (expected 'cuda' or 'cuda:N')")
        index = int(number)
    if index < 0:
        raise ValueError(f"CUDA device index must be >= 0, got {device!r}")
    return index


def load_first_library(names, windows: bool | None = None) -> tuple[str, "ctypes.CDLL"] | None:
    """(name, library) of the first of ``names`` the system loader can load, else None.

    On Windows a bare name is also looked for on PATH: since Python 3.8, ``ctypes.CDLL("x.dll")``
    searches only the application's folder, System32 and ``os.add_dll_directory`` folders, while
    CUDA's and cuDNN's installers (and ONNX Runtime's and TensorRT's instructions) put their DLLs on
    PATH; a full path is loaded with its own folder searched for its dependencies."""
    windows = os.name == "nt" if windows is None else windows
    for name in names:
        candidates = [name]
        if windows and not any(sep in name for sep in "/\\"):
            candidates += [os.path.join(folder, name) for folder in os.environ.get("PATH", "").split(os.pathsep)
                           if folder and os.path.isfile(os.path.join(folder, name))]
        for candidate in candidates:
            try:
                return name, ctypes.CDLL(candidate)
            except OSError:
                continue
    return None


def driver_library():
    """The NVIDIA driver library (``nvcuda.dll`` / ``libcuda.so.1``) and this process's GPU count
    after ``cuInit`` (``CUDA_VISIBLE_DEVICES`` applies): (library, count); (None, 0) when the driver
    says there is no usable GPU; None when no driver library loads or it does not answer."""
    found = load_first_library(("nvcuda.dll",) if os.name == "nt" else ("libcuda.so.1", "libcuda.so"))
    if found is None:
        return None
    lib = found[1]
    try:
        count = ctypes.c_int(0)
        if lib.cuInit(0) != 0 or lib.cuDeviceGetCount(ctypes.byref(count)) != 0:
            return None, 0  # a driver without a usable GPU (CUDA_VISIBLE_DEVICES="", no device...)
        return lib, count.value
    except (AttributeError, OSError, ValueError):  # not the driver library we know
        return None


def driver_devices() -> list[tuple[str, tuple[int, int]]] | None:
    """(name, compute capability) of every GPU the NVIDIA driver shows this process
    (``CUDA_VISIBLE_DEVICES`` applies), asked of the driver library itself (``nvcuda.dll`` /
    ``libcuda.so.1``) so that no CUDA binding, torch or TensorRT is needed; None when no driver
    library can be loaded or it does not answer."""
    found = driver_library()
    if found is None:
        return None
    lib, count = found
    try:
        devices = []
        for ordinal in range(count):
            handle, major, minor = ctypes.c_int(0), ctypes.c_int(0), ctypes.c_int(0)
            text = ctypes.create_string_buffer(256)
            if (lib.cuDeviceGet(ctypes.byref(handle), ordinal) != 0
                    or lib.cuDeviceGetName(text, 256, handle) != 0
                    or lib.cuDeviceGetAttribute(ctypes.byref(major), 75, handle) != 0    # CC major
                    or lib.cuDeviceGetAttribute(ctypes.byref(minor), 76, handle) != 0):  # CC minor
                return None
            devices.append((text.value.decode(errors="replace").strip(), (major.value, minor.value)))
        return devices
    except (AttributeError, OSError, ValueError):  # not the driver library we know
        return None


def driver_pci_bus_id(index: int) -> str | None:
    """PCI bus id (``"0000:3b:00.0"``) of CUDA device ``index`` as this process numbers it, or None
    when the driver cannot say. Tools outside the process (NVML, nvidia-smi) number GPUs in PCI
    order and ignore ``CUDA_VISIBLE_DEVICES``, so "cuda:0" there can be another card; the bus id
    names the same card in both."""
    found = driver_library()
    if found is None or not 0 <= index < found[1]:
        return None
    lib = found[0]
    try:
        handle = ctypes.c_int(0)
        text = ctypes.create_string_buffer(64)
        if lib.cuDeviceGet(ctypes.byref(handle), index) != 0 or lib.cuDeviceGetPCIBusId(text, 64, handle) != 0:
            return None
        return text.value.decode(errors="replace").strip() or None
    except (AttributeError, OSError, ValueError):
        return None


@dataclass(frozen=True)
class DeviceInfo:
    index: int
    name: str
    compute_capability: tuple[int, int]
    total_memory: int

    @property
    def cc_string(self) -> str:
        return f"{self.compute_capability[0]}.{self.compute_capability[1]}"


class HostBuffer:
    """Page-locked host memory seen as a numpy array (``array``). The array must not be used after
    :meth:`free`: it points at released memory."""

    def __init__(self, array: np.ndarray, ptr: int, release):
        self.array = array
        self.ptr = ptr
        self.nbytes = array.nbytes
        self._release = release

    def free(self) -> None:
        release, self._release = self._release, None
        self.array = None
        if release is not None:
            release()


class DeviceBuffer:
    def __init__(self, ptr: int, nbytes: int, release):
        self.ptr = ptr
        self.nbytes = nbytes
        self._release = release

    def free(self) -> None:
        release, self._release = self._release, None
        if release is not None:
            release()
            self.ptr = 0


class _Synchronizable:
    """What streams and events share: a raw handle, a synchronize call and an idempotent free."""

    def __init__(self, raw, synchronize, release):
        self.raw = raw
        self._synchronize = synchronize
        self._release = release

    def synchronize(self) -> None:
        self._synchronize()

    def free(self) -> None:
        release, self._release = self._release, None
        if release is not None:
            release()


class Stream(_Synchronizable):
    """A CUDA stream; ``handle`` is the integer TensorRT's ``execute_async_v3`` expects."""

    def __init__(self, raw, handle: int, synchronize, release):
        super().__init__(raw, synchronize, release)
        self.handle = handle


class Event(_Synchronizable):
    def __init__(self, raw, record, synchronize, release):
        super().__init__(raw, synchronize, release)
        self._record = record

    def record(self, stream: Stream) -> None:
        self._record(stream)


def _contiguous(array: np.ndarray, what: str) -> np.ndarray:
    if not array.flags.c_contiguous:
        raise ValueError(f"{what}: the host array must be C-contiguous")
    return array


class CudaApi:
    """The operations the GPU backends need, on one device. Subclasses bind a CUDA binding."""

    binding: str = "none"

    def __init__(self, device_index: int):
        self.device_index = device_index

    @contextmanager
    def current(self):
        """This device is current in the calling thread inside the block. Here: ``activate()``,
        for bindings whose current device is a per-thread setting with nothing to undo."""
        self.activate()
        yield self

    # The methods below are implemented by each binding.
    def activate(self) -> None:
        raise NotImplementedError

    def device_count(self) -> int:
        raise NotImplementedError

    def device_info(self) -> DeviceInfo:
        raise NotImplementedError

    def alloc_host(self, shape, dtype) -> HostBuffer:
        raise NotImplementedError

    def alloc_device(self, nbytes: int) -> DeviceBuffer:
        raise NotImplementedError

    def create_stream(self) -> Stream:
        raise NotImplementedError

    def create_event(self) -> Event:
        raise NotImplementedError

    def copy_to_device_async(self, dst: DeviceBuffer, src: np.ndarray, stream: Stream) -> None:
        raise NotImplementedError

    def copy_to_host_async(self, dst: np.ndarray, src: DeviceBuffer, stream: Stream) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


# -- cuda-python --------------------------------------------------------------------------------

def check_cuda_result(runtime, result, what: str):
    """Unwrap a cuda-python return tuple ``(err,)`` / ``(err, value)`` / ``(err, v1, v2, ...)``:
    raise CudaError unless ``err`` is cudaSuccess, else return None / value / the values."""
    if not isinstance(result, tuple) or not result:
        raise CudaError(f"{what}: unexpected cuda-python result {result!r}")
    err, values = result[0], result[1:]
    if int(err) != 0:
        raise CudaError(f"{what} failed: {describe_cuda_error(runtime, err)}")
    if not values:
        return None
    return values[0] if len(values) == 1 else values


def describe_cuda_error(runtime, err) -> str:
    name = getattr(err, "name", None) or f"error {int(err)}"
    text = ""
    try:
        status, raw = runtime.cudaGetErrorString(err)
        if int(status) == 0:
            text = raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)
    except Exception:  # the description is a courtesy; the error name is enough
        pass
    message = f"{name} ({text})" if text else name
    if "InsufficientDriver" in name:
        message += (". This cuda-python release needs a newer NVIDIA driver; with an older driver "
                    "(or a Maxwell/Pascal/Volta GPU) install the cuda-python 12.x release that "
                    "matches your CUDA version")
    elif "NoDevice" in name:
        message += ". No CUDA GPU is visible (check the driver and CUDA_VISIBLE_DEVICES)"
    return message


def _import_cuda_python_runtime():
    try:
        from cuda.bindings import runtime  # cuda-python >= 12.6
        return runtime
    except ImportError:
        pass
    from cuda import cudart  # older cuda-python; raises ImportError when absent
    return cudart


class CudaPythonApi(CudaApi):
    binding = "cuda-python"

    def __init__(self, device_index: int, runtime=None):
        super().__init__(device_index)
        self.rt = runtime if runtime is not None else _import_cuda_python_runtime()

    def _call(self, what: str, result):
        return check_cuda_result(self.rt, result, what)

    def activate(self) -> None:
        self._call(f"cudaSetDevice({self.device_index})", self.rt.cudaSetDevice(self.device_index))

    def device_count(self) -> int:
        return int(self._call("cudaGetDeviceCount", self.rt.cudaGetDeviceCount()))

    def device_info(self) -> DeviceInfo:
        count = self.device_count()
        if self.device_index >= count:
            raise CudaError(f"CUDA device {self.device_index} does not exist "
                            f"({count} device(s) visible)")
        prop = self._call(f"cudaGetDeviceProperties({self.device_index})",
                          self.rt.cudaGetDeviceProperties(self.device_index))
        name = prop.name
        if isinstance(name, (bytes, bytearray)):
            name = bytes(name).split(b"\0", 1)[0].decode(errors="replace")
        return DeviceInfo(self.device_index, str(name).strip(), (int(prop.major), int(prop.minor)),
                          int(prop.totalGlobalMem))

    def alloc_host(self, shape, dtype) -> HostBuffer:
        dtype = np.dtype(dtype)
        shape = tuple(int(s) for s in shape)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        ptr = int(self._call(f"cudaMallocHost({nbytes})", self.rt.cudaMallocHost(max(nbytes, 1))))
        raw = (ctypes.c_uint8 * max(nbytes, 1)).from_address(ptr)
        array = np.frombuffer(raw, dtype=np.uint8, count=nbytes).view(dtype).reshape(shape)
        return HostBuffer(array, ptr, lambda: self._call("cudaFreeHost", self.rt.cudaFreeHost(ptr)))

    def alloc_device(self, nbytes: int) -> DeviceBuffer:
        nbytes = int(nbytes)
        ptr = int(self._call(f"cudaMalloc({nbytes})", self.rt.cudaMalloc(max(nbytes, 1))))
        return DeviceBuffer(ptr, nbytes, lambda: self._call("cudaFree", self.rt.cudaFree(ptr)))

    def create_stream(self) -> Stream:
        # Non-blocking: the slots' streams must not serialise against the legacy default stream.
        raw = self._call("cudaStreamCreateWithFlags",
                         self.rt.cudaStreamCreateWithFlags(self.rt.cudaStreamNonBlocking))
        return Stream(raw, int(raw),
                      lambda: self._call("cudaStreamSynchronize", self.rt.cudaStreamSynchronize(raw)),
                      lambda: self._call("cudaStreamDestroy", self.rt.cudaStreamDestroy(raw)))

    def create_event(self) -> Event:
        raw = self._call("cudaEventCreateWithFlags",
                         self.rt.cudaEventCreateWithFlags(self.rt.cudaEventDisableTiming))
        return Event(raw,
                     lambda stream: self._call("cudaEventRecord", self.rt.cudaEventRecord(raw, stream.raw)),
                     lambda: self._call("cudaEventSynchronize", self.rt.cudaEventSynchronize(raw)),
                     lambda: self._call("cudaEventDestroy", self.rt.cudaEventDestroy(raw)))

    def copy_to_device_async(self, dst: DeviceBuffer, src: np.ndarray, stream: Stream) -> None:
        src = _contiguous(src, "copy_to_device_async")
        if src.nbytes > dst.nbytes:
            raise ValueError(f"copy of {src.nbytes} bytes into a {dst.nbytes}-byte device buffer")
        self._call("cudaMemcpyAsync (host to device)", self.rt.cudaMemcpyAsync(
            dst.ptr, src.ctypes.data, src.nbytes, self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice,
            stream.raw))

    def copy_to_host_async(self, dst: np.ndarray, src: DeviceBuffer, stream: Stream) -> None:
        dst = _contiguous(dst, "copy_to_host_async")
        if dst.nbytes > src.nbytes:
            raise ValueError(f"copy of {dst.nbytes} bytes out of a {src.nbytes}-byte device buffer")
        self._call("cudaMemcpyAsync (device to host)", self.rt.cudaMemcpyAsync(
            dst.ctypes.data, src.ptr, dst.nbytes, self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost,
            stream.raw))


# -- pycuda -------------------------------------------------------------------------------------

class PyCudaApi(CudaApi):
    """pycuda works with driver-API contexts. TensorRT uses the runtime API, which works in the
    device's *primary* context, so this retains that primary context and pushes it in
    :meth:`current`, popping it at the block's end: every push is undone by the thread that made it,
    so a pipeline thread ends with an empty context stack (pycuda aborts the process otherwise).
    Blocks nest: inside another GPU's block this one's context is pushed on top and popped again.
    """

    binding = "pycuda"
    _thread_apis = threading.local()  # .stack: the PyCudaApi objects whose context this thread pushed

    def __init__(self, device_index: int):
        super().__init__(device_index)
        import pycuda.driver as drv  # raises ImportError when absent
        self.drv = drv
        try:
            drv.init()
            count = drv.Device.count()
            if device_index >= count:
                raise CudaError(f"CUDA device {device_index} does not exist ({count} device(s) visible)")
            self.device = drv.Device(device_index)
            self.context = self.device.retain_primary_context()
        except drv.Error as e:
            raise CudaError(f"pycuda could not open CUDA device {device_index}: {e}") from e

    def _wrap(self, what: str, fn, *args):
        try:
            return fn(*args)
        except self.drv.Error as e:
            raise CudaError(f"{what} failed: {e}") from e

    def activate(self) -> None:
        raise RuntimeError("with pycuda, a pushed context must be popped by the same thread: use "
                           "`with api.current():` instead of activate()")

    @contextmanager
    def current(self):
        stack = getattr(self._thread_apis, "stack", None)
        if stack is None:
            stack = self._thread_apis.stack = []
        if stack and stack[-1] is self:  # already on top in this thread (a nested block)
            yield self
            return
        self._wrap("pushing the primary context", self.context.push)
        stack.append(self)
        try:
            yield self
        finally:
            stack.pop()
            self._wrap("popping the primary context", self.drv.Context.pop)

    def device_count(self) -> int:
        return int(self._wrap("cuDeviceGetCount", self.drv.Device.count))

    def device_info(self) -> DeviceInfo:
        major, minor = self.device.compute_capability()
        return DeviceInfo(self.device_index, self.device.name(), (int(major), int(minor)),
                          int(self.device.total_memory()))

    def alloc_host(self, shape, dtype) -> HostBuffer:
        array = self._wrap("pagelocked_empty", self.drv.pagelocked_empty,
                           tuple(int(s) for s in shape), np.dtype(dtype))
        allocation = array.base
        return HostBuffer(array, int(array.ctypes.data), allocation.free)

    def alloc_device(self, nbytes: int) -> DeviceBuffer:
        allocation = self._wrap(f"mem_alloc({nbytes})", self.drv.mem_alloc, max(int(nbytes), 1))
        return DeviceBuffer(int(allocation), int(nbytes), allocation.free)

    def create_stream(self) -> Stream:
        stream = self._wrap("Stream()", self.drv.Stream)
        return Stream(stream, int(stream.handle), stream.synchronize, lambda: None)

    def create_event(self) -> Event:
        event = self._wrap("Event()", self.drv.Event, self.drv.event_flags.DISABLE_TIMING)
        return Event(event, lambda stream: event.record(stream.raw), event.synchronize, lambda: None)

    def copy_to_device_async(self, dst: DeviceBuffer, src: np.ndarray, stream: Stream) -> None:
        src = _contiguous(src, "copy_to_device_async")
        if src.nbytes > dst.nbytes:
            raise ValueError(f"copy of {src.nbytes} bytes into a {dst.nbytes}-byte device buffer")
        self._wrap("memcpy_htod_async", self.drv.memcpy_htod_async, dst.ptr, src, stream.raw)

    def copy_to_host_async(self, dst: np.ndarray, src: DeviceBuffer, stream: Stream) -> None:
        dst = _contiguous(dst, "copy_to_host_async")
        if dst.nbytes > src.nbytes:
            raise ValueError(f"copy of {dst.nbytes} bytes out of a {src.nbytes}-byte device buffer")
        self._wrap("memcpy_dtoh_async", self.drv.memcpy_dtoh_async, dst, src.ptr, stream.raw)

    def close(self) -> None:
        # Give back the primary context retained in __init__ (pycuda releases it only from the
        # thread that retained it; from another thread this does nothing, and the driver releases
        # it at exit).
        context, self.context = self.context, None
        if context is not None:
            try:
                context.detach()
            except self.drv.Error:
                pass


def open_cuda(device: str | int = "cuda:0", prefer: str | None = None) -> CudaApi:
    """A :class:`CudaApi` on ``device`` with the first binding that imports (``prefer``:
    "cuda-python" or "pycuda" to force one). Raises CudaUnavailable when none imports."""
    index = parse_cuda_device(device)
    if prefer not in (None, "cuda-python", "pycuda"):
        raise ValueError(f"unknown CUDA binding {prefer!r} (use 'cuda-python' or 'pycuda')")
    order = [prefer] if prefer else ["cuda-python", "pycuda"]
    failures = []
    for binding in order:
        try:
            return CudaPythonApi(index) if binding == "cuda-python" else PyCudaApi(index)
        except ImportError as e:
            failures.append(f"{binding}: {e}")
    raise CudaUnavailable("no CUDA Python binding could be imported (" + "; ".join(failures)
                          + f"). {INSTALL_HINT}")
