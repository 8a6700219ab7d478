"""Fused block-sparse masked attention: every query attends only to the kept keys of its image.

Family layout: public function, autograd Function, launchers, configs, kernels (the Triton part is being written).
"""

from __future__ import annotations

import torch

from . import reference
from ._backend import resolve_backend
from ._utils import SUPPORTED_DTYPES, check_head_dim, check_same, check_tensor, fmt_shape

__all__ = ["masked_attention"]


def _validate(q, k, v, keep, gate) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, ndim=4, dtypes=SUPPORTED_DTYPES, ndim_doc="(B, H, N, D)")
    check_same(("q", "k", "v"), (q, k, v))
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"k, v: expected the shape of q {tuple(q.shape)}, got {tuple(k.shape)} and {tuple(v.shape)}")
    check_head_dim("q", q.shape[-1])
    check_tensor("keep", keep, ndim=2, dtypes=(torch.bool,), ndim_doc="(B, N)")
    batch, _, seq_len, _ = q.shape
    if keep.shape != (batch, seq_len):
        raise ValueError(f"keep: expected shape {(batch, seq_len)} (B, N of q), got {fmt_shape(keep)}")
    if keep.device != q.device:
        raise ValueError(f"keep: expected device {q.device} like q, got {keep.device}")
    if gate is not None:
        check_tensor("gate", gate, ndim=2, ndim_doc="(B, N)")
        if not gate.is_floating_point():
            raise TypeError(f"gate: expected a floating dtype, got {gate.dtype}")
        if gate.shape != keep.shape or gate.device != q.device:
            raise ValueError(f"gate: expected shape {tuple(keep.shape)} on {q.device}, got {fmt_shape(gate)}")


def masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    keep: torch.Tensor,
    *,
    scale: float | None = None,
    gate: torch.Tensor | None = None,
    skip_dropped_queries: bool = True,
    backend: str = "auto",
) -> torch.Tensor:
    """Attention restricted, per image, to the kept keys.

    Args:
        q, k, v: ``(B, H, N, D)``, fp16/bf16/fp32, any strides with a unit last dimension; ``16 <= D <= 128``.
        keep: ``(B, N)`` bool, True for kept tokens.
        scale: softmax scale, default ``D ** -0.5``.
        gate: optional ``(B, N)`` float equal to ``keep`` in value (a straight-through estimate); the forward is
            unchanged and the backward returns d(loss)/d(gate) for every key.
        skip_dropped_queries: dropped query rows are zero (zero gradient) instead of computed as SDPA does.
        backend: ``"auto"``, ``"triton"`` or ``"torch"`` (see :mod:`faithful_vit.kernels._backend`).

    Returns:
        ``(B, H, N, D)`` in the dtype of ``q``.
    """
    _validate(q, k, v, keep, gate)
    if resolve_backend(backend, (q,)) == "torch":
        return reference.masked_attention_ref(
            q, k, v, keep, scale=scale, gate=gate, skip_dropped_queries=skip_dropped_queries, upcast=False
        )
    raise NotImplementedError("masked_attention: the Triton backend is not written yet; use backend='torch'")
