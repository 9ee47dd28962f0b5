"""effiseg-model-card writes a Hugging Face style folder whose card states what effiseg-eval measures."""
import hashlib
import json

import pytest
from click.testing import CliRunner

from effiseg.runtime.model_info import ModelInfo
from effiseg.training.checkpoint import load_model, model_config, save_checkpoint
from effiseg.training.cli import eval_command, model_card_command
from effiseg.training.model import build_model
from effiseg.training.model_card import make_model_folder, render_card

from _paths import copy_kvasir_subset, needs_kvasir


@needs_kvasir
def test_model_folder_card_matches_eval(tmp_path):
    data = copy_kvasir_subset(tmp_path / "data")
    ckpt = tmp_path / "ckpt"
    save_checkpoint(ckpt, build_model("effisegnet-lite0").eval(), model_config("effisegnet-lite0", input_size=64))
    prov = tmp_path / "prov.json"
    prov.write_text(json.dumps({"Epochs": "1", "Hardware": "test"}))
    out = tmp_path / "hf"
    res = CliRunner().invoke(model_card_command, [str(ckpt), "--output", str(out), "--data", str(data),
                                                  "--provenance", str(prov), "--threshold", "0.4", "--tta",
                                                  "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert {p.name for p in out.iterdir()} == {"config.json", "model.safetensors", "README.md", "model.onnx",
                                               "model.onnx.export.json"}
    assert "hf upload OWNER/NAME" in res.output
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".hf.")]  # no staging folder left
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["threshold"] == 0.4 and cfg["tta"] is True
    card = (out / "README.md").read_text()
    assert "Not for clinical use" in card and "Kvasir-SEG" in card and "Epochs: 1" in card
    # The ONNX file is the folder's own checkpoint with the card's settings and metrics, verified.
    info = ModelInfo.from_onnx(out / "model.onnx")
    assert info.threshold == 0.4 and info.tta and info.metrics == cfg["metrics"]
    report = json.loads((out / "model.onnx.export.json").read_text())
    assert report["ok"] and report["checkpoint"] == "." and report["onnx"] == "model.onnx"
    assert report["sha256"] == hashlib.sha256((out / "model.onnx").read_bytes()).hexdigest()
    # The folder loads on its own, and effiseg-eval (the threshold from config, the TTA the card's reproduce
    # line names: eval runs one pass unless told) agrees with the card.
    load_model(out)
    assert "--split test --tta flip`" in card
    res = CliRunner().invoke(eval_command, [str(out), "--data", str(data), "--split", "test", "--device", "cpu",
                                            "--tta", "flip", "--output", str(tmp_path / "eval")])
    assert res.exit_code == 0, res.output
    measured = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert measured["tta"] is True and measured["threshold"] == 0.4
    assert abs(measured["mean_dice"] - cfg["metrics"]["test"]["mean_dice"]) < 1e-9
    assert f"{measured['mean_dice']:.4f}" in card
    title = next(line for line in card.splitlines() if line.startswith("# "))
    assert title.startswith("# EffiSegNet (effisegnet-lite0) for polyp segmentation")
    assert "default model" not in title  # only a shipped default says so (--role)


