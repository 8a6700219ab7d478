"""Test-time interventions (``docs/method.md``, section 8): part removal and per-part confidence thresholds.

* Part removal: ``model(images, remove_parts=[k, ...])`` turns the patches whose best part is a removed part into
  background, so stage 2 cannot read them; stage 1's outputs are unchanged. :func:`remove_parts_keep` does the same on
  a stage-1 output, for a caller that runs the stages separately.
* Confidence thresholds: :func:`calibrate_part_thresholds` takes, for every foreground part k, a low quantile of the
  scores ``z . p_k`` of the tokens assigned to k on (training) data; at evaluation a part whose score at a token falls
  below its threshold no longer competes for that token (its -distance logit becomes -inf). Unlike the authors' code,
  the other logits stay -distances (their quirk switched every logit to the raw dot product, which also changes how
  confident tokens are assigned).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from .model import FaithfulViT, Stage1Output

__all__ = ["calibrate_part_thresholds", "remove_parts_keep"]


def remove_parts_keep(model: FaithfulViT, stage1: Stage1Output, remove_parts: Sequence[int]) -> torch.Tensor:
    """The evaluation mask of ``stage1`` with the patches of ``remove_parts`` dropped.

    Args:
        model: the model that produced ``stage1``.
        stage1: :meth:`FaithfulViT.forward_stage1` output.
        remove_parts: foreground part ids in ``[0, K)``.

    Returns:
        ``(B, num_patches)`` bool; pass it to :meth:`FaithfulViT.forward_stage2`.
    """
    keep, _ = model.compute_keep(stage1.part_logits, remove_parts=remove_parts, stochastic=False, part_dropout=False)
    return keep


def _images_of(batch) -> torch.Tensor:
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    if isinstance(batch, dict):
        for key in ("images", "image", "pixel_values"):
            if key in batch:
                return batch[key]
    raise TypeError(f"batches: expected tensors, (images, ...) tuples or dicts with 'images'; got {type(batch)}")


@torch.no_grad()
def calibrate_part_thresholds(
    model: FaithfulViT,
    batches: Iterable,
    quantile: float = 0.05,
    *,
    apply: bool = True,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Per-part thresholds on ``z . p_k``: the ``quantile`` of the scores of the tokens assigned to part k.

    Runs stage 1 in evaluation mode (deterministic maps, no thresholds) over ``batches``; restores the model's mode.

    Args:
        model: a :class:`FaithfulViT`.
        batches: an iterable of image tensors ``(B, C, H, W)``, ``(images, labels, ...)`` tuples or dicts with
            ``"images"`` (e.g. a DataLoader).
        quantile: in ``(0, 1)``; the authors use 0.01, 0.03, 0.05 and 0.10 on the training split.
        apply: also install them with :meth:`FaithfulViT.set_part_thresholds`.
        device: where to run stage 1 (default: the model's device).

    Returns:
        ``(K,)`` float32 thresholds; -inf for a part that no token was assigned to (it is never dropped).
    """
    if not 0.0 < quantile < 1.0:
        raise ValueError(f"quantile: expected a value in (0, 1), got {quantile!r}")
    device = next(model.parameters()).device if device is None else torch.device(device)
    was_training = model.training
    model.eval()
    model.set_part_thresholds(None)
    per_part: list[list[torch.Tensor]] = [[] for _ in range(model.num_parts)]
    try:
        for batch in batches:
            stage1 = model.forward_stage1(_images_of(batch).to(device))
            assigned = stage1.part_maps.argmax(dim=1)  # (B, H, W)
            for part in range(model.num_parts):
                per_part[part].append(stage1.part_scores[:, part][assigned == part].float().cpu())
    finally:
        model.train(was_training)
    thresholds = torch.full((model.num_parts,), float("-inf"))
    for part, chunks in enumerate(per_part):
        scores = torch.cat(chunks) if chunks else torch.empty(0)
        if scores.numel():
            thresholds[part] = torch.quantile(scores, quantile)
    if apply:
        model.set_part_thresholds(thresholds)
    return thresholds
