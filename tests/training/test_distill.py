"""Distillation pieces (issue 21): the soft-target loss term, soft channels through augmentation,
teacher maps written and read back in the training order."""
import numpy as np
import pytest
import torch
from PIL import Image

from effiseg.training.augment import AugmentConfig, augment_batch
from effiseg.training.distill import load_teacher_maps, save_teacher_maps, teacher_maps
from effiseg.training.losses import LossConfig, distillation_loss, total_loss


def _target(n=2, size=16):
    label = torch.zeros(n, 1, size, size)
    label[:, :, 4:12, 4:12] = 1
    teacher = label * 0.8 + 0.1
    return label, teacher


def test_distillation_term_adds_only_when_weighted():
    label, teacher = _target()
    logits = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    plain = total_loss(logits, label, LossConfig())
    both = torch.cat([label, teacher], 1)
    assert total_loss(logits, both, LossConfig()) == pytest.approx(plain.item())
    weighted = total_loss(logits, both, LossConfig(distill_weight=0.5))
    assert weighted.item() == pytest.approx(plain.item() + 0.5 * distillation_loss(logits, teacher).item(), rel=1e-6)


def test_distillation_pulls_the_student_to_the_teachers_probabilities():
    _, teacher = _target()
    at_teacher = torch.logit(teacher).requires_grad_()
    distillation_loss(at_teacher, teacher).backward()
    assert at_teacher.grad.abs().max() < 1e-6           # the minimum is the teacher's map itself
    sharper = (torch.logit(teacher) * 3).requires_grad_()
    assert distillation_loss(sharper, teacher) > distillation_loss(torch.logit(teacher), teacher)


def test_distill_weight_without_teacher_maps_is_an_error_not_a_silent_no_op():
    label, _ = _target()
    with pytest.raises(ValueError, match="teacher's probability maps"):
        total_loss(torch.zeros_like(label), label, LossConfig(distill_weight=0.5))


def test_soft_channel_moves_with_the_label_and_stays_soft():
    label, teacher = _target(n=8, size=32)
    images = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    cfg = AugmentConfig(color_p=0.0, elastic_p=0.0, affine_p=1.0)
    _, one = augment_batch(images, label, cfg, generator=torch.Generator().manual_seed(5))
    _, two = augment_batch(images, torch.cat([label, teacher], 1), cfg, generator=torch.Generator().manual_seed(5))
    assert torch.equal(two[:, :1], one)                  # the label is what it was without the teacher
    soft = two[:, 1:]
    assert ((soft > 0.01) & (soft < 0.99)).any()         # not thresholded
    inside = soft[one > 0.5]
    assert inside.mean() > 0.8 and soft[one < 0.5].mean() < 0.3   # aligned with the moved label


def test_teacher_maps_round_trip_in_training_order(tiny_checkpoint, tmp_path):
    from effiseg.training.checkpoint import load_model
    from effiseg.training.data import load_split
    (tmp_path / "d" / "images").mkdir(parents=True)
    (tmp_path / "d" / "masks").mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(tmp_path / "d" / "images" / f"{i}.png")
        Image.fromarray(np.zeros((40, 48), np.uint8)).save(tmp_path / "d" / "masks" / f"{i}.png")
    samples = load_split(tmp_path / "d")
    model, cfg = load_model(tiny_checkpoint)
    one_pass = teacher_maps(model, cfg, samples, 64, tta=False)
    ensemble = teacher_maps(model, cfg, samples, 64, tta=True, tta_sizes=(64, 96))
    assert ensemble.shape == (3, 64, 64) and ensemble.dtype == np.uint8
    assert not np.array_equal(one_pass, ensemble)
    path = save_teacher_maps(tmp_path / "t.npz", [s.stem for s in samples], ensemble, {"tta": True})
    back = load_teacher_maps(path, ["2", "0"], 64)
    assert back.shape == (2, 1, 64, 64)
    assert np.array_equal(back[0, 0], ensemble[2]) and np.array_equal(back[1, 0], ensemble[0])
    with pytest.raises(ValueError, match="no teacher map.*'7'"):
        load_teacher_maps(path, ["0", "7"], 64)
    with pytest.raises(ValueError, match="training size is 352x352"):
        load_teacher_maps(path, ["0"], 352)


