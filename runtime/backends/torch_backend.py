"""PyTorch backend: runs a training checkpoint through the same graph effiseg-export traces.

It takes the same uint8 (N, H, W, 3) host buffers as the ONNX graph and applies the same
preprocessing (``effiseg.export.wrapper.SegmentationGraph``), so its masks match ONNX Runtime's
and TensorRT's up to floating-point rounding.

Modes:
* ``fp32`` (the baseline): eager float32, the network as trained.
* ``fp16`` (the fast mode): the network rewritten for inference
  (``effiseg.training.inference_model``: BatchNorm folded into the convolutions, the decoder's sum
  and first pointwise layers at half resolution; checked against the original when built). On
  CUDA also half-precision weights, channels_last memory layout, cuDNN autotuning and one CUDA
  graph per slot captured at ``max_batch`` (a partial last batch is run padded: its tail rows hold
  stale data and their outputs are ignored; this keeps one graph and one fixed block of memory per
  slot). Users without TensorRT get most of its speed this way. On a GPU without fast FP16
  (Maxwell, e.g. the Quadro M6000) it runs in FP32, keeping the rest, and says so
  (:func:`choose_torch_mode`). On the CPU it runs the rewritten network in fp32, and says so.
* ``auto``: the fast mode, FP16 where the GPU has fast FP16, else FP32 (the CPU included).

Slots on CUDA: each slot has a pinned host input, a device input, a pinned host output, its own
stream and event; ``submit`` enqueues H2D copy, the network and D2H copy on the slot's stream and
returns at once, so two slots overlap copies with compute. torch and timm are imported only when
a backend is constructed.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..model_info import ModelInfo
from .base import Backend, BackendUnavailable
from .gpu_precision import (PrecisionChoice, choose_gpu_precision, fast_fp16_from_compute_capability,
                            validate_precision_request)

TORCH_INSTALL_MESSAGE = "the torch backend needs PyTorch and timm: pip install \"effiseg[train]\""


def import_torch():
    try:
        import torch
    except ImportError as e:
        raise BackendUnavailable(f"{TORCH_INSTALL_MESSAGE} [import failed: {e}]") from e
    return torch


def choose_torch_mode(requested: str, on_cuda: bool, capability: tuple[int, int] | None = None,
                      device_label: str = "this GPU") -> tuple[PrecisionChoice, bool]:
    """(precision, whether the fast mode runs). ``fp32``: eager float32 as trained, the benchmark's
    baseline. ``auto`` and ``fp16``: the fast mode, the network rewritten for inference; on CUDA also
    channels_last, cuDNN autotuning and CUDA graphs, in the precision of the project's rule
    (``gpu_precision``): FP32 on a GPU without fast FP16, where the rest still pays off. On the CPU the
    fast mode is the rewritten network in float32."""
    requested = validate_precision_request(requested, "PyTorch")
    if not on_cuda:
        if requested == "fp16":
            return PrecisionChoice("fp32", "fp16 needs a CUDA GPU; the fast mode runs the rewritten network in fp32 "
                                   "on the CPU", warning=True), True
        return PrecisionChoice("fp32", None), requested == "auto"
    if requested == "fp32":
        return PrecisionChoice("fp32", None), False
    if capability is None:
        raise ValueError("a CUDA device needs its compute capability to choose the precision")
    gpu = f"{device_label} (compute capability {capability[0]}.{capability[1]})"
    return choose_gpu_precision(requested, fast_fp16_from_compute_capability(*capability), gpu,
                                "the fast mode runs in FP32 instead"), True


def torch_kernels_cover(arch_list, compute_capability: tuple[int, int]) -> bool | None:
    """Whether a PyTorch built for ``arch_list`` (``torch.cuda.get_arch_list()``: "sm_50", "sm_86",
    "compute_90"...) has kernels for a GPU of this compute capability; None when the list is empty
    (torch cannot say). Binary code for sm_XY runs on the same major version at minor Y or above
    (sm_50 serves the 5.2 Quadro M6000); PTX (compute_XY) is compiled by the driver for XY and newer."""
    major, minor = compute_capability
    arches = [str(a) for a in arch_list or []]
    if not arches:
        return None
    for arch in arches:
        kind, _, number = arch.partition("_")
        digits = "".join(ch for ch in number if ch.isdigit())  # "90a" -> "90"
        if len(digits) < 2:
            continue
        built = (int(digits[:-1]), int(digits[-1]))
        if kind == "sm" and built[0] == major and built[1] <= minor:
            return True
        if kind == "compute" and built <= (major, minor):
            return True
    return False


def torch_gpu_problem(torch_version: str, arch_list, compute_capability: tuple[int, int], gpu_name: str,
                      windows: bool | None = None) -> str | None:
    """Why this PyTorch cannot run on the GPU (no kernels built for it), with the install that has
    them (runtime/INSTALL.md); None when it can or torch does not say. Without this check a run
    fails at its first convolution with "no kernel image is available for execution on the device"."""
    if torch_kernels_cover(arch_list, compute_capability) is not False:
        return None
    import os

    from ..install_matrix import gpu_generation, install_command
    major, minor = compute_capability
    generation = gpu_generation(compute_capability)
    return (f"PyTorch {torch_version} has no kernels for {gpu_name} (compute capability {major}.{minor}, "
            f"{generation}; it was built for {' '.join(arch_list)}): "
            f"{install_command('torch', generation, os.name == 'nt' if windows is None else windows)}")


def _apply_tta_choice(choice: str, info: ModelInfo, config):
    """(info with the chosen TTA, the plan): the run-time choice replaces the config's own setting."""
    import dataclasses

    from ..tta import plan_tta

    plain = dataclasses.replace(info, tta=False, tta_sizes=(), output_format="logits")
    plan = plan_tta(choice, plain)  # in torch any output format can follow the averaged logits
    native = config.input_size
    if plan.sizes and (info.input_height, info.input_width) != (native, native):
        raise ValueError(f"--tta {choice} runs the sizes {'+'.join(map(str, plan.sizes))} chosen for the model's "
                         f"input size {native}x{native}, not {info.input_height}x{info.input_width}")
    return dataclasses.replace(info, tta=plan.flips, tta_sizes=plan.sizes), plan


