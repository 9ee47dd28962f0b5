"""On-disk cache of TensorRT engines and timing caches (pure Python: no TensorRT, no CUDA).

A TensorRT engine is only valid for the TensorRT version, GPU model and settings it was built
with, and building one takes from seconds to many minutes, so built engines are kept under
:func:`resolve_cache_dir` (``EFFISEG_TRT_CACHE``, else a per-user cache folder) in files named by
an :class:`EngineKey` digest over everything that changes the engine:

* the sha256 of the ONNX file's bytes (not its path or mtime: a copied file reuses its engine,
  an edited one is rebuilt),
* the TensorRT version, the GPU name and its compute capability,
* the precision, the optimisation profiles (min/opt/max shape of each input, number of
  profiles), the builder's workspace limit (it decides which tactics may be picked), the platform
  (engines are not portable between operating systems) and a schema number that changes when this
  package changes how it builds engines.

An engine that cannot be deserialised (truncated file, foreign bytes, TensorRT refusing it) is
deleted and rebuilt, with a message. Files are written atomically (temporary file in the same
folder, then ``os.replace``) so that a crash or a second process never leaves half an engine under
the final name. The builder's timing cache lives beside the engines, one per TensorRT version and
GPU, so a rebuild after an ONNX change re-times only the layers that changed.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .replace_file import replace_with_retry

CACHE_ENV_VAR = "EFFISEG_TRT_CACHE"
# Bump when the way engines are built changes (flags, profile layout, ...): old files are ignored.
ENGINE_SCHEMA = 1


def default_cache_dir(environ: dict | None = None, platform: str | None = None,
                      home: Path | None = None) -> Path:
    """The per-user engine cache folder: %LOCALAPPDATA%/effiseg/trt on Windows,
    $XDG_CACHE_HOME/effiseg/trt or ~/.cache/effiseg/trt elsewhere."""
    environ = os.environ if environ is None else environ
    platform = sys.platform if platform is None else platform
    home = Path.home() if home is None else Path(home)
    if platform.startswith("win"):
        base = environ.get("LOCALAPPDATA")
        root = Path(base) if base else home / "AppData" / "Local"
    else:
        base = environ.get("XDG_CACHE_HOME")
        root = Path(base) if base else home / ".cache"
    return root / "effiseg" / "trt"


def resolve_cache_dir(cache_dir: str | os.PathLike | None = None, environ: dict | None = None,
                      platform: str | None = None, home: Path | None = None) -> Path:
    """An explicit ``cache_dir`` wins, then the EFFISEG_TRT_CACHE variable, then the default."""
    environ = os.environ if environ is None else environ
    if cache_dir is not None and str(cache_dir) != "":
        return Path(cache_dir).expanduser()
    from_env = environ.get(CACHE_ENV_VAR, "").strip()
    if from_env:
        return Path(from_env).expanduser()
    return default_cache_dir(environ, platform, home)


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class EngineKey:
    onnx_sha256: str
    tensorrt_version: str
    gpu_name: str
    compute_capability: str          # "5.2"
    precision: str                   # "fp32" / "fp16"
    # ((input_name, min_shape, opt_shape, max_shape), ...) per input; every profile is identical.
    profile: tuple
    n_profiles: int = 1
    # The builder's workspace limit decides which tactics it may pick; an engine is also not portable
    # across platforms (NVIDIA's support matrix), so a cache shared between Windows and Linux keeps both.
    workspace_mb: int = 0
    platform: str = sys.platform
    schema: int = ENGINE_SCHEMA

    def components(self) -> dict[str, Any]:
        return {
            "schema": self.schema,
            "onnx_sha256": self.onnx_sha256,
            "tensorrt_version": self.tensorrt_version,
            "gpu_name": self.gpu_name,
            "compute_capability": self.compute_capability,
            "precision": self.precision,
            "profile": [[name, list(lo), list(opt), list(hi)] for name, lo, opt, hi in self.profile],
            "n_profiles": self.n_profiles,
            "workspace_mb": self.workspace_mb,
            "platform": self.platform,
        }

    def digest(self) -> str:
        canonical = json.dumps(self.components(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "model"


def engine_path(cache_dir: Path, model_label: str, key: EngineKey) -> Path:
    """``<cache>/<label>-<precision>-<digest>.engine``; the label only makes the folder readable."""
    return Path(cache_dir) / f"{_slug(model_label)}-{key.precision}-{key.digest()[:24]}.engine"


def timing_cache_path(cache_dir: Path, tensorrt_version: str, gpu_name: str,
                      compute_capability: str) -> Path:
    """Timing caches depend on the TensorRT version and the GPU, not on the model."""
    return Path(cache_dir) / (f"timing-trt{_slug(tensorrt_version)}-{_slug(gpu_name)}"
                              f"-sm{compute_capability.replace('.', '')}.cache")


def fast_fp16_answer_path(cache_dir: Path, tensorrt_version: str, gpu_name: str, compute_capability: str) -> Path:
    """Where the builder's fast-FP16 answer for one GPU and TensorRT version is kept."""
    return Path(cache_dir) / f"fast-fp16-{_slug(gpu_name)}-sm{_slug(compute_capability)}-trt{_slug(tensorrt_version)}.json"


