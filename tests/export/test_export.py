"""effiseg-export: parity with PyTorch, metadata round trip, formats, failure handling, CLI."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import export_tiny

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")

from effiseg.export.cli import export_command  # noqa: E402
from effiseg.export.onnx_export import ExportError, bytes_per_image, export_checkpoint  # noqa: E402
from effiseg.export.wrapper import SegmentationGraph  # noqa: E402
from effiseg.runtime.tensorrt_rules import tensorrt_uint8_problems  # noqa: E402
from effiseg.runtime.images import list_images, read_image  # noqa: E402
from effiseg.runtime.model_info import ModelInfo, read_onnx_metadata  # noqa: E402
from effiseg.runtime.postprocess import fill_host_row, resize_rgb  # noqa: E402
from effiseg.training.checkpoint import load_model  # noqa: E402


def _torch_logits(checkpoint, batch_u8: np.ndarray) -> np.ndarray:
    """Reference: the checkpoint in PyTorch with evaluation's normalisation, written out here."""
    model, cfg = load_model(checkpoint)
    x = torch.from_numpy(batch_u8).permute(0, 3, 1, 2).float()
    mean = torch.tensor(cfg.mean).view(1, 3, 1, 1)
    std = torch.tensor(cfg.std).view(1, 3, 1, 1)
    with torch.no_grad():
        return model((x / 255.0 - mean) / std)[:, 0].numpy()


def _batch(folder, h, w) -> np.ndarray:
    return np.stack([resize_rgb(read_image(p), h, w) for p in list_images(folder)])


def test_default_export_matches_pytorch_and_carries_metadata(tiny_onnx, tiny_checkpoint, verify_images_dir):
    model = onnx.load(str(tiny_onnx))
    onnx.checker.check_model(model, full_check=True)
    assert model.opset_import[0].version >= 17
    (inp,), (out,) = model.graph.input, model.graph.output
    assert inp.name == "images" and inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    dims_in = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    dims_out = [d.dim_param or d.dim_value for d in out.type.tensor_type.shape.dim]
    assert dims_in == ["batch", 64, 64, 3] and dims_out == ["batch", 64, 64]

    info = ModelInfo.from_onnx(tiny_onnx)
    assert (info.variant, info.input_height, info.input_width) == ("effisegnet-lite0", 64, 64)
    assert (info.input_format, info.output_format, info.output_name) == ("uint8-nhwc", "logits", "logits")
    assert info.mean == (0.5, 0.5, 0.5) and info.std == (0.5, 0.5, 0.5) and info.threshold == 0.5
    assert info.version != "" and info.extra["output_layout"] == "NHW"
    # onnx's own reader agrees with the runtime's protobuf walk.
    assert {p.key: p.value for p in model.metadata_props} == read_onnx_metadata(tiny_onnx)

    batch = _batch(verify_images_dir, 64, 64)
    session = ort.InferenceSession(str(tiny_onnx), providers=["CPUExecutionProvider"])
    for n in (1, len(batch)):
        got = session.run(None, {"images": batch[:n]})[0]
        ref = _torch_logits(tiny_checkpoint, batch[:n])
        assert got.shape == (n, 64, 64) and got.dtype == np.float32
        np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-4)
        assert np.array_equal(got > 0, ref > 0)

    report = json.loads(tiny_onnx.with_name(tiny_onnx.name + ".export.json").read_text())
    assert report["ok"] and report["exporter"] == "torchscript"
    assert report["parity"]["max_abs_error"] < 1e-3 and report["parity"]["min_mask_agreement"] == 1.0
    assert report["bytes_per_image"]["chosen_input"] == 64 * 64 * 3
    assert report["sha256"] and report["onnx_bytes"] == tiny_onnx.stat().st_size
    assert report["tensorrt_uint8_problems"] == []


