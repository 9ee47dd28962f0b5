"""The protocol report: choices on validation only, gains paired by seed and image."""
import json

import numpy as np

from effiseg.training.protocol_common import PLAIN, config_key, inference_configs
from effiseg.training.protocol_report import build_protocol_report


def _write_eval(folder, run, val, test, n_images=20):
    """val/test: functions (tta, thr, minreg) -> score; every image of a config gets that Dice."""
    ev = {"run": run, "val": {}, "test": {}, "validation_stems": [str(i) for i in range(n_images)],
          "test_stems": [str(i) for i in range(n_images)]}
    for tta in (False, True):
        for thr, mr in inference_configs():
            key = config_key(tta, thr, mr)
            ev["val"][key] = val(tta, thr, mr)
            d = [test(tta, thr, mr) + 0.001 * (i % 3) for i in range(n_images)]
            ev["test"][key] = {"dice": d, "iou": d, "precision": d, "recall": d}
    (folder / f"{run}.json").write_text(json.dumps(ev))


def _parse_tta(key):
    return dict(part.split("=") for part in key.split(","))["tta"] == "1"


def test_winner_is_chosen_on_validation_and_gain_is_paired(tmp_path):
    ev = tmp_path / "evaluations"
    ev.mkdir()
    for seed in (0, 1, 2):
        # Baseline: validation prefers TTA; on test the plain config is what the arms are compared with.
        _write_eval(ev, f"baseline_s{seed}", lambda t, th, m: 0.80 + 0.01 * t,
                    lambda t, th, m: 0.80 + 0.01 * t + 0.001 * seed)
        # A candidate that looks best on validation but is *worse* on test: the report must still pick it
        # (validation decides) and then report the loss honestly.
        _write_eval(ev, f"cand_s{seed}", lambda t, th, m: 0.90 if (t and th == 0.5 and m == 0) else 0.70,
                    lambda t, th, m: 0.75 + 0.002 * seed)
    (tmp_path / "plan.json").write_text(json.dumps({"variant": "x", "epochs": 1, "seeds": [0, 1, 2], "parallel": 1}))
    md = build_protocol_report(tmp_path, n_boot=500).read_text()
    res = json.loads((tmp_path / "protocol_results.json").read_text())
    win = res["winner"]
    assert win["arm"] == "cand" and win["config"] == config_key(True, 0.5, 0)
    g = win["gain_vs_baseline"]
    # Per seed: candidate 0.75 + 0.002 s against baseline plain 0.80 + 0.001 s (image offsets cancel).
    assert np.allclose(g["per_seed_diff"], [-0.05, -0.049, -0.048])
    assert g["paired_seeds"] and g["high"] < 0 and abs(g["mean_diff"] - np.mean(g["per_seed_diff"])) < 1e-12
    assert res["arms"]["baseline"]["plain"]["config"] == PLAIN
    # The training change alone: against the baseline's own best inference (TTA, 0.81 + 0.001 s on test).
    t = win["gain_vs_tuned_baseline"]
    assert _parse_tta(t["baseline_config"]) and np.allclose(t["per_seed_diff"], [-0.06, -0.059, -0.058])
    assert "beyond inference" in md
    assert res["baseline_spread"]["seed_pair"] == [0, 1]
    assert "Winner (chosen on validation)" in md and "per seed" in md
    # Every comparison against the baseline is one of a family, adjusted together (Holm).
    from effiseg.training.protocol_report import comparison_family
    family = comparison_family(res)
    assert len(family) >= 3 and "## Multiple comparisons" in md and f"makes {len(family)} comparisons" in md
    assert md.count("| cand, tuned inference") == 1


