"""Aggregates a protocol folder (see protocol.py) into protocol_results.json and PROTOCOL.md.

Statistics:
* Test metrics per arm: mean and standard deviation over seeds of each run's mean-over-images.
* Choices (arm, TTA, threshold, small-region removal) are made on validation alone: the mean over
  seeds of validation mean Dice. The test split is read only to report the chosen ones.
* Gain: the mean per-image test Dice difference against the baseline, with a bootstrap 95% interval
  that resamples seeds and images together (``seeded_paired_bootstrap_ci(paired_seeds=True)``): run k
  of every arm shares seed k (same initialisation and data order), so seed k's difference is one unit.
  Run-to-run noise therefore widens the interval; with 3 seeds it is coarse, and the per-seed
  differences are listed beside it. An images-only interval (seed-averaged scores, images resampled)
  is kept as ``images_only`` for reference: it ignores training noise and is too narrow for a claim.
* Noise floor: the baseline's spread over seeds, and the interval between two baseline seeds.
* Robustness: each run's robustness score on validation (effiseg-robustness's, one pass, stored by
  ``evaluate``), compared with the baseline's by the same paired bootstrap over seeds and images;
  these comparisons join the family Holm's adjustment covers.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .analysis.stats import holm_adjust, paired_bootstrap_ci, seeded_paired_bootstrap_ci
from .protocol_common import PLAIN, describe_cut_short, parse_config_key, training_extent

METRICS = ("dice", "iou", "precision", "recall")


def _arm_seed(run_name: str) -> tuple[str, int]:
    arm, seed = run_name.rsplit("_s", 1)
    return arm, int(seed)


def load_evaluations(out: Path) -> dict[str, dict[int, dict]]:
    arms: dict[str, dict[int, dict]] = {}
    for f in sorted((out / "evaluations").glob("*.json")):
        ev = json.loads(f.read_text(encoding="utf-8"))
        arm, seed = _arm_seed(ev["run"])
        arms.setdefault(arm, {})[seed] = ev
    if not arms:
        raise FileNotFoundError(f"no evaluations in {out / 'evaluations'}; run the 'evaluate' step first")
    return arms


def _per_image(runs: dict[int, dict], key: str, metric: str = "dice") -> np.ndarray:
    """seeds x images matrix of a test metric for one inference config."""
    seeds = sorted(runs)
    return np.array([runs[s]["test"][key][metric] for s in seeds], dtype=np.float64)


def _mean_std(values) -> dict:
    v = np.asarray(values, dtype=np.float64)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "n": int(len(v))}


def summarize_arm(runs: dict[int, dict], key: str) -> dict:
    out = {"config": key, "seeds": sorted(runs),
           "val_dice": _mean_std([runs[s]["val"][key] for s in sorted(runs)])}
    for m in METRICS:
        out[f"test_{m}"] = _mean_std(_per_image(runs, key, m).mean(axis=1))
    return out


def shared_keys(*arm_runs: dict[int, dict]) -> list[str]:
    """Inference settings scored for every run of the given arms, in the first run's order:
    evaluation files made by different versions (one seed re-evaluated after the multi-scale
    candidate was added, say) are compared on what they all hold."""
    all_runs = [r for runs in arm_runs for r in runs.values()]
    common = set(all_runs[0]["val"]).intersection(*(r["val"] for r in all_runs[1:]))
    return [k for k in all_runs[0]["val"] if k in common]


def best_config_on_val(runs: dict[int, dict], allowed=None, keys=None) -> str:
    keys = [k for k in (keys if keys is not None else shared_keys(runs)) if allowed is None or allowed(k)]
    return max(keys, key=lambda k: (np.mean([runs[s]["val"][k] for s in runs]), k == PLAIN))


def robustness_matrix(runs: dict[int, dict]) -> np.ndarray | None:
    """seeds x validation images of the per-image robustness score (None when a run has none:
    evaluated with --no-robustness or by an older version)."""
    if not all("robustness" in runs[s] for s in runs):
        return None
    return np.array([runs[s]["robustness"]["per_image"] for s in sorted(runs)], dtype=np.float64)


def robustness_results(arms: dict[str, dict[int, dict]], baseline: str, n_boot: int) -> dict:
    """Per arm: the robustness score (effiseg-robustness's, validation, one pass) mean ± sd over
    seeds and, against the baseline, the per-image difference with the same paired bootstrap over
    seeds and images as the test gains. Arms without scores are left out."""
    base = robustness_matrix(arms[baseline])
    if base is None:
        return {}
    stems = {tuple(ev["validation_stems"]) for runs in arms.values() for ev in runs.values()}
    if len(stems) != 1:
        raise ValueError("runs were evaluated on different validation images; cannot pair their robustness")
    out = {}
    for arm, runs in sorted(arms.items()):
        mat = robustness_matrix(runs)
        if mat is None:
            continue
        seeds = sorted(runs)
        entry = {"score": _mean_std(mat.mean(axis=1)),
                 "clean_dice": _mean_std([runs[s]["robustness"]["clean_dice"] for s in seeds]),
                 "per_seed": {str(s): float(v) for s, v in zip(seeds, mat.mean(axis=1))},
                 "strength": runs[seeds[0]]["robustness"]["strength"], "gain_vs_baseline": None}
        if arm != baseline:
            if seeds != sorted(arms[baseline]):
                raise ValueError("every arm needs the baseline's seeds to pair runs by seed")
            g = seeded_paired_bootstrap_ci(base, mat, n_boot=n_boot, seed=0, paired_seeds=True)
            g["per_seed_diff"] = [float(d) for d in (mat - base).mean(axis=1)]
            entry["gain_vs_baseline"] = g
        out[arm] = entry
    return out


def _parse(key: str) -> dict:
    s = parse_config_key(key)
    return {"tta": int(s["tta"]), "thr": s["threshold"], "minreg": s["min_region_px"], "sizes": s["tta_sizes"]}


def build_protocol_report(out: Path, n_boot: int = 10000, baseline: str = "baseline") -> Path:
    out = Path(out)
    arms = load_evaluations(out)
    if baseline not in arms:
        raise ValueError(f"no '{baseline}' arm in {out}")
    plan = json.loads((out / "plan.json").read_text(encoding="utf-8")) if (out / "plan.json").exists() else {}
    stems_ok = {tuple(ev["test_stems"]) for runs in arms.values() for ev in runs.values()}
    if len(stems_ok) != 1:
        raise ValueError("runs were evaluated on different test images; cannot pair them")
    base_runs = arms[baseline]
    base_mat = _per_image(base_runs, PLAIN)

    def gain(runs, key, base_key=PLAIN):
        if sorted(runs) != sorted(base_runs):
            raise ValueError("every arm needs the baseline's seeds to pair runs by seed")
        ref = base_mat if base_key == PLAIN else _per_image(base_runs, base_key)
        other = _per_image(runs, key)
        out = seeded_paired_bootstrap_ci(ref, other, n_boot=n_boot, seed=0, paired_seeds=True)
        out["images_only"] = paired_bootstrap_ci(ref.mean(axis=0), other.mean(axis=0), n_boot=n_boot, seed=0)
        out["per_seed_diff"] = [float(d) for d in (other - ref).mean(axis=1)]
        return out

    results = {"plan": plan, "training": training_extent(out, arms), "arms": {},
               "inference_candidates_on_baseline": {}}
    # Every arm is tuned and compared over the same inference settings: those all runs were scored on.
    keys = shared_keys(*arms.values())
    dropped = sorted({k for runs in arms.values() for r in runs.values() for k in r["val"]} - set(keys))
    if dropped:
        results["settings_not_scored_for_every_run"] = dropped
    for arm, runs in sorted(arms.items()):
        plain = summarize_arm(runs, PLAIN)
        tuned_key = best_config_on_val(runs, keys=keys)
        tuned = summarize_arm(runs, tuned_key)
        results["arms"][arm] = {"plain": plain, "tuned": tuned,
                                "gain_plain_vs_baseline": gain(runs, PLAIN) if arm != baseline else None,
                                "gain_tuned_vs_baseline": gain(runs, tuned_key),
                                "per_seed_test_dice_plain": {str(s): float(np.mean(runs[s]["test"][PLAIN]["dice"]))
                                                             for s in sorted(runs)}}
    # Each inference-time candidate alone on the baseline, its setting chosen on validation.
    singles = {
        "flip TTA": lambda k: _parse(k)["thr"] == 0.5 and _parse(k)["minreg"] == 0 and not _parse(k)["sizes"],
        "multi-scale + flip TTA": lambda k: (_parse(k)["thr"] == 0.5 and _parse(k)["minreg"] == 0
                                             and bool(_parse(k)["sizes"])),
        "threshold chosen on validation": lambda k: (_parse(k)["tta"] == 0 and _parse(k)["minreg"] == 0
                                                     and not _parse(k)["sizes"]),
        "small-region removal": lambda k: _parse(k)["tta"] == 0 and _parse(k)["thr"] == 0.5 and not _parse(k)["sizes"],
    }
    for name, allowed in singles.items():
        if not any(allowed(k) for k in keys):
            continue  # evaluations made before this candidate existed (no multi-scale keys)
        key = best_config_on_val(base_runs, allowed, keys=keys)
        results["inference_candidates_on_baseline"][name] = {**summarize_arm(base_runs, key),
                                                             "gain_vs_baseline": gain(base_runs, key)}
    # Winner: best mean validation Dice over every arm and inference configuration.
    cand = [(np.mean([runs[s]["val"][k] for s in runs]), arm, k)
            for arm, runs in arms.items() for k in keys]
    _, win_arm, win_key = max(cand, key=lambda t: (t[0], t[2] == PLAIN))
    win_runs = arms[win_arm]
    ship_seed = max(win_runs, key=lambda s: win_runs[s]["val"][win_key])
    results["winner"] = {"arm": win_arm, "config": win_key, **summarize_arm(win_runs, win_key),
                         "gain_vs_baseline": gain(win_runs, win_key), "ship_seed": int(ship_seed),
                         "ship_run": f"{win_arm}_s{ship_seed}",
                         "ship_run_test_dice": float(np.mean(win_runs[ship_seed]["test"][win_key]["dice"]))}
    if win_arm != baseline:
        # The gain above mixes the training change with the inference settings. Against the baseline
        # with its own best inference (chosen on validation) only what the training change adds is left.
        base_key = results["arms"][baseline]["tuned"]["config"]
        results["winner"]["gain_vs_tuned_baseline"] = {"baseline_config": base_key,
                                                       **gain(win_runs, win_key, base_key)}
    seeds = sorted(base_runs)
    spread = {"test_dice_per_seed": {str(s): float(np.mean(base_runs[s]["test"][PLAIN]["dice"])) for s in seeds}}
    if len(seeds) >= 2:
        a = np.asarray(base_runs[seeds[0]]["test"][PLAIN]["dice"])
        b = np.asarray(base_runs[seeds[1]]["test"][PLAIN]["dice"])
        spread["seed_pair"] = [int(seeds[0]), int(seeds[1])]
        spread["seed0_vs_seed1"] = paired_bootstrap_ci(a, b, n_boot=n_boot, seed=0)
        vals = list(spread["test_dice_per_seed"].values())
        spread["range"] = float(max(vals) - min(vals))
    results["baseline_spread"] = spread
    results["robustness"] = robustness_results(arms, baseline, n_boot)
    (out / "protocol_results.json").write_text(json.dumps(results, indent=2), encoding="utf-8")
    md = render_markdown(results)
    path = out / "PROTOCOL.md"
    path.write_text(md, encoding="utf-8")
    return path


def _ms(d: dict) -> str:
    return f"{d['mean']:.4f} ± {d['std']:.4f}"


def _ci(g: dict | None) -> str:
    if not g:
        return "—"
    text = f"{g['mean_diff']:+.4f} [{g['low']:+.4f}, {g['high']:+.4f}]"
    if "per_seed_diff" in g:
        text += " (per seed: " + ", ".join(f"{d:+.3f}" for d in g["per_seed_diff"]) + ")"
    return text


def comparison_family(r: dict) -> list[tuple[str, dict]]:
    """Every comparison against the baseline this report makes, by name: the arms (plain and tuned
    inference) and each inference-time candidate alone (the winner is one of the arms' rows)."""
    family = []
    for arm, a in r["arms"].items():
        if a.get("gain_plain_vs_baseline"):
            family.append((f"{arm}, plain inference", a["gain_plain_vs_baseline"]))
        family.append((f"{arm}, tuned inference (`{a['tuned']['config']}`)", a["gain_tuned_vs_baseline"]))
    for name, c in r["inference_candidates_on_baseline"].items():
        family.append((f"{name} (on the baseline)", c["gain_vs_baseline"]))
    for arm, rb in (r.get("robustness") or {}).items():
        family.append((f"{arm}, robustness score (validation, one pass)", rb["gain_vs_baseline"]))
    return [(name, g) for name, g in family if g and "p_value_like" in g]


def _multiple_comparisons(r: dict) -> list[str]:
    family = comparison_family(r)
    if len(family) < 2:
        return []
    adjusted = holm_adjust([g["p_value_like"] for _, g in family])
    lines = ["## Multiple comparisons", "",
             f"This report makes {len(family)} comparisons against the baseline; read one at a time, some "
             "would clear a 5% bar by chance. Holm's adjustment of the bootstrap tail shares "
             "(`p_value_like`, two-sided) keeps the chance of any false claim in the family below 5%:", "",
             "| comparison | ΔDice | p (bootstrap) | Holm-adjusted | holds at 5% |", "|---|---|---|---|---|"]
    def p_text(value: float, n_boot: int, times: int = 1) -> str:
        # No resample on the other side of zero: the bootstrap only bounds it.
        return f"< {times / n_boot:.4f}" if value == 0 and n_boot else f"{value:.4f}"

    for (name, g), adj in sorted(zip(family, adjusted), key=lambda t: t[1]):
        n_boot = int(g.get("n_boot") or 0)
        lines.append(f"| {name} | {g['mean_diff']:+.4f} | {p_text(g['p_value_like'], n_boot)} | "
                     f"{p_text(adj, n_boot, len(family))} | {'yes' if adj < 0.05 else 'no'} |")
    return lines + [""]


def _robustness_lines(rob: dict) -> list[str]:
    if not rob:
        return []
    strength = next(iter(rob.values()))["strength"]
    lines = ["## Robustness (validation, one network pass)", "",
             f"effiseg-robustness's score of each run: mean Dice over its shifts at strength {strength:g} (colour "
             "temperature, gamma, contrast, JPEG, defocus, sensor noise, resolution, vignetting, border, aspect). "
             "ΔScore: the mean per-image difference against the baseline, 95% interval resampling seeds (paired) "
             "and images together, as for the test gains.", "",
             "| arm | clean val Dice | robustness score | ΔScore vs baseline [95% CI] |", "|---|---|---|---|"]
    for arm, rb in rob.items():
        lines.append(f"| {arm} | {_ms(rb['clean_dice'])} | {_ms(rb['score'])} | {_ci(rb['gain_vs_baseline'])} |")
    return lines + [""]


def render_markdown(r: dict) -> str:
    plan = r.get("plan", {})
    cut = describe_cut_short(r.get("training") or {})
    lines = ["# Improvement protocol results", ""]
    if plan:
        lines += [f"Variant `{plan.get('variant')}`, {plan.get('epochs')} epoch{'' if plan.get('epochs') == 1 else 's'} "
                  f"{'planned ' if cut else ''}per run, seeds {plan.get('seeds')}, "
                  f"{plan.get('parallel')} runs at a time. Choices made on validation; test read once for the report.", ""]
    if cut:
        lines += [f"**Training was cut short:** {cut}.", ""]
    if r.get("settings_not_scored_for_every_run"):
        lines += [f"Left out because not every run was scored with them (evaluation files of different versions): "
                  f"{', '.join(f'`{k}`' for k in r['settings_not_scored_for_every_run'])}.", ""]
    lines += ["## Arms (test split; mean ± sd over seeds)", "",
              "ΔDice: mean per-image test Dice difference against the baseline's plain inference, with a bootstrap "
              "95% interval resampling seeds (paired: run k of each arm shares seed k) and images together, "
              "and the difference of each seed.", "",
              "| arm | inference | val Dice | test Dice | test IoU | test precision | test recall | ΔDice vs baseline [95% CI] |",
              "|---|---|---|---|---|---|---|---|"]
    for arm, a in r["arms"].items():
        for kind in ("plain", "tuned"):
            s = a[kind]
            g = a["gain_plain_vs_baseline"] if kind == "plain" else a["gain_tuned_vs_baseline"]
            lines.append(f"| {arm} | `{s['config']}` | {_ms(s['val_dice'])} | {_ms(s['test_dice'])} | {_ms(s['test_iou'])} | "
                         f"{_ms(s['test_precision'])} | {_ms(s['test_recall'])} | {_ci(g)} |")
    lines += ["", "## Inference-time candidates alone, on the baseline", "",
              "| candidate | chosen on validation | val Dice | test Dice | ΔDice [95% CI] |", "|---|---|---|---|---|"]
    for name, s in r["inference_candidates_on_baseline"].items():
        lines.append(f"| {name} | `{s['config']}` | {_ms(s['val_dice'])} | {_ms(s['test_dice'])} | {_ci(s['gain_vs_baseline'])} |")
    w = r["winner"]
    lines += ["", "## Winner (chosen on validation)", "",
              f"Arm **{w['arm']}** with `{w['config']}`: test Dice {_ms(w['test_dice'])}, IoU {_ms(w['test_iou'])}, "
              f"precision {_ms(w['test_precision'])}, recall {_ms(w['test_recall'])}; "
              f"ΔDice vs baseline {_ci(w['gain_vs_baseline'])}. Shipped run: `{w['ship_run']}` "
              f"(best validation Dice among its seeds; its test Dice {w['ship_run_test_dice']:.4f}).", ""]
    if w.get("gain_vs_tuned_baseline"):
        t = w["gain_vs_tuned_baseline"]
        lines += [f"What the training change adds beyond inference: against the baseline with its own best "
                  f"inference (`{t['baseline_config']}`, chosen on validation), ΔDice {_ci(t)}.", ""]
    lines += _robustness_lines(r.get("robustness") or {})
    lines += _multiple_comparisons(r)
    sp = r["baseline_spread"]
    lines += ["## Run-to-run spread of the baseline", "",
              "Test Dice per seed: " + ", ".join(f"seed {k}: {v:.4f}" for k, v in sp["test_dice_per_seed"].items()) + "."]
    if "range" in sp:
        s0, s1 = sp["seed_pair"]
        lines.append(f"Range {sp['range']:.4f}; seed {s1} vs seed {s0} per-image ΔDice {_ci(sp['seed0_vs_seed1'])} — "
                     "the size of difference that identical recipes produce by chance.")
    lines.append("")
    return "\n".join(lines)
