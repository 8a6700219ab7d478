"""Every loss term of section 6 against a value computed by hand on a tiny input; compute_losses' bookkeeping."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from _tiny import tiny_model

from faithful_vit import losses
from faithful_vit.geometry import invert_affine, warp
from faithful_vit.kernels import use_backend


def _two_part_maps(foreground: torch.Tensor) -> torch.Tensor:
    """(B, 2, H, W) maps with K = 1: the given foreground map and its complement as background."""
    return torch.stack([foreground, 1 - foreground], dim=1)


def test_presence_loss_by_hand():
    # 3 x 3 grids: the 3 x 3 average pool is the plain mean. Image means 2/9 and 6/9; the batch max is 6/9.
    fg = torch.zeros(2, 3, 3)
    fg[0, 0, :2] = 1
    fg[1, :2] = 1
    assert losses.presence_loss(_two_part_maps(fg)).item() == pytest.approx(1 - 6 / 9)


def test_enforced_presence_loss_by_hand():
    # Radial weight on 3 x 3: corners 1, edge centres 0.5, centre 0. Background 1 in one corner -> pooled 1/9;
    # background 1 in the centre only -> pooled 0 -> clamped at 1e-10.
    bg = torch.zeros(2, 3, 3)
    bg[0, 0, 0] = 1
    bg[1, 1, 1] = 1
    expected = -(math.log(1 / 9) + math.log(1e-10)) / 2
    assert losses.enforced_presence_loss(_two_part_maps(1 - bg)).item() == pytest.approx(expected, rel=1e-5)
    assert torch.equal(losses.radial_weight(3, 3), torch.tensor([[1, 0.5, 1], [0.5, 0, 0.5], [1, 0.5, 1]]))


def test_orthogonality_loss_by_hand():
    # Parts (1, 0) and (2, 2): cosine 1/sqrt(2); G - I has two off-diagonal entries 1/sqrt(2): mean of squares 1/4.
    embeddings = torch.tensor([[[1.0, 2.0], [0.0, 2.0]]])  # (B=1, C=2, K+1=2)
    assert losses.orthogonality_loss(embeddings).item() == pytest.approx(0.25)


def test_equivariance_loss_by_hand():
    maps = torch.zeros(1, 3, 2, 2)
    maps[0, 0, 0, 0] = 1  # part 0 and its back-warped copy: cos 1
    maps[0, 1, 1, 1] = 1
    back = torch.zeros_like(maps)
    back[0, 0, 0, 0] = 2
    back[0, 1, 0, 1] = 1  # part 1 moved: cos 0; the background (index 2) is ignored
    back[0, 2] = 5
    assert losses.equivariance_loss(maps, back).item() == pytest.approx(1 - 0.5)


def test_total_variation_loss_by_hand():
    maps = torch.tensor([[[[0.0, 1.0], [1.0, 1.0]]]])  # vertical diffs 1 + 0, horizontal 1 + 0; / (1 * 2 * 2)
    assert losses.total_variation_loss(maps).item() == pytest.approx(0.5)


def test_entropy_loss_by_hand():
    uniform = torch.full((2, 4, 3, 3), 0.25)
    assert losses.entropy_loss(uniform).item() == pytest.approx(math.log(4))
    one_hot = F.one_hot(torch.randint(0, 4, (2, 3, 3)), 4).permute(0, 3, 1, 2).float()
    assert losses.entropy_loss(one_hot).item() == pytest.approx(0.0, abs=1e-8)


def test_concentration_loss_by_hand():
    fg = torch.zeros(1, 3, 3)
    fg[0, 0, 0] = fg[0, 0, 2] = 1  # two points at x = -1 and x = 1, y = -1: centroid (0, -1), variance 1
    assert losses.concentration_loss(_two_part_maps(fg)).item() == pytest.approx(1.0)


def test_area_loss_by_hand():
    bg = torch.full((2, 3, 3), 0.9)
    bg[1] = 0.5  # foreground fractions 0.1 and 0.5 against a target of 0.25: relu gives 0.15 and 0
    maps = torch.stack([1 - bg, bg], dim=1)
    assert losses.area_loss(maps, 0.25).item() == pytest.approx(0.075)


def test_warp_round_trip_is_exact_for_a_quarter_turn():
    theta = torch.tensor([[[0.0, -1.0, 0.0], [1.0, 0.0, 0.0]]])
    x = torch.randn(1, 2, 6, 6)
    torch.testing.assert_close(warp(warp(x, invert_affine(theta)), theta), x)
    torch.testing.assert_close(warp(x, invert_affine(theta)), torch.rot90(x, k=-1, dims=(2, 3)))


def test_compute_losses_weights_and_skips_terms():
    model = tiny_model(loss_weights={"equivariance": 0.0, "area": 5.0, "presence": 0.5})
    images, labels = torch.randn(2, 3, 32, 32), torch.tensor([0, 1])
    with use_backend("torch"):
        out = model(images)
        terms = losses.training_losses(model, out, images, labels)
    assert "equivariance" not in terms and "concentration" not in terms
    assert set(terms) == {
        "ce_stage2",
        "ce_stage1",
        "presence",
        "enforced_presence",
        "orthogonality",
        "total_variation",
        "entropy",
        "area",
        "total",
    }
    torch.testing.assert_close(terms["ce_stage2"], F.cross_entropy(out.stage2_logits, labels))
    torch.testing.assert_close(terms["presence"], losses.presence_loss(out.part_maps))
    weights = model.cfg.loss_weights
    expected = sum(weights[name] * value for name, value in terms.items() if name != "total")
    torch.testing.assert_close(terms["total"], expected)


def test_compute_losses_needs_the_back_warped_maps_for_equivariance():
    model = tiny_model()
    images, labels = torch.randn(2, 3, 32, 32), torch.tensor([0, 1])
    with use_backend("torch"):
        out = model(images)
    with pytest.raises(ValueError, match="maps_back"):
        losses.compute_losses(out, labels, model.cfg.loss_weights, area_target=0.25, maps_back=None)


def test_equivariance_pass_runs_stage1_only():
    model = tiny_model()
    images = torch.randn(2, 3, 32, 32)
    calls = []
    model.stage2.register_forward_pre_hook(lambda *_: calls.append(1))
    back, theta = model.equivariance_maps(images)
    assert back.shape == (2, model.num_parts + 1, 4, 4) and theta.shape == (2, 2, 3)
    assert calls == []
    value = losses.equivariance_loss(model.forward_stage1(images).part_maps, back)
    value.backward()
    assert model.prototypes.grad is not None
