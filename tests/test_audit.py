"""The faithfulness audit passes for every stage-2 mode, detects leaky variants and refuses overlapping patches."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from _tiny import tiny_model

import faithful_vit
from faithful_vit.kernels import use_backend
from faithful_vit.model import FaithfulViT


@pytest.fixture(autouse=True)
def _torch_backend():
    with use_backend("torch"):
        yield


def _keep(batch=2, num_patches=16):
    keep = torch.rand(batch, num_patches) < 0.5
    keep[:, 5] = True
    keep[:, 6] = False
    return keep


def test_audit_passes_for_every_mode_with_the_stage1_mask():
    model = tiny_model().train()
    images = torch.randn(2, 3, 32, 32)
    report = faithful_vit.audit(model, images)
    assert model.training  # mode restored
    assert report.passed, report.failures()
    assert report.modes == ("dense", "masked", "packed", "masked+gate")
    for mode in report.modes:
        assert set(report.logit_change[mode]) == {"noise", "extreme", "nan"}
        assert set(report.dropped_gradient[mode]) == {"clean", "noise", "extreme", "nan"}
        assert report.logit_change[mode]["nan"].shape == (2,)
    assert "PASSED" in report.summary()


def test_audit_passes_with_a_given_mask():
    model = tiny_model()
    keep = _keep()
    report = faithful_vit.audit(model, torch.randn(2, 3, 32, 32), keep=keep)
    assert report.passed, report.failures()
    assert torch.equal(report.dropped_patches, (~keep).sum(1))


class DilatingViT(FaithfulViT):
    """Leaky: stage 2 reads the 4-neighbours of the kept patches too (the mask is dilated after the audit reads it)."""

    def forward_stage2(self, images, keep, *, mode=None, gate=None):
        grid = keep.view(-1, *self.grid_size).float()[:, None]
        dilated = nn.functional.max_pool2d(grid, 3, stride=1, padding=1)[:, 0] > 0
        return super().forward_stage2(images, dilated.flatten(1), mode=mode, gate=gate)


class UnmaskedDenseViT(FaithfulViT):
    """Leaky: the dense path forgets the mask (as late masking would)."""

    def _stage2_dense_features(self, images, keep):
        return super()._stage2_dense_features(images, torch.ones_like(keep))


@pytest.mark.parametrize(
    "leaky_class,modes", [(DilatingViT, ("dense", "masked", "packed")), (UnmaskedDenseViT, ("dense",))]
)
def test_audit_detects_leaky_variants(leaky_class, modes):
    leaky = leaky_class(tiny_model().cfg)
    keep = torch.zeros(2, 16, dtype=torch.bool)
    keep[:, 5] = True  # one kept patch; its neighbours (and every other patch) are dropped
    report = faithful_vit.audit(leaky, torch.randn(2, 3, 32, 32), keep=keep, modes=modes)
    assert not report.passed
    for mode in modes:
        for corruption in ("noise", "extreme", "nan"):
            assert (report.logit_change[mode][corruption] > 0).all()
        assert (report.dropped_gradient[mode]["clean"] > 0).all()
    assert report.failures() and "FAILED" in report.summary()


def test_audit_refuses_overlapping_patch_embeddings():
    model = tiny_model()
    model.stage2.patch_embed.proj = nn.Conv2d(3, 32, kernel_size=10, stride=8, padding=1)
    with pytest.raises(ValueError, match="overlaps patches"):
        faithful_vit.audit(model, torch.randn(1, 3, 32, 32))
    model.stage2.patch_embed = nn.Identity()
    with pytest.raises(ValueError, match="not timm's PatchEmbed"):
        faithful_vit.audit(model, torch.randn(1, 3, 32, 32))


def test_audit_checks_its_arguments():
    model = tiny_model()
    with pytest.raises(ValueError, match="modes"):
        faithful_vit.audit(model, torch.randn(1, 3, 32, 32), modes=("sparse",))
    with pytest.raises(ValueError, match="keep"):
        faithful_vit.audit(model, torch.randn(1, 3, 32, 32), keep=torch.ones(1, 9, dtype=torch.bool))
