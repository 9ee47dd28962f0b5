"""The TensorRT backend's former one-module home, kept so that ``from
effiseg.runtime.backends.tensorrt_backend import TensorRTBackend`` (effiseg-doctor, user code)
still works: the code lives in the package ``effiseg.runtime.backends.tensorrt``."""
from __future__ import annotations

from .tensorrt import *  # noqa: F401,F403 - the package's public names, unchanged
from .tensorrt import __all__  # noqa: F401
