"""OpenVINO backend: the same effiseg ONNX file on the CPU, through Intel's OpenVINO runtime.

OpenVINO reads ONNX directly, so no second export exists. Why a second CPU engine: on the 2-core
AMD EPYC (Zen 4) it ran the one-pass network faster than ONNX Runtime's CPU provider in FP32, and
its BF16 mode uses the CPU's native bfloat16 instructions where they exist (AVX512-BF16, AMX);
measured side by side in ``benchmarks/results/cpu-epyc-2core-int8-openvino``.

Precision: ``fp32``; ``bf16`` only on a CPU that computes it natively (elsewhere fp32, said so);
``int8`` runs the quantised twin ``NAME.int8.onnx`` (``effiseg-export --quantize int8``); ``auto`` is
bf16 where native, else fp32, as ``auto`` is fp16 on a GPU with fast FP16: on the Kvasir-SEG test
split bf16 moved mean Dice by -0.0013 (0.9211 against 0.9224) at about twice fp32's speed. effiseg
always sets the hint itself, so the precision it reports is the one OpenVINO computes in.

Slots: each slot owns an asynchronous infer request and its host buffer; ``submit`` starts the
request and returns, so decoding the next batch overlaps inference as on a GPU.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..model_files import is_int8_model, resolve_int8
from ..model_info import ModelInfo
from .base import Backend, BackendUnavailable
from .gpu_precision import PrecisionChoice

OPENVINO_INSTALL_MESSAGE = "OpenVINO is not installed: pip install \"effiseg[openvino]\""
PRECISIONS = ("auto", "fp32", "bf16", "int8")


def import_openvino():
    try:
        import openvino
    except ImportError as e:
        raise BackendUnavailable(f"{OPENVINO_INSTALL_MESSAGE} [import failed: {e}]") from e
    return openvino


def choose_cpu_precision(requested: str, native_bf16: bool) -> PrecisionChoice:
    """What the CPU computes in for ``requested``: bf16 only where the CPU has it natively (emulated
    bf16 is slower than fp32); ``auto`` is bf16 there, else fp32."""
    if requested not in PRECISIONS:
        raise ValueError(f"precision for OpenVINO must be one of {', '.join(PRECISIONS)}, not {requested!r}")
    if requested == "auto":
        return PrecisionChoice("bf16" if native_bf16 else "fp32", None)
    if requested == "bf16" and not native_bf16:
        return PrecisionChoice("fp32", "precision bf16: fp32, because this CPU has no native bfloat16 "
                                       "(AVX512-BF16 or AMX)", warning=True)
    return PrecisionChoice(requested, None)


class OpenVinoBackend(Backend):
    """An effiseg ONNX file compiled by OpenVINO for the CPU, one asynchronous request per slot.

    Args:
        info (ModelInfo): the model's metadata (``ModelInfo.from_onnx``).
        onnx_path (str | Path): the ONNX file (its ``.int8.onnx`` twin runs for ``int8``).
        device (str): "cpu" (the only one effiseg runs OpenVINO on).
        precision (str): "auto" (bf16 where the CPU has it natively, else fp32), "fp32", "bf16" or
            "int8" (:func:`choose_cpu_precision`); ``self.precision`` is what runs.
        max_batch (int): the most images per batch.
        n_slots (int): batches in flight (one infer request each).
        threads (int | None): inference threads; None: OpenVINO's (every core).

    Raises:
        BackendUnavailable: OpenVINO is not installed, a GPU device, int8 of a float32-nchw export,
            or a missing int8 twin.
        ValueError: an unknown precision.
        RuntimeError: OpenVINO cannot read or compile the file.
    """

    name = "openvino"

    def __init__(self, info: ModelInfo, onnx_path, device: str = "cpu", precision: str = "auto",
                 max_batch: int = 8, n_slots: int = 2, threads: int | None = None):
        if device != "cpu":
            raise BackendUnavailable(f"effiseg runs OpenVINO on the CPU only, not {device}")
        super().__init__(info, device, "fp32", max_batch, n_slots)
        ov = import_openvino()
        if info.input_format != "uint8-nhwc" and precision == "int8":
            raise BackendUnavailable("int8 needs a uint8-nhwc export")
        core = ov.Core()
        native_bf16 = "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
        choice = choose_cpu_precision("int8" if is_int8_model(onnx_path) else precision, native_bf16)
        self.precision = choice.precision
        if choice.message:
            self.note(choice.message, warning=choice.warning)
        path = Path(onnx_path)
        if self.precision == "int8":
            try:
                path = resolve_int8(path)
            except FileNotFoundError as e:
                raise BackendUnavailable(str(e)) from None
        self.onnx_path = path
        config = {"PERFORMANCE_HINT": "LATENCY",
                  # int8 runs its quantised layers in int8 whatever the hint; the rest in fp32
                  "INFERENCE_PRECISION_HINT": "bf16" if self.precision == "bf16" else "f32"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        h, w = info.input_height, info.input_width
        try:
            model = core.read_model(str(path))
            # Height and width fixed at the size this backend runs (batch stays dynamic): with them left
            # dynamic, OpenVINO ran the bundled model's int8 twin wrongly (test Dice 0.035 against 0.922
            # from ONNX Runtime on the same file, benchmarks/results/cpu-epyc-2core-cpu-engines/before-static-shape).
            fixed = [-1, h, w, 3] if info.input_format == "uint8-nhwc" else [-1, 3, h, w]
            model.reshape({model.inputs[0]: ov.PartialShape(fixed)})
            self._compiled = core.compile_model(model, "CPU", config)
        except Exception as e:
            raise RuntimeError(f"OpenVINO cannot load {path}: {e}") from e
        shape = (max_batch, h, w, 3) if info.input_format == "uint8-nhwc" else (max_batch, 3, h, w)
        dtype = np.uint8 if info.input_format == "uint8-nhwc" else np.float32
        self._host_inputs = [np.zeros(shape, dtype) for _ in range(n_slots)]
        self._requests = [self._compiled.create_infer_request() for _ in range(n_slots)]
        self._ov = ov
        self.ov_version = ov.__version__ if hasattr(ov, "__version__") else ov.get_version()
        self.note(f"OpenVINO {self.ov_version}: CPU, {self.precision}")

    def host_input(self, slot: int) -> np.ndarray:
        return self._host_inputs[slot]

    def _submit(self, slot: int, n: int) -> None:
        request = self._requests[slot]
        # shared_memory: OpenVINO reads the host buffer in place; the pipeline leaves a slot's buffer
        # alone until collect(), as it does for a GPU's copy.
        request.set_input_tensor(self._ov.Tensor(self._host_inputs[slot][:n], shared_memory=True))
        request.start_async()

    def _collect(self, slot: int, n: int) -> np.ndarray:
        request = self._requests[slot]
        request.wait()
        return request.get_output_tensor().data.reshape(n, self.info.input_height, self.info.input_width)

    def _close(self) -> None:
        for request in getattr(self, "_requests", []):
            try:
                request.wait()  # a request still running must finish before its buffers go
            except Exception:
                pass
        self._requests = []
        self._compiled = None

    def describe(self) -> dict:
        d = super().describe()
        d.update({"openvino_version": self.ov_version, "model": str(self.onnx_path)})
        return d
