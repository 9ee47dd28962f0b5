"""CPU precisions: the int8 twin (effiseg-export --quantize int8) and the OpenVINO backend."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from effiseg.runtime.backends.openvino_backend import choose_cpu_precision
from effiseg.runtime.model_files import int8_sibling, is_int8_model

pytest.importorskip("onnxruntime")


def test_the_int8_twin_is_named_beside_its_model():
    assert int8_sibling("models/a.onnx").as_posix() == "models/a.int8.onnx"
    assert int8_sibling("models/a.int8.onnx").as_posix() == "models/a.int8.onnx"
    assert is_int8_model("a.int8.onnx") and not is_int8_model("a.onnx")


@pytest.mark.parametrize("requested, native, expected, warned", [
    ("auto", True, "bf16", False), ("auto", False, "fp32", False),
    ("bf16", True, "bf16", False), ("bf16", False, "fp32", True),
    ("fp32", True, "fp32", False), ("int8", False, "int8", False),
])
def test_openvino_precision_is_what_the_cpu_computes(requested, native, expected, warned):
    choice = choose_cpu_precision(requested, native_bf16=native)
    assert choice.precision == expected
    assert (choice.message is not None and "no native bfloat16" in choice.message) == warned
    with pytest.raises(ValueError, match="must be one of"):
        choose_cpu_precision("fp16", True)  # a GPU precision


def _shape_math_graph():
    """x -> Conv (data path) and x -> Shape -> float arithmetic -> Concat -> Cast -> Pad's pads, as timm's
    TensorFlow-style 'same' padding exports."""
    from onnx import TensorProto, helper
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"], name="shape"),
        helper.make_node("Cast", ["shape"], ["shape_f"], to=TensorProto.FLOAT, name="to_float"),
        helper.make_node("Mul", ["shape_f", "half"], ["half_f"], name="pad_math"),
        helper.make_node("Concat", ["half_f", "half_f"], ["pads_f"], axis=0, name="pads_concat"),
        helper.make_node("Cast", ["pads_f"], ["pads"], to=TensorProto.INT64, name="to_int"),
        helper.make_node("Pad", ["x", "pads"], ["padded"], name="pad"),
        helper.make_node("Conv", ["padded", "w"], ["y"], name="conv"),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [helper.make_tensor("half", TensorProto.FLOAT, [1], [0.0]),
                               helper.make_tensor("w", TensorProto.FLOAT, [1, 1, 1, 1], [1.0])])
    return graph


def test_the_shape_arithmetic_of_same_padding_stays_float():
    pytest.importorskip("onnx")
    from effiseg.export.quantize import shape_arithmetic_nodes
    kept = shape_arithmetic_nodes(_shape_math_graph())
    # Quantised, the pad sizes round to other integers and every feature map shifts by a pixel.
    assert kept == sorted(["shape", "to_float", "pad_math", "pads_concat", "to_int"])


def _calibration_folder(tmp_path, n=8):
    folder = tmp_path / "calibration"
    folder.mkdir()
    rng = np.random.default_rng(3)
    for i in range(n):
        small = rng.integers(0, 256, (6, 7, 3), dtype=np.uint8)
        Image.fromarray(small).resize((90, 70), Image.BILINEAR).save(folder / f"{i}.png")
    return folder


def _quantize_cli(model, calibration, min_agreement):
    from effiseg.export.cli import export_command
    return CliRunner().invoke(export_command, [str(model), "--quantize", "int8", "--calibration-images",
                                               str(calibration), "--calibration-count", "8", "--verify-images",
                                               str(calibration), "--int8-min-agreement", str(min_agreement)])


@pytest.fixture(scope="module")
def tiny_int8(tiny_onnx, tmp_path_factory):
    """A copy of the tiny model with its int8 twin beside it, made through effiseg-export. The tiny
    network is untrained (its logits sit near the threshold), so the agreement asked is 0.9; the
    trained model's twin agrees on more than 0.98 (the default)."""
    pytest.importorskip("onnx")
    folder = tmp_path_factory.mktemp("int8")
    model = folder / "tiny.onnx"
    shutil.copyfile(tiny_onnx, model)
    result = _quantize_cli(model, _calibration_folder(folder), 0.9)
    assert result.exit_code == 0, result.output
    return model


