"""Triton masked attention against the float64 reference: forward, gradients of q/k/v/gate, masks, layouts, errors.

CPU tests run the kernels under the Triton interpreter (tiny shapes); ``@pytest.mark.gpu`` tests use real ViT sizes.
"""

import math
import sys

import pytest
import torch
import torch.nn.functional as F
from _kernel_helpers import (
    DEVICE,
    assert_grid_within_cuda_limits,
    forward_backward,
    fresh_leaves,
    zero_stride_empty,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from faithful_vit.kernels import compaction_order, masked_attention, reference
from faithful_vit.kernels._attention_core import OPS_AVAILABLE
from faithful_vit.kernels._launch_record import LaunchRecorder

impl = sys.modules["faithful_vit.kernels.masked_attention"]
HAS_CUDA = torch.cuda.is_available()


def _random_keep(batch: int, seq_len: int, frac: float = 0.5) -> torch.Tensor:
    return torch.rand(batch, seq_len, device=DEVICE) < frac


def _qkv(batch, heads, seq_len, head_dim, dtype, layout="contiguous"):
    """Fresh random q, k, v ``(B, H, N, D)`` leaves in one of the layouts the kernels must accept."""
    if layout == "timm":  # qkv(x).reshape(B, N, 3, H, D).permute(2, 0, 3, 1, 4), as timm's Attention does
        qkv = torch.randn(batch, seq_len, 3 * heads * head_dim, device=DEVICE, dtype=dtype, requires_grad=True)
        q, k, v = qkv.reshape(batch, seq_len, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        return q, k, v, (qkv,)
    if layout == "transposed":  # (B, N, H, D) memory viewed as (B, H, N, D)
        leaves = [
            torch.randn(batch, seq_len, heads, head_dim, device=DEVICE, dtype=dtype, requires_grad=True)
            for _ in range(3)
        ]
        q, k, v = (t.transpose(1, 2) for t in leaves)
        return q, k, v, tuple(leaves)
    leaves = [
        torch.randn(batch, heads, seq_len, head_dim, device=DEVICE, dtype=dtype, requires_grad=True) for _ in range(3)
    ]
    return *leaves, tuple(leaves)


def _forward_backward(fn, q, k, v, keep, grad_out, gate=None, **kwargs):
    """Output and gradients of fresh copies of (q, k, v[, gate]) for the upstream gradient ``grad_out``."""
    inputs = [t for t in fresh_leaves(q, k, v, gate) if t is not None]

    def run(q, k, v, gate=None):
        return fn(q, k, v, keep, gate=gate, **kwargs)

    out, *grads = forward_backward(run, inputs, grad_out)
    return out, grads


def _kernel(q, k, v, keep, **kwargs):
    return masked_attention(q, k, v, keep, backend="triton", **kwargs)


def _ref64(q, k, v, keep, **kwargs):
    out = reference.masked_attention_ref(q.double(), k.double(), v.double(), keep, upcast=True, **kwargs)
    return out


def _ref_same_dtype(q, k, v, keep, **kwargs):
    return reference.masked_attention_ref(q, k, v, keep, upcast=False, **kwargs)


def _max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


def _check(q, k, v, keep, *, skip, gate=True, atol=None, deterministic=True):
    """Kernel (``deterministic``: which backward) vs float64 reference: fp32 within ``atol`` (relative to the
    magnitude), half precision within twice the error of the torch reference run in the same dtype plus a small
    floor."""
    gate_t = keep.to(q.dtype) if gate else None
    grad_out = torch.randn(q.shape, device=q.device, dtype=torch.float64)
    kernel = lambda *a, **kw: _kernel(*a, deterministic=deterministic, **kw)  # noqa: E731
    got = _forward_backward(kernel, q, k, v, keep, grad_out, gate=gate_t, skip_dropped_queries=skip)
    ref = _forward_backward(_ref64, q, k, v, keep, grad_out, gate=gate_t, skip_dropped_queries=skip)
    same = None
    if q.dtype != torch.float32:
        same = _forward_backward(_ref_same_dtype, q, k, v, keep, grad_out, gate=gate_t, skip_dropped_queries=skip)
    names = ["out", "dq", "dk", "dv", "dgate"]
    for i, (name, a, r) in enumerate(zip(names, [got[0], *got[1]], [ref[0], *ref[1]])):
        assert not torch.isnan(a).any(), f"{name}: NaN"
        scale = 1.0 + r.abs().max().item()
        err = _max_err(a, r)
        if same is None:
            bound = (atol if atol is not None else 2e-5) * scale * (1 if name == "out" else 4)
        else:
            s = [same[0], *same[1]][i]
            bound = 2 * _max_err(s, r) + 2e-3 * scale
        assert err <= bound, f"{name}: max error {err:.3g} > {bound:.3g} (dtype {q.dtype}, skip={skip})"
    return got


# ---- Interpreter (CPU) and GPU: correctness against the float64 reference ----------------------------------------


@pytest.mark.parametrize("skip", [True, False])
@pytest.mark.parametrize(("batch", "heads", "seq_len", "head_dim"), [(2, 2, 37, 16), (1, 2, 50, 32), (1, 1, 21, 80)])
def test_fp32_matches_float64_reference(batch, heads, seq_len, head_dim, skip):
    q, k, v, _ = _qkv(batch, heads, seq_len, head_dim, torch.float32)
    _check(q, k, v, _random_keep(batch, seq_len), skip=skip)


@settings(max_examples=6, deadline=None, database=None)
@given(
    seq_len=st.integers(1, 70),
    head_dim=st.sampled_from([16, 24, 48]),
    keep_frac=st.floats(0.0, 1.0),
    skip=st.booleans(),
)
def test_awkward_shapes_and_masks(seq_len, head_dim, keep_frac, skip):
    q, k, v, _ = _qkv(1, 1, seq_len, head_dim, torch.float32)
    _check(q, k, v, _random_keep(1, seq_len, frac=keep_frac), skip=skip)


@pytest.mark.parametrize("skip", [True, False])
def test_fp16_within_twice_the_torch_error(skip):
    q, k, v, _ = _qkv(2, 2, 45, 32, torch.float16)
    _check(q, k, v, _random_keep(2, 45), skip=skip)


# The atomic-dQ backward (deterministic=False): the same bounds on the same awkward shapes and masks.


@pytest.mark.parametrize("gate", [True, False])
@pytest.mark.parametrize("skip", [True, False])
@pytest.mark.parametrize(("batch", "heads", "seq_len", "head_dim"), [(2, 2, 37, 16), (1, 1, 21, 80)])
def test_atomic_dq_fp32_matches_float64_reference(batch, heads, seq_len, head_dim, skip, gate):
    q, k, v, _ = _qkv(batch, heads, seq_len, head_dim, torch.float32)
    _check(q, k, v, _random_keep(batch, seq_len), skip=skip, gate=gate, deterministic=False)


@settings(max_examples=4, deadline=None, database=None)
@given(
    seq_len=st.integers(1, 70),
    head_dim=st.sampled_from([16, 24, 48]),
    keep_frac=st.floats(0.0, 1.0),
    skip=st.booleans(),
)
def test_atomic_dq_awkward_shapes_and_masks(seq_len, head_dim, keep_frac, skip):
    q, k, v, _ = _qkv(1, 1, seq_len, head_dim, torch.float32)
    _check(q, k, v, _random_keep(1, seq_len, frac=keep_frac), skip=skip, deterministic=False)


@pytest.mark.parametrize("skip", [True, False])
def test_atomic_dq_fp16_within_twice_the_torch_error(skip):
    q, k, v, _ = _qkv(2, 2, 45, 32, torch.float16)
    _check(q, k, v, _random_keep(2, 45), skip=skip, deterministic=False)


@pytest.mark.parametrize("skip", [True, False])
def test_atomic_dq_full_partly_kept_dead_blocks_and_an_image_without_kept_token(skip):
    q, k, v, _ = _qkv(4, 2, 50, 16, torch.float32)
    keep = torch.zeros(4, 50, dtype=torch.bool, device=DEVICE)
    keep[0, :35] = True  # two full blocks, a partly kept one, a dead one
    keep[1] = True
    keep[1, 20] = False  # full, partly kept, full, ragged last
    keep[2, 16:32] = True
    keep[2, 40] = True  # dead, full, partly kept, dead
    out, (dq, dk, dv, dgate) = _check(q, k, v, keep, skip=skip, deterministic=False)  # image 3: no kept token
    for t in (out[3], dq[3], dk[3], dv[3], dgate[3]):
        assert torch.equal(t, torch.zeros_like(t))


@pytest.mark.parametrize("layout", ["timm", "transposed"])
def test_non_contiguous_inputs(layout):
    q, k, v, _ = _qkv(2, 2, 29, 16, torch.float32, layout=layout)
    assert not q.is_contiguous()
    _check(q, k, v, _random_keep(2, 29), skip=True)


def test_non_contiguous_keep():
    q, k, v, _ = _qkv(2, 1, 23, 16, torch.float32)
    keep = (torch.rand(23, 2, device=DEVICE) < 0.5).t()
    assert not keep.is_contiguous()
    _check(q, k, v, keep, skip=True)


def test_gradients_through_timm_qkv_view():
    q, k, v, (qkv,) = _qkv(1, 2, 19, 16, torch.float32, layout="timm")
    keep = _random_keep(1, 19)
    out = _kernel(q, k, v, keep)
    out.transpose(1, 2).reshape(1, 19, 32).sum().backward()
    (grad_kernel,) = (qkv.grad.clone(),)
    qkv.grad = None
    reference.masked_attention_ref(q, k, v, keep).transpose(1, 2).reshape(1, 19, 32).sum().backward()
    torch.testing.assert_close(grad_kernel, qkv.grad, atol=1e-5, rtol=1e-5)


def test_output_is_stored_batch_token_major():
    """timm's out.transpose(1, 2).reshape(B, N, C) must not copy."""
    q, k, v, _ = _qkv(1, 2, 17, 16, torch.float32)
    out = _kernel(q, k, v, _random_keep(1, 17))
    assert out.shape == q.shape
    assert out.transpose(1, 2).is_contiguous()


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("deterministic", [True, False])
def test_dropped_keys_have_exactly_zero_influence(deterministic):
    """NaN/Inf in dropped k/v leave every output and every gradient (gate: at kept keys) unchanged, bit for bit, in
    both backwards (the atomic-dQ one on the interpreter adds in a fixed order, so its bits are comparable)."""
    batch, heads, seq_len, head_dim = 2, 2, 40, 16
    q, k, v, _ = _qkv(batch, heads, seq_len, head_dim, torch.float32)
    keep = _random_keep(batch, seq_len)
    keep[0, 16:32] = False  # a whole dead block, besides the partly kept ones
    keep[1, :32] = True  # two full blocks
    dropped = ~keep[:, None, :, None]
    poisoned_k = k.detach().masked_fill(dropped, float("nan"))
    poisoned_v = v.detach().masked_fill(dropped, float("inf"))
    gate = keep.float()
    grad_out = torch.randn(q.shape, device=q.device)
    kernel = lambda *a, **kw: _kernel(*a, deterministic=deterministic, **kw)  # noqa: E731
    for skip in (True, False):
        clean = _forward_backward(kernel, q, k, v, keep, grad_out, gate=gate, skip_dropped_queries=skip)
        dirty = _forward_backward(
            kernel, q, poisoned_k, poisoned_v, keep, grad_out, gate=gate, skip_dropped_queries=skip
        )
        for name, a, b in zip(["out", "dq", "dk", "dv"], [clean[0], *clean[1][:3]], [dirty[0], *dirty[1][:3]]):
            assert torch.equal(a, b), f"{name} changed (skip={skip})"
        assert torch.equal(clean[1][3][keep], dirty[1][3][keep]), f"gate gradient at kept keys changed (skip={skip})"
        assert torch.isfinite(clean[1][3]).all()


def _assert_same_non_finite(got, want, name):
    """Non-finite exactly where the float64 reference is, and close to it everywhere else."""
    got, want = got.double(), want.double()
    finite = torch.isfinite(want)
    assert torch.equal(torch.isfinite(got), finite), f"{name}: non-finite at other positions than the reference"
    scale = 1.0 + want[finite].abs().max().item() if finite.any() else 1.0
    err = (got[finite] - want[finite]).abs().max().item() if finite.any() else 0.0
    assert err <= 1e-4 * scale, f"{name}: max error {err:.3g} where finite"


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:All-NaN slice encountered:RuntimeWarning")
@pytest.mark.parametrize("skip", [True, False])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("poisoned", ["q", "k", "v"])
def test_non_finite_kept_tokens_propagate_as_in_the_reference(poisoned, value, skip):
    """NaN/Inf in one kept token reaches exactly the outputs and gradients (gate included) it reaches in the float64
    reference (which matches SDPA, see test_reference.py): one in a full block (the loops without per-token masks),
    one in a partly kept block, each in head 0 of its own image; image 2 and head 1 stay clean."""
    _check_non_finite_propagation(poisoned, value, skip, deterministic=True)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:All-NaN slice encountered:RuntimeWarning")
@pytest.mark.parametrize(("poisoned", "value", "skip"), [("q", "nan", True), ("k", "inf", False), ("v", "-inf", True)])
def test_atomic_dq_non_finite_kept_tokens_propagate_as_in_the_reference(poisoned, value, skip):
    _check_non_finite_propagation(poisoned, float(value), skip, deterministic=False)


def _check_non_finite_propagation(poisoned, value, skip, deterministic):
    q, k, v, _ = _qkv(3, 2, 37, 16, torch.float32)
    keep = _random_keep(3, 37)
    keep[0, :16] = True  # a full block
    keep[1, 16:32] = torch.arange(16, device=DEVICE) % 2 == 0  # a partly kept block
    tensors = {"q": q.detach().clone(), "k": k.detach().clone(), "v": v.detach().clone()}
    tensors[poisoned][0, 0, 5, 3] = value
    tensors[poisoned][1, 0, 20, 7] = value
    gate = keep.float()
    grad_out = torch.randn(q.shape, device=q.device, dtype=torch.float64)
    args = (tensors["q"], tensors["k"], tensors["v"], keep, grad_out)
    kernel = lambda *a, **kw: _kernel(*a, deterministic=deterministic, **kw)  # noqa: E731
    got = _forward_backward(kernel, *args, gate=gate, skip_dropped_queries=skip)
    want = _forward_backward(_ref64, *args, gate=gate, skip_dropped_queries=skip)
    for name, a, r in zip(["out", "dq", "dk", "dv", "dgate"], [got[0], *got[1]], [want[0], *want[1]]):
        _assert_same_non_finite(a, r, name)
    assert not torch.isfinite(want[0][:2, 0]).all(), "the poison must reach the reference output"
    for t in (got[0], *got[1][:3]):
        assert torch.isfinite(t[2]).all() and torch.isfinite(t[:, 1]).all()


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:All-NaN slice encountered:RuntimeWarning")
@pytest.mark.parametrize(("backend", "deterministic"), [("triton", True), ("triton", False), ("torch", None)])
def test_skipped_dropped_queries_change_nothing_else(backend, deterministic):
    """NaN/Inf in the q, k, v and output gradient of dropped tokens changes no output and no gradient (gate: at
    kept keys), bit for bit, when dropped queries are skipped: no 0 * NaN in the dK/dV products."""
    q, k, v, _ = _qkv(2, 2, 40, 16, torch.float32)
    keep = _random_keep(2, 40)
    keep[1, :16] = True  # a full block besides partly kept ones
    dropped = ~keep[:, None, :, None]
    grad_out = torch.randn(q.shape, device=q.device)
    dirty = [t.detach().masked_fill(dropped, fill) for t, fill in ((q, float("nan")), (k, float("inf")), (v, -1e30))]
    dirty_grad_out = grad_out.masked_fill(dropped, float("nan"))

    def run(q, k, v, grad_out):
        fn = lambda *a, **kw: masked_attention(*a, backend=backend, deterministic=deterministic, **kw)  # noqa: E731
        return _forward_backward(fn, q, k, v, keep, grad_out, gate=keep.float(), skip_dropped_queries=True)

    clean = run(q, k, v, grad_out)
    poisoned = run(*dirty, dirty_grad_out)
    for name, a, b in zip(["out", "dq", "dk", "dv"], [clean[0], *clean[1][:3]], [poisoned[0], *poisoned[1][:3]]):
        assert torch.equal(a, b), f"{name} changed"
    assert torch.equal(clean[1][3][keep], poisoned[1][3][keep]), "gate gradient at kept keys changed"


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("shape", [(2, 2, 0, 16), (0, 2, 5, 16), (2, 0, 5, 16)])
def test_empty_batch_heads_or_tokens(shape, backend):
    q, k, v = (torch.randn(shape, device=DEVICE) for _ in range(3))
    keep = torch.ones(shape[0], shape[2], dtype=torch.bool, device=DEVICE)
    for skip in (True, False):
        fn = lambda *a, **kw: masked_attention(*a, backend=backend, **kw)  # noqa: E731
        grad_out = torch.randn(shape, device=DEVICE)
        out, grads = _forward_backward(fn, q, k, v, keep, grad_out, gate=keep.float(), skip_dropped_queries=skip)
        assert out.shape == shape and [g.shape for g in grads] == [shape] * 3 + [keep.shape]
        assert all(torch.equal(g, torch.zeros_like(g)) for g in grads[3:])  # no key (N = 0) or no head (H = 0)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("bad", [0.5, float("nan"), "one where dropped"])
def test_gate_differing_from_keep_makes_its_image_nan(bad, backend):
    """The gate's value must be keep: any other value (checked on the device) turns that image's output into NaN,
    leaves the other images and every gradient as they are with gate = keep."""
    q, k, v, _ = _qkv(2, 2, 24, 16, torch.float32)
    keep = _random_keep(2, 24)
    keep[:, :2] = torch.tensor([True, False], device=DEVICE)
    gate = keep.float()
    wrong = gate.clone()
    if bad == "one where dropped":
        wrong[0, 1] = 1.0
    else:
        wrong[0, 0] = bad
    grad_out = torch.randn(q.shape, device=q.device)
    fn = lambda *a, **kw: masked_attention(*a, backend=backend, **kw)  # noqa: E731
    right = _forward_backward(fn, q, k, v, keep, grad_out, gate=gate)
    got = _forward_backward(fn, q, k, v, keep, grad_out, gate=wrong)
    assert torch.isnan(got[0][0]).all()
    assert torch.equal(got[0][1], right[0][1])
    for a, b in zip(got[1], right[1]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("skip", [True, False])
def test_image_without_kept_token_gives_zeros(skip):
    q, k, v, _ = _qkv(2, 2, 33, 16, torch.float32)
    keep = _random_keep(2, 33)
    keep[1] = False
    got = _check(q, k, v, keep, skip=skip)
    out, (dq, dk, dv, dgate) = got
    for t in (out[1], dq[1], dk[1], dv[1], dgate[1]):
        assert torch.equal(t, torch.zeros_like(t))


@pytest.mark.parametrize("skip", [True, False])
def test_full_partly_kept_and_dead_blocks_together(skip):
    """Full blocks take the loops without per-token masks; mix them with partly kept and dead blocks (the
    interpreter's blocks are 16 tokens) and with the ragged last block of N = 50."""
    q, k, v, _ = _qkv(3, 2, 50, 16, torch.float32)
    keep = torch.zeros(3, 50, dtype=torch.bool, device=DEVICE)
    keep[0, :35] = True  # compacted: two full blocks, then a partly kept one, then a dead one
    keep[1] = True
    keep[1, 20] = False  # full, partly kept, full, ragged last
    keep[2, 16:32] = True
    keep[2, 40] = True  # dead, full, partly kept, dead
    _check(q, k, v, keep, skip=skip)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("block_n", [32, 128])
def test_key_blocks_of_half_a_bit_word_and_of_two(monkeypatch, block_n):
    """Partly kept key blocks read their keep mask from 64-token words of bits: a 32-key block is half a word, a
    128-key block two. Dropped keys hold NaN: their scores and values must still be masked."""
    monkeypatch.setattr(
        impl, "get_fwd_config", lambda *a: {"BLOCK_M": 16, "BLOCK_N": block_n, "num_warps": 1, "num_stages": 1}
    )
    q, k, v, _ = _qkv(2, 1, 300, 16, torch.float32)
    keep = _random_keep(2, 300)
    keep[0, : 2 * block_n] = True  # full blocks first (direct offsets), then partly kept ones
    keep[1, block_n : 2 * block_n] = True  # a full block after a partly kept one (listed offsets)
    poisoned_k, poisoned_v = (t.detach().masked_fill(~keep[:, None, :, None], float("nan")) for t in (k, v))
    with torch.no_grad():
        got = _kernel(q, poisoned_k, poisoned_v, keep)
    assert torch.isfinite(got).all()
    assert _max_err(got, _ref64(q, k, v, keep)) <= 2e-5 * (1.0 + v.abs().max().item())


def test_one_kept_token_and_every_token_kept():
    q, k, v, _ = _qkv(2, 2, 35, 16, torch.float32)
    keep = torch.zeros(2, 35, dtype=torch.bool, device=DEVICE)
    keep[0, 20] = True
    keep[1] = True
    _check(q, k, v, keep, skip=True)
    _check(q, k, v, keep, skip=False)


def test_every_token_kept_equals_sdpa():
    q, k, v, _ = _qkv(1, 2, 26, 32, torch.float32)
    out = _kernel(q, k, v, torch.ones(1, 26, dtype=torch.bool, device=DEVICE))
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), atol=1e-5, rtol=1e-5)


def test_single_token_sequence():
    q, k, v, _ = _qkv(2, 1, 1, 16, torch.float32)
    keep = torch.tensor([[True], [False]], device=DEVICE)
    _check(q, k, v, keep, skip=True)
    _check(q, k, v, keep, skip=False)


def test_custom_scale_and_gate_without_grad():
    q, k, v, _ = _qkv(1, 2, 24, 16, torch.float32)
    keep = _random_keep(1, 24)
    got = _kernel(q, k, v, keep, scale=0.3, gate=keep.float())
    torch.testing.assert_close(got, reference.masked_attention_ref(q, k, v, keep, scale=0.3), atol=1e-5, rtol=1e-5)


def test_backward_in_two_launches_equals_the_one_launch(monkeypatch):
    """``SPLIT_DQ`` (the configs above head dim 64) runs the dK/dV and dQ parts of the backward kernel in two
    launches: the gradients are the same, bit for bit."""
    q, k, v, _ = _qkv(2, 2, 45, 16, torch.float32)
    keep = _random_keep(2, 45)
    grad_out = torch.randn(q.shape, device=q.device)
    one = _forward_backward(_kernel, q, k, v, keep, grad_out, gate=keep.float())
    bwd = impl.get_bwd_config
    monkeypatch.setattr(impl, "get_bwd_config", lambda *a: {**bwd(*a), "SPLIT_DQ": 1})
    with LaunchRecorder() as record:
        _forward_backward(_kernel, q, k, v, keep, grad_out)
    parts = [kw["PARTS"] for kernel, _, _, kw in record.launches if kernel is impl._masked_attn_bwd_kernel]
    assert parts == ["dkdv", "dq"]
    two = _forward_backward(_kernel, q, k, v, keep, grad_out, gate=keep.float())
    for a, b in zip([one[0], *one[1]], [two[0], *two[1]]):
        assert torch.equal(a, b)


def test_compacted_order_gives_the_same_result():
    batch, heads, seq_len, head_dim = 2, 2, 45, 16
    q, k, v, _ = _qkv(batch, heads, seq_len, head_dim, torch.float32)
    keep = _random_keep(batch, seq_len, frac=0.3)
    order, inverse = compaction_order(keep)

    def permute(t, index):
        return t.gather(2, index[:, None, :, None].expand_as(t))

    grad_out = torch.randn(q.shape, device=q.device)
    raster = _forward_backward(_kernel, q, k, v, keep, grad_out, gate=keep.float())
    compact = _forward_backward(
        _kernel,
        permute(q, order),
        permute(k, order),
        permute(v, order),
        keep.gather(1, order),
        permute(grad_out, order),
        gate=keep.gather(1, order).float(),
    )
    torch.testing.assert_close(permute(compact[0], inverse), raster[0], atol=1e-5, rtol=1e-5)
    for a, b in zip(compact[1][:3], raster[1][:3]):
        torch.testing.assert_close(permute(a, inverse), b, atol=5e-5, rtol=1e-5)
    torch.testing.assert_close(compact[1][3].gather(1, inverse), raster[1][3], atol=1e-4, rtol=1e-5)


# ---- Block lists and compaction ---------------------------------------------------------------------------------


def test_compaction_order_is_a_stable_kept_first_partition():
    keep = _random_keep(3, 50)
    order, inverse = compaction_order(keep)
    assert order.dtype == inverse.dtype == torch.int64
    for b in range(3):
        kept = [i for i in range(50) if keep[b, i]]
        dropped = [i for i in range(50) if not keep[b, i]]
        assert order[b].tolist() == kept + dropped
    positions = torch.arange(50, device=DEVICE).expand(3, 50)
    assert torch.equal(positions.gather(1, order).gather(1, inverse), positions)


@pytest.mark.parametrize(("seq_len", "block"), [(150, 16), (150, 64), (4100, 16)])  # 4100: the kernel's 2 chunks
def test_block_lists_match_a_python_loop(seq_len, block):
    keep = _random_keep(5, seq_len, frac=0.05)
    keep[1] = False
    keep[2, : 2 * block] = True  # two full blocks
    keep[3] = True  # every block full but the last (N is not a multiple of the block)
    keep[4, seq_len // 2 :] = True
    bits = torch.full((5, 2 * math.ceil(seq_len / 128)), -7, dtype=torch.int64, device=DEVICE)
    order, counts = impl._block_lists(impl._keep_bytes(keep), block, bits=bits)
    num_blocks = math.ceil(seq_len / block)
    assert order.shape == (5, num_blocks) and counts.shape == (5, 2) and order.dtype == counts.dtype == torch.int32
    # The kept tokens as bits: bit t % 64 of word t // 64, zero past N (padded to 128 tokens).
    padded = torch.nn.functional.pad(keep, (0, bits.shape[1] * 64 - seq_len)).reshape(5, -1, 64).long()
    want = (padded << torch.arange(64, device=DEVICE)).sum(-1)
    assert torch.equal(bits, want)
    for b in range(5):
        kept = [keep[b, i * block : (i + 1) * block].sum().item() for i in range(num_blocks)]
        full = [i for i in range(num_blocks) if kept[i] == block]
        partial = [i for i in range(num_blocks) if 0 < kept[i] < block]
        dead = [i for i in range(num_blocks) if kept[i] == 0]
        assert counts[b].tolist() == [len(full), len(full) + len(partial)]
        assert order[b].tolist() == full + partial + dead
    assert counts[3, 0].item() == seq_len // block


def test_query_lists_for_computed_dropped_queries():
    keep = _random_keep(3, 40, frac=0.3)
    keep[:, 0] = True
    keep[1] = False
    order, counts = impl._block_lists(impl._keep_bytes(keep), 16, every_block=True)
    assert order.tolist() == [[0, 1, 2]] * 3
    # Blocks inside N are full when the image has a kept token; an image without one has every row invalid.
    assert counts.tolist() == [[2, 3], [0, 3], [2, 3]]


def test_compaction_leaves_only_the_needed_live_blocks():
    keep = _random_keep(3, 197, frac=0.3)
    order, _ = compaction_order(keep)
    _, counts = impl._block_lists(impl._keep_bytes(keep.gather(1, order)), 16)
    kept = keep.sum(1).tolist()
    assert counts[:, 1].tolist() == [math.ceil(n / 16) for n in kept]
    assert counts[:, 0].tolist() == [n // 16 for n in kept]  # all full but the last


# ---- Grids -------------------------------------------------------------------------------------------------------

if impl.TRITON_AVAILABLE:
    import triton
    import triton.language as tl

    from faithful_vit.kernels._attention_core import program_tile

    @triton.jit
    def _decode_program_tiles(TILE, GROUP, num_programs, num_tiles, BLOCK: tl.constexpr):
        pid = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tile, group = program_tile(pid, num_tiles)
        tl.store(TILE + pid, tile, mask=pid < num_programs)
        tl.store(GROUP + pid, group, mask=pid < num_programs)


def decode_program_tiles(num_programs: int, num_tiles: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(tile, group)`` of every program of a 1-d grid, as the kernels decode them (their own ``program_tile``)."""
    tile, group = (torch.empty(num_programs, dtype=torch.int32, device=DEVICE) for _ in range(2))
    block = 4096
    _decode_program_tiles[(triton.cdiv(num_programs, block),)](tile, group, num_programs, num_tiles, BLOCK=block)
    return tile, group


def _vit_b_batch_inputs(monkeypatch, batch, heads, seq_len, head_dim):
    """Zero-stride q, k, v and outputs (the launchers only record here), a random keep."""
    monkeypatch.setattr(impl, "empty", zero_stride_empty)
    monkeypatch.setattr(
        impl, "empty_like_strided", lambda x, shape, dim_order: torch.zeros((), dtype=x.dtype).expand(shape)
    )
    q = torch.zeros((), dtype=torch.float16).expand(batch, heads, seq_len, head_dim)
    return q, torch.rand(batch, seq_len) < 0.5


def test_grids_fit_cuda_and_cover_every_image_and_head(monkeypatch):
    """ViT-B at batch 5462 has B x H = 65544 (image, head) pairs, over CUDA's 65535 on grid axes 1 and 2: every
    launch must stay within the limits and its programs must still cover every (tile, image x head) exactly once."""
    batch, heads, seq_len, head_dim = 5462, 12, 197, 64
    q, keep = _vit_b_batch_inputs(monkeypatch, batch, heads, seq_len, head_dim)
    cuda = torch.device("cuda")
    fwd_cfg = impl.get_fwd_config(seq_len, head_dim, q.dtype, cuda)
    bwd_cfg = impl.get_bwd_config(seq_len, head_dim, q.dtype, cuda)
    record = LaunchRecorder()
    out, lse = impl._launch_fwd(q, q, q, keep, 0.125, True, fwd_cfg, record)
    for skip, gate_grad in ((True, False), (True, True), (False, False)):
        impl._launch_bwd(out, q, q, q, keep, out, lse, 0.125, skip, gate_grad, True, bwd_cfg, record)
    attention = [launch for launch in record.launches if launch[0] is not impl._block_lists_kernel]
    assert len(attention) == 1 + 3 * 2  # the forward; per backward its preprocess and one kernel
    for kernel, grid, _, kwargs in record.launches:
        assert_grid_within_cuda_limits(grid)
        if kernel is impl._block_lists_kernel:
            assert grid == (batch,)
            continue
        block = kwargs["BLOCK_N"] if kernel is impl._masked_attn_bwd_kernel else kwargs["BLOCK_M"]
        num_tiles = triton.cdiv(seq_len, block)
        assert grid == (num_tiles * batch * heads,), kernel.__name__
        tile, group = decode_program_tiles(grid[0], num_tiles)
        pairs = group.long() * num_tiles + tile.long()
        assert torch.equal(pairs, torch.arange(grid[0], dtype=torch.long, device=DEVICE)), kernel.__name__
        assert int(group.max()) == batch * heads - 1 and int(tile.max()) == num_tiles - 1


def test_a_grid_past_cudas_limit_is_a_clear_error():
    with pytest.raises(
        ValueError, match=r"q: 4 tiles x 600000000 \(image or sequence, head\) pairs need 2400000000 programs, over"
    ):
        impl.flat_grid(4, 600_000_000)


# ---- Registration, backends, configs ----------------------------------------------------------------------------


@pytest.mark.skipif(not OPS_AVAILABLE, reason="torch.library.triton_op is not available")
def test_registered_ops_match_the_launchers(monkeypatch):
    """CUDA runs the autograd Function on the triton_ops; run it on them eagerly here (interpreter on CPU)."""
    q, k, v, _ = _qkv(1, 2, 27, 16, torch.float32)
    keep = _random_keep(1, 27)
    grad_out = torch.randn(q.shape, device=q.device)
    want = _forward_backward(_kernel, q, k, v, keep, grad_out, gate=keep.float())
    monkeypatch.setattr(impl, "uses_registered_ops", lambda q: True)
    got = _forward_backward(_kernel, q, k, v, keep, grad_out, gate=keep.float())
    for a, b in zip([got[0], *got[1]], [want[0], *want[1]]):
        assert torch.equal(a, b)


def test_torch_backend_matches_reference_in_half_precision():
    q, k, v, _ = _qkv(1, 2, 20, 16, torch.float16)
    keep = _random_keep(1, 20)
    got = masked_attention(q, k, v, keep, backend="torch")
    assert got.dtype == torch.float16
    torch.testing.assert_close(got.double(), _ref64(q, k, v, keep), atol=2e-3, rtol=2e-3)


def test_configs_are_overridable(monkeypatch):
    calls = []

    def tiny_config(seq_len, head_dim, dtype, device):
        calls.append(seq_len)
        return {"BLOCK_M": 16, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1}

    monkeypatch.setattr(impl, "get_fwd_config", tiny_config)
    q, k, v, _ = _qkv(1, 1, 40, 16, torch.float32)
    keep = _random_keep(1, 40)
    torch.testing.assert_close(
        _kernel(q, k, v, keep), reference.masked_attention_ref(q, k, v, keep), atol=1e-5, rtol=1e-5
    )
    assert calls == [40]


# ---- Bad input ---------------------------------------------------------------------------------------------------


def _good():
    q = torch.randn(2, 2, 8, 16)
    return q, q.clone(), q.clone(), torch.ones(2, 8, dtype=torch.bool)


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        (lambda a: {**a, "q": a["q"][0]}, ValueError, r"q: expected a 4-d tensor"),
        (lambda a: {**a, "k": a["k"][:, :, :4]}, ValueError, r"k, v: expected the shape of q"),
        (lambda a: {**a, "v": a["v"].half()}, TypeError, r"v: expected dtype torch.float32"),
        (lambda a: {**a, "q": a["q"].long(), "k": a["k"].long(), "v": a["v"].long()}, TypeError, r"q: expected dtype"),
        (lambda a: {**a, "keep": a["keep"].float()}, TypeError, r"keep: expected dtype"),
        (lambda a: {**a, "keep": a["keep"][:, :5]}, ValueError, r"keep: expected shape \(2, 8\)"),
        (lambda a: {**a, "gate": torch.ones(2, 8, dtype=torch.int32)}, TypeError, r"gate: expected a floating"),
        (lambda a: {**a, "gate": torch.ones(2, 5)}, ValueError, r"gate: expected shape"),
        (lambda a: {k: torch.randn(2, 2, 8, 136) for k in "qkv"} | {"keep": a["keep"]}, ValueError, r"head dim"),
        (lambda a: {k: torch.randn(2, 2, 8, 8) for k in "qkv"} | {"keep": a["keep"]}, ValueError, r"head dim"),
        (lambda a: {**a, "scale": -0.25}, ValueError, r"scale: expected a positive finite float, got -0.25"),
        (lambda a: {**a, "scale": float("inf")}, ValueError, r"scale: expected a positive finite float, got inf"),
    ],
)
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_bad_input_raises_a_clear_error(change, error, match, backend):
    q, k, v, keep = _good()
    args = change({"q": q, "k": k, "v": v, "keep": keep})
    with pytest.raises(error, match=match):
        masked_attention(
            args["q"],
            args["k"],
            args["v"],
            args["keep"],
            gate=args.get("gate"),
            scale=args.get("scale"),
            backend=backend,
        )


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU for a second device")
def test_devices_must_match():
    q, k, v, keep = _good()
    with pytest.raises(ValueError, match="device"):
        masked_attention(q.cuda(), k, v, keep.cuda())
    with pytest.raises(ValueError, match="keep: expected device"):
        masked_attention(q.cuda(), k.cuda(), v.cuda(), keep)


def test_devices_must_match_meta():
    q, k, v, keep = _good()
    with pytest.raises(ValueError, match="k: expected device meta like q"):
        masked_attention(q.to("meta"), k, v, keep)
    with pytest.raises(ValueError, match="keep: expected device meta"):
        masked_attention(q.to("meta"), k.to("meta"), v.to("meta"), keep)


@pytest.mark.skipif(HAS_CUDA, reason="the interpreter runs only without a GPU")
def test_bf16_under_the_interpreter_raises_a_clear_error():
    q, k, v, keep = _good()
    with pytest.raises(TypeError, match="bf16"):
        masked_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), keep, backend="triton")


def test_compaction_order_rejects_non_bool_keep():
    with pytest.raises(TypeError, match="keep"):
        compaction_order(torch.ones(2, 3))


# ---- GPU: real ViT sizes -----------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("skip", [True, False])
@pytest.mark.parametrize("head_dim", [64, 80, 128])
@pytest.mark.parametrize("seq_len", [197, 261, 577, 1374])
def test_gpu_bf16_real_sizes(seq_len, head_dim, skip):
    q, k, v, _ = _qkv(2, 3, seq_len, head_dim, torch.bfloat16)
    _check(q, k, v, _random_keep(2, seq_len, frac=0.4), skip=skip)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("seq_len", [1, 197, 577, 4096])
def test_gpu_fp16_fp32_sizes(seq_len, dtype):
    q, k, v, _ = _qkv(2, 2, seq_len, 64, dtype, layout="timm")
    _check(q, k, v, _random_keep(2, seq_len), skip=True, atol=2e-5)


@pytest.mark.gpu
def test_gpu_dropped_keys_have_exactly_zero_influence_bf16():
    q, k, v, _ = _qkv(2, 4, 577, 64, torch.bfloat16)
    keep = _random_keep(2, 577, frac=0.3)
    dropped = ~keep[:, None, :, None]
    grad_out = torch.randn(q.shape, device=q.device)
    clean = _forward_backward(_kernel, q, k, v, keep, grad_out, gate=keep.float())
    dirty = _forward_backward(
        _kernel,
        q,
        k.detach().masked_fill(dropped, float("nan")),
        v.detach().masked_fill(dropped, float("-inf")),
        keep,
        grad_out,
        gate=keep.float(),
    )
    for a, b in zip([clean[0], *clean[1][:3]], [dirty[0], *dirty[1][:3]]):
        assert torch.equal(a, b)
    assert torch.equal(clean[1][3][keep], dirty[1][3][keep])


@pytest.mark.gpu
def test_gpu_forward_and_backward_do_not_synchronise():
    q, k, v, _ = _qkv(2, 3, 197, 64, torch.bfloat16)
    keep = _random_keep(2, 197)
    gate = keep.float().requires_grad_()
    warm_up = _kernel(q, k, v, keep, gate=gate)  # compile the kernels first: only steady-state calls are checked
    torch.autograd.backward(warm_up, torch.ones_like(warm_up))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = _kernel(q, k, v, keep, gate=gate)
        torch.autograd.backward(out, torch.ones_like(out))
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
def test_gpu_torch_compile_full_graph():
    q, k, v, _ = _qkv(2, 3, 197, 64, torch.bfloat16)
    keep = _random_keep(2, 197)
    gate = keep.float().requires_grad_()

    def f(q, k, v, keep, gate):
        return masked_attention(q, k, v, keep, gate=gate, backend="triton").float().square().sum()

    eager = torch.autograd.grad(f(q, k, v, keep, gate), (q, k, v, gate))
    compiled = torch.autograd.grad(torch.compile(f, fullgraph=True)(q, k, v, keep, gate), (q, k, v, gate))
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b)
