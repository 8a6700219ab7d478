"""Loaders for the paper's datasets in their published on-disk formats, all returning :class:`Sample`.

- :class:`Waterbirds`: ``metadata.csv`` (``img_id,img_filename,y,split,place,place_filename``; split 0/1/2 =
  train/val/test), group ``y * 2 + place``; optional masks from a CUB-style ``segmentations`` folder.
- :class:`CUB200`: CUB-200-2011 (``images.txt``, ``image_class_labels.txt``, ``train_test_split.txt``,
  ``classes.txt``, ``images/``; optional ``segmentations/``), group == label; validation carved from the official
  training split; :meth:`CUB200.part_keypoints` reads the part keypoints (``parts/``, ``bounding_boxes.txt``).
- :class:`MetaShiftCatDog`: the DISC ImageFolder layout ``<split>/{cat,dog}/[<context>/]*.jpg``; with context
  sub-folders the group is ``label * num_places + place`` over the sorted context names, else group == label;
  validation carved from ``train/`` where the folder has no ``val/``.
- :class:`ImageFolder`: ``<root>/<class>/*.<ext>`` (sorted class names), group == label.
- :class:`ImageNet9`: the backgrounds challenge of Xiao et al. (ICLR 2021), ``<root>/<variant>/val/<NN_class>/*``
  for the test images of each of :data:`IMAGENET9_VARIANTS`, ``<root>/<variant>/train/`` for training; group == label.

Images are decoded with PIL to float ``[3,H,W]`` in [0,1], passed with their mask through the joint ``transform``
(see :mod:`faithful_vit.data.transforms`, e.g. ``cub_original(518, train=True)``), then normalised with
ImageNet statistics.

Corrupt images: a file that exists but cannot be decoded raises :class:`CorruptImageError` (``on_corrupt="raise"``,
the default). With ``on_corrupt="skip"`` the dataset warns once per file and returns None for that index;
:func:`~faithful_vit.data.sample.collate` drops None samples and reports how many it dropped in
``Batch.num_skipped`` (and returns None when the whole batch was corrupt), so a training loop counts and skips them.
Carved validation (:func:`split_off_validation`, for the datasets published without a validation split): of every
group's training images, the ``floor(VAL_FRACTION * n)`` (at least one where the group has two or more) whose
SHA-256 of the path relative to the dataset folder is smallest form the validation split, the rest stay in the
training split. The rule depends on the file names alone: not on the order the files are listed in, not on any random
state; adding images to one group changes no other group's choice, and the test split is never read.

Broken datasets raise :class:`DatasetError` when the dataset is built, naming the file and row: a missing image or
mask file (or a path that is a folder), a path that leaves the dataset folder (absolute or with ``..``), a label or
place outside the class/place range, a malformed row.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import os
import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from torchvision import tv_tensors

from faithful_vit.data.registry import register_dataset
from faithful_vit.data.sample import CorruptImageError, Sample, normalize
from faithful_vit.data.transforms import ImageMaskTransform, cub_original


class DatasetError(ValueError):
    """A dataset on disk is broken; the message names the file (and row) at fault."""


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp", ".tif", ".tiff")
WATERBIRDS_SPLITS = {"train": 0, "val": 1, "test": 2}
# The share of each group's training images carved out for validation where a dataset has no validation split.
VAL_FRACTION = 0.1


def load_image(path: str | os.PathLike, mode: str = "RGB") -> torch.Tensor:
    """Decode an image file to float ``[C,H,W]`` in [0, 1] (C = 3 for ``"RGB"``, 1 for ``"L"``).

    Raises:
        FileNotFoundError: the file does not exist.
        CorruptImageError: the file exists but PIL cannot decode it.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        problem = "is a folder, not a file" if os.path.isdir(path) else "not found"
        raise FileNotFoundError(f"image file {problem}: {path!r}")
    try:
        with Image.open(path) as img:
            array = np.asarray(img.convert(mode), dtype=np.uint8)
    except (OSError, SyntaxError, ValueError) as exc:  # PIL's UnidentifiedImageError is an OSError
        raise CorruptImageError(path, f"{type(exc).__name__}: {exc}") from exc
    tensor = torch.from_numpy(array.copy())
    tensor = tensor[None] if tensor.dim() == 2 else tensor.permute(2, 0, 1)
    return tensor.float().div_(255)