def test_dynamic_hw_is_exact_at_sizes_not_divisible_by_32(tiny_onnx_dynamic, tiny_checkpoint, verify_images_dir):
    info = ModelInfo.from_onnx(tiny_onnx_dynamic)
    assert info.dynamic_hw
    session = ort.InferenceSession(str(tiny_onnx_dynamic), providers=["CPUExecutionProvider"])
    # Odd sizes change timm's 'same' padding of the stride-2 convolutions at several depths; at
    # 122 and 110 an ONNX Resize would upsample some rows/columns of the 16-, 8- and 4-row feature
    # maps from a neighbouring one (see test_nearest_upsampling_traces_pytorchs_indices).
    for h, w in [(64, 64), (77, 45), (33, 100), (128, 96), (122, 110)]:
        batch = _batch(verify_images_dir, h, w)
        got = session.run(None, {"images": batch})[0]
        ref = _torch_logits(tiny_checkpoint, batch)
        assert got.shape == (len(batch), h, w)
        np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-4)
    report = json.loads(tiny_onnx_dynamic.with_name(tiny_onnx_dynamic.name + ".export.json").read_text())
    assert any(c["size"][0] % 32 and c["size"][1] % 32 for c in report["parity"]["checks"])
    assert report["upsampling"] == "gather"
    assert "Resize" not in {n.op_type for n in onnx.load(str(tiny_onnx_dynamic)).graph.node}


def test_nearest_upsampling_traces_pytorchs_indices(tiny_checkpoint, tiny_onnx, verify_images_dir, tmp_path):
    """PyTorch's nearest interpolate computes its source row as floor(dst * float32(in / out)) in
    float32, an ONNX Resize as floor(dst * in / out): at 369 rows PyTorch takes row 3 of the 12-row
    map for output row 123 (3.9999998), Resize row 4, and the default Lite2 model exported with
    --dynamic-hw was off by up to ~2.4 in whole rows of logits. 110 is the smallest size where this
    happens for EffiSegNet (the 4-row map). Exports trace PyTorch's own index arithmetic as gathers
    wherever Resize would differ (every dynamic-size export) and keep Resize where it agrees."""
    import torch.nn.functional as F
    from effiseg.training.model import resize_matches_interpolate, upsample_nearest_like

    assert not resize_matches_interpolate(12, 369) and not resize_matches_interpolate(4, 110)
    assert all(resize_matches_interpolate(352 >> k, 352) for k in range(1, 6))
    # The gather form is F.interpolate value for value (it is what every dynamic export runs).
    for i in range(1, 25):
        x = torch.arange(i * (i + 2), dtype=torch.float32).view(1, 1, i, i + 2)
        for o in range(i, 200, 3):
            want = F.interpolate(x, size=(o, o + 7), mode="nearest")
            assert torch.equal(upsample_nearest_like(x, torch.empty(1, 1, o, o + 7)), want), (i, o)

    # A fixed size where Resize would differ: gathers, exact; 64 (a multiple of 32) keeps Resize.
    report = json.loads(tiny_onnx.with_name(tiny_onnx.name + ".export.json").read_text())
    assert report["upsampling"] == "resize"
    out = export_tiny(tiny_checkpoint, tmp_path / "m110.onnx", verify_images_dir, input_size=110)
    assert json.loads((tmp_path / "m110.onnx.export.json").read_text())["upsampling"] == "gather"
    batch = _batch(verify_images_dir, 110, 110)
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"images": batch})[0]
    np.testing.assert_allclose(got, _torch_logits(tiny_checkpoint, batch), atol=1e-4, rtol=1e-4)


