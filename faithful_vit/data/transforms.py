"""Joint image/mask augmentations of the paper's ``cub_original`` recipe (``docs/method.md``, section 6).

The datasets call a transform as ``(image, mask) -> (image, mask)``:

- ``image``: float ``[3, H, W]`` in [0, 1] (not yet normalised; datasets normalise after the transform);
- ``mask``: float ``[1, H, W]`` in [0, 1] or None.

:class:`ImageMaskTransform` runs one ``torchvision.transforms.v2`` transform on the pair as a ``tv_tensors.Image`` and a
``tv_tensors.Mask``: a geometric transform draws its parameters once and moves the mask exactly as the image (masks
are resampled nearest-neighbour, so a binary mask stays binary), a photometric one leaves the mask alone. Only the
Planckian (black-body) jitter, which torchvision lacks, is ours.

Randomness comes from torch's global generator, which the training engine seeds per sample
(:class:`~faithful_vit.data.loading.SeededSamples`: a function of seed, epoch and index), so augmentations resume
exactly.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

Pair = tuple[torch.Tensor, "torch.Tensor | None"]


def _check_image(image: torch.Tensor) -> None:
    if image.dim() != 3 or image.shape[0] != 3 or not image.is_floating_point():
        raise ValueError(f"image must be a float tensor [3, H, W], got {image.dtype} {tuple(image.shape)}")


class ImageMaskTransform:
    """A ``torchvision.transforms.v2`` transform applied jointly to an image and its mask (or the image alone).

    Args:
        transform: e.g. ``v2.Compose([...])``; it sees a ``tv_tensors.Image`` and a ``tv_tensors.Mask``.
    """

    def __init__(self, transform: v2.Transform) -> None:
        self.transform = transform

    def __call__(self, image: torch.Tensor, mask: torch.Tensor | None = None) -> Pair:
        _check_image(image)
        if mask is None:
            return self.transform(tv_tensors.Image(image)).as_subclass(torch.Tensor), None
        out_image, out_mask = self.transform(tv_tensors.Image(image), tv_tensors.Mask(mask))
        return out_image.as_subclass(torch.Tensor), out_mask.as_subclass(torch.Tensor)

    def __repr__(self) -> str:
        return f"ImageMaskTransform({self.transform})"


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


class PlanckianJitter(v2.Transform):
    """With probability ``p``, recolour as if lit by a black body of random temperature (the paper's blackbody jitter).

    The image is multiplied per channel by the illuminant's RGB divided by its green value (green is unchanged, as in
    kornia's ``RandomPlanckianJitter(mode="blackbody")``) and clamped to [0, 1]. The temperature is drawn uniformly
    from ``kelvin_range``. Masks (and any other ``tv_tensors`` but images) pass through unchanged.
    """

    _transformed_types = (torch.Tensor,)

    def __init__(self, p: float = 0.8, kelvin_range: tuple[float, float] = (3000.0, 15000.0)) -> None:
        super().__init__()
        if not 1000 <= kelvin_range[0] <= kelvin_range[1] <= 40000:
            raise ValueError(f"kelvin_range must satisfy 1000 <= low <= high <= 40000, got {kelvin_range}")
        self.p = p
        self.kelvin_range = kelvin_range

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        if torch.rand(()).item() >= self.p:
            return {"gain": None}
        low, high = self.kelvin_range
        r, g, b = blackbody_rgb(low + (high - low) * torch.rand(()).item())
        return {"gain": (r / g, 1.0, b / g)}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        is_other_tv_tensor = isinstance(inpt, tv_tensors.TVTensor) and not isinstance(inpt, tv_tensors.Image)
        if params["gain"] is None or is_other_tv_tensor:
            return inpt
        _check_image(inpt)
        gain = torch.tensor(params["gain"], dtype=inpt.dtype, device=inpt.device).view(3, 1, 1)
        recoloured = (inpt.as_subclass(torch.Tensor) * gain).clamp_(0, 1)
        return tv_tensors.wrap(recoloured, like=inpt) if isinstance(inpt, tv_tensors.Image) else recoloured


def cub_original(size: int, train: bool) -> ImageMaskTransform:
    """The paper's ``cub_original`` recipe (CUB, Waterbirds, MetaShift), without the final normalisation.

    Train: resize shorter side to ``size``, hflip 0.5, blackbody jitter p=0.8, RandomAffine(90, (0.2, 0.2),
    (0.8, 1.2)), RandomCrop(size) (zero-padding a smaller image). Eval: resize shorter side to ``size``,
    CenterCrop(size). (The recipe's ``ColorJitter()`` with default arguments is a no-op and is omitted.) Images are
    resampled bilinearly, masks nearest-neighbour; uncovered pixels are 0 (black image, background mask).
    """
    resize = v2.Resize(size, interpolation=v2.InterpolationMode.BILINEAR, antialias=True)
    if train:
        steps = [
            resize,
            v2.RandomHorizontalFlip(0.5),
            PlanckianJitter(0.8),
            v2.RandomAffine(
                degrees=90, translate=(0.2, 0.2), scale=(0.8, 1.2), interpolation=v2.InterpolationMode.BILINEAR
            ),
            v2.RandomCrop(size, pad_if_needed=True),
        ]
    else:
        steps = [resize, v2.CenterCrop(size)]
    return ImageMaskTransform(v2.Compose(steps))


SYNTHETIC_AUGMENTATIONS = ("hflip", "dihedral")


class RandomQuarterTurn(v2.Transform):
    """Rotate by ``k`` quarter turns, ``k`` uniform in {0, 1, 2, 3} (one ``torch.randint`` draw): exact, no
    resampling, the same for the image and its mask."""

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        return {"turns": int(torch.randint(4, ()).item())}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if params["turns"] == 0:
            return inpt
        turned = torch.rot90(inpt.as_subclass(torch.Tensor), params["turns"], dims=(-2, -1))
        return tv_tensors.wrap(turned, like=inpt) if isinstance(inpt, tv_tensors.TVTensor) else turned


def synthetic_transforms(train: bool, augmentation: str = "hflip") -> ImageMaskTransform | None:
    """Light augmentation for the built-in benchmarks, nothing in evaluation.

    ``augmentation``: "hflip" (horizontal flip) or "dihedral" (horizontal flip, then a random number of quarter
    turns: the 8 symmetries of the square, all exact). The heavy recipe is not used there: rotations by other angles
    and crops would push the small objects off the 64 px canvas and the colour jitter would blur the place colours
    that define the spurious shortcut.
    """
    if augmentation not in SYNTHETIC_AUGMENTATIONS:
        raise ValueError(f"augmentation: expected one of {SYNTHETIC_AUGMENTATIONS}, got {augmentation!r}")
    if not train:
        return None
    if augmentation == "hflip":
        return ImageMaskTransform(v2.RandomHorizontalFlip(0.5))
    return ImageMaskTransform(v2.Compose([v2.RandomHorizontalFlip(0.5), RandomQuarterTurn()]))
