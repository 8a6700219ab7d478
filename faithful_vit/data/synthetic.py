"""SpuriousShapes: a built-in Waterbirds-like benchmark generated with numpy at first use and cached as ``.npz``.

Two object classes that differ only in shape (y=0 ellipse, y=1 cross; one warm colour palette for both) are pasted
on two background families (place 0 "land": green/brown blotches, place 1 "water": blue horizontal waves). As in
Waterbirds, the place matches the label in 95% of training images and in 50% of validation and test images
(each of the four groups ``(y, place)`` is exactly a quarter of val/test), so a full-image model learns the
background shortcut and fails on the minority groups.

Clear margin (why the benchmark is built this way): at 64 px with 8 px patches an object is only ~3-4 patches across and
most of its patches straddle the boundary. Without a margin a from-scratch ViT finds the few water/grass pixels inside
those boundary patches, so even a perfect patch mask barely beats the baseline. Here the place texture fades into a
place-independent neutral grey within ``clear_margin`` pixels of the object (a soft shadow), so every patch that touches
the object carries no place cue, and a patch mask that keeps only object patches removes the shortcut. The same neutral
grey also appears as blotches far from the object, so it reads as "background" rather than as part of the object.
``clear_margin=0`` gives the hard variant, where the boundary patches leak the place. ``place_visibility`` (per pixel,
0..1: how much of the place texture shows) lets a benchmark report the place-cue fraction inside kept patches next to
the mask IoU (:func:`faithful_vit.data.mask_stats.patch_mask_stats`).

``benchmarks/results/README.md`` has the measured worst-group accuracies of a full-image ViT and of the same ViT
restricted to ground-truth patch masks (``benchmarks/oracle_ceilings.py``), with and without the margin.

Defaults: 64 px images for a 8 px patch grid (8x8 tokens), objects 22-34 px across; 3,000 / 800 / 2,000 images,
generated once.

Cache: ``$FAITHFUL_VIT_DATA`` or ``~/.cache/faithful_vit``, one file per configuration (a hash of the config).
"""

from __future__ import annotations

import colorsys
import dataclasses
import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from faithful_vit.data.registry import register_dataset
from faithful_vit.data.sample import Batch, Sample, normalize
from faithful_vit.data.transforms import SYNTHETIC_AUGMENTATIONS, synthetic_transforms

SPLITS = ("train", "val", "test")
CLASS_NAMES = ("ellipse", "cross")
PLACE_NAMES = ("land", "water")
# Bump when the generator's output changes, so stale caches are never read.
GENERATOR_VERSION = 1


def default_cache_dir() -> Path:
    """``$FAITHFUL_VIT_DATA`` if set, else ``~/.cache/faithful_vit``."""
    env = os.environ.get("FAITHFUL_VIT_DATA")
    return Path(env) if env else Path.home() / ".cache" / "faithful_vit"


