"""Part-discovery quality of a two-stage model, as PDiscoNet and PDiscoFormer measure it (``--protocol parts``).

Stage 1's soft part maps (``K`` foreground parts and the background, one value per patch) are upsampled bilinearly
to the image (``align_corners=False``) and every pixel takes its best part, the background included:

* ``nmi``, ``ari``: every visible annotated keypoint of the split (CUB: 15 per bird) takes the part of the pixel that
  contains it; NMI and ARI (scikit-learn, NMI with the arithmetic mean) between the keypoint identities and these
  parts, pooled over the split. A keypoint that falls on the background counts as assigned to part ``K``, as in the
  authors' code; ``keypoints_on_background`` gives that share.
* ``keypoint_error``: per keypoint, a linear regression (no intercept, on standardised inputs and targets) from the
  ``K`` part centroids (the soft-map-weighted mean of the patch centres, in pixels) to the keypoint, both normalised
  by the bird's bounding box (``(x - box x) / box width``, ``(y - box y) / box height``); a part whose map never
  exceeds 0.5 is absent and enters as 0 (the mean). Fitted on the training split's images where the keypoint is
  visible, the error is the mean L2 distance on the evaluated split's, in units of the box size, pooled over
  keypoints (``keypoint_error_per_part`` gives each).
* ``fg_iou``, ``bg_iou``: IoU of the foreground pixels (best part not the background) with the ground-truth mask,
  and of their complements, pooled over the split; ``kept_iou`` and ``kept_patch_iou`` are those of the kept patches
  that stage 2 reads (the accuracy protocol's ``mask_iou`` and ``mask_iou_patch``).

What the data cannot give is None, with the reason under ``not_computable``.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.linear_model import LinearRegression
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score
from sklearn.preprocessing import StandardScaler
from tqdm import tqdm

from faithful_vit.data.class_map import ClassMapped
from faithful_vit.data.datasets import DatasetError
from faithful_vit.data.sample import collate
from faithful_vit.metrics import MetricAccumulator
from faithful_vit.model_spec import SpecError

__all__ = [
    "dataset_keypoints",
    "evaluate_parts",
    "has_keypoints",
    "keypoint_regression_error",
    "nmi_ari",
    "part_at_points",
    "part_centroids",
    "part_discovery",
    "upsampled_parts",
]

PRESENCE_THRESHOLD = 0.5
DEFINITION = "faithful_vit/part_metrics.py; docs/evaluation.md, section 'The parts protocol'"
BOX_NORMALISATION = "the bird's bounding box: (x - box x) / box width, (y - box y) / box height"


# ----------------------------------------------------------------------------------------------------------------
# The measures on tensors


def upsampled_parts(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The best part of every pixel: ``maps`` ``[B, K + 1, h, w]`` upsampled bilinearly to ``size`` -> ``[B, H, W]``."""
    return F.interpolate(maps.float(), size=size, mode="bilinear", align_corners=False).argmax(dim=1)


