"""Oracle ceilings on the built-in SpuriousShapes benchmark: a full-image ViT vs the same ViT with ground-truth masks.

Trains, from scratch and one after another, the full-image baseline (:class:`~faithful_vit.baseline.FullImageViT`)
and the same ViT whose attention may only use the patches a rule picks from the ground-truth object mask
(:class:`~faithful_vit.baseline.OracleMaskViT`, CLS always kept), with the training engine
(:class:`~faithful_vit.engine.Trainer`: AdamW, linear warm-up for one epoch then cosine per step, gradient clipping,
the benchmark's horizontal flip). The patch rules:

- ``gt_any``: patches containing any object pixel (what a perfect patch-level stage 1 keeps at a low threshold);
- ``gt_half``: object fraction > 0.5;
- ``gt_interior``: patches entirely inside the object;
- ``gt_any_dilated``: ``gt_any`` grown by one ring of patches, diagonals included (an over-segmenting stage 1).

Reports, for the model of the last epoch (no model selection), average, per-group and worst-group test accuracy
(WGA), the kept fraction of patches, the non-object fraction of pixels inside kept patches (``non_object_in_kept``:
what a mask IoU hides) and the place-cue fraction inside kept patches (``place_cue_in_kept``: the mean place-texture
visibility there; 0 = no shortcut reachable); ``history`` has each epoch's mean training loss and validation accuracy.

Example::

    python benchmarks/oracle_ceilings.py --models baseline gt_any gt_half gt_interior --epochs 8 \
        --json benchmarks/results/oracle_ceilings.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

if __package__ in (None, ""):  # `python benchmarks/oracle_ceilings.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import _common as C  # noqa: E402
from faithful_vit import distributed, engine  # noqa: E402
from faithful_vit.baseline import FullImageViT, OracleMaskViT  # noqa: E402
from faithful_vit.data.mask_stats import gt_patch_fraction, patch_mask_stats  # noqa: E402
from faithful_vit.data.synthetic import SpuriousShapes, SpuriousShapesConfig  # noqa: E402
from faithful_vit.data.transforms import synthetic_transforms  # noqa: E402
from faithful_vit.data.waterbirds_lite import WaterbirdsLite, WaterbirdsLiteConfig  # noqa: E402
from faithful_vit.morphology import dilate_keep  # noqa: E402

# Patch rule -> ``(object fraction [B, N], grid (H, W)) -> keep [B, N]``; None: the full-image baseline.
MASK_RULES: dict[str, Callable[[torch.Tensor, tuple[int, int]], torch.Tensor] | None] = {
    "baseline": None,
    "gt_any": lambda frac, grid: frac > 0,
    "gt_half": lambda frac, grid: frac > 0.5,
    "gt_interior": lambda frac, grid: frac >= 1.0,
    "gt_any_dilated": lambda frac, grid: dilate_keep(frac > 0, grid, connectivity=8),
}


class RuleOracleViT(OracleMaskViT):
    """The oracle whose kept patches follow ``MASK_RULES[rule]`` instead of a single threshold."""

    def __init__(self, rule: str, num_classes: int, **vit_kwargs):
        super().__init__(num_classes, **vit_kwargs)
        self.rule = rule

    def keep_mask(self, fg_mask: torch.Tensor) -> torch.Tensor:
        grid = tuple(self.vit.patch_embed.grid_size)
        return MASK_RULES[self.rule](gt_patch_fraction(fg_mask, self.patch_size), grid)


def build_model(rule: str, args) -> FullImageViT:
    vit_kwargs = dict(
        img_size=args.image_size,
        patch_size=args.patch,
        embed_dim=args.embed_dim,
        depth=args.depth,
        num_heads=args.heads,
        mlp_ratio=args.mlp_ratio,
    )
    if MASK_RULES[rule] is None:
        return FullImageViT(2, **vit_kwargs)
    return RuleOracleViT(rule, 2, **vit_kwargs)


def leak_stats(model: FullImageViT, fg_masks: torch.Tensor, visibility: torch.Tensor, patch: int) -> dict:
    """:func:`~faithful_vit.data.patch_mask_stats` of the patches ``model`` reads on the given masks."""
    if isinstance(model, OracleMaskViT):
        keep = model.keep_mask(fg_masks)
    else:
        keep = torch.ones_like(gt_patch_fraction(fg_masks, patch), dtype=torch.bool)
    return patch_mask_stats(keep, fg_masks, patch, place_visibility=visibility)


def train_one(rule: str, splits: dict, args, dist_info: distributed.DistInfo) -> dict:
    torch.manual_seed(args.seed)
    model = build_model(rule, args)
    cfg = engine.TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch,
        eval_batch_size=250,
        lr=args.lr,
        weight_decay=args.weight_decay,
        clip_grad=2.0,
        warmup_epochs=1.0,
        seed=args.seed,
        checkpoint_every=0,
        progress=False,
    )
    num_groups = splits["train"].num_groups
    trainer = engine.Trainer(
        model,
        splits["train"],
        splits["val"],
        num_groups=num_groups,
        cfg=cfg,
        run_dir=args.run_dir / rule,
        dist_info=dist_info,
        name=rule,
    )
    t0, cpu0 = time.perf_counter(), time.process_time()
    history = trainer.fit()
    train_s = time.perf_counter() - t0
    # Process CPU time is what the run costs on an idle core; wall time also counts other jobs on a shared machine.
    train_cpu_s = time.process_time() - cpu0
    test = engine.evaluate(trainer.model, splits["test"], num_groups=num_groups, cfg=cfg, dist_info=dist_info)
    test_masks = splits["test"].tensors().fg_masks
    return {
        "model": rule,
        "train_s": train_s,
        "train_cpu_s": train_cpu_s,
        "test": {"avg_acc": test["accuracy"], "group_acc": test["group_accuracy"], "wga": test["worst_group_accuracy"]},
        "history": [
            {
                "epoch": row["epoch"] - 1,
                "loss": row["train_total"],
                "val_wga": row["val_worst_group_accuracy"],
                "val_avg": row["val_accuracy"],
            }
            for row in history
        ],
        **leak_stats(model, test_masks, splits["test"].place_visibility(), args.patch),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=list(MASK_RULES), choices=list(MASK_RULES))
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--patch", type=int, default=8)
    p.add_argument("--embed-dim", type=int, default=128)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--mlp-ratio", type=float, default=2.0)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    p.add_argument(
        "--dataset",
        default="spurious_shapes",
        choices=["spurious_shapes", "waterbirds_lite"],
        help="waterbirds_lite needs `bash scripts/setup_waterbirds_lite.sh` first",
    )
    p.add_argument("--clear-margin", type=float, default=None, help="override the benchmark's clear margin (px)")
    p.add_argument("--n-train", type=int, default=None)
    p.add_argument("--n-val", type=int, default=None)
    p.add_argument("--n-test", type=int, default=None)
    p.add_argument("--run-dir", type=Path, default=Path("runs/oracle_ceilings"), help="checkpoints and metrics")
    p.add_argument("--json", default=None, help="write the results here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    dist_info = distributed.setup_distributed(args.device)

    overrides = {"image_size": args.image_size, "seed": args.data_seed}
    for name in ("clear_margin", "n_train", "n_val", "n_test"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    if args.dataset == "waterbirds_lite":
        overrides.pop("clear_margin", None)
        cfg = dataclasses.replace(WaterbirdsLiteConfig(), **overrides)
        dataset_cls = WaterbirdsLite
    else:
        cfg = dataclasses.replace(SpuriousShapesConfig(), **overrides)
        dataset_cls = SpuriousShapes
    t0 = time.perf_counter()
    splits = {
        s: dataset_cls(s, config=cfg, transform=synthetic_transforms(train=s == "train"))
        for s in ("train", "val", "test")
    }
    data_s = time.perf_counter() - t0
    names = splits["train"].group_names
    train_groups = torch.bincount(splits["train"].groups, minlength=4).tolist()
    print(f"data ready in {data_s:.1f}s; train groups {train_groups} {names}")
    results = []
    for rule in args.models:
        r = train_one(rule, splits, args, dist_info)
        t = r["test"]
        print(
            f"{rule:12s} avg {t['avg_acc']:.3f} wga {t['wga']:.3f} groups "
            f"{' / '.join(f'{a:.2f}' for a in t['group_acc'])} kept {r['kept_frac']:.3f} "
            f"patch-iou {r['patch_iou']:.3f} "
            f"non-object-in-kept {r['non_object_in_kept']:.3f} place-cue-in-kept {r['place_cue_in_kept']:.4f} "
            f"train {r['train_s']:.0f}s wall, {r['train_cpu_s']:.0f}s cpu",
            flush=True,
        )
        results.append(r)
    if args.json:
        meta = {
            **C.environment(dist_info.device),
            "threads": args.threads,
            "logical_cpus": os.cpu_count(),
            "platform": platform.platform(),
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "dataset": args.dataset,
            "benchmark_config": dataclasses.asdict(cfg),
            "group_names": names,
            "data_seconds": data_s,
        }
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=1)
    return results


if __name__ == "__main__":
    main()
