"""What the training engine, evaluation and prediction need of a model and of its output, as protocols.

The two-stage :class:`~faithful_vit.model.FaithfulViT` and the comparison models
:class:`~faithful_vit.baseline.FullImageViT` and :class:`~faithful_vit.baseline.OracleMaskViT` satisfy
:class:`TrainableModel` structurally (none of them imports this module); ``isinstance(model, TrainableModel)`` checks
that the members exist. A model whose ``loss_weights`` give the equivariance term a non-zero weight is also an
:class:`EquivariantModel` (:func:`faithful_vit.losses.training_losses` calls its ``equivariance_maps``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class ModelOutput(Protocol):
    """What a model's ``forward`` returns.

    Attributes:
        logits: ``(B, num_classes)`` the prediction (a two-stage model's stage-2 logits).
        keep: ``(B, num_patches)`` bool, the patches the prediction may depend on; None when it reads every patch.
        part_maps: ``(B, K + 1, H, W)`` soft part maps of a part-discovering model; None for the others.
    """

    @property
    def logits(self) -> torch.Tensor: ...

    @property
    def keep(self) -> torch.Tensor | None: ...

    @property
    def part_maps(self) -> torch.Tensor | None: ...


@runtime_checkable
class TrainableModel(Protocol):
    """A model the engine trains and evaluates.

    Attributes:
        uses_ground_truth_mask: ``forward(images, fg_mask)`` takes the ground-truth foreground mask ``(B, 1, H, W)``
            (the oracle); otherwise ``forward(images)``.
        patch_size: patch side in pixels (an int, or the ``(height, width)`` pair of a square patch).
        loss_weights: the weight of every loss term of :func:`faithful_vit.losses.compute_losses` it trains with.
        area_target: target soft foreground fraction of the ``area`` term (unused when its weight is 0).
        has_frozen_phase: some epochs leave trainable parameters without gradients (DDP is then built with
            ``find_unused_parameters``).
    """

    uses_ground_truth_mask: bool

    @property
    def patch_size(self) -> int | tuple[int, int]: ...

    @property
    def loss_weights(self) -> Mapping[str, float]: ...

    @property
    def area_target(self) -> float: ...

    @property
    def has_frozen_phase(self) -> bool: ...

    def __call__(self, images: torch.Tensor, *args, **kwargs) -> ModelOutput: ...

    def set_epoch(self, epoch: int) -> None:
        """Called before every training epoch (0-based), also when a run resumes mid-epoch."""
        ...

    def param_groups(self, lr: float, weight_decay: float) -> list[dict]:
        """AdamW parameter groups."""
        ...


@runtime_checkable
class EquivariantModel(TrainableModel, Protocol):
    """A :class:`TrainableModel` with the equivariance loss's extra pass."""

    def equivariance_maps(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The part maps of a randomly transformed copy of ``images`` warped back, and the transform."""
        ...
