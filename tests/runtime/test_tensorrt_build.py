"""Building TensorRT engines, without TensorRT or a GPU: the pure decisions (profile shapes,
cache key, precision incl. the Maxwell fallback, API branch, network flags, cache folder,
corrupt-cache handling, the release gate), the build settings, and the builds themselves through the
real backend against the fake ``tensorrt`` module of tests/tensorrt_fakes.py (engine and timing
caches, the FP16 choice per release, parser errors, prebuilt engines).
Run: .venv/bin/python -m pytest tests/runtime/test_tensorrt_build.py -q
"""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from effiseg.runtime.backends.base import BackendUnavailable
from effiseg.runtime.backends.gpu_precision import fast_fp16_from_compute_capability
from effiseg.runtime.backends.tensorrt import (
    BuildSettings, TensorRTBackend, build_engine_file, choose_precision, network_creation_flags,
    parse_trt_version, platform_has_fast_fp16, profile_shapes, select_io_api, squeeze_output_shape)
from effiseg.runtime.tensorrt_rules import tensorrt_gpu_problem
from effiseg.runtime.trt_engine_cache import (CACHE_ENV_VAR, EngineKey, atomic_write_bytes,
                                              default_cache_dir, engine_path, load_or_build_engine,
                                              resolve_cache_dir, timing_cache_path)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the shared fakes
from tensorrt_fakes import AMPERE, MAXWELL, FakeCuda, backend_on_fakes, fake_env, make_fake_trt  # noqa: E402
from tensorrt_test_models import make_tiny_onnx, onnxruntime_reference, random_batch, tiny_info  # noqa: E402


@pytest.fixture
def env(tmp_path):
    return fake_env(tmp_path)


def test_profile_shapes_static_hw_nhwc():
    info = tiny_info(32)
    p = profile_shapes(None, info, min_batch=1, opt_batch=4, max_batch=8)
    assert (p.min, p.opt, p.max, p.static_batch) == ((1, 32, 32, 3), (4, 32, 32, 3), (8, 32, 32, 3), None)
    assert profile_shapes((-1, 32, 32, 3), info, max_batch=8).opt == (8, 32, 32, 3)  # opt defaults to max


def test_profile_shapes_float_nchw_and_dynamic_hw():
    info = tiny_info(48, input_format="float32-nchw", dynamic_hw=True)
    p = profile_shapes((-1, 3, -1, -1), info, min_batch=2, max_batch=4)
    assert (p.min, p.opt, p.max) == ((2, 3, 48, 48), (4, 3, 48, 48), (4, 3, 48, 48))
    # metadata-only view of a dynamic-H/W model: H/W pinned to the model's input size
    assert profile_shapes(None, info, max_batch=4).max == (4, 3, 48, 48)


def test_profile_shapes_static_batch_and_errors():
    info = tiny_info(32)
    p = profile_shapes((1, 32, 32, 3), info, max_batch=8)
    assert p.static_batch == 1 and p.min == p.opt == p.max == (1, 32, 32, 3)
    with pytest.raises(ValueError, match="height is 64"):
        profile_shapes((-1, 64, 32, 3), info)
    with pytest.raises(ValueError, match="4-D"):
        profile_shapes((-1, 32, 32), info)
    with pytest.raises(ValueError, match="min_batch <= opt_batch"):
        profile_shapes(None, info, min_batch=4, opt_batch=2, max_batch=8)


def _key(**changes) -> EngineKey:
    base = EngineKey(onnx_sha256="ab" * 32, tensorrt_version="8.5.3.1", gpu_name="Quadro M6000",
                     compute_capability="5.2", precision="fp32",
                     profile=(("images", (1, 32, 32, 3), (8, 32, 32, 3), (8, 32, 32, 3)),), n_profiles=2)
    return dataclasses.replace(base, **changes)