def test_an_int8_twin_that_disagrees_is_refused_and_not_written(tiny_onnx, tmp_path):
    pytest.importorskip("onnx")
    model = tmp_path / "tiny.onnx"
    shutil.copyfile(tiny_onnx, model)
    result = _quantize_cli(model, _calibration_folder(tmp_path), 0.99999)
    assert result.exit_code == 1 and "no int8 model written" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calibration", "tiny.onnx"]



def test_an_int8_twin_held_open_for_a_moment_is_still_replaced(tiny_onnx, tmp_path, monkeypatch):
    """Windows: renaming onto a file that another process has open (the virus scanner looking at the
    last twin, the search indexer) fails with PermissionError for as long as it holds it, usually
    milliseconds. The export waits that out as every other effiseg writer does, instead of failing
    after calibrating and checking the model."""
    import os
    pytest.importorskip("onnx")
    model = tmp_path / "tiny.onnx"
    shutil.copyfile(tiny_onnx, model)
    twin = int8_sibling(model)
    twin.write_bytes(b"the twin of an earlier export")
    real_replace, refused = os.replace, []

    def briefly_held(src, dst):
        if Path(dst) == twin and len(refused) < 2:
            refused.append(dst)
            raise PermissionError(13, "The process cannot access the file because it is being used by another process",
                                  str(src), None, str(dst))
        return real_replace(src, dst)
    monkeypatch.setattr(os, "replace", briefly_held)
    result = _quantize_cli(model, _calibration_folder(tmp_path), 0.9)
    assert result.exit_code == 0, result.output
    assert len(refused) == 2 and twin.read_bytes().startswith(b"\x08")  # an ONNX file now (field 1: ir_version)
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]

def test_export_writes_a_checked_int8_twin_that_keeps_the_metadata(tiny_int8):
    from effiseg.runtime.model_info import ModelInfo, read_onnx_metadata
    twin = int8_sibling(tiny_int8)
    report = json.loads(twin.with_name(twin.name + ".export.json").read_text())
    assert report["agreement_with_fp32"]["min_mask_agreement"] >= report["min_agreement_required"] == 0.9
    assert report["calibration_images"] == 8 and report["nodes_kept_float"] > 0
    assert read_onnx_metadata(twin)["effiseg.precision"] == "int8"
    assert ModelInfo.from_onnx(twin).variant == ModelInfo.from_onnx(tiny_int8).variant


def test_onnxruntime_int8_runs_the_twin_close_to_fp32(tiny_int8):
    from effiseg.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend
    from effiseg.runtime.model_info import ModelInfo
    info = ModelInfo.from_onnx(tiny_int8)
    batch = np.random.default_rng(0).integers(0, 256, (3, info.input_height, info.input_width, 3), dtype=np.uint8)
    with OnnxRuntimeBackend(info, tiny_int8, precision="fp32", max_batch=4) as fp32, \
            OnnxRuntimeBackend(info, tiny_int8, precision="int8", max_batch=4) as int8:
        assert int8.precision == "int8" and int8.onnx_path == int8_sibling(tiny_int8)
        ref, got = fp32.infer(batch), int8.infer(batch)
    assert got.shape == ref.shape and got.dtype == np.float32
    assert not np.array_equal(got, ref)  # really another model
    assert np.mean((got > 0) == (ref > 0)) > 0.9  # the bar the untrained tiny twin was made with


def test_int8_without_a_twin_says_how_to_make_it(tiny_onnx, tmp_path):
    from effiseg.runtime.cli import run_command
    src = tmp_path / "in"
    src.mkdir()
    Image.new("RGB", (40, 30), (120, 60, 30)).save(src / "a.png")
    result = CliRunner().invoke(run_command, ["--input", str(src), "--model", str(tiny_onnx), "--precision", "int8",
                                              "--no-progress"])
    assert result.exit_code == 3, result.output
    assert "--quantize int8" in result.output and "tiny.int8.onnx" in result.output


