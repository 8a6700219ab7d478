"""Fused block-sparse masked attention: every query attends only to the kept keys of its image.

The scheme, its limits, the autograd path and the configs are those of :mod:`._attention_core`, with ``keep`` as the
per-token validity mask (:func:`_token_kept`, mirrored by :func:`.reference.token_kept`). This module adds which
blocks a program visits, the gate gradient, and the ``(B, N, H, D)`` output layout.

Blocks: per image, a block of ``BLOCK`` consecutive tokens is live when it holds a kept token and full when every token
of it is kept. :func:`_block_lists` builds, on the device and without a host synchronisation, each image's list of block
indices (full, then partly kept, then dead) and the two counts; the loops walk the full then the partly kept ones. The
forward (one program per query block and image x head) walks the live key blocks; a query block without a kept query
writes zeros when ``skip_dropped_queries`` and returns. The backward kernel's dK/dV part walks the live query blocks
(all query blocks when dropped queries are computed), its dQ part the live key blocks, both lists at the backward's step
size (one list when dropped queries are skipped, the forward's when the sizes agree); dead key blocks write zero dK/dV.
The atomic-dQ backward adds each pair's dQ term from the dK/dV part, for kept keys only (a dropped key's terms are
selected away), to the rows of computed queries only. After :func:`compaction_order` (kept tokens first) the live blocks
are the first ``ceil(kept / BLOCK)`` ones, all full but the last, and the work is proportional to (kept blocks)^2. Grids
are 1-d (:func:`._attention_core.flat_grid`): any B x H.

Forward key loops: when an image's full key blocks are blocks 0..n-1 (after :func:`compaction_order`, and whenever
every token is kept) the forward walks them with direct offsets, as varlen attention does, rather than through the
list: no index load precedes a step's K/V loads, so the software pipeliner buffers as many K/V tiles as in varlen
attention (one more). Its partly kept steps read the keep mask packed as bits (one scalar load of a 64-bit word per
block, from the same launch as the lists) and mask only what needs it: the scores of dropped keys, and their values
(loaded as zeros).

Outputs and gradients are stored in a ``(B, N, H, D)`` memory layout, so that timm's
``out.transpose(1, 2).reshape(B, N, C)`` is free. The log-sum-exp (base 2) kept for the backward is -inf for the rows
that are not computed or have no kept key (their output is zero).

Non-finite values: dropped keys, and queries that are not computed, count as invalid rows of the scheme, so whatever
they hold changes nothing else; a NaN or Inf in a kept key or a computed query propagates as in SDPA (and in
:func:`~faithful_vit.kernels.reference.masked_attention_ref`).

Gate gradient: when ``gate`` requires grad, the backward returns the derivative of the multiplicative key gate
``out_i = sum_j g_j exp(s_ij) v_j / sum_j g_j exp(s_ij)`` at ``g = keep``, for every key, kept or dropped. It equals
``sum_i ds_ij`` computed from the real k/v of key j, the row sums of the dK/dV part's ``ds`` tile, which that part
always computes from the real k/v of its own key block (whatever a dropped key holds stays in its own rows, zeroed
on store). So the gate costs one row sum per block step, and for dropped keys the dK/dV part visits ALL key blocks
(dense over keys); dQ still takes dropped keys as zeros (the atomic-dQ terms select them away), so a NaN in a dropped
key changes nothing but that key's own gate gradient. The per-head partial gate gradients ``(B, H, N)`` are summed
over heads in torch (deterministic). It computes ``exp(s_ij - lse_i)`` in fp32: a dropped key whose score exceeds the
kept ones by more than ``log(2**128)`` (natural log units) overflows to inf where the float64 reference is finite.
"""

from __future__ import annotations

import torch

from . import reference
from ._attention_core import (
    OPS_AVAILABLE,
    bwd_parts,
    check_interpreter_dtype,
    check_qkv,
    dot_precision,
    flat_grid,
    launch_directly,
    launch_in_op,
    one_layout,
    uses_registered_ops,
)
from ._autotune import autotune_enabled, tuned_config
from ._backend import TRITON_AVAILABLE, deterministic_backward, resolve_backend
from ._utils import (
    cdiv,
    check_tensor,
    empty,
    empty_like_strided,
    fmt_shape,
    next_power_of_2,
    softmax_scale,
    unit_last_stride,
)

if TRITON_AVAILABLE:
    import triton
    import triton.language as tl

    from ._attention_core import (
        LOG2E,
        attn_bwd_dkdv_step,
        attn_bwd_dq_part,
        attn_bwd_dq_step,
        attn_fwd_step,
        program_tile,
    )

__all__ = ["compaction_order", "masked_attention"]

# Outputs and gradients are stored as (B, N, H, D) in memory so that timm's transpose(1, 2).reshape(B, N, C) is free.
_BNHD = (0, 2, 1, 3)


def _validate(q, k, v, keep, gate) -> None:
    check_qkv(q, k, v, ndim=4, ndim_doc="(B, H, N, D)")
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
    deterministic: bool | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Attention restricted, per image, to the kept keys.

    Non-finite values: both backends give what ``F.scaled_dot_product_attention(q, k, v,
    attn_mask=keep[:, None, None, :])`` gives for the rows they compute: a NaN or Inf in a kept key, or in a
    computed query, makes every output and gradient that depends on it non-finite, where SDPA's are. Dropped keys
    never reach a sum (their scores are selected away, their values read as zeros), and with
    ``skip_dropped_queries`` dropped queries are never read (their q and output gradient), so whatever they hold
    changes no output and no gradient of another token, bit for bit.

    Args:
        q, k, v: ``(B, H, N, D)``, fp16/bf16/fp32, any strides with a unit last dimension; ``16 <= D <= 128``.
        keep: ``(B, N)`` bool, True for kept tokens.
        scale: softmax scale (positive), default ``D ** -0.5``.
        gate: optional ``(B, N)`` float, a straight-through estimate whose value must equal ``keep`` (1.0 where kept,
            0.0 where dropped). The backward returns d(loss)/d(gate) of the multiplicative key gate at
            ``gate = keep`` for every key (dense over keys, see the module doc). A gate that differs from ``keep``
            anywhere in an image (any other value, NaN included) makes that image's whole output NaN: the check runs
            on the device, without a host synchronisation, and the NaN reaches the loss. Gradients are unaffected.
        skip_dropped_queries: dropped query rows are zero (zero gradient) instead of computed as SDPA does.
        deterministic: the Triton backward: True the bitwise deterministic one, False the faster atomic-dQ one
            (dQ summed with fp32 atomics in a varying order; dK, dV and the gate gradient stay deterministic), None
            the process-wide setting (:func:`faithful_vit.kernels.set_deterministic`, default True). fp32 inputs on
            CUDA always take the deterministic one (:func:`get_atomic_bwd_config`); the torch backend ignores it.
        backend: ``"auto"``, ``"triton"`` or ``"torch"`` (see :mod:`faithful_vit.kernels._backend`).

    Returns:
        ``(B, H, N, D)`` in the dtype of ``q`` (Triton backend: stored as ``(B, N, H, D)`` in memory).
    """
    _validate(q, k, v, keep, gate)
    scale = softmax_scale(scale, q.shape[-1])
    if resolve_backend(backend, (q,)) == "torch":
        return _torch_masked_attention(q, k, v, keep, scale, gate, skip_dropped_queries)
    check_interpreter_dtype(q)
    q, k, v = (unit_last_stride(t) for t in (q, k, v))
    # Calls that need no gradient skip the autograd Function: at ViT sizes a call's host time is comparable to the
    # kernels' own.
    if torch.is_grad_enabled() and _any_requires_grad(q, k, v, gate):
        deterministic = deterministic_backward(deterministic)
        out = MaskedAttentionFunction.apply(q, k, v, keep, gate, scale, skip_dropped_queries, deterministic)
    else:
        out, _ = _forward(q, k, v, keep, scale, skip_dropped_queries)
    if gate is not None:  # the torch backend applies the same rule inside the reference
        out = out + reference.gate_mismatch_nan(gate, keep, out.dtype)
    return out


def compaction_order(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Stable partition of every image's tokens, kept first, built on the device without a host synchronisation.

    Apply it once to the token sequence (``x.gather(1, order[..., None].expand_as(x))`` for ``x`` ``(B, N, C)``);
    then the kept tokens fill the first blocks and masked attention does work proportional to (kept blocks)^2.

    Args:
        keep: ``(B, N)`` bool.

    Returns:
        ``order`` and ``inverse``, both ``(B, N)`` int64: ``keep.gather(1, order)`` is True then False, and
        ``y.gather(1, inverse)`` puts a compacted ``y`` back in the original order.
    """
    check_tensor("keep", keep, ndim=2, dtypes=(torch.bool,), ndim_doc="(B, N)")
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)
    positions = torch.arange(keep.shape[1], device=keep.device).expand_as(order)
    inverse = torch.empty_like(order).scatter_(1, order, positions)
    return order, inverse