class Entry(NamedTuple):
    """One indexed example: image path, label, group, optional mask path, and where it was read from (for errors:
    e.g. ``metadata.csv:7``)."""

    path: Path
    label: int
    group: int
    mask_path: Path | None = None
    source: str = ""


class ImageListDataset(torch.utils.data.Dataset):
    """A list of :class:`Entry` decoded on access into :class:`Sample` (the shared implementation of the loaders).

    Args:
        entries: the examples.
        num_classes, group_names: dataset metadata (``num_groups = len(group_names)``).
        transform: joint ``(image [3,H,W] in [0,1], mask [1,H,W] or None) -> (image, mask)``; images of different
            sizes need a transform that fixes the size before batching.
        on_corrupt: ``"raise"`` (:class:`CorruptImageError`) or ``"skip"`` (warn once, return None).

    Raises:
        DatasetError: an image or mask file is missing (or is a folder), or a label or group is out of range.
    """

    def __init__(self, entries, *, num_classes: int, group_names, transform=None, on_corrupt: str = "raise") -> None:
        if on_corrupt not in ("raise", "skip"):
            raise ValueError(f"on_corrupt must be 'raise' or 'skip', got {on_corrupt!r}")
        self.entries = list(entries)
        self.num_classes = num_classes
        self.group_names = tuple(group_names)
        self.num_groups = len(self.group_names)
        self.transform = transform
        self.on_corrupt = on_corrupt
        self._warned: set[str] = set()
        for entry in self.entries:
            self._check(entry)

    def _check(self, entry: Entry) -> None:
        where = f"{entry.source}: " if entry.source else ""
        if not 0 <= entry.label < self.num_classes:
            raise DatasetError(f"{where}label: expected 0..{self.num_classes - 1}, got {entry.label} ({entry.path})")
        if not 0 <= entry.group < self.num_groups:
            raise DatasetError(f"{where}group: expected 0..{self.num_groups - 1}, got {entry.group} ({entry.path})")
        for kind, path in (("image", entry.path), ("mask", entry.mask_path)):
            if path is not None and not os.path.isfile(path):
                problem = "is a folder, not a file" if os.path.isdir(path) else "not found"
                raise DatasetError(f"{where}{kind} file {problem}: {str(path)!r}")

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def labels(self) -> torch.Tensor:
        return torch.tensor([e.label for e in self.entries], dtype=torch.int64)

    @property
    def groups(self) -> torch.Tensor:
        return torch.tensor([e.group for e in self.entries], dtype=torch.int64)

    def __getitem__(self, index: int) -> Sample | None:
        entry = self.entries[index]
        try:
            image = load_image(entry.path)
            mask = None if entry.mask_path is None else load_image(entry.mask_path, mode="L")
        except CorruptImageError as exc:
            if self.on_corrupt == "raise":
                raise
            if exc.path not in self._warned:
                self._warned.add(exc.path)
                warnings.warn(f"skipping corrupt image: {exc}", stacklevel=2)
            return None
        if mask is not None and mask.shape[-2:] != image.shape[-2:]:
            mask = torch.nn.functional.interpolate(mask[None], size=image.shape[-2:], mode="bilinear")[0]
        if self.transform is not None:
            image, mask = self.transform(image, mask)
        return Sample(normalize(image), entry.label, entry.group, mask)


