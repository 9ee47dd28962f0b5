"""Shipping the protocol's winner: the card folder and the bundled ONNX carry the winner's settings and
evidence, and a failure at any step leaves the shipped model as it was."""
import json

import pytest
from click.testing import CliRunner

from effiseg.runtime.model_info import ModelInfo
from effiseg.training.checkpoint import model_config, save_checkpoint
from effiseg.training.model import build_model
from effiseg.training.protocol_common import config_key
from effiseg.training.protocol import main as protocol_main
from effiseg.training.ship import ShipError, parse_config_key
from effiseg.training.trainer import TrainConfig

from _paths import copy_kvasir_subset, needs_kvasir

WINNER = {
    "arm": "boundary_loss", "config": "tta=1,thr=0.60,minreg=0", "seeds": [0, 1, 2],
    "val_dice": {"mean": 0.83, "std": 0.005, "n": 3},
    "test_dice": {"mean": 0.8795, "std": 0.0047, "n": 3}, "test_iou": {"mean": 0.80, "std": 0.006, "n": 3},
    "test_precision": {"mean": 0.89, "std": 0.02, "n": 3}, "test_recall": {"mean": 0.88, "std": 0.02, "n": 3},
    "gain_vs_baseline": {"mean_diff": 0.0368, "low": 0.0168, "high": 0.0570, "per_seed_diff": [0.0164, 0.0462, 0.0478]},
    "ship_seed": 1, "ship_run": "boundary_loss_s1",
}


def test_config_keys_parse_into_checkpoint_settings():
    assert parse_config_key("tta=1,thr=0.60,minreg=64") == {"tta": True, "threshold": 0.6, "min_region_px": 64,
                                                            "tta_sizes": []}
    assert parse_config_key("tta=1,thr=0.40,minreg=0,sizes=416+352") == {
        "tta": True, "threshold": 0.4, "min_region_px": 0, "tta_sizes": [352, 416]}
    assert config_key(True, 0.4, 0, (352, 416)) == "tta=1,thr=0.40,minreg=0,sizes=352+416"
    assert config_key(True, 0.4, 0) == "tta=1,thr=0.40,minreg=0"  # keys of older evaluations unchanged
    for bad in ("tta=1,thr=high", "tta=1,thr=0.5,minreg=0,sizes=350"):
        with pytest.raises(ShipError, match="cannot read"):
            parse_config_key(bad)


def _protocol(tmp_path):
    proto = tmp_path / "protocol-test"
    run = proto / "runs" / WINNER["ship_run"]
    config = model_config("effisegnet-lite0", input_size=64, best_epoch=3)
    save_checkpoint(run, build_model("effisegnet-lite0").eval(), config, stem="best")
    train = TrainConfig(variant="effisegnet-lite0", input_size=64, epochs=3, seed=1).to_dict()
    (run / "run_config.json").write_text(json.dumps({"train": train, "model": config.to_dict(), "device_name": "Test GPU",
                                                     "torch": "test"}))
    (run / "metrics.json").write_text(json.dumps([{"epoch": e, "train_images_per_s": 100.0} for e in (1, 2, 3)]))
    (proto / "protocol_results.json").write_text(json.dumps({
        "plan": {"seeds": [0, 1, 2], "epochs": 3, "parallel": 6,
                 "arms": {"baseline": [], "boundary_loss": ["loss.boundary_weight=2.0"]}},
        "arms": {"baseline": {}, "boundary_loss": {}}, "winner": WINNER,
        "baseline_spread": {"test_dice_per_seed": {"0": 0.90, "1": 0.88, "2": 0.91}}}))
    data = copy_kvasir_subset(tmp_path / "data")
    shipped = tmp_path / "weights" / "default"
    shipped.mkdir(parents=True)
    (shipped / "old-model.txt").write_text("the previous default")
    onnx = tmp_path / "models" / "default.onnx"
    onnx.parent.mkdir()
    onnx.write_bytes(b"previous onnx")
    return proto, data, shipped, onnx


def _ship(proto, data, shipped, onnx, *extra):
    return CliRunner().invoke(protocol_main, ["ship", "--out", str(proto), "--data", str(data), "--to", str(shipped),
                                              "--onnx", str(onnx), "--device", "cpu", *extra])


