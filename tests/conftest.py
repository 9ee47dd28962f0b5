"""Shared fixtures. Keep each one generic and cheap; add new fixtures as new functions."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from _paths import KVASIR

TINY_VARIANT = "effisegnet-lite0"
TINY_SIZE = 64


def _has_cuda() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except ImportError:
        return False


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` skip, with the reason, where PyTorch sees no CUDA device."""
    if any("gpu" in item.keywords for item in items) and not _has_cuda():
        skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """An untrained-but-deterministic effisegnet-lite0 checkpoint at 64x64 input. BatchNorm running
    statistics are perturbed so that the network is not near-constant (parity tests mean more)."""
    import torch
    from effiseg.training.checkpoint import model_config, save_checkpoint
    from effiseg.training.model import build_model

    torch.manual_seed(0)
    model = build_model(TINY_VARIANT)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
        # Centre the logits on a smooth synthetic batch so that masks are neither empty nor full.
        yy, xx = torch.meshgrid(torch.linspace(-1, 1, TINY_SIZE), torch.linspace(-1, 1, TINY_SIZE), indexing="ij")
        probe = torch.stack([xx, yy, xx * yy], dim=0)[None].repeat(2, 1, 1, 1)
        probe[1] = -probe[1]
        model.eval()
        model.head.weight *= 10.0  # logits of a few units, like a trained model's
        model.head.bias -= model(probe).median()
    folder = tmp_path_factory.mktemp("tiny_checkpoint")
    save_checkpoint(folder, model.eval(), model_config(TINY_VARIANT, input_size=TINY_SIZE))
    return folder


@pytest.fixture(scope="session")
def verify_images_dir(tmp_path_factory) -> Path:
    """Three small real images (Kvasir-SEG validation when present, synthetic otherwise)."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("verify_images")
    sources = sorted((KVASIR / "validation" / "images").glob("*.jpg"))[:3] if KVASIR.is_dir() else []
    if sources:
        for src in sources:
            Image.open(src).convert("RGB").resize((96, 80)).save(folder / src.name)
    else:
        rng = np.random.default_rng(0)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (80, 96, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def write_noise_images(folder: Path, n: int, shape=(40, 50), ext: str = "png", seed: int = 0) -> Path:
    """``n`` uniform-noise RGB images ``0.<ext> .. <n-1>.<ext>`` of ``shape`` (height, width) in ``folder``."""
    from PIL import Image
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (*shape, 3), dtype=np.uint8)).save(folder / f"{i}.{ext}")
    return folder


def export_tiny(checkpoint: Path, out: Path, verify_dir: Path, **options) -> Path:
    from effiseg.export.onnx_export import export_checkpoint
    export_checkpoint(checkpoint, out, verify_dir=verify_dir, verify_count=2, log=lambda *a: None, **options)
    return out


@pytest.fixture(scope="session")
def tiny_onnx(tiny_checkpoint, verify_images_dir, tmp_path_factory) -> Path:
    """The tiny checkpoint exported as uint8-nhwc -> logits with dynamic batch (64x64)."""
    return export_tiny(tiny_checkpoint, tmp_path_factory.mktemp("tiny_onnx") / "tiny.onnx", verify_images_dir)


@pytest.fixture(scope="session")
def tiny_onnx_dynamic(tiny_checkpoint, verify_images_dir, tmp_path_factory) -> Path:
    """As tiny_onnx, with dynamic height and width."""
    return export_tiny(tiny_checkpoint, tmp_path_factory.mktemp("tiny_onnx_dyn") / "tiny_dyn.onnx",
                       verify_images_dir, dynamic_hw=True)


@pytest.fixture(scope="session")
def kvasir_sample_paths() -> list[Path]:
    """Up to six Kvasir-SEG validation images (an empty list without the data set)."""
    folder = KVASIR / "validation" / "images"
    return sorted(folder.glob("*.jpg"))[:6] if folder.is_dir() else []


def fast_precision_of_gpu0() -> str:
    """What the fast mode computes in on cuda:0: fp16, or fp32 on a GPU without fast FP16 (Maxwell)."""
    import torch

    from effiseg.runtime.backends.gpu_precision import fast_fp16_from_compute_capability
    return "fp16" if fast_fp16_from_compute_capability(*torch.cuda.get_device_capability(0)) else "fp32"


# None in sys.modules: importing raises ModuleNotFoundError and importlib.util.find_spec answers None,
# as for a package that is not installed.
INFERENCE_INSTALL_PREAMBLE = """
import sys
for name in ("torch", "timm", "torchvision", "safetensors", "onnx", "onnxscript", "matplotlib", "scipy"):
    sys.modules[name] = None
"""


def run_as_inference_install(tmp_path: Path, code: str, *args: str, timeout: float = 300):
    """Run ``code`` (with ``args`` in sys.argv[1:]) in a Python process that sees what an
    ``effiseg[ort]`` install has: no torch, timm, onnx, matplotlib or scipy."""
    import subprocess
    import sys
    import textwrap
    script = tmp_path / "as_inference_install.py"
    script.write_text(INFERENCE_INSTALL_PREAMBLE + textwrap.dedent(code), encoding="utf-8")
    return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=tmp_path)


def default_cpu_backend() -> tuple[str, str]:
    """(backend, precision) that ``--backend auto`` takes on this CPU: OpenVINO where installed, at bf16
    where the CPU computes it natively, else ONNX Runtime in fp32."""
    import importlib.util
    if importlib.util.find_spec("openvino") is None:
        return "onnxruntime", "fp32"
    import openvino
    native = "BF16" in openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    return "openvino", "bf16" if native else "fp32"
