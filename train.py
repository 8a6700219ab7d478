#!/usr/bin/env python3
"""Train and compare two-stage faithful ViTs, a full-image baseline and a ground-truth-mask oracle.

A lean, timm-style training script. ``python train.py`` with no arguments is the default experiment: on the built-in
benchmark (SpuriousShapes) it trains the tiny two-stage preset, the full-image baseline and the oracle (stage 2 given
the ground-truth mask: the ceiling of a perfect stage 1), picks each model's checkpoint on validation worst-group
accuracy (never on the test set), evaluates it once on the test split, prints a side-by-side table and writes
``runs/<timestamp>/``: ``args.yaml``, ``summary.json``, ``figures/``, and per model and seed ``metrics.jsonl``,
``metrics.csv``, ``test_metrics.json`` and ``checkpoints/``.

Examples::

    python train.py                                   # the default experiment (one seed)
    python train.py --seeds 0,1,2                     # the same over 3 seeds, mean and std in summary.json
    python train.py -c my.yaml --model faithful_tiny  # flags from a YAML file (keys are flag names)
    python train.py --resume runs/20260101-120000     # continue a killed run exactly where it stopped
    torchrun --nproc_per_node 2 train.py --device cpu # DistributedDataParallel (gloo on CPU, NCCL on CUDA)
"""

from __future__ import annotations

import argparse
import sys
import warnings

from faithful_vit import cli

DEFAULT_MODELS = "faithful_tiny,baseline,oracle"


