"""Load a local timm checkpoint into a timm backbone (never from a hub): ``--pretrained-file`` of every model."""

from __future__ import annotations

from timm.models import eva, load_state_dict, vision_transformer
from torch import nn

__all__ = ["load_backbone_file"]

# Heads are task-specific: a pretrained file's classifier never fits, and an average-pooled ViT's fc_norm is new.
_FRESH = ("head.", "fc_norm.")


def load_backbone_file(backbone: nn.Module, path: str, *, name: str) -> None:
    """Load ``path`` into ``backbone`` (a timm ``VisionTransformer`` or ``Eva``, e.g. DINOv3).

    Position embeddings are resampled to the backbone's grid by timm's checkpoint filter of its family, the
    classifier and ``fc_norm`` are left as initialised, and so is the file's ``norm`` when the backbone has none (an
    average-pooled ViT loading a token-pooled checkpoint). Every other weight must fit.

    Args:
        backbone: the module to load into.
        path: a ``.safetensors``, ``.pth`` or ``.bin`` file holding a timm ViT or Eva state dict, read with
            ``weights_only=True``.
        name: what ``backbone`` is, for the error message.

    Raises:
        ValueError: the file does not fit ``backbone`` (the message names missing and unexpected keys).
    """
    family = eva if isinstance(backbone, eva.Eva) else vision_transformer
    state = family.checkpoint_filter_fn(load_state_dict(path, weights_only=True), backbone)
    unused = _FRESH + (("norm.",) if isinstance(getattr(backbone, "norm", None), nn.Identity) else ())
    state = {key: value for key, value in state.items() if not key.startswith(unused)}
    missing, unexpected = backbone.load_state_dict(state, strict=False)
    missing = [key for key in missing if not key.startswith(_FRESH)]
    if missing or unexpected:
        raise ValueError(f"{path}: does not fit {name}: missing {missing[:5]}, unexpected {unexpected[:5]}")
