"""The dataset registry: every name maps to one builder, train.py's checks and the data spec ask it."""

import argparse

import pytest
import torch

from faithful_vit import experiment, model_spec
from faithful_vit.data import (
    SpuriousShapes,
    SpuriousShapesConfig,
    create_dataset,
    dataset_info,
    list_datasets,
    register_dataset,
    registry,
)

GENERATED = {"synthetic", "waterbirds_lite"}
FOLDERS = {"waterbirds", "cub", "metashift", "imagefolder", "imagenet9"}


def test_the_built_in_datasets_are_registered_with_what_they_need():
    assert list_datasets() == sorted(GENERATED | FOLDERS)
    for name in list_datasets():
        info = dataset_info(name)
        assert info.name == name and len(info.summary) > 20
        assert info.needs_root == (name in FOLDERS) == info.sized_by_model
        assert (info.settings is None) == (name in FOLDERS - {"imagenet9"})  # imagenet9's settings: the variant
        assert info.has_masks == (name in GENERATED)
        assert info.accepts_mask_root == (name in ("waterbirds", "cub"))
    assert dataset_info("synthetic").image_size({"image_size": 32}) == 32
    assert dataset_info("waterbirds").image_size({}) is None
    assert dataset_info("imagenet9").image_size({"variant": "mixed_rand"}) is None
    with pytest.raises(TypeError, match="image_size"):  # the model sets the side: --img-size, not --data-kwargs
        dataset_info("imagenet9").image_size({"image_size": 32})


def test_create_dataset_builds_the_registered_dataset(tmp_path):
    settings = {"n_train": 8, "n_val": 4, "n_test": 4, "image_size": 32}
    train = create_dataset("synthetic", "train", tmp_path, **settings)
    val = create_dataset("synthetic", "val", tmp_path, **settings)
    direct = SpuriousShapes("val", config=SpuriousShapesConfig(**settings), cache_dir=tmp_path)
    assert isinstance(val, SpuriousShapes) and len(val) == 4 and val.config == direct.config
    assert all(torch.equal(torch.as_tensor(val.arrays[k]), torch.as_tensor(direct.arrays[k])) for k in direct.arrays)
    assert train.transform is not None and val.transform is None  # augmentation on the train split only
    assert create_dataset("synthetic", "val", tmp_path, augment=True, **settings).transform is not None
    assert list(tmp_path.glob("spurious_shapes/*_val.npz")), "root is the cache folder of a generated dataset"


def test_bad_names_splits_roots_and_settings_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"name: expected one of \['cub', .*, got 'nope'"):
        create_dataset("nope", "train")
    with pytest.raises(ValueError, match="split: expected one of .*, got 'dev'"):
        create_dataset("synthetic", "dev", tmp_path)
    with pytest.raises(ValueError, match="root: dataset 'cub' reads a folder, got None"):
        create_dataset("cub", "train", image_size=32)
    with pytest.raises(TypeError, match="colour"):
        create_dataset("synthetic", "train", tmp_path, colour=3)
    with pytest.raises(ValueError, match="'synthetic' is already registered"):
        register_dataset("synthetic", summary="again", needs_root=False)(lambda split, root, *, augment: None)
    with pytest.raises(model_spec.SpecError, match=r"--data: expected one of \['cub'"):
        model_spec.data_spec("nope")


class _Toy(torch.utils.data.Dataset):
    num_classes, group_names, class_names = 2, ("a", "b"), ("a", "b")

    def __init__(self, split, root, augment, image_size):
        self.split, self.root, self.augment, self.image_size = split, root, augment, image_size

    def __len__(self):
        return 3


def test_a_registered_dataset_is_usable_by_name_everywhere(tmp_path, monkeypatch):
    """One registration is all a new dataset needs: train.py's flag checks, the data spec and its builder follow."""
    monkeypatch.setattr(registry, "_DATASETS", dict(registry._DATASETS))  # the registration ends with the test

    @register_dataset("toy", summary="a toy folder dataset of this test", needs_root=True, has_groups=False)
    def _toy(split, root, *, augment, image_size):
        return _Toy(split, root, augment, image_size)

    assert "toy" in list_datasets()
    spec = model_spec.data_spec("toy", data_dir=tmp_path, img_size=16)
    assert spec["image_size"] == 16
    built = model_spec.build_dataset(spec, "val")
    assert (built.split, built.root, built.augment, built.image_size) == ("val", str(tmp_path), False, 16)
    assert model_spec.describe_data(spec, built)["group_names"] == ["a", "b"]

    flags = {"model": "baseline", "reference_model": None, "pretrained_file": None, "min_lr": 0.0, "lr": 1e-3}
    flags.update(data="toy", data_dir=str(tmp_path), img_size=16, mask_dir=None, data_kwargs={}, device="cpu")
    assert experiment.check_args(argparse.Namespace(**flags)) == ["baseline"]
    with pytest.raises(experiment.UsageError, match="--data-kwargs: not used by --data toy"):
        experiment.check_args(argparse.Namespace(**{**flags, "data_kwargs": {"n_train": 8}}))
    with pytest.raises(experiment.UsageError, match="--mask-dir: not used by --data toy"):
        experiment.check_args(argparse.Namespace(**{**flags, "mask_dir": str(tmp_path)}))
    with pytest.raises(
        experiment.UsageError,
        match="--model oracle: needs ground-truth masks, which --data toy does not have here "
        r"\(--mask-dir for cub/waterbirds\)",
    ):
        experiment.check_datasets_and_models(argparse.Namespace(**flags), ["oracle"], [built] * 3, 16)
