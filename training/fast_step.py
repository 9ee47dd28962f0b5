"""The fast train step: the eager step's mathematics without its launch overhead.

At the paper's batch of 8 an EfficientNet step is a few hundred small kernels; eager PyTorch spends
longer launching them from Python than the GPU spends running them (86-88 images/s per run on an
H200, issue 20). The fast step therefore:

* keeps every tensor the step touches at a fixed address (static batch indices, gradients that are
  zeroed in place rather than freed, the learning rate as a device tensor), so the whole step --
  augmentation, forward, loss, backward and the fused AdamW update -- can be captured once as a
  CUDA graph and replayed with one launch per step;
* never asks the host for a value inside an epoch: the loss is summed on the device and read once;
* runs the same code uncaptured (mode ``fast``): on the CPU, where CUDA graphs do not exist, and for
  the last short batch of an epoch whose size differs from the captured one. That is what lets the
  CPU tests compare it with the eager step.

Choice of mode (``choose_step_mode``, a pure function of the device and the precision):

* ``graph`` on CUDA with fp32 or bf16, on every compute capability: CUDA graphs need no compiler,
  so the user's Quadro M6000 (5.2, fp32) gets them as the H100 does. ``torch.compile`` is not used:
  its Triton backend needs compute capability 7.0, each run would pay minutes of compilation in a
  GPU allowance of minutes, and the launch overhead it removes is what the graph already removes.
* ``eager`` with fp16, whose GradScaler checks for overflow on the host (a step it would skip cannot
  be decided inside a captured graph), and on the CPU unless ``fast`` is asked for.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .augment import AugmentConfig, augment_batch
from .losses import LossConfig, total_loss

STEP_MODES = ("auto", "eager", "fast", "graph")


@dataclass(frozen=True)
class StepChoice:
    mode: str      # eager | fast | graph
    reason: str    # one line for the log

    def line(self) -> str:
        return f"train step: {self.mode} ({self.reason})"


def choose_step_mode(requested: str, device_type: str, capability: tuple[int, int] | None,
                     amp_dtype: torch.dtype | None) -> StepChoice:
    """Which train step runs, and why. ``capability`` is the GPU's (major, minor) or None."""
    if requested not in STEP_MODES:
        raise ValueError(f"step must be one of {', '.join(STEP_MODES)}, got {requested!r}")
    precision = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[amp_dtype]
    if requested == "eager":
        return StepChoice("eager", "asked for")
    if device_type != "cuda":
        if requested == "graph":
            raise ValueError(f"step 'graph' needs a CUDA device, not {device_type!r}; use step=fast or auto")
        if requested == "fast":
            return StepChoice("fast", f"asked for; {device_type} has no CUDA graphs, the fast step runs uncaptured")
        return StepChoice("eager", f"{device_type}: CUDA graphs need a GPU")
    cc = f"compute capability {capability[0]}.{capability[1]}" if capability else "unknown compute capability"
    if amp_dtype == torch.float16:
        if requested == "graph":
            raise ValueError("step 'graph' cannot run fp16: the loss scaler decides on the host whether to skip "
                             "a step; use amp=bf16 (compute capability 8.0+) or amp=off")
        return StepChoice("fast" if requested == "fast" else "eager",
                          f"{cc}, fp16: the loss scaler's skip decision is not capturable")
    if requested == "fast":
        return StepChoice("fast", f"asked for; {cc}, {precision}, uncaptured")
    old = capability is not None and capability[0] < 7
    why = f"{cc}, {precision}" + (": plain CUDA graph, torch.compile's Triton needs 7.0+" if old else "")
    return StepChoice("graph", why)


