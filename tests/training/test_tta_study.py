"""The multi-scale TTA study: combinations scored from per-size logits, the choice rule, the CLI's files."""
import json

import numpy as np
import pytest
from click.testing import CliRunner

pytest.importorskip("torch")

from effiseg.training.tta_study import choose, default_candidates, main, relative_cost, score_combinations  # noqa: E402


def test_candidates_and_costs():
    assert default_candidates(352) == (288, 320, 352, 384, 416, 448)
    assert default_candidates(64) == (64, 96, 128, 160)  # nothing below 64
    assert relative_cost((352,), 352) == 1.0
    assert relative_cost((352, 416), 352) == pytest.approx(1 + (416 / 352) ** 2)


def test_combinations_average_the_logits_and_the_rule_respects_the_cost_cap():
    # One 2x2 image whose true mask is the left column. Size 64 alone finds half of it, size 128
    # alone adds a false positive, and their mean logits find exactly the true mask.
    mask = np.array([[True, False], [True, False]])
    logits = {64: [np.array([[3.0, -3.0], [-1.0, -3.0]])], 128: [np.array([[3.0, 1.0], [3.0, -3.0]])]}
    rows = score_combinations(logits, [mask], 64, max_sizes=2, thresholds=(0.5,))
    by = {tuple(r["sizes"]): r for r in rows}
    assert by[(64,)]["mean_dice"] == pytest.approx(2 / 3)
    assert by[(128,)]["mean_dice"] == pytest.approx(0.8)
    assert by[(64, 128)]["mean_dice"] == pytest.approx(1.0)
    assert by[(64, 128)]["cost"] == pytest.approx(5.0)
    assert choose(rows, max_cost=5.0)["sizes"] == [64, 128]
    assert choose(rows, max_cost=4.0)["sizes"] == [128]  # the pair costs 1 + 4 passes
    with pytest.raises(ValueError, match="no combination costs at most"):
        choose(rows, max_cost=0.5)


def test_ties_go_to_the_cheaper_and_to_the_threshold_nearer_one_half():
    rows = [{"sizes": [64, 96], "threshold": 0.5, "mean_dice": 0.9, "cost": 3.25},
            {"sizes": [96], "threshold": 0.4, "mean_dice": 0.9, "cost": 2.25},
            {"sizes": [96], "threshold": 0.5, "mean_dice": 0.9, "cost": 2.25}]
    assert choose(rows, 4.0) == rows[2]


def test_cli_writes_its_tables_plot_and_report(tiny_checkpoint, tmp_path):
    from PIL import Image
    rng = np.random.default_rng(0)
    for split in ("validation", "test"):
        for sub in ("images", "masks"):
            (tmp_path / "data" / split / sub).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(
                tmp_path / "data" / split / "images" / f"{i}.png")
            m = np.zeros((64, 64), np.uint8)
            m[10 + i:40, 12:44 - i] = 255
            Image.fromarray(m).save(tmp_path / "data" / split / "masks" / f"{i}.png")
    out = tmp_path / "study"
    res = CliRunner().invoke(main, [str(tiny_checkpoint), "--data", str(tmp_path / "data"), "--device", "cpu",
                                    "--sizes", "64,96", "--max-cost", "3", "--out", str(out)])
    assert res.exit_code == 0, res.output
    study = json.loads((out / "study.json").read_text())
    assert study["meta"]["candidates"] == [64, 96] and study["meta"]["n_images"] == 3
    assert {tuple(r["sizes"]) for r in study["rows"]} == {(64,), (96,), (64, 96)}
    assert study["reference"]["sizes"] == [64] and study["reference"]["threshold"] == 0.5
    best = max(r["mean_dice"] for r in study["rows"])
    assert study["chosen"]["mean_dice"] == pytest.approx(best)  # every row costs <= 3 here
    assert (out / "dice_vs_cost.png").stat().st_size > 0 and "## Chosen" in (out / "STUDY.md").read_text()
    assert "chosen: sizes" in res.output
    warned = CliRunner().invoke(main, [str(tiny_checkpoint), "--data", str(tmp_path / "data"), "--split", "test",
                                       "--device", "cpu", "--sizes", "64", "--out", str(tmp_path / "s2")])
    assert warned.exit_code == 0 and "should be made on validation" in warned.output
    bad = CliRunner().invoke(main, [str(tiny_checkpoint), "--data", str(tmp_path / "data"), "--sizes", "70",
                                    "--out", str(tmp_path / "s3")])
    assert bad.exit_code == 2 and "multiple of 32" in bad.output
    too_dear = CliRunner().invoke(main, [str(tiny_checkpoint), "--data", str(tmp_path / "data"), "--sizes", "128",
                                         "--max-cost", "2", "--out", str(tmp_path / "s4")])
    assert too_dear.exit_code == 2 and "no candidate size costs at most" in too_dear.output  # before any pass
    assert not (tmp_path / "s4").exists()
