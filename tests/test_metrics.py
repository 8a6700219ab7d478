"""Metrics: hand-computed accuracies, group accuracies and mask statistics; seed summaries and the table."""

import math

import pytest
import torch

from faithful_vit.data import gt_patch_fraction
from faithful_vit.metrics import (
    MetricAccumulator,
    format_table,
    keep_to_pixels,
    summarize_seeds,
)


def test_patch_foreground_fraction_and_keep_to_pixels_are_raster_order():
    fg = torch.zeros(1, 1, 4, 6)
    fg[0, 0, :2, 2:4] = 1  # patch (0, 1) full
    fg[0, 0, 2, 4] = 1  # patch (1, 2) a quarter
    fraction = gt_patch_fraction(fg, 2)
    assert fraction.shape == (1, 6)
    torch.testing.assert_close(fraction, torch.tensor([[0.0, 1.0, 0.0, 0.0, 0.0, 0.25]]))
    pixels = keep_to_pixels(fraction > 0.5, (4, 6), 2)
    expected = torch.zeros(1, 1, 4, 6, dtype=torch.bool)
    expected[0, 0, :2, 2:4] = True  # only the full patch passes the 0.5 threshold
    assert torch.equal(pixels, expected)


def test_bad_shapes_name_the_argument():
    with pytest.raises(ValueError, match="fg_mask"):
        gt_patch_fraction(torch.zeros(1, 4, 4), 2)
    with pytest.raises(ValueError, match="multiple"):
        gt_patch_fraction(torch.zeros(1, 1, 5, 4), 2)
    with pytest.raises(ValueError, match="keep"):
        keep_to_pixels(torch.zeros(1, 5, dtype=torch.bool), (4, 4), 2)


def test_group_accuracies_and_worst_group():
    acc = MetricAccumulator(num_groups=4)
    logits = torch.tensor([[1.0, 0], [1, 0], [0, 1], [0, 1], [1, 0], [0, 1]])
    labels = torch.tensor([0, 1, 1, 1, 0, 0])
    groups = torch.tensor([0, 0, 1, 1, 3, 3])
    acc.update(logits[:3], labels[:3], groups[:3])
    acc.update(logits[3:], labels[3:], groups[3:])
    result = acc.compute()
    assert result["accuracy"] == pytest.approx(4 / 6)
    assert result["group_accuracy"][:2] == [0.5, 1.0] and math.isnan(result["group_accuracy"][2])
    assert result["group_accuracy"][3] == 0.5
    assert result["worst_group_accuracy"] == 0.5  # the empty group 2 is ignored
    assert result["group_count"] == [2, 2, 0, 2]
    assert result["kept_fraction"] == 1.0 and "mask_iou" not in result


def test_mask_metrics_by_hand():
    # One 4x4 image, 2x2 patches. Foreground: patch 0 full (4 px) and 1 px of patch 1.
    fg = torch.zeros(1, 1, 4, 4)
    fg[0, 0, :2, :2] = 1
    fg[0, 0, 0, 2] = 1
    keep = torch.tensor([[True, True, False, False]])  # patches 0 and 1: 8 px, 5 of them foreground
    acc = MetricAccumulator(num_groups=1)
    acc.update(torch.tensor([[0.0, 1.0]]), torch.tensor([1]), torch.tensor([0]), keep, fg, patch_size=2)
    partial = MetricAccumulator(num_groups=1)
    partial.update(torch.tensor([[0.0, 1.0]]), torch.tensor([1]), torch.tensor([0]), ~keep, fg, patch_size=2)
    assert partial.compute()["object_recall"] == 0.0
    result = acc.compute()
    assert result["kept_fraction"] == 0.5
    assert result["mask_iou"] == pytest.approx(5 / 8)  # intersection 5 px, union 8 px
    assert result["background_in_kept"] == pytest.approx(3 / 8)
    assert result["object_recall"] == 1.0  # all 5 foreground px are in kept patches
    assert result["mask_iou_patch"] == pytest.approx(1 / 2)  # ground-truth patches: {0}; kept {0, 1}
    assert result["foreground_fraction"] == pytest.approx(5 / 16)


def test_full_image_model_keeps_everything():
    fg = torch.zeros(2, 1, 4, 4)
    fg[:, :, :2, :2] = 1
    acc = MetricAccumulator(num_groups=1)
    acc.update(torch.zeros(2, 2), torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long), None, fg, 2)
    result = acc.compute()
    assert result["kept_fraction"] == 1.0
    assert result["background_in_kept"] == pytest.approx(0.75)
    assert result["mask_iou"] == pytest.approx(0.25)


def test_summarize_seeds_and_table():
    runs = [
        {
            "accuracy": 0.8,
            "worst_group_accuracy": 0.5,
            "group_accuracy": [0.5, 1.0],
            "mask_iou": None,
            "background_in_kept": 0.1,
            "kept_fraction": 0.2,
            "images_per_second": 100.0,
        },
        {
            "accuracy": 0.9,
            "worst_group_accuracy": 0.7,
            "group_accuracy": [0.7, 0.9],
            "mask_iou": 0.4,
            "background_in_kept": 0.3,
            "kept_fraction": 0.2,
            "images_per_second": 300.0,
        },
    ]
    summary = summarize_seeds(runs)
    assert summary["num_seeds"] == 2
    assert summary["worst_group_accuracy"] == pytest.approx(0.6)
    assert summary["worst_group_accuracy_std"] == pytest.approx(math.sqrt(0.02))
    assert summary["mask_iou"] is None  # missing in one seed
    assert summary["group_accuracy"] == pytest.approx([0.6, 0.95])
    table = format_table({"two_stage": summary, "baseline": summarize_seeds(runs[:1])})
    lines = table.splitlines()
    assert len(lines) == 4 and lines[0].startswith("model")
    assert "60.0 ± 14.1" in lines[2] and lines[3].split()[0] == "baseline"
