"""The deployed graph: preprocessing + EffiSegNet + output formatting, as one torch module.

``effiseg-export`` traces this module to ONNX, and the runtime's torch backend runs the very
same module, so both take the same host buffers and compute the same thing.

Input ``images``: uint8 (N, H, W, 3) RGB ("uint8-nhwc", the default: 4x fewer bytes to copy
than float32 and no normalisation on the host) or float32 (N, 3, H, W) already normalised
("float32-nchw"). Output, always (N, H, W) (the single channel is squeezed in the graph, the
Backend interface's layout): float32 logits, float16 sigmoid probabilities, or uint8 0/1 masks
cut at the model's threshold.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from effiseg.runtime.model_info import INPUT_FORMATS, OUTPUT_FORMATS, parse_tta_sizes
from effiseg.training.tta import tta_logits


class SegmentationGraph(nn.Module):
    def __init__(self, model: nn.Module, mean, std, input_format: str = "uint8-nhwc",
                 output_format: str = "logits", threshold: float = 0.5, tta: bool = False,
                 tta_sizes=(), batch_flips: bool | None = None):
        super().__init__()
        if input_format not in INPUT_FORMATS:
            raise ValueError(f"input format must be one of {INPUT_FORMATS}, not {input_format!r}")
        if output_format not in OUTPUT_FORMATS:
            raise ValueError(f"output format must be one of {OUTPUT_FORMATS}, not {output_format!r}")
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {threshold}")
        self.model = model
        self.input_format = input_format
        self.output_format = output_format
        self.threshold = float(threshold)
        self.tta = bool(tta)
        self.tta_sizes = parse_tta_sizes(tta_sizes)
        # Flips as one batch of 4N (what a GPU and an exported graph want) or one after another
        # (faster on CPUs); None: decided by the input's device. The exporter passes True.
        self.batch_flips = batch_flips
        self.logit_threshold = math.log(threshold / (1.0 - threshold))
        # The network's own dtype (float16 in the torch backend's fast mode); preprocessing runs in
        # float32 either way, like evaluation's normalize_batch (the multi-scale resizes of the
        # normalised input belong to the network and run in its dtype).
        self.compute_dtype = torch.float32
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def _network(self, x: torch.Tensor) -> torch.Tensor:
        """(N, H, W) float32 logits, averaged over flips (``tta``) and ``tta_sizes``
        (training/tta.py, the code evaluation runs)."""
        return tta_logits(self.model, x, self.tta, self.tta_sizes, batch_flips=self.batch_flips)[:, 0]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.input_format == "uint8-nhwc":
            # Cast first, then transpose: TensorRT (8.6 and 10.x) takes uint8 only as a network
            # input or output, so a Transpose of the uint8 bytes would be refused by its ONNX parser
            # (runtime/tensorrt_rules.py). In torch the permute is a view either way: the result is
            # channels_last in memory, which is what the fast torch path wants.
            x = images.float().permute(0, 3, 1, 2)
            x = (x / 255.0 - self.mean) / self.std
        else:
            x = images.float()
        logits = self._network(x.to(self.compute_dtype))
        if self.output_format == "logits":
            return logits
        if self.output_format == "probabilities":
            return torch.sigmoid(logits).to(torch.float16)
        # bool -> float -> uint8: TensorRT 8.6 casts to uint8 only from float or half.
        return (logits > self.logit_threshold).float().to(torch.uint8)
