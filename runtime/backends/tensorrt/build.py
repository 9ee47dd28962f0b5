"""Building engines: the precision chosen for the GPU, the engine cache, and the ahead-of-time build.

``engine_bytes_from_onnx_file`` chains the loaders (ONNX bytes -> network -> engine bytes);
``engine_from_cache_or_build`` puts the engine cache (runtime/trt_engine_cache.py) in front of it;
``build_engine_file`` is the same build run once ahead of time into a file of the user's choosing
(``effiseg-export MODEL.onnx --engine OUT.engine``), which ``TensorRTBackend(engine=...)`` then
loads without building.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ...cuda_memory import CudaUnavailable, DeviceInfo, open_cuda, parse_cuda_device
from ...model_info import ModelInfo
from ...tensorrt_rules import tensorrt_gpu_problem
from ...trt_engine_cache import (CacheResult, EngineKey, atomic_write_bytes, engine_path, fast_fp16_answer_path,
                                 file_sha256, load_or_build_engine, read_fast_fp16_answer, resolve_cache_dir,
                                 timing_cache_path, write_fast_fp16_answer)
from ..base import BackendUnavailable
from ..gpu_precision import PrecisionChoice
from .decisions import choose_precision, platform_has_fast_fp16
from .loaders import (Report, engine_bytes_from_network, engine_from_bytes, import_tensorrt, network_from_onnx_bytes,
                      tensorrt_logger)
from .settings import BuildSettings


def check_gpu_supported(trt_version: str, gpu: DeviceInfo) -> None:
    """Raise BackendUnavailable when this TensorRT release does not run on ``gpu`` (its last
    release for the GPU named, ``tensorrt_rules``): said before any build, which would otherwise
    fail late with "Unsupported SM"."""
    problem = tensorrt_gpu_problem(trt_version, gpu.compute_capability, gpu_name=gpu.name)
    if problem:
        raise BackendUnavailable(problem)


def choose_engine_precision(trt, logger, requested: str, gpu: DeviceInfo, cache_dir: Path,
                            trt_version: str) -> tuple[PrecisionChoice, object]:
    """The precision to build for ``requested`` on ``gpu``, and the Builder made to ask (or None).

    The builder's fast-FP16 answer decides, but creating a Builder loads TensorRT's builder library
    (seconds on 8.x): it is asked once per GPU and TensorRT version and the answer kept beside the
    engines, so a run whose engine is cached starts without a Builder.

    Returns:
        tuple: (PrecisionChoice, the ``trt.Builder`` created to ask, or None).
    """
    device_label = f"{gpu.name} (compute capability {gpu.cc_string})"
    fp16_flag = hasattr(getattr(trt, "BuilderFlag", None), "FP16")
    builder = None
    fast = False
    if requested != "fp32" and fp16_flag:
        answer_path = fast_fp16_answer_path(cache_dir, trt_version, gpu.name, gpu.cc_string)
        fast = read_fast_fp16_answer(answer_path)
        if fast is None:
            builder = trt.Builder(logger)
            fast = platform_has_fast_fp16(builder, gpu.compute_capability)
            write_fast_fp16_answer(answer_path, fast)
    return choose_precision(requested, fast, device_label, fp16_flag, trt_version), builder


def engine_key(onnx_path: Path, info: ModelInfo, settings: BuildSettings, precision: str, trt_version: str,
               gpu: DeviceInfo) -> EngineKey:
    """The engine cache key (trt_engine_cache.EngineKey) of a build: the profile is the one the
    model's metadata promises, so the key is known before the ONNX is parsed."""
    return EngineKey(
        onnx_sha256=file_sha256(onnx_path), tensorrt_version=trt_version, gpu_name=gpu.name,
        compute_capability=gpu.cc_string, precision=precision,
        profile=settings.profile(info).as_key(info.input_name), n_profiles=settings.n_profiles,
        workspace_mb=settings.workspace_mb)


def engine_bytes_from_onnx_file(trt, builder, logger, onnx_path: Path, info: ModelInfo, settings: BuildSettings,
                                precision: str, gpu: DeviceInfo, trt_version: str, cache_dir: Path,
                                report: Report) -> bytes:
    """ONNX file -> serialised engine: parse, choose the profile from the parsed input, build.

    Raises:
        RuntimeError: TensorRT could not parse the file or build an engine (its reason quoted).
        ValueError: the parsed input does not fit the model's metadata.
    """
    network, _parser = network_from_onnx_bytes(trt, builder, logger, onnx_path.read_bytes(), onnx_path)
    profile = settings.profile(info, tuple(network.get_input(0).shape))
    timing = (timing_cache_path(cache_dir, trt_version, gpu.name, gpu.cc_string) if settings.timing_cache
              else None)
    report(f"building a TensorRT {precision} engine for {onnx_path.name} on {gpu.name} "
           f"(batch {profile.min[0]}..{profile.max[0]}); this takes from seconds to several minutes and is done "
           "once per GPU and TensorRT version", False)
    return engine_bytes_from_network(trt, builder, logger, network, profile, precision, settings.n_profiles,
                                     settings.workspace_bytes, timing, report, source=str(onnx_path))


@dataclass
class EngineSource:
    """Where a backend's engine came from, and what was built."""
    result: CacheResult
    precision: PrecisionChoice
    cache_dir: Path


