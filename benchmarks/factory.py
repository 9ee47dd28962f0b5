"""Building a runtime backend for one benchmark configuration, through the runtime's registry."""
from __future__ import annotations

import dataclasses

from .models import ModelSet
from .targets import Target

SLOTS = 2  # the runtime's default (double buffering); model-only timing uses slot 0


def make_factory(models: ModelSet, ort_threads: int | None = None, slots: int = SLOTS, tta: str = "none"):
    """factory(target, input_format, batch, (h, w)) -> an open effiseg Backend. ``tta``: the run-time
    choice (runtime/tta.py) every backend runs: the torch backend inside its graph, the ONNX backends
    through ``TTABackend`` ("none" leaves the torch backend on its checkpoint's own setting, so that
    a checkpoint whose config bakes TTA into its exports does the same work in torch)."""
    from effiseg.runtime.backends import backend_class
    from effiseg.runtime.model_info import ModelInfo
    from effiseg.runtime.tta import at_size, check_sizes_runnable, plan_tta, wrap_per_device

    def factory(target: Target, input_format: str, batch: int, size: tuple[int, int]):
        spec, device = target.spec, target.device
        h, w = size
        if spec.source == "checkpoint":
            if input_format != "uint8-nhwc":
                raise ValueError("the torch backend takes uint8-nhwc input only")
            cls = backend_class("torch")
            return cls(models.checkpoint, device=device, precision=spec.precision, max_batch=batch,
                       n_slots=slots, output_format=models.output_format, input_size=(h, w),
                       tta=None if tta == "none" else tta)
        path = models.onnx_for(input_format, (h, w))
        info = ModelInfo.from_onnx(path)
        if (info.input_height, info.input_width) != (h, w):
            info = dataclasses.replace(info, input_height=h, input_width=w)  # dynamic-size file
        plan = plan_tta(tta, info)
        if not plan.extra_passes:
            return open_onnx(spec, device, info, path, batch)
        check_sizes_runnable(plan, info)
        return wrap_per_device(plan, info, lambda size_info, n, first: [
            open_onnx(spec, device, size_info, path, n) if first is None else
            at_size(first[0], size_info, n, lambda: open_onnx(spec, device, size_info, path, n))], batch, slots)[0]

    def open_onnx(spec, device, info, path, batch):
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
