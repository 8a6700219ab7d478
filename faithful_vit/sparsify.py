"""Convert timm Vision Transformers to sparse attention, and run them on the kept patch tokens only.

:func:`sparsify` swaps every block's ``Attention`` for :class:`~faithful_vit.MaskedAttention` in place (same
parameters, same state dict), after checking that nothing else in the model mixes tokens in a way the kernels do not
reproduce. :func:`forward_kept` then runs the converted model so that only the prefix tokens (class token,
registers) and the kept patch tokens take part, in one of two layouts:

* ``"packed"``: the kept tokens are gathered once, after the position embedding, into ``(T, C)`` rows; every block
  runs on the rows (projections and MLPs cost in proportion to the kept tokens) with varlen attention.
* ``"masked"``: the tokens are reordered once, kept first (a stable partition, so the class token stays at index 0),
  and every block runs on the full ``(B, N, C)`` tensor with the masked-attention kernel, which skips dropped keys
  and dropped queries. This mode can carry a straight-through ``gate`` whose gradient reaches stage 1 (dropped
  query rows are then computed, since the gate's gradient at a dropped key needs that token's key in every block).

Both give, at the class token, what timm's ``forward_features(x, attn_mask=keep_full[:, None, None, :])`` gives.
"""

from __future__ import annotations

from typing import Literal

import torch
from timm.layers import Attention, PatchEmbed
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from .attention import MaskedAttention
from .kernels import compaction_order, pack_tokens

__all__ = ["forward_kept", "sparsify"]

SUPPORTED_POOLS = ("token", "avg", "max", "avgmax")


def _unsupported(name: str, module: nn.Module, why: str) -> TypeError:
    kind = f"{type(module).__module__}.{type(module).__qualname__}"
    return TypeError(f"sparsify: cannot convert {name or 'model'} ({kind}) faithfully: {why}")


def _overrides(module: nn.Module, base: type, method: str) -> bool:
    return getattr(type(module), method) is not getattr(base, method)


def _check_convertible(model: nn.Module) -> None:
    """Raise, naming the module, if any part of ``model`` mixes tokens in a way the sparse path would not reproduce."""
    if not isinstance(model, VisionTransformer) or _overrides(model, VisionTransformer, "forward_features"):
        raise _unsupported(
            "",
            model,
            "expected a timm VisionTransformer (vit_*, deit*, deit3_*, vit_*_dinov2); other "
            "families (relative position bias, rope, hybrid stems) are not implemented",
        )
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
    if model.attn_pool is not None:
        raise _unsupported("attn_pool", model.attn_pool, "attention pooling mixes all tokens outside the blocks")
    if model.global_pool not in SUPPORTED_POOLS:
        raise _unsupported("", model, f"global_pool={model.global_pool!r}; expected one of {SUPPORTED_POOLS}")
    if model.global_pool != "token" and _overrides(model, VisionTransformer, "forward_head"):
        raise _unsupported("", model, f"a custom forward_head with global_pool={model.global_pool!r}")
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
                "expected timm.layers.Attention; attention with relative "
                "position bias, rope or other extras is not implemented",
            )


def sparsify(model: nn.Module, backend: str = "auto") -> nn.Module:
    """Convert a timm ViT in place so that masked and packed attention run on our kernels, and return it.

    Every ``blocks[i].attn`` becomes a :class:`~faithful_vit.MaskedAttention` sharing the original parameters, so the
    state dict (and an optimizer built on ``model.parameters()``) is unchanged. The model is checked as a whole
    first: nothing is converted unless everything can be.

    Args:
        model: a timm ``VisionTransformer`` (vit_*, with or without registers; deit*; deit3_*; vit_*_dinov2).
        backend: kernel backend of every converted module (``"auto"``, ``"triton"`` or ``"torch"``); blocks already
            converted get it too.

    Returns:
        ``model`` itself.

    Raises:
        TypeError: naming the first module that cannot be converted faithfully.
    """
    _check_convertible(model)
    for block in model.blocks:
        if isinstance(block.attn, MaskedAttention):
            block.attn.backend = backend
        else:
            block.attn = MaskedAttention.from_timm(block.attn, backend=backend)
    return model


def _pool_include_prefix(model: nn.Module) -> bool:
    return getattr(model, "pool_include_prefix", False)  # absent in older timm: prefix never pooled


