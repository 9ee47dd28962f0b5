"""effiseg-bench's machine description: the CPU name and nvidia-smi on Windows, and the GPU memory
probe reading the card that runs."""
from __future__ import annotations

import sys


def test_machine_info_on_windows_finds_the_cpu_name_and_nvidia_smi(tmp_path, monkeypatch):
    """Windows: the CPU's name is in the registry (platform.processor() says "Intel64 Family 6 ..."),
    and older drivers keep nvidia-smi.exe in Program Files\\NVIDIA Corporation\\NVSMI, off PATH."""
    import types

    from effiseg.benchmarks import machine

    fake_winreg = types.SimpleNamespace(HKEY_LOCAL_MACHINE="HKLM")

    class Key:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False
    fake_winreg.OpenKey = lambda root, path: Key()
    fake_winreg.QueryValueEx = lambda key, name: ("Intel(R) Xeon(R) CPU E5-2690 v4 @ 2.60GHz  ", 1)
    monkeypatch.setitem(sys.modules, "winreg", fake_winreg)
    monkeypatch.setattr(machine.sys, "platform", "win32")
    assert machine.cpu_model() == "Intel(R) Xeon(R) CPU E5-2690 v4 @ 2.60GHz"

    smi = tmp_path / "NVIDIA Corporation" / "NVSMI" / "nvidia-smi.exe"
    smi.parent.mkdir(parents=True)
    smi.write_bytes(b"")
    monkeypatch.setattr(machine.shutil, "which", lambda name: None)
    monkeypatch.setenv("ProgramW6432", str(tmp_path))
    monkeypatch.setenv("SystemRoot", str(tmp_path / "Windows"))
    assert machine.find_nvidia_smi() == str(smi)
    smi.unlink()
    assert machine.find_nvidia_smi() is None


def test_the_gpu_memory_probe_reads_the_card_that_runs_not_the_one_with_the_same_index(tmp_path, monkeypatch):
    """With CUDA_VISIBLE_DEVICES=1 (or mixed cards) "cuda:0" is not NVML's or nvidia-smi's GPU 0:
    the probe finds the card by its PCI bus id. Without a bus id it falls back to the index and
    says so."""
    import types

    from effiseg.benchmarks import memory
    from effiseg.runtime import cuda_memory

    used = {"0000:03:00.0": 100, "0000:82:00.0": 5000}  # MiB in use: GPU 0 idle, GPU 1 busy
    order = list(used)  # NVML's numbering: PCI order
    fake_nvml = types.SimpleNamespace(
        nvmlInit=lambda: None,
        nvmlDeviceGetHandleByIndex=lambda i: order[i],
        nvmlDeviceGetHandleByPciBusId=lambda bus: bus.decode(),
        nvmlDeviceGetMemoryInfo=lambda handle: types.SimpleNamespace(used=used[handle] * 1024 * 1024))
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml)
    monkeypatch.setattr(cuda_memory, "driver_pci_bus_id", lambda index: ["0000:82:00.0"][index])
    probe = memory.GpuMemoryProbe(0)
    assert (probe.source, probe.card, probe.read()) == ("nvml", "PCI 0000:82:00.0", 5000 * 1024 * 1024)

    monkeypatch.setattr(cuda_memory, "driver_pci_bus_id", lambda index: None)
    probe = memory.GpuMemoryProbe(0)
    assert probe.read() == 100 * 1024 * 1024 and "assumed" in probe.card

    # no pynvml: nvidia-smi, asked for the same card by its bus id
    monkeypatch.setitem(sys.modules, "pynvml", None)
    monkeypatch.setattr(cuda_memory, "driver_pci_bus_id", lambda index: ["0000:82:00.0"][index])
    monkeypatch.setattr(memory, "find_nvidia_smi", lambda: "nvidia-smi")
    asked = []

    def fake_smi(args, **kwargs):
        card = args[1].partition("=")[2]
        asked.append(card)
        return types.SimpleNamespace(stdout=f"{used[card]}\n")
    monkeypatch.setattr(memory.subprocess, "run", fake_smi)
    probe = memory.GpuMemoryProbe(0)
    assert (probe.source, probe.read()) == ("nvidia-smi", 5000 * 1024 * 1024)
    assert set(asked) == {"0000:82:00.0"}
