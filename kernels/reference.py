"""PyTorch references: the executable specification of every kernel family, shared by tests and benchmarks.

They favour clarity over speed, compute in float64 by default (``upcast=True``) and return the input dtype. Never
change a reference to make a kernel test pass; ``tests/test_reference.py`` checks each one against plain Python loops.

Conventions shared with the kernels:
    * A dropped key has exactly zero influence: its k and v never reach a sum, so NaN or Inf there changes nothing.
    * A dropped query whose row is skipped (``skip_dropped_queries``) is isolated in the same way: its q, its output
      gradient and its zero output take no part in any other row's output or gradient.
    * Non-finite values in the tokens that are used (kept keys, computed queries) propagate as in
      ``F.scaled_dot_product_attention`` with a boolean mask: a NaN or Inf in a query or in a kept key makes every
      score it enters non-finite, and so the softmax rows, outputs and gradients that depend on them.
    * A query row with no kept key outputs zeros (SDPA's behaviour since torch 2.5), with zero gradients, never NaN.
"""

from __future__ import annotations

import torch

__all__ = [
    "masked_attention_ref",
    "token_kept",
    "masked_attention_gate_grad_ref",
    "gate_mismatch_nan",
    "varlen_attention_ref",
    "pack_tokens_ref",
    "unpack_tokens_ref",
]


def _compute_dtype(x: torch.Tensor, upcast: bool) -> torch.dtype:
    return torch.float64 if upcast else x.dtype


