"""Loaders of the paper's datasets on tiny fixtures written in their published on-disk formats, and Waterbirds-lite."""

import dataclasses
import hashlib
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from faithful_vit.data import (
    CUB200,
    CorruptImageError,
    DatasetError,
    ImageFolder,
    ImageNet9,
    MetaShiftCatDog,
    Waterbirds,
    WaterbirdsLite,
    WaterbirdsLiteConfig,
    collate,
    load_image,
)
from faithful_vit.data import waterbirds_lite as wbl
from faithful_vit.data.datasets import Entry, ImageListDataset
from faithful_vit.data.sample import Sample
from faithful_vit.data.transforms import cub_original


def _png(path, colour, size=(8, 8), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour).save(path)
    return path


def _waterbirds(root):
    rows = [  # img_id, img_filename, y, split, place
        (1, "001.Black_footed_Albatross/a.jpg", 1, 0, 1),
        (2, "001.Black_footed_Albatross/b.jpg", 1, 0, 0),
        (3, "002.Laysan_Albatross/c.jpg", 1, 1, 1),
        (4, "100.Brown_Pelican/d.jpg", 1, 2, 0),
        (5, "200.Common_Yellowthroat/e.jpg", 0, 0, 0),
        (6, "200.Common_Yellowthroat/f.jpg", 0, 2, 1),
    ]
    lines = ["img_id,img_filename,y,split,place,place_filename"]
    for img_id, name, y, split, place in rows:
        _png(root / name, (10 * img_id, 0, 0))
        _png((root / "segs" / name).with_suffix(".png"), 255 if img_id in (1, 6) else 0, mode="L")
        lines.append(f"{img_id},{name},{y},{split},{place},/o/ocean/00000{img_id}.jpg")
    (root / "metadata.csv").write_text("\n".join(lines) + "\n")


def test_waterbirds_splits_groups_and_masks(tmp_path):
    _waterbirds(tmp_path)
    train = Waterbirds(tmp_path, "train")
    assert len(train) == 3 and train.num_classes == 2 and train.num_groups == 4
    assert train.group_names == ("landbird/land", "landbird/water", "waterbird/land", "waterbird/water")
    assert train.groups.tolist() == [3, 2, 0] and train.labels.tolist() == [1, 1, 0]
    sample = train[0]
    assert isinstance(sample, Sample) and sample.image.shape == (3, 8, 8) and sample.fg_mask is None
    # The image is decoded and normalised: red 10/255 with ImageNet statistics.
    assert sample.image[0, 0, 0].item() == pytest.approx((10 / 255 - 0.485) / 0.229, abs=0.02)
    test = Waterbirds(tmp_path, "test", mask_root=tmp_path / "segs")
    assert test.groups.tolist() == [2, 1]
    masks = [test[i].fg_mask for i in range(2)]
    assert masks[0].shape == (1, 8, 8) and masks[0].max() == 0 and masks[1].min() == 1
    batch = collate([test[0], test[1]])
    assert batch.fg_masks.shape == (2, 1, 8, 8) and batch.groups.tolist() == [2, 1]
    assert len(Waterbirds(tmp_path, "val")) == 1


def test_waterbirds_with_the_paper_transform(tmp_path):
    _waterbirds(tmp_path)
    ds = Waterbirds(tmp_path, "train", mask_root=tmp_path / "segs", transform=cub_original(6, train=True))
    sample = ds[0]
    assert sample.image.shape == (3, 6, 6) and sample.fg_mask.shape == (1, 6, 6)


def test_waterbirds_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="metadata.csv"):
        Waterbirds(tmp_path, "train")
    (tmp_path / "metadata.csv").write_text("img_id,img_filename,y\n1,a.jpg,0\n")
    with pytest.raises(ValueError, match=r"missing columns \['place', 'split'\]"):
        Waterbirds(tmp_path, "train")
    with pytest.raises(ValueError, match="split must be one of"):
        Waterbirds(tmp_path, "training")


