"""Batched data augmentation that runs on the training device (GPU or CPU), image and mask together.

The paper's recipe, per sample: horizontal and vertical flips (p=0.5 each); colour jitter (p=0.5:
brightness 0.6-1.6, contrast +-0.2, saturation +-0.1, hue +-0.01 of the colour circle); affine
(p=0.5: scale 0.5-1.5, translation up to 12.5% of the size, rotation up to 90 degrees); elastic
deformation (p=0.5). Geometric transforms are folded into one sampling grid per batch, so the
image and its mask are resampled with exactly the same coordinates (the mask bilinearly, then
thresholded at 0.5). Written in plain torch rather than kornia to keep the GPU image free of extra
packages; every step is a few tensor operations on the whole batch.

Elastic deformation: the authors used albumentations' ElasticTransform defaults (alpha=1,
sigma=50), whose displacements are far below one pixel. Here it is a smooth random field
(``elastic_grid`` x ``elastic_grid`` control points, bicubic) with displacements up to
``elastic_alpha`` pixels; set elastic_p=0 to turn it off.

Candidate fixes (issue 21): the ``vignette/blur/lowres/noise/wb/gamma/jpeg`` switches imitate
another endoscope (training/augment_device.py) and ``aspect_p`` stretches the content along one
axis (folded into the geometric grid); all off by default.

Candidate fix (issue 5): ``overlay_box_p`` paints a black box in the lower-left corner (where
Kvasir's scope-position overlay sits), before the geometric transforms so that it moves with the
image as the real box does, and clears the mask under it.
"""
from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F

from .augment_device import device_shifts


@dataclass
class AugmentConfig:
    hflip_p: float = 0.5
    vflip_p: float = 0.5
    color_p: float = 0.5
    brightness: tuple[float, float] = (0.6, 1.6)
    contrast: float = 0.2
    saturation: float = 0.1
    hue: float = 0.01
    affine_p: float = 0.5
    scale: tuple[float, float] = (0.5, 1.5)
    translate: float = 0.125
    rotate_deg: float = 90.0
    elastic_p: float = 0.5
    elastic_alpha: float = 8.0
    elastic_grid: int = 5
    overlay_box_p: float = 0.0
    overlay_box_size: tuple[float, float] = (0.18, 0.32)
    # Another scope (issue 21; training/augment_device.py): each off at p=0, strength up to the max.
    vignette_p: float = 0.0
    vignette_max: float = 0.6          # corner brightness falls to 1 - this
    blur_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.5, 2.0)      # Gaussian sigma, pixels at the input size
    lowres_p: float = 0.0
    lowres_factor: tuple[float, float] = (1.5, 4.0)   # downscale factor before upscaling back
    noise_p: float = 0.0
    noise_std: float = 0.06            # noise sd in the highlights, fraction of full scale
    wb_p: float = 0.0
    wb_gain: float = 0.3               # red/blue gains 1 +- this, in opposite directions
    wb_tint: float = 0.08              # green gain 1 +- this
    gamma_p: float = 0.0
    gamma_max: float = 1.8             # gamma log-uniform in [1/this, this]
    jpeg_p: float = 0.0
    jpeg_quality: tuple[float, float] = (10.0, 90.0)
    aspect_p: float = 0.0              # content stretched along x, squeezed along y (or the reverse)
    aspect_max: float = 1.5            # aspect ratio change log-uniform in [1/this, this]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "AugmentConfig":
        d = dict(d)
        for f in fields(cls):  # JSON stores tuples as lists
            if isinstance(f.default, tuple) and f.name in d:
                d[f.name] = tuple(d[f.name])
        return cls(**d)

    @classmethod
    def none(cls) -> "AugmentConfig":
        return cls(hflip_p=0, vflip_p=0, color_p=0, affine_p=0, elastic_p=0, overlay_box_p=0)


# Small constant tensors are made once per device: building one from Python values copies it from
# pageable host memory, and such a copy (like linalg.inv's error check) makes the CPU wait for the
# GPU to finish everything queued, several times a step. Callers must not modify them in place.
@functools.lru_cache(maxsize=32)
def _yiq_matrices(device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    to_yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]],
                          device=device, dtype=dtype)
    return to_yiq, torch.linalg.inv(to_yiq)


