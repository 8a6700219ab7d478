"""The two-stage model on DINOv3 backbones (timm ``Eva``): presets, the three stage-2 modes, local weights.

Narrow random-weight configs at 32 px (a 2 x 2 grid of 16 px patches); nothing is downloaded.
"""

import pytest
import timm
import torch

import faithful_vit
from faithful_vit.losses import training_losses
from faithful_vit.model import STAGE2_MODES

NARROW = {"embed_dim": 64, "depth": 1, "num_heads": 2}
PRESETS = {
    "faithful_dinov3_small_reg4_224": "vit_small_patch16_dinov3",
    "faithful_dinov3_base_reg4_512": "vit_base_patch16_dinov3",
}


def _narrow(preset: str, **overrides) -> faithful_vit.FaithfulViT:
    if not overrides.get("freeze_stage1_backbone", True):
        return faithful_vit.create_model(preset, img_size=32, backbone_kwargs=NARROW, **overrides)
    with pytest.warns(UserWarning, match="freeze_stage1_backbone"):  # random weights, frozen stage 1: warned
        return faithful_vit.create_model(preset, img_size=32, backbone_kwargs=NARROW, **overrides)


@pytest.mark.parametrize("preset", PRESETS)
def test_dinov3_presets_build_the_eva_backbone_with_class_token_pooling(preset):
    cfg = faithful_vit.get_config(preset)
    assert cfg.backbone == PRESETS[preset] and cfg.backbone_kwargs["global_pool"] == "token"
    assert cfg.freeze_stage1_backbone
    model = _narrow(preset)
    assert type(model.stage2).__name__ == "Eva" and model.stage2.num_prefix_tokens == 5
    trainable = {n for n, p in model.stage1.named_parameters() if p.requires_grad}
    assert trainable == {"cls_token", "reg_token"}  # DINOv3 has no absolute position embedding


@pytest.mark.parametrize("preset", PRESETS)
def test_dinov3_stage2_modes_agree_and_read_kept_patches_only(preset):
    model = _narrow(preset).eval()
    with torch.no_grad():  # DINOv3's layer scale starts at 1e-5: make the blocks matter
        for name, param in model.stage2.named_parameters():
            if name.endswith(("gamma_1", "gamma_2")):
                param.uniform_(0.5, 1.5)
    images = torch.randn(3, 3, 32, 32)
    keep = torch.tensor([[True, False, False, True], [False, False, False, False], [True, False, True, True]])
    with torch.no_grad():
        logits = {mode: model.forward_stage2(images, keep, mode=mode) for mode in STAGE2_MODES}
        for mode in ("masked", "packed"):
            torch.testing.assert_close(logits[mode], logits["dense"], rtol=1e-4, atol=1e-5)
        repainted = images.clone()
        repainted[:, :, :16, 16:] = torch.randn(3, 3, 16, 16)  # patch 1: dropped everywhere
        torch.testing.assert_close(model.forward_stage2(repainted, keep, mode="packed"), logits["packed"])
        repainted[:, :, :16, :16] = torch.randn(3, 3, 16, 16)  # patch 0: kept in images 0 and 2
        changed = (model.forward_stage2(repainted, keep, mode="packed") - logits["packed"]).abs().amax(1)
        assert (changed[[0, 2]] > 1e-4).all() and changed[1] == 0


def test_dinov3_two_stage_training_step_reaches_stage1_through_the_gate():
    model = _narrow("faithful_dinov3_small_reg4_224", freeze_stage1_backbone=False, straight_through=True)
    model.train()
    images, labels = torch.randn(2, 3, 32, 32), torch.tensor([0, 1])
    out = model(images)
    assert out.gate is not None  # masked mode with the straight-through gate
    training_losses(model, out, images, labels)["total"].backward()
    grads = [p.grad for p in model.stage1.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_dinov3_pretrained_file_loads_timm_weights_into_both_stages(tmp_path):
    source = timm.create_model("vit_small_patch16_dinov3", pretrained=False, img_size=32, **NARROW)
    path = tmp_path / "dinov3_small.pth"
    torch.save(source.state_dict(), path)
    model = faithful_vit.create_model(
        "faithful_dinov3_small_reg4_224", img_size=32, backbone_kwargs=NARROW, pretrained_file=str(path)
    )
    for stage in (model.stage1, model.stage2):
        state = stage.state_dict()
        for key, value in source.state_dict().items():
            assert torch.equal(state[key], value), key