def test_multiscale_candidate_is_reported_when_evaluated_and_can_win(tmp_path):
    ms = (64, 128)
    ev = tmp_path / "evaluations"
    ev.mkdir()
    for seed in (0, 1, 2):
        _write_eval(ev, f"baseline_s{seed}", lambda t, th, m: 0.80 + 0.01 * t, lambda t, th, m: 0.80 + 0.001 * seed)
        # Evaluations made by this version also hold multi-scale keys: best on validation here.
        data = json.loads((ev / f"baseline_s{seed}.json").read_text())
        for thr, mr in inference_configs():
            key = config_key(True, thr, mr, ms)
            data["val"][key] = 0.85 if (thr == 0.45 and mr == 0) else 0.70
            d = [0.83 + 0.001 * seed + 0.001 * (i % 3) for i in range(20)]
            data["test"][key] = {"dice": d, "iou": d, "precision": d, "recall": d}
        (ev / f"baseline_s{seed}.json").write_text(json.dumps(data))
    (tmp_path / "plan.json").write_text(json.dumps({"variant": "x", "epochs": 1, "seeds": [0, 1, 2], "parallel": 1}))
    md = build_protocol_report(tmp_path, n_boot=200).read_text()
    res = json.loads((tmp_path / "protocol_results.json").read_text())
    single = res["inference_candidates_on_baseline"]["multi-scale + flip TTA"]
    assert single["config"] == config_key(True, 0.5, 0, ms)  # its own row: the default threshold only
    assert res["inference_candidates_on_baseline"]["flip TTA"]["config"] == config_key(True, 0.5, 0)
    assert res["winner"]["config"] == config_key(True, 0.45, 0, ms)  # chosen on validation
    assert np.allclose(res["winner"]["gain_vs_baseline"]["per_seed_diff"], [0.03, 0.03, 0.03])
    assert "gain_vs_tuned_baseline" not in res["winner"]  # the winner is the baseline arm itself
    assert "sizes=64+128" in md


def test_evaluations_without_multiscale_keys_report_as_before(tmp_path):
    ev = tmp_path / "evaluations"
    ev.mkdir()
    for seed in (0, 1):
        _write_eval(ev, f"baseline_s{seed}", lambda t, th, m: 0.80 + 0.01 * t, lambda t, th, m: 0.80)
    (tmp_path / "plan.json").write_text(json.dumps({"variant": "x", "epochs": 1, "seeds": [0, 1], "parallel": 1}))
    build_protocol_report(tmp_path, n_boot=100)
    res = json.loads((tmp_path / "protocol_results.json").read_text())
    assert "multi-scale + flip TTA" not in res["inference_candidates_on_baseline"]
    assert "flip TTA" in res["inference_candidates_on_baseline"]


def test_runs_evaluated_by_different_versions_are_compared_on_shared_settings(tmp_path):
    """Seed 0 re-evaluated with the multi-scale candidate, seed 1 not: no KeyError, and the
    multi-scale settings are left out (and said to be) rather than compared unequally."""
    ev = tmp_path / "evaluations"
    ev.mkdir()
    for seed in (0, 1):
        _write_eval(ev, f"baseline_s{seed}", lambda t, th, m: 0.80 + 0.01 * t, lambda t, th, m: 0.80)
        _write_eval(ev, f"cand_s{seed}", lambda t, th, m: 0.81, lambda t, th, m: 0.81)
    data = json.loads((ev / "cand_s0.json").read_text())
    key = config_key(True, 0.5, 0, (64, 128))
    data["val"][key] = 0.99
    data["test"][key] = {m: [0.9] * 20 for m in ("dice", "iou", "precision", "recall")}
    (ev / "cand_s0.json").write_text(json.dumps(data))
    (tmp_path / "plan.json").write_text(json.dumps({"variant": "x", "epochs": 1, "seeds": [0, 1], "parallel": 1}))
    md = build_protocol_report(tmp_path, n_boot=100).read_text()
    res = json.loads((tmp_path / "protocol_results.json").read_text())
    assert res["settings_not_scored_for_every_run"] == [key]
    assert "sizes" not in res["winner"]["config"] and "Left out because" in md


def _write_run(out, run, planned, completed, best_epoch):
    folder = out / "runs" / run
    folder.mkdir(parents=True)
    (folder / "run_config.json").write_text(json.dumps({"train": {"epochs": planned}}))
    (folder / "metrics.json").write_text(json.dumps([{"epoch": e} for e in range(1, completed + 1)]))
    (folder / "best.json").write_text(json.dumps({"best_epoch": best_epoch}))


