"""The ``deterministic`` option of both families: which backward it selects, its order of precedence, its errors, and
that the default backward is bitwise reproducible.

Which kernels a backward launches is read from recorded launches (nothing runs); the accuracy of the atomic-dQ backward
is tested against the float64 reference in each family's own tests.
"""

import sys

import pytest
import torch
from _kernel_helpers import DEVICE, cu_seqlens, forward_backward, fresh_leaves

from faithful_vit.kernels import deterministic_backward, masked_attention, set_deterministic, varlen_attention
from faithful_vit.kernels._launch_record import LaunchRecorder

masked = sys.modules["faithful_vit.kernels.masked_attention"]
varlen = sys.modules["faithful_vit.kernels.varlen_attention"]
ENV_VAR = "FAITHFUL_VIT_DETERMINISTIC"


@pytest.fixture(autouse=True)
def _default_setting(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    set_deterministic(None)
    yield
    set_deterministic(None)


def _call(family, q, **kwargs):
    if family == "masked":
        keep = torch.arange(q.shape[2], device=DEVICE)[None, :] % 3 != 0
        return masked_attention(q, q * 0.5, q * 2.0, keep, backend="triton", **kwargs)
    return varlen_attention(q, q * 0.5, q * 2.0, cu_seqlens([13, 0, 20]), 20, backend="triton", **kwargs)


def _leaf(family):
    shape = (1, 2, 33, 16) if family == "masked" else (33, 2, 16)
    return torch.randn(shape, device=DEVICE, requires_grad=True)


def _backward_launches(family, **kwargs) -> list[tuple[str, bool | None]]:
    """(kernel name, ATOMIC_DQ) of every kernel one backward of ``family`` launches (recorded, not run)."""
    q = _leaf(family)
    with LaunchRecorder() as record:
        out = _call(family, q, **kwargs)
        forward = len(record.launches)
        torch.autograd.grad(out, q, torch.ones_like(out))
    return [(kernel.__name__, kw.get("ATOMIC_DQ")) for kernel, _, _, kw in record.launches[forward:]]


def _uses_atomic_dq(launches, family) -> bool:
    """Whether the recorded backward is the atomic-dQ one; asserts it is the preprocess, then the backward kernel (in
    one launch, or two with ``SPLIT_DQ``)."""
    main = masked._masked_attn_bwd_kernel if family == "masked" else varlen._varlen_attn_bwd_kernel
    names = [name for name, _ in launches]
    assert names[0].endswith("_bwd_preprocess_kernel") and set(names[1:]) == {main.__name__}, launches
    (atomic,) = {flag for _, flag in launches[1:]}
    assert len(launches) == 2 or not atomic, launches  # the atomic-dQ backward has no dQ launch
    return atomic


@pytest.mark.parametrize("family", ["masked", "varlen"])
def test_the_default_backward_is_the_deterministic_one(family):
    assert deterministic_backward() is True
    assert not _uses_atomic_dq(_backward_launches(family), family)


@pytest.mark.parametrize("family", ["masked", "varlen"])
def test_deterministic_false_selects_the_atomic_dq_backward(family):
    assert _uses_atomic_dq(_backward_launches(family, deterministic=False), family)
    assert not _uses_atomic_dq(_backward_launches(family, deterministic=True), family)


@pytest.mark.parametrize("family", ["masked", "varlen"])
def test_without_an_atomic_config_the_deterministic_backward_runs(monkeypatch, family):
    """fp32 on CUDA has no atomic-dQ config (its FMA dots spill with the extra tiles): such calls take the
    deterministic backward."""
    module = masked if family == "masked" else varlen
    assert module.get_atomic_bwd_config(197, 64, torch.float32, torch.device("cuda")) is None
    assert module.get_atomic_bwd_config(197, 64, torch.bfloat16, torch.device("cuda")) is not None
    monkeypatch.setattr(module, "get_atomic_bwd_config", lambda *args: None)
    assert not _uses_atomic_dq(_backward_launches(family, deterministic=False), family)


def test_the_call_overrides_the_setter_which_overrides_the_environment(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "0")
    set_deterministic(None)  # the variable is read again at the next call
    assert _uses_atomic_dq(_backward_launches("varlen"), "varlen")
    assert not _uses_atomic_dq(_backward_launches("varlen", deterministic=True), "varlen")
    set_deterministic(True)
    assert not _uses_atomic_dq(_backward_launches("masked"), "masked")
    set_deterministic(False)
    assert _uses_atomic_dq(_backward_launches("masked"), "masked")
    assert not _uses_atomic_dq(_backward_launches("masked", deterministic=True), "masked")


def test_bad_settings_are_clear_errors(monkeypatch):
    with pytest.raises(TypeError, match=r"deterministic: expected True, False or None, got 'no'"):
        _call("masked", _leaf("masked"), deterministic="no")
    monkeypatch.setenv(ENV_VAR, "maybe")
    set_deterministic(None)
    with pytest.raises(ValueError, match=r"\$FAITHFUL_VIT_DETERMINISTIC: expected 0 or 1 .*got 'maybe'"):
        _call("varlen", _leaf("varlen"))


@pytest.mark.parametrize("family", ["masked", "varlen"])
def test_atomic_dq_refuses_torch_deterministic_algorithms(family):
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        with pytest.raises(RuntimeError, match=r"deterministic=False: .*torch.use_deterministic_algorithms"):
            _call(family, _leaf(family), deterministic=False)
        _call(family, _leaf(family))  # the default backward is deterministic: allowed
    finally:
        torch.use_deterministic_algorithms(previous)


@pytest.mark.parametrize("family", ["masked", "varlen"])
def test_the_default_backward_is_bitwise_reproducible(family):
    q = _leaf(family)
    grad_out = torch.randn(q.shape, device=DEVICE)
    first, second = (forward_backward(lambda q: _call(family, q), fresh_leaves(q), grad_out) for _ in range(2))
    for a, b in zip(first, second):
        assert torch.equal(a, b)
