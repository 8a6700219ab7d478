"""Evaluation metrics for spurious-correlation benchmarks, accumulated on device without host synchronisation.

A :class:`MetricAccumulator` adds up per-group counts and mask statistics batch by batch (all tensors stay on the
model's device), can be all-reduced across processes, and turns into plain floats once, in :meth:`compute`.

Mask metrics compare the stage-2 keep mask over patch tokens with the ground-truth foreground:

* ``mask_iou``: IoU between the pixels covered by kept patches and the ground-truth foreground pixels;
* ``mask_iou_patch``: IoU between kept patches and ground-truth patches (foreground fraction > ``patch_threshold``);
* ``background_in_kept``: fraction of the pixels inside kept patches that are background (the "leak");
* ``object_recall``: fraction of the ground-truth foreground pixels that lie inside kept patches (the mask covers the
  object when it is near 1);
* ``kept_fraction``: fraction of patch tokens kept.
"""

from __future__ import annotations

import torch

from faithful_vit.data.mask_stats import gt_patch_fraction


def keep_to_pixels(keep: torch.Tensor, image_size: tuple[int, int], patch_size: int) -> torch.Tensor:
    """Expand a patch keep mask to a pixel mask.

    Args:
        keep: ``[B, N]`` bool over patches in raster order, ``N = (H // patch_size) * (W // patch_size)``.
        image_size: ``(H, W)`` in pixels.
        patch_size: side of a square patch in pixels.

    Returns:
        ``[B, 1, H, W]`` bool.
    """
    grid_h, grid_w = image_size[0] // patch_size, image_size[1] // patch_size
    if keep.dim() != 2 or keep.shape[1] != grid_h * grid_w:
        raise ValueError(f"keep: expected shape [B, {grid_h * grid_w}], got {tuple(keep.shape)}")
    grid = keep.view(-1, 1, grid_h, grid_w)
    return grid.repeat_interleave(patch_size, dim=2).repeat_interleave(patch_size, dim=3)


