"""The sample and batch format shared by every dataset in :mod:`faithful_vit.data`.

Every dataset returns a :class:`Sample` ``(image, label, group, fg_mask)``:

- ``image``: float32 ``[3, H, W]``, normalised with the dataset's mean/std (ImageNet statistics by default).
- ``label``: int class index.
- ``group``: int, ``label * num_places + place`` (the Waterbirds ``(y, place)`` convention); datasets without a
  spurious attribute use ``group == label``.
- ``fg_mask``: float32 ``[1, H, W]`` in [0, 1] (1 = object), or ``None`` when the dataset has no masks.

:func:`collate` stacks samples into a :class:`Batch` and is meant for ``DataLoader(collate_fn=collate)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Sample(NamedTuple):
    """One example: ``image [3,H,W]`` float32, ``label`` int, ``group`` int, ``fg_mask [1,H,W]`` float32 or None."""

    image: torch.Tensor
    label: int
    group: int
    fg_mask: torch.Tensor | None


class Batch(NamedTuple):
    """A batch: ``images [B,3,H,W]``, ``labels [B]`` int64, ``groups [B]`` int64, ``fg_masks [B,1,H,W]`` or None.

    ``num_skipped`` counts the corrupt samples (None) that :func:`collate` dropped from this batch.
    """

    images: torch.Tensor
    labels: torch.Tensor
    groups: torch.Tensor
    fg_masks: torch.Tensor | None
    num_skipped: int = 0


class CorruptImageError(RuntimeError):
    """An image file exists but cannot be decoded. ``path`` names the file.

    Loaders raise it from ``__getitem__`` (``on_corrupt="raise"``). With ``on_corrupt="skip"`` they warn and return
    None instead; :func:`collate` drops those and counts them in ``Batch.num_skipped``.
    """

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"cannot decode image {path!r}: {reason}")
        self.path = path


def collate(samples: Sequence[Sample | tuple | None]) -> Batch:
    """Stack samples into a :class:`Batch`, dropping None entries (corrupt images skipped by a loader).

    Args:
        samples: non-empty sequence of :class:`Sample` (images of one shape), plain ``(image, label[, group[,
            fg_mask]])`` tuples (e.g. a ``TensorDataset``; ``group`` defaults to ``label``, ``fg_mask`` to None),
            or None.

    Returns:
        :class:`Batch` with ``num_skipped`` = number of None entries; ``fg_masks`` is None when every sample's mask
        is None. When every entry is None, the batch holds no images (``labels`` is empty; the training loop skips
        it) but still counts them in ``num_skipped``.

    Raises:
        ValueError: empty input, a sample of fewer than 2 or more than 4 fields, or masks present on some samples
            and missing on others.
    """
    if len(samples) == 0:
        raise ValueError("collate: samples must be non-empty, got 0 samples")
    num_skipped = sum(s is None for s in samples)
    fields = [_sample_fields(s) for s in samples if s is not None]
    if not fields:
        empty = torch.zeros(0, dtype=torch.int64)
        return Batch(torch.zeros(0), empty, empty.clone(), None, num_skipped=num_skipped)
    masks = [mask for *_, mask in fields]
    n_missing = sum(m is None for m in masks)
    if 0 < n_missing < len(masks):
        raise ValueError(f"collate: fg_mask is None for {n_missing} of {len(masks)} samples; expected all or none")
    return Batch(
        images=torch.stack([torch.as_tensor(image) for image, *_ in fields]),
        labels=torch.tensor([int(label) for _, label, _, _ in fields], dtype=torch.int64),
        groups=torch.tensor([int(group) for _, _, group, _ in fields], dtype=torch.int64),
        fg_masks=None if n_missing else torch.stack([torch.as_tensor(m) for m in masks]),
        num_skipped=num_skipped,
    )


def _sample_fields(sample: Sample | tuple) -> tuple:
    """``(image, label, group, fg_mask)`` of a sample of 2 to 4 fields (group defaults to label, fg_mask to None)."""
    if not 2 <= len(sample) <= 4:
        raise ValueError(
            f"collate: expected samples of (image, label[, group[, fg_mask]]), got one of {len(sample)} fields"
        )
    image, label, *rest = sample
    group = rest[0] if rest and rest[0] is not None else label
    fg_mask = rest[1] if len(rest) > 1 else None
    return image, label, group, fg_mask


def normalize(images: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
    """Normalise float images in [0, 1], ``[..., 3, H, W]`` -> same shape, ``(x - mean) / std`` per channel."""
    m = torch.tensor(mean, dtype=images.dtype, device=images.device).view(3, 1, 1)
    s = torch.tensor(std, dtype=images.dtype, device=images.device).view(3, 1, 1)
    return (images - m) / s
