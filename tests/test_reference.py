"""The references against plain Python loops in float64: forward and gradients, on tiny inputs."""

import pytest
import torch
import torch.nn.functional as F
from _kernel_helpers import cu_seqlens, forward_backward, fresh_leaves

from faithful_vit.kernels import reference as ref


def loop_masked_attention(q, k, v, keep, gate, scale, skip_dropped_queries):
    """Per (image, head, query) loops; with a gate, the multiplicative form sum_j g_j e^s v_j / sum_j g_j e^s."""
    B, H, N, _ = q.shape
    rows = []
    for b in range(B):
        for h in range(H):
            for i in range(N):
                if skip_dropped_queries and not keep[b, i]:
                    rows.append(torch.zeros_like(q[b, h, i]))
                    continue
                kept = [j for j in range(N) if keep[b, j]]
                if not kept:
                    rows.append(torch.zeros_like(q[b, h, i]))
                    continue
                if gate is None:
                    scores = torch.stack([q[b, h, i] @ k[b, h, j] * scale for j in kept])
                    probs = torch.softmax(scores, 0)
                    rows.append(sum(p * v[b, h, j] for p, j in zip(probs, kept)))
                else:
                    scores = torch.stack([q[b, h, i] @ k[b, h, j] * scale for j in range(N)])
                    weights = gate[b] * torch.exp(scores - scores[kept].max())
                    rows.append(sum(w * v[b, h, j] for j, w in enumerate(weights)) / weights.sum())
    return torch.stack(rows).view(q.shape)


def make_inputs(B, H, N, D, keep_prob, requires_grad=True):
    q, k, v = (torch.randn(B, H, N, D, dtype=torch.float64, requires_grad=requires_grad) for _ in range(3))
    keep = torch.rand(B, N) < keep_prob
    return q, k, v, keep


@pytest.mark.parametrize("skip_dropped_queries", [True, False])
@pytest.mark.parametrize("B,H,N,D,keep_prob", [(2, 2, 7, 4, 0.5), (1, 1, 1, 3, 1.0), (3, 2, 5, 2, 0.3)])
def test_masked_attention_ref_matches_loops(B, H, N, D, keep_prob, skip_dropped_queries):
    q, k, v, keep = make_inputs(B, H, N, D, keep_prob)
    keep[0] = False  # one image with no kept token
    scale = 0.7
    out = ref.masked_attention_ref(q, k, v, keep, scale=scale, skip_dropped_queries=skip_dropped_queries)
    expected = loop_masked_attention(q, k, v, keep, None, scale, skip_dropped_queries)
    torch.testing.assert_close(out, expected)
    assert torch.all(out[0] == 0)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = [torch.zeros_like(t) for t in (q, k, v)]
    if expected.requires_grad:  # the loops build constants only when no row attends to anything
        want = torch.autograd.grad(expected, (q, k, v), grad, allow_unused=True, materialize_grads=True)
    for name, g, w in zip("qkv", got, want):
        assert torch.isfinite(g).all(), name
        torch.testing.assert_close(g, w, msg=f"d{name}")
        assert torch.all(g[0] == 0), f"d{name} of an image with no kept token"


def test_masked_attention_ref_matches_sdpa_on_kept_rows():
    q, k, v, keep = make_inputs(2, 3, 11, 8, 0.6, requires_grad=False)
    keep[:, 0] = True  # SDPA needs at least one key per row to be comparable
    out = ref.masked_attention_ref(q, k, v, keep)
    sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :])
    torch.testing.assert_close(out[keep[:, None, :].expand(-1, 3, -1)], sdpa[keep[:, None, :].expand(-1, 3, -1)])
    full = ref.masked_attention_ref(q, k, v, keep, skip_dropped_queries=False)
    torch.testing.assert_close(full, sdpa)


