"""The analysis core on fake probabilities, the Markdown report, and the effiseg-analyze CLI."""
import csv
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from effiseg.training.analysis import analyze as AN
from effiseg.training.analysis.analyze import AttributeSpec
from effiseg.training.analysis.report import FN_COLOUR, FP_COLOUR, TP_COLOUR, error_overlay, write_report
from effiseg.training.data import Sample


def synthetic_sample(i: int, size: int = 96) -> Sample:
    rng = np.random.default_rng(i)
    img = np.empty((size, size, 3), np.uint8)
    noise = rng.normal(0, 10, (size, size))
    img[..., 0] = np.clip(170 + noise, 0, 255)
    img[..., 1] = np.clip(95 + noise, 0, 255)
    img[..., 2] = np.clip(85 + noise, 0, 255)
    if i % 2 == 0:
        img[size - 30:, :30] = 0                               # an overlay box on every other image
    yy, xx = np.mgrid[:size, :size]
    r = 8 + 3 * i
    mask = (yy - size // 2) ** 2 + (xx - size // 2 - i) ** 2 <= r * r
    img[mask] = np.clip(img[mask].astype(int) + 30, 0, 255)
    return Sample(f"s{i}", img, mask, Path(f"s{i}.png"), Path(f"s{i}_mask.png"))


def fake_probability(sample: Sample, shift: int) -> np.ndarray:
    """The true mask shifted right by ``shift`` pixels, softened: worse Dice for larger shifts."""
    m = np.roll(sample.mask, shift, axis=1).astype(np.float32)
    return np.clip(0.05 + 0.9 * m, 0, 1)


@pytest.fixture(scope="module")
def tiny_run():
    samples = [synthetic_sample(i) for i in range(6)]
    probs = [fake_probability(s, shift) for s, shift in zip(samples, (0, 2, 4, 8, 16, 30))]
    probs[5] = np.full(samples[5].mask.shape, 0.05, np.float32)   # the last image: polyp missed entirely
    result = AN.analyze_predictions(samples, probs, 0.5, n_worst_cases=3, meta={"split": "synthetic"})
    return samples, probs, result


# ---------------------------------------------------------------- analysis core

def test_rows_metrics_and_detection(tiny_run):
    samples, probs, result = tiny_run
    assert [r["stem"] for r in result.rows] == [s.stem for s in samples]
    assert result.rows[0]["dice"] == pytest.approx(1.0)
    dice = [r["dice"] for r in result.rows]
    assert dice == sorted(dice, reverse=True)
    assert result.rows[5]["dice"] == 0.0 and result.rows[5]["n_missed"] == 1
    assert result.detection["gt_polyps"] == 6 and result.detection["missed"] >= 1
    assert result.summary["n_images"] == 6
    assert [c.stem for c in result.cases] == ["s5", "s4", "s3"]
    assert result.rows[0]["overlay_present"] and not result.rows[1]["overlay_present"]


def test_worst_vs_rest_and_spearman_known_answers():
    rows = [{"stem": str(i), "dice": d, "x": x, "y": 1.0} for i, (d, x) in
            enumerate(zip([0.1, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.96, 0.97, 0.98], range(10)))]
    specs = (AttributeSpec("x", "x"), AttributeSpec("y", "constant"))
    out = AN.worst_vs_rest(rows, specs, fraction=0.2)
    assert out["n_worst"] == 2 and out["worst_stems"] == ["0", "1"]
    x = next(t for t in out["attributes"] if t["attribute"] == "x")
    assert x["spearman_rho"] == pytest.approx(1.0)             # dice increases with x, monotonically
    assert x["mean_worst"] == pytest.approx(0.5) and x["mean_rest"] == pytest.approx(np.mean(range(2, 10)))
    y = next(t for t in out["attributes"] if t["attribute"] == "y")
    assert math.isnan(y["spearman_rho"])                         # a constant has no rank correlation
    assert out["attributes"][0]["attribute"] == "x"


def test_buckets_fixed_categories_and_quartiles():
    rows = [{"stem": str(i), "dice": 0.1 * i, "recall": 1.0, "precision": 1.0, "n_missed": 0, "n_fp_regions": 0,
             "a": a, "n": n, "q": float(i), "z": z}
            for i, (a, n, z) in enumerate(zip([0.01, 0.03, 0.03, 0.3, 0.5, float("nan"), 0.0, 0.07],
                                              [0, 1, 1, 1, 2, 5, 3, 1],
                                              [0.0, 0.0, 0.01, 0.2, 0.5, 0.04, 0.06, 0.1]))]
    area = AN.bucket_table(AttributeSpec("a", "area", edges=(0.0, 0.02, 0.05, 0.10, 1.0)), rows)
    got = {b["bucket"]: b["n"] for b in area["buckets"]}
    assert got == {"[0, 0.02]": 2, "(0.02, 0.05]": 2, "(0.05, 0.1]": 1, "(0.1, 1]": 2, "n/a": 1}
    count = AN.bucket_table(AttributeSpec("n", "count", categories=(0, 1, 2, 3)), rows)
    assert {b["bucket"]: b["n"] for b in count["buckets"]} == {"0": 1, "1": 4, "2": 1, ">=3": 2}
    quart = AN.bucket_table(AttributeSpec("q", "quartiles"), rows)
    assert quart["rule"] == "quartiles" and [b["n"] for b in quart["buckets"]] == [2, 2, 2, 2]
    zero_bin = AN.bucket_table(AttributeSpec("z", "distance", edges=(0.0, 0.0, 0.05, 0.5)), rows)
    assert {b["bucket"]: b["n"] for b in zero_bin["buckets"]} == {"= 0": 2, "(0, 0.05]": 2, "(0.05, 0.5]": 4}
    assert count["buckets"][0]["mean_dice"] == pytest.approx(0.0)


def test_calibration_known_answers():
    mask = np.zeros((10, 10), bool)
    mask.flat[:80] = True
    perfect = AN.calibration([np.full((10, 10), 0.8)], [mask], n_bins=10)
    assert perfect["ece"] == pytest.approx(0.0, abs=1e-12)
    b = perfect["bins"][8]
    assert b["n_pixels"] == 100 and b["observed_frequency"] == pytest.approx(0.8)
    wrong = AN.calibration([np.ones((4, 4))], [np.zeros((4, 4), bool)], n_bins=5)
    assert wrong["ece"] == pytest.approx(1.0) and wrong["bins"][4]["n_pixels"] == 16
    assert wrong["brier"] == pytest.approx(1.0)
    mixed = AN.calibration([np.full((2, 2), 0.25), np.full((2, 2), 0.95)],
                           [np.array([[1, 0], [0, 0]], bool), np.ones((2, 2), bool)], n_bins=4)
    assert mixed["ece"] == pytest.approx(0.5 * 0.0 + 0.5 * 0.05)


def test_threshold_sweep_uses_given_validation_maps(tiny_run):
    samples, probs, _ = tiny_run
    val = [synthetic_sample(10)]
    val_probs = [np.where(val[0].mask, 0.3, 0.1).astype(np.float32)]     # only thresholds < 0.3 find it
    res = AN.analyze_predictions(samples, probs, 0.5, sweep_probabilities=val_probs,
                                 sweep_masks=[val[0].mask], sweep_source="validation", n_worst_cases=0)
    best = max(res.sweep, key=lambda p: p["mean_dice"])
    assert res.sweep_source == "validation" and best["threshold"] < 0.3 and best["mean_dice"] == 1.0
    assert res.cases == []


def test_input_checks(tiny_run):
    samples, probs, _ = tiny_run
    with pytest.raises(ValueError, match="probability maps"):
        AN.analyze_predictions(samples, probs[:-1])
    with pytest.raises(ValueError, match="differs from mask"):
        AN.analyze_predictions(samples[:1], [probs[0][:-1]])
    with pytest.raises(ValueError, match="threshold"):
        AN.analyze_predictions(samples, probs, threshold=1.5)


def test_probability_files_round_trip(tmp_path, tiny_run):
    samples, probs, _ = tiny_run
    path = AN.save_probabilities(tmp_path / "p.npz", [s.stem for s in samples], probs)
    back = AN.load_probabilities(path)
    assert list(back) == [s.stem for s in samples]
    assert np.allclose(back["s1"], probs[1], atol=1e-3)
    with pytest.raises(ValueError, match="no probability map"):
        AN.match_probabilities(samples + [synthetic_sample(9)], back, path)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a probability file"):
        AN.load_probabilities(tmp_path / "junk.npz")


# ---------------------------------------------------------------- files and report

def _strict_json(path: Path):
    def refuse(name):
        raise AssertionError(f"{path} holds {name}, which is not JSON")
    return json.loads(path.read_text(), parse_constant=refuse)


def test_outputs_and_report_build(tmp_path, tiny_run):
    _, _, result = tiny_run
    paths = AN.write_outputs(result, tmp_path)
    with paths["per_image_csv"].open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6 and list(rows[0])[:5] == ["stem", "dice", "iou", "precision", "recall"]
    assert "overlay_present" in rows[0] and "blur_laplacian_var" in rows[0]
    assert len(_strict_json(paths["per_image_json"])) == 6
    summary = _strict_json(paths["analysis_json"])
    for key in ("summary", "detection", "errors", "buckets", "worst", "threshold_sweep", "calibration"):
        assert key in summary
    assert summary["worst_case_stems"] == ["s5", "s4", "s3"]

    report = write_report(result, tmp_path, title="tiny")
    text = report.read_text()
    assert text.startswith("# tiny")
    for heading in ("## Summary", "## Polyp-level detection", "## What goes with the worst cases",
                    "## Dice by attribute bucket", "## Threshold sweep", "## Calibration", "## The 3 worst cases"):
        assert heading in text
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert len(links) == 3 + 3
    for link in links:
        assert not Path(link).is_absolute() and "\\" not in link
        png = tmp_path / link
        assert png.is_file() and png.stat().st_size < 200_000
        with Image.open(png) as im:
            assert im.format == "PNG"
    assert "figures/case_01_s5.png" in links


def test_error_overlay_colours_each_kind():
    img = np.full((4, 4, 3), 100, np.uint8)
    gt = np.zeros((4, 4), bool)
    pred = np.zeros((4, 4), bool)
    gt[0, 0] = pred[0, 0] = True              # TP
    pred[1, 1] = True                         # FP
    gt[2, 2] = True                           # FN
    out = error_overlay(img, gt, pred, alpha=1.0)
    hexes = {(0, 0): TP_COLOUR, (1, 1): FP_COLOUR, (2, 2): FN_COLOUR}
    for (y, x), colour in hexes.items():
        assert tuple(out[y, x]) == tuple(int(colour[i:i + 2], 16) for i in (1, 3, 5))
    assert out[3, 3, 0] == out[3, 3, 1] == out[3, 3, 2] == int(100 * 0.6)   # untouched pixels: dimmed grey


# ---------------------------------------------------------------- CLI

@pytest.fixture(scope="module")
def folder_and_checkpoint(tmp_path_factory):
    from effiseg.training.checkpoint import model_config, save_checkpoint
    from effiseg.training.model import build_model
    root = tmp_path_factory.mktemp("analyze-cli")
    (root / "data" / "images").mkdir(parents=True)
    (root / "data" / "masks").mkdir()
    for i in range(3):
        s = synthetic_sample(i, size=80)
        Image.fromarray(s.image).save(root / "data" / "images" / f"{i}.png")
        Image.fromarray(s.mask.astype(np.uint8) * 255).save(root / "data" / "masks" / f"{i}.png")
    model = build_model("effisegnet-lite0").eval()
    save_checkpoint(root / "ckpt", model, model_config("effisegnet-lite0", input_size=64))
    return root


def test_cli_on_a_checkpoint_then_on_saved_probabilities(folder_and_checkpoint):
    from effiseg.training.analysis.cli import analyze_command
    root = folder_and_checkpoint
    runner = CliRunner()
    out = root / "out"
    res = runner.invoke(analyze_command, [str(root / "ckpt"), "--data", str(root / "data"), "--split", "none",
                                          "--device", "cpu", "--output", str(out), "--cases", "2",
                                          "--save-probabilities", str(root / "probs.npz")])
    assert res.exit_code == 0, res.output
    assert "mean Dice" in res.output
    for name in ("per_image.csv", "per_image.json", "analysis.json", "REPORT.md"):
        assert (out / name).is_file()
    assert len(list((out / "figures").glob("case_*.png"))) == 2
    meta = _strict_json(out / "analysis.json")["meta"]
    assert meta["variant"] == "effisegnet-lite0" and meta["input_size"] == 64

    again = root / "again"
    res = runner.invoke(analyze_command, ["--probabilities", str(root / "probs.npz"), "--data", str(root / "data"),
                                          "--split", "none", "--output", str(again), "--no-report"])
    assert res.exit_code == 0, res.output
    assert (again / "per_image.csv").is_file() and not (again / "REPORT.md").exists()
    stems = [r["stem"] for r in csv.DictReader((again / "per_image.csv").open())]
    assert stems == ["0", "1", "2"]


def test_cli_errors_exit_non_zero(folder_and_checkpoint, tmp_path):
    from effiseg.training.analysis.cli import analyze_command
    root = folder_and_checkpoint
    runner = CliRunner()
    res = runner.invoke(analyze_command, ["--data", str(root / "data"), "--split", "none", "--output", str(tmp_path)])
    assert res.exit_code != 0 and "CHECKPOINT or --probabilities" in res.output
    res = runner.invoke(analyze_command, [str(root / "ckpt"), "--data", str(tmp_path / "nowhere"), "--split", "none",
                                          "--device", "cpu", "--output", str(tmp_path / "o")])
    assert res.exit_code == 2 and "error:" in res.output and "nowhere" in res.output


def test_analyze_checkpoint_predicts_then_analyses(folder_and_checkpoint):
    root = folder_and_checkpoint
    samples = [synthetic_sample(i, size=80) for i in range(2)]
    result, probs = AN.analyze_checkpoint(root / "ckpt", samples, sweep_samples=samples[:1], sweep_source="val",
                                          n_worst_cases=1, meta={"split": "x"})
    assert len(probs) == 2 and probs[0].shape == (80, 80) and probs[0].dtype == np.float32
    assert 0.0 <= float(probs[0].min()) and float(probs[0].max()) <= 1.0
    assert result.threshold == 0.5 and result.sweep_source == "val" and len(result.cases) == 1
    assert result.meta["split"] == "x" and result.meta["variant"] == "effisegnet-lite0"


def test_an_image_without_a_polyp_is_in_no_size_or_border_bucket():
    """Two polyps and an empty mask: the empty one is "n/a" for polyp size and border contact, not the
    smallest polyp nor one clear of the border."""
    samples = [synthetic_sample(i) for i in range(2)]
    empty = synthetic_sample(2)
    samples.append(Sample(empty.stem, empty.image, np.zeros_like(empty.mask), empty.image_path, empty.mask_path))
    probs = [fake_probability(s, 0) for s in samples]
    result = AN.analyze_predictions(samples, probs, 0.5, n_worst_cases=1, meta={"split": "synthetic"})
    row = next(r for r in result.rows if r["stem"] == empty.stem)
    assert math.isnan(row["area_fraction"]) and math.isnan(row["touches_border"])
    tables = {t["attribute"]: t for t in result.buckets} if isinstance(result.buckets, list) else result.buckets
    for name in ("area_fraction", "touches_border"):
        table = tables[name]
        counts = {b["bucket"]: b["n"] for b in table["buckets"]}
        assert counts.get("n/a") == 1 and sum(counts.values()) == 3, (name, counts)


def test_cli_takes_the_run_time_tta_choice(folder_and_checkpoint):
    """effiseg-analyze --tta none|flip|multiscale, as effiseg-run and effiseg-eval: one pass by default."""
    from effiseg.training.analysis.cli import analyze_command
    root = folder_and_checkpoint
    runner = CliRunner()
    for extra, flips, sizes in (([], False, None), (["--tta", "flip"], True, None),
                                (["--tta", "multiscale", "--tta-sizes", "64,96"], True, [64, 96])):
        out = root / f"tta-{len(extra)}"
        res = runner.invoke(analyze_command, [str(root / "ckpt"), "--data", str(root / "data"), "--split", "none",
                                              "--device", "cpu", "--output", str(out), "--no-report", *extra])
        assert res.exit_code == 0, res.output
        meta = _strict_json(out / "analysis.json")["meta"]
        assert meta["tta"] is flips and meta.get("tta_sizes") == sizes
        assert meta["tta_choice"] == (extra[1] if extra else "none")
    res = runner.invoke(analyze_command, [str(root / "ckpt"), "--data", str(root / "data"), "--split", "none",
                                          "--device", "cpu", "--output", str(root / "x"), "--tta", "multiscale"])
    assert res.exit_code == 2 and "--tta-sizes" in res.output