def _torch_masked_attention(q, k, v, keep, scale, gate, skip_dropped_queries):
    # CPU matmuls in half precision are slow and inaccurate; compute them in fp32 there and cast back.
    upcast_cpu = q.device.type == "cpu" and q.dtype != torch.float32
    args = (q.float(), k.float(), v.float()) if upcast_cpu else (q, k, v)
    out = reference.masked_attention_ref(
        *args, keep, scale=scale, gate=gate, skip_dropped_queries=skip_dropped_queries, upcast=False
    )
    return out.to(q.dtype)


# ---- Autograd ----------------------------------------------------------------------------------------------------


class MaskedAttentionFunction(torch.autograd.Function):
    """Triton masked attention with gradients for q, k, v and the (optional) key gate: the one autograd path, on the
    registered ops on CUDA and on the launchers elsewhere (:func:`._attention_core.uses_registered_ops`)."""

    @staticmethod
    def forward(ctx, q, k, v, keep, gate, scale, skip_dropped_queries, deterministic):
        # The launchers' block lists of the forward serve the backward; the registered ops rebuild their own.
        ctx.block_lists = None if uses_registered_ops(q) else {}
        out, lse = _forward(q, k, v, keep, scale, skip_dropped_queries, ctx.block_lists)
        ctx.save_for_backward(q, k, v, keep, out, lse)
        ctx.scale = scale
        ctx.skip_dropped_queries = skip_dropped_queries
        ctx.deterministic = deterministic
        ctx.gate_dtype = None if gate is None else gate.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, keep, out, lse = ctx.saved_tensors
        gate_grad = ctx.needs_input_grad[4]
        args = (grad_out, q, k, v, keep, out, lse, ctx.scale, ctx.skip_dropped_queries, gate_grad, ctx.deterministic)
        if uses_registered_ops(q):
            dq, dk, dv, dgate_heads = torch.ops.faithful_vit.masked_attention_bwd(*args)
        else:
            dq, dk, dv, dgate_heads = _masked_attention_bwd(*args, ctx.block_lists)
        dgate = dgate_heads.sum(1).to(ctx.gate_dtype) if gate_grad else None
        return dq, dk, dv, None, dgate, None, None, None


def _forward(q, k, v, keep, scale, skip_dropped_queries, block_lists=None):
    """The forward on the registered op (compiling on CUDA) or the launcher (``block_lists`` memoises its block lists
    for the backward)."""
    if uses_registered_ops(q):
        return torch.ops.faithful_vit.masked_attention_fwd(q, k, v, keep, scale, skip_dropped_queries)
    return _masked_attention_fwd(q, k, v, keep, scale, skip_dropped_queries, block_lists=block_lists)


def _any_requires_grad(*tensors: torch.Tensor | None) -> bool:
    return any(t is not None and t.requires_grad for t in tensors)


# ---- Registered ops (what torch.compile traces on CUDA, see :func:`._attention_core.uses_registered_ops`) ---------