def read_fast_fp16_answer(path: Path) -> bool | None:
    """The builder's answer recorded by an earlier run, or None (never asked, or unreadable)."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8")).get("platform_has_fast_fp16")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, bool) else None


def write_fast_fp16_answer(path: Path, value: bool) -> None:
    try:
        atomic_write_bytes(path, json.dumps({"platform_has_fast_fp16": bool(value)}).encode())
    except OSError:
        pass  # only a start-up shortcut: the next run asks the builder again


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        replace_with_retry(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def read_bytes_or_none(path: str | os.PathLike) -> bytes | None:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        return None


@dataclass
class CacheResult:
    engine: Any
    path: Path
    built: bool            # False: loaded from the cache
    build_seconds: float = 0.0


def load_or_build_engine(path: str | os.PathLike, deserialize: Callable[[bytes], Any],
                         build: Callable[[], bytes], report: Callable[[str], None] = lambda m: None,
                         metadata: dict | None = None) -> CacheResult:
    """Load the engine at ``path``, or build, save and load it.

    ``deserialize(data)`` returns the engine, or None / raises when the bytes are unusable;
    ``build()`` returns the serialised engine. A cached file that does not deserialise is reported,
    deleted and rebuilt. ``metadata`` (the key's components) is saved as ``<path>.json`` beside the
    engine for people looking at the cache folder; it is never read back for decisions.
    """
    path = Path(path)
    data = read_bytes_or_none(path)
    if data is not None:
        reason = None
        try:
            engine = deserialize(data)
            if engine is None:
                reason = "TensorRT could not deserialize it"
        except Exception as e:  # a corrupt or foreign file: rebuilding is the remedy
            engine, reason = None, f"{type(e).__name__}: {e}"
        if engine is not None:
            return CacheResult(engine, path, built=False)
        report(f"cached TensorRT engine {path} is unusable ({reason}); deleting it and rebuilding")
        try:
            path.unlink()
        except OSError:  # already gone, or held open on Windows: the atomic write replaces it
            pass
    start = time.perf_counter()
    data = build()
    seconds = time.perf_counter() - start
    atomic_write_bytes(path, data)
    if metadata is not None:
        info = dict(metadata, build_seconds=round(seconds, 3), engine_bytes=len(data),
                    created=time.strftime("%Y-%m-%dT%H:%M:%S"))
        atomic_write_bytes(path.with_name(path.name + ".json"),
                           (json.dumps(info, indent=2, sort_keys=True) + "\n").encode())
    engine = deserialize(data)
    if engine is None:
        raise RuntimeError(f"TensorRT could not deserialize the engine it just built ({path})")
    return CacheResult(engine, path, built=True, build_seconds=seconds)
