"""What the two attention kernel families share: the scheme, the per-block math of their loops, the autograd and
torch.compile wiring, the config functions, and the checks of q, k, v. Each family's module docstring says only what
is its own and links here.

Masked attention (:mod:`.masked_attention`, ``(B, H, N, D)`` with a keep mask) and varlen attention
(:mod:`.varlen_attention`, packed ``(T, H, D)`` rows with ``cu_seqlens``) are the same FlashAttention-2 scheme: a
forward with an online softmax in the exp2 domain and fp32 state, and a backward made of a ``delta = rowsum(dO * O)``
preprocess and one kernel whose program holds a block of keys, loops over query blocks for its dK/dV, then holds the
query block of the same index and loops over key blocks for its dQ (the second loop takes the transposed tiles, so
one grid serves both). They differ only in which blocks a program visits and how it addresses their rows (live-block
lists vs sequence offsets), so each family keeps its kernels, grids and launchers, and calls the ``@triton.jit``
steps below on tiles it has loaded, with per-token validity masks that say which keys and queries are real (kept, or
inside the sequence).

Two backwards. The default one is atomics-free and bitwise deterministic: per score pair it does 7 GEMMs (dK/dV: the
scores, dV, dP, dK; dQ: the scores, dP, dQ again) and two exponentials, usually in one launch after the preprocess
(two, ``SPLIT_DQ``, where one kernel holding both parts would spill: :func:`bwd_parts`). The atomic-dQ one
(``deterministic=False``, see :mod:`._backend`) is FlashAttention-2's: the dK/dV loop also computes each pair's dQ
term (:func:`attn_bwd_dq_part`) and adds it to an fp32 accumulator with atomics, so 5 GEMMs and one exponential per
pair and no dQ loop; the preprocess zeroes the accumulator and a final torch op scales and casts it. Its dQ bits vary
with the order in which the atomics land; dK, dV and the gate gradient stay deterministic. Dropped or padded tokens
reach its sums as they reach the default one's: not at all (their terms are selected away, never multiplied by
zero).

Fully valid blocks first. Validity costs a select per score only where it is needed. Each loop visits first the
blocks whose tokens are all valid (most of them once the kept tokens are contiguous: compacted images, packed
sequences) with the select compiled out (``MASK_KEYS`` / ``MASK_QUERIES`` False), then the partly valid ones with it.
The side a program owns needs no per-score select at all: row i of the output or of dQ depends on query i alone, row
j of dK/dV on key j alone, so the kernels select zero for invalid rows once, when they store them (or skip storing
them). Invalid (query, key) pairs that a sum crosses get exactly zero weight through ``tl.where``, and the callers
load as zeros the invalid rows that would meet such a weight in a product (values in the forward, every operand in
the backward), so non-finite values there never reach a sum (a zero weight times a NaN would still be NaN); a row
that enters only scores selected away (a key's k in the forward) may be loaded as it is. Valid rows are never masked:
a NaN or Inf in them propagates as in SDPA. The softmax scale is folded into one fma per score after the row max, so
it must be positive.

Shared limits: head dims 16..128, any of them (non-powers of two are padded to the next power of two, ``BLOCK_D``,
with masked loads); fp32 inputs get IEEE-precision dots (:func:`dot_precision`), fp16/bf16 accumulate in fp32; the
Triton interpreter (CPU) has no bf16 dots (:func:`check_interpreter_dtype`).

Autograd and torch.compile: each family has one ``torch.autograd.Function``, the only autograd path; calls that need
no gradient skip it. Its forward and backward call the family's ``faithful_vit::<family>_attention_fwd`` / ``_bwd``
``triton_op``s while torch.compile traces on CUDA (torch >= 2.6), one op per pass without a graph break, and the same
launchers directly otherwise (:func:`uses_registered_ops`): eager calls skip the op's dispatch cost, and Inductor
cannot compile a ``triton_op`` for the CPU. The ops have no autograd formula of their own.

Configs: each family's ``get_fwd_config(seq_len, head_dim, dtype, device)``, ``get_bwd_config(...)`` and
``get_atomic_bwd_config(...)`` return the tiles and launch options (``num_warps``, ``num_stages``) of its kernels: in
the forward ``BLOCK_M`` query rows and ``BLOCK_N`` key rows, in the backward ``BLOCK_N`` rows a program holds and
``BLOCK_M`` rows per loop step; ``seq_len`` is N for masked attention and ``max_seqlen`` for varlen attention, and a
family may ignore an argument. They are plain functions, replaceable by assigning the module's attribute. The CUDA
defaults are chosen for sm_90 code generation, without register spills and with warp-group MMAs for fp16/bf16, which
``scripts/compile_kernels.py --check`` checks (the CPU suite runs it). ``fwd_candidates`` / ``bwd_candidates`` /
``atomic_bwd_candidates``, with the same arguments, list what opt-in autotuning
(:func:`faithful_vit.kernels.set_autotune`) times besides the default on the first call per (length bucket, head dim,
dtype, variant), keeping the fastest.

Constexprs have one name in both families: ``HEAD_DIM`` (D), ``BLOCK_D``, ``BLOCK_M``, ``BLOCK_N``,
``INPUT_PRECISION`` (of the dots), ``MASK_KEYS`` / ``MASK_QUERIES`` (the block is partly valid).

Tile layouts: ``q``, ``do``, ``k``, ``v`` are ``(rows, BLOCK_D)``; ``kt``, ``vt`` are the key-side tiles transposed,
``(BLOCK_D, BLOCK_N)`` (a caller that loaded ``k`` passes ``tl.trans(k)``). Log-sum-exps and scores are in log2 units
(natural-log values times :data:`LOG2E`).

The kernels call these steps by their own names (no ``import ... as``): torch.compile copies a ``triton_op``'s kernel
source together with the ``@triton.jit`` functions and ``tl.constexpr`` globals it names, and looks them up by name.
"""

