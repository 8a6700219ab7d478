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

Deterministic backward: the Triton backward is bitwise deterministic by default. ``deterministic=False`` on a call,
:func:`set_deterministic(False) <set_deterministic>` process-wide, or ``FAITHFUL_VIT_DETERMINISTIC=0`` (same order of
precedence, the variable read once) selects the atomic-dQ backward instead: fewer GEMMs and exponentials, but dQ is
summed with fp32 atomics in an order that varies from run to run (dK, dV and the gate gradient stay deterministic).
It refuses to run while ``torch.use_deterministic_algorithms(True)`` is on, as torch's own non-deterministic ops do.
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
    "deterministic_backward",
    "get_backend",
    "resolve_backend",
    "set_backend",
    "set_deterministic",
    "use_backend",
]

BACKENDS = ("auto", "triton", "torch")
ENV_VAR = "FAITHFUL_VIT_BACKEND"
DETERMINISTIC_ENV_VAR = "FAITHFUL_VIT_DETERMINISTIC"

# Triton decides between compiling and interpreting when a kernel is defined, so the flag is read once, at import.
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")
try:
    import triton  # noqa: F401

    TRITON_AVAILABLE = True
except ImportError:  # the reference path must import without Triton (macOS, Windows)
    TRITON_AVAILABLE = False

_global_backend: str | None = None  # set_backend's value, or the environment's once read; None: not read yet
_global_deterministic: bool | None = None  # set_deterministic's value, or the environment's once read
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


def set_deterministic(enabled: bool | None) -> None:
    """Choose the Triton backward process-wide: True (the default) the deterministic one, False the atomic-dQ one
    (see the module docstring); ``None`` restores the default (``$FAITHFUL_VIT_DETERMINISTIC``, else True), read again
    at the next call. A call's ``deterministic=`` argument overrides it."""
    global _global_deterministic
    _global_deterministic = None if enabled is None else bool(enabled)


def deterministic_backward(requested: bool | None = None) -> bool:
    """Whether a call's Triton backward is the deterministic one: ``requested`` (a call's ``deterministic=``) unless
    None, else :func:`set_deterministic`'s value, else ``$FAITHFUL_VIT_DETERMINISTIC``, else True.

    Raises:
        TypeError: ``requested`` is not a bool or None.
        ValueError: the variable is not a boolean word.
        RuntimeError: the atomic-dQ backward was chosen while ``torch.use_deterministic_algorithms(True)`` is on.
    """
    global _global_deterministic
    if requested is not None and not isinstance(requested, bool):
        raise TypeError(f"deterministic: expected True, False or None, got {requested!r}")
    if requested is None:
        if _global_deterministic is None:
            text = os.environ.get(DETERMINISTIC_ENV_VAR, "1").strip().lower() or "1"
            if text not in ("0", "1", "false", "true", "off", "on", "no", "yes"):
                raise ValueError(f"${DETERMINISTIC_ENV_VAR}: expected 0 or 1 (or true/false, on/off), got {text!r}")
            _global_deterministic = text in ("1", "true", "on", "yes")
        requested = _global_deterministic
    if not requested and torch.are_deterministic_algorithms_enabled():
        raise RuntimeError(
            "deterministic=False: the atomic-dQ backward is not deterministic, but torch.use_deterministic_algorithms"
            "(True) is on; pass deterministic=True or turn torch's setting off"
        )
    return requested
