"""varlen_attention: the Triton kernels against the float64 per-sequence reference, forward and gradients.

Half precision uses the 2x rule: the kernel's error against float64 may be at most twice that of the PyTorch
reference computed in the same dtype, plus a floor of one ulp of the largest reference value.
"""

import importlib
import math

import pytest
import torch
from _kernel_helpers import (
    DEVICE,
    assert_grid_within_cuda_limits,
    cu_seqlens,
    forward_backward,
    zero_stride_empty,
)

from faithful_vit.kernels import pack_tokens, reference, varlen_attention
from faithful_vit.kernels._attention_core import OPS_AVAILABLE
from faithful_vit.kernels._launch_record import LaunchRecorder

varlen_module = importlib.import_module("faithful_vit.kernels.varlen_attention")


def _qkv(total, heads, head_dim, dtype, layout="packed", device=DEVICE):
    """A leaf and q, k, v views of it: packed ``(T, 3HD)``, head-major ``(3, H, T, D)`` or ``(3, T, H, D)``."""
    if layout == "packed":
        leaf = torch.randn(total, 3 * heads * head_dim, dtype=dtype, device=device, requires_grad=True)
        views = leaf.view(total, 3, heads, head_dim).unbind(1)
    elif layout == "head_major":
        leaf = torch.randn(3, heads, total, head_dim, dtype=dtype, device=device, requires_grad=True)
        views = leaf.transpose(1, 2).unbind(0)
    else:
        leaf = torch.randn(3, total, heads, head_dim, dtype=dtype, device=device, requires_grad=True)
        views = leaf.unbind(0)
    return leaf, views


def _assert_matches_reference(q, k, v, cu_seqlens, max_seqlen, check_cu_seqlens=True, deterministic=True, **kwargs):
    """Kernel forward and dq/dk/dv (``deterministic``: which backward) against float64 (and, for half precision, the
    same-dtype reference)."""
    dtype = q.dtype
    grad_out = torch.randn_like(q)
    kernel = forward_backward(
        lambda *t: varlen_attention(
            *t,
            cu_seqlens,
            max_seqlen,
            check_cu_seqlens=check_cu_seqlens,
            deterministic=deterministic,
            backend="triton",
            **kwargs,
        ),
        (q, k, v),
        grad_out,
    )
    detached = [t.detach().double().requires_grad_() for t in (q, k, v)]
    exact = forward_backward(
        lambda *t: reference.varlen_attention_ref(*t, cu_seqlens, upcast=True, **kwargs), detached, grad_out.double()
    )
    if dtype != torch.float32:
        same = [t.detach().requires_grad_() for t in (q, k, v)]
        rounded = forward_backward(
            lambda *t: reference.varlen_attention_ref(*t, cu_seqlens, upcast=False, **kwargs), same, grad_out
        )
    for i, name in enumerate(("out", "dq", "dk", "dv")):
        got, want = kernel[i], exact[i]
        assert got.dtype == dtype and got.shape == want.shape, name
        assert torch.isfinite(got).all(), f"{name}: non-finite values (an unwritten row?)"
        err = (got.double() - want).abs().max().item() if got.numel() else 0.0
        scale = max(1.0, want.abs().max().item()) if got.numel() else 1.0
        if dtype == torch.float32:
            assert err <= 2e-5 * scale, f"{name}: max error {err:.3g} vs float64"
        else:
            ref_err = (rounded[i].double() - want).abs().max().item() if got.numel() else 0.0
            floor = torch.finfo(dtype).eps * scale
            assert err <= 2 * ref_err + floor, f"{name}: max error {err:.3g}, same-dtype reference {ref_err:.3g}"


@pytest.fixture(params=["default_tiles", "16x16_tiles"])
def tiles(request, monkeypatch):
    """The default tiles, and 16x16 tiles that force several query and key blocks per sequence."""
    if request.param == "16x16_tiles":
        fwd = varlen_module.get_fwd_config
        monkeypatch.setattr(varlen_module, "get_fwd_config", lambda *a: {**fwd(*a), "BLOCK_M": 16, "BLOCK_N": 16})
        for name in ("get_bwd_config", "get_atomic_bwd_config"):
            bwd = getattr(varlen_module, name)
            monkeypatch.setattr(
                varlen_module, name, lambda *a, bwd=bwd: {**bwd(*a), "BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_PRE": 16}
            )
    return request.param