def test_the_network_is_folded_for_inference_unless_asked_not_to(tiny_checkpoint, tiny_onnx, tiny_onnx_dynamic,
                                                                 verify_images_dir, tmp_path):
    """Default exports trace training/inference_model.py's rewrite (checked against the trained
    network by the parity step); a dynamic-size export keeps the full-resolution sum, which is
    exact at every size; --no-fold traces the network as trained. All agree with PyTorch."""
    fixed = json.loads(tiny_onnx.with_name(tiny_onnx.name + ".export.json").read_text())
    assert fixed["folded"] and fixed["decoder_merge"] == "auto"
    assert ModelInfo.from_onnx(tiny_onnx).extra["folded_for_inference"] is True
    dynamic = json.loads(tiny_onnx_dynamic.with_name(tiny_onnx_dynamic.name + ".export.json").read_text())
    assert dynamic["folded"] and dynamic["decoder_merge"] == "direct"
    plain = export_tiny(tiny_checkpoint, tmp_path / "plain.onnx", verify_images_dir, fold=False)
    report = json.loads((tmp_path / "plain.onnx.export.json").read_text())
    assert not report["folded"] and report["decoder_merge"] is None
    assert ModelInfo.from_onnx(plain).extra["folded_for_inference"] is False
    batch = _batch(verify_images_dir, 64, 64)
    outs = [ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, {"images": batch})[0]
            for p in (tiny_onnx, plain)]
    np.testing.assert_allclose(outs[0], outs[1], atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(outs[0], _torch_logits(tiny_checkpoint, batch), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("input_format,output_format,size", [
    ("float32-nchw", "logits", 64), ("uint8-nhwc", "probabilities", 64), ("uint8-nhwc", "mask", 64),
    ("float32-nchw", "mask", 72),  # a fixed size that is not a multiple of 32
])
def test_formats(input_format, output_format, size, tiny_checkpoint, verify_images_dir, tmp_path):
    out = export_tiny(tiny_checkpoint, tmp_path / "m.onnx", verify_images_dir, input_format=input_format,
                      output_format=output_format, threshold=0.4, input_size=size)
    info = ModelInfo.from_onnx(out)
    assert (info.input_format, info.output_format, info.output_name) == (input_format, output_format, output_format)
    assert info.threshold == 0.4 and (info.input_height, info.input_width) == (size, size)
    batch = _batch(verify_images_dir, size, size)
    ref = _torch_logits(tiny_checkpoint, batch)
    if input_format == "uint8-nhwc":
        feed = batch
    else:
        feed = np.zeros((len(batch), 3, size, size), np.float32)
        for row, rgb in zip(feed, batch):
            fill_host_row(row, rgb, info)
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"images": feed})[0]
    assert got.shape == (len(batch), size, size)
    # Every format keeps to TensorRT's uint8 rules (a uint8 mask is cast from float, not from bool).
    assert tensorrt_uint8_problems(out) == []
    cut = np.log(0.4 / 0.6)
    if output_format == "logits":
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-4)
    elif output_format == "probabilities":
        assert got.dtype == np.float16
        np.testing.assert_allclose(got.astype(np.float32), 1 / (1 + np.exp(-ref)), atol=1e-3)
    else:
        assert got.dtype == np.uint8 and set(np.unique(got)) <= {0, 1}
        sure = np.abs(ref - cut) > 1e-4
        assert np.array_equal(got.astype(bool)[sure], (ref > cut)[sure])
        assert 0 < got.mean() < 1  # the perturbed tiny network is not constant


def test_graph_module_is_what_the_torch_backend_runs(tiny_checkpoint, verify_images_dir):
    model, cfg = load_model(tiny_checkpoint)
    graph = SegmentationGraph(model, cfg.mean, cfg.std).eval()
    batch = _batch(verify_images_dir, 64, 64)
    with torch.no_grad():
        got = graph(torch.from_numpy(batch)).numpy()
    np.testing.assert_allclose(got, _torch_logits(tiny_checkpoint, batch), atol=1e-6)
    with pytest.raises(ValueError, match="output format"):
        SegmentationGraph(model, cfg.mean, cfg.std, output_format="nchw")


def test_disagreement_fails_and_leaves_nothing(tiny_checkpoint, verify_images_dir, tmp_path, monkeypatch):
    out = tmp_path / "m.onnx"
    out.write_bytes(b"previous model")  # an older file must survive a failed export untouched
    import effiseg.export.onnx_export as ox
    monkeypatch.setattr(ox, "LOGIT_RTOL", -1.0)  # no tolerance at all: any rounding is a mismatch
    with pytest.raises(ExportError, match="disagrees"):
        export_checkpoint(tiny_checkpoint, out, verify_dir=verify_images_dir, verify_count=1)
    assert out.read_bytes() == b"previous model"
    assert not list(tmp_path.glob("*.effiseg-tmp"))
    failed = json.loads((tmp_path / "m.onnx.export-failed.json").read_text())
    assert failed["ok"] is False and "disagrees" in failed["error"]
    assert not (tmp_path / "m.onnx.export.json").exists()


