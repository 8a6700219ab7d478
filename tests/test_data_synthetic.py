"""The built-in SpuriousShapes benchmark: determinism, group construction, masks, clear margin, cache, sample format."""

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from faithful_vit.data import Batch, Sample, SpuriousShapes, SpuriousShapesConfig, collate, default_cache_dir, synthetic
from faithful_vit.data.mask_stats import patch_mask_stats
from faithful_vit.data.registry import create_dataset
from faithful_vit.data.transforms import synthetic_transforms

TINY = SpuriousShapesConfig(n_train=240, n_val=40, n_test=48)


@pytest.fixture(scope="module")
def tiny_train():
    return synthetic.generate_split(TINY, "train")


def test_generation_is_deterministic_per_seed(tiny_train):
    again = synthetic.generate_split(TINY, "train")
    for key, value in tiny_train.items():
        np.testing.assert_array_equal(value, again[key], err_msg=key)
    other = synthetic.generate_split(dataclasses.replace(TINY, seed=1), "train")
    assert not np.array_equal(other["images"], tiny_train["images"])
    val = synthetic.generate_split(TINY, "val")
    assert not np.array_equal(val["images"][:8], tiny_train["images"][:8])


def test_array_shapes_and_types(tiny_train):
    n, s = TINY.n_train, TINY.image_size
    assert tiny_train["images"].shape == (n, s, s, 3) and tiny_train["images"].dtype == np.uint8
    assert tiny_train["fg_masks"].shape == (n, s, s) and set(np.unique(tiny_train["fg_masks"])) <= {0, 1}
    assert tiny_train["place_visibility"].shape == (n, s, s)
    assert tiny_train["labels"].dtype == np.int64 and set(np.unique(tiny_train["labels"])) == {0, 1}