# ---- Interpreter-sized (also run on GPU) ----


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("head_dim", [16, 32, 24])
def test_matches_reference(tiles, dtype, head_dim):
    lengths = [7, 0, 1, 33, 18]
    _, (q, k, v) = _qkv(sum(lengths), 2, head_dim, dtype)
    _assert_matches_reference(q, k, v, cu_seqlens(lengths), max_seqlen=40)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_random_lengths(dtype):
    """Fresh lengths on every run (the session seed reproduces them): 1-4 sequences of 0-40 tokens."""
    lengths = torch.randint(0, 41, (int(torch.randint(1, 5, ())),)).tolist()
    heads, head_dim = int(torch.randint(1, 3, ())), [16, 32][int(torch.randint(0, 2, ()))]
    _, (q, k, v) = _qkv(sum(lengths), heads, head_dim, dtype)
    _assert_matches_reference(q, k, v, cu_seqlens(lengths), max_seqlen=max(lengths) + int(torch.randint(0, 20, ())))


# The atomic-dQ backward (deterministic=False): the same bounds on the same awkward lengths.


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("head_dim", [16, 24])
def test_atomic_dq_matches_reference(tiles, dtype, head_dim):
    lengths = [7, 0, 1, 33, 18]
    _, (q, k, v) = _qkv(sum(lengths), 2, head_dim, dtype)
    _assert_matches_reference(q, k, v, cu_seqlens(lengths), max_seqlen=40, deterministic=False)


def test_atomic_dq_random_lengths_and_head_dim_80():
    lengths = torch.randint(0, 41, (int(torch.randint(1, 5, ())),)).tolist()
    _, (q, k, v) = _qkv(sum(lengths), 2, 16, torch.float32)
    _assert_matches_reference(q, k, v, cu_seqlens(lengths), max_seqlen=max(lengths) + 3, deterministic=False)
    lengths = [9, 1, 14]
    _, (q, k, v) = _qkv(sum(lengths), 1, 80, torch.float32)
    _assert_matches_reference(q, k, v, cu_seqlens(lengths), max_seqlen=14, scale=0.3, deterministic=False)


def test_backward_in_two_launches_equals_the_one_launch(monkeypatch):
    """``SPLIT_DQ`` (the configs above head dim 64) runs the dK/dV and dQ parts of the backward kernel in two
    launches: the gradients are the same, bit for bit."""
    lengths = [7, 0, 1, 33, 18]
    _, (q, k, v) = _qkv(sum(lengths), 2, 16, torch.float32)
    cu = cu_seqlens(lengths)
    grad_out = torch.randn_like(q)

    def run():
        return forward_backward(lambda *t: varlen_attention(*t, cu, 40, backend="triton"), (q, k, v), grad_out)

    one = run()
    bwd = varlen_module.get_bwd_config
    for split in (0, 1):
        monkeypatch.setattr(varlen_module, "get_bwd_config", lambda *a, split=split: {**bwd(*a), "SPLIT_DQ": split})
        with LaunchRecorder() as record:
            run()
        launches = [
            kw["PARTS"] for kernel, _, _, kw in record.launches if kernel is varlen_module._varlen_attn_bwd_kernel
        ]
        assert launches == (["dkdv", "dq"] if split else ["dkdv+dq"])
        for a, b in zip(one, run()):
            assert torch.equal(a, b)


@pytest.mark.parametrize("layout", ["packed", "head_major", "separate"])
def test_strided_views_and_gradient_of_the_projection(layout):
    lengths = [12, 5, 20]
    total = sum(lengths)
    leaf, (q, k, v) = _qkv(total, 2, 16, torch.float32, layout)
    cu = cu_seqlens(lengths)
    _assert_matches_reference(q, k, v, cu, max_seqlen=20)
    # The gradient reaches the packed projection through the views.
    out = varlen_attention(q, k, v, cu, 20, backend="triton")
    grad = torch.autograd.grad(out.sum(), leaf)[0]
    leaf64 = leaf.detach().double().requires_grad_()
    if layout == "packed":
        views = leaf64.view(total, 3, 2, 16).unbind(1)
    elif layout == "head_major":
        views = leaf64.transpose(1, 2).unbind(0)
    else:
        views = leaf64.unbind(0)
    want = torch.autograd.grad(reference.varlen_attention_ref(*views, cu).sum(), leaf64)[0]
    torch.testing.assert_close(grad.double(), want, atol=2e-5, rtol=2e-5)


