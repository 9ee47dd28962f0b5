"""Which install each GPU generation needs, per backend: the commands of ``runtime/INSTALL.md``.

One table, read by the backends' error messages and by ``effiseg-doctor``, so that what a user is
told to run is what the install matrix documents (a test holds the two together). The sources of
each row (NVIDIA's release notes and support matrices, PyTorch's and ONNX Runtime's build lists)
are cited in INSTALL.md, next to the steps around each command.
"""
from __future__ import annotations

GENERATIONS = ("Maxwell", "Pascal", "Volta", "Turing", "Ampere+")


def gpu_generation(compute_capability: tuple[int, int]) -> str:
    """The generation a compute capability belongs to, as INSTALL.md's rows name them (7.2, Xavier,
    counts as Volta; Ampere, Ada, Hopper, Blackwell and newer are one row: every backend supports them)."""
    major, minor = compute_capability
    if major < 6:
        return "Maxwell"
    if major == 6:
        return "Pascal"
    if major == 7 and minor < 5:
        return "Volta"
    if major == 7:
        return "Turing"
    return "Ampere+"


# TensorRT releases that stop at a generation (NVIDIA: 8.6 dropped SM 5.x and 10.0 needs SM 7.0, so
# 8.5.3 is Maxwell's last and 8.6.1 Pascal's; 10.5 removed Volta, so 10.4 is Volta's last).
LAST_TENSORRT = {"Maxwell": "8.5.3", "Pascal": "8.6.1", "Volta": "10.4"}

_TRT_FROM_ARCHIVE = {
    # TensorRT releases without pip wheels for this system: the wheel inside NVIDIA's archive, then the extra.
    ("Maxwell", True): ('pip install "<TensorRT-8.5.3.1>\\python\\tensorrt-8.5.3.1-cp{py}-none-win_amd64.whl" '
                        '"effiseg[trt85]"'),
    ("Maxwell", False): ('pip install "<TensorRT-8.5.3.1>/python/tensorrt-8.5.3.1-cp{py}-none-linux_x86_64.whl" '
                         '"effiseg[trt85]"'),
    ("Pascal", True): ('pip install "<TensorRT-8.6.1.6>\\python\\tensorrt-8.6.1-cp{py}-none-win_amd64.whl" '
                       '"effiseg[trt-pascal]"'),
}

_INSTALL = {
    ("tensorrt", "Pascal"): 'pip install "effiseg[trt-pascal]" --extra-index-url https://pypi.nvidia.com',
    ("tensorrt", "Volta"): 'pip install "effiseg[trt-volta]"',
    ("tensorrt", "Turing"): 'pip install "effiseg[trt]"',
    ("tensorrt", "Ampere+"): 'pip install "effiseg[trt]"',
    # A CPU-only onnxruntime shadows onnxruntime-gpu (both install the module onnxruntime): remove it first.
    ("onnxruntime", "gpu"): ('pip uninstall -y onnxruntime && pip install "effiseg[ort-gpu]" '
                             '"onnxruntime-gpu[cuda,cudnn]"'),
    ("onnxruntime", "cpu"): 'pip install "effiseg[ort]"',
    # PyTorch 2.8's CUDA 12.6 wheels are the last built for Maxwell, Pascal and Volta (pytorch#157517);
    # its CUDA 12.8 wheels start at Turing.
    ("torch", "Maxwell"): 'pip install "torch==2.8.*" --index-url https://download.pytorch.org/whl/cu126',
    ("torch", "Pascal"): 'pip install "torch==2.8.*" --index-url https://download.pytorch.org/whl/cu126',
    ("torch", "Volta"): 'pip install "torch==2.8.*" --index-url https://download.pytorch.org/whl/cu126',
    ("torch", "Turing"): 'pip install torch --index-url https://download.pytorch.org/whl/cu128',
    ("torch", "Ampere+"): 'pip install torch --index-url https://download.pytorch.org/whl/cu128',
}


def install_command(backend: str, generation: str | None, windows: bool, python_tag: str = "311") -> str:
    """The one command that installs ``backend`` for GPUs of ``generation`` (None: the CPU) on
    Windows or Linux. ``python_tag`` ("311" for Python 3.11) names the wheel inside a TensorRT
    archive. A command with ``<TensorRT-...>`` needs that archive unpacked first (INSTALL.md)."""
    if backend == "onnxruntime":
        return _INSTALL[("onnxruntime", "cpu" if generation is None else "gpu")]
    if generation is None:
        raise ValueError(f"the {backend} backend needs a GPU")
    archive = _TRT_FROM_ARCHIVE.get((generation, windows)) if backend == "tensorrt" else None
    if archive:
        return archive.format(py=python_tag)
    try:
        return _INSTALL[(backend, generation)]
    except KeyError:
        raise ValueError(f"no install command for backend {backend!r} on {generation!r}") from None
