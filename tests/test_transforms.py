"""Joint image/mask augmentations of the paper's cub_original recipe, on torchvision.transforms.v2."""

import pytest
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from faithful_vit.data import transforms as T


def _image_and_mask(h=16, w=16):
    """A random image whose red channel equals its mask (a rectangle), so geometry can be compared."""
    mask = torch.zeros(1, h, w)
    mask[:, 3:9, 4:13] = 1
    image = torch.rand(3, h, w)
    image[0] = mask[0]
    return image, mask


def _joint(transform):
    return T.ImageMaskTransform(transform)


def test_hflip_moves_image_and_mask_together():
    image, mask = _image_and_mask()
    out_image, out_mask = _joint(v2.RandomHorizontalFlip(p=1.0))(image, mask)
    assert torch.equal(out_image, image.flip(-1)) and torch.equal(out_mask, mask.flip(-1))
    assert type(out_image) is torch.Tensor and type(out_mask) is torch.Tensor  # no tv_tensors leak to the datasets
    same_image, same_mask = _joint(v2.RandomHorizontalFlip(p=0.0))(image, mask)
    assert torch.equal(same_image, image) and same_image.data_ptr() == image.data_ptr()  # untouched, not copied
    assert torch.equal(same_mask, mask) and same_mask.data_ptr() == mask.data_ptr()
    assert _joint(v2.RandomHorizontalFlip(p=1.0))(image, None)[1] is None


def test_synthetic_flip_draws_as_before():
    """The built-in benchmark's flip: flipped iff one draw of torch.rand is below 0.5, and exactly one draw."""
    image, mask = _image_and_mask()
    flip = T.synthetic_transforms(train=True)
    flips = []
    for seed in range(16):
        torch.manual_seed(seed)
        flipped = bool(torch.rand(()) < 0.5)
        after_one_draw = torch.rand(())
        torch.manual_seed(seed)
        out_image, out_mask = flip(image, mask)
        assert torch.equal(torch.rand(()), after_one_draw)
        expected = (image.flip(-1), mask.flip(-1)) if flipped else (image, mask)
        assert torch.equal(out_image, expected[0]) and torch.equal(out_mask, expected[1])
        flips.append(flipped)
    assert any(flips) and not all(flips)
    assert T.synthetic_transforms(train=False) is None


def test_synthetic_dihedral_draws_the_eight_symmetries_of_the_square_exactly():
    image, mask = _image_and_mask()
    dihedral = T.synthetic_transforms(train=True, augmentation="dihedral")
    candidates = {
        (flip, turns): (
            torch.rot90(image.flip(-1) if flip else image, turns, dims=(-2, -1)),
            torch.rot90(mask.flip(-1) if flip else mask, turns, dims=(-2, -1)),
        )
        for flip in (False, True)
        for turns in range(4)
    }
    seen = set()
    for seed in range(64):
        torch.manual_seed(seed)
        out_image, out_mask = dihedral(image, mask)
        match = [key for key, (im, ma) in candidates.items() if torch.equal(out_image, im)]
        assert len(match) == 1, seed
        assert torch.equal(out_mask, candidates[match[0]][1])  # the mask moves with the image
        seen.add(match[0])
    assert len(seen) == 8
    assert T.synthetic_transforms(train=False, augmentation="dihedral") is None
    with pytest.raises(ValueError, match="augmentation: expected one of"):
        T.synthetic_transforms(train=True, augmentation="rot45")


def test_affine_identity_shift_and_rotation_are_exact():
    image, mask = _image_and_mask()
    out_image, out_mask = _joint(v2.RandomAffine(degrees=0))(image, mask)
    torch.testing.assert_close(out_image, image)
    torch.testing.assert_close(out_mask, mask)
    # A translation moves content by a whole number of pixels, exactly, and fills with zeros.
    shifts = set()
    for _ in range(8):
        shifted_image, shifted_mask = _joint(v2.RandomAffine(degrees=0, translate=(0.2, 0.2)))(image, mask)
        matches = []
        for dx in range(-3, 4):
            for dy in range(-3, 4):
                moved = torch.zeros_like(mask)
                moved[:, max(dy, 0) : 16 + min(dy, 0), max(dx, 0) : 16 + min(dx, 0)] = mask[
                    :, max(-dy, 0) : 16 + min(-dy, 0), max(-dx, 0) : 16 + min(-dx, 0)
                ]
                if torch.equal(shifted_mask, moved) and torch.equal(shifted_image[:1], moved):
                    matches.append((dx, dy))
        assert len(matches) == 1
        shifts.add(matches[0])
    assert len(shifts) > 1
    # A quarter turn about the centre of a square image is a pixel permutation.
    rotated_image, rotated_mask = _joint(v2.RandomAffine(degrees=(90, 90)))(image, mask)
    candidates = [torch.rot90(mask, k, dims=(1, 2)) for k in (1, 3)]
    assert any(torch.allclose(rotated_mask, c, atol=1e-5) for c in candidates)
    assert torch.allclose(rotated_image[0], rotated_mask[0], atol=1e-5)


