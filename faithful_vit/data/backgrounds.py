"""Background variants of a generated split (Xiao et al.'s "backgrounds challenge"), composed from ground-truth masks.

From every image A of a split with ground-truth masks and places (SpuriousShapes, WaterbirdsLite) and a partner
image B drawn with a fixed seed, :func:`background_variants` composes, as uint8 arrays:

* ``original``: A;
* ``only_bg``: A with its object removed (:func:`remove_objects`);
* ``only_fg``: A's object on black;
* ``mixed_same``: A's object, with its surround, on the object-free background of an image B of A's place;
* ``mixed_rand``: the same on the background of an image B of a random place;
* ``mixed_next``: the same on the background of an image B of the other place.

An object is removed by filling its pixels, and those within ``surround`` pixels of it, with the median colour of
the ring just outside, plus pixel noise of the ring's spread (on SpuriousShapes the ring is the neutral grey band
around every object, so the object becomes one of the neutral blotches the benchmark already has). The object of a
mixed image keeps that surround (its own neutral band), so only the place behind it changes.
``BG-GAP = acc(mixed_same) - acc(mixed_rand)``: how much a model gains from a background that agrees with the
object's place.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from faithful_vit.data.sample import Sample, normalize

__all__ = ["VARIANTS", "VariantDataset", "background_variants", "dilate", "remove_objects"]

VARIANTS = ("original", "only_bg", "only_fg", "mixed_same", "mixed_rand", "mixed_next")
RING_WIDTH = 2


def dilate(masks: np.ndarray, radius: int) -> np.ndarray:
    """``[N, S, S]`` bool masks grown by every pixel within Euclidean distance ``radius`` (a disk)."""
    if radius <= 0:
        return masks.astype(bool)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    disk = (offsets[:, None] ** 2 + offsets[None, :] ** 2 <= radius**2).float()[None, None]
    grown = F.conv2d(torch.from_numpy(masks.astype(np.float32))[:, None], disk, padding=radius)
    return grown[:, 0].numpy() > 0.5


def remove_objects(images: np.ndarray, fg_masks: np.ndarray, surround: int, rng: np.random.Generator) -> np.ndarray:
    """``images`` ``[N, S, S, 3]`` uint8 with each object and its ``surround`` filled with the colour of the ring
    around them: its median plus Gaussian pixel noise of its standard deviation (per channel)."""
    region = dilate(fg_masks, surround)
    ring = dilate(fg_masks, surround + RING_WIDTH) & ~region
    removed = images.copy()
    for i in range(len(images)):
        around = images[i][ring[i]] if ring[i].any() else images[i].reshape(-1, 3)
        median, spread = np.median(around, axis=0), around.std(axis=0)
        fill = median + rng.normal(0.0, 1.0, (int(region[i].sum()), 3)) * spread
        removed[i][region[i]] = np.clip(np.round(fill), 0, 255).astype(np.uint8)
    return removed


def partners(places: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """For each image, the index of a partner image of the same place, of a random place, of the other place."""
    n, indices = len(places), np.arange(len(places))
    chosen = {"mixed_rand": rng.integers(0, n, n)}
    for variant, same in (("mixed_same", True), ("mixed_next", False)):
        picks = np.empty(n, dtype=np.int64)
        for i in range(n):
            pool = indices[(places == places[i]) == same]
            if variant == "mixed_same" and len(pool) > 1:
                pool = pool[pool != i]
            if not len(pool):
                raise ValueError(f"{variant}: no image of the {'same' if same else 'other'} place as image {i}")
            picks[i] = rng.choice(pool)
        chosen[variant] = picks
    return chosen


def background_variants(arrays: dict[str, np.ndarray], *, surround: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Every variant of :data:`VARIANTS` of a split, ``{variant: [N, S, S, 3] uint8}``.

    Args:
        arrays: ``images`` ``[N, S, S, 3]`` uint8, ``fg_masks`` ``[N, S, S]``, ``places`` ``[N]`` (a generated split).
        surround: pixels around an object that belong to it (its neutral band), removed with it and kept with it.
        seed: seed of the fill noise and of the partner draw.

    Returns:
        The variants, and ``partners``: ``{mixed variant: [N] partner indices}`` under the key ``"partners"``.
    """
    images, fg = arrays["images"], arrays["fg_masks"].astype(bool)
    rng = np.random.default_rng(seed)
    backgrounds = remove_objects(images, fg, surround, rng)
    region = dilate(fg, surround)[..., None]
    chosen = partners(np.asarray(arrays["places"]), rng)
    variants = {
        "original": images,
        "only_bg": backgrounds,
        "only_fg": np.where(fg[..., None], images, 0).astype(np.uint8),
    }
    for variant, picks in chosen.items():
        variants[variant] = np.where(region, images, backgrounds[picks]).astype(np.uint8)
    return {**{v: variants[v] for v in VARIANTS}, "partners": chosen}


class VariantDataset(torch.utils.data.Dataset):
    """Images of one variant served as :class:`Sample`, with the labels, groups and masks of the originals.

    The ground-truth mask stays the original object's (for ``only_bg``: where the object was).
    """

    def __init__(self, images: np.ndarray, like) -> None:
        self.images, self.like = images, like
        self.num_classes, self.group_names = like.num_classes, like.group_names

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Sample:
        original = self.like[index]
        image = torch.from_numpy(self.images[index]).permute(2, 0, 1).float().div_(255)
        return Sample(normalize(image), original.label, original.group, original.fg_mask)
