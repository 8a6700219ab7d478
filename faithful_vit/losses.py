"""The loss terms of ``docs/method.md`` section 5 (PDiscoFormer part priors plus both classifiers).

Every function takes the soft part maps ``(B, K + 1, H, W)`` (index K is the background) or the modulated part
embeddings ``(B, C, K + 1)`` and returns a scalar: the losses are functions of the model's outputs, and this module
imports nothing of the model. :func:`compute_losses` combines them with given weights; terms with weight 0 are not
computed. :func:`training_losses` calls it with a model's own weights (``loss_weights``), after the equivariance pass.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from faithful_vit.model_protocol import EquivariantModel, ModelOutput, TrainableModel

__all__ = [
    "area_loss",
    "compute_losses",
    "concentration_loss",
    "enforced_presence_loss",
    "entropy_loss",
    "equivariance_loss",
    "orthogonality_loss",
    "presence_loss",
    "total_variation_loss",
    "training_losses",
]

_EPS = 1e-10


def _pool3(maps: torch.Tensor) -> torch.Tensor:
    """3x3 average pooling, stride 1, no padding (smaller windows on grids under 3 patches)."""
    kernel = (min(3, maps.shape[-2]), min(3, maps.shape[-1]))
    return F.avg_pool2d(maps, kernel, stride=1)


def presence_loss(maps: torch.Tensor) -> torch.Tensor:
    """Every foreground part appears strongly in at least one image of the batch.

    ``1 - mean_k max_b max_hw avgpool3(maps_k)`` over the K foreground parts.
    """
    pooled = _pool3(maps[:, :-1])
    return 1 - pooled.amax(dim=(2, 3)).amax(dim=0).mean()


def radial_weight(height: int, width: int, device: torch.device | None = None) -> torch.Tensor:
    """``(H, W)`` weight ``(gx^2 + gy^2) / max``: 0 at the centre, 1 in the corners (gx, gy in [-1, 1])."""
    gy = torch.linspace(-1, 1, height, device=device)
    gx = torch.linspace(-1, 1, width, device=device)
    weight = gy[:, None] ** 2 + gx[None, :] ** 2
    return weight / weight.max()


def enforced_presence_loss(maps: torch.Tensor) -> torch.Tensor:
    """The background must exist away from the centre of every image.

    ``-mean_b log(max_hw avgpool3(maps_bg * radial_weight))``.
    """
    weighted = maps[:, -1:] * radial_weight(*maps.shape[-2:], device=maps.device)
    peak = _pool3(weighted).amax(dim=(1, 2, 3))
    return -torch.log(peak.clamp(min=_EPS)).mean()


def orthogonality_loss(part_embeddings: torch.Tensor) -> torch.Tensor:
    """Distinct parts have distinct embeddings: ``mean((G - I)^2)`` with G the cosine Gram matrix of the K + 1 parts.

    Args:
        part_embeddings: ``(B, C, K + 1)`` modulated embeddings (background included).
    """
    unit = F.normalize(part_embeddings, dim=1)
    gram = unit.transpose(1, 2) @ unit
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    return (gram - eye).pow(2).mean()


def equivariance_loss(maps: torch.Tensor, maps_back: torch.Tensor) -> torch.Tensor:
    """``1 - mean_{b, k<K} cos(vec(maps_k), vec(maps_back_k))`` over the foreground parts.

    Args:
        maps: ``(B, K + 1, H, W)`` maps of the original images.
        maps_back: ``(B, K + 1, H, W)`` maps of the transformed images, warped back to the original frame.
    """
    a = maps[:, :-1].flatten(2)
    b = maps_back[:, :-1].flatten(2)
    return 1 - F.cosine_similarity(a, b, dim=2, eps=1e-8).mean()


def total_variation_loss(maps: torch.Tensor) -> torch.Tensor:
    """``(sum |d_h maps| + sum |d_w maps|) / (B H W)`` over all K + 1 maps."""
    batch, _, height, width = maps.shape
    tv_h = (maps[:, :, 1:] - maps[:, :, :-1]).abs().sum()
    tv_w = (maps[:, :, :, 1:] - maps[:, :, :, :-1]).abs().sum()
    return (tv_h + tv_w) / (batch * height * width)


def entropy_loss(maps: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of the entropy of the (K + 1)-way assignment."""
    return -(maps * torch.log(maps.clamp(min=_EPS))).sum(dim=1).mean()