_KEY_IN_A_CHILD = """
import sys
from effiseg.runtime.trt_engine_cache import EngineKey
key = EngineKey(onnx_sha256="ab" * 32, tensorrt_version="8.5.3.1", gpu_name="Quadro M6000", compute_capability="5.2",
                precision="fp32", profile=(("images", (1, 32, 32, 3), (8, 32, 32, 3), (8, 32, 32, 3)),), n_profiles=2,
                platform="linux")
print(key.digest())
"""


def test_cache_key_is_stable_across_processes():
    """A cached engine is found by a later run only if every process computes the same key: no
    per-process hash (Python randomises str hashes per process) may leak into it."""
    import os
    import subprocess
    here = _key(platform="linux").digest()
    assert len(here) == 64
    json.dumps(_key().components())  # serialisable for the sidecar file
    for seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        child = subprocess.run([sys.executable, "-c", _KEY_IN_A_CHILD], capture_output=True, text=True, env=env,
                               timeout=120)
        assert child.returncode == 0, child.stderr
        assert child.stdout.strip() == here


@pytest.mark.parametrize("change", [
    {"onnx_sha256": "cd" * 32}, {"tensorrt_version": "10.3.0"}, {"gpu_name": "Tesla M40"},
    {"compute_capability": "6.1"}, {"precision": "fp16"}, {"n_profiles": 3}, {"schema": 999},
    {"workspace_mb": 2048}, {"platform": "win32" if sys.platform != "win32" else "linux"},
    {"profile": (("images", (1, 32, 32, 3), (4, 32, 32, 3), (8, 32, 32, 3)),)},
    {"profile": (("images", (1, 32, 32, 3), (8, 32, 32, 3), (16, 32, 32, 3)),)},
])
def test_cache_key_changes_with_every_component(change, tmp_path):
    assert _key(**change).digest() != _key().digest()
    assert engine_path(tmp_path, "m", _key(**change)) != engine_path(tmp_path, "m", _key())


def test_engine_and_timing_cache_names(tmp_path):
    p = engine_path(tmp_path, "effisegnet lite0/v1", _key())
    assert p.parent == tmp_path and p.suffix == ".engine" and "fp32" in p.name and " " not in p.name
    t = timing_cache_path(tmp_path, "8.5.3.1", "Quadro M6000", "5.2")
    assert t.parent == tmp_path and "sm52" in t.name and "8.5.3.1" in t.name


def test_platform_has_fast_fp16_prefers_builder_then_compute_capability():
    class Builder86:
        platform_has_fast_fp16 = False

    class Builder10:  # property removed
        pass

    class BrokenBuilder:
        @property
        def platform_has_fast_fp16(self):
            raise RuntimeError("gone")

    assert platform_has_fast_fp16(Builder86(), (8, 6)) is False       # the builder knows best
    assert platform_has_fast_fp16(Builder10(), (8, 6)) is True
    assert platform_has_fast_fp16(Builder10(), (5, 2)) is False
    assert platform_has_fast_fp16(BrokenBuilder(), (5, 2)) is False
    assert platform_has_fast_fp16(None, (7, 5)) is True


def test_precision_maxwell_fp16_request_falls_back_loudly():
    label = "Quadro M6000 (compute capability 5.2)"
    choice = choose_precision("fp16", fast_fp16_from_compute_capability(5, 2), label)
    assert choice.precision == "fp32" and choice.warning
    assert "Quadro M6000" in choice.message and "5.2" in choice.message and "FP32" in choice.message


def test_precision_auto_and_explicit():
    auto_maxwell = choose_precision("auto", False, "Quadro M6000 (compute capability 5.2)")
    assert auto_maxwell.precision == "fp32" and not auto_maxwell.warning and "fp32" in auto_maxwell.message
    assert choose_precision("auto", True, "A4000").precision == "fp16"
    assert choose_precision("FP16", True, "A4000") == choose_precision("fp16", True, "A4000")
    assert choose_precision("fp32", True, "A4000").precision == "fp32"
    assert choose_precision("fp32", True, "A4000").message is None
    no_flag = choose_precision("fp16", True, "H100", fp16_flag_available=False, trt_version="11.0.0")
    assert no_flag.precision == "fp32" and no_flag.warning and "strongly typed" in no_flag.message
    with pytest.raises(ValueError, match="INT8"):
        choose_precision("int8", True, "A4000")
    with pytest.raises(ValueError, match="unknown precision"):
        choose_precision("bf16", True, "A4000")


