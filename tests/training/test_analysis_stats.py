"""Bootstrap intervals and summary helpers on samples with known answers."""
import numpy as np
import pytest

from effiseg.training.analysis import stats as S


def test_constant_difference_gives_a_zero_width_interval_at_that_value():
    a = np.linspace(0.5, 0.9, 50)
    out = S.paired_bootstrap_ci(a, a + 0.03, n_boot=2000)
    assert out["mean_diff"] == pytest.approx(0.03, abs=1e-12)
    assert out["low"] == pytest.approx(0.03, abs=1e-12) and out["high"] == pytest.approx(0.03, abs=1e-12)
    assert out["p_value_like"] == 0.0
    assert out["n"] == 50 and out["n_boot"] == 2000 and out["ci"] == 0.95


def test_identical_arms_give_zero_and_p_one():
    a = np.random.default_rng(0).random(30)
    out = S.paired_bootstrap_ci(a, a, n_boot=500)
    assert out["mean_diff"] == 0.0 and out["low"] == 0.0 and out["high"] == 0.0
    assert out["p_value_like"] == 1.0


def test_symmetric_differences_give_an_interval_centred_on_zero():
    diffs = np.array([-3.0, -2.0, -1.0, 1.0, 2.0, 3.0] * 10)
    out = S.paired_bootstrap_ci(np.zeros_like(diffs), diffs, n_boot=20000, seed=1)
    assert out["mean_diff"] == pytest.approx(0.0, abs=1e-12)
    assert out["low"] < 0 < out["high"]
    assert abs(out["low"] + out["high"]) < 0.05 * (out["high"] - out["low"])
    assert out["p_value_like"] > 0.8
    # The bootstrap standard error of the mean is sd/sqrt(n): the 95% half-width is about 1.96 of them.
    half = (out["high"] - out["low"]) / 2
    se = diffs.std() / np.sqrt(diffs.size)
    assert half == pytest.approx(1.96 * se, rel=0.05)


def test_clear_improvement_excludes_zero_and_reproduces_with_the_seed():
    rng = np.random.default_rng(5)
    a = rng.random(200)
    b = a + 0.05 + rng.normal(0, 0.02, 200)
    one = S.paired_bootstrap_ci(a, b, n_boot=3000, seed=7)
    two = S.paired_bootstrap_ci(a, b, n_boot=3000, seed=7)
    other = S.paired_bootstrap_ci(a, b, n_boot=3000, seed=8)
    assert one == two
    assert other["low"] != one["low"]
    assert 0 < one["low"] < one["mean_diff"] < one["high"]
    assert one["p_value_like"] == 0.0
    assert S.paired_bootstrap_ci(b, a, n_boot=3000, seed=7)["high"] < 0   # direction is b - a


