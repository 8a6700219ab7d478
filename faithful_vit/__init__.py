"""faithful-vit: two-stage Vision Transformers with hard token masks, on fused sparse attention kernels."""

from .attention import MaskedAttention
from .sparsify import forward_kept, sparsify

__version__ = "0.1.0"

__all__ = [
    "MaskedAttention",
    "__version__",
    "forward_kept",
    "sparsify",
]
