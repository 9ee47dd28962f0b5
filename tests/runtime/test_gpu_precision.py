"""The precision rule the TensorRT and PyTorch backends follow: FP16 where the GPU has fast FP16, FP32
elsewhere, and an FP16 request on a GPU without it (the Quadro M6000, compute capability 5.2) runs FP32
and says so. ONNX Runtime's TensorRT EP follows it too: tests/runtime/test_onnxruntime_gpu.py."""
from __future__ import annotations

import pytest

from effiseg.runtime.backends.gpu_precision import choose_gpu_precision, fast_fp16_from_compute_capability
from effiseg.runtime.backends.torch_backend import choose_torch_mode


@pytest.mark.parametrize("cc,fast", [((5, 0), False), ((5, 2), False), ((5, 3), True), ((6, 0), True),
                                     ((6, 1), False), ((6, 2), True), ((7, 0), True), ((7, 5), True),
                                     ((8, 6), True), ((9, 0), True), ((12, 0), True)])
def test_fast_fp16_from_compute_capability(cc, fast):
    assert fast_fp16_from_compute_capability(*cc) is fast


def test_the_rule_falls_back_loudly_and_names_what_the_backend_does_instead():
    asked = choose_gpu_precision("FP16", False, "Quadro M6000 (compute capability 5.2)", "doing X instead")
    assert (asked.precision, asked.warning) == ("fp32", True)
    assert asked.message == "FP16 requested, but Quadro M6000 (compute capability 5.2) has no fast FP16; doing X instead"
    auto = choose_gpu_precision("auto", False, "Quadro M6000", "doing X instead")
    assert (auto.precision, auto.warning) == ("fp32", False) and "no fast FP16" in auto.message
    assert choose_gpu_precision("auto", True, "H100", "-").precision == "fp16"
    assert choose_gpu_precision("fp32", True, "H100", "-").message is None
    with pytest.raises(ValueError, match="INT8 is not supported"):
        choose_gpu_precision("int8", True, "H100", "-")


def test_torch_fast_mode_is_fp16_where_the_gpu_has_fast_fp16():
    for requested in ("auto", "fp16"):
        choice, fast = choose_torch_mode(requested, on_cuda=True, capability=(9, 0), device_label="NVIDIA H100")
        assert (choice.precision, fast, choice.warning) == ("fp16", True, False)


def test_torch_on_maxwell_runs_the_fast_mode_in_fp32_and_says_so():
    auto, fast = choose_torch_mode("auto", on_cuda=True, capability=(5, 2), device_label="Quadro M6000")
    assert (auto.precision, fast, auto.warning) == ("fp32", True, False)
    assert "Quadro M6000 (compute capability 5.2)" in auto.message and "no fast FP16" in auto.message
    asked, fast = choose_torch_mode("fp16", on_cuda=True, capability=(5, 2), device_label="Quadro M6000")
    assert (asked.precision, fast, asked.warning) == ("fp32", True, True)  # never silently
    assert asked.message.startswith("FP16 requested") and "fast mode runs in FP32" in asked.message
    assert choose_torch_mode("fp16", on_cuda=True, capability=(6, 1))[0].precision == "fp32"  # GTX 10xx: 1/64 rate


def test_torch_fp32_is_the_eager_baseline_and_the_cpu_fast_mode_is_fp32():
    for cc in ((5, 2), (9, 0)):
        choice, fast = choose_torch_mode("fp32", on_cuda=True, capability=cc)
        assert (choice.precision, fast, choice.message) == ("fp32", False, None)
    # On the CPU: fp32 is the baseline (the network as trained); auto is the fast mode, which there
    # is the rewritten network in fp32; fp16 gets the same, and says why.
    baseline, fast = choose_torch_mode("fp32", on_cuda=False)
    assert (baseline.precision, fast, baseline.message, baseline.warning) == ("fp32", False, None, False)
    auto, fast = choose_torch_mode("auto", on_cuda=False)
    assert (auto.precision, fast, auto.message) == ("fp32", True, None)
    cpu_fp16, fast = choose_torch_mode("fp16", on_cuda=False)
    assert (cpu_fp16.precision, fast, cpu_fp16.warning) == ("fp32", True, True)
    assert "needs a CUDA GPU" in cpu_fp16.message and "fp32" in cpu_fp16.message


def test_torch_mode_refuses_what_it_cannot_decide():
    with pytest.raises(ValueError, match="unknown precision 'bf16'"):
        choose_torch_mode("bf16", on_cuda=True, capability=(9, 0))
    with pytest.raises(ValueError, match="compute capability"):
        choose_torch_mode("auto", on_cuda=True)


def test_torch_backend_names_a_gpu_that_is_not_there(tiny_checkpoint, monkeypatch):
    """A device index past the last GPU is a clean BackendUnavailable (effiseg-run: "cannot start",
    exit 3), raised before anything asks that device for its properties."""
    torch = pytest.importorskip("torch")
    from effiseg.runtime.backends.base import BackendUnavailable
    from effiseg.runtime.backends.torch_backend import TorchBackend
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(BackendUnavailable, match=r"there is no cuda:3: torch sees 1 CUDA GPU\(s\) \(cuda:0..cuda:0\)"):
        TorchBackend(tiny_checkpoint, device="cuda:3")
