"""Verify the kernels on this machine: ``python -m faithful_vit.kernels.check``.

Runs both kernel families (masked attention and varlen attention), forward and backward, against the float64
references of :mod:`faithful_vit.kernels.reference` on this device: the dtypes and head dims it supports, awkward
shapes (empty and one-token sequences, fully dropped images, one kept token, non-contiguous views of a packed qkv
projection), NaN isolation, and ``torch.library.opcheck`` of the registered ops. Prints one line per case and a
summary; exits 0 when every case passes, 1 when one fails, 2 for a usage error. Output buffers are poisoned with NaN
before the kernels run, so an element a kernel forgets to write fails its case.

On a machine without CUDA the kernels run under the Triton interpreter (fp32 only by default, small shapes). Triton
decides between compiling and interpreting when a kernel is defined, i.e. when ``faithful_vit.kernels`` is imported,
and ``python -m`` imports that package before this module runs. So when the interpreter setting does not fit the
device (no ``TRITON_INTERPRET=1`` for the CPU, or ``TRITON_INTERPRET=1`` for a GPU), :func:`main` re-executes the same
command once with the variable set or removed.

Tolerances, relative to the magnitude ``1 + max|reference|`` of each tensor: fp32 within a fixed bound (gradients four
times the forward's); fp16 and bf16 within twice the error of the PyTorch reference run in the same dtype, plus a
floor of ``max(2e-3, eps)``. NaN cases are exact: a NaN in a dropped token leaves every output and gradient of the
kept tokens bitwise unchanged, and a NaN in a kept token gives NaN exactly where the float64 reference does.

Examples::

    python -m faithful_vit.kernels.check                 # the default set: about a minute on a GPU
    python -m faithful_vit.kernels.check --quick         # one head dim per dtype
    python -m faithful_vit.kernels.check --full          # every head dim for every dtype, more shapes
    python -m faithful_vit.kernels.check --list          # the case names
    python -m faithful_vit.kernels.check --filter 'varlen/*' --exclude '*nan*' --seed 7
"""

from __future__ import annotations

import argparse
import fnmatch
import os
import sys
import time
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import _utils, reference
from ._attention_core import OPS_AVAILABLE
from ._backend import TRITON_AVAILABLE, TRITON_INTERPRET
from .masked_attention import masked_attention
from .varlen_attention import varlen_attention

if TRITON_AVAILABLE:
    import triton

__all__ = ["Case", "build_cases", "main", "run_cases", "select", "supported_dtypes"]

MODES = ("quick", "default", "full")
FP32_BOUND = 2e-5
GRAD_FACTOR = 4
HALF_FLOOR = 2e-3
# Set by the re-execution, so that a second mismatch stops with an error instead of re-executing again.
_REEXEC_MARK = "_FAITHFUL_VIT_CHECK_REEXEC"
_DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


class UsageError(Exception):
    """A bad command line: reported as one line, exit status 2."""


@dataclass(frozen=True)
class Case:
    """One check: ``run()`` returns ``(passed, detail)``; an exception it raises is a failure."""

    name: str
    run: Callable[[], tuple[bool, str]]


# ---- Comparison ------------------------------------------------------------------------------------------------


def _magnitude(t: torch.Tensor) -> float:
    return 1.0 + (t.detach().double().abs().max().item() if t.numel() else 0.0)


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.numel() == 0:
        return 0.0
    diff = (a.detach().double() - b.detach().double()).abs()
    return diff.nan_to_num(nan=float("inf")).max().item()


def _tolerance(name: str, dtype: torch.dtype, want: torch.Tensor, same_dtype: torch.Tensor | None) -> float:
    scale = _magnitude(want)
    if dtype == torch.float32:
        return FP32_BOUND * scale * (1 if name == "out" else GRAD_FACTOR)
    floor = max(HALF_FLOOR, torch.finfo(dtype).eps)
    return 2 * _max_err(same_dtype, want) + floor * scale


