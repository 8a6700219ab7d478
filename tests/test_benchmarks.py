"""Benchmarks: CPU-side pieces under pytest-benchmark (plain tests in CI: ``--benchmark-disable`` is in addopts),
the benchmark machinery (masks, FLOPs, timing, targets), the layer formulations against timm, and smoke runs of both
benchmark scripts end to end."""

import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `benchmarks` lives at the repository root

from benchmarks import _common as C  # noqa: E402
from benchmarks import bench_attention, bench_model, targets  # noqa: E402
from faithful_vit import kernels as K  # noqa: E402
from faithful_vit.kernels import reference  # noqa: E402

BATCH, SEQ, WIDTH, HEADS = 8, 197, 64, 2


def _tokens_and_keep(kept=0.5):
    gen = torch.Generator().manual_seed(0)
    keep = C.with_prefix(C.blob_keep(BATCH, (14, 14), kept, gen), 1)
    return torch.randn(BATCH, SEQ, WIDTH), keep


# ---------------------------------------------------------------------------- pytest-benchmark: CPU-side pieces
@pytest.mark.benchmark(group="packing")
def test_bench_pack_tokens(benchmark):
    x, keep = _tokens_and_keep()
    packed = benchmark(K.pack_tokens, x, keep, max_seqlen=SEQ)
    data, cu_seqlens = reference.pack_tokens_ref(x, keep)
    assert torch.equal(packed.data, data) and torch.equal(packed.cu_seqlens, cu_seqlens)


@pytest.mark.benchmark(group="packing")
def test_bench_unpack(benchmark):
    x, keep = _tokens_and_keep()
    packed = K.pack_tokens(x, keep)
    out = benchmark(packed.unpack)
    assert torch.equal(out, reference.unpack_tokens_ref(packed.data, keep))


@pytest.mark.benchmark(group="packing")
def test_bench_pack_tokens_ref(benchmark):
    x, keep = _tokens_and_keep()
    data, cu_seqlens = benchmark(reference.pack_tokens_ref, x, keep)
    assert data.shape == (int(keep.sum()), WIDTH) and int(cu_seqlens[-1]) == int(keep.sum())


@pytest.mark.benchmark(group="references")
def test_bench_masked_attention_ref(benchmark):
    _, keep = _tokens_and_keep()
    q, k, v = torch.randn(3, BATCH, HEADS, SEQ, 32).unbind(0)
    out = benchmark(reference.masked_attention_ref, q, k, v, keep, upcast=False)
    assert torch.isfinite(out).all() and (out[~keep[:, None, :, None].expand_as(out)] == 0).all()


@pytest.mark.benchmark(group="references")
def test_bench_varlen_attention_ref(benchmark):
    x, keep = _tokens_and_keep()
    packed = K.pack_tokens(x, keep)
    q, k, v = torch.randn(3, packed.data.shape[0], HEADS, 32).unbind(0)
    out = benchmark(reference.varlen_attention_ref, q, k, v, packed.cu_seqlens, upcast=False)
    assert out.shape == q.shape and torch.isfinite(out).all()


@pytest.mark.benchmark(group="compaction")
def test_bench_compaction_order(benchmark):
    _, keep = _tokens_and_keep()
    order, inverse = benchmark(K.compaction_order, keep)
    compacted = keep.gather(1, order)
    counts = keep.sum(1, keepdim=True)
    assert torch.equal(compacted, torch.arange(SEQ)[None] < counts)
    assert torch.equal(compacted.gather(1, inverse), keep)


# ---------------------------------------------------------------------------------------- benchmark machinery
@pytest.mark.parametrize("kept", [1.0, 0.75, 0.5, 0.25, 0.1])
def test_blob_keep_counts_and_coherence(kept):
    gen = torch.Generator().manual_seed(1)
    grid = (37, 37)
    keep = C.blob_keep(64, grid, kept, gen)
    fractions = keep.float().mean(1)
    half_width = min(kept / 2, 1 - kept)
    assert ((fractions >= kept - half_width - 1e-3) & (fractions <= kept + half_width + 1e-3)).all()
    assert abs(float(fractions.mean()) - kept) < 0.06
    if 0.1 <= kept < 1.0:
        assert float(fractions.std()) > 0.01  # the per-image variation is real
        # A blob: far fewer kept/dropped boundaries between horizontal neighbours than an i.i.d. mask would have.
        image = keep.view(64, *grid)
        boundaries = (image[:, :, 1:] != image[:, :, :-1]).float().mean()
        assert float(boundaries) < 0.5 * 2 * kept * (1 - kept)


def test_with_prefix_and_layouts():
    keep = C.with_prefix(torch.zeros(3, 16, dtype=torch.bool), 5)
    assert keep.shape == (3, 21) and keep[:, :5].all() and not keep[:, 5:].any()
    for n, (prefix, (h, w)) in C.TOKEN_LAYOUTS.items():
        assert prefix + h * w == n
    prefix, (h, w) = C.token_layout(37)
    assert prefix + h * w == 37


