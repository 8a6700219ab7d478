"""Oracle ceilings on the built-in SpuriousShapes benchmark: a full-image ViT vs the same ViT with ground-truth masks.

Trains, from scratch and one after another, a timm ``VisionTransformer`` on the full image (the baseline) and the
same ViT whose attention may only use patches selected by the ground-truth object mask (``forward_features(x,
attn_mask=[B,1,1,1+N] bool)``, CLS always kept), at several patch-inclusion rules:

- ``gt_any``: patches containing any object pixel (what a perfect patch-level stage 1 keeps at a low threshold);
- ``gt_half``: object fraction > 0.5;
- ``gt_interior``: patches entirely inside the object;
- ``gt_any_dilated``: ``gt_any`` grown by one patch ring (an over-segmenting stage 1).

Reports average, per-group and worst-group test accuracy (WGA), the kept fraction of patches, the non-object
fraction of pixels inside kept patches (``non_object_in_kept``: what a mask IoU hides) and the place-cue fraction
inside kept patches (``place_cue_in_kept``: the mean place-texture visibility there; 0 = no shortcut reachable).

Example (about 2 min of CPU per model on one thread)::

    python benchmarks/oracle_ceilings.py --models baseline gt_any gt_half gt_interior --epochs 8 \
        --json benchmarks/results/oracle_ceilings.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import time

import timm
import torch
import torch.nn.functional as F

from faithful_vit.data.mask_stats import patch_mask_stats
from faithful_vit.data.synthetic import SpuriousShapes, SpuriousShapesConfig
from faithful_vit.data.waterbirds_lite import WaterbirdsLite, WaterbirdsLiteConfig

MASK_RULES = {
    "baseline": None,
    "gt_any": lambda frac: frac > 0,
    "gt_half": lambda frac: frac > 0.5,
    "gt_interior": lambda frac: frac >= 1.0,
    # Over-segmentation by one ring of patches (8-neighbour dilation of gt_any): what a too-generous stage 1 keeps.
    "gt_any_dilated": lambda frac: dilate(frac > 0),
}


def dilate(keep: torch.Tensor) -> torch.Tensor:
    """``[B, N]`` bool on a square grid -> the same, grown by one patch in all 8 directions."""
    side = math.isqrt(keep.shape[1])
    grid = keep.float().view(-1, 1, side, side)
    return (F.max_pool2d(grid, 3, stride=1, padding=1) > 0).flatten(1)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def patch_fraction(masks: torch.Tensor, patch: int) -> torch.Tensor:
    """``[B,1,H,W]`` -> ``[B, N]`` per-patch mean, raster order."""
    return F.avg_pool2d(masks, patch).flatten(1)


def keep_mask(masks: torch.Tensor, patch: int, rule: str) -> torch.Tensor | None:
    fn = MASK_RULES[rule]
    return None if fn is None else fn(patch_fraction(masks, patch))


def key_mask(keep: torch.Tensor) -> torch.Tensor:
    """``[B,N]`` patch keep -> ``[B,1,1,1+N]`` SDPA bool key mask with CLS always attendable."""
    cls = torch.ones(keep.shape[0], 1, dtype=torch.bool)
    return torch.cat([cls, keep], 1)[:, None, None, :]


def forward(model, images: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    feats = model.forward_features(images, attn_mask=None if keep is None else key_mask(keep))
    return model.forward_head(feats)


@torch.no_grad()
def evaluate(model, data, patch: int, rule: str, num_groups: int, batch: int = 250):
    model.eval()
    correct = torch.zeros(num_groups)
    count = torch.zeros(num_groups)
    for i in range(0, len(data.labels), batch):
        sl = slice(i, i + batch)
        keep = keep_mask(data.fg_masks[sl], patch, rule)
        pred = forward(model, data.images[sl], keep).argmax(1)
        g = data.groups[sl]
        correct += torch.bincount(g, weights=(pred == data.labels[sl]).float(), minlength=num_groups)
        count += torch.bincount(g, minlength=num_groups).float()
    group_acc = (correct / count.clamp_min(1)).tolist()
    return {"avg_acc": correct.sum().item() / count.sum().item(), "group_acc": group_acc, "wga": min(group_acc)}


def leak_stats(data, visibility: torch.Tensor, patch: int, rule: str) -> dict:
    keep = keep_mask(data.fg_masks, patch, rule)
    if keep is None:
        keep = torch.ones_like(patch_fraction(data.fg_masks, patch), dtype=torch.bool)
    return patch_mask_stats(keep, data.fg_masks, patch, place_visibility=visibility)


def train_one(rule: str, train, val, test, vis_test, args, num_groups: int) -> dict:
    torch.manual_seed(args.seed)
    model = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=args.image_size,
        patch_size=args.patch,
        embed_dim=args.embed_dim,
        depth=args.depth,
        num_heads=args.heads,
        mlp_ratio=args.mlp_ratio,
        num_classes=2,
    )
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    n = len(train.labels)
    steps_per_epoch = math.ceil(n / args.batch)
    total = steps_per_epoch * args.epochs
    warmup = steps_per_epoch

    def lr_at(step):
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    history = []
    t0, cpu0 = time.perf_counter(), time.process_time()
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(n)
        for i in range(0, n, args.batch):
            idx = perm[i : i + args.batch]
            images, masks = train.images[idx], train.fg_masks[idx]
            flip = torch.rand(len(idx)) < 0.5  # horizontal flip, applied to image and mask together
            images = torch.where(flip[:, None, None, None], images.flip(-1), images)
            masks = torch.where(flip[:, None, None, None], masks.flip(-1), masks)
            loss = F.cross_entropy(forward(model, images, keep_mask(masks, args.patch, rule)), train.labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 2.0)
            opt.step()
            sched.step()
        val_metrics = evaluate(model, val, args.patch, rule, num_groups)
        history.append(
            {"epoch": epoch, "loss": loss.item(), "val_wga": val_metrics["wga"], "val_avg": val_metrics["avg_acc"]}
        )
        print(
            f"  [{rule}] epoch {epoch} loss {loss.item():.3f} val avg {val_metrics['avg_acc']:.3f} "
            f"wga {val_metrics['wga']:.3f} ({time.perf_counter() - t0:.0f}s)",
            flush=True,
        )
    train_s = time.perf_counter() - t0
    # Process CPU time is what the run costs on an idle core; wall time also counts other jobs on a shared machine.
    train_cpu_s = time.process_time() - cpu0
    return {
        "model": rule,
        "train_s": train_s,
        "train_cpu_s": train_cpu_s,
        "test": evaluate(model, test, args.patch, rule, num_groups),
        "history": history,
        **leak_stats(test, vis_test, args.patch, rule),
    }


def main() -> None:
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
    p.add_argument(
        "--dataset",
        default="spurious_shapes",
        choices=["spurious_shapes", "waterbirds_lite"],
        help="waterbirds_lite needs `bash scripts/setup_waterbirds_lite.sh` first",
    )
    p.add_argument("--clear-margin", type=float, default=None, help="override the benchmark's clear margin (px)")
    p.add_argument("--n-train", type=int, default=None)
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    overrides = {"image_size": args.image_size, "seed": args.data_seed}
    if args.clear_margin is not None:
        overrides["clear_margin"] = args.clear_margin
    if args.n_train is not None:
        overrides["n_train"] = args.n_train
    if args.dataset == "waterbirds_lite":
        overrides.pop("clear_margin", None)
        cfg = dataclasses.replace(WaterbirdsLiteConfig(), **overrides)
        dataset_cls = WaterbirdsLite
    else:
        cfg = dataclasses.replace(SpuriousShapesConfig(), **overrides)
        dataset_cls = SpuriousShapes
    t0 = time.perf_counter()
    splits = {s: dataset_cls(s, config=cfg) for s in ("train", "val", "test")}
    data_s = time.perf_counter() - t0
    train, val, test = (splits[s].tensors() for s in ("train", "val", "test"))
    vis_test = splits["test"].place_visibility()
    names = splits["train"].group_names
    print(f"data ready in {data_s:.1f}s; train groups {torch.bincount(train.groups, minlength=4).tolist()} {names}")
    results = []
    for rule in args.models:
        r = train_one(rule, train, val, test, vis_test, args, splits["train"].num_groups)
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
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "torch": torch.__version__,
            "timm": timm.__version__,
            "threads": args.threads,
            "cpu": cpu_name(),
            "logical_cpus": os.cpu_count(),
            "platform": platform.platform(),
            "args": vars(args),
            "dataset": args.dataset,
            "benchmark_config": dataclasses.asdict(cfg),
            "group_names": names,
            "data_seconds": data_s,
        }
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