def _compare(
    got: dict[str, torch.Tensor],
    want: dict[str, torch.Tensor],
    same_dtype: dict[str, torch.Tensor] | None,
    dtype: torch.dtype,
) -> tuple[bool, str]:
    """Every tensor within its tolerance; the detail names the tensor closest to (or furthest past) its bound."""
    worst = None
    for name, ref in want.items():
        out = got[name]
        if out.shape != ref.shape or out.dtype != dtype:
            return False, f"{name}: got {tuple(out.shape)} {out.dtype}, expected {tuple(ref.shape)} {dtype}"
        err = _max_err(out, ref)
        tol = _tolerance(name, dtype, ref, None if same_dtype is None else same_dtype[name])
        if worst is None or err / tol > worst[0]:
            worst = (err / tol, name, err, tol)
    _, name, err, tol = worst
    passed = err <= tol
    return passed, f"max err {err:.2e} ({name}) {'<=' if passed else '>'} tol {tol:.2e}"


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bits as integers: -0.0 differs from 0.0, and a NaN equals the same NaN."""
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _bitwise_at(
    clean: dict[str, torch.Tensor], dirty: dict[str, torch.Tensor], rows: dict[str, torch.Tensor], what: str
) -> tuple[bool, str]:
    """The ``rows`` of every tensor are bit for bit equal in the clean and the dirty run."""
    for name, index in rows.items():
        a, b = (_bits(t[name][index]) for t in (clean, dirty))
        if not torch.equal(a, b):
            return False, f"{name} of {what} changed at {int((a != b).sum())} of {a.numel()} elements"
    return True, f"{', '.join(rows)} of {what} bitwise unchanged"


def _same_nans(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> tuple[bool, str]:
    """Every tensor is NaN exactly where the reference's is."""
    counts = []
    for name, ref in want.items():
        g, w = got[name].isnan(), ref.isnan()
        if not torch.equal(g, w):
            differ = int((g != w).sum())
            return False, f"{name}: NaN at {int(g.sum())} elements, the reference at {int(w.sum())} ({differ} differ)"
        counts.append(f"{name} {int(w.sum())}")
    return True, "NaN where the reference has NaN (" + ", ".join(counts) + ")"


def _grads(out: torch.Tensor, inputs: list[torch.Tensor], grad_out: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad(out, inputs, grad_out, allow_unused=True, materialize_grads=True))


# ---- Masked attention --------------------------------------------------------------------------------------------


def _masked_kernel(q, k, v, keep, gate, skip):
    return masked_attention(q, k, v, keep, gate=gate, skip_dropped_queries=skip, backend="triton")


def _masked_reference(q, k, v, keep, gate, skip, *, upcast=True):
    dtype = torch.float64 if upcast else q.dtype
    if q.shape[2] == 0:  # no token: the reference's row max has nothing to reduce; the answer is empty, as q
        return q.to(dtype) * 0
    q, k, v = (t.to(dtype) for t in (q, k, v))
    gate = None if gate is None else gate.to(dtype)
    return reference.masked_attention_ref(q, k, v, keep, gate=gate, skip_dropped_queries=skip, upcast=upcast)


def _masked_run(fn, q, k, v, keep, gate, grad_out, skip, **kwargs) -> dict[str, torch.Tensor]:
    """Output and gradients of q, k, v (and the gate) for the upstream gradient ``grad_out``, as a dict."""
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]  # detach keeps the strides of a view
    if gate is not None:
        leaves.append(gate.detach().requires_grad_())
    out = fn(*leaves[:3], keep, leaves[3] if gate is not None else None, skip, **kwargs)
    grads = _grads(out, leaves, grad_out.to(out.dtype))
    return dict(zip(["out", "dq", "dk", "dv", "dgate"], [out.detach(), *grads]))


