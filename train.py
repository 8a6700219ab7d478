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
import json
import sys
import time
import warnings
from contextlib import contextmanager, nullcontext
from pathlib import Path

import yaml

DEFAULT_MODELS = "faithful_tiny,baseline,oracle"
DATASETS = ("synthetic", "waterbirds_lite", "waterbirds", "cub", "metashift", "imagefolder")
COMPARISON_MODELS = ("baseline", "oracle")


class UsageError(ValueError):
    """Bad input from the command line (reported as one line, exit code 2)."""


class ParseKwargs(argparse.Action):
    """``--model-kwargs a=1 b=[2,3]``: values are parsed as YAML scalars or lists."""

    def __call__(self, parser, namespace, values, option_string=None):
        kwargs = {}
        for item in values:
            key, sep, value = item.partition("=")
            if not sep:
                parser.error(f"{option_string}: expected key=value, got {item!r}")
            kwargs[key] = yaml.safe_load(value)
        setattr(namespace, self.dest, kwargs)


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_argument_group("Data")
    group.add_argument(
        "--data",
        default="synthetic",
        choices=DATASETS,
        help="dataset: synthetic (the built-in "
        "benchmark, generated and cached on first use), waterbirds_lite (built offline by "
        "scripts/setup_waterbirds_lite.sh), or one in --data-dir: waterbirds (metadata.csv), cub "
        "(CUB-200-2011), metashift (DISC layout), imagefolder (<dir>/{train,val,test}/<class>/*) "
        "(default: %(default)s)",
    )
    group.add_argument(
        "--data-dir", default=None, help="dataset folder (required for waterbirds, cub, metashift, imagefolder)"
    )
    group.add_argument(
        "--mask-dir",
        default=None,
        help="CUB segmentations folder: ground-truth masks for mask metrics and the oracle (waterbirds, cub)",
    )
    group.add_argument(
        "--data-kwargs",
        nargs="*",
        default={},
        action=ParseKwargs,
        metavar="KEY=VALUE",
        help="generator settings of synthetic/waterbirds_lite, e.g. n_train=600 image_size=32",
    )
    group.add_argument(
        "--img-size", type=int, default=None, help="image side for folder datasets (default: the two-stage preset's)"
    )
    group.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes (default: %(default)s)")
    group = parser.add_argument_group("Model")
    group.add_argument(
        "--model",
        default=DEFAULT_MODELS,
        help="comma-separated models to train: two-stage presets "
        "(see faithful_vit.list_models()), 'baseline' (full-image ViT of stage-2 size) and 'oracle' "
        "(stage 2 given the ground-truth patch mask) (default: %(default)s)",
    )
    group.add_argument(
        "--model-kwargs",
        nargs="*",
        default={},
        action=ParseKwargs,
        metavar="KEY=VALUE",
        help="overrides of the two-stage preset's config, e.g. num_parts=4 mask_morphology=open",
    )
    group.add_argument(
        "--reference-model",
        default=None,
        help="two-stage preset whose stage 2 sets the size of "
        "baseline and oracle (default: the first preset in --model, else faithful_tiny)",
    )
    group.add_argument(
        "--oracle-threshold",
        type=float,
        default=0.5,
        help="the oracle keeps a patch when its ground-truth foreground fraction exceeds this (default: %(default)s)",
    )
    group.add_argument(
        "--pretrained-file",
        default=None,
        help="local ViT weights (.safetensors/.pth) for the two-stage backbones; nothing is ever downloaded",
    )
    group = parser.add_argument_group("Optimizer")
    group.add_argument("--batch-size", type=int, default=64, help="batch size per process (default: %(default)s)")
    group.add_argument("--eval-batch-size", type=int, default=256, help="evaluation batch size (default: %(default)s)")
    group.add_argument(
        "--lr",
        type=float,
        default=1e-3,
        help="base learning rate of AdamW; the two-stage model "
        "scales it per parameter group (paper section 7.1) (default: %(default)s)",
    )
    group.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay (default: %(default)s)")
    group.add_argument(
        "--wd-normalized",
        action="store_true",
        help="normalised weight decay (paper section 7.2): weight-decay * sqrt(1 / total steps)",
    )
    group.add_argument(
        "--clip-grad", type=float, default=2.0, help="global gradient-norm clip; 0 disables (default: %(default)s)"
    )
    group = parser.add_argument_group("Schedule")
    group.add_argument("--epochs", type=int, default=10, help="training epochs (default: %(default)s)")
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
        type=float,
        default=1.0,
        help="linear LR warm-up; the paper fine-tunes a "
        "pretrained backbone without one (0), training from scratch needs it (default: %(default)s)",
    )
    group.add_argument("--min-lr", type=float, default=0.0, help="LR at the end of the cosine (default: %(default)s)")
    group = parser.add_argument_group("Device")
    group.add_argument("--device", default="auto", help="auto (CUDA if available), cpu or cuda (default: %(default)s)")
    group.add_argument(
        "--amp",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="bf16 autocast on CUDA; ignored on CPU (default: on)",
    )
    group.add_argument(
        "--attn-impl",
        choices=("auto", "triton", "torch"),
        default=None,
        help="attention kernels: "
        "our Triton kernels, the PyTorch reference, or auto (Triton where it can run) "
        "(default: $FAITHFUL_VIT_BACKEND, else auto)",
    )
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
        type=int,
        default=100,
        help="also checkpoint every N steps; 0: only at epoch ends (default: %(default)s)",
    )
    group = parser.add_argument_group("Misc")
    group.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    group.add_argument(
        "--seeds",
        default=None,
        help="comma-separated seeds, e.g. 0,1,2; overrides --seed and reports mean and std over seeds",
    )
    group.add_argument(
        "--log-interval",
        type=int,
        default=20,
        help="steps between loss read-outs (the only host synchronisations in training) (default: %(default)s)",
    )
    group.add_argument("--no-progress", action="store_true", help="no progress bars (they are off without a TTY)")
    group.add_argument(
        "--num-figure-samples", type=int, default=6, help="images in the mask figures (default: %(default)s)"
    )
    return parser


