"""Varlen attention over packed sequences (the token-gather path): each sequence attends only within itself.

The scheme, its limits, the autograd path and the configs are those of :mod:`._attention_core`, with "inside the
sequence" as the per-token validity mask. This module adds the sequence indexing and the grids.

The rows of all sequences lie back to back in ``(T, H, D)`` tensors; ``cu_seqlens`` gives the first row of every
sequence. One program owns ``BLOCK_M`` query rows (or ``BLOCK_N`` key rows) of one (sequence, head) pair and walks the
blocks of the same sequence only: the blocks inside it, then its ragged last block. Rows a program owns past the end
of its sequence are loaded as zeros and never stored. The log-sum-exp per row is kept for the backward (fp32,
``(H, T)``, base 2 of the scores scaled by ``scale * log2(e)``).

Cost: projections and MLP around it scale with the kept rows ``T``; attention scales with ``sum_b len_b ** 2``. Every
sequence's programs past its own length exit at once, so the grid is sized by ``max_seqlen`` (a host int, no sync).
The kernels run on 1-d grids (tiles x sequences x heads on CUDA's axis 0), so any number of sequences and heads fits.

Supported: sequences of length 0 and 1; q, k, v with any strides on the T and H dims (e.g.
``qkv.view(T, 3, H, D).unbind(1)``), unit stride on D.

Limits: ``max_seqlen`` must bound every sequence length (checked on the host unless ``check_cu_seqlens=False``, and
skipped while torch.compile traces; rows of a longer sequence past the bound are left unwritten). Tiles suit tens to a
few thousand tokens per sequence.

Bounds: every kernel clamps the offsets it reads into ``[0, T]`` (a sequence that ends before it starts is empty), so
no ``cu_seqlens`` can make it read or write outside its tensors, whether or not the host checked them.
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
    uses_registered_ops,
)
from ._autotune import autotune_enabled, tuned_config
from ._backend import TRITON_AVAILABLE, deterministic_backward, resolve_backend
from ._utils import (
    cdiv,
    check_tensor,
    empty,
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

__all__ = ["VarlenAttentionFunction", "get_atomic_bwd_config", "get_bwd_config", "get_fwd_config", "varlen_attention"]


def _validate(q, k, v, cu_seqlens, max_seqlen, check_cu_seqlens: bool) -> None:
    check_qkv(q, k, v, ndim=3, ndim_doc="(T, H, D)")
    check_tensor("cu_seqlens", cu_seqlens, ndim=1, dtypes=(torch.int32,), ndim_doc="(B + 1,)")
    if cu_seqlens.numel() < 1:
        raise ValueError(f"cu_seqlens: expected at least one entry (B + 1 >= 1), got {fmt_shape(cu_seqlens)}")
    if cu_seqlens.device != q.device:
        raise ValueError(f"cu_seqlens: expected device {q.device} like q, got {cu_seqlens.device}")
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or max_seqlen < 0:
        raise ValueError(f"max_seqlen: expected a non-negative int, got {max_seqlen!r}")
    # Reading cu_seqlens is a host sync (and a graph break under torch.compile, where the check is skipped): callers
    # that built the offsets themselves (pack_tokens) pass check_cu_seqlens=False.
    if check_cu_seqlens and not torch.compiler.is_compiling():
        values = cu_seqlens.tolist()
        if values[0] != 0 or any(b < a for a, b in zip(values[:-1], values[1:])):
            raise ValueError(f"cu_seqlens: expected non-decreasing offsets starting at 0, got {values}")
        if values[-1] != q.shape[0]:
            raise ValueError(f"cu_seqlens: expected the last entry to equal T = {q.shape[0]}, got {values[-1]}")
        longest = max((b - a for a, b in zip(values[:-1], values[1:])), default=0)
        if longest > max_seqlen:
            raise ValueError(
                f"max_seqlen: expected an upper bound on sequence lengths (>= {longest}), got {max_seqlen}"
            )


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    *,
    scale: float | None = None,
    check_cu_seqlens: bool = True,
    deterministic: bool | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Attention over sequences packed back to back; sequence b is rows ``cu_seqlens[b]:cu_seqlens[b + 1]``.

    Args:
        q, k, v: ``(T, H, D)``, fp16/bf16/fp32, strided views of a packed qkv projection allowed; ``16 <= D <= 128``.
        cu_seqlens: ``(B + 1,)`` int32 offsets; sequences of length 0 and 1 are allowed.
        max_seqlen: upper bound on the sequence lengths (a Python int, so no host sync is needed).
        scale: softmax scale (positive), default ``D ** -0.5``.
        check_cu_seqlens: validate ``cu_seqlens`` and ``max_seqlen`` on the host (one sync); pass False for offsets
            you built. Unchecked, no offsets can make the kernels read or write outside their tensors: they clamp
            every offset into ``[0, T]`` and treat a sequence that ends before it starts as empty. The result equals
            the checked one when the offsets are valid (non-decreasing from 0 to T) and ``max_seqlen`` bounds every
            length; otherwise it is that of the clamped offsets if those are valid and bounded by ``max_seqlen``, and
            unspecified if not (rows of the output and of the gradients may be left uninitialised).
        deterministic: the Triton backward: True the bitwise deterministic one, False the faster atomic-dQ one (dQ
            summed with fp32 atomics in a varying order; dK, dV stay deterministic), None the process-wide setting
            (:func:`faithful_vit.kernels.set_deterministic`, default True). fp32 inputs on CUDA always take the
            deterministic one (:func:`get_atomic_bwd_config`); the torch backend ignores it.
        backend: ``"auto"``, ``"triton"`` or ``"torch"``.

    Returns:
        ``(T, H, D)`` in the dtype of ``q``, contiguous.
    """
    _validate(q, k, v, cu_seqlens, max_seqlen, check_cu_seqlens)
    scale = softmax_scale(scale, q.shape[-1])
    if resolve_backend(backend, (q,)) == "torch":
        return reference.varlen_attention_ref(q, k, v, cu_seqlens, scale=scale, upcast=False)
    check_interpreter_dtype(q)
    q, k, v = (unit_last_stride(t) for t in (q, k, v))
    # Calls that need no gradient skip the autograd Function (host time per call matters at ViT sizes).
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        deterministic = deterministic_backward(deterministic)
        return VarlenAttentionFunction.apply(q, k, v, cu_seqlens, max_seqlen, scale, deterministic)
    return _forward(q, k, v, cu_seqlens, max_seqlen, scale)[0]


