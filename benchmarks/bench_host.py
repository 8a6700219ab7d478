"""Host overhead per call: the Python time of our attention calls with every Triton launch replaced by a recorder.

At ViT lengths one kernel call takes tens of microseconds on a GPU, so the host work around the launches (checks,
config lookup, block-list setup, allocations, argument lists, autograd) can be what limits a layer. This benchmark runs
the public calls on CPU tensors with the launches recorded instead of run (:class:`faithful_vit.kernels._launch_record.
LaunchRecorder`), so what it times is that host work alone:

* ``autograd_floor``: forward and ``torch.autograd.grad`` of an autograd function that only allocates its output
  and gradients: what torch itself costs around any attention with a backward, the floor of ``masked_fwd_bwd``;
* ``masked_fwd``: ``masked_attention(q, k, v, keep)`` without grad; ``masked_fwd_bwd``: the same with grad, then
  ``torch.autograd.grad`` of the output (backward launches included);
* ``masked_fwd_op``, ``masked_fwd_bwd_op``: the same on the ``faithful_vit::masked_attention_fwd/_bwd`` ops, the
  route ``masked_attention`` takes while torch.compile traces on CUDA (forced here; eager calls launch directly);
* ``varlen_fwd``: ``varlen_attention`` with its defaults; ``varlen_fwd_unchecked``: with ``check_cu_seqlens=False``,
  as the packed model calls it;
* ``forward_kept_packed`` / ``forward_kept_masked``: ``forward_kept`` of a small sparsified timm ViT in inference,
  per block (the difference between a deep and a shallow model, divided by the extra blocks; on the CPU the tiny
  layers' math is in it too).

q, k, v are views of one ``(B, N, 3, H, D)`` projection as timm's attention makes them (ViT-B/16 at 224: N = 197,
12 heads of 64); ``keep`` is a blob mask keeping about half the patches. Each case is timed twice: with launches only
recorded (``record``), and with Triton's own argument binding for the CUDA backend run on each recorded launch
(``record+bind``: the per-argument part of a real launch's host cost). The cases take turns, a run of consecutive
calls each per round (a shared, loaded machine then slows all of them alike); every call's wall time and the CPU time
of the calling thread are kept, and their medians are the headline.

``host_sync`` says whether a call needs a value from the device: the call is run once more on fake tensors
(``FakeTensorMode``), where reading a tensor's data (``.item()``, ``.tolist()``) raises.

Usage: ``python -m benchmarks.bench_host [--rounds 20] [--name before] [--out benchmarks/results/host_overhead]``
(about a minute; it sets ``TRITON_INTERPRET=1`` so that the Triton backend is chosen for CPU tensors, the
interpreter itself never runs).
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before faithful_vit: CPU tensors then take the Triton backend

import argparse  # noqa: E402
import contextlib  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode  # noqa: E402

from benchmarks._common import (  # noqa: E402
    RESULTS_DIR,
    base_row,
    blob_keep,
    environment,
    format_table,
    with_prefix,
    write_results,
)
from faithful_vit.kernels import _attention_core, masked_attention, varlen_attention  # noqa: E402
from faithful_vit.kernels._launch_record import LaunchRecorder  # noqa: E402

BATCH, SEQ_LEN, HEADS, HEAD_DIM = 2, 197, 12, 64  # ViT-B/16 at 224: CLS + 14 x 14
KEPT = 0.5


class _EmptyAttention(torch.autograd.Function):
    """The floor of any autograd-wrapped attention: saves q, k, v and the mask, allocates the output and the three
    gradients, computes nothing."""

    @staticmethod
    def forward(ctx, q, k, v, keep):
        ctx.save_for_backward(q, k, v, keep)
        return torch.empty_like(q)

    @staticmethod
    def backward(ctx, grad_out):
        q, _, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(q), torch.empty_like(q), None


def _kernel_cases(generator: torch.Generator) -> dict[str, Callable[..., Callable[[], object]]]:
    """Case name -> a builder of the call to time (run inside a FakeTensorMode, it builds fake inputs)."""
    keep = with_prefix(blob_keep(BATCH, (14, 14), KEPT, generator), 1)
    lengths = keep.sum(1)
    cu_seqlens = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    total = int(lengths.sum())

    def masked(grad: bool, op: bool):
        def build():
            # Leaves with a projection's strides: the gradients are dq, dk, dv themselves (no copy into a qkv grad).
            views = torch.randn(BATCH, SEQ_LEN, 3, HEADS, HEAD_DIM).permute(2, 0, 3, 1, 4).unbind(0)
            q, k, v = (view.detach().requires_grad_(grad) for view in views)
            mask = keep.clone()
            grad_out = torch.randn(BATCH, HEADS, SEQ_LEN, HEAD_DIM)

            def attend():
                if op:
                    with _on_registered_ops():
                        return masked_attention(q, k, v, mask)
                return masked_attention(q, k, v, mask)

            if not grad:
                return attend
            return lambda: torch.autograd.grad(attend(), (q, k, v), grad_out)

        return build

    def varlen(check: bool):
        def build():
            offsets = cu_seqlens.clone()
            q, k, v = torch.randn(total, 3, HEADS, HEAD_DIM).unbind(1)
            return lambda: varlen_attention(q, k, v, offsets, SEQ_LEN, check_cu_seqlens=check)

        return build

    def autograd_floor():
        def build():
            views = torch.randn(BATCH, SEQ_LEN, 3, HEADS, HEAD_DIM).permute(2, 0, 3, 1, 4).unbind(0)
            q, k, v = (view.detach().requires_grad_() for view in views)
            grad_out = torch.randn(BATCH, HEADS, SEQ_LEN, HEAD_DIM)
            return lambda: torch.autograd.grad(_EmptyAttention.apply(q, k, v, keep), (q, k, v), grad_out)

        return build

    return {
        "autograd_floor": autograd_floor(),
        "masked_fwd": masked(False, False),
        "masked_fwd_bwd": masked(True, False),
        "masked_fwd_op": masked(False, True),
        "masked_fwd_bwd_op": masked(True, True),
        "varlen_fwd": varlen(True),
        "varlen_fwd_unchecked": varlen(False),
    }


@contextlib.contextmanager
def _on_registered_ops():
    """Masked attention on its registered ops, as when torch.compile traces it on CUDA."""
    module = sys.modules["faithful_vit.kernels.masked_attention"]
    module.uses_registered_ops = lambda q: True
    try:
        yield
    finally:
        module.uses_registered_ops = _attention_core.uses_registered_ops


def _vit(depth: int):
    import timm

    from faithful_vit import sparsify

    model = timm.create_model(
        "vit_base_patch16_224",
        pretrained=False,
        num_classes=0,
        embed_dim=64,
        depth=depth,
        num_heads=4,
        mlp_ratio=2.0,
    )
    return sparsify(model).eval()


def _forward_kept_cases(generator: torch.Generator, depths: tuple[int, int]) -> dict[str, Callable]:
    from faithful_vit import forward_kept

    models = {depth: _vit(depth) for depth in depths}
    images = torch.randn(BATCH, 3, 224, 224, generator=generator)
    keep = blob_keep(BATCH, (14, 14), KEPT, generator)

    def case(mode: str, depth: int):
        def build():
            x, mask = images.clone(), keep.clone()

            def run():
                with torch.no_grad():
                    return forward_kept(models[depth], x, mask, mode)

            return run

        return build

    return {f"forward_kept_{mode}_depth{d}": case(mode, d) for mode in ("packed", "masked") for d in depths}


def _needs_host_values(build: Callable) -> bool:
    """Whether the call reads device data on the host: run it once on fake tensors, where that raises."""
    with FakeTensorMode(allow_non_fake_inputs=True), LaunchRecorder():
        call = build()
        try:
            call()
        except DataDependentOutputException:
            return True
    return False


def _time_interleaved(calls: dict[str, Callable[[], object]], rounds: int, budget_s: float) -> dict[str, dict]:
    """Per case: ``rounds`` rounds, each a run of consecutive calls lasting about ``budget_s`` (at most 100 calls),
    every call timed on its own; the cases take turns round by round, so load changes hit them alike."""
    per_round = {}
    for name, call in calls.items():  # warm-up, and the cost estimate that sizes a round
        for _ in range(3):
            start = time.perf_counter()
            call()
            estimate = time.perf_counter() - start
        per_round[name] = max(1, min(100, int(budget_s / max(estimate, 1e-7))))
    wall: dict[str, list[float]] = {name: [] for name in calls}
    cpu: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            for _ in range(per_round[name]):
                start_cpu, start = time.thread_time_ns(), time.perf_counter_ns()
                call()
                end, end_cpu = time.perf_counter_ns(), time.thread_time_ns()
                wall[name].append((end - start) / 1e3)
                cpu[name].append((end_cpu - start_cpu) / 1e3)
    stats = {}
    for name in calls:
        deciles = statistics.quantiles(wall[name], n=10)
        stats[name] = {
            "median_us": statistics.median(wall[name]),
            "p20_us": deciles[1],
            "p80_us": deciles[7],
            "cpu_median_us": statistics.median(cpu[name]),
            "calls": len(wall[name]),
        }
    return stats


def _load() -> str:
    """The 1, 5 and 15 minute load averages (the machine is shared)."""
    path = Path("/proc/loadavg")
    return " ".join(path.read_text().split()[:3]) if path.exists() else ""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20, help="rounds; each times up to 100 calls of every case")
    parser.add_argument("--round-s", type=float, default=0.01, help="seconds per case per round (sizes the runs)")
    parser.add_argument("--name", default="latest", help="result file stem")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "host_overhead")
    args = parser.parse_args()
    torch.set_num_threads(1)  # the host work is single-threaded; more threads only add noise on a shared machine
    generator = torch.Generator().manual_seed(0)
    depths = (2, 6)
    builders = {**_kernel_cases(generator), **_forward_kept_cases(generator, depths)}
    env = environment(torch.device("cpu"))
    load_before = _load()
    syncs = {name: _needs_host_values(build) for name, build in builders.items()}
    rows = []
    for bind in (False, True):
        with LaunchRecorder(bind=bind) as recorder:
            calls = {name: build() for name, build in builders.items()}

            def cleared(call, recorder=recorder):
                def run():
                    recorder.launches.clear()
                    return call()

                return run

            stats = _time_interleaved({n: cleared(c) for n, c in calls.items()}, args.rounds, args.round_s)
            launches = {}
            for name, call in calls.items():
                recorder.launches.clear()
                call()
                launches[name] = len(recorder.launches)
        for name, values in stats.items():
            rows.append(
                base_row(
                    env,
                    bench="host",
                    provider=name,
                    mode="record+bind" if bind else "record",
                    status="ok",
                    n=SEQ_LEN,
                    head_dim=HEAD_DIM,
                    heads=HEADS,
                    batch=BATCH,
                    kept_target=KEPT,
                    launches=launches[name],
                    host_sync=syncs[name],
                    **values,
                )
            )
    load_after = _load()
    for mode in ("packed", "masked"):  # per block: the deep model minus the shallow one, over the extra blocks
        for bind in ("record", "record+bind"):
            by_depth = {
                d: next(r for r in rows if r["provider"] == f"forward_kept_{mode}_depth{d}" and r["mode"] == bind)
                for d in depths
            }
            shallow, deep = by_depth[depths[0]], by_depth[depths[1]]
            per_block = {
                key: (deep[key] - shallow[key]) / (depths[1] - depths[0]) for key in ("median_us", "cpu_median_us")
            }
            rows.append(
                base_row(
                    env,
                    bench="host",
                    provider=f"forward_kept_{mode}_per_block",
                    mode=bind,
                    status="ok",
                    n=SEQ_LEN,
                    head_dim=16,
                    heads=4,
                    batch=BATCH,
                    kept_target=KEPT,
                    launches=(deep["launches"] - shallow["launches"]) // (depths[1] - depths[0]),
                    host_sync=deep["host_sync"],
                    **per_block,
                )
            )
    for row in rows:
        row["load_before"], row["load_after"] = load_before, load_after
    json_path, _ = write_results(rows, args.out, args.name)
    columns = ("provider", "mode", "median_us", "p20_us", "p80_us", "cpu_median_us", "launches", "host_sync")
    print(format_table(rows, columns))
    print(f"load average (1, 5, 15 min) before {load_before}, after {load_after}; {env['device_name']}")
    print(f"wrote {json_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
