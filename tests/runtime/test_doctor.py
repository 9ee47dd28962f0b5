"""effiseg-doctor on simulated machines (each an Environment: no imports are faked) and, once, on
this one. What is checked is what a user acts on: will it run, at which precision, the command
that fixes it, what effiseg-run would choose, and the exit code."""
from __future__ import annotations

import ctypes
import json
import os
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from effiseg.runtime import doctor
from effiseg.runtime.backends.torch_backend import torch_kernels_cover
from effiseg.runtime.doctor import all_verdicts, exit_code, predicted_choice, render_text, report
from effiseg.runtime.doctor_env import (Environment, Gpu, OnnxRuntimeInfo, OpenVinoInfo, TensorRTInfo, TorchInfo,
                                        probe_environment)
from effiseg.runtime.install_matrix import GENERATIONS, install_command

M6000 = Gpu(0, "Quadro M6000", (5, 2), 12 << 30)
T4 = Gpu(0, "Tesla T4", (7, 5), 16 << 30)
A4000 = Gpu(0, "NVIDIA RTX A4000", (8, 6), 16 << 30)
ORT_CPU = OnnxRuntimeInfo("1.20.1", providers=("CPUExecutionProvider",))
CU130_ARCHES = ("sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120")


def machine(gpus=(), windows=True, **parts) -> Environment:
    return Environment(system="Windows-10" if windows else "Linux", python="3.11.9", windows=windows,
                       driver_version="552.22" if gpus else None, driver_cuda="12.4" if gpus else None,
                       gpus=tuple(gpus), **parts)


def two(gpu: Gpu) -> tuple[Gpu, Gpu]:
    return gpu, Gpu(1, gpu.name, gpu.compute_capability, gpu.memory_bytes)


def verdict(verdicts, backend, device="cuda:0"):
    (found,) = [v for v in verdicts if v.backend == backend and v.device == device]
    return found


def test_no_gpu_runs_onnxruntime_on_the_cpu_and_exits_0():
    env = machine(onnxruntime=ORT_CPU)
    verdicts = all_verdicts(env)
    assert [(v.backend, v.device) for v in verdicts] == [("openvino", "cpu"), ("onnxruntime", "cpu")]
    assert verdict(verdicts, "openvino", "cpu").fix == 'pip install "effiseg[openvino]"'
    choice = predicted_choice(env, verdicts)
    assert choice.backend == "onnxruntime" and choice.devices == ("cpu",) and choice.precision == "fp32"
    assert exit_code(env, verdicts) == 0
    assert "GPU      none" in render_text(report(env))


@pytest.mark.parametrize("native_bf16, precision", [(True, "bf16"), (False, "fp32")])
def test_openvino_where_installed_is_the_cpu_choice_at_the_backend_s_own_precision(native_bf16, precision):
    env = machine(onnxruntime=ORT_CPU, openvino=OpenVinoInfo("2026.4.1", native_bf16=native_bf16))
    verdicts = all_verdicts(env)
    assert verdict(verdicts, "openvino", "cpu").runs is True
    choice = predicted_choice(env, verdicts)
    assert (choice.backend, choice.precision) == ("openvino", precision)
    assert choice.command.endswith(f"--backend openvino --devices cpu --precision {precision}")
    assert f"native bfloat16: {'yes' if native_bf16 else 'no'}" in render_text(report(env))


def test_nothing_installed_and_no_gpu_exits_1_with_the_cpu_install():
    env = machine()
    verdicts = all_verdicts(env)
    assert verdict(verdicts, "onnxruntime", "cpu").fix == 'pip install "effiseg[ort]"'
    assert predicted_choice(env, verdicts).command is None and exit_code(env, verdicts) == 1


def test_maxwell_with_tensorrt_86_is_told_to_install_853_and_exits_1():
    env = machine(two(M6000), tensorrt=TensorRTInfo("8.6.1"), cuda_bindings={"cuda-python": "12.6.0"},
                  onnxruntime=ORT_CPU)
    verdicts = all_verdicts(env)
    for device in ("cuda:0", "cuda:1"):
        trt = verdict(verdicts, "tensorrt", device)
        assert trt.runs is False and "TensorRT 8.5.3 is the last release for Maxwell" in trt.reason
        assert trt.fix == ('pip install "<TensorRT-8.5.3.1>\\python\\tensorrt-8.5.3.1-cp311-none-win_amd64.whl" '
                           '"effiseg[trt85]"')
    choice = predicted_choice(env, verdicts)
    assert choice.backend == "onnxruntime" and choice.devices == ("cpu",)
    assert any(line.startswith("not tensorrt on cuda:0,cuda:1: TensorRT 8.6.1 does not support") for line in choice.why)
    assert exit_code(env, verdicts) == 1
    text = render_text(report(env))
    assert "fix: pip install" in text and "effiseg[trt85]" in text


