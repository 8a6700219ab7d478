"""Shared benchmark machinery: environment record, timing, FLOP counts, keep masks, peer checks, results, plots.

Result rows are flat dicts. Every row carries the environment fields of :func:`environment` (GPU or CPU name,
torch/triton/timm/xformers versions, git commit, UTC date; no hostname), so a row read on its own says where and on
what it was measured. :func:`write_results` stores the rows as ``<name>.json`` (a list) and ``<name>.csv``.

Timing (:func:`measure`): warm-up calls first (compilation, autotuning and allocator growth stay out), then many
timed calls, each between its own pair of CUDA events on a GPU (``time.perf_counter`` around a single call on the
CPU); the median is the headline, the 20th and 80th percentiles show the spread.
"""

from __future__ import annotations

import csv
import datetime as _dt
import importlib
import importlib.metadata
import json
import math
import os
import platform
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from faithful_vit.kernels import autotune_enabled, set_autotune, tuned_configs

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO_ROOT = Path(__file__).resolve().parent.parent

# The columns every row has, in the order the CSV shows them; anything else a benchmark adds follows.
CORE_COLUMNS = (
    "bench",
    "suite",
    "provider",
    "mode",
    "status",
    "reason",
    "model",
    "n",
    "head_dim",
    "heads",
    "batch",
    "dtype",
    "kept_target",
    "kept_actual",
    "median_ms",
    "p20_ms",
    "p80_ms",
    "iters",
    "setup_ms",
    "useful_tflops",
    "dense_equiv_tflops",
    "images_per_s",
    "peak_mem_mib",
    "max_abs_err",
)
ENV_COLUMNS = (
    "device_name",
    "device_type",
    "torch",
    "triton",
    "timm",
    "xformers",
    "cuda",
    "python",
    "commit",
    "commit_dirty",
    "date_utc",
    "cpu_threads",
    "triton_interpret",
    "autotune",
)


# ----------------------------------------------------------------------------------------------------------- env
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(distribution: str) -> str | None:
    """Installed version from the package metadata (no import: importing timm or xformers takes seconds)."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> str:
    try:
        return subprocess.run(
            ["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def environment(device: torch.device) -> dict:
    """Where and with what a result was measured (no hostname)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"cpu: {_cpu_model()}"
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "device_name": name,
        "device_type": device.type,
        "torch": torch.__version__,
        "triton": _version("triton"),
        "timm": _version("timm"),
        "xformers": _version("xformers"),
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "commit": _git("rev-parse", "--short=12", "HEAD") or "unknown",
        "commit_dirty": bool(status),
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "cpu_threads": torch.get_num_threads(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0"),
        "autotune": autotune_enabled(),
    }


def add_autotune_argument(parser) -> None:
    parser.add_argument(
        "--autotune",
        action="store_true",
        help="autotune our kernels' launch configs (first call per shape, during warm-up)",
    )


def apply_autotune(args) -> None:
    """``--autotune``: turn autotuning on; the first call per shape tunes, so at least one warm-up call absorbs it."""
    if args.autotune:
        set_autotune(True)
        args.warmup = max(args.warmup, 1)


def pick_device(requested: str | None = None) -> torch.device:
    if requested:
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def safe_name(text: str) -> str:
    """Letters, digits, '.', '_' and '-' only (file names that survive every copy)."""
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in text).strip("_") or "unknown"


# -------------------------------------------------------------------------------------------------------- timing
@dataclass(frozen=True)
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    iters: int


