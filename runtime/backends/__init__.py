"""Inference backends: a registry, device parsing and the ``auto`` choice.

Backends are imported lazily by name, so importing this package needs neither TensorRT, ONNX
Runtime nor torch. ``auto`` (ONNX models) tries, in order: TensorRT on each requested GPU, ONNX
Runtime with a GPU provider, OpenVINO on the CPU (where installed), ONNX Runtime on the CPU; every skipped choice is recorded with its
reason in ``selection_notes`` so the caller can say why it ended where it did. Without ``devices``,
``auto`` and ``tensorrt`` run on every GPU the driver shows that is like the first one (same name
and compute capability), and ``torch`` on every such GPU torch sees, one backend per GPU fed from
one queue; a GPU that fails to open is left out with a note as long as another one runs.
``onnxruntime`` without ``devices`` runs on the CPU.
"""
from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

from ..model_info import ModelInfo
from .base import Backend, BackendUnavailable

BACKENDS = {
    "tensorrt": ("effiseg.runtime.backends.tensorrt", "TensorRTBackend"),
    "onnxruntime": ("effiseg.runtime.backends.onnxruntime_backend", "OnnxRuntimeBackend"),
    "openvino": ("effiseg.runtime.backends.openvino_backend", "OpenVinoBackend"),
    "torch": ("effiseg.runtime.backends.torch_backend", "TorchBackend"),
}
BACKEND_CHOICES = ("auto",) + tuple(BACKENDS)
CPU_ONLY_PRECISIONS = ("bf16", "int8")  # the CPU backends' (OpenVINO's bf16; int8 twins)

__all__ = ["Backend", "BackendUnavailable", "BACKENDS", "BACKEND_CHOICES", "backend_class",
           "parse_devices", "default_gpu_devices", "auto_attempts", "same_kind_as_first", "open_onnx_backends",
           "open_checkpoint_backends"]


def backend_class(name: str) -> type[Backend]:
    """The backend class registered as ``name``, imported now (and only now).

    Args:
        name (str): "tensorrt", "onnxruntime", "openvino" or "torch".

    Returns:
        type[Backend]: the class; constructing it imports the engine's library.

    Raises:
        ValueError: an unknown name (the choices are listed).
    """
    try:
        module_name, class_name = BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown backend {name!r}; choose from {', '.join(BACKEND_CHOICES)}") from None
    return getattr(importlib.import_module(module_name), class_name)


def parse_devices(devices) -> list[str] | None:
    """The devices a user named, as a list of "cpu" / "cuda:N".

    Args:
        devices: None (let the backend choice decide); "cpu"; 0, "0", "cuda", "gpu" or "cuda:0";
            "0,1"; or a list of these.

    Returns:
        list[str] | None: e.g. ["cuda:0", "cuda:1"]; None for None.

    Raises:
        ValueError: an unknown device, one named twice, an empty list, or cpu mixed with GPUs.

    Example:
        >>> parse_devices("0, cuda:1")
        ['cuda:0', 'cuda:1']
    """
    if devices is None:
        return None
    if isinstance(devices, (str, int)):
        devices = [d for d in str(devices).split(",") if d.strip()]
    out = []
    for d in devices:
        d = str(d).strip().lower()
        if d.isdigit():
            d = f"cuda:{d}"
        elif d == "cuda" or d == "gpu":
            d = "cuda:0"
        if d != "cpu" and not (d.startswith("cuda:") and d[5:].isdigit()):
            raise ValueError(f"unknown device {d!r}; use cpu, N, cuda:N or a comma-separated list")
        if d in out:
            raise ValueError(f"device {d} given twice")
        out.append(d)
    if not out:
        raise ValueError("empty device list")
    if "cpu" in out and len(out) > 1:
        raise ValueError("cpu cannot be combined with GPU devices")
    return out


def _close_all(backends: list[Backend]) -> None:
    for b in backends:
        try:
            b.close()
        except Exception:
            pass


def same_kind_as_first(devices: list[tuple[str, tuple[int, int]]], notes: list[str] | None = None) -> list[str]:
    """``cuda:i`` for every GPU like the first one (same name and compute capability), so that a
    default run never mixes precisions or waits on a slower card; the others are named in a note.

    Args:
        devices (list): (name, (major, minor)) per GPU, in driver order.
        notes (list[str] | None): receives the note naming the GPUs left out.

    Returns:
        list[str]: "cuda:i" of the GPUs like cuda:0 ([] for no GPU).

    Example:
        >>> same_kind_as_first([("Quadro M6000", (5, 2)), ("Quadro M6000", (5, 2))])
        ['cuda:0', 'cuda:1']
    """
    if not devices:
        return []
    first = devices[0]
    chosen = [f"cuda:{i}" for i, d in enumerate(devices) if d == first]
    others = [f"cuda:{i} ({d[0]}, {d[1][0]}.{d[1][1]})" for i, d in enumerate(devices) if d != first]
    if others and notes is not None:
        notes.append(f"by default only GPUs like cuda:0 ({first[0]}, {first[1][0]}.{first[1][1]}) are used; "
                     f"not {', '.join(others)}: name them with --devices")
    return chosen


