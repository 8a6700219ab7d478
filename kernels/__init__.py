"""faithful_vit.kernels: fused block-sparse masked attention and varlen attention in Triton, with PyTorch references.

This package knows only torch and triton. It installs as ``faithful_vit.kernels`` (never as a top-level ``kernels``).
"""

from . import reference
from ._autotune import autotune_enabled, clear_autotune_cache, set_autotune, tuned_configs
from ._backend import (
    BACKENDS,
    TRITON_AVAILABLE,
    TRITON_INTERPRET,
    deterministic_backward,
    get_backend,
    set_backend,
    set_deterministic,
    use_backend,
)
from .masked_attention import compaction_order, masked_attention
from .packing import PackedTokens, pack_tokens
from .varlen_attention import varlen_attention

__all__ = [
    "BACKENDS",
    "TRITON_AVAILABLE",
    "TRITON_INTERPRET",
    "PackedTokens",
    "autotune_enabled",
    "clear_autotune_cache",
    "compaction_order",
    "deterministic_backward",
    "get_backend",
    "masked_attention",
    "pack_tokens",
    "reference",
    "set_autotune",
    "set_backend",
    "set_deterministic",
    "tuned_configs",
    "use_backend",
    "varlen_attention",
]