from __future__ import annotations

import torch

from ._backend import TRITON_AVAILABLE
from ._utils import SUPPORTED_DTYPES, check_head_dim, check_same, check_tensor

if TRITON_AVAILABLE:
    import triton
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction


def check_qkv(q, k, v, *, ndim: int, ndim_doc: str) -> None:
    """q, k, v: tensors of ``ndim`` dims, one supported dtype, one device, one shape, a head dim in 16..128."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, ndim=ndim, dtypes=SUPPORTED_DTYPES, ndim_doc=ndim_doc)
    check_same(("q", "k", "v"), (q, k, v))
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"k, v: expected the shape of q {tuple(q.shape)}, got {tuple(k.shape)} and {tuple(v.shape)}")
    check_head_dim("q", q.shape[-1])


def one_layout(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """q, k, v with one set of strides, which the kernels take once: views of one projection (timm's qkv) and
    same-shape contiguous tensors already share it; any other mix is made contiguous (a copy)."""
    if k.stride() == q.stride() and v.stride() == q.stride():
        return q, k, v
    return q.contiguous(), k.contiguous(), v.contiguous()


def check_interpreter_dtype(q: torch.Tensor) -> None:
    """The Triton interpreter (CPU) has no bf16 dots: refuse bf16 there rather than fail inside a kernel."""
    if q.device.type == "cpu" and q.dtype == torch.bfloat16:
        raise TypeError(
            "q: the Triton interpreter (CPU) cannot run bf16 dots; got torch.bfloat16, use fp16/fp32 or backend='torch'"
        )


def dot_precision(dtype: torch.dtype) -> str:
    """``input_precision`` of the kernels' dots: fp32 inputs get exact fp32 dots (tf32 would lose ~3 digits); the
    setting does not apply to fp16/bf16."""
    return "ieee" if dtype == torch.float32 else "tf32"


# CUDA caps grid axis 0 at 2**31 - 1 programs and axes 1 and 2 at 65535, which B * H alone exceeds for ViT-B at
# batch 5462: every attention kernel therefore runs on a 1-d grid of (tile, group) programs, tiles fastest.
MAX_GRID_X = 2**31 - 1


def flat_grid(tiles: int, groups: int) -> tuple[int]:
    """The 1-d grid of ``tiles`` programs for each of ``groups`` (image x head, or sequence x head) that
    :func:`program_tile` decodes; refuses a grid past CUDA's limit with a clear error."""
    if tiles * groups > MAX_GRID_X:
        raise ValueError(
            f"q: {tiles} tiles x {groups} (image or sequence, head) pairs need {tiles * groups} programs, over "
            f"CUDA's grid limit of {MAX_GRID_X}; split the batch"
        )
    return (tiles * groups,)


def bwd_parts(cfg: dict[str, int], deterministic: bool) -> tuple[tuple[str, int], ...]:
    """The ``PARTS`` constexpr and the pipeline stages of each launch of a family's backward kernel after the
    preprocess: the atomic-dQ backward has no dQ part; the deterministic one runs both parts in one launch, or in two
    where the config sets ``SPLIT_DQ`` (where one kernel holding both parts would spill registers). Every launch takes
    the config's ``num_stages`` but a separate dQ launch, which takes ``DQ_STAGES`` where the config sets it (where
    the two parts spill at different stage counts)."""
    stages = cfg["num_stages"]
    if not deterministic:
        return (("dkdv", stages),)
    if cfg.get("SPLIT_DQ"):
        return (("dkdv", stages), ("dq", cfg.get("DQ_STAGES", stages)))
    return (("dkdv+dq", stages),)


# torch >= 2.6 has triton_op: each family then registers its launchers as ops.
OPS_AVAILABLE = TRITON_AVAILABLE and hasattr(torch.library, "triton_op") and hasattr(torch.library, "wrap_triton")


def uses_registered_ops(q: torch.Tensor) -> bool:
    """Whether the families call the registered ops (compiling on CUDA) or the launchers (see the module
    docstring)."""
    return OPS_AVAILABLE and q.is_cuda and torch.compiler.is_compiling()


def launch_directly(kernel):
    """The default ``launch`` of the launchers: the kernel itself (:func:`launch_in_op` inside a ``triton_op``)."""
    return kernel


def launch_in_op(kernel):
    """The ``launch`` of the launchers inside a ``triton_op``: ``torch.library.wrap_triton``, which lets torch.compile
    trace the launch. A Triton-interpreter kernel (CPU tests) is launched as it is: torch 2.11 refuses to wrap one
    (torch 2.15 passes it through itself)."""
    return kernel if isinstance(kernel, InterpretedFunction) else torch.library.wrap_triton(kernel)


if TRITON_AVAILABLE:
    # Kernels may read only constexpr globals; host code uses ``.value``.
    LOG2E = tl.constexpr(1.4426950408889634)  # log2(e): natural-log units to log2 units

    @triton.jit
    def program_tile(pid, num_tiles):
        """``(tile, group)`` of program ``pid`` (``tl.program_id(0)``) in a grid from :func:`flat_grid` with
        ``num_tiles`` tiles per group: the programs of one group are consecutive, in the order of a
        ``(tiles, groups)`` grid."""
        return pid % num_tiles, pid // num_tiles

    @triton.jit
    def attn_fwd_step(
        q, kt, v, key_valid, m_i, l_i, acc, qk_scale_log2, MASK_KEYS: tl.constexpr, INPUT_PRECISION: tl.constexpr
    ):
        """One key block of the online softmax (exp2 domain, fp32 state).

        Args: q ``(BLOCK_M, BLOCK_D)``, kt ``(BLOCK_D, BLOCK_N)``, v ``(BLOCK_N, BLOCK_D)``, key_valid ``(BLOCK_N,)``
        bool (invalid keys get weight 0; read only when ``MASK_KEYS``: a block whose keys are all valid skips the
        per-score select), running max ``m_i`` and sum ``l_i`` ``(BLOCK_M,)`` (log2 units), ``acc``
        ``(BLOCK_M, BLOCK_D)`` unnormalised output, ``qk_scale_log2`` = softmax scale * log2(e) > 0. The caller makes
        sure the running max is finite after the step (some key valid), or guards rows whose keys are all invalid.

        Returns: the updated ``m_i, l_i, acc``.
        """
        scores = tl.dot(q, kt, input_precision=INPUT_PRECISION)
        if MASK_KEYS:
            scores = tl.where(key_valid[None, :], scores, float("-inf"))
        # The scale is positive, so it is applied to the row max and folded into one fma per score.
        m_new = tl.maximum(m_i, tl.max(scores, 1) * qk_scale_log2)
        p = tl.math.exp2(tl.fma(scores, qk_scale_log2, -m_new[:, None]))
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=INPUT_PRECISION)
        return m_new, l_i, acc

    @triton.jit
    def attn_bwd_dkdv_step(
        k,
        v,
        q,
        do,
        lse_log2,
        delta,
        query_valid,
        dk,
        dv,
        qk_scale_log2,
        MASK_QUERIES: tl.constexpr,
        INPUT_PRECISION: tl.constexpr,
    ):
        """Add one query block's contribution to the dK, dV of a key block (dK still unscaled by the softmax scale).

        Args: k, v ``(BLOCK_N, BLOCK_D)`` (the key block), q, do ``(BLOCK_M, BLOCK_D)`` (the query block and its
        output gradient), ``lse_log2`` ``(BLOCK_M,)`` log-sum-exp in log2 units and ``delta`` ``(BLOCK_M,)``
        ``rowsum(dO * O)`` of those queries, query_valid ``(BLOCK_M,)`` bool (an invalid query contributes exactly
        zero; read only when ``MASK_QUERIES``), dk, dv ``(BLOCK_N, BLOCK_D)`` fp32 accumulators, ``qk_scale_log2`` =
        softmax scale * log2(e).

        Key validity is not applied here: row j of dK/dV depends on key j alone, so the caller selects zero for the
        rows of invalid keys when it stores them, once per key block instead of once per score.

        Returns: the updated ``dk, dv``, and this block's ``ds_t`` ``(BLOCK_N, BLOCK_M)`` fp32 (unscaled): its row
        sums ``sum_i ds_ji`` are the derivative of the loss with respect to a multiplicative gate on key j (masked
        attention's gate gradient), and :func:`attn_bwd_dq_part` turns it into this block's dQ term (atomic dQ).
        Unused, it compiles away.
        """
        # Transposed scores (keys x queries) so that both products below need no further transpose of p or ds.
        scores_t = tl.dot(k, tl.trans(q), input_precision=INPUT_PRECISION)
        p_t = tl.math.exp2(tl.fma(scores_t, qk_scale_log2, -lse_log2[None, :]))
        if MASK_QUERIES:
            p_t = tl.where(query_valid[None, :], p_t, 0.0)
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=INPUT_PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=INPUT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=INPUT_PRECISION)
        return dk, dv, ds_t

    @triton.jit
    def attn_bwd_dq_part(ds_t, key_valid, k_dq, INPUT_PRECISION: tl.constexpr):
        """The dQ term ``ds @ k`` ``(BLOCK_M, BLOCK_D)`` fp32 (unscaled) of one (key block, query block) pair of
        :func:`attn_bwd_dkdv_step`, for the atomic-dQ backward: the fifth GEMM, where the deterministic backward
        recomputes the scores and ``dp`` in its dQ part (three more GEMMs and an exponential per score).

        Args: ``ds_t`` ``(BLOCK_N, BLOCK_M)`` from the step, key_valid ``(BLOCK_N,)`` bool, ``k_dq``
        ``(BLOCK_N, BLOCK_D)`` the key block with invalid rows zero. Invalid keys get exactly zero weight by a select:
        their ``ds`` may be non-finite (the real k/v of a dropped key, or ``exp2(-lse)`` overflowing for a zero key),
        and a zero key times a NaN would still be NaN.
        """
        ds_t = tl.where(key_valid[:, None], ds_t, 0.0)
        return tl.dot(tl.trans(ds_t.to(k_dq.dtype)), k_dq, input_precision=INPUT_PRECISION)

    @triton.jit
    def attn_bwd_dq_step(
        q,
        do,
        kt,
        vt,
        lse_log2,
        delta,
        key_valid,
        dq,
        qk_scale_log2,
        MASK_KEYS: tl.constexpr,
        INPUT_PRECISION: tl.constexpr,
    ):
        """Add one key block's contribution to the dQ of a query block (still unscaled by the softmax scale).

        Args: q, do ``(BLOCK_M, BLOCK_D)`` (the query block and its output gradient), kt, vt ``(BLOCK_D, BLOCK_N)``
        (the key block, transposed), ``lse_log2`` and ``delta`` ``(BLOCK_M,)`` as in :func:`attn_bwd_dkdv_step`,
        key_valid ``(BLOCK_N,)`` bool (read only when ``MASK_KEYS``), dq ``(BLOCK_M, BLOCK_D)`` fp32 accumulator,
        ``qk_scale_log2`` = softmax scale * log2(e).

        Query validity is not applied here: row i of dQ depends on query i alone, so the caller selects zero for the
        rows of invalid queries when it stores them.

        Returns: the updated ``dq``.
        """
        scores = tl.dot(q, kt, input_precision=INPUT_PRECISION)
        p = tl.math.exp2(tl.fma(scores, qk_scale_log2, -lse_log2[:, None]))
        if MASK_KEYS:
            p = tl.where(key_valid[None, :], p, 0.0)
        dp = tl.dot(do, vt, input_precision=INPUT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(kt.dtype), tl.trans(kt), input_precision=INPUT_PRECISION)
        return dq