def concentration_loss(maps: torch.Tensor) -> torch.Tensor:
    """Compact parts: mean over images and foreground parts of the spatial variance of each map (coordinates in
    [-1, 1]) around its centroid. Off in the paper (weight 0)."""
    fg = maps[:, :-1]
    height, width = fg.shape[-2:]
    gy = torch.linspace(-1, 1, height, device=maps.device)[:, None].expand(height, width)
    gx = torch.linspace(-1, 1, width, device=maps.device)[None, :].expand(height, width)
    mass = fg.sum(dim=(2, 3)).clamp(min=_EPS)
    cy = (fg * gy).sum(dim=(2, 3)) / mass
    cx = (fg * gx).sum(dim=(2, 3)) / mass
    spread = (gy - cy[..., None, None]) ** 2 + (gx - cx[..., None, None]) ** 2
    return ((fg * spread).sum(dim=(2, 3)) / mass).mean()


def area_loss(maps: torch.Tensor, target: float) -> torch.Tensor:
    """``mean_b relu(target - soft foreground fraction)``: a minimum-area prior (our deviation, off by default)."""
    foreground_fraction = 1 - maps[:, -1].mean(dim=(1, 2))
    return F.relu(target - foreground_fraction).mean()


def compute_losses(
    out: ModelOutput,
    labels: torch.Tensor,
    weights: dict[str, float],
    *,
    area_target: float,
    maps_back: torch.Tensor | None,
) -> dict[str, torch.Tensor]:
    """Named loss terms (unweighted) and ``"total"``, their sum weighted by ``weights``.

    Args:
        out: a model's output: a :class:`~faithful_vit.model.FaithfulViTOutput` (its logits, part maps and part
            embeddings) or, for a comparison model, any :class:`~faithful_vit.model_protocol.ModelOutput` (its
            ``logits``, term ``ce``).
        labels: ``(B,)`` int64 class indices.
        weights: the weight of every term the model trains with (``FaithfulViTConfig.loss_weights``); terms it does
            not name or weighs 0 are skipped.
        area_target: target soft foreground fraction of the ``area`` term.
        maps_back: ``(B, K + 1, H, W)`` the maps of a transformed copy of the images warped back
            (``FaithfulViT.equivariance_maps``); required when the equivariance weight is not 0.
    """
    if weights.get("equivariance", 0) != 0 and maps_back is None:
        raise ValueError("maps_back: the equivariance weight is not 0, expected the back-warped maps, got None")
    maps = out.part_maps
    terms = {
        "ce": lambda: F.cross_entropy(out.logits.float(), labels),
        "ce_stage2": lambda: F.cross_entropy(out.stage2_logits.float(), labels),
        "ce_stage1": lambda: F.cross_entropy(out.stage1_logits.float(), labels),
        "presence": lambda: presence_loss(maps),
        "enforced_presence": lambda: enforced_presence_loss(maps),
        "orthogonality": lambda: orthogonality_loss(out.part_embeddings.float()),
        "equivariance": lambda: equivariance_loss(maps, maps_back),
        "total_variation": lambda: total_variation_loss(maps),
        "entropy": lambda: entropy_loss(maps),
        "concentration": lambda: concentration_loss(maps),
        "area": lambda: area_loss(maps, area_target),
    }
    unknown = sorted(set(weights) - set(terms))
    if unknown:
        raise ValueError(f"weights: expected loss terms among {sorted(terms)}, got unknown {unknown}")
    losses = {name: term() for name, term in terms.items() if weights.get(name, 0) != 0}
    start = labels.new_zeros((), dtype=torch.float32)
    losses["total"] = sum((weights[name] * value for name, value in losses.items()), start)
    return losses


def training_losses(
    model: TrainableModel, out: ModelOutput, images: torch.Tensor, labels: torch.Tensor
) -> dict[str, torch.Tensor]:
    """The loss terms ``model`` trains with on ``out = model(images)``: :func:`compute_losses` with the model's
    ``loss_weights`` and ``area_target``.

    A non-zero equivariance weight first runs ``model.equivariance_maps(images)``: one extra stage-1 pass on a
    randomly transformed copy of ``images`` (it draws from the torch generator, after the forward pass).

    Args:
        model: the plain module (not a DDP or compile wrapper), a
            :class:`~faithful_vit.model_protocol.TrainableModel`; an
            :class:`~faithful_vit.model_protocol.EquivariantModel` when it weighs the equivariance term.
        out: ``model(images)``.
        images: ``(B, C, H, W)``, the batch ``out`` came from.
        labels: ``(B,)`` int64 class indices.

    Returns:
        ``{name: scalar}`` for every term with a non-zero weight, plus ``"total"``.
    """
    weights = model.loss_weights
    maps_back = None
    if weights.get("equivariance", 0) != 0:
        if not isinstance(model, EquivariantModel):
            raise TypeError(
                f"model: the equivariance weight is not 0, expected a model with equivariance_maps, "
                f"got {type(model).__name__}"
            )
        maps_back = model.equivariance_maps(images)[0]
    return compute_losses(out, labels, weights, area_target=model.area_target, maps_back=maps_back)