@pytest.mark.parametrize("text,parsed", [("8.6.1", (8, 6, 1)), ("8.6.1.post1", (8, 6, 1)),
                                         ("10.13.0.35", (10, 13, 0)), ("10", (10, 0, 0)),
                                         ("", (0, 0, 0)), ("unknown", (0, 0, 0))])
def test_parse_trt_version(text, parsed):
    assert parse_trt_version(text) == parsed


class _TensorEngine:
    num_io_tensors = 2

    def get_tensor_name(self, i): ...
    def get_tensor_mode(self, n): ...
    def get_tensor_dtype(self, n): ...


class _TensorContext:
    def set_input_shape(self, n, s): ...
    def set_tensor_address(self, n, p): ...
    def execute_async_v3(self, h): ...


class _BindingEngine:
    num_bindings = 2

    def get_binding_name(self, i): ...
    def binding_is_input(self, i): ...


class _BindingContext:
    def set_binding_shape(self, i, s): ...
    def execute_async_v2(self, b, h): ...


class _BothEngine(_TensorEngine, _BindingEngine):
    pass


class _BothContext(_TensorContext, _BindingContext):
    pass


def test_select_io_api():
    assert select_io_api("10.0.1", _TensorEngine(), _TensorContext()) == "tensor"
    assert select_io_api("8.6.1", _BothEngine(), _BothContext()) == "tensor"
    assert select_io_api("8.4.3", _BothEngine(), _BothContext()) == "bindings"  # v3 not trusted before 8.5
    assert select_io_api("8.2.5", _BindingEngine(), _BindingContext()) == "bindings"
    assert select_io_api("weird", _TensorEngine(), _TensorContext()) == "tensor"
    assert select_io_api("10.0.1", _TensorEngine, _TensorContext) == "tensor"  # classes work too
    with pytest.raises(BackendUnavailable, match="neither"):
        select_io_api("8.6.1", object(), object())


def test_network_creation_flags():
    class Flags:
        EXPLICIT_BATCH = 0

    class Trt86:
        __version__ = "8.6.1"
        NetworkDefinitionCreationFlag = Flags

    class Trt10:
        __version__ = "10.3.0"
        NetworkDefinitionCreationFlag = Flags

    assert network_creation_flags(Trt86) == 1
    assert network_creation_flags(Trt10) == 0


@pytest.mark.parametrize("shape,hw", [((4, 1, 32, 48), (32, 48)), ((4, 32, 48), (32, 48)),
                                      ((4, 32, 48, 1), (32, 48))])
def test_squeeze_output_shape(shape, hw):
    assert squeeze_output_shape(shape) == hw


def test_squeeze_output_shape_rejects_multichannel():
    with pytest.raises(ValueError, match="output"):
        squeeze_output_shape((4, 2, 32, 32))


def test_cache_dir_resolution(tmp_path):
    home = tmp_path / "home"
    assert resolve_cache_dir(tmp_path / "x", environ={CACHE_ENV_VAR: "/elsewhere"}) == tmp_path / "x"
    assert resolve_cache_dir(None, environ={CACHE_ENV_VAR: str(tmp_path / "env")}) == tmp_path / "env"
    assert resolve_cache_dir(None, environ={CACHE_ENV_VAR: "  "}, platform="linux", home=home) == \
        home / ".cache" / "effiseg" / "trt"
    assert default_cache_dir({}, "linux", home) == home / ".cache" / "effiseg" / "trt"
    assert default_cache_dir({"XDG_CACHE_HOME": str(tmp_path / "xdg")}, "linux", home) == \
        tmp_path / "xdg" / "effiseg" / "trt"
    assert default_cache_dir({"LOCALAPPDATA": str(tmp_path / "Local")}, "win32", home) == \
        tmp_path / "Local" / "effiseg" / "trt"
    assert default_cache_dir({}, "win32", home) == home / "AppData" / "Local" / "effiseg" / "trt"


