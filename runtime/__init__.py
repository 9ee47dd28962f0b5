"""effiseg.runtime: inference over folders of images, importable without torch or timm.

``Segmenter`` (effiseg.runtime.segmenter) is the API; ``effiseg-run`` (effiseg.runtime.cli) the
command line. Backends live in effiseg.runtime.backends and import their engines lazily.
"""
from .backends.base import Backend, BackendUnavailable
from .model_config import ModelConfig
from .model_info import ModelInfo
from .segmenter import Segmenter

__all__ = ["Backend", "BackendUnavailable", "ModelConfig", "ModelInfo", "Segmenter"]