def test_wider_level_gives_wider_interval():
    rng = np.random.default_rng(2)
    a, b = rng.random(80), rng.random(80)
    i90 = S.paired_bootstrap_ci(a, b, ci=0.90, n_boot=4000)
    i99 = S.paired_bootstrap_ci(a, b, ci=0.99, n_boot=4000)
    assert i99["low"] < i90["low"] and i99["high"] > i90["high"]


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="differ in length"):
        S.paired_bootstrap_ci([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="NaN"):
        S.paired_bootstrap_ci([1, np.nan], [1, 2])
    with pytest.raises(ValueError, match="empty"):
        S.paired_bootstrap_ci([], [])
    with pytest.raises(ValueError, match="ci must be"):
        S.paired_bootstrap_ci([1, 2], [1, 2], ci=95)


def test_seeded_average_over_seeds_then_bootstrap_images():
    rng = np.random.default_rng(0)
    a = rng.random((3, 40))
    b = rng.random((2, 40))
    out = S.seeded_paired_bootstrap_ci(a, b, n_boot=2000, seed=3)
    ref = S.paired_bootstrap_ci(a.mean(axis=0), b.mean(axis=0), n_boot=2000, seed=3)
    for key in ("mean_diff", "low", "high", "p_value_like"):
        assert out[key] == pytest.approx(ref[key], abs=1e-12)
    assert out["n_seeds_a"] == 3 and out["n_seeds_b"] == 2 and out["hierarchical"] is False
    with pytest.raises(ValueError, match="different numbers of images"):
        S.seeded_paired_bootstrap_ci(a, b[:, :-1])


def test_hierarchical_bootstrap_sees_seed_to_seed_spread():
    # Arm b's two seeds sit +0.1 and -0.1 from arm a on every image: the seed-averaged difference is 0
    # everywhere (zero-width interval), but which seeds one happens to train can shift it by +-0.1.
    a = np.zeros((2, 30))
    b = np.stack([np.full(30, 0.1), np.full(30, -0.1)])
    flat = S.seeded_paired_bootstrap_ci(a, b, n_boot=4000)
    assert flat["low"] == pytest.approx(0.0, abs=1e-12) and flat["high"] == pytest.approx(0.0, abs=1e-12)
    hier = S.seeded_paired_bootstrap_ci(a, b, n_boot=4000, hierarchical=True)
    assert hier["mean_diff"] == pytest.approx(0.0, abs=1e-12)
    assert hier["low"] == pytest.approx(-0.1) and hier["high"] == pytest.approx(0.1)
    assert hier["hierarchical"] is True


def test_hierarchical_equals_flat_when_seeds_agree():
    rng = np.random.default_rng(4)
    per_image = rng.random(60)
    a = np.stack([per_image] * 3)
    b = np.stack([per_image + 0.02 + rng.normal(0, 0.05, 60)] * 2)
    flat = S.seeded_paired_bootstrap_ci(a, b, n_boot=20000, seed=0)
    hier = S.seeded_paired_bootstrap_ci(a, b, n_boot=20000, seed=0, hierarchical=True)
    assert hier["mean_diff"] == pytest.approx(flat["mean_diff"])
    width = flat["high"] - flat["low"]
    assert hier["low"] == pytest.approx(flat["low"], abs=0.05 * width)
    assert hier["high"] == pytest.approx(flat["high"], abs=0.05 * width)


def test_bootstrap_mean_ci():
    out = S.bootstrap_mean_ci(np.full(10, 0.8), n_boot=200)
    assert out["mean"] == pytest.approx(0.8) and out["low"] == pytest.approx(0.8) and out["high"] == pytest.approx(0.8)


def test_mean_std_and_percentiles():
    assert S.mean_std([1.0, 2.0, 3.0]) == {"mean": 2.0, "std": 1.0, "n": 3}
    assert S.mean_std([1.0, 2.0, 3.0], ddof=0)["std"] == pytest.approx(np.sqrt(2 / 3))
    assert S.mean_std([0.7]) == {"mean": 0.7, "std": 0.0, "n": 1}
    assert S.format_mean_std([0.9, 0.92, 0.94]) == "0.9200 ± 0.0200 (n=3)"
    x = np.arange(101)
    assert S.percentile(x, 25) == 25.0
    assert S.percentiles(x, (5, 50, 95)) == {"p5": 5.0, "p50": 50.0, "p95": 95.0}
    with pytest.raises(ValueError):
        S.percentile(x, 120)
    seeds = S.per_seed_mean_std([[0.8, 0.9], [0.9, 1.0]])
    assert seeds["per_seed"] == pytest.approx([0.85, 0.95]) and seeds["mean"] == pytest.approx(0.9)
    assert seeds["std"] == pytest.approx(np.std([0.85, 0.95], ddof=1))


def test_paired_seeds_interval_carries_seed_noise():
    """With seeds shared between arms, resampling seed differences widens the interval when the gain
    varies by seed, and gives a zero-width interval when every seed and image gains the same."""
    from effiseg.training.analysis.stats import seeded_paired_bootstrap_ci
    rng = np.random.default_rng(1)
    a = rng.random((3, 50))
    same = seeded_paired_bootstrap_ci(a, a + 0.02, n_boot=2000, paired_seeds=True)
    assert same["paired_seeds"] and same["low"] == pytest.approx(0.02) and same["high"] == pytest.approx(0.02)
    b = a + np.array([[0.00], [0.02], [0.04]])          # the gain depends on the seed
    images_only = seeded_paired_bootstrap_ci(a, b, n_boot=4000)
    paired = seeded_paired_bootstrap_ci(a, b, n_boot=4000, paired_seeds=True)
    assert paired["mean_diff"] == pytest.approx(0.02) == images_only["mean_diff"]
    assert images_only["high"] - images_only["low"] < 1e-9  # seed-averaged: blind to the seed spread
    assert paired["low"] <= 0.0 + 1e-12 and paired["high"] >= 0.04 - 1e-12
    with pytest.raises(ValueError, match="same seeds"):
        seeded_paired_bootstrap_ci(a, b[:2], paired_seeds=True)


def test_holm_adjustment_on_known_values():
    # Sorted p 0.01, 0.02, 0.03, 0.5 with m = 4: 0.04, max(0.04, 0.06), max(0.06, 0.06), max(0.06, 0.5).
    assert np.allclose(S.holm_adjust([0.03, 0.01, 0.5, 0.02]), [0.06, 0.04, 0.5, 0.06])
    assert S.holm_adjust([0.4, 0.9]) == [0.8, 0.9]  # capped where m * p passes 1, never below an earlier one
    assert S.holm_adjust([]) == []
    with pytest.raises(ValueError):
        S.holm_adjust([0.1, float("nan")])
