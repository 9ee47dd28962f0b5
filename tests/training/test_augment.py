"""Augmentation moves image and mask together."""
import pytest
import torch

from effiseg.training.augment import AugmentConfig, augment_batch, paint_overlay_box


def _shape_batch(n=16, h=64, w=64):
    masks = torch.zeros(n, 1, h, w)
    masks[:, :, 8:24, 12:40] = 1.0        # an off-centre rectangle
    masks[:, :, 40:50, 44:54] = 1.0       # and a second region: rotations and flips are visible
    images = torch.rand(n, 3, h, w) * 0.2
    images[:, 1:2] = masks                 # channel 1 draws the same shape as the mask
    return images, masks


def test_geometry_keeps_image_and_mask_aligned():
    torch.manual_seed(0)
    images, masks = _shape_batch()
    cfg = AugmentConfig(color_p=0.0, hflip_p=0.5, vflip_p=0.5, affine_p=1.0, elastic_p=0.5)
    out_i, out_m = augment_batch(images, masks, cfg)
    assert out_i.shape == images.shape and out_m.shape == masks.shape
    drawn = out_i[:, 1:2] > 0.5
    agree = (drawn == (out_m > 0.5)).float().mean(dim=(1, 2, 3))
    assert torch.all(agree > 0.995), agree
    # The batch really was transformed, differently per sample.
    assert not torch.equal(out_m, masks)
    assert len({tuple(m.flatten().nonzero().flatten()[:5].tolist()) for m in out_m}) > 4
    assert set(out_m.unique().tolist()) <= {0.0, 1.0}


def test_flips_are_exact():
    images, masks = _shape_batch(n=8)
    cfg = AugmentConfig.none()
    cfg.hflip_p = 1.0
    out_i, out_m = augment_batch(images, masks, cfg)
    assert torch.equal(out_m, torch.flip(masks, dims=(3,)))
    assert torch.allclose(out_i, torch.flip(images, dims=(3,)), atol=1e-5)
    cfg = AugmentConfig.none()
    cfg.vflip_p = 1.0
    _, out_m = augment_batch(images, masks, cfg)
    assert torch.equal(out_m, torch.flip(masks, dims=(2,)))


def test_colour_jitter_leaves_mask_alone():
    torch.manual_seed(1)
    images, masks = _shape_batch(n=8)
    cfg = AugmentConfig.none()
    cfg.color_p = 1.0
    out_i, out_m = augment_batch(images, masks, cfg)
    assert torch.equal(out_m, masks)
    assert not torch.allclose(out_i, images)
    assert out_i.min() >= 0 and out_i.max() <= 1


def test_no_augmentation_is_identity():
    images, masks = _shape_batch(n=4)
    out_i, out_m = augment_batch(images, masks, AugmentConfig.none())
    assert torch.equal(out_i, images) and torch.equal(out_m, masks)


def test_overlay_box_lower_left_and_mask_cleared():
    images = torch.ones(4, 3, 50, 60)
    masks = torch.ones(4, 1, 50, 60)
    out_i, out_m = paint_overlay_box(images, masks, p=1.0, size=(0.2, 0.3))
    for i in range(4):
        box = out_i[i, 0] == 0
        ys, xs = box.nonzero(as_tuple=True)
        assert xs.min() == 0 and ys.max() == 49            # touches the lower-left corner
        assert 10 <= xs.max() + 1 <= 18 and 10 <= 50 - ys.min() <= 15
        assert torch.equal(out_m[i, 0] == 0, box)


@pytest.mark.gpu
def test_augmentation_never_makes_the_cpu_wait_for_the_gpu():
    """Every step of training augments a batch; a host-to-device copy of a small constant or an error
    check there would stall the CPU until the GPU drains its queue, several times a step. After the
    first call (which makes the per-device constants), a step must not synchronise at all."""
    images = torch.rand(4, 3, 64, 80, device="cuda")
    masks = (torch.rand(4, 1, 64, 80, device="cuda") > 0.5).float()
    cfg = AugmentConfig(color_p=1.0, affine_p=1.0, elastic_p=1.0, overlay_box_p=1.0)
    generator = torch.Generator(device="cuda").manual_seed(0)
    augment_batch(images, masks, cfg, generator=generator)  # warm-up: constants, kernels
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            augment_batch(images, masks, cfg, generator=generator)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