def _parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, str]:
    """Parse twice: ``--resume``'s ``args.yaml`` and ``-c/--config`` set defaults, then the command line wins.

    On ``--resume``, only flags in :data:`faithful_vit.run_folder.RESUME_SAFE_FLAGS` may differ from ``args.yaml``.
    """
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("-c", "--config", default=None)
    pre.add_argument("--resume", default=None)
    known, _ = pre.parse_known_args(argv)
    parser = _build_parser()
    parser.add_argument("-c", "--config", default=None, help="YAML file of flag values (keys: flag names)")
    valid = {action.dest for action in parser._actions}
    stored = None
    if known.resume:
        from faithful_vit import run_folder  # only on --resume: --help stays fast

        with _usage_error_from(run_folder.RunFolderError):
            stored = run_folder.read_run_args(Path(known.resume), valid - {"help", "config", "resume"})
        parser.set_defaults(**stored)
    if known.config:
        path = Path(known.config)
        if not path.is_file():
            raise UsageError(f"--config: no such file: {path}")
        config = yaml.safe_load(path.read_text()) or {}
        if not isinstance(config, dict):
            raise UsageError(f"--config: expected a YAML mapping of flag names to values in {path}")
        config = {key.replace("-", "_"): value for key, value in config.items() if key not in ("config", "resume")}
        unknown = sorted(set(config) - valid)
        if unknown:
            raise UsageError(f"--config: unknown keys {unknown} in {path}")
        parser.set_defaults(**config)
    args = parser.parse_args(argv)
    if stored is not None:
        with _usage_error_from(run_folder.RunFolderError):
            run_folder.check_resume_flags(stored, vars(args))
    return args, yaml.safe_dump({k: v for k, v in vars(args).items() if k not in ("config", "resume")})