@dataclasses.dataclass(frozen=True)
class SpuriousShapesConfig:
    """Generator settings. Lengths in pixels are given for 64 px images and scale with ``image_size``.

    Attributes:
        image_size: side of the square images.
        n_train, n_val, n_test: split sizes.
        p_align_train: P(place == label) in train (Waterbirds: 0.95).
        p_align_eval: P(place == label) in val/test; 0.5 makes every group exactly a quarter of the split.
        object_radius: range of the object's half-extent (px at 64).
        clear_margin: width of the place-free neutral band around the object (px at 64); 0 = no band.
        margin_ramp: width over which the place texture fades in beyond the band (px at 64).
        neutral_blotches: fraction of the far background covered by neutral blotches.
        seed: generator seed; splits use independent streams derived from it.
        augmentation: training augmentation, "hflip" or "dihedral" (see
            :func:`faithful_vit.data.transforms.synthetic_transforms`); it does not change the generated images (nor
            the cache key).
    """

    image_size: int = 64
    n_train: int = 3000
    n_val: int = 800
    n_test: int = 2000
    p_align_train: float = 0.95
    p_align_eval: float = 0.5
    object_radius: tuple[float, float] = (11.0, 17.0)
    clear_margin: float = 8.0
    margin_ramp: float = 3.0
    neutral_blotches: float = 0.3
    seed: int = 0
    augmentation: str = "hflip"

    def __post_init__(self) -> None:
        if self.augmentation not in SYNTHETIC_AUGMENTATIONS:
            raise ValueError(f"augmentation: expected one of {SYNTHETIC_AUGMENTATIONS}, got {self.augmentation!r}")

    def generator_settings(self) -> dict:
        """The settings that define the generated images (all but ``augmentation``)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "augmentation"}

    def key(self) -> str:
        payload = json.dumps({"v": GENERATOR_VERSION, **self.generator_settings()}, sort_keys=True)
        return hashlib.sha1(payload.encode()).hexdigest()[:12]


def _upsample_matrix(cells: int, size: int) -> np.ndarray:
    """``[size, cells]`` bilinear interpolation weights from a coarse grid to pixel centres."""
    pos = (np.arange(size) + 0.5) / size * cells - 0.5
    eye = np.eye(cells)
    return np.stack([np.interp(pos, np.arange(cells), eye[j]) for j in range(cells)], axis=1)


def _smooth_field(rng: np.random.Generator, cells: int, size: int) -> np.ndarray:
    """A low-frequency random field ``[size, size]`` in about [-1, 1]."""
    m = _upsample_matrix(cells, size)
    return m @ rng.uniform(-1, 1, (cells, cells)) @ m.T


def _object_sdf(rng: np.random.Generator, label: int, xx: np.ndarray, yy: np.ndarray, s: float, cfg) -> np.ndarray:
    """Signed distance (px, negative inside) to a random ellipse (label 0) or cross (label 1)."""
    size = cfg.image_size
    r = rng.uniform(*cfg.object_radius) * s
    jitter = 6.0 * s
    lo, hi = r + 3 * s, size - r - 3 * s
    cx = float(np.clip(size / 2 + rng.uniform(-jitter, jitter), lo, hi))
    cy = float(np.clip(size / 2 + rng.uniform(-jitter, jitter), lo, hi))
    theta = rng.uniform(0, np.pi)
    c, sn = np.cos(theta), np.sin(theta)
    u = (xx - cx) * c + (yy - cy) * sn
    v = -(xx - cx) * sn + (yy - cy) * c
    if label == 0:
        a, b = r, r / rng.uniform(1.0, 1.6)
        rho = np.sqrt((u / a) ** 2 + (v / b) ** 2)
        grad = np.sqrt((u / a**2) ** 2 + (v / b**2) ** 2) / np.maximum(rho, 1e-6)
        first_order = (rho - 1) / np.maximum(grad, 1e-6)
        # (rho - 1) * b never overestimates the distance outside; the min keeps the neutral band at least as wide
        # as asked wherever the first-order estimate is loose.
        return np.where(rho > 1, np.minimum(first_order, (rho - 1) * b), first_order)
    half_width = rng.uniform(0.28, 0.42) * r
    arms = ((r, half_width), (half_width, rng.uniform(0.75, 1.0) * r))
    sdfs = []
    for ax, ay in arms:
        qx, qy = np.abs(u) - ax, np.abs(v) - ay
        outside = np.sqrt(np.maximum(qx, 0) ** 2 + np.maximum(qy, 0) ** 2)
        sdfs.append(outside + np.minimum(np.maximum(qx, qy), 0))
    return np.minimum(*sdfs)


def _foreground(rng: np.random.Generator, yy: np.ndarray, size: int) -> np.ndarray:
    """Warm-palette object colour with vertical shading and pixel noise, ``[size, size, 3]`` in 0..255."""
    # Hue over [0, 0.15] U [0.8, 1.0]: pick the interval roughly in proportion to its length (0.15 / 0.35 ~ 0.43).
    hue = rng.uniform(0, 0.15) if rng.random() < 0.43 else rng.uniform(0.8, 1.0)
    rgb = np.array(colorsys.hsv_to_rgb(hue, rng.uniform(0.3, 0.9), rng.uniform(0.45, 1.0))) * 255
    shade = 1 + 0.15 * (yy / size * 2 - 1)
    return rgb * shade[..., None] + rng.normal(0, 8, (size, size, 3))


def _water(rng: np.random.Generator, xx: np.ndarray, yy: np.ndarray, size: int, s: float) -> np.ndarray:
    base = np.array([rng.uniform(20, 70), rng.uniform(80, 140), rng.uniform(150, 230)])
    wavelength = rng.uniform(4, 10) * s
    wobble = rng.uniform(1, 3) * np.sin(2 * np.pi * xx / (rng.uniform(20, 40) * s) + rng.uniform(0, 2 * np.pi))
    waves = rng.uniform(15, 35) * np.sin(2 * np.pi * (yy + wobble) / wavelength + rng.uniform(0, 2 * np.pi))
    light = 20 * _smooth_field(rng, 4, size)
    img = base + (waves + light)[..., None]
    return img + rng.normal(0, rng.uniform(6, 14), (size, size, 3))


def _land(rng: np.random.Generator, size: int) -> np.ndarray:
    green = np.array([rng.uniform(40, 100), rng.uniform(110, 170), rng.uniform(30, 80)])
    brown = np.array([rng.uniform(110, 160), rng.uniform(80, 120), rng.uniform(40, 70)])
    mix = np.clip(0.5 + 0.8 * _smooth_field(rng, int(rng.integers(3, 8)), size), 0, 1)[..., None]
    detail = 25 * _smooth_field(rng, 16, size)
    img = mix * green + (1 - mix) * brown + detail[..., None]
    return img + rng.normal(0, rng.uniform(6, 14), (size, size, 3))


def _neutral(rng: np.random.Generator, size: int) -> np.ndarray:
    grey = rng.uniform(95, 170) + rng.uniform(-6, 6, 3)
    img = grey + (15 * _smooth_field(rng, 4, size))[..., None]
    return img + rng.normal(0, rng.uniform(6, 14), (size, size, 3))


def _render(rng: np.random.Generator, label: int, place: int, cfg: SpuriousShapesConfig):
    size, s = cfg.image_size, cfg.image_size / 64
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    sdf = _object_sdf(rng, label, xx, yy, s, cfg)
    fg = sdf < 0
    place_img = _water(rng, xx, yy, size, s) if place == 1 else _land(rng, size)
    if cfg.clear_margin > 0 or cfg.neutral_blotches > 0:
        ramp = max(cfg.margin_ramp * s, 1e-6)
        visibility = np.clip((sdf - cfg.clear_margin * s) / ramp, 0, 1)
        if cfg.neutral_blotches > 0:
            field = _smooth_field(rng, 5, size)
            cut = np.quantile(field, 1 - cfg.neutral_blotches)
            visibility *= np.clip((cut - field) / 0.15, 0, 1)
        background = visibility[..., None] * place_img + (1 - visibility[..., None]) * _neutral(rng, size)
    else:
        visibility = np.ones((size, size))
        background = place_img
    img = np.where(fg[..., None], _foreground(rng, yy, size), background)
    visibility = np.where(fg, 0.0, visibility)
    return np.clip(img, 0, 255).astype(np.uint8), fg.astype(np.uint8), np.round(visibility * 255).astype(np.uint8)


def labels_and_places(rng: np.random.Generator, n: int, p_align: float) -> tuple[np.ndarray, np.ndarray]:
    """Labels and places ``[n]`` int: P(place == label) = p_align; at 0.5 every group gets n // 4 (or one more)."""
    if p_align == 0.5:
        groups = rng.permutation(np.arange(n) % 4)
        return groups // 2, groups % 2
    labels = rng.integers(0, 2, n)
    aligned = rng.random(n) < p_align
    return labels, np.where(aligned, labels, 1 - labels)


