"""Training engine on tiny in-test data: exact resume, NaN stop, corrupt samples, atomic checkpoints, the oracle."""

import os

import numpy as np
import pytest
import torch
from _tiny import tiny_model
from PIL import Image
from torch.utils.data import Dataset, TensorDataset

from faithful_vit import FaithfulViT, engine, losses, run_folder
from faithful_vit.baseline import FullImageViT, OracleMaskViT, vit_kwargs_like
from faithful_vit.data.datasets import DatasetError, ImageFolder
from faithful_vit.data.loading import EpochSampler, SeededSamples
from faithful_vit.data.sample import CorruptImageError
from faithful_vit.distributed import DistInfo
from faithful_vit.kernels import use_backend


@pytest.fixture(autouse=True)
def _torch_kernels():
    """The PyTorch reference kernels: training-sized shapes are too large for the Triton interpreter."""
    with use_backend("torch"):
        yield


TINY = dict(img_size=16, patch_size=8, embed_dim=32, depth=1, num_heads=2, mlp_ratio=2.0)


def tiny_dataset(n: int = 48, seed: int = 0) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, 16, 16, generator=generator)
    labels = torch.randint(0, 2, (n,), generator=generator)
    groups = labels * 2 + torch.randint(0, 2, (n,), generator=generator)
    masks = (torch.rand(n, 1, 16, 16, generator=generator) > 0.4).float()
    return TensorDataset(images, labels, groups, masks)


def tiny_config(**overrides) -> engine.TrainConfig:
    base = dict(
        epochs=2, batch_size=8, eval_batch_size=16, lr=1e-3, checkpoint_every=2, log_interval=2, progress=False, seed=3
    )
    return engine.TrainConfig(**{**base, **overrides})


def make_trainer(tmp_path, cfg=None, model_seed=0, dataset=None, trainer_cls=engine.Trainer, model_cls=FullImageViT):
    torch.manual_seed(model_seed)
    data = dataset or tiny_dataset()
    return trainer_cls(
        model_cls(2, **TINY), data, tiny_dataset(16, seed=1), num_groups=4, cfg=cfg or tiny_config(), run_dir=tmp_path
    )


class Interrupted(Exception):
    pass


def interrupting_trainer(stop_at: int):
    class InterruptingTrainer(engine.Trainer):
        def after_step(self):
            if self.global_step == stop_at:
                raise Interrupted

    return InterruptingTrainer


def two_stage_model(num_classes: int, **_) -> FaithfulViT:
    """The tiny two-stage model on the 16 px test images (its equivariance pass draws random numbers every step)."""
    model = tiny_model(img_size=16, num_classes=num_classes)
    assert model.loss_weights["equivariance"] != 0
    return model


def two_stage_model_stage1_one_epoch(num_classes: int, **_) -> FaithfulViT:
    """The tiny two-stage model whose stage 1 learns in epoch 1 only (``stage1_epochs=1``)."""
    return tiny_model(img_size=16, num_classes=num_classes, stage1_epochs=1)


@pytest.mark.parametrize(
    "model_cls",
    [FullImageViT, two_stage_model, two_stage_model_stage1_one_epoch],
    ids=["baseline", "two_stage", "two_stage_stage1_one_epoch"],
)
def test_resume_replays_the_uninterrupted_run_exactly(tmp_path, model_cls):
    reference = make_trainer(tmp_path / "a", model_cls=model_cls)
    reference.fit()
    # 48 samples / batch 8 = 6 steps per epoch; stop at step 9, the last checkpoint is at step 8 (mid epoch 2).
    with pytest.raises(Interrupted):
        make_trainer(tmp_path / "b", trainer_cls=interrupting_trainer(9), model_cls=model_cls).fit()
    state = run_folder.load_checkpoint(tmp_path / "b" / "checkpoints" / "last.pt")
    assert (state["epoch"], state["step_in_epoch"], state["global_step"]) == (1, 2, 8)
    # A different init: everything must come from the file.
    resumed = make_trainer(tmp_path / "b", model_seed=123, model_cls=model_cls)
    resumed.fit(resume=True)
    for (name, expected), actual in zip(reference.module.state_dict().items(), resumed.module.state_dict().values()):
        assert torch.equal(expected, actual), name
    timing = ("val_images_per_second", "train_images_per_second", "peak_memory_mb")

    def without_timing(history):
        return [{k: v for k, v in row.items() if k not in timing} for row in history]

    assert without_timing(resumed.history) == without_timing(reference.history)
    lines = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 and (tmp_path / "b" / "metrics.csv").read_text().count("\n") == 3


