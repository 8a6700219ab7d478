"""Kernel benchmark: masked and varlen attention against every peer, across kept fractions and sequence lengths.

Run (one command): ``python -m benchmarks.bench_attention`` (GPU, full sweep) or ``--smoke`` (tiny shapes, CPU allowed:
every provider runs once to prove it executes; Triton providers run under ``TRITON_INTERPRET=1`` on the CPU).

Inputs imitate a ViT's attention: one ``(B, N, 3, H, D)`` qkv tensor (timm's projection layout; q, k, v are views),
width ``H * D`` = 768 by default, ``B`` chosen so that ``B * N`` is about ``--tokens`` (fills an H100). Keep masks are
per-image blobs on the patch grid with per-image kept counts around the target (``_common.blob_keep``); CLS and
register tokens are always kept. Every provider computes the same function on the kept queries (each kept query
attends to the kept keys of its image), except ``sdpa_flash_dense``, the no-mask ceiling over all tokens.

Providers (each behind an availability check; an unavailable or failing one is a row with ``status`` and ``reason``):
    ours_masked          masked_attention on raster-order tokens (no compaction).
    ours_masked_compact  masked_attention after ``compaction_order`` (kept tokens first); the compaction runs once per
                         batch in a model, so it is timed separately (``setup_ms``), not per call.
    ours_varlen          gather qkv of kept tokens -> varlen_attention -> scatter back; gather/scatter included
                         (and timed alone in ``gather_scatter_ms``).
    ours_varlen_core     varlen_attention alone on already gathered tokens (what the packed model runs per layer).
    sdpa_flash_dense     SDPA flash backend, all N tokens, no mask: the ceiling.
    sdpa_bool_mask       SDPA with the boolean key mask ``[B, 1, 1, N]`` (what the authors' code runs).
    flex / flex_incl_build   compiled flex_attention with a BlockMask from the same mask (query and key kept);
                         ``flex`` times attention with a prebuilt mask (build in ``setup_ms``), ``flex_incl_build``
                         times build + attention together.
    xformers             memory_efficient_attention with BlockDiagonalMask over the gathered tokens (core, like
                         ours_varlen_core).
    torch_varlen         torch.nn.attention.varlen.varlen_attn on the gathered tokens (core).
    nested_sdpa          SDPA on a jagged nested tensor of the gathered tokens (core).

Rows: milliseconds (median/p20/p80), useful TFLOP/s (kept query x kept key pairs only), dense-equivalent TFLOP/s
(N x N pairs), peak memory, max error against the float64 reference on the kept rows of two images, and
``speedup_vs_<peer>`` for our providers. Results: ``<out>/attention.json`` + ``.csv`` + PNGs (time vs kept fraction).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

if __package__ in (None, ""):  # `python benchmarks/bench_attention.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

if not torch.cuda.is_available():  # the interpreter must be on before Triton defines any kernel
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.nn.functional as F  # noqa: E402

from benchmarks import _common as C  # noqa: E402
from faithful_vit import kernels as K  # noqa: E402

# Providers that do not depend on the mask are timed once per (N, D, mode) and their row reused for every kept value.
MASK_INDEPENDENT = ("sdpa_flash_dense",)


@dataclass
class Case:
    """One benchmark configuration's inputs. ``qkv`` is ``(B, N, 3, H, D)``; ``packed`` is its kept rows
    ``(T, 3, H, D)`` (a separate leaf, for the providers that start from gathered tokens)."""

    qkv: torch.Tensor
    packed: torch.Tensor
    keep: torch.Tensor
    index: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    counts: list[int]
    grad_out: torch.Tensor
    grad_packed: torch.Tensor
    backend: str

    @property
    def shape(self) -> tuple[int, int, int, int]:
        batch, seq_len, _, heads, head_dim = self.qkv.shape
        return batch, seq_len, heads, head_dim


def make_case(
    batch: int,
    seq_len: int,
    heads: int,
    head_dim: int,
    kept: float,
    dtype: torch.dtype,
    device: torch.device,
    seed: int,
    backend: str,
    with_grad: bool,
) -> Case:
    gen = torch.Generator().manual_seed(seed)
    num_prefix, grid = C.token_layout(seq_len)
    keep = C.with_prefix(C.blob_keep(batch, grid, kept, gen), num_prefix).to(device)
    device_gen = torch.Generator(device=device).manual_seed(seed)  # large tensors are drawn where they live
    qkv = torch.randn(batch, seq_len, 3, heads, head_dim, generator=device_gen, device=device).to(dtype)
    index = torch.nonzero(keep.reshape(-1)).squeeze(1)
    counts = keep.sum(1)
    cu_seqlens = F.pad(torch.cumsum(counts, 0, dtype=torch.int32), (1, 0))
    packed = qkv.reshape(batch * seq_len, 3, heads, head_dim).index_select(0, index).detach()
    grad_out = torch.randn(batch, seq_len, heads, head_dim, generator=device_gen, device=device).to(dtype)
    grad_packed = grad_out.reshape(batch * seq_len, heads, head_dim).index_select(0, index)
    qkv.requires_grad_(with_grad)
    packed.requires_grad_(with_grad)
    counts_list = counts.tolist()
    return Case(qkv, packed, keep, index, cu_seqlens, max(counts_list), counts_list, grad_out, grad_packed, backend)


def _bhnd(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(1, 2)


def _scatter(case: Case, rows: torch.Tensor) -> torch.Tensor:
    """``(T, H, D)`` kept rows back to ``(B, N, H, D)``, zeros elsewhere."""
    batch, seq_len, heads, head_dim = case.shape
    full = rows.new_zeros(batch * seq_len, heads, head_dim).index_copy(0, case.index, rows)
    return full.view(batch, seq_len, heads, head_dim)


@dataclass
class Built:
    """A ready-to-time provider: ``run()`` returns its output in its own layout; ``grad`` matches that layout;
    ``leaves`` get their ``.grad`` cleared between calls; ``to_dense`` maps an output to ``(B, N, H, D)`` for the
    check; ``exact`` says whether the provider computes the masked function (False only for the dense ceiling)."""

    run: Callable[[], torch.Tensor]
    grad: torch.Tensor
    leaves: tuple[torch.Tensor, ...]
    to_dense: Callable[[torch.Tensor], torch.Tensor]
    exact: bool = True
    setup_ms: float | None = None
    extra: dict | None = None


def _identity(out: torch.Tensor) -> torch.Tensor:
    return out


def _ours_masked(case: Case, device: torch.device, flex_block: int) -> Built:
    q, k, v = case.qkv.unbind(2)

    def run():
        return _bhnd(K.masked_attention(_bhnd(q), _bhnd(k), _bhnd(v), case.keep, backend=case.backend))

    return Built(run, case.grad_out, (case.qkv,), _identity)


def _ours_masked_compact(case: Case, device: torch.device, flex_block: int) -> Built:
    order_holder = {}
    setup_ms = C.timed_once_ms(
        lambda: order_holder.update(zip(("order", "inverse"), K.compaction_order(case.keep))), device
    )
    order, inverse = order_holder["order"], order_holder["inverse"]
    gather_index = order[:, :, None, None, None].expand_as(case.qkv)
    compact = case.qkv.detach().gather(1, gather_index).requires_grad_(case.qkv.requires_grad)
    keep_c = case.keep.gather(1, order)
    cq, ck, cv = compact.unbind(2)
    grad_c = case.grad_out.gather(1, order[:, :, None, None].expand_as(case.grad_out))

    def run():
        return _bhnd(K.masked_attention(_bhnd(cq), _bhnd(ck), _bhnd(cv), keep_c, backend=case.backend))

    def to_dense(out):
        return out.gather(1, inverse[:, :, None, None].expand_as(out))

    return Built(run, grad_c, (compact,), to_dense, setup_ms=setup_ms)


def _varlen_on_packed(case: Case, packed_qkv: torch.Tensor) -> torch.Tensor:
    q, k, v = packed_qkv.unbind(1)
    return K.varlen_attention(q, k, v, case.cu_seqlens, case.max_seqlen, check_cu_seqlens=False, backend=case.backend)


def _ours_varlen(case: Case, device: torch.device, flex_block: int) -> Built:
    batch, seq_len, _, heads, head_dim = case.qkv.shape

    def gather():
        return case.qkv.reshape(batch * seq_len, 3, heads, head_dim).index_select(0, case.index)

    gather_scatter = C.measure(
        lambda: _scatter(case, gather()[:, 0]), device, warmup=2, min_iters=5, max_iters=50, budget_s=0.1
    )
    return Built(
        lambda: _scatter(case, _varlen_on_packed(case, gather())),
        case.grad_out,
        (case.qkv,),
        _identity,
        extra={"gather_scatter_ms": gather_scatter.median_ms},
    )


def _ours_varlen_core(case: Case, device: torch.device, flex_block: int) -> Built:
    return Built(
        lambda: _varlen_on_packed(case, case.packed), case.grad_packed, (case.packed,), partial(_scatter, case)
    )


def _sdpa_flash_dense(case: Case, device: torch.device, flex_block: int) -> Built:
    q, k, v = case.qkv.unbind(2)
    if device.type == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        context = partial(sdpa_kernel, [SDPBackend.FLASH_ATTENTION])
    else:  # no flash backend on the CPU: SDPA picks its CPU kernel (smoke runs only)
        context = contextlib.nullcontext

    def run():
        with context():
            return _bhnd(F.scaled_dot_product_attention(_bhnd(q), _bhnd(k), _bhnd(v)))

    return Built(run, case.grad_out, (case.qkv,), _identity, exact=False)


def _sdpa_bool_mask(case: Case, device: torch.device, flex_block: int) -> Built:
    q, k, v = case.qkv.unbind(2)
    mask = case.keep[:, None, None, :]
    return Built(
        lambda: _bhnd(F.scaled_dot_product_attention(_bhnd(q), _bhnd(k), _bhnd(v), attn_mask=mask)),
        case.grad_out,
        (case.qkv,),
        _identity,
    )


def _flex(case: Case, device: torch.device, flex_block: int, *, include_build: bool) -> Built:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    keep = case.keep
    batch, seq_len, _, _ = case.shape

    def mask_mod(b, h, q_idx, kv_idx):
        return keep[b, q_idx] & keep[b, kv_idx]

    def build_mask():
        return create_block_mask(mask_mod, batch, None, seq_len, seq_len, device=device, BLOCK_SIZE=flex_block)

    attend = _compiled_flex(flex_attention) if device.type == "cuda" else flex_attention
    build_mask()  # first build traces mask_mod; the timed builds below are the steady-state cost
    holder = {}
    setup_ms = C.timed_once_ms(lambda: holder.update(mask=build_mask()), device)
    # Flex gets its preferred layout, contiguous (3, B, H, N, D), prepared outside the timing.
    qkv_bhnd = case.qkv.detach().permute(2, 0, 3, 1, 4).contiguous().requires_grad_(case.qkv.requires_grad)
    fq, fk, fv = qkv_bhnd.unbind(0)
    grad_bhnd = _bhnd(case.grad_out).contiguous()

    def run():
        return attend(fq, fk, fv, block_mask=build_mask() if include_build else holder["mask"])

    return Built(run, grad_bhnd, (qkv_bhnd,), _bhnd, setup_ms=setup_ms)


def _xformers(case: Case, device: torch.device, flex_block: int) -> Built:
    import xformers.ops as xops
    from xformers.ops import fmha

    pq, pk, pv = case.packed.unbind(1)
    holder = {}
    setup_ms = C.timed_once_ms(
        lambda: holder.update(bias=fmha.attn_bias.BlockDiagonalMask.from_seqlens(case.counts)), device
    )
    return Built(
        lambda: xops.memory_efficient_attention(pq[None], pk[None], pv[None], attn_bias=holder["bias"])[0],
        case.grad_packed,
        (case.packed,),
        partial(_scatter, case),
        setup_ms=setup_ms,
    )


def _torch_varlen(case: Case, device: torch.device, flex_block: int) -> Built:
    from torch.nn.attention.varlen import varlen_attn

    pq, pk, pv = case.packed.unbind(1)
    return Built(
        lambda: varlen_attn(pq, pk, pv, case.cu_seqlens, case.cu_seqlens, case.max_seqlen, case.max_seqlen),
        case.grad_packed,
        (case.packed,),
        partial(_scatter, case),
    )


def _nested_sdpa(case: Case, device: torch.device, flex_block: int) -> Built:
    pq, pk, pv = case.packed.unbind(1)
    offsets = case.cu_seqlens.long()

    def run():
        nq, nk, nv = (
            torch.nested.nested_tensor_from_jagged(t, offsets, max_seqlen=case.max_seqlen) for t in (pq, pk, pv)
        )
        out = F.scaled_dot_product_attention(nq.transpose(1, 2), nk.transpose(1, 2), nv.transpose(1, 2))
        return out.transpose(1, 2).values()

    return Built(run, case.grad_packed, (case.packed,), partial(_scatter, case))


# Provider name -> builder ``(case, device, flex_block) -> Built`` (see the module docstring for what each runs).
BUILDERS: dict[str, Callable[[Case, torch.device, int], Built]] = {
    "ours_masked": _ours_masked,
    "ours_masked_compact": _ours_masked_compact,
    "ours_varlen": _ours_varlen,
    "ours_varlen_core": _ours_varlen_core,
    "sdpa_flash_dense": _sdpa_flash_dense,
    "sdpa_bool_mask": _sdpa_bool_mask,
    "flex": partial(_flex, include_build=False),
    "flex_incl_build": partial(_flex, include_build=True),
    "xformers": _xformers,
    "torch_varlen": _torch_varlen,
    "nested_sdpa": _nested_sdpa,
}
OURS = tuple(name for name in BUILDERS if name.startswith("ours_"))
PEERS = tuple(name for name in BUILDERS if not name.startswith("ours_"))
PROVIDERS = tuple(BUILDERS)
# Providers that need an optional import: name -> (module, attribute).
_REQUIRES = {
    "flex": ("torch.nn.attention.flex_attention", "flex_attention"),
    "flex_incl_build": ("torch.nn.attention.flex_attention", "flex_attention"),
    "xformers": ("xformers.ops", "memory_efficient_attention"),
    "torch_varlen": ("torch.nn.attention.varlen", "varlen_attn"),
    "nested_sdpa": ("torch.nested", "nested_tensor_from_jagged"),
}


def build_provider(name: str, case: Case, device: torch.device, flex_block: int) -> Built:
    """Construct provider ``name`` for ``case`` (raises if it cannot run here; the caller records why)."""
    if name not in BUILDERS:
        raise ValueError(f"provider: expected one of {PROVIDERS}, got {name!r}")
    return BUILDERS[name](case, device, flex_block)


_FLEX_COMPILED = {}


def _compiled_flex(flex_attention):
    if "fn" not in _FLEX_COMPILED:
        import torch._dynamo

        # One compilation per (B, N, D, grad) in the sweep; the default limit (8) would silently fall back to eager.
        for limit in ("cache_size_limit", "recompile_limit"):
            if hasattr(torch._dynamo.config, limit):
                setattr(torch._dynamo.config, limit, 64)
        _FLEX_COMPILED["fn"] = torch.compile(flex_attention, dynamic=False)
    return _FLEX_COMPILED["fn"]


def provider_availability(name: str, device: torch.device) -> C.Availability:
    """Whether a provider can be tried at all here (a provider that passes may still fail; that is recorded too)."""
    return C.import_available(*_REQUIRES[name]) if name in _REQUIRES else C.Availability(True)


def reference_error(case: Case, dense_out: torch.Tensor, images: int = 2) -> float:
    """Max |out - ref| over the kept query rows of the first ``images`` images (float64 reference)."""
    q, k, v = (t[:images].detach() for t in case.qkv.unbind(2))
    keep = case.keep[:images]
    ref = K.reference.masked_attention_ref(_bhnd(q), _bhnd(k), _bhnd(v), keep, upcast=True)
    diff = (_bhnd(ref).double() - dense_out[:images].detach().double()).abs()
    return float(diff[keep].max()) if bool(keep.any()) else 0.0


def run_provider(name: str, case: Case, mode: str, device: torch.device, args) -> dict:
    """Time one provider on one case; returns the fields of its row (status ok/unavailable/skipped/error/oom)."""
    seq_len = case.shape[1]
    if name.startswith("flex") and args.flex_n != "all" and str(seq_len) not in args.flex_n.split(","):
        return {"status": "skipped", "reason": f"N={seq_len} not in --flex-n {args.flex_n} (compile time budget)"}
    available = provider_availability(name, device)
    if not available.ok:
        return {"status": "unavailable", "reason": available.reason}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base_mem = torch.cuda.memory_allocated(device)
    try:
        built = build_provider(name, case, device, args.flex_block)
        if mode == "fwd":

            def step():
                with torch.no_grad():
                    return built.run()
        else:

            def step():
                for leaf in built.leaves:
                    leaf.grad = None
                out = built.run()
                out.backward(built.grad)
                return out

        err = None
        if built.exact:
            with torch.no_grad():
                err = reference_error(case, built.to_dense(built.run()))
        timing = C.measure(
            step, device, warmup=args.warmup, min_iters=args.min_iters, max_iters=args.max_iters, budget_s=args.budget_s
        )
    except NotImplementedError as exc:
        return {"status": "unavailable", "reason": f"NotImplementedError: {exc}"[:300]}
    except torch.cuda.OutOfMemoryError as exc:
        return {"status": "oom", "reason": str(exc).splitlines()[0][:300]}
    except Exception as exc:  # noqa: BLE001 - a failing peer is reported, never dropped
        return {"status": "error", "reason": f"{type(exc).__name__}: {exc}".splitlines()[0][:300]}
    finally:
        for leaf in (case.qkv, case.packed):
            leaf.grad = None
    fields = {
        "status": "ok",
        "reason": "",
        "median_ms": timing.median_ms,
        "p20_ms": timing.p20_ms,
        "p80_ms": timing.p80_ms,
        "iters": timing.iters,
        "setup_ms": built.setup_ms,
        "max_abs_err": err,
    }
    fields.update(built.extra or {})
    if device.type == "cuda":
        fields["peak_mem_mib"] = (torch.cuda.max_memory_allocated(device) - base_mem) / 2**20
    return fields


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--n",
        default="1374,197,577,261",
        help="sequence lengths N (comma list; the target sizes first, so a run cut short has them)",
    )
    parser.add_argument("--head-dim", default="64", help="head dims (comma list, e.g. 64,128)")
    parser.add_argument("--kept", default="1.0,0.75,0.5,0.25,0.1", help="target kept fractions (comma list)")
    parser.add_argument("--mode", default="fwd,fwd+bwd", help="fwd and/or fwd+bwd")
    parser.add_argument("--dtype", default=None, help="bfloat16 (GPU default) | float16 | float32 (CPU default)")
    parser.add_argument("--providers", default=",".join(PROVIDERS), help="subset of providers (comma list)")
    parser.add_argument("--width", type=int, default=768, help="model width; heads = width // head_dim")
    parser.add_argument("--tokens", type=int, default=32768, help="batch = max(1, tokens // N)")
    parser.add_argument("--backend", default="triton", help="backend of our providers: triton | torch")
    parser.add_argument("--flex-block", type=int, default=128, help="FlexAttention BLOCK_SIZE")
    parser.add_argument(
        "--flex-n",
        default="197,1374",
        help="N values at which Flex runs (each N costs a compilation of about a minute); 'all'",
    )
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--min-iters", type=int, default=10)
    parser.add_argument("--max-iters", type=int, default=100)
    parser.add_argument("--budget-s", type=float, default=0.2, help="timing budget per measurement (seconds)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="fewer iterations (GPU session on a tight budget)")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="tiny shapes (B=1-2, H=2, D=16, N=37/65), each provider once: checks that it runs",
    )
    parser.add_argument("--device", default=None)
    parser.add_argument("--out", type=Path, default=C.RESULTS_DIR / "latest", help="output folder")
    parser.add_argument("--no-plots", action="store_true")
    C.add_autotune_argument(parser)
    args = parser.parse_args(argv)
    if args.smoke:  # tiny shapes unless given explicitly
        args.flex_n = "all"
        for name, value in (("n", "37,65"), ("head_dim", "16"), ("kept", "1.0,0.5,0.1"), ("width", 32), ("tokens", 74)):
            if getattr(args, name) == parser.get_default(name):
                setattr(args, name, value)
        args.warmup, args.min_iters, args.max_iters, args.budget_s = 0, 1, 1, 0.0
    if args.quick:
        args.warmup, args.min_iters, args.max_iters, args.budget_s = 3, 5, 50, 0.1
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    C.apply_autotune(args)
    device = C.pick_device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    providers = [p for p in args.providers.split(",") if p]
    unknown = sorted(set(providers) - set(PROVIDERS))
    if unknown:
        raise SystemExit(f"--providers: unknown {unknown}; expected a subset of {PROVIDERS}")
    env = C.environment(device)
    print(
        f"# {env['device_name']} | torch {env['torch']} | triton {env['triton']} | xformers {env['xformers']} | "
        f"commit {env['commit']} | dtype {dtype} | TRITON_INTERPRET={env['triton_interpret']}",
        flush=True,
    )
    rows = []
    for head_dim in map(int, args.head_dim.split(",")):
        heads = max(1, args.width // head_dim)
        for seq_len in map(int, args.n.split(",")):
            batch = max(1, args.tokens // seq_len)
            reused: dict[tuple[str, str], dict] = {}
            for kept in map(float, args.kept.split(",")):
                for mode in args.mode.split(","):
                    case = make_case(
                        batch,
                        seq_len,
                        heads,
                        head_dim,
                        kept,
                        dtype,
                        device,
                        args.seed,
                        args.backend,
                        with_grad=mode != "fwd",
                    )
                    kept_actual = float(case.keep[:, C.token_layout(seq_len)[0] :].float().mean())
                    useful = C.attention_flops(case.counts, case.counts, heads, head_dim, mode)
                    dense = C.attention_flops([seq_len] * batch, [seq_len] * batch, heads, head_dim, mode)
                    for name in providers:
                        if name in MASK_INDEPENDENT and (name, mode) in reused:
                            fields = dict(reused[(name, mode)], reused=True)
                        else:
                            fields = run_provider(name, case, mode, device, args)
                            if name in MASK_INDEPENDENT:
                                reused[(name, mode)] = fields
                        row = C.base_row(
                            env,
                            bench="attention",
                            suite="kernel",
                            provider=name,
                            mode=mode,
                            n=seq_len,
                            head_dim=head_dim,
                            heads=heads,
                            batch=batch,
                            dtype=str(dtype).removeprefix("torch."),
                            kept_target=kept,
                            kept_actual=kept_actual,
                            backend=args.backend,
                            **fields,
                        )
                        if row["status"] == "ok":
                            row["useful_tflops"] = C.tflops(useful, row["median_ms"])
                            row["dense_equiv_tflops"] = C.tflops(dense, row["median_ms"])
                        rows.append(row)
                        status = (
                            f"{row['median_ms']:.4f} ms"
                            if row["status"] == "ok"
                            else f"{row['status']}: {row['reason'][:100]}"
                        )
                        print(
                            f"D={head_dim} N={seq_len} B={batch} H={heads} kept={kept} {mode:8s} {name:20s} {status}",
                            flush=True,
                        )
                    del case
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
            C.write_results(rows, args.out, "attention")  # after every N, so a run cut short keeps what it measured
    # speedup_vs_<peer> = peer median / ours median, per (N, head dim, mode, kept fraction)
    C.add_speedups(rows, ("n", "head_dim", "mode", "kept_target"), PEERS + OURS, providers=OURS)
    C.write_results(rows, args.out, "attention")
    if not args.no_plots:
        C.plot_time_vs_kept(rows, args.out, "attention")
    print(
        C.format_table(
            [r for r in rows if r["status"] == "ok"],
            ("n", "head_dim", "mode", "kept_target", "provider", "median_ms", "useful_tflops"),
        )
    )
    missing = sorted({(r["provider"], r["status"], r["reason"]) for r in rows if r["status"] != "ok"})
    for provider, status, reason in missing:
        print(f"NOT MEASURED {provider}: {status}: {reason}")
    print(f"wrote {args.out / 'attention.json'}")
    return rows


if __name__ == "__main__":
    main()