def test_non_power_of_two_head_dim_80_and_custom_scale():
    lengths = [9, 1, 14]
    _, (q, k, v) = _qkv(sum(lengths), 1, 80, torch.float32)
    _assert_matches_reference(q, k, v, cu_seqlens(lengths), max_seqlen=14, scale=0.3)


def test_non_unit_last_stride_is_accepted():
    lengths = [6, 10]
    q, v = (torch.randn(16, 2, 16, device=DEVICE) for _ in range(2))
    k = torch.randn(16, 2, 16, 2, device=DEVICE)[..., 1]  # last stride 2
    assert k.stride(-1) != 1
    cu = cu_seqlens(lengths)
    out = varlen_attention(q, k, v, cu, 10, backend="triton")
    torch.testing.assert_close(out, reference.varlen_attention_ref(q, k, v, cu), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize(
    "lengths",
    [[0, 0, 0], [1], [0, 1, 0, 1], [], [3, 0]],
    ids=["all_empty", "single_token", "empty_and_single", "no_sequences", "trailing_empty"],
)
def test_empty_and_single_token_sequences(lengths):
    total = sum(lengths)
    _, (q, k, v) = _qkv(total, 2, 16, torch.float32)
    cu = cu_seqlens(lengths)
    _assert_matches_reference(q, k, v, cu, max_seqlen=max(lengths, default=0) + 2)
    if total:  # a one-token sequence attends only to itself: its output is its own value row
        out = varlen_attention(q, k, v, cu, 5, backend="triton")
        starts = [s for s, n in zip(cu.tolist(), lengths) if n == 1]
        torch.testing.assert_close(out[starts], v[starts])


def test_max_seqlen_above_the_longest_changes_nothing():
    lengths = [4, 17, 9]
    _, (q, k, v) = _qkv(sum(lengths), 2, 16, torch.float32)
    cu = cu_seqlens(lengths)
    tight = varlen_attention(q, k, v, cu, 17, backend="triton")
    loose = varlen_attention(q, k, v, cu, 100, backend="triton")
    unchecked = varlen_attention(q, k, v, cu, 100, backend="triton", check_cu_seqlens=False)
    assert torch.equal(tight, loose) and torch.equal(tight, unchecked)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the NaN sequences' own programs
@pytest.mark.parametrize("tile", [16, 64])
def test_sequences_are_independent(monkeypatch, tile):
    # NaN in the neighbouring sequences must not reach this one, forward or backward: the kernels may only load rows
    # of their own sequence (a load that is masked only afterwards would turn 0 * NaN into NaN).
    for name in ("get_fwd_config", "get_bwd_config"):
        config = getattr(varlen_module, name)
        monkeypatch.setattr(
            varlen_module, name, lambda *a, config=config: {**config(*a), "BLOCK_M": tile, "BLOCK_N": tile}
        )
    lengths = [10, 13, 6]
    q, k, v = (torch.randn(29, 1, 16, device=DEVICE) for _ in range(3))
    for t in (q, k, v):
        t[:10] = float("nan")
        t[23:] = float("nan")
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    cu = cu_seqlens(lengths)
    out = varlen_attention(q, k, v, cu, 13, backend="triton")
    grad_out = torch.randn_like(out)
    grad_out[:10] = float("nan")
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    middle = slice(10, 23)
    q2, k2, v2 = (t[middle].detach().double().requires_grad_() for t in (q, k, v))
    want = reference.varlen_attention_ref(q2, k2, v2, cu_seqlens([13]))
    want_grads = torch.autograd.grad(want, (q2, k2, v2), grad_out[middle].double())
    for got, expected in zip((out, *grads), (want, *want_grads)):
        torch.testing.assert_close(got[middle].double(), expected, atol=2e-5, rtol=2e-5)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:All-NaN slice encountered:RuntimeWarning")
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("poisoned", ["q", "k", "v"])
def test_non_finite_values_propagate_as_in_the_reference(poisoned, value):
    """NaN/Inf in a row reaches exactly the outputs and gradients it reaches in the float64 reference: within its
    sequence and head (one in a full block, one in a ragged last block), never the others."""
    lengths = [20, 9, 11]
    q, k, v = (torch.randn(sum(lengths), 2, 16, device=DEVICE) for _ in range(3))
    tensors = {"q": q, "k": k, "v": v}
    tensors[poisoned][3, 0, 5] = value  # sequence 0, full first block of 16
    tensors[poisoned][25, 0, 2] = value  # sequence 1, its ragged block
    cu = cu_seqlens(lengths)
    grad_out = torch.randn_like(q, dtype=torch.float64)
    with_grad = [t.clone().requires_grad_() for t in (q, k, v)]
    got = forward_backward(lambda *t: varlen_attention(*t, cu, 20, backend="triton"), with_grad, grad_out.float())
    exact = [t.double().requires_grad_() for t in (q, k, v)]
    want = forward_backward(lambda *t: reference.varlen_attention_ref(*t, cu), exact, grad_out)
    for name, a, r in zip(("out", "dq", "dk", "dv"), got, want):
        a, r = a.double(), r.detach()
        finite = torch.isfinite(r)
        assert torch.equal(torch.isfinite(a), finite), f"{name}: non-finite at other positions than the reference"
        torch.testing.assert_close(a[finite], r[finite], atol=1e-4, rtol=1e-4)
    assert not torch.isfinite(want[0][:29, 0]).all(), "the poison must reach the reference output"
    for t in got:
        assert torch.isfinite(t[29:]).all() and torch.isfinite(t[:, 1]).all()


GUARD_ROWS = 64  # rows of sentinel before and after every tensor of the offsets test


def _guarded(shape, fill, dtype=torch.float32):
    """A ``shape`` view into a buffer with ``GUARD_ROWS`` rows of ``fill`` before and after it (on the first dim)."""
    buffer = torch.full((shape[0] + 2 * GUARD_ROWS, *shape[1:]), fill, dtype=dtype, device=DEVICE)
    return buffer, buffer[GUARD_ROWS : GUARD_ROWS + shape[0]]


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize(
    ("offsets", "max_seqlen", "clamped"),
    [
        ([0, 7, 60], 64, [0, 7, 20]),  # past T
        ([-30, 8, 20], 64, [0, 8, 20]),  # before 0
        ([0, 12, 3, 20], 64, None),  # decreasing: unspecified values, still in bounds
        ([0, 70, 90], 64, None),  # every sequence past T
        ([0, 20], 4, None),  # max_seqlen below the length
    ],
)
def test_unchecked_offsets_never_leave_the_tensors(monkeypatch, offsets, max_seqlen, clamped):
    """With check_cu_seqlens=False no offset makes a kernel read or write outside its tensors: q, k, v and every
    buffer the kernels write (outputs, lse, delta, gradients) sit between rows of sentinel that must be neither read
    (NaN there would show in the results) nor written. Offsets that are valid once clamped into [0, T] give the
    result of the clamped offsets."""
    total, heads, head_dim = 20, 2, 16
    buffers = []

    def guarded_empty(*shape, dtype, device):
        buffer, view = _guarded(shape, -7.0, dtype)
        buffers.append((buffer, view))
        return view.fill_(float("nan"))

    monkeypatch.setattr(varlen_module, "empty", guarded_empty)
    inputs = []
    for _ in range(3):
        _, view = _guarded((total, heads, head_dim), float("nan"))
        view.copy_(torch.randn(total, heads, head_dim))
        inputs.append(view.requires_grad_())
    cu = torch.tensor(offsets, dtype=torch.int32, device=DEVICE)
    out = varlen_attention(*inputs, cu, max_seqlen, check_cu_seqlens=False, backend="triton")
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, inputs, grad_out)
    assert buffers, "the kernels' buffers were not guarded"
    for buffer, view in buffers:
        for guard in (buffer[:GUARD_ROWS], buffer[-GUARD_ROWS:]):
            assert (guard == -7).all(), f"a kernel wrote outside a {tuple(view.shape)} buffer"
    if clamped is not None:
        detached = [t.detach().double().requires_grad_() for t in inputs]
        cu_clamped = torch.tensor(clamped, dtype=torch.int32, device=DEVICE)
        want = forward_backward(lambda *t: reference.varlen_attention_ref(*t, cu_clamped), detached, grad_out.double())
        for got, expected in zip((out, *grads), want):
            torch.testing.assert_close(got.double(), expected, atol=2e-5, rtol=2e-5)


