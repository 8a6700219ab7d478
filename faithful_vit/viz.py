"""Figures of a training run and of an evaluation (matplotlib, Agg backend: no display needed).

* :func:`plot_masks`: for sample images, the image, its ground-truth foreground, the stage-1 part map (argmax over
  the K parts and the background, over the image, with a legend), the patches stage 2 could read and, for the
  full-image baseline, its attention rollout; the training figures and ``python -m faithful_vit.predict`` (one
  image, and contact sheets) both draw with it.
* :class:`AttentionRecorder` and :func:`attention_rollout`: the attention rollout of a timm ViT (Abnar & Zuidema,
  2020), recorded during an ordinary forward.
* :func:`plot_training_curves`: training loss and validation accuracy / worst-group accuracy per epoch.
* :func:`plot_thresholds` and :func:`plot_remove_parts`: the ``thresholds`` and ``remove_parts`` protocols of
  ``python -m faithful_vit.evaluate``, from the series :func:`thresholds_series` and :func:`remove_parts_series`
  prepare.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from mpl_toolkits.axes_grid1 import make_axes_locatable  # noqa: E402

from faithful_vit.baseline import FullImageViT  # noqa: E402
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


def rollout_recorder(model: nn.Module) -> AttentionRecorder | nullcontext:
    """What to open around a forward of ``model`` for its figures' attention rollout.

    The full-image baseline (no mask, no parts: its figures show the rollout) gets an :class:`AttentionRecorder` of
    its ViT; every other model a context that records nothing and opens as None.
    """
    if isinstance(model, FullImageViT) and not model.uses_ground_truth_mask:
        return AttentionRecorder(model.vit)
    return nullcontext()


class AttentionRecorder:
    """While open, records every block's attention probabilities (the mean over heads) of a timm ViT's forwards.

    The forward is left as it is: a hook on each block's ``attn.qkv`` recomputes the probabilities from its output
    (``softmax(q k^T * scale)`` after the attention's ``q_norm`` / ``k_norm``), so fused and unfused timm attention
    and our :class:`~faithful_vit.attention.MaskedAttention` on the full token sequence all give the same record.

    Args:
        vit: a timm ``VisionTransformer`` (or one :func:`~faithful_vit.sparsify` converted).

    Raises:
        TypeError: a block whose attention has no ``qkv`` projection with ``num_heads``, ``head_dim``, ``scale``,
            ``q_norm`` and ``k_norm``.
    """

    ATTENTION_MEMBERS = ("qkv", "num_heads", "head_dim", "scale", "q_norm", "k_norm")

    def __init__(self, vit: nn.Module):
        for index, block in enumerate(vit.blocks):
            attn = getattr(block, "attn", None)
            missing = [name for name in self.ATTENTION_MEMBERS if not hasattr(attn, name)]
            if missing:
                raise TypeError(
                    f"vit: expected blocks with a timm-style attention, block {index}'s {type(attn).__name__} "
                    f"lacks {missing}"
                )
        self.vit = vit
        self.attentions: list[torch.Tensor] = []
        self._hooks = []

    def __enter__(self) -> AttentionRecorder:
        self.attentions = []
        self._hooks = [
            block.attn.qkv.register_forward_hook(partial(self._record, block.attn)) for block in self.vit.blocks
        ]
        return self

    def __exit__(self, *exc_info) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def _record(self, attn: nn.Module, _qkv: nn.Module, _inputs, output: torch.Tensor) -> None:
        if output.ndim != 3:
            raise ValueError(
                f"attention rollout: expected the qkv projection of a [B, T, C] token sequence, got shape "
                f"{tuple(output.shape)} (a packed sequence of kept tokens has no full attention matrix)"
            )
        batch, tokens, _ = output.shape
        q, k, _ = output.detach().reshape(batch, tokens, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k = attn.q_norm(q).float(), attn.k_norm(k).float()
        self.attentions.append((q * attn.scale @ k.transpose(-2, -1)).softmax(dim=-1).mean(dim=1))

    def rollout(self) -> torch.Tensor:
        """``[B, h, w]`` the :func:`attention_rollout` of the forward recorded last (one per block), on the CPU."""
        depth = len(self.vit.blocks)
        if len(self.attentions) < depth:
            raise ValueError(f"attention rollout: expected {depth} recorded blocks, got {len(self.attentions)}")
        return attention_rollout(
            self.attentions[-depth:],
            num_prefix_tokens=self.vit.num_prefix_tokens,
            grid=tuple(self.vit.patch_embed.grid_size),
            from_class_token=self.vit.global_pool == "token",
        ).cpu()


def attention_rollout(
    attentions: Sequence[torch.Tensor], num_prefix_tokens: int, grid: tuple[int, int], from_class_token: bool = True
) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema, 2020): how much each patch flows into the pooled token through all layers.

    Each layer's head-mean attention ``A`` becomes ``0.5 * A + 0.5 * I`` (the residual), renormalised per row; the
    layers are multiplied, the first on the right. The row read is the CLS token's (``from_class_token``) or, for a
    ViT that pools the patch tokens, the mean of the patch rows; over the patches it is renormalised to sum to 1.

    Args:
        attentions: per block, first block first, ``[B, T, T]`` attention probabilities averaged over heads.
        num_prefix_tokens: CLS and register tokens before the patches.
        grid: ``(h, w)`` patches, ``h * w = T - num_prefix_tokens``.
        from_class_token: read the CLS token's row (the first token) rather than the mean patch row.

    Returns:
        ``[B, h, w]`` each patch's share of the rollout, summing to 1 per image.
    """
    tokens = attentions[0].shape[-1]
    if tokens != num_prefix_tokens + grid[0] * grid[1]:
        raise ValueError(
            f"grid: expected {tokens} - {num_prefix_tokens} prefix tokens = {tokens - num_prefix_tokens} patches, "
            f"got {grid}"
        )
    identity = torch.eye(tokens, dtype=attentions[0].dtype, device=attentions[0].device)
    rollout = identity
    for attention in attentions:
        residual = 0.5 * attention + 0.5 * identity
        rollout = (residual / residual.sum(dim=-1, keepdim=True)) @ rollout
    if from_class_token:
        patches = rollout[:, 0, num_prefix_tokens:]
    else:
        patches = rollout[:, num_prefix_tokens:, num_prefix_tokens:].mean(dim=1)
    patches = patches / patches.sum(dim=-1, keepdim=True)
    return patches.reshape(-1, *grid)


def plot_masks(
    images: torch.Tensor,
    path: str | Path,
    *,
    fg_masks: torch.Tensor | None = None,
    keep: torch.Tensor | None = None,
    part_maps: torch.Tensor | None = None,
    patch_size: int | None = None,
    rollout: torch.Tensor | None = None,
    title: str = "",
    sample_titles: list[str] | None = None,
    samples_per_row: int = 1,
) -> Path:
    """Save a grid of samples, each as panels: image, ground truth, part map over the image, kept patches, rollout.

    The part map colours every patch by its most likely part (the background in dark grey), over the image; a legend
    names the colours. Kept patches are shown at full brightness, dropped ones dimmed. The attention rollout is a
    heat map over the image with a colour bar of each patch's share.

    Args:
        images: ``[B, 3, H, W]``.
        path: PNG file to write.
        fg_masks: ``[B, 1, H, W]`` ground-truth foreground, or None.
        keep: ``[B, N]`` bool kept patches, or None (a model that reads every patch).
        part_maps: ``[B, K + 1, h, w]`` soft part maps (last channel: background), or None.
        patch_size: patch side in pixels; needed with ``keep``.
        rollout: ``[B, h, w]`` attention rollout (:func:`attention_rollout`), or None.
        title: figure title.
        sample_titles: one title per sample (e.g. its prediction), shown over its image panel.
        samples_per_row: samples side by side in one row of the grid (a contact sheet).

    Returns:
        ``path``.
    """
    columns = ["image"] + ["ground truth"] * (fg_masks is not None) + ["parts"] * (part_maps is not None)
    columns += ["kept patches"] * (keep is not None) + ["attention rollout"] * (rollout is not None)
    count, per_row = images.shape[0], max(1, min(samples_per_row, images.shape[0]))
    rows = -(-count // per_row)
    size = 2.2 if sample_titles is None else 2.4
    width = size * len(columns) * per_row + 0.5 * (rollout is not None) * per_row  # room for the colour bars
    figure, axes = plt.subplots(rows, len(columns) * per_row, figsize=(width, size * rows + 0.6), squeeze=False)
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
        if rollout is not None:  # in grey under the heat map, so that colour is the rollout's alone
            panels.append(np.repeat(picture.mean(axis=2, keepdims=True), 3, axis=2))
        row, first = divmod(sample, per_row)
        for column, panel in enumerate(panels):
            axis = axes[row, first * len(columns) + column]
            axis.imshow(np.clip(panel, 0, 1), interpolation="nearest")
            if rollout is not None and column == len(columns) - 1:
                _draw_rollout(figure, axis, rollout[sample], picture.shape[:2])
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


def _draw_rollout(figure, axis, rollout: torch.Tensor, image_size: tuple[int, int]) -> None:
    """The rollout ``[h, w]`` as a heat map over the image already drawn on ``axis``, a colour bar beside it.

    The colours span the image's own range (its smallest to its largest share): a nearly flat rollout still shows
    where it peaks, and the colour bar's ticks tell how flat it is.
    """
    height, width = image_size
    heat = axis.imshow(
        rollout.float().cpu().numpy(),
        cmap="inferno",
        alpha=0.75,
        extent=(-0.5, width - 0.5, height - 0.5, -0.5),
        interpolation="nearest",
    )
    bar = figure.colorbar(heat, cax=make_axes_locatable(axis).append_axes("right", size="6%", pad=0.04))
    bar.ax.tick_params(labelsize=6)
    bar.set_label("share of the rollout", fontsize=7, labelpad=1)


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


def thresholds_series(result: dict) -> dict:
    """What :func:`plot_thresholds` draws, from the ``thresholds`` protocol's result of ``evaluate``.

    Returns:
        ``quantile`` (the x values) and, per quantile, ``accuracy``, ``worst_group_accuracy`` and ``kept_fraction``;
        ``uncalibrated``: the same three without thresholds (the reference lines).
    """
    keys = ("accuracy", "worst_group_accuracy", "kept_fraction")
    rows = result["quantiles"]
    return {
        "quantile": [row["quantile"] for row in rows],
        **{key: [row[key] for row in rows] for key in keys},
        "uncalibrated": {key: result["without"][key] for key in keys},
    }


def plot_thresholds(result: dict, path: str | Path, title: str = "") -> Path:
    """Save accuracy, worst-group accuracy and the kept fraction against the calibration quantile.

    Args:
        result: the ``thresholds`` protocol's result (``without`` and ``quantiles``).
        path: PNG file to write.
        title: figure title.

    Returns:
        ``path``.
    """
    series = thresholds_series(result)
    figure, (accuracy_axis, kept_axis) = plt.subplots(1, 2, figsize=(10, 3.8))
    panels = [
        (accuracy_axis, ("accuracy", "worst_group_accuracy"), 100.0, "accuracy (%)"),
        (kept_axis, ("kept_fraction",), 1.0, "kept fraction of the patches"),
    ]
    for axis, keys, scale, unit in panels:
        for key, colour in zip(keys, ("tab:blue", "tab:red")):
            label = key.replace("_", " ").replace("worst group", "worst-group")
            values = [scale * value for value in series[key]]
            axis.plot(series["quantile"], values, marker="o", color=colour, label=f"{label}, calibrated")
            uncalibrated = scale * series["uncalibrated"][key]
            axis.axhline(uncalibrated, color=colour, linestyle="--", alpha=0.7, label=f"{label}, no thresholds")
        axis.set_xlabel("per-part confidence quantile")
        axis.set_ylabel(unit)
        axis.set_xticks(series["quantile"])
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.suptitle(title, fontsize=10)
    return _save(figure, path)


# More groups than this (e.g. the 200 classes of CUB as groups) are summarised by the overall and worst-group drops.
PER_GROUP_LIMIT = 16


def remove_parts_series(result: dict, group_names: Sequence[str]) -> dict:
    """What :func:`plot_remove_parts` draws, from the ``remove_parts`` protocol's result of ``evaluate``.

    Returns:
        ``labels``: ``overall``, ``worst group`` and, up to :data:`PER_GROUP_LIMIT` groups, the group names;
        ``parts``: the removed parts; ``drops``: per part, the accuracy drop (full model minus part removed) at each
        label.
    """
    if len(group_names) != len(result["group_accuracy"]):
        raise ValueError(
            f"group_names: expected {len(result['group_accuracy'])} names (one per group), got {len(group_names)}"
        )
    per_group = len(group_names) <= PER_GROUP_LIMIT
    drops = []
    for part in result["parts"]:
        row = [part["accuracy_drop"], result["worst_group_accuracy"] - part["worst_group_accuracy"]]
        drops.append(row + (part["group_accuracy_drop"] if per_group else []))
    return {
        "labels": ["overall", "worst group", *(group_names if per_group else [])],
        "parts": [part["part"] for part in result["parts"]],
        "drops": drops,
    }


def plot_remove_parts(result: dict, group_names: Sequence[str], path: str | Path, title: str = "") -> Path:
    """Save the accuracy drop with each part removed, overall, on the worst group and per group, as grouped bars.

    Each part's bars have its colour of :func:`part_colours` (the part maps' colours), named in the legend.

    Args:
        result: the ``remove_parts`` protocol's result.
        group_names: the data's group names, in the order of ``group_accuracy``.
        path: PNG file to write.
        title: figure title.

    Returns:
        ``path``.
    """
    series = remove_parts_series(result, group_names)
    labels, parts = series["labels"], series["parts"]
    colours = part_colours(len(parts))
    width = 0.8 / len(parts)
    figure, axis = plt.subplots(figsize=(max(6.0, 1.0 + 0.3 * len(labels) * len(parts)), 4.0))
    centres = np.arange(len(labels))
    for index, (part, drops) in enumerate(zip(parts, series["drops"])):
        offsets = centres - 0.4 + width * (index + 0.5)
        axis.bar(offsets, [100 * drop for drop in drops], width, color=colours[part], label=f"part {part}")
    axis.axhline(0.0, color="black", linewidth=0.8)
    axis.set_xticks(centres, labels, rotation=30 if len(labels) > 4 else 0, ha="right" if len(labels) > 4 else "center")
    axis.set_ylabel("accuracy drop (percentage points)")
    per_group = len(labels) > 2
    axis.set_xlabel(
        "images: all, the worst group, each group"
        if per_group
        else f"images: all, the worst group (the drops in each of the {len(group_names)} groups: in the JSON)"
    )
    axis.grid(axis="y", alpha=0.3)
    axis.legend(fontsize=8, ncol=min(len(parts), 8))
    axis.set_title(title, fontsize=10)
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
