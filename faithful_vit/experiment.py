"""A training experiment of ``train.py``: per model and seed, train, select on validation, test; the run folder.

:func:`run` takes the parsed flags of ``train.py`` (an ``argparse.Namespace``) and returns the summary it writes to
``summary.json``. :func:`check_args` and :func:`check_datasets_and_models` are its checks across flags, before
anything is built or written; each raises :class:`faithful_vit.cli.UsageError`.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import sys
import time
import warnings
from pathlib import Path

import torch

import faithful_vit
from faithful_vit import distributed, engine, metrics, run_folder, viz
from faithful_vit.cli import UsageError, usage_error_from
from faithful_vit.data import dataset_info, list_datasets
from faithful_vit.model_spec import COMPARISON_MODELS, SpecError, build_dataset, data_spec, describe_data, model_spec
from faithful_vit.model_spec import build_model as build_from_spec

__all__ = ["build_datasets", "build_model", "check_args", "check_datasets_and_models", "run"]


def build_datasets(args) -> tuple[list, dict]:
    """The train/val/test datasets and their data spec; a missing or malformed dataset is a :class:`UsageError`."""
    with usage_error_from(SpecError):
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


def check_args(args) -> list[str]:
    """Checks across flags, before anything is built or written; returns the model names of ``--model``."""
    if args.data not in list_datasets():
        raise UsageError(f"--data: expected one of {list_datasets()}, got {args.data!r}")
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
    if args.pretrained_file is not None and not Path(args.pretrained_file).is_file():
        raise UsageError(f"--pretrained-file: no such file: {args.pretrained_file}")
    if args.min_lr > args.lr:
        raise UsageError(f"--min-lr: expected at most --lr ({args.lr}), got {args.min_lr}")
    data = dataset_info(args.data)
    if data.needs_root and (args.data_dir is None or not Path(args.data_dir).is_dir()):
        raise UsageError(f"--data-dir: dataset folder not found: {args.data_dir}")
    for flag, given, used in (
        ("--data-dir", args.data_dir is not None, data.needs_root),
        ("--img-size", args.img_size is not None, data.sized_by_model),
        ("--mask-dir", args.mask_dir is not None, data.accepts_mask_root),
        ("--data-kwargs", bool(args.data_kwargs), data.settings is not None),
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


def check_datasets_and_models(args, names: list[str], splits: list, image_size: int) -> None:
    """Checks after the datasets loaded, before the run folder is written: the oracle has masks, no split is empty,
    the batch fits the training split, and every model builds with these flags (on the meta device: no memory, no
    weights)."""
    if "oracle" in names and not dataset_info(args.data).has_masks and args.mask_dir is None:
        with_mask_dir = "/".join(name for name in list_datasets() if dataset_info(name).accepts_mask_root)
        raise UsageError(
            f"--model oracle: needs ground-truth masks, which --data {args.data} does not have here "
            f"(--mask-dir for {with_mask_dir})"
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
        built = {name: build_model(name, no_weights, splits[0].num_classes, image_size)[0] for name in names}
    if args.pretrained_file is not None:  # it loads safely and fits, checked on the meta models: no memory for weights
        for name, model in built.items():
            try:
                with warnings.catch_warnings():  # loading into meta parameters is a no-op by design here
                    warnings.filterwarnings("ignore", message=".*copying from a non-meta parameter.*")
                    model.load_backbone_weights(args.pretrained_file)
            except (OSError, RuntimeError, ValueError, pickle.UnpicklingError) as error:
                reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
                raise UsageError(
                    f"--pretrained-file: cannot load {args.pretrained_file} into {name}: {reason}"
                ) from None


def run(args, args_text: str) -> dict:
    """Train, select on validation and test every (model, seed); write the run folder; return the summary."""
    names = check_args(args)
    seeds = [int(seed) for seed in args.seeds.split(",")] if args.seeds else [args.seed]
    (train_set, val_set, test_set), data = build_datasets(args)
    group_names, num_classes, image_size = data["group_names"], train_set.num_classes, data["image_size"]
    check_datasets_and_models(args, names, [train_set, val_set, test_set], image_size)
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
                    rollout=samples["rollout"],
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
