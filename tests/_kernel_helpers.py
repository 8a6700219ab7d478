"""What the kernel tests share: the device, offsets, forward-and-backward runs, and CUDA grid limits for grid checks
(launches are recorded with :class:`faithful_vit.kernels._launch_record.LaunchRecorder`)."""

from __future__ import annotations

import itertools

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# CUDA's limits on grid axes 0, 1 and 2.
CUDA_GRID_LIMITS = (2**31 - 1, 65535, 65535)


def cu_seqlens(lengths, device=DEVICE) -> torch.Tensor:
    """``(B + 1,)`` int32 offsets of sequences of ``lengths`` packed back to back."""
    return torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=device)


def fresh_leaves(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """Detached copies of ``tensors`` that require grad (None stays None)."""
    return [None if t is None else t.detach().clone().requires_grad_() for t in tensors]


def forward_backward(fn, inputs, grad_out: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``(out, *grads)``: ``out = fn(*inputs)`` (detached) and the gradients of ``inputs`` (tensors that require grad)
    for the upstream gradient ``grad_out``, cast to the dtype of ``out``; zero gradients when ``out`` is empty."""
    out = fn(*inputs)
    if out.numel():
        grads = torch.autograd.grad(out, inputs, grad_out.to(out.dtype))
    else:
        grads = tuple(torch.zeros_like(t) for t in inputs)
    return (out.detach(), *grads)


def zero_stride_empty(*shape: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A stand-in for the launchers' ``empty`` that allocates nothing: for launches that are only recorded."""
    return torch.zeros((), dtype=dtype).expand(shape)


def assert_grid_within_cuda_limits(grid) -> None:
    assert 1 <= len(grid) <= 3 and all(0 <= n <= limit for n, limit in zip(grid, CUDA_GRID_LIMITS)), grid
