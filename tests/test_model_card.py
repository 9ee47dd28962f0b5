"""effiseg-model-card writes a Hugging Face style folder whose card states what effiseg-eval measures."""
import json

from click.testing import CliRunner

from effiseg.training.checkpoint import load_model, model_config, save_checkpoint
from effiseg.training.cli import eval_command, model_card_command
from effiseg.training.model import build_model

from _paths import copy_kvasir_subset, needs_kvasir

pytestmark = needs_kvasir


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
    assert {p.name for p in out.iterdir()} == {"config.json", "model.safetensors", "README.md"}
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["threshold"] == 0.4 and cfg["tta"] is True
    card = (out / "README.md").read_text()
    assert "Not for clinical use" in card and "Kvasir-SEG" in card and "Epochs: 1" in card
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
    assert card.splitlines()[9].startswith("# EffiSegNet (effisegnet-lite0) for polyp segmentation")
    assert "default model" not in card.splitlines()[9]  # only a shipped default says so (--role)


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
