"""Convert timm Vision Transformers to sparse attention, and run them on the kept patch tokens only.

:func:`sparsify` swaps every block's attention for our drop-in in place (same parameters, same state dict), after
checking that nothing else in the model mixes tokens in a way the kernels do not reproduce. Two timm families convert:

* ``VisionTransformer`` (vit_*, deit*, deit3_*, vit_*_dinov2, CLIP and SigLIP ViTs, flexivit): ``Attention`` becomes
  :class:`~faithful_vit.MaskedAttention`;
* ``Eva`` (EVA-02, DINOv3 ``vit_*_dinov3``, the ``vit_*_rope_*`` models; rotary embeddings, registers, layer scale,
  SwiGLU, q/k norm, with or without a class token): ``EvaAttention`` / ``AttentionRope`` become
  :class:`~faithful_vit.attention.MaskedRopeAttention`.

:func:`forward_kept` then runs the converted model so that only the prefix tokens (class token, registers) and the
kept patch tokens take part, in one of two layouts:

* ``"packed"``: the kept tokens are gathered once, after the position embedding, into ``(T, C)`` rows; every block
  runs on the rows (projections and MLPs cost in proportion to the kept tokens) with varlen attention. Rotary
  embeddings are gathered once the same way, so each kept token keeps the rotation of its original position.
* ``"masked"``: the tokens are reordered once, kept first (a stable partition, so the prefix tokens stay in front),
  and every block runs on the full ``(B, N, C)`` tensor with the masked-attention kernel, which skips dropped keys
  and dropped queries; the rotary embeddings are reordered with them. This mode can carry a straight-through
  ``gate`` whose gradient reaches stage 1 (dropped query rows are then computed, since the gate's gradient at a
  dropped key needs that token's key in every block).

Both give, on every kept token, what timm's ``forward_features(x, attn_mask=keep_full[:, None, None, :])`` gives.
Pooling heads (average/max pooling, attention pooling such as SigLIP's ``AttentionPoolLatent``) pool over the kept
tokens only, which timm's own ``forward_head`` after a masked ``forward_features`` does not (see :func:`forward_kept`).
"""

from __future__ import annotations

from typing import Literal

import torch
from timm.layers import (
    Attention,
    AttentionPoolLatent,
    AttentionRope,
    PatchEmbed,
    RotaryEmbeddingCat,
    RotaryEmbeddingDinoV3,
    RotaryEmbeddingMixed,
)
from timm.models.eva import Eva, EvaAttention, EvaBlock
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from .attention import MaskedAttention, MaskedRopeAttention
from .kernels import compaction_order, pack_tokens

__all__ = ["forward_kept", "rope_at_rows", "rope_at_tokens", "sparsify"]

SUPPORTED_POOLS = ("token", "avg", "max", "avgmax", "map")
# Rotary embeddings whose get_embed() is one cat(sin, cos) tensor over the patch tokens in raster order (Mixed: one
# per block and head); each token's rotation is a function of its own position only.
SUPPORTED_ROPES = (RotaryEmbeddingCat, RotaryEmbeddingDinoV3, RotaryEmbeddingMixed)


def _unsupported(name: str, module: nn.Module, why: str) -> TypeError:
    kind = f"{type(module).__module__}.{type(module).__qualname__}"
    return TypeError(f"sparsify: cannot convert {name or 'model'} ({kind}) faithfully: {why}")


def _overrides(module: nn.Module, base: type, method: str) -> bool:
    return getattr(type(module), method) is not getattr(base, method)


def _family(model: nn.Module) -> type:
    """``VisionTransformer`` or ``Eva``: the timm class whose forward_features :func:`forward_kept` reproduces."""
    for family in (VisionTransformer, Eva):
        if isinstance(model, family) and not _overrides(model, family, "forward_features"):
            return family
    raise _unsupported(
        "",
        model,
        "expected a timm VisionTransformer (vit_*, deit*, deit3_*, vit_*_dinov2, CLIP, SigLIP) or Eva (eva02_*, "
        "vit_*_dinov3, vit_*_rope_*); other families (relative position bias, windowed attention, hybrid stems) are "
        "not implemented",
    )


