"""Opening by reconstruction of patch masks: regions with a full cross stay whole, the others go."""

from __future__ import annotations

import torch
from _tiny import tiny_model

from faithful_vit.morphology import dilate_keep, erode_keep, open_keep, reconstruct_keep


def test_reconstruct_keep_keeps_whole_regions_and_drops_specks():
    keep = torch.zeros(1, 8, 8, dtype=torch.bool)
    keep[0, 1:4, 1:4] = True  # a 3x3 block (the opening would cut its corners) ...
    keep[0, 4:6, 3] = True  # ... with a 2-patch tail (the opening would cut it)
    keep[0, 7, 7] = True  # an isolated speck
    keep[0, 0:2, 6:8] = True  # a 2x2 block: no full cross
    rebuilt = reconstruct_keep(keep.view(1, 64), (8, 8)).view(8, 8)
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[1:4, 1:4] = True
    expected[4:6, 3] = True
    assert torch.equal(rebuilt, expected)
    opened = open_keep(keep.view(1, 64), (8, 8)).view(8, 8)
    assert opened.sum() == 5 and not opened[1, 1]  # the opening draws a plus where the region was a square


def test_reconstruct_keep_follows_a_long_winding_region():
    keep = torch.zeros(1, 8, 8, dtype=torch.bool)
    keep[0, 0:3, 0:3] = True  # the only full cross is at (1, 1) ...
    keep[0, 3, 0:8] = keep[0, 3:8, 7] = keep[0, 7, 1:8] = keep[0, 5, 1:8] = True  # ... a snake 1 patch wide
    keep[0, 6, 1] = True
    rebuilt = reconstruct_keep(keep.view(1, 64), (8, 8))
    assert torch.equal(rebuilt, keep.view(1, 64))


def test_reconstruct_keep_is_a_union_of_regions_between_opening_and_mask():
    torch.manual_seed(0)
    keep = torch.rand(16, 49) > 0.45
    rebuilt = reconstruct_keep(keep, (7, 7))
    assert not (rebuilt & ~keep).any()  # never adds a patch
    assert not (open_keep(keep, (7, 7)) & ~rebuilt).any()  # keeps whatever the opening keeps
    assert torch.equal(dilate_keep(rebuilt, (7, 7)) & keep, rebuilt)  # no kept region is cut
    assert torch.equal(reconstruct_keep(rebuilt, (7, 7)), rebuilt)  # idempotent
    has_cross = erode_keep(keep, (7, 7)).any(dim=1)
    assert torch.equal(rebuilt.any(dim=1), has_cross)  # an image loses its mask iff no region holds a cross


def test_model_mask_morphology_reconstruct():
    model = tiny_model(mask_morphology="reconstruct").eval()
    logits = torch.randn(4, model.num_parts + 1, 4, 4)
    keep, _ = model.compute_keep(logits)
    raw = (logits.argmax(1) < model.num_parts).flatten(1)
    assert torch.equal(keep, reconstruct_keep(raw, (4, 4)))