def generate_split(cfg: SpuriousShapesConfig, split: str) -> dict[str, np.ndarray]:
    """Generate one split with numpy (deterministic in ``cfg.seed`` and ``split``).

    Returns:
        dict with ``images`` uint8 ``[N,S,S,3]``, ``fg_masks`` uint8 ``[N,S,S]`` (1 = object),
        ``place_visibility`` uint8 ``[N,S,S]`` (255 = pure place texture, 0 = no place cue),
        ``labels`` int64 ``[N]``, ``places`` int64 ``[N]``.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    n = {"train": cfg.n_train, "val": cfg.n_val, "test": cfg.n_test}[split]
    p_align = cfg.p_align_train if split == "train" else cfg.p_align_eval
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, SPLITS.index(split)]))
    labels, places = labels_and_places(rng, n, p_align)
    size = cfg.image_size
    images = np.empty((n, size, size, 3), np.uint8)
    fg_masks = np.empty((n, size, size), np.uint8)
    visibility = np.empty((n, size, size), np.uint8)
    for i in range(n):
        images[i], fg_masks[i], visibility[i] = _render(rng, int(labels[i]), int(places[i]), cfg)
    return {
        "images": images,
        "fg_masks": fg_masks,
        "place_visibility": visibility,
        "labels": labels.astype(np.int64),
        "places": places.astype(np.int64),
    }


def cached_arrays(
    name: str,
    key: str,
    split: str,
    generate: Callable[[], dict[str, np.ndarray]],
    description: dict,
    cache_dir: str | os.PathLike | None = None,
) -> dict[str, np.ndarray]:
    """Arrays of a generated split, read from ``<cache>/<name>/<key>_<split>.npz`` or generated and written there.

    ``description`` (the generator's settings) is written next to the cache as ``<key>.json`` for humans.
    """
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = root / name / f"{key}_{split}.npz"
    if path.exists():
        with np.load(path) as data:
            return {k: data[k] for k in data.files}
    arrays = generate()
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.parent / f"{key}.json").write_text(json.dumps(description, indent=1, default=str))
    # Write then rename, so a concurrent or interrupted run never leaves a truncated cache file behind.
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".npz", delete=False) as tmp:
        np.savez_compressed(tmp, **arrays)
    os.chmod(tmp.name, 0o644)  # NamedTemporaryFile creates 0600; the cache may be shared
    os.replace(tmp.name, path)
    return arrays


def load_or_generate(cfg: SpuriousShapesConfig, split: str, cache_dir: str | os.PathLike | None = None):
    """Arrays of one split (see :func:`generate_split`), generated at first use and cached as ``.npz``."""
    return cached_arrays(
        "spurious_shapes", cfg.key(), split, lambda: generate_split(cfg, split), cfg.generator_settings(), cache_dir
    )


JointTransform = Callable[[torch.Tensor, torch.Tensor | None], tuple[torch.Tensor, torch.Tensor | None]]


class ArrayDataset(torch.utils.data.Dataset):
    """A generated split held in memory as uint8 arrays (see :func:`generate_split`), served as :class:`Sample`.

    Subclasses set ``num_places``, ``class_names``, ``place_names`` and call ``__init__`` with the arrays.
    """

    num_places = 2
    class_names: tuple[str, ...] = ()
    place_names: tuple[str, ...] = ()

    def __init__(self, arrays: dict[str, np.ndarray], transform: JointTransform | None = None) -> None:
        self.arrays = arrays
        self.transform = transform
        self.labels = torch.from_numpy(arrays["labels"])
        self.places = torch.from_numpy(arrays["places"])
        self.groups = self.labels * self.num_places + self.places

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def num_groups(self) -> int:
        return len(self.class_names) * self.num_places

    @property
    def group_names(self) -> tuple[str, ...]:
        return tuple(f"{c}/{p}" for c in self.class_names for p in self.place_names)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> Sample:
        image = torch.from_numpy(self.arrays["images"][index]).permute(2, 0, 1).float().div_(255)
        mask = torch.from_numpy(self.arrays["fg_masks"][index]).float().unsqueeze(0)
        if self.transform is not None:
            image, mask = self.transform(image, mask)
        return Sample(normalize(image), int(self.labels[index]), int(self.groups[index]), mask)

    def tensors(self) -> Batch:
        """The whole split as one un-augmented normalised :class:`Batch` (fast in-memory training on CPU)."""
        images = torch.from_numpy(self.arrays["images"]).permute(0, 3, 1, 2).float().div_(255)
        masks = torch.from_numpy(self.arrays["fg_masks"]).float().unsqueeze(1)
        return Batch(normalize(images), self.labels.clone(), self.groups.clone(), masks)

    def place_visibility(self) -> torch.Tensor:
        """``[N,1,S,S]`` float in [0,1]: how much of the place texture each pixel shows (0 on the object)."""
        return torch.from_numpy(self.arrays["place_visibility"]).float().div_(255).unsqueeze(1)


class SpuriousShapes(ArrayDataset):
    """The built-in benchmark as a map-style dataset of :class:`~faithful_vit.data.sample.Sample`.

    Classes: 0 ellipse, 1 cross; places: 0 land, 1 water; group = ``label * 2 + place`` (see ``group_names``).

    Args:
        split: ``"train"``, ``"val"`` or ``"test"``.
        config: generator settings (default: the benchmark used by ``train.py``).
        cache_dir: cache root (default :func:`default_cache_dir`).
        transform: joint transform ``(image [3,S,S] float in [0,1], mask [1,S,S]) -> (image, mask)`` applied before
            normalisation. The benchmark's recipe is horizontal flip only, in training
            (:func:`faithful_vit.data.transforms.synthetic_transforms`).
    """

    class_names = CLASS_NAMES
    place_names = PLACE_NAMES

    def __init__(
        self,
        split: str = "train",
        *,
        config: SpuriousShapesConfig | None = None,
        cache_dir: str | os.PathLike | None = None,
        transform: JointTransform | None = None,
    ) -> None:
        self.split = split
        self.config = config or SpuriousShapesConfig()
        super().__init__(load_or_generate(self.config, split, cache_dir), transform)


@register_dataset(
    "synthetic",
    summary="the built-in benchmark SpuriousShapes (generated and cached on first use; settings: --data-kwargs)",
    needs_root=False,
    settings=SpuriousShapesConfig,
    has_masks=True,
)
def _spurious_shapes(split, root, *, augment, **settings):
    config = SpuriousShapesConfig(**settings)
    return SpuriousShapes(
        split, config=config, cache_dir=root, transform=synthetic_transforms(augment, config.augmentation)
    )
