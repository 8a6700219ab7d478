"""Drop-in replacements for timm's attention modules that send key masks and packed tokens to our kernels.

:class:`MaskedAttention` has the constructor arguments, attribute names and forward signature of
``timm.layers.Attention`` (timm 1.0.31), so a timm state dict loads unchanged and a timm ``Block`` can call it.
:class:`MaskedRopeAttention` adopts the parameters of the rotary-embedding attentions of timm's ``Eva`` family
(``EvaAttention``, ``timm.layers.AttentionRope``) and has their forward signature. What changes is where the attention
itself runs:

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
from timm.layers import Attention, AttentionRope, apply_rot_embed_cat
from timm.models.eva import EvaAttention
from torch import nn

from .kernels import BACKENDS, PackedTokens, masked_attention, varlen_attention

__all__ = ["MaskedAttention", "MaskedRopeAttention"]


def _check_packed_call(attn_mask, is_causal: bool, key_gate) -> None:
    if attn_mask is not None or is_causal or key_gate is not None:
        raise ValueError(
            "attn_mask, is_causal, key_gate: packed input carries its own sequence layout; expected None/False/None"
        )


def _is_key_mask(attn_mask: torch.Tensor, batch: int, seq_len: int) -> bool:
    if attn_mask.dtype != torch.bool:
        return False
    return attn_mask.shape == (batch, seq_len) or attn_mask.shape == (batch, 1, 1, seq_len)


class _KernelAttention(nn.Module):
    """The routing both drop-ins share: the backend, the attention core on tokens or packed rows, the output tail.

    Subclasses set ``num_heads``, ``head_dim``, ``attn_dim``, ``scale`` and the submodules ``attn_drop``, ``norm``,
    ``gate``, ``proj``, ``proj_drop``.
    """

    @property
    def backend(self) -> str:
        """Kernel backend for masked and packed calls: ``"auto"``, ``"triton"`` or ``"torch"``."""
        return self._backend

    @backend.setter
    def backend(self, name: str) -> None:
        if name not in BACKENDS:
            raise ValueError(f"backend: expected one of {BACKENDS}, got {name!r}")
        self._backend = name

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, head_dim={self.head_dim}, backend={self.backend!r}"

    def _attend_rows(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, packed: PackedTokens) -> torch.Tensor:
        """Varlen attention on ``(T, H, D)`` rows; returns ``(T, attn_dim)``."""
        self._check_no_attn_dropout("packed input")
        cu_seqlens, max_seqlen = packed.cu_seqlens, packed.max_seqlen
        out = varlen_attention(
            q, k, v, cu_seqlens, max_seqlen, scale=self.scale, check_cu_seqlens=False, backend=self.backend
        )
        return out.reshape(q.shape[0], self.attn_dim)

    def _attend_tokens(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        attn_mask: torch.Tensor | None,
        is_causal: bool,
        key_gate: torch.Tensor | None,
        skip_dropped_queries: bool,
    ) -> torch.Tensor:
        """Attention on ``(B, H, N, D)`` tokens (the kernel for a key mask, SDPA otherwise); returns
        ``(B, N, attn_dim)``."""
        batch, _, seq_len, _ = q.shape
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
        return out.transpose(1, 2).reshape(batch, seq_len, self.attn_dim)

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


class MaskedAttention(_KernelAttention):
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
            _check_packed_call(attn_mask, is_causal, key_gate)
            rows = x.data
            q, k, v = self.qkv(rows).reshape(rows.shape[0], 3, self.num_heads, self.head_dim).unbind(1)  # (T, H, D)
            return x.with_data(self._project(self._attend_rows(self.q_norm(q), self.k_norm(k), v, x), rows))

        batch, seq_len, _ = x.shape
        qkv = self.qkv(x).reshape(batch, seq_len, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, H, N, D) each
        heads = self._attend_tokens(
            self.q_norm(q), self.k_norm(k), v, attn_mask, is_causal, key_gate, skip_dropped_queries
        )
        return self._project(heads, x)


class MaskedRopeAttention(_KernelAttention):
    """timm's rotary-embedding attention (``EvaAttention``, ``AttentionRope``) with sparse key-masked and packed paths.

    Built from a timm module by :meth:`from_timm`, it holds that module's own parameters, buffers and submodules under
    the same names and in the same order (fused ``qkv`` with or without EVA's separate ``q_bias``/``v_bias``, or
    ``q_proj``/``k_proj``/``v_proj``; ``q_norm``/``k_norm``; the scale ``norm``; the output ``gate``; ``proj``), so the
    state dict is unchanged. Grouped-query attention (fewer key/value heads) repeats the key/value heads after the
    rotation, as timm does.

    Rotary embeddings (``rope``) follow timm's layout: ``cat(sin, cos)`` along the last axis, interleaved or
    half-rotated (``rotate_half``), applied to queries and keys after their norms.
    """

    def __init__(self, attn: nn.Module, *, backend: str = "auto") -> None:
        super().__init__()
        if type(attn) not in (EvaAttention, AttentionRope):
            raise TypeError(
                "attn: expected timm.models.eva.EvaAttention or timm.layers.AttentionRope, "
                f"got {type(attn).__module__}.{type(attn).__qualname__}"
            )
        for name, param in attn._parameters.items():
            self.register_parameter(name, param)
        for name, buffer in attn._buffers.items():
            self.register_buffer(name, buffer, persistent=name not in attn._non_persistent_buffers_set)
        for name, module in attn._modules.items():
            self.add_module(name, module)
        for name in ("qkv", "q_proj", "k_proj", "v_proj", "q_bias", "k_bias", "v_bias", "gate"):
            if not hasattr(self, name):  # timm leaves absent ones as plain None attributes
                setattr(self, name, getattr(attn, name, None))
        self.num_heads = attn.num_heads
        self.num_kv_heads = getattr(attn, "num_kv_heads", attn.num_heads)
        self.head_dim = attn.head_dim
        self.attn_dim = attn.num_heads * attn.head_dim
        self.scale = attn.scale
        self.num_prefix_tokens = attn.num_prefix_tokens
        self.rotate_half = getattr(attn, "rotate_half", False)
        self.qkv_bias_separate = getattr(attn, "qkv_bias_separate", False)
        self.backend = backend
        self.train(attn.training)

    @classmethod
    def from_timm(cls, attn: nn.Module, *, backend: str = "auto") -> MaskedRopeAttention:
        """Adopt an ``EvaAttention`` or ``AttentionRope`` (exactly those classes), sharing its parameters.

        Args:
            attn: the timm module.
            backend: kernel backend of the new module.

        Returns:
            A :class:`MaskedRopeAttention` whose state dict equals ``attn``'s.
        """
        return cls(attn, backend=backend)

    def _heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q ``(..., H, D)``, k and v ``(..., H_kv, D)`` from ``(..., C)`` inputs, q/k normalised (timm's order)."""
        lead = x.shape[:-1]
        if self.qkv is not None:
            if self.q_bias is None:
                qkv = self.qkv(x)
            else:
                bias = torch.cat((self.q_bias, self.k_bias, self.v_bias))
                qkv = self.qkv(x) + bias if self.qkv_bias_separate else F.linear(x, self.qkv.weight, bias)
            q, k, v = qkv.reshape(*lead, 3, self.num_heads, self.head_dim).unbind(-3)
        else:
            q = self.q_proj(x).reshape(*lead, self.num_heads, self.head_dim)
            k = self.k_proj(x).reshape(*lead, self.num_kv_heads, self.head_dim)
            v = self.v_proj(x).reshape(*lead, self.num_kv_heads, self.head_dim)
        return self.q_norm(q), self.k_norm(k), v

    def _rotate(self, t: torch.Tensor, rope: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return apply_rot_embed_cat(t, rope, half=self.rotate_half).type_as(like)

    def _repeat_kv(self, t: torch.Tensor, head_axis: int) -> torch.Tensor:
        groups = self.num_heads // self.num_kv_heads
        return t if groups == 1 else t.repeat_interleave(groups, dim=head_axis)

    def forward(
        self,
        x: torch.Tensor | PackedTokens,
        rope: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
        *,
        key_gate: torch.Tensor | None = None,
        skip_dropped_queries: bool = False,
    ) -> torch.Tensor | PackedTokens:
        """Self-attention over ``x`` with rotary embeddings.

        Args:
            x: ``(B, N, C)`` tokens, or :class:`~faithful_vit.kernels.PackedTokens` with ``(T, C)`` rows.
            rope: for tokens, timm's embedding of the patch tokens (``(N - num_prefix_tokens, 2D)``, or any shape
                that broadcasts against ``(B, H, N - num_prefix_tokens, 2D)``), applied to every token after the
                prefix; for packed rows, one embedding per row, ``(T, 1, 2D)`` or ``(T, H, 2D)``, applied to every
                row (prefix rows carry the identity rotation, sin 0 and cos 1). None: no rotation.
            attn_mask, is_causal, key_gate, skip_dropped_queries: as in :meth:`MaskedAttention.forward`.

        Returns:
            ``(B, N, dim_out)``, or ``PackedTokens`` with ``(T, dim_out)`` rows for packed input.
        """
        if isinstance(x, PackedTokens):
            _check_packed_call(attn_mask, is_causal, key_gate)
            rows = x.data
            q, k, v = self._heads(rows)  # (T, H, D)
            if rope is not None:
                q, k = self._rotate(q, rope, v), self._rotate(k, rope, v)
            heads = self._attend_rows(q, self._repeat_kv(k, 1), self._repeat_kv(v, 1), x)
            return x.with_data(self._project(heads, rows))

        q, k, v = (t.transpose(1, 2) for t in self._heads(x))  # (B, H, N, D)
        if rope is not None:
            npt = self.num_prefix_tokens
            q = torch.cat([q[:, :, :npt], self._rotate(q[:, :, npt:], rope, v)], dim=2)
            k = torch.cat([k[:, :, :npt], self._rotate(k[:, :, npt:], rope, v)], dim=2)
        k, v = self._repeat_kv(k, 1), self._repeat_kv(v, 1)
        heads = self._attend_tokens(q, k, v, attn_mask, is_causal, key_gate, skip_dropped_queries)
        return self._project(heads, x)