def test_unchecked_max_seqlen_below_a_length_stays_in_bounds(monkeypatch):
    """A max_seqlen below a sequence's length leaves rows unspecified, but never moves a kernel out of its
    tensors, and the rows within the first max_seqlen of every sequence are still exact in the forward."""
    lengths = [37, 5]
    total = sum(lengths)
    _, (q, k, v) = _qkv(total, 1, 16, torch.float32)
    cu = cu_seqlens(lengths)
    out = varlen_attention(q, k, v, cu, 16, check_cu_seqlens=False, backend="triton")
    want = reference.varlen_attention_ref(q, k, v, cu)
    rows = [*range(16), *range(37, 42)]
    torch.testing.assert_close(out[rows], want[rows], atol=2e-5, rtol=2e-5)
    torch.autograd.grad(out, (q, k, v), torch.randn_like(out))  # runs, in bounds


if varlen_module.TRITON_AVAILABLE:
    import triton
    import triton.language as tl

    @triton.jit
    def _decode_sequence_tiles(
        TILE, HEAD, START, LENGTH, CuSeqlens, num_programs, total, num_tiles, num_seqs, BLOCK: tl.constexpr
    ):
        pid = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tile, head, start, length = varlen_module._sequence_tile(pid, CuSeqlens, total, num_tiles, num_seqs)
        mask = pid < num_programs
        tl.store(TILE + pid, tile, mask=mask)
        tl.store(HEAD + pid, head, mask=mask)
        tl.store(START + pid, start, mask=mask)
        tl.store(LENGTH + pid, length, mask=mask)