def test_training_with_teacher_maps(tiny_checkpoint, tmp_path):
    """One epoch of a student on a few real images with its teacher's maps (skipped without the data);
    asking for distillation without maps stops before a run folder exists."""
    from click.testing import CliRunner

    from effiseg.training.checkpoint import load_model
    from effiseg.training.cli import train_command
    from effiseg.training.data import load_split
    from _paths import KVASIR
    if not (KVASIR / "train" / "images").is_dir():
        pytest.skip(f"needs Kvasir-SEG at {KVASIR}")
    args = ["--data", str(KVASIR), "--variant", "effisegnet-lite0", "--input-size", "64", "--batch-size", "4",
            "--limit-train", "4", "--limit-val", "2", "--limit-test", "1", "--device", "cpu", "--no-progress",
            "--no-pretrained", "--epochs", "1", "--set", "loss.distill_weight=0.5"]
    res = CliRunner().invoke(train_command, args + ["--output", str(tmp_path / "no-maps")])
    assert res.exit_code == 2 and "needs teacher_maps" in res.output, res.output
    assert not (tmp_path / "no-maps").exists()

    model, cfg = load_model(tiny_checkpoint)
    train = load_split(KVASIR, "train", 4)
    maps = save_teacher_maps(tmp_path / "teacher.npz", [s.stem for s in train],
                             teacher_maps(model, cfg, train, 64, tta=True), {"tta": True})
    run = tmp_path / "run"
    res = CliRunner().invoke(train_command, args + ["--set", f"teacher_maps={maps}", "--output", str(run)])
    assert res.exit_code == 0, res.output
    saved = __import__("json").loads((run / "run_config.json").read_text(encoding="utf-8"))
    assert saved["train"]["teacher_maps"] == str(maps) and saved["train"]["loss"]["distill_weight"] == 0.5
    # The fast step (a CUDA graph on GPUs, uncaptured here) feeds the teacher's maps as the eager step does.
    fast = tmp_path / "run_fast"
    res = CliRunner().invoke(train_command, args + ["--set", f"teacher_maps={maps}", "--step", "fast",
                                                    "--output", str(fast)])
    assert res.exit_code == 0, res.output
    metrics = [__import__("json").loads((r / "metrics.json").read_text(encoding="utf-8")) for r in (run, fast)]
    eager_loss, fast_loss = (m[0]["train_loss"] for m in metrics)  # one row per epoch
    assert fast_loss == pytest.approx(eager_loss, rel=1e-4)


def _noise_folder(data, seed: int):
    """An images/ + masks/ folder (--split none) of two noise images with empty masks."""
    (data / "images").mkdir(parents=True)
    (data / "masks").mkdir()
    rng = np.random.default_rng(seed)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(data / "images" / f"{i}.png")
        Image.fromarray(np.zeros((40, 48), np.uint8)).save(data / "masks" / f"{i}.png")
    return data


def test_distill_command_writes_maps_and_names_bad_data(tiny_checkpoint, tmp_path):
    from click.testing import CliRunner

    from effiseg.training.distill import _command
    data = _noise_folder(tmp_path / "d", seed=1)
    out = tmp_path / "teacher.npz"
    res = CliRunner().invoke(_command(), [str(tiny_checkpoint), "--data", str(data), "--split", "none",
                                          "--output", str(out), "--device", "cpu", "--tta-sizes", "64,96"])
    assert res.exit_code == 0, res.output
    assert load_teacher_maps(out, ["1", "0"], 64).shape == (2, 1, 64, 64)
    res = CliRunner().invoke(_command(), [str(tiny_checkpoint), "--data", str(tmp_path / "none-here"),
                                          "--output", str(tmp_path / "x.npz"), "--device", "cpu"])
    assert res.exit_code == 2 and "none-here" in res.output


def test_distill_takes_the_run_time_tta_choice(tiny_checkpoint, tmp_path):
    """--tta none|flip|multiscale as effiseg-run takes it: none writes the one-pass maps, multiscale needs
    the checkpoint's recommendation or --tta-sizes (a protocol run's checkpoint records none)."""
    from click.testing import CliRunner

    from effiseg.training.checkpoint import load_model
    from effiseg.training.data import load_split
    from effiseg.training.distill import _command
    data = _noise_folder(tmp_path / "d", seed=2)
    model, cfg = load_model(tiny_checkpoint)
    samples = load_split(data, None)
    for choice, flips in (("none", False), ("flip", True)):
        out = tmp_path / f"{choice}.npz"
        res = CliRunner().invoke(_command(), [str(tiny_checkpoint), "--data", str(data), "--split", "none",
                                              "--output", str(out), "--device", "cpu", "--tta", choice])
        assert res.exit_code == 0, res.output
        expected = teacher_maps(model, cfg, samples, 64, tta=flips)
        assert np.array_equal(load_teacher_maps(out, [s.stem for s in samples], 64)[:, 0], expected)
    res = CliRunner().invoke(_command(), [str(tiny_checkpoint), "--data", str(data), "--split", "none",
                                          "--output", str(tmp_path / "ms.npz"), "--device", "cpu"])
    assert res.exit_code == 2 and "--tta-sizes" in res.output and not (tmp_path / "ms.npz").exists()
