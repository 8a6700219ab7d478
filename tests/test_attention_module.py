"""MaskedAttention against timm's Attention: interface, state dict, and every mask route (forward and gradients)."""

import inspect

import pytest
import torch
from timm.layers import Attention, LayerNorm

import faithful_vit.attention as attention_module
from faithful_vit import MaskedAttention
from faithful_vit.kernels import pack_tokens, reference

DIM, HEADS, BATCH, SEQ = 64, 2, 2, 11
TOL = {"atol": 1e-4, "rtol": 1e-4}  # fp32 (the kernels take fp16/bf16/fp32), different summation orders
VARIANTS = {
    "plain": {},
    "qkv_bias": {"qkv_bias": True},
    "qk_norm": {"qk_norm": True, "norm_layer": LayerNorm},
    "scale_norm_gated": {"scale_norm": True, "gated": True, "norm_layer": LayerNorm},
}


def _pair(variant: str = "plain", backend: str = "torch"):
    """A timm Attention with random weights (norms included) and a MaskedAttention loaded from its state dict."""
    timm_attn = Attention(DIM, num_heads=HEADS, **VARIANTS[variant])
    with torch.no_grad():
        for param in timm_attn.parameters():
            param.normal_(0, 0.15)
    ours = MaskedAttention(DIM, num_heads=HEADS, backend=backend, **VARIANTS[variant])
    ours.load_state_dict(timm_attn.state_dict())
    return timm_attn, ours


def _keep(batch: int = BATCH, seq: int = SEQ) -> torch.Tensor:
    keep = torch.rand(batch, seq) < 0.5
    keep[:, 0] = True  # every image keeps a key, as prefix tokens guarantee in a ViT
    return keep


def test_constructor_mirrors_timm():
    timm_params = inspect.signature(Attention.__init__).parameters
    ours = inspect.signature(MaskedAttention.__init__).parameters
    for name, param in timm_params.items():
        assert name in ours, name
        assert ours[name].default == param.default, name
        assert ours[name].kind == param.kind, name
    assert list(ours)[: len(timm_params)] == list(timm_params)  # same positional order
    assert ours["backend"].kind is inspect.Parameter.KEYWORD_ONLY
    timm_forward = list(inspect.signature(Attention.forward).parameters.items())
    our_forward = list(inspect.signature(MaskedAttention.forward).parameters.items())
    assert [(n, p.default) for n, p in our_forward[: len(timm_forward)]] == [(n, p.default) for n, p in timm_forward]


@pytest.mark.parametrize("variant", VARIANTS)
def test_state_dict_loads_unchanged(variant):
    timm_attn = Attention(DIM, num_heads=HEADS, **VARIANTS[variant])
    ours = MaskedAttention(DIM, num_heads=HEADS, **VARIANTS[variant])
    assert list(ours.state_dict()) == list(timm_attn.state_dict())
    ours.load_state_dict(timm_attn.state_dict(), strict=True)
    wrapped = MaskedAttention.from_timm(timm_attn)
    assert all(a is b for a, b in zip(wrapped.parameters(), timm_attn.parameters(), strict=True))
    assert list(wrapped.state_dict()) == list(timm_attn.state_dict())


def test_from_timm_refuses_other_attention():
    class Subclass(Attention):
        pass

    with pytest.raises(TypeError, match="timm.layers.Attention"):
        MaskedAttention.from_timm(Subclass(DIM, num_heads=HEADS))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("mask_shape", ["b_n", "b_1_1_n"])
def test_key_mask_matches_timm_forward_and_backward(variant, mask_shape):
    timm_attn, ours = _pair(variant)
    x = torch.randn(BATCH, SEQ, DIM, requires_grad=True)
    keep = _keep()
    mask = keep if mask_shape == "b_n" else keep[:, None, None, :]
    expected = timm_attn(x, attn_mask=keep[:, None, None, :])
    grad_out = torch.randn_like(expected)
    expected_grads = torch.autograd.grad(expected, [x, *timm_attn.parameters()], grad_out)
    got = ours(x, attn_mask=mask)
    got_grads = torch.autograd.grad(got, [x, *ours.parameters()], grad_out)
    torch.testing.assert_close(got, expected, **TOL)
    for got_grad, expected_grad in zip(got_grads, expected_grads, strict=True):
        torch.testing.assert_close(got_grad, expected_grad, **TOL)


def test_skip_dropped_queries_keeps_kept_rows():
    timm_attn, ours = _pair()
    x = torch.randn(BATCH, SEQ, DIM)
    keep = _keep()
    expected = timm_attn(x, attn_mask=keep[:, None, None, :])
    got = ours(x, attn_mask=keep, skip_dropped_queries=True)
    torch.testing.assert_close(got[keep], expected[keep], **TOL)


@pytest.mark.parametrize("case", ["none", "float_bias", "per_query_bool", "broadcast_batch", "causal"])
def test_other_masks_go_to_sdpa_unchanged(case, monkeypatch):
    timm_attn, ours = _pair("qk_norm")
    x = torch.randn(BATCH, SEQ, DIM)
    kwargs = {
        "none": {},
        "float_bias": {"attn_mask": torch.randn(BATCH, 1, SEQ, SEQ)},
        "per_query_bool": {"attn_mask": (torch.rand(BATCH, 1, SEQ, SEQ) < 0.7) | torch.eye(SEQ, dtype=torch.bool)},
        "broadcast_batch": {"attn_mask": _keep(1)[:, None, None, :]},
        "causal": {"is_causal": True},
    }[case]

    def no_masked_kernel(*args, **kw):
        raise AssertionError("masked_attention must not run for this mask")

    monkeypatch.setattr(attention_module, "masked_attention", no_masked_kernel)
    torch.testing.assert_close(ours(x, **kwargs), timm_attn(x, **kwargs), **TOL)


def test_key_mask_routes_to_masked_attention_with_module_backend(monkeypatch):
    _, ours = _pair(backend="torch")
    calls = []

    def spy(q, k, v, keep, **kwargs):
        calls.append(kwargs["backend"])
        return reference.masked_attention_ref(
            q, k, v, keep, scale=kwargs["scale"], upcast=False, skip_dropped_queries=kwargs["skip_dropped_queries"]
        )

    monkeypatch.setattr(attention_module, "masked_attention", spy)
    x = torch.randn(BATCH, SEQ, DIM)
    ours(x, attn_mask=_keep())
    ours.backend = "triton"  # the per-module switch, like timm's fused_attn
    ours(x, attn_mask=_keep()[:, None, None, :])
    assert calls == ["torch", "triton"]
    assert "backend='triton'" in repr(ours)


def test_backend_rejects_unknown_name():
    with pytest.raises(ValueError, match="backend"):
        MaskedAttention(DIM, num_heads=HEADS, backend="cuda")
    _, ours = _pair()
    with pytest.raises(ValueError, match="backend"):
        ours.backend = "fast"


@pytest.mark.parametrize("variant", VARIANTS)
def test_packed_input_matches_timm_per_image(variant):
    timm_attn, ours = _pair(variant)
    x = torch.randn(BATCH, SEQ, DIM, requires_grad=True)
    keep = _keep()
    packed = pack_tokens(x, keep, max_seqlen=SEQ)
    got = ours(packed)
    assert got.cu_seqlens is packed.cu_seqlens
    grad_rows = torch.randn_like(got.data)
    got_grads = torch.autograd.grad(got.data, [x, *ours.parameters()], grad_rows)
    # timm on each image's kept tokens alone is the definition of the packed result.
    expected = torch.cat([timm_attn(x[b, keep[b]][None])[0] for b in range(BATCH)])
    expected_grads = torch.autograd.grad(expected, [x, *timm_attn.parameters()], grad_rows)
    torch.testing.assert_close(got.data, expected, **TOL)
    for got_grad, expected_grad in zip(got_grads, expected_grads, strict=True):
        torch.testing.assert_close(got_grad, expected_grad, **TOL)


def test_packed_input_refuses_masks():
    _, ours = _pair()
    packed = pack_tokens(torch.randn(BATCH, SEQ, DIM), _keep())
    with pytest.raises(ValueError, match="packed"):
        ours(packed, attn_mask=_keep())


def test_key_gate_passes_through_to_the_kernel():
    _, ours = _pair()
    x = torch.randn(BATCH, SEQ, DIM)
    keep = _keep()
    gate = keep.float().requires_grad_()
    out = ours(x, attn_mask=keep, key_gate=gate, skip_dropped_queries=True)
    torch.testing.assert_close(out, ours(x, attn_mask=keep, skip_dropped_queries=True))
    (grad_gate,) = torch.autograd.grad(out.square().sum(), gate)
    assert grad_gate[~keep].abs().sum() > 0  # dropped keys get a gradient: the straight-through signal
    with pytest.raises(ValueError, match="key_gate"):
        ours(x, key_gate=gate)


def test_attention_dropout_refused_on_sparse_paths_in_training():
    ours = MaskedAttention(DIM, num_heads=HEADS, attn_drop=0.1, backend="torch")
    x = torch.randn(BATCH, SEQ, DIM)
    with pytest.raises(NotImplementedError, match="attn_drop"):
        ours(x, attn_mask=_keep())
    ours(x)  # dense SDPA has dropout
    ours.eval()
    ours(x, attn_mask=_keep())


def test_triton_backend_matches_torch():
    _, ours = _pair()
    x = torch.randn(1, 9, DIM)
    keep = _keep(1, 9)
    expected = ours(x, attn_mask=keep)
    ours.backend = "triton"
    got = ours(x, attn_mask=keep)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