def test_bad_requests(tiny_checkpoint, tmp_path):
    with pytest.raises(ExportError, match="opset"):
        export_checkpoint(tiny_checkpoint, tmp_path / "m.onnx", opset=13)
    with pytest.raises(ExportError, match="not found"):
        export_checkpoint(tiny_checkpoint, tmp_path / "m.onnx", verify_dir=tmp_path / "missing")
    assert not (tmp_path / "m.onnx").exists()


def test_bytes_per_image():
    b = bytes_per_image(352, 352, "uint8-nhwc", "mask")
    assert b["chosen_input"] == 352 * 352 * 3 and b["chosen_output"] == 352 * 352
    assert b["input"]["float32-nchw"] == 4 * b["input"]["uint8-nhwc"]
    assert b["output"] == {"logits": 352 * 352 * 4, "probabilities": 352 * 352 * 2, "mask": 352 * 352}
    assert b["saving_vs_float32"] == pytest.approx(16 / 4)


def test_cli(tiny_checkpoint, verify_images_dir, tmp_path):
    import shutil
    checkpoint = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, checkpoint)
    config = json.loads((checkpoint / "config.json").read_text())
    config["metrics"] = {"validation": {"mean_dice": 0.9123}}  # what training records
    (checkpoint / "config.json").write_text(json.dumps(config))
    out = tmp_path / "cli.onnx"
    result = CliRunner().invoke(export_command, [str(checkpoint), "-o", str(out), "--output-format",
                                                 "probabilities", "--verify-images", str(verify_images_dir),
                                                 "--verify-count", "1"])
    assert result.exit_code == 0, result.output
    assert "bytes per image at 64x64" in result.output and "mask agreement" in result.output
    info = ModelInfo.from_onnx(out)
    assert info.output_format == "probabilities"
    assert info.metrics == {"validation": {"mean_dice": 0.9123}}
    bad = CliRunner().invoke(export_command, [str(tiny_checkpoint), "-o", str(tmp_path / "x.onnx"),
                                              "--verify-images", str(tmp_path / "nope")])
    assert bad.exit_code == 1 and "x.onnx was not written or changed" in bad.output
    assert not (tmp_path / "x.onnx").exists()


def _lite0_with_noise_images(tmp_path, seed: int):
    """An untrained lite0 checkpoint at 64x64 and three noise images (arrays and a folder of PNGs)."""
    from PIL import Image
    from effiseg.training.checkpoint import model_config, save_checkpoint
    from effiseg.training.model import build_model
    torch.manual_seed(0)
    ckpt = tmp_path / "ckpt"
    save_checkpoint(ckpt, build_model("effisegnet-lite0").eval(), model_config("effisegnet-lite0", input_size=64))
    rng = np.random.default_rng(seed)
    images = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(3)]
    img_dir = tmp_path / "imgs"
    img_dir.mkdir()
    for i, im in enumerate(images):
        Image.fromarray(im).save(img_dir / f"{i}.png")
    return ckpt, images, img_dir


def test_flip_tta_in_the_graph_matches_evaluation(tmp_path):
    """--tta bakes the 4-flip average into the graph; it equals training.evaluate's TTA logits."""
    from effiseg.training.evaluate import predict_logits
    ckpt, images, img_dir = _lite0_with_noise_images(tmp_path, seed=0)
    onnx_path = tmp_path / "tta.onnx"
    report = export_checkpoint(ckpt, onnx_path, tta=True, verify_dir=img_dir, verify_count=3, log=lambda *a: None)
    assert report["tta"] is True
    assert ModelInfo.from_onnx(onnx_path).tta is True
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: np.stack(images)})[0]
    model, cfg = load_model(ckpt)
    want = np.stack(predict_logits(model, cfg, images, tta=True))
    plain = np.stack(predict_logits(model, cfg, images, tta=False))
    assert np.abs(got - want).max() < 1e-3
    assert np.abs(got - plain).max() > 1e-3  # the flips really change the answer


