"""End to end on a few real Kvasir-SEG images: train, evaluate, resume."""
import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from safetensors.torch import load_file

from effiseg.training.cli import eval_command, train_command

from _paths import KVASIR, REPO, copy_kvasir_subset, needs_kvasir

pytestmark = needs_kvasir

TINY = ["--data", str(KVASIR), "--variant", "effisegnet-lite0", "--input-size", "64", "--batch-size", "4",
        "--limit-train", "8", "--limit-val", "4", "--limit-test", "4", "--device", "cpu", "--no-progress",
        "--no-pretrained", "--seed", "3"]


def _train(args):
    result = CliRunner().invoke(train_command, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


def test_one_epoch_then_eval(tmp_path):
    run = tmp_path / "run"
    _train(TINY + ["--epochs", "1", "--output", str(run)])
    for name in ("run_config.json", "metrics.csv", "metrics.json", "best.safetensors", "best.json",
                 "last.safetensors", "last.json", "test_metrics.json", "test_per_image_best.csv"):
        assert (run / name).is_file(), name
    cfg = json.loads((run / "best.json").read_text())
    assert cfg["variant"] == "effisegnet-lite0" and cfg["input_size"] == 64
    test = json.loads((run / "test_metrics.json").read_text())
    out = tmp_path / "eval"
    res = CliRunner().invoke(eval_command, [str(run / "best.safetensors"), "--data", str(KVASIR), "--split", "test",
                                            "--device", "cpu", "--output", str(out), "--save-masks"])
    assert res.exit_code == 0, res.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_images"] == 100
    assert len((out / "per_image.csv").read_text().strip().splitlines()) == 101
    assert len(list((out / "masks").glob("*.png"))) == 100
    # The trainer's own test evaluation (first 4 images) agrees with effiseg-eval on those images.
    rows = (out / "per_image.csv").read_text().splitlines()[1:5]
    train_rows = (run / "test_per_image_best.csv").read_text().splitlines()[1:5]
    assert [r.split(",")[1][:8] for r in rows] == [r.split(",")[1][:8] for r in train_rows]
    assert test["best"]["n_images"] == 4


def test_resume_matches_uninterrupted_run(tmp_path):
    full, split = tmp_path / "full", tmp_path / "split"
    _train(TINY + ["--epochs", "2", "--no-test", "--output", str(full)])
    _train(TINY + ["--epochs", "2", "--no-test", "--output", str(split), "--stop-after-epochs", "1"])
    assert json.loads((split / "last.json").read_text())["epoch"] == 1
    _train(["--resume", str(split), "--no-progress"])
    a, b = load_file(str(full / "last.safetensors")), load_file(str(split / "last.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] == b[k]).all(), k
    ha = json.loads((full / "metrics.json").read_text())
    hb = json.loads((split / "metrics.json").read_text())
    assert [h["train_loss"] for h in ha] == [h["train_loss"] for h in hb]


def test_resume_on_another_device_than_recorded(tmp_path):
    """A protocol run pinned to a GPU this machine lacks resumes where --device says."""
    run = tmp_path / "run"
    _train(TINY + ["--epochs", "2", "--no-test", "--output", str(run), "--stop-after-epochs", "1"])
    config = json.loads((run / "run_config.json").read_text())
    config["train"]["device"] = "cuda:7"
    (run / "run_config.json").write_text(json.dumps(config))
    stuck = CliRunner().invoke(train_command, ["--resume", str(run), "--no-progress"])
    assert stuck.exit_code != 0
    _train(["--resume", str(run), "--no-progress", "--device", "cpu"])
    assert json.loads((run / "last.json").read_text())["epoch"] == 2


def test_existing_run_folder_is_not_overwritten(tmp_path):
    run = tmp_path / "run"
    _train(TINY + ["--epochs", "1", "--no-test", "--output", str(run)])
    res = CliRunner().invoke(train_command, TINY + ["--epochs", "1", "--output", str(run)])
    assert res.exit_code != 0 and "already holds a run" in res.output


def test_bad_data_root_is_a_clear_error(tmp_path):
    res = CliRunner().invoke(train_command, ["--data", str(tmp_path), "--epochs", "1", "--device", "cpu",
                                             "--no-pretrained", "--output", str(tmp_path / "r")])
    assert res.exit_code == 2 and "no images/ and masks/" in res.output


def test_score_predicted_masks_folder(tmp_path):
    """effiseg-score: ground-truth masks scored against themselves give Dice 1; a missing file fails."""
    import shutil

    from PIL import Image

    from effiseg.training.cli import score_command
    from effiseg.training.data import load_split
    root = tmp_path / "data"
    for sub in ("images", "masks"):
        (root / sub).mkdir(parents=True)
    for stem in ("0", "1", "2"):
        shutil.copy(KVASIR / "test" / "images" / f"{stem}.jpg", root / "images" / f"{stem}.jpg")
        shutil.copy(KVASIR / "test" / "masks" / f"{stem}.jpg", root / "masks" / f"{stem}.jpg")
    pred = tmp_path / "pred"
    pred.mkdir()
    samples = load_split(root)
    for s in samples:
        Image.fromarray(s.mask.astype("uint8") * 255).save(pred / f"{s.stem}.png")
    empty = samples[0].mask * 0
    Image.fromarray(empty.astype("uint8")).save(pred / "2.png")  # one image predicted empty
    res = CliRunner().invoke(score_command, [str(pred), "--data", str(root), "--split", "none"])
    assert res.exit_code == 0, res.output
    summary = json.loads((pred / "score-none.json").read_text())
    assert summary["n_images"] == 3 and abs(summary["mean_dice"] - 2 / 3) < 1e-9
    (pred / "1.png").unlink()
    res = CliRunner().invoke(score_command, [str(pred), "--data", str(root), "--split", "none"])
    assert res.exit_code == 2 and "1: no predicted mask" in res.output


@pytest.mark.gpu
@pytest.mark.parametrize("device", ["cuda", "cuda:0"])  # cuda:N: the run pins its GPU (protocol --devices)
def test_resume_on_cuda(tmp_path, device):
    """Resuming on the GPU restores the CPU-held random states (regression: they were mapped to CUDA)."""
    args = [a if a != "cpu" else device for a in TINY] + ["--epochs", "2", "--no-test"]
    run = tmp_path / "run"
    _train(args + ["--output", str(run), "--stop-after-epochs", "1"])
    _train(["--resume", str(run), "--no-progress"])
    assert json.loads((run / "last.json").read_text())["epoch"] == 2


@pytest.mark.parametrize("args,message", [
    (["--epochs", "0"], "--epochs"),
    (["--batch-size", "1"], "--batch-size"),
    (["--limit-train", "0"], "--limit-train"),
    (["--set", "bogus.key=1"], "unknown setting 'bogus.key'"),
    (["--set", "augment.nope=1"], "unknown setting 'augment.nope'"),
    (["--set", "augment.overlay_box_p=abc"], "takes a number, not 'abc'"),
    (["--set", "augment.scale=[0.5]"], "takes a list of 2 numbers"),
    (["--set", "epochs=0"], "epochs must be at least 1"),
    (["--set", "limit_train=-5"], "limit_train must be at least 2"),
    (["--set", "loss=1"], "'loss' is a section"),
    (["--set", "decoder_channels=2.5"], "takes a whole number or null"),
])
def test_bad_training_settings_fail_before_a_run_folder_exists(tmp_path, args, message):
    run = tmp_path / "run"
    res = CliRunner().invoke(train_command, [a for a in TINY if a != "--no-progress"] + ["--epochs", "1"] + args
                             + ["--output", str(run)])
    assert res.exit_code == 2 and message in res.output, res.output
    assert not run.exists()


def test_score_names_unreadable_masks_and_writes_into_an_output_folder(tmp_path):
    from PIL import Image

    from effiseg.training.cli import score_command
    root = copy_kvasir_subset(tmp_path / "data", splits=("test",), stems=("0", "1"))
    pred = tmp_path / "pred"
    pred.mkdir()
    Image.open(root / "test" / "masks" / "0.jpg").save(pred / "0.png")
    (pred / "1.png").write_text("not a png")
    res = CliRunner().invoke(score_command, [str(pred), "--data", str(root), "--split", "test"])
    assert res.exit_code == 2 and f"{pred / '1.png'}: unreadable mask" in res.output
    Image.open(root / "test" / "masks" / "1.jpg").save(pred / "1.png")
    out = tmp_path / "scores"
    out.mkdir()
    res = CliRunner().invoke(score_command, [str(pred), "--data", str(root), "--split", "test", "--output", str(out)])
    assert res.exit_code == 0, res.output
    assert json.loads((out / "score-test.json").read_text())["mean_dice"] == pytest.approx(1.0)
    assert (out / "score-test.csv").is_file()


def test_results_of_a_packaged_model_go_to_the_working_folder(tmp_path):
    from effiseg.training.cli import default_output_dir
    run = tmp_path / "runs" / "r1"
    run.mkdir(parents=True)
    assert default_output_dir(run, "eval", "test") == run / "eval-test"
    assert default_output_dir(run / "best.safetensors", "analysis", "test") == run / "analysis-test"
    shipped = REPO / "training" / "weights" / "default"
    assert default_output_dir(shipped, "eval", "test") == Path("eval-default-test")


def test_a_metrics_csv_held_open_does_not_stop_training(tmp_path, monkeypatch):
    """Windows: Excel keeps a CSV it shows locked, so replacing metrics.csv fails for as long as the
    user looks at it. The run warns and goes on (metrics.json has the same rows); the other files,
    checkpoints included, are still written."""
    import os

    from effiseg.runtime import replace_file

    real_replace = os.replace

    def excel_holds_metrics_csv(src, dst):
        if Path(dst).name == "metrics.csv":
            raise PermissionError(13, "The process cannot access the file because it is being used by another process")
        real_replace(src, dst)
    monkeypatch.setattr(os, "replace", excel_holds_metrics_csv)
    monkeypatch.setattr(replace_file.time, "sleep", lambda s: None)
    run = tmp_path / "run"
    result = _train(TINY + ["--epochs", "2", "--output", str(run)])
    assert result.output.count("could not update") == 2 and "metrics.json has the same rows" in result.output
    assert len(json.loads((run / "metrics.json").read_text())) == 2
    assert (run / "best.safetensors").is_file() and (run / "last.safetensors").is_file()
    assert not (run / "metrics.csv").exists() and not list(run.glob(".*effiseg-tmp"))


def test_seeds_train_together_into_one_folder_each(tmp_path):
    pattern = tmp_path / "run_s{seed}"
    args = [a for a in TINY if a not in ("--seed", "3")]
    out = _train(args + ["--epochs", "1", "--no-test", "--step", "fast", "--seeds", "4,5", "--output", str(pattern)])
    for seed in (4, 5):
        run = tmp_path / f"run_s{seed}"
        config = json.loads((run / "run_config.json").read_text(encoding="utf-8"))
        assert config["train"]["seed"] == seed and config["train_step"] == "fast"
        assert len(json.loads((run / "metrics.json").read_text(encoding="utf-8"))) == 1
        assert str(run) in out.output
    bad = CliRunner().invoke(train_command, args + ["--epochs", "1", "--seeds", "4,5", "--output", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "{seed}" in bad.output