def _edit_metadata(root, line, **fields):
    """Rewrite fields of one metadata.csv line (1 = the header)."""
    lines = (root / "metadata.csv").read_text().splitlines()
    header = lines[0].split(",")
    values = lines[line - 1].split(",")
    for key, value in fields.items():
        values[header.index(key)] = value
    lines[line - 1] = ",".join(values)
    (root / "metadata.csv").write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("name", ["../outside.jpg", "001.Black_footed_Albatross/../../outside.jpg", "/etc/a.jpg"])
def test_waterbirds_refuses_paths_outside_the_dataset_folder(tmp_path, name):
    root = tmp_path / "waterbirds"
    _waterbirds(root)
    _png(tmp_path / "outside.jpg", (0, 0, 0))  # exists: refused for where it is, not for being missing
    _edit_metadata(root, 3, img_filename=name)
    with pytest.raises(DatasetError, match=r"metadata.csv:3: img_filename: expected a path inside the dataset folder"):
        Waterbirds(root, "train", mask_root=root / "segs")


def test_waterbirds_missing_file_or_folder_is_an_error_at_load(tmp_path):
    _waterbirds(tmp_path)
    (tmp_path / "001.Black_footed_Albatross/b.jpg").unlink()
    with pytest.raises(DatasetError, match=r"metadata.csv:3: image file not found: .*b\.jpg"):
        Waterbirds(tmp_path, "train")
    (tmp_path / "001.Black_footed_Albatross/b.jpg").mkdir()
    with pytest.raises(DatasetError, match=r"metadata.csv:3: image file is a folder, not a file: .*b\.jpg"):
        Waterbirds(tmp_path, "train")
    (tmp_path / "segs/100.Brown_Pelican/d.png").unlink()
    with pytest.raises(DatasetError, match=r"metadata.csv:5: mask file not found: .*d\.png"):
        Waterbirds(tmp_path, "test", mask_root=tmp_path / "segs")


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"y": "2"}, "y: expected an integer in 0..1, got '2'"),
        ({"y": "-1"}, "y: expected an integer in 0..1, got '-1'"),
        ({"place": "5"}, "place: expected an integer in 0..1, got '5'"),
        ({"place": "water"}, "place: expected an integer in 0..1, got 'water'"),
        ({"split": "3"}, "split: expected an integer in 0..2, got '3'"),
        ({"img_filename": ""}, "img_filename: expected a file name, got ''"),
    ],
)
def test_waterbirds_refuses_bad_rows(tmp_path, fields, message):
    _waterbirds(tmp_path)
    _edit_metadata(tmp_path, 4, **fields)  # a validation row: checked whichever split is loaded
    with pytest.raises(DatasetError, match=rf"metadata.csv:4: {message}"):
        Waterbirds(tmp_path, "train")


def test_image_list_refuses_labels_and_groups_out_of_range(tmp_path):
    image = _png(tmp_path / "a.png", (0, 0, 0))
    with pytest.raises(DatasetError, match="label: expected 0..1, got 2"):
        ImageListDataset([Entry(image, 2, 0)], num_classes=2, group_names=("a", "b"))
    with pytest.raises(DatasetError, match="src:1: group: expected 0..1, got -1"):
        ImageListDataset([Entry(image, 0, -1, source="src:1")], num_classes=2, group_names=("a", "b"))