def split_off_validation(entries, root: Path, split: str, fraction: float = VAL_FRACTION) -> list[Entry]:
    """The ``"train"`` or ``"val"`` part of training ``entries`` under the carving rule of the module docstring.

    Args:
        entries: the training split's examples (each ``path`` inside ``root``), in the order to keep.
        root: the folder the paths are hashed relative to.
        split: ``"train"`` (the images that stay) or ``"val"`` (the carved images).
        fraction: the share of each group's images carved out.
    """
    if split not in ("train", "val"):
        raise ValueError(f"split: expected 'train' or 'val', got {split!r}")
    by_group: dict[int, list[Entry]] = {}
    for entry in entries:
        by_group.setdefault(entry.group, []).append(entry)
    carved = set()
    for members in by_group.values():
        count = max(1, int(len(members) * fraction)) if len(members) >= 2 else 0
        ranked = sorted(members, key=lambda e: hashlib.sha256(e.path.relative_to(root).as_posix().encode()).digest())
        carved.update(entry.path for entry in ranked[:count])
    return [entry for entry in entries if (entry.path in carved) == (split == "val")]


def _read_table(path: Path) -> dict[str, tuple[str, str]]:
    """A whitespace-separated CUB metadata file of ``<image id> <value>`` lines: id -> (value, ``"file:line"``)."""
    if not path.is_file():
        raise FileNotFoundError(f"CUB metadata file not found: {str(path)!r}")
    rows = {}
    for line_no, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            fields = line.split(maxsplit=1)
            where = f"{path}:{line_no}"
            if len(fields) != 2:
                raise DatasetError(f"{where}: expected 2 fields, got {line!r}")
            if fields[0] in rows:
                raise DatasetError(f"{where}: id {fields[0]} already given on {rows[fields[0]][1]}")
            rows[fields[0]] = (fields[1].strip(), where)
    return rows


def _parse_int(value, column: str, where: str, allowed: range | None = None) -> int:
    """A metadata field as an int (in ``allowed`` if given); anything else is a :class:`DatasetError` naming the row."""
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = None
    if number is None or (allowed is not None and number not in allowed):
        expected = "an integer" if allowed is None else f"an integer in {allowed.start}..{allowed.stop - 1}"
        raise DatasetError(f"{where}: {column}: expected {expected}, got {value!r}")
    return number


def _relative_path(value, column: str, where: str) -> str:
    """A file name from a metadata row, refused unless it stays inside the dataset folder."""
    if not value or not value.strip():
        raise DatasetError(f"{where}: {column}: expected a file name, got {value!r}")
    parts = Path(value).parts
    if Path(value).is_absolute() or Path(value).drive or ".." in parts:
        raise DatasetError(
            f"{where}: {column}: expected a path inside the dataset folder (relative, without '..'), got {value!r}"
        )
    return value


def _mask_path(mask_root: Path | None, relative: str) -> Path | None:
    """CUB segmentation layout: ``<mask_root>/<class dir>/<name>.png`` for image ``<class dir>/<name>.jpg``."""
    return None if mask_root is None else (mask_root / relative).with_suffix(".png")


class Waterbirds(ImageListDataset):
    """Waterbirds (Sagawa et al.) from ``<root>/metadata.csv``; images at ``<root>/<img_filename>``.

    Args:
        root: the dataset folder (e.g. ``waterbird_complete95_forest2water2``).
        split: ``"train"``, ``"val"`` or ``"test"`` (metadata split 0/1/2).
        mask_root: optional CUB ``segmentations`` folder (the Waterbirds images keep CUB's file names); every
            selected image must then have a mask.
        transform, on_corrupt: see :class:`ImageListDataset`.
    """

    num_places = 2
    class_names = ("landbird", "waterbird")
    place_names = ("land", "water")

    def __init__(self, root, split: str = "train", *, mask_root=None, transform=None, on_corrupt="raise") -> None:
        if split not in WATERBIRDS_SPLITS:
            raise ValueError(f"split must be one of {tuple(WATERBIRDS_SPLITS)}, got {split!r}")
        root = Path(root)
        metadata = root / "metadata.csv"
        if not metadata.is_file():
            raise FileNotFoundError(f"Waterbirds metadata not found: {str(metadata)!r}")
        mask_root = None if mask_root is None else Path(mask_root)
        entries = []
        with open(metadata, newline="") as f:
            reader = csv.DictReader(f)
            missing = {"img_filename", "y", "split", "place"} - set(reader.fieldnames or ())
            if missing:
                raise ValueError(f"{metadata}: missing columns {sorted(missing)}; got {reader.fieldnames}")
            for row in reader:
                where = f"{metadata}:{reader.line_num}"  # every row is checked, whichever split it is in
                row_split = _parse_int(row["split"], "split", where, range(3))
                name = _relative_path(row["img_filename"], "img_filename", where)
                y = _parse_int(row["y"], "y", where, range(len(self.class_names)))
                place = _parse_int(row["place"], "place", where, range(self.num_places))
                if row_split != WATERBIRDS_SPLITS[split]:
                    continue
                entries.append(
                    Entry(root / name, y, y * self.num_places + place, _mask_path(mask_root, name), source=where)
                )
        group_names = [f"{c}/{p}" for c in self.class_names for p in self.place_names]
        super().__init__(entries, num_classes=2, group_names=group_names, transform=transform, on_corrupt=on_corrupt)
        self.root = root
        self.places = torch.tensor([e.group % self.num_places for e in self.entries], dtype=torch.int64)


