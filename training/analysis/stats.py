"""Statistics for claiming an improvement: paired bootstrap intervals, mean ± sd, percentiles.

Two models evaluated on the same test images give paired per-image scores; the question is how
sure we are about the mean per-image difference ``b - a``. The bootstrap resamples *images* with
replacement (the test set is the sample of the population we care about) and reads the interval
off the percentiles of the resampled mean differences (the percentile method).

With several training seeds per arm, the seed-to-seed variation is a second source of noise:
:func:`seeded_paired_bootstrap_ci` averages each image's score over seeds (images resampled), or,
with ``hierarchical=True``, also resamples each arm's seeds so the interval widens with the spread
between runs.

``p_value_like`` is the two-sided bootstrap tail share ``2 * min(P*(diff <= 0), P*(diff >= 0))``
(capped at 1): small when nearly every resample agrees on the sign. It is a convenience for
ranking, not an exact p-value.

All returned values are plain Python floats/ints, ready for JSON.
"""
from __future__ import annotations

import numpy as np

# Resamples are drawn in blocks so memory stays at block x n_images numbers.
_BLOCK = 2000


def _as_vector(x, name: str) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional (one value per image), got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} is empty")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return arr


def _check_ci(ci: float, n_boot: int) -> None:
    if not 0.0 < ci < 1.0:
        raise ValueError(f"ci must be in (0, 1), got {ci}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be positive, got {n_boot}")


def _summarise_boot(point: float, boot: np.ndarray, ci: float, n: int, n_boot: int, **extra) -> dict:
    alpha = (1.0 - ci) / 2.0
    low, high = np.quantile(boot, [alpha, 1.0 - alpha])
    tail = 2.0 * min(float(np.mean(boot <= 0.0)), float(np.mean(boot >= 0.0)))
    return {"mean_diff": float(point), "low": float(low), "high": float(high),
            "p_value_like": float(min(1.0, tail)), "ci": float(ci), "n": int(n), "n_boot": int(n_boot),
            **extra}


