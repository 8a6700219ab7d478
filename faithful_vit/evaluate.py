"""Evaluate a trained model with the paper's protocols: ``python -m faithful_vit.evaluate RUN_OR_CHECKPOINT``.

The model is rebuilt from its checkpoint alone (:func:`faithful_vit.load_model`); the data defaults to the training
data and its settings (the flags below override them). Prints a table and writes one JSON file; ``thresholds`` and
``remove_parts`` are also plotted beside it, as ``<JSON stem>_thresholds.png`` and ``<JSON stem>_remove_parts.png``
(their paths under ``figures`` in the JSON).

Protocols (``--protocol``, comma-separated):

* ``accuracy`` (default): top-1, per class, per group and worst-group accuracy (the data's true groups where it has
  them, else the classes), stage-1 accuracy of a two-stage model, the kept fraction and, where the data has
  ground-truth masks, the mask statistics of :mod:`faithful_vit.metrics`. The same computation as ``train.py``'s
  test metrics (:func:`faithful_vit.engine.evaluate`, with the training run's evaluation settings), so the
  ``best.pt`` of a run reproduces its ``test_metrics.json``.
* ``faithfulness``: the share of images whose prediction changes when every pixel outside the kept patches is
  replaced, by Gaussian noise (standard normal in the normalised pixel space, seeded by ``--noise-seed``) or by the
  same pixels of another image (the previous one in evaluation order). The mask is held fixed: for a two-stage model
  it is stage 1's mask on the clean image, and stage 2 is rerun on the replaced image (zero by construction); the
  oracle uses its ground-truth patch mask (zero as well); a model without a mask (the full-image baseline) is
  measured on the ground-truth object patches (foreground fraction above the patch threshold), which needs data
  with ground-truth masks. For a two-stage model the share is also given with the mask recomputed from the replaced
  image (``recomputed_mask``: stage 1 sees the replaced pixels).
* ``remove_parts``, ``thresholds`` (two-stage models): accuracy, worst-group and per-group accuracy with each part
  removed in turn (its drop from the full model's), and with per-part confidence thresholds calibrated at each of
  :data:`THRESHOLD_QUANTILES` on ``--calibration-split`` and applied on the evaluated split.
* ``parts`` (two-stage models): part-discovery quality as PDiscoNet / PDiscoFormer measure it
  (:mod:`faithful_vit.part_metrics`): NMI and ARI between annotated keypoints and the parts at their locations, the
  keypoint regression error from the part centroids (fitted on the training split), foreground IoU against the
  ground-truth masks; what the data cannot give is listed under ``not_computable`` with the reason.

Examples::

    python -m faithful_vit.evaluate runs/20260101-120000 --model faithful_tiny --seed 0
    python -m faithful_vit.evaluate runs/x/baseline/seed0/checkpoints/best.pt --protocol accuracy,faithfulness
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import fields
from pathlib import Path

import torch
import torch.nn as nn

from faithful_vit import engine, part_metrics, viz
from faithful_vit.cli import Parser, UsageError, add_backend_flag, add_kwargs_flag, positive_int, run_command
from faithful_vit.data import list_datasets
from faithful_vit.data.backgrounds import VARIANTS, VariantDataset, background_variants
from faithful_vit.data.class_map import map_classes
from faithful_vit.data.mask_stats import gt_patch_fraction
from faithful_vit.data.sample import collate
from faithful_vit.distributed import DistInfo, unwrap
from faithful_vit.interventions import calibrate_part_thresholds
from faithful_vit.metrics import MetricAccumulator, keep_to_pixels
from faithful_vit.model import FaithfulViT
from faithful_vit.model_spec import SpecError, build_dataset, data_spec, describe_data, load_model
from faithful_vit.run_folder import RunFolderError, write_text

__all__ = ["PROTOCOLS", "evaluate_model", "main"]

PROTOCOLS = ("accuracy", "faithfulness", "backgrounds", "remove_parts", "thresholds", "parts")
TWO_STAGE_PROTOCOLS = ("remove_parts", "thresholds", "parts")
# The calibration quantiles of the authors' code.
THRESHOLD_QUANTILES = (0.01, 0.03, 0.05, 0.10)
REPLACEMENTS = ("noise", "other_image")


# ----------------------------------------------------------------------------------------------------------------
# Protocols


class _AccuracyObserver:
    """Per-class accuracy and, for a two-stage model, stage-1 accuracy per group, beside engine.evaluate's metrics."""

    def __init__(self, num_classes: int, num_groups: int, device: torch.device):
        self.per_class = MetricAccumulator(num_classes, device)
        self.stage1 = MetricAccumulator(num_groups, device)
        self.has_stage1 = False

    def __call__(self, images, labels, groups, fg_mask, out) -> None:
        self.per_class.update(out.logits.float(), labels, labels)
        stage1_logits = getattr(out, "stage1_logits", None)
        if stage1_logits is not None:
            self.has_stage1 = True
            self.stage1.update(stage1_logits.float(), labels, groups)

    def results(self) -> dict:
        per_class = self.per_class.compute()
        result = {"class_accuracy": per_class["group_accuracy"], "class_count": per_class["group_count"]}
        if self.has_stage1:
            stage1 = self.stage1.compute()
            result.update(
                stage1_accuracy=stage1["accuracy"],
                stage1_worst_group_accuracy=stage1["worst_group_accuracy"],
                stage1_group_accuracy=stage1["group_accuracy"],
            )
        return result


