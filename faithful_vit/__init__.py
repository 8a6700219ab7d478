"""faithful-vit: two-stage Vision Transformers with hard token masks, on fused sparse attention kernels."""

__version__ = "0.1.0"
