"""Token packing for the token-gather path: ``(B, N, C)`` plus a keep mask to ``(T, C)`` rows with ``cu_seqlens``.

Gathering once and running every block on the packed rows makes projections and MLPs cost in proportion to the kept
tokens, and attention (:func:`faithful_vit.kernels.varlen_attention`) in proportion to the sum of squared per-image
lengths. Packing is a gather and unpacking a scatter, both memory-bound, so they use PyTorch's own indexing ops
(differentiable both ways); only attention needs a kernel.

Host synchronisation: exactly one, which reads the total count ``T`` (it sizes the packed tensor) and the longest
image in the same transfer. The gather itself is sync-free (no ``nonzero``). ``max_seqlen``, when given (``N`` always
works), is checked against the longest image and kept as the bound, so kernels launched with it see a stable value.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ._utils import check_tensor, fmt_shape

__all__ = ["PackedTokens", "pack_tokens"]


@dataclass(frozen=True)
class PackedTokens:
    """The kept tokens of a batch, back to back.

    Attributes:
        data: ``(T, C)`` rows, image by image, in their original order within each image.
        cu_seqlens: ``(B + 1,)`` int32, image b owns rows ``cu_seqlens[b]:cu_seqlens[b + 1]``.
        max_seqlen: an upper bound on the rows of any image (exact unless the caller gave a bound).
        index: ``(T,)`` int64, the flat position ``b * N + n`` each row came from.
        batch_size, seq_len: ``B`` and ``N`` of the unpacked tensor.
    """

    data: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    index: torch.Tensor
    batch_size: int
    seq_len: int

    def with_data(self, data: torch.Tensor) -> PackedTokens:
        """The same layout around new rows (e.g. a block's output); ``data`` must have ``T`` rows."""
        if data.ndim != 2 or data.shape[0] != self.data.shape[0]:
            raise ValueError(f"data: expected ({self.data.shape[0]}, C) rows, got {fmt_shape(data)}")
        return PackedTokens(data, self.cu_seqlens, self.max_seqlen, self.index, self.batch_size, self.seq_len)

    def unpack(self, fill: float = 0.0) -> torch.Tensor:
        """Scatter back to ``(B, N, C)``; dropped positions hold ``fill``. Differentiable with respect to ``data``."""
        channels = self.data.shape[-1]
        out = self.data.new_full((self.batch_size * self.seq_len, channels), fill)
        return out.index_copy(0, self.index, self.data).view(self.batch_size, self.seq_len, channels)

    @property
    def seqlens(self) -> torch.Tensor:
        """``(B,)`` int32 rows per image."""
        return self.cu_seqlens[1:] - self.cu_seqlens[:-1]


def pack_tokens(x: torch.Tensor, keep: torch.Tensor, *, max_seqlen: int | None = None) -> PackedTokens:
    """Gather the kept tokens of every image into one packed tensor.

    Args:
        x: ``(B, N, C)`` tokens, any strides.
        keep: ``(B, N)`` bool, True for tokens to keep.
        max_seqlen: optional upper bound on kept tokens per image (``N`` always works), kept as
            ``PackedTokens.max_seqlen`` so that shapes seen by compiled code do not change with the mask; default: the
            exact longest image.

    Returns:
        :class:`PackedTokens`; gradients flow from ``data`` back to ``x``.

    Raises:
        ValueError: bad shapes, devices, or a ``max_seqlen`` below the longest image.
    """
    check_tensor("x", x, ndim=3, ndim_doc="(B, N, C)")
    check_tensor("keep", keep, ndim=2, dtypes=(torch.bool,), ndim_doc="(B, N)")
    if keep.shape != x.shape[:2]:
        raise ValueError(f"keep: expected shape {tuple(x.shape[:2])} to match x's (B, N), got {fmt_shape(keep)}")
    if keep.device != x.device:
        raise ValueError(f"keep: expected device {x.device} like x, got {keep.device}")
    batch, seq_len, channels = x.shape
    if max_seqlen is not None and (isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or max_seqlen < 0):
        raise ValueError(f"max_seqlen: expected None or a non-negative int, got {max_seqlen!r}")
    counts = keep.sum(dim=1, dtype=torch.int32)
    cu_seqlens = F.pad(torch.cumsum(counts, 0, dtype=torch.int32), (1, 0))
    total, longest = torch.stack((cu_seqlens[-1], counts.max() if batch else cu_seqlens[-1])).tolist()  # the sync
    if max_seqlen is None:
        max_seqlen = longest
    elif longest > max_seqlen:
        raise ValueError(
            f"max_seqlen: expected an upper bound on the kept tokens per image (>= {longest}), got {max_seqlen}"
        )
    # Kept token number r of the flattened batch writes its flat position to slot r; every dropped token writes to
    # the spare slot T, which is cut off. Unlike nonzero() this needs no second look at the device.
    flat_keep = keep.reshape(-1)
    slots = torch.where(flat_keep, torch.cumsum(flat_keep, 0) - 1, total)
    positions = torch.arange(flat_keep.numel(), device=x.device)
    index = positions.new_empty(total + 1).scatter_(0, slots, positions)[:total]
    data = x.reshape(batch * seq_len, channels).index_select(0, index)
    return PackedTokens(data, cu_seqlens, max_seqlen, index, batch, seq_len)