def mask_source(model: nn.Module, patch_threshold: float) -> str:
    """How the faithfulness protocol gets the kept patches of ``model`` (a sentence for the JSON)."""
    module = unwrap(model)
    if isinstance(module, FaithfulViT):
        return "the model's own mask (stage 1 on the clean image)"
    if module.uses_ground_truth_mask:
        return "the model's own mask (the oracle's ground-truth patches)"
    return f"the ground-truth object patches (foreground fraction > {patch_threshold}): the model has no mask"


class _FaithfulnessObserver:
    """Counts the images whose prediction changes when the pixels outside the kept patches are replaced."""

    def __init__(self, model: nn.Module, patch_threshold: float, noise_seed: int):
        self.module = unwrap(model)
        self.patch_size = engine.patch_size_of(self.module)
        self.patch_threshold = patch_threshold
        self.generator = torch.Generator().manual_seed(noise_seed)
        self.two_stage = isinstance(self.module, FaithfulViT)
        self.previous: torch.Tensor | None = None
        variants = [*REPLACEMENTS, *(f"{name}_recomputed_mask" for name in REPLACEMENTS if self.two_stage)]
        self.changed = dict.fromkeys(variants, 0)
        self.correct = dict.fromkeys(variants, 0)
        self.correct_clean = self.count = 0
        self.kept_patches = self.total_patches = 0

    def kept(self, out, fg_mask: torch.Tensor | None) -> torch.Tensor:
        keep = getattr(out, "keep", None)
        if keep is not None:
            return keep
        if fg_mask is None:
            raise SpecError(
                "--protocol faithfulness: the model has no mask and the data has no ground-truth masks to stand in "
                "for one"
            )
        return gt_patch_fraction(fg_mask, self.patch_size) > self.patch_threshold

    def classify(self, images: torch.Tensor, keep: torch.Tensor, fg_mask: torch.Tensor | None) -> torch.Tensor:
        """Predicted classes with the mask held fixed (stage 2 alone for a two-stage model)."""
        if self.two_stage:
            return self.module.forward_stage2(images, keep).argmax(1)
        return engine.model_forward(self.module, images, fg_mask).logits.argmax(1)

    def __call__(self, images, labels, groups, fg_mask, out) -> None:
        keep = self.kept(out, fg_mask)
        kept_pixels = keep_to_pixels(keep, tuple(images.shape[-2:]), self.patch_size)
        clean = self.classify(images, keep, fg_mask)
        # The previous image in evaluation order (the first image of the split takes the last of its batch).
        previous = images[-1:] if self.previous is None else self.previous
        self.previous = images[-1:]
        fills = {
            "noise": torch.randn(images.shape, generator=self.generator).to(images),
            "other_image": torch.cat([previous, images[:-1]]),
        }
        for name, fill in fills.items():
            replaced = torch.where(kept_pixels, images, fill)
            predictions = {name: self.classify(replaced, keep, fg_mask)}
            if self.two_stage:
                predictions[f"{name}_recomputed_mask"] = self.module(replaced).logits.argmax(1)
            for variant, predicted in predictions.items():
                self.changed[variant] += int((predicted != clean).sum())
                self.correct[variant] += int((predicted == labels).sum())
        self.correct_clean += int((clean == labels).sum())
        self.count += len(labels)
        self.kept_patches += int(keep.sum())
        self.total_patches += keep.numel()

    def results(self) -> dict:
        count = max(self.count, 1)
        return {
            "mask": mask_source(self.module, self.patch_threshold),
            "replacements": {
                "noise": "standard normal noise in the normalised pixel space",
                "other_image": "the same pixels of the previous image in evaluation order",
            },
            "num_images": self.count,
            "kept_fraction": self.kept_patches / max(self.total_patches, 1),
            "accuracy_clean": self.correct_clean / count,
            "prediction_changed": {variant: changed / count for variant, changed in self.changed.items()},
            "accuracy_replaced": {variant: correct / count for variant, correct in self.correct.items()},
        }