@needs_kvasir
def test_ship_writes_the_winner_with_its_settings_evidence_and_onnx(tmp_path):
    proto, data, shipped, onnx = _protocol(tmp_path)
    res = _ship(proto, data, shipped, onnx)
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert {p.name for p in shipped.iterdir()} == {"config.json", "model.safetensors", "README.md"}
    config = json.loads((shipped / "config.json").read_text())
    # The plain network ships: one pass at a threshold chosen on validation, the winner's TTA (flips at
    # 0.60) a run-time recommendation.
    assert config["tta"] is False and config["tta_sizes"] == [] and config["min_region_px"] == 0
    assert config["tta_recommended"] == {"flips": True, "sizes": [], "threshold": 0.6}
    assert config["threshold"] == config["threshold_choice"]["chosen"]
    assert config["threshold_choice"]["split"] == "validation"
    rows = config["metrics_by_tta"]
    assert [(r["choice"], r["passes"], r["threshold"]) for r in rows] == [("none", 1, config["threshold"]),
                                                                          ("flip", 4, 0.6)]
    assert config["metrics"] == {"validation": rows[0]["validation"], "test": rows[0]["test"]}
    assert rows[1]["test"]["tta"] is True and rows[0]["test"]["tta"] is False
    card = (shipped / "README.md").read_text()
    for fact in ("arm `boundary_loss`: loss.boundary_weight=2.0", "Epochs: 3 (best validation Dice at epoch 3)",
                 "Seed: 1", "Test GPU", "[+0.0168, +0.0570]", "+0.0164, +0.0462, +0.0478", "range 0.0300",
                 "0.8795 ± 0.0047 (n=3 seeds)", f"{config['metrics']['test']['mean_dice']:.4f}",
                 f"| `--tta none` | 1 | {config['threshold']:g} | test |", "| `--tta flip` | 4 | 0.6 | test |",
                 f"{rows[1]['test']['mean_dice']:.4f}", "`--tta flip` in effiseg-run",
                 f"The one-pass threshold {config['threshold']:g} was chosen on the validation split",
                 "run-time TTA recommended: flip TTA (4 network passes per image) at threshold 0.6"):
        assert fact in card, fact
    info = ModelInfo.from_onnx(onnx)
    assert info.tta is False and info.tta_sizes == () and info.variant == "effisegnet-lite0"
    assert info.threshold == pytest.approx(config["threshold"]) and info.dynamic_hw and info.hw_multiple == 32
    assert info.tta_recommended == {"flips": True, "sizes": [], "threshold": 0.6}
    assert (onnx.parent / "default.onnx.export.json").is_file()
    assert not list(tmp_path.rglob(".effiseg-ship"))  # no work folders left behind
    assert json.loads((onnx.parent / "default.onnx.export.json").read_text())["checkpoint"].endswith("default")
    summary = json.loads((proto / "shipped.json").read_text())
    assert summary["shipped_run"] == "boundary_loss_s1"
    assert summary["test_dice"] == config["metrics"]["test"]["mean_dice"]


@needs_kvasir
def test_a_failed_export_or_a_missing_checkpoint_leaves_the_shipped_model_alone(tmp_path, monkeypatch):
    from effiseg.export import onnx_export
    proto, data, shipped, onnx = _protocol(tmp_path)

    def broken_export(*args, **kwargs):
        raise onnx_export.ExportError("parity check failed (simulated)")
    monkeypatch.setattr(onnx_export, "export_checkpoint", broken_export)
    res = _ship(proto, data, shipped, onnx)
    assert res.exit_code != 0 and "nothing was replaced" in res.output and "simulated" in res.output
    assert [p.name for p in shipped.iterdir()] == ["old-model.txt"] and onnx.read_bytes() == b"previous onnx"
    assert not list(tmp_path.rglob(".effiseg-ship"))
    monkeypatch.undo()

    (proto / "runs" / WINNER["ship_run"] / "best.safetensors").unlink()
    res = _ship(proto, data, shipped, onnx)
    assert res.exit_code != 0 and "checkpoint" in res.output and "missing" in res.output
    assert [p.name for p in shipped.iterdir()] == ["old-model.txt"]


