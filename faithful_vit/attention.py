"""A drop-in replacement for timm's ``Attention`` that sends key masks and packed tokens to our kernels.

:class:`MaskedAttention` has the constructor arguments, attribute names and forward signature of
``timm.layers.Attention`` (timm 1.0.31), so a timm state dict loads unchanged and a timm ``Block`` can call it. What
changes is where the attention itself runs:

* ``attn_mask=None`` (and ``is_causal=False``): dense ``F.scaled_dot_product_attention``, as timm's fused path;
* a key mask, ``(B, N)`` or ``(B, 1, 1, N)`` bool (True = the key may be attended):
  :func:`faithful_vit.kernels.masked_attention`, equal to SDPA with that mask, but costing only the kept keys;
* any other mask (float bias, per-query masks, broadcast batch) or ``is_causal=True``: SDPA, unchanged;
* :class:`~faithful_vit.kernels.PackedTokens` input: :func:`faithful_vit.kernels.varlen_attention` on the rows, and the
  output is ``PackedTokens`` with the same layout.

A ``(B, N)`` bool mask is always read as a key mask (one row per image), even when ``B == N``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import Attention
from torch import nn

from .kernels import BACKENDS, PackedTokens, masked_attention, varlen_attention

__all__ = ["MaskedAttention"]


def _is_key_mask(attn_mask: torch.Tensor, batch: int, seq_len: int) -> bool:
    if attn_mask.dtype != torch.bool:
        return False
    return attn_mask.shape == (batch, seq_len) or attn_mask.shape == (batch, 1, 1, seq_len)


class MaskedAttention(nn.Module):
    """Multi-head self-attention with timm's ``Attention`` interface, running key-masked and packed inputs sparsely.

    Args:
        dim: input channels.
        num_heads: attention heads.
        attn_head_dim: channels per head; default ``dim // num_heads``.
        dim_out: output channels; default ``dim``.
        qkv_bias: bias in the qkv projection (and in the output gate when ``gated``).
        qk_norm: normalise queries and keys per head with ``norm_layer``.
        scale_norm: normalise the attention output with ``norm_layer`` before the projection.
        proj_bias: bias in the output projection.
        gated: multiply the attention output by a sigmoid gate computed from the input (timm's ``gated``).
        attn_drop: dropout on the attention weights; only the dense SDPA path has it, so a masked or packed call in
            training mode with ``attn_drop > 0`` raises.
        proj_drop: dropout after the output projection.
        norm_layer: normalisation layer class for ``qk_norm`` / ``scale_norm``.
        device, dtype: factory arguments for the parameters.
        backend: kernel backend of this module, ``"auto"``, ``"triton"`` or ``"torch"`` (see
            :mod:`faithful_vit.kernels._backend`); like timm's ``fused_attn`` it can be changed on the instance.
        **kwargs: accepted and ignored, for block constructors that pass extra options (timm passes ``depth`` to
            some attention layers).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        attn_head_dim: int | None = None,
        dim_out: int | None = None,
        qkv_bias: bool = False,
        qk_norm: bool = False,
        scale_norm: bool = False,
        proj_bias: bool = True,
        gated: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        norm_layer: type[nn.Module] | None = None,
        device=None,
        dtype=None,
        *,
        backend: str = "auto",
        **kwargs,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        dim_out = dim_out or dim
        head_dim = attn_head_dim
        if head_dim is None:
            if dim % num_heads:
                raise ValueError(f"dim: expected a multiple of num_heads={num_heads}, got {dim}")
            head_dim = dim // num_heads
        if (qk_norm or scale_norm) and norm_layer is None:
            raise ValueError(
                "norm_layer: expected a normalisation layer class when qk_norm or scale_norm is True, got None"
            )
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.attn_dim = num_heads * head_dim
        self.scale = head_dim**-0.5
        self.backend = backend

        self.qkv = nn.Linear(dim, self.attn_dim * 3, bias=qkv_bias, **factory)
        self.q_norm = norm_layer(head_dim, **factory) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(head_dim, **factory) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.norm = norm_layer(self.attn_dim, **factory) if scale_norm else nn.Identity()
        self.gate = nn.Linear(dim, self.attn_dim, bias=qkv_bias, **factory) if gated else None
        self.proj = nn.Linear(self.attn_dim, dim_out, bias=proj_bias, **factory)
        self.proj_drop = nn.Dropout(proj_drop)

    @property
    def backend(self) -> str:
        """Kernel backend for masked and packed calls: ``"auto"``, ``"triton"`` or ``"torch"``."""
        return self._backend

    @backend.setter
    def backend(self, name: str) -> None:
        if name not in BACKENDS:
            raise ValueError(f"backend: expected one of {BACKENDS}, got {name!r}")
        self._backend = name

    @classmethod
    def from_timm(cls, attn: nn.Module, *, backend: str = "auto") -> MaskedAttention:
        """Wrap a ``timm.layers.Attention``, sharing its submodules (so its parameters, and any optimizer state on
        them, stay the same objects).

        Args:
            attn: a timm ``Attention`` (exactly that class: subclasses may change the math and are refused).
            backend: kernel backend of the new module.

        Returns:
            A :class:`MaskedAttention` whose state dict equals ``attn``'s.
        """
        if type(attn) is not Attention:
            raise TypeError(
                f"attn: expected timm.layers.Attention, got {type(attn).__module__}.{type(attn).__qualname__}"
            )
        # Built on the meta device (no memory), then given attn's own submodules in timm's registration order.
        module = cls(
            attn.qkv.in_features,
            num_heads=attn.num_heads,
            attn_head_dim=attn.head_dim,
            dim_out=attn.proj.out_features,
            gated=getattr(attn, "gate", None) is not None,  # older timm releases have no output gate
            device="meta",
            backend=backend,
        )
        module.scale = attn.scale
        for name in ("qkv", "q_norm", "k_norm", "attn_drop", "norm", "gate", "proj", "proj_drop"):
            setattr(module, name, getattr(attn, name, None))
        module.train(attn.training)
        return module

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, head_dim={self.head_dim}, backend={self.backend!r}"

    def forward(
        self,
        x: torch.Tensor | PackedTokens,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
        *,
        key_gate: torch.Tensor | None = None,
        skip_dropped_queries: bool = False,
    ) -> torch.Tensor | PackedTokens:
        """Self-attention over ``x``.

        Args:
            x: ``(B, N, C)`` tokens, or :class:`~faithful_vit.kernels.PackedTokens` with ``(T, C)`` rows.
            attn_mask: ``None``; a key mask ``(B, N)`` or ``(B, 1, 1, N)`` bool (True = may be attended) for the
                masked kernel; or any mask SDPA accepts, passed to SDPA unchanged. Must be None for packed input.
            is_causal: as in SDPA (dense path only).
            key_gate: optional ``(B, N)`` float equal in value to the key mask (a straight-through estimate); the
                output is unchanged and the backward gives d(loss)/d(key_gate). Key-mask calls only.
            skip_dropped_queries: with a key mask, rows of dropped queries are zero instead of computed as SDPA
                computes them (they then cost nothing); False (default) gives timm's result on every row.

        Returns:
            ``(B, N, dim_out)``, or ``PackedTokens`` with ``(T, dim_out)`` rows for packed input.
        """
        if isinstance(x, PackedTokens):
            if attn_mask is not None or is_causal or key_gate is not None:
                raise ValueError(
                    "attn_mask, is_causal, key_gate: packed input carries its own sequence layout; "
                    "expected None/False/None"
                )
            self._check_no_attn_dropout("packed input")
            rows = x.data
            qkv = self.qkv(rows).reshape(rows.shape[0], 3, self.num_heads, self.head_dim)
            q, k, v = qkv.unbind(1)  # (T, H, D) each
            out = varlen_attention(
                self.q_norm(q),
                self.k_norm(k),
                v,
                x.cu_seqlens,
                x.max_seqlen,
                scale=self.scale,
                check_cu_seqlens=False,
                backend=self.backend,
            )
            return x.with_data(self._project(out.reshape(rows.shape[0], self.attn_dim), rows))

        batch, seq_len, _ = x.shape
        qkv = self.qkv(x).reshape(batch, seq_len, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, H, N, D) each
        q, k = self.q_norm(q), self.k_norm(k)
        if attn_mask is not None and not is_causal and _is_key_mask(attn_mask, batch, seq_len):
            self._check_no_attn_dropout("a key mask")
            out = masked_attention(
                q,
                k,
                v,
                attn_mask.reshape(batch, seq_len),
                scale=self.scale,
                gate=key_gate,
                skip_dropped_queries=skip_dropped_queries,
                backend=self.backend,
            )
        else:
            if key_gate is not None:
                raise ValueError("key_gate: expected None unless attn_mask is a (B, N) or (B, 1, 1, N) bool key mask")
            out = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=attn_mask,
                dropout_p=self.attn_drop.p if self.training else 0.0,
                is_causal=is_causal,
                scale=self.scale,
            )
        return self._project(out.transpose(1, 2).reshape(batch, seq_len, self.attn_dim), x)

    def _project(self, heads: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """timm's tail after attention: scale norm, optional sigmoid gate from the input, projection, dropout."""
        heads = self.norm(heads)
        if self.gate is not None:
            heads = heads * self.gate(x).sigmoid()
        return self.proj_drop(self.proj(heads))

    def _check_no_attn_dropout(self, what: str) -> None:
        if self.training and self.attn_drop.p > 0:
            raise NotImplementedError(
                f"attn_drop: the sparse kernels have no attention dropout, so {what} cannot run in training mode with "
                f"attn_drop.p={self.attn_drop.p}; set attn_drop.p = 0 or call eval()"
            )
