"""Peak host memory (resident set size) and peak device memory per benchmark configuration.

Host: the process's RSS is sampled by a background thread while a configuration runs, because
the kernel's own high-water mark (``getrusage`` ru_maxrss, /proc VmHWM) covers the whole process
life and cannot be reset portably. RSS is read from psutil when installed, else /proc/self/statm
(Linux), else GetProcessMemoryInfo (Windows, through ctypes), else ru_maxrss (macOS/BSD: only a
lifetime peak, marked as such). The peak is the *process's* RSS, which includes every backend the
interleaved run keeps loaded; ``host_rss_added_mb`` (RSS after building and warming up the
configuration minus RSS before) is the figure that belongs to the configuration alone.

Device: for the torch backends, torch.cuda.max_memory_allocated (the caching allocator's view,
reset before each configuration's turn, so it still includes the other torch backends' resident
memory) plus what CUDA-graph pools hold beyond it (:func:`torch_cuda_graph_pools_unallocated_mb`);
``device_added_mb`` is this configuration's own: what it left held when it was opened (weights,
static buffers, CUDA-graph pools) plus its rounds' peak above what was allocated before them. Other
backends: the GPU's used memory from NVML (pynvml, when installed) or nvidia-smi, sampled like
RSS — a device-wide figure that includes other processes; else None.
The card is found by its PCI bus id, so ``CUDA_VISIBLE_DEVICES`` or mixed GPUs do not make the
probe read another card than the one measured.
"""
from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import threading

from .machine import find_nvidia_smi

MB = 1024.0 * 1024.0


def _rss_psutil():
    try:
        import psutil
    except ImportError:
        return None
    process = psutil.Process()
    return lambda: process.memory_info().rss


def _rss_proc_statm():
    path = "/proc/self/statm"
    if not os.path.exists(path):
        return None
    page = os.sysconf("SC_PAGE_SIZE")

    def read() -> int:
        with open(path, "rb") as f:
            return int(f.read().split()[1]) * page
    return read


def _rss_windows():
    if sys.platform != "win32":
        return None

    class PROCESS_MEMORY_COUNTERS(ctypes.Structure):
        _fields_ = [("cb", ctypes.c_ulong), ("PageFaultCount", ctypes.c_ulong),
                    ("PeakWorkingSetSize", ctypes.c_size_t), ("WorkingSetSize", ctypes.c_size_t),
                    ("QuotaPeakPagedPoolUsage", ctypes.c_size_t), ("QuotaPagedPoolUsage", ctypes.c_size_t),
                    ("QuotaPeakNonPagedPoolUsage", ctypes.c_size_t),
                    ("QuotaNonPagedPoolUsage", ctypes.c_size_t), ("PagefileUsage", ctypes.c_size_t),
                    ("PeakPagefileUsage", ctypes.c_size_t)]
    try:
        kernel32 = ctypes.WinDLL("kernel32")
        get_info = kernel32.K32GetProcessMemoryInfo
        handle = kernel32.GetCurrentProcess()
    except (AttributeError, OSError):
        return None
    counters = PROCESS_MEMORY_COUNTERS()
    counters.cb = ctypes.sizeof(PROCESS_MEMORY_COUNTERS)

    def read() -> int:
        if not get_info(handle, ctypes.byref(counters), counters.cb):
            raise OSError("K32GetProcessMemoryInfo failed")
        return int(counters.WorkingSetSize)
    return read


def _rss_getrusage():
    try:
        import resource
    except ImportError:
        return None
    # ru_maxrss is in bytes on macOS, kilobytes on Linux/BSD.
    scale = 1 if sys.platform == "darwin" else 1024
    return lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def rss_reader():
    """(read_rss_bytes, source name); read_rss_bytes is None where no method works."""
    for name, factory in (("psutil", _rss_psutil), ("/proc/self/statm", _rss_proc_statm),
                          ("GetProcessMemoryInfo", _rss_windows),
                          ("getrusage ru_maxrss (lifetime peak)", _rss_getrusage)):
        reader = factory()
        if reader is not None:
            try:
                reader()
            except Exception:
                continue
            return reader, name
    return None, "unavailable"