def test_grids_fit_cuda_and_cover_every_sequence_and_head(monkeypatch):
    """70000 sequences (images of a packed batch) exceed CUDA's 65535 on grid axes 1 and 2: every launch must stay
    within the limits and its programs must cover every (tile, sequence, head) exactly once."""
    lengths = torch.randint(0, 20, (70_000,))
    lengths[-1] = 40
    heads, head_dim, max_seqlen = 2, 64, 40
    cu = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    total = int(cu[-1])
    monkeypatch.setattr(varlen_module, "empty", zero_stride_empty)
    q = torch.zeros((), dtype=torch.float16).expand(total, heads, head_dim)
    lse = torch.zeros(()).expand(heads, total)
    launch = LaunchRecorder()

    fwd_cfg = varlen_module.get_fwd_config(max_seqlen, head_dim, q.dtype, q.device)
    bwd_cfg = varlen_module.get_bwd_config(max_seqlen, head_dim, q.dtype, q.device)
    varlen_module._launch_fwd(q, q, q, cu, max_seqlen, 0.125, fwd_cfg, launch, q, lse)
    varlen_module._launch_bwd(q, q, q, cu, q, lse, q, max_seqlen, 0.125, True, bwd_cfg, launch, q, q, q)
    assert len(launch.launches) == 3  # the forward, the backward's preprocess and its one kernel
    for launched, grid, _, kwargs in launch.launches:
        assert_grid_within_cuda_limits(grid)
        if launched is varlen_module._varlen_attn_bwd_preprocess_kernel:
            assert grid == (triton.cdiv(total, kwargs["BLOCK_M"]) * heads,)
            continue
        block = kwargs["BLOCK_N"] if launched is varlen_module._varlen_attn_bwd_kernel else kwargs["BLOCK_M"]
        num_tiles = triton.cdiv(max_seqlen, block)
        assert grid == (num_tiles * len(lengths) * heads,), launched.__name__
        decoded = [torch.empty(grid[0], dtype=torch.int32, device=DEVICE) for _ in range(4)]
        _decode_sequence_tiles[(triton.cdiv(grid[0], 4096),)](
            *decoded, cu.to(DEVICE), grid[0], total, num_tiles, len(lengths), BLOCK=4096
        )
        tile, head, start, length = (t.long().cpu() for t in decoded)
        seq = torch.arange(grid[0]) // num_tiles % len(lengths)
        assert torch.equal((head * len(lengths) + seq) * num_tiles + tile, torch.arange(grid[0]))
        assert int(tile.max()) == num_tiles - 1 and int(head.max()) == heads - 1
        assert torch.equal(start, cu[:-1].long()[seq]) and torch.equal(length, lengths[seq])


