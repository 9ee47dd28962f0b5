"""Building a runtime backend for one benchmark configuration, through the runtime's registry."""
from __future__ import annotations

import dataclasses

from .models import ModelSet
from .targets import Target

SLOTS = 2  # the runtime's default (double buffering); model-only timing uses slot 0


def make_factory(models: ModelSet, ort_threads: int | None = None, slots: int = SLOTS):
    """factory(target, input_format, batch, (h, w)) -> an open effiseg Backend."""
    from effiseg.runtime.backends import backend_class
    from effiseg.runtime.model_info import ModelInfo

    def factory(target: Target, input_format: str, batch: int, size: tuple[int, int]):
        spec, device = target.spec, target.device
        h, w = size
        if spec.source == "checkpoint":
            if input_format != "uint8-nhwc":
                raise ValueError("the torch backend takes uint8-nhwc input only")
            cls = backend_class("torch")
            return cls(models.checkpoint, device=device, precision=spec.precision, max_batch=batch,
                       n_slots=slots, output_format=models.output_format, input_size=(h, w))
        path = models.onnx_for(input_format, (h, w))
        info = ModelInfo.from_onnx(path)
        if (info.input_height, info.input_width) != (h, w):
            info = dataclasses.replace(info, input_height=h, input_width=w)  # dynamic-size file
        if spec.name.startswith("ov-"):
            options = {"threads": ort_threads} if ort_threads else {}
            return backend_class("openvino")(info, path, device=device, precision=spec.precision,
                                             max_batch=batch, n_slots=slots, **options)
        if spec.name.startswith("ort-"):
            provider = {"ort-cpu": "cpu", "ort-cpu-int8": "cpu", "ort-cuda": "cuda", "ort-trt": "tensorrt"}[spec.name]
            options = {"provider": provider}
            if ort_threads:
                options["intra_op_threads"] = ort_threads
            return backend_class("onnxruntime")(info, path, device=device, precision=spec.precision,
                                                max_batch=batch, n_slots=slots, **options)
        if spec.name.startswith("trt-"):
            return backend_class("tensorrt")(info, path, device=device, precision=spec.precision,
                                             max_batch=batch, n_slots=slots, opt_batch=batch)
        raise ValueError(f"no factory for backend {spec.name!r}")

    return factory
