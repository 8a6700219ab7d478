"""The faithfulness audit: stage 2's prediction must not depend, in value or in gradient, on the dropped patches.

For every image the mask comes from stage 1 on the clean image (or from the caller). The pixels of the dropped patches
are then replaced by (a) Gaussian noise, (b) extreme values (+-1e4) and (c) NaN, and stage 2 is rerun with the same
mask in every execution mode. The audit passes iff, for every image, mode and corruption:

* the stage-2 logits are bit-identical to the clean run's (max |delta| == 0, NaN counts as a change), and
* the gradient of the stage-2 logits with respect to every dropped pixel is exactly 0 (NaN counts as non-zero),
  measured as one vector-Jacobian product with random class weights (zero for every class implies zero for the
  random mix; a leak gives a non-zero mix with probability one).

Non-finite pixels of dropped patches are zeroed by :meth:`FaithfulViT.forward_stage2` before anything reads them
(0 * NaN is NaN in any dense product); the NaN corruption checks that guard, while the noise and extreme corruptions,
which pass through untouched, check the attention masking itself.

The claim is about stage 2 given the mask: stage 1 sees every pixel by design and is not rerun. It only holds when a
patch token is a function of its own patch's pixels, so models whose stage-2 patch embedding overlaps patches (a
convolution whose kernel differs from its stride, padding, dilation, a non-patch stem) are refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn

from .model import STAGE2_MODES, FaithfulViT

__all__ = ["AuditReport", "CORRUPTIONS", "audit", "check_patch_embedding"]

CORRUPTIONS = ("noise", "extreme", "nan")
EXTREME_VALUE = 1e4


@dataclass
class AuditReport:
    """Per-image results of :func:`audit`.

    Attributes:
        modes: stage-2 modes audited ("masked+gate" is the masked mode with a straight-through gate attached).
        dropped_patches: ``(B,)`` number of dropped patches per image (an image with none is vacuously faithful).
        logit_change: ``{mode: {corruption: (B,)}}`` max |stage-2 logit change|; inf when NaN appeared.
        dropped_gradient: ``{mode: {"clean" | corruption: (B,)}}`` max |d logits / d dropped pixel|; inf for NaN.
        passed: True iff every number above is exactly 0.
    """

    modes: tuple[str, ...]
    dropped_patches: torch.Tensor
    logit_change: dict[str, dict[str, torch.Tensor]]
    dropped_gradient: dict[str, dict[str, torch.Tensor]]
    passed: bool

    def failures(self) -> list[str]:
        """Human-readable ``"mode/corruption: image i: ..."`` lines for every non-zero number."""
        lines = []
        for kind, table in (("logit change", self.logit_change), ("dropped-pixel gradient", self.dropped_gradient)):
            for mode, by_corruption in table.items():
                for corruption, values in by_corruption.items():
                    for image in torch.nonzero(values != 0).flatten().tolist():
                        lines.append(f"{mode}/{corruption}: image {image}: {kind} {values[image].item():.3g}")
        return lines

    def summary(self) -> str:
        """One line per mode: worst logit change and worst gradient over images and corruptions."""
        lines = [
            f"audit {'PASSED' if self.passed else 'FAILED'}; dropped patches per image: {self.dropped_patches.tolist()}"
        ]
        for mode in self.modes:
            change = max(v.max().item() for v in self.logit_change[mode].values())
            grad = max(v.max().item() for v in self.dropped_gradient[mode].values())
            lines.append(f"  {mode:12s} max |logit change| {change:.3g}   max |grad on dropped pixels| {grad:.3g}")
        return "\n".join(lines)


def check_patch_embedding(backbone: nn.Module) -> None:
    """Raise ValueError unless every patch token is a function of its own patch only.

    Accepts timm's ``PatchEmbed`` with a ``Conv2d`` projection whose kernel equals its stride and the patch size,
    without padding or dilation.
    """
    from timm.layers import PatchEmbed

    embed = getattr(backbone, "patch_embed", None)
    if type(embed) is not PatchEmbed:
        raise ValueError(
            f"audit: stage 2's patch embedding is {type(embed).__name__}, not timm's PatchEmbed; only a "
            "non-overlapping patch projection keeps each token a function of its own patch, refusing to audit"
        )
    conv = embed.proj
    patch = tuple(embed.patch_size)
    if (
        not isinstance(conv, nn.Conv2d)
        or tuple(conv.kernel_size) != patch
        or tuple(conv.stride) != patch
        or conv.padding not in ((0, 0), "valid")
        or tuple(conv.dilation) != (1, 1)
        or getattr(embed, "dynamic_img_pad", False)
    ):
        detail = (
            f"kernel {conv.kernel_size}, stride {conv.stride}, padding {conv.padding}, dilation {conv.dilation}"
            if isinstance(conv, nn.Conv2d)
            else type(conv).__name__
        )
        raise ValueError(
            f"audit: stage 2's patch embedding overlaps patches or pads ({detail}; patch size {patch}), so a token "
            "depends on pixels outside its patch; refusing to audit"
        )


def _corrupt(images: torch.Tensor, dropped: torch.Tensor, corruption: str) -> torch.Tensor:
    if corruption == "noise":
        fill = torch.randn_like(images) * 3.0
    elif corruption == "extreme":
        sign = torch.randint(0, 2, images.shape, device=images.device).to(images.dtype) * 2 - 1
        fill = sign * EXTREME_VALUE
    else:
        fill = torch.full_like(images, float("nan"))
    return torch.where(dropped, fill, images)


def _worst(values: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """Max |values| over ``dims`` per image, NaN counted as +inf."""
    return torch.nan_to_num(values.abs().double(), nan=float("inf")).amax(dim=dims)


def _stage2(model: FaithfulViT, images: torch.Tensor, keep: torch.Tensor, mode: str) -> torch.Tensor:
    if mode == "masked+gate":
        gate = keep.to(images.dtype).requires_grad_()
        return model.forward_stage2(images, keep, mode="masked", gate=gate)
    return model.forward_stage2(images, keep, mode=mode)


def audit(
    model: FaithfulViT,
    images: torch.Tensor,
    *,
    keep: torch.Tensor | None = None,
    modes: Sequence[str] = (*STAGE2_MODES, "masked+gate"),
) -> AuditReport:
    """Check that stage 2 ignores the dropped patches exactly, in value and in gradient.

    Args:
        model: a :class:`FaithfulViT` (run in evaluation mode; its mode is restored afterwards).
        images: ``(B, C, H, W)``.
        keep: optional ``(B, num_patches)`` bool mask to audit instead of stage 1's (deterministic) mask.
        modes: stage-2 modes among "dense", "masked", "packed" and "masked+gate".

    Returns:
        :class:`AuditReport`.

    Raises:
        ValueError: if stage 2's patch embedding overlaps patches, or for bad arguments.
    """
    check_patch_embedding(model.stage2)
    model.check_images(images)
    for mode in modes:
        if mode not in (*STAGE2_MODES, "masked+gate"):
            raise ValueError(f"modes: expected values among {(*STAGE2_MODES, 'masked+gate')}, got {mode!r}")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if keep is None:
                stage1 = model.forward_stage1(images)
                keep, _ = model.compute_keep(stage1.part_logits, stochastic=False, part_dropout=False)
            model._check_keep(keep, images)
        dropped = model.patch_pixels(~keep)
        class_weights = torch.randn(images.shape[0], model.num_classes, device=images.device)
        logit_change: dict[str, dict[str, torch.Tensor]] = {}
        dropped_gradient: dict[str, dict[str, torch.Tensor]] = {}
        for mode in modes:
            logit_change[mode], dropped_gradient[mode] = {}, {}
            clean_logits = None
            for corruption in ("clean", *CORRUPTIONS):
                x = images if corruption == "clean" else _corrupt(images, dropped, corruption)
                x = x.detach().clone().requires_grad_()
                logits = _stage2(model, x, keep, mode)
                (grad,) = torch.autograd.grad((logits * class_weights.to(logits.dtype)).sum(), x)
                on_dropped = torch.where(dropped, grad, torch.zeros((), dtype=grad.dtype, device=grad.device))
                dropped_gradient[mode][corruption] = _worst(on_dropped, (1, 2, 3)).cpu()
                if clean_logits is None:
                    clean_logits = logits.detach()
                else:
                    logit_change[mode][corruption] = _worst(logits.detach() - clean_logits, (1,)).cpu()
    finally:
        model.train(was_training)
    passed = all(
        bool((values == 0).all())
        for table in (logit_change, dropped_gradient)
        for by_corruption in table.values()
        for values in by_corruption.values()
    )
    return AuditReport(tuple(modes), (~keep).sum(dim=1).cpu(), logit_change, dropped_gradient, passed)