def test_maxwell_with_tensorrt_853_runs_both_gpus_in_fp32():
    env = machine(two(M6000), tensorrt=TensorRTInfo("8.5.3.1"), cuda_bindings={"cuda-python": "11.8.7"},
                  onnxruntime=ORT_CPU)
    verdicts = all_verdicts(env)
    trt = verdict(verdicts, "tensorrt")
    assert trt.runs is True and trt.precision == "fp32" and "no fast FP16" in trt.reason
    choice = predicted_choice(env, verdicts)
    assert choice.command == ("effiseg-run --input IMAGES --output MASKS --backend tensorrt "
                              "--devices cuda:0,cuda:1 --precision fp32")
    assert exit_code(env, verdicts) == 0


def test_tensorrt_without_a_cuda_binding_is_named():
    env = machine([A4000], windows=False, tensorrt=TensorRTInfo("10.13.0"), onnxruntime=ORT_CPU)
    trt = verdict(all_verdicts(env), "tensorrt")
    assert trt.runs is False and "cuda-python" in trt.reason and trt.fix == 'pip install "effiseg[trt]"'


def test_turing_with_a_cpu_only_onnxruntime_is_told_to_swap_it():
    env = machine([T4], windows=False, onnxruntime=ORT_CPU)
    verdicts = all_verdicts(env)
    ort = verdict(verdicts, "onnxruntime")
    assert ort.runs is False and "CPU-only build" in ort.reason
    assert ort.fix.startswith("pip uninstall -y onnxruntime && pip install") and "onnxruntime-gpu" in ort.fix
    assert verdict(verdicts, "tensorrt").fix == 'pip install "effiseg[trt]"'
    assert predicted_choice(env, verdicts).devices == ("cpu",)
    assert exit_code(env, verdicts) == 1


def test_missing_cudnn_stops_the_cuda_provider_and_tensorrt_takes_the_gpu_in_fp16():
    ort = OnnxRuntimeInfo("1.20.1", providers=("CUDAExecutionProvider", "CPUExecutionProvider"), built_cuda="12.4",
                          built_cudnn="9.1", cuda_loads=False,
                          cuda_error="libcudnn.so.9: cannot open shared object file")
    env = machine([A4000], windows=False, onnxruntime=ort, tensorrt=TensorRTInfo("10.13.0"),
                  cuda_bindings={"cuda-python": "12.9.0"})
    verdicts = all_verdicts(env)
    cuda = verdict(verdicts, "onnxruntime")
    assert cuda.runs is False and "cuDNN 9.1" in cuda.reason and "libcudnn.so.9" in cuda.reason
    assert "onnxruntime-gpu[cuda,cudnn]" in cuda.fix
    choice = predicted_choice(env, verdicts)
    assert (choice.backend, choice.devices, choice.precision) == ("tensorrt", ("cuda:0",), "fp16")
    assert exit_code(env, verdicts) == 0


def test_onnxruntime_cuda_on_maxwell_is_unknown_not_promised():
    ort = OnnxRuntimeInfo("1.20.1", providers=("CUDAExecutionProvider", "CPUExecutionProvider"), cuda_loads=True)
    env = machine([M6000], onnxruntime=ort)
    verdicts = all_verdicts(env)
    assert verdict(verdicts, "onnxruntime").runs is None
    choice = predicted_choice(env, verdicts)  # auto would open it; the doctor says it is unverified
    assert choice.backend == "onnxruntime" and choice.devices == ("cuda:0",) and "unverified" in choice.why[-1]
    assert exit_code(env, verdicts) == 1


def test_torch_without_kernels_for_the_gpu_names_the_cu126_build():
    env = machine([M6000], torch=TorchInfo("2.14.1+cu130", cuda="13.0", arch_list=CU130_ARCHES, cuda_available=True))
    torch_v = verdict(all_verdicts(env), "torch")
    assert torch_v.runs is False and "no kernels for Quadro M6000" in torch_v.reason
    assert torch_v.fix == 'pip install "torch==2.8.*" --index-url https://download.pytorch.org/whl/cu126'