def engine_from_cache_or_build(trt, runtime, logger, onnx_path: Path, info: ModelInfo, settings: BuildSettings,
                               gpu: DeviceInfo, trt_version: str, check_engine: Callable,
                               report: Report) -> EngineSource:
    """The engine for ``onnx_path`` from the engine cache, or built and cached.

    Args:
        check_engine: raises ValueError when a deserialised engine does not fit the backend (a
            stale or foreign cached engine then counts as unusable and is rebuilt).
        report: (message, warning) for the user; the precision fallback, the build, the cache.

    Raises:
        FileNotFoundError: ``onnx_path`` does not exist.
        RuntimeError: the build failed (TensorRT's reason).
    """
    if not onnx_path.is_file():
        raise FileNotFoundError(f"ONNX file not found: {onnx_path}")
    cache_dir = resolve_cache_dir(settings.cache_dir)
    choice, builder = choose_engine_precision(trt, logger, settings.precision, gpu, cache_dir, trt_version)
    if choice.message:
        report(choice.message, choice.warning)
    key = engine_key(onnx_path, info, settings, choice.precision, trt_version, gpu)
    path = engine_path(cache_dir, f"{info.variant}-{onnx_path.stem}", key)

    def deserialize(data: bytes):
        engine = engine_from_bytes(runtime, data)
        if engine is not None:
            check_engine(engine)
        return engine

    def build() -> bytes:
        return engine_bytes_from_onnx_file(trt, builder if builder is not None else trt.Builder(logger), logger,
                                           onnx_path, info, settings, choice.precision, gpu, trt_version, cache_dir,
                                           report)

    metadata = dict(key.components(), onnx_path=str(onnx_path), variant=info.variant,
                    requested_precision=settings.precision)
    result = load_or_build_engine(path, deserialize, build, report=lambda m: report(m, True), metadata=metadata)
    return EngineSource(result, choice, cache_dir)


def engine_metadata_path(engine_file: Path) -> Path:
    """``OUT.engine.json``: what an engine file was built from and for (the cache writes the same)."""
    return engine_file.with_name(engine_file.name + ".json")


def build_engine_file(onnx_path, output, settings: BuildSettings | None = None, device: str = "cuda:0",
                      info: ModelInfo | None = None, tensorrt=None, open_cuda_device=None,
                      report: Report = lambda message, warning: None) -> dict:
    """Build a TensorRT engine ahead of time and write it to ``output`` (with ``OUTPUT.json`` beside it).

    The engine runs only with the TensorRT version, GPU model and operating system it was built
    on; ``TensorRTBackend(info, onnx_path, engine=output)`` (or ``Segmenter.from_onnx(...,
    backend="tensorrt", engine=output)``) then starts without a build and refuses an engine made
    from another ONNX file or for another TensorRT or GPU, naming both.

    Args:
        onnx_path (str | Path): an effiseg ONNX file.
        output (str | Path): the engine file to write (atomically).
        settings (BuildSettings | None): precision, batches, slots (``n_profiles``), workspace;
            None: the defaults (auto precision, batch 1..8, 2 slots).
        device (str): the GPU to build for ("cuda:N").
        info (ModelInfo | None): the model's metadata; None: read from ``onnx_path``.
        tensorrt: the tensorrt module (tests hand in a fake); None: imported.
        open_cuda_device: ``device_index -> CudaApi`` (tests hand in a fake); None: the installed binding.
        report: (message, warning) for progress and decisions.

    Returns:
        dict: the metadata written beside the engine (the engine cache key's components, the
        precision built, the build time, the engine's size).

    Raises:
        BackendUnavailable: TensorRT or a CUDA binding is missing, or this TensorRT does not run on the GPU.
        FileNotFoundError: ``onnx_path`` does not exist.
        RuntimeError: TensorRT could not parse the file or build an engine.

    Example:
        >>> build_engine_file("model.onnx", "model.engine",  # doctest: +SKIP
        ...                   BuildSettings(precision="fp16", max_batch=8))
    """
    onnx_path, output = Path(onnx_path), Path(output)
    settings = settings or BuildSettings()
    if not onnx_path.is_file():
        raise FileNotFoundError(f"ONNX file not found: {onnx_path}")
    info = info or ModelInfo.from_onnx(onnx_path)
    trt = tensorrt if tensorrt is not None else import_tensorrt()
    trt_version = str(getattr(trt, "__version__", "unknown"))
    cuda = (open_cuda_device or open_cuda_for_tensorrt)(parse_cuda_device(device))
    try:
        with cuda.current():
            gpu = cuda.device_info()
            check_gpu_supported(trt_version, gpu)
            logger = tensorrt_logger(trt, settings.verbose)
            cache_dir = resolve_cache_dir(settings.cache_dir)
            choice, builder = choose_engine_precision(trt, logger, settings.precision, gpu, cache_dir, trt_version)
            if choice.message:
                report(choice.message, choice.warning)
            start = time.perf_counter()
            data = engine_bytes_from_onnx_file(trt, builder if builder is not None else trt.Builder(logger), logger,
                                               onnx_path, info, settings, choice.precision, gpu, trt_version,
                                               cache_dir, report)
            seconds = time.perf_counter() - start
    finally:
        cuda.close()
    key = engine_key(onnx_path, info, settings, choice.precision, trt_version, gpu)
    metadata = dict(key.components(), onnx_path=str(onnx_path), variant=info.variant,
                    requested_precision=settings.precision, build_seconds=round(seconds, 3), engine_bytes=len(data),
                    created=time.strftime("%Y-%m-%dT%H:%M:%S"))
    atomic_write_bytes(output, data)
    atomic_write_bytes(engine_metadata_path(output), (json.dumps(metadata, indent=2, sort_keys=True) + "\n").encode())
    return metadata


def open_cuda_for_tensorrt(device_index: int):
    """A CUDA binding on ``device_index``.

    Raises:
        BackendUnavailable: no CUDA binding (cuda-python or pycuda) is installed or usable.
    """
    try:
        return open_cuda(device_index)
    except CudaUnavailable as e:
        raise BackendUnavailable(f"the TensorRT backend needs a CUDA binding: {e}") from e