def _resampled_means(values: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """Means of ``n_boot`` resamples-with-replacement of ``values`` (multinomial counts, blocked)."""
    n = values.size
    out = np.empty(n_boot)
    probs = np.full(n, 1.0 / n)
    for start in range(0, n_boot, _BLOCK):
        stop = min(n_boot, start + _BLOCK)
        counts = rng.multinomial(n, probs, size=stop - start)
        out[start:stop] = counts @ values / n
    return out


def bootstrap_mean_ci(x, n_boot: int = 10000, ci: float = 0.95, seed: int = 0) -> dict:
    """Percentile bootstrap interval of the mean of one sample: ``dict(mean, low, high, n)``."""
    x = _as_vector(x, "x")
    _check_ci(ci, n_boot)
    boot = _resampled_means(x, n_boot, np.random.default_rng(seed))
    alpha = (1.0 - ci) / 2.0
    low, high = np.quantile(boot, [alpha, 1.0 - alpha])
    return {"mean": float(x.mean()), "low": float(low), "high": float(high), "ci": float(ci),
            "n": int(x.size), "n_boot": int(n_boot)}


def paired_bootstrap_ci(a, b, n_boot: int = 10000, ci: float = 0.95, seed: int = 0) -> dict:
    """Interval of the mean per-image difference ``b - a`` (images resampled with replacement).

    Returns ``dict(mean_diff, low, high, p_value_like, ci, n, n_boot)``. ``a`` and ``b`` are the
    per-image scores of the two arms on the same images, in the same order.
    """
    a, b = _as_vector(a, "a"), _as_vector(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"paired samples differ in length: a has {a.size} images, b has {b.size}")
    _check_ci(ci, n_boot)
    diff = b - a
    boot = _resampled_means(diff, n_boot, np.random.default_rng(seed))
    return _summarise_boot(diff.mean(), boot, ci, diff.size, n_boot)


def _as_matrix(x, name: str) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.size == 0:
        raise ValueError(f"{name} must be a (seeds x images) matrix, got shape {np.shape(x)}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return arr


def seeded_paired_bootstrap_ci(a, b, n_boot: int = 10000, ci: float = 0.95, seed: int = 0,
                               hierarchical: bool = False, paired_seeds: bool = False) -> dict:
    """Paired interval of ``mean(b) - mean(a)`` when each arm was trained with several seeds.

    ``a`` is (seeds_a x images), ``b`` is (seeds_b x images); the seed counts may differ, the image
    columns must be the same images in the same order. Without ``hierarchical`` each image's
    score is averaged over its arm's seeds and the images are bootstrapped (pairing kept). With
    ``hierarchical=True`` every resample also draws each arm's seeds with replacement
    (independently: seed k of one arm is no partner of seed k of the other), then the same
    resampled images for both arms, so run-to-run variance enters the interval. With
    ``paired_seeds=True`` (implies hierarchical; both arms need the same seeds in the same order)
    the seed draw is shared: row k of ``a`` and of ``b`` were trained with the same seed (same
    initialisation of the decoder, same data order), so seed k's difference ``b[k] - a[k]`` is the
    unit that is resampled, together with the images.

    Returns :func:`paired_bootstrap_ci`'s keys plus ``n_seeds_a``, ``n_seeds_b``, ``hierarchical``.
    """
    a, b = _as_matrix(a, "a"), _as_matrix(b, "b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"arms cover different numbers of images: a {a.shape[1]}, b {b.shape[1]}")
    _check_ci(ci, n_boot)
    rng = np.random.default_rng(seed)
    n_img = a.shape[1]
    point = b.mean(axis=0) - a.mean(axis=0)
    if paired_seeds:
        if a.shape[0] != b.shape[0]:
            raise ValueError(f"paired seeds need the same seeds in both arms: a {a.shape[0]}, b {b.shape[0]}")
        hierarchical = True
    extra = {"n_seeds_a": int(a.shape[0]), "n_seeds_b": int(b.shape[0]), "hierarchical": bool(hierarchical),
             "paired_seeds": bool(paired_seeds)}
    if not hierarchical:
        boot = _resampled_means(point, n_boot, rng)
        return _summarise_boot(point.mean(), boot, ci, n_img, n_boot, **extra)
    boot = np.empty(n_boot)
    img_probs = np.full(n_img, 1.0 / n_img)
    pa = np.full(a.shape[0], 1.0 / a.shape[0])
    pb = np.full(b.shape[0], 1.0 / b.shape[0])
    for start in range(0, n_boot, _BLOCK):
        m = min(n_boot, start + _BLOCK) - start
        wa = rng.multinomial(a.shape[0], pa, size=m) / a.shape[0]      # (m, seeds_a) seed weights
        wb = wa if paired_seeds else rng.multinomial(b.shape[0], pb, size=m) / b.shape[0]
        per_image = wb @ b - wa @ a                                     # (m, images)
        counts = rng.multinomial(n_img, img_probs, size=m)              # (m, images)
        boot[start:start + m] = np.einsum("ij,ij->i", counts, per_image) / n_img
    return _summarise_boot(point.mean(), boot, ci, n_img, n_boot, **extra)


def mean_std(values, ddof: int = 1) -> dict:
    """``dict(mean, std, n)``; std with ``ddof`` (sample sd by default), 0 for a single value."""
    x = _as_vector(values, "values")
    std = float(x.std(ddof=ddof)) if x.size > ddof else 0.0
    return {"mean": float(x.mean()), "std": std, "n": int(x.size)}


def format_mean_std(values, digits: int = 4, ddof: int = 1) -> str:
    """``"0.9312 ± 0.0040 (n=3)"``."""
    d = mean_std(values, ddof)
    return f"{d['mean']:.{digits}f} ± {d['std']:.{digits}f} (n={d['n']})"


def per_seed_mean_std(matrix, ddof: int = 1) -> dict:
    """Mean over images for each seed (rows of a seeds x images matrix), then mean ± sd over seeds."""
    m = _as_matrix(matrix, "matrix")
    per_seed = m.mean(axis=1)
    out = mean_std(per_seed, ddof)
    out["per_seed"] = [float(v) for v in per_seed]
    return out


def percentile(values, q: float) -> float:
    """The ``q``-th percentile (0-100, linear interpolation between order statistics)."""
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile must be in [0, 100], got {q}")
    return float(np.percentile(_as_vector(values, "values"), q))


def percentiles(values, qs=(5, 25, 50, 75, 95)) -> dict:
    """``{"p5": ..., "p25": ..., ...}`` for the given percentiles (0-100)."""
    x = _as_vector(values, "values")
    for q in qs:
        if not 0.0 <= q <= 100.0:
            raise ValueError(f"percentile must be in [0, 100], got {q}")
    return {f"p{q:g}": float(v) for q, v in zip(qs, np.percentile(x, list(qs)))}


def holm_adjust(p_values) -> list[float]:
    """Holm's step-down adjustment of a family of p-values (same order as given, capped at 1): a
    result is claimed at level alpha when its adjusted value is below alpha, and the chance of any
    false claim in the family stays below alpha. Needed where one report makes many comparisons
    (every arm and every inference candidate against the baseline)."""
    p = np.asarray(list(p_values), dtype=np.float64)
    if p.size == 0:
        return []
    if np.any(~np.isfinite(p)) or np.any(p < 0):
        raise ValueError("p-values must be finite and non-negative")
    order = np.argsort(p, kind="stable")
    adjusted = np.empty_like(p)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (p.size - rank) * p[i]))
        adjusted[i] = running
    return [float(x) for x in adjusted]
