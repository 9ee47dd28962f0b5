"""effiseg-bench's models: the untrained twin of an ONNX file reproduces its work (TTA, threshold,
decoder width), and twins and their exports are cached apart by their settings."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from effiseg.benchmarks.cli import bench_command
from effiseg.benchmarks.report import validate_result_file
from effiseg.benchmarks.targets import TARGETS, Target
from effiseg.runtime.model_info import ModelInfo


# -- what the twin of an ONNX file reproduces --------------------------------------------------------

@pytest.fixture(scope="module")
def tta_onnx(tiny_checkpoint, verify_images_dir, tmp_path_factory):
    """The tiny checkpoint exported as the bundled default is: flip TTA in the graph, threshold 0.45."""
    from conftest import export_tiny
    return export_tiny(tiny_checkpoint, tmp_path_factory.mktemp("tta_onnx") / "tta.onnx", verify_images_dir,
                       tta=True, threshold=0.45)


@pytest.fixture(scope="module")
def bench_cache(tmp_path_factory):
    """One cache for the tests below, holding a twin as the benchmark used to cache it: named without
    its TTA setting, and without TTA in its config."""
    from effiseg.training.checkpoint import model_config, save_checkpoint
    from effiseg.training.model import build_model
    cache = tmp_path_factory.mktemp("bench_cache")
    save_checkpoint(cache / "untrained-effisegnet-lite0-64-chdefault", build_model("effisegnet-lite0").eval(),
                    model_config("effisegnet-lite0", input_size=64, untrained=True))
    return cache


def test_the_twin_of_a_tta_onnx_runs_the_same_four_passes_in_torch_and_float32(tta_onnx, bench_cache):
    from effiseg.benchmarks.factory import make_factory
    from effiseg.benchmarks.models import resolve_models
    from effiseg.training.checkpoint import load_config
    models = resolve_models(tta_onnx, None, bench_cache, log=lambda m: None)
    assert models.checkpoint.name != "untrained-effisegnet-lite0-64-chdefault"  # the cached TTA-less twin
    config = load_config(models.checkpoint)
    assert config.tta is True and config.threshold == pytest.approx(0.45)
    assert config.variant == "effisegnet-lite0" and config.input_size == 64
    assert models.onnx_for("uint8-nhwc", (64, 64)) == tta_onnx
    float32 = models.onnx_for("float32-nchw", (64, 64))
    info = ModelInfo.from_onnx(float32)
    assert info.input_format == "float32-nchw" and info.tta is True and info.threshold == pytest.approx(0.45)
    assert "-tta-" in float32.name

    torch_eager = make_factory(models)(Target(TARGETS["torch-eager"], "cpu"), "uint8-nhwc", 1, (64, 64))
    try:
        assert torch_eager.info.tta is True and torch_eager.graph.tta is True
    finally:
        torch_eager.close()

    described = models.describe()
    assert described["tta"] is True and described["network_passes_per_image"] == 4
    assert described["twin"]["tta"] is True and described["twin"]["decoder_channels"] == 32
    assert "flip TTA (4 network passes per image)" in described["note"]
    assert "threshold 0.45" in described["note"] and "decoder channels 32" in described["note"]
    assert "same architecture" not in described["note"]


def test_twins_and_their_exports_are_cached_apart_by_their_tta_setting(bench_cache, tmp_path, monkeypatch):
    from effiseg.benchmarks import models
    from effiseg.export import onnx_export
    from effiseg.training.checkpoint import load_config
    plain = models.untrained_checkpoint(bench_cache, "effisegnet-lite0", 64, log=lambda m: None)
    with_tta = models.untrained_checkpoint(bench_cache, "effisegnet-lite0", 64, log=lambda m: None, tta=True)
    assert plain != with_tta
    assert load_config(plain).tta is False and load_config(with_tta).tta is True

    exported = []

    def export_checkpoint(checkpoint, output, **options):  # the cache's naming only, no export
        exported.append(checkpoint)
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_bytes(b"")
    monkeypatch.setattr(onnx_export, "export_checkpoint", export_checkpoint)
    log = lambda m: None  # noqa: E731
    paths = [models.export_cached(c, tmp_path, "float32-nchw", (64, 64), log=log) for c in (plain, with_tta)]
    assert paths[0] != paths[1] and "-tta-" in paths[1].name and "-tta-" not in paths[0].name
    assert exported == [plain, with_tta]


def test_a_file_whose_network_this_copy_exports_differently_is_noted(tta_onnx, bench_cache, tmp_path):
    import onnx

    from effiseg.benchmarks.models import resolve_models
    models = resolve_models(tta_onnx, None, bench_cache, log=lambda m: None)
    models.onnx_for("float32-nchw", (64, 64))  # the formats' own operators are no difference
    assert not any("operators" in n for n in models.notes)

    # A file from another version of the code: its first convolution traced as another operator
    # (only the operator names are compared; the file is never run).
    other = onnx.load(str(tta_onnx))
    next(n for n in other.graph.node if n.op_type == "Conv").op_type = "ConvTranspose"
    older = tmp_path / "older.onnx"
    onnx.save(other, str(older))
    models = resolve_models(older, None, bench_cache, log=lambda m: None)
    models.onnx_for("float32-nchw", (64, 64))
    (note,) = [n for n in models.notes if "operators" in n]
    assert "only in older.onnx: ConvTranspose" in note and "only in this copy's export: none" in note


def test_an_onnx_file_and_a_checkpoint_that_differ_in_tta_are_refused(tta_onnx, tiny_checkpoint, bench_cache, tmp_path):
    import shutil

    from effiseg.benchmarks.models import resolve_models
    with pytest.raises(ValueError, match=r"tta \(True in tta.onnx, False in the checkpoint\)"):
        resolve_models(tta_onnx, tiny_checkpoint, bench_cache, log=lambda m: None)
    matching = shutil.copytree(tiny_checkpoint, tmp_path / "ckpt_tta")
    config = json.loads((matching / "config.json").read_text())
    (matching / "config.json").write_text(json.dumps({**config, "tta": True, "threshold": 0.45}))
    models = resolve_models(tta_onnx, matching, bench_cache, log=lambda m: None)
    assert models.tta is True and models.onnx_for("uint8-nhwc", (64, 64)) == tta_onnx


def test_a_run_on_a_tta_onnx_times_four_passes_in_every_backend(tta_onnx, bench_cache, tmp_path):
    out = tmp_path / "out"
    args = ["--model", str(tta_onnx), "--backends", "ort-cpu", "--batch-sizes", "1", "--rounds", "1",
            "--warmup", "1", "--iters", "1", "--mode", "model", "--settle", "0", "--devices", "cpu",
            "--output", str(out), "--cache-dir", str(bench_cache), "--no-plot"]
    res = CliRunner().invoke(bench_command, args)
    assert res.exit_code == 0, res.output + repr(res.exception)
    data = json.loads((out / "effiseg_bench.json").read_text())
    validate_result_file(data)
    assert {r["key"]: r["tta"] for r in data["results"]} == {
        "model|torch-eager@cpu|uint8-nhwc|b1|64x64": True, "model|ort-cpu@cpu|uint8-nhwc|b1|64x64": True,
        "model|ort-cpu@cpu|float32-nchw|b1|64x64": True}
    assert data["model"]["tta"] is True and data["model"]["given_onnx"] == str(tta_onnx)
    assert any("flip TTA (4 network passes per image)" in n for n in data["notes"])
    assert not any("unequal work" in n for n in data["notes"])
    assert "flip TTA (4 network passes per image)" in (out / "effiseg_bench.txt").read_text()
