"""``train.py`` with per-epoch diagnostics of the two-stage model on SpuriousShapes (why a seed fails).

Runs ``train.main`` unchanged (same flags, same run folder, same checkpoints and test evaluation) and, after every
epoch, evaluates the two-stage model on a fixed half of the validation split (every other image, so every group is
a quarter) and appends a row to ``diagnostics.jsonl`` next to ``metrics.jsonl``:

* the evaluation mask: kept fraction, patch IoU against the ground-truth patches (> 50% object), non-object pixels
  and place cue (``SpuriousShapes.place_visibility``) inside kept patches, images with no kept patch, the share of
  kept patches won by each foreground part, the share of images whose mask holds 0, 1, ..., K parts (part dropout
  empties the mask of an image that holds one part whenever it drops that part);
* the training mask (a Gumbel sample with part dropout, what stage 2 trains on), the same statistics;
* worst-group and average accuracy of stage 2 with stage 1's mask, of stage 2 given the ground-truth patches instead
  (has stage 2 learned the shape, whatever the mask?), and of the stage-1 classifier.

The global RNG state is saved before and restored after the diagnostics, so the training trajectory is the one
``train.py`` with the same flags follows. Part-map figures of 8 validation images are written at the epochs given by
``--figure-epochs``.

Example::

    OMP_NUM_THREADS=1 python benchmarks/seed_diagnostics.py --model faithful_tiny --seeds 1 --experiment diag_s1
    OMP_NUM_THREADS=1 python benchmarks/seed_diagnostics.py --checkpoint runs/diag_s1/faithful_tiny/seed1
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import train  # noqa: E402
from faithful_vit import FaithfulViT, engine, viz  # noqa: E402
from faithful_vit.data import gt_patch_fraction, patch_mask_stats  # noqa: E402
from faithful_vit.model_spec import build_dataset, load_model  # noqa: E402


def _group_accuracy(logits: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor, num_groups: int) -> dict:
    correct = (logits.argmax(dim=1) == labels).float()
    per_group = [correct[groups == g].mean().item() for g in range(num_groups)]
    return {"accuracy": correct.mean().item(), "worst_group_accuracy": min(per_group), "group_accuracy": per_group}


def _mask_stats(keep: torch.Tensor, fg: torch.Tensor, place: torch.Tensor, patch_size: int) -> dict:
    stats = patch_mask_stats(keep, fg, patch_size, place_visibility=place)
    stats["empty_mask_images"] = (~keep.any(dim=1)).float().mean().item()
    return stats


def _parts_per_image(keep: torch.Tensor, best_part: torch.Tensor, num_parts: int) -> list[float]:
    """Share of images whose kept patches are won by 0, 1, ..., ``num_parts`` distinct foreground parts."""
    holds = torch.stack([(keep & (best_part == k)).any(dim=1) for k in range(num_parts)], dim=1)
    count = holds.sum(dim=1)
    return [(count == n).float().mean().item() for n in range(num_parts + 1)]


@torch.no_grad()
def diagnose(model: FaithfulViT, images, labels, groups, fg, place, num_groups: int) -> dict:
    """The diagnostics of one epoch (see the module docstring); leaves the model in its previous mode."""
    was_training = model.training
    patch = model.patch_size[0]
    model.eval()
    stage1 = model.forward_stage1(images)
    keep, _ = model.compute_keep(stage1.part_logits)
    gt_keep = gt_patch_fraction(fg, patch) > 0.5
    best_part = stage1.part_logits.argmax(dim=1).flatten(1)
    kept_parts = best_part[keep]
    row = {
        "eval_mask": _mask_stats(keep, fg, place, patch),
        "eval_part_share": [(kept_parts == k).float().mean().item() for k in range(model.num_parts)],
        "eval_parts_per_image": _parts_per_image(keep, best_part, model.num_parts),
        "stage2": _group_accuracy(model.forward_stage2(images, keep), labels, groups, num_groups),
        "stage2_gt_patches": _group_accuracy(model.forward_stage2(images, gt_keep), labels, groups, num_groups),
        "stage1_classifier": _group_accuracy(stage1.stage1_logits, labels, groups, num_groups),
    }
    model.train()
    train_keep, _ = model.compute_keep(model.forward_stage1(images).part_logits)
    row["train_mask"] = _mask_stats(train_keep, fg, place, patch)
    model.train(was_training)
    return row


class DiagnosedTrainer(engine.Trainer):
    """:class:`~faithful_vit.engine.Trainer` that writes ``diagnostics.jsonl`` after every epoch."""

    figure_epochs: tuple[int, ...] = ()

    def _end_epoch(self) -> None:
        super()._end_epoch()
        if not isinstance(self.module, FaithfulViT) or not self.dist.is_main:
            return
        state = engine.rng_states()
        batch = self.val_set.tensors()
        half = torch.arange(0, len(batch.labels), 2)
        images, fg = batch.images[half], batch.fg_masks[half]
        place = self.val_set.place_visibility()[half]
        row = {
            "epoch": self.epoch,
            **diagnose(self.module, images, batch.labels[half], batch.groups[half], fg, place, self.num_groups),
        }
        with open(self.run_dir / "diagnostics.jsonl", "a") as handle:
            handle.write(json.dumps(row) + "\n")
        if self.epoch in self.figure_epochs:
            self.module.eval()
            with torch.no_grad():
                out = self.module(images[:8])
            self.module.train()
            viz.plot_masks(
                images[:8],
                self.run_dir / f"masks_epoch{self.epoch}.png",
                fg_masks=fg[:8],
                keep=out.keep,
                part_maps=out.part_maps,
                patch_size=self.module.patch_size[0],
                title=f"{self.name}, epoch {self.epoch} (validation images)",
            )
        engine.set_rng_states(state)


def diagnose_checkpoint(path: str) -> dict:
    """The diagnostics row of a trained two-stage model (a checkpoint or run folder of ``train.py``) on the same
    half of its validation split."""
    model = load_model(path)
    val_set = build_dataset(model.spec["data"], "val", augment=False)
    batch = val_set.tensors()
    half = torch.arange(0, len(batch.labels), 2)
    place = val_set.place_visibility()[half]
    num_groups = len(model.spec["data"]["group_names"])
    args = (batch.images[half], batch.labels[half], batch.groups[half], batch.fg_masks[half], place, num_groups)
    return {"checkpoint": model.spec["checkpoint"], "epoch": model.spec["epoch"], **diagnose(model, *args)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], add_help=False)
    parser.add_argument("--figure-epochs", default="1,2,3", help="epochs whose part maps are drawn (comma list)")
    parser.add_argument("--checkpoint", help="print the diagnostics of this trained model as JSON and exit")
    own, rest = parser.parse_known_args(argv)
    if own.checkpoint:
        print(json.dumps(diagnose_checkpoint(own.checkpoint)))
        return 0
    DiagnosedTrainer.figure_epochs = tuple(int(e) for e in own.figure_epochs.split(",") if e)
    engine.Trainer = DiagnosedTrainer  # train.run looks the class up at call time
    return train.main(rest)


if __name__ == "__main__":
    sys.exit(main())