def training_batch(images: torch.Tensor, masks: torch.Tensor, teacher: torch.Tensor | None, idx: torch.Tensor,
                   augment, generator: torch.Generator, mean: torch.Tensor, std: torch.Tensor,
                   channels_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(network input, target) of the samples ``idx`` of the device-resident uint8 data set: scaled,
    augmented on the device, normalised. The eager and the fast step both take their batch from
    here, so that the two stay the same mathematics."""
    batch = images[idx].float().div_(255.0)
    target = masks[idx].float()
    if teacher is not None:  # soft targets ride along as channel 1 (losses.py)
        target = torch.cat([target, teacher[idx].float().div_(255.0)], dim=1)
    batch, target = augment_batch(batch, target, augment, generator=generator)
    x = (batch - mean) / std
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, target


def fast_optimizer(params, lr: float, weight_decay: float, device: torch.device, capturable: bool):
    """AdamW as one fused kernel per step, its learning rate a device tensor that the schedule fills
    in place (a Python float would be frozen into a captured graph)."""
    lr_tensor = torch.tensor(float(lr), dtype=torch.float32, device=device)
    return torch.optim.AdamW(params, lr=lr_tensor, weight_decay=weight_decay, fused=True,
                             capturable=capturable)


def cosine_lr(epoch: int, lr: float, min_lr: float, epochs: int) -> float:
    """CosineAnnealingLR's value at ``epoch`` in closed form (float64), as the eager run's
    recursive float64 schedule gives it to ~1e-16."""
    t_max = max(1, epochs)
    return min_lr + (lr - min_lr) * (1 + math.cos(math.pi * epoch / t_max)) / 2


def set_learning_rate(optimizer: torch.optim.Optimizer, value: float) -> None:
    """Write the learning rate in place when it is a tensor (the captured graph holds its address)."""
    for group in optimizer.param_groups:
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(value)
        else:
            group["lr"] = value


def learning_rate_value(optimizer: torch.optim.Optimizer) -> float:
    lr = optimizer.param_groups[0]["lr"]
    return float(lr.item()) if isinstance(lr, torch.Tensor) else float(lr)


class FastStep:
    """One run's train step over the decoded training set on the device.

    ``run_epoch(order)`` enqueues every step of an epoch and returns without waiting;
    ``loss_sum`` holds the sum of the step losses on the device. With ``capture`` the full-size step
    is captured as a CUDA graph at its first use (after warm-up steps on a side stream that also
    train, exactly as the eager step would: nothing is thrown away).
    """

    WARMUP_STEPS = 3  # cudnn autotuning and lazy allocations happen before capture

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor,
                 masks: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, batch_size: int,
                 augment: AugmentConfig, loss: LossConfig, aug_gen: torch.Generator,
                 amp_dtype: torch.dtype | None, channels_last: bool, capture: bool,
                 teacher: torch.Tensor | None = None):
        self.model, self.opt = model, optimizer
        self.images, self.masks, self.mean, self.std = images, masks, mean, std
        self.teacher = teacher  # distillation: uint8 (N,1,S,S) teacher probabilities, as the eager step takes them
        self.batch_size, self.augment, self.loss_cfg = batch_size, augment, loss
        self.aug_gen, self.amp_dtype, self.channels_last = aug_gen, amp_dtype, channels_last
        self.device = images.device
        self.capture = capture and self.device.type == "cuda"
        self.static_idx = torch.zeros(batch_size, dtype=torch.long, device=self.device)
        self.loss_sum = torch.zeros((), dtype=torch.float32, device=self.device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self._warm = 0

    def _autocast(self):
        # cache_enabled=False: autocast's cache of cast weights must not outlive a captured graph.
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype or torch.bfloat16,
                              enabled=self.amp_dtype is not None, cache_enabled=False)

    def _step(self, idx: torch.Tensor) -> None:
        """The eager step's mathematics (trainer.Trainer._train_epoch), on fixed addresses."""
        x, masks = training_batch(self.images, self.masks, self.teacher, idx, self.augment, self.aug_gen,
                                  self.mean, self.std, self.channels_last)
        with self._autocast():
            out = self.model(x)
        loss = total_loss(out, masks, self.loss_cfg)
        # Zeroed in place, not freed: the captured backward accumulates into these same tensors.
        self.opt.zero_grad(set_to_none=False)
        loss.backward()
        self.opt.step()
        self.loss_sum.add_(loss.detach().float())

    def _full_step(self) -> None:
        if not self.capture:
            self._step(self.static_idx)
        elif self.graph is not None:
            self.graph.replay()
        elif self._warm < self.WARMUP_STEPS:
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                self._step(self.static_idx)
            torch.cuda.current_stream(self.device).wait_stream(side)
            self._warm += 1
        else:
            self.graph = torch.cuda.CUDAGraph()
            # Replays must draw new augmentation numbers from the run's own generator, as eager steps do.
            self.graph.register_generator_state(self.aug_gen)
            with torch.cuda.graph(self.graph):
                self._step(self.static_idx)
            # Capture only records: the captured step has not run yet.
            self.graph.replay()

    def run_epoch(self, order: torch.Tensor) -> int:
        """Enqueue one epoch over ``order`` (a device permutation); returns the number of steps."""
        n, bs, steps = order.numel(), self.batch_size, 0
        for start in range(0, n, bs):
            idx = order[start:start + bs]
            if idx.numel() < 2:  # BatchNorm needs two samples (as the eager step)
                continue
            if idx.numel() == bs:
                self.static_idx.copy_(idx)
                self._full_step()
            else:  # the short last batch: the same code, uncaptured
                self._step(idx)
            steps += 1
        return steps
