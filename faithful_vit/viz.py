"""Figures of a training run (matplotlib, Agg backend: no display needed).

* :func:`plot_masks`: for a few sample images, the image, its ground-truth foreground, the stage-1 part map (argmax
  over the K parts and the background) and the patches stage 2 could read.
* :func:`plot_training_curves`: training loss and validation accuracy / worst-group accuracy per epoch.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from faithful_vit.metrics import keep_to_pixels  # noqa: E402
from faithful_vit.run_folder import atomic_open  # noqa: E402


def _displayable(image: torch.Tensor) -> np.ndarray:
    """``[3, H, W]`` normalised image -> ``[H, W, 3]`` in [0, 1] (per-image min-max, whatever the normalisation)."""
    image = image.float()
    image = (image - image.min()) / (image.max() - image.min()).clamp(min=1e-8)
    return image.permute(1, 2, 0).cpu().numpy()


def plot_masks(
    images: torch.Tensor,
    path: str | Path,
    *,
    fg_masks: torch.Tensor | None = None,
    keep: torch.Tensor | None = None,
    part_maps: torch.Tensor | None = None,
    patch_size: int | None = None,
    title: str = "",
) -> Path:
    """Save a grid with one row per sample: image, ground truth, part map, kept patches.

    Args:
        images: ``[B, 3, H, W]``.
        path: PNG file to write.
        fg_masks: ``[B, 1, H, W]`` ground-truth foreground, or None.
        keep: ``[B, N]`` bool kept patches, or None (a model that reads every patch).
        part_maps: ``[B, K + 1, h, w]`` soft part maps (last channel: background), or None.
        patch_size: patch side in pixels; needed with ``keep``.
        title: figure title.

    Returns:
        ``path``.
    """
    columns = ["image"] + ["ground truth"] * (fg_masks is not None) + ["parts (argmax)"] * (part_maps is not None)
    columns += ["kept patches"] * (keep is not None)
    rows = images.shape[0]
    figure, axes = plt.subplots(rows, len(columns), figsize=(2.2 * len(columns), 2.2 * rows), squeeze=False)
    kept_pixels = None if keep is None else keep_to_pixels(keep.cpu(), tuple(images.shape[-2:]), patch_size)
    for row in range(rows):
        picture = _displayable(images[row])
        panels = [picture]
        if fg_masks is not None:
            panels.append(fg_masks[row, 0].float().cpu().numpy())
        if part_maps is not None:
            parts = part_maps[row].float().argmax(0, keepdim=True)[None].float()
            panels.append(torch.nn.functional.interpolate(parts, size=images.shape[-2:], mode="nearest")[0, 0].numpy())
        if kept_pixels is not None:
            panels.append(picture * (0.25 + 0.75 * kept_pixels[row, 0, :, :, None].float().numpy()))
        for column, (axis, panel) in enumerate(zip(axes[row], panels)):
            is_parts = columns[column].startswith("parts")
            axis.imshow(
                panel, cmap="tab10" if is_parts else "gray", vmin=0, vmax=9 if is_parts else 1, interpolation="nearest"
            )
            axis.set_xticks([])
            axis.set_yticks([])
            if row == 0:
                axis.set_title(columns[column], fontsize=9)
    figure.suptitle(title)
    return _save(figure, path)


def plot_training_curves(histories: dict[str, list[dict]], path: str | Path) -> Path:
    """Save training loss and validation (worst-group) accuracy per epoch, one line per model.

    Args:
        histories: model name -> per-epoch rows with ``epoch``, ``train_total``, ``val_accuracy`` and
            ``val_worst_group_accuracy`` (the rows of ``metrics.jsonl``).
        path: PNG file to write.

    Returns:
        ``path``.
    """
    figure, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    panels = [
        ("train_total", "training loss"),
        ("val_accuracy", "validation accuracy"),
        ("val_worst_group_accuracy", "validation worst-group accuracy"),
    ]
    for axis, (key, label) in zip(axes, panels):
        for name, rows in histories.items():
            epochs = [row["epoch"] for row in rows if row.get(key) is not None]
            axis.plot(epochs, [row[key] for row in rows if row.get(key) is not None], marker="o", label=name)
        axis.set_xlabel("epoch")
        axis.set_title(label, fontsize=10)
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    return _save(figure, path)


def _save(figure, path: str | Path) -> Path:
    """Lay out, write as PNG (atomically, creating the folder) and close ``figure``; returns the path."""
    figure.tight_layout()
    path = Path(path)
    try:
        with atomic_open(path, "wb") as handle:
            figure.savefig(handle, format="png", dpi=100)
    finally:
        plt.close(figure)
    return path
