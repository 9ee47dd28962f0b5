"""Which precision a GPU should run in: the one rule every backend follows.

The project's rule: FP16 where the GPU has fast FP16, FP32 elsewhere; a request for FP16 on a GPU
without it (Maxwell, e.g. the Quadro M6000) runs FP32 and says so, never fails and never reports
FP16 it did not run. Pure functions of the compute capability, so they are tested without a GPU.
"""
from __future__ import annotations

from dataclasses import dataclass

TORCH_PRECISIONS = ("auto", "fp32", "fp16")


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
class TorchMode:
    precision: str          # what the network computes in: "fp16" or "fp32"
    fast: bool              # the fast mode's other parts: channels_last, cuDNN autotuning, CUDA graphs
    message: str | None     # for Backend.messages
    warning: bool = False   # the user asked for something they do not get


def choose_torch_mode(requested: str, on_cuda: bool, capability: tuple[int, int] | None = None,
                      device_label: str = "this GPU") -> TorchMode:
    """The torch backend's mode. ``fp32``: eager float32, the benchmark's baseline. ``auto`` and
    ``fp16`` on CUDA: the fast mode, in FP16 where the GPU has fast FP16 and in FP32 otherwise
    (channels_last and CUDA graphs still pay off there). On the CPU: eager float32."""
    if requested not in TORCH_PRECISIONS:
        raise ValueError(f"precision must be {', '.join(TORCH_PRECISIONS)}, not {requested!r}")
    if requested == "fp32":
        return TorchMode("fp32", False, None)
    if not on_cuda:
        if requested == "fp16":
            return TorchMode("fp32", False, "fp16 fast mode needs a CUDA GPU; running fp32 eager on the CPU",
                             warning=True)
        return TorchMode("fp32", False, None)
    if capability is None:
        raise ValueError("a CUDA device needs its compute capability to choose the precision")
    if fast_fp16_from_compute_capability(*capability):
        return TorchMode("fp16", True, None)
    gpu = f"{device_label} (compute capability {capability[0]}.{capability[1]})"
    if requested == "fp16":
        return TorchMode("fp32", True, f"FP16 requested, but {gpu} has no fast FP16: running FP32 with "
                         "channels_last and CUDA graphs instead", warning=True)
    return TorchMode("fp32", True, f"precision auto: fp32 with channels_last and CUDA graphs, because {gpu} "
                     "has no fast FP16")
