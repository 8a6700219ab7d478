"""Binary morphology of patch masks ``(B, H * W)`` bool on an ``H x W`` grid, with a 4-neighbour cross by default.

The two-stage model's optional clean-up of the kept patches (``FaithfulViTConfig.mask_morphology``) uses
:data:`KEEP_MORPHOLOGY`; ``benchmarks/oracle_ceilings.py`` grows ground-truth masks with :func:`dilate_keep`. Patches
outside the grid count as dropped.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["KEEP_MORPHOLOGY", "dilate_keep", "erode_keep", "open_keep", "reconstruct_keep"]


def _cross_neighbourhood(keep: torch.Tensor, grid_size: tuple[int, int]) -> tuple[torch.Tensor, ...]:
    """Each patch and its 4 neighbours as 5 ``(B, H, W)`` views; patches outside the grid count as dropped."""
    grid = F.pad(keep.view(-1, *grid_size), (1, 1, 1, 1), value=False)
    return grid[:, 1:-1, 1:-1], grid[:, :-2, 1:-1], grid[:, 2:, 1:-1], grid[:, 1:-1, :-2], grid[:, 1:-1, 2:]


def erode_keep(keep: torch.Tensor, grid_size: tuple[int, int]) -> torch.Tensor:
    """4-neighbour binary erosion of a patch mask ``(B, H * W)`` bool: kept iff the patch and its 4 neighbours are."""
    centre, up, down, left, right = _cross_neighbourhood(keep, grid_size)
    return (centre & up & down & left & right).reshape(keep.shape)


def dilate_keep(keep: torch.Tensor, grid_size: tuple[int, int], connectivity: int = 4) -> torch.Tensor:
    """Binary dilation of a patch mask ``(B, H * W)`` bool: kept iff the patch or a neighbour is.

    Args:
        connectivity: 4 (the cross: up, down, left, right) or 8 (the 3 x 3 square, diagonals included).
    """
    if connectivity == 8:
        grid = keep.view(-1, 1, *grid_size).float()
        return (F.max_pool2d(grid, 3, stride=1, padding=1) > 0).reshape(keep.shape)
    if connectivity != 4:
        raise ValueError(f"connectivity: expected 4 or 8, got {connectivity!r}")
    centre, up, down, left, right = _cross_neighbourhood(keep, grid_size)
    return (centre | up | down | left | right).reshape(keep.shape)


def open_keep(keep: torch.Tensor, grid_size: tuple[int, int]) -> torch.Tensor:
    """4-neighbour binary opening (erosion, then dilation) of a patch mask ``(B, H * W)`` bool; a subset of ``keep``."""
    return dilate_keep(erode_keep(keep, grid_size), grid_size)


def reconstruct_keep(keep: torch.Tensor, grid_size: tuple[int, int]) -> torch.Tensor:
    """Opening by reconstruction of a patch mask ``(B, H * W)`` bool: the 4-connected regions of ``keep`` that hold
    at least one full 4-neighbour cross, unchanged; the other regions are dropped.

    Removes the same specks as :func:`open_keep` (a region disappears iff the erosion leaves nothing of it) but keeps
    the shape of every region it keeps: the opening turns a 3 x 3 block into a plus, and so draws the same plus for a
    small ellipse as for a cross.
    """
    region = erode_keep(keep, grid_size)
    # Geodesic dilation inside ``keep``; a fixed number of steps (the longest path in the grid) keeps it sync-free.
    for _ in range(grid_size[0] * grid_size[1]):
        region = dilate_keep(region, grid_size) & keep
    return region


# The clean-ups ``FaithfulViTConfig.mask_morphology`` names (besides "none").
KEEP_MORPHOLOGY = {"erode": erode_keep, "open": open_keep, "reconstruct": reconstruct_keep}
