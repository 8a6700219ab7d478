"""Varlen attention over packed sequences (the token-gather path): each sequence attends only within itself.

Family layout: public function, autograd Function, launchers, configs, kernels (the Triton part is being written).
"""

from __future__ import annotations

import torch

from . import reference
from ._backend import resolve_backend
from ._utils import SUPPORTED_DTYPES, check_head_dim, check_same, check_tensor, fmt_shape

__all__ = ["varlen_attention"]


def _validate(q, k, v, cu_seqlens, max_seqlen, check_cu_seqlens: bool) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, ndim=3, dtypes=SUPPORTED_DTYPES, ndim_doc="(T, H, D)")
    check_same(("q", "k", "v"), (q, k, v))
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"k, v: expected the shape of q {tuple(q.shape)}, got {tuple(k.shape)} and {tuple(v.shape)}")
    check_head_dim("q", q.shape[-1])
    check_tensor("cu_seqlens", cu_seqlens, ndim=1, dtypes=(torch.int32,), ndim_doc="(B + 1,)")
    if cu_seqlens.numel() < 1:
        raise ValueError(f"cu_seqlens: expected at least one entry (B + 1 >= 1), got {fmt_shape(cu_seqlens)}")
    if cu_seqlens.device != q.device:
        raise ValueError(f"cu_seqlens: expected device {q.device} like q, got {cu_seqlens.device}")
    if not isinstance(max_seqlen, int) or max_seqlen < 0:
        raise ValueError(f"max_seqlen: expected a non-negative int, got {max_seqlen!r}")
    if check_cu_seqlens:  # reads cu_seqlens on the host: callers that built it themselves pass check_cu_seqlens=False
        values = cu_seqlens.tolist()
        if values[0] != 0 or any(b < a for a, b in zip(values[:-1], values[1:])):
            raise ValueError(f"cu_seqlens: expected non-decreasing offsets starting at 0, got {values}")
        if values[-1] != q.shape[0]:
            raise ValueError(f"cu_seqlens: expected the last entry to equal T = {q.shape[0]}, got {values[-1]}")
        longest = max((b - a for a, b in zip(values[:-1], values[1:])), default=0)
        if longest > max_seqlen:
            raise ValueError(f"max_seqlen: expected an upper bound on sequence lengths (>= {longest}), "
                             f"got {max_seqlen}")


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    *,
    scale: float | None = None,
    check_cu_seqlens: bool = True,
    backend: str = "auto",
) -> torch.Tensor:
    """Attention over sequences packed back to back; sequence b is rows ``cu_seqlens[b]:cu_seqlens[b + 1]``.

    Args:
        q, k, v: ``(T, H, D)``, fp16/bf16/fp32, strided views of a packed qkv projection allowed; ``16 <= D <= 128``.
        cu_seqlens: ``(B + 1,)`` int32 offsets; sequences of length 0 and 1 are allowed.
        max_seqlen: upper bound on the sequence lengths (a Python int, so no host sync is needed).
        scale: softmax scale, default ``D ** -0.5``.
        check_cu_seqlens: validate ``cu_seqlens`` on the host (one sync); pass False for offsets you built.
        backend: ``"auto"``, ``"triton"`` or ``"torch"``.

    Returns:
        ``(T, H, D)`` in the dtype of ``q``.
    """
    _validate(q, k, v, cu_seqlens, max_seqlen, check_cu_seqlens)
    if resolve_backend(backend, (q,)) == "torch":
        return reference.varlen_attention_ref(q, k, v, cu_seqlens, scale=scale, upcast=False)
    raise NotImplementedError("varlen_attention: the Triton backend is not written yet; use backend='torch'")
