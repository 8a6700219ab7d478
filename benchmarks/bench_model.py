"""Model benchmark: one ViT layer, stage 2, and the whole two-stage model, in the three stage-2 modes.

Run (one command): ``python -m benchmarks.bench_model`` (GPU, full size) or ``--cpu-tiny`` (CPU, a few minutes,
the ``faithful_tiny`` preset plus a ViT-S/16 layer). Results: ``<out>/model.json`` + ``.csv`` + PNGs.

Suites (``--suites``):
    layer      one pre-norm ViT block (timm ``Block`` weights) on ``B`` images, fwd and fwd+bwd, four ways:
               ``dense`` (all tokens, SDPA without mask: the ceiling), ``dense_mask`` (timm's block with the boolean
               key mask, the authors' formulation), ``masked`` (``masked_attention`` in raster order; every token
               still runs the projections and MLP), ``masked_compact`` (the same after ``compaction_order``, kept
               tokens first so whole key blocks are skipped; compaction and its inverse included) and ``packed``
               (gather the kept tokens, run the block on them with ``varlen_attention``, scatter back; gather and
               scatter included). Models: ViT-B/14@518 + 4 registers
               (N = 1374) and ViT-B/16@224 (N = 197), the layer targets of benchmarks/README.md (T6); and
               DINOv3 layers (timm ``EvaBlock`` with rotary embeddings, 4 registers: ViT-B/16@512, N = 1029;
               ViT-S/16@224, N = 201; ``--layer-models dinov3_b16_512``, the S/16 one in ``--cpu-tiny``), where
               the rope is applied to every token (dense, masked) or to the kept rows only, gathered with them
               (packed), through :class:`~faithful_vit.attention.MaskedRopeAttention`.
    stage2     ``FaithfulViT.forward_stage2(images, keep, mode=...)``: inference (img/s) and a training step of stage 2
               alone (fwd + bwd + AdamW on its parameters).
    two_stage  the whole model: inference ``model(images)`` (img/s) and the training step ``model(images)`` ->
               ``training_losses`` -> backward -> AdamW over ``param_groups`` (the presets' recipe: frozen stage-1
               backbone with trainable tokens, straight-through gate in "masked" mode).

Kept fractions come with per-image variation (``_common.blob_keep``). In the model suites the mask is forced by
wrapping ``model.compute_keep``: stage 1 still runs and its gate is still computed (same cost); only the mask values
are replaced, so the step's cost is measured at a controlled kept fraction. Mixed precision: bf16 autocast on CUDA
(fp32 weights, AdamW fused); fp32 on the CPU. Peak memory is ``torch.cuda.max_memory_allocated`` during the timed
calls.

On the CPU (``--cpu-tiny``) our kernels run through their PyTorch reference backend (``backend="torch"``): the
"masked" mode is then a dense einsum and "packed" a per-image loop, so CPU numbers show how the work scales with the
kept tokens (projections and MLP on kept tokens only), not kernel speed.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

if __package__ in (None, ""):  # `python benchmarks/bench_model.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import _common as C  # noqa: E402
from faithful_vit import kernels as K  # noqa: E402
from faithful_vit.losses import training_losses  # noqa: E402

STAGE2_MODES = ("dense", "masked", "packed")
LAYER_FORMULATIONS = ("dense", "dense_mask", "masked", "masked_compact", "packed")


@dataclass(frozen=True)
class LayerConfig:
    name: str
    width: int
    heads: int
    seq_len: int
    init_values: float | None  # LayerScale (DINOv2 backbones have it)
    rope_grid: tuple[int, int] | None = None  # a DINOv3 layer: rope over this patch grid, the rest prefix tokens


LAYER_CONFIGS = {
    "vit_b14_518": LayerConfig("vit_b14_518", 768, 12, 1374, 1e-5),
    "vit_b16_224": LayerConfig("vit_b16_224", 768, 12, 197, None),
    "vit_s16_224": LayerConfig("vit_s16_224", 384, 6, 197, None),
    "dinov3_b16_512": LayerConfig("dinov3_b16_512", 768, 12, 1029, 1e-5, rope_grid=(32, 32)),
    "dinov3_s16_224": LayerConfig("dinov3_s16_224", 384, 6, 201, 1e-5, rope_grid=(14, 14)),
}
MODEL_PRESETS = {
    "vit_b14_518": "faithful_dinov2_base_reg4_518",
    "vit_s16_224": "faithful_vit_small_patch16_224",
    "dinov3_b16_512": "faithful_dinov3_base_reg4_512",
    "dinov3_s16_224": "faithful_dinov3_small_reg4_224",
    "tiny": "faithful_tiny",
}
# per-GPU training batches that fit an H100 (the DINOv3 ones by token count, not measured)
MODEL_BATCH = {"vit_b14_518": 16, "vit_s16_224": 64, "dinov3_b16_512": 16, "dinov3_s16_224": 64, "tiny": 16}


# ---------------------------------------------------------------------------------------------------- one layer
def _attention_projections(attn: nn.Module, h: torch.Tensor, heads_first: bool):
    """timm Attention's qkv projection and q/k norms on ``(..., C)`` rows: q, k, v as ``(B, H, N, D)`` (heads_first)
    or ``(T, H, D)``."""
    lead = h.shape[:-1]
    qkv = attn.qkv(h).reshape(*lead, 3, attn.num_heads, attn.head_dim)
    q, k, v = qkv.unbind(-3)
    if heads_first:
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    return attn.q_norm(q), attn.k_norm(k), v


def _finish_block(block: nn.Module, x: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
    """timm Block after the attention core: norm, out projection, LayerScale, residual, then the MLP half."""
    x = x + block.ls1(block.attn.proj(block.attn.norm(attn_out)))
    return x + block.ls2(block.mlp(block.norm2(x)))


def block_masked(block: nn.Module, x: torch.Tensor, keep: torch.Tensor, backend: str) -> torch.Tensor:
    """timm ``Block.forward`` with its attention replaced by :func:`masked_attention` (``(B, N, C)`` in and out)."""
    batch, seq_len, _ = x.shape
    q, k, v = _attention_projections(block.attn, block.norm1(x), heads_first=True)
    out = K.masked_attention(q, k, v, keep, backend=backend)
    return _finish_block(block, x, out.transpose(1, 2).reshape(batch, seq_len, -1))


def block_packed(
    block: nn.Module, rows: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, backend: str
) -> torch.Tensor:
    """timm ``Block.forward`` on packed kept rows ``(T, C)`` with :func:`varlen_attention` (rows in and out)."""
    q, k, v = _attention_projections(block.attn, block.norm1(rows), heads_first=False)
    out = K.varlen_attention(q, k, v, cu_seqlens, max_seqlen, check_cu_seqlens=False, backend=backend)
    return _finish_block(block, rows, out.reshape(rows.shape[0], -1))


class RopeLayer(nn.Module):
    """A DINOv3 layer: timm's ``EvaBlock``, its rotary embedding over the patch grid, and our attention sharing the
    block's parameters (for the masked and packed formulations)."""

    def __init__(self, block: nn.Module, rope: torch.Tensor) -> None:
        super().__init__()
        from faithful_vit.attention import MaskedRopeAttention

        self.block = block
        self.register_buffer("rope", rope, persistent=False)
        self.sparse_attn = MaskedRopeAttention.from_timm(block.attn)

    def finish(self, x: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        """``EvaBlock.forward`` after the attention: layer scale, residual, then the MLP half."""
        block = self.block
        x = x + (attended if block.gamma_1 is None else block.gamma_1 * attended)
        mlp = block.mlp(block.norm2(x))
        return x + (mlp if block.gamma_2 is None else block.gamma_2 * mlp)


def rope_layer_forward(
    layer: RopeLayer, x: torch.Tensor, keep: torch.Tensor, formulation: str, backend: str
) -> torch.Tensor:
    """:func:`layer_forward` for a DINOv3 layer: the rope follows each token (gathered once for a reordered or
    packed batch)."""
    from faithful_vit.sparsify import rope_at_rows, rope_at_tokens

    block, attn, rope = layer.block, layer.sparse_attn, layer.rope
    prefix = attn.num_prefix_tokens
    attn.backend = backend
    if formulation == "dense":
        return block(x, rope=rope)
    if formulation == "dense_mask":
        return block(x, rope=rope, attn_mask=keep[:, None, None, :])
    if formulation == "masked":
        return layer.finish(x, attn(block.norm1(x), rope=rope, attn_mask=keep, skip_dropped_queries=True))
    if formulation == "masked_compact":
        order, inverse = K.compaction_order(keep)
        compact = x.gather(1, order[..., None].expand_as(x))
        sorted_rope = rope_at_tokens(rope, order[:, prefix:] - prefix)[:, None]
        attended = attn(
            block.norm1(compact), rope=sorted_rope, attn_mask=keep.gather(1, order), skip_dropped_queries=True
        )
        out = layer.finish(compact, attended)
        return out.gather(1, inverse[..., None].expand_as(out))
    if formulation == "packed":
        packed = K.pack_tokens(x, keep, max_seqlen=x.shape[1])
        row_rope = rope_at_rows(rope, packed.index % x.shape[1], prefix)[:, None]
        rows = packed.data
        attended = attn(packed.with_data(block.norm1(rows)), rope=row_rope).data
        return packed.with_data(layer.finish(rows, attended)).unpack()
    raise ValueError(f"formulation: expected one of {LAYER_FORMULATIONS}, got {formulation!r}")


def layer_forward(
    block: nn.Module, x: torch.Tensor, keep: torch.Tensor, formulation: str, backend: str
) -> torch.Tensor:
    """One block over ``(B, N, C)`` tokens in ``formulation``; ``keep`` ``(B, N)`` includes the prefix tokens."""
    if isinstance(block, RopeLayer):
        return rope_layer_forward(block, x, keep, formulation, backend)
    if formulation == "dense":
        return block(x)
    if formulation == "dense_mask":
        return block(x, attn_mask=keep[:, None, None, :])
    if formulation == "masked":
        return block_masked(block, x, keep, backend)
    if formulation == "masked_compact":
        order, inverse = K.compaction_order(keep)
        compact = x.gather(1, order[..., None].expand_as(x))
        out = block_masked(block, compact, keep.gather(1, order), backend)
        return out.gather(1, inverse[..., None].expand_as(out))
    if formulation == "packed":
        packed = K.pack_tokens(x, keep, max_seqlen=x.shape[1])
        rows = block_packed(block, packed.data, packed.cu_seqlens, packed.max_seqlen, backend)
        return packed.with_data(rows).unpack()
    raise ValueError(f"formulation: expected one of {LAYER_FORMULATIONS}, got {formulation!r}")


def make_block(cfg: LayerConfig, device: torch.device) -> nn.Module:
    """A timm ``Block``, or for a DINOv3 config a :class:`RopeLayer` (the first block and rope of timm's
    ``vit_base_patch16_dinov3`` at this width and grid)."""
    import timm
    from timm.models.vision_transformer import Block

    if cfg.rope_grid is None:
        return Block(cfg.width, cfg.heads, mlp_ratio=4.0, qkv_bias=True, init_values=cfg.init_values).to(device)
    model = timm.create_model(
        "vit_base_patch16_dinov3",
        pretrained=False,
        depth=1,
        embed_dim=cfg.width,
        num_heads=cfg.heads,
        img_size=tuple(16 * side for side in cfg.rope_grid),
        init_values=cfg.init_values,
    )
    if model.num_prefix_tokens + cfg.rope_grid[0] * cfg.rope_grid[1] != cfg.seq_len:
        raise ValueError(f"{cfg.name}: seq_len {cfg.seq_len} is not the prefix tokens plus the {cfg.rope_grid} grid")
    return RopeLayer(model.blocks[0], model.rope.get_embed(shape=list(cfg.rope_grid))).to(device)


def layer_token_layout(cfg: LayerConfig) -> tuple[int, tuple[int, int]]:
    """Prefix count and patch grid of a layer config's sequence."""
    if cfg.rope_grid is None:
        return C.token_layout(cfg.seq_len)
    return cfg.seq_len - cfg.rope_grid[0] * cfg.rope_grid[1], cfg.rope_grid


# ------------------------------------------------------------------------------------------------------ helpers
def _autocast(device: torch.device, enabled: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled and device.type == "cuda")


def _failure(exc: Exception) -> dict:
    if isinstance(exc, NotImplementedError):
        return {"status": "unavailable", "reason": f"NotImplementedError: {exc}"[:300]}
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return {"status": "oom", "reason": str(exc).splitlines()[0][:300]}
    return {"status": "error", "reason": f"{type(exc).__name__}: {exc}".splitlines()[0][:300]}


def _timing_fields(timing: C.Timing) -> dict:
    return {
        "status": "ok",
        "reason": "",
        "median_ms": timing.median_ms,
        "p20_ms": timing.p20_ms,
        "p80_ms": timing.p80_ms,
        "iters": timing.iters,
    }


def _measure_group(steps: dict[str, Callable[[], object]], device: torch.device, args) -> dict[str, dict]:
    """Row fields for each named step: timings (median/p20/p80), peak memory on CUDA; failures as status + reason.

    On CUDA each step is timed on its own (events per call) with its own peak-memory window. With ``--interleave``
    (the CPU default: a shared machine) the steps run round-robin so that load changes hit them all alike.
    """
    if args.interleave:
        results = C.measure_interleaved(steps, device, warmup=args.warmup, rounds=args.rounds)
        return {name: _failure(r) if isinstance(r, Exception) else _timing_fields(r) for name, r in results.items()}
    fields = {}
    for name, fn in steps.items():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        try:
            timing = C.measure(
                fn,
                device,
                warmup=args.warmup,
                min_iters=args.min_iters,
                max_iters=args.max_iters,
                budget_s=args.budget_s,
            )
        except Exception as exc:  # noqa: BLE001 - reported in the row, never dropped
            fields[name] = _failure(exc)
            continue
        fields[name] = _timing_fields(timing)
        if device.type == "cuda":
            fields[name]["peak_mem_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return fields


def _print_row(row: dict) -> None:
    result = f"{row['median_ms']:.3f} ms" if row["status"] == "ok" else f"{row['status']}: {row['reason'][:110]}"
    if row.get("images_per_s"):
        result += f"  {row['images_per_s']:.1f} img/s"
    print(
        f"{row['suite']:9s} {row['model']:12s} {row['mode']:8s} kept={row['kept_target']} "
        f"{row['provider']:10s} {result}",
        flush=True,
    )


# ---------------------------------------------------------------------------------------------------- the suites
def _layer_step(block, x, keep, grad, formulation: str, mode: str, device, args) -> Callable[[], object]:
    """The callable timed for one layer formulation: a no-grad forward, or forward + backward into the block's
    parameters and ``x`` (whose ``requires_grad`` this sets)."""
    if mode == "fwd":

        def forward():
            with torch.no_grad(), _autocast(device, args.amp):
                return layer_forward(block, x, keep, formulation, args.backend)

        return forward
    x.requires_grad_(True)

    def forward_backward():
        block.zero_grad(set_to_none=True)
        x.grad = None
        with _autocast(device, args.amp):
            out = layer_forward(block, x, keep, formulation, args.backend)
        out.backward(grad)

    return forward_backward


def run_layer_suite(args, device: torch.device, env: dict) -> list[dict]:
    rows = []
    for model_name in args.layer_models.split(","):
        cfg = LAYER_CONFIGS[model_name]
        batch = args.layer_batch or max(1, args.layer_tokens // cfg.seq_len)
        num_prefix, grid = layer_token_layout(cfg)
        block = make_block(cfg, device)
        for kept in map(float, args.layer_kept.split(",")):
            gen = torch.Generator().manual_seed(args.seed)
            keep = C.with_prefix(C.blob_keep(batch, grid, kept, gen), num_prefix).to(device)
            x = torch.randn(batch, cfg.seq_len, cfg.width, generator=gen).to(device)
            grad = torch.randn(batch, cfg.seq_len, cfg.width, generator=gen).to(device)
            counts = keep.sum(1).tolist()
            for mode in ("fwd", "fwd+bwd"):
                steps = {f: _layer_step(block, x, keep, grad, f, mode, device, args) for f in LAYER_FORMULATIONS}
                measured = _measure_group(steps, device, args)
                block.zero_grad(set_to_none=True)
                x.requires_grad_(False)
                x.grad = None
                for formulation, fields in measured.items():
                    row = C.base_row(
                        env,
                        bench="model",
                        suite="layer",
                        model=model_name,
                        provider=formulation,
                        mode=mode,
                        n=cfg.seq_len,
                        head_dim=cfg.width // cfg.heads,
                        heads=cfg.heads,
                        batch=batch,
                        dtype="bf16-autocast" if args.amp and device.type == "cuda" else "float32",
                        kept_target=kept,
                        kept_actual=float(keep[:, num_prefix:].float().mean()),
                        backend=args.backend,
                        **fields,
                    )
                    if row["status"] == "ok":
                        row["useful_tflops"] = C.tflops(
                            C.vit_block_flops(counts, cfg.width, cfg.heads, mode), row["median_ms"]
                        )
                        row["dense_equiv_tflops"] = C.tflops(
                            C.vit_block_flops([cfg.seq_len] * batch, cfg.width, cfg.heads, mode), row["median_ms"]
                        )
                    rows.append(row)
                    _print_row(row)
        del block
        C.write_results(rows, args.out, "model")  # after every model, so a run cut short keeps what it measured
    return rows


def _create_model(preset: str, device: torch.device, backend: str):
    import faithful_vit

    overrides = {"backend": backend}  # stage 2's kernels on --backend, explicitly
    with warnings.catch_warnings():  # random weights are fine for timing; the frozen-backbone warning is about accuracy
        warnings.simplefilter("ignore")
        return faithful_vit.create_model(preset, **overrides).to(device)


def _force_keep(model: nn.Module, keep_holder: dict) -> None:
    """Make ``model.compute_keep`` return ``keep_holder["keep"]`` while still computing stage 1's gate (same work)."""
    original = model.compute_keep

    def forced(part_logits, **kwargs):
        _, gate = original(part_logits, **kwargs)
        keep = keep_holder["keep"]
        if gate is not None:
            gate = keep.to(gate.dtype) + (gate - gate.detach())
        return keep, gate

    model.compute_keep = forced


def run_model_suites(args, device: torch.device, env: dict, suites: list[str], prior_rows: list[dict]) -> list[dict]:
    rows = []
    for model_name in args.models.split(","):
        preset = MODEL_PRESETS.get(model_name, model_name)
        try:
            model = _create_model(preset, device, args.backend)
        except Exception as exc:  # noqa: BLE001 - a missing preset or model API is a reported row
            for suite in suites:
                rows.append(
                    C.base_row(
                        env,
                        bench="model",
                        suite=suite,
                        model=model_name,
                        provider="all",
                        mode="all",
                        status="unavailable",
                        reason=f"create_model({preset!r}): {type(exc).__name__}: {exc}"[:300],
                    )
                )
                _print_row(rows[-1])
            continue
        batch = args.batch or MODEL_BATCH.get(model_name, 16)
        images = torch.randn(
            batch,
            model.cfg.in_chans,
            model.cfg.img_size,
            model.cfg.img_size,
            generator=torch.Generator().manual_seed(args.seed),
        ).to(device)
        labels = torch.randint(0, model.num_classes, (batch,), generator=torch.Generator().manual_seed(1)).to(device)
        keep_holder: dict = {}
        _force_keep(model, keep_holder)
        seq_len = model.num_patches + model.stage2.num_prefix_tokens
        for kept in map(float, args.kept.split(",")):
            gen = torch.Generator().manual_seed(args.seed)
            keep_holder["keep"] = C.blob_keep(batch, model.grid_size, kept, gen).to(device)
            for suite in suites:
                for phase in ("infer", "train"):
                    steps = {
                        mode: _model_step(model, suite, phase, mode, images, labels, keep_holder["keep"], device, args)
                        for mode in STAGE2_MODES
                    }
                    measured = _measure_group(steps, device, args)
                    model.zero_grad(set_to_none=True)
                    for mode, fields in measured.items():
                        row = C.base_row(
                            env,
                            bench="model",
                            suite=suite,
                            model=model_name,
                            preset=preset,
                            provider=mode,
                            mode=phase,
                            n=seq_len,
                            batch=batch,
                            heads=model.stage2.blocks[0].attn.num_heads,
                            head_dim=model.stage2.blocks[0].attn.head_dim,
                            dtype="bf16-autocast" if args.amp and device.type == "cuda" else "float32",
                            kept_target=kept,
                            kept_actual=float(keep_holder["keep"].float().mean()),
                            backend=args.backend,
                            **fields,
                        )
                        if row["status"] == "ok":
                            row["images_per_s"] = batch / (row["median_ms"] * 1e-3)
                        rows.append(row)
                        _print_row(row)
        del model
        C.write_results(prior_rows + rows, args.out, "model")
    return rows


def _model_step(model, suite: str, phase: str, mode: str, images, labels, keep, device, args) -> Callable[[], None]:
    """The callable timed for one (suite, phase, mode); optimizers are built here, outside the timing."""
    if phase == "infer":

        def infer():
            model.eval()
            with torch.no_grad(), _autocast(device, args.amp):
                if suite == "stage2":
                    return model.forward_stage2(images, keep, mode=mode)
                return model(images, mode=mode).stage2_logits

        return infer
    fused = device.type == "cuda"
    if suite == "stage2":
        params = [p for p in model.stage2.parameters() if p.requires_grad]
        params += list(model.fc_norm.parameters()) + list(model.head.parameters())
        optimizer = torch.optim.AdamW(params, lr=1e-5, fused=fused)

        def train_stage2():
            model.train()
            optimizer.zero_grad(set_to_none=True)
            with _autocast(device, args.amp):
                logits = model.forward_stage2(images, keep, mode=mode)
            F.cross_entropy(logits.float(), labels).backward()
            optimizer.step()

        return train_stage2
    optimizer = torch.optim.AdamW(model.param_groups(lr=1e-5, weight_decay=0.05), fused=fused)

    def train_two_stage():
        model.train()
        optimizer.zero_grad(set_to_none=True)
        with _autocast(device, args.amp):
            out = model(images, mode=mode)
            losses = training_losses(model, out, images, labels)
        losses["total"].float().backward()
        optimizer.step()

    return train_two_stage


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--suites", default="layer,stage2,two_stage")
    parser.add_argument(
        "--models",
        default="vit_b14_518,vit_s16_224",
        help=f"model suites: keys of {sorted(MODEL_PRESETS)} or faithful_vit preset names",
    )
    parser.add_argument("--kept", default="0.75,0.5,0.25", help="kept fractions of the model suites")
    parser.add_argument("--batch", type=int, default=None, help=f"model-suite batch (default {MODEL_BATCH})")
    parser.add_argument(
        "--layer-models",
        default="vit_b14_518,vit_b16_224",
        help=f"keys of {sorted(LAYER_CONFIGS)} (the DINOv3 layers: dinov3_b16_512, dinov3_s16_224)",
    )
    parser.add_argument("--layer-kept", default="1.0,0.7,0.5,0.25", help="kept fractions of the layer suite")
    parser.add_argument("--layer-batch", type=int, default=None)
    parser.add_argument("--layer-tokens", type=int, default=32768, help="layer batch = tokens // N")
    parser.add_argument("--backend", default=None, help="our kernels' backend (default: triton on CUDA, torch on CPU)")
    parser.add_argument("--no-amp", dest="amp", action="store_false", help="fp32 instead of bf16 autocast on CUDA")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--min-iters", type=int, default=5)
    parser.add_argument("--max-iters", type=int, default=50)
    parser.add_argument("--budget-s", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--interleave",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="time the formulations round-robin (default on the CPU, a shared machine)",
    )
    parser.add_argument("--rounds", type=int, default=7, help="rounds of --interleave")
    parser.add_argument("--quick", action="store_true", help="fewer iterations")
    parser.add_argument(
        "--cpu-tiny",
        action="store_true",
        help="CPU, faithful_tiny preset and a ViT-S/16 layer, reference attention (a few minutes)",
    )
    parser.add_argument("--smoke", action="store_true", help="with --cpu-tiny: one timed call each (seconds)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--out", type=Path, default=C.RESULTS_DIR / "latest")
    parser.add_argument("--no-plots", action="store_true")
    C.add_autotune_argument(parser)
    args = parser.parse_args(argv)
    if args.cpu_tiny:
        args.device = args.device or "cpu"
        args.models, args.batch, args.kept = "tiny", args.batch or 16, "1.0,0.5,0.25"
        args.layer_models, args.layer_batch = "vit_s16_224,dinov3_s16_224", args.layer_batch or 8
        args.layer_kept = "1.0,0.5,0.25"
        args.warmup, args.rounds = 1, 5
    if args.quick:
        args.warmup, args.min_iters, args.max_iters, args.budget_s = 2, 3, 20, 0.3
    if args.smoke:
        args.rounds = 1
        args.kept, args.layer_kept = "0.5", "0.5"
        args.layer_models = (
            "vit_s16_224,dinov3_s16_224"
            if args.layer_models == parser.get_default("layer_models")
            else args.layer_models
        )
        args.batch, args.layer_batch = min(args.batch or 4, 4), 2
        args.warmup, args.min_iters, args.max_iters, args.budget_s = 0, 1, 1, 0.0
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    C.apply_autotune(args)
    device = C.pick_device(args.device)
    args.backend = args.backend or ("triton" if device.type == "cuda" else "torch")
    if args.interleave is None:
        args.interleave = device.type == "cpu"
    if device.type == "cpu":
        torch.manual_seed(args.seed)
    env = C.environment(device)
    print(
        f"# {env['device_name']} | torch {env['torch']} | triton {env['triton']} | timm {env['timm']} | "
        f"commit {env['commit']} | backend {args.backend} | threads {env['cpu_threads']}",
        flush=True,
    )
    if args.backend == "torch":
        print(
            "# NOTE: our kernels run through their PyTorch reference backend here (masked = dense einsum, packed = "
            "per-image loop): these numbers show how work scales with kept tokens, not kernel speed.",
            flush=True,
        )
    suites = [s for s in args.suites.split(",") if s]
    unknown = sorted(set(suites) - {"layer", "stage2", "two_stage"})
    if unknown:
        raise SystemExit(f"--suites: unknown {unknown}; expected layer, stage2, two_stage")
    rows = []
    # The model's attention modules resolve backend="auto" through the process-wide setting: pin it to --backend
    # (otherwise a CPU process with TRITON_INTERPRET=1 would run the whole model through the Triton interpreter).
    with K.use_backend(args.backend):
        if "layer" in suites:
            rows += run_layer_suite(args, device, env)
        model_suites = [s for s in suites if s != "layer"]
        if model_suites:
            rows += run_model_suites(args, device, env, model_suites, rows)
    # against the dense formulations of the same (suite, model, mode, kept fraction)
    C.add_speedups(rows, ("suite", "model", "mode", "kept_target"), ("dense", "dense_mask"))
    C.write_results(rows, args.out, "model")
    if not args.no_plots:
        C.plot_time_vs_kept(rows, args.out, "model", group_keys=("suite", "mode"), panel_key="model")
    print(
        C.format_table(
            [r for r in rows if r["status"] == "ok"],
            (
                "suite",
                "model",
                "mode",
                "kept_target",
                "provider",
                "median_ms",
                "images_per_s",
                "peak_mem_mib",
                "speedup_vs_dense",
            ),
        )
    )
    for row in rows:
        if row["status"] != "ok":
            print(
                f"NOT MEASURED {row['suite']} {row['model']} {row['provider']} {row['mode']}: {row['status']}: "
                f"{row['reason']}"
            )
    print(f"wrote {args.out / 'model.json'}")
    return rows


if __name__ == "__main__":
    main()