def current_rss_mb() -> float | None:
    reader, _ = rss_reader()
    return reader() / MB if reader else None


class GpuMemoryProbe:
    """Used memory of one GPU in bytes, from NVML or nvidia-smi; ``read()`` returns None when
    neither works. Device-wide: other processes' memory is included.

    ``index`` is the CUDA device index of this process ("cuda:1" -> 1). NVML and nvidia-smi number
    GPUs their own way (PCI order, blind to ``CUDA_VISIBLE_DEVICES``), so the probe names the card
    by its PCI bus id, asked of the CUDA driver; without one it falls back to the same index and
    says so in ``card``."""

    def __init__(self, index: int = 0):
        from effiseg.runtime.cuda_memory import driver_pci_bus_id

        self.index = index
        self.source = "unavailable"
        self._read = None
        bus_id = driver_pci_bus_id(index)
        self.card = f"PCI {bus_id}" if bus_id else f"NVML index {index} (assumed to be cuda:{index})"
        try:
            import pynvml
            pynvml.nvmlInit()
            handle = (pynvml.nvmlDeviceGetHandleByPciBusId(bus_id.encode()) if bus_id
                      else pynvml.nvmlDeviceGetHandleByIndex(index))
            self._read = lambda: int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)
            self.source = "nvml"
            return
        except Exception:
            pass
        exe = find_nvidia_smi()
        if exe:
            card_id = bus_id or str(index)  # --id takes an index or a PCI bus id

            def read_smi() -> int:
                out = subprocess.run([exe, f"--id={card_id}", "--query-gpu=memory.used",
                                      "--format=csv,noheader,nounits"], capture_output=True, text=True,
                                     timeout=10)
                return int(float(out.stdout.strip().splitlines()[0])) * 1024 * 1024
            try:
                read_smi()
                self._read = read_smi
                self.source = "nvidia-smi"
            except Exception:
                pass

    @property
    def slow(self) -> bool:
        return self.source == "nvidia-smi"  # a process start per reading

    def read(self) -> int | None:
        if self._read is None:
            return None
        try:
            return self._read()
        except Exception:
            return None