def test_a_gpu_never_runs_the_int8_twin(tiny_int8):
    from effiseg.runtime.backends import BackendUnavailable
    from effiseg.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend
    from effiseg.runtime.model_info import ModelInfo
    with pytest.raises(BackendUnavailable, match="int8 runs on the CPU"):
        OnnxRuntimeBackend(ModelInfo.from_onnx(tiny_int8), tiny_int8, device="cuda:0", precision="int8")


def test_openvino_matches_onnxruntime_and_keeps_two_batches_in_flight(tiny_int8):
    pytest.importorskip("openvino")
    from effiseg.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend
    from effiseg.runtime.backends.openvino_backend import OpenVinoBackend
    from effiseg.runtime.model_info import ModelInfo
    info = ModelInfo.from_onnx(tiny_int8)
    rng = np.random.default_rng(1)
    a = rng.integers(0, 256, (4, info.input_height, info.input_width, 3), dtype=np.uint8)
    b = rng.integers(0, 256, (2, info.input_height, info.input_width, 3), dtype=np.uint8)
    with OnnxRuntimeBackend(info, tiny_int8, precision="fp32", max_batch=4) as ort_backend:
        ref_a, ref_b = ort_backend.infer(a), ort_backend.infer(b)
    with OpenVinoBackend(info, tiny_int8, precision="fp32", max_batch=4, n_slots=2) as ov:
        assert ov.precision == "fp32"
        ov.host_input(0)[:4], ov.host_input(1)[:2] = a, b
        ov.submit(0, 4)
        ov.submit(1, 2)  # both in flight: asynchronous requests, one per slot
        with pytest.raises(RuntimeError, match="in flight"):
            ov.submit(0, 1)
        got_b = np.array(ov.collect(1))
        got_a = np.array(ov.collect(0))
        with pytest.raises(RuntimeError, match="without a submitted batch"):
            ov.collect(0)
    np.testing.assert_allclose(got_a, ref_a, atol=1e-4)
    np.testing.assert_allclose(got_b, ref_b, atol=1e-4)
    with OpenVinoBackend(info, tiny_int8, precision="int8", max_batch=4) as ov8:
        assert ov8.precision == "int8" and ov8.onnx_path == int8_sibling(tiny_int8)
        assert np.mean((ov8.infer(a) > 0) == (ref_a > 0)) > 0.9


def test_auto_takes_openvino_on_the_cpu_where_installed(tiny_onnx):
    pytest.importorskip("openvino")
    from effiseg.runtime.backends import open_onnx_backends
    notes = []
    backends = open_onnx_backends(tiny_onnx, "auto", devices="cpu", selection_notes=notes)
    try:
        assert [b.name for b in backends] == ["openvino"] and "auto: chose openvino on cpu" in notes
    finally:
        for b in backends:
            b.close()


def test_openvino_int8_of_a_dynamic_size_model_matches_onnxruntime(tiny_onnx_dynamic, tmp_path):
    """The bundled model has dynamic height and width; OpenVINO must run its int8 twin at the backend's
    size (left dynamic, it once gave masks with a test Dice of 0.035)."""
    pytest.importorskip("openvino")
    pytest.importorskip("onnx")
    from effiseg.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend
    from effiseg.runtime.backends.openvino_backend import OpenVinoBackend
    from effiseg.runtime.model_info import ModelInfo
    model = tmp_path / "dyn.onnx"
    shutil.copyfile(tiny_onnx_dynamic, model)
    assert _quantize_cli(model, _calibration_folder(tmp_path), 0.9).exit_code == 0
    info = ModelInfo.from_onnx(model)
    batch = np.random.default_rng(2).integers(0, 256, (3, info.input_height, info.input_width, 3), dtype=np.uint8)
    with OnnxRuntimeBackend(info, model, precision="int8", max_batch=4) as ort8, \
            OpenVinoBackend(info, model, precision="int8", max_batch=4) as ov8:
        ref, got = ort8.infer(batch), ov8.infer(batch)
    # The untrained tiny network's logits sit near 0, where the two engines' int8 rounding differs.
    assert np.mean((got > 0) == (ref > 0)) > 0.9
