"""Can the place be read from a trained two-stage model's mask alone (SpuriousShapes)?

Stage 1 sees the whole image, so the *shape* of its mask may depend on the place even when no kept patch shows place
texture; stage 2 then sees that shape (which patches, how many). For each class of the validation split, this fits a
logistic regression that predicts the place from the evaluation mask only, with 5-fold cross-validation: from the
64 kept/dropped bits, and from the number of kept patches alone (chance: 0.5, every group is a quarter). It also
prints the mean number of kept patches and of ground-truth patches (> 50% object) per group.

Example::

    OMP_NUM_THREADS=1 python benchmarks/mask_place_leak.py runs/x/faithful_tiny/seed0 --out leak.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_score

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from faithful_vit.data import gt_patch_fraction  # noqa: E402
from faithful_vit.model_spec import build_dataset, load_model  # noqa: E402


def _place_accuracy(features: torch.Tensor, place: torch.Tensor) -> float:
    scores = cross_val_score(LogisticRegression(max_iter=2000), features.numpy(), place.numpy(), cv=5)
    return float(scores.mean())


def _mean_per_group(keep: torch.Tensor, groups: torch.Tensor, names: list[str]) -> dict[str, float]:
    return {name: keep[groups == g].sum(dim=1).float().mean().item() for g, name in enumerate(names)}


@torch.no_grad()
def mask_place_leak(path: str) -> dict:
    """The leak measures of one trained model (a checkpoint or run folder of ``train.py``) on its validation split."""
    model = load_model(path)
    val_set = build_dataset(model.spec["data"], "val", augment=False)
    batch = val_set.tensors()
    keep, _ = model.compute_keep(model.forward_stage1(batch.images).part_logits)
    gt_keep = (gt_patch_fraction(batch.fg_masks, model.patch_size[0]) > 0.5).flatten(1)
    place = batch.groups % 2
    names = model.spec["data"]["group_names"]
    per_class = {}
    for label, class_name in enumerate(model.spec["data"]["class_names"]):
        rows = batch.labels == label
        kept = keep[rows].float()
        per_class[class_name] = {
            "place_from_mask": _place_accuracy(kept, place[rows]),
            "place_from_kept_count": _place_accuracy(kept.sum(dim=1, keepdim=True), place[rows]),
        }
    return {
        "checkpoint": model.spec["checkpoint"],
        "epoch": model.spec["epoch"],
        "per_class": per_class,
        "kept_patches_per_group": _mean_per_group(keep, batch.groups, names),
        "gt_patches_per_group": _mean_per_group(gt_keep, batch.groups, names),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="checkpoints or run folders of trained two-stage models")
    parser.add_argument("--out", help="also write the results (a JSON list) here")
    args = parser.parse_args(argv)
    results = [mask_place_leak(path) for path in args.runs]
    for result in results:
        print(json.dumps(result))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
