"""Datasets: the built-in spurious-correlation benchmark and loaders for the paper's datasets.

Every dataset returns :class:`Sample` ``(image [3,H,W] normalised, label, group, fg_mask [1,H,W] or None)`` and
exposes ``num_classes``, ``num_groups`` and ``group_names``; :func:`collate` batches them for a DataLoader.
:func:`create_dataset` builds a registered dataset by name (:func:`list_datasets`, :func:`register_dataset`).
"""

from faithful_vit.data.datasets import (
    CUB200,
    DatasetError,
    ImageFolder,
    ImageListDataset,
    ImageNet9,
    MetaShiftCatDog,
    Waterbirds,
    load_image,
)
from faithful_vit.data.mask_stats import gt_patch_fraction, patch_mask_stats
from faithful_vit.data.registry import DatasetInfo, create_dataset, dataset_info, list_datasets, register_dataset
from faithful_vit.data.sample import IMAGENET_MEAN, IMAGENET_STD, Batch, CorruptImageError, Sample, collate, normalize
from faithful_vit.data.synthetic import SpuriousShapes, SpuriousShapesConfig, default_cache_dir
from faithful_vit.data.waterbirds_lite import WaterbirdsLite, WaterbirdsLiteConfig

__all__ = [
    "CUB200",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Batch",
    "CorruptImageError",
    "DatasetInfo",
    "DatasetError",
    "ImageFolder",
    "ImageListDataset",
    "ImageNet9",
    "MetaShiftCatDog",
    "Sample",
    "SpuriousShapes",
    "SpuriousShapesConfig",
    "Waterbirds",
    "WaterbirdsLite",
    "WaterbirdsLiteConfig",
    "collate",
    "create_dataset",
    "dataset_info",
    "default_cache_dir",
    "gt_patch_fraction",
    "list_datasets",
    "load_image",
    "normalize",
    "patch_mask_stats",
    "register_dataset",
]