if OPS_AVAILABLE:

    @torch.library.triton_op("faithful_vit::masked_attention_fwd", mutates_args=())
    def _masked_attention_fwd_op(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        keep: torch.Tensor,
        scale: float,
        skip_dropped_queries: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return _masked_attention_fwd(q, k, v, keep, scale, skip_dropped_queries, launch=launch_in_op)

    @torch.library.triton_op("faithful_vit::masked_attention_bwd", mutates_args=())
    def _masked_attention_bwd_op(
        grad_out: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        keep: torch.Tensor,
        out: torch.Tensor,
        lse: torch.Tensor,
        scale: float,
        skip_dropped_queries: bool,
        gate_grad: bool,
        deterministic: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        dq, dk, dv, dgate_heads = _masked_attention_bwd(
            grad_out,
            q,
            k,
            v,
            keep,
            out,
            lse,
            scale,
            skip_dropped_queries,
            gate_grad,
            deterministic,
            launch=launch_in_op,
        )
        # An op has a fixed number of tensor outputs: an empty tensor stands for "no gate gradient asked".
        return dq, dk, dv, dgate_heads if gate_grad else lse.new_empty(0)


# ---- Launchers ---------------------------------------------------------------------------------------------------


_BLOCK_LIST_TOKENS = 1024  # tokens per step of the block-list kernel (a power of two, at least any block)


def _keep_bytes(keep: torch.Tensor) -> torch.Tensor:
    """``keep`` as int8 bytes the kernels index densely along N: a free view of a bool tensor with unit last stride."""
    return (keep if keep.stride(1) == 1 else keep.contiguous()).view(torch.int8)


def _block_lists(
    keep_bytes: torch.Tensor,
    block: int,
    *,
    every_block: bool = False,
    bits: torch.Tensor | None = None,
    launch=launch_directly,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image lists of the blocks of ``block`` tokens a loop visits: full blocks first, then partly kept ones.

    One small kernel launch on the device, no host synchronisation: the attention kernels read the counts and the list
    themselves. A full block has every token kept, none past N.

    Args:
        keep_bytes: ``(B, N)`` int8 (:func:`_keep_bytes`), nonzero for kept tokens.
        every_block: list every block in order, for computed dropped queries; a block then counts as full when it
            lies inside N and its image has a kept token (every row of it has a finite log-sum-exp).
        bits: optional ``(B, _bit_words(N))`` int64, filled in the same launch (not with
            ``every_block``) with the kept tokens packed as bits: bit ``t % 64`` of word ``t // 64``, zero past N
            (:func:`_kept_in_block` reads them).

    Returns:
        ``order`` ``(B, ceil(N / block))`` int32: the full blocks, the partly kept ones, then the blocks without a
        kept token, each group ascending; ``counts`` ``(B, 2)`` int32: the number of full blocks and of blocks to
        visit (live ones, or all with ``every_block``).
    """
    batch, seq_len = keep_bytes.shape
    num_blocks = cdiv(seq_len, block)
    order = empty(batch, num_blocks, dtype=torch.int32, device=keep_bytes.device)
    counts = empty(batch, 2, dtype=torch.int32, device=keep_bytes.device)
    # Blocks per step: a fixed 1024 tokens' worth, never a function of N (under torch.compile a constexpr computed from
    # a symbolic N would be specialised, and every other length would recompile).
    chunk = max(1, _BLOCK_LIST_TOKENS // block)
    if bits is not None and (every_block or bits.shape != (batch, _bit_words(seq_len))):
        raise ValueError(f"bits: expected ({batch}, {_bit_words(seq_len)}) for key lists, got {fmt_shape(bits)}")
    launch(_block_lists_kernel)[(batch,)](
        keep_bytes,
        order,
        counts,
        order if bits is None else bits,  # never written without WRITE_BITS
        seq_len,
        num_blocks,
        0 if bits is None else bits.shape[1],
        keep_bytes.stride(0),
        order.stride(0),
        0 if bits is None else bits.stride(0),
        BLOCK=block,
        CHUNK=chunk,
        EVERY_BLOCK=every_block,
        WRITE_BITS=bits is not None,
    )
    return order, counts


def _bit_words(seq_len: int) -> int:
    """Words of 64 bits per image for the kept tokens packed as bits: N padded to 128 tokens, so that a 128-key block
    (the largest tile) always has both of its words."""
    return 2 * cdiv(seq_len, 128)


def _reused_block_lists(memo, keep_bytes, block, every_block, launch):
    """:func:`_block_lists`, kept in ``memo`` (``(block, every_block) -> lists``) so that each list is built once per
    call: the key lists of the forward serve the backward's queries and keys when the block sizes agree."""
    lists = memo.get((block, every_block))
    if lists is None:
        lists = memo[(block, every_block)] = _block_lists(keep_bytes, block, every_block=every_block, launch=launch)
    return lists


def _masked_attention_fwd(q, k, v, keep, scale, skip_dropped_queries, launch=launch_directly, block_lists=None):
    """Launch the forward kernel. Returns ``out`` ``(B, H, N, D)`` (memory ``(B, N, H, D)``) and ``lse`` ``(B, H, N)``
    fp32 (base 2, of scores scaled by ``scale * log2(e)``; -inf where the row is not computed)."""
    _, _, seq_len, head_dim = q.shape
    cfg = get_fwd_config(seq_len, head_dim, q.dtype, q.device)
    if autotune_enabled():  # the candidates and the tuning key are built only then
        cfg = tuned_config(
            "masked_attention_fwd",
            (triton.next_power_of_2(seq_len), head_dim, q.dtype, skip_dropped_queries),
            cfg,
            fwd_candidates(seq_len, head_dim, q.dtype, q.device),
            lambda c: _launch_fwd(q, k, v, keep, scale, skip_dropped_queries, c, launch),
            (q, k, v, keep),
        )
    return _launch_fwd(q, k, v, keep, scale, skip_dropped_queries, cfg, launch, block_lists)


def _launch_fwd(q, k, v, keep, scale, skip_dropped_queries, cfg, launch, block_lists=None):
    q, k, v = one_layout(q, k, v)
    batch, heads, seq_len, head_dim = q.shape
    head_dim = int(head_dim)  # a constexpr: specialised under torch.compile (here, before any arithmetic on it)
    keep_i8 = _keep_bytes(keep)
    # The key lists, and the kept keys as bits for the partly kept steps, in one launch; the backward reuses the lists.
    bits = empty(batch, _bit_words(seq_len), dtype=torch.int64, device=q.device)
    k_order, k_counts = _block_lists(keep_i8, cfg["BLOCK_N"], bits=bits, launch=launch)
    if block_lists is not None:
        block_lists[(cfg["BLOCK_N"], False)] = k_order, k_counts
    out = empty_like_strided(q, (batch, heads, seq_len, head_dim), _BNHD)
    lse = empty(batch, heads, seq_len, dtype=torch.float32, device=q.device)
    launch(_masked_attn_fwd_kernel)[flat_grid(cdiv(seq_len, cfg["BLOCK_M"]), batch * heads)](
        q,
        k,
        v,
        keep_i8,
        bits,
        k_order,
        k_counts,
        out,
        lse,
        *q.stride()[:3],  # q, k, v: one layout, unit last stride
        *out.stride()[:3],
        keep_i8.stride(0),
        bits.stride(0),
        k_order.stride(0),
        heads,
        seq_len,
        scale * LOG2E.value,
        HEAD_DIM=head_dim,
        BLOCK_D=next_power_of_2(head_dim),
        BLOCK_M=cfg["BLOCK_M"],
        BLOCK_N=cfg["BLOCK_N"],
        SKIP_DROPPED_QUERIES=skip_dropped_queries,
        INPUT_PRECISION=dot_precision(q.dtype),
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )
    return out, lse


def _masked_attention_bwd(
    grad_out,
    q,
    k,
    v,
    keep,
    out,
    lse,
    scale,
    skip_dropped_queries,
    gate_grad,
    deterministic,
    block_lists=None,
    launch=launch_directly,
):
    """Launch the backward kernels (deterministic, or atomic dQ). Returns dq, dk, dv ``(B, H, N, D)`` and, when
    ``gate_grad``, the per-head gate gradient ``(B, H, N)`` fp32 (else None)."""
    _, _, seq_len, head_dim = q.shape
    grad_out = unit_last_stride(grad_out)
    cfg = None if deterministic else get_atomic_bwd_config(seq_len, head_dim, q.dtype, q.device)
    candidates = atomic_bwd_candidates
    if cfg is None:  # the deterministic backward, asked for or the only one (fp32 on CUDA)
        deterministic, cfg, candidates = True, get_bwd_config(seq_len, head_dim, q.dtype, q.device), bwd_candidates
    args = (grad_out, q, k, v, keep, out, lse, scale, skip_dropped_queries, gate_grad, deterministic)
    if autotune_enabled():
        cfg = tuned_config(
            "masked_attention_bwd",
            (triton.next_power_of_2(seq_len), head_dim, q.dtype, skip_dropped_queries, gate_grad, deterministic),
            cfg,
            candidates(seq_len, head_dim, q.dtype, q.device),
            lambda c: _launch_bwd(*args, c, launch),
            (q, k, v, keep),
        )
    return _launch_bwd(*args, cfg, launch, block_lists)


def _launch_bwd(
    grad_out,
    q,
    k,
    v,
    keep,
    out,
    lse,
    scale,
    skip_dropped_queries,
    gate_grad,
    deterministic,
    cfg,
    launch,
    block_lists=None,
):
    q, k, v = one_layout(q, k, v)
    batch, heads, seq_len, head_dim = q.shape
    head_dim = int(head_dim)
    block_m, block_n = cfg["BLOCK_M"], cfg["BLOCK_N"]
    keep_i8 = _keep_bytes(keep)
    memo = {} if block_lists is None else block_lists
    q_order, q_counts = _reused_block_lists(memo, keep_i8, block_m, not skip_dropped_queries, launch)
    block_d = next_power_of_2(head_dim)
    precision = dot_precision(q.dtype)

    dq, dk, dv = (empty_like_strided(q, (batch, heads, seq_len, head_dim), _BNHD) for _ in range(3))
    # The atomic-dQ backward sums dQ in fp32: in dq itself for fp32 inputs, else in an accumulator cast at the end.
    # The preprocess zeroes it; the deterministic backward never touches it.
    dq_acc = dq
    if not deterministic and q.dtype != torch.float32:
        dq_acc = empty(batch, seq_len, heads, head_dim, dtype=torch.float32, device=q.device).permute(_BNHD)
    delta = empty(batch, heads, seq_len, dtype=torch.float32, device=q.device)
    launch(_masked_attn_bwd_preprocess_kernel)[flat_grid(cdiv(seq_len, block_m), batch * heads)](
        out,
        grad_out,
        delta,
        dq_acc,
        *out.stride()[:3],
        *grad_out.stride()[:3],
        *dq_acc.stride()[:3],
        heads,
        seq_len,
        HEAD_DIM=head_dim,
        BLOCK_D=block_d,
        BLOCK_M=block_m,
        ZERO_DQ=not deterministic,
    )

    # Without GATE_GRAD the kernel never writes DGATE: any fp32 pointer will do, so nothing is allocated for it.
    dgate_heads = empty(batch, heads, seq_len, dtype=torch.float32, device=q.device) if gate_grad else lse
    # Both parts of the kernel walk lists of one block size, BLOCK_M (the same list when dropped queries are
    # skipped); the atomic-dQ backward has no dQ part and no key list.
    k_order, k_counts = (
        (q_order, q_counts) if not deterministic else _reused_block_lists(memo, keep_i8, block_m, False, launch)
    )
    args = (
        q,
        k,
        v,
        grad_out,
        keep_i8,
        q_order,
        q_counts,
        k_order,
        k_counts,
        lse,
        delta,
        dq_acc,
        dk,
        dv,
        dgate_heads,
        *q.stride()[:3],
        *grad_out.stride()[:3],
        *dk.stride()[:3],  # dq (or its accumulator), dk, dv: one layout
        keep_i8.stride(0),
        q_order.stride(0),
        heads,
        seq_len,
        scale,
        scale * LOG2E.value,
    )
    for parts, stages in bwd_parts(cfg, deterministic):
        launch(_masked_attn_bwd_kernel)[flat_grid(cdiv(seq_len, block_n), batch * heads)](
            *args,
            HEAD_DIM=head_dim,
            BLOCK_D=block_d,
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            GATE_GRAD=gate_grad,
            ATOMIC_DQ=not deterministic,
            PARTS=parts,
            INPUT_PRECISION=precision,
            num_warps=cfg["num_warps"],
            num_stages=stages,
        )
    if not deterministic:
        torch.mul(dq_acc, scale, out=dq)  # the softmax scale, once, and the cast
    return dq, dk, dv, (dgate_heads if gate_grad else None)


# ---- Configs -----------------------------------------------------------------------------------------------------


def get_fwd_config(seq_len: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> dict[str, int]:
    """Tiles and launch options of the forward kernel (see :mod:`._attention_core` for the config functions).

    fp16/bf16: 128 query rows, so that every K/V tile loaded serves twice the rows of a 64-row tile, on 8 warps (two
    warp groups of 64 rows each: on 4 warps the accumulator spills above head dim 64). Keys stay at 64 tokens, the
    block size of the key lists: the sparsity is per key block, and finer blocks skip more of a mask. fp32 dots are
    exact FMA loops whose operand tiles live in registers, so fp32 takes small tiles over 8 warps.
    """
    if device.type != "cuda":  # the interpreter: the smallest blocks tl.dot accepts keep CPU tests fast
        return {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 1, "num_stages": 1}
    if dtype == torch.float32:
        block_m, block_n = (64, 32) if head_dim <= 64 else (16, 16)
        return {"BLOCK_M": block_m, "BLOCK_N": block_n, "num_warps": 8, "num_stages": 1}
    return {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3}


def get_bwd_config(seq_len: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> dict[str, int]:
    """Tiles and launch options of the deterministic backward's kernel (see :mod:`._attention_core`): a program
    holds ``BLOCK_N`` rows (keys for dK/dV, then queries for dQ) and steps over ``BLOCK_M`` (queries, keys), both
    parts in one launch unless ``SPLIT_DQ`` (:func:`._attention_core.bwd_parts`).

    Above head dim 64 a program holds 128 rows over 8 warps and steps over 32 (the Triton tutorial's shapes), in two
    launches: one kernel holding both parts would spill. At head dim 64 those tiles would cost more instructions per
    score than 64 x 64 ones. fp32 (exact FMA dots) takes the smallest tiles, in two launches.
    """
    if device.type != "cuda":  # the interpreter: small tiles, unequal so that the tests see the transposed dQ tiles
        return {"BLOCK_M": 16, "BLOCK_N": 32, "num_warps": 1, "num_stages": 1}
    if dtype == torch.float32:
        if head_dim <= 64:
            return {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1, "SPLIT_DQ": 1}
        # dQ spills with one stage on Triton 3.6 and 3.9, dK/dV with two on 3.9: one stage count per part.
        return {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 8, "num_stages": 1, "DQ_STAGES": 2, "SPLIT_DQ": 1}
    if head_dim <= 64:
        return {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3}
    return {"BLOCK_M": 32, "BLOCK_N": 128, "num_warps": 8, "num_stages": 3, "SPLIT_DQ": 1}


def get_atomic_bwd_config(
    seq_len: int, head_dim: int, dtype: torch.dtype, device: torch.device
) -> dict[str, int] | None:
    """Tiles and launch options of the atomic-dQ backward's kernel (``deterministic=False``): a program holds
    ``BLOCK_N`` keys and steps over ``BLOCK_M`` queries, whose dQ terms ``(BLOCK_M, D)`` fp32 it also holds.

    None for fp32 on CUDA: its dots are exact FMA loops, not tensor-core GEMMs, where the extra dQ tiles spilled
    registers at every tile tried, so fp32 inputs take the deterministic backward there.
    """
    if device.type != "cuda":
        return {"BLOCK_M": 16, "BLOCK_N": 32, "num_warps": 1, "num_stages": 1}
    if dtype == torch.float32:
        return None
    return {"BLOCK_M": 32, "BLOCK_N": 64, "num_warps": 4 if head_dim <= 64 else 8, "num_stages": 2}


def _configs(*rows: tuple[int, int, int, int]) -> list[dict[str, int]]:
    return [dict(zip(("BLOCK_M", "BLOCK_N", "num_warps", "num_stages"), row)) for row in rows]


def fwd_candidates(seq_len: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> list[dict[str, int]]:
    """Configs the forward's autotuning times besides :func:`get_fwd_config` (configs that do not fit are skipped)."""
    if device.type != "cuda":
        return _configs((32, 16, 1, 1))
    if dtype == torch.float32:
        return _configs((32, 64, 8, 1), (32, 32, 4, 2), (64, 64, 4, 1), (32, 64, 4, 2))
    return _configs((64, 64, 4, 3), (64, 32, 4, 3), (128, 32, 8, 2), (64, 64, 4, 2), (32, 64, 4, 3), (128, 128, 8, 2))


def bwd_candidates(seq_len: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> list[dict[str, int]]:
    """Configs the deterministic backward's autotuning times besides :func:`get_bwd_config` (above head dim 64 in two
    launches)."""
    if device.type != "cuda":
        rows = [(16, 16, 1, 1)]
    elif dtype == torch.float32:
        rows = [(32, 32, 4, 1), (16, 64, 4, 1)]
    else:
        rows = [(64, 64, 4, 2), (32, 64, 4, 2), (32, 128, 8, 2), (64, 64, 8, 2), (64, 128, 8, 1), (32, 32, 4, 2)]
    return [{**cfg, "SPLIT_DQ": int(head_dim > 64 or dtype == torch.float32)} for cfg in _configs(*rows)]


def atomic_bwd_candidates(
    seq_len: int, head_dim: int, dtype: torch.dtype, device: torch.device
) -> list[dict[str, int]]:
    """Configs the atomic-dQ backward's autotuning times besides :func:`get_atomic_bwd_config` (none for fp32 on
    CUDA)."""
    if device.type != "cuda":
        return _configs((16, 16, 1, 1))
    if dtype == torch.float32:
        return []
    return _configs((32, 64, 4, 2), (64, 64, 4, 3), (32, 64, 8, 2), (32, 128, 8, 2), (64, 32, 4, 2))


# ---- Kernels -----------------------------------------------------------------------------------------------------

if TRITON_AVAILABLE:

    @triton.jit
    def _token_kept(KEEP_b, tokens, N):
        """The per-token predicate: which of ``tokens`` (indices, any shape) of one image are kept, tokens past N
        counting as dropped; ``KEEP_b`` is the image's row of int8 keep bytes. Every kernel asks it, and
        :func:`.reference.token_kept` mirrors it: a mask variant changes these two functions."""
        return tl.load(KEEP_b + tokens, mask=tokens < N, other=0) != 0

    @triton.jit
    def _kept_per_block(KEEP_b, blocks, N, BLOCK: tl.constexpr):
        """Kept tokens in each of ``blocks`` (block indices) of one image."""
        tokens = blocks[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]
        return tl.sum(_token_kept(KEEP_b, tokens, N).to(tl.int32), 1)

    @triton.jit
    def _block_lists_kernel(
        KEEP,
        ORDER,
        COUNTS,
        BITS,
        N,
        NUM_BLOCKS,
        NUM_WORDS,
        stride_keep_b,
        stride_order_b,
        stride_bits_b,
        BLOCK: tl.constexpr,
        CHUNK: tl.constexpr,
        EVERY_BLOCK: tl.constexpr,
        WRITE_BITS: tl.constexpr,
    ):
        """The block lists of one image (see :func:`_block_lists`), a stable partition computed in two passes over
        ``CHUNK`` blocks at a time: the first counts full and live blocks, the second places each block; with
        ``WRITE_BITS`` a third packs the kept tokens into bits.

        Pointers: KEEP ``(B, N)`` int8 with unit stride along N; ORDER ``(B, NUM_BLOCKS)`` int32; COUNTS ``(B, 2)``
        int32 contiguous; BITS ``(B, NUM_WORDS)`` int64 with unit stride along its words (written only with WRITE_BITS,
        zero past N). Constexprs: BLOCK (tokens per block), CHUNK (blocks per step, a power of two), EVERY_BLOCK,
        WRITE_BITS.

        Grid: ``(B,)``.
        """
        b = tl.program_id(0).to(tl.int64)
        keep_b = KEEP + b * stride_keep_b
        offs_block = tl.arange(0, CHUNK)
        n_full = 0
        n_live = 0
        for first in range(0, NUM_BLOCKS, CHUNK):
            kept = _kept_per_block(keep_b, first + offs_block, N, BLOCK)
            n_full += tl.sum((kept == BLOCK).to(tl.int32), 0)
            n_live += tl.sum((kept > 0).to(tl.int32), 0)
        if EVERY_BLOCK:
            for first in range(0, NUM_BLOCKS, CHUNK):
                blocks = first + offs_block
                tl.store(ORDER + b * stride_order_b + blocks, blocks, mask=blocks < NUM_BLOCKS)
            n_full = tl.where(n_live > 0, N // BLOCK, 0)
            n_live = NUM_BLOCKS
        else:
            next_full = 0
            next_partial = n_full
            next_dead = n_live
            for first in range(0, NUM_BLOCKS, CHUNK):
                blocks = first + offs_block
                kept = _kept_per_block(keep_b, blocks, N, BLOCK)
                in_range = blocks < NUM_BLOCKS
                full = ((kept == BLOCK) & in_range).to(tl.int32)
                partial = ((kept > 0) & (kept < BLOCK) & in_range).to(tl.int32)
                dead = ((kept == 0) & in_range).to(tl.int32)
                position = tl.where(
                    full != 0,
                    next_full + tl.cumsum(full, 0) - 1,
                    tl.where(
                        partial != 0, next_partial + tl.cumsum(partial, 0) - 1, next_dead + tl.cumsum(dead, 0) - 1
                    ),
                )
                tl.store(ORDER + b * stride_order_b + position, blocks, mask=in_range)
                next_full += tl.sum(full, 0)
                next_partial += tl.sum(partial, 0)
                next_dead += tl.sum(dead, 0)
        tl.store(COUNTS + 2 * b, n_full)
        tl.store(COUNTS + 2 * b + 1, n_live)
        if WRITE_BITS:
            bit = tl.arange(0, 64)
            for first in range(0, NUM_WORDS, CHUNK):
                words = first + offs_block
                kept = _token_kept(keep_b, words[:, None] * 64 + bit[None, :], N)
                # Distinct powers of two: their sum is their bitwise or (bit 63 makes the word negative, as it should).
                packed = tl.sum(kept.to(tl.int64) << bit[None, :].to(tl.int64), 1)
                tl.store(BITS + b * stride_bits_b + words, packed, mask=words < NUM_WORDS)

    @triton.jit
    def _masked_key_block(
        K_bh,
        V_bh,
        KEEP_b,
        K_ORDER_b,
        i,
        stride_kn,
        stride_vn,
        N,
        offs_d,
        in_d,
        BLOCK_N: tl.constexpr,
        MASK_KEYS: tl.constexpr,
    ):
        """Load key block ``K_ORDER_b[i]`` of one (image, head): k, v ``(BLOCK_N, BLOCK_D)`` and which keys are kept
        (dropped keys as zeros when ``MASK_KEYS``, see :mod:`._attention_core`)."""
        offs_n = tl.load(K_ORDER_b + i) * BLOCK_N + tl.arange(0, BLOCK_N)
        if MASK_KEYS:
            keep_k = _token_kept(KEEP_b, offs_n, N)
            kv_mask = keep_k[:, None] & in_d[None, :]
        else:
            keep_k = offs_n < N  # every key of a full block is kept; unused by the steps
            kv_mask = in_d[None, :]
        k = tl.load(K_bh + offs_n[:, None] * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V_bh + offs_n[:, None] * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0)
        return k, v, keep_k

    @triton.jit
    def _kept_in_block(BITS_b, block, BLOCK: tl.constexpr):
        """Which tokens of ``block`` (of ``BLOCK`` tokens, a power of two up to 128) of one image are kept, read from
        the image's row of bits (:func:`_block_lists`): one or two scalar loads, where :func:`_token_kept` loads a
        byte per token. Tokens past N have no bit set."""
        if BLOCK <= 64:  # the block lies inside one word
            first = block * BLOCK
            word = tl.load(BITS_b + first // 64)
            shifts = (first % 64 + tl.arange(0, BLOCK)).to(tl.int64)
        else:
            offs = tl.arange(0, BLOCK)
            low = tl.load(BITS_b + block * (BLOCK // 64))
            high = tl.load(BITS_b + block * (BLOCK // 64) + 1)
            word = tl.where(offs < 64, low, high)
            shifts = (offs % 64).to(tl.int64)
        return ((word >> shifts) & 1) != 0

    @triton.jit
    def _masked_fwd_key_blocks(
        q,
        m_i,
        l_i,
        acc,
        K_bh,
        V_bh,
        BITS_b,
        K_ORDER_b,
        start,
        stop,
        stride_kn,
        stride_vn,
        N,
        offs_d,
        in_d,
        qk_scale,
        BLOCK_N: tl.constexpr,
        INDEXED: tl.constexpr,
        MASK_KEYS: tl.constexpr,
        INPUT_PRECISION: tl.constexpr,
    ):
        """The online softmax over the key blocks ``K_ORDER_b[start:stop]`` (``INDEXED``), or over blocks
        ``start:stop`` themselves (direct offsets: no index to load before a step's K/V, so the pipeliner buffers one
        more K/V tile), of one (image, head): full blocks, or (``MASK_KEYS``) partly kept ones. ``K_bh``, ``V_bh``,
        ``BITS_b``, ``K_ORDER_b`` point at this image (and head).

        A partly kept step masks only what it must: the scores of dropped keys are selected away in the step
        whatever their k holds, so k is loaded without the keep mask (inside N only); a dropped key's v is loaded as
        zeros (a zero weight times a NaN would be NaN), gated by the block's bits."""
        offs_block = tl.arange(0, BLOCK_N)
        for i in range(start, stop):
            if INDEXED:
                block = tl.load(K_ORDER_b + i)
            else:
                block = i
            offs_n = block * BLOCK_N + offs_block
            if MASK_KEYS:
                keep_k = _kept_in_block(BITS_b, block, BLOCK_N)
                k_mask = (offs_n < N)[:, None] & in_d[None, :]
                v_mask = keep_k[:, None] & in_d[None, :]
            else:
                keep_k = offs_n < N  # every key of a full block is kept; unused by the step
                k_mask = in_d[None, :]
                v_mask = in_d[None, :]
            k = tl.load(K_bh + offs_n[:, None] * stride_kn + offs_d[None, :], mask=k_mask, other=0.0)
            v = tl.load(V_bh + offs_n[:, None] * stride_vn + offs_d[None, :], mask=v_mask, other=0.0)
            m_i, l_i, acc = attn_fwd_step(
                q, tl.trans(k), v, keep_k, m_i, l_i, acc, qk_scale, MASK_KEYS, INPUT_PRECISION
            )
        return m_i, l_i, acc

    @triton.jit
    def _masked_attn_fwd_kernel(
        Q,
        K,
        V,
        KEEP,
        BITS,
        K_ORDER,
        K_COUNTS,
        OUT,
        LSE,
        stride_b,
        stride_h,
        stride_n,
        stride_ob,
        stride_oh,
        stride_on,
        stride_keep_b,
        stride_bits_b,
        stride_order_b,
        H,
        N,
        qk_scale,
        HEAD_DIM: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        SKIP_DROPPED_QUERIES: tl.constexpr,
        INPUT_PRECISION: tl.constexpr,
    ):
        """Forward over the live key blocks of one query block of one (image, head).

        Pointers: Q, K, V ``(B, H, N, D)`` in one layout (one set of strides); KEEP ``(B, N)`` int8; BITS ``(B, NW)``
        int64, KEEP packed as bits (:func:`_block_lists`); K_ORDER ``(B, NB)`` int32 full, then partly kept key blocks;
        K_COUNTS ``(B, 2)`` int32 contiguous, full and live key blocks; OUT ``(B, H, N, D)``; LSE ``(B, H, N)`` fp32
        contiguous (base 2, -inf for rows not computed). Strides in (b, h, n) order (every last stride is 1);
        ``qk_scale`` is ``scale * log2(e)``. Constexprs: HEAD_DIM (D), BLOCK_D (next power of two >= D), BLOCK_M /
        BLOCK_N (query / key rows per block, also the block size of K_ORDER), SKIP_DROPPED_QUERIES, INPUT_PRECISION.

        Grid: ``flat_grid(cdiv(N, BLOCK_M), B * H)``.
        """
        pid_m, pid_bh = program_tile(tl.program_id(0), tl.cdiv(N, BLOCK_M))
        b = (pid_bh // H).to(tl.int64)  # int64 offsets: B * N * H * D may exceed 2**31
        h = (pid_bh % H).to(tl.int64)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        in_m = offs_m < N
        in_d = offs_d < HEAD_DIM
        keep_q = _token_kept(KEEP + b * stride_keep_b, offs_m, N)
        out_ptrs = OUT + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :]
        lse_ptrs = LSE + pid_bh * N + offs_m
        if SKIP_DROPPED_QUERIES:
            if tl.max(keep_q.to(tl.int32), 0) == 0:
                tl.store(
                    out_ptrs,
                    tl.zeros((BLOCK_M, BLOCK_D), dtype=OUT.dtype.element_ty),
                    mask=in_m[:, None] & in_d[None, :],
                )
                tl.store(lse_ptrs, tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32), mask=in_m)
                return

        q = tl.load(
            Q + b * stride_b + h * stride_h + offs_m[:, None] * stride_n + offs_d[None, :],
            mask=in_m[:, None] & in_d[None, :],
            other=0.0,
        )
        m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
        acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        full_count = tl.load(K_COUNTS + 2 * b)
        live_count = tl.load(K_COUNTS + 2 * b + 1)
        k_bh = K + b * stride_b + h * stride_h
        v_bh = V + b * stride_b + h * stride_h
        bits_b = BITS + b * stride_bits_b
        order_b = K_ORDER + b * stride_order_b
        # Every visited block has a kept key, so the running max is finite after the first step: no guard is needed.
        # The full blocks are listed in ascending order, so they are blocks 0..full_count-1 exactly when the last of
        # them is block full_count-1: always after compaction_order, and when every token is kept.
        if tl.load(order_b + tl.maximum(full_count - 1, 0)) == full_count - 1:
            m_i, l_i, acc = _masked_fwd_key_blocks(
                q,
                m_i,
                l_i,
                acc,
                k_bh,
                v_bh,
                bits_b,
                order_b,
                0,
                full_count,
                stride_n,
                stride_n,
                N,
                offs_d,
                in_d,
                qk_scale,
                BLOCK_N,
                False,
                False,
                INPUT_PRECISION,
            )
        else:
            m_i, l_i, acc = _masked_fwd_key_blocks(
                q,
                m_i,
                l_i,
                acc,
                k_bh,
                v_bh,
                bits_b,
                order_b,
                0,
                full_count,
                stride_n,
                stride_n,
                N,
                offs_d,
                in_d,
                qk_scale,
                BLOCK_N,
                True,
                False,
                INPUT_PRECISION,
            )
        m_i, l_i, acc = _masked_fwd_key_blocks(
            q,
            m_i,
            l_i,
            acc,
            k_bh,
            v_bh,
            bits_b,
            order_b,
            full_count,
            live_count,
            stride_n,
            stride_n,
            N,
            offs_d,
            in_d,
            qk_scale,
            BLOCK_N,
            True,
            True,
            INPUT_PRECISION,
        )

        # The rows computed: every one in an image with a kept key (l_i > 0 there unless NaN or Inf made it NaN,
        # which then propagates to the output and the lse, as in SDPA), only the kept ones when skipping.
        row_valid = in_m & (live_count > 0)
        if SKIP_DROPPED_QUERIES:
            row_valid = row_valid & keep_q
        out = acc / tl.where(row_valid, l_i, 1.0)[:, None]
        out = tl.where(row_valid[:, None], out, 0.0)
        tl.store(out_ptrs, out.to(OUT.dtype.element_ty), mask=in_m[:, None] & in_d[None, :])
        lse = tl.where(row_valid, m_i + tl.math.log2(tl.where(row_valid, l_i, 1.0)), float("-inf"))
        tl.store(lse_ptrs, lse, mask=in_m)

    @triton.jit
    def _masked_attn_bwd_preprocess_kernel(
        OUT,
        DO,
        DELTA,
        DQ_ACC,
        stride_ob,
        stride_oh,
        stride_on,
        stride_dob,
        stride_doh,
        stride_don,
        stride_dqb,
        stride_dqh,
        stride_dqn,
        H,
        N,
        HEAD_DIM: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_M: tl.constexpr,
        ZERO_DQ: tl.constexpr,
    ):
        """``DELTA[b, h, i] = sum_d DO[b, h, i, d] * OUT[b, h, i, d]`` in fp32, and (``ZERO_DQ``) zeros in the
        atomic-dQ accumulator, which saves the backward a launch.

        Pointers: OUT, DO ``(B, H, N, D)``; DELTA ``(B, H, N)`` fp32 contiguous; DQ_ACC ``(B, H, N, D)`` fp32
        (written only when ZERO_DQ). Strides in (b, h, n) order (every last stride is 1).
        Constexprs: HEAD_DIM, BLOCK_D, BLOCK_M (rows per program), ZERO_DQ.

        Grid: ``flat_grid(cdiv(N, BLOCK_M), B * H)``.
        """
        pid_m, pid_bh = program_tile(tl.program_id(0), tl.cdiv(N, BLOCK_M))
        b = (pid_bh // H).to(tl.int64)
        h = (pid_bh % H).to(tl.int64)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        mask = (offs_m < N)[:, None] & (offs_d < HEAD_DIM)[None, :]
        o = tl.load(
            OUT + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :],
            mask=mask,
            other=0.0,
        ).to(tl.float32)
        do = tl.load(
            DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_don + offs_d[None, :],
            mask=mask,
            other=0.0,
        ).to(tl.float32)
        tl.store(DELTA + pid_bh * N + offs_m, tl.sum(o * do, 1), mask=offs_m < N)
        if ZERO_DQ:
            tl.store(
                DQ_ACC + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqn + offs_d[None, :],
                tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32),
                mask=mask,
            )

    @triton.jit
    def _masked_dkdv_query_blocks(
        k,
        v,
        dk,
        dv,
        dgate,
        keep_k,
        k_dq,
        live,
        Q_bh,
        DO_bh,
        LSE_bh,
        DELTA_bh,
        DQ_bh,
        Q_ORDER_b,
        start,
        stop,
        stride_qn,
        stride_don,
        stride_dqn,
        N,
        offs_d,
        in_d,
        qk_scale,
        BLOCK_M: tl.constexpr,
        MASK_QUERIES: tl.constexpr,
        GATE_GRAD: tl.constexpr,
        ATOMIC_DQ: tl.constexpr,
        INPUT_PRECISION: tl.constexpr,
    ):
        """Accumulate dK, dV (and the gate term) of one key block over the query blocks ``Q_ORDER_b[start:stop]``,
        full ones (every row inside N and computed) or (``MASK_QUERIES``) partly valid ones, whose invalid rows are
        those with lse = -inf (not computed, or without a kept key). With ``ATOMIC_DQ`` each step also adds its dQ
        term to the fp32 rows ``DQ_bh`` of its valid queries (when ``live``: the key block has a kept key), with
        ``keep_k`` and ``k_dq`` (the block's keys, dropped ones zero) as in :func:`._attention_core.attn_bwd_dq_part`.
        """
        offs_block = tl.arange(0, BLOCK_M)
        for i in range(start, stop):
            offs_m = tl.load(Q_ORDER_b + i) * BLOCK_M + offs_block
            if MASK_QUERIES:
                lse = tl.load(LSE_bh + offs_m, mask=offs_m < N, other=float("-inf"))
                row_valid = lse != float("-inf")  # a NaN lse is a computed row: its NaN propagates
                # Rows not computed: their q and dO are loaded as zeros (never read) and their delta selected away,
                # else their NaN or Inf would meet the zero weight below in a product (0 * NaN) and reach every key
                # of the block. (delta is selected, not masked on load: a load masked by lse slows both loops.)
                qd_mask = row_valid[:, None] & in_d[None, :]
                delta = tl.where(row_valid, tl.load(DELTA_bh + offs_m, mask=offs_m < N, other=0.0), 0.0)
                lse = tl.where(row_valid, lse, 0.0)  # select, never multiply: these rows get weight 0 below
            else:
                qd_mask = in_d[None, :]
                lse = tl.load(LSE_bh + offs_m)
                delta = tl.load(DELTA_bh + offs_m)
                row_valid = offs_m < N  # every row of a full block is valid; unused by the step
            q = tl.load(Q_bh + offs_m[:, None] * stride_qn + offs_d[None, :], mask=qd_mask, other=0.0)
            do = tl.load(DO_bh + offs_m[:, None] * stride_don + offs_d[None, :], mask=qd_mask, other=0.0)
            dk, dv, ds_t = attn_bwd_dkdv_step(
                k, v, q, do, lse, delta, row_valid, dk, dv, qk_scale, MASK_QUERIES, INPUT_PRECISION
            )
            if GATE_GRAD:
                # d(loss)/d(gate_j) = sum_i p_ij (dp_ij - delta_i) = sum_i ds_ij, from the real k, v of key j.
                dgate += tl.sum(ds_t, 1)
            if ATOMIC_DQ:
                tl.atomic_add(
                    DQ_bh + offs_m[:, None] * stride_dqn + offs_d[None, :],
                    attn_bwd_dq_part(ds_t, keep_k, k_dq, INPUT_PRECISION),
                    mask=qd_mask & live,
                    sem="relaxed",
                )
        return dk, dv, dgate

    @triton.jit
    def _masked_dkdv_tile(
        pid_n,
        b,
        h,
        pid_bh,
        Q,
        K,
        V,
        DO,
        KEEP,
        Q_ORDER,
        Q_COUNTS,
        LSE,
        DELTA,
        DK,
        DV,
        DGATE,
        DQ_ACC,
        stride_b,
        stride_h,
        stride_n,
        stride_dob,
        stride_doh,
        stride_don,
        stride_gb,
        stride_gh,
        stride_gn,
        stride_keep_b,
        stride_order_b,
        N,
        sm_scale,
        qk_scale,
        HEAD_DIM: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        GATE_GRAD: tl.constexpr,
        ATOMIC_DQ: tl.constexpr,
        INPUT_PRECISION: tl.constexpr,
    ):
        """dK, dV (and the per-head gate gradient) of key block ``pid_n`` of (image ``b``, head ``h``), flat index
        ``pid_bh``, looping over the listed query blocks; with ATOMIC_DQ also every visited query's dQ term, added to
        DQ_ACC with fp32 atomics (unscaled: the launcher scales it once), so that no dQ pass recomputes the scores.
        Arguments as in :func:`_masked_attn_bwd_kernel`; BLOCK_N key rows, BLOCK_M query rows per step."""
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        in_n = offs_n < N
        in_d = offs_d < HEAD_DIM
        keep_k = _token_kept(KEEP + b * stride_keep_b, offs_n, N)
        dk_ptrs = DK + b * stride_gb + h * stride_gh + offs_n[:, None] * stride_gn + offs_d[None, :]
        dv_ptrs = DV + b * stride_gb + h * stride_gh + offs_n[:, None] * stride_gn + offs_d[None, :]
        out_mask = in_n[:, None] & in_d[None, :]
        live = tl.max(keep_k.to(tl.int32), 0) != 0
        if not GATE_GRAD:
            if tl.max(keep_k.to(tl.int32), 0) == 0:
                tl.store(dk_ptrs, tl.zeros((BLOCK_N, BLOCK_D), dtype=DK.dtype.element_ty), mask=out_mask)
                tl.store(dv_ptrs, tl.zeros((BLOCK_N, BLOCK_D), dtype=DV.dtype.element_ty), mask=out_mask)
                return

        # The real k, v of every key, dropped ones included: row j of dK/dV depends on key j alone, so whatever a
        # dropped key holds (even NaN) stays in its own rows, which the store below replaces with zeros; the gate term
        # of a dropped key needs its real score. The atomic dQ terms reach other queries, so they take the keys with
        # dropped ones zero: loaded so when no gate term needs them, else a copy.
        kv_mask = out_mask
        if ATOMIC_DQ:
            if not GATE_GRAD:
                kv_mask = keep_k[:, None] & in_d[None, :]
        k = tl.load(
            K + b * stride_b + h * stride_h + offs_n[:, None] * stride_n + offs_d[None, :],
            mask=kv_mask,
            other=0.0,
        )
        v = tl.load(
            V + b * stride_b + h * stride_h + offs_n[:, None] * stride_n + offs_d[None, :],
            mask=kv_mask,
            other=0.0,
        )
        k_dq = k
        if ATOMIC_DQ:
            if GATE_GRAD:
                k_dq = tl.where(keep_k[:, None], k, 0.0)
        dgate = tl.zeros((BLOCK_N,), dtype=tl.float32)
        dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
        dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
        full_count = tl.load(Q_COUNTS + 2 * b)
        query_count = tl.load(Q_COUNTS + 2 * b + 1)
        q_bh = Q + b * stride_b + h * stride_h
        do_bh = DO + b * stride_dob + h * stride_doh
        order_b = Q_ORDER + b * stride_order_b
        lse_bh = LSE + pid_bh * N
        delta_bh = DELTA + pid_bh * N
        dq_bh = DQ_ACC + b * stride_gb + h * stride_gh
        dk, dv, dgate = _masked_dkdv_query_blocks(
            k,
            v,
            dk,
            dv,
            dgate,
            keep_k,
            k_dq,
            live,  # a dead key block (visited for the gate) adds no dQ term
            q_bh,
            do_bh,
            lse_bh,
            delta_bh,
            dq_bh,
            order_b,
            0,
            full_count,
            stride_n,
            stride_don,
            stride_gn,
            N,
            offs_d,
            in_d,
            qk_scale,
            BLOCK_M,
            False,
            GATE_GRAD,
            ATOMIC_DQ,
            INPUT_PRECISION,
        )
        dk, dv, dgate = _masked_dkdv_query_blocks(
            k,
            v,
            dk,
            dv,
            dgate,
            keep_k,
            k_dq,
            live,
            q_bh,
            do_bh,
            lse_bh,
            delta_bh,
            dq_bh,
            order_b,
            full_count,
            query_count,
            stride_n,
            stride_don,
            stride_gn,
            N,
            offs_d,
            in_d,
            qk_scale,
            BLOCK_M,
            True,
            GATE_GRAD,
            ATOMIC_DQ,
            INPUT_PRECISION,
        )

        # Rows of dropped keys hold garbage of their own only: select zero.
        tl.store(dk_ptrs, tl.where(keep_k[:, None], dk * sm_scale, 0.0).to(DK.dtype.element_ty), mask=out_mask)
        tl.store(dv_ptrs, tl.where(keep_k[:, None], dv, 0.0).to(DV.dtype.element_ty), mask=out_mask)
        if GATE_GRAD:
            tl.store(DGATE + pid_bh * N + offs_n, dgate, mask=in_n)

    @triton.jit
    def _masked_dq_key_blocks(
        q,
        do,
        lse,
        delta,
        dq,
        K_bh,
        V_bh,
        KEEP_b,
        K_ORDER_b,
        start,
        stop,
        stride_kn,
        stride_vn,
        N,
        offs_d,
        in_d,
        qk_scale,
        BLOCK_N: tl.constexpr,
        MASK_KEYS: tl.constexpr,
        INPUT_PRECISION: tl.constexpr,
    ):
        """Accumulate dQ of one query block over the key blocks ``K_ORDER_b[start:stop]``, full ones or
        (``MASK_KEYS``) partly kept ones."""
        for i in range(start, stop):
            k, v, keep_k = _masked_key_block(
                K_bh, V_bh, KEEP_b, K_ORDER_b, i, stride_kn, stride_vn, N, offs_d, in_d, BLOCK_N, MASK_KEYS
            )
            dq = attn_bwd_dq_step(
                q, do, tl.trans(k), tl.trans(v), lse, delta, keep_k, dq, qk_scale, MASK_KEYS, INPUT_PRECISION
            )
        return dq

    @triton.jit
    def _masked_dq_tile(
        pid_m,
        b,
        h,
        pid_bh,
        Q,
        K,
        V,
        DO,
        KEEP,
        K_ORDER,
        K_COUNTS,
        LSE,
        DELTA,
        DQ,
        stride_b,
        stride_h,
        stride_n,
        stride_dob,
        stride_doh,
        stride_don,
        stride_gb,
        stride_gh,
        stride_gn,
        stride_keep_b,
        stride_order_b,
        N,
        sm_scale,
        qk_scale,
        HEAD_DIM: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        INPUT_PRECISION: tl.constexpr,
    ):
        """dQ of query block ``pid_m`` of (image ``b``, head ``h``), flat index ``pid_bh``, looping over the live key
        blocks. Arguments as in :func:`_masked_attn_bwd_kernel`, with the tiles transposed: BLOCK_M query rows,
        BLOCK_N key rows per step."""
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        in_m = offs_m < N
        in_d = offs_d < HEAD_DIM
        qd_mask = in_m[:, None] & in_d[None, :]
        dq_ptrs = DQ + b * stride_gb + h * stride_gh + offs_m[:, None] * stride_gn + offs_d[None, :]
        lse = tl.load(LSE + pid_bh * N + offs_m, mask=in_m, other=float("-inf"))
        row_valid = lse != float("-inf")
        # Skipped query blocks, and images without a kept token: nothing to compute.
        if tl.max(row_valid.to(tl.int32), 0) == 0:
            tl.store(dq_ptrs, tl.zeros((BLOCK_M, BLOCK_D), dtype=DQ.dtype.element_ty), mask=qd_mask)
            return

        lse = tl.where(row_valid, lse, 0.0)
        q = tl.load(
            Q + b * stride_b + h * stride_h + offs_m[:, None] * stride_n + offs_d[None, :],
            mask=qd_mask,
            other=0.0,
        )
        do = tl.load(
            DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_don + offs_d[None, :],
            mask=qd_mask,
            other=0.0,
        )
        delta = tl.load(DELTA + pid_bh * N + offs_m, mask=in_m, other=0.0)
        dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        full_count = tl.load(K_COUNTS + 2 * b)
        live_count = tl.load(K_COUNTS + 2 * b + 1)
        k_bh = K + b * stride_b + h * stride_h
        v_bh = V + b * stride_b + h * stride_h
        keep_b = KEEP + b * stride_keep_b
        order_b = K_ORDER + b * stride_order_b
        dq = _masked_dq_key_blocks(
            q,
            do,
            lse,
            delta,
            dq,
            k_bh,
            v_bh,
            keep_b,
            order_b,
            0,
            full_count,
            stride_n,
            stride_n,
            N,
            offs_d,
            in_d,
            qk_scale,
            BLOCK_N,
            False,
            INPUT_PRECISION,
        )
        dq = _masked_dq_key_blocks(
            q,
            do,
            lse,
            delta,
            dq,
            k_bh,
            v_bh,
            keep_b,
            order_b,
            full_count,
            live_count,
            stride_n,
            stride_n,
            N,
            offs_d,
            in_d,
            qk_scale,
            BLOCK_N,
            True,
            INPUT_PRECISION,
        )
        # Rows not computed (lse = -inf) hold garbage of their own only: select zero.
        tl.store(dq_ptrs, tl.where(row_valid[:, None], dq * sm_scale, 0.0).to(DQ.dtype.element_ty), mask=qd_mask)

    @triton.jit
    def _masked_attn_bwd_kernel(
        Q,
        K,
        V,
        DO,
        KEEP,
        Q_ORDER,
        Q_COUNTS,
        K_ORDER,
        K_COUNTS,
        LSE,
        DELTA,
        DQ,
        DK,
        DV,
        DGATE,
        stride_b,
        stride_h,
        stride_n,
        stride_dob,
        stride_doh,
        stride_don,
        stride_gb,
        stride_gh,
        stride_gn,
        stride_keep_b,
        stride_order_b,
        H,
        N,
        sm_scale,
        qk_scale,
        HEAD_DIM: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        GATE_GRAD: tl.constexpr,
        ATOMIC_DQ: tl.constexpr,
        PARTS: tl.constexpr,
        INPUT_PRECISION: tl.constexpr,
    ):
        """The backward after its preprocess: program ``(tile, image x head)`` computes dK, dV (and the per-head gate
        gradient) of key block ``tile`` over the listed query blocks, then dQ of query block ``tile`` over the live
        key blocks, in one launch (``PARTS="dkdv+dq"``) or two (``"dkdv"`` then ``"dq"``, where one would spill); with
        ATOMIC_DQ (``PARTS="dkdv"``) the first part also adds every dQ term to DQ with fp32 atomics.

        Pointers: Q, K, V, DO ``(B, H, N, D)`` (unit last stride); KEEP ``(B, N)`` int8; Q_ORDER / K_ORDER
        ``(B, cdiv(N, BLOCK_M))`` int32 the query blocks to visit (all of them when dropped queries are computed) /
        the live key blocks, full ones first, Q_COUNTS / K_COUNTS ``(B, 2)`` int32 contiguous, how many are full and
        how many to visit; LSE, DELTA ``(B, H, N)`` fp32 contiguous; DQ, DK, DV ``(B, H, N, D)`` (DQ: fp32 and zeroed
        when ATOMIC_DQ); DGATE ``(B, H, N)`` fp32 contiguous (written only when GATE_GRAD). Strides in (b, h, n) order
        (unit last strides; Q, K, V share one set, DQ, DK, DV another, the two lists one row stride); ``sm_scale`` is
        the softmax scale, ``qk_scale = sm_scale * log2(e)``. Constexprs: HEAD_DIM, BLOCK_D, BLOCK_N (the rows a
        program holds: keys, then queries), BLOCK_M (the rows per loop step, the block size of both lists),
        GATE_GRAD (also visit dead key blocks and compute the gate term from the real k/v), ATOMIC_DQ, PARTS,
        INPUT_PRECISION.

        Grid: ``flat_grid(cdiv(N, BLOCK_N), B * H)``.
        """
        tile, pid_bh = program_tile(tl.program_id(0), tl.cdiv(N, BLOCK_N))
        b = (pid_bh // H).to(tl.int64)
        h = (pid_bh % H).to(tl.int64)
        if PARTS != "dq":
            _masked_dkdv_tile(
                tile,
                b,
                h,
                pid_bh,
                Q,
                K,
                V,
                DO,
                KEEP,
                Q_ORDER,
                Q_COUNTS,
                LSE,
                DELTA,
                DK,
                DV,
                DGATE,
                DQ,
                stride_b,
                stride_h,
                stride_n,
                stride_dob,
                stride_doh,
                stride_don,
                stride_gb,
                stride_gh,
                stride_gn,
                stride_keep_b,
                stride_order_b,
                N,
                sm_scale,
                qk_scale,
                HEAD_DIM,
                BLOCK_D,
                BLOCK_M,
                BLOCK_N,
                GATE_GRAD,
                ATOMIC_DQ,
                INPUT_PRECISION,
            )
        if PARTS != "dkdv":
            _masked_dq_tile(
                tile,
                b,
                h,
                pid_bh,
                Q,
                K,
                V,
                DO,
                KEEP,
                K_ORDER,
                K_COUNTS,
                LSE,
                DELTA,
                DQ,
                stride_b,
                stride_h,
                stride_n,
                stride_dob,
                stride_doh,
                stride_don,
                stride_gb,
                stride_gh,
                stride_gn,
                stride_keep_b,
                stride_order_b,
                N,
                sm_scale,
                qk_scale,
                HEAD_DIM,
                BLOCK_D,
                BLOCK_N,
                BLOCK_M,
                INPUT_PRECISION,
            )