class CUB200(ImageListDataset):
    """CUB-200-2011 with its official train/test split; labels 0..199, group == label.

    CUB has no validation split: ``"val"`` is :data:`VAL_FRACTION` (10 %) of every class's official training images,
    carved by :func:`split_off_validation` (about 3 of the 30 per class), and ``"train"`` is the rest. ``"test"`` is
    the official test split, untouched.

    Args:
        root: the ``CUB_200_2011`` folder holding ``images.txt``, ``image_class_labels.txt``,
            ``train_test_split.txt``, ``classes.txt`` and ``images/``.
        split: ``"train"``, ``"val"`` or ``"test"``.
        mask_root: optional ``segmentations`` folder; ``True`` means ``<root>/segmentations`` (or its sibling
            ``<root>/../segmentations``, the layout of the separate download).
        transform, on_corrupt: see :class:`ImageListDataset`.
    """

    def __init__(self, root, split: str = "train", *, mask_root=None, transform=None, on_corrupt="raise") -> None:
        if split not in ("train", "val", "test"):
            raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
        root = Path(root)
        if mask_root is True:
            candidates = [root / "segmentations", root.parent / "segmentations"]
            mask_root = next((c for c in candidates if c.is_dir()), None)
            if mask_root is None:
                raise FileNotFoundError(f"no segmentations folder at {[str(c) for c in candidates]}")
        mask_root = None if mask_root is None else Path(mask_root)
        paths = _read_table(root / "images.txt")
        labels = _read_table(root / "image_class_labels.txt")
        is_train = _read_table(root / "train_test_split.txt")
        classes = _read_table(root / "classes.txt")
        class_ids = sorted(
            _parse_int(c, "class id", where, range(1, len(classes) + 1)) for c, (_, where) in classes.items()
        )
        if class_ids != list(range(1, len(classes) + 1)):  # a repeated id, spelled differently (e.g. 01 and 1)
            raise DatasetError(f"{root / 'classes.txt'}: expected class ids 1..{len(classes)}, each once")
        self.class_names = tuple(name for _, (name, _) in sorted(classes.items(), key=lambda item: int(item[0])))
        want_train = split != "test"
        entries = []
        for i in sorted(paths, key=lambda i: _parse_int(i, "image id", paths[i][1])):
            name = _relative_path(paths[i][0], "image name", paths[i][1])
            for table, file in ((labels, "image_class_labels.txt"), (is_train, "train_test_split.txt")):
                if i not in table:
                    raise DatasetError(f"{paths[i][1]}: image id {i} has no line in {root / file}")
            label = _parse_int(labels[i][0], "class id", labels[i][1], range(1, len(classes) + 1)) - 1
            if bool(_parse_int(is_train[i][0], "is_training_image", is_train[i][1], range(2))) == want_train:
                source = paths[i][1]
                entries.append(Entry(root / "images" / name, label, label, _mask_path(mask_root, name), source=source))
        if want_train:
            entries = split_off_validation(entries, root / "images", split)
        super().__init__(
            entries, num_classes=len(classes), group_names=self.class_names, transform=transform, on_corrupt=on_corrupt
        )
        self.root = root

    def part_keypoints(self) -> PartKeypoints:
        """The part keypoints and bird boxes of this split's images, in the frame of the images it returns.

        Reads ``parts/parts.txt``, ``parts/part_locs.txt`` and ``bounding_boxes.txt`` (see :func:`read_part_keypoints`).
        The dataset's transform must be deterministic (an evaluation transform): the points go through it on their
        own, without the image.
        """
        return read_part_keypoints(self.root, [entry.path for entry in self.entries], self.transform)


