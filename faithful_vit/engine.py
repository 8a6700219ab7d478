"""Training engine: the train/eval loop, exact resume, checkpoint selection and per-epoch metrics.

Its pieces live where they belong: data order, per-sample seeds and batching in :mod:`faithful_vit.data.loading`;
checkpoints, RNG states and the run folder in :mod:`faithful_vit.run_folder`; DDP in :mod:`faithful_vit.distributed`;
the loss terms in :mod:`faithful_vit.losses`; what a model must provide in :mod:`faithful_vit.model_protocol`.

Design points:

* **No host synchronisation in the step.** Losses are summed on device; ``.item()`` happens only every
  ``log_interval`` steps, at checkpoints and at epoch ends.
* **Exact resume.** The data order is a pure function of ``(seed, epoch)``
  (:class:`~faithful_vit.data.loading.EpochSampler`), every sample's augmentation randomness is a pure function of
  ``(seed, epoch, index)`` (:class:`~faithful_vit.data.loading.SeededSamples`), and a checkpoint
  holds the model, optimizer, scheduler, epoch, position inside the epoch, running loss sums, the history and every
  rank's RNG states. ``--resume`` therefore replays the same steps as an uninterrupted run.
* **Safe.** Every file is written atomically (:func:`~faithful_vit.run_folder.atomic_open`); checkpoints hold only
  tensors and plain data and are loaded with ``weights_only=True``, so a crafted file cannot run code; a non-finite
  loss raises :class:`NonFiniteLossError` before anything is saved, so the last checkpoint on disk is the last good
  one; a sample whose image cannot be decoded is skipped with a warning and counted, and more than
  ``max_corrupt_fraction`` of a split skipped in one pass stops the run (:class:`~faithful_vit.data.DatasetError`).
* **Validation picks the checkpoint** (``best.pt``, by validation worst-group accuracy, ties broken by accuracy);
  the test split is only evaluated once, on that checkpoint.
* **DDP** through torchrun: :func:`~faithful_vit.distributed.setup_distributed` reads the torchrun environment (gloo
  on CPU, NCCL on CUDA); only rank 0 writes files.
"""

from __future__ import annotations

import csv
import json
import math
import resource
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import Dataset
from tqdm import tqdm