def test_the_card_header_is_hub_metadata_with_the_measured_test_results():
    """The Hub reads the YAML header: huggingface_hub's own parser finds the licence, tags and the
    model-index results with the measured values."""
    ModelCard = pytest.importorskip("huggingface_hub").ModelCard
    test = {"n_images": 100, "mean_dice": 0.91234, "mean_iou": 0.85, "mean_precision": 0.9, "mean_recall": 0.93,
            "f1_pooled": 0.92}
    config = model_config("effisegnet-lite0", input_size=64)
    report = {"input_size": [64, 64], "opset": 17, "input_format": "uint8-nhwc", "output_format": "logits",
              "parity": {"n_images": 4, "max_abs_error": 1e-5}}
    card = ModelCard(render_card(config, test, None, {}, None, onnx_report=report, repo_id="me/polyps"))
    data = card.data.to_dict()
    assert data["license"] == "other" and data["pipeline_tag"] == "image-segmentation" and "onnx" in data["tags"]
    results = {r.metric_type: r for r in card.data.eval_results}
    assert set(results) == {"dice", "mean_iou", "precision", "recall"}
    assert results["dice"].metric_value == 0.9123 and results["dice"].dataset_split == "test"
    assert results["dice"].task_type == "image-segmentation" and card.data.model_name == "polyps"
    assert "effiseg-run --model hf://me/polyps" in card.text and "model.onnx" in card.text
    # Without ONNX the card runs the checkpoint, and without measurements there is no model-index.
    bare = ModelCard(render_card(config, None, None, {}, None))
    assert not bare.data.eval_results and "--backend torch" in bare.text and "onnx" not in bare.data.tags


def test_a_failed_card_leaves_no_folder_and_a_file_is_not_overwritten(tmp_path):
    ckpt = tmp_path / "ckpt"
    save_checkpoint(ckpt, build_model("effisegnet-lite0").eval(), model_config("effisegnet-lite0", input_size=64))
    out = tmp_path / "hf"
    res = CliRunner().invoke(model_card_command, [str(ckpt), "--output", str(out), "--data", str(tmp_path / "none"),
                                                  "--device", "cpu"])
    assert res.exit_code == 2 and "error:" in res.output
    assert not out.exists()  # measured before anything is written
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    res = CliRunner().invoke(model_card_command, [str(ckpt), "--output", str(afile), "--device", "cpu"])
    assert res.exit_code == 2 and afile.read_text() == "keep me"