class _FakeDeserializer:
    """Accepts bytes that start with b"ENGINE"; b"RAISE" makes it raise like a picky runtime."""

    def __init__(self):
        self.calls = 0

    def __call__(self, data: bytes):
        self.calls += 1
        if data.startswith(b"RAISE"):
            raise RuntimeError("magic tag mismatch")
        return ("engine", data) if data.startswith(b"ENGINE") else None


def test_load_or_build_builds_then_reuses(tmp_path):
    path = tmp_path / "sub" / "m.engine"
    builds = []
    deser = _FakeDeserializer()
    first = load_or_build_engine(path, deser, lambda: builds.append(1) or b"ENGINE-1",
                                 metadata={"precision": "fp32"})
    assert first.built and first.engine == ("engine", b"ENGINE-1") and path.read_bytes() == b"ENGINE-1"
    assert json.loads(path.with_name(path.name + ".json").read_text())["precision"] == "fp32"
    second = load_or_build_engine(path, deser, lambda: builds.append(1) or b"ENGINE-2")
    assert not second.built and second.engine == ("engine", b"ENGINE-1") and len(builds) == 1


@pytest.mark.parametrize("garbage", [b"\x00\x01truncated", b"RAISE-this", b""])
def test_load_or_build_rebuilds_corrupt_engine(tmp_path, garbage):
    path = tmp_path / "m.engine"
    path.write_bytes(garbage)
    messages = []
    result = load_or_build_engine(path, _FakeDeserializer(), lambda: b"ENGINE-new", report=messages.append)
    assert result.built and result.engine == ("engine", b"ENGINE-new")
    assert path.read_bytes() == b"ENGINE-new"
    assert len(messages) == 1 and str(path) in messages[0] and "rebuilding" in messages[0]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_load_or_build_fails_clearly_when_fresh_engine_is_unusable(tmp_path):
    with pytest.raises(RuntimeError, match="just built"):
        load_or_build_engine(tmp_path / "m.engine", _FakeDeserializer(), lambda: b"not an engine")


def test_atomic_write_replaces_whole_file(tmp_path):
    target = tmp_path / "a" / "f.bin"
    atomic_write_bytes(target, b"one")
    atomic_write_bytes(target, b"two-two")
    assert target.read_bytes() == b"two-two"
    assert [p.name for p in target.parent.iterdir()] == ["f.bin"]


