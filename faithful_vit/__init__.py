"""faithful-vit: two-stage Vision Transformers with hard token masks, on fused sparse attention kernels."""

# First: refuse to mix two checkouts before any other module of either is imported.
import importlib
import sys
import types

from . import _one_tree  # noqa: F401

# The public names load their module on first use: importing a light submodule (faithful_vit.cli, which
# train.py --help needs) does not import torch, timm and the kernels.
_EXPORTS = {
    "MaskedAttention": "attention",
    "AuditReport": "audit",
    "audit": "audit",
    "calibrate_part_thresholds": "interventions",
    "FaithfulViT": "model",
    "FaithfulViTConfig": "model",
    "FaithfulViTOutput": "model",
    "Stage1Output": "model",
    "load_model": "model_spec",
    "create_model": "registry",
    "get_config": "registry",
    "list_models": "registry",
    "register_model": "registry",
    "forward_kept": "sparsify",
    "sparsify": "sparsify",
}


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


class _Package(types.ModuleType):
    def __setattr__(self, name: str, value) -> None:
        # The import system binds a loaded submodule to its name in the package; ``faithful_vit.sparsify`` and
        # ``faithful_vit.audit`` stay the functions of that name.
        if isinstance(value, types.ModuleType) and _EXPORTS.get(name) == name:
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


__version__ = "0.1.0"

__all__ = [
    "AuditReport",
    "FaithfulViT",
    "FaithfulViTConfig",
    "FaithfulViTOutput",
    "MaskedAttention",
    "Stage1Output",
    "__version__",
    "audit",
    "calibrate_part_thresholds",
    "create_model",
    "forward_kept",
    "get_config",
    "list_models",
    "load_model",
    "register_model",
    "sparsify",
]