def test_torch_with_sm50_kernels_runs_a_maxwell_in_fp32_and_counts_as_a_gpu_backend():
    arches = ("sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90")
    env = machine([M6000], torch=TorchInfo("2.8.0+cu126", cuda="12.6", arch_list=arches, cuda_available=True,
                                           cudnn="91002"))
    verdicts = all_verdicts(env)
    torch_v = verdict(verdicts, "torch")
    assert torch_v.runs is True and torch_v.precision == "fp32"
    assert exit_code(env, verdicts) == 0


def test_cpu_only_torch_and_a_driver_too_old_for_torch_are_told_apart():
    cpu_build = machine([T4], torch=TorchInfo("2.8.0+cpu"))
    assert "CPU-only build" in verdict(all_verdicts(cpu_build), "torch").reason
    no_gpu = machine([T4], torch=TorchInfo("2.14.1+cu130", cuda="13.0", arch_list=CU130_ARCHES))
    assert "runs CUDA up to 12.4" in verdict(all_verdicts(no_gpu), "torch").reason


@pytest.mark.parametrize("arches,capability,covered", [
    (("sm_50", "sm_60"), (5, 2), True),     # sm_50 binaries run on 5.2
    (("sm_52",), (5, 0), False),            # but not downwards
    (CU130_ARCHES, (5, 2), False),
    (CU130_ARCHES, (6, 1), False),
    (("sm_80",), (8, 9), True),
    (("sm_90", "compute_90"), (12, 0), True),  # PTX is compiled for newer GPUs
    (("sm_90a",), (9, 0), True),
    ((), (8, 6), None),
])
def test_torch_kernel_coverage(arches, capability, covered):
    assert torch_kernels_cover(arches, capability) is covered


def test_every_fix_command_is_in_the_install_matrix_document():
    install_doc = (Path(__file__).resolve().parents[2] / "runtime" / "INSTALL.md").read_text(encoding="utf-8")
    for backend in ("tensorrt", "onnxruntime", "torch"):
        for generation in GENERATIONS:
            for windows in (True, False):
                command = install_command(backend, generation, windows)
                assert command in install_doc, (backend, generation, windows, command)
    assert install_command("onnxruntime", None, True) in install_doc


def test_the_real_machine_is_probed_and_reported(tmp_path):
    env = probe_environment()
    data = report(env)
    assert json.loads(json.dumps(data))["verdicts"][-1]["device"] == "cpu"  # plain JSON, the CPU last
    assert data["exit_code"] in (0, 1) and data["environment"]["python"].count(".") == 2
    result = CliRunner().invoke(doctor.doctor_command, ["--json", "--save", str(tmp_path / "doctor.json")])
    assert result.exit_code == data["exit_code"], result.output
    saved = json.loads((tmp_path / "doctor.json").read_text(encoding="utf-8"))
    assert saved["choice"] == json.loads(result.output)["choice"]
    text = CliRunner().invoke(doctor.doctor_command, [])
    assert re.search(r"^effiseg-run would run: ", text.output, re.MULTILINE)


def test_bad_options_exit_2():
    assert CliRunner().invoke(doctor.doctor_command, ["--no-such-option"]).exit_code == 2


class FakeDriverAndNvml:
    """The CUDA driver API and NVML calls the probes make, for two Quadro M6000 on a 552.22 driver."""

    GPUS = [("Quadro M6000", (5, 2)), ("Quadro M6000", (5, 2))]

    @staticmethod
    def _set(ref, value, kind=ctypes.c_int):
        ctypes.cast(ref, ctypes.POINTER(kind)).contents.value = value

    def cuInit(self, flags):
        return 0

    def cuDeviceGetCount(self, ref):
        self._set(ref, len(self.GPUS))
        return 0

    def cuDeviceGet(self, ref, ordinal):
        self._set(ref, ordinal)
        return 0

    def cuDeviceGetName(self, buffer, length, handle):
        buffer.value = self.GPUS[handle.value][0].encode()
        return 0

    def cuDeviceGetAttribute(self, ref, attribute, handle):
        self._set(ref, self.GPUS[handle.value][1][{75: 0, 76: 1}[attribute]])
        return 0

    def cuDriverGetVersion(self, ref):
        self._set(ref, 12040)
        return 0

    def cuDeviceTotalMem_v2(self, ref, handle):
        self._set(ref, 12 << 30, ctypes.c_size_t)
        return 0

    def nvmlInit_v2(self):
        return 0

    def nvmlSystemGetDriverVersion(self, buffer, length):
        buffer.value = b"552.22"
        return 0

    def nvmlShutdown(self):
        return 0


