"""Run-time TTA (``--tta none|flip|multiscale``): the choice, the arithmetic, and every backend's
passes against the code evaluation runs (training/tta.py)."""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from effiseg.runtime.model_info import ModelInfo
from effiseg.runtime.tta import (TTAPlan, check_sizes_runnable, flip_mean, plan_tta, resize_bilinear,
                                 resize_uint8)

RECOMMENDED = {"flips": True, "sizes": [352, 416], "threshold": 0.55}


def _info(**changes) -> ModelInfo:
    info = ModelInfo(path=None, variant="effisegnet-lite2", input_height=352, input_width=352, threshold=0.5,
                     dynamic_hw=True, hw_multiple=32, tta_recommended=dict(RECOMMENDED))
    return dataclasses.replace(info, **changes)


def test_the_choices_and_the_recommendation():
    assert plan_tta("none", _info()) == TTAPlan("none")
    assert not plan_tta("none", _info()).extra_passes
    assert plan_tta("flip", _info()) == TTAPlan("flip", flips=True, threshold=0.55)
    multiscale = plan_tta("multiscale", _info())
    assert multiscale == TTAPlan("multiscale", flips=True, sizes=(352, 416), threshold=0.55)
    assert "8 network passes" in multiscale.describe()
    check_sizes_runnable(multiscale, _info())  # dynamic, multiples of 32: runs


def test_the_recommendation_survives_the_onnx_metadata():
    meta = _info().to_metadata()
    back = ModelInfo.from_metadata(meta)
    assert back.tta_recommended == RECOMMENDED and back.hw_multiple == 32 and back.tta is False
    del meta["effiseg.tta_recommended"], meta["effiseg.hw_multiple"]  # a file exported before run-time TTA
    old = ModelInfo.from_metadata(meta)
    assert old.tta_recommended == {} and old.hw_multiple == 1


@pytest.mark.parametrize("choice,info,says", [
    ("flip", _info(tta=True), "TTA in its graph"),
    ("multiscale", _info(tta_sizes=(352, 416)), "TTA in its graph"),
    ("flip", _info(output_format="mask"), "--output-format logits"),
    ("flip", _info(input_format="float32-nchw"), "--input-format uint8-nhwc"),
    ("multiscale", _info(tta_recommended={}), "records no multi-scale sizes"),
    ("both", _info(), "must be one of"),
])
def test_choices_a_model_cannot_serve_are_refused(choice, info, says):
    with pytest.raises(ValueError, match=says):
        plan_tta(choice, info)


def test_multiscale_needs_a_graph_that_runs_at_the_sizes():
    plan = plan_tta("multiscale", _info())
    with pytest.raises(ValueError, match="--dynamic-hw-x32"):
        check_sizes_runnable(plan, _info(dynamic_hw=False, hw_multiple=1))
    with pytest.raises(ValueError, match="multiples of 64"):
        check_sizes_runnable(plan, _info(hw_multiple=64))


def test_resizes_are_pytorchs_bilinear():
    import torch
    import torch.nn.functional as F

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 52, 52)).astype(np.float32)
    for size in (44, 64):  # shrink and enlarge
        want = F.interpolate(torch.from_numpy(logits)[:, None], size=(size, size), mode="bilinear",
                             align_corners=False)[:, 0].numpy()
        np.testing.assert_allclose(resize_bilinear(logits, size, size), want, atol=1e-5)
    images = rng.integers(0, 256, (2, 52, 52, 3), dtype=np.uint8)
    for size in (44, 64):
        want = F.interpolate(torch.from_numpy(images).permute(0, 3, 1, 2).float(), size=(size, size),
                             mode="bilinear", align_corners=False).permute(0, 2, 3, 1).numpy()
        out = np.zeros((2, size, size, 3), np.uint8)
        resize_uint8(images, size, size, out)
        assert np.abs(out.astype(np.float32) - want).max() <= 1.0  # rounded to the graph's uint8 input