def default_gpu_devices(notes: list[str] | None = None) -> list[str]:
    """Every GPU the driver shows that is like the first (a two-GPU machine runs on both by
    default), or ``["cuda:0"]`` when that cannot be told: the backend then says why it cannot run
    there. Only called where a GPU backend is installed, so that a CPU-only install never
    initialises the CUDA driver.

    Args:
        notes (list[str] | None): receives the note naming GPUs left out (``same_kind_as_first``).

    Returns:
        list[str]: at least one "cuda:N".
    """
    from ..cuda_memory import driver_devices
    return same_kind_as_first(driver_devices() or [], notes) or ["cuda:0"]


def _gpu_backend_installed() -> bool:
    """Whether TensorRT or an ONNX Runtime with a GPU provider is importable (checked without
    initialising CUDA)."""
    if importlib.util.find_spec("tensorrt") is not None:
        return True
    if importlib.util.find_spec("onnxruntime") is None:
        return False
    import onnxruntime
    return bool({"CUDAExecutionProvider", "TensorrtExecutionProvider"} & set(onnxruntime.get_available_providers()))


def _openvino_installed() -> bool:
    return importlib.util.find_spec("openvino") is not None


def _open_each(devices: list[str], make, notes: list[str] | None = None, tolerant: bool = False) -> list[Backend]:
    """One backend per device. ``tolerant`` (devices chosen by default, not named by the user): a
    device that fails is left out with a note while another one opens; all failing raises the first
    error. Devices the user named must all open."""
    opened: list[Backend] = []
    failed: list[tuple[str, Exception]] = []
    try:
        for device in devices:
            try:
                opened.append(make(device))
            except Exception as e:
                if not tolerant:
                    raise
                failed.append((device, e))
    except BaseException:
        _close_all(opened)
        raise
    if failed and not opened:
        raise failed[0][1]
    for device, error in failed:
        if notes is not None:
            notes.append(f"left out {device}: {type(error).__name__}: {error}")
    return opened


def auto_attempts(gpu_devices: list[str], cpu_allowed: bool = True, openvino: bool = False,
                  precision: str = "auto") -> list[tuple[str, list[str]]]:
    """The (backend, devices) ``auto`` tries for an ONNX model, in order: TensorRT on the GPUs, ONNX
    Runtime on the GPUs, OpenVINO on the CPU (``openvino``: where installed), ONNX Runtime on the CPU.
    A CPU-only precision (bf16, int8) skips the GPUs. ``effiseg-doctor`` walks the same list.

    Args:
        gpu_devices (list[str]): the GPUs to try ("cuda:N"); [] for none.
        cpu_allowed (bool): whether the CPU choices come last (not when the user named GPUs).
        openvino (bool): whether OpenVINO is installed.
        precision (str): the precision asked for.

    Returns:
        list[tuple[str, list[str]]]: (backend name, devices), in the order tried.

    Example:
        >>> auto_attempts(["cuda:0"], openvino=True)
        [('tensorrt', ['cuda:0']), ('onnxruntime', ['cuda:0']), ('openvino', ['cpu']), ('onnxruntime', ['cpu'])]
    """
    attempts = []
    if gpu_devices and precision not in CPU_ONLY_PRECISIONS:
        attempts += [("tensorrt", list(gpu_devices)), ("onnxruntime", list(gpu_devices))]
    if cpu_allowed:
        # OpenVINO ran the model faster than ONNX Runtime on the CPU (benchmarks/RESULTS.md); an
        # install without it is not told about it on every run.
        if openvino:
            attempts.append(("openvino", ["cpu"]))
        attempts.append(("onnxruntime", ["cpu"]))
    return attempts