from faithful_vit import losses, viz
from faithful_vit.data.datasets import DatasetError
from faithful_vit.data.loading import EpochSampler, SeededSamples, make_loader
from faithful_vit.data.sample import Batch, collate
from faithful_vit.distributed import DistInfo, unwrap
from faithful_vit.metrics import MetricAccumulator
from faithful_vit.model_protocol import ModelOutput, TrainableModel
from faithful_vit.run_folder import (
    atomic_open,
    load_checkpoint,
    rng_states,
    save_checkpoint,
    seed_everything,
    set_rng_states,
    write_text,
)


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the run stopped without overwriting the last good checkpoint."""


# ----------------------------------------------------------------------------------------------------------------
# Models: the two-stage model, the baseline and the oracle behind one contract (faithful_vit.model_protocol)


def model_forward(model: nn.Module, images: torch.Tensor, fg_mask: torch.Tensor | None) -> ModelOutput:
    """``model(images)``, or ``model(images, fg_mask)`` for a model that uses the ground-truth mask (the oracle)."""
    if unwrap(model).uses_ground_truth_mask:
        return model(images, fg_mask)
    return model(images)


def patch_size_of(model: nn.Module) -> int:
    """Patch side in pixels of a :class:`~faithful_vit.model_protocol.TrainableModel` (under any wrapper)."""
    patch_size = unwrap(model).patch_size
    return patch_size if isinstance(patch_size, int) else int(patch_size[0])


def check_trainable(model: nn.Module) -> None:
    """Raise a TypeError naming what ``model`` lacks of :class:`~faithful_vit.model_protocol.TrainableModel`."""
    module = unwrap(model)
    if not isinstance(module, TrainableModel):
        members = (
            "uses_ground_truth_mask",
            "patch_size",
            "loss_weights",
            "area_target",
            "has_frozen_phase",
            "set_epoch",
            "param_groups",
        )
        missing = [name for name in members if not hasattr(module, name)]
        raise TypeError(
            f"model: expected a TrainableModel (faithful_vit.model_protocol), {type(module).__name__} lacks {missing}"
        )


# ----------------------------------------------------------------------------------------------------------------
# Training


@dataclass
class TrainConfig:
    """Hyper-parameters of one training run (see ``train.py --help`` for each)."""

    epochs: int = 10
    batch_size: int = 16
    eval_batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.05
    wd_normalized: bool = False
    clip_grad: float | None = 2.0
    sched: str = "cosine"
    sched_unit: str = "step"
    warmup_epochs: float = 1.0
    min_lr: float = 0.0
    amp: bool = True
    channels_last: bool = False
    compile: bool = False
    num_workers: int = 0
    seed: int = 0
    log_interval: int = 20
    checkpoint_every: int = 200
    progress: bool = True
    patch_threshold: float = 0.5
    max_corrupt_fraction: float = 0.01


def check_corrupt_fraction(skipped: int, total: int, split: str, max_fraction: float) -> None:
    """Raise :class:`~faithful_vit.data.DatasetError` when more than ``max_fraction`` of a split's images were
    skipped as undecodable in one pass: a run on what is left would silently measure a different dataset."""
    if skipped > max_fraction * total:
        raise DatasetError(
            f"{split} split: {skipped} of {total} images could not be decoded (more than {max_fraction * 100:g}%; "
            "--max-corrupt-fraction); fix or remove them"
        )


def lr_factor(step: float, total: float, warmup: float, min_ratio: float, sched: str) -> float:
    """LR multiplier at ``step`` of ``total``: linear warm-up, then cosine to ``min_ratio`` (or constant)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if sched == "constant":
        return 1.0
    progress = min(max(step - warmup, 0) / max(total - warmup, 1), 1.0)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    # CPU: the peak resident set of this process so far (Linux reports kilobytes).
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _autocast(cfg: TrainConfig, device: torch.device):
    if cfg.amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def _to_device(batch: Batch, device: torch.device, channels_last: bool) -> Batch:
    images = batch.images.to(device, non_blocking=True)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    fg_masks = None if batch.fg_masks is None else batch.fg_masks.to(device, non_blocking=True)
    labels, groups = batch.labels.to(device, non_blocking=True), batch.groups.to(device, non_blocking=True)
    return Batch(images, labels, groups, fg_masks, batch.num_skipped)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: Dataset,
    *,
    num_groups: int,
    cfg: TrainConfig,
    dist_info: DistInfo,
    desc: str = "eval",
    observe: Callable[..., None] | None = None,
) -> dict:
    """Accuracy, group accuracies and mask metrics of ``model`` on ``dataset`` (sharded over ranks, all-reduced).

    ``observe(images, labels, groups, fg_mask, out)``, when given, sees every batch and the model's output (under
    the same autocast), for metrics beyond these (:mod:`faithful_vit.evaluate`).

    Returns:
        :meth:`MetricAccumulator.compute`'s dict plus ``images_per_second`` (inference, data loading included),
        ``skipped_corrupt`` and ``num_images``.
    """
    module = unwrap(model)
    # Evaluation runs no DDP forward (ranks see uneven shards), but keeps torch.compile when it was asked for.
    runner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    was_training = module.training
    module.eval()
    sampler = EpochSampler(len(dataset), shuffle=False, rank=dist_info.rank, world_size=dist_info.world_size)
    loader = make_loader(
        SeededSamples(dataset, cfg.seed),
        sampler,
        cfg.eval_batch_size,
        cfg.num_workers,
        drop_last=False,
        device=dist_info.device,
    )
    accumulator = MetricAccumulator(num_groups, dist_info.device, cfg.patch_threshold)
    patch_size = patch_size_of(module)
    skipped = torch.zeros((), dtype=torch.float64, device=dist_info.device)
    if dist_info.device.type == "cuda":
        torch.cuda.synchronize(dist_info.device)
    start = time.perf_counter()
    for batch in tqdm(loader, desc=desc, leave=False, disable=not _show_progress(cfg, dist_info)):
        skipped += batch.num_skipped
        if batch.labels.numel() == 0:  # every sample of the batch was corrupt
            continue
        images, labels, groups, fg_mask, _ = _to_device(batch, dist_info.device, cfg.channels_last)
        with _autocast(cfg, dist_info.device):
            out = model_forward(runner, images, fg_mask)
            if observe is not None:
                observe(images, labels, groups, fg_mask, out)
        accumulator.update(out.logits.float(), labels, groups, out.keep, fg_mask, patch_size)
    accumulator.all_reduce()
    if dist_info.distributed:
        dist.all_reduce(skipped)
    if dist_info.device.type == "cuda":
        torch.cuda.synchronize(dist_info.device)
    elapsed = time.perf_counter() - start
    check_corrupt_fraction(int(skipped.item()), len(dataset), desc, cfg.max_corrupt_fraction)
    metrics = accumulator.compute()
    num_images = int(accumulator.count.sum().item())
    metrics.update(
        images_per_second=num_images / max(elapsed, 1e-9), num_images=num_images, skipped_corrupt=int(skipped.item())
    )
    module.train(was_training)
    return metrics


