"""The trainer: data and augmentation stay on the device; one run = one self-describing folder.

A run folder holds ``run_config.json`` (everything needed to repeat it), ``metrics.csv`` and
``metrics.json`` (one row per epoch), ``best.safetensors/.json`` (best validation Dice),
``last.safetensors/.json``, ``resume_state.pt`` (optimiser, scheduler, random states, epoch) and,
at the end, ``test_metrics.json`` with per-image CSVs for both checkpoints.

The train step is the eager one or the fast one (fast_step.py: the same mathematics captured as a
CUDA graph), chosen by ``step``; validation runs on the device (device_validation.py). A run is
split into begin / epoch / conclude so that ``fit_together`` can train several runs in one process,
each on its own CUDA stream.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from effiseg.runtime.replace_file import replace_with_retry

from .augment import AugmentConfig
from effiseg.runtime.model_config import ModelConfig

from .checkpoint import effiseg_version, load_model, model_config, save_checkpoint
from .data import DEFAULT_DATA_ROOT, load_split, stack_samples
from .distill import load_teacher_maps
from .device_validation import DeviceValidation
from .evaluate import evaluate_samples
from .fast_step import (FastStep, StepChoice, choose_step_mode, cosine_lr, fast_optimizer, learning_rate_value,
                        set_learning_rate, training_batch)
from .losses import LossConfig, total_loss
from .model import build_model
from .result_files import write_json, write_rows_csv
from .variants import get_variant

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    data_root: str = DEFAULT_DATA_ROOT
    variant: str = "effisegnet-lite2"
    input_size: int | None = None
    epochs: int = 100
    batch_size: int = 8
    lr: float = 1e-4
    min_lr: float = 1e-5
    weight_decay: float = 1e-2
    seed: int = 0
    device: str = "auto"
    deterministic: bool = False
    amp: str = "auto"            # auto | bf16 | fp16 | off
    channels_last: bool = True   # CUDA only
    pretrained: bool = True
    decoder_channels: int | None = None
    deep_supervision: bool = False
    threshold: float = 0.5
    eval_test: bool = True
    limit_train: int | None = None   # use only the first N images (tests, smoke runs)
    limit_val: int | None = None
    limit_test: int | None = None
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    tag: str = ""
    teacher_maps: str | None = None  # distillation (issue 21): a file from training/distill.py
    step: str = "auto"                   # auto | eager | fast | graph (fast_step.py)
    plateau_patience: int | None = None  # stop when validation Dice has not improved for N epochs
    plateau_min_delta: float = 0.0       # an improvement must exceed this
    save_every: int = 1                  # last.* and the resume state every N epochs (and at the end)

    def to_dict(self) -> dict:
        d = asdict(self)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        d = dict(d)
        d["augment"] = AugmentConfig.from_dict(d.get("augment", {}))
        d["loss"] = LossConfig(**d.get("loss", {}))
        return cls(**d)

    def apply_overrides(self, overrides: list[str]) -> None:
        """``section.key=value`` or ``key=value`` (values parsed as JSON when possible)."""
        for item in overrides:
            if "=" not in item:
                raise ValueError(f"override {item!r} is not key=value")
            key, raw = item.split("=", 1)
            try:
                value = json.loads(raw)
            except json.JSONDecodeError:
                value = raw
            target = self
            parts = key.split(".")
            for p in parts[:-1]:
                if not dataclasses.is_dataclass(getattr(target, p, None)):
                    raise ValueError(f"unknown setting {key!r}: {p!r} is not a section "
                                     f"(sections: augment, loss)")
                target = getattr(target, p)
            fields = {f.name: f for f in dataclasses.fields(target)} if dataclasses.is_dataclass(target) else {}
            if parts[-1] not in fields:
                raise ValueError(f"unknown setting {key!r}")
            current = getattr(target, parts[-1])
            if dataclasses.is_dataclass(current):
                raise ValueError(f"{key!r} is a section: set its settings one by one ({key}.NAME=VALUE)")
            setattr(target, parts[-1], _checked_value(key, current, value, str(fields[parts[-1]].type)))

    def check(self) -> None:
        """The ranges the command-line options enforce, for values that came through ``--set`` or a
        config file; a ValueError naming the setting."""
        def need(ok: bool, what: str):
            if not ok:
                raise ValueError(what)
        need(self.epochs >= 1, f"epochs must be at least 1, got {self.epochs}")
        need(self.batch_size >= 2, f"batch_size must be at least 2 (BatchNorm), got {self.batch_size}")
        need(self.lr > 0 and self.min_lr >= 0, f"need lr > 0 and min_lr >= 0, got {self.lr} and {self.min_lr}")
        need(self.input_size is None or self.input_size >= 32, f"input_size must be at least 32, got {self.input_size}")
        need(self.step in ("auto", "eager", "fast", "graph"),
             f"step must be auto, eager, fast or graph, got {self.step!r}")
        need(self.save_every >= 1, f"save_every must be at least 1, got {self.save_every}")
        need(self.plateau_patience is None or self.plateau_patience >= 1,
             f"plateau_patience must be at least 1 (or unset), got {self.plateau_patience}")
        for name, low in (("limit_train", 2), ("limit_val", 1), ("limit_test", 1)):
            value = getattr(self, name)
            need(value is None or value >= low, f"{name} must be at least {low} (or unset), got {value}")
        need(self.loss.distill_weight <= 0 or bool(self.teacher_maps),
             "loss.distill_weight > 0 needs teacher_maps (a file from python -m effiseg.training.distill)")


def _checked_value(key: str, current, value, annotation: str = ""):
    """``value`` for a setting whose default is ``current`` (declared as ``annotation``), in the
    default's type; a ValueError naming the setting when it does not fit, before any run folder
    exists."""
    def fail(expected: str):
        raise ValueError(f"setting {key!r} takes {expected}, not {value!r}")
    if current is None:  # an optional setting: null, or a value of its declared type
        if value is None:
            return None
        for name, kinds, expected in (("int", (int,), "a whole number or null"),
                                      ("float", (int, float), "a number or null"),
                                      ("str", (str,), "text or null")):
            if name in annotation:
                if isinstance(value, bool) or not isinstance(value, kinds):
                    fail(expected)
                return value
        return value
    if isinstance(current, bool):
        if not isinstance(value, bool):
            fail("true or false")
        return value
    if isinstance(current, (int, float)) and not isinstance(current, bool):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            fail("a number")
        if isinstance(current, int) and not float(value).is_integer():
            fail("a whole number")
        return type(current)(value)
    if isinstance(current, tuple):
        if not isinstance(value, list) or len(value) != len(current):
            fail(f"a list of {len(current)} numbers, e.g. {list(current)}")
        return tuple(_checked_value(key, c, v) for c, v in zip(current, value))
    if isinstance(current, str) and not isinstance(value, str):
        fail("text")
    return value


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        warn_if_gpus_go_unused()
        return torch.device("cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but no CUDA GPU is available; use --device cpu")
    return dev


def unused_gpus_note() -> str | None:
    """Why ``auto`` falls back to the CPU on a machine whose NVIDIA driver shows GPUs, or None.

    The usual cause on Windows: PyPI's torch for Windows is a CPU-only build. Training would then
    run for days on the CPU without a word."""
    from effiseg.runtime.cuda_memory import driver_devices
    gpus = driver_devices()
    if not gpus:
        return None
    names = ", ".join(name for name, _ in gpus)
    if torch.version.cuda is None:
        return (f"the NVIDIA driver shows {len(gpus)} GPU(s) ({names}), but torch {torch.__version__} is a "
                "CPU-only build, so this runs on the CPU: install a CUDA build of PyTorch (training/README.md, "
                "'PyTorch with CUDA'), or pass --device cpu to silence this")
    return (f"the NVIDIA driver shows {len(gpus)} GPU(s) ({names}), but torch {torch.__version__} (CUDA "
            f"{torch.version.cuda}) cannot use them (driver older than that CUDA?), so this runs on the CPU")


@functools.lru_cache(maxsize=1)
def warn_if_gpus_go_unused() -> None:
    note = unused_gpus_note()
    if note:
        log.warning("%s", note)


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    if device.type != "cuda" or amp == "off":
        return None
    if amp == "bf16":
        return torch.bfloat16
    if amp == "fp16":
        return torch.float16
    major, _ = torch.cuda.get_device_capability(device)
    if major >= 8:
        return torch.bfloat16
    if major >= 7:
        return torch.float16
    return None  # Maxwell/Pascal: no fast half precision, mixed precision would only cost


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True


class Trainer:
    def __init__(self, cfg: TrainConfig, out_dir: str | Path, progress: bool = True, log=print):
        self.out = Path(out_dir)
        self.progress = progress
        self.log = log
        self._configure(cfg)

    def _configure(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.variant = get_variant(cfg.variant)
        self.size = int(cfg.input_size or self.variant.input_size)
        self.device = resolve_device(cfg.device)
        if self.device.type == "cuda" and self.device.index is not None:
            # Device-less CUDA calls (in torch or a library) then land on this run's GPU, not on
            # cuda:0: runs spread over two GPUs must not each hold a context on the first.
            torch.cuda.set_device(self.device)
        self.amp_dtype = resolve_amp(cfg.amp, self.device)
        capability = torch.cuda.get_device_capability(self.device) if self.device.type == "cuda" else None
        self.step_choice: StepChoice = choose_step_mode(cfg.step, self.device.type, capability, self.amp_dtype)
        self.channels_last = self.device.type == "cuda" and cfg.channels_last

    @classmethod
    def for_timing(cls, cfg: TrainConfig, images: torch.Tensor, masks: torch.Tensor) -> "Trainer":
        """A trainer over in-memory data (uint8 (N,3,S,S) images, (N,1,S,S) masks) without a run
        folder or validation: benchmarks/train_speed.py times the very steps a run trains with."""
        trainer = cls.__new__(cls)
        trainer.out, trainer.progress, trainer.log = None, False, (lambda *_: None)
        trainer._configure(cfg)
        seed_everything(cfg.seed, cfg.deterministic)
        trainer.train_images, trainer.train_masks = images.to(trainer.device), masks.to(trainer.device)
        trainer.train_teacher = None  # timing runs train on labels only
        trainer._build()
        trainer.stream = None
        if trainer.device.type == "cuda":
            trainer.stream = torch.cuda.Stream(trainer.device)
            trainer.stream.wait_stream(torch.cuda.current_stream(trainer.device))
        return trainer

    # ------------------------------------------------------------------ setup
    def _model_config(self, **extra) -> ModelConfig:
        return model_config(self.cfg.variant, input_size=self.size, decoder_channels=self.cfg.decoder_channels,
                            deep_supervision=self.cfg.deep_supervision, threshold=self.cfg.threshold, **extra)

    def _load_data(self):
        c = self.cfg
        train = load_split(c.data_root, "train", c.limit_train)
        val = load_split(c.data_root, "validation", c.limit_val)
        test = load_split(c.data_root, "test", c.limit_test) if c.eval_test else []
        images, masks = stack_samples(train, self.size)
        # The decoded training set lives on the device (800 x 352 x 352 x 3 bytes is ~300 MB).
        self.train_images = torch.from_numpy(images).to(self.device)
        self.train_masks = torch.from_numpy(masks).to(self.device)
        self.train_teacher = None if not c.teacher_maps else torch.from_numpy(
            load_teacher_maps(c.teacher_maps, [s.stem for s in train], self.size)).to(self.device)
        self.val_samples, self.test_samples = val, test
        self.validation = DeviceValidation(val, self.size, self.variant.mean, self.variant.std, self.device)
        self.log(f"data: {len(train)} train, {len(val)} validation, {len(test)} test images "
                 f"at {self.size}x{self.size} on {self.device}")

    def _build(self):
        c = self.cfg
        self.model = build_model(c.variant, pretrained=c.pretrained, ch=c.decoder_channels,
                                 deep_supervision=c.deep_supervision).to(self.device)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        mode = self.step_choice.mode
        if mode == "eager":
            self.opt = torch.optim.AdamW(self.model.parameters(), lr=c.lr, weight_decay=c.weight_decay)
        else:
            self.opt = fast_optimizer(self.model.parameters(), c.lr, c.weight_decay, self.device,
                                      capturable=mode == "graph")
        # What a resume state from the other kind of step must not overwrite (load_state_dict copies
        # the saved groups' flags and learning rate).
        self._opt_flags = {k: self.opt.param_groups[0].get(k) for k in ("fused", "capturable", "foreach")}
        self.sched = torch.optim.lr_scheduler.CosineAnnealingLR(self.opt, T_max=max(1, c.epochs), eta_min=c.min_lr)
        self.shuffle_gen = torch.Generator().manual_seed(c.seed)
        self.aug_gen = torch.Generator(device=self.device).manual_seed(c.seed + 1)
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None
        # Made once: a tensor built from Python values each step would make the CPU wait for the GPU.
        self.mean = torch.tensor(self.variant.mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(self.variant.std, device=self.device).view(1, 3, 1, 1)
        self.fast = None
        if mode != "eager":
            self.fast = FastStep(self.model, self.opt, self.train_images, self.train_masks, self.mean, self.std,
                                 c.batch_size, c.augment, c.loss, self.aug_gen, self.amp_dtype, self.channels_last,
                                 capture=mode == "graph", teacher=self.train_teacher)

    # ------------------------------------------------------------------ state
    def _state(self, epoch: int, best: float, best_epoch: int, history: list[dict]) -> dict:
        return {
            "epoch": epoch, "best_val_dice": best, "best_epoch": best_epoch, "history": history,
            "model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "shuffle_gen": self.shuffle_gen.get_state(), "aug_gen": self.aug_gen.get_state(),
            "torch_rng": torch.get_rng_state(),
            # This run's GPU only: the _all variant would open a context on every visible GPU.
            "cuda_rng": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
            "numpy_rng": np.random.get_state(), "python_rng": random.getstate(),
            "scaler": self.scaler.state_dict() if self.scaler else None,
        }

    def _restore(self, st: dict) -> None:
        self.model.load_state_dict(st["model"])
        self.opt.load_state_dict(st["optimizer"])
        self.sched.load_state_dict(st["scheduler"])
        self.shuffle_gen.set_state(st["shuffle_gen"])
        self.aug_gen.set_state(st["aug_gen"])
        torch.set_rng_state(st["torch_rng"])
        cuda_rng = st.get("cuda_rng")
        if cuda_rng is not None and self.device.type == "cuda":
            if isinstance(cuda_rng, (list, tuple)):  # older resume states hold one state per visible GPU
                cuda_rng = cuda_rng[min(self.device.index or 0, len(cuda_rng) - 1)]
            torch.cuda.set_rng_state(cuda_rng, self.device)
        np.random.set_state(st["numpy_rng"])
        random.setstate(st["python_rng"])
        if self.scaler and st.get("scaler"):
            self.scaler.load_state_dict(st["scaler"])
        self._normalise_optimizer(float(st["optimizer"]["param_groups"][0]["lr"]))

    def _normalise_optimizer(self, lr: float) -> None:
        """After loading a resume state written by either kind of step: this step's optimizer
        flags, and the learning rate as this step holds it (a device tensor for the fast step)."""
        for group in self.opt.param_groups:
            group.update(self._opt_flags)
            if self.step_choice.mode == "eager":
                group["lr"] = lr
            else:
                group["lr"] = torch.tensor(lr, dtype=torch.float32, device=self.device)
        # Adam's step counts live on the device for a fused/capturable optimizer, on the host otherwise.
        on_device = self.step_choice.mode != "eager"
        for state in self.opt.state.values():
            if "step" in state:
                state["step"] = torch.as_tensor(state["step"], dtype=torch.float32).to(
                    self.device if on_device else "cpu")

    # ------------------------------------------------------------------ loop
    def _enqueue_epoch(self) -> dict:
        """Start one epoch of training; with the fast step nothing waits for the device."""
        c = self.cfg
        self.model.train()
        n = self.train_images.shape[0]
        t0 = time.perf_counter()
        order = torch.randperm(n, generator=self.shuffle_gen)
        if self.device.type == "cuda":
            order = order.pin_memory().to(self.device, non_blocking=True)  # a pageable copy would wait
        else:
            order = order.to(self.device)
        if self.fast is not None:
            self.fast.loss_sum.zero_()
            steps = self.fast.run_epoch(order)
            return {"t0": t0, "n": n, "loss_sum": self.fast.loss_sum, "steps": steps}
        total, steps = torch.zeros((), device=self.device), 0
        for start in range(0, n, c.batch_size):
            idx = order[start:start + c.batch_size]
            if idx.numel() < 2:  # BatchNorm needs two samples
                continue
            x, masks = training_batch(self.train_images, self.train_masks, self.train_teacher, idx, c.augment,
                                      self.aug_gen, self.mean, self.std, self.channels_last)
            with torch.autocast(device_type=self.device.type, dtype=self.amp_dtype or torch.bfloat16,
                                enabled=self.amp_dtype is not None):
                out = self.model(x)
            loss = total_loss(out, masks, c.loss)
            self.opt.zero_grad(set_to_none=True)
            if self.scaler:
                self.scaler.scale(loss).backward()
                self.scaler.step(self.opt)
                self.scaler.update()
            else:
                loss.backward()
                self.opt.step()
            total += loss.detach()
            steps += 1
        return {"t0": t0, "n": n, "loss_sum": total, "steps": steps}

    def _collect_epoch(self, pending: dict) -> tuple[float, float]:
        """(mean train loss, images/s): the epoch's one read from the device."""
        loss = float(pending["loss_sum"].item()) / max(pending["steps"], 1)
        elapsed = time.perf_counter() - pending["t0"]
        return loss, pending["n"] / max(elapsed, 1e-9)

    def _validate(self) -> dict:
        summary, _ = self.validation.evaluate(self.model, self.cfg.threshold, self.amp_dtype, self.channels_last)
        return summary

    def fit(self, resume: bool = False, stop_after_epochs: int | None = None, device: str | None = None) -> dict:
        """Train to ``cfg.epochs``; ``stop_after_epochs`` ends this session early (resumable),
        e.g. to split a long CPU training over several sittings. With ``resume``, ``device``
        replaces the run's recorded device (a protocol run pinned to cuda:1, resumed on a machine
        with one GPU)."""
        self.begin(resume, stop_after_epochs, device)
        while not self.done:
            self.finish_epoch(self.enqueue_epoch())
        return self.conclude()

    def begin(self, resume: bool = False, stop_after_epochs: int | None = None, device: str | None = None) -> None:
        c = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        self.state_path = self.out / "resume_state.pt"
        cfg_path = self.out / "run_config.json"
        if resume:
            if not self.state_path.exists():
                raise FileNotFoundError(f"--resume: {self.state_path} not found (nothing to resume in {self.out})")
            saved = json.loads(cfg_path.read_text(encoding="utf-8"))
            if device is not None:
                saved["train"]["device"] = device
            self._configure(TrainConfig.from_dict(saved["train"]))
            c = self.cfg
        seed_everything(c.seed, c.deterministic)
        self._load_data()
        self._build()
        self.log(self.step_choice.line())
        start_epoch, self.best, self.best_epoch, self.history = 0, -1.0, -1, []
        if resume:
            # Load on the CPU: the random-generator states must stay CPU ByteTensors; load_state_dict
            # moves the model's and the optimiser's tensors to the device itself.
            st = torch.load(self.state_path, map_location="cpu", weights_only=False)
            self._restore(st)
            start_epoch, self.best, self.best_epoch, self.history = (st["epoch"], st["best_val_dice"],
                                                                     st["best_epoch"], st["history"])
            self.log(f"resuming {self.out} at epoch {start_epoch}/{c.epochs}")
        else:
            write_json(cfg_path, {"train": c.to_dict(), "model": self._model_config().to_dict(),
                                  "effiseg_version": effiseg_version(), "device": str(self.device),
                                  "device_name": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu",
                                  "torch": torch.__version__, "train_step": self.step_choice.mode,
                                  "train_step_reason": self.step_choice.reason})
        self.epoch = start_epoch
        self.end_epoch = c.epochs if stop_after_epochs is None else min(c.epochs, start_epoch + stop_after_epochs)
        self.plateaued = self._plateau_reached()
        self.done = self.epoch >= self.end_epoch or self.plateaued
        self.bar = None
        if self.progress:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=c.epochs, initial=start_epoch, desc=f"train {c.variant}", unit="epoch",
                            dynamic_ncols=True)
        self.t_run = time.perf_counter()
        self.stream = None
        if self.device.type == "cuda":
            self.stream = torch.cuda.Stream(self.device)
            self.stream.wait_stream(torch.cuda.current_stream(self.device))  # data and model are made there

    def _on_stream(self):
        return torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()

    def _plateau_reached(self) -> bool:
        """No validation gain above ``plateau_min_delta`` in the last ``plateau_patience`` epochs
        (read from the history, so that a resumed run decides as the uninterrupted one)."""
        patience = self.cfg.plateau_patience
        if not patience:
            return False
        reference, reference_epoch = None, 0
        for row in self.history:
            if reference is None or row["val_dice"] > reference + self.cfg.plateau_min_delta:
                reference, reference_epoch = row["val_dice"], row["epoch"]
        return reference is not None and self.epoch - reference_epoch >= patience

    def enqueue_epoch(self) -> dict:
        with self._on_stream():
            return self._enqueue_epoch()

    def finish_epoch(self, pending: dict) -> None:
        c = self.cfg
        with self._on_stream():
            t_start = pending["t0"]
            loss, ips = self._collect_epoch(pending)
            lr = learning_rate_value(self.opt)
            self.sched.step()
            if self.fast is not None:  # the schedule's value, written into the captured tensor
                set_learning_rate(self.opt, cosine_lr(self.sched.last_epoch, c.lr, c.min_lr, c.epochs))
            val = self._validate()
        epoch = self.epoch
        row = {"epoch": epoch + 1, "train_loss": loss, "val_dice": val["mean_dice"], "val_iou": val["mean_iou"],
               "lr": lr, "train_images": int(self.train_images.shape[0]), "train_images_per_s": ips,
               "epoch_seconds": time.perf_counter() - t_start}
        self.history.append(row)
        if val["mean_dice"] > self.best:
            self.best, self.best_epoch = val["mean_dice"], epoch + 1
            save_checkpoint(self.out, self.model, self._model_config(best_epoch=self.best_epoch, val_metrics=val),
                            stem="best")
        self.epoch = epoch + 1
        self.plateaued = self._plateau_reached()
        self.done = self.epoch >= self.end_epoch or self.plateaued
        self._write_history(self.history)
        # On a fast GPU writing ~100 MB of state per epoch would cost more than the epoch: save_every.
        if self.done or self.epoch % c.save_every == 0:
            save_checkpoint(self.out, self.model, self._model_config(epoch=epoch + 1, val_metrics=val), stem="last")
            # Resume state last: a crash before this line repeats epochs, it never skips one.
            tmp = self.state_path.with_suffix(".tmp")
            torch.save(self._state(epoch + 1, self.best, self.best_epoch, self.history), tmp)
            replace_with_retry(tmp, self.state_path)
        if self.bar:
            self.bar.set_postfix(loss=f"{loss:.4f}", val_dice=f"{val['mean_dice']:.4f}", best=f"{self.best:.4f}",
                                 img_s=f"{ips:.0f}")
            self.bar.update(1)
        else:
            self.log(f"epoch {epoch + 1}/{c.epochs} loss {loss:.4f} val_dice {val['mean_dice']:.4f} "
                     f"best {self.best:.4f} ({ips:.0f} img/s)")

    def conclude(self) -> dict:
        c = self.cfg
        if self.bar:
            self.bar.close()
        if self.plateaued and self.epoch < c.epochs:
            self.log(f"validation Dice plateaued: no gain over {c.plateau_min_delta} in {c.plateau_patience} epochs "
                     f"(best {self.best:.4f} at epoch {self.best_epoch}); stopped at epoch {self.epoch}/{c.epochs}")
        elif self.end_epoch < c.epochs:
            self.log(f"stopped after epoch {self.end_epoch}/{c.epochs}; continue with --resume {self.out}")
            return {"stopped_at_epoch": self.end_epoch, "epochs": c.epochs, "best_val_dice": self.best,
                    "best_epoch": self.best_epoch}
        history = self.history
        result = {"best_epoch": self.best_epoch, "best_val_dice": self.best, "epochs": c.epochs,
                  "epochs_trained": self.epoch, "plateau_stop": bool(self.plateaued and self.epoch < c.epochs),
                  "train_step": self.step_choice.mode,
                  "train_seconds_this_session": time.perf_counter() - self.t_run,
                  "mean_train_images_per_s": float(np.mean([h["train_images_per_s"] for h in history])) if history else None}
        if c.eval_test and self.test_samples:
            result["test"] = self.evaluate_checkpoints()
        write_json(self.out / "result.json", result)
        return result

    def _write_history(self, history: list[dict]) -> None:
        write_json(self.out / "metrics.json", history)
        csv_path = self.out / "metrics.csv"
        try:
            write_rows_csv(csv_path, history)
        except PermissionError as e:
            # Windows: a CSV open in Excel cannot be replaced while it stays open. The same rows are in
            # metrics.json and the next epoch rewrites the CSV, so a training run must not die of it.
            self.log(f"could not update {csv_path} (open in another program?): {e}; training goes on, "
                     "metrics.json has the same rows")

    def evaluate_checkpoints(self) -> dict:
        out = {}
        for stem in ("best", "last"):
            model, mcfg = load_model(self.out / f"{stem}.safetensors", device=self.device)
            summary, rows, _ = evaluate_samples(model, mcfg, self.test_samples, self.device, batch_size=16,
                                                amp_dtype=self.amp_dtype)
            write_rows_csv(self.out / f"test_per_image_{stem}.csv", rows)
            out[stem] = summary
        write_json(self.out / "test_metrics.json", out)
        return out


def fit_together(trainers: list[Trainer], resume: bool = False) -> list[dict]:
    """Several runs in one process, one CUDA graph per run replayed in turn: each epoch, every run's
    steps are enqueued on its own CUDA stream before any run waits for its results, so the GPU
    overlaps the runs' small kernels (separate processes would time-slice the GPU between their
    contexts instead). A run's end of epoch (validation, checkpoints) overlaps the others' training.
    With the eager step the runs simply take turns. Returns each run's result, in order."""
    for t in trainers:
        t.begin(resume)
    while any(not t.done for t in trainers):
        pending = [(t, t.enqueue_epoch()) for t in trainers if not t.done]
        for t, p in pending:
            t.finish_epoch(p)
    return [t.conclude() for t in trainers]