class PartKeypoints(NamedTuple):
    """Part keypoints of a split's images (index ``i`` is the dataset's image ``i``), in the returned images' pixels.

    Attributes:
        names: the ``P`` part names, in part id order (``parts/parts.txt``).
        points: ``[N, P, 2]`` float64 ``(x, y)`` (meaningless where not visible).
        visible: ``[N, P]`` bool, annotated visible and inside the image after the transform.
        boxes: ``[N, 4]`` float64 ``(x, y, width, height)`` of the bird's bounding box: the corner clamped to the
            image, the size as scaled by the transform (PDiscoFormer's convention under a centre crop).
    """

    names: tuple[str, ...]
    points: torch.Tensor
    visible: torch.Tensor
    boxes: torch.Tensor


def _read_part_locs(path: Path, num_parts: int) -> dict[str, np.ndarray]:
    """``<image id> <part id> <x> <y> <visible>`` lines -> image id -> ``[P, 3]`` float64 ``(x, y, visible)``."""
    locations: dict[str, np.ndarray] = {}
    given: dict[tuple[str, int], str] = {}
    for line_no, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{line_no}"
        fields = line.split()
        if len(fields) != 5:
            raise DatasetError(f"{where}: expected 5 fields (image id, part id, x, y, visible), got {line!r}")
        image_id = fields[0]
        part = _parse_int(fields[1], "part id", where, range(1, num_parts + 1))
        visible = _parse_int(fields[4], "visible", where, range(2))
        try:
            x, y = float(fields[2]), float(fields[3])
        except ValueError:
            raise DatasetError(f"{where}: x, y: expected numbers, got {fields[2]!r}, {fields[3]!r}") from None
        if (image_id, part) in given:
            raise DatasetError(f"{where}: image {image_id} part {part} already given on {given[image_id, part]}")
        given[image_id, part] = where
        row = locations.setdefault(image_id, np.zeros((num_parts, 3)))
        row[part - 1] = (x, y, visible)
    for image_id in locations:
        missing = [part for part in range(1, num_parts + 1) if (image_id, part) not in given]
        if missing:
            raise DatasetError(f"{path}: image {image_id} has no line for part id(s) {missing}")
    return locations


