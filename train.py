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
import math
import os
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


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one :class:`UsageError` line (no usage block), like every other bad input."""

    def error(self, message):
        raise UsageError(message)


# Flag value types. Each takes a command-line string or a value read from a YAML file (--config, --resume's
# args.yaml), so both are checked the same way, and is idempotent: argparse re-applies it to string defaults.


def _integer(value, what: str, minimum: int, maximum: int | None = None) -> int:
    number = None
    if isinstance(value, str):
        try:
            number = int(value)
        except ValueError:
            pass
    elif isinstance(value, int) and not isinstance(value, bool):
        number = value
    if number is None or number < minimum or (maximum is not None and number > maximum):
        raise argparse.ArgumentTypeError(f"expected {what}, got {value!r}")
    return number


def _real(value, what: str, accept) -> float:
    number = None
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            pass
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    if number is None or not math.isfinite(number) or not accept(number):
        raise argparse.ArgumentTypeError(f"expected {what}, got {value!r}")
    return number


def positive_int(value) -> int:
    return _integer(value, "a positive integer", 1)


def non_negative_int(value) -> int:
    return _integer(value, "an integer >= 0", 0)


def seed_int(value) -> int:
    return _integer(value, f"an integer in 0..{2**31 - 1}", 0, 2**31 - 1)


def positive_float(value) -> float:
    return _real(value, "a finite number > 0", lambda x: x > 0)


def non_negative_float(value) -> float:
    return _real(value, "a finite number >= 0", lambda x: x >= 0)


def unit_fraction(value) -> float:
    return _real(value, "a number in [0, 1]", lambda x: 0 <= x <= 1)


def threshold_fraction(value) -> float:
    return _real(value, "a number in [0, 1)", lambda x: 0 <= x < 1)


def seed_list(value) -> str:
    """``"0,1,2"`` (or, from YAML, ``2`` or ``[0, 1, 2]``): distinct seeds, kept as the comma-separated string."""
    items = value.split(",") if isinstance(value, str) else value if isinstance(value, list) else [value]
    try:
        seeds = [seed_int(item.strip() if isinstance(item, str) else item) for item in items]
    except argparse.ArgumentTypeError:
        seeds = None
    if not seeds or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"expected distinct comma-separated integers >= 0, e.g. 0,1,2, got {value!r}")
    return ",".join(map(str, seeds))


def _keys_missing_a_space(value):
    """``{embed_dim:32}`` is YAML for the key ``"embed_dim:32"`` with no value, which timm would drop silently."""
    if isinstance(value, dict):
        for key, item in value.items():
            if item is None and isinstance(key, str) and ":" in key:
                yield key
            yield from _keys_missing_a_space(item)
    elif isinstance(value, list):
        for item in value:
            yield from _keys_missing_a_space(item)


def _check_kwargs(kwargs, flag: str) -> dict:
    """A ``--model-kwargs`` / ``--data-kwargs`` mapping (from the command line or a YAML file), checked."""
    if not isinstance(kwargs, dict) or not all(isinstance(key, str) and key for key in kwargs):
        raise UsageError(f"{flag}: expected a mapping of names to values, got {kwargs!r}")
    for key in _keys_missing_a_space(kwargs):
        raise UsageError(
            f"{flag}: YAML reads {key!r} as a key without a value; put a space after the colon: "
            f"{key.replace(':', ': ', 1)!r}"
        )
    return kwargs


class ParseKwargs(argparse.Action):
    """``--model-kwargs a=1 b=[2,3]``: values are parsed as YAML scalars, lists or mappings."""

    def __call__(self, parser, namespace, values, option_string=None):
        kwargs = {}
        for item in values:
            key, sep, value = item.partition("=")
            if not sep or not key:
                parser.error(f"argument {option_string}: expected key=value, got {item!r}")
            try:
                kwargs[key] = yaml.safe_load(value)
            except yaml.YAMLError as error:
                parser.error(f"argument {option_string}: {item!r} is not valid YAML ({_yaml_problem(error)})")
        setattr(namespace, self.dest, _check_kwargs(kwargs, f"argument {option_string}"))


def _yaml_problem(error: yaml.YAMLError) -> str:
    """A YAML error in one line: what is wrong and where."""
    mark = getattr(error, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{getattr(error, 'problem', None) or type(error).__name__}{where}"


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
        "--img-size",
        type=positive_int,
        default=None,
        help="image side for folder datasets (default: the two-stage preset's)",
    )
    group.add_argument(
        "--num-workers", type=non_negative_int, default=0, help="DataLoader worker processes (default: %(default)s)"
    )
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
        type=threshold_fraction,
        default=0.5,
        help="the oracle keeps a patch when its ground-truth foreground fraction exceeds this (default: %(default)s)",
    )
    group.add_argument(
        "--pretrained-file",
        default=None,
        help="local ViT weights (.safetensors/.pth) for the two-stage backbones; nothing is ever downloaded",
    )
    group = parser.add_argument_group("Optimizer")
    group.add_argument(
        "--batch-size", type=positive_int, default=64, help="batch size per process (default: %(default)s)"
    )
    group.add_argument(
        "--eval-batch-size", type=positive_int, default=256, help="evaluation batch size (default: %(default)s)"
    )
    group.add_argument(
        "--lr",
        type=positive_float,
        default=1e-3,
        help="base learning rate of AdamW; the two-stage model "
        "scales it per parameter group (paper section 7.1) (default: %(default)s)",
    )
    group.add_argument(
        "--weight-decay", type=non_negative_float, default=0.05, help="AdamW weight decay (default: %(default)s)"
    )
    group.add_argument(
        "--wd-normalized",
        action="store_true",
        help="normalised weight decay (paper section 7.2): weight-decay * sqrt(1 / total steps)",
    )
    group.add_argument(
        "--clip-grad",
        type=non_negative_float,
        default=2.0,
        help="global gradient-norm clip; 0 disables (default: %(default)s)",
    )
    group = parser.add_argument_group("Schedule")
    group.add_argument("--epochs", type=positive_int, default=10, help="training epochs (default: %(default)s)")
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
        type=non_negative_float,
        default=1.0,
        help="linear LR warm-up; the paper fine-tunes a "
        "pretrained backbone without one (0), training from scratch needs it (default: %(default)s)",
    )
    group.add_argument(
        "--min-lr", type=non_negative_float, default=0.0, help="LR at the end of the cosine (default: %(default)s)"
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
        type=non_negative_int,
        default=100,
        help="also checkpoint every N steps; 0: only at epoch ends (default: %(default)s)",
    )
    group = parser.add_argument_group("Misc")
    group.add_argument("--seed", type=seed_int, default=0, help="random seed (default: %(default)s)")
    group.add_argument(
        "--seeds",
        type=seed_list,
        default=None,
        help="comma-separated seeds, e.g. 0,1,2; overrides --seed and reports mean and std over seeds",
    )
    group.add_argument(
        "--log-interval",
        type=positive_int,
        default=20,
        help="steps between loss read-outs (the only host synchronisations in training) (default: %(default)s)",
    )
    group.add_argument("--no-progress", action="store_true", help="no progress bars (they are off without a TTY)")
    group.add_argument(
        "--max-corrupt-fraction",
        type=unit_fraction,
        default=0.01,
        help="stop (exit 2) when more than this fraction of a split's images cannot be decoded; fewer are "
        "skipped and counted (default: %(default)s)",
    )
    group.add_argument(
        "--num-figure-samples",
        type=non_negative_int,
        default=6,
        help="images in the mask figures (default: %(default)s)",
    )
    return parser


def _parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, str]:
    """Parse twice: ``--resume``'s ``args.yaml`` and ``-c/--config`` set defaults, then the command line wins.

    Every value from a file is checked as its flag would be. On ``--resume``, only flags in
    :data:`faithful_vit.run_folder.RESUME_SAFE_FLAGS` may differ from ``args.yaml``.
    """
    pre = _Parser(add_help=False)
    pre.add_argument("-c", "--config", default=None)
    pre.add_argument("--resume", default=None)
    known, _ = pre.parse_known_args(argv)
    parser = _build_parser()
    parser.add_argument("-c", "--config", default=None, help="YAML file of flag values (keys: flag names)")
    actions = {action.dest: action for action in parser._actions if action.dest != "help"}
    stored = None
    if known.resume:
        from faithful_vit import run_folder  # only on --resume: --help stays fast

        with _usage_error_from(run_folder.RunFolderError):
            stored = run_folder.read_run_args(Path(known.resume), set(actions) - {"config", "resume"})
        where = f"--resume {Path(known.resume) / 'args.yaml'}"
        stored = {key: _config_value(actions[key], value, f"{where}: {key}") for key, value in stored.items()}
        parser.set_defaults(**stored)
    if known.config:
        path = Path(known.config)
        if not path.is_file():
            raise UsageError(f"--config: no such file: {path}")
        parser.set_defaults(**_read_config(path, "--config", actions))
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


def _read_config(path: Path, flag: str, actions: dict) -> dict:
    """Flag values from a YAML file, each checked as its command-line flag would be."""
    try:
        config = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise UsageError(f"{flag} {path}: not valid YAML: {_yaml_problem(error)}") from None
    except (OSError, UnicodeDecodeError) as error:
        raise UsageError(f"{flag} {path}: cannot read it: {error}") from None
    if not isinstance(config, dict) or not all(isinstance(key, str) for key in config):
        raise UsageError(f"{flag} {path}: expected a YAML mapping of flag names to values")
    config = {key.replace("-", "_"): value for key, value in config.items() if key not in ("config", "resume")}
    unknown = sorted(set(config) - set(actions))
    if unknown:
        raise UsageError(f"{flag} {path}: unknown keys {unknown}")
    return {key: _config_value(actions[key], value, f"{flag} {path}: {key}") for key, value in config.items()}


def _config_value(action: argparse.Action, value, where: str):
    if value is None and action.default is None:
        return None
    if isinstance(action, ParseKwargs):
        return _check_kwargs(value, where)
    if action.type is not None:
        try:
            value = action.type(value)
        except argparse.ArgumentTypeError as error:
            raise UsageError(f"{where}: {error}") from None
    elif action.nargs == 0 and not isinstance(value, bool):  # store_true and --amp/--no-amp
        raise UsageError(f"{where}: expected true or false, got {value!r}")
    elif action.nargs != 0 and not isinstance(value, str):
        raise UsageError(f"{where}: expected a string, got {value!r}")
    if action.choices is not None and value not in action.choices:
        raise UsageError(f"{where}: expected one of {list(action.choices)}, got {value!r}")
    return value


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


FOLDER_DATASETS = ("waterbirds", "cub", "metashift", "imagefolder")


def _check_args(args) -> list[str]:
    """Checks across flags, before anything is built or written; returns the model names of ``--model``."""
    import faithful_vit

    names = [name.strip() for name in args.model.split(",") if name.strip()]
    presets = faithful_vit.list_models()
    unknown = [name for name in names if name not in presets and name not in COMPARISON_MODELS]
    if not names or unknown:
        raise UsageError(
            f"--model: unknown model {unknown or args.model!r}; expected a comma list of "
            f"{presets + list(COMPARISON_MODELS)}"
        )
    if len(set(names)) != len(names):
        raise UsageError(f"--model: expected each model once, got {args.model!r}")
    if args.reference_model is None:
        args.reference_model = next((name for name in names if name in presets), "faithful_tiny")
    if args.reference_model not in presets:
        raise UsageError(f"--reference-model: unknown preset {args.reference_model!r}; expected one of {presets}")
    if args.pretrained_file is not None:
        if not any(name in presets for name in names):
            raise UsageError(f"--pretrained-file: only two-stage presets load it, --model has none: {args.model!r}")
        if not Path(args.pretrained_file).is_file():
            raise UsageError(f"--pretrained-file: no such file: {args.pretrained_file}")
    if args.min_lr > args.lr:
        raise UsageError(f"--min-lr: expected at most --lr ({args.lr}), got {args.min_lr}")
    folder = args.data in FOLDER_DATASETS
    if folder and (args.data_dir is None or not Path(args.data_dir).is_dir()):
        raise UsageError(f"--data-dir: dataset folder not found: {args.data_dir}")
    for flag, given, used in (
        ("--data-dir", args.data_dir is not None, folder),
        ("--img-size", args.img_size is not None, folder),
        ("--mask-dir", args.mask_dir is not None, args.data in ("waterbirds", "cub")),
        ("--data-kwargs", bool(args.data_kwargs), not folder),
    ):
        if given and not used:
            raise UsageError(f"{flag}: not used by --data {args.data}")
    if args.mask_dir is not None and not Path(args.mask_dir).is_dir():
        raise UsageError(f"--mask-dir: expected a folder, got {args.mask_dir}")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UsageError("--device: expected a device this machine has, got 'cuda' but CUDA is not available")
    return names


def _check_datasets_and_models(args, names: list[str], splits: list, image_size: int) -> None:
    """Checks after the datasets loaded, before the run folder is written: the oracle has masks, no split is empty,
    the batch fits the training split, and every model builds with these flags (on the meta device: no memory, no
    weights)."""
    import torch

    if "oracle" in names and args.data in FOLDER_DATASETS and args.mask_dir is None:
        raise UsageError(
            f"--model oracle: needs ground-truth masks, which --data {args.data} does not have here "
            "(--mask-dir for waterbirds/cub)"
        )

    for split, dataset in zip(("train", "val", "test"), splits):
        if len(dataset) == 0:  # an empty validation split cannot select a checkpoint
            raise UsageError(f"--data {args.data}: the {split} split is empty")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))  # torchrun's, as distributed.setup_distributed reads it
    per_process = len(splits[0]) // world_size
    if args.batch_size > per_process:
        processes = f" per process ({world_size} processes)" if world_size > 1 else ""
        raise UsageError(
            f"--batch-size: expected at most {per_process}, the training images{processes} of --data {args.data} "
            f"(every step takes a full batch), got {args.batch_size}"
        )
    no_weights = argparse.Namespace(**{**vars(args), "pretrained_file": None})
    with torch.device("meta"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*freeze_stage1_backbone.*")  # the real build warns if it applies
        for name in names:
            build_model(name, no_weights, splits[0].num_classes, image_size)


def run(args, args_text: str) -> dict:
    """Train, select on validation and test every (model, seed); write the run folder; return the summary."""
    import torch

    from faithful_vit import distributed, engine, metrics, run_folder, viz

    names = _check_args(args)
    seeds = [int(seed) for seed in args.seeds.split(",")] if args.seeds else [args.seed]
    (train_set, val_set, test_set), data = build_datasets(args)
    group_names, num_classes, image_size = data["group_names"], train_set.num_classes, data["image_size"]
    _check_datasets_and_models(args, names, [train_set, val_set, test_set], image_size)
    dist_info = distributed.setup_distributed(args.device)
    if args.resume:  # args.yaml stays as written: it is what produced the results
        run_dir = Path(args.resume)
        finished = {
            (name, seed): run_folder.read_finished(run_dir / name / f"seed{seed}") for seed in seeds for name in names
        }
    else:
        timestamp = distributed.broadcast_from_main(time.strftime("%Y%m%d-%H%M%S", time.gmtime()), dist_info)
        run_dir, finished = run_folder.new_run_dir(args.output, args.experiment or timestamp), {}
    distributed.barrier(dist_info)  # every rank has checked the folder before rank 0 writes to it
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
        max_corrupt_fraction=args.max_corrupt_fraction,
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
            run_folder.seed_everything(seed)
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
    distributed.cleanup_distributed()
    return summary


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; bad input is one line on stderr and exit code 2, a non-finite loss exit code 1."""
    try:
        args, args_text = _parse_args(argv)
        from faithful_vit.data import DatasetError  # after parsing: --help stays fast
        from faithful_vit.engine import NonFiniteLossError
        from faithful_vit.kernels import use_backend
        from faithful_vit.run_folder import RunFolderError

        try:
            with use_backend(args.attn_impl) if args.attn_impl else nullcontext(), _usage_error_from(RunFolderError):
                run(args, args_text)
        except NonFiniteLossError as error:
            print(f"train.py: error: {error}", file=sys.stderr)
            return 1
        except DatasetError as error:  # found during training: too many undecodable images
            print(f"train.py: error: {error}", file=sys.stderr)
            return 2
    except UsageError as error:
        print(f"train.py: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    warnings.filterwarnings("ignore", message=".*freeze_stage1_backbone.*")
    sys.exit(main())
