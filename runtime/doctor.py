"""``effiseg-doctor``: what will run on this machine, at which precision, and what to install.

Run it first on a new machine (it does what ``nvidia-smi``, ``torch.utils.collect_env`` and
``polygraphy inspect`` do together, for effiseg). It reports the system, every NVIDIA GPU as the
driver shows it, the installed torch, ONNX Runtime, TensorRT and CUDA bindings; then, for each backend
and GPU, whether it runs and at which precision, or the one command of ``runtime/INSTALL.md`` that
fixes it; and ends with what ``effiseg-run`` would choose, and why.

The decisions are the backends' own: TensorRT's GPU gate (``tensorrt_rules.tensorrt_gpu_problem``),
PyTorch's kernel check (``torch_backend.torch_gpu_problem``), the precision rules
(``gpu_precision``, ``choose_precision``, ``choose_torch_mode``, ``tensorrt_ep_choice``) and the order
``auto`` tries backends in (``backends.auto_attempts`` over ``same_kind_as_first``). They read an
:class:`~effiseg.runtime.doctor_env.Environment`, so tests describe machines as data.

Exit codes: 0 when the machine's best hardware is usable (a GPU backend runs on a GPU; without a
GPU, a CPU backend runs), 1 when a GPU is present but no GPU backend can use it (or nothing can run
at all), 2 on bad options. torch is imported only by the probe, never at import of this module.
"""
from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import click

from .backends import auto_attempts, same_kind_as_first
from .backends.gpu_precision import fast_fp16_from_compute_capability
from .backends.onnxruntime_backend import tensorrt_ep_choice
from .backends.openvino_backend import choose_cpu_precision
from .backends.tensorrt import choose_precision
from .backends.torch_backend import choose_torch_mode, torch_gpu_problem
from .console import Command
from .doctor_env import Environment, Gpu, probe_environment
from .install_matrix import gpu_generation, install_command
from .tensorrt_rules import tensorrt_gpu_problem


@dataclass(frozen=True)
class Verdict:
    backend: str            # "tensorrt", "onnxruntime" or "torch"
    device: str             # "cuda:N" or "cpu"
    runs: bool | None       # None: cannot be told without running the model
    precision: str | None   # what it computes in when it runs
    reason: str
    fix: str | None = None  # the one command that makes it run


def _label(gpu: Gpu) -> str:
    major, minor = gpu.compute_capability
    return f"{gpu.name} (compute capability {major}.{minor})"


def tensorrt_verdict(env: Environment, gpu: Gpu) -> Verdict:
    install = install_command("tensorrt", gpu_generation(gpu.compute_capability), env.windows, env.python_tag)
    no = lambda reason: Verdict("tensorrt", f"cuda:{gpu.index}", False, None, reason, install)  # noqa: E731
    trt = env.tensorrt
    if trt is None:
        return no("TensorRT is not installed")
    if trt.version is None:
        where = " (its lib folder must be on PATH)" if env.windows else ""
        return no(f"TensorRT is installed but does not import{where}: {trt.error}")
    problem = tensorrt_gpu_problem(trt.version, gpu.compute_capability, env.windows, env.python_tag, gpu.name)
    if problem:
        return no(problem)
    if not ({"cuda-python", "cuda-bindings", "pycuda"} & set(env.cuda_bindings)):
        return no("the TensorRT backend needs cuda-python (or pycuda), which is not installed")
    choice = choose_precision("auto", fast_fp16_from_compute_capability(*gpu.compute_capability), _label(gpu),
                              trt.has_fp16_flag, trt.version)
    return Verdict("tensorrt", f"cuda:{gpu.index}", True, choice.precision,
                   f"TensorRT {trt.version}" + (f"; {choice.message}" if choice.message else ""))


def onnxruntime_gpu_verdict(env: Environment, gpu: Gpu) -> Verdict:
    install = install_command("onnxruntime", gpu_generation(gpu.compute_capability), env.windows)
    device = f"cuda:{gpu.index}"
    ort = env.onnxruntime
    if ort is None:
        return Verdict("onnxruntime", device, False, None, "ONNX Runtime is not installed", install)
    if ort.error:
        return Verdict("onnxruntime", device, False, None, f"onnxruntime does not import: {ort.error}", install)
    if "CUDAExecutionProvider" not in ort.providers:
        return Verdict("onnxruntime", device, False, None,
                       f"onnxruntime {ort.version} is a CPU-only build (providers: {', '.join(ort.providers)})",
                       install)
    if ort.cuda_loads is False:
        return Verdict("onnxruntime", device, False, None,
                       f"the CUDA provider does not start (needs CUDA {ort.built_cuda or '?'}, cuDNN "
                       f"{ort.built_cudnn or '?'}): {ort.cuda_error}", install)
    if "TensorrtExecutionProvider" in ort.providers:  # the backend's auto provider prefers it
        choice = tensorrt_ep_choice("auto", fast_fp16_from_compute_capability(*gpu.compute_capability), _label(gpu))
        precision, how = choice.precision, "TensorRT EP"
    else:
        precision, how = "fp32", "CUDA EP, which runs the fp32 graph"
    reason = f"onnxruntime {ort.version}, {how}"
    if gpu.compute_capability < (7, 5):
        # onnxruntime-gpu's wheels changed the GPUs they carry kernels for between releases
        # (microsoft/onnxruntime#23309, #23671, #29711): this cannot be read from the package.
        return Verdict("onnxruntime", device, None, precision,
                       f"{reason}; whether its kernels cover compute capability "
                       f"{gpu.compute_capability[0]}.{gpu.compute_capability[1]} is not known before a run "
                       f"(try: effiseg-run --backend onnxruntime --devices {device} on a few images)")
    return Verdict("onnxruntime", device, True, precision, reason)