def test_works_on_pack_tokens_output():
    x = torch.randn(3, 20, 3 * 2 * 16, device=DEVICE, requires_grad=True)  # the qkv projection of every token
    keep = torch.rand(3, 20, device=DEVICE) < 0.5
    keep[:, 0] = True  # the CLS token is always kept
    packed = pack_tokens(x, keep, max_seqlen=20)
    q, k, v = packed.data.view(-1, 3, 2, 16).unbind(1)
    _assert_matches_reference(q, k, v, packed.cu_seqlens, packed.max_seqlen, check_cu_seqlens=False)


@pytest.mark.skipif(not OPS_AVAILABLE, reason="torch.library.triton_op is not available")
def test_registered_ops_match_the_launchers(monkeypatch):
    # CUDA runs the autograd Function on the triton_ops; here (interpreter) they must agree with the launchers, and
    # the forward op's log-sum-exps are base 2.
    lengths = [5, 0, 11]
    q, k, v = (torch.randn(16, 2, 16, device=DEVICE, requires_grad=True) for _ in range(3))
    cu = cu_seqlens(lengths)
    grad_out = torch.randn(16, 2, 16, device=DEVICE)
    want = forward_backward(lambda *t: varlen_attention(*t, cu, 11, scale=0.25, backend="triton"), (q, k, v), grad_out)
    monkeypatch.setattr(varlen_module, "uses_registered_ops", lambda q: True)
    got = forward_backward(lambda *t: varlen_attention(*t, cu, 11, scale=0.25, backend="triton"), (q, k, v), grad_out)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    out, lse = torch.ops.faithful_vit.varlen_attention_fwd(q.detach(), k.detach(), v.detach(), cu, 11, 0.25)
    assert torch.equal(out, want[0])
    assert lse.shape == (2, 16) and lse.dtype == torch.float32
    for start, end in ((0, 5), (5, 16)):
        scores = torch.einsum("ihd,jhd->hij", q[start:end].double(), k[start:end].double()) * 0.25
        lse_log2 = scores.logsumexp(-1) / math.log(2)  # the kernels keep log-sum-exps in base 2
        torch.testing.assert_close(lse[:, start:end].double(), lse_log2, atol=1e-5, rtol=1e-5)


def test_torch_backend_needs_no_triton():
    lengths = [3, 4]
    q, k, v = (torch.randn(7, 1, 16, device=DEVICE) for _ in range(3))
    cu = cu_seqlens(lengths)
    got = varlen_attention(q, k, v, cu, 4, backend="torch")
    torch.testing.assert_close(got, reference.varlen_attention_ref(q, k, v, cu), atol=1e-5, rtol=1e-5)


# ---- Bad input ----


def _good(**overrides):
    args = {
        "q": torch.randn(7, 2, 16),
        "k": torch.randn(7, 2, 16),
        "v": torch.randn(7, 2, 16),
        "cu_seqlens": cu_seqlens([3, 4], "cpu"),
        "max_seqlen": 4,
    }
    args.update(overrides)
    return args