def _embed(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """timm's token stem with the model's own modules: patches, prefix tokens and position embedding, pre-norm."""
    tokens = model._pos_embed(model.patch_embed(x))
    return model.norm_pre(model.patch_drop(tokens))


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
    that pool several prefix tokens, like distilled DeiT, keep their rule); average/max pooling reduces the kept rows,
    then applies the model's ``fc_norm`` and ``head_drop``.

    Args:
        rows: ``(R, C)`` final tokens (after ``model.norm``).
        row_image: ``(R,)`` int64 image of each row.
        in_pool: ``(R,)`` bool, rows that the average/max reduction covers (kept patch tokens, plus the prefix
            tokens when the model's ``pool_include_prefix``).
        prefix_rows: ``(B, num_prefix_tokens)`` int64 rows of each image's prefix tokens, in order.
    """
    if model.global_pool == "token":
        return model.forward_head(rows[prefix_rows], pre_logits=True)
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


def _check_inputs(model: nn.Module, tokens: torch.Tensor, keep: torch.Tensor, gate: torch.Tensor | None) -> None:
    num_patches = tokens.shape[1] - model.num_prefix_tokens
    expected = (tokens.shape[0], num_patches)
    if keep.dtype != torch.bool or tuple(keep.shape) != expected:
        raise ValueError(
            f"keep: expected a bool tensor of shape {expected} (B, num_patches), got {keep.dtype} {tuple(keep.shape)}"
        )
    if keep.device != tokens.device:
        raise ValueError(f"keep: expected device {tokens.device} like x, got {keep.device}")
    if gate is not None:
        if not gate.is_floating_point() or tuple(gate.shape) != expected or gate.device != tokens.device:
            raise ValueError(
                f"gate: expected a float tensor of shape {expected} on {tokens.device}, "
                f"got {gate.dtype} {tuple(gate.shape)} on {gate.device}"
            )


def _check_model(model: nn.Module) -> None:
    _check_convertible(model)
    for index, block in enumerate(model.blocks):
        if not isinstance(block.attn, MaskedAttention):
            raise TypeError(
                f"forward_kept: blocks.{index}.attn is {type(block.attn).__qualname__}; "
                "convert the model with faithful_vit.sparsify(model) first"
            )
    patch_drop = model.patch_drop
    if model.training and not isinstance(patch_drop, nn.Identity) and patch_drop.prob > 0:
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

    The result equals timm's ``forward_head(forward_features(x, attn_mask=m), pre_logits=True)`` with the key mask
    ``m = cat(prefix True, keep)[:, None, None, :]`` for ``'token'`` pooling; for ``'avg'``/``'max'``/``'avgmax'``
    pooling only the kept patch tokens (and the prefix, if the model pools it) are reduced, since a dropped
    token's output still carries its own patch through the residual stream.

    Args:
        model: a timm ``VisionTransformer`` converted by :func:`sparsify`.
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
    tokens = _embed(model, x)
    _check_inputs(model, tokens, keep, gate)
    batch, seq_len, _ = tokens.shape
    prefix = model.num_prefix_tokens
    keep_full = torch.cat([keep.new_ones(batch, prefix), keep], dim=1)
    if mode == "packed":
        if gate is not None and gate.requires_grad:
            raise ValueError(
                "gate: packed mode cannot return d(loss)/d(gate) (dropped tokens are not computed); "
                "use mode='masked' for a straight-through gate"
            )
        return _forward_packed(model, tokens, keep_full, return_tokens)
    return _forward_masked(model, tokens, keep_full, gate, return_tokens)


def _forward_packed(model, tokens, keep_full, return_tokens):
    batch, seq_len, _ = tokens.shape
    packed = pack_tokens(tokens, keep_full, max_seqlen=seq_len)
    row_image = packed.index // seq_len
    rows = packed.data
    for block in model.blocks:
        attended = block.attn(packed.with_data(block.norm1(rows))).data
        rows = _residual_rows(rows, block.ls1(attended), block.drop_path1, batch, row_image)
        rows = _residual_rows(rows, block.ls2(block.mlp(block.norm2(rows))), block.drop_path2, batch, row_image)
    rows = model.norm(rows)
    in_pool = (packed.index % seq_len >= model.num_prefix_tokens) | _pool_include_prefix(model)
    prefix_rows = packed.cu_seqlens[:-1, None].long() + torch.arange(model.num_prefix_tokens, device=rows.device)
    features = _pool(model, rows, row_image, in_pool, prefix_rows, batch)
    if return_tokens:
        return features, packed.with_data(rows).unpack(0.0)
    return features


def _forward_masked(model, tokens, keep_full, gate, return_tokens):
    batch, seq_len, channels = tokens.shape
    image_index = torch.arange(batch, device=tokens.device)
    order, inverse = compaction_order(keep_full)
    tokens = tokens.gather(1, order[:, :, None].expand(-1, -1, channels))
    keep_sorted = keep_full.gather(1, order)
    gate_sorted = None
    if gate is not None and gate.requires_grad and torch.is_grad_enabled():  # otherwise it changes nothing
        gate_full = torch.cat([gate.new_ones(batch, model.num_prefix_tokens), gate], dim=1)
        gate_sorted = gate_full.gather(1, order)
    # The gate's gradient at a dropped key needs that token's real key in every block, i.e. its row computed as timm
    # computes it (attending to the kept keys); without a gate, dropped rows are skipped (they reach no output).
    skip_dropped_queries = gate_sorted is None
    for block in model.blocks:
        attended = block.attn(
            block.norm1(tokens), attn_mask=keep_sorted, key_gate=gate_sorted, skip_dropped_queries=skip_dropped_queries
        )
        tokens = tokens + block.drop_path1(block.ls1(attended))
        tokens = tokens + block.drop_path2(block.ls2(block.mlp(block.norm2(tokens))))
    tokens = model.norm(tokens)
    rows = tokens.reshape(batch * seq_len, channels)
    row_image = image_index.repeat_interleave(seq_len)
    in_pool = keep_sorted & ((order >= model.num_prefix_tokens) | _pool_include_prefix(model))
    prefix_rows = image_index[:, None] * seq_len + torch.arange(model.num_prefix_tokens, device=rows.device)
    features = _pool(model, rows, row_image, in_pool.reshape(-1), prefix_rows, batch)
    if return_tokens:
        restored = tokens.masked_fill(~keep_sorted[:, :, None], 0.0)
        restored = restored.gather(1, inverse[:, :, None].expand(-1, -1, channels))
        return features, restored
    return features