def torch_verdict(env: Environment, gpu: Gpu) -> Verdict:
    install = install_command("torch", gpu_generation(gpu.compute_capability), env.windows)
    device = f"cuda:{gpu.index}"
    no = lambda reason: Verdict("torch", device, False, None, reason, install)  # noqa: E731
    t = env.torch
    if t is None:
        return no("PyTorch is not installed (the torch backend runs training checkpoints)")
    if t.error:
        return no(f"PyTorch {t.version} is broken: {t.error}")
    if not t.cuda:
        return no(f"PyTorch {t.version} is a CPU-only build")
    if not t.cuda_available:
        driver = (f"; the driver runs CUDA up to {env.driver_cuda}" if env.driver_cuda else "")
        return no(f"PyTorch {t.version} (built for CUDA {t.cuda}) sees no GPU{driver}")
    problem = torch_gpu_problem(t.version, t.arch_list, gpu.compute_capability, gpu.name, env.windows)
    if problem:
        return no(problem)
    choice, _ = choose_torch_mode("auto", True, gpu.compute_capability, gpu.name)
    cudnn = f", cuDNN {t.cudnn}" if t.cudnn else ", no cuDNN"
    return Verdict("torch", device, True, choice.precision, f"PyTorch {t.version} (CUDA {t.cuda}{cudnn})")


def onnxruntime_cpu_verdict(env: Environment) -> Verdict:
    ort = env.onnxruntime
    if ort is None or ort.error:
        reason = "ONNX Runtime is not installed" if ort is None else f"onnxruntime does not import: {ort.error}"
        return Verdict("onnxruntime", "cpu", False, None, reason, install_command("onnxruntime", None, env.windows))
    return Verdict("onnxruntime", "cpu", True, "fp32", f"onnxruntime {ort.version}, CPU")


def openvino_cpu_verdict(env: Environment) -> Verdict:
    ov = env.openvino
    fix = 'pip install "effiseg[openvino]"'
    if ov is None or ov.error:
        reason = "OpenVINO is not installed (faster than ONNX Runtime on the CPUs measured)" if ov is None \
            else f"openvino does not start: {ov.error}"
        return Verdict("openvino", "cpu", False, None, reason, fix)
    choice = choose_cpu_precision("auto", ov.native_bf16)
    bf16 = "native bfloat16" if ov.native_bf16 else "no native bfloat16"
    return Verdict("openvino", "cpu", True, choice.precision, f"openvino {ov.version}, CPU ({bf16})")


def all_verdicts(env: Environment) -> list[Verdict]:
    per_gpu = [make(env, gpu) for make in (tensorrt_verdict, onnxruntime_gpu_verdict, torch_verdict)
               for gpu in env.gpus]
    return per_gpu + [openvino_cpu_verdict(env), onnxruntime_cpu_verdict(env)]


@dataclass(frozen=True)
class Choice:
    command: str | None     # the effiseg-run command line auto amounts to; None: nothing runs
    backend: str | None
    devices: tuple[str, ...]
    precision: str | None
    why: tuple[str, ...]    # one line per choice auto passes over, then the one it takes


def predicted_choice(env: Environment, verdicts: list[Verdict]) -> Choice:
    """What ``effiseg-run`` (backend auto, devices by default) picks for an ONNX model: the first of
    ``auto_attempts`` that runs on all its devices, the devices being the GPUs like the first one."""
    notes: list[str] = []
    devices = same_kind_as_first([(g.name, g.compute_capability) for g in env.gpus], notes)
    by_key = {(v.backend, v.device): v for v in verdicts}
    why = list(notes)
    openvino = env.openvino is not None and env.openvino.error is None
    for backend, devs in auto_attempts(devices, openvino=openvino):
        found = [by_key[(backend, d)] for d in devs]
        failing = [v for v in found if v.runs is False]
        if failing:
            why.append(f"not {backend} on {','.join(devs)}: {failing[0].reason}")
            continue
        unknown = any(v.runs is None for v in found)
        why.append(f"{backend} on {','.join(devs)}: {found[0].reason}"
                   + (" (unverified: see above)" if unknown else ""))
        command = (f"effiseg-run --input IMAGES --output MASKS --backend {backend} --devices {','.join(devs)} "
                   f"--precision {found[0].precision}")
        return Choice(command, backend, tuple(devs), found[0].precision, tuple(why))
    return Choice(None, None, (), None, tuple(why))