def _masked_qkv(batch, heads, seq_len, head_dim, dtype, device, layout):
    """q, k, v ``(B, H, N, D)``: separate contiguous tensors, or timm's view of one packed qkv projection."""
    if layout == "timm":  # qkv(x).reshape(B, N, 3, H, D).permute(2, 0, 3, 1, 4), as timm's Attention does
        qkv = torch.randn(batch, seq_len, 3 * heads * head_dim, dtype=dtype, device=device)
        return qkv.reshape(batch, seq_len, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    return tuple(torch.randn(batch, heads, seq_len, head_dim, dtype=dtype, device=device) for _ in range(3))


def _keep(pattern: str, seq_len: int, device) -> torch.Tensor:
    """Three images. ``mixed``: random with the first token kept, fully dropped, one kept token. ``compact``: kept
    tokens first (as after ``compaction_order``), every token kept, one kept token. ``random``: half kept."""
    keep = torch.zeros(3, seq_len, dtype=torch.bool, device=device)
    if seq_len == 0:
        return keep
    if pattern == "random":
        return torch.rand(3, seq_len, device=device) < 0.5
    one = int(torch.randint(seq_len, ()).item())
    if pattern == "mixed":
        keep[0] = torch.rand(seq_len, device=device) < 0.5
        keep[0, 0] = True
        keep[2, one] = True
    else:  # compact
        keep[0, : max(1, seq_len // 3)] = True
        keep[1] = True
        keep[2, 0] = True
    return keep


def _masked_case(dtype, head_dim, seq_len, pattern, layout, skip, device) -> Case:
    heads = 3 if device.type == "cuda" else 2
    name = f"masked/{_DTYPE_NAMES[dtype]}/d{head_dim}/n{seq_len}/{pattern}/{layout}/{'skip' if skip else 'computed'}"

    def run():
        q, k, v = _masked_qkv(3, heads, seq_len, head_dim, dtype, device, layout)
        keep = _keep(pattern, seq_len, device)
        gate = keep.to(dtype)
        grad_out = torch.randn(q.shape, dtype=dtype, device=device)
        got = _masked_run(_masked_kernel, q, k, v, keep, gate, grad_out, skip)
        want = _masked_run(_masked_reference, q, k, v, keep, gate, grad_out.double(), skip)
        same = None
        if dtype != torch.float32:
            same = _masked_run(_masked_reference, q, k, v, keep, gate, grad_out, skip, upcast=False)
        return _compare(got, want, same, dtype)

    return Case(name, run)


def _nan_keep(seq_len, device) -> torch.Tensor:
    """Two images, half kept, with token 0 kept and token 1 dropped in image 0: the same (live) block holds both."""
    keep = torch.rand(2, seq_len, device=device) < 0.5
    keep[:, 0], keep[0, 1] = True, False
    return keep


def _masked_nan_dropped_case(dtype, head_dim, seq_len, where, skip, device) -> Case:
    """NaN in every dropped key (k and v) or every dropped query: the kept tokens' outputs and gradients, and the gate
    gradient of kept keys, stay bitwise the same as without it."""
    name = f"masked/{_DTYPE_NAMES[dtype]}/d{head_dim}/n{seq_len}/nan-dropped-{where}/{'skip' if skip else 'computed'}"

    def run():
        q, k, v = _masked_qkv(2, 2, seq_len, head_dim, dtype, device, "contiguous")
        keep = _nan_keep(seq_len, device)
        gate = keep.to(dtype)
        grad_out = torch.randn(q.shape, dtype=dtype, device=device)
        clean = _masked_run(_masked_kernel, q, k, v, keep, gate, grad_out, skip)
        dropped = ~keep[:, None, :, None]
        if where == "key":
            k, v = (t.masked_fill(dropped, float("nan")) for t in (k, v))
        else:
            q = q.masked_fill(dropped, float("nan"))
        dirty = _masked_run(_masked_kernel, q, k, v, keep, gate, grad_out, skip)
        rows = {name: _kept_rows(keep) for name in ("out", "dq", "dk", "dv")}
        rows["dgate"] = keep
        return _bitwise_at(clean, dirty, rows, "kept tokens")

    return Case(name, run)


def _kept_rows(keep: torch.Tensor):
    """Index of the kept tokens' rows, every head, in a ``(B, H, N, D)`` tensor."""
    batch, token = keep.nonzero(as_tuple=True)
    return (batch, slice(None), token)


def _masked_nan_kept_case(dtype, head_dim, seq_len, tensor, device) -> Case:
    """One NaN in the q, k or v of a kept token: the output and every gradient (the gate's too) are NaN exactly where
    the float64 reference's are."""
    name = f"masked/{_DTYPE_NAMES[dtype]}/d{head_dim}/n{seq_len}/nan-kept-{tensor}/skip"

    def run():
        qkv = dict(zip("qkv", _masked_qkv(2, 2, seq_len, head_dim, dtype, device, "contiguous")))
        keep = _nan_keep(seq_len, device)
        qkv[tensor] = qkv[tensor].clone()
        qkv[tensor][0, 0, 0, 0] = float("nan")  # token 0 of image 0 is kept
        grad_out = torch.randn(qkv["q"].shape, dtype=dtype, device=device)
        gate = keep.to(dtype)
        got = _masked_run(_masked_kernel, *qkv.values(), keep, gate, grad_out, True)
        want = _masked_run(_masked_reference, *qkv.values(), keep, gate, grad_out.double(), True)
        return _same_nans(got, want)

    return Case(name, run)


# ---- Varlen attention --------------------------------------------------------------------------------------------


def _cu_seqlens(lengths, device) -> torch.Tensor:
    offsets = [0]
    for length in lengths:
        offsets.append(offsets[-1] + length)
    return torch.tensor(offsets, dtype=torch.int32, device=device)


def _varlen_kernel(q, k, v, cu_seqlens, max_seqlen):
    return varlen_attention(q, k, v, cu_seqlens, max_seqlen, backend="triton")


def _varlen_reference(q, k, v, cu_seqlens, max_seqlen, *, upcast=True):
    dtype = torch.float64 if upcast else q.dtype
    if q.shape[0] == 0:  # no row: the reference builds its empty output from nothing, outside the graph
        return q.to(dtype) * 0
    q, k, v = (t.to(dtype) for t in (q, k, v))
    return reference.varlen_attention_ref(q, k, v, cu_seqlens, upcast=upcast)


def _varlen_run(fn, q, k, v, cu_seqlens, max_seqlen, grad_out, **kwargs) -> dict[str, torch.Tensor]:
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves, cu_seqlens, max_seqlen, **kwargs)
    grads = _grads(out, leaves, grad_out.to(out.dtype))
    return dict(zip(["out", "dq", "dk", "dv"], [out.detach(), *grads]))


def _varlen_qkv(total, heads, head_dim, dtype, device, layout):
    """q, k, v ``(T, H, D)``: views of one packed ``(T, 3 * H * D)`` projection, or separate contiguous tensors."""
    if layout == "packed":
        qkv = torch.randn(total, 3 * heads * head_dim, dtype=dtype, device=device)
        return qkv.view(total, 3, heads, head_dim).unbind(1)
    return tuple(torch.randn(total, heads, head_dim, dtype=dtype, device=device) for _ in range(3))


def _varlen_case(dtype, head_dim, label, lengths, max_seqlen, layout, device) -> Case:
    heads = 3 if device.type == "cuda" else 2
    name = f"varlen/{_DTYPE_NAMES[dtype]}/d{head_dim}/{label}/{layout}"

    def run():
        q, k, v = _varlen_qkv(sum(lengths), heads, head_dim, dtype, device, layout)
        cu = _cu_seqlens(lengths, device)
        grad_out = torch.randn(q.shape, dtype=dtype, device=device)
        got = _varlen_run(_varlen_kernel, q, k, v, cu, max_seqlen, grad_out)
        want = _varlen_run(_varlen_reference, q, k, v, cu, max_seqlen, grad_out.double())
        same = None
        if dtype != torch.float32:
            same = _varlen_run(_varlen_reference, q, k, v, cu, max_seqlen, grad_out, upcast=False)
        return _compare(got, want, same, dtype)

    return Case(name, run)


def _varlen_nan_case(dtype, head_dim, lengths, max_seqlen, tensor, device) -> Case:
    """``tensor`` "sequence": NaN in q, k and v of every row of one sequence leaves the other sequences' outputs and
    gradients bitwise unchanged. "q", "k" or "v": one NaN in one row gives NaN exactly where the reference has it."""
    what = "nan-sequence" if tensor == "sequence" else f"nan-kept-{tensor}"
    name = f"varlen/{_DTYPE_NAMES[dtype]}/d{head_dim}/{what}/packed"
    target = max(range(len(lengths)), key=lambda b: lengths[b])  # the longest sequence
    start, end = sum(lengths[:target]), sum(lengths[: target + 1])

    def run():
        qkv = dict(zip("qkv", (t.clone() for t in _varlen_qkv(sum(lengths), 2, head_dim, dtype, device, "packed"))))
        cu = _cu_seqlens(lengths, device)
        grad_out = torch.randn(qkv["q"].shape, dtype=dtype, device=device)
        if tensor == "sequence":
            clean = _varlen_run(_varlen_kernel, *qkv.values(), cu, max_seqlen, grad_out)
            for t in qkv.values():
                t[start:end] = float("nan")
            dirty = _varlen_run(_varlen_kernel, *qkv.values(), cu, max_seqlen, grad_out)
            others = torch.ones(sum(lengths), dtype=torch.bool, device=device)
            others[start:end] = False
            return _bitwise_at(clean, dirty, dict.fromkeys(("out", "dq", "dk", "dv"), others), "other sequences")
        qkv[tensor][start + (end - start) // 2, 0, 0] = float("nan")
        got = _varlen_run(_varlen_kernel, *qkv.values(), cu, max_seqlen, grad_out)
        want = _varlen_run(_varlen_reference, *qkv.values(), cu, max_seqlen, grad_out.double())
        return _same_nans(got, want)

    return Case(name, run)


# ---- torch.library.opcheck ---------------------------------------------------------------------------------------


def _opcheck_inputs(family: str, device, dtype) -> tuple:
    """The forward op's inputs of ``family`` (``"masked"`` or ``"varlen"``): small, awkward, without gradients (the
    ops are differentiated through the families' autograd Functions, not by autograd registrations of their own)."""
    if family == "masked":
        q, k, v = (torch.randn(2, 2, 40, 16, dtype=dtype, device=device) for _ in range(3))
        return q, k, v, _keep("mixed", 40, device)[:2], 0.25, True
    q, k, v = (torch.randn(32, 2, 16, dtype=dtype, device=device) for _ in range(3))
    return q, k, v, _cu_seqlens([11, 0, 1, 20], device), 20, 0.25


def _opcheck_case(family: str, device, dtype) -> Case:
    """``torch.library.opcheck`` of the forward and backward ops of ``family``, the backward on the forward's outputs
    (with a gate gradient for masked attention)."""
    # FakeTensor tracing of a triton_op needs compiled Triton: on the CPU only the schemas.
    utils = ("test_schema",)
    if device.type == "cuda":
        utils += ("test_faketensor", "test_aot_dispatch_dynamic")
    name = f"opcheck/{family}_attention"

    def run():
        fwd = getattr(torch.ops.faithful_vit, f"{family}_attention_fwd").default
        bwd = getattr(torch.ops.faithful_vit, f"{family}_attention_bwd").default
        fwd_args = _opcheck_inputs(family, device, dtype)
        out, lse = fwd(*fwd_args)
        grad_out = torch.randn_like(out)
        if family == "masked":
            q, k, v, keep, scale, skip = fwd_args
            bwd_args = (grad_out, q, k, v, keep, out, lse, scale, skip, True, True)
        else:
            q, k, v, cu_seqlens, max_seqlen, scale = fwd_args
            bwd_args = (q, k, v, cu_seqlens, out, lse, grad_out, max_seqlen, scale, True)
        torch.library.opcheck(fwd, fwd_args, test_utils=utils)
        torch.library.opcheck(bwd, bwd_args, test_utils=utils)
        return True, "fwd, bwd: " + ", ".join(u.removeprefix("test_") for u in utils)

    return Case(name, run)


# ---- The case list -----------------------------------------------------------------------------------------------


def supported_dtypes(device: torch.device, mode: str) -> tuple[torch.dtype, ...]:
    """fp32 always; on CUDA fp16, and bf16 where the GPU has it; under the interpreter fp16 only with --full (it is
    slow there) and never bf16 (the interpreter has no bf16 dots)."""
    if device.type == "cuda":
        with torch.cuda.device(device):
            bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
        return (torch.float32, torch.float16) + ((torch.bfloat16,) if bf16 else ())
    return (torch.float32, torch.float16) if mode == "full" else (torch.float32,)


def build_cases(device: torch.device, mode: str = "default") -> list[Case]:
    """Every case for ``device`` in ``mode`` (``"quick"``, ``"default"`` or ``"full"``), in running order."""
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    gpu = device.type == "cuda"
    dtypes = supported_dtypes(device, mode)
    # The dtype a ViT trains in gets the head-dim sweep and the awkward shapes; the others one head dim each.
    train_dtype = dtypes[-1] if gpu else torch.float32
    base_dim = 64 if gpu else 16
    if gpu:
        dims = {"quick": (64,), "default": (16, 64, 80, 128), "full": (16, 24, 32, 48, 64, 80, 96, 128)}[mode]
        n_mid, n_long, n_nan = 197, 261, 197
        vit = ("vit8", [197, 0, 1, 120, 57, 197, 3, 88], 197)
        long = ("long5", [261, 5, 0, 261, 130], 300)
    else:
        dims = {"quick": (16,), "default": (16, 24), "full": (16, 24, 32, 80)}[mode]
        n_mid, n_long, n_nan = 37, 50, 21
        vit = ("mixed5", [7, 0, 1, 33, 18], 40)
        long = ("long4", [50, 1, 0, 21], 50)

    cases = []
    for dtype in dtypes:
        for d in dims if dtype == train_dtype or mode == "full" else (base_dim,):
            cases.append(_masked_case(dtype, d, n_mid, "mixed", "contiguous", True, device))
            cases.append(_varlen_case(dtype, d, *vit, "packed", device))

    awkward_masked = [(0, "mixed", "contiguous", True), (1, "mixed", "contiguous", True)]
    awkward_varlen = [("empty3", [0, 0, 0], 0, "packed"), ("single2", [1, 1], 1, "packed")]
    if mode != "quick":
        awkward_masked += [
            (1, "mixed", "contiguous", False),
            (n_long, "mixed", "timm", False),
            (n_long, "compact", "timm", True),
        ]
        awkward_varlen += [(*long, "contiguous")]
    if mode == "full":
        awkward_masked += [(n_mid, "random", "timm", True), (n_long, "compact", "contiguous", False)]
        awkward_varlen += [(*long, "packed")]
    for seq_len, pattern, layout, skip in awkward_masked:
        cases.append(_masked_case(train_dtype, base_dim, seq_len, pattern, layout, skip, device))
    for label, lengths, max_seqlen, layout in awkward_varlen:
        cases.append(_varlen_case(train_dtype, base_dim, label, lengths, max_seqlen, layout, device))

    cases.append(_masked_nan_dropped_case(train_dtype, base_dim, n_nan, "key", True, device))
    cases.append(_masked_nan_dropped_case(train_dtype, base_dim, n_nan, "key", False, device))
    cases.append(_masked_nan_dropped_case(train_dtype, base_dim, n_nan, "query", True, device))
    for tensor in "qkv":
        cases.append(_masked_nan_kept_case(train_dtype, base_dim, n_nan, tensor, device))
    for tensor in ("sequence", "q", "k", "v"):
        cases.append(_varlen_nan_case(train_dtype, base_dim, *vit[1:], tensor, device))

    # Registered with torch >= 2.6 (torch.library.triton_op). Masked in fp32, varlen in train_dtype, as the tests do.
    if OPS_AVAILABLE:
        cases.append(_opcheck_case("masked", device, torch.float32))
        cases.append(_opcheck_case("varlen", device, train_dtype))
    return cases


def select(cases: list[Case], include: list[str], exclude: list[str]) -> list[Case]:
    """Cases whose name matches one ``include`` pattern (all when none) and no ``exclude`` pattern.

    Patterns are ``fnmatch`` patterns; one without a wildcard matches as a substring."""

    def matches(name: str, pattern: str) -> bool:
        return fnmatch.fnmatchcase(name, pattern if any(c in pattern for c in "*?[") else f"*{pattern}*")

    return [
        c
        for c in cases
        if (not include or any(matches(c.name, p) for p in include)) and not any(matches(c.name, p) for p in exclude)
    ]


def run_cases(cases: list[Case], seed: int, out=None) -> list[str]:
    """Run ``cases`` with poisoned outputs, one seed per case (from ``seed`` and its name), print one line each;
    return the names of the failed ones."""
    out = sys.stdout if out is None else out
    width = max((len(c.name) for c in cases), default=0)
    failed = []
    poison_before = _utils._poison
    _utils.set_poison(True)
    try:
        for case in cases:
            torch.manual_seed((seed * 1_000_003 + zlib.crc32(case.name.encode())) % 2**31)
            start = time.perf_counter()
            try:
                with warnings.catch_warnings():
                    # NumPy (the interpreter) warns about the NaN cases' invalid values; the verdict is the check's.
                    warnings.simplefilter("ignore", RuntimeWarning)
                    passed, detail = case.run()
            except Exception as error:  # a kernel that raises fails its case; the next cases still run
                message = str(error).strip().splitlines()
                passed, detail = False, f"{type(error).__name__}: {message[0] if message else ''}"
            if not passed:
                failed.append(case.name)
            seconds = time.perf_counter() - start
            print(
                f"{'PASS' if passed else 'FAIL'}  {case.name:<{width}}  {detail}  [{seconds:.1f}s]",
                file=out,
                flush=True,
            )
    finally:
        _utils.set_poison(poison_before)
    return failed


# ---- Command line ------------------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit status 2 (argparse prints the whole usage)
        raise UsageError(message)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m faithful_vit.kernels.check",
        description="Check the Triton kernels against their float64 references on this machine.",
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="one head dim per dtype, fewer shapes")
    size.add_argument("--full", action="store_true", help="every head dim for every dtype, more shapes")
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda or cuda:N")
    parser.add_argument("--seed", type=int, default=None, help="seed of the random inputs (default: a fresh one)")
    parser.add_argument(
        "--filter", action="append", default=[], metavar="PATTERN", help="run only matching cases (repeatable)"
    )
    parser.add_argument(
        "--exclude", action="append", default=[], metavar="PATTERN", help="skip matching cases (repeatable)"
    )
    parser.add_argument("--list", action="store_true", help="print the case names and exit")
    return parser


def _device(text: str) -> torch.device:
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device: expected auto, cpu, cuda or cuda:N, got {text!r}")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            raise UsageError(f"--device: {text} is not available (this machine has {count} CUDA devices)")
    return device


def _reexec_for(device: torch.device, argv: list[str]) -> None:
    """Re-execute this command with ``TRITON_INTERPRET`` set for the CPU, or removed for a GPU."""
    interpret = device.type == "cpu"
    if os.environ.get(_REEXEC_MARK):
        raise UsageError(f"the Triton interpreter is still {'off' if interpret else 'on'} after re-executing")
    env = dict(os.environ, **{_REEXEC_MARK: "1"})
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    else:
        env.pop("TRITON_INTERPRET", None)
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, "-m", __spec__.name, *argv], env)