def test_missing_tensorrt_raises_backend_unavailable(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` now raises ImportError
    info = tiny_info(16)
    with pytest.raises(BackendUnavailable, match=r'pip install "effiseg\[trt\]".*Maxwell TensorRT 8\.5\.3.*"effiseg\[trt85\]"'):
        TensorRTBackend(info, tmp_path / "missing.onnx", cache_dir=tmp_path)


def test_int8_is_refused_before_anything_is_imported(tmp_path):
    with pytest.raises(ValueError, match="INT8"):
        TensorRTBackend(tiny_info(16), tmp_path / "m.onnx", precision="int8")


def test_engine_cache_reused_then_rebuilt_when_corrupt(env):
    info, onnx_path, cuda, trt, make = env()
    first = make(max_batch=2)
    assert first.engine_built and trt.stats["builds"] == 1
    engine_file = first.engine_path
    first.close()
    assert engine_file.is_file() and engine_file.with_name(engine_file.name + ".json").is_file()
    assert any(p.name.startswith("timing-") for p in engine_file.parent.iterdir())

    second = make(max_batch=2)
    assert not second.engine_built and trt.stats["builds"] == 1 and second.engine_path == engine_file
    second.close()

    engine_file.write_bytes(b"\x00garbage")
    third = make(max_batch=2)
    assert third.engine_built and trt.stats["builds"] == 2
    assert any("unusable" in m and "rebuilding" in m for m in third.messages)
    assert third.infer(random_batch(info, 1)).shape == (1, 16, 16)
    third.close()

    fourth = make(max_batch=4)  # another profile: another engine file
    assert fourth.engine_built and fourth.engine_path != engine_file
    fourth.close()


def test_timing_cache_is_reused_and_a_corrupt_one_is_replaced(env, tmp_path):
    info, onnx_path, cuda, trt, make = env()
    make(max_batch=2, precision="fp32").close()
    timing = [p for p in (tmp_path / "cache").iterdir() if p.name.startswith("timing-")]
    assert len(timing) == 1 and timing[0].read_bytes().startswith(b"FAKETC")
    make(max_batch=3, precision="fp32").close()  # new engine, timing cache read back
    assert trt.stats["timing_loaded"][-1].startswith(b"FAKETC+")
    timing[0].write_bytes(b"junk")
    backend = make(max_batch=1, precision="fp32")
    assert any("timing cache" in m and "unusable" in m for m in backend.messages)
    backend.close()


def test_maxwell_fp16_request_builds_fp32_and_says_so(env):
    info, onnx_path, cuda, trt, make = env(device=MAXWELL, version="8.5.3", fast_fp16=False)
    with make(precision="fp16", max_batch=2) as backend:
        assert backend.precision == "fp32" and backend.requested_precision == "fp16"
        assert trt.stats["fp16_builds"] == 0
        assert any("Quadro M6000" in m and "5.2" in m and "FP32" in m for m in backend.messages)
        assert "fp32" in backend.engine_path.name
        assert backend.describe()["compute_capability"] == "5.2"


@pytest.mark.parametrize("version,capability,last", [
    ("8.6.1", (5, 2), "8.5.3"),          # 8.6 dropped Maxwell: the Quadro M6000 needs 8.5.3
    ("10.3.0", (5, 2), "8.5.3"),
    ("10.0.1", (6, 1), "8.6.1"),         # 10.0 needs compute capability 7.0: Pascal stops at 8.6.1
    ("11.0.0", (6, 0), "8.6.1"),
    ("10.5.0", (7, 0), "10.4"),          # 10.5 removed Volta
])
def test_tensorrt_gate_refuses_a_release_too_new_for_the_gpu_naming_the_last_one(version, capability, last):
    message = tensorrt_gpu_problem(version, capability, windows=False)
    assert message and "\n" not in message
    assert f"TensorRT {last} is the last release" in message and f"{capability[0]}.{capability[1]}" in message


@pytest.mark.parametrize("version,capability", [
    ("8.5.3.1", (5, 2)), ("8.5.2", (5, 0)), ("8.6.1.post1", (6, 1)), ("10.4.0", (7, 0)),
    ("10.3.0", (7, 0)), ("10.16.1", (7, 5)), ("11.4.0", (8, 6)), ("unknown", (5, 2)),
])
def test_tensorrt_gate_lets_supported_pairs_through(version, capability):
    assert tensorrt_gpu_problem(version, capability) is None


def test_maxwell_gate_names_the_windows_zip_wheel_and_the_trt85_extra():
    message = tensorrt_gpu_problem("8.6.1", (5, 2), windows=True, python_tag="310")
    assert "tensorrt-8.5.3.1-cp310-none-win_amd64.whl" in message and "effiseg[trt85]" in message
    assert "trt86" not in message


@pytest.mark.parametrize("version", ["8.6.1", "10.3.0"])
def test_tensorrt_too_new_for_a_maxwell_gpu_is_refused_before_any_build(env, version):
    """A newer TensorRT would fail only at engine build ("Unsupported SM: 0x502"); say so before,
    and what to install, so that auto selection moves on to another backend."""
    info, onnx_path, cuda, trt, make = env(device=MAXWELL, version=version)
    with pytest.raises(BackendUnavailable) as raised:
        make(precision="fp32", max_batch=2)
    message = str(raised.value)
    assert "Quadro M6000" in message and "5.2" in message and "8.5.3" in message and "effiseg[trt85]" in message
    assert trt.stats.get("builds", 0) == 0 and not (onnx_path.parent / "cache").exists()


def test_fp16_on_a_fast_gpu_and_tensorrt10_without_builder_property(env):
    info, onnx_path, cuda, trt, make = env(version="10.3.0", fast_fp16=None)  # property removed
    with make(precision="auto", max_batch=2) as backend:
        assert backend.precision == "fp16" and trt.stats["fp16_builds"] == 1
        assert trt.stats["network_flags"] == [0]
        assert backend.io_api == "tensor"


def test_tensorrt86_uses_explicit_batch_flag(env):
    info, onnx_path, cuda, trt, make = env(version="8.6.1")
    with make(precision="fp32", max_batch=2):
        assert trt.stats["network_flags"] == [1]


def test_strongly_typed_tensorrt_reports_fp32(env):
    info, onnx_path, cuda, trt, make = env(version="11.0.0", fast_fp16=None, fp16_flag=False)
    with make(precision="fp16", max_batch=2) as backend:
        assert backend.precision == "fp32"
        assert any("strongly typed" in m for m in backend.messages)


def test_parser_refusal_of_an_old_uint8_graph_names_the_node_and_the_fix(env, tmp_path):
    """ONNX files from before the exporter cast first (uint8 Transpose at node 0) are refused by
    TensorRT's parser; the error says which node and how to re-export."""
    onnx = pytest.importorskip("onnx")
    info, onnx_path, cuda, trt, make = env()
    model = onnx.load(str(onnx_path))
    cast, transpose = model.graph.node[0], model.graph.node[1]
    assert (cast.op_type, transpose.op_type) == ("Cast", "Transpose")
    transpose.input[0], transpose.output[0] = "images", "nhwc_u8_t"   # transpose the bytes first...
    cast.input[0], cast.output[0] = "nhwc_u8_t", "nchw"                # ...then cast them
    model.graph.node.remove(cast)
    model.graph.node.insert(1, cast)
    old_style = tmp_path / "old-style.onnx"
    onnx.save(model, str(old_style))
    with pytest.raises(RuntimeError) as raised:
        backend_on_fakes(info, old_style, fake_trt=trt, fake_cuda=cuda, cache_dir=tmp_path / "cache")
    message = str(raised.value)
    assert "could not parse" in message and str(old_style) in message
    assert "node 0 (Transpose" in message and "Re-export it with this version's effiseg-export" in message


def test_a_cached_engine_starts_without_a_builder(env):
    """The fast-FP16 answer is asked of a Builder once per GPU and TensorRT version (creating one
    loads TensorRT's builder library); with the engine cached, later starts need no Builder."""
    info, onnx_path, cuda, trt, make = env(device=MAXWELL, version="8.5.3", fast_fp16=False)
    with make(precision="auto") as first:
        assert first.precision == "fp32"
    assert trt.stats["builders"] == 1 and trt.stats["builds"] == 1
    with make(precision="auto") as second:
        assert second.precision == "fp32"  # the recorded answer: Maxwell has no fast FP16
    assert trt.stats["builders"] == 1 and trt.stats["builds"] == 1


def test_a_model_under_a_non_ascii_path_builds(env, tmp_path):
    """Windows: TensorRT's parse_from_file opens paths in the ANSI code page (the fake does the same),
    so a model under C:\\Users\\Jörg\\ was not found; the backend hands TensorRT the bytes."""
    info, onnx_path, cuda, trt, make = env()
    moved = tmp_path / "Jörg Δ" / "model.onnx"
    moved.parent.mkdir()
    moved.write_bytes(onnx_path.read_bytes())
    batch = random_batch(info, 3)
    with backend_on_fakes(info, moved, fake_trt=trt, fake_cuda=cuda, cache_dir=tmp_path / "cache",
                             max_batch=4) as backend:
        out = backend.infer(batch)
    np.testing.assert_allclose(out, onnxruntime_reference(onnx_path, batch), rtol=1e-6, atol=1e-6)


# =============================================================================================
# Build settings, and engines built ahead of time
# =============================================================================================

def test_build_settings_are_one_validated_frozen_object():
    settings = BuildSettings(precision="FP16", max_batch=4)
    assert settings.precision == "fp16" and settings.opt_batch is None and settings.workspace_bytes == 1024 << 20
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.max_batch = 8
    assert settings.replace(max_batch=8).max_batch == 8 and settings.max_batch == 4
    with pytest.raises(ValueError, match="INT8"):
        BuildSettings(precision="int8")
    with pytest.raises(ValueError, match="min_batch <= opt_batch"):
        settings.replace(min_batch=3, opt_batch=2)
    with pytest.raises(ValueError, match="n_profiles"):
        BuildSettings(n_profiles=0)
    assert settings.profile(tiny_info(32)).max == (4, 32, 32, 3)


def test_backend_options_fill_the_settings_and_unknown_ones_are_named(env):
    info, onnx_path, cuda, trt, make = env()
    with make(settings=BuildSettings(precision="fp32", max_batch=2, workspace_mb=64), min_batch=2) as backend:
        assert (backend.settings.precision, backend.max_batch, backend.n_slots) == ("fp32", 2, 2)
        assert backend.settings.min_batch == 2 and backend.settings.workspace_mb == 64
    with make(settings=BuildSettings(max_batch=2), n_slots=3, precision="fp16") as backend:
        assert (backend.settings.n_profiles, backend.n_slots, backend.requested_precision) == (3, 3, "fp16")
    with pytest.raises(TypeError, match="workspace"):
        make(workspace=64)


def _engine_built_ahead(tmp_path, device=AMPERE, version="8.6.1", **settings):
    info = tiny_info(16)
    onnx_path = make_tiny_onnx(tmp_path / "model.onnx", info)
    cuda = FakeCuda(device)
    trt = make_fake_trt(cuda, version=version)
    said = []
    record = build_engine_file(onnx_path, tmp_path / "out" / "model.engine", BuildSettings(**settings),
                               tensorrt=trt, open_cuda_device=lambda index: cuda,
                               report=lambda message, warning: said.append(message))
    return info, onnx_path, cuda, trt, record, said


def test_an_engine_built_ahead_of_time_runs_without_a_build_or_a_cache(tmp_path):
    info, onnx_path, cuda, trt, record, said = _engine_built_ahead(tmp_path, precision="fp32", max_batch=4,
                                                                    cache_dir=tmp_path / "cache")
    engine_file = tmp_path / "out" / "model.engine"
    assert engine_file.is_file() and trt.stats["builds"] == 1 and any("building a TensorRT fp32" in m for m in said)
    assert json.loads((tmp_path / "out" / "model.engine.json").read_text()) == record
    assert (record["precision"], record["tensorrt_version"], record["n_profiles"]) == ("fp32", "8.6.1", 2)
    assert cuda.memory == {} and cuda.host_live == 0  # the build leaves nothing on the device
    batch = random_batch(info, 5)
    with backend_on_fakes(info, onnx_path, trt, cuda, engine=engine_file, max_batch=4,
                          cache_dir=tmp_path / "other-cache") as backend:
        out = backend.infer(batch)
        assert backend.precision == "fp32" and not backend.engine_built and backend.engine_path == engine_file
        assert backend.describe()["prebuilt_engine"] is True
    np.testing.assert_allclose(out, onnxruntime_reference(onnx_path, batch), rtol=1e-6, atol=1e-6)
    assert trt.stats["builds"] == 1 and not (tmp_path / "other-cache").exists()
    with backend_on_fakes(info, None, trt, cuda, engine=engine_file.read_bytes(), precision="fp32",
                          max_batch=4) as from_bytes:  # the bytes alone, no ONNX file
        np.testing.assert_allclose(from_bytes.infer(batch), out)


def test_a_prebuilt_engine_for_another_tensorrt_or_onnx_is_refused_naming_both(tmp_path):
    info, onnx_path, cuda, trt, record, said = _engine_built_ahead(tmp_path, precision="fp32", max_batch=2)
    engine_file = tmp_path / "out" / "model.engine"
    newer = make_fake_trt(cuda, version="10.3.0")
    with pytest.raises(BackendUnavailable, match=r"TensorRT 8\.6\.1 .*this is TensorRT 10\.3\.0.*--engine"):
        backend_on_fakes(info, onnx_path, newer, cuda, engine=engine_file)
    other = make_tiny_onnx(tmp_path / "other.onnx", tiny_info(16), seed=7)
    with pytest.raises(ValueError, match="another ONNX file"):
        backend_on_fakes(info, other, trt, cuda, engine=engine_file)
    with pytest.raises(RuntimeError, match="could not load the engine"):
        backend_on_fakes(info, onnx_path, trt, cuda, engine=b"not an engine")
    with pytest.raises(ValueError, match="3 slots need 3"):  # built for 2 slots
        backend_on_fakes(info, onnx_path, trt, cuda, engine=engine_file, n_slots=3)
    with pytest.raises(FileNotFoundError, match="missing.engine"):
        backend_on_fakes(info, onnx_path, trt, cuda, engine=tmp_path / "missing.engine")
    assert cuda.memory == {} and cuda.host_live == 0 and cuda.handles_live == 0


def test_effiseg_export_engine_builds_from_an_onnx_file(tmp_path, monkeypatch):
    """effiseg-export MODEL.onnx --engine OUT: the build's decisions on stderr, the engine and its
    record written."""
    from click.testing import CliRunner

    from effiseg.export.cli import export_command
    from effiseg.runtime.backends.tensorrt import build as build_module

    onnx_path = make_tiny_onnx(tmp_path / "model.onnx", tiny_info(16))
    cuda = FakeCuda(MAXWELL)
    trt = make_fake_trt(cuda, version="8.5.3", fast_fp16=False)
    monkeypatch.setenv(CACHE_ENV_VAR, str(tmp_path / "cache"))
    monkeypatch.setattr(build_module, "import_tensorrt", lambda: trt)  # the CLI imports TensorRT itself
    monkeypatch.setattr(build_module, "open_cuda_for_tensorrt", lambda index: cuda)
    result = CliRunner().invoke(export_command, [str(onnx_path), "--engine", str(tmp_path / "m.engine"),
                                                 "--precision", "fp16", "--engine-batch", "4"])
    assert result.exit_code == 0, result.output
    assert "warning: FP16 requested, but Quadro M6000" in result.output and "wrote " in result.output
    record = json.loads((tmp_path / "m.engine.json").read_text())
    assert (record["precision"], record["requested_precision"], record["gpu_name"]) == ("fp32", "fp16", "Quadro M6000")
    assert record["profile"][0][3] == [4, 16, 16, 3]


def test_effiseg_export_engine_without_tensorrt_names_the_install_and_writes_nothing(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from effiseg.export.cli import export_command

    onnx_path = make_tiny_onnx(tmp_path / "model.onnx", tiny_info(16))
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` now raises ImportError
    result = CliRunner().invoke(export_command, [str(onnx_path), "--engine", str(tmp_path / "none.engine")])
    assert result.exit_code == 1 and 'pip install "effiseg[trt]"' in result.output
    assert not (tmp_path / "none.engine").exists()