def read_part_keypoints(root, image_paths, transform) -> PartKeypoints:
    """The part keypoints of the CUB images ``image_paths`` (under ``<root>/images``), moved by ``transform``.

    Args:
        root: the ``CUB_200_2011`` folder (``images.txt``, ``parts/parts.txt``, ``parts/part_locs.txt``,
            ``bounding_boxes.txt``).
        image_paths: the images, in dataset order.
        transform: the dataset's deterministic :class:`~faithful_vit.data.transforms.ImageMaskTransform`, or None.

    Raises:
        FileNotFoundError: a file is missing. DatasetError: a malformed line, or an image without every part or box.
    """
    if transform is not None and not isinstance(transform, ImageMaskTransform):
        raise TypeError(
            f"transform: expected an ImageMaskTransform (torchvision v2) to move the keypoints, got "
            f"{type(transform).__name__}"
        )
    root = Path(root)
    for required in ("part_locs.txt", "parts.txt"):
        if not (root / "parts" / required).is_file():
            raise FileNotFoundError(f"CUB part keypoints not found: {str(root / 'parts' / required)!r}")
    names = _read_table(root / "parts" / "parts.txt")
    part_ids = sorted(_parse_int(i, "part id", where, range(1, len(names) + 1)) for i, (_, where) in names.items())
    if part_ids != list(range(1, len(names) + 1)):
        raise DatasetError(f"{root / 'parts' / 'parts.txt'}: expected part ids 1..{len(names)}, each once")
    part_names = tuple(name for _, (name, _) in sorted(names.items(), key=lambda item: int(item[0])))
    locations = _read_part_locs(root / "parts" / "part_locs.txt", len(part_names))
    boxes = _read_table(root / "bounding_boxes.txt")
    image_ids = {(root / "images" / name).as_posix(): i for i, (name, _) in _read_table(root / "images.txt").items()}
    points, visible, corners = [], [], []
    for path in image_paths:
        image_id = image_ids[Path(path).as_posix()]
        if image_id not in locations:
            raise DatasetError(f"{root / 'parts' / 'part_locs.txt'}: image id {image_id} has no keypoints")
        if image_id not in boxes:
            raise DatasetError(f"{root / 'bounding_boxes.txt'}: image id {image_id} has no box")
        box, where = boxes[image_id]
        try:
            x, y, width, height = (float(value) for value in box.split())
        except ValueError:
            raise DatasetError(f"{where}: expected x y width height, got {box!r}") from None
        with Image.open(path) as image:
            canvas = (image.height, image.width)
        location = torch.from_numpy(locations[image_id])
        # The box travels as its two corners, so that its size is scaled but not cut by a crop.
        moved = torch.cat([location[:, :2], torch.tensor([[x, y], [x + width, y + height]], dtype=torch.float64)])
        if transform is not None:
            moved = transform.transform(tv_tensors.KeyPoints(moved, canvas_size=canvas))
            canvas = moved.canvas_size
            moved = moved.as_subclass(torch.Tensor)
        size = torch.tensor([canvas[1], canvas[0]], dtype=torch.float64)  # (width, height)
        part_points, corner, far = moved[:-2], moved[-2], moved[-1]
        inside = ((part_points >= 0) & (part_points < size)).all(dim=1)
        points.append(part_points)
        visible.append((location[:, 2] > 0) & inside)
        corners.append(torch.cat([torch.minimum(corner.clamp(min=0), size), far - corner]))
    if not points:
        empty = torch.zeros(0, len(part_names), 2, dtype=torch.float64)
        return PartKeypoints(part_names, empty, empty[..., 0].bool(), torch.zeros(0, 4, dtype=torch.float64))
    return PartKeypoints(part_names, torch.stack(points), torch.stack(visible), torch.stack(corners))


def _list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


class ImageFolder(ImageListDataset):
    """``<root>/<class>/*.<image ext>`` with classes in sorted order; group == label.

    Args:
        root: the folder of class folders.
        class_names: the classes to use, in label order (default: every sub-folder, sorted).
        transform, on_corrupt: see :class:`ImageListDataset`.
    """

    def __init__(self, root, *, class_names=None, transform=None, on_corrupt="raise") -> None:
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"ImageFolder root not found: {str(root)!r}")
        self.class_names = tuple(class_names or sorted(p.name for p in root.iterdir() if p.is_dir()))
        if not self.class_names:
            raise ValueError(f"ImageFolder root {str(root)!r} has no class sub-folders")
        entries = []
        for label, name in enumerate(self.class_names):
            if not (root / name).is_dir():
                raise FileNotFoundError(f"class folder not found: {str(root / name)!r}")
            entries += [
                Entry(p, label, label)
                for p in sorted((root / name).rglob("*"))
                if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
            ]
        super().__init__(
            entries,
            num_classes=len(self.class_names),
            group_names=self.class_names,
            transform=transform,
            on_corrupt=on_corrupt,
        )