def main(argv: list[str] | None = None, *, reexec: bool = False) -> int:
    """The command line; returns the exit status. ``reexec``: re-execute the process when the interpreter setting
    does not fit the device (``python -m`` does); otherwise such a mismatch is a usage error."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = _parser().parse_args(argv)
        device = _device(args.device)
        mode = "quick" if args.quick else "full" if args.full else "default"
        cases = select(build_cases(device, mode), args.filter, args.exclude)
        if not cases:
            raise UsageError(f"--filter/--exclude: no case matches (see --list); got {args.filter} / {args.exclude}")
        if args.list:
            print("\n".join(c.name for c in cases))
            return 0
        if not TRITON_AVAILABLE:
            print("FAIL  Triton is not installed: the kernels cannot run here", flush=True)
            return 1
        if (device.type == "cpu") != TRITON_INTERPRET:
            if reexec:
                _reexec_for(device, argv)
            want = "set TRITON_INTERPRET=1" if device.type == "cpu" else "unset TRITON_INTERPRET"
            raise UsageError(f"--device {device}: {want} before faithful_vit is imported")
    except UsageError as error:
        print(f"{_parser().prog}: error: {error}", file=sys.stderr)
        return 2

    if device.type == "cuda":
        torch.cuda.set_device(device)
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little") % 10**6
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (Triton interpreter)"
    print(
        f"faithful_vit.kernels.check: {len(cases)} cases, mode {mode}, seed {seed}, on {where}; "
        f"torch {torch.__version__}, triton {triton.__version__}",
        flush=True,
    )
    start = time.perf_counter()
    failed = run_cases(cases, seed)
    summary = f"{len(cases) - len(failed)} of {len(cases)} passed in {time.perf_counter() - start:.1f}s"
    if failed:
        print(f"FAIL  {summary}; failed: {', '.join(failed)} (rerun with --seed {seed})", flush=True)
        return 1
    print(f"PASS  {summary}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(reexec=True))
