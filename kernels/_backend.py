"""Backend selection for every kernel family: the one place that looks at devices and environment variables.

Backends:
    ``"triton"``  our Triton kernels: compiled on CUDA tensors, run by the Triton interpreter on CPU tensors when
                  ``TRITON_INTERPRET=1`` was set before Triton was imported (that is how CI tests them).
    ``"torch"``   the PyTorch reference in :mod:`faithful_vit.kernels.reference` (the executable specification).

Order of precedence: the ``backend=`` argument of a call, then the global override (:func:`set_backend` or the
``FAITHFUL_VIT_BACKEND`` environment variable), then the automatic choice. The variable is read once, at the first
call that needs it (and again after ``set_backend(None)``), not on every call: a call's host time matters at ViT
sizes. ``"auto"`` at any level defers to the
next. An explicitly requested backend that cannot run raises; only the automatic choice falls back, with one warning.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable

import torch

__all__ = [
    "BACKENDS",
    "TRITON_AVAILABLE",
    "TRITON_INTERPRET",
    "get_backend",
    "resolve_backend",
    "set_backend",
    "use_backend",
]

BACKENDS = ("auto", "triton", "torch")
ENV_VAR = "FAITHFUL_VIT_BACKEND"

# Triton decides between compiling and interpreting when a kernel is defined, so the flag is read once, at import.
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")
try:
    import triton  # noqa: F401

    TRITON_AVAILABLE = True
except ImportError:  # the reference path must import without Triton (macOS, Windows)
    TRITON_AVAILABLE = False

_global_backend: str | None = None  # set_backend's value, or the environment's once read; None: not read yet
_warned_fallback = False


def _check_name(name: str, what: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{what}: expected one of {BACKENDS}, got {name!r}")
    return name


def set_backend(name: str | None) -> None:
    """Set the process-wide backend (``"auto"``, ``"triton"`` or ``"torch"``); ``None`` restores the default (the
    ``FAITHFUL_VIT_BACKEND`` environment variable, read again at the next call).

    Like timm's ``set_fused_attn``: it overrides the ``FAITHFUL_VIT_BACKEND`` environment variable and is itself
    overridden by a ``backend=`` argument.
    """
    global _global_backend
    _global_backend = None if name is None else _check_name(name, "set_backend(name)")


def get_backend() -> str:
    """The process-wide backend: the value given to :func:`set_backend`, else ``$FAITHFUL_VIT_BACKEND``, else auto."""
    global _global_backend
    if _global_backend is None:
        _global_backend = _check_name(os.environ.get(ENV_VAR, "auto").strip().lower() or "auto", f"${ENV_VAR}")
    return _global_backend


class use_backend:  # noqa: N801 - used like a function: `with use_backend("torch"): ...`
    """Context manager that sets the process-wide backend for a block and restores the previous setting."""

    def __init__(self, name: str | None):
        self.name = name

    def __enter__(self) -> None:
        self.previous = _global_backend
        set_backend(self.name)

    def __exit__(self, *exc) -> None:
        set_backend(self.previous)


def _triton_can_run(device: torch.device) -> tuple[bool, str]:
    if not TRITON_AVAILABLE:
        return False, "Triton is not installed"
    if device.type == "cuda":
        return True, ""
    if device.type == "cpu":
        if TRITON_INTERPRET:
            return True, ""
        return (
            False,
            "the tensors are on the CPU and the Triton interpreter is off (set TRITON_INTERPRET=1 "
            "before importing faithful_vit)",
        )
    return False, f"Triton kernels do not run on {device.type} tensors"


def resolve_backend(requested: str | None, tensors: Iterable[torch.Tensor]) -> str:
    """Return ``"triton"`` or ``"torch"`` for a call on ``tensors`` (their first element sets the device).

    Raises:
        ValueError: ``requested`` is not a backend name.
        RuntimeError: ``"triton"`` was requested (by argument or globally) but cannot run on these tensors.
    """
    global _warned_fallback
    requested = _check_name(requested or "auto", "backend")
    if requested == "auto":
        requested = get_backend()
    device = next(iter(tensors)).device
    if requested == "torch":
        return "torch"
    ok, why = _triton_can_run(device)
    if requested == "triton":
        if not ok:
            raise RuntimeError(f"backend='triton' was requested but cannot run: {why}")
        return "triton"
    if ok:
        return "triton"
    if not _warned_fallback:
        _warned_fallback = True
        warnings.warn(f"faithful_vit.kernels: using the PyTorch reference backend because {why}.", stacklevel=3)
    return "torch"
