"""Named presets of :class:`~faithful_vit.FaithfulViT`: ``create_model(name, **overrides)``, ``list_models()``.

A preset is a function registered with :func:`register_model` that returns a
:class:`~faithful_vit.model.FaithfulViTConfig`; keyword overrides replace config fields (dict fields such as
``loss_weights`` and ``backbone_kwargs`` are merged). Backbones are built by timm with ``pretrained=False``; weights
come only from a local file (``pretrained_file=``), never from a hub.

Learning-rate factors: the paper's (``heads``/``modulation`` x1e4, ``prototypes`` x1e3, the rest x1) assume a pretrained
backbone trained at lr ~3e-6. ``faithful_tiny`` trains from scratch at lr ~1e-3, where those factors would give the
heads lr 10, so its factors are 1, except stage 2's (see ``faithful_tiny``).
"""

from __future__ import annotations

import fnmatch
import os
import warnings
from collections.abc import Callable

from .model import PAPER_LOSS_WEIGHTS, FaithfulViT, FaithfulViTConfig

__all__ = ["create_model", "get_config", "list_models", "register_model"]

_PRESETS: dict[str, Callable[[], FaithfulViTConfig]] = {}


def register_model(fn: Callable[[], FaithfulViTConfig]) -> Callable[[], FaithfulViTConfig]:
    """Register a preset under its function name (a decorator)."""
    if fn.__name__ in _PRESETS:
        raise ValueError(f"preset {fn.__name__!r} is already registered")
    _PRESETS[fn.__name__] = fn
    return fn


def list_models(pattern: str | None = None) -> list[str]:
    """Sorted preset names, optionally filtered by a shell-style ``pattern`` (e.g. ``"*dinov2*"``)."""
    names = sorted(_PRESETS)
    return names if pattern is None else [n for n in names if fnmatch.fnmatch(n, pattern)]


def get_config(name: str, **overrides) -> FaithfulViTConfig:
    """The config of preset ``name`` with ``overrides`` applied."""
    if name not in _PRESETS:
        raise ValueError(f"name: unknown preset {name!r}; available: {list_models()}")
    return _PRESETS[name]().replace(**overrides)


def create_model(name: str, *, pretrained_file: str | None = None, **overrides) -> FaithfulViT:
    """Build a preset.

    Args:
        name: one of :func:`list_models`.
        pretrained_file: a local ``.safetensors`` or timm ``.pth`` ViT checkpoint loaded into both backbones.
        **overrides: :class:`~faithful_vit.model.FaithfulViTConfig` fields (e.g. ``img_size=96``, ``num_parts=4``,
            ``backbone_kwargs={"depth": 2}``, ``loss_weights={"area": 5.0}``).

    Returns:
        The model, in training mode.

    Raises:
        FileNotFoundError: ``pretrained_file`` is not a file.
    """
    if pretrained_file is not None and not os.path.isfile(pretrained_file):
        raise FileNotFoundError(f"pretrained_file: no such file: {os.fspath(pretrained_file)!r}")
    cfg = get_config(name, **overrides)
    if cfg.freeze_stage1_backbone and pretrained_file is None:
        warnings.warn(
            f"{name}: freeze_stage1_backbone=True without pretrained_file freezes a randomly initialised stage-1 "
            "backbone (its part maps then never separate object from background); pass pretrained_file= or "
            "freeze_stage1_backbone=False",
            stacklevel=2,
        )
    model = FaithfulViT(cfg)
    if pretrained_file is not None:
        model.load_backbone_weights(pretrained_file)
    return model


_FROM_SCRATCH_LR_FACTORS = {
    "heads": 1.0,
    "modulation": 1.0,
    "prototypes": 1.0,
    "stage1_tokens": 1.0,
    "stage1_backbone": 1.0,
    "stage2_tokens": 1.0,
    "stage2_backbone": 1.0,
}