class _RemovePartsObserver:
    """Accuracy of a two-stage model with each foreground part removed in turn (its patches become background)."""

    def __init__(self, model: nn.Module, num_groups: int, device: torch.device):
        self.module = unwrap(model)
        self.accumulators = [MetricAccumulator(num_groups, device) for _ in range(self.module.num_parts)]

    def __call__(self, images, labels, groups, fg_mask, out) -> None:
        for part, accumulator in enumerate(self.accumulators):
            removed = self.module(images, remove_parts=[part])
            accumulator.update(removed.stage2_logits.float(), labels, groups, removed.keep)

    def results(self, full: dict) -> dict:
        parts = []
        for part, accumulator in enumerate(self.accumulators):
            metrics = accumulator.compute()
            parts.append(
                {
                    "part": part,
                    "accuracy": metrics["accuracy"],
                    "accuracy_drop": full["accuracy"] - metrics["accuracy"],
                    "worst_group_accuracy": metrics["worst_group_accuracy"],
                    "group_accuracy": metrics["group_accuracy"],
                    "group_accuracy_drop": [
                        before - after for before, after in zip(full["group_accuracy"], metrics["group_accuracy"])
                    ],
                    "kept_fraction": metrics["kept_fraction"],
                }
            )
        return {
            "accuracy": full["accuracy"],
            "worst_group_accuracy": full["worst_group_accuracy"],
            "group_accuracy": full["group_accuracy"],
            "kept_fraction": full["kept_fraction"],
            "parts": parts,
        }


_SUMMARY = ("accuracy", "worst_group_accuracy", "group_accuracy", "kept_fraction")


def _summary(metrics: dict) -> dict:
    return {key: metrics[key] for key in _SUMMARY}


def _bg_gap(results: dict) -> float:
    return results["mixed_same"]["accuracy"] - results["mixed_rand"]["accuracy"]


def _folder_backgrounds(dataset, run_evaluation) -> dict:
    """The backgrounds protocol on data that ships its variants as folders (ImageNet-9's backgrounds challenge)."""
    try:
        variants = dataset.background_variants()
    except (FileNotFoundError, ValueError) as error:
        raise SpecError(f"--protocol backgrounds: {error}") from None
    results = {
        name: {**_summary(run_evaluation(variant, f"backgrounds {name}")), "num_images": len(variant)}
        for name, variant in variants.items()
    }
    return {
        "definition": "the published variant folders of ImageNet-9 (Xiao et al., the backgrounds challenge), split "
        f"{dataset.split!r}; bg_gap = acc(mixed_same) - acc(mixed_rand)",
        "variants": results,
        "bg_gap": _bg_gap(results),
    }