def test_flip_mean_undoes_each_flip():
    base = np.random.default_rng(1).normal(size=(2, 5, 7)).astype(np.float32)
    batch = np.concatenate([base, base[:, :, ::-1], base[:, ::-1], base[:, ::-1, ::-1]])
    np.testing.assert_allclose(flip_mean(batch, 2), base, rtol=1e-6)


# -- a real network: the exported plain graph + run-time TTA against training/tta.py ----------------

@pytest.fixture(scope="module")
def plain_x32(tiny_checkpoint, verify_images_dir, tmp_path_factory):
    """The tiny checkpoint with a recommendation (flips at 64+96), exported plain with height and width
    dynamic for multiples of 32."""
    from effiseg.export.onnx_export import export_checkpoint

    folder = tmp_path_factory.mktemp("tta_ckpt")
    for f in Path(tiny_checkpoint).iterdir():
        shutil.copy(f, folder / f.name)
    config = json.loads((folder / "config.json").read_text())
    config["tta_recommended"] = {"flips": True, "sizes": [64, 96], "threshold": 0.45}
    (folder / "config.json").write_text(json.dumps(config))
    onnx_path = folder / "plain.onnx"
    report = export_checkpoint(folder, onnx_path, hw_multiple=32, verify_dir=verify_images_dir, verify_count=2,
                               log=lambda *a: None)
    assert report["ok"] and report["upsampling"] == "resize" and report["decoder_merge"] == "auto"
    return folder, onnx_path


def _batch(n=3, size=64):
    return np.random.default_rng(2).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _torch_tta(folder, batch, flips, sizes):
    import torch

    from effiseg.export.wrapper import SegmentationGraph
    from effiseg.training.checkpoint import load_model

    model, config = load_model(folder)
    graph = SegmentationGraph(model, config.mean, config.std, tta=flips, tta_sizes=sizes).eval()
    with torch.no_grad():
        return graph(torch.from_numpy(batch)).numpy()


def test_the_x32_export_checks_parity_at_the_recommended_sizes(plain_x32):
    folder, onnx_path = plain_x32
    report = json.loads(onnx_path.with_name(onnx_path.name + ".export.json").read_text())
    assert {tuple(c["size"]) for c in report["parity"]["checks"]} == {(64, 64), (128, 128), (96, 96)}
    info = ModelInfo.from_onnx(onnx_path)
    assert info.dynamic_hw and info.hw_multiple == 32 and not info.tta and info.tta_sizes == ()
    assert info.tta_recommended == {"flips": True, "sizes": [64, 96], "threshold": 0.45}


def test_flip_on_onnxruntime_is_evaluations_flip_tta(plain_x32):
    from effiseg.runtime import Segmenter

    folder, onnx_path = plain_x32
    batch = _batch()
    with Segmenter.from_onnx(onnx_path, backend="onnxruntime", devices="cpu", max_batch=2, tta="flip") as seg:
        assert seg.threshold == pytest.approx(0.45)  # the recommendation's, with TTA and no --threshold
        assert seg.info.tta is True and seg.backends[0].inner[None].max_batch == 8
        out = seg.backends[0].infer(batch)  # a full batch of 2 and a partial one
    want = _torch_tta(folder, batch, True, ())
    np.testing.assert_allclose(out, want, atol=2e-4 * max(1.0, np.abs(want).max()))
    plain = _torch_tta(folder, batch, False, ())
    assert np.abs(plain - want).max() > 1e-2  # the flips changed something: the test can tell


