"""Section 11: part removal drops exactly the removed parts' patches; confidence thresholds are calibrated and used."""

from __future__ import annotations

import pytest
import torch
from _tiny import assign_prototypes_to_tokens, tiny_model

from faithful_vit import calibrate_part_thresholds
from faithful_vit.interventions import remove_parts_keep
from faithful_vit.kernels import use_backend


@pytest.fixture(autouse=True)
def _torch_backend():
    with use_backend("torch"):
        yield


@pytest.fixture
def model_and_images():
    model = tiny_model().eval()
    images = torch.randn(3, 3, 32, 32)
    assign_prototypes_to_tokens(model, images, [0, 5, 10, 15])  # parts 0, 1, 2 and the background all appear
    return model, images


def test_remove_parts_drops_exactly_those_patches(model_and_images):
    model, images = model_and_images
    full = model(images)
    assigned = full.part_logits.argmax(1).flatten(1)
    assert torch.equal(full.keep, assigned < model.num_parts)
    for removed in ([1], [0, 2]):
        out = model(images, remove_parts=removed)
        expected = full.keep & ~torch.isin(assigned, torch.tensor(removed))
        assert torch.equal(out.keep, expected)
        assert (full.keep & ~out.keep).any()
        # Only stage 2 changes.
        assert torch.equal(out.stage1_logits, full.stage1_logits) and torch.equal(out.part_maps, full.part_maps)
        assert torch.equal(remove_parts_keep(model, model.forward_stage1(images), removed), out.keep)


def test_removing_every_part_leaves_only_the_prefix_tokens(model_and_images):
    model, images = model_and_images
    out = model(images, remove_parts=range(model.num_parts))
    assert not out.keep.any() and torch.isfinite(out.stage2_logits).all()


def test_calibrated_thresholds_are_per_part_quantiles(model_and_images):
    model, images = model_and_images
    batches = [(images[:2], torch.tensor([0, 1])), {"images": images[2:]}]
    thresholds = calibrate_part_thresholds(model, batches, quantile=0.25, apply=False)
    stage1 = model.forward_stage1(images)
    assigned = stage1.part_maps.argmax(1)
    for part in range(model.num_parts):
        scores = stage1.part_scores[:, part][assigned == part]
        assert thresholds[part].item() == pytest.approx(torch.quantile(scores, 0.25).item(), rel=1e-6)
    assert torch.isneginf(model.part_thresholds).all()  # apply=False installs nothing


def test_thresholds_only_unassign_low_confidence_tokens(model_and_images):
    model, images = model_and_images
    before = model.forward_stage1(images)
    assigned = before.part_logits.argmax(1)
    thresholds = calibrate_part_thresholds(model, [images], quantile=0.5)
    after = model.forward_stage1(images)
    new_assigned = after.part_logits.argmax(1)
    for part in range(model.num_parts):
        mine = assigned == part
        low = mine & (before.part_scores[:, part] < thresholds[part])
        assert low.any()
        assert not (new_assigned[low] == part).any()  # below threshold: lost to another part or the background
        assert (new_assigned[mine & ~low] == part).all()  # above: unchanged (the other logits are still distances)
    out = model(images)
    assert out.keep.sum() < (assigned < model.num_parts).sum()
    # Training ignores thresholds; clearing restores the original assignment.
    model.set_part_thresholds(None)
    assert torch.equal(model.forward_stage1(images).part_logits, before.part_logits)


def test_threshold_arguments_are_checked(model_and_images):
    model, images = model_and_images
    with pytest.raises(ValueError, match="quantile"):
        calibrate_part_thresholds(model, [images], quantile=1.5)
    with pytest.raises(ValueError, match="thresholds"):
        model.set_part_thresholds([0.0, 1.0])
    with pytest.raises(TypeError, match="batches"):
        calibrate_part_thresholds(model, ["not images"])