def test_stage1_learns_only_in_its_epochs_and_stage2_goes_on(tmp_path):
    def stage1_state(module):
        return {
            name: value.detach().clone()
            for name, value in module.named_parameters()
            if not name.startswith(("stage2.", "fc_norm.", "head."))
        }

    class Recording(engine.Trainer):
        def _end_epoch(self):
            super()._end_epoch()
            self.snapshots.append((stage1_state(self.module), self.module.head.weight.detach().clone()))

    trainer = make_trainer(
        tmp_path, tiny_config(epochs=3), trainer_cls=Recording, model_cls=two_stage_model_stage1_one_epoch
    )
    initial = stage1_state(trainer.module)
    trainer.snapshots = []
    trainer.fit()
    (after1, head1), (after2, head2), (after3, head3) = trainer.snapshots
    assert any(not torch.equal(initial[name], after1[name]) for name in initial)  # epoch 1 trains stage 1
    for name in initial:
        assert torch.equal(after1[name], after2[name]) and torch.equal(after1[name], after3[name]), name
    assert not torch.equal(head1, head2) and not torch.equal(head2, head3)  # stage 2 goes on learning
    losses_by_epoch = [
        sorted(k for k in row if k.startswith("train_") and k != "train_images_per_second") for row in trainer.history
    ]
    assert "train_equivariance" in losses_by_epoch[0]
    assert losses_by_epoch[1] == losses_by_epoch[2] == ["train_ce_stage2", "train_total"]


def test_schedule_is_cosine_per_epoch_and_groups_keep_their_factors(tmp_path):
    trainer = make_trainer(tmp_path, tiny_config(epochs=4, checkpoint_every=0, sched_unit="epoch", warmup_epochs=0))
    trainer.fit()
    lrs = [row["lr"] for row in trainer.history]
    assert lrs[0] == pytest.approx(1e-3)
    assert lrs == pytest.approx([1e-3 * 0.5 * (1 + np.cos(np.pi * e / 4)) for e in range(4)])
    assert {group["weight_decay"] for group in trainer.optimizer.param_groups} == {0.0, 0.05}


def test_warmup_then_cosine_per_step():
    factors = [engine.lr_factor(step, total=10, warmup=4, min_ratio=0.1, sched="cosine") for step in range(11)]
    assert factors[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert factors[4] == pytest.approx(1.0) and factors[10] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(factors[3:], factors[4:]))
    assert engine.lr_factor(7, 10, 0, 0.0, "constant") == 1.0


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    trainer = make_trainer(tmp_path, tiny_config(log_interval=1))
    training_losses = losses.training_losses

    def poisoned(model, out, images, labels):
        terms = training_losses(model, out, images, labels)
        if trainer.global_step == 4:
            terms["total"] = terms["total"] * float("nan")
        return terms

    monkeypatch.setattr(losses, "training_losses", poisoned)
    with pytest.raises(
        engine.NonFiniteLossError,
        match=r"non-finite training loss \(total = nan\).*the last good checkpoint \(step 4\) is kept: .*last\.pt",
    ):
        trainer.fit()
    state = run_folder.load_checkpoint(trainer.last_path)
    assert state["global_step"] == 4
    assert all(torch.isfinite(value).all() for value in state["model"].values())


class CorruptEvery(Dataset):
    """Every third sample raises the datasets' CorruptImageError."""

    def __init__(self, base):
        self.base = base

    def __len__(self):
        return len(self.base)

    def __getitem__(self, index):
        if index % 3 == 0:
            raise CorruptImageError(f"img{index}.png", "truncated")
        return self.base[index]


