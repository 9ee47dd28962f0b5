"""Batched augmentations that imitate another endoscope (issue 21), on the training device, plain torch.

The robustness study (training/analysis/shifts.py) measures how the model's Dice falls when the
frames come from a different scope: colour temperature, tone curve, blur, sensor noise, codec,
resolution, vignetting. These are the same shifts as training-time augmentations, each switched on
by its ``augment.<name>_p`` probability (all 0 by default: the paper's recipe is unchanged and
draws no extra random numbers). They run after the geometric transforms, in the order a camera
applies them: optics (vignetting, blur), sensor (resolution, noise), processor (white balance,
gamma), recorder (JPEG). Each sample draws its own strength, uniformly up to the configured maximum.

JPEG is simulated, not encoded: YCbCr, 4:2:0 chroma, 8 x 8 block DCT, the standard quantisation
tables scaled by the IJG quality rule, rounding, and back. That is what a JPEG encoder does to the
pixels (its entropy coding is lossless), so the blocking and ringing match a real encoder's closely
(tests/training/test_augment_device.py compares it with Pillow's), and it runs batched on the GPU.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

# ITU-T T.81 Annex K tables (luminance, chrominance).
_LUMA_Q = [16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40, 57, 69, 56,
           14, 17, 22, 29, 51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
           49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99]
_CHROMA_Q = [17, 18, 24, 47, 99, 99, 99, 99, 18, 21, 26, 66, 99, 99, 99, 99, 24, 26, 56, 99, 99, 99, 99, 99,
             47, 66, 99, 99, 99, 99, 99, 99] + [99] * 32
_TO_YCBCR = [[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]]


@functools.lru_cache(maxsize=8)
def _jpeg_constants(device: torch.device) -> tuple[torch.Tensor, ...]:
    """(DCT matrix, luma table, chroma table, RGB->YCbCr, YCbCr->RGB), made once per device."""
    k = torch.arange(8, dtype=torch.float32)
    dct = torch.cos((2 * k[None, :] + 1) * k[:, None] * math.pi / 16) * math.sqrt(2 / 8)
    dct[0] /= math.sqrt(2)
    to_ycc = torch.tensor(_TO_YCBCR)
    return tuple(t.to(device) for t in (dct, torch.tensor(_LUMA_Q, dtype=torch.float32).view(8, 8),
                                        torch.tensor(_CHROMA_Q, dtype=torch.float32).view(8, 8),
                                        to_ycc, torch.linalg.inv(to_ycc)))


def _quality_tables(table: torch.Tensor, quality: torch.Tensor) -> torch.Tensor:
    """(B, 8, 8) quantisation tables for per-sample IJG qualities 1..100."""
    q = quality.clamp(1, 100)
    scale = torch.where(q < 50, 5000.0 / q, 200.0 - 2.0 * q)
    return torch.floor((table[None] * scale.view(-1, 1, 1) + 50) / 100).clamp(1, 255)


def _blocks_roundtrip(plane: torch.Tensor, tables: torch.Tensor, dct: torch.Tensor) -> torch.Tensor:
    """(B, H, W) plane (H, W multiples of 8, values centred on 0) -> DCT, quantise, inverse DCT."""
    b, h, w = plane.shape
    blocks = plane.view(b, h // 8, 8, w // 8, 8).permute(0, 1, 3, 2, 4)
    coef = dct @ blocks @ dct.T
    t = tables.view(b, 1, 1, 8, 8)
    back = dct.T @ (torch.round(coef / t) * t) @ dct
    return back.permute(0, 1, 3, 2, 4).reshape(b, h, w)


def simulate_jpeg(images: torch.Tensor, quality: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] as a 4:2:0 JPEG at per-sample ``quality`` (B,) would decode them."""
    b, _, h, w = images.shape
    dct, luma_q, chroma_q, to_ycc, to_rgb = _jpeg_constants(images.device)
    ph, pw = (-h) % 16, (-w) % 16           # whole 2 x 2 chroma blocks of 8 x 8
    x = F.pad(images.float() * 255.0, (0, pw, 0, ph), mode="replicate")
    ycc = torch.einsum("ij,bjhw->bihw", to_ycc, x)
    y = _blocks_roundtrip(ycc[:, 0] - 128.0, _quality_tables(luma_q, quality), dct) + 128.0
    chroma = F.avg_pool2d(ycc[:, 1:], 2)
    c_tables = _quality_tables(chroma_q, quality)
    chroma = torch.stack([_blocks_roundtrip(chroma[:, i], c_tables, dct) for i in range(2)], dim=1)
    chroma = F.interpolate(chroma, scale_factor=2, mode="nearest")
    rgb = torch.einsum("ij,bjhw->bihw", to_rgb, torch.cat([y[:, None], chroma], dim=1))
    return (torch.round(rgb.clamp(0, 255)) / 255.0)[:, :, :h, :w].to(images.dtype)


def _uniform(n, low, high, device, generator):
    return torch.rand(n, device=device, generator=generator) * (high - low) + low


def _chosen(n, p, device, generator):
    return torch.rand(n, device=device, generator=generator) < p


