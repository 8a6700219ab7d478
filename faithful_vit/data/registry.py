"""Named datasets: ``create_dataset(name, split, root=None, **kwargs)``, ``list_datasets()``, ``@register_dataset``.

The one place that maps a name (``train.py --data``, the ``name`` of a checkpoint's data spec) to a dataset. A
dataset registers a builder ``build(split, root, *, augment, **kwargs)`` together with what the command line needs
to know about it: whether it reads a folder (``root``), whether its generator settings (``kwargs``) fix the image
size, whether it has ground-truth masks of its own or reads them from a mask folder.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

__all__ = ["DatasetInfo", "create_dataset", "dataset_info", "list_datasets", "register_dataset"]


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What a registered dataset needs and has.

    Attributes:
        name: the registered name.
        build: ``build(split, root, *, augment, **kwargs)`` returns the split.
        summary: one line for ``train.py --help``.
        needs_root: ``root`` is the dataset's folder and is required (else it is an optional cache folder).
        settings: the dataclass of settings that ``kwargs`` fill (``--data-kwargs``): a generator's, whose
            ``image_size`` is the image side, or a folder dataset's options (e.g. ImageNet-9's ``variant``), without
            an ``image_size`` field. Where it is None or has no ``image_size`` (:attr:`sized_by_model`), ``kwargs``
            also hold ``image_size`` (resize side, default the model's) and, where ``accepts_mask_root``,
            ``mask_root``.
        has_masks: every sample has a ground-truth foreground mask (without a mask folder).
        accepts_mask_root: ground-truth masks are read from a separate folder (``mask_root``, ``--mask-dir``).
        has_groups: the groups are spurious (class, place) pairs rather than the classes.
    """

    name: str
    build: Callable
    summary: str
    needs_root: bool
    settings: type | None = None
    has_masks: bool = False
    accepts_mask_root: bool = False
    has_groups: bool = True

    @property
    def sized_by_model(self) -> bool:
        """The image side follows the model (``image_size``, ``--img-size``) rather than the settings."""
        return self.settings is None or "image_size" not in {field.name for field in dataclasses.fields(self.settings)}

    def image_size(self, kwargs: dict) -> int | None:
        """The image side that the settings ``kwargs`` fix, or None where it follows the model.

        Raises:
            TypeError, ValueError: bad settings.
        """
        settings = None if self.settings is None else self.settings(**kwargs)
        return None if self.sized_by_model else settings.image_size


_DATASETS: dict[str, DatasetInfo] = {}


def register_dataset(
    name: str,
    *,
    summary: str,
    needs_root: bool,
    settings: type | None = None,
    has_masks: bool = False,
    accepts_mask_root: bool = False,
    has_groups: bool = True,
) -> Callable[[Callable], Callable]:
    """Register ``build(split, root, *, augment, **kwargs)`` under ``name`` (a decorator)."""

    def register(build: Callable) -> Callable:
        if name in _DATASETS:
            raise ValueError(f"dataset {name!r} is already registered")
        _DATASETS[name] = DatasetInfo(
            name, build, summary, needs_root, settings, has_masks, accepts_mask_root, has_groups
        )
        return build

    return register


def list_datasets() -> list[str]:
    """Sorted registered names."""
    return sorted(_DATASETS)


def dataset_info(name: str) -> DatasetInfo:
    """The registration of ``name``.

    Raises:
        ValueError: an unknown name (the message lists the registered ones).
    """
    if name not in _DATASETS:
        raise ValueError(f"name: expected one of {list_datasets()}, got {name!r}")
    return _DATASETS[name]


def create_dataset(name: str, split: str, root=None, *, augment: bool | None = None, **kwargs):
    """One split of the registered dataset ``name``.

    Args:
        name: one of :func:`list_datasets`.
        split: ``"train"``, ``"val"`` or ``"test"``.
        root: the dataset's folder (required where :attr:`DatasetInfo.needs_root`), else an optional cache folder.
        augment: training augmentation (default: on the train split only).
        **kwargs: the dataset's settings (see :attr:`DatasetInfo.settings`).

    Raises:
        ValueError: an unknown name or split, a missing root; FileNotFoundError, ValueError, TypeError: a dataset
            that cannot be read or bad settings.
    """
    info = dataset_info(name)
    if split not in ("train", "val", "test"):
        raise ValueError(f"split: expected one of ('train', 'val', 'test'), got {split!r}")
    if info.needs_root and root is None:
        raise ValueError(f"root: dataset {name!r} reads a folder, got None")
    return info.build(split, root, augment=split == "train" if augment is None else augment, **kwargs)
