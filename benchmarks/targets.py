"""The backends the benchmark knows, by name, and which of them can run on this machine.

A *target* is a backend as the benchmark names it (``ort-cpu``, ``torch-fast``, ...) on one
device. Torch targets run from a checkpoint; the others from an exported ONNX file, in either
input format (``uint8-nhwc``: preprocessing in the graph; ``float32-nchw``: the host normalises).
"""
from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass

BASELINE = "torch-eager"


@dataclass(frozen=True)
class TargetSpec:
    name: str
    source: str          # "checkpoint" or "onnx"
    devices: str         # "any" (the --devices list), "cpu" or "cuda"
    precision: str       # what is asked for; the backend reports what it used
    module: str          # the Python package it needs (checked without importing it)
    extra: str           # the effiseg extra that installs it
    description: str


TARGETS: dict[str, TargetSpec] = {t.name: t for t in (
    TargetSpec("torch-eager", "checkpoint", "any", "fp32", "torch", "train",
               "PyTorch FP32 eager (the baseline)"),
    TargetSpec("torch-fast", "checkpoint", "any", "fp16", "torch", "train",
               "PyTorch fast mode (the network rewritten for inference; on GPUs also fp16 + channels_last + "
               "CUDA graphs)"),
    TargetSpec("ort-cpu", "onnx", "cpu", "fp32", "onnxruntime", "ort",
               "ONNX Runtime, CPU execution provider"),
    TargetSpec("ort-cpu-int8", "onnx", "cpu", "int8", "onnxruntime", "ort",
               "ONNX Runtime, CPU execution provider, the int8 twin (effiseg-export MODEL --quantize int8)"),
    TargetSpec("ov-cpu", "onnx", "cpu", "fp32", "openvino", "openvino", "OpenVINO CPU, FP32"),
    TargetSpec("ov-cpu-bf16", "onnx", "cpu", "bf16", "openvino", "openvino",
               "OpenVINO CPU, BF16 (native bfloat16 CPUs; elsewhere fp32, said so)"),
    TargetSpec("ov-cpu-int8", "onnx", "cpu", "int8", "openvino", "openvino", "OpenVINO CPU, the int8 twin"),
    TargetSpec("ort-cuda", "onnx", "cuda", "fp32", "onnxruntime", "ort-gpu",
               "ONNX Runtime, CUDA execution provider"),
    TargetSpec("ort-trt", "onnx", "cuda", "fp16", "onnxruntime", "ort-gpu",
               "ONNX Runtime, TensorRT execution provider"),
    TargetSpec("trt-fp32", "onnx", "cuda", "fp32", "tensorrt", "trt", "TensorRT FP32"),
    TargetSpec("trt-fp16", "onnx", "cuda", "fp16", "tensorrt", "trt", "TensorRT FP16"),
)}


@dataclass(frozen=True)
class Target:
    spec: TargetSpec
    device: str

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def label(self) -> str:
        return f"{self.spec.name}@{self.device}"


def parse_names(text: str | None) -> list[str]:
    """Backend names in the order given, each once; ``all`` stands alone."""
    if not text:
        return []
    names = list(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))
    unknown = [n for n in names if n not in TARGETS and n != "all"]
    if unknown:
        raise ValueError(f"unknown backend(s) {', '.join(unknown)}; known: {', '.join(TARGETS)}, all")
    if "all" in names and len(names) > 1:
        raise ValueError(f"'all' already means every backend that can run here; give it alone, or name "
                         f"the backends ({', '.join(n for n in names if n != 'all')} and which others?)")
    return names


def missing_modules(names) -> list[str]:
    """Those of ``names`` that are not installed (checked without importing them)."""
    return [n for n in names if importlib.util.find_spec(n) is None]


def not_installed(missing: list[str]) -> str:
    """'torch is not installed' / 'torch and timm are not installed'."""
    return f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not installed"


def cuda_available() -> bool:
    """Whether torch sees a CUDA GPU (torch is imported only when installed)."""
    if missing_modules(["torch"]):
        return False
    import torch
    return bool(torch.cuda.is_available())


@functools.lru_cache(maxsize=None)
def cuda_gpu_count() -> int:
    """CUDA GPUs this process can use (``CUDA_VISIBLE_DEVICES`` applies): torch's count where torch
    sees one, else the NVIDIA driver's own (no CUDA binding needed), else 0. ONNX Runtime's provider
    list cannot answer this: onnxruntime-gpu lists its CUDA provider on machines without a GPU too."""
    if cuda_available():
        import torch
        return int(torch.cuda.device_count())
    from effiseg.runtime.cuda_memory import driver_devices
    return len(driver_devices() or [])


def ort_providers() -> list[str]:
    if missing_modules(["onnxruntime"]):
        return []
    import onnxruntime
    return list(onnxruntime.get_available_providers())


def default_devices() -> list[str]:
    return ["cuda:0"] if cuda_available() else ["cpu"]


def unavailable_reason(spec: TargetSpec, device: str) -> str | None:
    """Why ``spec`` cannot run on ``device`` here, or None when it can be tried."""
    if missing_modules([spec.module]):
        return f"{not_installed([spec.module])} (pip install \"effiseg[{spec.extra}]\")"
    is_cuda = device.startswith("cuda")
    if spec.devices == "cpu" and is_cuda or spec.devices == "cuda" and not is_cuda:
        return f"runs on {spec.devices} only"
    if is_cuda and spec.module == "torch" and not cuda_available():
        return "torch sees no CUDA GPU"
    if is_cuda:
        index = device.partition(":")[2]
        index = int(index) if index.isdigit() else 0
        count = cuda_gpu_count()
        if index >= count:
            return (f"no CUDA GPU {device} here (the NVIDIA driver shows {count})" if count
                    else "no CUDA GPU here (no NVIDIA driver, or it shows no GPU)")
    if spec.name == "ort-cuda" and "CUDAExecutionProvider" not in ort_providers():
        return "onnxruntime has no CUDAExecutionProvider (pip install \"effiseg[ort-gpu]\")"
    if spec.name == "ort-trt" and "TensorrtExecutionProvider" not in ort_providers():
        return "onnxruntime has no TensorrtExecutionProvider (onnxruntime-gpu built with TensorRT)"
    return None


def resolve_targets(names: list[str], devices: list[str], explicit: bool) -> tuple[list[Target], list[dict]]:
    """The targets to run and the skipped ones with their reason.

    ``names`` empty or ["all"]: every known backend, silently dropping those that are not
    installed or need another device (listed under skipped). Named explicitly, a backend that
    cannot run is skipped here too, with its reason; the command refuses to run then (the user
    asked for it), before measuring anything."""
    wanted = list(TARGETS) if not names or names == ["all"] else names
    chosen, skipped = [], []
    for name in wanted:
        spec = TARGETS[name]
        if spec.devices == "any":
            target_devices = devices
        else:
            matching = [d for d in devices if d.startswith(spec.devices)]
            target_devices = matching or ([
                "cpu"] if spec.devices == "cpu" else [next((d for d in devices if d.startswith("cuda")), "cuda:0")])
        for device in target_devices:
            reason = unavailable_reason(spec, device)
            if reason is None:
                chosen.append(Target(spec, device))
            else:
                skipped.append({"backend": name, "device": device, "reason": reason, "explicit": explicit})
    return chosen, skipped
