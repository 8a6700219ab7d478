"""Evaluate a model on data labelled in other classes: a class map relabels every image with one of the model's classes.

``python -m faithful_vit.evaluate --class-map MAP`` takes one of:

* ``species``: the image's species folder names its class, the first folder of its file name, as Waterbirds'
  ``img_filename`` keeps CUB's (``001.Black_footed_Albatross/...``): a CUB-trained model on the Waterbirds images;
* a JSON file ``{"<class of the data>": "<class of the model>", ...}`` with an entry for every class of the data
  (several may name the same model class).

The relabelled data keeps its own groups, so group accuracy is the accuracy on the model's classes within each group
of the data (for Waterbirds: species accuracy per (bird type, place) group). A map that does not fit the data and
the model is refused (:class:`ValueError`, naming what it expected and what it found).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import torch

__all__ = ["CLASS_MAPS", "ClassMapped", "map_classes"]

CLASS_MAPS = ("species",)


class ClassMapped(torch.utils.data.Dataset):
    """``dataset`` with its labels replaced by ``targets`` (classes of the model), its groups kept.

    Attributes:
        class_names, num_classes: the model's classes; group_names: the data's groups.
    """

    def __init__(self, dataset, targets: list[int], class_names) -> None:
        self.dataset, self.targets = dataset, list(targets)
        self.class_names = tuple(class_names)
        self.num_classes = len(self.class_names)
        self.group_names = dataset.group_names

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        sample = self.dataset[index]
        return None if sample is None else sample._replace(label=self.targets[index])


def _species_targets(dataset, data_name: str, model_classes: tuple[str, ...]) -> list[int]:
    from faithful_vit.data.datasets import Waterbirds

    if not isinstance(dataset, Waterbirds):
        raise ValueError(
            f"--class-map species: expected --data waterbirds (its species folders), got --data {data_name}"
        )
    species = [entry.path.relative_to(dataset.root).parts[0] for entry in dataset.entries]
    unknown = Counter(name for name in species if name not in model_classes)
    if unknown:
        name, count = unknown.most_common(1)[0]
        raise ValueError(
            f"--class-map species: expected every species folder of the data among the model's {len(model_classes)} "
            f"classes (e.g. {model_classes[0]!r}), got {len(unknown)} that are not, e.g. {name!r} ({count} images)"
        )
    index = {name: label for label, name in enumerate(model_classes)}
    return [index[name] for name in species]


def _file_targets(dataset, path: str, data_name: str, model_classes: tuple[str, ...]) -> list[int]:
    data_classes = tuple(getattr(dataset, "class_names", None) or ())
    if not data_classes:
        raise ValueError(f"--class-map {path}: expected data with class names, got --data {data_name} without them")
    try:
        mapping = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        reason = str(error).splitlines()[0]
        raise ValueError(
            f"--class-map: expected one of {CLASS_MAPS} or a JSON file {{data class: model class}}, got {path!r} "
            f"({reason})"
        ) from None
    if not isinstance(mapping, dict) or not all(isinstance(v, str) for v in mapping.values()):
        raise ValueError(f"--class-map {path}: expected a JSON object of class names, got {type(mapping).__name__}")
    missing = [name for name in data_classes if name not in mapping]
    if missing:
        raise ValueError(
            f"--class-map {path}: expected a model class for every class of --data {data_name} "
            f"{list(data_classes)}, got none for {missing}"
        )
    wrong = {name: mapping[name] for name in data_classes if mapping[name] not in model_classes}
    if wrong:
        raise ValueError(
            f"--class-map {path}: expected classes of the model {list(model_classes)[:10]}, got {wrong} for the "
            "data's classes"
        )
    index = {name: label for label, name in enumerate(model_classes)}
    labels = dataset.labels.tolist() if hasattr(dataset, "labels") else [sample.label for sample in dataset]
    return [index[mapping[data_classes[label]]] for label in labels]


def map_classes(dataset, class_map: str, model_classes, data_name: str) -> ClassMapped:
    """``dataset`` relabelled with the model's classes by ``class_map`` (see the module docstring).

    Args:
        dataset: the evaluation split.
        class_map: ``"species"`` or the path of a JSON file.
        model_classes: the model's class names in label order (its checkpoint's ``spec["data"]["class_names"]``).
        data_name: the dataset's registered name (for the messages).

    Raises:
        ValueError: the map does not fit the data or the model.
    """
    model_classes = tuple(model_classes or ())
    if not model_classes:
        raise ValueError(f"--class-map {class_map}: expected a model whose checkpoint names its classes, got none")
    if class_map == "species":
        targets = _species_targets(dataset, data_name, model_classes)
    else:
        targets = _file_targets(dataset, class_map, data_name, model_classes)
    return ClassMapped(dataset, targets, model_classes)
