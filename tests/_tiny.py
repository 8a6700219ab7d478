"""Tiny FaithfulViT configurations shared by the model tests (CPU, seconds)."""

from __future__ import annotations

import faithful_vit

TINY_BACKBONE = {"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2, "mlp_ratio": 2.0}


def tiny_model(**overrides) -> faithful_vit.FaithfulViT:
    """32 px, patch 8 (a 4 x 4 grid), width 32, depth 2, 2 heads, K = 3, 2 classes, straight-through gate on."""
    overrides.setdefault("img_size", 32)
    # The preset detaches the mask, opens it and adds an area prior; the tests cover the paper's path and the gate.
    overrides.setdefault("straight_through", True)
    overrides.setdefault("mask_morphology", "none")
    overrides["loss_weights"] = {"area": 0.0, **overrides.get("loss_weights", {})}
    overrides["backbone_kwargs"] = {**TINY_BACKBONE, **overrides.get("backbone_kwargs", {})}
    return faithful_vit.create_model("faithful_tiny", **overrides)


def assign_prototypes_to_tokens(model: faithful_vit.FaithfulViT, images, tokens: list[int]) -> None:
    """Set prototype k to stage 1's feature at patch ``tokens[k]`` of image 0, so that patch is assigned to part k."""
    import torch

    with torch.no_grad():
        features = model.stage1.forward_features(images)[0, model.stage1.num_prefix_tokens :]
        model.prototypes.copy_(features[tokens])