def _show_progress(cfg: TrainConfig, dist_info: DistInfo) -> bool:
    return cfg.progress and dist_info.is_main and sys.stderr.isatty()


def _selection_key(metrics: dict) -> tuple[float, float]:
    """Checkpoint selection on validation: worst-group accuracy, ties broken by accuracy."""
    return (metrics["worst_group_accuracy"], metrics["accuracy"])


class Trainer:
    """Trains one model, selects its checkpoint on validation and evaluates it on the test split.

    Files (rank 0 only) under ``run_dir``: ``checkpoints/last.pt`` (full training state), ``checkpoints/best.pt``
    (weights and validation metrics of the best epoch), ``metrics.jsonl`` and ``metrics.csv`` (one row per epoch).

    Args:
        model: a :class:`~faithful_vit.model_protocol.TrainableModel` (the two-stage model,
            :class:`~faithful_vit.baseline.FullImageViT` or :class:`~faithful_vit.baseline.OracleMaskViT`); its
            losses are :func:`faithful_vit.losses.training_losses`.
        train_set, val_set: datasets of ``(image, label[, group[, fg_mask]])``.
        num_groups: number of groups for worst-group accuracy.
        cfg: hyper-parameters.
        run_dir: output folder of this model.
        dist_info: from :func:`setup_distributed`.
        name: how log lines name this run (default: the folder name).
        spec: what rebuilds the model and its data (:mod:`faithful_vit.model_spec`), stored in every checkpoint.
    """

    def __init__(
        self,
        model: nn.Module,
        train_set: Dataset,
        val_set: Dataset,
        *,
        num_groups: int,
        cfg: TrainConfig,
        run_dir: Path,
        dist_info: DistInfo | None = None,
        name: str | None = None,
        spec: dict | None = None,
    ):
        self.cfg, self.run_dir, self.num_groups = cfg, Path(run_dir), num_groups
        self.spec = spec
        self.name = name or self.run_dir.name
        self.dist = dist_info or DistInfo()
        self.val_set = val_set
        check_trainable(model)
        self.module = model.to(self.dist.device)
        if cfg.channels_last:
            self.module = self.module.to(memory_format=torch.channels_last)
        self.train_samples = SeededSamples(train_set, cfg.seed)
        self.sampler = EpochSampler(
            len(train_set),
            shuffle=True,
            seed=cfg.seed,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
            drop_last=True,
        )
        self.steps_per_epoch = len(self.sampler) // cfg.batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"--batch-size: expected at most {len(self.sampler)} (training samples per process), "
                f"got {cfg.batch_size}"
            )
        total_steps = self.steps_per_epoch * cfg.epochs
        weight_decay = cfg.weight_decay * math.sqrt(1 / total_steps) if cfg.wd_normalized else cfg.weight_decay
        self.optimizer = torch.optim.AdamW(
            self.module.param_groups(cfg.lr, weight_decay),
            lr=cfg.lr,
            betas=(0.9, 0.999),
            fused=self.dist.device.type == "cuda",
        )
        per_step = cfg.sched_unit == "step"
        total = total_steps if per_step else cfg.epochs
        warmup = cfg.warmup_epochs * (self.steps_per_epoch if per_step else 1)
        min_ratio = cfg.min_lr / cfg.lr if cfg.lr > 0 else 0.0
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda t: lr_factor(t, total, warmup, min_ratio, cfg.sched)
        )
        self.model: nn.Module = self.module
        if cfg.compile:
            self.model = torch.compile(self.model)
        if self.dist.distributed:
            device_ids = [self.dist.device.index] if self.dist.device.type == "cuda" else None
            self.model = nn.parallel.DistributedDataParallel(
                self.model,
                device_ids=device_ids,
                find_unused_parameters=self.module.has_frozen_phase,
            )
        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        self.checkpoint_step: int | None = None  # global step of the newest last.pt, None before the first
        self.best_key: tuple[float, float] | None = None
        self.history: list[dict] = []
        self.loss_sums: dict[str, torch.Tensor] = {}
        self.loss_steps = 0
        self.skipped = torch.zeros((), dtype=torch.float64, device=self.dist.device)
        self.train_time = 0.0

    # -- checkpoints -------------------------------------------------------------------------------------------

    @property
    def last_path(self) -> Path:
        return self.run_dir / "checkpoints" / "last.pt"

    @property
    def best_path(self) -> Path:
        return self.run_dir / "checkpoints" / "best.pt"

    def state_dict(self) -> dict:
        rng = [rng_states()]
        if self.dist.distributed:
            rng = [None] * self.dist.world_size
            dist.all_gather_object(rng, rng_states())
        return {
            "model": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step,
            "best_key": self.best_key,
            "history": self.history,
            "loss_sums": {k: v.cpu() for k, v in self.loss_sums.items()},
            "loss_steps": self.loss_steps,
            "skipped": self.skipped.cpu(),
            "train_time": self.train_time,
            "rng": rng,
            "world_size": self.dist.world_size,
            "config": asdict(self.cfg),
            "spec": self.spec,
        }

    def load_state_dict(self, state: dict) -> None:
        if state["world_size"] != self.dist.world_size:
            raise ValueError(
                f"--resume: the checkpoint was written by {state['world_size']} process(es), "
                f"this run has {self.dist.world_size}; exact resume needs the same number"
            )
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.epoch, self.step_in_epoch = state["epoch"], state["step_in_epoch"]
        self.global_step, self.best_key, self.history = state["global_step"], state["best_key"], state["history"]
        self.checkpoint_step = self.global_step
        self.loss_sums = {k: v.to(self.dist.device) for k, v in state["loss_sums"].items()}
        self.loss_steps, self.train_time = state["loss_steps"], state["train_time"]
        self.skipped = state["skipped"].to(self.dist.device)
        set_rng_states(state["rng"][self.dist.rank])

    def _check_finite(self) -> None:
        """Raise :class:`NonFiniteLossError` if any loss summed since the epoch start is NaN or infinite (syncs)."""
        for name, value in self.loss_sums.items():
            if not math.isfinite(value.item()):
                kept = (
                    f"the last good checkpoint (step {self.checkpoint_step}) is kept: {self.last_path}"
                    if self.checkpoint_step is not None
                    else f"no checkpoint was written before it, so there is nothing to resume from in {self.run_dir}"
                )
                raise NonFiniteLossError(
                    f"non-finite training loss ({name} = {value.item()}) in epoch {self.epoch + 1}, before step "
                    f"{self.global_step}; stopped; {kept}"
                )

    def _save_last(self) -> None:
        self._check_finite()
        state = self.state_dict()  # every rank: the RNG gather is collective
        if self.dist.is_main:
            save_checkpoint(self.last_path, state)
        self.checkpoint_step = self.global_step

    # -- loop --------------------------------------------------------------------------------------------------

    def fit(self, resume: bool = False) -> list[dict]:
        """Train for ``cfg.epochs`` epochs (continuing from ``last.pt`` when ``resume``), validating every epoch.

        Returns:
            The per-epoch history (train losses, validation metrics, learning rate, throughput).
        """
        if resume and self.last_path.exists():
            self.load_state_dict(load_checkpoint(self.last_path))
            if self.dist.is_main and self.history:  # a kill between last.pt and the metrics files leaves them behind
                self._write_history()
        else:
            seed_everything(self.cfg.seed, self.dist.rank)
        if self.dist.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.dist.device)
        while self.epoch < self.cfg.epochs:
            self._train_epoch()
            self._end_epoch()
        return self.history

    def _train_epoch(self) -> None:
        cfg, device = self.cfg, self.dist.device
        self.module.train()
        self.module.set_epoch(self.epoch)
        self.sampler.set_epoch(self.epoch, start=self.step_in_epoch * cfg.batch_size)
        self.train_samples.set_epoch(self.epoch)
        loader = make_loader(
            self.train_samples, self.sampler, cfg.batch_size, cfg.num_workers, drop_last=True, device=device
        )
        bar = tqdm(
            loader,
            total=self.steps_per_epoch,
            initial=self.step_in_epoch,
            desc=f"epoch {self.epoch + 1}/{cfg.epochs}",
            leave=False,
            disable=not _show_progress(cfg, self.dist),
        )
        start = time.perf_counter()
        for batch in bar:
            self.skipped += batch.num_skipped
            if batch.labels.numel():  # else every sample of the batch was corrupt
                images, labels, groups, fg_mask, _ = _to_device(batch, device, cfg.channels_last)
                self._train_step(images, labels, groups, fg_mask)
            self.step_in_epoch += 1
            self.global_step += 1
            if cfg.sched_unit == "step":
                self.scheduler.step()
            if self.global_step % cfg.log_interval == 0:
                self._check_finite()
                bar.set_postfix(loss=f"{self.loss_sums['total'].item() / max(self.loss_steps, 1):.4f}")
            if cfg.checkpoint_every and self.global_step % cfg.checkpoint_every == 0:
                self.train_time += time.perf_counter() - start
                self._save_last()
                start = time.perf_counter()
            self.after_step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        self.train_time += time.perf_counter() - start

    def after_step(self) -> None:
        """Hook called after every optimizer step (tests use it to interrupt a run)."""

    def _train_step(
        self, images: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor, fg_mask: torch.Tensor | None
    ) -> None:
        with _autocast(self.cfg, self.dist.device):
            out = model_forward(self.model, images, fg_mask)
            terms = losses.training_losses(self.module, out, images, labels)
        self.optimizer.zero_grad(set_to_none=True)
        terms["total"].backward()
        if self.cfg.clip_grad:
            nn.utils.clip_grad_norm_(self.module.parameters(), self.cfg.clip_grad, foreach=True)
        self.optimizer.step()
        for name, value in terms.items():
            value = value.detach().float()
            self.loss_sums[name] = self.loss_sums[name] + value if name in self.loss_sums else value
        self.loss_steps += 1

    def _end_epoch(self) -> None:
        cfg = self.cfg
        lr = self.optimizer.param_groups[0]["lr"]  # the base group's LR during this epoch
        if cfg.sched_unit == "epoch":
            self.scheduler.step()
        sums = torch.stack(list(self.loss_sums.values())) if self.loss_sums else torch.zeros(0)
        steps = torch.tensor(float(self.loss_steps), device=self.dist.device)
        if self.dist.distributed:
            dist.all_reduce(sums)
            dist.all_reduce(steps)
        self._check_finite()
        train_losses = {f"train_{k}": v for k, v in zip(self.loss_sums, (sums / steps.clamp(min=1)).tolist())}
        skipped = self.skipped.clone()
        if self.dist.distributed:
            dist.all_reduce(skipped)
        skipped_before = self.history[-1]["skipped_corrupt_train"] if self.history else 0
        check_corrupt_fraction(
            int(skipped.item()) - skipped_before, len(self.train_samples), "train", cfg.max_corrupt_fraction
        )
        val = evaluate(self.model, self.val_set, num_groups=self.num_groups, cfg=cfg, dist_info=self.dist, desc="val")
        images_seen = self.steps_per_epoch * cfg.batch_size * self.dist.world_size * (self.epoch + 1)
        row = {
            "epoch": self.epoch + 1,
            "step": self.global_step,
            "lr": lr,
            **train_losses,
            **{f"val_{k}": v for k, v in val.items() if k not in ("num_images",)},
            "train_images_per_second": images_seen / max(self.train_time, 1e-9),
            "skipped_corrupt_train": int(skipped.item()),
            "peak_memory_mb": _peak_memory_mb(self.dist.device),
        }
        self.history.append(row)
        improved = self.best_key is None or _selection_key(val) > self.best_key
        if improved:
            self.best_key = _selection_key(val)
        self.epoch += 1
        self.step_in_epoch, self.loss_sums, self.loss_steps = 0, {}, 0
        # best.pt before last.pt: a kill between the two must not leave last.pt pointing at a best.pt never written.
        if improved and self.dist.is_main:
            best = {"model": self.module.state_dict(), "epoch": self.epoch, "val": val, "config": asdict(cfg)}
            save_checkpoint(self.best_path, {**best, "spec": self.spec})
        self._save_last()
        if self.dist.is_main:
            self._write_history()
            tqdm.write(
                f"[{self.name}] epoch {self.epoch}/{cfg.epochs} loss {row.get('train_total', 0):.4f} "
                f"val acc {val['accuracy']:.3f} wga {val['worst_group_accuracy']:.3f}"
                f"{' *' if improved else ''}",
                file=sys.stderr,
            )

    def _write_history(self) -> None:
        write_text(self.run_dir / "metrics.jsonl", "".join(json.dumps(row) + "\n" for row in self.history))
        columns = list(dict.fromkeys(k for row in self.history for k in row))
        with atomic_open(self.run_dir / "metrics.csv", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            for row in self.history:
                writer.writerow({k: json.dumps(v) if isinstance(v, list) else v for k, v in row.items()})

    def test(self, test_set: Dataset) -> dict:
        """Load ``best.pt`` (chosen on validation) and evaluate it on ``test_set``.

        Returns:
            The test metrics plus ``best_epoch``, ``train_images_per_second`` and ``peak_memory_mb``.
        """
        if self.dist.distributed:
            dist.barrier()
        best = load_checkpoint(self.best_path)
        self.module.load_state_dict(best["model"])
        metrics = evaluate(
            self.model, test_set, num_groups=self.num_groups, cfg=self.cfg, dist_info=self.dist, desc="test"
        )
        last = self.history[-1] if self.history else {}
        metrics.update(
            best_epoch=best["epoch"],
            train_images_per_second=last.get("train_images_per_second"),
            peak_memory_mb=_peak_memory_mb(self.dist.device),
            skipped_corrupt_train=last.get("skipped_corrupt_train", 0),
        )
        return metrics


@torch.no_grad()
def predict_samples(model: nn.Module, dataset: Dataset, indices: list[int], device: torch.device) -> dict:
    """Run ``model`` (eval mode) on ``dataset[indices]`` for figures.

    Returns:
        ``images`` ``[B, 3, H, W]``, ``fg_masks`` ``[B, 1, H, W]`` or None, ``keep`` ``[B, N]`` or None,
        ``part_maps`` ``[B, K + 1, h, w]`` or None, ``rollout`` ``[B, h, w]`` (the full-image baseline's attention
        rollout, :func:`faithful_vit.viz.attention_rollout`) or None, ``patch_size``; all on the CPU.
    """
    module = unwrap(model)
    was_training = module.training
    module.eval()
    images, _, _, fg_mask, _ = _to_device(collate([dataset[i] for i in indices]), device, channels_last=False)
    with viz.rollout_recorder(module) as recorder:
        out = model_forward(module, images, fg_mask)
    module.train(was_training)

    def cpu(value):
        return None if value is None else value.detach().float().cpu()

    return {
        "images": images.cpu(),
        "fg_masks": cpu(fg_mask),
        "keep": None if out.keep is None else out.keep.cpu(),
        "part_maps": cpu(out.part_maps),
        "rollout": None if recorder is None else recorder.rollout(),
        "patch_size": patch_size_of(module),
    }
