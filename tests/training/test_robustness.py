"""effiseg-robustness: the shifts (identity at 0, seeded, growing with strength, masks handled by
kind) and the study end to end on a tiny model."""
import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from effiseg.training.analysis.robustness import parse_strengths, run_robustness, shifted_samples
from effiseg.training.analysis.robustness_cli import robustness_command
from effiseg.training.analysis.shifts import SHIFTS, apply_shift, parse_shifts
from effiseg.training.data import load_split


def _scene(h=96, w=112, seed=0):
    """A textured, colourful frame with a disc-shaped 'polyp' (its mask): every shift has something
    to change (edges for blur and JPEG, colour for white balance, corners for vignetting)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([120 + 80 * xx / w, 60 + 60 * yy / h, 90 + 30 * np.sin(xx / 5.0)], axis=-1)
    base += rng.normal(0, 12, (h, w, 3))
    mask = (yy - 0.55 * h) ** 2 + (xx - 0.4 * w) ** 2 < (0.22 * h) ** 2
    base[mask] = base[mask] * 0.6 + np.array([230, 140, 120]) * 0.4
    return np.clip(base, 0, 255).astype(np.uint8), mask


def _change(name, strength, seed=0):
    image, mask = _scene()
    out, _ = apply_shift(name, image, mask, strength, seed=seed, stem="7")
    return float(np.abs(out.astype(np.float64) - image).mean())


@pytest.mark.parametrize("name", list(SHIFTS))
def test_strength_zero_is_the_identity(name):
    image, mask = _scene()
    out, out_mask = apply_shift(name, image, mask, 0.0, seed=3, stem="a")
    assert np.array_equal(out, image) and np.array_equal(out_mask, mask)


@pytest.mark.parametrize("name", list(SHIFTS))
def test_each_shift_changes_the_image_more_as_strength_grows(name):
    changes = [_change(name, s) for s in (0.25, 0.5, 1.0)]
    assert changes[-1] > 1.0, f"{name} at full strength moves pixels by {changes[-1]:.2f} grey levels on average"
    # Monotonic up to a little slack (JPEG's and resampling's rounding are not smooth in the strength).
    assert changes[0] <= changes[1] * 1.1 + 0.05 and changes[1] <= changes[2] * 1.1 + 0.05, changes


@pytest.mark.parametrize("name", list(SHIFTS))
def test_same_seed_same_image_and_levels_share_their_draws(name):
    image, mask = _scene()
    a = apply_shift(name, image, mask, 0.7, seed=5, stem="12")
    b = apply_shift(name, image, mask, 0.7, seed=5, stem="12")
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


def test_seed_and_image_change_the_random_draws():
    image, mask = _scene()
    noisy = [apply_shift("sensor_noise", image, mask, 1.0, seed=s, stem=t)[0] for s, t in ((0, "1"), (1, "1"), (0, "2"))]
    assert not np.array_equal(noisy[0], noisy[1]) and not np.array_equal(noisy[0], noisy[2])


@pytest.mark.parametrize("name", [n for n, s in SHIFTS.items() if s.kind == "photometric"])
def test_photometric_shifts_keep_the_mask(name):
    image, mask = _scene()
    _, out_mask = apply_shift(name, image, mask, 1.0, seed=0, stem="x")
    assert np.array_equal(out_mask, mask)


def test_aspect_moves_the_mask_with_the_image():
    image, mask = _scene()
    image = np.zeros_like(image)
    image[mask] = 255                      # the image draws its own mask
    for stem in ("a", "b", "c", "d"):      # both axes get drawn among these
        out, out_mask = apply_shift("aspect", image, mask, 1.0, seed=0, stem=stem)
        assert out.shape == image.shape and out_mask.shape == mask.shape
        assert not np.array_equal(out_mask, mask)
        assert np.mean((out[..., 0] > 127) == out_mask) > 0.995
        assert out_mask.sum() > mask.sum() * 1.2   # stretched by 1.5 along one axis


def test_border_clears_the_mask_under_black_paint():
    image, mask = _scene()
    mask = np.ones_like(mask)
    out, out_mask = apply_shift("border", image, mask, 1.0, seed=0, stem="x")
    h, w = mask.shape
    assert not out_mask[0, 0] and not out_mask[h - 1, 0] and out_mask[h // 2, w // 2]
    painted = out[~out_mask]                          # black, or the overlay's light text
    assert painted.size and np.all((painted == 0) | (painted == 220))
    assert np.array_equal(out[out_mask], image[out_mask])


def test_bad_shift_names_and_strengths_are_clear_errors():
    with pytest.raises(ValueError, match="unknown shift.*blurr.*known: colour_temperature"):
        parse_shifts("gamma,blurr")
    assert parse_shifts("all") == list(SHIFTS)
    assert parse_strengths("1, 0.5,0,0.5") == [0.5, 1.0]
    for spec in ("1.5", "0", "a,b", "-0.2"):
        with pytest.raises(ValueError, match="strengths"):
            parse_strengths(spec)
    with pytest.raises(ValueError, match="strength must be in"):
        apply_shift("gamma", *_scene(), 2.0)


def _dataset(folder, n=4, size=(72, 80)):
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    for i in range(n):
        image, mask = _scene(*size, seed=i)
        Image.fromarray(image).save(folder / "images" / f"{i}.png")
        Image.fromarray((mask * 255).astype(np.uint8)).save(folder / "masks" / f"{i}.png")
    return folder


def test_study_clean_point_score_and_determinism(tiny_checkpoint, tmp_path):
    from effiseg.training.checkpoint import load_model
    from effiseg.training.evaluate import evaluate_samples
    model, cfg = load_model(tiny_checkpoint)
    samples = load_split(_dataset(tmp_path / "d"), None)
    clean, _, _ = evaluate_samples(model, cfg, samples)
    # Strength 0 through the study's own path gives the clean Dice exactly.
    at_zero, _, _ = evaluate_samples(model, cfg, shifted_samples(samples, "sensor_noise", 0.0, seed=0))
    assert at_zero["mean_dice"] == clean["mean_dice"]
    shifts = ["gamma", "sensor_noise", "aspect"]
    runs = [run_robustness(model, cfg, samples, shifts, [0.5, 1.0], 1.0, seed=4) for _ in range(2)]
    a = runs[0]
    assert a["score"]["clean_dice"] == clean["mean_dice"]
    assert [r["mean_dice"] for r in a["curves"]] == [r["mean_dice"] for r in runs[1]["curves"]]
    assert a["score"]["per_image"] == runs[1]["score"]["per_image"]
    at_one = [r["mean_dice"] for r in a["curves"] if r["strength"] == 1.0]
    assert a["score"]["robustness_score"] == pytest.approx(np.mean(at_one))
    assert all(r["mean_dice"] == clean["mean_dice"] for r in a["curves"] if r["strength"] == 0.0)
    with pytest.raises(ValueError, match="not among the strengths"):
        run_robustness(model, cfg, samples, shifts, [0.5], 1.0)


def test_cli_writes_curves_score_and_figure(tiny_checkpoint, tmp_path):
    data = _dataset(tmp_path / "d", n=3)
    out = tmp_path / "out"
    res = CliRunner().invoke(robustness_command, [
        str(tiny_checkpoint), "--data", str(data), "--split", "none", "--shifts", "jpeg,border",
        "--strengths", "0.5,1", "--score-strength", "1", "--device", "cpu", "--output", str(out)])
    assert res.exit_code == 0, res.output
    assert "robustness score" in res.output
    for name in ("robustness.json", "curves.csv", "per_image.csv", "summary.md", "robustness.png",
                 "shift_examples.png"):
        assert (out / name).is_file(), name
    result = json.loads((out / "robustness.json").read_text(encoding="utf-8"))
    assert result["settings"]["shifts"] == ["jpeg", "border"] and result["settings"]["tta"] is False
    assert len(result["curves"]) == 2 * 3           # 2 shifts x (clean + 2 strengths)
    assert set(result["score"]["per_image"]) == {"0", "1", "2"}
    rows = (out / "per_image.csv").read_text(encoding="utf-8").splitlines()
    assert len(rows) == 1 + 3 * (1 + 2 * 2)         # header + images x (clean + shifts x strengths)


@pytest.mark.parametrize("args, message", [
    (["--strengths", "0.5,1", "--score-strength", "0.25"], "not one of --strengths"),
    (["--shifts", "gamma,fog"], "unknown shift"),
    (["--strengths", "2"], "strengths must lie in"),
])
def test_cli_bad_options_exit_2_before_any_work(tiny_checkpoint, tmp_path, args, message):
    res = CliRunner().invoke(robustness_command, [str(tiny_checkpoint), "--output", str(tmp_path / "o"), *args])
    assert res.exit_code == 2 and message in res.output, res.output
    assert not (tmp_path / "o").exists()


def test_cli_missing_data_names_the_folder(tiny_checkpoint, tmp_path):
    res = CliRunner().invoke(robustness_command, [str(tiny_checkpoint), "--data", str(tmp_path / "nowhere"),
                                                  "--output", str(tmp_path / "o")])
    assert res.exit_code == 2 and "nowhere" in res.output, res.output


def test_cli_tta_passes_through_and_changes_the_predictions(tiny_checkpoint, tmp_path):
    data = _dataset(tmp_path / "d", n=2)
    common = [str(tiny_checkpoint), "--data", str(data), "--split", "none", "--shifts", "gamma", "--strengths", "1",
              "--score-strength", "1", "--device", "cpu", "--no-figure"]
    results = []
    for extra, name in (([], "one"), (["--tta", "flip", "--tta-sizes", "64,96"], "tta")):
        res = CliRunner().invoke(robustness_command, common + extra + ["--output", str(tmp_path / name)])
        assert res.exit_code == 0, res.output
        results.append(json.loads((tmp_path / name / "robustness.json").read_text(encoding="utf-8")))
    one, tta = results
    assert one["settings"]["tta"] is False and one["settings"]["tta_sizes"] == []
    assert tta["settings"]["tta"] is True and tta["settings"]["tta_sizes"] == [64, 96]
    assert one["curves"] != tta["curves"]
    assert not (tmp_path / "one" / "robustness.png").exists()