def test_multiscale_tta_in_the_graph_matches_evaluation(tmp_path):
    """--tta-sizes bakes the multi-scale average into the graph (the input resized in the graph, the
    logits resized back): ONNX Runtime, the torch backend's graph and training.evaluate agree."""
    from effiseg.training.evaluate import predict_logits
    ckpt, images, img_dir = _lite0_with_noise_images(tmp_path, seed=1)
    onnx_path = tmp_path / "ms.onnx"
    report = export_checkpoint(ckpt, onnx_path, tta=True, tta_sizes="96,64", verify_dir=img_dir, verify_count=3,
                               log=lambda *a: None)
    assert report["ok"] and report["tta_sizes"] == [64, 96]
    info = ModelInfo.from_onnx(onnx_path)
    assert info.tta is True and info.tta_sizes == (64, 96)
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: np.stack(images)})[0]
    model, cfg = load_model(ckpt)
    want = np.stack(predict_logits(model, cfg, images, tta=True, tta_sizes=(64, 96)))
    flips_only = np.stack(predict_logits(model, cfg, images, tta=True))
    assert got.shape == (3, 64, 64)
    assert np.abs(got - want).max() < 1e-3
    assert np.abs(got - flips_only).max() > 1e-3  # the second size really changes the answer
    graph = SegmentationGraph(model, info.mean, info.std, tta=True, tta_sizes=info.tta_sizes).eval()
    batched = SegmentationGraph(model, info.mean, info.std, tta=True, tta_sizes=info.tta_sizes, batch_flips=True).eval()
    with torch.no_grad():
        torch_out = graph(torch.from_numpy(np.stack(images))).numpy()  # CPU: flips one after another
        batched_out = batched(torch.from_numpy(np.stack(images))).numpy()  # as in the exported graph
    assert np.abs(torch_out - want).max() < 1e-4
    assert np.abs(torch_out - batched_out).max() < 1e-4


def test_multiscale_tta_needs_a_fixed_size_and_valid_sizes(tiny_checkpoint, tmp_path):
    with pytest.raises(ExportError, match="needs a fixed input size"):
        export_checkpoint(tiny_checkpoint, tmp_path / "d.onnx", dynamic_hw=True, tta_sizes=[64, 96],
                          log=lambda *a: None)
    with pytest.raises(ExportError, match="multiple of 32"):
        export_checkpoint(tiny_checkpoint, tmp_path / "b.onnx", tta_sizes="64,100", log=lambda *a: None)
    assert not (tmp_path / "d.onnx").exists() and not (tmp_path / "b.onnx").exists()
    res = CliRunner().invoke(export_command, [str(tiny_checkpoint), "-o", str(tmp_path / "c.onnx"),
                                              "--tta-sizes", "64,abc"])
    assert res.exit_code == 2 and "'abc' is not a whole number" in res.output
    with pytest.raises(ExportError, match="chosen for the model's input size 64x64, not 96x96"):
        export_checkpoint(tiny_checkpoint, tmp_path / "s.onnx", tta_sizes=[64, 96], input_size=96, log=lambda *a: None)


def test_cli_errors_name_the_file_and_unreadable_verify_images_are_skipped(tiny_checkpoint, verify_images_dir, tmp_path):
    import shutil
    an_onnx_file = tmp_path / "model.onnx"  # an export, not a checkpoint: only --quantize takes one
    an_onnx_file.write_bytes(b"not a model")
    res = CliRunner().invoke(export_command, [str(an_onnx_file), "-o", str(tmp_path / "q.onnx")])
    assert res.exit_code == 2 and f"{an_onnx_file} is already an ONNX file" in res.output
    not_a_checkpoint = tmp_path / "fake.safetensors"
    not_a_checkpoint.write_bytes(b"not a model")
    res = CliRunner().invoke(export_command, [str(not_a_checkpoint), "-o", str(tmp_path / "q.onnx")])
    assert res.exit_code == 1 and "cannot load the checkpoint" in res.output
    assert isinstance(res.exception, SystemExit)  # a message, not a traceback
    assert f"{tmp_path / 'q.onnx'} was not written" in res.output
    damaged = tmp_path / "damaged"
    shutil.copytree(tiny_checkpoint, damaged)
    (damaged / "model.safetensors").write_bytes(b"\x00" * 64)
    res = CliRunner().invoke(export_command, [str(damaged), "-o", str(tmp_path / "q.onnx")])
    assert res.exit_code == 1 and "cannot load the checkpoint" in res.output
    assert isinstance(res.exception, SystemExit)
    missing = CliRunner().invoke(export_command, [str(tiny_checkpoint), "-o", str(tmp_path / "q.onnx"),
                                                  "--verify-images", str(tmp_path / "nowhere")])
    assert missing.exit_code == 1 and "folder not found" in missing.output
    assert "traced in" not in missing.output  # found out before the (slow) trace

    mixed = tmp_path / "mixed"
    shutil.copytree(verify_images_dir, mixed)
    (mixed / "0000-broken.jpg").write_bytes(b"\xff\xd8 truncated")
    out = tmp_path / "ok.onnx"
    res = CliRunner().invoke(export_command, [str(tiny_checkpoint), "-o", str(out), "--verify-images", str(mixed),
                                              "--verify-count", "1"])
    assert res.exit_code == 0, res.output
    assert f"skips an unreadable image: {mixed / '0000-broken.jpg'}" in res.output
    report = json.loads((tmp_path / "ok.onnx.export.json").read_text())
    assert len(report["verify_images_skipped"]) == 1 and report["parity"]["n_images"] == 1


