"""What a benchmark ran on: CPU, load, GPU, driver, CUDA and library versions.

Everything is best-effort and never imports a GPU library that is not installed: a missing piece
is reported as None, so the same JSON schema comes out of a laptop and a GPU server.
"""
from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

LIBRARIES = ("effiseg", "numpy", "torch", "onnxruntime", "onnxruntime-gpu", "onnx", "tensorrt",
             "timm", "pillow", "cuda-python", "pycuda")


def cpu_model() -> str:
    """The CPU's marketing name (what ``lscpu`` calls 'Model name')."""
    if sys.platform.startswith("linux"):
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
                for line in f:
                    if line.lower().startswith("model name"):
                        return line.split(":", 1)[1].strip()
        except OSError:
            pass
    elif sys.platform == "darwin":
        try:
            out = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True,
                                 text=True, timeout=5)
            if out.returncode == 0 and out.stdout.strip():
                return out.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    elif sys.platform == "win32":
        # platform.processor() there is "Intel64 Family 6 Model 79 ..."; the name is in the registry.
        try:
            import winreg
            key = winreg.OpenKey(winreg.HKEY_LOCAL_MACHINE, r"HARDWARE\DESCRIPTION\System\CentralProcessor\0")
            with key:
                name, _ = winreg.QueryValueEx(key, "ProcessorNameString")
            if str(name).strip():
                return str(name).strip()
        except (ImportError, OSError):
            pass
    return platform.processor() or platform.machine() or "unknown"


def find_nvidia_smi() -> str | None:
    """nvidia-smi on PATH, else where Windows drivers install it (older ones: Program Files\\NVSMI,
    which is not on PATH; newer ones: System32)."""
    exe = shutil.which("nvidia-smi")
    if exe or sys.platform != "win32":
        return exe
    for root, *parts in ((os.environ.get("ProgramW6432") or os.environ.get("ProgramFiles"),
                          "NVIDIA Corporation", "NVSMI"), (os.environ.get("SystemRoot"), "System32")):
        if root:
            candidate = Path(root, *parts, "nvidia-smi.exe")
            if candidate.is_file():
                return str(candidate)
    return None


def cpu_counts() -> dict:
    """Logical CPUs, the ones this process may use (affinity / cgroup-free view) and physical cores."""
    logical = os.cpu_count()
    try:
        usable = len(os.sched_getaffinity(0))  # POSIX only
    except (AttributeError, OSError):
        usable = logical
    physical = None
    try:
        import psutil  # optional
        physical = psutil.cpu_count(logical=False)
    except Exception:
        if sys.platform.startswith("linux"):
            try:
                cores = set()
                phys = core = None
                with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
                    for line in f:
                        key, _, value = line.partition(":")
                        key = key.strip().lower()
                        if key == "physical id":
                            phys = value.strip()
                        elif key == "core id":
                            core = value.strip()
                        elif not line.strip():
                            if core is not None:
                                cores.add((phys, core))
                            phys = core = None
                if core is not None:
                    cores.add((phys, core))
                physical = len(cores) or None
            except OSError:
                pass
    return {"logical": logical, "usable": usable, "physical": physical}


def load_average() -> list[float] | None:
    """1/5/15-minute load averages (POSIX); None on Windows, which has no such figure."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def library_versions() -> dict:
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _nvidia_smi() -> list[dict]:
    exe = find_nvidia_smi()
    if not exe:
        return []
    try:
        out = subprocess.run([exe, "--query-gpu=index,name,driver_version,memory.total,compute_cap",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return []
    if out.returncode != 0:
        # Older drivers do not know compute_cap; ask again without it.
        try:
            out = subprocess.run([exe, "--query-gpu=index,name,driver_version,memory.total",
                                  "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return []
        if out.returncode != 0:
            return []
    gpus = []
    for line in out.stdout.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < 4:
            continue
        gpu = {"index": int(parts[0]) if parts[0].isdigit() else parts[0], "name": parts[1],
               "driver": parts[2], "memory_total_mb": _to_float(parts[3]),
               "compute_capability": parts[4] if len(parts) > 4 else None}
        gpus.append(gpu)
    return gpus


def _to_float(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def gpu_info() -> dict:
    """GPUs as seen by nvidia-smi (driver) and by torch (CUDA runtime), whichever is there.

    torch is only asked when it is already imported or importable; its CUDA is initialised only
    where torch.cuda.is_available() says a device exists."""
    info: dict = {"gpus": _nvidia_smi(), "cuda_runtime": None, "cudnn": None, "torch_cuda_available": None}
    try:
        import torch
    except ImportError:
        return info
    info["torch_cuda_available"] = bool(torch.cuda.is_available())
    info["cuda_runtime"] = torch.version.cuda
    if info["torch_cuda_available"]:
        try:
            info["cudnn"] = torch.backends.cudnn.version()
        except Exception:
            pass
        torch_gpus = []
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            torch_gpus.append({"index": i, "name": props.name,
                               "compute_capability": f"{props.major}.{props.minor}",
                               "memory_total_mb": round(props.total_memory / 2**20, 1)})
        if not info["gpus"]:
            info["gpus"] = torch_gpus
        else:  # fill what nvidia-smi did not say
            for smi, tg in zip(info["gpus"], torch_gpus):
                smi["compute_capability"] = smi.get("compute_capability") or tg["compute_capability"]
    return info


def thread_settings() -> dict:
    """Thread counts that decide CPU timings."""
    settings = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "CUDA_VISIBLE_DEVICES")}
    try:
        import torch
        settings["torch_num_threads"] = torch.get_num_threads()
        settings["torch_num_interop_threads"] = torch.get_num_interop_threads()
    except ImportError:
        pass
    return settings


def machine_info() -> dict:
    import socket
    return {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "cpu_model": cpu_model(),
        "cpu_count": cpu_counts(),
        "load_average": load_average(),
        "gpu": gpu_info(),
        "threads": thread_settings(),
        "libraries": library_versions(),
    }