@contextmanager
def _usage_error_from(error_type: type[Exception]):
    """Report ``error_type`` (raised by the library, e.g. for a damaged run folder) as a :class:`UsageError`."""
    try:
        yield
    except error_type as error:
        raise UsageError(str(error)) from None


def build_datasets(args) -> tuple[list, dict]:
    """The train/val/test datasets and their data spec; a missing or malformed dataset is a :class:`UsageError`."""
    from faithful_vit.model_spec import SpecError, build_dataset, data_spec, describe_data

    with _usage_error_from(SpecError):
        spec = data_spec(
            args.data,
            data_dir=args.data_dir,
            mask_dir=args.mask_dir,
            data_kwargs=args.data_kwargs,
            img_size=args.img_size,
            reference_model=args.reference_model,
        )
        built = [build_dataset(spec, split) for split in ("train", "val", "test")]
    return built, describe_data(spec, built[0])


def build_model(name: str, args, num_classes: int, image_size: int):
    """A two-stage preset, or the baseline / oracle at the size of the reference preset's stage 2, and its spec."""
    from faithful_vit.model_spec import build_model as build_from_spec
    from faithful_vit.model_spec import model_spec

    try:
        spec = model_spec(
            name,
            num_classes=num_classes,
            image_size=image_size,
            model_kwargs=args.model_kwargs,
            reference_model=args.reference_model,
            oracle_threshold=args.oracle_threshold,
        )
        return build_from_spec(spec, pretrained_file=args.pretrained_file), spec
    except (TypeError, ValueError) as error:
        raise UsageError(f"--model-kwargs: {error}") from None


def _check_models(args) -> list[str]:
    import faithful_vit

    names = [name.strip() for name in args.model.split(",") if name.strip()]
    presets = faithful_vit.list_models()
    unknown = [name for name in names if name not in presets and name not in COMPARISON_MODELS]
    if not names or unknown:
        raise UsageError(
            f"--model: unknown model {unknown or args.model!r}; expected a comma list of "
            f"{presets + list(COMPARISON_MODELS)}"
        )
    if args.reference_model is None:
        args.reference_model = next((name for name in names if name in presets), "faithful_tiny")
    if args.reference_model not in presets:
        raise UsageError(f"--reference-model: unknown preset {args.reference_model!r}; expected one of {presets}")
    return names