def test_corrupt_samples_are_skipped_warned_and_counted(tmp_path):
    cfg = tiny_config(epochs=1, max_corrupt_fraction=0.5)
    trainer = make_trainer(tmp_path, cfg, dataset=CorruptEvery(tiny_dataset()))
    with pytest.warns(UserWarning, match="could not be read"):
        trainer.fit()
    assert trainer.history[-1]["skipped_corrupt_train"] == 16  # 48 samples, indices 0, 3, ..., 45


def test_more_corrupt_samples_than_allowed_stop_the_run(tmp_path):
    trainer = make_trainer(tmp_path, tiny_config(epochs=1), dataset=CorruptEvery(tiny_dataset()))
    with (
        pytest.warns(UserWarning),
        pytest.raises(DatasetError, match=r"train split: 16 of 48 images could not be decoded \(more than 1%"),
    ):
        trainer.fit()
    assert not trainer.best_path.exists()  # stopped before validation picked a checkpoint


def write_png_folder(root, n=8, corrupt=5):
    """An ImageFolder of 16x16 PNGs in two classes; file ``corrupt`` is truncated (exists, cannot be decoded)."""
    for i in range(n):
        path = root / f"class{i % 2}" / f"img{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((16, 16, 3), i * 20, dtype=np.uint8)).save(path)
        if i == corrupt:
            path.write_bytes(path.read_bytes()[:40])
    return root


def test_corrupt_png_is_skipped_in_evaluation(tmp_path):
    folder = ImageFolder(write_png_folder(tmp_path / "images"))  # the datasets' contract: CorruptImageError
    model = FullImageViT(2, **TINY)
    with pytest.warns(UserWarning, match="could not be read"):
        cfg = tiny_config(max_corrupt_fraction=0.5)
        result = engine.evaluate(model, folder, num_groups=2, cfg=cfg, dist_info=DistInfo())
    assert result["skipped_corrupt"] == 1 and result["num_images"] == 7
    assert "mask_iou" not in result  # the folder has no masks


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    run_folder.save_checkpoint(path, {"value": torch.ones(3)})

    def failing_save(obj, handle):
        handle.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        run_folder.save_checkpoint(path, {"value": torch.zeros(3)})
    monkeypatch.undo()
    assert torch.equal(run_folder.load_checkpoint(path)["value"], torch.ones(3))
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # the partial temporary file is gone


def test_sampler_shards_cover_the_epoch_and_resume_mid_epoch():
    shards = [EpochSampler(10, shuffle=True, seed=1, rank=r, world_size=3, drop_last=True) for r in range(3)]
    for sampler in shards:
        sampler.set_epoch(2)
    indices = [list(sampler) for sampler in shards]
    assert all(len(shard) == 3 for shard in indices)
    assert len(set(sum(indices, []))) == 9
    shards[0].set_epoch(2, start=2)
    assert list(shards[0]) == indices[0][2:] and len(shards[0]) == 1
    shards[0].set_epoch(3)
    assert list(shards[0]) != indices[0]


def test_sample_seeds_make_augmentation_reproducible_and_leave_the_global_rng_alone():
    class Noisy(Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, index):
            return torch.rand(()) + float(np.random.rand())

    samples = SeededSamples(Noisy(), seed=5)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    first = [samples[i] for i in range(4)]
    assert torch.equal(torch.get_rng_state(), before)
    assert [samples[i] for i in range(4)] == first
    samples.set_epoch(1)
    assert [samples[i] for i in range(4)] != first


