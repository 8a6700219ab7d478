"""Backend selection: explicit requests raise when they cannot run; only the automatic choice falls back."""

import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from faithful_vit.kernels import _backend, get_backend, set_backend, use_backend


@pytest.fixture(autouse=True)
def _restore():
    yield
    set_backend(None)


def test_explicit_torch_always_runs():
    assert _backend.resolve_backend("torch", [torch.zeros(1)]) == "torch"


def test_unknown_backend_names_argument():
    with pytest.raises(ValueError, match="backend"):
        _backend.resolve_backend("cuda", [torch.zeros(1)])
    with pytest.raises(ValueError, match="set_backend"):
        set_backend("fast")


def test_global_override_and_context_manager(monkeypatch):
    monkeypatch.setenv(_backend.ENV_VAR, "torch")
    set_backend(None)  # the default: the variable, read again at the next call
    assert get_backend() == "torch"
    monkeypatch.setenv(_backend.ENV_VAR, "auto")
    assert get_backend() == "torch"  # read once, not per call
    set_backend("auto")
    assert get_backend() == "auto"
    with use_backend("torch"):
        assert _backend.resolve_backend("auto", [torch.zeros(1)]) == "torch"
    assert get_backend() == "auto"
    monkeypatch.setenv(_backend.ENV_VAR, "bogus")
    set_backend(None)
    with pytest.raises(ValueError, match="FAITHFUL_VIT_BACKEND"):
        get_backend()


def test_explicit_triton_raises_when_it_cannot_run(monkeypatch):
    monkeypatch.setattr(_backend, "TRITON_INTERPRET", False)
    with pytest.raises(RuntimeError, match="interpreter is off"):
        _backend.resolve_backend("triton", [torch.zeros(1)])
    set_backend("triton")
    with pytest.raises(RuntimeError, match="triton"):
        _backend.resolve_backend("auto", [torch.zeros(1)])


def test_auto_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setattr(_backend, "TRITON_INTERPRET", False)
    monkeypatch.setattr(_backend, "_warned_fallback", False)
    with pytest.warns(UserWarning, match="reference"):
        assert _backend.resolve_backend("auto", [torch.zeros(1)]) == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _backend.resolve_backend("auto", [torch.zeros(1)]) == "torch"


def test_auto_picks_triton_on_cpu_under_the_interpreter(monkeypatch):
    monkeypatch.setattr(_backend, "TRITON_INTERPRET", True)
    if not _backend.TRITON_AVAILABLE:
        pytest.skip("triton is not installed")
    assert _backend.resolve_backend("auto", [torch.zeros(1)]) == "triton"


def test_kernels_install_under_faithful_vit_only(tmp_path):
    """`import kernels` must not resolve to this project (that name belongs to another PyPI package)."""
    code = (
        "import importlib.util, faithful_vit.kernels; s = importlib.util.find_spec('kernels'); "
        "print('none' if s is None else s.origin)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    origin = out.stdout.strip()
    repo_root = str(Path(__file__).resolve().parents[1])
    assert origin == "none" or not origin.startswith(repo_root), origin