def _check_patch_embed(model: nn.Module) -> None:
    embed = model.patch_embed
    if type(embed) is not PatchEmbed:
        raise _unsupported(
            "patch_embed",
            embed,
            "only non-overlapping patch embeddings (timm PatchEmbed) keep each token a function of its own patch",
        )
    conv = embed.proj
    if not isinstance(conv, nn.Conv2d) or conv.kernel_size != conv.stride or conv.padding not in ((0, 0), "valid"):
        raise _unsupported(
            "patch_embed.proj",
            conv,
            f"overlapping or padded patches (kernel {conv.kernel_size}, stride {conv.stride}, padding {conv.padding})",
        )


def _check_head(model: nn.Module, family: type) -> None:
    pool = model.attn_pool
    if pool is not None:
        if type(pool) is not AttentionPoolLatent or _overrides(pool, AttentionPoolLatent, "forward"):
            raise _unsupported(
                "attn_pool", pool, "only timm's AttentionPoolLatent (a latent query attending to the tokens) is exact"
            )
        if pool.pos_embed is not None:
            raise _unsupported("attn_pool", pool, "a position embedding inside the attention pool is not implemented")
    if model.global_pool not in SUPPORTED_POOLS:
        raise _unsupported("", model, f"global_pool={model.global_pool!r}; expected one of {SUPPORTED_POOLS}")
    if model.global_pool != "token" and any(_overrides(model, family, m) for m in ("forward_head", "pool")):
        raise _unsupported("", model, f"a custom forward_head or pool with global_pool={model.global_pool!r}")


def _check_vit_blocks(model: nn.Module) -> None:
    for index, block in enumerate(model.blocks):
        name = f"blocks.{index}"
        if not isinstance(block, Block) or _overrides(block, Block, "forward"):
            raise _unsupported(
                name,
                block,
                "expected timm's pre-norm Block (norm1, attn, ls1, drop_path1, norm2, mlp, "
                "ls2, drop_path2); parallel and post-norm blocks are not implemented",
            )
        if type(block.attn) not in (Attention, MaskedAttention):
            raise _unsupported(
                f"{name}.attn",
                block.attn,
                "expected timm.layers.Attention; attention with relative position bias or other extras is not "
                "implemented",
            )


def _check_eva_blocks(model: nn.Module) -> None:
    rope = model.rope
    if rope is not None and type(rope) not in SUPPORTED_ROPES:
        names = ", ".join(r.__name__ for r in SUPPORTED_ROPES)
        raise _unsupported("rope", rope, f"expected one of {names}")
    for index, block in enumerate(model.blocks):
        name = f"blocks.{index}"
        if type(block) is not EvaBlock:
            raise _unsupported(
                name,
                block,
                "expected timm's pre-norm EvaBlock (norm1, attn, gamma_1, drop_path1, norm2, mlp, gamma_2, "
                "drop_path2); post-norm blocks are not implemented",
            )
        if type(block.attn) not in (EvaAttention, AttentionRope, MaskedRopeAttention):
            raise _unsupported(f"{name}.attn", block.attn, "expected timm's EvaAttention or AttentionRope")


def _check_convertible(model: nn.Module) -> type:
    """Raise, naming the module, if any part of ``model`` mixes tokens in a way the sparse path would not reproduce;
    return the model's family."""
    family = _family(model)
    _check_patch_embed(model)
    _check_head(model, family)
    if family is Eva:
        _check_eva_blocks(model)
    else:
        _check_vit_blocks(model)
    return family


def sparsify(model: nn.Module, backend: str = "auto") -> nn.Module:
    """Convert a timm ViT in place so that masked and packed attention run on our kernels, and return it.

    Every ``blocks[i].attn`` becomes a :class:`~faithful_vit.MaskedAttention` (timm ``Attention``) or a
    :class:`~faithful_vit.attention.MaskedRopeAttention` (``Eva``'s rotary attentions) sharing the original
    parameters, so the state dict (and an optimizer built on ``model.parameters()``) is unchanged. The model is
    checked as a whole first: nothing is converted unless everything can be.

    Args:
        model: a timm ``VisionTransformer`` (vit_*, with or without registers; deit*; deit3_*; vit_*_dinov2; CLIP;
            SigLIP with its attention-pool head) or ``Eva`` (eva02_*, vit_*_dinov3, vit_*_rope_*).
        backend: kernel backend of every converted module (``"auto"``, ``"triton"`` or ``"torch"``); blocks already
            converted get it too.

    Returns:
        ``model`` itself.

    Raises:
        TypeError: naming the first module that cannot be converted faithfully.
    """
    family = _check_convertible(model)
    drop_in = MaskedRopeAttention if family is Eva else MaskedAttention
    for block in model.blocks:
        if isinstance(block.attn, drop_in):
            block.attn.backend = backend
        else:
            block.attn = drop_in.from_timm(block.attn, backend=backend)
    return model