@functools.lru_cache(maxsize=32)
def _grid_constants(device: torch.device, h: int, w: int, elastic_alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(half sizes D for the affine map, elastic displacement scale in normalised units)."""
    return (torch.tensor([w / 2, h / 2], device=device),
            torch.tensor([2.0 / w, 2.0 / h], device=device) * elastic_alpha)


def _uniform(n: int, low: float, high: float, device, generator=None) -> torch.Tensor:
    return torch.rand(n, device=device, generator=generator) * (high - low) + low


def _chosen(n: int, p: float, device, generator=None) -> torch.Tensor:
    return torch.rand(n, device=device, generator=generator) < p


def paint_overlay_box(images: torch.Tensor, masks: torch.Tensor, p: float, size: tuple[float, float],
                      generator=None) -> tuple[torch.Tensor, torch.Tensor]:
    b, _, h, w = images.shape
    dev = images.device
    chosen = _chosen(b, p, dev, generator)
    bw = (_uniform(b, *size, dev, generator) * w).long().clamp(min=1)
    bh = (_uniform(b, *size, dev, generator) * h).long().clamp(min=1)
    xs = torch.arange(w, device=dev).view(1, 1, w)
    ys = torch.arange(h, device=dev).view(1, h, 1)
    box = (xs < bw.view(b, 1, 1)) & (ys >= (h - bh).view(b, 1, 1)) & chosen.view(b, 1, 1)
    box = box.unsqueeze(1)
    return images.masked_fill(box, 0.0), masks.masked_fill(box, 0.0)


def color_jitter(images: torch.Tensor, cfg: AugmentConfig, generator=None) -> torch.Tensor:
    b = images.shape[0]
    dev = images.device
    chosen = _chosen(b, cfg.color_p, dev, generator).view(b, 1, 1, 1)
    one = torch.ones(b, device=dev)
    bright = _uniform(b, *cfg.brightness, dev, generator)
    contrast = _uniform(b, 1 - cfg.contrast, 1 + cfg.contrast, dev, generator)
    sat = _uniform(b, 1 - cfg.saturation, 1 + cfg.saturation, dev, generator)
    hue = _uniform(b, -cfg.hue, cfg.hue, dev, generator)
    x = images * bright.view(b, 1, 1, 1)
    gray = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)
    mean = gray.mean(dim=(2, 3), keepdim=True)
    x = (x - mean) * contrast.view(b, 1, 1, 1) + mean
    gray = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)
    x = (x - gray) * sat.view(b, 1, 1, 1) + gray
    # Hue: a rotation of the chroma plane in YIQ space (exact for small shifts, cheap on a batch).
    angle = hue * 2 * math.pi
    cos, sin = torch.cos(angle), torch.sin(angle)
    to_yiq, from_yiq = _yiq_matrices(dev, x.dtype)
    rot = torch.zeros(b, 3, 3, device=dev, dtype=x.dtype)
    rot[:, 0, 0] = one
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = cos, -sin, sin, cos
    mat = from_yiq @ rot @ to_yiq
    x = torch.einsum("bij,bjhw->bihw", mat, x)
    x = x.clamp(0.0, 1.0)
    return torch.where(chosen, x, images)


def geometric_grid(b: int, h: int, w: int, cfg: AugmentConfig, device, generator=None) -> torch.Tensor:
    """One sampling grid (B, H, W, 2) holding flips, affine and elastic for each sample."""
    hflip = _chosen(b, cfg.hflip_p, device, generator)
    vflip = _chosen(b, cfg.vflip_p, device, generator)
    aff = _chosen(b, cfg.affine_p, device, generator)
    scale = torch.where(aff, _uniform(b, *cfg.scale, device, generator), torch.ones(b, device=device))
    angle = torch.where(aff, _uniform(b, -cfg.rotate_deg, cfg.rotate_deg, device, generator),
                        torch.zeros(b, device=device)) * math.pi / 180
    tx = torch.where(aff, _uniform(b, -cfg.translate, cfg.translate, device, generator), torch.zeros(b, device=device))
    ty = torch.where(aff, _uniform(b, -cfg.translate, cfg.translate, device, generator), torch.zeros(b, device=device))
    if cfg.aspect_p > 0:  # drawn only when on: the paper's recipe keeps its random stream
        log_a = _uniform(b, -math.log(cfg.aspect_max), math.log(cfg.aspect_max), device, generator)
        root_a = torch.exp(0.5 * torch.where(_chosen(b, cfg.aspect_p, device, generator), log_a, 0.0))
    # Output pixel p_out = s R p_in + t (pixels from the centre); affine_grid wants the inverse map in
    # normalised coordinates: p_in_n = D^-1 (1/s) R^T (D p_out_n - t), D = diag(W/2, H/2).
    cos, sin = torch.cos(angle), torch.sin(angle)
    inv = torch.stack([torch.stack([cos, sin], -1), torch.stack([-sin, cos], -1)], -2) / scale.view(b, 1, 1)
    if cfg.aspect_p > 0:  # p_out = A s R p_in + t with A = diag(a^1/2, a^-1/2): the inverse gains A^-1 on the right
        inv = inv * torch.stack([1.0 / root_a, root_a], -1).view(b, 1, 2)
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:  # one cache entry per GPU, on that GPU
        device = torch.device("cuda", torch.cuda.current_device())
    d, elastic_scale = _grid_constants(device, h, w, float(cfg.elastic_alpha))
    lin = inv * d.view(1, 1, 2) / d.view(1, 2, 1)
    t_pix = torch.stack([tx * w, ty * h], -1)
    offset = -(inv @ t_pix.unsqueeze(-1)).squeeze(-1) / d
    # Flips act on the output coordinates.
    flip = torch.ones(b, 2, device=device)
    flip[:, 0] = torch.where(hflip, -1.0, 1.0)
    flip[:, 1] = torch.where(vflip, -1.0, 1.0)
    lin = lin * flip.view(b, 1, 2)
    theta = torch.cat([lin, offset.unsqueeze(-1)], dim=-1)
    grid = F.affine_grid(theta, (b, 1, h, w), align_corners=False)
    if cfg.elastic_p > 0 and cfg.elastic_alpha > 0:
        el = _chosen(b, cfg.elastic_p, device, generator).view(b, 1, 1, 1).float()
        g = max(2, int(cfg.elastic_grid))
        coarse = torch.rand(b, 2, g, g, device=device, generator=generator) * 2 - 1
        field = F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
        grid = grid + field * elastic_scale * el
    return grid


def augment_batch(images: torch.Tensor, masks: torch.Tensor, cfg: AugmentConfig,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """images: (B,3,H,W) float in [0,1]; masks: (B,1,H,W) float {0,1}, or (B,C,H,W) with soft
    targets in [0,1] after the label. Returns the same shapes."""
    if cfg.overlay_box_p > 0:
        images, masks = paint_overlay_box(images, masks, cfg.overlay_box_p, cfg.overlay_box_size, generator)
    if cfg.color_p > 0:
        images = color_jitter(images, cfg, generator)
    b, _, h, w = images.shape
    if max(cfg.hflip_p, cfg.vflip_p, cfg.affine_p, cfg.elastic_p, cfg.aspect_p) > 0:
        grid = geometric_grid(b, h, w, cfg, images.device, generator).to(images.dtype)
        images = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        warped = F.grid_sample(masks, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        # Channel 0 is the label (thresholded again); any further channel is a soft target (a
        # teacher's probabilities, losses.py) and stays soft.
        masks = torch.cat([(warped[:, :1] > 0.5).to(images.dtype), warped[:, 1:].to(images.dtype)], dim=1)
    if max(cfg.vignette_p, cfg.blur_p, cfg.lowres_p, cfg.noise_p, cfg.wb_p, cfg.gamma_p, cfg.jpeg_p) > 0:
        images = device_shifts(images, cfg, generator)
    return images, masks
