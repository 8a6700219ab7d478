"""Self-supervised pretraining of a two-stage preset's backbone on the training images: masked autoencoding (MAE).

``python -m faithful_vit.pretrain --data waterbirds_lite --model faithful_tiny_wblite --output DIR`` trains the
preset's stage-1 backbone (a timm ViT) as the encoder of a masked autoencoder (He et al., 2022) on the training
split's images only (no labels, no masks): a random ``--mask-ratio`` of the patches is hidden, the encoder reads the
visible ones, a small decoder predicts the hidden patches' pixels (each patch normalised by its own mean and
variance) and the loss is their mean squared error. It writes ``DIR/backbone.safetensors`` (the encoder's timm
state dict, which ``train.py --pretrained-file`` loads into both backbones of the preset), ``DIR/args.yaml`` and
``DIR/metrics.jsonl`` (one row per epoch: loss, seconds).

Why MAE: the encoder runs on the visible quarter of the tokens only, so an epoch costs less than a quarter of a
full-image forward and backward, and its objective needs no second view, no teacher and no augmentation beyond a
flip and a crop; on a 2-core CPU that is what lets the backbone see the training images for many epochs.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml
from safetensors.torch import save as safetensors_bytes
from timm.models.vision_transformer import Block
from tqdm import tqdm

import faithful_vit
from faithful_vit import cli, run_folder
from faithful_vit.model_spec import SpecError, build_dataset, data_spec

BACKBONE_FILE = "backbone.safetensors"


def _build_parser() -> argparse.ArgumentParser:
    parser = cli.Parser(
        prog="python -m faithful_vit.pretrain",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--data", default="waterbirds_lite", help="a registered dataset (default: %(default)s)")
    parser.add_argument("--data-dir", default=None, help="dataset folder (datasets read from disk)")
    cli.add_kwargs_flag(
        parser,
        "--data-kwargs",
        "generator settings of synthetic/waterbirds_lite, e.g. n_train=600",
    )
    parser.add_argument(
        "--model",
        default="faithful_tiny_wblite",
        help="the two-stage preset whose stage-1 backbone is pretrained (default: %(default)s)",
    )
    cli.add_kwargs_flag(
        parser,
        "--model-kwargs",
        "overrides of the preset's config, as for train.py (e.g. backbone_kwargs={depth: 2})",
    )
    parser.add_argument("--output", required=True, help="new (or empty) folder for backbone.safetensors and logs")
    parser.add_argument("--epochs", type=cli.positive_int, default=100, help="epochs (default: %(default)s)")
    parser.add_argument("--batch-size", type=cli.positive_int, default=128, help="batch size (default: %(default)s)")
    parser.add_argument(
        "--lr", type=cli.positive_float, default=1.5e-3, help="peak AdamW learning rate (default: %(default)s)"
    )
    parser.add_argument(
        "--weight-decay", type=cli.non_negative_float, default=0.05, help="AdamW weight decay (default: %(default)s)"
    )
    parser.add_argument(
        "--warmup-epochs",
        type=cli.non_negative_float,
        default=5.0,
        help="linear warm-up, then a cosine to 0 (default: %(default)s)",
    )
    parser.add_argument(
        "--mask-ratio",
        type=cli.threshold_fraction,
        default=0.75,
        help="fraction of the patches hidden from the encoder (default: %(default)s)",
    )
    parser.add_argument(
        "--min-crop",
        type=cli.unit_fraction,
        default=0.5,
        help="smallest area fraction of the random resized crop; 1 disables cropping (default: %(default)s)",
    )
    parser.add_argument("--decoder-dim", type=cli.positive_int, default=64, help="decoder width (default: %(default)s)")
    parser.add_argument(
        "--decoder-depth", type=cli.positive_int, default=2, help="decoder blocks (default: %(default)s)"
    )
    parser.add_argument("--seed", type=cli.seed_int, default=0, help="random seed (default: %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (it is off without a TTY)")
    return parser


class MaskedAutoencoder(nn.Module):
    """A timm ViT ``encoder`` with an MAE decoder; ``forward(images, mask_ratio)`` returns the loss.

    The decoder sees every patch position: the encoded visible patches and a shared mask token elsewhere, each
    with a learned decoder position embedding; it predicts each hidden patch's pixels normalised per patch.
    """

    def __init__(self, encoder: nn.Module, decoder_dim: int, decoder_depth: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.patch_size = tuple(encoder.patch_embed.patch_size)
        num_patches = encoder.patch_embed.num_patches
        heads = decoder_dim // 32 if decoder_dim % 32 == 0 else 1  # heads of width 32, or one
        self.decoder_embed = nn.Linear(encoder.embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, num_patches, decoder_dim))
        self.decoder_blocks = nn.Sequential(*(Block(decoder_dim, heads, mlp_ratio=4.0) for _ in range(decoder_depth)))
        self.decoder_norm = nn.LayerNorm(decoder_dim)
        in_chans = encoder.patch_embed.proj.in_channels
        self.decoder_pred = nn.Linear(decoder_dim, self.patch_size[0] * self.patch_size[1] * in_chans)
        nn.init.normal_(self.mask_token, std=0.02)
        nn.init.trunc_normal_(self.decoder_pos_embed, std=0.02)

    def patchify(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` -> ``(B, num_patches, ph * pw * C)`` in the encoder's raster order."""
        (ph, pw), (b, c, h, w) = self.patch_size, images.shape
        patches = images.reshape(b, c, h // ph, ph, w // pw, pw).permute(0, 2, 4, 3, 5, 1)
        return patches.reshape(b, (h // ph) * (w // pw), ph * pw * c)

    def forward(self, images: torch.Tensor, mask_ratio: float) -> torch.Tensor:
        encoder = self.encoder
        x = encoder.patch_embed(images)
        batch, num_patches, _ = x.shape
        x = encoder.norm_pre(encoder.patch_drop(encoder._pos_embed(x)))
        prefix = encoder.num_prefix_tokens
        num_visible = max(1, round(num_patches * (1 - mask_ratio)))
        order = torch.rand(batch, num_patches, device=images.device).argsort(dim=1)
        visible = order[:, :num_visible]
        patches = x[:, prefix:].gather(1, visible[..., None].expand(-1, -1, x.shape[-1]))
        encoded = encoder.norm(encoder.blocks(torch.cat([x[:, :prefix], patches], dim=1)))[:, prefix:]
        tokens = self.decoder_embed(encoded)
        full = self.mask_token.expand(batch, num_patches, -1).to(tokens.dtype)
        full = full.scatter(1, visible[..., None].expand(-1, -1, tokens.shape[-1]), tokens)
        prediction = self.decoder_pred(self.decoder_norm(self.decoder_blocks(full + self.decoder_pos_embed)))
        target = self.patchify(images)
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
        hidden = torch.ones(batch, num_patches, device=images.device)
        hidden.scatter_(1, visible, 0.0)
        per_patch = (prediction - target).pow(2).mean(-1)
        return (per_patch * hidden).sum() / hidden.sum().clamp_min(1.0)


def build_autoencoder(preset: str, model_kwargs: dict, image_size: int, decoder_dim: int, decoder_depth: int):
    """The masked autoencoder around the stage-1 backbone of ``preset`` (with ``model_kwargs``) at ``image_size``."""
    model = faithful_vit.FaithfulViT(faithful_vit.get_config(preset, img_size=image_size, **model_kwargs))
    return MaskedAutoencoder(model.stage1, decoder_dim, decoder_depth)


def augment(images, generator, min_crop: float):
    """A horizontal flip and a random resized crop (area in ``[min_crop, 1]``, aspect 3/4..4/3) per image."""
    batch = images.shape[0]
    flip = torch.rand(batch, generator=generator) < 0.5
    images = torch.where(flip[:, None, None, None], images.flip(-1), images)
    if min_crop >= 1:
        return images
    area = min_crop + (1 - min_crop) * torch.rand(batch, generator=generator)
    log_aspect = (torch.rand(batch, generator=generator) * 2 - 1) * math.log(4 / 3)
    aspect = log_aspect.exp()
    crop_w = (area * aspect).sqrt().clamp(max=1.0)
    crop_h = (area / aspect).sqrt().clamp(max=1.0)
    center_x = (1 - crop_w) * (torch.rand(batch, generator=generator) * 2 - 1)
    center_y = (1 - crop_h) * (torch.rand(batch, generator=generator) * 2 - 1)
    theta = torch.zeros(batch, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = crop_w, center_x, crop_h, center_y
    grid = F.affine_grid(theta.to(images), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def pretrain(args, args_text: str) -> list[dict]:
    """Run the pretraining of ``args`` (the parsed flags); returns the per-epoch metrics."""
    if args.model not in faithful_vit.list_models():
        presets = faithful_vit.list_models()
        raise cli.UsageError(f"--model: expected a two-stage preset, one of {presets}, got {args.model!r}")
    output = Path(args.output)
    with cli.usage_error_from(run_folder.RunFolderError):
        run_folder.new_run_dir(output.parent, output.name)
    with cli.usage_error_from(SpecError):
        spec = data_spec(args.data, data_dir=args.data_dir, data_kwargs=args.data_kwargs, reference_model=args.model)
        train_set = build_dataset(spec, "train", augment=False)
    if args.batch_size > len(train_set):
        raise cli.UsageError(
            f"--batch-size: expected at most {len(train_set)}, the training images, got {args.batch_size}"
        )
    images = torch.stack([train_set[index].image for index in range(len(train_set))])
    run_folder.seed_everything(args.seed)
    try:
        model = build_autoencoder(
            args.model, args.model_kwargs, spec["image_size"], args.decoder_dim, args.decoder_depth
        )
    except (TypeError, ValueError) as error:
        raise cli.UsageError(f"--model-kwargs: {error}") from None

    run_folder.write_text(output / "args.yaml", args_text)
    steps_per_epoch = len(images) // args.batch_size
    total, warmup = args.epochs * steps_per_epoch, args.warmup_epochs * steps_per_epoch
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: (
            (step + 1) / warmup
            if step < warmup
            else 0.5 * (1 + math.cos(math.pi * min((step - warmup) / max(total - warmup, 1), 1.0)))
        ),
    )
    generator = torch.Generator().manual_seed(args.seed)
    show = not args.no_progress and sys.stderr.isatty()
    history = []
    bar = tqdm(total=total, desc="pretrain (MAE)", disable=not show)
    for epoch in range(args.epochs):
        start, loss_sum = time.perf_counter(), torch.zeros(())
        order = torch.randperm(len(images), generator=generator)
        for step in range(steps_per_epoch):
            index = order[step * args.batch_size : (step + 1) * args.batch_size]
            batch = augment(images[index], generator, args.min_crop)
            loss = model(batch, args.mask_ratio)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss_sum += loss.detach()
            bar.update()
        row = {"epoch": epoch, "loss": float(loss_sum) / steps_per_epoch, "seconds": time.perf_counter() - start}
        if not math.isfinite(row["loss"]):
            raise FloatingPointError(f"pretraining loss is not finite at epoch {epoch}: {row['loss']}")
        history.append(row)
        bar.set_postfix(loss=f"{row['loss']:.4f}")
        run_folder.write_text(output / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in history))
    bar.close()
    state = {k: v.detach().contiguous() for k, v in model.encoder.state_dict().items()}
    with run_folder.atomic_open(output / BACKBONE_FILE, "wb") as handle:
        handle.write(safetensors_bytes(state, metadata={"format": "pt", "preset": args.model}))
    print(f"pretrain: final loss {history[-1]['loss']:.4f}; wrote {output / BACKBONE_FILE}")
    return history


def main(argv: list[str] | None = None) -> int:
    """Parse and run; a usage error is one line on stderr and exit code 2."""
    try:
        args = _build_parser().parse_args(argv)
        pretrain(args, yaml.safe_dump(vars(args)))
    except cli.UsageError as error:
        print(f"python -m faithful_vit.pretrain: error: {error}", file=sys.stderr)
        return 2
    except FloatingPointError as error:
        print(f"python -m faithful_vit.pretrain: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