class MetricAccumulator:
    """Accumulates accuracy per group and mask statistics over batches, on device.

    Args:
        num_groups: number of groups (a group is e.g. a (label, place) pair); worst-group accuracy is the minimum
            accuracy over the groups that occur.
        device: where the running sums live.
        patch_threshold: a patch is ground-truth foreground when its foreground fraction exceeds this.
    """

    _MASK_KEYS = (
        "kept_patches",
        "total_patches",
        "kept_fg_px",
        "kept_px",
        "fg_px",
        "union_px",
        "total_px",
        "both_patches",
        "union_patches",
    )

    def __init__(self, num_groups: int, device: torch.device | str = "cpu", patch_threshold: float = 0.5):
        self.num_groups = num_groups
        self.patch_threshold = patch_threshold
        self.correct = torch.zeros(num_groups, dtype=torch.float64, device=device)
        self.count = torch.zeros(num_groups, dtype=torch.float64, device=device)
        self.mask_sums = torch.zeros(len(self._MASK_KEYS), dtype=torch.float64, device=device)
        self.has_mask = False
        self.has_keep = False

    def update(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        groups: torch.Tensor,
        keep: torch.Tensor | None = None,
        fg_mask: torch.Tensor | None = None,
        patch_size: int | None = None,
    ) -> None:
        """Add one batch.

        Args:
            logits: ``[B, num_classes]``.
            labels: ``[B]`` int64.
            groups: ``[B]`` int64 in ``[0, num_groups)``.
            keep: ``[B, N]`` bool patch keep mask, or None for a model that sees every patch.
            fg_mask: ``[B, 1, H, W]`` ground-truth foreground, or None when the dataset has none.
            patch_size: patch side in pixels; needed when ``fg_mask`` is given.
        """
        hit = (logits.argmax(dim=1) == labels).double()
        self.correct.index_add_(0, groups, hit)
        self.count.index_add_(0, groups, torch.ones_like(hit))
        if keep is not None:
            self.has_keep = True
            self.mask_sums[0] += keep.sum()
            self.mask_sums[1] += keep.numel()
        if fg_mask is None or patch_size is None:
            return
        self.has_mask = True
        fg_fraction = gt_patch_fraction(fg_mask, patch_size)
        if keep is None:
            keep = torch.ones_like(fg_fraction, dtype=torch.bool)
        fg_pixels = fg_mask > 0.5
        kept_pixels = keep_to_pixels(keep, tuple(fg_mask.shape[-2:]), patch_size)
        gt_patches = fg_fraction > self.patch_threshold
        self.mask_sums[2:] += torch.stack(
            [
                (kept_pixels & fg_pixels).sum(),
                kept_pixels.sum(),
                fg_pixels.sum(),
                (kept_pixels | fg_pixels).sum(),
                # torch.full, not torch.tensor: a fill kernel instead of a host-to-device copy that would synchronise.
                torch.full((), fg_pixels.numel(), device=keep.device, dtype=torch.long),
                (keep & gt_patches).sum(),
                (keep | gt_patches).sum(),
            ]
        ).double()

    def all_reduce(self) -> None:
        """Sum the running totals over all processes (a no-op outside torch.distributed)."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            for tensor in (self.correct, self.count, self.mask_sums):
                torch.distributed.all_reduce(tensor)

    def compute(self) -> dict[str, float | list[float] | None]:
        """The metrics as Python floats (one host synchronisation).

        Returns:
            ``accuracy``, ``worst_group_accuracy``, ``group_accuracy`` (a list, NaN for an empty group),
            ``group_count``, and, when masks were seen, ``mask_iou``, ``mask_iou_patch``, ``background_in_kept``,
            ``object_recall``, ``kept_fraction`` (None where undefined).
        """
        correct, count = self.correct.cpu(), self.count.cpu()
        sums = dict(zip(self._MASK_KEYS, self.mask_sums.cpu().tolist()))
        group_acc = torch.where(count > 0, correct / count.clamp(min=1), torch.full_like(count, float("nan")))
        present = count > 0
        result: dict[str, float | list[float] | None] = {
            "accuracy": float(correct.sum() / count.sum().clamp(min=1)),
            "worst_group_accuracy": float(group_acc[present].min()) if present.any() else float("nan"),
            "group_accuracy": group_acc.tolist(),
            "group_count": [int(c) for c in count.tolist()],
        }

        def ratio(num: float, den: float) -> float | None:
            return num / den if den > 0 else None

        result["kept_fraction"] = ratio(sums["kept_patches"], sums["total_patches"]) if self.has_keep else 1.0
        if self.has_mask:
            result["mask_iou"] = ratio(sums["kept_fg_px"], sums["union_px"])
            result["mask_iou_patch"] = ratio(sums["both_patches"], sums["union_patches"])
            kept_fg = ratio(sums["kept_fg_px"], sums["kept_px"])
            result["background_in_kept"] = None if kept_fg is None else 1.0 - kept_fg
            result["object_recall"] = ratio(sums["kept_fg_px"], sums["fg_px"])
            result["foreground_fraction"] = ratio(sums["fg_px"], sums["total_px"])
        return result


SUMMARY_KEYS = (
    "accuracy",
    "worst_group_accuracy",
    "mask_iou",
    "mask_iou_patch",
    "background_in_kept",
    "object_recall",
    "kept_fraction",
    "images_per_second",
    "train_images_per_second",
    "peak_memory_mb",
)


def summarize_seeds(per_seed: list[dict]) -> dict:
    """Mean (and sample standard deviation over seeds, ``<key>_std``) of each test metric of one model.

    Args:
        per_seed: the test metrics of each seed (dicts with the keys of :data:`SUMMARY_KEYS` and
            ``group_accuracy``).

    Returns:
        ``{key: mean, key_std: std, ..., "group_accuracy": per-group mean, "num_seeds": n, "per_seed": per_seed}``;
        a metric missing (None) in any seed is None.
    """
    summary: dict = {"num_seeds": len(per_seed)}
    for key in SUMMARY_KEYS:
        values = [run.get(key) for run in per_seed]
        if any(value is None for value in values):
            summary[key], summary[f"{key}_std"] = None, None
            continue
        tensor = torch.tensor(values, dtype=torch.float64)
        summary[key] = float(tensor.mean())
        summary[f"{key}_std"] = float(tensor.std()) if len(values) > 1 else 0.0
    groups = torch.tensor([run["group_accuracy"] for run in per_seed], dtype=torch.float64)
    summary["group_accuracy"] = groups.mean(0).tolist()
    summary["per_seed"] = per_seed
    return summary


TABLE_COLUMNS = (
    ("accuracy", "acc", 100),
    ("worst_group_accuracy", "worst-group", 100),
    ("mask_iou", "mask IoU", 1),
    ("background_in_kept", "bg in kept", 1),
    ("object_recall", "object kept", 1),
    ("kept_fraction", "kept", 1),
    ("images_per_second", "img/s", 1),
)


def format_table(summaries: dict[str, dict]) -> str:
    """A plain-text side-by-side table: one row per model, mean ± std over seeds when there are several."""

    def cell(summary: dict, key: str, scale: float) -> str:
        value, std = summary.get(key), summary.get(f"{key}_std")
        if value is None:
            return "-"
        digits = 0 if key == "images_per_second" else (1 if scale == 100 else 3)
        text = f"{value * scale:.{digits}f}"
        return f"{text} ± {std * scale:.{digits}f}" if summary.get("num_seeds", 1) > 1 and std is not None else text

    header = ["model"] + [title + (" %" if scale == 100 else "") for _, title, scale in TABLE_COLUMNS]
    rows = [
        [name] + [cell(summary, key, scale) for key, _, scale in TABLE_COLUMNS] for name, summary in summaries.items()
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(
            text.ljust(width) if i == 0 else text.rjust(width) for i, (text, width) in enumerate(zip(row, widths))
        )
        for row in [header, *rows]
    ]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)
