"""compare_onnx: two files of one model timed side by side; no timing assertions."""
import json

import pytest
from click.testing import CliRunner

pytest.importorskip("onnxruntime")

from effiseg.benchmarks.lab.compare_onnx import main  # noqa: E402

from conftest import export_tiny  # noqa: E402


def test_same_model_twice_and_a_mismatch(tiny_onnx, tiny_checkpoint, verify_images_dir, tmp_path):
    out = tmp_path / "compare.json"
    res = CliRunner().invoke(main, [str(tiny_onnx), str(tiny_onnx), "--images", str(verify_images_dir),
                                    "--batch-sizes", "1,2", "--rounds", "2", "--output", str(out)])
    assert res.exit_code == 0, res.output
    result = json.loads(out.read_text())
    assert set(result["batches"]) == {"1", "2"}
    for entry in result["batches"].values():
        assert len(entry["samples_ms_a"]) == len(entry["samples_ms_b"]) == 2
        assert entry["max_abs_output_difference"] == 0.0 and entry["b_over_a"] > 0
    other = export_tiny(tiny_checkpoint, tmp_path / "f32.onnx", verify_images_dir, input_format="float32-nchw")
    res = CliRunner().invoke(main, [str(tiny_onnx), str(other), "--images", str(verify_images_dir)])
    assert res.exit_code == 2 and "different inputs" in res.output
