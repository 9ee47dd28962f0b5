"""effiseg.runtime imports and runs ONNX Runtime inference with torch and timm unavailable."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from conftest import default_cpu_backend

pytest.importorskip("onnxruntime")

SCRIPT = textwrap.dedent(r"""
    import importlib, pkgutil, sys
    from importlib.abc import MetaPathFinder

    BLOCKED = ("torch", "timm", "torchvision", "safetensors")

    class Block(MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"{name} is blocked in this test")
            return None

    sys.meta_path.insert(0, Block())
    for name in BLOCKED:
        sys.modules.pop(name, None)

    import numpy as np
    import effiseg.runtime as runtime
    import effiseg.runtime.backends as backends
    names = []
    # Every module, subpackages included (pipeline stages, video, the TensorRT package).
    for mod in pkgutil.walk_packages(runtime.__path__, runtime.__name__ + "."):
        importlib.import_module(mod.name)
        names.append(mod.name)
    assert "effiseg.runtime.pipeline.decode" in names and "effiseg.runtime.backends.tensorrt.backend" in names, names
    assert "effiseg.runtime.backends.torch_backend" in names and "effiseg.runtime.cli" in names, names

    from effiseg.runtime import BackendUnavailable, Segmenter
    from effiseg.runtime.backends.torch_backend import TorchBackend
    try:
        TorchBackend("unused-checkpoint")
    except BackendUnavailable as e:
        assert "effiseg[train]" in str(e), e
    else:
        raise AssertionError("the torch backend started without torch")

    with Segmenter.from_onnx(sys.argv[1], backend="auto", max_batch=2) as seg:
        assert seg.backend_name == sys.argv[2], seg.describe()
        rng = np.random.default_rng(0)
        images = [rng.integers(0, 256, (40 + 7 * i, 50, 3), dtype=np.uint8) for i in range(3)]
        masks = seg.segment(images)
        assert [m.shape for m in masks] == [im.shape[:2] for im in images]
        assert all(m.dtype == bool for m in masks)
    leaked = [m for m in sys.modules if m.split(".")[0] in BLOCKED]
    assert not leaked, leaked
    print("OK", len(names), "modules")
""")


def test_runtime_without_torch(tiny_onnx, tmp_path):
    script = tmp_path / "no_torch.py"
    script.write_text(SCRIPT)
    expected_backend = default_cpu_backend()[0]  # OpenVINO where installed, else ONNX Runtime
    proc = subprocess.run([sys.executable, str(script), str(tiny_onnx), expected_backend], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith("OK")