class MetaShiftCatDog(ImageListDataset):
    """MetaShift cat-vs-dog in the DISC layout: ``<root>/<split>/{cat,dog}/[<context>/]*.jpg``.

    The paper's setting trains on cat(bed, sofa) and dog(bench, bike) and tests on cat(shelf) and dog(shelf). When
    the class folders have context sub-folders, ``place`` indexes the sorted context names found under ``root``
    (all splits, so indices agree between splits) and ``group = label * num_places + place``; groups absent from a
    split simply have no samples. Without context folders, group == label.

    The published layout has ``train/`` and ``test/`` only. Without a ``val/`` folder, ``"val"`` is
    :data:`VAL_FRACTION` (10 %) of every group's images in ``train/``, carved by :func:`split_off_validation`, and
    ``"train"`` is the rest; a ``val/`` folder, where there is one, is used as it is (and ``train/`` whole).

    Args:
        root: the folder holding the split folders.
        split: a split folder name (``"train"``, ``"val"``, ``"test"``).
        transform, on_corrupt: see :class:`ImageListDataset`.
    """

    class_names = ("cat", "dog")

    def __init__(self, root, split: str = "train", *, transform=None, on_corrupt="raise") -> None:
        root = Path(root)
        carve = split in ("train", "val") and not (root / "val").is_dir()
        split_dir = root / ("train" if carve else split)
        if not split_dir.is_dir():
            raise FileNotFoundError(f"MetaShift split folder not found: {str(split_dir)!r}")
        contexts = sorted(
            {
                p.name
                for s in root.iterdir()
                if s.is_dir()
                for c in self.class_names
                if (s / c).is_dir()
                for p in (s / c).iterdir()
                if p.is_dir()
            }
        )
        self.place_names = tuple(contexts)
        self.num_places = max(1, len(contexts))
        entries = []
        for label, name in enumerate(self.class_names):
            class_dir = split_dir / name
            if not class_dir.is_dir():
                raise FileNotFoundError(f"MetaShift class folder not found: {str(class_dir)!r}")
            if contexts:
                for ctx_dir in sorted(p for p in class_dir.iterdir() if p.is_dir()):
                    place = contexts.index(ctx_dir.name)
                    entries += [Entry(p, label, label * self.num_places + place) for p in _list_images(ctx_dir)]
            else:
                entries += [Entry(p, label, label) for p in _list_images(class_dir)]
        if carve:
            entries = split_off_validation(entries, split_dir, split)
        group_names = [f"{c}/{p}" for c in self.class_names for p in contexts] if contexts else self.class_names
        super().__init__(entries, num_classes=2, group_names=group_names, transform=transform, on_corrupt=on_corrupt)


IMAGENET9_VARIANTS = (
    "original",
    "only_fg",
    "no_fg",
    "only_bg_b",
    "only_bg_t",
    "mixed_same",
    "mixed_rand",
    "mixed_next",
)