def test_gpus_memory_and_driver_versions_come_from_the_driver_libraries(monkeypatch):
    from effiseg.runtime import doctor_env
    monkeypatch.setattr(ctypes, "CDLL", lambda name: FakeDriverAndNvml())
    driver_cuda, gpus = doctor_env.probe_gpus()
    assert driver_cuda == "12.4"
    assert gpus == (Gpu(0, "Quadro M6000", (5, 2), 12 << 30), Gpu(1, "Quadro M6000", (5, 2), 12 << 30))
    assert doctor_env.probe_driver_version() == "552.22"

    def no_library(name):
        raise OSError(f"{name}: cannot open shared object file")
    monkeypatch.setattr(ctypes, "CDLL", no_library)
    assert doctor_env.probe_gpus() == (None, ()) and doctor_env.probe_driver_version() is None


def test_a_dll_on_path_is_found_as_windows_users_install_cudnn(tmp_path, monkeypatch):
    """Windows (Python 3.8+): ctypes.CDLL("cudnn64_8.dll") searches the application folder, System32
    and os.add_dll_directory folders, never PATH, where cuDNN's and CUDA's installers put their DLLs;
    the doctor said "no system cuDNN library found" on a machine where ONNX Runtime loads it. Here the
    loader is simulated: a bare name fails, a full path to an existing file loads."""
    from effiseg.runtime.cuda_memory import load_first_library
    cuda_bin = tmp_path / "CUDA" / "v12.4" / "bin"
    cuda_bin.mkdir(parents=True)
    (cuda_bin / "cudnn64_8.dll").write_bytes(b"MZ")
    monkeypatch.setenv("PATH", os.pathsep.join([str(tmp_path / "elsewhere"), str(cuda_bin)]))

    def windows_loader(name):
        if not Path(name).is_absolute() or not Path(name).is_file():
            raise OSError(f"[WinError 126] The specified module could not be found: {name}")
        return name
    monkeypatch.setattr(ctypes, "CDLL", windows_loader)
    assert load_first_library(("cudnn64_9.dll", "cudnn64_8.dll"), windows=True) == (
        "cudnn64_8.dll", str(cuda_bin / "cudnn64_8.dll"))
    assert load_first_library(("cudnn64_9.dll",), windows=True) is None
    assert load_first_library(("cudnn64_8.dll",), windows=False) is None  # elsewhere the loader's own search rules



def test_a_broken_torch_under_a_non_ascii_path_is_reported_whatever_the_console_encoding(tmp_path):
    """The doctor reads the torch probe's output from a child interpreter. On Windows a piped child
    writes in the ANSI code page, or in UTF-8 where PYTHONIOENCODING=utf-8 is set, while the parent
    decoded with the ANSI code page: a torch that fails to load from C:\\Users\\Łukasz\\... made the
    doctor itself crash (UnicodeDecodeError), or print mojibake. Simulated with an ASCII locale."""
    import subprocess
    import sys
    fake = tmp_path / "fake" / "torch"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text('raise ImportError("DLL load failed while importing _C: '
                                      'C:/Users/Łukasz/torch/lib/c10.dll")\n', encoding="utf-8")
    script = ("import locale, sys\n"
              "if locale.getpreferredencoding(False).lower().replace('-', '') in ('utf8', 'cp65001'): sys.exit(77)\n"
              "from effiseg.runtime.doctor_env import probe_torch\n"
              "print(ascii(probe_torch().error))")
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0",
           "PYTHONIOENCODING": "utf-8", "PYTHONPATH": str(tmp_path / "fake")}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, env=env, timeout=300)
    if proc.returncode == 77:
        pytest.skip("this system's locale encoding is UTF-8 even in a C-locale process")
    assert proc.returncode == 0, proc.stderr.decode("utf-8", "replace")
    import ast
    assert "Łukasz/torch/lib/c10.dll" in ast.literal_eval(proc.stdout.decode("ascii"))

def test_the_doctor_asks_torch_without_importing_it():
    """effiseg.runtime never imports torch (an inference install has none): the doctor asks a child."""
    import subprocess
    import sys
    script = ("import sys\nfrom effiseg.runtime.doctor import report\nfrom effiseg.runtime.doctor_env import probe_environment\n"
              "data = report(probe_environment())\n"
              "assert 'torch' not in sys.modules and 'timm' not in sys.modules, 'imported'\n"
              "print(data['environment']['torch'] is not None)")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    import importlib.util
    assert proc.stdout.strip() == str(importlib.util.find_spec("torch") is not None)  # and still reports it
