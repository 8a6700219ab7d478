"""Figures of a training run (matplotlib, Agg backend: no display needed).

* :func:`plot_masks`: for sample images, the image, its ground-truth foreground, the stage-1 part map (argmax over
  the K parts and the background, over the image, with a legend) and the patches stage 2 could read; the training
  figures and ``python -m faithful_vit.predict`` (one image, and contact sheets) both draw with it.
* :func:`plot_training_curves`: training loss and validation accuracy / worst-group accuracy per epoch.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from faithful_vit.metrics import keep_to_pixels  # noqa: E402
from faithful_vit.run_folder import atomic_open  # noqa: E402

BACKGROUND_COLOUR = (0.12, 0.12, 0.12)


def part_colours(num_parts: int) -> np.ndarray:
    """``[K + 1, 3]`` RGB in [0, 1]: a distinct colour per foreground part, then the background's dark grey."""
    cmap = plt.get_cmap("tab10" if num_parts <= 10 else "tab20")
    parts = [cmap(k % cmap.N)[:3] for k in range(num_parts)]
    return np.array([*parts, BACKGROUND_COLOUR], dtype=np.float32)


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
    sample_titles: list[str] | None = None,
    samples_per_row: int = 1,
) -> Path:
    """Save a grid of samples, each as panels: image, ground truth, part map over the image, kept patches.

    The part map colours every patch by its most likely part (the background in dark grey), over the image; a legend
    names the colours. Kept patches are shown at full brightness, dropped ones dimmed.

    Args:
        images: ``[B, 3, H, W]``.
        path: PNG file to write.
        fg_masks: ``[B, 1, H, W]`` ground-truth foreground, or None.
        keep: ``[B, N]`` bool kept patches, or None (a model that reads every patch).
        part_maps: ``[B, K + 1, h, w]`` soft part maps (last channel: background), or None.
        patch_size: patch side in pixels; needed with ``keep``.
        title: figure title.
        sample_titles: one title per sample (e.g. its prediction), shown over its image panel.
        samples_per_row: samples side by side in one row of the grid (a contact sheet).

    Returns:
        ``path``.
    """
    columns = ["image"] + ["ground truth"] * (fg_masks is not None) + ["parts"] * (part_maps is not None)
    columns += ["kept patches"] * (keep is not None)
    count, per_row = images.shape[0], max(1, min(samples_per_row, images.shape[0]))
    rows = -(-count // per_row)
    size = 2.2 if sample_titles is None else 2.4
    figure, axes = plt.subplots(
        rows, len(columns) * per_row, figsize=(size * len(columns) * per_row, size * rows + 0.6), squeeze=False
    )
    kept_pixels = None if keep is None else keep_to_pixels(keep.cpu(), tuple(images.shape[-2:]), patch_size)
    colours = None if part_maps is None else part_colours(part_maps.shape[1] - 1)
    for axis in axes.flat:
        axis.axis("off")
    for sample in range(count):
        picture = _displayable(images[sample])
        panels = [picture]
        if fg_masks is not None:
            panels.append(np.repeat(fg_masks[sample, 0].float().cpu().numpy()[..., None], 3, axis=2))
        if part_maps is not None:
            parts = part_maps[sample].float().argmax(0, keepdim=True)[None].float()
            parts = torch.nn.functional.interpolate(parts, size=images.shape[-2:], mode="nearest")[0, 0].long()
            panels.append(0.35 * picture + 0.65 * colours[parts.numpy()])
        if kept_pixels is not None:
            panels.append(picture * (0.25 + 0.75 * kept_pixels[sample, 0, :, :, None].float().numpy()))
        row, first = divmod(sample, per_row)
        for column, panel in enumerate(panels):
            axis = axes[row, first * len(columns) + column]
            axis.imshow(np.clip(panel, 0, 1), interpolation="nearest")
            axis.axis("on")
            axis.set_xticks([])
            axis.set_yticks([])
            if sample_titles is not None and column == 0:
                axis.set_title(sample_titles[sample], fontsize=9)
            elif row == 0:
                axis.set_title(columns[column], fontsize=9)
    figure.suptitle(title)
    bottom = 0.0
    if colours is not None:
        handles = [Patch(color=colour, label=f"part {k}") for k, colour in enumerate(colours[:-1])]
        handles.append(Patch(color=colours[-1], label="background"))
        figure.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
        bottom = 0.45 / (size * rows + 0.6)
    return _save(figure, path, rect=(0, bottom, 1, 1))


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


def _save(figure, path: str | Path, rect: tuple[float, float, float, float] | None = None) -> Path:
    """Lay out (inside ``rect``), write as PNG (atomically, creating the folder) and close ``figure``."""
    figure.tight_layout(rect=rect)
    path = Path(path)
    try:
        with atomic_open(path, "wb") as handle:
            figure.savefig(handle, format="png", dpi=100)
    finally:
        plt.close(figure)
    return path
