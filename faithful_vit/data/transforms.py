"""Joint image/mask augmentations of the paper's ``cub_original`` recipe (``ifam_method.md`` section 8), in torch.

Every transform is a callable ``(image, mask) -> (image, mask)``:

- ``image``: float ``[3, H, W]`` in [0, 1] (not yet normalised; datasets normalise after the transform);
- ``mask``: float ``[1, H, W]`` in [0, 1] or None. Geometric transforms move the mask exactly as the image (the same
  sampling grid), photometric ones leave it alone.

Randomness comes from torch's global generator (seeded per DataLoader worker by torch).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

Pair = tuple[torch.Tensor, "torch.Tensor | None"]


def _check_image(image: torch.Tensor) -> None:
    if image.dim() != 3 or image.shape[0] != 3 or not image.is_floating_point():
        raise ValueError(f"image must be a float tensor [3, H, W], got {image.dtype} {tuple(image.shape)}")


def _uniform(low: float, high: float) -> float:
    return low + (high - low) * torch.rand(()).item()


class Compose:
    """Apply joint transforms in order."""

    def __init__(self, transforms: Sequence) -> None:
        self.transforms = list(transforms)

    def __call__(self, image: torch.Tensor, mask: torch.Tensor | None = None) -> Pair:
        for t in self.transforms:
            image, mask = t(image, mask)
        return image, mask

    def __repr__(self) -> str:
        return f"Compose({self.transforms})"


class ResizeShorter:
    """Resize so that the shorter side is ``size`` (bilinear, antialiased; the mask is resized the same way)."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, image: torch.Tensor, mask: torch.Tensor | None = None) -> Pair:
        _check_image(image)
        h, w = image.shape[-2:]
        scale = self.size / min(h, w)
        out = (max(self.size, round(h * scale)), max(self.size, round(w * scale)))
        if out == (h, w):
            return image, mask

        def resize(x):
            return F.interpolate(x[None], size=out, mode="bilinear", antialias=True, align_corners=False)[0]

        return resize(image).clamp_(0, 1), None if mask is None else resize(mask).clamp_(0, 1)


def _crop(image, mask, top: int, left: int, size: int) -> Pair:
    crop = (slice(None), slice(top, top + size), slice(left, left + size))
    return image[crop], None if mask is None else mask[crop]


def _pad_to(image, mask, size: int) -> Pair:
    h, w = image.shape[-2:]
    if h >= size and w >= size:
        return image, mask
    pad = (0, max(0, size - w), 0, max(0, size - h))
    return F.pad(image, pad), None if mask is None else F.pad(mask, pad)


class CenterCrop:
    """Crop the central ``size x size`` square (zero-padding first if the image is smaller)."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, image: torch.Tensor, mask: torch.Tensor | None = None) -> Pair:
        image, mask = _pad_to(image, mask, self.size)
        h, w = image.shape[-2:]
        return _crop(image, mask, (h - self.size) // 2, (w - self.size) // 2, self.size)


class RandomCrop:
    """Crop a random ``size x size`` square (zero-padding first if the image is smaller)."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, image: torch.Tensor, mask: torch.Tensor | None = None) -> Pair:
        image, mask = _pad_to(image, mask, self.size)
        h, w = image.shape[-2:]
        top = int(torch.randint(0, h - self.size + 1, ()))
        left = int(torch.randint(0, w - self.size + 1, ()))
        return _crop(image, mask, top, left, self.size)


class RandomHorizontalFlip:
    """Flip image and mask left-right with probability ``p``."""

    def __init__(self, p: float = 0.5) -> None:
        self.p = p

    def __call__(self, image: torch.Tensor, mask: torch.Tensor | None = None) -> Pair:
        if torch.rand(()).item() >= self.p:
            return image, mask
        return image.flip(-1), None if mask is None else mask.flip(-1)


def blackbody_rgb(kelvin: float) -> tuple[float, float, float]:
    """Approximate sRGB colour (0..1) of a black body at ``kelvin`` (Tanner Helland's fit of Charity's table)."""
    t = kelvin / 100.0
    if t <= 66:
        r = 255.0
        g = 99.4708025861 * math.log(t) - 161.1195681661
        b = 0.0 if t <= 19 else 138.5177312231 * math.log(t - 10) - 305.0447927307
    else:
        r = 329.698727446 * (t - 60) ** -0.1332047592
        g = 288.1221695283 * (t - 60) ** -0.0755148492
        b = 255.0
    return tuple(min(max(c, 0.0), 255.0) / 255.0 for c in (r, g, b))


