"""Small helpers shared by the kernel families: input validation with clear messages, and output allocation."""

from __future__ import annotations

import math
import os

import torch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 128

# Debug switch: fill every buffer a kernel is about to write with NaN, so that elements it forgets to write show up
# in tests. The test suite turns it on for every test; it costs one fill per buffer.
_poison = os.environ.get("FAITHFUL_VIT_POISON", "0") == "1"


def set_poison(enabled: bool) -> None:
    """Make :func:`empty` return NaN-filled buffers (a testing aid; off by default)."""
    global _poison
    _poison = bool(enabled)


def empty(*shape: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.empty``, or a NaN-filled tensor (integers: -1) when poisoning is on."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if _poison:
        out.fill_(float("nan") if out.is_floating_point() else -1)
    return out


def empty_like_strided(x: torch.Tensor, shape: tuple[int, ...], dim_order: tuple[int, ...]) -> torch.Tensor:
    """Allocate ``shape`` whose memory is laid out in ``dim_order`` (outermost first), poisoned when poisoning is on.

    Example: ``dim_order=(0, 2, 1, 3)`` for a ``(B, H, N, D)`` output stored as ``(B, N, H, D)``, so that timm's
    ``out.transpose(1, 2).reshape(B, N, C)`` is free.
    """
    storage = empty(*(shape[d] for d in dim_order), dtype=x.dtype, device=x.device)
    inverse = [dim_order.index(d) for d in range(len(shape))]
    return storage.permute(*inverse)


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for non-negative ints (also symbolic ones); ``triton.cdiv`` is a JIT function whose host call
    costs several times more."""
    return (a + b - 1) // b


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= ``n`` (a plain int >= 1): ``triton.next_power_of_2`` is a constexpr function whose
    host call costs several times more."""
    return 1 << (n - 1).bit_length()


def fmt_shape(x: torch.Tensor) -> str:
    return f"shape {tuple(x.shape)}, dtype {x.dtype}, device {x.device}"


def check_tensor(
    name: str, x: object, *, ndim: int | None = None, dtypes: tuple[torch.dtype, ...] | None = None, ndim_doc: str = ""
) -> torch.Tensor:
    """Raise a TypeError/ValueError naming ``name``, the expectation and what was given."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if ndim is not None and x.ndim != ndim:
        raise ValueError(f"{name}: expected a {ndim}-d tensor {ndim_doc}, got {fmt_shape(x)}")
    if dtypes is not None and x.dtype not in dtypes:
        raise TypeError(f"{name}: expected dtype in {[str(d) for d in dtypes]}, got {x.dtype}")
    return x


def check_same(names: tuple[str, ...], tensors: tuple[torch.Tensor, ...]) -> None:
    """All tensors share dtype and device (and shape when given as the same role)."""
    first_name, first = names[0], tensors[0]
    for name, t in zip(names[1:], tensors[1:]):
        if t.device != first.device:
            raise ValueError(f"{name}: expected device {first.device} like {first_name}, got {t.device}")
        if t.dtype != first.dtype:
            raise TypeError(f"{name}: expected dtype {first.dtype} like {first_name}, got {t.dtype}")


def check_head_dim(name: str, head_dim: int) -> None:
    if not MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"{name}: head dim must be in [{MIN_HEAD_DIM}, {MAX_HEAD_DIM}], got {head_dim}")


def softmax_scale(scale: float | None, head_dim: int) -> float:
    """The softmax scale, ``head_dim ** -0.5`` by default; the kernels fold it into one fma per score after the row
    max, which needs it positive and finite."""
    if scale is None:
        return head_dim**-0.5
    value = float(scale)
    # Comparisons, not math.isfinite: torch.compile traces them on a symbolic float (a module's scale) without a
    # graph break. NaN fails both.
    if not 0 < value < math.inf:
        raise ValueError(f"scale: expected a positive finite float, got {scale!r}")
    return value


def unit_last_stride(x: torch.Tensor) -> torch.Tensor:
    """The kernels take any strides but need contiguous rows; copy only when the last stride is not 1."""
    return x if x.stride(-1) == 1 else x.contiguous()