def test_corrupt_images_raise_or_are_skipped_and_counted(tmp_path):
    _waterbirds(tmp_path)
    (tmp_path / "001.Black_footed_Albatross/b.jpg").write_bytes(b"not an image at all")
    strict = Waterbirds(tmp_path, "train")
    with pytest.raises(CorruptImageError, match="b.jpg") as info:
        strict[1]
    assert info.value.path.endswith("b.jpg")
    lenient = Waterbirds(tmp_path, "train", on_corrupt="skip")
    with pytest.warns(UserWarning, match="skipping corrupt image"):
        assert lenient[1] is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per file only
        assert lenient[1] is None
    loader = torch.utils.data.DataLoader(lenient, batch_size=3, collate_fn=collate)
    batch = next(iter(loader))
    assert batch.num_skipped == 1 and batch.images.shape == (2, 3, 8, 8) and batch.labels.tolist() == [1, 0]
    empty = collate([None, None])
    assert empty.num_skipped == 2 and empty.labels.numel() == 0 and empty.fg_masks is None
    # A missing file is a broken dataset, not a corrupt image, in both modes.
    (tmp_path / "200.Common_Yellowthroat/e.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="e.jpg"):
        lenient[2]
    with pytest.raises(ValueError, match="on_corrupt"):
        Waterbirds(tmp_path, "train", on_corrupt="ignore")


def test_collate_rejects_mixed_masks_and_empty_input():
    with_mask = Sample(torch.zeros(3, 4, 4), 0, 0, torch.zeros(1, 4, 4))
    without = Sample(torch.zeros(3, 4, 4), 1, 1, None)
    with pytest.raises(ValueError, match="fg_mask is None for 1 of 2"):
        collate([with_mask, without])
    with pytest.raises(ValueError, match="non-empty"):
        collate([])


def test_load_image_grayscale_and_rgba(tmp_path):
    grey = load_image(_png(tmp_path / "g.png", 128, mode="L"))
    assert grey.shape == (3, 8, 8) and torch.allclose(grey, torch.full_like(grey, 128 / 255))
    rgba = load_image(_png(tmp_path / "a.png", (255, 0, 0, 128), mode="RGBA"))
    assert rgba.shape == (3, 8, 8)
    assert load_image(tmp_path / "g.png", mode="L").shape == (1, 8, 8)


def _cub(root, with_segmentations):
    files = {
        1: ("001.Black_footed_Albatross", "x1.jpg", 1),
        2: ("001.Black_footed_Albatross", "x2.jpg", 0),
        3: ("002.Laysan_Albatross", "y1.jpg", 1),
        4: ("200.Common_Yellowthroat", "z1.jpg", 0),
    }
    class_ids = {"001.Black_footed_Albatross": 1, "002.Laysan_Albatross": 2, "200.Common_Yellowthroat": 3}
    images, labels, split = [], [], []
    for i, (folder, name, is_train) in files.items():
        _png(root / "images" / folder / name, (i * 40, 0, 0))
        if with_segmentations:
            _png((root.parent / "segmentations" / folder / name).with_suffix(".png"), 255, mode="L")
        images.append(f"{i} {folder}/{name}")
        labels.append(f"{i} {class_ids[folder]}")
        split.append(f"{i} {is_train}")
    (root / "images.txt").write_text("\n".join(images) + "\n")
    (root / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    (root / "train_test_split.txt").write_text("\n".join(split) + "\n")
    (root / "classes.txt").write_text("\n".join(f"{v} {k}" for k, v in class_ids.items()) + "\n")


def test_cub_official_split_labels_and_segmentations(tmp_path):
    root = tmp_path / "CUB_200_2011"
    _cub(root, with_segmentations=True)
    train = CUB200(root, "train")
    assert [e.path.name for e in train.entries] == ["x1.jpg", "y1.jpg"]
    assert train.labels.tolist() == [0, 1] and torch.equal(train.groups, train.labels)
    assert train.num_classes == 3 and train.class_names[2] == "200.Common_Yellowthroat"
    test = CUB200(root, "test", mask_root=True)
    assert test.labels.tolist() == [0, 2]
    assert test[1].fg_mask.shape == (1, 8, 8) and test[1].fg_mask.min() == 1
    with pytest.raises(ValueError, match="split must be 'train', 'val' or 'test'"):
        CUB200(root, "dev")


def write_cub(root, train_per_class, test_per_class=1, order=1):
    """A CUB_200_2011 folder in the published layout: ``train_per_class[c]`` training images of class ``c`` (1-based
    ids, class folders ``00c.Species_c``); ``order=-1`` lists the images in reverse in every metadata file."""
    rows, class_names = [], []
    for c, n_train in enumerate(train_per_class, 1):
        folder = f"{c:03d}.Species_{c}"
        class_names.append(folder)
        rows += [(folder, f"Species_{c}_{k:04d}.jpg", c, int(k < n_train)) for k in range(n_train + test_per_class)]
    lines = {"images.txt": [], "image_class_labels.txt": [], "train_test_split.txt": []}
    for i, (folder, name, c, is_train) in enumerate(rows, 1):
        _png(root / "images" / folder / name, (i % 256, c * 40 % 256, 0))
        lines["images.txt"].append(f"{i} {folder}/{name}")
        lines["image_class_labels.txt"].append(f"{i} {c}")
        lines["train_test_split.txt"].append(f"{i} {is_train}")
    for file, content in lines.items():
        (root / file).write_text("\n".join(content[::order]) + "\n")
    (root / "classes.txt").write_text("\n".join(f"{c} {n}" for c, n in enumerate(class_names, 1)) + "\n")
    return class_names


def carved_by_hand(paths_by_group):
    """The validation images the documented rule picks: per group, floor(10 % of n) (at least 1 where n >= 2) with the
    smallest SHA-256 of the relative path."""
    carved = set()
    for paths in paths_by_group.values():
        count = max(1, len(paths) // 10) if len(paths) >= 2 else 0
        carved |= set(sorted(paths, key=lambda p: hashlib.sha256(p.encode()).hexdigest())[:count])
    return carved


def relative(dataset, root):
    return [entry.path.relative_to(root).as_posix() for entry in dataset.entries]


@pytest.mark.parametrize("order", [1, -1])
def test_cub_validation_is_carved_from_the_official_training_split(tmp_path, order):
    root = tmp_path / "CUB_200_2011"
    write_cub(root, train_per_class=[25, 5, 1], test_per_class=2, order=order)
    train, val, test = (CUB200(root, split) for split in ("train", "val", "test"))
    official = {"001": 25, "002": 5, "003": 1}
    names = {split: relative(ds, root / "images") for split, ds in (("train", train), ("val", val), ("test", test))}
    by_class = {}
    for name in names["train"] + names["val"]:
        by_class.setdefault(name[:3], []).append(name)
    assert {c: len(paths) for c, paths in by_class.items()} == official  # train + val = the official train split
    assert set(names["val"]) == carved_by_hand(by_class) and not set(names["val"]) & set(names["train"])
    assert sorted(val.labels.tolist()) == [0, 0, 1]  # 25 images: 2 carved, 5: 1, 1: none
    assert len(test) == 6 and all(int(name.split("_")[-1][:4]) >= official[name[:3]] for name in names["test"])
    if order == 1:  # the order the metadata lists the images in does not change the choice
        reversed_root = tmp_path / "reversed" / "CUB_200_2011"
        write_cub(reversed_root, train_per_class=[25, 5, 1], test_per_class=2, order=-1)
        assert sorted(relative(CUB200(reversed_root, "val"), reversed_root / "images")) == sorted(names["val"])


def test_cub_errors(tmp_path):
    root = tmp_path / "CUB_200_2011"
    _cub(root, with_segmentations=False)
    with pytest.raises(FileNotFoundError, match="segmentations"):
        CUB200(root, "train", mask_root=True)
    (root / "classes.txt").unlink()
    with pytest.raises(FileNotFoundError, match="classes.txt"):
        CUB200(root, "train")


@pytest.mark.parametrize(
    "file, line, message",
    [
        ("image_class_labels.txt", "2 4", "image_class_labels.txt:2: class id: expected an integer in 1..3, got '4'"),
        ("image_class_labels.txt", None, "images.txt:2: image id 2 has no line in .*image_class_labels.txt"),
        ("train_test_split.txt", "2 yes", "train_test_split.txt:2: is_training_image: expected an integer in 0..1"),
        ("images.txt", "2 ../../x2.jpg", "images.txt:2: image name: expected a path inside the dataset folder"),
        ("images.txt", "1 001.Black_footed_Albatross/x1.jpg", "images.txt:2: id 1 already given on .*images.txt:1"),
        ("classes.txt", "7 002.Laysan_Albatross", "classes.txt:2: class id: expected an integer in 1..3, got '7'"),
    ],
)
def test_cub_refuses_bad_lines(tmp_path, file, line, message):
    root = tmp_path / "CUB_200_2011"
    _cub(root, with_segmentations=False)
    lines = (root / file).read_text().splitlines()
    lines[1:2] = [] if line is None else [line]
    (root / file).write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetError, match=message):
        CUB200(root, "train")


def test_metashift_with_context_folders(tmp_path):
    layout = {"train": {"cat": ["bed", "sofa"], "dog": ["bench", "bike"]}, "test": {"cat": ["shelf"], "dog": ["shelf"]}}
    for split, classes in layout.items():
        for cls, contexts in classes.items():
            for ctx in contexts:
                for k in range(2):
                    _png(tmp_path / split / cls / ctx / f"{ctx}{k}.jpg", (k, 0, 0))
    train = MetaShiftCatDog(tmp_path, "train")
    assert train.place_names == ("bed", "bench", "bike", "shelf", "sofa") and train.num_groups == 10
    assert len(train) == 4 and train.labels.tolist() == [0, 0, 1, 1]  # one of each context's 2 went to val
    assert sorted(set(train.groups.tolist())) == [0, 4, 6, 7]  # cat/bed, cat/sofa, dog/bench, dog/bike
    assert train.group_names[4] == "cat/sofa" and train.group_names[7] == "dog/bike"
    test = MetaShiftCatDog(tmp_path, "test")
    assert sorted(set(test.groups.tolist())) == [3, 8]  # cat/shelf, dog/shelf
    assert test[0].image.shape == (3, 8, 8)


def write_metashift(root, per_context=4):
    """The published MetaShift cat/dog DISC layout: ``train/`` and ``test/``, context folders, no ``val/``."""
    layout = {"train": {"cat": ["bed", "sofa"], "dog": ["bench", "bike"]}, "test": {"cat": ["shelf"], "dog": ["shelf"]}}
    for split, classes in layout.items():
        for cls, contexts in classes.items():
            for ctx in contexts:
                for k in range(per_context):
                    _png(root / split / cls / ctx / f"{cls}_{ctx}_{k}.jpg", (k * 30, 40 * (cls == "dog"), 0))


def test_metashift_validation_is_carved_from_train_per_group(tmp_path):
    write_metashift(tmp_path, per_context=12)
    train, val, test = (MetaShiftCatDog(tmp_path, split) for split in ("train", "val", "test"))
    names = {split: relative(ds, tmp_path / "train") for split, ds in (("train", train), ("val", val))}
    by_group = {}
    for entry, name in zip(train.entries + val.entries, names["train"] + names["val"]):
        by_group.setdefault(entry.group, []).append(name)
    assert {train.group_names[g]: len(paths) for g, paths in by_group.items()} == {
        "cat/bed": 12,
        "cat/sofa": 12,
        "dog/bench": 12,
        "dog/bike": 12,
    }
    assert set(names["val"]) == carved_by_hand(by_group) and len(val) == 4 and len(train) == 44
    assert sorted(val.groups.tolist()) == [0, 4, 6, 7]  # one of every training group
    assert len(test) == 24 and val.group_names == train.group_names == test.group_names
    # A val/ folder, where the data has one, is used as it is and train/ stays whole.
    _png(tmp_path / "val" / "cat" / "bed" / "extra.jpg", (0, 0, 0))
    _png(tmp_path / "val" / "dog" / "bike" / "extra.jpg", (0, 0, 0))
    assert len(MetaShiftCatDog(tmp_path, "train")) == 48 and len(MetaShiftCatDog(tmp_path, "val")) == 2


def test_metashift_flat_layout_and_missing_folders(tmp_path):
    for cls in ("cat", "dog"):
        _png(tmp_path / "train" / cls / "1.jpg", (0, 0, 0))
    ds = MetaShiftCatDog(tmp_path, "train")
    assert ds.group_names == ("cat", "dog") and ds.groups.tolist() == [0, 1]
    with pytest.raises(FileNotFoundError, match="split folder"):
        MetaShiftCatDog(tmp_path, "test")


def test_image_folder(tmp_path):
    for cls, n in (("b_class", 2), ("a_class", 1)):
        for k in range(n):
            _png(tmp_path / cls / f"{k}.png", (k, 0, 0))
    (tmp_path / "a_class" / "notes.txt").write_text("not an image")
    ds = ImageFolder(tmp_path)
    assert ds.class_names == ("a_class", "b_class") and ds.labels.tolist() == [0, 1, 1]
    assert ds.num_groups == 2 and ds[2].label == 1 and ds[2].fg_mask is None
    assert ImageFolder(tmp_path, class_names=["b_class"]).labels.tolist() == [0, 0]
    with pytest.raises(FileNotFoundError, match="c_class"):
        ImageFolder(tmp_path, class_names=["c_class"])
    with pytest.raises(FileNotFoundError, match="root not found"):
        ImageFolder(tmp_path / "nope")


IMAGENET9_CLASSES = [
    "00_dog",
    "01_bird",
    "02_wheeled vehicle",
    "03_reptile",
    "04_carnivore",
    "05_insect",
    "06_musical instrument",
    "07_primate",
    "08_fish",
]


def write_imagenet9(root, per_class=2, train_per_class=0, size=16, seed=0):
    """The released ``bg_challenge`` folder: ``<variant>/val/<NN_class>/*.JPEG`` for every variant (random-pixel
    JPEGs, different in every variant), and ``original/train`` with ``train_per_class`` images per class."""
    from faithful_vit.data.datasets import IMAGENET9_VARIANTS

    rng = np.random.default_rng(seed)
    folders = [(variant, "val", per_class) for variant in IMAGENET9_VARIANTS] + [("original", "train", train_per_class)]
    for variant, split, count in folders:
        for name in IMAGENET9_CLASSES:
            (root / variant / split / name).mkdir(parents=True, exist_ok=True)
            for k in range(count):
                pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / variant / split / name / f"n{k:08d}_{k}.JPEG", format="JPEG")


def test_imagenet9_reads_the_released_layout(tmp_path):
    write_imagenet9(tmp_path, per_class=2, train_per_class=10)
    test = ImageNet9(tmp_path, "test", variant="mixed_rand")
    assert test.class_names == tuple(IMAGENET9_CLASSES) and test.num_classes == 9 and len(test) == 18
    assert test.labels.tolist() == [c for c in range(9) for _ in range(2)] and torch.equal(test.groups, test.labels)
    assert all(e.path.parent.parent == tmp_path / "mixed_rand" / "val" for e in test.entries)
    assert test[0].image.shape == (3, 16, 16)
    train, val = ImageNet9(tmp_path, "train"), ImageNet9(tmp_path, "val")
    by_class = {}
    for entry in train.entries + val.entries:
        by_class.setdefault(entry.label, []).append(entry.path.relative_to(tmp_path / "original/train").as_posix())
    assert {c: len(paths) for c, paths in by_class.items()} == dict.fromkeys(range(9), 10)
    assert set(relative(val, tmp_path / "original/train")) == carved_by_hand(by_class) and len(val) == 9
    variants = test.background_variants()
    assert list(variants) == [
        "original",
        "only_fg",
        "no_fg",
        "only_bg_b",
        "only_bg_t",
        "mixed_same",
        "mixed_rand",
        "mixed_next",
    ]
    assert all(v.split == "test" and len(v) == 18 for v in variants.values())
    with pytest.raises(FileNotFoundError, match=r"mixed_rand/train'.*the mixed_rand training data"):
        ImageNet9(tmp_path, "train", variant="mixed_rand")
    with pytest.raises(ValueError, match=r"variant: expected one of \('original', .*, got 'mixed'"):
        ImageNet9(tmp_path, "test", variant="mixed")
    (tmp_path / "only_fg" / "val" / "08_fish").rename(tmp_path / "only_fg" / "val" / "08_fishes")
    with pytest.raises(
        DatasetError, match="variant only_fg: expected the class folders .*'08_fish'.*got .*'08_fishes'"
    ):
        test.background_variants()


def _fake_tuxpaint(cache):
    """A tiny stand-in for the unpacked Debian packages: 2 water and 2 land birds, 1 water and 2 land photos."""
    root = wbl.assets_dir(cache)
    for name, colour in (
        ("duck", (255, 255, 0, 255)),
        ("pelican", (255, 0, 255, 255)),
        ("crow", (0, 0, 0, 255)),
        ("owl", (120, 60, 0, 255)),
    ):
        bird = Image.new("RGBA", (40, 30), (0, 0, 0, 0))
        bird.paste(Image.new("RGBA", (20, 10), colour), (10, 10))
        bird.save(_png(root / wbl.BIRDS_DIR / f"{name}.png", 0).with_suffix(".png"))
    for name, colour in (("ocean_waves", (0, 0, 200)), ("rocks", (90, 90, 90)), ("cliff", (0, 150, 0))):
        path = root / wbl.TEMPLATES_DIR / f"{name}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (120, 90), colour).save(path)


def test_waterbirds_lite_builds_from_the_cached_packages(tmp_path):
    _fake_tuxpaint(tmp_path)
    cfg = WaterbirdsLiteConfig(image_size=32, n_train=40, n_val=8, n_test=8)
    train = WaterbirdsLite("train", config=cfg, cache_dir=tmp_path)
    assert len(train) == 40 and train.group_names[1] == "landbird/water"
    images, masks = train.arrays["images"], train.arrays["fg_masks"].astype(bool)
    assert images.shape == (40, 32, 32, 3) and masks.any((1, 2)).all()
    # Masked pixels show the bird's colour; unmasked ones the background photo of the sampled place.
    for i in range(len(train)):
        bird = images[i][masks[i]].astype(int)
        background = images[i][~masks[i]].astype(int)
        bird_colours = {0: [(0, 0, 0), (120, 60, 0)], 1: [(255, 255, 0), (255, 0, 255)]}[int(train.labels[i])]
        assert min(np.abs(bird.mean(0) - c).max() for c in bird_colours) < 12
        if int(train.places[i]) == 1:
            assert np.abs(background.mean(0) - (0, 0, 200)).max() < 12
        else:
            assert background[:, 2].mean() < 100
    aligned = (train.labels == train.places).float().mean()
    assert aligned > 0.8
    test = WaterbirdsLite("test", config=cfg, cache_dir=tmp_path)
    assert torch.bincount(test.groups, minlength=4).tolist() == [2, 2, 2, 2]
    assert list((tmp_path / "waterbirds_lite").glob("*_train.npz"))
    again = WaterbirdsLite("train", config=cfg, cache_dir=tmp_path)
    assert np.array_equal(again.arrays["images"], images)
    other = WaterbirdsLite("train", config=dataclasses.replace(cfg, seed=1), cache_dir=tmp_path)
    assert not np.array_equal(other.arrays["images"], images)


def test_waterbirds_lite_names_the_setup_command_when_assets_are_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="scripts/setup_waterbirds_lite.sh"):
        WaterbirdsLite("train", cache_dir=tmp_path)
