"""Comparison models for the two-stage ViT: a full-image ViT baseline and a ground-truth-mask oracle.

Both are :class:`~faithful_vit.model_protocol.TrainableModel` s: ``forward`` returns a :class:`ClassifierOutput`,
``loss_weights`` is the cross-entropy on its logits alone (term ``ce`` of :func:`faithful_vit.losses.compute_losses`),
and ``param_groups(lr, weight_decay)`` returns AdamW parameter groups.

* :class:`FullImageViT` is a timm ViT that sees every patch and classifies from its CLS token: the baseline a
  two-stage model must beat on worst-group accuracy.
* :class:`OracleMaskViT` is the same ViT whose attention may only use the patches the *ground-truth* foreground
  covers (``uses_ground_truth_mask``: the engine passes the ground-truth mask to ``forward``). It is the ceiling a
  perfect stage 1 would give stage 2 at this patch size, including the background pixels that boundary patches leak.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from timm.models.vision_transformer import VisionTransformer

from faithful_vit.data.mask_stats import gt_patch_fraction
from faithful_vit.sparsify import forward_kept, sparsify
from faithful_vit.timm_weights import load_backbone_file

# The stage-2 size of the tiny preset, from the feasibility study (64 px images, 8 px patches, 0.55 M parameters).
TINY_VIT_KWARGS = dict(img_size=64, patch_size=8, embed_dim=128, depth=4, num_heads=4, mlp_ratio=2.0)
# timm's pooling choices that give one feature vector per image (``''`` would classify every token); forward_kept
# pools each over the kept tokens only, so the oracle takes them too.
GLOBAL_POOLS = ("token", "avg", "avgmax", "max", "map")


@dataclass
class ClassifierOutput:
    """What a comparison model returns.

    Attributes:
        logits: ``[B, num_classes]``.
        keep: ``[B, num_patches]`` bool, the patches attention could use; None when every patch is used.
        kept_fraction: scalar tensor, mean of ``keep`` (1.0 for the full-image baseline).
        part_maps: always None: comparison models discover no parts.
    """

    logits: torch.Tensor
    keep: torch.Tensor | None = None
    kept_fraction: torch.Tensor | None = None
    part_maps: None = None


def vit_kwargs_like(vit: VisionTransformer) -> dict:
    """The constructor arguments that rebuild a timm ViT of the same size (weights are not copied).

    Args:
        vit: a timm ``VisionTransformer``, e.g. the stage 2 of a two-stage model.

    Returns:
        ``img_size``, ``patch_size``, ``embed_dim``, ``depth``, ``num_heads``, ``mlp_ratio``, ``qkv_bias`` and
        ``reg_tokens`` for ``VisionTransformer(**kwargs)``.
    """
    first_block = vit.blocks[0]
    return dict(
        img_size=tuple(vit.patch_embed.img_size),
        patch_size=tuple(vit.patch_embed.patch_size),
        embed_dim=vit.embed_dim,
        depth=len(vit.blocks),
        num_heads=first_block.attn.num_heads,
        mlp_ratio=first_block.mlp.fc1.out_features / vit.embed_dim,
        qkv_bias=first_block.attn.qkv.bias is not None,
        reg_tokens=vit.num_reg_tokens,
    )


def _vit_param_groups(module: nn.Module, lr: float, weight_decay: float, head_lr_factor: float) -> list[dict]:
    """AdamW groups: decay on matrices, none on biases, norms and tokens; the classifier head at ``head_lr_factor``."""
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        is_head = name.startswith("vit.head.")
        decays = param.ndim >= 2 and not name.endswith(("cls_token", "pos_embed", "reg_token"))
        groups.setdefault((is_head, decays), []).append(param)
    return [
        {"params": params, "lr": lr * (head_lr_factor if is_head else 1.0), "weight_decay": weight_decay * decays}
        for (is_head, decays), params in groups.items()
    ]


class FullImageViT(nn.Module):
    """The full-image baseline: a timm ViT with a CLS-token head that attends to every patch.

    Args:
        num_classes: classifier outputs.
        head_lr_factor: LR multiplier of the classifier head (the paper's stage-2 head factor; 1 from scratch).
        global_pool: timm's pooling of the final tokens, one of :data:`GLOBAL_POOLS` (``"token"``: the CLS token;
            ``"avg"``: the mean patch token, then ``fc_norm``).
        **vit_kwargs: ``VisionTransformer`` arguments (default :data:`TINY_VIT_KWARGS`).
    """

    uses_ground_truth_mask = False
    area_target = 0.0  # unused: loss_weights has no area term
    has_frozen_phase = False

    def __init__(self, num_classes: int, head_lr_factor: float = 1.0, global_pool: str = "token", **vit_kwargs):
        super().__init__()
        if global_pool not in GLOBAL_POOLS:
            raise ValueError(f"global_pool: expected one of {GLOBAL_POOLS}, got {global_pool!r}")
        kwargs = {**TINY_VIT_KWARGS, **vit_kwargs, "num_classes": num_classes, "global_pool": global_pool}
        self.vit = VisionTransformer(**kwargs)
        self.head_lr_factor = head_lr_factor

    def load_backbone_weights(self, path: str) -> None:
        """Load a local timm checkpoint into the ViT: :func:`~faithful_vit.timm_weights.load_backbone_file`."""
        load_backbone_file(self.vit, path, name=f"the {type(self).__name__} ViT")

    @property
    def patch_size(self) -> int:
        return self.vit.patch_embed.patch_size[0]

    def forward(self, images: torch.Tensor) -> ClassifierOutput:
        """Classify ``images`` ``[B, 3, H, W]`` from all patches."""
        return ClassifierOutput(logits=self.vit(images), kept_fraction=images.new_ones(()))

    @property
    def loss_weights(self) -> dict[str, float]:
        """Cross-entropy on the logits only."""
        return {"ce": 1.0}

    def set_epoch(self, epoch: int) -> None:
        """Nothing changes by epoch."""

    def param_groups(self, lr: float, weight_decay: float) -> list[dict]:
        """AdamW parameter groups (weight decay on matrices only)."""
        return _vit_param_groups(self, lr, weight_decay, self.head_lr_factor)


class OracleMaskViT(FullImageViT):
    """Stage 2 given the ground-truth patch mask: it reads only the prefix tokens and ground-truth foreground patches.

    A patch is kept when its ground-truth foreground fraction exceeds ``threshold``. The ViT is
    :func:`~faithful_vit.sparsify`-converted and runs through :func:`~faithful_vit.forward_kept`, the kept-token
    machinery of the two-stage model's stage 2, so its logits depend only on kept patches.

    Args:
        num_classes: classifier outputs.
        threshold: foreground fraction above which a patch is kept (0.5: the patch-level ground truth).
        head_lr_factor: LR multiplier of the classifier head.
        mode: ``"packed"`` (gather the kept tokens) or ``"masked"`` (masked attention), see ``forward_kept``.
        **vit_kwargs: ``VisionTransformer`` arguments.
    """

    uses_ground_truth_mask = True

    def __init__(
        self, num_classes: int, threshold: float = 0.5, head_lr_factor: float = 1.0, mode: str = "packed", **vit_kwargs
    ):
        super().__init__(num_classes, head_lr_factor=head_lr_factor, **vit_kwargs)
        self.threshold, self.mode = threshold, mode
        sparsify(self.vit)

    def forward(self, images: torch.Tensor, fg_mask: torch.Tensor | None = None) -> ClassifierOutput:
        """Classify ``images`` ``[B, 3, H, W]`` from the patches that ``fg_mask`` ``[B, 1, H, W]`` covers."""
        if fg_mask is None:
            raise ValueError("fg_mask: the oracle needs the ground-truth foreground mask [B, 1, H, W], got None")
        keep = self.keep_mask(fg_mask)
        features = forward_kept(self.vit, images, keep, mode=self.mode)
        return ClassifierOutput(logits=self.vit.head(features), keep=keep, kept_fraction=keep.float().mean())

    def keep_mask(self, fg_mask: torch.Tensor) -> torch.Tensor:
        """``[B, num_patches]`` bool: the patches whose ground-truth foreground fraction exceeds ``threshold``."""
        return gt_patch_fraction(fg_mask, self.patch_size) > self.threshold