# ---- Autograd ----


class VarlenAttentionFunction(torch.autograd.Function):
    """Triton varlen attention with gradients for q, k, v: the one autograd path, on the registered ops on CUDA and
    on the launchers elsewhere (:func:`._attention_core.uses_registered_ops`)."""

    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, max_seqlen, scale, deterministic):
        out, lse = _forward(q, k, v, cu_seqlens, max_seqlen, scale)
        ctx.save_for_backward(q, k, v, cu_seqlens, out, lse)
        ctx.max_seqlen, ctx.scale, ctx.deterministic = max_seqlen, scale, deterministic
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, cu_seqlens, out, lse = ctx.saved_tensors
        bwd = torch.ops.faithful_vit.varlen_attention_bwd if uses_registered_ops(q) else _varlen_attention_bwd
        dq, dk, dv = bwd(q, k, v, cu_seqlens, out, lse, grad_out, ctx.max_seqlen, ctx.scale, ctx.deterministic)
        return dq, dk, dv, None, None, None, None


def _forward(q, k, v, cu_seqlens, max_seqlen, scale):
    fwd = torch.ops.faithful_vit.varlen_attention_fwd if uses_registered_ops(q) else _varlen_attention_fwd
    return fwd(q, k, v, cu_seqlens, max_seqlen, scale)


# ---- Registered ops (what torch.compile traces on CUDA, see :func:`._attention_core.uses_registered_ops`) ----

