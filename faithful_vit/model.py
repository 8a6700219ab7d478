"""The two-stage faithful ViT (Aniraj et al., arXiv 2506.08915): part discovery, a hard token mask, a masked stage 2.

Stage 1 (a timm ViT plus a PDiscoFormer head) sees the whole image and assigns every patch token to one of K
foreground parts or to the background. A patch is kept iff its best part is a foreground part. Stage 2 (a second timm
ViT, sparsified) classifies from the class token while every attention may only read the prefix tokens and the kept
patches, so its prediction depends on the pixels of the kept patches only (:func:`faithful_vit.audit` checks this).

Deviations from the authors' code, all deliberate (``docs/method.md`` says why):
    * the straight-through gate reaches stage 1: ``gate = keep + (S - S.detach())`` in "masked" mode;
      ``straight_through=False`` reproduces the authors' detached mask;
    * at evaluation the soft maps and the mask are deterministic (no Gumbel noise) unless ``stochastic_eval=True``;
    * stage-1 logits are computed in fp32 with autocast off;
    * confidence thresholds keep the -distance logits and only drop a foreground part where its score
      is below its threshold, instead of switching every logit to the raw dot product;
    * optional, off by default: a morphological clean-up of the kept patches (``mask_morphology``: 4-neighbour
      erosion, opening or opening by reconstruction) and a minimum-foreground-area prior (loss ``area``), which the
      small synthetic benchmark needs (``docs/results.md``).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field, fields

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from .geometry import invert_affine, random_rigid_transform, warp
from .morphology import KEEP_MORPHOLOGY
from .sparsify import forward_kept, sparsify
from .timm_weights import load_backbone_file

__all__ = [
    "FaithfulViT",
    "FaithfulViTConfig",
    "FaithfulViTOutput",
    "Stage1Output",
    "STAGE2_MODES",
    "PAPER_LOSS_WEIGHTS",
    "PAPER_LR_FACTORS",
]

STAGE2_MODES = ("dense", "masked", "packed")
MASK_MORPHOLOGY = ("none", *KEEP_MORPHOLOGY)
POS_EMBED_INITS = ("trunc_normal", "sincos")

# Section 6 (the paper's defaults), plus our optional area prior (off).
PAPER_LOSS_WEIGHTS: dict[str, float] = {
    "ce_stage2": 1.0,
    "ce_stage1": 1.0,
    "presence": 1.0,
    "enforced_presence": 2.0,
    "orthogonality": 1.0,
    "equivariance": 1.0,
    "total_variation": 1.0,
    "entropy": 1.0,
    "concentration": 0.0,
    "area": 0.0,
}

# Section 7.1: multipliers of the base learning rate, tuned for a pretrained backbone at lr ~3e-6.
PAPER_LR_FACTORS: dict[str, float] = {
    "heads": 1e4,
    "modulation": 1e4,
    "prototypes": 1e3,
    "stage1_tokens": 1.0,
    "stage1_backbone": 1.0,
    "stage2_tokens": 1.0,
    "stage2_backbone": 1.0,
}


@dataclass
class FaithfulViTConfig:
    """Everything that defines a :class:`FaithfulViT`; presets live in :mod:`faithful_vit.registry`.

    Attributes:
        backbone: timm model name of both stages (built with ``pretrained=False``).
        img_size: input side in pixels; must be a multiple of the patch size.
        num_classes: classes of both classifiers.
        num_parts: K foreground parts (the background is part K).
        in_chans: image channels.
        backbone_kwargs: extra ``timm.create_model`` arguments of both stages (``patch_size``, ``embed_dim``, ...).
        stage2_backbone: timm name of stage 2 if it differs from ``backbone`` (same patch grid required).
        stage2_backbone_kwargs: extra arguments of stage 2 only, merged over ``backbone_kwargs``.
        stage2_pos_embed_init: "trunc_normal" (timm's) or "sincos": stage 2's learned position embedding starts as
            the fixed 2-D sine-cosine table of MAE (zero for the prefix tokens), so a from-scratch stage 2 knows where
            each kept patch lies from its first step. Loaded weights replace either.
        freeze_stage1_backbone: freeze stage 1 except its prefix tokens and position embedding (the paper's setting;
            only sensible with pretrained weights).
        part_dropout: ``Dropout1d`` probability on the part embeddings before the stage-1 classifier.
        mask_part_dropout: probability of dropping a foreground part channel from the mask, per image, in training.
        mask_part_dropout_after_morphology: drop a part's patches after the clean-up (``mask_morphology``) instead
            of before it: before, the clean-up can erase what remains of an object split between parts (half an
            object may hold no full cross); after, it removes exactly the patches the dropped parts won, as
            ``remove_parts`` does.
        mask_part_dropout_never_empties: where part dropout would leave an image with no kept patch, that image
            keeps its mask without dropout: when one part covers the whole object, dropping it would otherwise give
            stage 2 nothing to learn from in a ``mask_part_dropout`` share of its training images.
        mask_token_dropout: probability of dropping each kept patch of the mask on its own, per image, in training,
            after the clean-up and part dropout: stage 2 then cannot rely on the exact number and outline of the
            kept patches, which stage 1 chooses from the whole image (they can carry the background).
        gumbel_tau: Gumbel-softmax temperature of the soft maps and of the mask.
        stage1_epochs: train stage 1 (backbone, prototypes, modulation, part classifier) in the first
            ``stage1_epochs`` epochs only (None: in every epoch, the paper's joint training). In later epochs stage 1
            runs without gradients, still drawing the training masks (Gumbel noise, part dropout), and only stage 2
            learns, from its cross-entropy alone: a step then costs one stage-1 forward plus stage 2, so stage 2
            gets more epochs for little time. The engine announces each epoch with :meth:`FaithfulViT.set_epoch`.
        stochastic_eval: keep the Gumbel noise at evaluation (the authors' behaviour).
        straight_through: let the stage-2 loss reach stage 1 through the gate (our fix); False detaches the mask as
            the authors' code does. Caution: the gate lets stage 2 ask for whatever lowers its training loss, and on
            a training set with a spurious background that includes the background (measured in README "Results").
        mask_morphology: clean-up of the kept patches with a 4-neighbour cross (a deviation, "none" in the paper):
            "erode" keeps a patch iff it and its 4 neighbours are kept; "open" (erosion then dilation) removes the
            kept specks that hold no full cross and rounds larger regions (a 3 x 3 block becomes a plus);
            "reconstruct" (opening by reconstruction) removes the same specks and keeps every other region whole.
        area_target: target soft foreground fraction of the ``area`` loss.
        stage2_mode: default stage-2 execution mode; None picks "masked" when the gate needs a gradient (training
            with ``straight_through``) and "packed" otherwise.
        loss_weights: weight of every named loss term (see :data:`PAPER_LOSS_WEIGHTS`).
        lr_factors: learning-rate multiplier of every parameter group (see :data:`PAPER_LR_FACTORS`).
        equivariance_degrees, equivariance_translate, equivariance_scale: the random rigid transform of the
            equivariance loss: angle in U(-degrees, degrees), integer translation up to translate * img_size pixels
            per axis, scale in U(*scale).
        drop_path_rate: stochastic depth of both backbones.
        backend: attention-kernel backend of stage 2's "masked" and "packed" modes ("auto", "triton",
            "torch"; see :func:`faithful_vit.sparsify`).
    """

    backbone: str = "vit_tiny_patch16_224"
    img_size: int = 64
    num_classes: int = 2
    num_parts: int = 3
    in_chans: int = 3
    backbone_kwargs: dict = field(default_factory=dict)
    stage2_backbone: str | None = None
    stage2_backbone_kwargs: dict = field(default_factory=dict)
    stage2_pos_embed_init: str = "trunc_normal"
    freeze_stage1_backbone: bool = False
    part_dropout: float = 0.3
    mask_part_dropout: float = 0.3
    mask_part_dropout_after_morphology: bool = False
    mask_part_dropout_never_empties: bool = False
    mask_token_dropout: float = 0.0
    gumbel_tau: float = 1.0
    stage1_epochs: int | None = None
    stochastic_eval: bool = False
    straight_through: bool = True
    mask_morphology: str = "none"
    area_target: float = 0.25
    stage2_mode: str | None = None
    loss_weights: dict[str, float] = field(default_factory=lambda: dict(PAPER_LOSS_WEIGHTS))
    lr_factors: dict[str, float] = field(default_factory=lambda: dict(PAPER_LR_FACTORS))
    equivariance_degrees: float = 90.0
    equivariance_translate: float = 0.11
    equivariance_scale: tuple[float, float] = (0.8, 1.4)
    drop_path_rate: float = 0.0
    backend: str = "auto"

    def __post_init__(self) -> None:
        if not isinstance(self.num_parts, int) or self.num_parts < 1:
            raise ValueError(f"num_parts: expected an int >= 1 (K foreground parts), got {self.num_parts!r}")
        if not isinstance(self.num_classes, int) or self.num_classes < 1:
            raise ValueError(f"num_classes: expected an int >= 1, got {self.num_classes!r}")
        if not isinstance(self.img_size, int) or self.img_size < 1:
            raise ValueError(f"img_size: expected a positive int, got {self.img_size!r}")
        for name in ("part_dropout", "mask_part_dropout", "mask_token_dropout"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name}: expected a probability in [0, 1), got {value!r}")
        if self.gumbel_tau <= 0:
            raise ValueError(f"gumbel_tau: expected > 0, got {self.gumbel_tau!r}")
        if self.stage1_epochs is not None and (
            not isinstance(self.stage1_epochs, int) or isinstance(self.stage1_epochs, bool) or self.stage1_epochs < 1
        ):
            raise ValueError(f"stage1_epochs: expected None or an int >= 1, got {self.stage1_epochs!r}")
        if self.stage2_pos_embed_init not in POS_EMBED_INITS:
            raise ValueError(
                f"stage2_pos_embed_init: expected one of {POS_EMBED_INITS}, got {self.stage2_pos_embed_init!r}"
            )
        if self.mask_morphology not in MASK_MORPHOLOGY:
            raise ValueError(f"mask_morphology: expected one of {MASK_MORPHOLOGY}, got {self.mask_morphology!r}")
        if self.stage2_mode is not None and self.stage2_mode not in STAGE2_MODES:
            raise ValueError(f"stage2_mode: expected None or one of {STAGE2_MODES}, got {self.stage2_mode!r}")
        self.loss_weights = _merge_known("loss_weights", PAPER_LOSS_WEIGHTS, self.loss_weights)
        self.lr_factors = _merge_known("lr_factors", PAPER_LR_FACTORS, self.lr_factors)

    def replace(self, **overrides) -> FaithfulViTConfig:
        """A copy with some fields changed; ``loss_weights`` / ``lr_factors`` / ``*_kwargs`` dicts are merged."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise TypeError(f"unknown FaithfulViTConfig field(s) {unknown}; known fields: {sorted(known)}")
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, value in overrides.items():
            if name in ("loss_weights", "lr_factors", "backbone_kwargs", "stage2_backbone_kwargs"):
                value = {**values[name], **value}
            values[name] = value
        return FaithfulViTConfig(**values)


def _merge_known(name: str, defaults: dict[str, float], given: dict[str, float]) -> dict[str, float]:
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ValueError(f"{name}: unknown key(s) {unknown}; expected a subset of {sorted(defaults)}")
    return {**defaults, **{k: float(v) for k, v in given.items()}}


@dataclass
class Stage1Output:
    """What stage 1 computes from an image batch (``G = H * W`` patches on an ``H x W`` grid).

    Attributes:
        stage1_logits: ``(B, num_classes)`` the part-based classifier, averaged over the K parts.
        part_logits: ``(B, K + 1, H, W)`` fp32 ``-||z - p_k||^2`` (after confidence thresholds, if set).
        part_scores: ``(B, K + 1, H, W)`` fp32 dot products ``z . p_k`` (what thresholds are calibrated on).
        part_maps: ``(B, K + 1, H, W)`` soft assignment (Gumbel-softmax in training, softmax at evaluation).
        part_embeddings: ``(B, C, K + 1)`` modulated part embeddings.
    """

    stage1_logits: torch.Tensor
    part_logits: torch.Tensor
    part_scores: torch.Tensor
    part_maps: torch.Tensor
    part_embeddings: torch.Tensor


@dataclass
class FaithfulViTOutput:
    """The result of :meth:`FaithfulViT.forward`.

    Attributes:
        stage1_logits: ``(B, num_classes)``.
        stage2_logits: ``(B, num_classes)``, a function of the kept patches' pixels only.
        part_maps: ``(B, K + 1, H, W)`` soft part maps (index K is the background).
        keep: ``(B, H * W)`` bool, the patches stage 2 may read, in raster order. Prefix tokens are always read.
        kept_fraction: ``(B,)`` the fraction of patches kept.
        part_logits, part_scores, part_embeddings: see :class:`Stage1Output`.
        gate: ``(B, H * W)`` straight-through gate (value == keep) when stage 2 received one, else None.
    """

    stage1_logits: torch.Tensor
    stage2_logits: torch.Tensor
    part_maps: torch.Tensor
    keep: torch.Tensor
    kept_fraction: torch.Tensor
    part_logits: torch.Tensor
    part_scores: torch.Tensor
    part_embeddings: torch.Tensor
    gate: torch.Tensor | None = None

    @property
    def logits(self) -> torch.Tensor:
        """The prediction: :attr:`stage2_logits`."""
        return self.stage2_logits


def _build_backbone(name: str, cfg: FaithfulViTConfig, kwargs: dict) -> nn.Module:
    kwargs = {"drop_path_rate": cfg.drop_path_rate, **kwargs}
    backbone = timm.create_model(
        name, pretrained=False, num_classes=0, img_size=cfg.img_size, in_chans=cfg.in_chans, **kwargs
    )
    for attr in ("patch_embed", "num_prefix_tokens", "blocks", "norm"):
        if not hasattr(backbone, attr):
            raise ValueError(f"backbone {name!r}: expected a timm VisionTransformer-like model (no {attr!r})")
    if getattr(backbone, "cls_token", None) is None or backbone.global_pool != "token":
        raise ValueError(f"backbone {name!r}: expected a class token and global_pool='token' (stage 2 reads CLS)")
    patch = backbone.patch_embed.patch_size
    if cfg.img_size % patch[0] or cfg.img_size % patch[1]:
        raise ValueError(f"img_size: expected a multiple of the patch size {tuple(patch)}, got {cfg.img_size}")
    return backbone


def _init_sincos_pos_embed(backbone: nn.Module, grid_size: tuple[int, int]) -> None:
    pos_embed = getattr(backbone, "pos_embed", None)
    num_patches = grid_size[0] * grid_size[1]
    if not isinstance(pos_embed, nn.Parameter) or pos_embed.shape[1] not in (num_patches, num_patches + 1):
        shape = None if pos_embed is None else tuple(pos_embed.shape)
        raise ValueError(
            f"stage2_pos_embed_init: 'sincos' expects a learned absolute position embedding of "
            f"{num_patches} (+ 1 class) positions, the stage-2 backbone has {shape}"
        )
    table = timm.layers.build_sincos2d_pos_embed(list(grid_size), pos_embed.shape[-1])
    with torch.no_grad():
        pos_embed.zero_()
        pos_embed[0, pos_embed.shape[1] - num_patches :] = table.to(pos_embed.dtype)


def _trunc_normal_linear(in_features: int, out_features: int) -> nn.Linear:
    layer = nn.Linear(in_features, out_features, bias=False)
    nn.init.trunc_normal_(layer.weight, std=0.02)
    return layer


def gumbel_noise_like(x: torch.Tensor) -> torch.Tensor:
    """Standard Gumbel(0, 1) noise of the shape of ``x`` (``-log(Exp(1))``, never infinite)."""
    return -torch.empty_like(x).exponential_().log()


class FaithfulViT(nn.Module):
    """Two-stage ViT whose stage-2 prediction provably depends only on the patches stage 1 keeps.

    Attributes:
        stage1, stage2: the two timm backbones (stage 2 is sparsified for the "masked" and "packed" modes).
        prototypes: ``(K + 1, C)`` part prototypes; row K is the background.
        modulation: ``LayerNorm([C, K + 1])`` over the part embeddings of a sample (per part, per channel affine).
        part_dropout: ``Dropout1d`` over the K foreground part embeddings.
        part_classifier: bias-free ``Linear(C, num_classes)`` shared by all parts.
        fc_norm, head: stage-2 head on the pre-logit class token (a new LayerNorm, a bias-free Linear).
        part_thresholds: ``(K,)`` buffer of per-part confidence thresholds on ``z . p_k`` (-inf: off), section 11.1.

    It is a :class:`~faithful_vit.model_protocol.EquivariantModel`: :func:`faithful_vit.losses.training_losses`
    computes its losses (section 6) from its output, ``loss_weights``, ``area_target`` and :meth:`equivariance_maps`.
    """

    uses_ground_truth_mask = False

    def __init__(self, cfg: FaithfulViTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.num_parts = cfg.num_parts
        self.num_classes = cfg.num_classes
        self.stage1 = _build_backbone(cfg.backbone, cfg, cfg.backbone_kwargs)
        stage2_kwargs = {**cfg.backbone_kwargs, **cfg.stage2_backbone_kwargs}
        self.stage2 = _build_backbone(cfg.stage2_backbone or cfg.backbone, cfg, stage2_kwargs)
        if tuple(self.stage1.patch_embed.grid_size) != tuple(self.stage2.patch_embed.grid_size):
            raise ValueError(
                f"stage2_backbone: expected the patch grid of stage 1 {tuple(self.stage1.patch_embed.grid_size)}, "
                f"got {tuple(self.stage2.patch_embed.grid_size)}"
            )
        self.grid_size: tuple[int, int] = tuple(self.stage1.patch_embed.grid_size)
        self.patch_size: tuple[int, int] = tuple(self.stage1.patch_embed.patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        if cfg.stage2_pos_embed_init == "sincos":
            _init_sincos_pos_embed(self.stage2, self.grid_size)
        sparsify(self.stage2, backend=cfg.backend)  # in place; parameters and state dict unchanged

        dim1, dim2 = self.stage1.embed_dim, self.stage2.embed_dim
        k1 = cfg.num_parts + 1
        # The authors' 1x1 conv default init; prototypes far from LayerNorm'd features start with sharp maps.
        self.prototypes = nn.Parameter(torch.empty(k1, dim1).uniform_(-(dim1**-0.5), dim1**-0.5))
        self.modulation = nn.LayerNorm([dim1, k1])
        self.part_dropout = nn.Dropout1d(cfg.part_dropout)
        self.part_classifier = _trunc_normal_linear(dim1, cfg.num_classes)
        self.fc_norm = nn.LayerNorm(dim2)
        self.head = _trunc_normal_linear(dim2, cfg.num_classes)
        self.register_buffer("part_thresholds", torch.full((cfg.num_parts,), float("-inf")))
        self.stage1_learning = True  # see set_epoch

        if cfg.freeze_stage1_backbone:
            for name, param in self.stage1.named_parameters():
                param.requires_grad_(name in _PREFIX_AND_POSITION)

    # ---- stage 1 ----

    def check_images(self, images: torch.Tensor) -> None:
        """Raise a clear error unless ``images`` is ``(B, in_chans, img_size, img_size)`` floating point."""
        expected = (self.cfg.in_chans, self.cfg.img_size, self.cfg.img_size)
        if not isinstance(images, torch.Tensor) or images.ndim != 4:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"images: expected a (B, {', '.join(map(str, expected))}) tensor, got {shape}")
        if images.shape[1] != self.cfg.in_chans:
            raise ValueError(f"images: expected {self.cfg.in_chans} channels (dim 1), got shape {tuple(images.shape)}")
        if tuple(images.shape[2:]) != expected[1:]:
            raise ValueError(f"images: expected spatial size {expected[1:]}, got shape {tuple(images.shape)}")
        if not images.is_floating_point():
            raise TypeError(f"images: expected a floating dtype, got {images.dtype}")

    def _stochastic(self) -> bool:
        return self.training or self.cfg.stochastic_eval

    def forward_stage1(self, images: torch.Tensor) -> Stage1Output:
        """Part discovery on the whole image (section 3).

        Args:
            images: ``(B, in_chans, img_size, img_size)``.

        Returns:
            :class:`Stage1Output`.
        """
        self.check_images(images)
        tokens = self.stage1.forward_features(images)[:, self.stage1.num_prefix_tokens :]
        batch, _, dim = tokens.shape
        with torch.autocast(device_type=images.device.type, enabled=False):
            z = tokens.float()
            prototypes = self.prototypes.float()
            scores = z @ prototypes.t()  # (B, G, K+1)
            sq_dist = z.pow(2).sum(-1, keepdim=True) - 2 * scores + prototypes.pow(2).sum(-1)
            logits = -sq_dist
            if not self.training:
                logits = self._apply_thresholds(logits, scores)
        grid = (batch, *self.grid_size, self.num_parts + 1)
        logits = logits.view(grid).permute(0, 3, 1, 2)
        scores = scores.view(grid).permute(0, 3, 1, 2)
        if self._stochastic():
            maps = torch.softmax((logits + gumbel_noise_like(logits)) / self.cfg.gumbel_tau, dim=1)
        else:
            maps = torch.softmax(logits / self.cfg.gumbel_tau, dim=1)
        # Section 3.4: a plain spatial mean of the weighted features (not normalised by part area).
        features = z.view(batch, *self.grid_size, dim).permute(0, 3, 1, 2)
        embeddings = torch.einsum("bkhw,bchw->bck", maps, features) / self.num_patches
        embeddings = self.modulation(embeddings.to(self.modulation.weight.dtype))
        foreground = self.part_dropout(embeddings[..., : self.num_parts].transpose(1, 2))  # (B, K, C)
        stage1_logits = self.part_classifier(foreground).mean(dim=1)
        return Stage1Output(stage1_logits, logits, scores, maps, embeddings)

    def _apply_thresholds(self, logits: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """Section 11.1 without the authors' quirk: a foreground part whose score is below its threshold is removed
        from the competition for that token (-inf); every other logit stays a -distance."""
        # No data-dependent branch (torch.compile): a threshold of -inf never fires.
        low = F.pad(scores[..., : self.num_parts] < self.part_thresholds.to(scores.dtype), (0, 1), value=False)
        return logits.masked_fill(low, float("-inf"))

    def set_part_thresholds(self, thresholds: torch.Tensor | Sequence[float] | None) -> None:
        """Set the per-part confidence thresholds (``(K,)``, on ``z . p_k``) applied at evaluation; None clears."""
        if thresholds is None:
            self.part_thresholds.fill_(float("-inf"))
            return
        values = torch.as_tensor(thresholds, dtype=self.part_thresholds.dtype)
        if values.shape != (self.num_parts,):
            raise ValueError(
                f"thresholds: expected shape ({self.num_parts},) (one per foreground part), got {tuple(values.shape)}"
            )
        self.part_thresholds.copy_(values)

    # ---- the mask ----

    def compute_keep(
        self,
        part_logits: torch.Tensor,
        *,
        remove_parts: Sequence[int] | None = None,
        stochastic: bool | None = None,
        part_dropout: bool | None = None,
        with_gate: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The hard patch mask of section 4: a patch is kept iff its best part is a foreground part.

        Args:
            part_logits: ``(B, K + 1, H, W)`` from :meth:`forward_stage1`.
            remove_parts: foreground parts whose patches become background (section 11.2).
            stochastic: add a fresh Gumbel sample (default: in training or with ``stochastic_eval``).
            part_dropout: apply the training mask's dropouts, of foreground part channels per image
                (``mask_part_dropout``) and of single kept patches (``mask_token_dropout``) (default: in training).
            with_gate: also return the straight-through gate ``keep + (S - S.detach())``, ``S = sum_k y_fg``.

        Returns:
            ``keep`` ``(B, H * W)`` bool and the gate ``(B, H * W)`` (or None).
        """
        num_parts = self.num_parts
        stochastic = self._stochastic() if stochastic is None else stochastic
        part_dropout = self.training if part_dropout is None else part_dropout
        if stochastic:
            part_logits = part_logits + gumbel_noise_like(part_logits)
        probs = torch.softmax(part_logits / self.cfg.gumbel_tau, dim=1)
        foreground, background = probs[:, :num_parts], probs[:, num_parts]
        survive = None
        if part_dropout and self.cfg.mask_part_dropout > 0:
            survive = torch.rand(probs.shape[0], num_parts, 1, 1, device=probs.device) >= self.cfg.mask_part_dropout
        if survive is None:
            keep, _ = self._cleaned_keep(foreground, background, remove_parts)
            gate_parts = foreground
        else:
            gate_parts = foreground * survive  # the gate's surrogate counts the surviving parts only
            full = None  # the mask without dropout, computed when needed
            if self.cfg.mask_part_dropout_after_morphology:
                full, best_part = self._cleaned_keep(foreground, background, remove_parts)
                keep = full & survive.flatten(1).gather(1, best_part)
            else:
                keep, _ = self._cleaned_keep(gate_parts, background, remove_parts)
            if self.cfg.mask_part_dropout_never_empties:
                if full is None:
                    full, _ = self._cleaned_keep(foreground, background, remove_parts)
                emptied = ~keep.any(dim=1, keepdim=True)
                keep = torch.where(emptied, full, keep)
                gate_parts = torch.where(emptied[:, :, None, None], foreground, gate_parts)
        if part_dropout and self.cfg.mask_token_dropout > 0:
            keep = keep & (torch.rand(keep.shape, device=keep.device) >= self.cfg.mask_token_dropout)
        gate = None
        if with_gate:
            surrogate = gate_parts.sum(dim=1).flatten(1)
            gate = keep.to(surrogate.dtype) + (surrogate - surrogate.detach())
        return keep, gate

    def _cleaned_keep(
        self, foreground: torch.Tensor, background: torch.Tensor, remove_parts: Sequence[int] | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The argmax rule on ``(B, K, H, W)`` foreground and ``(B, H, W)`` background probabilities, minus
        ``remove_parts``, then the clean-up: ``keep`` ``(B, H * W)`` bool and each patch's best foreground part
        ``(B, H * W)``."""
        best_value, best_part = foreground.max(dim=1)
        keep = best_value > background
        if remove_parts:
            removed = self._part_index("remove_parts", remove_parts, foreground.device)
            keep = keep & ~torch.isin(best_part, removed)
        keep = keep.flatten(1)
        if self.cfg.mask_morphology != "none":
            keep = KEEP_MORPHOLOGY[self.cfg.mask_morphology](keep, self.grid_size)
        return keep, best_part.flatten(1)

    def _part_index(self, name: str, parts: Sequence[int], device: torch.device) -> torch.Tensor:
        index = torch.as_tensor(list(parts), dtype=torch.long, device=device)
        if index.ndim != 1 or ((index < 0) | (index >= self.num_parts)).any():
            raise ValueError(f"{name}: expected foreground part ids in [0, {self.num_parts}), got {list(parts)}")
        return index

    # ---- stage 2 ----

    def default_stage2_mode(self) -> str:
        """ "masked" when the gate needs a gradient (training with ``straight_through``), else "packed"."""
        if self.cfg.stage2_mode is not None:
            return self.cfg.stage2_mode
        return "masked" if self.training and self.cfg.straight_through else "packed"

    def forward_stage2(
        self,
        images: torch.Tensor,
        keep: torch.Tensor,
        *,
        mode: str | None = None,
        gate: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Stage 2 restricted to the prefix tokens and the kept patches (section 5).

        Args:
            images: ``(B, in_chans, img_size, img_size)``; the whole image, the mask acts inside attention.
            keep: ``(B, num_patches)`` bool over the patches in raster order.
            mode: "dense" (SDPA with a boolean key mask; the reference), "masked" (the masked-attention kernel; the
                only mode that honours ``gate``) or "packed" (kept tokens gathered; the fastest). All three give the
                same logits. Default: :meth:`default_stage2_mode`.
            gate: optional ``(B, num_patches)`` float equal to ``keep`` whose gradient reaches stage 1.

        Returns:
            ``(B, num_classes)`` logits.
        """
        self.check_images(images)
        self._check_keep(keep, images)
        mode = self.default_stage2_mode() if mode is None else mode
        if mode not in STAGE2_MODES:
            raise ValueError(f"mode: expected one of {STAGE2_MODES}, got {mode!r}")
        if gate is not None and mode != "masked":
            raise ValueError(f"gate: only the 'masked' mode propagates the gate; got mode={mode!r}")
        # 0 * NaN = NaN in every dense product (SDPA's P @ V, LayerNorm's backward on a dropped row), so non-finite
        # pixels of dropped patches are zeroed; finite ones pass untouched, so that the audit's noise and extreme
        # corruptions still exercise the masking itself.
        images = torch.where(self.patch_pixels(~keep) & ~torch.isfinite(images), 0.0, images)
        if mode == "dense":
            features = self._stage2_dense_features(images, keep)
        else:
            features = forward_kept(self.stage2, images, keep, mode=mode, gate=gate)
        return self.head(self.fc_norm(features))

    def patch_pixels(self, patches: torch.Tensor) -> torch.Tensor:
        """Expand a per-patch bool ``(B, num_patches)`` to its pixels, ``(B, 1, img_size, img_size)``."""
        (gh, gw), (ph, pw) = self.grid_size, self.patch_size
        grid = patches.view(-1, gh, gw)
        return grid.repeat_interleave(ph, dim=1).repeat_interleave(pw, dim=2)[:, None]

    def _check_keep(self, keep: torch.Tensor, images: torch.Tensor) -> None:
        expected = (images.shape[0], self.num_patches)
        if not isinstance(keep, torch.Tensor) or keep.dtype != torch.bool or tuple(keep.shape) != expected:
            got = f"{tuple(keep.shape)} {keep.dtype}" if isinstance(keep, torch.Tensor) else type(keep).__name__
            raise ValueError(f"keep: expected a bool tensor of shape {expected} (B, num_patches), got {got}")

    def _stage2_dense_features(self, images: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """The authors' formulation: timm's blocks with SDPA and a materialised ``(B, 1, N, N)`` boolean key mask
        (the same row for every query; prefix tokens always allowed). Independent of our kernels: the sparsified
        attention hands any mask that is not a ``(B, N)`` / ``(B, 1, 1, N)`` key mask to SDPA unchanged.

        """
        backbone = self.stage2
        prefix = keep.new_ones(keep.shape[0], backbone.num_prefix_tokens)
        allowed = torch.cat([prefix, keep], dim=1)
        attn_mask = allowed[:, None, None, :].expand(-1, 1, allowed.shape[1], -1)
        return backbone.forward_head(backbone.forward_features(images, attn_mask=attn_mask), pre_logits=True)

    # ---- both ----

    def forward(
        self,
        images: torch.Tensor,
        *,
        remove_parts: Sequence[int] | None = None,
        mode: str | None = None,
    ) -> FaithfulViTOutput:
        """Both stages: stage 1 on the image, its hard mask, stage 2 on the kept patches.

        In training the soft maps and the mask use independent Gumbel samples and the mask drops parts; at evaluation
        both are deterministic (unless ``stochastic_eval``).

        Args:
            images: ``(B, in_chans, img_size, img_size)``.
            remove_parts: foreground part ids whose patches stage 2 may not read (section 11.2; stage 1 unchanged).
            mode: stage-2 execution mode (see :meth:`forward_stage2`).

        Returns:
            :class:`FaithfulViTOutput`.
        """
        frozen = self.training and not self.stage1_learning
        with torch.no_grad() if frozen else nullcontext():
            stage1 = self.forward_stage1(images)
        mode = self.default_stage2_mode() if mode is None else mode
        with_gate = (
            self.training and not frozen and self.cfg.straight_through and mode == "masked" and torch.is_grad_enabled()
        )
        keep, gate = self.compute_keep(stage1.part_logits, remove_parts=remove_parts, with_gate=with_gate)
        stage2_logits = self.forward_stage2(images, keep, mode=mode, gate=gate)
        return FaithfulViTOutput(
            stage1_logits=stage1.stage1_logits,
            stage2_logits=stage2_logits,
            part_maps=stage1.part_maps,
            keep=keep,
            kept_fraction=keep.float().mean(dim=1),
            part_logits=stage1.part_logits,
            part_scores=stage1.part_scores,
            part_embeddings=stage1.part_embeddings,
            gate=gate,
        )

    @property
    def has_frozen_phase(self) -> bool:
        """Some epochs leave stage 1's parameters without gradients (``cfg.stage1_epochs``; DDP must know)."""
        return self.cfg.stage1_epochs is not None

    def set_epoch(self, epoch: int) -> None:
        """Called by the engine before training epoch ``epoch`` (0-based): stage 1 stops learning from epoch
        ``cfg.stage1_epochs`` on."""
        self.stage1_learning = self.cfg.stage1_epochs is None or epoch < self.cfg.stage1_epochs

    @property
    def loss_weights(self) -> dict[str, float]:
        """The weight of every loss term of section 6 (``cfg.loss_weights``); stage 2's cross-entropy alone in
        training once stage 1 has stopped learning (``cfg.stage1_epochs``)."""
        if self.training and not self.stage1_learning:
            return {"ce_stage2": self.cfg.loss_weights["ce_stage2"]}
        return self.cfg.loss_weights

    @property
    def area_target(self) -> float:
        """Target soft foreground fraction of the ``area`` loss (``cfg.area_target``)."""
        return self.cfg.area_target

    def equivariance_maps(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Stage 1 only on a randomly transformed batch; its maps warped back to the frame of ``images``.

        The transform is :func:`~faithful_vit.geometry.random_rigid_transform` with the config's
        ``equivariance_*`` ranges (section 6, the equivariance loss).

        Returns:
            The back-warped maps ``(B, K + 1, H, W)`` and the forward transform ``(B, 2, 3)``.
        """
        cfg = self.cfg
        theta = random_rigid_transform(
            images.shape[0],
            cfg.img_size,
            cfg.equivariance_degrees,
            cfg.equivariance_translate,
            cfg.equivariance_scale,
            images.device,
        )
        maps = self.forward_stage1(warp(images, invert_affine(theta))).part_maps
        return warp(maps, theta), theta

    def param_groups(self, lr: float, weight_decay: float) -> list[dict]:
        """Optimizer parameter groups of section 7.1 with ``cfg.lr_factors``.

        Groups: "heads" (stage-1 part classifier, stage-2 fc_norm and head), "modulation", "prototypes",
        "stage1_tokens" / "stage2_tokens" (class, register tokens and position embedding), "stage1_backbone",
        "stage2_backbone". Weight decay applies to matrices of the heads and backbones only (never to 1-D parameters,
        tokens, the modulation or the prototypes). Frozen parameters are left out. Each group carries its "name",
        "lr", "lr_factor" and "weight_decay".

        Args:
            lr: base learning rate.
            weight_decay: weight decay of the decayed parameters.

        Returns:
            A list for ``torch.optim.AdamW`` (empty groups omitted).
        """
        factors = self.cfg.lr_factors
        buckets: dict[tuple[str, bool], list[nn.Parameter]] = {}
        for name, param in self.named_parameters():
            if not param.requires_grad:
                continue
            group = _group_of(name)
            decay = group in ("heads", "stage1_backbone", "stage2_backbone") and param.ndim >= 2
            buckets.setdefault((group, decay), []).append(param)
        groups = []
        for (group, decay), params in buckets.items():
            groups.append(
                {
                    "name": group if not decay else f"{group}_decay",
                    "params": params,
                    "lr": lr * factors[group],
                    "lr_factor": factors[group],
                    "weight_decay": weight_decay if decay else 0.0,
                }
            )
        return groups

    def load_backbone_weights(self, path: str, *, stages: Sequence[int] = (1, 2)) -> None:
        """Load a local timm/safetensors ViT checkpoint into the backbones (never from a hub).

        See :func:`~faithful_vit.timm_weights.load_backbone_file` for what is resampled and what starts fresh.

        Args:
            path: a ``.safetensors``, ``.pth`` or ``.bin`` file holding a timm ViT or Eva (e.g. DINOv3) state dict.
            stages: which backbones to load (1 and/or 2).
        """
        for stage in stages:
            if stage not in (1, 2):
                raise ValueError(f"stages: expected values in (1, 2), got {list(stages)}")
            backbone = self.stage1 if stage == 1 else self.stage2
            load_backbone_file(backbone, path, name=f"stage {stage} ({type(backbone).__name__})")

    def extra_repr(self) -> str:
        return (
            f"num_parts={self.num_parts}, num_classes={self.num_classes}, grid={self.grid_size}, "
            f"straight_through={self.cfg.straight_through}, mask_morphology={self.cfg.mask_morphology!r}"
        )


_PREFIX_AND_POSITION = ("cls_token", "reg_token", "pos_embed")


def _group_of(name: str) -> str:
    if name.startswith(("part_classifier.", "fc_norm.", "head.")):
        return "heads"
    if name.startswith("modulation."):
        return "modulation"
    if name == "prototypes":
        return "prototypes"
    stage, _, rest = name.partition(".")
    if stage in ("stage1", "stage2"):
        return f"{stage}_tokens" if rest in _PREFIX_AND_POSITION else f"{stage}_backbone"
    raise ValueError(f"parameter {name!r} belongs to no parameter group")