@needs_kvasir
def test_a_swap_that_fails_half_way_puts_the_previous_model_back(tmp_path, monkeypatch):
    from effiseg.training import ship
    proto, data, shipped, onnx = _protocol(tmp_path)
    real_replace = type(onnx).replace

    def failing_replace(self, target):
        if str(target) == str(onnx) and "new" in self.parts:  # the new ONNX cannot be put in place
            raise PermissionError("file in use (simulated)")
        return real_replace(self, target)
    monkeypatch.setattr(type(onnx), "replace", failing_replace)
    res = _ship(proto, data, shipped, onnx)
    monkeypatch.undo()
    assert res.exit_code != 0 and "previous one is back in place" in res.output and "simulated" in res.output
    assert [p.name for p in shipped.iterdir()] == ["old-model.txt"] and onnx.read_bytes() == b"previous onnx"
    assert not list(tmp_path.rglob(".effiseg-ship"))
    assert ship.WORK_NAME == ".effiseg-ship"


@needs_kvasir
def test_a_smoke_test_protocol_or_a_worse_model_is_not_shipped_without_force(tmp_path):
    proto, data, shipped, onnx = _protocol(tmp_path)
    (proto / "evaluations").mkdir()
    (proto / "evaluations" / "boundary_loss_s1.json").write_text(json.dumps({"run": "boundary_loss_s1", "limit": 4}))
    res = _ship(proto, data, shipped, onnx)
    assert res.exit_code != 0 and "smoke test" in res.output and "first 4 images" in res.output
    assert [p.name for p in shipped.iterdir()] == ["old-model.txt"] and onnx.read_bytes() == b"previous onnx"
    (proto / "evaluations" / "boundary_loss_s1.json").write_text('{"run": "boundary_loss_s1", "val": {')  # cut short
    res = _ship(proto, data, shipped, onnx)
    assert res.exit_code != 0 and "cannot be read" in res.output and "Traceback" not in res.output
    (proto / "evaluations" / "boundary_loss_s1.json").unlink()

    # The current default scores better on validation than this untrained winner can.
    (shipped / "config.json").write_text(json.dumps({"metrics": {"validation": {"mean_dice": 0.99}}}))
    res = _ship(proto, data, shipped, onnx)
    assert res.exit_code != 0 and "below the current default's 0.9900" in res.output
    assert onnx.read_bytes() == b"previous onnx" and (shipped / "old-model.txt").is_file()
    res = _ship(proto, data, shipped, onnx, "--force")
    assert res.exit_code == 0, res.output
    assert json.loads((shipped / "config.json").read_text())["metrics"]["validation"]["mean_dice"] < 0.99


def test_the_card_shows_the_training_change_against_the_baseline_with_its_own_inference():
    from pathlib import Path

    from effiseg.training.ship import evidence_markdown
    results = {"plan": {"seeds": [0, 1, 2], "epochs": 32}, "arms": {"baseline": {}, "boundary_loss": {}},
               "winner": {**WINNER, "gain_vs_tuned_baseline": {
                   "baseline_config": "tta=1,thr=0.55,minreg=0", "mean_diff": 0.0017, "low": -0.0046,
                   "high": 0.0071, "per_seed_diff": [0.0011, 0.002, 0.0021]}}}
    card = evidence_markdown(results, Path("protocol"))
    assert ("against the baseline with its own best inference (`tta=1,thr=0.55,minreg=0`, chosen on validation) "
            "+0.0017, 95% interval [-0.0046, +0.0071]; per seed +0.0011, +0.0020, +0.0021.") in card
    # Without that comparison (the winner is the baseline arm, or an older report) the line is left out.
    assert "beyond inference" not in evidence_markdown({"plan": {}, "winner": WINNER}, Path("protocol"))


def test_a_winner_that_removes_small_regions_is_not_shipped_without_force(tmp_path):
    """The runtime and the ONNX model do not remove regions: a card measured with removal would promise
    figures that users do not get."""
    import effiseg.training.ship as ship
    proto = tmp_path / "p"
    run = proto / "runs" / "baseline_s0"
    run.mkdir(parents=True)
    (run / "best.safetensors").write_bytes(b"")
    (proto / "protocol_results.json").write_text(json.dumps(
        {"winner": {"ship_run": "baseline_s0", "config": "tta=1,thr=0.50,minreg=256"}}))
    with pytest.raises(ShipError, match="removes predicted regions below 256 px"):
        ship.ship_winner(proto, tmp_path / "weights" / "default", tmp_path / "m.onnx", tmp_path / "data")
    assert not (tmp_path / "weights").exists() and not (tmp_path / "m.onnx").exists()