def test_early_failures_are_messages_not_tracebacks(tiny_checkpoint, tmp_path):
    """An output folder that cannot be made, a checkpoint whose config holds an impossible threshold:
    the CLI's message, exit 1, nothing written."""
    import shutil
    a_file = tmp_path / "afile"
    a_file.write_bytes(b"")
    res = CliRunner().invoke(export_command, [str(tiny_checkpoint), "-o", str(a_file / "m.onnx")])
    assert res.exit_code == 1 and isinstance(res.exception, SystemExit), res.output
    assert "cannot write to" in res.output and str(a_file) in res.output
    odd = tmp_path / "odd"
    shutil.copytree(tiny_checkpoint, odd)
    config = json.loads((odd / "config.json").read_text())
    config["threshold"] = 1.0
    (odd / "config.json").write_text(json.dumps(config))
    res = CliRunner().invoke(export_command, [str(odd), "-o", str(tmp_path / "m.onnx")])
    assert res.exit_code == 1 and isinstance(res.exception, SystemExit), res.output
    assert "threshold" in res.output and not (tmp_path / "m.onnx").exists()


def test_a_report_that_cannot_be_replaced_leaves_the_old_model_and_report_together(tiny_checkpoint, verify_images_dir,
                                                                                    tmp_path, monkeypatch):
    import os

    import effiseg.export.onnx_export as ox
    out = tmp_path / "m.onnx"
    export_checkpoint(tiny_checkpoint, out, verify_dir=verify_images_dir, verify_count=1)
    old_model, old_report = out.read_bytes(), (tmp_path / "m.onnx.export.json").read_text()
    real_replace = os.replace

    def locked(src, dst):  # Windows: the old report is open in a program that locks it
        if Path(src).name == "m.onnx.export.json":
            raise PermissionError(13, "Permission denied", str(src))
        return real_replace(src, dst)
    monkeypatch.setattr(ox.os, "replace", locked)
    with pytest.raises(ExportError, match="was not changed"):
        export_checkpoint(tiny_checkpoint, out, output_format="mask", verify_dir=verify_images_dir, verify_count=1)
    monkeypatch.setattr(ox.os, "replace", real_replace)
    assert out.read_bytes() == old_model and (tmp_path / "m.onnx.export.json").read_text() == old_report

    # The model itself cannot be replaced (locked after every retry): the old report comes back.
    def model_locked(src, dst):
        raise PermissionError(13, "Permission denied", str(dst))
    monkeypatch.setattr(ox, "replace_with_retry", model_locked)
    with pytest.raises(ExportError):
        export_checkpoint(tiny_checkpoint, out, output_format="mask", verify_dir=verify_images_dir, verify_count=1)
    assert out.read_bytes() == old_model and (tmp_path / "m.onnx.export.json").read_text() == old_report
    assert json.loads(old_report)["sha256"] == hashlib.sha256(old_model).hexdigest()
    assert not list(tmp_path.glob("*.effiseg-tmp")) and not list(tmp_path.glob(".*effiseg-tmp"))
