"""The other-scope augmentations (issue 21): off by default without touching the paper's recipe,
seeded, each changing the batch when on, masks moved only by the geometric switch."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

from effiseg.training.augment import AugmentConfig, augment_batch
from effiseg.training.augment_device import simulate_jpeg

DEVICE_SWITCHES = ["vignette_p", "blur_p", "lowres_p", "noise_p", "wb_p", "gamma_p", "jpeg_p"]


def _batch(n=6, h=48, w=56, texture=False):
    """Smooth colour ramps scaled per sample (with fine stripes for ``texture``: something to blur),
    a round 'polyp' mask: deterministic, no RNG."""
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    images = torch.stack([xx, yy, xx * yy], 0)[None].repeat(n, 1, 1, 1) * torch.linspace(0.5, 1, n).view(n, 1, 1, 1)
    if texture:
        images = 0.8 * images + 0.1 + 0.1 * torch.sin(xx * 60) * torch.cos(yy * 45)
    masks = ((xx - 0.4) ** 2 + (yy - 0.5) ** 2 < 0.06).float()[None, None].repeat(n, 1, 1, 1)
    return images, masks


def test_default_recipe_is_unchanged():
    """The paper's augmentation with seed 123 on a fixed batch gives what it gave before these
    switches existed (figures recorded from the code before issue 21): the new steps are off and
    draw no random numbers."""
    images, masks = _batch()
    cfg = AugmentConfig()
    assert all(getattr(cfg, k) == 0 for k in DEVICE_SWITCHES + ["aspect_p"])
    out_i, out_m = augment_batch(images, masks, cfg, generator=torch.Generator().manual_seed(123))
    assert out_i.double().sum().item() == pytest.approx(12963.019208909514, rel=1e-6)
    assert out_m.sum().item() == 3674.0
    weighted = (out_i.double() * torch.arange(images.shape[-1])).sum().item()
    assert weighted == pytest.approx(387654.3187442133, rel=1e-6)


def _only(**switches) -> AugmentConfig:
    cfg = AugmentConfig.none()
    for k, v in switches.items():
        setattr(cfg, k, v)
    return cfg


@pytest.mark.parametrize("switch", DEVICE_SWITCHES)
def test_each_switch_changes_images_not_masks_and_is_seeded(switch):
    images, masks = _batch(texture=True)
    cfg = _only(**{switch: 1.0})
    runs = [augment_batch(images, masks, cfg, generator=torch.Generator().manual_seed(s)) for s in (7, 7, 8)]
    out_i, out_m = runs[0]
    assert torch.equal(out_m, masks)
    assert (out_i - images).abs().mean() > 1e-3, switch
    assert out_i.min() >= 0 and out_i.max() <= 1
    assert torch.equal(runs[0][0], runs[1][0])            # same seed, same batch
    assert not torch.equal(runs[0][0], runs[2][0])        # another seed, another batch
    # Each sample draws its own strength.
    per_sample = (out_i - images).abs().mean(dim=(1, 2, 3))
    assert per_sample.max() - per_sample.min() > 1e-4, switch


@pytest.mark.parametrize("switch", DEVICE_SWITCHES)
def test_probability_picks_which_samples_change(switch):
    images, masks = _batch(n=16, texture=True)
    out_i, _ = augment_batch(images, masks, _only(**{switch: 0.5}), generator=torch.Generator().manual_seed(2))
    untouched = [torch.equal(a, b) for a, b in zip(out_i, images)]
    assert 0 < sum(untouched) < len(untouched), untouched


def test_aspect_moves_mask_with_image():
    images, masks = _batch(n=8)
    images[:, 1:2] = masks                    # channel 1 draws the mask
    cfg = _only(aspect_p=1.0, aspect_max=1.6)
    out_i, out_m = augment_batch(images, masks, cfg, generator=torch.Generator().manual_seed(3))
    assert not torch.equal(out_m, masks)
    agree = ((out_i[:, 1:2] > 0.5) == (out_m > 0.5)).float().mean(dim=(1, 2, 3))
    assert torch.all(agree > 0.995), agree
    # A stretch, not a zoom: the mask's width and height change in opposite directions somewhere.
    w_ratio = (out_m.amax(dim=2).sum(dim=(1, 2)) / masks.amax(dim=2).sum(dim=(1, 2)))
    h_ratio = (out_m.amax(dim=3).sum(dim=(1, 2)) / masks.amax(dim=3).sum(dim=(1, 2)))
    assert torch.any((w_ratio - 1) * (h_ratio - 1) < -0.01)


def test_simulated_jpeg_matches_a_real_encoder():
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:64, 0:80]
    image = np.stack([128 + 90 * np.sin(xx / 7), 100 + 60 * np.cos(yy / 5), 80 + 40 * np.sin((xx + yy) / 9)], -1)
    image = np.clip(image + rng.normal(0, 10, image.shape), 0, 255).astype(np.uint8)
    for quality in (15, 50):
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="JPEG", quality=quality, subsampling=2)
        real = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB")).astype(np.float64)
        x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
        sim = simulate_jpeg(x, torch.tensor([float(quality)]))[0].permute(1, 2, 0).numpy() * 255
        real_error = np.abs(real - image).mean()
        assert np.abs(sim - image).mean() == pytest.approx(real_error, rel=0.25)
        # Closer to what the encoder made than the encoder's output is to the original.
        assert np.abs(sim - real).mean() < 0.6 * real_error, quality


def test_config_round_trips_through_json_lists():
    cfg = _only(jpeg_p=0.3, jpeg_quality=(20.0, 60.0), blur_sigma=(0.3, 1.0))
    again = AugmentConfig.from_dict({k: list(v) if isinstance(v, tuple) else v for k, v in cfg.to_dict().items()})
    assert again == cfg


def test_settings_reach_the_trainer_config():
    from effiseg.training.trainer import TrainConfig
    tc = TrainConfig()
    tc.apply_overrides(["augment.jpeg_p=0.5", "augment.jpeg_quality=[15,70]", "augment.aspect_p=0.3"])
    assert tc.augment.jpeg_p == 0.5 and tc.augment.jpeg_quality == (15.0, 70.0) and tc.augment.aspect_p == 0.3
    with pytest.raises(ValueError, match="jpeg_quality"):
        tc.apply_overrides(["augment.jpeg_quality=30"])


def test_every_protocol_arm_is_a_valid_training_config_and_the_device_arms_turn_steps_on():
    from effiseg.training.protocol import ARMS, DEFAULT_ARMS
    from effiseg.training.trainer import TrainConfig
    for name, switches in ARMS.items():
        tc = TrainConfig()
        tc.apply_overrides(switches)
        tc.check()
        if name.startswith("device_"):
            assert tc.augment != AugmentConfig(), name
    assert set(DEFAULT_ARMS) <= set(ARMS) and "device_photometric" not in DEFAULT_ARMS


def test_low_resolution_resizes_each_sample_by_its_own_factor_without_reading_them_on_the_host():
    """The graph-capturable form (every quantised factor applied to the batch, each sample keeps its
    own) equals resizing each sample alone by the factor drawn for it."""
    import torch.nn.functional as F

    from effiseg.training.augment_device import _chosen, _uniform, low_resolution
    images = torch.rand(6, 3, 40, 36, generator=torch.Generator().manual_seed(3))
    out = low_resolution(images, 0.7, (1.0, 4.0), torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)  # the same draws, in the same order
    chosen = _chosen(6, 0.7, "cpu", g)
    factor = torch.where(chosen, torch.round(_uniform(6, 1.0, 4.0, "cpu", g) * 4) / 4, 1.0)
    assert len(set(factor.tolist())) > 2  # several factors in one batch, and some samples untouched
    for image, f, got in zip(images, factor.tolist(), out):
        expected = image
        if f != 1.0:
            small = F.interpolate(image[None], size=(round(40 / f), round(36 / f)), mode="area")
            expected = F.interpolate(small, size=(40, 36), mode="bilinear", align_corners=False)[0]
        assert torch.equal(got, expected)