class ImageNet9(ImageListDataset):
    """ImageNet-9 and its background variants (Xiao et al., "Noise or Signal", ICLR 2021); group == label.

    The release unpacks to ``bg_challenge/<variant>/val/<class>/*.JPEG`` with the class folders ``00_dog`` ..
    ``08_fish`` (sorted: the label order) and the variants of :data:`IMAGENET9_VARIANTS`: ``original``, ``only_fg``
    (the segmented object on black), ``no_fg`` (the object cut out, black), ``only_bg_b`` / ``only_bg_t`` (the
    background alone, the object's bounding box black or filled with tiles of the background), ``mixed_same`` /
    ``mixed_rand`` / ``mixed_next`` (the object on the tiled background of an image of the same class, of a random
    class, of the next class). Those ``val`` folders are the test images:
    ``"test"`` reads ``<root>/<variant>/val``. The training data is a separate download per variant; put only its
    ``train/`` folder into ``<root>/<variant>/`` (its own validation images are not the test set and must not
    replace it). ``"train"`` and ``"val"`` read ``<root>/<variant>/train``, with :data:`VAL_FRACTION` (10 %) of every
    class carved out for ``"val"`` by :func:`split_off_validation`.

    Args:
        root: the ``bg_challenge`` folder.
        split: ``"train"``, ``"val"`` or ``"test"``.
        variant: one of :data:`IMAGENET9_VARIANTS`.
        transform, on_corrupt: see :class:`ImageListDataset`.
    """

    def __init__(self, root, split="test", *, variant="original", transform=None, on_corrupt="raise") -> None:
        if split not in ("train", "val", "test"):
            raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
        if variant not in IMAGENET9_VARIANTS:
            raise ValueError(f"variant: expected one of {IMAGENET9_VARIANTS}, got {variant!r}")
        self.root, self.split, self.variant = Path(root), split, variant
        folder = self.root / variant / ("val" if split == "test" else "train")
        if not folder.is_dir():
            download = "the release's test images" if split == "test" else f"the {variant} training data"
            raise FileNotFoundError(f"ImageNet-9 folder not found: {str(folder)!r} ({download})")
        self.class_names = tuple(sorted(p.name for p in folder.iterdir() if p.is_dir()))
        if not self.class_names:
            raise DatasetError(f"ImageNet-9 folder {str(folder)!r} has no class folders")
        entries = [
            Entry(path, label, label)
            for label, name in enumerate(self.class_names)
            for path in _list_images(folder / name)
        ]
        if split != "test":
            entries = split_off_validation(entries, folder, split)
        super().__init__(
            entries,
            num_classes=len(self.class_names),
            group_names=self.class_names,
            transform=transform,
            on_corrupt=on_corrupt,
        )

    def background_variants(self) -> dict[str, ImageNet9]:
        """This split of every variant of :data:`IMAGENET9_VARIANTS`, read as this one is (the backgrounds protocol).

        Raises:
            FileNotFoundError: a variant's folder is missing; DatasetError: a variant's classes differ from this one's.
        """
        variants = {}
        for variant in IMAGENET9_VARIANTS:
            dataset = ImageNet9(
                self.root, self.split, variant=variant, transform=self.transform, on_corrupt=self.on_corrupt
            )
            if dataset.class_names != self.class_names:
                raise DatasetError(
                    f"ImageNet-9 variant {variant}: expected the class folders {list(self.class_names)} of "
                    f"{self.variant}, got {list(dataset.class_names)}"
                )
            variants[variant] = dataset
        return variants


@dataclasses.dataclass(frozen=True)
class ImageNet9Settings:
    """``--data-kwargs`` of ``imagenet9``: which variant the splits read (the image side follows the model)."""

    variant: str = "original"

    def __post_init__(self) -> None:
        if self.variant not in IMAGENET9_VARIANTS:
            raise ValueError(f"variant: expected one of {IMAGENET9_VARIANTS}, got {self.variant!r}")


@register_dataset(
    "waterbirds",
    summary="Waterbirds in --data-dir (metadata.csv); masks from --mask-dir (CUB segmentations)",
    needs_root=True,
    accepts_mask_root=True,
)
def _waterbirds(split, root, *, augment, image_size, mask_root=None):
    return Waterbirds(root, split, mask_root=mask_root, transform=cub_original(image_size, train=augment))


@register_dataset(
    "cub",
    summary="CUB-200-2011 in --data-dir (val: 10% of train per class); masks from --mask-dir (its segmentations)",
    needs_root=True,
    accepts_mask_root=True,
    has_groups=False,
)
def _cub(split, root, *, augment, image_size, mask_root=None):
    return CUB200(root, split, mask_root=mask_root, transform=cub_original(image_size, train=augment))


@register_dataset(
    "metashift", summary="MetaShift cat/dog in --data-dir (DISC layout; val: 10% of train per group)", needs_root=True
)
def _metashift(split, root, *, augment, image_size):
    return MetaShiftCatDog(root, split, transform=cub_original(image_size, train=augment))


@register_dataset(
    "imagefolder", summary="<--data-dir>/{train,val,test}/<class>/*, group = class", needs_root=True, has_groups=False
)
def _imagefolder(split, root, *, augment, image_size):
    return ImageFolder(Path(root) / split, transform=cub_original(image_size, train=augment))


@register_dataset(
    "imagenet9",
    summary="ImageNet-9 backgrounds challenge in --data-dir (bg_challenge/; --data-kwargs variant=mixed_rand)",
    needs_root=True,
    settings=ImageNet9Settings,
    has_groups=False,
)
def _imagenet9(split, root, *, augment, image_size, variant="original"):
    return ImageNet9(root, split, variant=variant, transform=cub_original(image_size, train=augment))
