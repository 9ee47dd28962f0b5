"""The protocol's driver: runs spread over devices (a two-GPU machine uses both), and train ->
evaluate -> report end to end on a few real images."""
import json
import sys

import click
import pytest
import torch
from click.testing import CliRunner

from effiseg.training.protocol import _launch_all, main as protocol_main, resolve_devices

from _paths import copy_kvasir_subset, needs_kvasir

# Prints the device it was given, then sleeps argv[1] seconds.
_SLEEPER = "import sys, time; print(sys.argv[-1], flush=True); time.sleep(float(sys.argv[1]))"


def _job(tmp_path, name, seconds):
    return name, [sys.executable, "-c", _SLEEPER, str(seconds)], tmp_path / f"{name}.log"


def test_each_run_starts_on_the_least_busy_device(tmp_path):
    jobs = [_job(tmp_path, "a", 1.5), _job(tmp_path, "b", 0), _job(tmp_path, "c", 1.5), _job(tmp_path, "d", 0)]
    placed = {}
    codes = _launch_all(jobs, parallel=3, log=lambda m: None, devices=["cuda:0", "cuda:1"], placed=placed, poll_s=0.05)
    assert codes == {"a": 0, "b": 0, "c": 0, "d": 0}
    # a, b, c start together: one each, then the tie goes to the first device; d starts when b
    # has finished, on the device that then runs nothing.
    assert placed == {"a": "cuda:0", "b": "cuda:1", "c": "cuda:0", "d": "cuda:1"}
    for name, device in placed.items():  # the child really received it
        assert (tmp_path / f"{name}.log").read_text().split() == [device]


def test_a_device_named_twice_takes_twice_the_runs(tmp_path):
    jobs = [_job(tmp_path, n, 0.5) for n in "abcdef"]
    placed = {}
    _launch_all(jobs, parallel=6, log=lambda m: None, devices=["cuda:0", "cuda:1", "cuda:0"], placed=placed, poll_s=0.05)
    assert sorted(placed.values()) == ["cuda:0"] * 4 + ["cuda:1"] * 2  # unweighted would be 3 and 3


def test_without_devices_commands_are_left_alone(tmp_path):
    codes = _launch_all([_job(tmp_path, "a", 0)], parallel=1, log=lambda m: None, poll_s=0.05)
    assert codes == {"a": 0}
    assert (tmp_path / "a.log").read_text().split() == ["0"]  # its own last argument, no --device


def test_device_lists():
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    assert resolve_devices("auto") == ([f"cuda:{i}" for i in range(n)] or ["cpu"])
    assert resolve_devices("cpu") == ["cpu"]
    if n:
        assert resolve_devices("cuda") == ["cuda:0"]
    assert resolve_devices(" cpu, cpu ") == ["cpu", "cpu"]
    with pytest.raises(click.BadParameter, match="'gpu1' is not a device"):
        resolve_devices("gpu1")
    with pytest.raises(click.BadParameter, match=f"has {n} CUDA GPU"):
        resolve_devices(f"cuda:{n}")
    with pytest.raises(click.BadParameter, match=f"has {n} CUDA GPU"):
        resolve_devices(str(n + 1))
    with pytest.raises(click.BadParameter, match="no device"):
        resolve_devices(",")


def test_device_cannot_also_come_through_extra(tmp_path):
    res = CliRunner().invoke(protocol_main, ["train", "--out", str(tmp_path / "p"), "--epochs", "1",
                                             "--extra=--device", "--extra=cuda:1"])
    assert res.exit_code == 2 and "--devices" in res.output


@needs_kvasir
@pytest.mark.slow  # trains and evaluates four runs: deselect with -m "not slow"
def test_train_evaluate_report_spread_over_devices(tmp_path):
    data = copy_kvasir_subset(tmp_path / "kvasir", splits=("train", "validation", "test"), stems=("0", "1", "2", "3"))
    proto = tmp_path / "protocol"
    tiny = ["--extra=--variant", "--extra=effisegnet-lite0", "--extra=--no-pretrained", "--extra=--batch-size",
            "--extra=2", "--extra=--no-test"]
    res = CliRunner().invoke(protocol_main, ["train", "--data", str(data), "--out", str(proto), "--input-size", "64",
                                             "--arms", "baseline,boundary_loss", "--seeds", "0", "--epochs", "1",
                                             "--parallel", "2", "--devices", "cpu,cpu", *tiny])
    assert res.exit_code == 0, res.output + "".join(p.read_text() for p in proto.glob("runs/*/train.log"))
    plan = json.loads((proto / "plan.json").read_text())
    assert plan["devices"] == ["cpu", "cpu"]
    assert plan["run_devices"] == {"baseline_s0": "cpu", "boundary_loss_s0": "cpu"}
    assert plan["exit_codes"] == {"baseline_s0": 0, "boundary_loss_s0": 0}
    for run in ("baseline_s0", "boundary_loss_s0"):
        cfg = json.loads((proto / "runs" / run / "run_config.json").read_text())
        assert cfg["device"] == "cpu" and cfg["train"]["epochs"] == 1
    boundary = json.loads((proto / "runs" / "boundary_loss_s0" / "run_config.json").read_text())
    assert boundary["train"]["loss"]["boundary_weight"] == 2.0

    # Evaluation: one process per listed device by default.
    res = CliRunner().invoke(protocol_main, ["evaluate", "--data", str(data), "--out", str(proto),
                                             "--devices", "cpu,cpu", "--limit", "2"])
    assert res.exit_code == 0, res.output + "".join(p.read_text() for p in proto.glob("evaluations/*.log"))
    for run in ("baseline_s0", "boundary_loss_s0"):
        ev = json.loads((proto / "evaluations" / f"{run}.json").read_text())
        assert ev["test_stems"] == ["0", "1"] and "tta=1,thr=0.50,minreg=0" in ev["val"]
        assert "tta=1,thr=0.50,minreg=0,sizes=64+128" in ev["val"]  # the multi-scale candidate (64 + 64 px)
    res = CliRunner().invoke(protocol_main, ["report", "--out", str(proto), "--n-boot", "200"])
    assert res.exit_code == 0, res.output
    results = json.loads((proto / "protocol_results.json").read_text())
    assert results["winner"]["arm"] in ("baseline", "boundary_loss")