@needs_kvasir
def test_ship_chooses_the_one_pass_threshold_on_validation_alone(tmp_path, monkeypatch):
    """The shipped threshold is the best of the protocol's grid on the validation split, read alone: the
    choice is recomputed here from the validation images, and the test split is never loaded for it."""
    import numpy as np

    from effiseg.training import data as data_module
    from effiseg.training.checkpoint import load_model
    from effiseg.training.evaluate import predict_logits, score_logits
    from effiseg.training.protocol_common import THRESHOLDS
    from effiseg.training.ship import choose_one_pass_threshold
    proto, data, shipped, onnx = _protocol(tmp_path)
    model, cfg = load_model(proto / "runs" / WINNER["ship_run"] / "best.safetensors")
    read = []
    real = data_module.load_split
    monkeypatch.setattr(data_module, "load_split", lambda root, split, *a, **k: read.append(split) or real(root, split, *a, **k))
    choice = choose_one_pass_threshold(model, cfg, data, "cpu", log=lambda m: None)
    monkeypatch.undo()
    assert read == ["validation"]
    val = real(data, "validation")
    logits = predict_logits(model, cfg, [s.image for s in val])
    dice = {t: float(np.mean([r["dice"] for r in score_logits(val, logits, t)])) for t in THRESHOLDS}
    best = max(dice.values())
    assert dice[choice["chosen"]] == best
    # among equal scores, the one nearest 0.5
    assert abs(choice["chosen"] - 0.5) == min(abs(t - 0.5) for t, d in dice.items() if d == best)
    assert choice["mean_dice_by_threshold"] == {f"{t:.2f}": d for t, d in dice.items()}
    assert choice["n_images"] == len(val) and "test split is not read" in choice["rule"]


def test_a_plain_winner_recommends_its_arms_best_tta_setting_on_validation(tmp_path):
    from effiseg.training.ship import like_for_like_validation, tta_recommendation
    evaluations = tmp_path / "evaluations"
    evaluations.mkdir()
    vals = {"boundary_loss_s0": {"tta=0,thr=0.50,minreg=0": 0.80, "tta=1,thr=0.45,minreg=0": 0.82,
                                 "tta=1,thr=0.50,minreg=0,sizes=64+128": 0.84, "tta=1,thr=0.50,minreg=256": 0.9},
            "boundary_loss_s1": {"tta=0,thr=0.50,minreg=0": 0.80, "tta=1,thr=0.45,minreg=0": 0.83,
                                 "tta=1,thr=0.50,minreg=0,sizes=64+128": 0.80, "tta=1,thr=0.50,minreg=256": 0.9},
            # another arm's better setting is not this arm's recommendation
            "boundary_loss+x_s0": {"tta=1,thr=0.30,minreg=0": 0.99}}
    for run, val in vals.items():
        (evaluations / f"{run}.json").write_text(json.dumps({"run": run, "val": val}))
    plain = {"arm": "boundary_loss", "config": "tta=0,thr=0.50,minreg=0"}
    assert tta_recommendation(plain, tmp_path) == {"flips": True, "sizes": [], "threshold": 0.45}  # mean 0.825
    assert tta_recommendation({**plain, "config": "tta=1,thr=0.55,minreg=0,sizes=352+416"}, tmp_path) == {
        "flips": True, "sizes": [352, 416], "threshold": 0.55}
    assert tta_recommendation({**plain, "arm": "baseline"}, tmp_path) == {}
    # The guard against a worse model compares the same passes: one pass with one pass, the 8-pass
    # default of before with the new model's 8-pass row; nothing when no setting is shared.
    old = {"metrics": {"validation": {"mean_dice": 0.87, "tta": True, "tta_sizes": [352, 416]}}}
    new = {"metrics_by_tta": [{"flips": False, "sizes": [], "validation": {"mean_dice": 0.86}},
                              {"flips": True, "sizes": [352, 416], "validation": {"mean_dice": 0.88}}]}
    assert like_for_like_validation(new, old) == ("flip TTA at sizes 352+416 (8 network passes per image)", 0.88, 0.87)
    assert like_for_like_validation(new, new)[1:] == (0.86, 0.86)
    assert like_for_like_validation({"metrics_by_tta": new["metrics_by_tta"][:1]}, old) is None