def _per_sample(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return v.view(-1, *([1] * (x.dim() - 1))).to(x.dtype)


def vignette(images, p, max_falloff, generator=None):
    b, _, h, w = images.shape
    dev = images.device
    falloff = torch.where(_chosen(b, p, dev, generator), _uniform(b, 0, max_falloff, dev, generator), 0.0)
    yy = (torch.arange(h, device=dev) - (h - 1) / 2) / (h / 2)
    xx = (torch.arange(w, device=dev) - (w - 1) / 2) / (w / 2)
    r2 = (yy.view(h, 1) ** 2 + xx.view(1, w) ** 2) / 2.0      # 1 at the corners
    return images * (1.0 - _per_sample(images, falloff) * r2.to(images.dtype))


def gaussian_blur(images, p, sigma_range, generator=None):
    """Per-sample Gaussian blur (sigma in pixels), separable, all samples in one grouped convolution."""
    b, c, h, w = images.shape
    dev = images.device
    chosen = _chosen(b, p, dev, generator)
    sigma = _uniform(b, *sigma_range, dev, generator)
    radius = max(1, math.ceil(3 * sigma_range[1]))
    taps = torch.arange(-radius, radius + 1, device=dev, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (taps[None] / sigma.clamp(min=1e-3)[:, None]) ** 2)
    identity = (taps == 0).float().expand(b, -1)
    kernel = torch.where(chosen[:, None], kernel / kernel.sum(1, keepdim=True), identity)
    k = kernel.repeat_interleave(c, 0).to(images.dtype)         # (B*C, K)
    x = F.pad(images.reshape(1, b * c, h, w), (radius, radius, radius, radius), mode="reflect")
    x = F.conv2d(x, k.view(b * c, 1, 1, -1), groups=b * c)
    x = F.conv2d(x, k.view(b * c, 1, -1, 1), groups=b * c)
    return x.view(b, c, h, w)


def low_resolution(images, p, factor_range, generator=None):
    """Area-downscale by a per-sample factor (quantised to 0.25), then upscale bilinearly to the
    original size. Every factor the quantised range can give is applied to the whole batch and each
    sample keeps its own: no host synchronisation, so the step can be captured as a CUDA graph (the
    factors in use would otherwise be read on the host), with the result of resizing each sample."""
    b, _, h, w = images.shape
    dev = images.device
    chosen = _chosen(b, p, dev, generator)
    factor = torch.round(_uniform(b, *factor_range, dev, generator) * 4) / 4
    factor = torch.where(chosen, factor, 1.0)
    out = images
    for quarter in range(round(factor_range[0] * 4), round(factor_range[1] * 4) + 1):
        f = quarter / 4
        if f == 1.0:
            continue
        small = F.interpolate(images, size=(max(1, round(h / f)), max(1, round(w / f))), mode="area")
        resized = F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)
        out = torch.where((factor == f).view(-1, 1, 1, 1), resized, out)
    return out


def sensor_noise(images, p, max_std, generator=None):
    """Gaussian noise with standard deviation s * sqrt(0.1 + 0.9 x): read noise plus shot noise."""
    b = images.shape[0]
    dev = images.device
    std = torch.where(_chosen(b, p, dev, generator), _uniform(b, 0, max_std, dev, generator), 0.0)
    noise = torch.randn(images.shape, device=dev, generator=generator, dtype=images.dtype)
    return images + noise * _per_sample(images, std) * torch.sqrt(0.1 + 0.9 * images.clamp(0, 1))


def white_balance(images, p, max_gain, max_tint, generator=None):
    """Red and blue gains in opposite directions (warmer or cooler light) and a green tint."""
    b = images.shape[0]
    dev = images.device
    chosen = _chosen(b, p, dev, generator)
    warm = torch.where(chosen, _uniform(b, -max_gain, max_gain, dev, generator), 0.0)
    tint = torch.where(chosen, _uniform(b, -max_tint, max_tint, dev, generator), 0.0)
    gains = torch.stack([1 + warm, 1 + tint, 1 - warm], dim=1).view(b, 3, 1, 1).to(images.dtype)
    return images * gains


def gamma_curve(images, p, max_gamma, generator=None):
    """out = in ** g, g log-uniform in [1/max_gamma, max_gamma]."""
    b = images.shape[0]
    dev = images.device
    log_g = _uniform(b, -math.log(max_gamma), math.log(max_gamma), dev, generator)
    g = torch.exp(torch.where(_chosen(b, p, dev, generator), log_g, 0.0))
    return images.clamp(0, 1) ** _per_sample(images, g)


def jpeg(images, p, quality_range, generator=None):
    b = images.shape[0]
    dev = images.device
    chosen = _chosen(b, p, dev, generator)
    quality = torch.round(_uniform(b, *quality_range, dev, generator))
    return torch.where(_per_sample(images, chosen).bool(), simulate_jpeg(images.clamp(0, 1), quality), images)


def device_shifts(images: torch.Tensor, cfg, generator: torch.Generator | None = None) -> torch.Tensor:
    """The camera chain of ``cfg`` (an AugmentConfig) on (B, 3, H, W) images in [0, 1]; steps
    whose probability is 0 are skipped and draw nothing."""
    if cfg.vignette_p > 0:
        images = vignette(images, cfg.vignette_p, cfg.vignette_max, generator)
    if cfg.blur_p > 0:
        images = gaussian_blur(images, cfg.blur_p, cfg.blur_sigma, generator)
    if cfg.lowres_p > 0:
        images = low_resolution(images, cfg.lowres_p, cfg.lowres_factor, generator)
    if cfg.noise_p > 0:
        images = sensor_noise(images, cfg.noise_p, cfg.noise_std, generator)
    if cfg.wb_p > 0:
        images = white_balance(images, cfg.wb_p, cfg.wb_gain, cfg.wb_tint, generator)
    if cfg.gamma_p > 0:
        images = gamma_curve(images, cfg.gamma_p, cfg.gamma_max, generator)
    if cfg.jpeg_p > 0:
        images = jpeg(images, cfg.jpeg_p, cfg.jpeg_quality, generator)
    return images.clamp(0, 1)