def _build_parser() -> argparse.ArgumentParser:
    parser = cli.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_argument_group("Data")
    group.add_argument(
        "--data",
        default="synthetic",
        help="a registered dataset, e.g. the built-in benchmark synthetic (generated and cached on first use) or "
        "one read from --data-dir; an unknown name lists them all (--help does not import the datasets) "
        "(default: %(default)s)",
    )
    group.add_argument(
        "--data-dir",
        default=None,
        help="dataset folder (required for waterbirds, cub, metashift, imagefolder, imagenet9)",
    )
    group.add_argument(
        "--mask-dir",
        default=None,
        help="CUB segmentations folder: ground-truth masks for mask metrics and the oracle (waterbirds, cub)",
    )
    cli.add_kwargs_flag(
        group,
        "--data-kwargs",
        "generator settings of synthetic/waterbirds_lite, e.g. n_train=600 image_size=32",
    )
    group.add_argument(
        "--img-size",
        type=cli.positive_int,
        default=None,
        help="image side for folder datasets (default: the two-stage preset's)",
    )
    group.add_argument(
        "--num-workers", type=cli.non_negative_int, default=0, help="DataLoader worker processes (default: %(default)s)"
    )
    group = parser.add_argument_group("Model")
    group.add_argument(
        "--model",
        default=DEFAULT_MODELS,
        help="comma-separated models to train: two-stage presets "
        "(see faithful_vit.list_models()), 'baseline' (full-image ViT of stage-2 size) and 'oracle' "
        "(stage 2 given the ground-truth patch mask) (default: %(default)s)",
    )
    cli.add_kwargs_flag(
        group,
        "--model-kwargs",
        "overrides of the two-stage preset's config, e.g. num_parts=4 mask_morphology=open; for baseline "
        "and oracle also timm's global_pool=token|avg",
    )
    group.add_argument(
        "--reference-model",
        default=None,
        help="two-stage preset whose stage 2 sets the size of "
        "baseline and oracle (default: the first preset in --model, else faithful_tiny)",
    )
    group.add_argument(
        "--oracle-threshold",
        type=cli.threshold_fraction,
        default=0.5,
        help="the oracle keeps a patch when its ground-truth foreground fraction exceeds this (default: %(default)s)",
    )
    group.add_argument(
        "--pretrained-file",
        default=None,
        help="local ViT weights (.safetensors/.pth) for the two-stage backbones and the baseline/oracle ViT; "
        "nothing is ever downloaded",
    )
    group = parser.add_argument_group("Optimizer")
    group.add_argument(
        "--batch-size", type=cli.positive_int, default=16, help="batch size per process (default: %(default)s)"
    )
    group.add_argument(
        "--eval-batch-size", type=cli.positive_int, default=256, help="evaluation batch size (default: %(default)s)"
    )
    group.add_argument(
        "--lr",
        type=cli.positive_float,
        default=1e-3,
        help="base learning rate of AdamW; the two-stage model "
        "scales it per parameter group (paper section 7.1) (default: %(default)s)",
    )
    group.add_argument(
        "--weight-decay", type=cli.non_negative_float, default=0.05, help="AdamW weight decay (default: %(default)s)"
    )
    group.add_argument(
        "--wd-normalized",
        action="store_true",
        help="normalised weight decay (paper section 7.2): weight-decay * sqrt(1 / total steps)",
    )
    group.add_argument(
        "--clip-grad",
        type=cli.non_negative_float,
        default=2.0,
        help="global gradient-norm clip; 0 disables (default: %(default)s)",
    )
    group = parser.add_argument_group("Schedule")
    group.add_argument("--epochs", type=cli.positive_int, default=10, help="training epochs (default: %(default)s)")
    group.add_argument(
        "--sched",
        choices=("cosine", "constant"),
        default="cosine",
        help="LR schedule, to 0 with no restart (default: %(default)s)",
    )
    group.add_argument(
        "--sched-unit",
        choices=("epoch", "step"),
        default="step",
        help="update the LR every step, or once per epoch as the paper does (default: %(default)s)",
    )
    group.add_argument(
        "--warmup-epochs",
        type=cli.non_negative_float,
        default=1.0,
        help="linear LR warm-up; the paper fine-tunes a "
        "pretrained backbone without one (0), training from scratch needs it (default: %(default)s)",
    )
    group.add_argument(
        "--min-lr", type=cli.non_negative_float, default=0.0, help="LR at the end of the cosine (default: %(default)s)"
    )
    group = parser.add_argument_group("Device")
    group.add_argument(
        "--device",
        default="auto",
        choices=("auto", "cpu", "cuda"),
        help="auto (CUDA if available), cpu or cuda (default: %(default)s)",
    )
    group.add_argument(
        "--amp",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="bf16 autocast on CUDA; ignored on CPU (default: on)",
    )
    cli.add_backend_flag(group)
    group.add_argument("--compile", action="store_true", help="torch.compile the model for training")
    group.add_argument("--channels-last", action="store_true", help="channels-last images and weights")
    group = parser.add_argument_group("Checkpointing")
    group.add_argument("--output", default="runs", help="parent folder of run folders (default: %(default)s)")
    group.add_argument(
        "--experiment",
        default=None,
        help="run folder name inside --output (default: a UTC timestamp); a folder that already holds a run is "
        "refused: continue it with --resume",
    )
    group.add_argument(
        "--resume",
        default=None,
        metavar="RUN_DIR",
        help="continue the run in RUN_DIR with the flags of its args.yaml; only --num-workers, --no-progress, "
        "--log-interval and --checkpoint-every may differ; finished models are not retrained",
    )
    group.add_argument(
        "--checkpoint-every",
        type=cli.non_negative_int,
        default=100,
        help="also checkpoint every N steps; 0: only at epoch ends (default: %(default)s)",
    )
    group = parser.add_argument_group("Misc")
    group.add_argument("--seed", type=cli.seed_int, default=0, help="random seed (default: %(default)s)")
    group.add_argument(
        "--seeds",
        type=cli.seed_list,
        default=None,
        help="comma-separated seeds, e.g. 0,1,2; overrides --seed and reports mean and std over seeds",
    )
    group.add_argument(
        "--log-interval",
        type=cli.positive_int,
        default=20,
        help="steps between loss read-outs (the only host synchronisations in training) (default: %(default)s)",
    )
    group.add_argument("--no-progress", action="store_true", help="no progress bars (they are off without a TTY)")
    group.add_argument(
        "--max-corrupt-fraction",
        type=cli.unit_fraction,
        default=0.01,
        help="stop (exit 2) when more than this fraction of a split's images cannot be decoded; fewer are "
        "skipped and counted (default: %(default)s)",
    )
    group.add_argument(
        "--num-figure-samples",
        type=cli.non_negative_int,
        default=6,
        help="images in the mask figures (default: %(default)s)",
    )
    return parser


def _parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, str]:
    return cli.parse_with_files(_build_parser(), argv)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; bad input is one line on stderr and exit code 2, a non-finite loss exit code 1."""
    try:
        args, args_text = _parse_args(argv)
        from faithful_vit import experiment  # after parsing: --help stays fast
        from faithful_vit.data import DatasetError
        from faithful_vit.engine import NonFiniteLossError
        from faithful_vit.run_folder import RunFolderError

        try:
            with cli.backend_context(args.backend), cli.usage_error_from(RunFolderError):
                experiment.run(args, args_text)
        except NonFiniteLossError as error:
            print(f"train.py: error: {error}", file=sys.stderr)
            return 1
        except DatasetError as error:  # found during training: too many undecodable images
            print(f"train.py: error: {error}", file=sys.stderr)
            return 2
    except cli.UsageError as error:
        print(f"train.py: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    warnings.filterwarnings("ignore", message=".*freeze_stage1_backbone.*")
    sys.exit(main())