def exit_code(env: Environment, verdicts: list[Verdict]) -> int:
    if env.gpus:
        return 0 if any(v.runs is True and v.device != "cpu" for v in verdicts) else 1
    return 0 if any(v.runs is True for v in verdicts) else 1


def report(env: Environment) -> dict:
    verdicts = all_verdicts(env)
    choice = predicted_choice(env, verdicts)
    return {"environment": asdict(env), "verdicts": [asdict(v) for v in verdicts], "choice": asdict(choice),
            "exit_code": exit_code(env, verdicts)}


def _gib(n: int | None) -> str:
    return f"{n / 2**30:.1f} GiB" if n else "? GiB"


def render_text(data: dict) -> str:
    env, lines = data["environment"], []
    lines.append(f"System   {env['system']}, Python {env['python']}")
    if env["gpus"]:
        lines.append(f"Driver   {env['driver_version'] or 'version unknown'}, "
                     f"runs CUDA up to {env['driver_cuda'] or '?'}")
        for g in env["gpus"]:
            cc = tuple(g["compute_capability"])
            lines.append(f"GPU      cuda:{g['index']}  {g['name']}  compute capability {cc[0]}.{cc[1]} "
                         f"({gpu_generation(cc)})  {_gib(g['memory_bytes'])}")
    else:
        lines.append("GPU      none (no NVIDIA driver answered)")
    t, o, r = env["torch"], env["onnxruntime"], env["tensorrt"]
    lines.append("torch    " + ("not installed" if t is None else t["error"] or
                 f"{t['version']} (CUDA {t['cuda'] or '-'}, kernels {' '.join(t['arch_list']) or '-'}, "
                 f"cuDNN {t['cudnn'] or '-'}, GPU usable: {'yes' if t['cuda_available'] else 'no'})"))
    lines.append("onnxrt   " + ("not installed" if o is None else o["error"] or
                 f"{o['version']} (providers {', '.join(o['providers'])}; built for CUDA {o['built_cuda'] or '-'}, "
                 f"cuDNN {o['built_cudnn'] or '-'}"
                 + ("" if o["cuda_loads"] is None else f"; CUDA provider starts: {'yes' if o['cuda_loads'] else 'no'}")
                 + ")"))
    v = env["openvino"]
    lines.append("openvino " + ("not installed" if v is None else v["error"] or
                 f"{v['version']} (CPU, native bfloat16: {'yes' if v['native_bf16'] else 'no'})"))
    lines.append("tensorrt " + ("not installed" if r is None else r["version"] or f"does not import: {r['error']}"))
    bindings = ", ".join(f"{k} {v}" for k, v in env["cuda_bindings"].items())
    lines.append(f"CUDA py  {bindings or 'none (cuda-python / pycuda)'}")
    cudnn = env["cudnn_library"] or "no system cuDNN library found (pip packages may bring their own)"
    lines.append(f"cuDNN    {cudnn}")
    lines.append("")
    for v in data["verdicts"]:
        state = {True: "runs", False: "no", None: "unknown"}[v["runs"]]
        precision = f" {v['precision']}" if v["runs"] is not False and v["precision"] else ""
        lines.append(f"{v['backend']:<12}{v['device']:<8}{state}{precision}: {v['reason']}")
        if v["fix"] and v["runs"] is not True:
            lines.append(f"{'':<20}fix: {v['fix']}")
    lines.append("")
    choice = data["choice"]
    lines.append("effiseg-run would run: " + (choice["command"] or "nothing (no backend can run here)"))
    lines.extend(f"  {line}" for line in choice["why"])
    return "\n".join(lines)


@click.command(cls=Command, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON instead of text.")
@click.option("--save", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the JSON report to this file.")
def doctor_command(as_json: bool, save: Path | None) -> None:
    """What runs on this machine (GPUs, backends, precision), and the command that fixes what does not.

    Exit code 0: the best hardware here is usable; 1: a GPU is present but no GPU backend can use it
    (or nothing can run); 2: bad options."""
    if not as_json:
        click.echo("effiseg-doctor: asking the NVIDIA driver, torch, onnxruntime and tensorrt...", err=True)
    data = report(probe_environment())
    text = json.dumps(data, indent=2)
    if save is not None:
        try:
            save.parent.mkdir(parents=True, exist_ok=True)
            save.write_text(text + "\n", encoding="utf-8")
        except OSError as e:
            raise click.ClickException(f"cannot write the report to {save}: {e}") from e
    click.echo(text if as_json else render_text(data))
    sys.exit(data["exit_code"])