@pytest.mark.parametrize("mode", ["packed", "masked"])
def test_oracle_logits_depend_only_on_kept_patches(mode):
    torch.manual_seed(0)
    model = OracleMaskViT(2, threshold=0.5, mode=mode, **TINY).eval()
    images, fg = torch.randn(2, 3, 16, 16), torch.zeros(2, 1, 16, 16)
    fg[0, :, :8, :8] = 1  # image 0 keeps patch 0; image 1 keeps nothing
    out = model(images, fg)
    assert out.keep.tolist() == [[True, False, False, False], [False] * 4]
    changed = images.clone()
    changed[0, :, 8:, :] = torch.randn(3, 8, 16)
    changed[1] = torch.randn(3, 16, 16)
    torch.testing.assert_close(model(changed, fg).logits, out.logits, rtol=0, atol=1e-6)
    changed[0, :, :8, :8] += 1  # a kept patch does change the prediction
    assert not torch.allclose(model(changed, fg).logits[0], out.logits[0])
    with pytest.raises(ValueError, match="fg_mask"):
        model(images)
    # The same as timm's dense ViT with a boolean key mask (prefix always kept).
    key_mask = torch.cat([torch.ones(2, 1, dtype=torch.bool), out.keep], 1)[:, None, None, :]
    dense = model.vit.forward_head(model.vit.forward_features(images, attn_mask=key_mask))
    torch.testing.assert_close(out.logits, dense, rtol=1e-4, atol=1e-5)


def test_baseline_matches_the_reference_vit_size():
    reference = FullImageViT(2, **TINY).vit
    rebuilt = FullImageViT(2, **vit_kwargs_like(reference))
    assert sum(p.numel() for p in rebuilt.parameters()) == sum(p.numel() for p in reference.parameters())


def test_oracle_trains_and_reports_mask_metrics(tmp_path):
    trainer = make_trainer(tmp_path, tiny_config(epochs=1), model_cls=OracleMaskViT)
    trainer.fit()
    result = trainer.test(tiny_dataset(16, seed=2))
    assert result["mask_iou_patch"] == pytest.approx(1.0)  # the oracle keeps exactly the ground-truth patches
    assert 0 < result["kept_fraction"] < 1 and result["best_epoch"] == 1
    for key in (
        "accuracy",
        "worst_group_accuracy",
        "group_accuracy",
        "mask_iou",
        "background_in_kept",
        "images_per_second",
        "peak_memory_mb",
    ):
        assert result[key] is not None, key
    assert not [name for name in os.listdir(tmp_path / "checkpoints") if name.startswith(".")]


def test_the_three_models_satisfy_the_engine_contract(tmp_path):
    from faithful_vit.model_protocol import EquivariantModel, ModelOutput, TrainableModel

    two_stage = tiny_model().eval()
    baseline, oracle = FullImageViT(2, **TINY).eval(), OracleMaskViT(2, **TINY).eval()
    for model in (two_stage, baseline, oracle):
        assert isinstance(model, TrainableModel), type(model).__name__
        assert engine.patch_size_of(model) == 8
    assert isinstance(two_stage, EquivariantModel) and not isinstance(baseline, EquivariantModel)
    assert [model.uses_ground_truth_mask for model in (two_stage, baseline, oracle)] == [False, False, True]
    images, fg = torch.randn(2, 3, 16, 16), torch.ones(2, 1, 16, 16)
    outputs = [
        two_stage(torch.randn(2, 3, 32, 32)),
        engine.model_forward(baseline, images, fg),
        engine.model_forward(oracle, images, fg),
    ]
    assert all(isinstance(out, ModelOutput) for out in outputs)
    assert outputs[0].logits is outputs[0].stage2_logits and outputs[1].part_maps is None
    labels = torch.tensor([0, 1])
    assert set(losses.training_losses(baseline, outputs[1], images, labels)) == {"ce", "total"}
    with pytest.raises(TypeError, match=r"model: expected a TrainableModel .*Linear lacks \['uses_ground_truth_mask'"):
        engine.Trainer(
            torch.nn.Linear(2, 2), tiny_dataset(), tiny_dataset(16), num_groups=4, cfg=tiny_config(), run_dir=tmp_path
        )


def test_the_engine_reads_the_model_contract_without_probing():
    import ast
    from pathlib import Path

    tree = ast.parse(Path(engine.__file__).read_text())
    probes = [
        node.lineno
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr"
    ]
    assert probes == [], f"engine.py probes with getattr on lines {probes}"