class PlanckianJitter:
    """With probability ``p``, recolour as if lit by a black body of random temperature (the paper's blackbody jitter).

    The image is multiplied per channel by the illuminant's RGB divided by its green value (green is unchanged, as in
    kornia's ``RandomPlanckianJitter(mode="blackbody")``) and clamped to [0, 1]. The temperature is drawn uniformly
    from ``kelvin_range``. The mask is unchanged.
    """

    def __init__(self, p: float = 0.8, kelvin_range: tuple[float, float] = (3000.0, 15000.0)) -> None:
        if not 1000 <= kelvin_range[0] <= kelvin_range[1] <= 40000:
            raise ValueError(f"kelvin_range must satisfy 1000 <= low <= high <= 40000, got {kelvin_range}")
        self.p = p
        self.kelvin_range = kelvin_range

    def __call__(self, image: torch.Tensor, mask: torch.Tensor | None = None) -> Pair:
        _check_image(image)
        if torch.rand(()).item() >= self.p:
            return image, mask
        r, g, b = blackbody_rgb(_uniform(*self.kelvin_range))
        gain = torch.tensor([r / g, 1.0, b / g], dtype=image.dtype, device=image.device).view(3, 1, 1)
        return (image * gain).clamp_(0, 1), mask


class RandomAffine:
    """Random rotation, translation and scale about the centre, one sampling grid for image and mask.

    Matches torchvision's ``RandomAffine(degrees, translate, scale)`` semantics: angle ~ U(-degrees, degrees),
    shift ~ U(-translate * size) per axis, scale ~ U(scale); uncovered pixels are 0 (black image, background mask).

    Args:
        degrees: maximum absolute rotation in degrees.
        translate: maximum shift as a fraction of width and height.
        scale: range of the zoom factor.
    """

    def __init__(
        self,
        degrees: float = 90.0,
        translate: tuple[float, float] = (0.2, 0.2),
        scale: tuple[float, float] = (0.8, 1.2),
    ) -> None:
        self.degrees, self.translate, self.scale = degrees, translate, scale

    def __call__(self, image: torch.Tensor, mask: torch.Tensor | None = None) -> Pair:
        h, w = image.shape[-2:]
        angle = _uniform(-self.degrees, self.degrees)
        max_dx, max_dy = self.translate[0] * w, self.translate[1] * h
        shift = (_uniform(-max_dx, max_dx), _uniform(-max_dy, max_dy))
        return affine(image, mask, angle=angle, shift=shift, zoom=_uniform(*self.scale))


def affine_matrix(height: int, width: int, angle: float, shift: tuple[float, float], zoom: float) -> torch.Tensor:
    """``[2, 3]`` ``affine_grid`` matrix (output -> input normalised coordinates) of a rotation by ``angle`` degrees
    and a zoom about the image centre followed by a shift of ``shift = (dx, dy)`` pixels."""
    rad = math.radians(angle)
    c, s = math.cos(rad) / zoom, math.sin(rad) / zoom
    # Inverse of (rotate, zoom) in pixel units, conjugated by the pixel -> [-1, 1] scaling.
    half_w, half_h = width / 2, height / 2
    inv = torch.tensor([[c, s], [-s, c]], dtype=torch.float64)
    to_norm = torch.diag(torch.tensor([1 / half_w, 1 / half_h], dtype=torch.float64))
    to_pix = torch.diag(torch.tensor([half_w, half_h], dtype=torch.float64))
    offset = -(to_norm @ inv @ torch.tensor(shift, dtype=torch.float64))
    return torch.cat([to_norm @ inv @ to_pix, offset[:, None]], 1).float()


def affine(
    image: torch.Tensor, mask: torch.Tensor | None, *, angle: float, shift: tuple[float, float], zoom: float
) -> Pair:
    """Warp image ``[3,H,W]`` and mask ``[1,H,W]`` (or None) with one bilinear grid; uncovered pixels become 0.

    Args:
        angle: rotation in degrees about the centre.
        shift: ``(dx, dy)`` in pixels (positive = right, down).
        zoom: scale factor about the centre (> 1 enlarges).
    """
    _check_image(image)
    h, w = image.shape[-2:]
    theta = affine_matrix(h, w, angle, shift, zoom).to(image.device)[None]
    grid = F.affine_grid(theta, [1, 1, h, w], align_corners=False).to(image.dtype)

    def warp(x):
        return F.grid_sample(x[None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0]

    return warp(image).clamp_(0, 1), None if mask is None else warp(mask).clamp_(0, 1)


def cub_original(size: int, train: bool) -> Compose:
    """The paper's ``cub_original`` recipe (CUB, Waterbirds, MetaShift), without the final normalisation.

    Train: resize shorter side to ``size``, hflip 0.5, blackbody jitter p=0.8, RandomAffine(90, (0.2, 0.2),
    (0.8, 1.2)), RandomCrop(size). Eval: resize shorter side to ``size``, CenterCrop(size). (The recipe's
    ``ColorJitter()`` with default arguments is a no-op and is omitted.)
    """
    if train:
        return Compose(
            [ResizeShorter(size), RandomHorizontalFlip(0.5), PlanckianJitter(0.8), RandomAffine(), RandomCrop(size)]
        )
    return Compose([ResizeShorter(size), CenterCrop(size)])


def synthetic_transforms(train: bool) -> Compose | None:
    """Light augmentation for the built-in benchmark: horizontal flip in training, nothing in evaluation.

    The heavy recipe is not used there: rotations and crops would push the small objects off the 64 px canvas and
    the colour jitter would blur the place colours that define the spurious shortcut.
    """
    return Compose([RandomHorizontalFlip(0.5)]) if train else None