@pytest.mark.parametrize("skip_dropped_queries", [True, False])
def test_masked_attention_ref_gate_gradient_matches_multiplicative_loops(skip_dropped_queries):
    q, k, v, keep = make_inputs(2, 2, 6, 3, 0.5)
    keep[1] = False
    keep[0, :2] = True
    keep[0, 2:4] = False
    gate = keep.double().requires_grad_(True)
    out = ref.masked_attention_ref(q, k, v, keep, scale=0.5, gate=gate, skip_dropped_queries=skip_dropped_queries)
    expected = loop_masked_attention(q, k, v, keep, gate, 0.5, skip_dropped_queries)
    torch.testing.assert_close(out, expected)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v, gate), grad)
    want = torch.autograd.grad(expected, (q, k, v, gate), grad, allow_unused=True)
    for name, g, w in zip(("q", "k", "v", "gate"), got, want):
        torch.testing.assert_close(g, torch.zeros_like(g) if w is None else w, msg=f"d{name}")
    assert got[3][0, ~keep[0]].abs().sum() > 0, "dropped keys must receive a gate gradient"
    assert torch.all(got[3][1] == 0), "an image with no kept token has no defined gate gradient: zero"


def test_masked_attention_ref_ignores_nan_in_dropped_keys():
    q, k, v, keep = make_inputs(2, 2, 9, 4, 0.5)
    keep[:, 0] = True
    keep[:, 1] = False
    clean = ref.masked_attention_ref(q, k, v, keep)
    k2, v2 = k.detach().clone(), v.detach().clone()
    k2[~keep[:, None, :].expand(-1, 2, -1)] = float("nan")
    v2[~keep[:, None, :].expand(-1, 2, -1)] = float("inf")
    k2.requires_grad_(True)
    v2.requires_grad_(True)
    dirty = ref.masked_attention_ref(q, k2, v2, keep)
    assert torch.equal(clean, dirty)
    grad = torch.randn_like(clean)
    g_clean = torch.autograd.grad(clean, (q, k, v), grad)
    g_dirty = torch.autograd.grad(dirty, (q, k2, v2), grad)
    for name, a, b in zip("qkv", g_clean, g_dirty):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("poisoned", ["q", "k", "v"])
def test_masked_attention_ref_non_finite_kept_tokens_as_sdpa(poisoned, value):
    """The reference's NaN/Inf semantics are SDPA's (math backend, float64, boolean attn_mask): for computed
    queries (all of them without skipping) the output and dq are non-finite exactly where SDPA's are, and so are dk
    and dv at kept keys (SDPA's gradients at dropped keys are not defined by the mask); with skipping, the kept rows
    of the output match."""
    q, k, v, keep = make_inputs(2, 2, 9, 4, 0.6, requires_grad=False)
    keep[:, :2] = True
    tensors = {"q": q, "k": k, "v": v}
    tensors[poisoned][0, 0, 1, 2] = value  # a kept token of image 0, head 0
    grad_out = torch.randn_like(q)
    mask = keep[:, None, None, :]
    sdpa = forward_backward(
        lambda *t: F.scaled_dot_product_attention(*t, attn_mask=mask), fresh_leaves(q, k, v), grad_out
    )
    full = forward_backward(
        lambda *t: ref.masked_attention_ref(*t, keep, skip_dropped_queries=False), fresh_leaves(q, k, v), grad_out
    )
    kept_keys = keep[:, None, :].expand(-1, 2, -1)
    for name, got, want in zip(("out", "dq", "dk", "dv"), full, sdpa):
        if name in ("dk", "dv"):
            got, want = got[kept_keys], want[kept_keys]
        finite = torch.isfinite(want)
        assert torch.equal(torch.isnan(got), torch.isnan(want)), f"{name}: NaN elsewhere than SDPA's"
        assert torch.equal(torch.isfinite(got), finite), f"{name}: non-finite elsewhere than SDPA's"
        torch.testing.assert_close(got[finite], want[finite])
    assert not torch.isfinite(sdpa[0][0, 0]).all(), "the poison must reach SDPA's output"
    skipped = ref.masked_attention_ref(q, k, v, keep)
    kept_rows = keep[:, None, :].expand(-1, 2, -1)
    torch.testing.assert_close(skipped[kept_rows], sdpa[0][kept_rows], equal_nan=True)