class TorchBackend(Backend):
    """A training checkpoint run by PyTorch through the graph effiseg-export traces.

    Args:
        checkpoint (str | Path): anything ``effiseg.training.checkpoint.load_model`` accepts (folder,
            config.json or .safetensors).
        device (str): "cpu" or "cuda:N".
        precision (str): "auto", "fp32" (eager, as trained) or "fp16" (:func:`choose_torch_mode`).
        max_batch (int): the most images per batch.
        n_slots (int): batches in flight (on CUDA each slot has its own stream and buffers).
        output_format (str): "logits", "probabilities" or "mask".
        cuda_graphs (bool | None): capture one CUDA graph per slot in the fast mode; None: on CUDA.
        input_size (int | tuple | None): run at this size instead of the checkpoint's.
        tta (str | None): "none", "flip" or "multiscale" (runtime/tta.py's choices, the same for every
            backend), run inside the torch graph on the device (training/tta.py, the code evaluation
            runs: the flips as one batch of 4N on CUDA, captured in the CUDA graph); None: the
            checkpoint config's own ``tta``/``tta_sizes``.

    Raises:
        BackendUnavailable: torch/timm are not installed, no such CUDA device, or this PyTorch has no
            kernels for the GPU (the install that has them is named).
        ValueError: an unknown precision or device, or a TTA choice the size cannot serve.
    """

    name = "torch"

    def __init__(self, checkpoint, device: str = "cpu", precision: str = "auto", max_batch: int = 8,
                 n_slots: int = 2, output_format: str = "logits", cuda_graphs: bool | None = None,
                 input_size: int | tuple[int, int] | None = None, tta: str | None = None):
        precision = validate_precision_request(precision, "PyTorch")  # before torch is imported
        torch = import_torch()
        try:
            from effiseg.export.wrapper import SegmentationGraph
            from effiseg.training.checkpoint import load_model, resolve_checkpoint
        except ImportError as e:
            raise BackendUnavailable(f"{TORCH_INSTALL_MESSAGE} [import failed: {e}]") from e
        self.torch = torch
        self.checkpoint = Path(checkpoint)
        # The files that define the model (weights, config): what a resumed folder run fingerprints.
        self.model_files = list(resolve_checkpoint(self.checkpoint))
        model, config = load_model(self.checkpoint, device="cpu")
        info = ModelInfo.from_checkpoint_config(config, path=self.checkpoint, output_format=output_format,
                                                dynamic_hw=True, input_size=input_size)
        self.tta_plan = None
        if tta is not None:
            info, self.tta_plan = _apply_tta_choice(tta, info, config)
        super().__init__(info, device, "fp32", max_batch, n_slots)
        if self.tta_plan is not None and self.tta_plan.extra_passes:
            self.note(self.tta_plan.describe())
        self.config = config
        self.torch_device = torch.device(device)
        on_cuda = self.torch_device.type == "cuda"
        if on_cuda and not torch.cuda.is_available():
            raise BackendUnavailable(f"this PyTorch has no CUDA device for {device!r} "
                                     f"(torch {torch.__version__}, built for CUDA {torch.version.cuda})")
        if self.torch_device.type not in ("cpu", "cuda"):
            raise ValueError(f"the torch backend runs on cpu or cuda:N, not {device!r}")
        if on_cuda and self.torch_device.index is None:
            self.torch_device = torch.device("cuda", 0)
        if on_cuda and self.torch_device.index >= torch.cuda.device_count():
            count = torch.cuda.device_count()
            raise BackendUnavailable(f"there is no {self.torch_device}: torch sees {count} CUDA GPU(s)"
                                     + (f" (cuda:0..cuda:{count - 1})" if count else ""))
        if on_cuda:
            problem = torch_gpu_problem(torch.__version__, torch.cuda.get_arch_list(),
                                        tuple(torch.cuda.get_device_capability(self.torch_device)),
                                        torch.cuda.get_device_name(self.torch_device))
            if problem:
                raise BackendUnavailable(problem)
        choice, fast = choose_torch_mode(precision, on_cuda,
                                         torch.cuda.get_device_capability(self.torch_device) if on_cuda else None,
                                         torch.cuda.get_device_name(self.torch_device) if on_cuda else "the CPU")
        if choice.message:
            self.note(choice.message, warning=choice.warning)
        self.precision = choice.precision
        self.cuda_graphs = bool(fast and on_cuda and (cuda_graphs is None or cuda_graphs))
        self.folded = False
        if fast:
            model = self._fold(model, (info.input_height, info.input_width))
        self.graph = SegmentationGraph(model, info.mean, info.std, "uint8-nhwc", output_format, info.threshold,
                                       tta=info.tta, tta_sizes=info.tta_sizes).eval()
        h, w = info.input_height, info.input_width
        out_dtype = torch.uint8 if output_format == "mask" else torch.float32
        if not on_cuda:
            self._host_in = [np.zeros((max_batch, h, w, 3), np.uint8) for _ in range(n_slots)]
            self._cpu_out: list[np.ndarray | None] = [None] * n_slots
            self.note(f"torch {torch.__version__}: fp32 eager on the CPU"
                      + (", the network rewritten for inference (the fast mode)" if self.folded else
                         ", the network as trained"))
            return
        dev = self.torch_device
        with torch.cuda.device(dev):
            self.graph.to(dev)
            if fast:
                if self.precision == "fp16":
                    self.graph.model.half()
                    self.graph.compute_dtype = torch.float16
                self.graph.model.to(memory_format=torch.channels_last)
                torch.backends.cudnn.benchmark = True  # process-wide; fixed shapes make it pay off
            self._pinned_in = [torch.empty((max_batch, h, w, 3), dtype=torch.uint8).pin_memory() for _ in range(n_slots)]
            self._host_in = [t.numpy() for t in self._pinned_in]
            self._pinned_out = [torch.empty((max_batch, h, w), dtype=out_dtype).pin_memory() for _ in range(n_slots)]
            self._host_out = [t.numpy() for t in self._pinned_out]
            self._dev_in = [torch.zeros((max_batch, h, w, 3), dtype=torch.uint8, device=dev) for _ in range(n_slots)]
            self._streams = [torch.cuda.Stream(dev) for _ in range(n_slots)]
            self._events = [torch.cuda.Event() for _ in range(n_slots)]
            self._graphs: list = []
            self._graph_out: list = []
            if self.cuda_graphs:
                for s in range(n_slots):
                    self._capture(s)
        described = (f"{'folded, ' if self.folded else ''}{self.precision} + channels_last"
                     + (" + CUDA graphs" if self.cuda_graphs else "") if fast else "fp32 eager")
        self.note(f"torch {torch.__version__}: {described} on {dev} ({torch.cuda.get_device_name(dev)})")

    def _fold(self, model, size: tuple[int, int]):
        """The fast mode's network: rewritten for inference and checked on the CPU against the
        original; where the check fails, the original runs and the backend says so."""
        from effiseg.training.inference_model import FoldError, fold_for_inference
        try:
            folded = fold_for_inference(model, probe_size=size)
        except FoldError as e:
            self.note(f"the fast mode runs the network unfolded: {e}", warning=True)
            return model
        self.folded = folded is not model
        return folded

    def _capture(self, slot: int) -> None:
        """Warm up (cuDNN picks its kernels) on a side stream, then capture one graph per slot; each
        graph gets its own memory pool, so slots never share activations."""
        torch = self.torch
        static_in = self._dev_in[slot]
        side = torch.cuda.Stream(self.torch_device)
        side.wait_stream(torch.cuda.current_stream(self.torch_device))
        with torch.no_grad(), torch.cuda.stream(side):
            for _ in range(3):
                self.graph(static_in)
        torch.cuda.current_stream(self.torch_device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(graph):
            out = self.graph(static_in)
        torch.cuda.synchronize(self.torch_device)
        self._graphs.append(graph)
        self._graph_out.append(out)

    # -- double-buffered API ------------------------------------------------------------------
    def host_input(self, slot: int) -> np.ndarray:
        return self._host_in[slot]

    def _submit(self, slot: int, n: int) -> None:
        torch = self.torch
        if self.torch_device.type == "cpu":
            with torch.inference_mode():
                out = self.graph(torch.from_numpy(self._host_in[slot][:n]))
            self._cpu_out[slot] = out.numpy()  # an fp16 output is converted by Backend.collect
            return
        with torch.cuda.device(self.torch_device), torch.cuda.stream(self._streams[slot]):
            if self.cuda_graphs:
                # Graphs run at max_batch: copy the whole pinned buffer (one DMA), replay.
                self._dev_in[slot].copy_(self._pinned_in[slot], non_blocking=True)
                self._graphs[slot].replay()
                out = self._graph_out[slot][:n]
            else:
                dev_in = self._dev_in[slot][:n]
                dev_in.copy_(self._pinned_in[slot][:n], non_blocking=True)
                with torch.no_grad():
                    out = self.graph(dev_in)
            self._pinned_out[slot][:n].copy_(out, non_blocking=True)
            self._events[slot].record(self._streams[slot])

    def _collect(self, slot: int, n: int) -> np.ndarray:
        if self.torch_device.type == "cpu":
            return self._cpu_out[slot]
        self._events[slot].synchronize()
        return self._host_out[slot][:n]

    def _close(self) -> None:
        if self.torch_device.type == "cuda":
            for stream in getattr(self, "_streams", []):
                stream.synchronize()
        self._graphs = []
        self._graph_out = []

    def describe(self) -> dict:
        d = super().describe()
        d.update({"checkpoint": str(self.checkpoint), "torch_version": self.torch.__version__,
                  "cuda_graphs": self.cuda_graphs})
        if self.torch_device.type == "cuda":
            d["gpu"] = self.torch.cuda.get_device_name(self.torch_device)
        return d
