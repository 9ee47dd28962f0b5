"""The two I/O API flavours of TensorRT, behind one small interface.

TensorRT 8.5 introduced the tensor-name API (``set_input_shape``, ``set_tensor_address``,
``execute_async_v3``); TensorRT 10 removed the binding-index API (``set_binding_shape``,
``execute_async_v2``) it replaced. :func:`decisions.select_io_api` asks the engine and context
which they have; :func:`io_for` gives the matching object, so the slot code never branches on
the release.
"""
from __future__ import annotations

from .decisions import select_io_api

__all__ = ["TensorNameIO", "BindingIO", "io_for", "select_io_api"]


class TensorNameIO:
    """I/O through tensor names (TensorRT >= 8.5): the profile is chosen per context."""

    def __init__(self, trt, engine):
        self.engine = engine
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]

    def dtype(self, name):
        return self.engine.get_tensor_dtype(name)

    def engine_shape(self, name):
        return tuple(int(d) for d in self.engine.get_tensor_shape(name))

    def profile_shape(self, name, profile):
        lo, opt, hi = self.engine.get_tensor_profile_shape(name, profile)
        return tuple(int(d) for d in lo), tuple(int(d) for d in opt), tuple(int(d) for d in hi)

    def select_profile(self, context, profile, stream):
        if not context.set_optimization_profile_async(profile, stream.handle):
            raise RuntimeError(f"TensorRT refused optimisation profile {profile}")

    def set_input_shape(self, context, profile, name, shape):
        if context.set_input_shape(name, tuple(shape)) is False:
            raise RuntimeError(f"TensorRT refused input shape {tuple(shape)} for {name!r}")

    def output_shape(self, context, profile, name):
        return tuple(int(d) for d in context.get_tensor_shape(name))

    def bind(self, context, profile, name, ptr):
        if context.set_tensor_address(name, int(ptr)) is False:
            raise RuntimeError(f"TensorRT refused the device address of {name!r}")

    def execute(self, context, profile, stream) -> bool:
        return bool(context.execute_async_v3(stream.handle))


class BindingIO:
    """I/O through binding indices (TensorRT < 8.5). Profile p owns bindings
    [p * per_profile, (p + 1) * per_profile)."""

    def __init__(self, trt, engine):
        self.engine = engine
        self.n_profiles = max(1, int(engine.num_optimization_profiles))
        self.per_profile = int(engine.num_bindings) // self.n_profiles
        names = [engine.get_binding_name(i) for i in range(self.per_profile)]
        self.index = {n: i for i, n in enumerate(names)}
        self.inputs = [n for n in names if engine.binding_is_input(self.index[n])]
        self.outputs = [n for n in names if n not in self.inputs]
        self._bindings: dict[int, list[int]] = {}

    def _at(self, profile, name):
        return profile * self.per_profile + self.index[name]

    def dtype(self, name):
        return self.engine.get_binding_dtype(self.index[name])

    def engine_shape(self, name):
        return tuple(int(d) for d in self.engine.get_binding_shape(self.index[name]))

    def profile_shape(self, name, profile):
        lo, opt, hi = self.engine.get_profile_shape(profile, self.index[name])
        return tuple(int(d) for d in lo), tuple(int(d) for d in opt), tuple(int(d) for d in hi)

    def select_profile(self, context, profile, stream):
        if hasattr(context, "set_optimization_profile_async"):
            if not context.set_optimization_profile_async(profile, stream.handle):
                raise RuntimeError(f"TensorRT refused optimisation profile {profile}")
        else:
            context.active_optimization_profile = profile

    def set_input_shape(self, context, profile, name, shape):
        if context.set_binding_shape(self._at(profile, name), tuple(shape)) is False:
            raise RuntimeError(f"TensorRT refused input shape {tuple(shape)} for {name!r}")

    def output_shape(self, context, profile, name):
        return tuple(int(d) for d in context.get_binding_shape(self._at(profile, name)))

    def bind(self, context, profile, name, ptr):
        table = self._bindings.setdefault(id(context), [0] * int(self.engine.num_bindings))
        table[self._at(profile, name)] = int(ptr)

    def execute(self, context, profile, stream) -> bool:
        return bool(context.execute_async_v2(self._bindings[id(context)], stream.handle))


def io_for(trt, engine, api: str):
    """The I/O object of ``api`` ("tensor" or "bindings", from ``select_io_api``) for ``engine``.

    Args:
        trt: the tensorrt module (or a fake with the same API).
        engine: a deserialised ``ICudaEngine``.
        api (str): "tensor" or "bindings".

    Returns:
        TensorNameIO | BindingIO: names of the inputs and outputs, and the calls to bind and run.
    """
    return TensorNameIO(trt, engine) if api == "tensor" else BindingIO(trt, engine)