def test_masked_attention_ref_isolates_skipped_dropped_queries():
    """NaN in the q and the output gradient of dropped (skipped) queries changes no output or gradient, bit for bit
    (no 0 * NaN through the softmax's backward), gate gradient included."""
    q, k, v, keep = make_inputs(2, 2, 9, 4, 0.5, requires_grad=False)
    keep[:, 0] = True
    keep[:, 1] = False
    gate = keep.double()
    dropped = ~keep[:, None, :, None]
    grad_out = torch.randn_like(q)

    def run(q, grad_out):
        inputs = [t.clone().requires_grad_() for t in (q, k, v, gate)]
        out = ref.masked_attention_ref(*inputs[:3], keep, gate=inputs[3])
        return (out, *torch.autograd.grad(out, inputs, grad_out))

    clean = run(q, grad_out)
    dirty = run(q.masked_fill(dropped, float("nan")), grad_out.masked_fill(dropped, float("nan")))
    for name, a, b in zip(("out", "dq", "dk", "dv", "dgate"), clean, dirty):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("skip_dropped_queries", [True, False])
def test_masked_attention_ref_without_tokens(skip_dropped_queries):
    q, k, v, keep = make_inputs(2, 3, 0, 4, 0.5)
    out = ref.masked_attention_ref(q, k, v, keep, skip_dropped_queries=skip_dropped_queries)
    assert out.shape == (2, 3, 0, 4)
    assert [g.shape for g in torch.autograd.grad(out, (q, k, v), torch.randn_like(out))] == [q.shape] * 3


def loop_varlen_attention(q, k, v, cu_seqlens, scale):
    T, H, _ = q.shape
    rows = [[None] * H for _ in range(T)]
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        for h in range(H):
            for i in range(start, end):
                scores = torch.stack([q[i, h] @ k[j, h] * scale for j in range(start, end)])
                probs = torch.softmax(scores, 0)
                rows[i][h] = sum(p * v[j, h] for p, j in zip(probs, range(start, end)))
    return torch.stack([torch.stack(r) for r in rows])


def test_varlen_attention_ref_matches_loops():
    lengths = [3, 0, 1, 5]
    T = sum(lengths)
    q, k, v = (torch.randn(T, 2, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    cu = cu_seqlens(lengths, "cpu")
    out = ref.varlen_attention_ref(q, k, v, cu, scale=0.3)
    expected = loop_varlen_attention(q, k, v, cu, 0.3)
    torch.testing.assert_close(out, expected)
    grad = torch.randn_like(out)
    for name, g, w in zip(
        "qkv", torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(expected, (q, k, v), grad)
    ):
        torch.testing.assert_close(g, w, msg=f"d{name}")


def test_pack_unpack_ref_match_loops():
    x = torch.randn(3, 5, 4, dtype=torch.float64, requires_grad=True)
    keep = torch.rand(3, 5) < 0.5
    keep[1] = False
    data, cu_seqlens = ref.pack_tokens_ref(x, keep)
    expected_rows = [x[b, n] for b in range(3) for n in range(5) if keep[b, n]]
    expected_cu = [0]
    for b in range(3):
        expected_cu.append(expected_cu[-1] + int(keep[b].sum()))
    assert cu_seqlens.dtype == torch.int32 and cu_seqlens.tolist() == expected_cu
    torch.testing.assert_close(data, torch.stack(expected_rows) if expected_rows else x.new_zeros(0, 4))
    back = ref.unpack_tokens_ref(data, keep, fill=-2.0)
    for b in range(3):
        for n in range(5):
            torch.testing.assert_close(back[b, n], x[b, n] if keep[b, n] else torch.full_like(x[b, n], -2.0))
    (g,) = torch.autograd.grad(back.sum(), x)
    torch.testing.assert_close(g, keep[..., None].double().expand_as(x))
