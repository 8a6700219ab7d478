"""Waterbirds-lite: real bird photo cut-outs (alpha masks) on real water and land photos, built offline.

The assets come from two Debian packages, fetched at setup time by ``scripts/setup_waterbirds_lite.sh`` (``apt-get
download tuxpaint-stamps-default tuxpaint-data`` + ``dpkg-deb`` extraction, about 170 MB downloaded, about 10 MB
kept) into ``<cache>/waterbirds_lite/debian/usr/share/...``. They are GPL-2: never commit them.

Construction follows Waterbirds (Sagawa et al.): y = 1 "waterbird" for the 13 water/shore birds below and y = 0
"landbird" for the other stamps; place 0 = land photo, 1 = water photo; P(place == y) = 0.95 in train and 0.5 in
val/test (each group exactly a quarter there). Each image is a random crop (35-90% of the short side) of a
background photo, resized to ``image_size``, with a randomly flipped bird whose longer side is 45-80% of the image
pasted at a random position. The ground-truth mask is the bird's alpha > 127. The generated splits are cached as
``.npz`` next to the assets.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path

import numpy as np
from PIL import Image

from faithful_vit.data.registry import register_dataset
from faithful_vit.data.synthetic import (
    SPLITS,
    ArrayDataset,
    JointTransform,
    cached_arrays,
    default_cache_dir,
    labels_and_places,
)
from faithful_vit.data.transforms import synthetic_transforms

SETUP_COMMAND = "bash scripts/setup_waterbirds_lite.sh"
BIRDS_DIR = Path("usr/share/tuxpaint/stamps/animals/birds")
TEMPLATES_DIR = Path("usr/share/tuxpaint/templates")
WATER_BIRDS = frozenset(
    {
        "drake",
        "duck",
        "gander",
        "heron_greatblue",
        "heron_greatblue_flying",
        "little-penguin",
        "magellanic_penguin",
        "penguin",
        "pelican",
        "pink_flamingo",
        "seagull",
        "silver-gull",
        "crowned_crane",
    }
)
WATER_BACKGROUNDS = ("ocean_splash", "ocean_waves", "jellyfish")
LAND_BACKGROUNDS = (
    "burnt_bark",
    "cliff",
    "corn_maze",
    "mossy_bark",
    "mossy_log",
    "mudstone",
    "redwoods_above",
    "rocks",
    "sheep",
    "sun_behind_leaves",
    "trees_above",
    "trees_at_dusk",
)
GENERATOR_VERSION = 1


def assets_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the setup script unpacks the Debian packages: ``<cache>/waterbirds_lite/debian``."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return root / "waterbirds_lite" / "debian"


@dataclasses.dataclass(frozen=True)
class WaterbirdsLiteConfig:
    """Builder settings (see the module docstring for the construction)."""

    image_size: int = 64
    n_train: int = 3000
    n_val: int = 800
    n_test: int = 2000
    p_align_train: float = 0.95
    p_align_eval: float = 0.5
    bird_size: tuple[float, float] = (0.45, 0.8)
    crop_fraction: tuple[float, float] = (0.35, 0.9)
    seed: int = 0


def find_assets(cache_dir: str | os.PathLike | None = None) -> dict[str, list[Path]]:
    """Locate the bird stamps and background photos.

    Returns:
        ``{"land_birds", "water_birds", "land_backgrounds", "water_backgrounds"}`` -> sorted paths.

    Raises:
        FileNotFoundError: assets missing; the message names the setup command.
    """
    root = assets_dir(cache_dir)
    birds_dir, templates_dir = root / BIRDS_DIR, root / TEMPLATES_DIR
    hint = (
        f"Waterbirds-lite assets not found under {str(root)!r}. Run `{SETUP_COMMAND}` once (it downloads the "
        "Debian packages tuxpaint-stamps-default and tuxpaint-data into the cache; set FAITHFUL_VIT_DATA to "
        "choose the cache folder)."
    )
    if not birds_dir.is_dir() or not templates_dir.is_dir():
        raise FileNotFoundError(hint)
    birds = sorted(birds_dir.glob("*.png"))
    assets = {
        "water_birds": [p for p in birds if p.stem in WATER_BIRDS],
        "land_birds": [p for p in birds if p.stem not in WATER_BIRDS],
        "water_backgrounds": [templates_dir / f"{n}.jpg" for n in WATER_BACKGROUNDS],
        "land_backgrounds": [templates_dir / f"{n}.jpg" for n in LAND_BACKGROUNDS],
    }
    for kind in ("water_backgrounds", "land_backgrounds"):
        assets[kind] = [p for p in assets[kind] if p.is_file()]
    empty = [k for k, v in assets.items() if not v]
    if empty:
        raise FileNotFoundError(f"{hint} (no files for: {', '.join(empty)})")
    return assets


def _load_rgba(path: Path, max_side: int) -> Image.Image:
    img = Image.open(path).convert("RGBA")
    img.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    return img


def _load_rgb(path: Path, short_side: int) -> Image.Image:
    img = Image.open(path).convert("RGB")
    scale = short_side / min(img.size)
    if scale < 1:
        img = img.resize((round(img.width * scale), round(img.height * scale)), Image.Resampling.LANCZOS)
    return img


def generate_split(cfg: WaterbirdsLiteConfig, split: str, cache_dir=None) -> dict[str, np.ndarray]:
    """Build one split (deterministic in ``cfg.seed`` and ``split``); same arrays as the synthetic generator."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    assets = find_assets(cache_dir)
    size = cfg.image_size
    # Downscale the large photos once; crops are then resized from this working copy.
    birds = [[_load_rgba(p, 4 * size) for p in assets[k]] for k in ("land_birds", "water_birds")]
    backgrounds = [[_load_rgb(p, 4 * size) for p in assets[k]] for k in ("land_backgrounds", "water_backgrounds")]
    n = {"train": cfg.n_train, "val": cfg.n_val, "test": cfg.n_test}[split]
    p_align = cfg.p_align_train if split == "train" else cfg.p_align_eval
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, SPLITS.index(split), 1]))
    labels, places = labels_and_places(rng, n, p_align)
    images = np.empty((n, size, size, 3), np.uint8)
    masks = np.empty((n, size, size), np.uint8)
    for i in range(n):
        bg = backgrounds[places[i]][rng.integers(len(backgrounds[places[i]]))]
        side = int(min(bg.size) * rng.uniform(*cfg.crop_fraction))
        left, top = rng.integers(0, bg.width - side + 1), rng.integers(0, bg.height - side + 1)
        canvas = bg.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.BILINEAR)
        bird = birds[labels[i]][rng.integers(len(birds[labels[i]]))]
        if rng.random() < 0.5:
            bird = bird.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        scale = rng.uniform(*cfg.bird_size) * size / max(bird.size)
        bird = bird.resize(
            (max(1, round(bird.width * scale)), max(1, round(bird.height * scale))), Image.Resampling.BILINEAR
        )
        x, y = rng.integers(0, size - bird.width + 1), rng.integers(0, size - bird.height + 1)
        alpha = np.asarray(bird.getchannel("A"))
        hard = Image.fromarray(((alpha > 127) * 255).astype(np.uint8))
        # Paste with the hard mask, so the pixels the mask calls background are pure background.
        canvas.paste(bird.convert("RGB"), (int(x), int(y)), hard)
        mask = np.zeros((size, size), np.uint8)
        mask[y : y + bird.height, x : x + bird.width] = alpha > 127
        images[i], masks[i] = np.asarray(canvas), mask
    return {
        "images": images,
        "fg_masks": masks,
        "place_visibility": (1 - masks).astype(np.uint8) * 255,
        "labels": labels.astype(np.int64),
        "places": places.astype(np.int64),
    }


