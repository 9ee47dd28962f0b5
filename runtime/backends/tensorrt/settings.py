"""How a TensorRT engine is built: one typed, frozen object instead of loose keyword options.

Every field that changes the engine is here, so that the backend, the ahead-of-time build
(``effiseg-export MODEL.onnx --engine OUT.engine``) and the engine cache's key read the same values;
change one with ``dataclasses.replace``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from ...model_info import ModelInfo
from .decisions import ProfileShapes, profile_shapes, validate_precision_request

DEFAULT_WORKSPACE_MB = 1024


@dataclass(frozen=True)
class BuildSettings:
    """The settings of one TensorRT engine build.

    Args:
        precision (str): "auto" (fp16 where the GPU has fast FP16, else fp32), "fp16" (fp32 with a
            warning on GPUs without fast FP16, e.g. Maxwell) or "fp32". What was built is the
            backend's ``precision``.
        max_batch (int): the largest batch of the optimisation profile.
        min_batch (int): the smallest; a smaller batch runs padded to it.
        opt_batch (int | None): the batch TensorRT tunes for; None: ``max_batch`` (the pipeline
            fills whole batches).
        n_profiles (int): identical optimisation profiles, one per backend slot (a profile serves
            one execution context at a time: see the package docstring).
        workspace_mb (int): the builder's workspace limit in MiB (part of the engine cache key).
        timing_cache (bool): read and update the per-GPU timing cache beside the engines, so a
            rebuild re-times only the layers that changed.
        cache_dir (Path | None): the engine cache folder; None: ``EFFISEG_TRT_CACHE``, else the
            per-user cache folder (``trt_engine_cache.resolve_cache_dir``).
        verbose (bool): forward TensorRT's info and verbose messages to Python logging.

    Raises:
        ValueError: an unknown precision (INT8 included: effiseg builds no calibrated TensorRT
            engines), or batches outside 1 <= min_batch <= opt_batch <= max_batch.

    Example:
        >>> settings = BuildSettings(precision="fp32", max_batch=4)
        >>> dataclasses.replace(settings, workspace_mb=2048).workspace_bytes
        2147483648
    """

    precision: str = "auto"
    max_batch: int = 8
    min_batch: int = 1
    opt_batch: int | None = None
    n_profiles: int = 2
    workspace_mb: int = DEFAULT_WORKSPACE_MB
    timing_cache: bool = True
    cache_dir: Path | None = None
    verbose: bool = False

    def __post_init__(self):
        set_field = object.__setattr__   # frozen: normalised once, here
        set_field(self, "precision", validate_precision_request(self.precision))
        set_field(self, "max_batch", int(self.max_batch))
        set_field(self, "min_batch", int(self.min_batch))
        if self.opt_batch is not None:
            set_field(self, "opt_batch", int(self.opt_batch))
        if not 1 <= self.min_batch <= (self.max_batch if self.opt_batch is None else self.opt_batch) <= self.max_batch:
            raise ValueError(f"need 1 <= min_batch <= opt_batch <= max_batch, got "
                             f"{self.min_batch}/{self.opt_batch}/{self.max_batch}")
        if int(self.n_profiles) < 1:
            raise ValueError(f"n_profiles must be >= 1, not {self.n_profiles}")
        if int(self.workspace_mb) < 1:
            raise ValueError(f"workspace_mb must be >= 1, not {self.workspace_mb}")
        set_field(self, "n_profiles", int(self.n_profiles))
        set_field(self, "workspace_mb", int(self.workspace_mb))
        if self.cache_dir is not None and str(self.cache_dir) != "":
            set_field(self, "cache_dir", Path(self.cache_dir))

    @property
    def workspace_bytes(self) -> int:
        return self.workspace_mb << 20

    def profile(self, info: ModelInfo, network_shape=None) -> ProfileShapes:
        """The optimisation profile of the model's input (``decisions.profile_shapes``).

        Args:
            info (ModelInfo): the model (input format and size).
            network_shape (tuple | None): the parsed network input shape (-1: dynamic); None: what
                the model's metadata promises (the engine cache key uses this one).

        Returns:
            ProfileShapes: min/opt/max shapes, and the batch of a fixed-batch ONNX.
        """
        return profile_shapes(network_shape, info, self.min_batch, self.opt_batch, self.max_batch)

    def replace(self, **changes) -> "BuildSettings":
        """A copy with ``changes`` (validated again)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))