def test_random_affine_warps_mask_exactly_like_image():
    image, mask = _image_and_mask(24, 20)
    nearest = v2.RandomAffine(degrees=90, translate=(0.2, 0.2), scale=(0.8, 1.2))  # torchvision's default: nearest
    recipe = T.cub_original(20, train=True).transform.transforms[3]
    assert isinstance(recipe, v2.RandomAffine) and recipe.interpolation == v2.InterpolationMode.BILINEAR
    for _ in range(5):
        out_image, out_mask = _joint(nearest)(image, mask)
        assert out_image.shape == image.shape and out_mask.shape == mask.shape
        torch.testing.assert_close(out_image[0], out_mask[0])  # the red channel was a copy of the mask
        out_image, out_mask = _joint(recipe)(image, mask)
        assert 0 <= out_image.min() and out_image.max() <= 1
        assert set(out_mask.unique().tolist()) <= {0.0, 1.0}  # a binary mask stays binary
        assert (out_mask[0] - out_image[0]).abs().mean() < 0.1  # and sits where the image's copy went


def test_zoom_enlarges_about_the_centre():
    mask = torch.zeros(1, 32, 32)
    mask[:, 12:20, 10:22] = 1
    _, zoomed = _joint(v2.RandomAffine(degrees=0, scale=(2.0, 2.0)))(torch.rand(3, 32, 32), mask)
    assert zoomed.sum().item() == pytest.approx(4 * mask.sum().item(), rel=0.05)
    assert zoomed[0, 16, 16] == 1 and zoomed[0, 9:23, 5:27].mean() > 0.95


def test_planckian_jitter_recolours_but_keeps_green_and_mask():
    image, mask = _image_and_mask()
    image = image * 0.5  # stay below the clamp
    jitter = T.PlanckianJitter(p=1.0, kelvin_range=(3000.0, 3000.0))
    tv_mask = tv_tensors.Mask(mask)
    out_image, out_mask = jitter(tv_tensors.Image(image), tv_mask)
    assert out_mask is tv_mask and isinstance(out_image, tv_tensors.Image)
    torch.testing.assert_close(out_image[1], image[1])
    r, g, b = T.blackbody_rgb(3000.0)
    torch.testing.assert_close(out_image[0].as_subclass(torch.Tensor), (image[0] * r / g).clamp(0, 1))
    torch.testing.assert_close(out_image[2].as_subclass(torch.Tensor), image[2] * b / g)
    joint_image, joint_mask = _joint(jitter)(image, mask)
    torch.testing.assert_close(joint_image, out_image.as_subclass(torch.Tensor))
    assert torch.equal(joint_mask, mask)
    assert r > g > b  # warm light
    white = T.blackbody_rgb(6600.0)
    assert min(white) > 0.9
    r_cold, _, b_cold = T.blackbody_rgb(15000.0)
    assert b_cold > r_cold  # cold light
    plain = tv_tensors.Image(image)
    assert T.PlanckianJitter(p=0.0)(plain, tv_mask)[0] is plain
    with pytest.raises(ValueError, match="kelvin_range"):
        T.PlanckianJitter(kelvin_range=(500.0, 2000.0))


def test_resize_and_crops():
    image, mask = torch.rand(3, 30, 40), torch.ones(1, 30, 40)
    resized, resized_mask = _joint(v2.Resize(15))(image, mask)
    assert resized.shape == (3, 15, 20) and resized_mask.shape == (1, 15, 20)
    torch.testing.assert_close(resized_mask, torch.ones(1, 15, 20))
    centre, centre_mask = _joint(v2.CenterCrop(10))(image, mask)
    assert torch.equal(centre, image[:, 10:20, 15:25]) and centre_mask.shape == (1, 10, 10)
    crop, crop_mask = _joint(v2.RandomCrop(12))(image, None)
    assert crop.shape == (3, 12, 12) and crop_mask is None
    matches = [(t, l) for t in range(19) for l in range(29) if torch.equal(image[:, t : t + 12, l : l + 12], crop)]
    assert len(matches) == 1
    padded, padded_mask = _joint(v2.RandomCrop(50, pad_if_needed=True))(image, mask)
    assert padded.shape == (3, 50, 50) and padded_mask.sum() == mask.sum()  # zero padding: background


def test_cub_original_recipe_shapes_and_reproducibility():
    image = torch.rand(3, 37, 29)
    mask = (torch.rand(1, 37, 29) > 0.5).float()
    for train in (True, False):
        out_image, out_mask = T.cub_original(24, train=train)(image, mask)
        assert out_image.shape == (3, 24, 24) and out_mask.shape == (1, 24, 24)
        assert 0 <= out_image.min() and out_image.max() <= 1 and 0 <= out_mask.min() and out_mask.max() <= 1
    names = [type(t).__name__ for t in T.cub_original(24, train=True).transform.transforms]
    assert names == ["Resize", "RandomHorizontalFlip", "PlanckianJitter", "RandomAffine", "RandomCrop"]
    # Each sample's augmentation is a function of the torch seed (what SeededSamples sets per sample).
    recipe = T.cub_original(24, train=True)
    outputs = []
    for seed in (5, 5, 6):
        torch.manual_seed(seed)
        outputs.append(recipe(image, mask))
    assert torch.equal(outputs[0][0], outputs[1][0]) and torch.equal(outputs[0][1], outputs[1][1])
    assert not torch.equal(outputs[0][0], outputs[2][0])


def test_bad_image_is_rejected():
    with pytest.raises(ValueError, match=r"image must be a float tensor \[3, H, W\]"):
        T.cub_original(8, train=True)(torch.zeros(1, 8, 8), None)