def test_train_is_spurious_and_eval_is_balanced(tiny_train):
    aligned = (tiny_train["labels"] == tiny_train["places"]).mean()
    assert 0.9 <= aligned < 1.0, aligned  # p_align 0.95 with 240 draws, minority groups present
    for split, n in (("val", TINY.n_val), ("test", TINY.n_test)):
        arrays = synthetic.generate_split(TINY, split)
        groups = arrays["labels"] * 2 + arrays["places"]
        assert np.bincount(groups, minlength=4).tolist() == [n // 4] * 4


def test_every_object_is_inside_the_image_and_sized(tiny_train):
    area = tiny_train["fg_masks"].mean((1, 2))
    assert area.min() > 0.03 and area.max() < 0.4
    assert tiny_train["fg_masks"][:, 0, :].sum() == 0 and tiny_train["fg_masks"][:, :, -1].sum() == 0


def test_object_colour_carries_no_label(tiny_train):
    """Shape is the only label cue: both classes draw their colour from one palette."""
    masks = tiny_train["fg_masks"].astype(bool)
    colours = np.stack([tiny_train["images"][i][masks[i]].mean(0) for i in range(len(masks))])
    labels = tiny_train["labels"]
    diff = np.abs(colours[labels == 0].mean(0) - colours[labels == 1].mean(0))
    assert diff.max() < 20, diff  # per-image colours spread over ~100 levels


def test_place_visibility_is_zero_on_object_and_one_far_away(tiny_train):
    vis, masks = tiny_train["place_visibility"], tiny_train["fg_masks"].astype(bool)
    assert vis[masks].max() == 0
    assert (vis == 255).mean() > 0.25  # the place texture still covers a large part of each image


def test_clear_margin_hides_the_place_in_every_patch_touching_the_object():
    """With a margin of at least the patch diagonal, no patch with an object pixel shows any place texture."""
    cfg = dataclasses.replace(TINY, n_train=64, clear_margin=10.0)
    arrays = synthetic.generate_split(cfg, "train")
    masks = torch.from_numpy(arrays["fg_masks"]).float()[:, None]
    vis = torch.from_numpy(arrays["place_visibility"]).float()[:, None] / 255
    touching = F.max_pool2d(masks, 8) > 0
    assert touching.sum() > 0
    assert F.max_pool2d(vis, 8)[touching].max() == 0
    # Without the margin the place texture reaches right up to the object, as in the hard variant.
    hard = synthetic.generate_split(dataclasses.replace(cfg, clear_margin=0.0, neutral_blotches=0.0), "train")
    hard_vis = torch.from_numpy(hard["place_visibility"]).float()[:, None] / 255
    hard_frac = F.avg_pool2d(torch.from_numpy(hard["fg_masks"]).float()[:, None], 8)
    boundary = (hard_frac > 0) & (hard_frac < 1)
    assert F.max_pool2d(hard_vis, 8)[boundary].min() == 1


def test_cache_is_written_once_and_reused(tmp_path, monkeypatch):
    cfg = dataclasses.replace(TINY, n_train=16, n_val=8, n_test=8)
    first = SpuriousShapes("train", config=cfg, cache_dir=tmp_path)
    files = list((tmp_path / "spurious_shapes").glob("*.npz"))
    assert len(files) == 1

    def fail(*args, **kwargs):
        raise AssertionError("generate_split called although the cache exists")

    monkeypatch.setattr(synthetic, "generate_split", fail)
    second = SpuriousShapes("train", config=cfg, cache_dir=tmp_path)
    np.testing.assert_array_equal(first.arrays["images"], second.arrays["images"])
    # The environment variable picks the default cache root.
    monkeypatch.setenv("FAITHFUL_VIT_DATA", str(tmp_path))
    assert default_cache_dir() == tmp_path
    SpuriousShapes("train", config=cfg)


def test_different_configs_get_different_cache_files(tmp_path):
    cfg = dataclasses.replace(TINY, n_train=8, n_val=4, n_test=4)
    SpuriousShapes("val", config=cfg, cache_dir=tmp_path)
    SpuriousShapes("val", config=dataclasses.replace(cfg, seed=3), cache_dir=tmp_path)
    assert len(list((tmp_path / "spurious_shapes").glob("*_val.npz"))) == 2


def test_augmentation_shares_the_cache_and_is_checked(tmp_path):
    cfg = dataclasses.replace(TINY, n_train=8, n_val=4, n_test=4)
    assert dataclasses.replace(cfg, augmentation="dihedral").key() == cfg.key()
    assert cfg.key() == dataclasses.replace(TINY, n_train=8, n_val=4, n_test=4, augmentation="hflip").key()
    assert dataclasses.replace(cfg, seed=3).key() != cfg.key()
    with pytest.raises(ValueError, match="augmentation: expected one of \\('hflip', 'dihedral'\\), got 'flip'"):
        dataclasses.replace(cfg, augmentation="flip")
    settings = {**dataclasses.asdict(cfg), "augmentation": "dihedral"}
    data = create_dataset("synthetic", "train", root=tmp_path, augment=True, **settings)
    assert "RandomQuarterTurn" in repr(data.transform)


def test_dataset_samples_batches_and_metadata(tmp_path):
    cfg = dataclasses.replace(TINY, n_train=24, n_val=8, n_test=8)
    ds = SpuriousShapes("train", config=cfg, cache_dir=tmp_path, transform=synthetic_transforms(train=True))
    assert (ds.num_classes, ds.num_groups) == (2, 4)
    assert ds.group_names == ("ellipse/land", "ellipse/water", "cross/land", "cross/water")
    sample = ds[3]
    assert isinstance(sample, Sample)
    assert sample.image.shape == (3, 64, 64) and sample.image.dtype == torch.float32
    assert sample.fg_mask.shape == (1, 64, 64) and set(sample.fg_mask.unique().tolist()) <= {0.0, 1.0}
    assert sample.group == sample.label * 2 + int(ds.places[3])
    loader = torch.utils.data.DataLoader(ds, batch_size=10, collate_fn=collate)
    batch = next(iter(loader))
    assert isinstance(batch, Batch) and batch.images.shape == (10, 3, 64, 64)
    assert batch.fg_masks.shape == (10, 1, 64, 64)
    assert batch.labels.dtype == torch.int64 and batch.num_skipped == 0
    # The in-memory view equals the per-sample view without augmentation.
    plain = SpuriousShapes("train", config=cfg, cache_dir=tmp_path)
    whole = plain.tensors()
    torch.testing.assert_close(whole.images[5], plain[5].image)
    torch.testing.assert_close(whole.fg_masks[5], plain[5].fg_mask)
    assert torch.equal(whole.groups, plain.groups)
    assert plain.place_visibility().shape == (24, 1, 64, 64)


def test_flip_augmentation_moves_mask_with_image(tmp_path):
    cfg = dataclasses.replace(TINY, n_train=8, n_val=4, n_test=4)
    plain = SpuriousShapes("train", config=cfg, cache_dir=tmp_path)
    flipped = SpuriousShapes(
        "train", config=cfg, cache_dir=tmp_path, transform=lambda img, m: (img.flip(-1), m.flip(-1))
    )
    torch.testing.assert_close(flipped[0].image, plain[0].image.flip(-1))
    torch.testing.assert_close(flipped[0].fg_mask, plain[0].fg_mask.flip(-1))


def test_bad_split_is_rejected():
    with pytest.raises(ValueError, match="split must be one of"):
        synthetic.generate_split(TINY, "dev")


def test_patch_mask_stats_on_a_hand_made_case():
    # 8x8 image, 4x4 patches -> 2x2 grid. Object: all of patch 0 and half of patch 1.
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., :4, :4] = 1
    mask[..., :4, 4:6] = 1
    visibility = 1 - mask
    keep = torch.tensor([[True, True, False, False]])
    stats = patch_mask_stats(keep, mask, 4, place_visibility=visibility)
    assert stats["kept_frac"] == 0.5 and stats["gt_frac"] == 0.25  # patch 1 is exactly half object: not > 0.5
    assert stats["patch_iou"] == 0.5 and stats["patch_precision"] == 0.5 and stats["patch_recall"] == 1.0
    assert stats["pixel_iou"] == pytest.approx(24 / 32)
    assert stats["non_object_in_kept"] == pytest.approx(8 / 32)
    assert stats["place_cue_in_kept"] == pytest.approx(8 / 32)
    nothing = patch_mask_stats(torch.zeros(1, 4, dtype=torch.bool), mask, 4)
    assert nothing["kept_frac"] == 0 and nothing["non_object_in_kept"] == 0 and "place_cue_in_kept" not in nothing
    with pytest.raises(ValueError, match="keep must be bool"):
        patch_mask_stats(keep.float(), mask, 4)
    with pytest.raises(ValueError, match="not a multiple of patch_size=3"):
        patch_mask_stats(keep, mask, 3)
