"""The precision rule every backend follows: FP16 where the GPU has fast FP16, FP32 elsewhere, and an
FP16 request on a GPU without it (the Quadro M6000, compute capability 5.2) runs FP32 and says so."""
from __future__ import annotations

import pytest

from effiseg.runtime.backends.gpu_precision import choose_torch_mode, fast_fp16_from_compute_capability


@pytest.mark.parametrize("cc,fast", [((5, 0), False), ((5, 2), False), ((5, 3), True), ((6, 0), True),
                                     ((6, 1), False), ((6, 2), True), ((7, 0), True), ((7, 5), True),
                                     ((8, 6), True), ((9, 0), True), ((12, 0), True)])
def test_fast_fp16_from_compute_capability(cc, fast):
    assert fast_fp16_from_compute_capability(*cc) is fast


def test_torch_fast_mode_is_fp16_where_the_gpu_has_fast_fp16():
    for requested in ("auto", "fp16"):
        mode = choose_torch_mode(requested, on_cuda=True, capability=(9, 0), device_label="NVIDIA H100")
        assert (mode.precision, mode.fast, mode.message, mode.warning) == ("fp16", True, None, False)


def test_torch_on_maxwell_runs_fp32_fast_mode_and_says_so():
    auto = choose_torch_mode("auto", on_cuda=True, capability=(5, 2), device_label="Quadro M6000")
    assert (auto.precision, auto.fast, auto.warning) == ("fp32", True, False)
    assert "Quadro M6000 (compute capability 5.2)" in auto.message and "no fast FP16" in auto.message
    asked = choose_torch_mode("fp16", on_cuda=True, capability=(5, 2), device_label="Quadro M6000")
    assert (asked.precision, asked.fast, asked.warning) == ("fp32", True, True)  # never silently
    assert asked.message.startswith("FP16 requested") and "FP32" in asked.message and "5.2" in asked.message
    assert choose_torch_mode("fp16", on_cuda=True, capability=(6, 1)).precision == "fp32"  # GTX 10xx: 1/64 rate


def test_torch_fp32_is_the_eager_baseline_everywhere_and_the_cpu_is_eager():
    for cc in ((5, 2), (9, 0)):
        assert choose_torch_mode("fp32", on_cuda=True, capability=cc) == choose_torch_mode("fp32", on_cuda=False)
    base = choose_torch_mode("fp32", on_cuda=False)
    assert (base.precision, base.fast, base.message) == ("fp32", False, None)
    assert choose_torch_mode("auto", on_cuda=False) == base
    cpu_fp16 = choose_torch_mode("fp16", on_cuda=False)
    assert (cpu_fp16.precision, cpu_fp16.fast, cpu_fp16.warning) == ("fp32", False, True)
    assert "needs a CUDA GPU" in cpu_fp16.message


def test_torch_mode_refuses_what_it_cannot_decide():
    with pytest.raises(ValueError, match="auto, fp32, fp16"):
        choose_torch_mode("int8", on_cuda=True, capability=(9, 0))
    with pytest.raises(ValueError, match="compute capability"):
        choose_torch_mode("auto", on_cuda=True)
