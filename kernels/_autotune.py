"""Opt-in autotuning of the launch configs, shared by the kernel families.

By default every launch uses the config of the family's plain ``get_*_config`` function: no timing, no warm-up cost,
the same tiles on every run. ``set_autotune(True)`` (or ``FAITHFUL_VIT_AUTOTUNE=1``) makes the first call of each
kernel family at a given (sequence-length bucket, head dim, dtype, device, variant) time a short list of candidate
configs on the call's own inputs and keep the fastest for the rest of the process.

We tune on the host instead of using ``@triton.autotune`` because the launchers need the block sizes before the launch:
the masked kernels' live-block lists are built at the block size the kernels will use.

Under ``torch.compile`` tracing (fake tensors) nothing is timed: a tuned config found earlier in eager mode is used if
there is one, else the default, and the graph keeps that config.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Hashable, Sequence

import torch

from ._backend import TRITON_AVAILABLE

if TRITON_AVAILABLE:
    import triton
    from triton.runtime.errors import OutOfResources

__all__ = ["autotune_enabled", "clear_autotune_cache", "set_autotune", "tuned_config", "tuned_configs"]

ENV_VAR = "FAITHFUL_VIT_AUTOTUNE"

_enabled: bool | None = None  # set_autotune's value, or the environment's once read; None: not read yet
_tuned: dict[tuple, dict[str, int]] = {}


def set_autotune(enabled: bool | None) -> None:
    """Turn autotuning on or off process-wide; ``None`` restores the default (``$FAITHFUL_VIT_AUTOTUNE``, else off),
    read again at the next call: the variable is read once, not on every launch."""
    global _enabled
    _enabled = None if enabled is None else bool(enabled)


def autotune_enabled() -> bool:
    """Whether launches time candidate configs (see :func:`set_autotune`)."""
    global _enabled
    if _enabled is None:
        _enabled = os.environ.get(ENV_VAR, "0").strip().lower() in ("1", "true", "on", "yes")
    return _enabled


def tuned_configs() -> dict[tuple, dict[str, int]]:
    """Every config tuned so far: ``(family, key, device type, device) -> config`` (a copy, e.g. to log it)."""
    return dict(_tuned)


def clear_autotune_cache() -> None:
    """Forget every tuned config."""
    _tuned.clear()


def _is_tracing(tensors: Sequence[torch.Tensor]) -> bool:
    return torch.compiler.is_compiling() or torch._guards.detect_fake_mode(tuple(tensors)) is not None


def _time_ms(run: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        return float(triton.testing.do_bench(run, warmup=5, rep=20, return_mode="median"))
    start = time.perf_counter()  # the interpreter: one run exercises the tuning path; the timing means little
    run()
    return (time.perf_counter() - start) * 1e3


def tuned_config(
    family: str,
    key: Hashable,
    default: dict[str, int],
    candidates: Sequence[dict[str, int]],
    run: Callable[[dict[str, int]], object],
    tensors: Sequence[torch.Tensor],
) -> dict[str, int]:
    """The launch config of one call: ``default`` unless autotuning is on.

    Args:
        family: the kernel family and pass, e.g. ``"masked_attention_fwd"``.
        key: what the best config depends on besides the family (shape bucket, head dim, dtype, variant flags).
        default: the config of the family's ``get_*_config``; always among the candidates timed.
        candidates: other configs to time.
        run: launches the kernels of this pass with a given config on the call's inputs (its outputs are discarded).
        tensors: the call's inputs (their device selects the timer; fake tensors mean tracing).

    Raises:
        RuntimeError: no candidate fits the device (each one ran out of shared memory or registers).
    """
    if not autotune_enabled():
        return default
    full_key = (family, key, tensors[0].device.type, str(tensors[0].device))
    if full_key in _tuned:
        return _tuned[full_key]
    if _is_tracing(tensors):
        return default
    timings = []
    for cfg in [default, *(c for c in candidates if c != default)]:
        try:
            timings.append((_time_ms(lambda cfg=cfg: run(cfg), tensors[0].device), cfg))
        except OutOfResources:
            continue
    if not timings:
        raise RuntimeError(f"{family}: no candidate config fits the device for {key}: {list(candidates)}")
    _tuned[full_key] = min(timings, key=lambda t: t[0])[1]
    return _tuned[full_key]