def test_flop_counts():
    assert C.attention_flops([3, 2], [3, 2], heads=2, head_dim=8, mode="fwd") == 4 * (9 + 4) * 2 * 8
    assert C.attention_flops([3], [3], 1, 8, "fwd+bwd") == 3.5 * C.attention_flops([3], [3], 1, 8, "fwd")
    width, n = 768, 1374
    linear = 24 * n * width**2
    attention = 4 * n * n * width
    assert math.isclose(C.vit_block_flops([n], width, 12, "fwd"), linear + attention)
    assert math.isclose(C.vit_block_flops([n], width, 12, "fwd+bwd"), 3 * linear + 3.5 * attention)
    fraction = attention / (linear + attention)  # attention is about a quarter of a ViT-B/14@518 layer's FLOPs
    assert 0.22 < fraction < 0.24


def test_measure_quantiles_on_cpu():
    timing = C.measure(lambda: sum(range(1000)), torch.device("cpu"), warmup=1, min_iters=7, max_iters=7)
    assert timing.iters == 7 and 0 < timing.p20_ms <= timing.median_ms <= timing.p80_ms


def test_results_roundtrip(tmp_path):
    env = C.environment(torch.device("cpu"))
    rows = [C.base_row(env, bench="x", provider="p", status="ok", median_ms=1.5, custom=3)]
    json_path, csv_path = C.write_results(rows, tmp_path, "x")
    assert C.load_results(json_path) == json.loads(json.dumps(rows))
    header = csv_path.read_text().splitlines()[0].split(",")
    assert header[:3] == ["bench", "suite", "provider"] and "custom" in header and "commit" in header
    assert "hostname" not in env and env["device_name"].startswith("cpu")


def _kernel_row(provider, mode, n, kept, ms, **extra):
    return {
        "suite": "kernel",
        "model": None,
        "provider": provider,
        "mode": mode,
        "n": n,
        "head_dim": 64,
        "kept_target": kept,
        "status": "ok",
        "median_ms": ms,
        **extra,
    }


def test_targets_pass_miss_and_no_data():
    rows = [
        _kernel_row("sdpa_flash_dense", "fwd+bwd", 1374, 1.0, 10.0),
        _kernel_row("ours_masked", "fwd+bwd", 1374, 1.0, 10.5),  # 1.05x of flash: PASS
        _kernel_row("ours_varlen_core", "fwd+bwd", 1374, 1.0, 12.0),  # 1.2x: MISS
        _kernel_row("sdpa_bool_mask", "fwd+bwd", 1374, 0.5, 30.0),
        _kernel_row("ours_masked", "fwd+bwd", 1374, 0.5, 10.0),  # 3x: PASS (>= 2.5)
        # r2 = 0.25: 2.5 ms / 10 ms / 0.25 = 1.0 <= 1.25 PASS
        _kernel_row("ours_varlen_core", "fwd+bwd", 1374, 0.5, 2.5, useful_tflops=1.0, dense_equiv_tflops=4.0),
    ]
    verdicts = {(c["target"][:2], c["config"]): c["verdict"] for c in targets.attention_checks(rows)}
    assert verdicts[("T0", "N=1374 fwd+bwd ours_masked")] == "PASS"
    assert verdicts[("T0", "N=1374 fwd+bwd ours_varlen_core")] == "MISS"
    assert verdicts[("T0", "N=197 fwd ours_masked")] == "NO DATA"
    assert verdicts[("T1", "N=1374 fwd+bwd kept=0.5 ours_masked")] == "PASS"
    assert verdicts[("T1", "N=1374 fwd+bwd kept=0.25 ours_masked")] == "NO DATA"
    assert verdicts[("T4", "N=1374 fwd+bwd kept=0.5 ours_masked")] == "NO DATA"
    assert verdicts[("T5", "N=1374 fwd+bwd kept=0.5 ours_varlen_core")] == "PASS"


# ------------------------------------------------------------------------------------ layer formulations vs timm
LAYER_TEST_CONFIGS = {
    "vit": bench_model.LayerConfig("t", width=64, heads=2, seq_len=37, init_values=1e-2),
    "dinov3": bench_model.LayerConfig("t", width=64, heads=2, seq_len=41, init_values=0.5, rope_grid=(6, 6)),
}