def part_at_points(parts: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """The part of the pixel that contains each point.

    Args:
        parts: ``[B, H, W]`` part per pixel (:func:`upsampled_parts`).
        points: ``[B, P, 2]`` ``(x, y)`` in pixels, inside the image.

    Returns:
        ``[B, P]`` int64.
    """
    height, width = parts.shape[-2:]
    x = points[..., 0].floor().long().clamp(0, width - 1)
    y = points[..., 1].floor().long().clamp(0, height - 1)
    batch = torch.arange(parts.shape[0], device=parts.device)[:, None]
    return parts[batch, y.to(parts.device), x.to(parts.device)]


def part_centroids(maps: torch.Tensor, patch_size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Centroids and presence of the foreground parts.

    Args:
        maps: ``[B, K + 1, h, w]`` soft part maps (the last channel is the background).
        patch_size: ``(height, width)`` of a patch in pixels.

    Returns:
        ``[B, K, 2]`` float64 ``(x, y)`` in pixels: the map-weighted mean of the patch centres (0 for a part whose
        map is zero everywhere), and ``[B, K]`` bool: the part's map exceeds 0.5 somewhere.
    """
    foreground = maps[:, :-1].double()
    h, w = foreground.shape[-2:]
    ys = (torch.arange(h, dtype=torch.float64, device=maps.device) + 0.5) * patch_size[0]
    xs = (torch.arange(w, dtype=torch.float64, device=maps.device) + 0.5) * patch_size[1]
    mass = foreground.sum(dim=(2, 3))
    x = (foreground * xs).sum(dim=(2, 3)) / mass.clamp(min=1e-30)
    y = (foreground * ys[:, None]).sum(dim=(2, 3)) / mass.clamp(min=1e-30)
    present = foreground.amax(dim=(2, 3)) > PRESENCE_THRESHOLD
    return torch.stack([x, y], dim=-1), present


def nmi_ari(keypoint_ids: np.ndarray, assigned_parts: np.ndarray) -> tuple[float, float]:
    """NMI and ARI between keypoint identities and the parts assigned to them (scikit-learn)."""
    return (
        float(normalized_mutual_info_score(keypoint_ids, assigned_parts)),
        float(adjusted_rand_score(keypoint_ids, assigned_parts)),
    )


def _normalise(coordinates: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """``[N, M, 2]`` pixels -> box units, with ``boxes`` ``[N, 4]`` ``(x, y, width, height)``."""
    return (coordinates - boxes[:, None, :2]) / boxes[:, None, 2:]


@dataclass
class KeypointFrame:
    """What the keypoint regression needs of one split: per image, in pixels of the model's input.

    Attributes:
        centroids: ``[N, K, 2]`` part centroids (:func:`part_centroids`).
        present: ``[N, K]`` bool part presence.
        points: ``[N, P, 2]`` keypoints.
        visible: ``[N, P]`` bool.
        boxes: ``[N, 4]`` ``(x, y, width, height)``.
    """

    centroids: np.ndarray
    present: np.ndarray
    points: np.ndarray
    visible: np.ndarray
    boxes: np.ndarray


def keypoint_regression_error(fit: KeypointFrame, evaluated: KeypointFrame) -> tuple[float | None, list]:
    """The keypoint regression error of the module docstring.

    Returns:
        The mean L2 error in box units over every visible keypoint of ``evaluated`` that was visible in some image of
        ``fit`` (None if there is none), and the error per keypoint (None where it is not visible in both).
    """
    fit_inputs = _normalise(fit.centroids, fit.boxes).reshape(len(fit.boxes), -1)
    eval_inputs = _normalise(evaluated.centroids, evaluated.boxes).reshape(len(evaluated.boxes), -1)
    fit_present, eval_present = np.repeat(fit.present, 2, axis=1), np.repeat(evaluated.present, 2, axis=1)
    fit_targets, eval_targets = _normalise(fit.points, fit.boxes), _normalise(evaluated.points, evaluated.boxes)
    total, count, per_part = 0.0, 0, []
    for part in range(fit.points.shape[1]):
        fit_rows, eval_rows = fit.visible[:, part], evaluated.visible[:, part]
        if not fit_rows.any() or not eval_rows.any():
            per_part.append(None)
            continue
        inputs, targets = StandardScaler().fit(fit_inputs[fit_rows]), StandardScaler().fit(fit_targets[fit_rows, part])
        regressor = LinearRegression(fit_intercept=False).fit(
            np.where(fit_present[fit_rows], inputs.transform(fit_inputs[fit_rows]), 0.0),
            targets.transform(fit_targets[fit_rows, part]),
        )
        standardised = np.where(eval_present[eval_rows], inputs.transform(eval_inputs[eval_rows]), 0.0)
        predicted = targets.inverse_transform(regressor.predict(standardised))
        errors = np.linalg.norm(predicted - eval_targets[eval_rows, part], axis=1)
        per_part.append(float(errors.mean()))
        total, count = total + float(errors.sum()), count + len(errors)
    return (total / count if count else None), per_part


# ----------------------------------------------------------------------------------------------------------------
# One pass of stage 1 over a split


class _Indexed(torch.utils.data.Dataset):
    """``(sample, index)``, so that keypoints stay with their image when a corrupt one is skipped."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        return self.dataset[index], index


def _collate_indexed(items):
    return collate([sample for sample, _ in items]), [index for sample, index in items if sample is not None]


@dataclass
class _Pass:
    kept: MetricAccumulator
    indices: list = field(default_factory=list)
    assigned: list = field(default_factory=list)
    centroids: list = field(default_factory=list)
    present: list = field(default_factory=list)
    fg_sums: torch.Tensor = field(default_factory=lambda: torch.zeros(4, dtype=torch.float64))
    has_masks: bool = False


@torch.no_grad()
def _stage1_pass(
    module, dataset, keypoints, *, masks, batch_size, num_workers, device, amp, patch_threshold, progress, desc
) -> _Pass:
    """Stage 1 over ``dataset``: the centroids, and the parts at the keypoints and the IoU sums when asked for."""
    loader = torch.utils.data.DataLoader(
        _Indexed(dataset), batch_size=batch_size, num_workers=num_workers, collate_fn=_collate_indexed
    )
    result = _Pass(MetricAccumulator(len(dataset.group_names), device, patch_threshold))
    patch_size = tuple(module.patch_size)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if amp and device.type == "cuda" else nullcontext()
    for batch, indices in tqdm(loader, desc=desc, leave=False, disable=not progress):
        if not indices:
            continue
        images = batch.images.to(device)
        with autocast:
            stage1 = module.forward_stage1(images)
            keep, _ = module.compute_keep(stage1.part_logits)
        maps = stage1.part_maps.float()
        centroids, present = part_centroids(maps, patch_size)
        result.indices += indices
        result.centroids.append(centroids.cpu())
        result.present.append(present.cpu())
        with_masks = masks and batch.fg_masks is not None
        if keypoints is None and not with_masks:
            continue
        parts = upsampled_parts(maps, tuple(images.shape[-2:]))
        if keypoints is not None:
            result.assigned.append(part_at_points(parts, keypoints.points[indices]).cpu())
        if with_masks:
            result.has_masks = True
            truth = batch.fg_masks.to(device)[:, 0] > 0.5
            found = parts != module.num_parts
            result.fg_sums += torch.stack(
                [(found & truth).sum(), (found | truth).sum(), (~found & ~truth).sum(), (~found | ~truth).sum()]
            ).cpu()
            result.kept.update(
                stage1.stage1_logits.float(),
                batch.labels.to(device),
                batch.groups.to(device),
                keep,
                batch.fg_masks.to(device),
                patch_size[0],
            )
    return result


def _frame(run: _Pass, keypoints) -> KeypointFrame:
    indices = torch.tensor(run.indices, dtype=torch.long)
    return KeypointFrame(
        centroids=torch.cat(run.centroids).numpy(),
        present=torch.cat(run.present).numpy(),
        points=keypoints.points[indices].numpy(),
        visible=keypoints.visible[indices].numpy(),
        boxes=keypoints.boxes[indices].numpy(),
    )


def _ratio(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if denominator > 0 else None


def part_discovery(
    model,
    dataset,
    *,
    keypoints=None,
    fit_set=None,
    fit_keypoints=None,
    not_computable: dict[str, str] | None = None,
    batch_size: int = 64,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
    amp: bool = False,
    patch_threshold: float = 0.5,
    progress: bool = False,
) -> dict:
    """The measures of the module docstring for a two-stage model on ``dataset``.

    Args:
        model: a :class:`~faithful_vit.model.FaithfulViT` (put in eval mode for the pass, then restored).
        dataset: samples ``(image, label, group[, fg_mask])``; the masks give ``fg_iou``.
        keypoints: the :class:`~faithful_vit.data.datasets.PartKeypoints` of ``dataset`` (None: no NMI/ARI).
        fit_set, fit_keypoints: the split the keypoint regression is fitted on and its keypoints (None: no
            ``keypoint_error``).
        not_computable: why a measure cannot be computed, known before the pass (e.g. why there are no keypoints).
        batch_size, num_workers, device, amp: how stage 1 runs (amp: bfloat16 autocast on CUDA).
        patch_threshold: a patch is ground-truth foreground for ``kept_patch_iou`` above this object fraction.
        progress: progress bars.

    Returns:
        The measures (None where not computable), ``not_computable`` (measure -> reason) and ``definition``.
    """
    reasons = dict(not_computable or {})
    if keypoints is None:
        reasons.setdefault("nmi_ari", "the data has no part keypoints")
    if keypoints is None or fit_keypoints is None:
        reasons.setdefault("keypoint_error", "no part keypoints, or no split to fit the regression on")
    device = torch.device(device)
    was_training = model.training
    model.eval()
    passes = dict(
        batch_size=batch_size,
        num_workers=num_workers,
        device=device,
        amp=amp,
        patch_threshold=patch_threshold,
        progress=progress,
    )
    try:
        evaluated = _stage1_pass(model, dataset, keypoints, masks=True, desc="parts", **passes)
        fitted = None
        if keypoints is not None and fit_keypoints is not None:
            fitted = _stage1_pass(model, fit_set, None, masks=False, desc="parts (regression fit)", **passes)
    finally:
        model.train(was_training)
    result: dict = {"definition": DEFINITION, "num_images": len(evaluated.indices)}
    if keypoints is not None:
        indices = torch.tensor(evaluated.indices, dtype=torch.long)
        visible = keypoints.visible[indices]
        assigned = torch.cat(evaluated.assigned)[visible].numpy() if evaluated.indices else np.zeros(0)
        ids = torch.arange(visible.shape[1]).expand_as(visible)[visible].numpy()
        nmi, ari = nmi_ari(ids, assigned) if len(ids) else (None, None)
        if not len(ids):
            reasons["nmi_ari"] = "no visible keypoint in the split"
        result.update(
            nmi=nmi,
            ari=ari,
            num_keypoints=int(len(ids)),
            keypoints_on_background=_ratio(float((assigned == model.num_parts).sum()), len(ids)),
            part_names=list(keypoints.names),
        )
    else:
        result.update(nmi=None, ari=None)
    if fitted is not None and evaluated.indices and fitted.indices:
        error, per_part = keypoint_regression_error(_frame(fitted, fit_keypoints), _frame(evaluated, keypoints))
        if error is None:
            reasons["keypoint_error"] = "no keypoint is visible in both the fitting and the evaluated split"
        result.update(
            keypoint_error=error,
            keypoint_error_per_part=dict(zip(keypoints.names, per_part)),
            keypoint_error_unit=BOX_NORMALISATION,
            regression_fit_images=len(fitted.indices),
        )
    else:
        reasons.setdefault("keypoint_error", "no image in the fitting or the evaluated split")
        result.update(keypoint_error=None)
    if evaluated.has_masks:
        inter_fg, union_fg, inter_bg, union_bg = evaluated.fg_sums.tolist()
        kept = evaluated.kept.compute()
        result.update(
            fg_iou=_ratio(inter_fg, union_fg),
            bg_iou=_ratio(inter_bg, union_bg),
            kept_iou=kept["mask_iou"],
            kept_patch_iou=kept["mask_iou_patch"],
        )
    else:
        reasons.setdefault("fg_iou", "the data has no ground-truth masks")
        result.update(fg_iou=None, bg_iou=None, kept_iou=None, kept_patch_iou=None)
    result["not_computable"] = reasons
    return result


def _annotated(dataset):
    """The dataset that holds the annotations: a class map relabels the images but keeps them and their order."""
    return dataset.dataset if isinstance(dataset, ClassMapped) else dataset


def has_keypoints(dataset) -> bool:
    """Whether ``dataset`` can give part keypoints (a CUB split; they may still be missing on disk)."""
    return callable(getattr(_annotated(dataset), "part_keypoints", None))


def dataset_keypoints(dataset, split: str) -> tuple:
    """``(PartKeypoints, None)``, or ``(None, why not)`` when the data has none.

    Raises:
        SpecError: the keypoint files are there but broken (the message names the file and line).
    """
    if not has_keypoints(dataset):
        return None, f"the {split} split ({type(_annotated(dataset)).__name__}) has no part keypoint annotations"
    try:
        return _annotated(dataset).part_keypoints(), None
    except FileNotFoundError as error:
        return None, str(error)
    except DatasetError as error:
        raise SpecError(f"--protocol parts: {error}") from None


def evaluate_parts(model, dataset, fit_set, cfg, device: torch.device) -> dict:
    """``--protocol parts``: :func:`part_discovery` with the keypoints of ``dataset`` and of ``fit_set`` (the
    training split, or None) and the evaluation settings of ``cfg`` (a :class:`~faithful_vit.engine.TrainConfig`)."""
    keypoints, reason = dataset_keypoints(dataset, "evaluated")
    reasons = {} if reason is None else {"nmi_ari": reason, "keypoint_error": reason}
    fit_keypoints = None
    if keypoints is not None:
        if fit_set is None:
            reasons["keypoint_error"] = "no training split to fit the regression on"
        else:
            fit_keypoints, fit_reason = dataset_keypoints(fit_set, "training")
            if fit_reason is not None:
                reasons["keypoint_error"] = fit_reason
    return part_discovery(
        model,
        dataset,
        keypoints=keypoints,
        fit_set=fit_set,
        fit_keypoints=fit_keypoints,
        not_computable=reasons,
        batch_size=cfg.eval_batch_size,
        num_workers=cfg.num_workers,
        device=device,
        amp=cfg.amp,
        patch_threshold=cfg.patch_threshold,
        progress=cfg.progress,
    )