def test_multiscale_on_onnxruntime_is_evaluations_arithmetic_on_uint8_inputs(plain_x32):
    """Per size the flips' mean, logits resized back bilinearly, averaged over sizes: exactly what
    training/tta.py does, once the 96x96 input is the rounded uint8 image the graph takes."""
    import torch
    import torch.nn.functional as F

    from effiseg.runtime import Segmenter

    folder, onnx_path = plain_x32
    batch = _batch()
    with Segmenter.from_onnx(onnx_path, backend="onnxruntime", devices="cpu", max_batch=4,
                             tta="multiscale", threshold=0.5) as seg:
        assert seg.threshold == 0.5 and set(seg.backends[0].inner) == {64, 96}
        # One ONNX Runtime session (one memory arena) serves both sizes, each with its own buffers.
        at64, at96 = seg.backends[0].inner[64], seg.backends[0].inner[96]
        assert at96.session is at64.session and at96.host_input(0).shape == (16, 96, 96, 3)
        out = seg.backends[0].infer(batch)
    enlarged = np.zeros((len(batch), 96, 96, 3), np.uint8)
    resize_uint8(batch, 96, 96, enlarged)
    at96 = F.interpolate(torch.from_numpy(_torch_tta(folder, enlarged, True, ()))[:, None], size=(64, 64),
                         mode="bilinear", align_corners=False)[:, 0].numpy()
    want = (_torch_tta(folder, batch, True, ()) + at96) / 2
    np.testing.assert_allclose(out, want, atol=2e-4 * max(1.0, np.abs(want).max()))
    # Against the graph that resizes the float image (the old baked-in TTA): only the rounding differs.
    baked = _torch_tta(folder, batch, True, (64, 96))
    assert np.abs(out - baked).mean() < 0.05 * np.abs(baked).mean()


def test_the_torch_backend_runs_the_same_choices(plain_x32):
    from effiseg.runtime.backends.torch_backend import TorchBackend

    folder, _ = plain_x32
    batch = _batch(2)
    for choice, flips, sizes in (("none", False, ()), ("flip", True, ()), ("multiscale", True, (64, 96))):
        with TorchBackend(folder, device="cpu", precision="fp32", max_batch=2, tta=choice) as backend:
            assert (backend.info.tta, backend.info.tta_sizes) == (flips, sizes)
            out = backend.infer(batch)
        np.testing.assert_allclose(out, _torch_tta(folder, batch, flips, sizes), atol=1e-4)


def test_a_fixed_size_model_refuses_multiscale_at_start(tiny_onnx):
    from effiseg.runtime import Segmenter

    with pytest.raises(ValueError, match="records no multi-scale sizes"):
        Segmenter.from_onnx(tiny_onnx, backend="onnxruntime", devices="cpu", tta="multiscale")


def test_effiseg_run_takes_tta(plain_x32, tmp_path):
    from click.testing import CliRunner

    from conftest import write_noise_images
    from effiseg.runtime.cli import run_command

    _, onnx_path = plain_x32
    images = write_noise_images(tmp_path / "in", 3)
    result = CliRunner().invoke(run_command, ["-i", str(images), "-o", str(tmp_path / "out"), "-m", str(onnx_path),
                                              "--backend", "onnxruntime", "--devices", "cpu", "--tta", "multiscale",
                                              "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "8 network passes per image" in result.output and "--tta multiscale" in result.output
    assert len(list((tmp_path / "out").glob("*.png"))) == 3
    bad = CliRunner().invoke(run_command, ["-i", str(images), "-m", str(onnx_path), "--tta", "everything"])
    assert bad.exit_code == 2
    # Masks of another TTA choice are not mixed into the folder by --resume.
    mixed = CliRunner().invoke(run_command, ["-i", str(images), "-o", str(tmp_path / "out"), "-m", str(onnx_path),
                                             "--backend", "onnxruntime", "--devices", "cpu", "--tta", "none",
                                             "--resume", "--no-progress"])
    assert mixed.exit_code == 3 and "tta: flip TTA at sizes 64+96" in mixed.output


def test_eval_resolves_the_choice_from_the_config():
    from effiseg.runtime.model_config import ModelConfig
    from effiseg.training.tta import resolve_tta_choice

    config = ModelConfig.for_variant("effisegnet-lite2", tta=False, tta_recommended=RECOMMENDED)
    assert resolve_tta_choice(config, "none") == (False, (), None)
    assert resolve_tta_choice(config, "flip") == (True, (), 0.55)
    assert resolve_tta_choice(config, "multiscale") == (True, (352, 416), 0.55)
    assert resolve_tta_choice(config, "multiscale", "none") == (True, (), 0.55)
    with pytest.raises(ValueError, match="no multi-scale sizes"):
        resolve_tta_choice(ModelConfig.for_variant("effisegnet-lite2"), "multiscale")