class PeakSampler:
    """Samples host RSS (and optionally a GPU's used memory) in a daemon thread between
    ``start()`` and ``stop()``; ``peak_rss_mb`` / ``peak_gpu_mb`` are the maxima seen (the first
    and last samples are taken synchronously, so a short window is never empty)."""

    def __init__(self, interval_s: float = 0.005, gpu_probe: GpuMemoryProbe | None = None):
        self.interval_s = interval_s
        self.read_rss, self.rss_source = rss_reader()
        self.gpu_probe = gpu_probe if gpu_probe is not None and gpu_probe.read() is not None else None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.peak_rss = 0
        self.peak_gpu = 0

    def _sample(self, with_gpu: bool) -> None:
        if self.read_rss is not None:
            try:
                self.peak_rss = max(self.peak_rss, self.read_rss())
            except Exception:
                pass
        if with_gpu and self.gpu_probe is not None:
            used = self.gpu_probe.read()
            if used is not None:
                self.peak_gpu = max(self.peak_gpu, used)

    def _loop(self) -> None:
        # nvidia-smi starts a process per reading: sample the GPU ten times less often.
        gpu_every = 20 if self.gpu_probe is not None and self.gpu_probe.slow else 1
        tick = 0
        while not self._stop.wait(self.interval_s):
            self._sample(with_gpu=tick % gpu_every == 0)
            tick += 1

    def start(self) -> "PeakSampler":
        self._stop.clear()
        self._sample(with_gpu=True)
        self._thread = threading.Thread(target=self._loop, name="effiseg-bench-memory", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._sample(with_gpu=True)

    def __enter__(self) -> "PeakSampler":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def peak_rss_mb(self) -> float | None:
        return self.peak_rss / MB if self.read_rss is not None and self.peak_rss else None

    @property
    def peak_gpu_mb(self) -> float | None:
        return self.peak_gpu / MB if self.gpu_probe is not None and self.peak_gpu else None


def _torch_cuda(device: str):
    """torch, where ``device`` is a CUDA device and torch is already in use with CUDA; else None
    (torch is never imported here)."""
    if not str(device).startswith("cuda"):
        return None
    torch = sys.modules.get("torch")
    return torch if torch is not None and torch.cuda.is_available() else None


def torch_cuda_peak_reset(device: str) -> bool:
    """Reset torch's per-device peak counter; False where torch/CUDA is not in use."""
    torch = _torch_cuda(device)
    if torch is None:
        return False
    torch.cuda.reset_peak_memory_stats(device)
    return True


def torch_cuda_peak_mb(device: str) -> float | None:
    torch = _torch_cuda(device)
    return torch.cuda.max_memory_allocated(device) / MB if torch is not None else None


def torch_cuda_allocated_mb(device: str) -> float | None:
    """Memory torch's caching allocator holds for live tensors on ``device`` now; None off CUDA."""
    torch = _torch_cuda(device)
    return torch.cuda.memory_allocated(device) / MB if torch is not None else None


def torch_cuda_graph_pools_unallocated_mb(device: str) -> float | None:
    """Device memory that CUDA-graph private pools on ``device`` hold beyond live tensors; None off CUDA.

    Why: while a graph is captured its intermediate tensors count as allocated; once capture ends
    they go back to the graph's private pool, which stays reserved for the graph's whole life (each
    replay writes there) but no longer counts in ``memory_allocated``. Without this, a CUDA-graph
    configuration looked nearly free: 63 MB at batch 32 on the H200, its static tensors only.
    Counted from ``torch.cuda.memory_snapshot()``: segments of any pool but the default one (0, 0),
    minus their allocated part, which ``memory_allocated`` already includes (a graph's static
    outputs live in its pool)."""
    torch = _torch_cuda(device)
    if torch is None:
        return None
    index = str(device).partition(":")[2]
    index = int(index) if index else torch.cuda.current_device()  # "cuda" is the current device
    held = 0
    for segment in torch.cuda.memory_snapshot():
        pool = tuple(segment.get("segment_pool_id") or (0, 0))
        if segment.get("device", index) == index and pool != (0, 0):
            held += segment.get("total_size", 0) - segment.get("allocated_size", 0)
    return held / MB


def torch_cuda_held_mb(device: str) -> float | None:
    """What torch's tensors and CUDA-graph pools hold on ``device`` now (not the allocator's cache
    of freed blocks, which any configuration reuses); None off CUDA."""
    allocated = torch_cuda_allocated_mb(device)
    pools = torch_cuda_graph_pools_unallocated_mb(device)
    return None if allocated is None or pools is None else allocated + pools


def baseline_memory_note(results: list[dict], baseline_label: str) -> str | None:
    """The bench's note on whose memory the host RSS peaks are, or None where the baseline added none.

    Every configuration runs in one process, interleaved, with every backend kept loaded, so a
    configuration's ``host_rss_peak_mb`` is the process's, and includes what the PyTorch eager
    baseline holds (on the CPU, gigabytes for a multi-pass model at batch 8: 7.9 GB measured for the
    old 8-pass default). The note says how much of the peaks is the baseline's own, so that no one
    reads a peak as the configuration's; its own is ``host_rss_added_mb`` (+RSS MB)."""
    own = [r for r in results if r.get("label") == baseline_label
           and (r.get("memory") or {}).get("host_rss_added_mb") is not None]
    if not own:
        return None
    largest = max(own, key=lambda r: r["memory"]["host_rss_added_mb"])
    added = largest["memory"]["host_rss_added_mb"]
    if added <= 0:
        return None
    others = sorted({r.get("label") for r in results if r.get("label") != baseline_label
                     and (r.get("memory") or {}).get("host_rss_peak_mb") is not None})
    return (f"host RSS peaks (host_rss_peak_mb) are the whole process's: up to {added:.0f} MB of them is the "
            f"baseline {baseline_label}'s own memory (its +RSS, {largest.get('mode')} at batch "
            f"{largest.get('batch_size')}), held while " + (", ".join(others) if others else "the others")
            + " ran; each configuration's own memory is its +RSS MB (host_rss_added_mb)")