@pytest.mark.parametrize("layer", LAYER_TEST_CONFIGS)
@pytest.mark.parametrize("formulation", ["masked", "masked_compact", "packed"])
def test_layer_formulations_match_timm_block(formulation, layer):
    cfg = LAYER_TEST_CONFIGS[layer]
    block = bench_model.make_block(cfg, torch.device("cpu"))  # float32: the kernels API takes fp16/bf16/fp32
    num_prefix, grid = bench_model.layer_token_layout(cfg)
    gen = torch.Generator().manual_seed(2)
    keep = C.with_prefix(C.blob_keep(3, grid, 0.5, gen), num_prefix)
    x = torch.randn(3, cfg.seq_len, 64, requires_grad=True)
    expected = bench_model.layer_forward(block, x, keep, "dense_mask", backend="torch")  # timm's block, key mask
    got = bench_model.layer_forward(block, x, keep, formulation, backend="torch")
    torch.testing.assert_close(got[keep], expected[keep], atol=1e-5, rtol=1e-4)
    grad = torch.randn_like(expected)
    (gx_expected,) = torch.autograd.grad(expected, x, grad * keep[..., None])
    (gx_got,) = torch.autograd.grad(got, x, grad * keep[..., None])
    torch.testing.assert_close(gx_got, gx_expected, atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------------------------------------------ smoke runs
def _check_rows(rows, path):
    assert rows and json.loads(path.read_text()) == json.loads(json.dumps(rows))
    for row in rows:
        for key in C.ENV_COLUMNS + ("provider", "mode", "status"):
            assert key in row
        assert row["status"] in ("ok", "unavailable", "skipped", "error", "oom")
        if row["status"] == "ok":
            assert row["median_ms"] > 0 and row["p20_ms"] <= row["median_ms"] <= row["p80_ms"]
        else:
            assert row["reason"]


def test_bench_attention_smoke(tmp_path):
    # fwd+bwd only: it runs the forward too, and under the Triton interpreter every call counts.
    rows = bench_attention.main(
        ["--smoke", "--n", "37", "--kept", "0.5", "--mode", "fwd+bwd", "--out", str(tmp_path), "--no-plots"]
    )
    _check_rows(rows, tmp_path / "attention.json")
    assert {r["provider"] for r in rows} == set(bench_attention.PROVIDERS)
    by_provider = {r["provider"]: r for r in rows}
    assert by_provider["sdpa_bool_mask"]["status"] == "ok" and by_provider["sdpa_bool_mask"]["max_abs_err"] < 1e-4
    for row in rows:  # whatever runs here computes the right function
        if row["status"] == "ok" and row["max_abs_err"] is not None:
            assert row["max_abs_err"] < 1e-4, row["provider"]


def test_bench_attention_smoke_reference_backend(tmp_path):
    """Our providers' plumbing (gather, scatter, layouts, speedups) on the reference backend, checked against fp64."""
    providers = "ours_masked,ours_varlen,ours_varlen_core,sdpa_bool_mask"
    rows = bench_attention.main(
        [
            "--smoke",
            "--n",
            "37",
            "--kept",
            "0.5",
            "--backend",
            "torch",
            "--providers",
            providers,
            "--out",
            str(tmp_path),
        ]
    )
    _check_rows(rows, tmp_path / "attention.json")
    for row in rows:
        assert row["status"] == "ok", row["reason"]
        assert row["max_abs_err"] < 1e-4
        if row["provider"].startswith("ours"):
            assert row["speedup_vs_sdpa_bool_mask"] > 0
    assert list(tmp_path.glob("attention_*.png"))


def test_bench_model_cpu_tiny_smoke(tmp_path):
    rows = bench_model.main(["--cpu-tiny", "--smoke", "--out", str(tmp_path), "--no-plots"])
    _check_rows(rows, tmp_path / "model.json")
    layer = [r for r in rows if r["suite"] == "layer"]
    assert {r["provider"] for r in layer} == set(bench_model.LAYER_FORMULATIONS)
    for row in layer:
        assert row["status"] == "ok" or (row["provider"] == "masked_compact" and "compaction_order" in row["reason"])
    model_rows = [r for r in rows if r["suite"] != "layer"]
    assert model_rows
    for row in model_rows:  # ok once the model has landed, otherwise unavailable with the reason
        assert row["status"] == "ok" or "create_model" in row["reason"], row["reason"]


def test_add_speedups_compares_within_a_configuration_only():
    rows = [
        {"n": 1, "provider": "ours", "status": "ok", "median_ms": 2.0},
        {"n": 1, "provider": "peer", "status": "ok", "median_ms": 6.0},
        {"n": 1, "provider": "broken", "status": "error", "median_ms": None},
        {"n": 2, "provider": "ours", "status": "ok", "median_ms": 1.0},  # no timed peer at n=2
        {"n": 2, "provider": "peer", "status": "oom", "median_ms": None},
    ]
    C.add_speedups(rows, ("n",), ("peer", "ours", "broken"), providers=("ours",))
    assert rows[0]["speedup_vs_peer"] == 3.0 and "speedup_vs_ours" not in rows[0] and "speedup_vs_broken" not in rows[0]
    assert not any(key.startswith("speedup") for row in rows[1:] for key in row)
    C.add_speedups(rows, ("n",), ("ours",))  # every provider against one baseline
    assert rows[1]["speedup_vs_ours"] == 2.0 / 6.0


def test_bench_host_finds_the_host_syncs():
    """bench_host's ``host_sync`` column: the masked paths and unchecked varlen read nothing from the device; varlen
    with its default offset check does (one sync, by design)."""
    from benchmarks import bench_host

    cases = bench_host._kernel_cases(torch.Generator().manual_seed(0))
    syncs = {name: bench_host._needs_host_values(build) for name, build in cases.items()}
    assert syncs == {
        "autograd_floor": False,
        "masked_fwd": False,
        "masked_fwd_bwd": False,
        "masked_fwd_op": False,
        "masked_fwd_bwd_op": False,
        "varlen_fwd": True,
        "varlen_fwd_unchecked": False,
    }