def run(args, args_text: str) -> dict:
    """Train, select on validation and test every (model, seed); write the run folder; return the summary."""
    import torch

    from faithful_vit import engine, metrics, run_folder, viz

    names = _check_models(args)
    seeds = [int(seed) for seed in args.seeds.split(",")] if args.seeds else [args.seed]
    (train_set, val_set, test_set), data = build_datasets(args)
    group_names, num_classes, image_size = data["group_names"], train_set.num_classes, data["image_size"]
    if "oracle" in names and len(test_set) and test_set[0].fg_mask is None:
        raise UsageError(
            f"--model oracle: needs ground-truth masks, which --data {args.data} does not have here "
            "(--mask-dir for waterbirds/cub)"
        )
    dist_info = engine.setup_distributed(args.device)
    if args.resume:  # args.yaml stays as written: it is what produced the results
        run_dir = Path(args.resume)
        finished = {
            (name, seed): run_folder.read_finished(run_dir / name / f"seed{seed}") for seed in seeds for name in names
        }
    else:
        timestamp = engine.broadcast_from_main(time.strftime("%Y%m%d-%H%M%S", time.gmtime()), dist_info)
        run_dir, finished = run_folder.new_run_dir(args.output, args.experiment or timestamp), {}
    engine.barrier(dist_info)  # every rank has checked the folder before rank 0 writes to it
    if dist_info.is_main:
        if args.resume:
            stale = run_folder.remove_stale_temporaries(run_dir)
            if stale:
                print(
                    f"--resume: removed {len(stale)} temporary file(s) a killed run left in {run_dir}", file=sys.stderr
                )
        else:
            run_folder.write_text(run_dir / "args.yaml", args_text)
    cfg = engine.TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        eval_batch_size=args.eval_batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        wd_normalized=args.wd_normalized,
        clip_grad=args.clip_grad or None,
        sched=args.sched,
        sched_unit=args.sched_unit,
        warmup_epochs=args.warmup_epochs,
        min_lr=args.min_lr,
        amp=args.amp,
        channels_last=args.channels_last,
        compile=args.compile,
        num_workers=args.num_workers,
        log_interval=args.log_interval,
        checkpoint_every=args.checkpoint_every,
        progress=not args.no_progress,
        patch_threshold=args.oracle_threshold,
    )
    figure_indices = list(range(min(args.num_figure_samples, len(test_set))))
    results, histories = {name: [] for name in names}, {}
    for seed in seeds:
        for name in names:
            model_dir = run_dir / name / f"seed{seed}"
            if finished.get((name, seed)) is not None:  # finished before a --resume
                test, histories[f"{name}/seed{seed}"] = finished[name, seed]
                results[name].append(test)
                continue
            engine.seed_everything(seed)
            model, spec = build_model(name, args, num_classes, image_size)
            trainer = engine.Trainer(
                model,
                train_set,
                val_set,
                num_groups=len(group_names),
                cfg=engine.TrainConfig(**{**vars(cfg), "seed": seed}),
                run_dir=model_dir,
                dist_info=dist_info,
                name=f"{name}/seed{seed}",
                spec={"model": spec, "data": data},
            )
            start = time.perf_counter()
            histories[f"{name}/seed{seed}"] = trainer.fit(resume=args.resume is not None)
            test = {"model": name, "seed": seed, **trainer.test(test_set), "train_seconds": time.perf_counter() - start}
            results[name].append(test)
            if dist_info.is_main:
                run_folder.write_text(model_dir / "test_metrics.json", json.dumps(test, indent=2))
                samples = engine.predict_samples(trainer.module, test_set, figure_indices, dist_info.device)
                viz.plot_masks(
                    samples["images"],
                    run_dir / "figures" / f"masks_{name}_seed{seed}.png",
                    fg_masks=samples["fg_masks"],
                    keep=samples["keep"],
                    part_maps=samples["part_maps"],
                    patch_size=samples["patch_size"],
                    title=f"{name} (seed {seed}, test images)",
                )
            del trainer, model
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    summary = {
        "data": args.data,
        "split": "test",
        "group_names": group_names,
        "seeds": seeds,
        "selection": "best validation worst-group accuracy (ties: validation accuracy)",
        "models": {name: metrics.summarize_seeds(per_seed) for name, per_seed in results.items()},
    }
    if dist_info.is_main:
        run_folder.write_text(run_dir / "summary.json", json.dumps(summary, indent=2))
        viz.plot_training_curves(histories, run_dir / "figures" / "training_curves.png")
        print(
            f"\n{args.data} test split, {len(seeds)} seed(s), checkpoints chosen on validation worst-group "
            f"accuracy:\n{metrics.format_table(summary['models'])}\nrun folder: {run_dir}"
        )
    engine.cleanup_distributed()
    return summary


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; bad input is one line on stderr and exit code 2, a non-finite loss exit code 1."""
    try:
        args, args_text = _parse_args(argv)
        from faithful_vit.engine import NonFiniteLossError  # after parsing: --help stays fast
        from faithful_vit.kernels import use_backend
        from faithful_vit.run_folder import RunFolderError

        try:
            with use_backend(args.attn_impl) if args.attn_impl else nullcontext(), _usage_error_from(RunFolderError):
                run(args, args_text)
        except NonFiniteLossError as error:
            print(f"train.py: error: {error}", file=sys.stderr)
            return 1
    except UsageError as error:
        print(f"train.py: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    warnings.filterwarnings("ignore", message=".*freeze_stage1_backbone.*")
    sys.exit(main())