def _quantile(sorted_values: Sequence[float], q: float) -> float:
    pos = q * (len(sorted_values) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def measure(
    fn: Callable[[], object],
    device: torch.device,
    *,
    warmup: int = 5,
    min_iters: int = 10,
    max_iters: int = 200,
    budget_s: float = 0.5,
) -> Timing:
    """Median/p20/p80 milliseconds of ``fn()``, each call timed on its own.

    Calls ``fn`` ``warmup`` times, estimates one call's cost, then times ``clamp(budget_s / cost, min_iters,
    max_iters)`` calls. On CUDA every call sits between its own pair of events (device time, launch gaps included);
    the events are read after one final synchronisation.
    """
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize(device)
        estimate = time.perf_counter() - start
    else:
        start = time.perf_counter()
        fn()
        estimate = time.perf_counter() - start
    iters = int(min(max_iters, max(min_iters, budget_s / max(estimate, 1e-6))))
    times: list[float] = []
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
        for begin, end in events:
            begin.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        times = [begin.elapsed_time(end) for begin, end in events]
    else:
        for _ in range(iters):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    return Timing(_quantile(times, 0.5), _quantile(times, 0.2), _quantile(times, 0.8), iters)


def measure_interleaved(
    fns: dict[str, Callable[[], object]], device: torch.device, *, warmup: int = 1, rounds: int = 5
) -> dict[str, Timing | Exception]:
    """Time several callables round-robin: each round calls every one once, ``rounds`` rounds.

    For a shared, noisy machine (the CPU variant): load changes then hit every candidate alike instead of whichever
    happened to run during a busy stretch. A callable that raises is returned as its exception and dropped from the
    remaining rounds.
    """
    times: dict[str, list[float]] = {name: [] for name in fns}
    failed: dict[str, Exception] = {}
    for round_index in range(warmup + rounds):
        for name, fn in fns.items():
            if name in failed:
                continue
            try:
                elapsed = timed_once_ms(fn, device)
            except Exception as exc:  # noqa: BLE001 - handed back to the caller, which records it
                failed[name] = exc
                continue
            if round_index >= warmup:
                times[name].append(elapsed)
    results: dict[str, Timing | Exception] = dict(failed)
    for name, values in times.items():
        if name not in failed:
            values.sort()
            results[name] = Timing(_quantile(values, 0.5), _quantile(values, 0.2), _quantile(values, 0.8), len(values))
    return results


def timed_once_ms(fn: Callable[[], object], device: torch.device) -> float:
    """Wall time of one call (for one-off costs such as a mask build), device work included."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) * 1e3


# --------------------------------------------------------------------------------------------------------- FLOPs
# Standard attention accounting: forward = QK^T + PV = 4 * Lq * Lk * D per head; backward = 2.5x forward.
MODE_FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}


def attention_flops(q_lens: Iterable[int], k_lens: Iterable[int], heads: int, head_dim: int, mode: str) -> float:
    """FLOPs of attention where image b has ``q_lens[b]`` queries attending to ``k_lens[b]`` keys."""
    pairs = sum(int(lq) * int(lk) for lq, lk in zip(q_lens, k_lens))
    return 4.0 * pairs * heads * head_dim * MODE_FLOP_FACTOR[mode]


def vit_block_flops(token_counts: Iterable[int], width: int, heads: int, mode: str, mlp_ratio: float = 4.0) -> float:
    """Matmul FLOPs of one pre-norm ViT block over images of ``token_counts`` tokens (norms and GELU not counted).

    Linear layers: qkv 6*L*C^2, proj 2*L*C^2, MLP 4*mlp_ratio*L*C^2; attention 4*L^2*C. Backward = 2x forward for
    the linear part and 2.5x for attention.
    """
    counts = [int(n) for n in token_counts]
    linear = sum((8.0 + 4.0 * mlp_ratio) * n * width * width for n in counts)
    attention = attention_flops(counts, counts, heads, width // heads, "fwd")
    linear_factor = {"fwd": 1.0, "bwd": 2.0, "fwd+bwd": 3.0}[mode]
    return linear * linear_factor + attention * MODE_FLOP_FACTOR[mode]


def tflops(flops: float, ms: float) -> float:
    return flops / (ms * 1e-3) / 1e12 if ms > 0 else float("nan")


# ---------------------------------------------------------------------------------------------------- keep masks
def kept_counts(batch: int, num_patches: int, kept: float, generator: torch.Generator) -> torch.Tensor:
    """Per-image kept patch counts around ``kept``, with the realistic per-image variation used everywhere.

    Each image keeps a fraction drawn uniformly from ``kept +- min(kept / 2, 1 - kept)``: +-50% relative where there is
    room, narrowed near 1 so the mean stays at the target (``kept=1`` keeps everything). At least one patch is kept.
    """
    if not 0.0 < kept <= 1.0:
        raise ValueError(f"kept: expected a fraction in (0, 1], got {kept}")
    half_width = min(kept / 2, 1.0 - kept)
    fractions = kept + half_width * (2 * torch.rand(batch, generator=generator, dtype=torch.float64) - 1)
    return (fractions * num_patches).round().clamp(1, num_patches).long()


def blob_keep(batch: int, grid: tuple[int, int], kept: float, generator: torch.Generator) -> torch.Tensor:
    """``(B, grid_h * grid_w)`` bool over patches in raster order: one spatially coherent blob per image.

    Stage 1 keeps object parts, which are contiguous regions, so each image keeps the ``count`` patches closest to a
    random centre under a random anisotropic distance with a little jitter (irregular, blob-like edges). Contiguity
    matters for speed: in raster order it is what lets a block-sparse kernel skip whole key blocks.
    """
    grid_h, grid_w = grid
    num_patches = grid_h * grid_w
    counts = kept_counts(batch, num_patches, kept, generator)
    rows = torch.arange(grid_h, dtype=torch.float64).repeat_interleave(grid_w)
    cols = torch.arange(grid_w, dtype=torch.float64).repeat(grid_h)
    keep = torch.zeros(batch, num_patches, dtype=torch.bool)
    for b in range(batch):
        centre = torch.rand(2, generator=generator, dtype=torch.float64) * torch.tensor([grid_h, grid_w])
        stretch = 0.5 + torch.rand(2, generator=generator, dtype=torch.float64)
        jitter = 0.3 * torch.rand(num_patches, generator=generator, dtype=torch.float64)
        dist = ((rows - centre[0]) / stretch[0]) ** 2 + ((cols - centre[1]) / stretch[1]) ** 2 + jitter
        keep[b, torch.argsort(dist)[: int(counts[b])]] = True
    return keep


def with_prefix(patch_keep: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """Prepend ``num_prefix`` always-kept tokens (CLS, registers) to a ``(B, P)`` patch mask: ``(B, P + prefix)``."""
    prefix = torch.ones(patch_keep.shape[0], num_prefix, dtype=torch.bool, device=patch_keep.device)
    return torch.cat([prefix, patch_keep], dim=1)


# ViT token layouts the issue names: N -> (prefix tokens, patch grid).
TOKEN_LAYOUTS = {
    197: (1, (14, 14)),  # ViT-B/16 or S/16 at 224: CLS + 14x14
    261: (5, (16, 16)),  # ViT-B/14 at 224 with 4 registers: CLS + 4 reg + 16x16
    577: (1, (24, 24)),  # ViT-B/16 at 384
    1374: (5, (37, 37)),  # ViT-B/14 at 518 with 4 registers (the paper's DINOv2 backbone)
}


def token_layout(n: int) -> tuple[int, tuple[int, int]]:
    """Prefix count and patch grid of an ``n``-token sequence; unknown ``n`` gets one prefix token and a near-square
    grid of ``n - 1`` patches (a 1 x (n - 1) strip when ``n - 1`` is prime)."""
    if n in TOKEN_LAYOUTS:
        return TOKEN_LAYOUTS[n]
    patches = n - 1
    side = max(d for d in range(1, int(math.isqrt(patches)) + 1) if patches % d == 0)
    return 1, (side, patches // side)


# ------------------------------------------------------------------------------------------------- availability
@dataclass(frozen=True)
class Availability:
    ok: bool
    reason: str = ""


def import_available(module: str, attr: str | None = None) -> Availability:
    """Whether ``module`` (and ``module.attr``) imports here; the reason names what is missing."""
    try:
        mod = importlib.import_module(module)
    except Exception as exc:  # noqa: BLE001 - any import failure makes the peer unavailable, with the reason
        return Availability(False, f"import {module} failed: {type(exc).__name__}: {exc}"[:300])
    if attr is not None and not hasattr(mod, attr):
        return Availability(False, f"{module}.{attr} does not exist in this version")
    return Availability(True)


# ------------------------------------------------------------------------------------------------------- results
def add_speedups(
    rows: list[dict], config_fields: Sequence[str], baselines: Sequence[str], providers: Iterable[str] | None = None
) -> None:
    """``speedup_vs_<baseline>`` = baseline median / row median, for every timed row (of ``providers``, or all) with a
    timed baseline in the same configuration (the rows agreeing on ``config_fields``)."""
    wanted = None if providers is None else set(providers)

    def config(row):
        return tuple(row[field] for field in config_fields)

    timed = {(config(r), r["provider"]): r["median_ms"] for r in rows if r["status"] == "ok"}
    for row in rows:
        if row["status"] != "ok" or (wanted is not None and row["provider"] not in wanted):
            continue
        for base in baselines:
            base_ms = timed.get((config(row), base))
            if base_ms and base != row["provider"]:
                row[f"speedup_vs_{base}"] = base_ms / row["median_ms"]


def write_results(rows: list[dict], out_dir: Path, name: str) -> tuple[Path, Path]:
    """Write ``rows`` as ``out_dir/<name>.json`` (a list of objects) and ``out_dir/<name>.csv``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, csv_path = out_dir / f"{name}.json", out_dir / f"{name}.csv"
    json_path.write_text(json.dumps(rows, indent=1, default=_json_default) + "\n")
    if tuned_configs():  # --autotune: what each kernel family picked, per shape bucket
        tuned = [
            {"family": family, "key": str(key), "device": device, "config": cfg}
            for (family, key, _, device), cfg in tuned_configs().items()
        ]
        (out_dir / f"{name}_autotune.json").write_text(json.dumps(tuned, indent=1) + "\n")
    extra = sorted({key for row in rows for key in row} - set(CORE_COLUMNS) - set(ENV_COLUMNS))
    columns = [*CORE_COLUMNS, *extra, *ENV_COLUMNS]
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({key: _csv_value(row.get(key)) for key in columns})
    return json_path, csv_path


def _json_default(value: object) -> object:
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _csv_value(value: object) -> object:
    if isinstance(value, float):
        return f"{value:.6g}"
    return "" if value is None else value


def load_results(path: Path) -> list[dict]:
    return json.loads(Path(path).read_text())


def base_row(env: dict, **fields: object) -> dict:
    """A result row: ``fields``, every core column (None where not given) and the environment."""
    row = dict.fromkeys(CORE_COLUMNS)
    row.update(fields)
    row.update(env)
    return row


def format_table(rows: list[dict], columns: Sequence[str]) -> str:
    """Plain fixed-width text table (for the end of a run's output)."""

    def fmt(value: object) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        return "" if value is None else str(value)

    cells = [[fmt(row.get(c)) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------- plots
def plot_time_vs_kept(
    rows: list[dict],
    out_dir: Path,
    stem: str,
    *,
    group_keys: Sequence[str] = ("head_dim", "mode"),
    panel_key: str = "n",
    line_key: str = "provider",
) -> list[Path]:
    """One PNG per ``group_keys`` value, one panel per ``panel_key`` value, time (ms) versus kept fraction, one line
    per ``line_key``. Rows without a time (unavailable, failed) are left out of the plot; the table still has them.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = [r for r in rows if r.get("status") == "ok" and r.get("median_ms") is not None]
    groups: dict[tuple, list[dict]] = {}
    for row in timed:
        groups.setdefault(tuple(row.get(k) for k in group_keys), []).append(row)
    paths = []
    for key, group in sorted(groups.items(), key=lambda kv: str(kv[0])):
        panels = sorted({r.get(panel_key) for r in group}, key=lambda v: (v is None, str(v) if v is None else v))
        fig, axes = plt.subplots(1, len(panels), figsize=(max(6.0, 4.2 * len(panels)), 4.0), squeeze=False)
        for ax, panel in zip(axes[0], panels):
            lines: dict[str, list[tuple[float, float]]] = {}
            for row in group:
                if row.get(panel_key) == panel:
                    lines.setdefault(str(row[line_key]), []).append((row["kept_target"], row["median_ms"]))
            for label, points in sorted(lines.items()):
                points.sort()
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
            ax.set_title(f"{panel_key}={panel}")
            ax.set_xlabel("kept fraction")
            ax.set_ylabel("median ms")
            ax.set_yscale("log")
            ax.grid(True, alpha=0.3)
        axes[0][-1].legend(fontsize=7, loc="best")
        env = group[0]
        title = ", ".join(f"{k}={v}" for k, v in zip(group_keys, key))
        fig.suptitle(
            f"{stem}: {title}\n{env.get('device_name')} | torch {env.get('torch')} | "
            f"commit {env.get('commit')} | {env.get('date_utc')}",
            fontsize=8,
        )
        fig.tight_layout()
        path = out_dir / f"{stem}_{safe_name('_'.join(f'{k}{v}' for k, v in zip(group_keys, key)))}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths
