"""Opt-in autotuning: off by default, picks among candidates on the call's inputs, caches, skips configs that do not
fit, and leaves results equal to the float64 reference (both kernel families, forward and backward)."""

import importlib
import time

import pytest
import torch
from _kernel_helpers import DEVICE, cu_seqlens
from triton.runtime.errors import OutOfResources

from faithful_vit.kernels import (
    autotune_enabled,
    clear_autotune_cache,
    masked_attention,
    reference,
    set_autotune,
    tuned_configs,
    varlen_attention,
)

autotune = importlib.import_module("faithful_vit.kernels._autotune")
DTYPE = torch.float16 if DEVICE == "cuda" else torch.float32


@pytest.fixture
def tuning():
    clear_autotune_cache()
    set_autotune(True)
    yield
    set_autotune(None)
    clear_autotune_cache()


def test_off_by_default_and_env_var(monkeypatch):
    set_autotune(None)
    monkeypatch.delenv(autotune.ENV_VAR, raising=False)
    assert not autotune_enabled()
    runs = []
    default = {"BLOCK_M": 16}
    assert autotune.tuned_config("f", 1, default, [{"BLOCK_M": 32}], runs.append, (torch.ones(1),)) is default
    assert runs == []  # nothing timed
    monkeypatch.setenv(autotune.ENV_VAR, "1")
    assert not autotune_enabled()  # the variable is read once, not per call
    set_autotune(None)  # the default: the variable, read again at the next call
    assert autotune_enabled()
    set_autotune(False)  # the setter overrides the environment
    assert not autotune_enabled()
    set_autotune(None)


def test_picks_the_fastest_caches_and_skips_configs_that_do_not_fit(tuning):
    delays = {16: 0.02, 32: 0.0, 64: None}  # 64 does not fit the device

    def run(cfg):
        if delays[cfg["BLOCK_M"]] is None:
            raise OutOfResources(1, 0, "shared memory")
        time.sleep(delays[cfg["BLOCK_M"]])

    candidates = [{"BLOCK_M": 32}, {"BLOCK_M": 64}]
    best = autotune.tuned_config("f", "k", {"BLOCK_M": 16}, candidates, run, (torch.ones(1),))
    assert best == {"BLOCK_M": 32}
    calls = []
    assert autotune.tuned_config("f", "k", {"BLOCK_M": 16}, candidates, calls.append, (torch.ones(1),)) == best
    assert calls == []  # cached: not timed again
    assert tuned_configs() == {("f", "k", "cpu", "cpu"): best}

    def never_fits(cfg):
        raise OutOfResources(1, 0, "shared memory")

    with pytest.raises(RuntimeError, match="no candidate config fits"):
        autotune.tuned_config("g", "k", {"BLOCK_M": 16}, candidates, never_fits, (torch.ones(1),))


def test_tracing_uses_the_default_without_timing(tuning):
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fake = mode.from_tensor(torch.ones(2))
        calls = []
        assert autotune.tuned_config("f", "k", {"BLOCK_M": 16}, [{"BLOCK_M": 32}], calls.append, (fake,)) == {
            "BLOCK_M": 16
        }
    assert calls == []


def test_tuned_kernels_match_the_reference(tuning):
    batch, heads, seq_len, head_dim = 2, 2, 40, 16
    q, k, v = (
        torch.randn(batch, heads, seq_len, head_dim, device=DEVICE, dtype=DTYPE, requires_grad=True) for _ in range(3)
    )
    keep = torch.rand(batch, seq_len, device=DEVICE) < 0.5
    keep[:, 0] = True
    gate = keep.to(DTYPE).requires_grad_()
    out = masked_attention(q, k, v, keep, gate=gate, backend="triton")
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v, gate), grad_out)
    ref_inputs = [t.detach().double().requires_grad_() for t in (q, k, v, gate)]
    ref = reference.masked_attention_ref(*ref_inputs[:3], keep, gate=ref_inputs[3])
    ref_grads = torch.autograd.grad(ref, ref_inputs, grad_out.double())
    tol = 1e-3 if DTYPE == torch.float32 else 2e-2
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.double(), r, atol=tol, rtol=tol)

    lengths = [0, 1, 23, 9]
    cu = cu_seqlens(lengths)
    total = sum(lengths)
    qv, kv, vv = (torch.randn(total, heads, head_dim, device=DEVICE, dtype=DTYPE, requires_grad=True) for _ in range(3))
    out = varlen_attention(qv, kv, vv, cu, max(lengths), backend="triton")
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (qv, kv, vv), grad_out)
    ref_inputs = [t.detach().double().requires_grad_() for t in (qv, kv, vv)]
    ref = reference.varlen_attention_ref(*ref_inputs, cu)
    ref_grads = torch.autograd.grad(ref, ref_inputs, grad_out.double())
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.double(), r, atol=tol, rtol=tol)

    families = {key[0] for key in tuned_configs()}
    assert families == {"masked_attention_fwd", "masked_attention_bwd", "varlen_attention_fwd", "varlen_attention_bwd"}