if OPS_AVAILABLE:

    @torch.library.triton_op("faithful_vit::varlen_attention_fwd", mutates_args=())
    def _varlen_attention_fwd_op(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, scale: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return _varlen_attention_fwd(q, k, v, cu_seqlens, max_seqlen, scale, launch=launch_in_op)

    @torch.library.triton_op("faithful_vit::varlen_attention_bwd", mutates_args=())
    def _varlen_attention_bwd_op(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cu_seqlens: torch.Tensor,
        out: torch.Tensor,
        lse: torch.Tensor,
        grad_out: torch.Tensor,
        max_seqlen: int,
        scale: float,
        deterministic: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return _varlen_attention_bwd(
            q, k, v, cu_seqlens, out, lse, grad_out, max_seqlen, scale, deterministic, launch=launch_in_op
        )


# ---- Launchers ----


def _varlen_attention_fwd(q, k, v, cu_seqlens, max_seqlen, scale, launch=launch_directly):
    """Returns ``out`` ``(T, H, D)`` and ``lse`` ``(H, T)`` fp32 (base 2, of scores scaled by ``scale * log2(e)``)."""
    total, num_heads, head_dim = q.shape
    batch = cu_seqlens.shape[0] - 1
    out = empty(total, num_heads, head_dim, dtype=q.dtype, device=q.device)
    lse = empty(num_heads, total, dtype=torch.float32, device=q.device)
    if total == 0 or batch == 0 or max_seqlen == 0:
        return out, lse
    # HEAD_DIM is a constexpr, so under torch.compile the head dim is specialised; max_seqlen stays symbolic (the
    # tiles depend on it only through comparisons, see _short_tile), so one graph serves every length.
    head_dim = int(head_dim)
    cfg = get_fwd_config(max_seqlen, head_dim, q.dtype, q.device)
    if autotune_enabled():  # the candidates and the tuning key are built only then
        cfg = tuned_config(
            "varlen_attention_fwd",
            (triton.next_power_of_2(max_seqlen), head_dim, q.dtype),
            cfg,
            fwd_candidates(max_seqlen, head_dim, q.dtype, q.device),
            lambda c: _launch_fwd(
                q, k, v, cu_seqlens, max_seqlen, scale, c, launch, *map(torch.empty_like, (out, lse))
            ),
            (q, k, v),
        )
    return _launch_fwd(q, k, v, cu_seqlens, max_seqlen, scale, cfg, launch, out, lse)


def _launch_fwd(q, k, v, cu_seqlens, max_seqlen, scale, cfg, launch, out, lse):
    num_heads, head_dim = q.shape[1], int(q.shape[2])
    batch = cu_seqlens.shape[0] - 1
    grid = flat_grid(cdiv(max_seqlen, cfg["BLOCK_M"]), batch * num_heads)
    launch(_varlen_attn_fwd_kernel)[grid](
        q,
        k,
        v,
        out,
        lse,
        cu_seqlens,
        q.shape[0],
        max_seqlen,
        batch,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        out.stride(0),
        out.stride(1),
        lse.stride(0),
        scale * LOG2E.value,
        HEAD_DIM=head_dim,
        BLOCK_D=next_power_of_2(head_dim),
        INPUT_PRECISION=dot_precision(q.dtype),
        BLOCK_M=cfg["BLOCK_M"],
        BLOCK_N=cfg["BLOCK_N"],
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )
    return out, lse


def _varlen_attention_bwd(
    q, k, v, cu_seqlens, out, lse, grad_out, max_seqlen, scale, deterministic, launch=launch_directly
):
    """Launch the backward kernels (deterministic, or atomic dQ). Returns dq, dk, dv, each ``(T, H, D)`` contiguous
    in the dtype of ``q``."""
    total, num_heads, head_dim = q.shape
    batch = cu_seqlens.shape[0] - 1
    grad_out = unit_last_stride(grad_out)
    dq, dk, dv = (empty(total, num_heads, head_dim, dtype=q.dtype, device=q.device) for _ in range(3))
    if total == 0 or batch == 0 or max_seqlen == 0:
        return dq, dk, dv
    head_dim = int(head_dim)
    cfg = None if deterministic else get_atomic_bwd_config(max_seqlen, head_dim, q.dtype, q.device)
    candidates = atomic_bwd_candidates
    if cfg is None:  # the deterministic backward, asked for or the only one (fp32 on CUDA)
        deterministic, cfg, candidates = True, get_bwd_config(max_seqlen, head_dim, q.dtype, q.device), bwd_candidates
    args = (q, k, v, cu_seqlens, out, lse, grad_out, max_seqlen, scale, deterministic)
    if autotune_enabled():
        cfg = tuned_config(
            "varlen_attention_bwd",
            (triton.next_power_of_2(max_seqlen), head_dim, q.dtype, deterministic),
            cfg,
            candidates(max_seqlen, head_dim, q.dtype, q.device),
            lambda c: _launch_bwd(*args, c, launch, *map(torch.empty_like, (dq, dk, dv))),
            (q, k, v),
        )
    return _launch_bwd(*args, cfg, launch, dq, dk, dv)


def _launch_bwd(q, k, v, cu_seqlens, out, lse, grad_out, max_seqlen, scale, deterministic, cfg, launch, dq, dk, dv):
    total, num_heads, head_dim = q.shape[0], q.shape[1], int(q.shape[2])
    batch = cu_seqlens.shape[0] - 1
    block_d = next_power_of_2(head_dim)
    precision = dot_precision(q.dtype)

    # The atomic-dQ backward sums dQ in fp32: in dq itself for fp32 inputs, else in an accumulator cast at the end.
    # The preprocess zeroes it; the deterministic backward never touches it.
    dq_acc = dq
    if not deterministic and q.dtype != torch.float32:
        dq_acc = empty(total, num_heads, head_dim, dtype=torch.float32, device=q.device)
    delta = empty(num_heads, total, dtype=torch.float32, device=q.device)
    pre_block = cfg["BLOCK_PRE"]
    launch(_varlen_attn_bwd_preprocess_kernel)[flat_grid(cdiv(total, pre_block), num_heads)](
        out,
        grad_out,
        delta,
        dq_acc,
        total,
        out.stride(0),
        out.stride(1),
        grad_out.stride(0),
        grad_out.stride(1),
        delta.stride(0),
        dq_acc.stride(0),
        dq_acc.stride(1),
        HEAD_DIM=head_dim,
        BLOCK_D=block_d,
        BLOCK_M=pre_block,
        ZERO_DQ=not deterministic,
    )
    strides = (
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        grad_out.stride(0),
        grad_out.stride(1),
        lse.stride(0),
    )
    block_m, block_n = cfg["BLOCK_M"], cfg["BLOCK_N"]
    args = (
        q,
        k,
        v,
        grad_out,
        lse,
        delta,
        dq_acc,
        dk,
        dv,
        cu_seqlens,
        total,
        max_seqlen,
        batch,
        *strides,
        dk.stride(0),  # dq (or its accumulator), dk, dv: one layout
        dk.stride(1),
        scale,
    )
    for parts, stages in bwd_parts(cfg, deterministic):
        launch(_varlen_attn_bwd_kernel)[flat_grid(cdiv(max_seqlen, block_n), batch * num_heads)](
            *args,
            HEAD_DIM=head_dim,
            BLOCK_D=block_d,
            INPUT_PRECISION=precision,
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            ATOMIC_DQ=not deterministic,
            PARTS=parts,
            num_warps=cfg["num_warps"],
            num_stages=stages,
        )
    if not deterministic:
        torch.mul(dq_acc, scale, out=dq)  # the softmax scale, once, and the cast
    return dq, dk, dv


# ---- Configs ----


def _short_tile(max_seqlen: int, preferred: int) -> int:
    """The preferred tile (a power of two), halved (not below 16, the smallest dot) while every sequence fits in half
    of it. Only comparisons of ``max_seqlen``: under torch.compile they guard on a range, not on its value."""
    tile = preferred
    while tile > 16 and tile // 2 >= max_seqlen:
        tile //= 2
    return tile


def get_fwd_config(max_seqlen: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> dict[str, int]:
    """Tiles and launch options of the forward kernel (see :mod:`._attention_core` for the config functions).

    fp16/bf16: 128 query rows, so that every K/V tile loaded serves twice the rows of a 64-row tile, on 8 warps (two
    warp groups of 64 rows each: on 4 warps the accumulator spills above head dim 64), and 64 keys. fp32's exact FMA
    dots take small tiles over 8 warps. Tiles shrink for short sequences.
    """
    if dtype == torch.float32:
        block_m, block_n, num_warps, num_stages = 32, 64, 8, 1
    else:
        block_m, block_n, num_warps, num_stages = 128, 64, 8, 3
    return {
        "BLOCK_M": _short_tile(max_seqlen, block_m),
        "BLOCK_N": _short_tile(max_seqlen, block_n),
        "num_warps": num_warps,
        "num_stages": num_stages,
    }


def get_bwd_config(max_seqlen: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> dict[str, int]:
    """Tiles and launch options of the deterministic backward's kernel, and ``BLOCK_PRE`` rows per preprocess
    program (see :mod:`._attention_core`): a program holds ``BLOCK_N`` rows (keys for dK/dV, then queries for dQ)
    and steps over ``BLOCK_M`` (queries, keys), both parts in one launch unless ``SPLIT_DQ``
    (:func:`._attention_core.bwd_parts`). Above head dim 64 it holds 128 rows over 8 warps and steps over 32 (the
    Triton tutorial's shapes), in two launches: one kernel holding both parts would spill. At head dim 64 those tiles
    would cost more instructions per score than 64 x 64 ones. fp32 (exact FMA dots) takes small tiles, in two
    launches."""
    if dtype == torch.float32:
        block_m, block_n, num_warps, num_stages = (32, 32, 8, 1) if head_dim <= 64 else (32, 16, 8, 1)
    elif head_dim <= 64:
        block_m, block_n, num_warps, num_stages = 64, 64, 4, 3
    else:
        block_m, block_n, num_warps, num_stages = 32, 128, 8, 3
    return {
        "BLOCK_M": _short_tile(max_seqlen, block_m),
        "BLOCK_N": _short_tile(max_seqlen, block_n),
        "BLOCK_PRE": 32 if dtype == torch.float32 else 64,
        "SPLIT_DQ": int(head_dim > 64 or dtype == torch.float32),
        "num_warps": num_warps,
        "num_stages": num_stages,
    }


def get_atomic_bwd_config(
    max_seqlen: int, head_dim: int, dtype: torch.dtype, device: torch.device
) -> dict[str, int] | None:
    """Tiles and launch options of the atomic-dQ backward's kernel (``deterministic=False``) and its preprocess: a
    program holds ``BLOCK_N`` keys and steps over ``BLOCK_M`` queries, whose dQ terms ``(BLOCK_M, D)`` fp32 it also
    holds. None for fp32 on CUDA, as in masked attention: fp32 inputs take the deterministic backward there."""
    if dtype == torch.float32:
        if device.type == "cuda":
            return None
        block_m, block_n, num_warps, num_stages = (32, 32, 8, 1) if head_dim <= 64 else (32, 16, 8, 1)
    elif head_dim <= 64:
        block_m, block_n, num_warps, num_stages = 32, 64, 4, 2
    else:
        block_m, block_n, num_warps, num_stages = 32, 64, 8, 2
    return {
        "BLOCK_M": _short_tile(max_seqlen, block_m),
        "BLOCK_N": _short_tile(max_seqlen, block_n),
        "BLOCK_PRE": 64,
        "num_warps": num_warps,
        "num_stages": num_stages,
    }


def _configs(max_seqlen: int, *rows: tuple[int, int, int, int]) -> list[dict[str, int]]:
    """Distinct configs from (BLOCK_M, BLOCK_N, num_warps, num_stages) rows, tiles shrunk for short sequences."""
    configs = []
    for block_m, block_n, num_warps, num_stages in rows:
        cfg = {
            "BLOCK_M": _short_tile(max_seqlen, block_m),
            "BLOCK_N": _short_tile(max_seqlen, block_n),
            "num_warps": num_warps,
            "num_stages": num_stages,
        }
        if cfg not in configs:
            configs.append(cfg)
    return configs


def fwd_candidates(max_seqlen: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> list[dict[str, int]]:
    """Configs the forward's autotuning times besides :func:`get_fwd_config` (configs that do not fit are skipped)."""
    if device.type != "cuda":
        return _configs(max_seqlen, (16, 16, 1, 1))
    if dtype == torch.float32:
        return _configs(max_seqlen, (32, 32, 4, 2), (64, 64, 4, 1))
    return _configs(max_seqlen, (64, 64, 4, 3), (64, 32, 4, 3), (128, 32, 8, 2), (64, 64, 4, 2), (32, 64, 4, 3))


def bwd_candidates(max_seqlen: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> list[dict[str, int]]:
    """Configs the deterministic backward's autotuning times besides :func:`get_bwd_config` (above head dim 64 in two
    launches)."""
    rows = (
        [(16, 16, 1, 1)]
        if device.type != "cuda"
        else (
            [(32, 32, 4, 1), (16, 64, 4, 1)]
            if dtype == torch.float32
            else [(64, 64, 4, 2), (32, 64, 4, 2), (32, 128, 8, 2), (64, 64, 8, 2), (64, 128, 8, 1)]
        )
    )
    split = int(head_dim > 64 or dtype == torch.float32)
    return [{**cfg, "BLOCK_PRE": 64, "SPLIT_DQ": split} for cfg in _configs(max_seqlen, *rows)]


def atomic_bwd_candidates(
    max_seqlen: int, head_dim: int, dtype: torch.dtype, device: torch.device
) -> list[dict[str, int]]:
    """Configs the atomic-dQ backward's autotuning times besides :func:`get_atomic_bwd_config` (none for fp32 on
    CUDA)."""
    if device.type == "cuda" and dtype == torch.float32:
        return []
    rows = (
        [(16, 16, 1, 1)]
        if device.type != "cuda"
        else (
            [(32, 32, 4, 1), (16, 64, 4, 1)]
            if dtype == torch.float32
            else [(32, 64, 4, 2), (64, 64, 4, 3), (32, 64, 8, 2), (32, 128, 8, 2), (64, 32, 4, 2)]
        )
    )
    return [{**cfg, "BLOCK_PRE": 64} for cfg in _configs(max_seqlen, *rows)]


# ---- Kernels ----


if TRITON_AVAILABLE:

    @triton.jit
    def _sequence_tile(pid, CuSeqlens, total, num_tiles, num_seqs):
        """Tile, head, and the sequence's first row and length of program ``pid`` (``tl.program_id(0)``) in a grid
        from ``flat_grid(num_tiles, num_seqs * H)`` (tiles fastest, then sequences).

        The offsets are clamped into ``[0, total]`` and a sequence ending before it starts is empty, so that no
        ``cu_seqlens``, checked or not, makes a kernel address a row outside its tensors."""
        tile, group = program_tile(pid, num_tiles)
        seq = group % num_seqs
        start = tl.minimum(tl.maximum(tl.load(CuSeqlens + seq), 0), total)
        end = tl.minimum(tl.maximum(tl.load(CuSeqlens + seq + 1), start), total)
        return tile, group // num_seqs, start, end - start

    @triton.jit
    def _varlen_fwd_key_blocks(
        q,
        m_i,
        l_i,
        acc,
        K_seq,
        V_seq,
        start,
        stop,
        seq_len,
        stride_kt,
        stride_vt,
        offs_d,
        mask_d,
        qk_scale_log2,
        BLOCK_N: tl.constexpr,
        MASK_KEYS: tl.constexpr,
        INPUT_PRECISION: tl.constexpr,
    ):
        """The online softmax over the keys ``start:stop`` of one (sequence, head) in blocks of ``BLOCK_N``, inside
        the sequence or (``MASK_KEYS``) its ragged last block. ``K_seq``, ``V_seq`` point at the sequence's first row
        (and head)."""
        offs_n = tl.arange(0, BLOCK_N)
        for start_n in range(start, stop, BLOCK_N):
            cols = start_n + offs_n
            mask_n = cols < seq_len
            if MASK_KEYS:
                kt_mask = mask_n[None, :] & mask_d[:, None]
                v_mask = mask_n[:, None] & mask_d[None, :]
            else:
                kt_mask = mask_d[:, None]
                v_mask = mask_d[None, :]
            kt = tl.load(K_seq + cols[None, :] * stride_kt + offs_d[:, None], mask=kt_mask, other=0.0)
            v = tl.load(V_seq + cols[:, None] * stride_vt + offs_d[None, :], mask=v_mask, other=0.0)
            m_i, l_i, acc = attn_fwd_step(q, kt, v, mask_n, m_i, l_i, acc, qk_scale_log2, MASK_KEYS, INPUT_PRECISION)
        return m_i, l_i, acc

    @triton.jit
    def _varlen_attn_fwd_kernel(
        Q,
        K,
        V,
        Out,
        Lse,
        CuSeqlens,
        total,
        max_seqlen,
        num_seqs,
        stride_qt,
        stride_qh,
        stride_kt,
        stride_kh,
        stride_vt,
        stride_vh,
        stride_ot,
        stride_oh,
        stride_lse_h,
        qk_scale_log2,
        HEAD_DIM: tl.constexpr,
        BLOCK_D: tl.constexpr,
        INPUT_PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        """Output and log-sum-exp of ``BLOCK_M`` query rows of one (sequence, head) pair.

        Pointers: Q, K, V ``(T, H, D)`` with strides ``stride_*t``, ``stride_*h`` and unit stride on D; Out likewise;
        Lse ``(H, T)`` fp32 (base 2) with row stride ``stride_lse_h``; CuSeqlens ``(B + 1,)`` int32.
        Scalars: ``total`` = T, ``max_seqlen`` (the bound the grid was sized by), ``num_seqs`` = B,
        ``qk_scale_log2`` = softmax scale * log2(e).
        Constexprs: HEAD_DIM (D), BLOCK_D (next power of two >= D), INPUT_PRECISION of the dots, BLOCK_M, BLOCK_N.
        Grid: ``flat_grid(cdiv(max_seqlen, BLOCK_M), B * H)``.
        """
        pid_m, head, seq_start, seq_len = _sequence_tile(
            tl.program_id(0), CuSeqlens, total, tl.cdiv(max_seqlen, BLOCK_M), num_seqs
        )
        if pid_m * BLOCK_M >= seq_len:  # this tile lies past the sequence (max_seqlen is only a bound)
            return

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        mask_d = offs_d < HEAD_DIM
        mask_m = offs_m < seq_len
        rows_m = (seq_start + offs_m).to(tl.int64)
        q = tl.load(
            Q + rows_m[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
            mask=mask_m[:, None] & mask_d[None, :],
            other=0.0,
        )

        # Every tile that gets here has at least one valid key in its first step, so the running max is finite from then
        # on and padded rows (q = 0) stay finite too: no NaN guard is needed.
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        k_seq = K + seq_start.to(tl.int64) * stride_kt + head * stride_kh
        v_seq = V + seq_start.to(tl.int64) * stride_vt + head * stride_vh
        full_end = seq_len - seq_len % BLOCK_N
        m_i, l_i, acc = _varlen_fwd_key_blocks(
            q,
            m_i,
            l_i,
            acc,
            k_seq,
            v_seq,
            0,
            full_end,
            seq_len,
            stride_kt,
            stride_vt,
            offs_d,
            mask_d,
            qk_scale_log2,
            BLOCK_N,
            False,
            INPUT_PRECISION,
        )
        m_i, l_i, acc = _varlen_fwd_key_blocks(
            q,
            m_i,
            l_i,
            acc,
            k_seq,
            v_seq,
            full_end,
            seq_len,
            seq_len,
            stride_kt,
            stride_vt,
            offs_d,
            mask_d,
            qk_scale_log2,
            BLOCK_N,
            True,
            INPUT_PRECISION,
        )

        acc = acc / l_i[:, None]
        tl.store(
            Out + rows_m[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
            acc.to(Out.dtype.element_ty),
            mask=mask_m[:, None] & mask_d[None, :],
        )
        lse = m_i + tl.log2(l_i)
        tl.store(Lse + head * stride_lse_h + rows_m, lse, mask=mask_m)

    @triton.jit
    def _varlen_attn_bwd_preprocess_kernel(
        Out,
        DOut,
        Delta,
        DQAcc,
        total,
        stride_ot,
        stride_oh,
        stride_dot,
        stride_doh,
        stride_delta_h,
        stride_dqt,
        stride_dqh,
        HEAD_DIM: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_M: tl.constexpr,
        ZERO_DQ: tl.constexpr,
    ):
        """``delta = rowsum(dO * O)`` in fp32 for ``BLOCK_M`` rows of one head (all rows belong to some sequence), and
        (``ZERO_DQ``) zeros in those rows of the atomic-dQ accumulator, which saves the backward a launch.

        Pointers: Out, DOut ``(T, H, D)`` with strides ``stride_ot/oh``, ``stride_dot/doh``; Delta ``(H, T)`` fp32 with
        row stride ``stride_delta_h``; DQAcc ``(T, H, D)`` fp32 with strides ``stride_dqt/dqh`` (written only when
        ZERO_DQ). Scalars: ``total`` = T.
        Constexprs: HEAD_DIM, BLOCK_D (next power of two >= D), BLOCK_M, ZERO_DQ.
        Grid: ``flat_grid(cdiv(T, BLOCK_M), H)``.
        """
        tile, head = program_tile(tl.program_id(0), tl.cdiv(total, BLOCK_M))
        rows = (tile * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        offs_d = tl.arange(0, BLOCK_D)
        mask = (rows < total)[:, None] & (offs_d < HEAD_DIM)[None, :]
        o = tl.load(Out + rows[:, None] * stride_ot + head * stride_oh + offs_d[None, :], mask=mask, other=0.0)
        do = tl.load(DOut + rows[:, None] * stride_dot + head * stride_doh + offs_d[None, :], mask=mask, other=0.0)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
        tl.store(Delta + head * stride_delta_h + rows, delta, mask=rows < total)
        if ZERO_DQ:
            tl.store(
                DQAcc + rows[:, None] * stride_dqt + head * stride_dqh + offs_d[None, :],
                tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32),
                mask=mask,
            )

    @triton.jit
    def _varlen_dkdv_query_blocks(
        k,
        v,
        dk,
        dv,
        mask_n,
        Q_seq,
        DOut_seq,
        Lse_seq,
        Delta_seq,
        DQ_seq,
        start,
        stop,
        seq_len,
        stride_qt,
        stride_dot,
        stride_dqt,
        offs_d,
        mask_d,
        qk_scale_log2,
        BLOCK_M: tl.constexpr,
        MASK_QUERIES: tl.constexpr,
        ATOMIC_DQ: tl.constexpr,
        INPUT_PRECISION: tl.constexpr,
    ):
        """Accumulate dK, dV of one key block over the queries ``start:stop`` of its sequence in blocks of
        ``BLOCK_M``, inside the sequence or (``MASK_QUERIES``) its ragged last block. ``Q_seq``, ``DOut_seq`` point at
        the sequence's first row (and head), ``Lse_seq``, ``Delta_seq`` at its first entry of the head's row. With
        ``ATOMIC_DQ`` each step also adds its dQ term to the fp32 rows ``DQ_seq`` of the sequence (``mask_n``: which
        keys of the block lie inside it, see :func:`._attention_core.attn_bwd_dq_part`)."""
        offs_m = tl.arange(0, BLOCK_M)
        for start_m in range(start, stop, BLOCK_M):
            cols = start_m + offs_m
            mask_m = cols < seq_len
            if MASK_QUERIES:
                qd_mask = mask_m[:, None] & mask_d[None, :]
                lse = tl.load(Lse_seq + cols, mask=mask_m, other=0.0)
                delta = tl.load(Delta_seq + cols, mask=mask_m, other=0.0)
            else:
                qd_mask = mask_d[None, :]
                lse = tl.load(Lse_seq + cols)
                delta = tl.load(Delta_seq + cols)
            q = tl.load(Q_seq + cols[:, None] * stride_qt + offs_d[None, :], mask=qd_mask, other=0.0)
            do = tl.load(DOut_seq + cols[:, None] * stride_dot + offs_d[None, :], mask=qd_mask, other=0.0)
            dk, dv, ds_t = attn_bwd_dkdv_step(
                k, v, q, do, lse, delta, mask_m, dk, dv, qk_scale_log2, MASK_QUERIES, INPUT_PRECISION
            )
            if ATOMIC_DQ:
                tl.atomic_add(
                    DQ_seq + cols[:, None] * stride_dqt + offs_d[None, :],
                    attn_bwd_dq_part(ds_t, mask_n, k, INPUT_PRECISION),
                    mask=qd_mask,
                    sem="relaxed",
                )
        return dk, dv

    @triton.jit
    def _varlen_dkdv_tile(
        pid_n,
        head,
        seq_start,
        seq_len,
        Q,
        K,
        V,
        DOut,
        Lse,
        Delta,
        DK,
        DV,
        DQAcc,
        stride_qt,
        stride_qh,
        stride_kt,
        stride_kh,
        stride_vt,
        stride_vh,
        stride_dot,
        stride_doh,
        stride_lse_h,
        stride_gt,
        stride_gh,
        scale,
        HEAD_DIM: tl.constexpr,
        BLOCK_D: tl.constexpr,
        INPUT_PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        ATOMIC_DQ: tl.constexpr,
    ):
        """dK and dV of key block ``pid_n`` of (sequence, ``head``), rows ``seq_start:seq_start + seq_len``, looping
        over the sequence's query blocks; with ATOMIC_DQ also every query's dQ term, added to DQAcc with fp32 atomics
        (unscaled: the launcher scales it once), so that no dQ pass recomputes the scores. Arguments as in
        :func:`_varlen_attn_bwd_kernel`; BLOCK_N key rows, BLOCK_M query rows per step."""
        qk_scale_log2 = scale * LOG2E
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        mask_d = offs_d < HEAD_DIM
        mask_n = offs_n < seq_len
        rows_n = (seq_start + offs_n).to(tl.int64)
        mask_nd = mask_n[:, None] & mask_d[None, :]
        k = tl.load(K + rows_n[:, None] * stride_kt + head * stride_kh + offs_d[None, :], mask=mask_nd, other=0.0)
        v = tl.load(V + rows_n[:, None] * stride_vt + head * stride_vh + offs_d[None, :], mask=mask_nd, other=0.0)

        dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        # Key rows past the end (zero k, v) accumulate garbage of their own only; the store below skips them.
        start = seq_start.to(tl.int64)
        q_seq = Q + start * stride_qt + head * stride_qh
        do_seq = DOut + start * stride_dot + head * stride_doh
        lse_seq = Lse + head * stride_lse_h + start
        delta_seq = Delta + head * stride_lse_h + start
        dq_seq = DQAcc + start * stride_gt + head * stride_gh
        full_end = seq_len - seq_len % BLOCK_M
        dk, dv = _varlen_dkdv_query_blocks(
            k,
            v,
            dk,
            dv,
            mask_n,
            q_seq,
            do_seq,
            lse_seq,
            delta_seq,
            dq_seq,
            0,
            full_end,
            seq_len,
            stride_qt,
            stride_dot,
            stride_gt,
            offs_d,
            mask_d,
            qk_scale_log2,
            BLOCK_M,
            False,
            ATOMIC_DQ,
            INPUT_PRECISION,
        )
        dk, dv = _varlen_dkdv_query_blocks(
            k,
            v,
            dk,
            dv,
            mask_n,
            q_seq,
            do_seq,
            lse_seq,
            delta_seq,
            dq_seq,
            full_end,
            seq_len,
            seq_len,
            stride_qt,
            stride_dot,
            stride_gt,
            offs_d,
            mask_d,
            qk_scale_log2,
            BLOCK_M,
            True,
            ATOMIC_DQ,
            INPUT_PRECISION,
        )

        dk *= scale
        tl.store(
            DK + rows_n[:, None] * stride_gt + head * stride_gh + offs_d[None, :],
            dk.to(DK.dtype.element_ty),
            mask=mask_nd,
        )
        tl.store(
            DV + rows_n[:, None] * stride_gt + head * stride_gh + offs_d[None, :],
            dv.to(DV.dtype.element_ty),
            mask=mask_nd,
        )

    @triton.jit
    def _varlen_dq_key_blocks(
        q,
        do,
        lse,
        delta,
        dq,
        K_seq,
        V_seq,
        start,
        stop,
        seq_len,
        stride_kt,
        stride_vt,
        offs_d,
        mask_d,
        qk_scale_log2,
        BLOCK_N: tl.constexpr,
        MASK_KEYS: tl.constexpr,
        INPUT_PRECISION: tl.constexpr,
    ):
        """Accumulate dQ of one query block over the keys ``start:stop`` of its sequence in blocks of ``BLOCK_N``,
        inside the sequence or (``MASK_KEYS``) its ragged last block."""
        offs_n = tl.arange(0, BLOCK_N)
        for start_n in range(start, stop, BLOCK_N):
            cols = start_n + offs_n
            mask_n = cols < seq_len
            if MASK_KEYS:
                kt_mask = mask_n[None, :] & mask_d[:, None]
            else:
                kt_mask = mask_d[:, None]
            kt = tl.load(K_seq + cols[None, :] * stride_kt + offs_d[:, None], mask=kt_mask, other=0.0)
            vt = tl.load(V_seq + cols[None, :] * stride_vt + offs_d[:, None], mask=kt_mask, other=0.0)
            dq = attn_bwd_dq_step(q, do, kt, vt, lse, delta, mask_n, dq, qk_scale_log2, MASK_KEYS, INPUT_PRECISION)
        return dq

    @triton.jit
    def _varlen_dq_tile(
        pid_m,
        head,
        seq_start,
        seq_len,
        Q,
        K,
        V,
        DOut,
        Lse,
        Delta,
        DQ,
        stride_qt,
        stride_qh,
        stride_kt,
        stride_kh,
        stride_vt,
        stride_vh,
        stride_dot,
        stride_doh,
        stride_lse_h,
        stride_gt,
        stride_gh,
        scale,
        HEAD_DIM: tl.constexpr,
        BLOCK_D: tl.constexpr,
        INPUT_PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        """dQ of query block ``pid_m`` of (sequence, ``head``), rows ``seq_start:seq_start + seq_len``, looping over
        the sequence's key blocks. Arguments as in :func:`_varlen_attn_bwd_kernel`, with the tiles transposed:
        BLOCK_M query rows, BLOCK_N key rows per step."""
        qk_scale_log2 = scale * LOG2E
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        mask_d = offs_d < HEAD_DIM
        mask_m = offs_m < seq_len
        rows_m = (seq_start + offs_m).to(tl.int64)
        mask_md = mask_m[:, None] & mask_d[None, :]
        q = tl.load(Q + rows_m[:, None] * stride_qt + head * stride_qh + offs_d[None, :], mask=mask_md, other=0.0)
        do = tl.load(DOut + rows_m[:, None] * stride_dot + head * stride_doh + offs_d[None, :], mask=mask_md, other=0.0)
        lse = tl.load(Lse + head * stride_lse_h + rows_m, mask=mask_m, other=0.0)
        delta = tl.load(Delta + head * stride_lse_h + rows_m, mask=mask_m, other=0.0)

        dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        # Query rows past the end (zero q, do) accumulate garbage of their own only; the store below skips them.
        k_seq = K + seq_start.to(tl.int64) * stride_kt + head * stride_kh
        v_seq = V + seq_start.to(tl.int64) * stride_vt + head * stride_vh
        full_end = seq_len - seq_len % BLOCK_N
        dq = _varlen_dq_key_blocks(
            q,
            do,
            lse,
            delta,
            dq,
            k_seq,
            v_seq,
            0,
            full_end,
            seq_len,
            stride_kt,
            stride_vt,
            offs_d,
            mask_d,
            qk_scale_log2,
            BLOCK_N,
            False,
            INPUT_PRECISION,
        )
        dq = _varlen_dq_key_blocks(
            q,
            do,
            lse,
            delta,
            dq,
            k_seq,
            v_seq,
            full_end,
            seq_len,
            seq_len,
            stride_kt,
            stride_vt,
            offs_d,
            mask_d,
            qk_scale_log2,
            BLOCK_N,
            True,
            INPUT_PRECISION,
        )

        dq *= scale
        tl.store(
            DQ + rows_m[:, None] * stride_gt + head * stride_gh + offs_d[None, :],
            dq.to(DQ.dtype.element_ty),
            mask=mask_md,
        )

    @triton.jit
    def _varlen_attn_bwd_kernel(
        Q,
        K,
        V,
        DOut,
        Lse,
        Delta,
        DQ,
        DK,
        DV,
        CuSeqlens,
        total,
        max_seqlen,
        num_seqs,
        stride_qt,
        stride_qh,
        stride_kt,
        stride_kh,
        stride_vt,
        stride_vh,
        stride_dot,
        stride_doh,
        stride_lse_h,
        stride_gt,
        stride_gh,
        scale,
        HEAD_DIM: tl.constexpr,
        BLOCK_D: tl.constexpr,
        INPUT_PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        ATOMIC_DQ: tl.constexpr,
        PARTS: tl.constexpr,
    ):
        """The backward after its preprocess: program ``(tile, sequence x head)`` computes dK and dV of key block
        ``tile`` over the sequence's query blocks, then dQ of query block ``tile`` over its key blocks, in one launch
        (``PARTS="dkdv+dq"``) or two (``"dkdv"`` then ``"dq"``, where one would spill); with ATOMIC_DQ
        (``PARTS="dkdv"``) the first part also adds every dQ term to DQ with fp32 atomics.

        Pointers: Q, K, V, DOut ``(T, H, D)`` with strides ``stride_*t``, ``stride_*h`` and unit stride on D;
        Lse (base 2) and Delta ``(H, T)`` fp32 sharing row stride ``stride_lse_h``; DQ, DK, DV ``(T, H, D)`` sharing
        strides ``stride_gt``, ``stride_gh`` (DQ: fp32 and zeroed when ATOMIC_DQ); CuSeqlens ``(B + 1,)`` int32.
        Scalars: ``total``, ``max_seqlen``, ``num_seqs`` as in the forward, softmax ``scale``.
        Constexprs: HEAD_DIM, BLOCK_D (next power of two >= D), INPUT_PRECISION of the dots, BLOCK_N (the rows a
        program holds: keys, then queries), BLOCK_M (the rows per loop step), ATOMIC_DQ, PARTS.
        Grid: ``flat_grid(cdiv(max_seqlen, BLOCK_N), B * H)``.
        """
        tile, head, seq_start, seq_len = _sequence_tile(
            tl.program_id(0), CuSeqlens, total, tl.cdiv(max_seqlen, BLOCK_N), num_seqs
        )
        if tile * BLOCK_N >= seq_len:  # this tile lies past the sequence (max_seqlen is only a bound)
            return
        if PARTS != "dq":
            _varlen_dkdv_tile(
                tile,
                head,
                seq_start,
                seq_len,
                Q,
                K,
                V,
                DOut,
                Lse,
                Delta,
                DK,
                DV,
                DQ,
                stride_qt,
                stride_qh,
                stride_kt,
                stride_kh,
                stride_vt,
                stride_vh,
                stride_dot,
                stride_doh,
                stride_lse_h,
                stride_gt,
                stride_gh,
                scale,
                HEAD_DIM,
                BLOCK_D,
                INPUT_PRECISION,
                BLOCK_M,
                BLOCK_N,
                ATOMIC_DQ,
            )
        if PARTS != "dkdv":
            _varlen_dq_tile(
                tile,
                head,
                seq_start,
                seq_len,
                Q,
                K,
                V,
                DOut,
                Lse,
                Delta,
                DQ,
                stride_qt,
                stride_qh,
                stride_kt,
                stride_kh,
                stride_vt,
                stride_vh,
                stride_dot,
                stride_doh,
                stride_lse_h,
                stride_gt,
                stride_gh,
                scale,
                HEAD_DIM,
                BLOCK_D,
                INPUT_PRECISION,
                BLOCK_N,
                BLOCK_M,
            )
