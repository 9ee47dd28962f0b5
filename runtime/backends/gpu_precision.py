"""Which precision a GPU runs in: the one rule the TensorRT and PyTorch backends follow.

FP16 where the GPU has fast FP16, FP32 elsewhere; a request for FP16 on a GPU without it (Maxwell,
e.g. the Quadro M6000) runs FP32 and says so, never fails and never reports FP16 it did not run.
Pure functions of the request and the compute capability, so they are tested without a GPU.
"""
from __future__ import annotations

from dataclasses import dataclass

PRECISION_CHOICES = ("auto", "fp32", "fp16")


def fast_fp16_from_compute_capability(major: int, minor: int) -> bool:
    """Whether the GPU runs FP16 at least at the FP32 rate (what TensorRT calls "fast FP16").

    Maxwell desktop parts (5.0, 5.2, e.g. the Quadro M6000) have no FP16 arithmetic; 5.3 (Jetson
    TX1/Nano) has it at twice the FP32 rate. Pascal 6.0 (P100) and 6.2 (Jetson TX2) have it, 6.1
    (GTX 10xx, P4/P40) runs FP16 at 1/64 rate. Volta 7.0 and everything newer have it.
    """
    if major >= 7:
        return True
    if major == 6:
        return minor != 1
    return (major, minor) == (5, 3)


@dataclass(frozen=True)
class PrecisionChoice:
    precision: str          # what the GPU computes in: "fp32" / "fp16"
    message: str | None     # for Backend.messages
    warning: bool = False   # the user asked for something they do not get


def validate_precision_request(requested: str, backend: str) -> str:
    """``requested`` lower-cased, or a ValueError naming the choices (INT8 with its reason)."""
    value = str(requested).lower()
    if value == "int8":
        raise ValueError(f"INT8 is not supported by the effiseg {backend} backend (it needs a "
                         "calibration set); use precision 'fp16', 'fp32' or 'auto'")
    if value not in PRECISION_CHOICES:
        raise ValueError(f"unknown precision {requested!r}; choose one of {', '.join(PRECISION_CHOICES)}")
    return value


def choose_gpu_precision(requested: str, fast_fp16: bool, device_label: str, fallback: str) -> PrecisionChoice:
    """``auto`` -> fp16 when the GPU has fast FP16, else fp32; ``fp16`` on a GPU without fast FP16
    falls back to fp32 with a warning that ends with ``fallback`` (what the backend does instead)."""
    requested = validate_precision_request(requested, "GPU")
    if requested == "fp32":
        return PrecisionChoice("fp32", None)
    if fast_fp16:
        return PrecisionChoice("fp16", "precision auto: fp16 (the GPU has fast FP16)" if requested == "auto" else None)
    if requested == "fp16":
        return PrecisionChoice("fp32", f"FP16 requested, but {device_label} has no fast FP16; {fallback}", warning=True)
    return PrecisionChoice("fp32", f"precision auto: fp32, because {device_label} has no fast FP16")
