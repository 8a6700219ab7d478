"""faithful-vit: two-stage Vision Transformers with hard token masks, on fused sparse attention kernels."""

# First: refuse to mix two checkouts before any other module of either is imported.
from . import _one_tree  # noqa: F401
from .attention import MaskedAttention
from .audit import AuditReport, audit
from .interventions import calibrate_part_thresholds
from .model import FaithfulViT, FaithfulViTConfig, FaithfulViTOutput, Stage1Output
from .model_spec import load_model
from .registry import create_model, get_config, list_models, register_model
from .sparsify import forward_kept, sparsify

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