def _backgrounds(model, dataset, run_evaluation, seed: int) -> dict:
    if callable(getattr(dataset, "background_variants", None)):
        return _folder_backgrounds(dataset, run_evaluation)
    arrays = getattr(dataset, "arrays", None)
    if not isinstance(arrays, dict) or not {"images", "fg_masks", "places"} <= set(arrays):
        raise SpecError(
            "--protocol backgrounds: needs a generated dataset with ground-truth masks and places "
            f"(synthetic, waterbirds_lite) or one with variant folders (imagenet9), got {type(dataset).__name__}"
        )
    image_size = arrays["images"].shape[1]
    # The object's neutral band (SpuriousShapes' clear_margin, in pixels at 64 px) travels with it.
    surround = round(getattr(getattr(dataset, "config", None), "clear_margin", 0.0) * image_size / 64)
    variants = background_variants(arrays, surround=surround, seed=seed)
    results = {
        name: _summary(run_evaluation(VariantDataset(variants[name], dataset), f"backgrounds {name}"))
        for name in VARIANTS
    }
    return {
        "definition": "background_variants in faithful_vit/data/backgrounds.py; bg_gap = acc(mixed_same) - "
        "acc(mixed_rand)",
        "surround_pixels": surround,
        "partner_seed": seed,
        "variants": results,
        "bg_gap": _bg_gap(results),
    }


def _finite_or_none(values: torch.Tensor) -> list[float | None]:
    return [value if math.isfinite(value) else None for value in values.tolist()]


def _thresholds(model, calibration_set, run_evaluation, batch_size: int) -> dict:
    module = unwrap(model)
    before = run_evaluation(None, "thresholds (none)")
    loader = torch.utils.data.DataLoader(calibration_set, batch_size=batch_size, collate_fn=collate)
    previous = module.part_thresholds.clone()
    rows = []
    try:
        for quantile in THRESHOLD_QUANTILES:
            batches = (batch.images for batch in loader if batch.labels.numel())
            thresholds = calibrate_part_thresholds(module, batches, quantile)
            after = run_evaluation(None, f"thresholds q={quantile}")
            rows.append({"quantile": quantile, "thresholds": _finite_or_none(thresholds), **_summary(after)})
    finally:
        module.part_thresholds.copy_(previous)
    return {
        "calibrated_on": f"{len(calibration_set)} images of the calibration split (None: a part never dropped)",
        "without": _summary(before),
        "quantiles": rows,
    }


def evaluate_model(
    model: nn.Module,
    dataset,
    protocols: list[str] | tuple[str, ...] = ("accuracy",),
    *,
    cfg: engine.TrainConfig | None = None,
    device: str | torch.device = "cpu",
    noise_seed: int = 0,
    calibration_set=None,
    fit_set=None,
) -> dict:
    """Run ``protocols`` on ``dataset``; one pass over the data per protocol (per variant or quantile).

    Args:
        model: a model of ``train.py`` (two-stage, baseline or oracle).
        dataset: samples ``(image, label[, group[, fg_mask]])`` with ``num_classes`` and ``group_names``.
        protocols: from :data:`PROTOCOLS`.
        cfg: the evaluation settings (batch size, autocast, channels-last, patch threshold, seed); default: those
            of :class:`~faithful_vit.engine.TrainConfig`.
        device: where to run.
        noise_seed: seed of the faithfulness protocol's noise and of the backgrounds protocol's partner images.
        calibration_set: the split the ``thresholds`` protocol calibrates on (e.g. validation).
        fit_set: the split the ``parts`` protocol fits its keypoint regression on (the training split).

    Returns:
        ``{protocol: metrics}``; see the module docstring.
    """
    unknown = [name for name in protocols if name not in PROTOCOLS]
    if unknown or not protocols:
        raise SpecError(f"--protocol: expected a comma list of {PROTOCOLS}, got {list(protocols)}")
    needs_two_stage = [name for name in protocols if name in TWO_STAGE_PROTOCOLS]
    if needs_two_stage and not isinstance(unwrap(model), FaithfulViT):
        raise SpecError(
            f"--protocol {needs_two_stage[0]}: needs a two-stage model (parts and a mask), "
            f"got {type(unwrap(model)).__name__}"
        )
    if "thresholds" in protocols and calibration_set is None:
        raise SpecError("--protocol thresholds: needs a calibration split (calibration_set=)")
    cfg = cfg or engine.TrainConfig()
    dist_info = DistInfo(device=torch.device(device))
    model = model.to(dist_info.device)
    num_groups = len(dataset.group_names)

    def run_evaluation(on, desc: str, observe=None) -> dict:
        return engine.evaluate(
            model,
            dataset if on is None else on,
            num_groups=num_groups,
            cfg=cfg,
            dist_info=dist_info,
            desc=desc,
            observe=observe,
        )

    results = {}
    for protocol in protocols:
        if protocol == "accuracy":
            observer = _AccuracyObserver(dataset.num_classes, num_groups, dist_info.device)
            results[protocol] = {**run_evaluation(None, protocol, observer), **observer.results()}
        elif protocol == "faithfulness":
            observer = _FaithfulnessObserver(model, cfg.patch_threshold, noise_seed)
            run_evaluation(None, protocol, observer)
            results[protocol] = observer.results()
        elif protocol == "remove_parts":
            observer = _RemovePartsObserver(model, num_groups, dist_info.device)
            results[protocol] = observer.results(run_evaluation(None, protocol, observer))
        elif protocol == "backgrounds":
            results[protocol] = _backgrounds(model, dataset, run_evaluation, noise_seed)
        elif protocol == "parts":
            results[protocol] = part_metrics.evaluate_parts(unwrap(model), dataset, fit_set, cfg, dist_info.device)
        else:
            results[protocol] = _thresholds(model, calibration_set, run_evaluation, cfg.eval_batch_size)
    return results