@pytest.mark.parametrize(
    ("overrides", "error", "match"),
    [
        ({"cu_seqlens": torch.tensor([0, 3, 7])}, TypeError, r"cu_seqlens: expected dtype .*int32.*got torch.int64"),
        ({"cu_seqlens": torch.tensor([0, 5, 3, 7], dtype=torch.int32)}, ValueError, r"cu_seqlens: .*non-decreasing"),
        ({"cu_seqlens": torch.tensor([1, 3, 7], dtype=torch.int32)}, ValueError, r"cu_seqlens: .*starting at 0"),
        ({"cu_seqlens": torch.tensor([0, 3, 6], dtype=torch.int32)}, ValueError, r"cu_seqlens: .*T = 7, got 6"),
        ({"cu_seqlens": torch.tensor([[0, 3, 7]], dtype=torch.int32)}, ValueError, r"cu_seqlens: expected a 1-d"),
        ({"cu_seqlens": torch.zeros(0, dtype=torch.int32)}, ValueError, r"cu_seqlens: expected at least one"),
        ({"q": torch.randn(1, 7, 2, 16)}, ValueError, r"q: expected a 3-d tensor \(T, H, D\)"),
        ({"v": torch.randn(7, 32)}, ValueError, r"v: expected a 3-d"),
        ({"q": torch.randn(7, 2, 16, dtype=torch.float64)}, TypeError, r"q: expected dtype"),
        ({"k": torch.randn(7, 2, 16, dtype=torch.float16)}, TypeError, r"k: expected dtype torch.float32 like q"),
        ({"k": torch.randn(7, 1, 16)}, ValueError, r"k, v: expected the shape of q"),
        (
            {"q": torch.randn(7, 2, 8), "k": torch.randn(7, 2, 8), "v": torch.randn(7, 2, 8)},
            ValueError,
            r"head dim must be in \[16, 128\], got 8",
        ),
        (
            {"q": torch.randn(7, 1, 256), "k": torch.randn(7, 1, 256), "v": torch.randn(7, 1, 256)},
            ValueError,
            r"got 256",
        ),
        ({"max_seqlen": 3}, ValueError, r"max_seqlen: expected an upper bound .*>= 4.*got 3"),
        ({"max_seqlen": -1}, ValueError, r"max_seqlen: expected a non-negative int"),
        ({"max_seqlen": 4.0}, ValueError, r"max_seqlen: expected a non-negative int"),
        ({"max_seqlen": torch.tensor(4)}, ValueError, r"max_seqlen: expected a non-negative int"),
        ({"q": "q"}, TypeError, r"q: expected a torch.Tensor"),
        ({"scale": 0.0}, ValueError, r"scale: expected a positive finite float, got 0.0"),
    ],
)
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_bad_input_names_the_argument(overrides, error, match, backend):
    args = _good(**overrides)
    with pytest.raises(error, match=match):
        varlen_attention(**args, backend=backend)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter's limit")
def test_bf16_under_the_interpreter_is_a_clear_error():
    q = torch.randn(4, 1, 16, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="q: the Triton interpreter .*bf16"):
        varlen_attention(q, q, q, cu_seqlens([4], "cpu"), 4, backend="triton")


# ---- GPU, real sizes ----


def _vit_lengths(batch, tokens, kept_fraction, generator=None):
    """CLS plus a per-image kept fraction varying around ``kept_fraction`` (some images keep almost nothing)."""
    fractions = (kept_fraction + 0.3 * (torch.rand(batch, generator=generator) - 0.5)).clamp(0, 1)
    lengths = (1 + (tokens - 1) * fractions).round().long().tolist()
    lengths[0], lengths[-1] = 1, tokens  # the extremes: CLS only, and everything kept
    return lengths


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_vit_batch(dtype, head_dim):
    lengths = _vit_lengths(32, 197, 0.5)
    _, (q, k, v) = _qkv(sum(lengths), 768 // head_dim, head_dim, dtype, "packed", "cuda")
    _assert_matches_reference(q, k, v, cu_seqlens(lengths, "cuda"), max_seqlen=197)


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [64, 128, 80])
def test_gpu_long_sequences(head_dim):
    lengths = [1374, 700, 1, 0, 1100]
    _, (q, k, v) = _qkv(sum(lengths), 2, head_dim, torch.bfloat16, "packed", "cuda")
    _assert_matches_reference(q, k, v, cu_seqlens(lengths, "cuda"), max_seqlen=1374)


@pytest.mark.gpu
def test_gpu_fp32_is_exact():
    lengths = _vit_lengths(8, 197, 0.5)
    _, (q, k, v) = _qkv(sum(lengths), 4, 64, torch.float32, "packed", "cuda")
    _assert_matches_reference(q, k, v, cu_seqlens(lengths, "cuda"), max_seqlen=197)


@pytest.mark.gpu
def test_gpu_torch_compile_full_graph():
    lengths = _vit_lengths(16, 197, 0.5)
    cu = cu_seqlens(lengths, "cuda")
    leaf, (q, k, v) = _qkv(sum(lengths), 6, 64, torch.bfloat16, "packed", "cuda")

    def block(qkv):
        q, k, v = qkv.view(-1, 3, 6, 64).unbind(1)
        return varlen_attention(q, k, v, cu, 197, check_cu_seqlens=False).float().square().sum()

    compiled = torch.compile(block, fullgraph=True)
    eager_loss = block(leaf)
    eager_grad = torch.autograd.grad(eager_loss, leaf)[0]
    compiled_loss = compiled(leaf)
    compiled_grad = torch.autograd.grad(compiled_loss, leaf)[0]
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(compiled_grad.float(), eager_grad.float(), rtol=2e-2, atol=2e-2)
