"""The fast train step (training/fast_step.py) is an exact replacement for the eager one.

Tolerances, from what the two paths compute differently:
* One step from the same state and data: the forward and backward are the same operations on the
  same tensors, so the loss is bitwise equal; the update is AdamW in one fused kernel instead of a
  per-tensor loop, with the learning rate held in a float32 tensor, which orders the float32
  arithmetic differently: weights agree to a few units in the last place (atol 1e-7 + rtol 1e-6).
* Several steps: those last-place differences reach the next gradients, and Adam's normalised
  update (m / sqrt(v)) turns a difference in a near-zero gradient entry into up to +-lr per step
  whatever its size. So losses agree to 1e-4 relative, learning rates exactly (to float32), and no
  weight differs by more than 2 x lr per step, with the median difference far below lr.
* Resuming the fast path changes no arithmetic: a resumed run equals the uninterrupted one bitwise.
"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from _paths import copy_kvasir_subset, needs_kvasir
from conftest import TINY_SIZE, TINY_VARIANT
from effiseg.training.fast_step import choose_step_mode
from effiseg.training.trainer import TrainConfig, Trainer, fit_together, resolve_amp

LR = 1e-4


@pytest.mark.parametrize("requested, device, capability, amp, mode, words", [
    ("auto", "cuda", (9, 0), torch.bfloat16, "graph", "9.0, bf16"),
    ("auto", "cuda", (5, 2), None, "graph", "Triton needs 7.0"),
    ("auto", "cuda", (7, 5), torch.float16, "eager", "loss scaler"),
    ("fast", "cuda", (7, 5), torch.float16, "fast", "loss scaler"),
    ("auto", "cpu", None, None, "eager", "CUDA graphs need a GPU"),
    ("fast", "cpu", None, None, "fast", "uncaptured"),
    ("eager", "cuda", (9, 0), torch.bfloat16, "eager", "asked for"),
])
def test_step_mode_follows_device_and_precision(requested, device, capability, amp, mode, words):
    choice = choose_step_mode(requested, device, capability, amp)
    assert choice.mode == mode
    assert words in choice.line()


@pytest.mark.parametrize("device, capability, amp", [("cpu", None, None), ("cuda", (7, 0), torch.float16)])
def test_a_graph_that_cannot_run_is_refused_with_the_reason(device, capability, amp):
    with pytest.raises(ValueError, match="graph"):
        choose_step_mode("graph", device, capability, amp)
    with pytest.raises(ValueError, match="step must be one of"):
        choose_step_mode("compiled", device, capability, amp)


def test_a_simulated_quadro_m6000_trains_fp32_in_a_plain_cuda_graph(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (5, 2))
    amp = resolve_amp("auto", torch.device("cuda"))
    choice = choose_step_mode("auto", "cuda", (5, 2), amp)
    assert amp is None and choice.mode == "graph"
    assert choice.line() == ("train step: graph (compute capability 5.2, fp32: plain CUDA graph, "
                             "torch.compile's Triton needs 7.0+)")


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return copy_kvasir_subset(tmp_path_factory.mktemp("kvasir"), splits=("train", "validation"),
                              stems=[str(i) for i in range(10)])


def _config(data, step, **kw) -> TrainConfig:
    base = dict(data_root=str(data), variant=TINY_VARIANT, input_size=TINY_SIZE, epochs=2, batch_size=4, lr=LR,
                device="cpu", pretrained=False, eval_test=False, limit_train=10, limit_val=2, step=step)
    base.update(kw)
    return TrainConfig(**base)


def _run(folder) -> tuple[list[dict], dict]:
    return (json.loads((folder / "metrics.json").read_text(encoding="utf-8")),
            load_file(folder / "last.safetensors"))


def _weights_only(state: dict) -> dict:
    return {k: v.float() for k, v in state.items() if "running_" not in k and "num_batches" not in k}


@needs_kvasir
def test_one_fast_step_equals_one_eager_step(tiny_data, tmp_path):
    for step in ("eager", "fast"):
        Trainer(_config(tiny_data, step, epochs=1, limit_train=4), tmp_path / step, progress=False).fit()
    (eager_rows, eager_w), (fast_rows, fast_w) = _run(tmp_path / "eager"), _run(tmp_path / "fast")
    assert fast_rows[0]["train_loss"] == eager_rows[0]["train_loss"]
    for name, tensor in eager_w.items():
        torch.testing.assert_close(fast_w[name].float(), tensor.float(), rtol=1e-6, atol=1e-7, msg=name)


@needs_kvasir
def test_fast_epochs_with_a_short_last_batch_track_the_eager_ones(tiny_data, tmp_path):
    # 10 images at batch 4: two full steps and a step of 2 per epoch, over a cosine schedule.
    for step in ("eager", "fast"):
        Trainer(_config(tiny_data, step), tmp_path / step, progress=False).fit()
    (eager_rows, eager_w), (fast_rows, fast_w) = _run(tmp_path / "eager"), _run(tmp_path / "fast")
    for e, f in zip(eager_rows, fast_rows, strict=True):
        assert f["train_loss"] == pytest.approx(e["train_loss"], rel=1e-4)
        assert f["lr"] == pytest.approx(e["lr"], rel=1e-7)
    steps = 2 * 3
    diffs = torch.cat([(fast_w[k] - w).abs().flatten() for k, w in _weights_only(eager_w).items()])
    assert diffs.max().item() <= 2 * LR * steps
    assert diffs.median().item() < 0.1 * LR


@needs_kvasir
def test_resume_across_the_fast_path_continues_exactly(tiny_data, tmp_path):
    cfg = _config(tiny_data, "fast", epochs=3, limit_train=6)
    Trainer(cfg, tmp_path / "whole", progress=False).fit()
    Trainer(cfg, tmp_path / "split", progress=False).fit(stop_after_epochs=1)
    Trainer(TrainConfig(), tmp_path / "split", progress=False).fit(resume=True)
    (whole_rows, whole_w), (split_rows, split_w) = _run(tmp_path / "whole"), _run(tmp_path / "split")
    assert [r["train_loss"] for r in split_rows] == [r["train_loss"] for r in whole_rows]
    assert [r["lr"] for r in split_rows] == [r["lr"] for r in whole_rows]
    for name, tensor in whole_w.items():
        assert torch.equal(split_w[name], tensor), name


@needs_kvasir
def test_runs_trained_together_equal_the_runs_trained_alone(tiny_data, tmp_path):
    configs = [_config(tiny_data, "fast", epochs=2, limit_train=4, seed=s) for s in (0, 1)]
    for s, cfg in enumerate(configs):
        Trainer(cfg, tmp_path / f"alone{s}", progress=False).fit()
    results = fit_together([Trainer(cfg, tmp_path / f"together{s}", progress=False) for s, cfg in enumerate(configs)])
    assert [r["epochs_trained"] for r in results] == [2, 2]
    for s in (0, 1):
        (alone_rows, alone_w), (together_rows, together_w) = _run(tmp_path / f"alone{s}"), _run(tmp_path / f"together{s}")
        assert [r["train_loss"] for r in together_rows] == [r["train_loss"] for r in alone_rows]
        for name, tensor in alone_w.items():
            assert torch.equal(together_w[name], tensor), name
    assert _run(tmp_path / "alone0")[0][0]["train_loss"] != _run(tmp_path / "alone1")[0][0]["train_loss"]


def test_plateau_stop_reads_the_validation_history(tmp_path):
    trainer = Trainer(TrainConfig(device="cpu", plateau_patience=3, plateau_min_delta=0.01), tmp_path, progress=False)
    dice = [0.50, 0.70, 0.705, 0.709, 0.71]  # gains after epoch 2 stay within 0.01
    trainer.history = [{"epoch": i + 1, "val_dice": d} for i, d in enumerate(dice)]
    trainer.epoch = 4
    assert not trainer._plateau_reached()
    trainer.epoch = 5
    assert trainer._plateau_reached()
    trainer.history.append({"epoch": 6, "val_dice": 0.75})
    trainer.epoch = 6
    assert not trainer._plateau_reached()
    trainer.cfg.plateau_patience = None
    trainer.history = [{"epoch": i + 1, "val_dice": 0.5} for i in range(20)]
    trainer.epoch = 20
    assert not trainer._plateau_reached()


@needs_kvasir
def test_validation_on_the_device_scores_as_evaluate_samples(tiny_checkpoint):
    from effiseg.training.checkpoint import load_model
    from effiseg.training.data import load_split
    from effiseg.training.device_validation import DeviceValidation
    from effiseg.training.evaluate import evaluate_samples
    from _paths import KVASIR
    model, cfg = load_model(tiny_checkpoint, device="cpu")
    samples = load_split(KVASIR, "validation", 6)  # 352x352 masks, a 64x64 model: logits resized back
    expected, expected_rows, _ = evaluate_samples(model, cfg, samples, "cpu", batch_size=4)
    validation = DeviceValidation(samples, cfg.input_size, cfg.mean, cfg.std, torch.device("cpu"),
                                  batch_size=4)
    summary, rows = validation.evaluate(model, cfg.threshold)
    assert [(r["stem"], r["tp"], r["fp"], r["fn"]) for r in rows] == \
           [(r["stem"], r["tp"], r["fp"], r["fn"]) for r in expected_rows]
    assert summary["mean_dice"] == pytest.approx(expected["mean_dice"], abs=1e-12)
    assert 0.0 < summary["mean_dice"] < 1.0


@pytest.mark.gpu
@needs_kvasir
@pytest.mark.parametrize("amp", ["off", "bf16"])
def test_the_cuda_graph_step_tracks_the_eager_step_on_the_gpu(tiny_data, tmp_path, amp):
    if amp == "bf16" and torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("bf16 needs compute capability 8.0")
    for step in ("eager", "graph"):
        Trainer(_config(tiny_data, step, device="cuda", amp=amp, epochs=4, limit_train=10),
                tmp_path / step, progress=False).fit()
    (eager_rows, eager_w), (graph_rows, graph_w) = _run(tmp_path / "eager"), _run(tmp_path / "graph")
    # On the GPU cuDNN may pick other kernels between runs (benchmark mode), so only the loose bounds.
    for e, g in zip(eager_rows, graph_rows, strict=True):
        assert g["train_loss"] == pytest.approx(e["train_loss"], rel=1e-2 if amp == "bf16" else 1e-3)
    diffs = torch.cat([(graph_w[k].float() - w).abs().flatten() for k, w in _weights_only(eager_w).items()])
    assert diffs.max().item() <= 2 * LR * 12  # 4 epochs of 3 steps; the graph replays from the second


@needs_kvasir
def test_save_every_writes_the_resume_state_every_n_epochs_and_at_the_end(tiny_data, tmp_path, monkeypatch):
    import effiseg.training.trainer as trainer_module
    saved_epochs = []
    real_save = torch.save

    def counting_save(obj, path, *a, **k):
        saved_epochs.append(obj["epoch"])
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(trainer_module.torch, "save", counting_save)
    Trainer(_config(tiny_data, "fast", epochs=3, limit_train=4, save_every=2), tmp_path, progress=False).fit()
    assert saved_epochs == [2, 3]
    assert len(json.loads((tmp_path / "metrics.json").read_text(encoding="utf-8"))) == 3
    assert json.loads((tmp_path / "last.json").read_text(encoding="utf-8"))["epoch"] == 3


@pytest.mark.gpu
@needs_kvasir
def test_resume_across_the_cuda_graph_continues_the_run(tiny_data, tmp_path):
    # The augmentation generator is advanced by graph replays; a resume must restart from its saved
    # state. On the GPU cuDNN's kernel choice and atomics make runs differ in the last places, so the
    # bounds are those of the eager comparison, not bitwise.
    cfg = _config(tiny_data, "graph", device="cuda", amp="off", epochs=4, limit_train=10)
    Trainer(cfg, tmp_path / "whole", progress=False).fit()
    Trainer(cfg, tmp_path / "split", progress=False).fit(stop_after_epochs=2)
    Trainer(TrainConfig(), tmp_path / "split", progress=False).fit(resume=True)
    (whole_rows, whole_w), (split_rows, split_w) = _run(tmp_path / "whole"), _run(tmp_path / "split")
    for w, s in zip(whole_rows, split_rows, strict=True):
        assert s["train_loss"] == pytest.approx(w["train_loss"], rel=1e-3)
    diffs = torch.cat([(split_w[k].float() - w).abs().flatten() for k, w in _weights_only(whole_w).items()])
    assert diffs.max().item() <= 2 * LR * 12