# ----------------------------------------------------------------------------------------------------------------
# Command line


def _build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="python -m faithful_vit.evaluate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("checkpoint", help="a run folder of train.py, a model or seed folder in it, or a .pt file")
    parser.add_argument("--model", default=None, help="which model of a run folder that holds several")
    parser.add_argument("--seed", type=int, default=None, help="which seed of a run folder that holds several")
    parser.add_argument(
        "--data", default=None, help=f"dataset, one of {', '.join(list_datasets())} (default: the training data)"
    )
    parser.add_argument("--data-dir", default=None, help="dataset folder (default: the training data's)")
    parser.add_argument("--mask-dir", default=None, help="CUB segmentations folder (default: the training data's)")
    add_kwargs_flag(
        parser,
        "--data-kwargs",
        "generator settings of synthetic/waterbirds_lite, the variant= of imagenet9 (default: the training data's)",
        inherited=True,
    )
    parser.add_argument(
        "--class-map",
        default=None,
        metavar="MAP",
        help="evaluate on data labelled in other classes: 'species' (Waterbirds images by their CUB species folder, "
        "for a CUB-trained model) or a JSON file {data class: model class}; groups stay the data's",
    )
    parser.add_argument("--split", default="test", help="train, val or test (default: %(default)s)")
    parser.add_argument(
        "--calibration-split",
        default="val",
        help="the split the thresholds protocol calibrates on (default: %(default)s)",
    )
    parser.add_argument(
        "--protocol", default="accuracy", help=f"comma list of {', '.join(PROTOCOLS)} (default: %(default)s)"
    )
    parser.add_argument(
        "--output",
        default=None,
        help="JSON file to write, the plots beside it (default: eval_<data>_<split>.json in the model's folder of "
        "the run)",
    )
    parser.add_argument(
        "--batch-size", type=positive_int, default=None, help="evaluation batch size (default: the training run's)"
    )
    parser.add_argument("--device", default="auto", help="auto (CUDA if available), cpu or cuda (default: auto)")
    add_backend_flag(parser)
    parser.add_argument(
        "--noise-seed",
        type=int,
        default=0,
        help="seed of the faithfulness noise and of the backgrounds protocol's partner images (default: 0)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def _evaluation_data(args, trained: dict, image_size: int) -> dict:
    """The data spec to evaluate on: the training data's, with the flags given on the command line."""
    data_kwargs = args.data_kwargs
    if args.data is not None and args.data != trained.get("name"):
        return data_spec(
            args.data, data_dir=args.data_dir, mask_dir=args.mask_dir, data_kwargs=data_kwargs, img_size=image_size
        )
    return data_spec(
        trained["name"],
        data_dir=args.data_dir or trained.get("data_dir"),
        mask_dir=args.mask_dir or trained.get("mask_dir"),
        data_kwargs=trained.get("data_kwargs") if data_kwargs is None else data_kwargs,
        img_size=image_size,
    )


def _with_class_map(args, dataset, spec: dict, data_name: str):
    """The evaluation split relabelled with the model's classes by ``--class-map`` (as it is without one)."""
    if args.class_map is None:
        return dataset
    model_classes = (spec.get("data") or {}).get("class_names")
    try:
        return map_classes(dataset, args.class_map, model_classes, data_name)
    except ValueError as error:
        raise UsageError(str(error)) from None


def _default_output(checkpoint: Path, data: str, split: str) -> Path:
    name = f"eval_{data}_{split}.json"
    return checkpoint.parent.parent / name if checkpoint.parent.name == "checkpoints" else checkpoint.parent / name


def _percent(value) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.1f} %"