def _cache_key(cfg: WaterbirdsLiteConfig, cache_dir) -> str:
    assets = find_assets(cache_dir)
    names = sorted(p.name for paths in assets.values() for p in paths)
    payload = repr((GENERATOR_VERSION, dataclasses.astuple(cfg), names))
    return hashlib.sha1(payload.encode()).hexdigest()[:12]


class WaterbirdsLite(ArrayDataset):
    """Waterbirds-lite as a dataset of :class:`~faithful_vit.data.sample.Sample`, built from the cached assets.

    Classes: 0 landbird, 1 waterbird; places: 0 land, 1 water; group = ``label * 2 + place``.

    Args:
        split: ``"train"``, ``"val"`` or ``"test"``.
        config: builder settings.
        cache_dir: cache root holding ``waterbirds_lite/debian`` (default :func:`default_cache_dir`).
        transform: joint transform applied before normalisation (as for SpuriousShapes).

    Raises:
        FileNotFoundError: the assets are missing; run ``bash scripts/setup_waterbirds_lite.sh``.
    """

    class_names = ("landbird", "waterbird")
    place_names = ("land", "water")

    def __init__(
        self,
        split: str = "train",
        *,
        config: WaterbirdsLiteConfig | None = None,
        cache_dir: str | os.PathLike | None = None,
        transform: JointTransform | None = None,
    ) -> None:
        self.split = split
        self.config = config or WaterbirdsLiteConfig()
        arrays = cached_arrays(
            "waterbirds_lite",
            _cache_key(self.config, cache_dir),
            split,
            lambda: generate_split(self.config, split, cache_dir),
            dataclasses.asdict(self.config),
            cache_dir,
        )
        super().__init__(arrays, transform)


@register_dataset(
    "waterbirds_lite",
    summary="Waterbirds-like images built offline from local assets by scripts/setup_waterbirds_lite.sh "
    "(settings: --data-kwargs)",
    needs_root=False,
    settings=WaterbirdsLiteConfig,
    has_masks=True,
)
def _waterbirds_lite(split, root, *, augment, **settings):
    config = WaterbirdsLiteConfig(**settings)
    return WaterbirdsLite(split, config=config, cache_dir=root, transform=synthetic_transforms(augment))
