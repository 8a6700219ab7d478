"""Self-describing checkpoints: the spec of a trained model and of its data, the one place that builds each from it.

A checkpoint of ``train.py`` (``best.pt`` and ``last.pt``) holds, next to the weights, ``spec = {"model": ...,
"data": ...}``: plain data only (str, int, float, bool, None, lists, tuples, dicts), so it loads with
``weights_only=True`` and rebuilds the model with no other input (:func:`load_model`).

Model spec (:func:`model_spec`):
    ``kind``: ``"two_stage"`` (a preset of :func:`faithful_vit.create_model`), ``"baseline"``
    (:class:`~faithful_vit.baseline.FullImageViT`) or ``"oracle"`` (:class:`~faithful_vit.baseline.OracleMaskViT`);
    ``name``: the model's name in the run folder; ``preset``: the two-stage preset (for the baseline and the oracle,
    the reference preset whose stage 2 sets their size); ``num_classes``; ``image_size``; ``config``: every
    :class:`~faithful_vit.FaithfulViTConfig` field (two-stage) or the ``VisionTransformer`` arguments (baseline,
    oracle); ``oracle_threshold`` (oracle).

Data spec (:func:`data_spec`, completed by :func:`describe_data`):
    ``name`` (``train.py --data``), ``data_dir``, ``mask_dir``, ``data_kwargs`` (the generator settings of the
    built-in datasets), ``image_size``, and ``class_names`` / ``group_names`` once the data was read.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import torch
import torch.nn as nn

__all__ = [
    "COMPARISON_MODELS",
    "SpecError",
    "build_dataset",
    "build_model",
    "data_spec",
    "describe_data",
    "find_checkpoints",
    "load_model",
    "model_spec",
]

COMPARISON_MODELS = ("baseline", "oracle")
MODEL_KINDS = ("two_stage", *COMPARISON_MODELS)
# ``model_kwargs`` that are VisionTransformer arguments of the comparison models rather than FaithfulViTConfig fields.
COMPARISON_VIT_KWARGS = ("global_pool",)
SPLITS = ("train", "val", "test")


class SpecError(ValueError):
    """A model or data spec, checkpoint or run folder that cannot be used as asked; the message names the input."""


# ----------------------------------------------------------------------------------------------------------------
# Models


def model_spec(
    name: str,
    *,
    num_classes: int,
    image_size: int,
    model_kwargs: dict | None = None,
    reference_model: str = "faithful_tiny",
    oracle_threshold: float = 0.5,
) -> dict:
    """The spec of a model to train: a two-stage preset, or the baseline / oracle at the reference preset's size.

    Args:
        name: a preset of :func:`faithful_vit.list_models`, ``"baseline"`` or ``"oracle"``.
        num_classes: classifier outputs.
        image_size: input side in pixels.
        model_kwargs: :class:`~faithful_vit.FaithfulViTConfig` overrides of the preset (of the reference preset
            for the baseline and the oracle); for the baseline and the oracle also :data:`COMPARISON_VIT_KWARGS`
            (``global_pool``: timm's ``"token"`` or ``"avg"`` pooling, see :data:`faithful_vit.baseline.GLOBAL_POOLS`).
        reference_model: the preset whose stage 2 sets the size of the baseline and the oracle.
        oracle_threshold: the oracle keeps a patch whose ground-truth foreground fraction exceeds this.

    Raises:
        TypeError, ValueError: an unknown preset or a bad override (from :func:`faithful_vit.get_config`).
    """
    from faithful_vit.baseline import vit_kwargs_like
    from faithful_vit.model import FaithfulViT
    from faithful_vit.registry import get_config

    overrides = {"num_classes": num_classes, "img_size": image_size, **(model_kwargs or {})}
    vit_overrides = {key: overrides.pop(key) for key in COMPARISON_VIT_KWARGS if key in overrides}
    spec = {"name": name, "num_classes": num_classes, "image_size": image_size}
    if name not in COMPARISON_MODELS:
        if vit_overrides:
            raise ValueError(
                f"{', '.join(vit_overrides)}: expected only for {' and '.join(COMPARISON_MODELS)} (a two-stage "
                f"model's stage 2 reads the class token), got {vit_overrides} for {name}"
            )
        config = dataclasses.asdict(get_config(name, **overrides))
        return {**spec, "kind": "two_stage", "preset": name, "config": config}
    reference = FaithfulViT(get_config(reference_model, **overrides))
    spec.update(kind=name, preset=reference_model, config={**vit_kwargs_like(reference.stage2), **vit_overrides})
    if name == "oracle":
        spec["oracle_threshold"] = float(oracle_threshold)
    return spec


def build_model(spec: dict, *, pretrained_file: str | None = None) -> nn.Module:
    """The (untrained) model a :func:`model_spec` describes, in training mode.

    Args:
        spec: a model spec.
        pretrained_file: local ViT weights loaded into both backbones of a two-stage model, or into the ViT of the
            baseline and the oracle.
    """
    from faithful_vit.baseline import FullImageViT, OracleMaskViT
    from faithful_vit.model import FaithfulViT, FaithfulViTConfig

    kind = spec.get("kind")
    if kind not in MODEL_KINDS:
        raise SpecError(f"model spec: kind: expected one of {MODEL_KINDS}, got {kind!r}")
    if kind == "two_stage":
        # The stored config is complete: the preset is not consulted, so a later change of a preset cannot alter it.
        model = FaithfulViT(FaithfulViTConfig(**spec["config"]))
        if pretrained_file is not None:
            model.load_backbone_weights(pretrained_file)
        return model
    if kind == "baseline":
        model = FullImageViT(spec["num_classes"], **spec["config"])
    else:
        model = OracleMaskViT(spec["num_classes"], threshold=spec["oracle_threshold"], **spec["config"])
    if pretrained_file is not None:
        model.load_backbone_weights(pretrained_file)
    return model


# ----------------------------------------------------------------------------------------------------------------
# Data


def data_spec(
    name: str,
    *,
    data_dir: str | None = None,
    mask_dir: str | None = None,
    data_kwargs: dict | None = None,
    img_size: int | None = None,
    reference_model: str = "faithful_tiny",
) -> dict:
    """The spec of a dataset (``train.py``'s data flags), with its image size resolved.

    Args:
        name: one of :func:`faithful_vit.data.list_datasets`.
        data_dir: dataset folder (datasets that read one).
        mask_dir: ground-truth masks folder (datasets that accept one).
        data_kwargs: generator settings (datasets with settings, e.g. synthetic, waterbirds_lite).
        img_size: image side of datasets without settings (default: the reference preset's).
        reference_model: the preset whose image size those datasets default to.

    Raises:
        SpecError: an unknown dataset or bad generator settings.
    """
    from faithful_vit.data import dataset_info, list_datasets
    from faithful_vit.registry import get_config

    if name not in list_datasets():
        raise SpecError(f"--data: expected one of {list_datasets()}, got {name!r}")
    data_kwargs = dict(data_kwargs or {})
    try:
        image_size = dataset_info(name).image_size(data_kwargs)
    except (TypeError, ValueError) as error:
        raise SpecError(f"--data {name}: {error}") from None
    if image_size is None:
        image_size = img_size or get_config(reference_model).img_size
    return {
        "name": name,
        "data_dir": None if data_dir is None else str(data_dir),
        "mask_dir": None if mask_dir is None else str(mask_dir),
        "data_kwargs": data_kwargs,
        "image_size": int(image_size),
    }


def build_dataset(spec: dict, split: str, *, augment: bool | None = None):
    """One split of the dataset a :func:`data_spec` describes.

    Args:
        spec: a data spec.
        split: ``"train"``, ``"val"`` or ``"test"``.
        augment: training augmentation (default: on the train split only).

    Raises:
        SpecError: a bad split, a missing folder, or a dataset that cannot be read (the message says which).
    """
    from faithful_vit.data import create_dataset, dataset_info

    if split not in SPLITS:
        raise SpecError(f"--split: expected one of {SPLITS}, got {split!r}")
    name, data_dir = spec["name"], spec["data_dir"]
    info = dataset_info(name)
    kwargs = dict(spec["data_kwargs"])
    if info.sized_by_model:
        kwargs["image_size"] = spec["image_size"]
    if info.accepts_mask_root:
        kwargs["mask_root"] = spec["mask_dir"]
    if info.needs_root and (data_dir is None or not Path(data_dir).is_dir()):
        raise SpecError(f"--data-dir: dataset folder not found: {data_dir}")
    try:
        return create_dataset(name, split, data_dir, augment=augment, **kwargs)
    except (FileNotFoundError, ValueError, TypeError) as error:
        raise SpecError(f"--data {name}: {error}") from None


def describe_data(spec: dict, dataset) -> dict:
    """``spec`` with the class and group names of ``dataset`` (classes without names are numbered)."""
    class_names = getattr(dataset, "class_names", None) or [str(label) for label in range(dataset.num_classes)]
    return {**spec, "class_names": list(class_names), "group_names": list(dataset.group_names)}


# ----------------------------------------------------------------------------------------------------------------
# Loading a trained model

_CHECKPOINT_PATTERNS = ("checkpoints/best.pt", "seed*/checkpoints/best.pt", "*/seed*/checkpoints/best.pt")


def find_checkpoints(path: str | Path) -> list[tuple[str | None, int | None, Path]]:
    """The selected checkpoints (``best.pt``) under a run folder, a model folder or a ``seed<s>`` folder.

    Returns:
        ``(model name, seed, path)`` per checkpoint, sorted; the name and seed are read from the folder layout
        ``<run>/<model>/seed<s>/checkpoints/best.pt`` (None where the path is shorter).
    """
    path = Path(path)
    found = []
    for pattern in _CHECKPOINT_PATTERNS:
        for checkpoint in sorted(path.glob(pattern)):
            seed_dir = checkpoint.parent.parent
            match = re.fullmatch(r"seed(\d+)", seed_dir.name)
            seed = int(match.group(1)) if match else None
            name = seed_dir.parent.name if match else None
            found.append((name, seed, checkpoint))
    return found


def resolve_checkpoint(path: str | Path, *, model: str | None = None, seed: int | None = None) -> Path:
    """The checkpoint file that ``path`` (a ``.pt`` file or a folder of a run) and ``model`` / ``seed`` select.

    Raises:
        SpecError: nothing there, or several candidates and ``model`` / ``seed`` do not pick one (the message lists
            the candidates).
    """
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise SpecError(f"checkpoint: no such file or run folder: {path}")
    found = find_checkpoints(path)
    if not found:
        raise SpecError(f"checkpoint: {path} holds no checkpoints/best.pt (expected a run folder of train.py)")
    chosen = [c for c in found if (model is None or c[0] == model) and (seed is None or c[1] == seed)]
    if len(chosen) == 1:
        return chosen[0][2]
    candidates = ", ".join(f"{name}/seed{s}" if name else str(p) for name, s, p in found)
    if not chosen:
        raise SpecError(f"checkpoint: no model {model!r} seed {seed!r} in {path}; it holds {candidates}")
    raise SpecError(
        f"checkpoint: {path} holds several models ({candidates}); choose one with model= and seed= (--model, --seed)"
    )


def load_model(
    path_or_run_dir: str | Path,
    *,
    model: str | None = None,
    seed: int | None = None,
    device: str | torch.device = "cpu",
) -> nn.Module:
    """Rebuild a model trained by ``train.py`` from its checkpoint alone and load its weights safely.

    Args:
        path_or_run_dir: a checkpoint (``best.pt`` or ``last.pt``), or a run folder, model folder or seed folder:
            its selected ``best.pt`` is used.
        model, seed: which model of a run folder that holds several (e.g. ``model="baseline", seed=0``).
        device: where to put the model.

    Returns:
        The model in evaluation mode. ``model.spec`` holds the checkpoint's spec: ``model`` (see
        :func:`model_spec`), ``data`` (the training data's :func:`data_spec` with ``class_names`` and
        ``group_names``), ``train_config`` (the evaluation settings of training: batch size, autocast, patch
        threshold; empty for a checkpoint that has none), ``checkpoint`` (its path) and ``epoch``.

    Raises:
        SpecError: no checkpoint, several candidates, a checkpoint without a spec, or weights that do not fit it.
        faithful_vit.run_folder.RunFolderError: the file is damaged or holds more than tensors and plain data.
    """
    from faithful_vit.run_folder import load_checkpoint

    path = resolve_checkpoint(path_or_run_dir, model=model, seed=seed)
    state = load_checkpoint(path)
    spec = state.get("spec") if isinstance(state, dict) else None
    if not isinstance(spec, dict) or "model" not in spec or "model" not in state:
        raise SpecError(
            f"checkpoint: {path} holds no model spec (written by an older train.py, or not a checkpoint of "
            "train.py); it cannot be rebuilt without one"
        )
    try:
        module = build_model(spec["model"])
    except (KeyError, TypeError, ValueError) as error:
        raise SpecError(f"checkpoint: {path}: its model spec cannot be built ({error})") from None
    try:
        module.load_state_dict(state["model"])
    except RuntimeError as error:
        first = str(error).splitlines()[0]
        raise SpecError(f"checkpoint: {path}: the weights do not fit the model its spec describes ({first})") from None
    module.eval().to(device)
    module.spec = {
        **spec,
        "train_config": dict(state.get("config", {})),
        "checkpoint": str(path),
        "epoch": state.get("epoch"),
    }
    return module
