"""Joint image/mask augmentations of the paper's cub_original recipe."""

import pytest
import torch

from faithful_vit.data import transforms as T


def _image_and_mask(h=16, w=16):
    """A random image whose red channel equals its mask (a rectangle), so geometry can be compared."""
    mask = torch.zeros(1, h, w)
    mask[:, 3:9, 4:13] = 1
    image = torch.rand(3, h, w)
    image[0] = mask[0]
    return image, mask


def test_hflip_moves_image_and_mask_together():
    image, mask = _image_and_mask()
    out_image, out_mask = T.RandomHorizontalFlip(p=1.0)(image, mask)
    assert torch.equal(out_image, image.flip(-1)) and torch.equal(out_mask, mask.flip(-1))
    same_image, same_mask = T.RandomHorizontalFlip(p=0.0)(image, mask)
    assert same_image is image and same_mask is mask
    assert T.RandomHorizontalFlip(p=1.0)(image, None)[1] is None


def test_affine_identity_shift_and_rotation_are_exact():
    image, mask = _image_and_mask()
    out_image, out_mask = T.affine(image, mask, angle=0.0, shift=(0.0, 0.0), zoom=1.0)
    torch.testing.assert_close(out_image, image)
    torch.testing.assert_close(out_mask, mask)
    # An integer shift moves content right/down by exactly that many pixels and fills with zeros.
    shifted_image, shifted_mask = T.affine(image, mask, angle=0.0, shift=(3.0, 2.0), zoom=1.0)
    torch.testing.assert_close(shifted_mask[:, 2:, 3:], mask[:, :-2, :-3])
    assert shifted_mask[:, :2].abs().max() == 0 and shifted_image[:, :, :3].abs().max() == 0
    # A quarter turn about the centre of a square image is a pixel permutation.
    rotated_image, rotated_mask = T.affine(image, mask, angle=90.0, shift=(0.0, 0.0), zoom=1.0)
    candidates = [torch.rot90(mask, k, dims=(1, 2)) for k in (1, 3)]
    assert any(torch.allclose(rotated_mask, c, atol=1e-5) for c in candidates)
    assert torch.allclose(rotated_image[0], rotated_mask[0], atol=1e-5)


def test_random_affine_warps_mask_exactly_like_image():
    image, mask = _image_and_mask(24, 20)
    for _ in range(5):
        out_image, out_mask = T.RandomAffine(degrees=90, translate=(0.2, 0.2), scale=(0.8, 1.2))(image, mask)
        assert out_image.shape == image.shape and out_mask.shape == mask.shape
        torch.testing.assert_close(out_image[0], out_mask[0])  # the red channel was a copy of the mask
        assert 0 <= out_mask.min() and out_mask.max() <= 1


def test_zoom_enlarges_about_the_centre():
    mask = torch.zeros(1, 32, 32)
    mask[:, 12:20, 10:22] = 1
    _, zoomed = T.affine(torch.rand(3, 32, 32), mask, angle=0.0, shift=(0.0, 0.0), zoom=2.0)
    assert zoomed.sum().item() == pytest.approx(4 * mask.sum().item(), rel=0.05)
    assert zoomed[0, 16, 16] == 1 and zoomed[0, 9:23, 5:27].mean() > 0.95


def test_planckian_jitter_recolours_but_keeps_green_and_mask():
    image, mask = _image_and_mask()
    image = image * 0.5  # stay below the clamp
    out_image, out_mask = T.PlanckianJitter(p=1.0, kelvin_range=(3000.0, 3000.0))(image, mask)
    assert out_mask is mask
    torch.testing.assert_close(out_image[1], image[1])
    r, g, b = T.blackbody_rgb(3000.0)
    torch.testing.assert_close(out_image[0], (image[0] * r / g).clamp(0, 1))
    torch.testing.assert_close(out_image[2], image[2] * b / g)
    assert r > g > b  # warm light
    white = T.blackbody_rgb(6600.0)
    assert min(white) > 0.9
    r_cold, _, b_cold = T.blackbody_rgb(15000.0)
    assert b_cold > r_cold  # cold light
    assert T.PlanckianJitter(p=0.0)(image, mask)[0] is image
    with pytest.raises(ValueError, match="kelvin_range"):
        T.PlanckianJitter(kelvin_range=(500.0, 2000.0))


def test_resize_and_crops():
    image, mask = torch.rand(3, 30, 40), torch.ones(1, 30, 40)
    resized, resized_mask = T.ResizeShorter(15)(image, mask)
    assert resized.shape == (3, 15, 20) and resized_mask.shape == (1, 15, 20)
    torch.testing.assert_close(resized_mask, torch.ones(1, 15, 20))
    centre, centre_mask = T.CenterCrop(10)(image, mask)
    assert torch.equal(centre, image[:, 10:20, 15:25]) and centre_mask.shape == (1, 10, 10)
    crop, crop_mask = T.RandomCrop(12)(image, None)
    assert crop.shape == (3, 12, 12) and crop_mask is None
    matches = [(t, l) for t in range(19) for l in range(29) if torch.equal(image[:, t : t + 12, l : l + 12], crop)]
    assert len(matches) == 1
    padded, _ = T.RandomCrop(50)(image, mask)
    assert padded.shape == (3, 50, 50)


def test_cub_original_recipe_shapes():
    image = torch.rand(3, 37, 29)
    mask = (torch.rand(1, 37, 29) > 0.5).float()
    for train in (True, False):
        out_image, out_mask = T.cub_original(24, train=train)(image, mask)
        assert out_image.shape == (3, 24, 24) and out_mask.shape == (1, 24, 24)
        assert 0 <= out_image.min() and out_image.max() <= 1 and 0 <= out_mask.min() and out_mask.max() <= 1
    names = [type(t).__name__ for t in T.cub_original(24, train=True).transforms]
    assert names == ["ResizeShorter", "RandomHorizontalFlip", "PlanckianJitter", "RandomAffine", "RandomCrop"]
    assert T.synthetic_transforms(train=False) is None


def test_bad_image_is_rejected():
    with pytest.raises(ValueError, match=r"image must be a float tensor \[3, H, W\]"):
        T.RandomAffine()(torch.zeros(1, 8, 8), None)