def test_a_failed_export_leaves_no_folder_and_no_onnx_removes_a_stale_one(tmp_path, monkeypatch):
    import effiseg.export.onnx_export as onnx_export
    ckpt = tmp_path / "ckpt"
    save_checkpoint(ckpt, build_model("effisegnet-lite0").eval(), model_config("effisegnet-lite0", input_size=64))
    out = tmp_path / "hf"

    def refuse(*args, **kwargs):
        raise onnx_export.ExportError("ONNX Runtime disagrees with PyTorch")
    with monkeypatch.context() as m:
        m.setattr(onnx_export, "export_checkpoint", refuse)
        with pytest.raises(onnx_export.ExportError, match="--no-onnx"):
            make_model_folder(ckpt, out, None, {}, onnx=True, log=lambda m: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # neither the folder nor its staging
    make_model_folder(ckpt, out, None, {}, onnx=True, log=lambda m: None)
    assert (out / "model.onnx").is_file() and (out / "model.onnx.export.json").is_file()
    notes = []
    make_model_folder(ckpt, out, None, {}, onnx=False, log=notes.append)
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert any("removed" in n and "model.onnx" in n for n in notes)


def test_a_card_folder_published_as_is_runs_from_the_hub_cache(tmp_path, tiny_checkpoint):
    """The folder effiseg-model-card writes is a whole Hub repository: laid into a Hugging Face cache
    unchanged, effiseg-run runs its ONNX file and (--backend torch) its checkpoint, offline."""
    pytest.importorskip("huggingface_hub")
    pytest.importorskip("onnxruntime")
    from conftest import write_noise_images
    from test_hub import _env, lay_out_hub_cache, run_commands
    out = make_model_folder(tiny_checkpoint, tmp_path / "card", None, {}, onnx=True, repo_id="me/polyps",
                            log=lambda m: None)
    cache = tmp_path / "cache"
    commit = lay_out_hub_cache(cache, "me/polyps", {p.name: p for p in out.iterdir()})
    frames = write_noise_images(tmp_path / "frames", 2)
    results = run_commands({b: ("run", tmp_path, ["-i", frames, "-o", tmp_path / b, "-m", "hf://me/polyps",
                                                  "--backend", b, "--no-progress"])
                            for b in ("onnxruntime", "torch")}, _env(cache, HF_HUB_OFFLINE="1"))
    for backend, r in results.items():
        assert r["exit_code"] == 0, r["output"]
        assert commit in r["output"] and sorted(p.name for p in (tmp_path / backend).glob("*.png")) == ["0.png",
                                                                                                       "1.png"]
    assert "effiseg-run --model hf://me/polyps" in (out / "README.md").read_text()


@needs_kvasir
def test_card_shows_one_pass_and_the_recommended_tta_side_by_side(tmp_path):
    """A plain network with a TTA recommendation: the card measures one pass and the recommended
    choice, each with its passes per image (and images/s from a tta_choices benchmark file), and the
    ONNX file is the plain network that runs at every multiple of 32, the recommendation in its metadata."""
    data = copy_kvasir_subset(tmp_path / "data")
    ckpt = tmp_path / "ckpt"
    recommended = {"flips": True, "sizes": [64, 96], "threshold": 0.45}
    save_checkpoint(ckpt, build_model("effisegnet-lite0").eval(),
                    model_config("effisegnet-lite0", input_size=64, threshold=0.55, tta_recommended=recommended))
    speeds = tmp_path / "tta_choices.json"
    record = {"label": "--tta none", "tta": "none", "exit_status": 0, "images_per_s": 4.0}
    speeds.write_text(json.dumps({"records": [record, dict(record, images_per_s=3.0),
                                              dict(record, label="--tta multiscale", tta="multiscale", images_per_s=0.5),
                                              dict(record, label="old-default", images_per_s=9.0)]}))
    out = tmp_path / "hf"
    res = CliRunner().invoke(model_card_command, [str(ckpt), "--output", str(out), "--data", str(data),
                                                  "--device", "cpu", "--speeds", str(speeds)])
    assert res.exit_code == 0, res.output
    cfg = json.loads((out / "config.json").read_text())
    none, multi = cfg["metrics_by_tta"]
    assert (none["choice"], none["passes"], none["threshold"]) == ("none", 1, 0.55)
    assert (multi["choice"], multi["passes"], multi["threshold"], multi["sizes"]) == ("multiscale", 8, 0.45, [64, 96])
    assert cfg["metrics"]["test"] == none["test"] and multi["test"]["tta_sizes"] == [64, 96]
    card = (out / "README.md").read_text()
    assert f"| `--tta none` | 1 | 0.55 | test | {none['test']['n_images']} | {none['test']['mean_dice']:.4f} |" in card
    assert f"| `--tta multiscale` | 8 | 0.45 | test | {multi['test']['n_images']} | {multi['test']['mean_dice']:.4f} |" in card
    assert card.count("| 3.5 |") == 2 and card.count("| 0.5 |") == 2  # medians per choice, both splits
    assert "`--tta multiscale` in effiseg-run" in card and "one network pass: TTA is chosen at run time" in card
    # The rows are what effiseg-eval measures with each choice.
    for choice, row in (("none", none), ("multiscale", multi)):
        res = CliRunner().invoke(eval_command, [str(out), "--data", str(data), "--split", "test", "--device", "cpu",
                                                "--tta", choice, "--output", str(tmp_path / choice)])
        assert res.exit_code == 0, res.output
        measured = json.loads((tmp_path / choice / "metrics.json").read_text())
        assert abs(measured["mean_dice"] - row["test"]["mean_dice"]) < 1e-9
    info = ModelInfo.from_onnx(out / "model.onnx")
    assert not info.tta and info.tta_sizes == () and info.hw_multiple == 32 and info.tta_recommended == recommended
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    res = CliRunner().invoke(model_card_command, [str(ckpt), "--output", str(tmp_path / "x"), "--speeds", str(bad)])
    assert res.exit_code == 2 and "bad.json" in res.output and not (tmp_path / "x").exists()