def _safe_softmax(scores: torch.Tensor, allowed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over the last dim restricted to ``allowed``; rows with nothing allowed give zeros, never NaN.

    Returns the probabilities and the log-sum-exp per row (-inf for empty rows).
    """
    scores = scores.masked_fill(~allowed, float("-inf"))
    if scores.shape[-1]:
        row_max = scores.amax(dim=-1, keepdim=True)  # NaN when a score is NaN, as SDPA's softmax
    else:  # no keys at all (N = 0): amax of an empty dim is an error
        row_max = scores.new_full((*scores.shape[:-1], 1), float("-inf"))
    # Only empty rows (max -inf) are shifted by zero; a +inf max gives inf - inf = NaN, as in SDPA.
    row_max = torch.where(row_max == float("-inf"), torch.zeros_like(row_max), row_max).detach()
    weights = torch.exp(scores - row_max)  # exp(-inf) == 0 for disallowed entries
    denom = weights.sum(dim=-1, keepdim=True)
    probs = weights / torch.where(denom == 0, torch.ones_like(denom), denom)
    lse = (row_max + torch.log(denom)).squeeze(-1)  # log(0) = -inf for empty rows
    return probs, lse


def token_kept(keep: torch.Tensor) -> torch.Tensor:
    """The per-token predicate of masked attention: ``(B, N)`` bool, True for the tokens that take part (every kept
    key; the kept queries when dropped queries are skipped). The kernels' ``_token_kept`` mirrors it: a mask variant
    changes these two functions."""
    return keep


def masked_attention_gate_grad_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    keep: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    grad_out: torch.Tensor,
    query_rows: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """d(loss)/d(gate) of the multiplicative key gate, for every key, kept or dropped.

    ``out_i = sum_j g_j exp(s_ij) v_j / sum_j g_j exp(s_ij)`` differentiated at ``g = keep`` gives
    ``sum_i exp(s_ij - lse_i) * (dO_i . v_j - dO_i . out_i)``, summed over heads and over ``query_rows`` (the rows
    whose outputs are computed). Rows whose lse is -inf (no kept key) contribute nothing; a NaN lse (a non-finite
    query or kept key) propagates. For dropped keys this needs their real scores, so it is dense over keys.

    Args:
        q, k, v, out, grad_out: ``(B, H, N, D)``; ``keep``, ``query_rows``: ``(B, N)`` bool; ``lse``: ``(B, H, N)``.

    Returns:
        ``(B, N)`` in the dtype of ``q``.
    """
    scores = torch.einsum("bhid,bhjd->bhij", q, k) * scale
    computed = (lse != float("-inf"))[..., None] & query_rows[:, None, :, None]
    weight = torch.where(computed, torch.exp(scores - torch.where(computed, lse[..., None], 0.0)), 0.0)
    do_v = torch.einsum("bhid,bhjd->bhij", grad_out, v)
    do_o = (grad_out * out).sum(-1, keepdim=True)
    contrib = torch.where(computed, weight * (do_v - do_o), 0.0)
    return contrib.sum(dim=(1, 2))


def gate_mismatch_nan(gate: torch.Tensor, keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The gate rule of masked attention: ``(B, 1, 1, 1)`` NaN for every image whose ``gate`` differs from ``keep``
    anywhere (a NaN or Inf gate included), else 0, to add to the output.

    The gate is a straight-through estimate whose forward value must be the mask. A mismatch is a bug upstream;
    checking it on the host would cost a synchronisation, so it poisons its image's output instead, which the
    non-finite-loss guard of training then reports. The gradients are not changed (the term is a constant).
    """
    mismatch = (gate != keep.to(gate.dtype)).any(dim=1)
    return torch.where(mismatch, float("nan"), 0.0).to(dtype)[:, None, None, None]


class _GateGradient(torch.autograd.Function):
    """Adds zero to the attention output in the forward and the gate's derivative in the backward.

    Keeping the forward on the masked path means a NaN in a dropped key cannot reach the output, while the gate still
    receives d(loss)/d(gate) as defined by :func:`masked_attention_gate_grad_ref`.
    """

    @staticmethod
    def forward(ctx, out, gate, q, k, v, keep, lse, query_rows, scale):
        ctx.save_for_backward(q, k, v, keep, out, lse, query_rows)
        ctx.scale = scale
        return out.clone()

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, keep, out, lse, query_rows = ctx.saved_tensors
        grad_gate = masked_attention_gate_grad_ref(q, k, v, keep, out, lse, grad_out, query_rows, ctx.scale)
        return grad_out, grad_gate, None, None, None, None, None, None, None


def masked_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    keep: torch.Tensor,
    *,
    scale: float | None = None,
    gate: torch.Tensor | None = None,
    skip_dropped_queries: bool = True,
    upcast: bool = True,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention in which every query may only attend to the kept keys of its image.

    Kept query rows equal ``F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :])``, NaN and Inf
    included. Dropped query rows are zero (with zero gradient) when ``skip_dropped_queries``, and then isolated: their
    q and output gradient enter nothing else. Otherwise they are computed as SDPA does.

    Args:
        q, k, v: ``(B, H, N, D)``.
        keep: ``(B, N)`` bool, True for kept tokens.
        scale: softmax scale, default ``D ** -0.5``.
        gate: optional ``(B, N)`` float that must equal ``keep`` in value (1 where kept, 0 where dropped): a
            straight-through estimate. Its gradient is the derivative of the multiplicative key gate at ``gate = keep``
            (see :func:`masked_attention_gate_grad_ref`); the output of an image whose gate differs from ``keep``
            anywhere (NaN included) is NaN (see :func:`gate_mismatch_nan`).
        upcast: compute in float64 and cast back (default); False computes in the input dtype.
        return_lse: also return the log-sum-exp over kept keys, ``(B, H, N)`` float32/64, -inf for empty rows.

    Returns:
        ``(B, H, N, D)`` in the dtype of ``q`` (and the lse when asked).
    """
    dtype = q.dtype
    cdt = _compute_dtype(q, upcast)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    kept = token_kept(keep)
    key_mask = kept[:, None, :, None]
    # Dropped keys (and skipped dropped queries) are zeroed before use, so their values (NaN, Inf) never enter an
    # output or a gradient: their rows of the products are exact zeros, never 0 * NaN.
    qc = q.to(cdt)
    if skip_dropped_queries:
        qc = qc.masked_fill(~key_mask, 0.0)
    kc = k.to(cdt).masked_fill(~key_mask, 0.0)
    vc = v.to(cdt).masked_fill(~key_mask, 0.0)
    scores = torch.einsum("bhid,bhjd->bhij", qc, kc) * scale
    probs, lse = _safe_softmax(scores, kept[:, None, None, :])
    out = torch.einsum("bhij,bhjd->bhid", probs, vc)
    query_rows = kept if skip_dropped_queries else torch.ones_like(kept)
    if skip_dropped_queries:
        out = out.masked_fill(~key_mask, 0.0)
    if gate is not None:
        out = _GateGradient.apply(out, gate.to(cdt), qc, k.to(cdt), v.to(cdt), kept, lse.detach(), query_rows, scale)
        out = out + gate_mismatch_nan(gate, keep, cdt)
    out = out.to(dtype)
    if return_lse:
        return out, lse
    return out


def varlen_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    scale: float | None = None,
    upcast: bool = True,
) -> torch.Tensor:
    """Attention over packed sequences: each sequence attends only within itself.

    Args:
        q, k, v: ``(T, H, D)``, the rows of all sequences back to back.
        cu_seqlens: ``(B + 1,)`` int32, sequence b is rows ``cu_seqlens[b]:cu_seqlens[b + 1]``.
        scale: softmax scale, default ``D ** -0.5``.
        upcast: compute in float64 and cast back (default).

    Returns:
        ``(T, H, D)`` in the dtype of ``q``. Rows outside every sequence (none when ``cu_seqlens[-1] == T``) are zero.
    """
    cdt = _compute_dtype(q, upcast)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out = torch.zeros(q.shape, dtype=cdt, device=q.device)
    bounds = cu_seqlens.tolist()
    pieces = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end == start:
            continue
        qs, ks, vs = (t[start:end].to(cdt).transpose(0, 1) for t in (q, k, v))  # (H, L, D)
        probs = torch.softmax(torch.einsum("hid,hjd->hij", qs, ks) * scale, dim=-1)
        pieces.append((start, end, torch.einsum("hij,hjd->hid", probs, vs).transpose(0, 1)))
    # Built functionally (not in place) so that autograd sees every piece.
    if pieces:
        rows = torch.cat([torch.arange(s, e, device=q.device) for s, e, _ in pieces])
        out = out.index_copy(0, rows, torch.cat([p for _, _, p in pieces]))
    return out.to(q.dtype)


def pack_tokens_ref(x: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather the kept tokens of every image, in order, into one packed tensor.

    Args:
        x: ``(B, N, C)``; keep: ``(B, N)`` bool.

    Returns:
        ``data`` ``(T, C)`` with ``T = keep.sum()``, and ``cu_seqlens`` ``(B + 1,)`` int32.
    """
    data = x[keep]
    counts = keep.sum(dim=1)
    cu_seqlens = torch.zeros(keep.shape[0] + 1, dtype=torch.int32, device=x.device)
    cu_seqlens[1:] = torch.cumsum(counts, 0)
    return data, cu_seqlens


def unpack_tokens_ref(data: torch.Tensor, keep: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
    """Inverse of :func:`pack_tokens_ref`: ``(T, C)`` back to ``(B, N, C)``, dropped positions set to ``fill``."""
    out = data.new_full((*keep.shape, data.shape[-1]), fill)
    return out.masked_scatter(keep[..., None], data)
