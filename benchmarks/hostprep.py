"""Host-side input preparation, timed as part of the "with host preprocessing" figures.

For a ``uint8-nhwc`` model the host's work is a copy of decoded RGB bytes into the backend's
buffer; for a ``float32-nchw`` model it is the normalisation ``(x/255 - mean)/std`` and the
HWC->CHW transpose in numpy. Both are the runtime's own code (``effiseg.runtime.postprocess.
fill_host_row``) writing into the backend's own host buffer, as the pipeline does.
"""
from __future__ import annotations

import numpy as np


def synthetic_images(n: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """Deterministic uint8 RGB images (n, H, W, 3): smooth gradients plus noise, so that
    compression and value ranges look like photographs rather than a constant."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    images = np.empty((n, height, width, 3), np.uint8)
    for i in range(n):
        phase = rng.uniform(0, 2 * np.pi, size=3)
        base = 127 + 100 * np.sin(xx[..., None] / (9 + i % 7) + yy[..., None] / 13 + phase)
        noise = rng.normal(0, 12, size=(height, width, 3))
        images[i] = np.clip(base + noise, 0, 255).astype(np.uint8)
    return images


def fill_host_input(buffer: np.ndarray, images: np.ndarray, info) -> None:
    """Prepare ``images`` (n, H, W, 3) uint8 in ``buffer`` row by row with the runtime's own
    ``fill_host_row`` (what the pipeline's decoder threads do), for ``info``'s input format."""
    from effiseg.runtime.postprocess import fill_host_row
    for i, image in enumerate(images):
        fill_host_row(buffer[i], image, info)