@register_model
def faithful_tiny() -> FaithfulViTConfig:
    """From scratch on 2 CPU cores in minutes: 64 px, patch 8, width 128, depth 4, 4 heads, K = 3 (both stages
    trainable).

    Choices made by measurement on the built-in benchmark, two of them deviations from the paper (the numbers are
    in docs/results.md):

    * the mask is detached from stage 2's loss (``straight_through=False``): the gate's gradient pulled the mask
      towards the spurious background;
    * a minimum-area prior (loss ``area`` weight 5, ``area_target`` 0.15) and a 4-neighbour opening of the kept
      patches (``mask_morphology="open"``): without them stage 1 kept no patch at all in most images; the prior alone
      leaves stray background patches, which stage 2 exploits. With the opening, a target of 0.25 gives masks as
      large as the any-pixel oracle's that still let some place texture through; 0.15 gives masks the size of the
      ground-truth patches and was chosen on validation worst-group accuracy;
    * stage 2 (backbone, class token, position embedding) learns at 0.3 x the base learning rate: at the full rate,
      a from-scratch stage 2 reading a handful of patches stayed at chance for the whole run on some seeds
      (``benchmarks/results/method_seeds/``).
    """
    return FaithfulViTConfig(
        backbone="vit_tiny_patch16_224",
        img_size=64,
        num_classes=2,
        num_parts=3,
        backbone_kwargs={"patch_size": 8, "embed_dim": 128, "depth": 4, "num_heads": 4, "mlp_ratio": 2.0},
        freeze_stage1_backbone=False,
        straight_through=False,
        mask_morphology="open",
        area_target=0.15,
        loss_weights={**PAPER_LOSS_WEIGHTS, "area": 5.0},
        lr_factors={**_FROM_SCRATCH_LR_FACTORS, "stage2_backbone": 0.3, "stage2_tokens": 0.3},
    )


@register_model
def faithful_tiny_wblite() -> FaithfulViTConfig:
    """``faithful_tiny``'s architecture and recipe (spelled out, so that a change of ``faithful_tiny`` does not change
    it) for Waterbirds-lite, meant to start from a backbone pretrained on its training images with
    ``python -m faithful_vit.pretrain`` (``train.py --pretrained-file``; ``docs/training.md``)."""
    return FaithfulViTConfig(
        backbone="vit_tiny_patch16_224",
        img_size=64,
        num_classes=2,
        num_parts=3,
        backbone_kwargs={"patch_size": 8, "embed_dim": 128, "depth": 4, "num_heads": 4, "mlp_ratio": 2.0},
        freeze_stage1_backbone=False,
        straight_through=False,
        mask_morphology="open",
        area_target=0.15,
        loss_weights={**PAPER_LOSS_WEIGHTS, "area": 5.0},
        lr_factors={**_FROM_SCRATCH_LR_FACTORS, "stage2_backbone": 0.3, "stage2_tokens": 0.3},
    )


@register_model
def faithful_vit_small_patch16_224() -> FaithfulViTConfig:
    """ViT-S/16 at 224 px, K = 8, the paper's recipe otherwise (frozen stage 1: give it pretrained_file=)."""
    return FaithfulViTConfig(
        backbone="vit_small_patch16_224",
        img_size=224,
        num_classes=2,
        num_parts=8,
        freeze_stage1_backbone=True,
    )


@register_model
def faithful_dinov2_base_reg4_518() -> FaithfulViTConfig:
    """The paper's model: DINOv2 ViT-B/14 with 4 registers at 518 px (37 x 37 patches), K = 8, frozen stage-1
    backbone with trainable prefix tokens and position embedding (give it pretrained_file=)."""
    return FaithfulViTConfig(
        backbone="vit_base_patch14_reg4_dinov2",
        img_size=518,
        num_classes=2,
        num_parts=8,
        freeze_stage1_backbone=True,
    )


@register_model
def faithful_dinov3_small_reg4_224() -> FaithfulViTConfig:
    """DINOv3 ViT-S/16 (class token, 4 registers, rope) at 224 px (14 x 14 patches), K = 8, the paper's recipe on
    DINOv2's successor: frozen stage-1 backbone with trainable prefix tokens (give it pretrained_file=, a timm
    ``vit_small_patch16_dinov3`` checkpoint). Both stages read the class token (DINOv3's own pooling; timm's default
    for these models is patch averaging)."""
    return FaithfulViTConfig(
        backbone="vit_small_patch16_dinov3",
        img_size=224,
        num_classes=2,
        num_parts=8,
        backbone_kwargs={"global_pool": "token"},
        freeze_stage1_backbone=True,
    )


@register_model
def faithful_dinov3_base_reg4_512() -> FaithfulViTConfig:
    """DINOv3 ViT-B/16 at 512 px (32 x 32 patches, the paper's DINOv2-B/14 at 518 px has 37 x 37), K = 8, frozen
    stage-1 backbone with trainable prefix tokens (give it pretrained_file=, a timm ``vit_base_patch16_dinov3``
    checkpoint); class-token pooling."""
    return FaithfulViTConfig(
        backbone="vit_base_patch16_dinov3",
        img_size=512,
        num_classes=2,
        num_parts=8,
        backbone_kwargs={"global_pool": "token"},
        freeze_stage1_backbone=True,
    )