def _pools_prefix(model: nn.Module) -> bool:
    """Whether timm's pooling covers the prefix tokens too: ``Eva``'s attention pool reads every token; a
    ``VisionTransformer`` pools them iff ``pool_include_prefix`` (absent in older timm: never)."""
    if isinstance(model, Eva):
        return model.attn_pool is not None
    return getattr(model, "pool_include_prefix", False)


def _embed(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """timm's token stem with the model's own modules: patches, prefix tokens and position embedding, pre-norm; and
    ``Eva``'s rotary embedding of the patch tokens (None for a ``VisionTransformer`` or an ``Eva`` without rope)."""
    if isinstance(model, Eva):
        tokens, rope = model._pos_embed(model.patch_embed(x))
        return model.norm_pre(tokens), rope
    tokens = model._pos_embed(model.patch_embed(x))
    return model.norm_pre(model.patch_drop(tokens)), None


def rope_at_tokens(rope: torch.Tensor, patch_index: torch.Tensor) -> torch.Tensor:
    """A rotary embedding at some patch tokens, each keeping the rotation of its own position.

    Args:
        rope: timm's ``get_embed()``, ``(*lead, num_patches, 2D)`` over the patch tokens in raster order (``lead`` is
            ``()``, or ``(depth, H)`` for timm's ``rope_mixed``).
        patch_index: int64 indices into the patch tokens, any shape (``(B, N')`` for a reordered batch, ``(T,)``
            for packed rows).

    Returns:
        ``(*patch_index.shape, *lead, 2D)``.
    """
    gathered = rope[..., patch_index, :]  # (*lead, *patch_index.shape, 2D)
    lead = rope.ndim - 2
    return gathered.movedim(tuple(range(lead)), tuple(range(patch_index.ndim, patch_index.ndim + lead)))


def rope_at_rows(rope: torch.Tensor, row_position: torch.Tensor, num_prefix_tokens: int) -> torch.Tensor:
    """A rotary embedding per packed row: its patch's rotation, and for prefix rows (which timm does not rotate) the
    identity (sin 0, cos 1), exact for them.

    Args:
        rope: as in :func:`rope_at_tokens`.
        row_position: ``(T,)`` int64 position of each row in its image's token sequence (prefix tokens first).
        num_prefix_tokens: class and register tokens in front of the patch tokens.

    Returns:
        ``(T, *lead, 2D)``.
    """
    gathered = rope_at_tokens(rope, (row_position - num_prefix_tokens).clamp(min=0))
    half = rope.shape[-1] // 2
    identity = torch.cat([rope.new_zeros(half), rope.new_ones(half)])
    is_prefix = (row_position < num_prefix_tokens).view(-1, *([1] * (gathered.ndim - 1)))
    return torch.where(is_prefix, identity, gathered)


def _attn_kwargs(model: nn.Module, gathered: torch.Tensor | None, token_dims: int) -> list[dict]:
    """Each block's extra attention arguments: none for a ``VisionTransformer``; for an ``Eva`` its rotary embedding
    ``(*token shape, 1 or H, 2D)`` from one gathered tensor ``(*token shape, *lead, 2D)`` (shared by all blocks unless
    it depends on depth, timm's ``rope_mixed``)."""
    depth = len(model.blocks)
    if not isinstance(model, Eva):
        return [{}] * depth
    if gathered is None:
        return [{"rope": None}] * depth
    if getattr(model, "rope_mixed", False):
        return [{"rope": rope} for rope in gathered.unbind(token_dims)]  # (..., H, 2D) per block
    return [{"rope": gathered.unsqueeze(-2)}] * depth


def _check_rope(model: nn.Module, rope: torch.Tensor | None) -> None:
    expected_ndim = 4 if getattr(model, "rope_mixed", False) else 2  # (depth, H, N, 2D) or (N, 2D)
    if rope is not None and rope.ndim != expected_ndim:
        raise NotImplementedError(
            f"rope: expected a {expected_ndim}-d embedding from {type(model.rope).__qualname__}.get_embed(), got shape "
            f"{tuple(rope.shape)}"
        )


def _scaled(block: nn.Module, which: int, branch: torch.Tensor) -> torch.Tensor:
    """A residual branch times the block's layer scale (timm ``LayerScale`` or ``Eva``'s ``gamma``)."""
    if isinstance(block, EvaBlock):
        gamma = block.gamma_1 if which == 1 else block.gamma_2
        return branch if gamma is None else gamma * branch
    return (block.ls1 if which == 1 else block.ls2)(branch)


def _sample_scale(drop_path: nn.Module, batch: int, like: torch.Tensor) -> torch.Tensor | None:
    """Per-image factors of an active DropPath (``(B,)``: 0 or 1/keep_prob), drawn by the module itself."""
    if isinstance(drop_path, nn.Identity) or not drop_path.training or drop_path.drop_prob == 0.0:
        return None
    return drop_path(like.new_ones(batch, 1)).squeeze(1)


def _residual_rows(
    rows: torch.Tensor, branch: torch.Tensor, drop_path: nn.Module, batch: int, row_image: torch.Tensor
) -> torch.Tensor:
    """``rows + drop_path(branch)`` on packed rows, dropping whole images as timm's DropPath does, not single rows."""
    scale = _sample_scale(drop_path, batch, rows)
    if scale is None:
        return rows + branch
    return rows + branch * scale[row_image, None]


def _attention_pool(
    pool: AttentionPoolLatent, rows: torch.Tensor, row_image: torch.Tensor, in_pool: torch.Tensor, batch: int
) -> torch.Tensor:
    """timm's ``AttentionPoolLatent`` with its latent queries attending to the ``in_pool`` rows of each image only.

    A softmax per image over rows (scatter max, exp, index-add), so it runs on packed rows and on the full masked
    layout alike. An image with no row to pool gets a zero attention output (like the empty mean), then the pool's
    projection and MLP.
    """
    latent_len, heads, head_dim = pool.latent_len, pool.num_heads, pool.head_dim
    q = pool.q_norm(pool.q(pool.latent).reshape(latent_len, heads, head_dim))
    k, v = pool.kv(rows).reshape(rows.shape[0], 2, heads, head_dim).unbind(1)
    scores = torch.einsum("rhd,lhd->rlh", pool.k_norm(k), q) * pool.scale  # (R, L, H)
    scores = scores.masked_fill(~in_pool[:, None, None], float("-inf"))
    index = row_image[:, None, None].expand_as(scores)
    peak = scores.new_full((batch, latent_len, heads), float("-inf")).scatter_reduce(0, index, scores, "amax")
    peak = torch.where(torch.isfinite(peak), peak, 0.0).detach()  # softmax is shift-invariant; empty images: 0
    weights = torch.exp(scores - peak[row_image])  # 0 outside the pool
    total = scores.new_zeros(batch, latent_len, heads).index_add(0, row_image, weights)
    summed = v.new_zeros(batch, latent_len, heads, head_dim).index_add(0, row_image, weights[..., None] * v[:, None])
    out = (summed / total.clamp(min=torch.finfo(total.dtype).tiny)[..., None]).reshape(batch, latent_len, -1)
    out = pool.proj_drop(pool.proj(out))
    if pool.mlp is not None:
        out = out + pool.mlp(pool.norm(out))
    if pool.pool == "token":
        return out[:, 0]
    if pool.pool == "avg":
        return out.mean(1)
    return out


def _pool(
    model: nn.Module,
    rows: torch.Tensor,
    row_image: torch.Tensor,
    in_pool: torch.Tensor,
    prefix_rows: torch.Tensor,
    batch: int,
) -> torch.Tensor:
    """The model's pre-logit pooling over the kept tokens only.

    ``'token'`` pooling hands the prefix tokens to the model's own ``forward_head(..., pre_logits=True)`` (so models
    that pool several prefix tokens, like distilled DeiT, keep their rule); average/max pooling reduces the kept rows
    and attention pooling (``'map'``) attends to them only, then the model's ``fc_norm`` and ``head_drop`` apply.

    Args:
        rows: ``(R, C)`` final tokens (after ``model.norm``).
        row_image: ``(R,)`` int64 image of each row.
        in_pool: ``(R,)`` bool, rows that the pooling covers (kept patch tokens, plus the prefix tokens when timm's
            pooling covers them, see :func:`_pools_prefix`).
        prefix_rows: ``(B, num_prefix_tokens)`` int64 rows of each image's prefix tokens, in order.
    """
    if model.global_pool == "token":
        return model.forward_head(rows[prefix_rows], pre_logits=True)
    if model.global_pool == "map":
        return model.head_drop(model.fc_norm(_attention_pool(model.attn_pool, rows, row_image, in_pool, batch)))
    channels = rows.shape[1]
    weights = in_pool.to(rows.dtype)
    counts = rows.new_zeros(batch).index_add(0, row_image, weights)
    mean = rows.new_zeros(batch, channels).index_add(0, row_image, rows * weights[:, None])
    mean = mean / counts.clamp(min=1)[:, None]
    if model.global_pool == "avg":
        pooled = mean
    else:
        floor = torch.finfo(rows.dtype).min
        amax = rows.new_full((batch, channels), floor).scatter_reduce(
            0, row_image[:, None].expand(-1, channels), rows.masked_fill(~in_pool[:, None], floor), "amax"
        )
        amax = torch.where(counts[:, None] > 0, amax, 0.0)  # nothing to pool: zero, like the empty mean
        pooled = amax if model.global_pool == "max" else 0.5 * (amax + mean)
    return model.head_drop(model.fc_norm(pooled))


def _check_keep(keep: torch.Tensor, expected: tuple[int, int], device: torch.device) -> None:
    if not isinstance(keep, torch.Tensor) or keep.dtype != torch.bool or tuple(keep.shape) != expected:
        got = f"{keep.dtype} {tuple(keep.shape)}" if isinstance(keep, torch.Tensor) else type(keep).__name__
        raise ValueError(f"keep: expected a bool tensor of shape {expected} (B, num_patches), got {got}")
    if keep.device != device:
        raise ValueError(f"keep: expected device {device} like x, got {keep.device}")


def _check_gate(gate: torch.Tensor | None, expected: tuple[int, int], device: torch.device) -> None:
    if gate is not None:
        if not gate.is_floating_point() or tuple(gate.shape) != expected or gate.device != device:
            raise ValueError(
                f"gate: expected a float tensor of shape {expected} on {device}, "
                f"got {gate.dtype} {tuple(gate.shape)} on {gate.device}"
            )


def _isolate_dropped_pixels(model: nn.Module, x: torch.Tensor, keep: torch.Tensor, keep_values: bool) -> torch.Tensor:
    """Zero the pixels of dropped patches (with ``keep_values``: only their non-finite ones) before the embedding.

    A dropped token still passes through the patch embedding (both modes) and every per-token layer (masked mode),
    whose weight gradients sum ``0 * activation`` over it: a NaN or Inf pixel would make them NaN. Non-overlapping
    patches make this exact for the kept tokens. ``keep_values`` is for the straight-through gate, whose gradient at a
    dropped patch reads that patch's real tokens.
    """
    (ph, pw), (height, width) = model.patch_embed.patch_size, x.shape[-2:]
    gh, gw = model.patch_embed.dynamic_feat_size((height, width))
    _check_keep(keep, (x.shape[0], gh * gw), x.device)
    dropped = (~keep).view(-1, 1, gh, gw).repeat_interleave(ph, dim=2).repeat_interleave(pw, dim=3)
    # Crop a dynamically padded border; pixels beyond the last whole patch are read by no patch: treat as dropped.
    dropped = dropped[..., :height, :width]
    dropped = nn.functional.pad(dropped, (0, width - dropped.shape[-1], 0, height - dropped.shape[-2]), value=True)
    if keep_values:
        dropped = dropped & ~torch.isfinite(x)
    return torch.where(dropped, 0.0, x)


def _check_model(model: nn.Module) -> None:
    family = _check_convertible(model)
    drop_in = MaskedRopeAttention if family is Eva else MaskedAttention
    for index, block in enumerate(model.blocks):
        if not isinstance(block.attn, drop_in):
            raise TypeError(
                f"forward_kept: blocks.{index}.attn is {type(block.attn).__qualname__}; "
                "convert the model with faithful_vit.sparsify(model) first"
            )
    patch_drop = model.patch_drop
    if model.training and patch_drop is not None and not isinstance(patch_drop, nn.Identity) and patch_drop.prob > 0:
        raise NotImplementedError(
            f"patch_drop: random patch dropout (prob={patch_drop.prob}) in training would "
            "break the alignment of keep with the patch tokens; set it to 0 or call eval()"
        )


def forward_kept(
    model: nn.Module,
    x: torch.Tensor,
    keep: torch.Tensor,
    mode: Literal["packed", "masked"] = "packed",
    gate: torch.Tensor | None = None,
    *,
    return_tokens: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Run a :func:`sparsify`-converted timm ViT on the prefix tokens and the kept patch tokens only.

    Every kept token's final value equals timm's ``forward_features(x, attn_mask=m)`` with the key mask
    ``m = cat(prefix True, keep)[:, None, None, :]``. The features are that, pooled faithfully:

    * ``'token'`` pooling: timm's ``forward_head(forward_features(x, attn_mask=m), pre_logits=True)``, exactly;
    * ``'avg'``/``'max'``/``'avgmax'``: the reduction over the kept patch tokens only (and the prefix, if the model
      pools it), then ``fc_norm``;
    * ``'map'`` (``AttentionPoolLatent``, e.g. SigLIP): the pool's latent queries attend to the kept patch tokens only
      (with the prefix tokens where timm's pool reads them: ``Eva`` always, ``VisionTransformer`` with
      ``pool_include_prefix``), i.e. ``attn_pool(tokens, attn_mask=key mask)``, then ``fc_norm``.

    timm's own ``forward_head`` after a masked ``forward_features`` would instead pool every patch token, dropped
    ones included: a dropped token's output still carries its own patch through the residual stream (its queries
    attend to kept keys only), so that result is not a function of the kept patches alone.

    Pixels of dropped patches are zeroed first (with a gradient-carrying gate: only the non-finite ones), so NaN or
    Inf there leaves the features and every parameter gradient equal to a clean run's.

    Args:
        model: a timm ``VisionTransformer`` or ``Eva`` converted by :func:`sparsify`.
        x: ``(B, 3, H, W)`` images.
        keep: ``(B, num_patches)`` bool over the patch tokens in raster order; prefix tokens are always kept.
        mode: ``"packed"`` (gather the kept tokens once) or ``"masked"`` (reorder once, masked attention per block).
        gate: optional ``(B, num_patches)`` float equal to ``keep`` in value (straight-through estimate). In
            ``"masked"`` mode every block's attention receives it as a key gate, so d(loss)/d(gate) is the gradient
            of a multiplicative key gate in every attention of the dense model, evaluated at ``gate = keep`` (dropped
            rows are then computed, as timm computes them, instead of skipped); a gate without a gradient to
            compute changes nothing. In
            ``"packed"`` mode dropped tokens are gone, so a gate that requires grad raises; one that does not is
            only checked for its shape.
        return_tokens: also return the final tokens (after ``model.norm``) as ``(B, N, C)`` in the model's own
            token order, zero at dropped patch positions.

    Returns:
        Pre-logit features ``(B, C)``, or ``(features, tokens)`` with ``return_tokens``.
    """
    if mode not in ("packed", "masked"):
        raise ValueError(f"mode: expected 'packed' or 'masked', got {mode!r}")
    _check_model(model)
    if mode == "packed" and gate is not None and gate.requires_grad:
        raise ValueError(
            "gate: packed mode cannot return d(loss)/d(gate) (dropped tokens are not computed); "
            "use mode='masked' for a straight-through gate"
        )
    gate_needs_grad = gate is not None and gate.requires_grad and torch.is_grad_enabled()
    x = _isolate_dropped_pixels(model, x, keep, keep_values=gate_needs_grad)
    tokens, rope = _embed(model, x)
    _check_rope(model, rope)
    _check_gate(gate, tuple(keep.shape), tokens.device)
    batch = tokens.shape[0]
    keep_full = torch.cat([keep.new_ones(batch, model.num_prefix_tokens), keep], dim=1)
    if mode == "packed":
        return _forward_packed(model, tokens, rope, keep_full, return_tokens)
    gate = gate if gate_needs_grad else None  # a gate without a gradient to compute changes nothing
    return _forward_masked(model, tokens, rope, keep_full, gate, return_tokens)


def _forward_packed(model, tokens, rope, keep_full, return_tokens):
    batch, seq_len, _ = tokens.shape
    prefix = model.num_prefix_tokens
    packed = pack_tokens(tokens, keep_full, max_seqlen=seq_len)
    row_image = packed.index // seq_len
    row_position = packed.index % seq_len
    attn_kwargs = _attn_kwargs(model, None if rope is None else rope_at_rows(rope, row_position, prefix), 1)
    rows = packed.data
    for block, kwargs in zip(model.blocks, attn_kwargs, strict=True):
        attended = block.attn(packed.with_data(block.norm1(rows)), **kwargs).data
        rows = _residual_rows(rows, _scaled(block, 1, attended), block.drop_path1, batch, row_image)
        branch = _scaled(block, 2, block.mlp(block.norm2(rows)))
        rows = _residual_rows(rows, branch, block.drop_path2, batch, row_image)
    rows = model.norm(rows)
    in_pool = (row_position >= prefix) | _pools_prefix(model)
    prefix_rows = packed.cu_seqlens[:-1, None].long() + torch.arange(prefix, device=rows.device)
    features = _pool(model, rows, row_image, in_pool, prefix_rows, batch)
    if return_tokens:
        return features, packed.with_data(rows).unpack(0.0)
    return features


def _forward_masked(model, tokens, rope, keep_full, gate, return_tokens):
    batch, seq_len, channels = tokens.shape
    prefix = model.num_prefix_tokens
    image_index = torch.arange(batch, device=tokens.device)
    order, inverse = compaction_order(keep_full)  # stable: the prefix tokens stay at 0..prefix-1
    tokens = tokens.gather(1, order[:, :, None].expand(-1, -1, channels))
    keep_sorted = keep_full.gather(1, order)
    gathered = None if rope is None else rope_at_tokens(rope, order[:, prefix:] - prefix)
    attn_kwargs = [  # timm's layout, (B, 1 or H, N - prefix, 2D)
        {name: value if value is None else value.transpose(1, 2) for name, value in kwargs.items()}
        for kwargs in _attn_kwargs(model, gathered, 2)
    ]
    gate_sorted = None
    if gate is not None:
        gate_full = torch.cat([gate.new_ones(batch, prefix), gate], dim=1)
        gate_sorted = gate_full.gather(1, order)
    # The gate's gradient at a dropped key needs that token's real key in every block, i.e. its row computed as timm
    # computes it (attending to the kept keys); without a gate, dropped rows are skipped (they reach no output).
    skip_dropped_queries = gate_sorted is None
    for block, kwargs in zip(model.blocks, attn_kwargs, strict=True):
        attended = block.attn(
            block.norm1(tokens),
            attn_mask=keep_sorted,
            key_gate=gate_sorted,
            skip_dropped_queries=skip_dropped_queries,
            **kwargs,
        )
        tokens = tokens + block.drop_path1(_scaled(block, 1, attended))
        tokens = tokens + block.drop_path2(_scaled(block, 2, block.mlp(block.norm2(tokens))))
    tokens = model.norm(tokens)
    rows = tokens.reshape(batch * seq_len, channels)
    row_image = image_index.repeat_interleave(seq_len)
    in_pool = keep_sorted & ((order >= prefix) | _pools_prefix(model))
    prefix_rows = image_index[:, None] * seq_len + torch.arange(prefix, device=rows.device)
    features = _pool(model, rows, row_image, in_pool.reshape(-1), prefix_rows, batch)
    if return_tokens:
        restored = tokens.masked_fill(~keep_sorted[:, :, None], 0.0)
        restored = restored.gather(1, inverse[:, :, None].expand(-1, -1, channels))
        return features, restored
    return features
