"""TensorRT's uint8 rules, checked without TensorRT: the graphs its ONNX parser refuses are found,
the ones it takes pass, and the bundled default model keeps to them."""
import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper  # noqa: E402

from effiseg.runtime.tensorrt_rules import tensorrt_uint8_problems  # noqa: E402
from effiseg.runtime.cli import DEFAULT_MODEL  # noqa: E402


def _model(nodes, out_name="out", out_type=TensorProto.FLOAT):
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("images", TensorProto.UINT8, [1, 4, 4, 3])],
                              [helper.make_tensor_value_info(out_name, out_type, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_transpose_of_uint8_input_is_refused_cast_first_is_taken():
    transpose_first = _model([helper.make_node("Transpose", ["images"], ["t"], perm=[0, 3, 1, 2], name="tr"),
                              helper.make_node("Cast", ["t"], ["out"], to=TensorProto.FLOAT)])
    (problem,) = tensorrt_uint8_problems(transpose_first)
    assert problem.startswith("node 0 (Transpose 'tr') produces the UINT8 intermediate 't'")
    cast_first = _model([helper.make_node("Cast", ["images"], ["f"], to=TensorProto.FLOAT),
                         helper.make_node("Transpose", ["f"], ["out"], perm=[0, 3, 1, 2])])
    assert tensorrt_uint8_problems(cast_first) == []


def test_uint8_output_must_be_cast_from_float():
    float_in = [helper.make_node("Cast", ["images"], ["f"], to=TensorProto.FLOAT),
                helper.make_node("Greater", ["f", "f"], ["above"])]
    from_bool = _model(float_in + [helper.make_node("Cast", ["above"], ["out"], to=TensorProto.UINT8)],
                       out_type=TensorProto.UINT8)
    (problem,) = tensorrt_uint8_problems(from_bool)
    assert "casts BOOL to UINT8" in problem
    via_float = _model(float_in + [helper.make_node("Cast", ["above"], ["af"], to=TensorProto.FLOAT),
                                   helper.make_node("Cast", ["af"], ["out"], to=TensorProto.UINT8)],
                       out_type=TensorProto.UINT8)
    assert tensorrt_uint8_problems(via_float) == []


def test_uint8_cast_to_an_integer_is_refused():
    model = _model([helper.make_node("Cast", ["images"], ["i"], to=TensorProto.INT32),
                    helper.make_node("Cast", ["i"], ["out"], to=TensorProto.FLOAT)])
    (problem,) = tensorrt_uint8_problems(model)
    assert "casts UINT8 to INT32" in problem


def test_bundled_default_model_keeps_to_the_rules():
    assert tensorrt_uint8_problems(DEFAULT_MODEL) == []


@pytest.mark.parametrize("output_format", ["logits", "probabilities", "mask"])
@pytest.mark.parametrize("input_format", ["uint8-nhwc", "float32-nchw"])
def test_the_tensorrt_tests_own_models_keep_to_the_rules(tmp_path, input_format, output_format):
    """The hand-made graphs the TensorRT integration tests build: a rule broken here would make
    those tests fail on a TensorRT machine for a reason that is not the backend's."""
    from tensorrt_test_models import make_tiny_onnx, tiny_info
    path = make_tiny_onnx(tmp_path / "tiny.onnx", tiny_info(input_format=input_format, output_format=output_format))
    assert tensorrt_uint8_problems(path) == []