def test_runs_stopped_before_their_planned_epochs_are_reported_as_cut_short(tmp_path):
    """A session's deadline can stop training part-way: the report and the shipped card must say how
    far the runs got, not the planned epochs alone."""
    from effiseg.training.protocol_report import describe_cut_short
    from effiseg.training.ship import evidence_markdown, provenance
    ev = tmp_path / "evaluations"
    ev.mkdir()
    for seed in (0, 1):
        for arm in ("baseline", "cand"):
            _write_eval(ev, f"{arm}_s{seed}", lambda t, th, m: 0.8, lambda t, th, m: 0.8)
            _write_run(tmp_path, f"{arm}_s{seed}", 32, 32, 30)
    (tmp_path / "plan.json").write_text(json.dumps({"variant": "x", "epochs": 32, "seeds": [0, 1], "parallel": 4}))
    md = build_protocol_report(tmp_path, n_boot=200).read_text(encoding="utf-8")
    res = json.loads((tmp_path / "protocol_results.json").read_text())
    assert res["training"]["cut_short"] == [] and "cut short" not in md
    assert res["training"]["runs"]["cand_s1"] == {"planned": 32, "completed": 32, "best_epoch": 30}

    for run, done in (("baseline_s1", 27), ("cand_s0", 28)):
        (tmp_path / "runs" / run / "metrics.json").write_text(json.dumps([{"epoch": e} for e in range(1, done + 1)]))
        (tmp_path / "runs" / run / "best.json").write_text(json.dumps({"best_epoch": done - 2}))
    md = build_protocol_report(tmp_path, n_boot=200).read_text(encoding="utf-8")
    res = json.loads((tmp_path / "protocol_results.json").read_text())
    assert res["training"]["cut_short"] == ["baseline_s1", "cand_s0"]
    sentence = describe_cut_short(res["training"])
    assert "2 of 4 runs stopped before their planned 32 epochs, after 27-28" in sentence
    assert f"**Training was cut short:** {sentence}." in md and "32 epochs planned per run" in md
    evidence = evidence_markdown(res, tmp_path)
    assert "Training was cut short" in evidence and "32 epochs planned each" in evidence
    run_dir = tmp_path / "runs" / "cand_s0"
    (run_dir / "run_config.json").write_text(json.dumps({
        "train": {"epochs": 32, "lr": 1e-4, "weight_decay": 1e-3, "min_lr": 1e-5, "batch_size": 8, "seed": 0},
        "model": {"input_size": 352}, "device_name": "Test GPU", "torch": "test"}))
    facts = provenance(res, run_dir, tmp_path)
    assert facts["Epochs"].startswith("28 of the planned 32 (stopped early")
    assert facts["Epochs"].endswith("(best validation Dice at epoch 26)")


def test_robustness_scores_are_compared_per_arm_paired_by_seed_and_image(tmp_path):
    """Each run's robustness score (validation, stored by evaluate) gets mean ± sd per arm, a paired
    interval against the baseline's, and joins the Holm family; runs without one leave the section out."""
    ev = tmp_path / "evaluations"
    ev.mkdir()
    for seed in (0, 1, 2):
        for arm, rob in (("baseline", 0.70), ("resolution_shift", 0.74)):
            _write_eval(ev, f"{arm}_s{seed}", lambda t, th, m: 0.80, lambda t, th, m: 0.80 + 0.001 * seed)
            data = json.loads((ev / f"{arm}_s{seed}.json").read_text())
            data["robustness"] = {"score": rob, "clean_dice": 0.8, "strength": 0.5,
                                  "per_image": [rob + 0.001 * seed + 0.01 * (i % 2) for i in range(20)]}
            (ev / f"{arm}_s{seed}.json").write_text(json.dumps(data))
    (tmp_path / "plan.json").write_text(json.dumps({"variant": "x", "epochs": 1, "seeds": [0, 1, 2], "parallel": 1}))
    md = build_protocol_report(tmp_path, n_boot=500).read_text()
    res = json.loads((tmp_path / "protocol_results.json").read_text())
    rob = res["robustness"]
    assert rob["baseline"]["gain_vs_baseline"] is None
    g = rob["resolution_shift"]["gain_vs_baseline"]
    assert np.allclose(g["per_seed_diff"], [0.04] * 3) and g["paired_seeds"] and g["low"] > 0
    assert abs(rob["resolution_shift"]["score"]["mean"] - (0.745 + 0.001)) < 1e-9
    assert "## Robustness (validation, one network pass)" in md and "| resolution_shift | 0.8000" in md
    from effiseg.training.protocol_report import comparison_family
    names = [name for name, _ in comparison_family(res)]
    assert "resolution_shift, robustness score (validation, one pass)" in names
    assert "resolution_shift, robustness score" in md.split("## Multiple comparisons")[1]
    # An evaluation without robustness scores (--no-robustness): no section, the rest as before.
    data = json.loads((ev / "baseline_s0.json").read_text())
    del data["robustness"]
    (ev / "baseline_s0.json").write_text(json.dumps(data))
    md = build_protocol_report(tmp_path, n_boot=200).read_text()
    assert json.loads((tmp_path / "protocol_results.json").read_text())["robustness"] == {}
    assert "## Robustness" not in md