def test_runs_per_process_groups_the_seeds_of_an_arm(tmp_path, monkeypatch):
    import effiseg.training.protocol as protocol
    launched = []
    monkeypatch.setattr(protocol, "_launch_all", lambda jobs, *a, **k: launched.extend(jobs) or {})
    res = CliRunner().invoke(protocol_main, ["train", "--out", str(tmp_path / "p"), "--epochs", "1", "--devices", "cpu",
                                             "--arms", "baseline,boundary_loss", "--seeds", "0,1,2",
                                             "--runs-per-process", "2"])
    assert res.exit_code == 0, res.output
    names = [name for name, _, _ in launched]
    assert names == ["baseline_s0+baseline_s1", "boundary_loss_s0+boundary_loss_s1", "baseline_s2", "boundary_loss_s2"]
    first = launched[0][1]
    assert first[first.index("--seeds") + 1] == "0,1"
    assert first[first.index("--output") + 1] == str(tmp_path / "p" / "runs" / "baseline_s{seed}")
    assert "--seed" in launched[2][1] and "--seeds" not in launched[2][1]


@needs_kvasir
def test_the_distill_arm_writes_the_teachers_maps_once_and_trains_on_them(tmp_path, tiny_checkpoint, monkeypatch):
    import effiseg.training.protocol as protocol
    from effiseg.training.distill import load_teacher_maps
    data = copy_kvasir_subset(tmp_path / "kvasir", splits=("train",), stems=("0", "1", "2"))
    out = tmp_path / "p"
    args = ["train", "--data", str(data), "--out", str(out), "--epochs", "1", "--devices", "cpu", "--input-size", "64",
            "--arms", "baseline,distill", "--seeds", "0", "--extra=--limit-train", "--extra=2"]
    res = CliRunner().invoke(protocol_main, args)
    assert res.exit_code == 2 and "--teacher" in res.output and not (out / "teacher").exists()
    launched = []
    monkeypatch.setattr(protocol, "_launch_all", lambda jobs, *a, **k: launched.extend(jobs) or {})
    res = CliRunner().invoke(protocol_main, args + ["--teacher", str(tiny_checkpoint)])
    assert res.exit_code == 0, res.output
    plan = json.loads((out / "plan.json").read_text())
    maps = out / "teacher" / "teacher-train.npz"
    # The teacher's ensemble: flips at its input size and 64 px more (it records no recommendation).
    assert plan["teacher"]["tta_sizes"] == [64, 128] and plan["teacher"]["maps"] == str(maps)
    assert load_teacher_maps(maps, ["0", "1"], 64).shape == (2, 1, 64, 64)  # the runs' two training images
    commands = {name: cmd for name, cmd, _ in launched}
    distill = commands["distill_s0"]
    assert f"teacher_maps={maps.as_posix()}" in distill and "loss.distill_weight=0.5" in distill
    assert not any("teacher_maps" in c for c in commands["baseline_s0"])
    assert plan["arms"]["distill"] == ["loss.distill_weight=0.5", f"teacher_maps={maps.as_posix()}"]
    # A second train (a resumed protocol) keeps the maps of the same teacher.
    stamp = maps.stat().st_mtime_ns
    res = CliRunner().invoke(protocol_main, args + ["--teacher", str(tiny_checkpoint)])
    assert res.exit_code == 0 and "already written" in res.output and maps.stat().st_mtime_ns == stamp


@needs_kvasir
def test_evaluate_stores_the_robustness_score_effiseg_robustness_reports(tmp_path, tiny_checkpoint):
    from effiseg.training.analysis.robustness_cli import robustness_command
    from effiseg.training.checkpoint import load_model, save_checkpoint
    from effiseg.training.protocol import evaluate_run
    data = copy_kvasir_subset(tmp_path / "kvasir", stems=("0", "1"))
    run = tmp_path / "runs" / "baseline_s0"
    model, cfg = load_model(tiny_checkpoint)
    save_checkpoint(run, model, cfg, stem="best")
    ev = evaluate_run(run, data, "cpu", limit=2)
    rob = ev["robustness"]
    assert len(rob["per_image"]) == 2 and rob["strength"] == 0.5 and len(rob["shifts"]) == 10
    res = CliRunner().invoke(robustness_command, [str(tiny_checkpoint), "--data", str(data), "--device", "cpu",
                                                  "--strengths", "0.5", "--no-figure", "--output", str(tmp_path / "r")])
    assert res.exit_code == 0, res.output
    reported = json.loads((tmp_path / "r" / "robustness.json").read_text())["score"]
    assert rob["score"] == pytest.approx(reported["robustness_score"], abs=1e-12)
    assert rob["per_image"] == pytest.approx([reported["per_image"][s] for s in ev["validation_stems"]], abs=1e-12)
    assert "robustness" not in evaluate_run(run, data, "cpu", limit=2, robustness=False)