def _points(value) -> str:
    """An accuracy difference in percentage points."""
    return "-" if value is None or math.isnan(value) else f"{100 * value:+.1f} pp"


def _number(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def format_report(report: dict) -> str:
    """A two-column table of the report's main numbers."""
    data = report["data"]
    rows = []
    accuracy = report["protocols"].get("accuracy")
    if accuracy is not None:
        rows.append(("accuracy", _percent(accuracy["accuracy"])))
        rows.append(("worst-group", _percent(accuracy["worst_group_accuracy"])))
        rows += [(f"  class {n}", _percent(a)) for n, a in zip(data["class_names"], accuracy["class_accuracy"])]
        rows += [(f"  group {n}", _percent(a)) for n, a in zip(data["group_names"], accuracy["group_accuracy"])]
        if "stage1_accuracy" in accuracy:
            rows += [
                ("stage-1 accuracy", _percent(accuracy["stage1_accuracy"])),
                ("stage-1 worst-group", _percent(accuracy["stage1_worst_group_accuracy"])),
            ]
        rows.append(("kept fraction", _number(accuracy["kept_fraction"])))
        for key in ("mask_iou", "mask_iou_patch", "background_in_kept", "object_recall"):
            if key in accuracy:
                rows.append((key.replace("_", " "), _number(accuracy[key])))
    faithfulness = report["protocols"].get("faithfulness")
    if faithfulness is not None:
        rows.append(("faithfulness mask", faithfulness["mask"]))
        rows += [(f"  changed ({k})", _percent(v)) for k, v in faithfulness["prediction_changed"].items()]
    backgrounds = report["protocols"].get("backgrounds")
    if backgrounds is not None:
        rows += [(f"  background {k}", _percent(v["accuracy"])) for k, v in backgrounds["variants"].items()]
        rows.append(("BG-GAP", _percent(backgrounds["bg_gap"])))
    remove_parts = report["protocols"].get("remove_parts")
    if remove_parts is not None:
        every = f"{_percent(remove_parts['accuracy'])} (worst-group {_percent(remove_parts['worst_group_accuracy'])})"
        rows.append(("  with every part", every))
        for part in remove_parts["parts"]:
            drop = f"drop {_points(part['accuracy_drop'])}, worst-group {_percent(part['worst_group_accuracy'])}"
            rows.append((f"  without part {part['part']}", f"{_percent(part['accuracy'])} ({drop})"))
            if len(data["group_names"]) <= viz.PER_GROUP_LIMIT:
                names_drops = zip(data["group_names"], part["group_accuracy_drop"])
                rows += [(f"    drop in group {name}", _points(drop)) for name, drop in names_drops]
    thresholds = report["protocols"].get("thresholds")
    if thresholds is not None:
        for name, row in [("none", thresholds["without"])] + [
            (f"q={q['quantile']}", q) for q in thresholds["quantiles"]
        ]:
            value = f"{_percent(row['accuracy'])} (worst-group {_percent(row['worst_group_accuracy'])}, kept "
            rows.append((f"  thresholds {name}", value + f"{_number(row['kept_fraction'])})"))
    parts = report["protocols"].get("parts")
    if parts is not None:
        rows += [
            (f"parts {key.replace('_', ' ')}", _number(parts[key])) for key in ("nmi", "ari", "fg_iou", "kept_iou")
        ]
        error = parts["keypoint_error"]
        rows.append(("parts keypoint error", "-" if error is None else f"{_percent(error)} of the box"))
        rows += [(f"  not computed: {key}", reason) for key, reason in parts["not_computable"].items()]
    width = max(len(name) for name, _ in rows)
    title = (
        f"{report['model']['name']} ({report['checkpoint']}, epoch {report['epoch']}) on {data['name']} "
        f"{report['split']} ({report['num_images']} images)"
    )
    return "\n".join([title, *(f"{name.ljust(width)}  {value}" for name, value in rows)])


def write_figures(report: dict, output: Path) -> dict[str, str]:
    """The plots of the ``thresholds`` and ``remove_parts`` results, ``<output stem>_<protocol>.png`` beside the JSON.

    Returns:
        protocol -> the PNG written, for the protocols of ``report`` that have a plot.
    """
    results, group_names = report["protocols"], report["data"]["group_names"]
    title = f"{report['model']['name']} on {report['data']['name']} {report['split']} ({report['num_images']} images)"
    figures = {}
    if "thresholds" in results:
        path = output.with_name(f"{output.stem}_thresholds.png")
        figures["thresholds"] = str(viz.plot_thresholds(results["thresholds"], path, title=title))
    if "remove_parts" in results:
        path = output.with_name(f"{output.stem}_remove_parts.png")
        figures["remove_parts"] = str(viz.plot_remove_parts(results["remove_parts"], group_names, path, title=title))
    return figures


def run(args) -> dict:
    protocols = [name.strip() for name in args.protocol.split(",") if name.strip()]
    unknown = [name for name in protocols if name not in PROTOCOLS]
    if unknown or not protocols:
        raise UsageError(f"--protocol: expected a comma list of {PROTOCOLS}, got {args.protocol!r}")
    if args.device not in ("auto", "cpu") and not args.device.startswith("cuda"):
        raise UsageError(f"--device: expected auto, cpu or cuda[:N], got {args.device!r}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device: expected a device this machine has, got {args.device!r} but CUDA is not available")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    model = load_model(args.checkpoint, model=args.model, seed=args.seed, device=device)
    spec = model.spec
    image_size = spec["model"]["image_size"]
    data = _evaluation_data(args, spec.get("data") or {}, image_size)
    if data["image_size"] != image_size:
        raise UsageError(
            f"--data-kwargs: image_size: expected {image_size} (the model's input size), got {data['image_size']}"
        )
    dataset = _with_class_map(args, build_dataset(data, args.split, augment=False), spec, data["name"])
    if dataset.num_classes != spec["model"]["num_classes"]:
        raise UsageError(
            f"--data {data['name']}: expected {spec['model']['num_classes']} classes (the model's), "
            f"got {dataset.num_classes}"
        )
    known = {f.name for f in fields(engine.TrainConfig)}
    cfg = engine.TrainConfig(**{k: v for k, v in spec["train_config"].items() if k in known})
    cfg.compile, cfg.progress = False, not args.no_progress
    if args.batch_size is not None:
        cfg.eval_batch_size = args.batch_size
    calibration = build_dataset(data, args.calibration_split, augment=False) if "thresholds" in protocols else None
    with_fit = "parts" in protocols and part_metrics.has_keypoints(dataset)
    fit = build_dataset(data, "train", augment=False) if with_fit else None
    results = evaluate_model(
        model,
        dataset,
        protocols,
        cfg=cfg,
        device=device,
        noise_seed=args.noise_seed,
        calibration_set=calibration,
        fit_set=fit,
    )
    checkpoint = Path(spec["checkpoint"])
    report = {
        "checkpoint": str(checkpoint),
        "epoch": spec["epoch"],
        "model": spec["model"],
        "data": describe_data(data, dataset),
        "split": args.split,
        "class_map": args.class_map,
        "num_images": len(dataset),
        "eval_batch_size": cfg.eval_batch_size,
        "protocols": results,
    }
    output = Path(args.output) if args.output else _default_output(checkpoint, data["name"], args.split)
    report["figures"] = write_figures(report, output)
    write_text(output, json.dumps(report, indent=2))
    print(format_report(report))
    print(f"written: {output}")
    return report


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; bad input is one line on stderr and exit code 2."""
    return run_command("evaluate", _build_parser(), run, argv, errors=(SpecError, RunFolderError))


if __name__ == "__main__":
    sys.exit(main())
