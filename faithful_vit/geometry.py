"""Rigid and affine warps of image batches in the normalised coordinates of ``torch.nn.functional.affine_grid``.

The equivariance loss (``docs/method.md``, section 5) warps a batch with a random rigid transform, runs stage 1 on
it and warps the part maps back with the inverse.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["invert_affine", "random_rigid_transform", "warp"]


def random_rigid_transform(
    batch: int, img_size: int, degrees: float, translate: float, scale: tuple[float, float], device: torch.device
) -> torch.Tensor:
    """One random rigid transform ``p -> s R p + t`` in the normalised coordinates of ``affine_grid``.

    Returns:
        ``(B, 2, 3)`` the forward transform (the same for the whole batch, as in the paper).
    """
    angle = math.radians((torch.rand(()).item() * 2 - 1) * degrees)
    factor = scale[0] + torch.rand(()).item() * (scale[1] - scale[0])
    max_shift = int(translate * img_size)
    shift = torch.randint(-max_shift, max_shift + 1, (2,)).float() * (2.0 / img_size)
    cos, sin = math.cos(angle) * factor, math.sin(angle) * factor
    forward = torch.tensor([[cos, -sin, shift[0].item()], [sin, cos, shift[1].item()]], device=device)
    return forward.expand(batch, 2, 3)


def invert_affine(theta: torch.Tensor) -> torch.Tensor:
    """Inverse of ``(B, 2, 3)`` affine transforms."""
    linear_inv = torch.linalg.inv(theta[:, :, :2])
    return torch.cat([linear_inv, -linear_inv @ theta[:, :, 2:]], dim=2)


def warp(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Sample ``x`` at ``theta @ p`` for every output position p (bilinear, zeros outside)."""
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