def open_onnx_backends(onnx_path, backend: str = "auto", devices=None, precision: str = "auto",
                       max_batch: int = 8, n_slots: int = 2, info: ModelInfo | None = None,
                       selection_notes: list[str] | None = None, **options) -> list[Backend]:
    """One backend per device for an effiseg ONNX file: the backend named, or ``auto``'s choice.

    Args:
        onnx_path (str | Path): an effiseg ONNX file.
        backend (str): "auto", "tensorrt", "onnxruntime" or "openvino".
        devices: as ``parse_devices`` takes; None: every GPU like the first for TensorRT, the CPU for
            ONNX Runtime and OpenVINO, and for ``auto`` the GPUs, then the CPU.
        precision (str): "auto", "fp32", "fp16", "bf16" or "int8" (each backend says which it serves).
        max_batch (int): the most images per batch.
        n_slots (int): batches in flight per backend.
        info (ModelInfo | None): the model's metadata; None: read from the file.
        selection_notes (list[str] | None): receives what was chosen, skipped and why.
        **options: the named backend's own options (e.g. TensorRT's ``engine=``, ``cache_dir=``;
            ONNX Runtime's ``provider=``); refused with ``auto``.

    Returns:
        list[Backend]: one open backend per device; the caller closes them.

    Raises:
        BackendUnavailable: no backend can run the model here (every reason listed), or the named
            one cannot (what to install).
        ValueError: an unknown backend or device, ``torch`` for an ONNX file, or options with ``auto``.

    Example:
        >>> notes = []
        >>> [backend] = open_onnx_backends("model.onnx", devices="cpu", selection_notes=notes)  # doctest: +SKIP
        >>> notes[-1]                                                                          # doctest: +SKIP
        'auto: chose openvino on cpu'
    """
    onnx_path = Path(onnx_path)
    info = info or ModelInfo.from_onnx(onnx_path)
    notes = selection_notes if selection_notes is not None else []
    device_list = parse_devices(devices)
    if backend == "torch":
        raise ValueError("the torch backend runs training checkpoints, not ONNX files: pass the checkpoint "
                         "folder (Segmenter.from_checkpoint / effiseg-run --model CHECKPOINT)")
    if backend in ("tensorrt", "onnxruntime", "openvino"):
        cls = backend_class(backend)
        devs = device_list or (default_gpu_devices(notes) if backend == "tensorrt" else ["cpu"])
        return _open_each(devs, lambda d: cls(info, onnx_path, device=d, precision=precision,
                                              max_batch=max_batch, n_slots=n_slots, **options),
                          notes, tolerant=device_list is None)
    if backend != "auto":
        backend_class(backend)  # raises the unknown-backend error
    if options:
        raise ValueError(f"backend options {sorted(options)} need an explicit backend, not auto")
    if device_list is None:
        gpu_devices = default_gpu_devices(notes) if _gpu_backend_installed() else ["cuda:0"]
    else:
        gpu_devices = [d for d in device_list if d != "cpu"]
    errors = []
    for name, devs in auto_attempts(gpu_devices, cpu_allowed=device_list is None or device_list == ["cpu"],
                                    openvino=_openvino_installed(), precision=precision):
        try:
            cls = backend_class(name)
            opened = _open_each(devs, lambda d: cls(info, onnx_path, device=d, precision=precision,
                                                    max_batch=max_batch, n_slots=n_slots),
                                notes, tolerant=device_list is None)
        except BackendUnavailable as e:
            # One line per skipped choice; the install hints come in full with --backend NAME (and
            # below, when no backend can run at all).
            notes.append(f"auto: skipped {name} on {','.join(devs)} ({str(e).split(': ', 1)[0]}; "
                         f"--backend {name} says how to fix it)")
            errors.append(f"{name} on {','.join(devs)}: {e}")
            continue
        except Exception as e:  # installed but failed (e.g. engine build): say so, try the next one
            notes.append(f"auto: {name} on {','.join(devs)} failed ({type(e).__name__}: {e}); trying the next backend")
            errors.append(f"{name} on {','.join(devs)}: {type(e).__name__}: {e}")
            continue
        notes.append(f"auto: chose {name} on {','.join(b.device for b in opened)}")
        return opened
    raise BackendUnavailable("no backend can run this model here:\n  " + "\n  ".join(errors))


def open_checkpoint_backends(checkpoint, devices=None, precision: str = "auto", max_batch: int = 8,
                             n_slots: int = 2, selection_notes: list[str] | None = None,
                             **options) -> list[Backend]:
    """Torch backends for a training checkpoint: on the given devices, else on every GPU torch
    sees that is like the first, else on the CPU.

    Args:
        checkpoint (str | Path): a checkpoint folder, config.json or .safetensors file.
        devices: as ``parse_devices`` takes; None: as above.
        precision (str): "auto", "fp32" or "fp16" (``torch_backend.choose_torch_mode``).
        max_batch (int): the most images per batch.
        n_slots (int): batches in flight per backend.
        selection_notes (list[str] | None): receives the devices chosen and any left out.
        **options: ``TorchBackend`` options (``output_format``, ``cuda_graphs``, ``input_size``, ``tta``).

    Returns:
        list[Backend]: one open ``TorchBackend`` per device.

    Raises:
        BackendUnavailable: torch is not installed, or cannot run on a named device.
    """
    cls = backend_class("torch")
    named = parse_devices(devices)
    device_list = named
    if device_list is None:
        torch = importlib.import_module("effiseg.runtime.backends.torch_backend").import_torch()
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        gpus = [(torch.cuda.get_device_name(i), tuple(torch.cuda.get_device_capability(i))) for i in range(count)]
        device_list = same_kind_as_first(gpus, selection_notes) or ["cpu"]
    opened = _open_each(device_list, lambda d: cls(checkpoint, device=d, precision=precision,
                                                   max_batch=max_batch, n_slots=n_slots, **options),
                        selection_notes, tolerant=named is None)
    if selection_notes is not None:
        selection_notes.append(f"torch backend on {','.join(b.device for b in opened)}")
    return opened
