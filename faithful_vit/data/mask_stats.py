"""How good a patch keep-mask is against ground-truth pixel masks, and how much background it lets through.

Mask IoU alone is misleading for the two-stage model: a mask with a good IoU can still keep boundary patches whose
background pixels carry the spurious cue (``docs/method.md``, section 9). :func:`patch_mask_stats` therefore reports
the background fraction inside kept patches (and, when the dataset provides it, the place-cue fraction) next to IoU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def gt_patch_fraction(fg_masks: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Object fraction of every patch.

    Args:
        fg_masks: ``[B,1,H,W]`` float in [0, 1]; H and W multiples of ``patch_size``.
        patch_size: patch side in pixels.

    Returns:
        ``[B, N]`` float, patches in raster order (the ViT token order).
    """
    if fg_masks.dim() != 4 or fg_masks.shape[1] != 1:
        raise ValueError(f"fg_masks must be [B, 1, H, W], got {tuple(fg_masks.shape)}")
    h, w = fg_masks.shape[-2:]
    if h % patch_size or w % patch_size:
        raise ValueError(f"fg_masks size {h}x{w} is not a multiple of patch_size={patch_size}")
    return F.avg_pool2d(fg_masks.float(), patch_size).flatten(1)


@torch.no_grad()
def patch_mask_stats(
    keep: torch.Tensor,
    fg_masks: torch.Tensor,
    patch_size: int,
    *,
    place_visibility: torch.Tensor | None = None,
    gt_threshold: float = 0.5,
) -> dict[str, float]:
    """Quality and leakage of a patch keep-mask, averaged over the batch (pixel- or patch-weighted as named).

    Args:
        keep: ``[B, N]`` bool, True = patch kept (raster order).
        fg_masks: ``[B,1,H,W]`` ground-truth object masks in [0, 1].
        patch_size: patch side in pixels (``N == (H / patch_size) * (W / patch_size)``).
        place_visibility: optional ``[B,1,H,W]`` in [0, 1], how much of the spurious place texture each pixel shows
            (``SpuriousShapes.place_visibility()``).
        gt_threshold: a ground-truth patch is foreground when its object fraction exceeds this.

    Returns:
        dict with ``kept_frac`` (kept patches / all), ``gt_frac`` (ground-truth patches / all), ``patch_iou``,
        ``patch_precision``, ``patch_recall`` (against the ground-truth patches), ``pixel_iou`` (kept patches as
        pixels against the pixel mask), ``non_object_in_kept`` (fraction of pixels inside kept patches that are not
        object), and ``place_cue_in_kept`` (mean place visibility inside kept patches) when ``place_visibility`` is
        given. Ratios with an empty denominator are 0.
    """
    frac = gt_patch_fraction(fg_masks, patch_size)
    if keep.shape != frac.shape or keep.dtype != torch.bool:
        raise ValueError(f"keep must be bool {tuple(frac.shape)}, got {keep.dtype} {tuple(keep.shape)}")
    keep_f = keep.float()
    gt = (frac > gt_threshold).float()
    inter, union = (keep_f * gt).sum(), ((keep_f + gt) > 0).float().sum()
    kept = keep_f.sum()

    def ratio(num, den):
        return (num / den).item() if den > 0 else 0.0

    object_in_kept = (frac * keep_f).sum()  # in units of patches
    pixel_union = kept + frac.sum() - object_in_kept
    stats = {
        "kept_frac": keep_f.mean().item(),
        "gt_frac": gt.mean().item(),
        "patch_iou": ratio(inter, union),
        "patch_precision": ratio(inter, kept),
        "patch_recall": ratio(inter, gt.sum()),
        "pixel_iou": ratio(object_in_kept, pixel_union),
        "non_object_in_kept": ratio(kept - object_in_kept, kept),
    }
    if place_visibility is not None:
        cue = gt_patch_fraction(place_visibility, patch_size)
        stats["place_cue_in_kept"] = ratio((cue * keep_f).sum(), kept)
    return stats
