"""``--device auto`` on a machine whose GPUs torch cannot use says so instead of training on the CPU
in silence (on Windows, PyPI's torch is a CPU-only build)."""
from __future__ import annotations

import logging

import pytest

torch = pytest.importorskip("torch")

from effiseg.runtime import cuda_memory  # noqa: E402
from effiseg.training import trainer  # noqa: E402
from effiseg.training.protocol import resolve_devices  # noqa: E402

TWO_QUADROS = [("Quadro M6000", (5, 2)), ("Quadro M6000", (5, 2))]


@pytest.fixture
def no_cuda_in_torch(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    trainer.warn_if_gpus_go_unused.cache_clear()
    yield
    trainer.warn_if_gpus_go_unused.cache_clear()


def test_a_cpu_only_torch_beside_two_gpus_is_named(no_cuda_in_torch, monkeypatch, caplog):
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(cuda_memory, "driver_devices", lambda: TWO_QUADROS)
    with caplog.at_level(logging.WARNING, logger="effiseg"):
        assert trainer.resolve_device("auto") == torch.device("cpu")
        assert resolve_devices("auto") == ["cpu"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1  # once per process, not once per command step
    assert "2 GPU(s) (Quadro M6000, Quadro M6000)" in warnings[0] and "CPU-only build" in warnings[0]


def test_a_cuda_torch_that_cannot_reach_the_gpus_is_named(no_cuda_in_torch, monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", "12.6")
    monkeypatch.setattr(cuda_memory, "driver_devices", lambda: TWO_QUADROS[:1])
    note = trainer.unused_gpus_note()
    assert "1 GPU(s) (Quadro M6000)" in note and "CUDA 12.6" in note and "cannot use them" in note


@pytest.mark.parametrize("driver_answer", [None, []])
def test_no_note_without_an_nvidia_gpu(no_cuda_in_torch, monkeypatch, caplog, driver_answer):
    monkeypatch.setattr(cuda_memory, "driver_devices", lambda: driver_answer)
    with caplog.at_level(logging.WARNING, logger="effiseg"):
        assert trainer.resolve_device("auto") == torch.device("cpu")
    assert not caplog.records
