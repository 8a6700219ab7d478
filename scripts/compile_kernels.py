"""Compile the attention kernels (masked and varlen) for a CUDA target without a GPU, as a real launch compiles them:
catches code-generation errors and reports, per kernel, shared memory, registers, spilled bytes, whether the dots
became Hopper warp-group MMAs (wgmma) and the loads asynchronous copies (cp.async), and how many shared-memory buffers
the software pipeliner gives each loop's K/V tiles (``K/V buffers``, one number per attention loop in source order).

Each kernel is compiled from a real launch: the family's launcher runs on CPU tensors laid out as a qkv
projection lays them out (q, k, v strided views), with a stand-in that records the kernel and its arguments instead
of running it. Each recorded argument is then specialised by Triton's own rule, as the JIT does on a GPU: an integer
equal to 1 (the unit last stride) becomes a constant, and integers and pointers divisible by 16 are marked so. Without
that the compiler cannot vectorise or pipeline the loads, and the numbers would describe a kernel that never runs.

The configs are those that each family's ``get_fwd_config``, ``get_bwd_config`` and ``get_atomic_bwd_config`` (the
backward in both modes: deterministic, atomic dQ) pick for a CUDA device and, with ``--candidates``, every config
autotuning may time. With ``--check`` the exit status is 1 when a kernel spills
registers or needs more shared memory than an sm_90 block may use (the CPU test suite runs this on the defaults).
With ``--inductor-source`` each kernel is compiled from the source that torch.compile generates for a ``triton_op``
(Inductor copies the kernel with the ``@triton.jit`` functions and ``tl.constexpr`` globals it names into a new
module), which checks that the kernels stay self-contained by name.

With ``--sass`` it also prints the SASS instructions per iteration of each loop that does attention math: a static
proxy for the cost of one block step (not a timing).

Usage: ``python scripts/compile_kernels.py [--family masked varlen] [--arch 90] [--dtype fp16 bf16 fp32]
[--head-dim 64 80 128] [--seq-len 197] [--candidates] [--check] [--inductor-source] [--sass]`` (a few seconds per
kernel on a small CPU; run it without ``TRITON_INTERPRET``).
"""

import argparse
import importlib.util
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import CUDABackend, get_ptxas
from triton.compiler import ASTSource
from triton.runtime.jit import native_specialize_impl

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("compile_kernels.py compiles for a GPU target: unset TRITON_INTERPRET")

import faithful_vit.kernels  # noqa: E402, F401
from faithful_vit.kernels._launch_record import LaunchRecorder  # noqa: E402

masked = sys.modules["faithful_vit.kernels.masked_attention"]
varlen = sys.modules["faithful_vit.kernels.varlen_attention"]
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
SM90_SHARED_LIMIT = 232448  # bytes of shared memory one H100/H200 block may use (227 KiB)
BATCH, HEADS = 2, 4
CUDA = torch.device("cuda")  # the device the configs are chosen for; the recorded launches run on CPU tensors


def _masked_launches(fwd, bwd, atomic_bwd, seq_len, head_dim, dtype):
    # q, k, v (B, H, N, D): strided views of one projection, permuted as timm's Attention does.
    q, k, v = torch.randn(BATCH, seq_len, 3, HEADS, head_dim).to(dtype).permute(2, 0, 3, 1, 4).unbind(0)
    keep = torch.rand(BATCH, seq_len) < 0.5
    keep[:, 0] = True
    record = LaunchRecorder()
    scale = head_dim**-0.5
    # out, lse: the backward's inputs
    out, lse = masked._launch_fwd(q, k, v, keep, scale, True, fwd or bwd or atomic_bwd, record)
    if fwd is None:
        record.launches.clear()
    else:
        masked._launch_fwd(q, k, v, keep, scale, False, fwd, record)
    for deterministic, cfg in ((True, bwd), (False, atomic_bwd)):  # the default backward, then the atomic-dQ one
        if cfg is not None:
            for skip, gate_grad in ((True, False), (True, True), (False, False)):
                args = (torch.randn_like(out), q, k, v, keep, out, lse, scale, skip, gate_grad, deterministic)
                masked._launch_bwd(*args, cfg, record)
    return record.launches


def _varlen_launches(fwd, bwd, atomic_bwd, seq_len, head_dim, dtype):
    lengths = torch.tensor([seq_len, max(1, seq_len // 3)])
    cu_seqlens = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    total = int(cu_seqlens[-1])
    q, k, v = torch.randn(total, 3, HEADS, head_dim).to(dtype).unbind(1)  # (T, H, D) rows of a packed projection
    out = torch.empty(total, HEADS, head_dim, dtype=dtype)
    lse = torch.empty(HEADS, total)
    record = LaunchRecorder()
    scale = head_dim**-0.5
    if fwd is not None:
        varlen._launch_fwd(q, k, v, cu_seqlens, seq_len, scale, fwd, record, out, lse)
    for deterministic, cfg in ((True, bwd), (False, atomic_bwd)):  # the default backward, then the atomic-dQ one
        if cfg is not None:
            grads = [torch.empty_like(q) for _ in range(3)]
            args = (q, k, v, cu_seqlens, out, lse, torch.randn_like(out), seq_len, scale, deterministic)
            varlen._launch_bwd(*args, cfg, record, *grads)
    return record.launches


FAMILIES = {"masked": _masked_launches, "varlen": _varlen_launches}


def _config_pairs(family, seq_len, head_dim, dtype, candidates: bool, configs: list[dict[str, int]]):
    """(fwd, bwd, atomic-dQ bwd) configs to compile: ``configs`` (each for every pass) if given, else the defaults,
    then (with ``candidates``) every autotuning candidate alone."""
    if configs:
        return [(cfg, *[cfg | {"BLOCK_PRE": 64} if family == "varlen" else cfg] * 2) for cfg in configs]
    shape = (seq_len, head_dim, dtype, CUDA)
    module = masked if family == "masked" else varlen  # the families' config functions share one signature
    default = (module.get_fwd_config(*shape), module.get_bwd_config(*shape), module.get_atomic_bwd_config(*shape))
    others = (module.fwd_candidates(*shape), module.bwd_candidates(*shape), module.atomic_bwd_candidates(*shape))
    pairs = [default]
    if candidates:
        for position, (cfgs, cfg_default) in enumerate(zip(others, default)):
            pairs += [tuple(cfg if i == position else None for i in range(3)) for cfg in cfgs if cfg != cfg_default]
    return pairs


def _specialise(kernel, args, kwargs):
    """ASTSource arguments and launch options for one recorded launch, specialised as the JIT would."""
    kwargs = dict(kwargs)
    options = {name: kwargs.pop(name) for name in ("num_warps", "num_stages") if name in kwargs}
    values = dict(zip(kernel.arg_names, args)) | kwargs
    signature, constexprs, attrs = {}, {}, {}
    for index, (name, param) in enumerate(zip(kernel.arg_names, kernel.params)):
        value = values[name]
        if param.is_constexpr:
            signature[name], constexprs[name] = "constexpr", value
            continue
        kind, key = native_specialize_impl(CUDABackend, value, False, True, True)
        if kind == "constexpr":
            signature[name], constexprs[name] = "constexpr", key
            continue
        signature[name] = kind
        if key:
            attrs[(index,)] = CUDABackend.parse_attr(key)
    return ASTSource(kernel, signature, constexprs=constexprs, attrs=attrs), options, constexprs


def _resources(compiled, arch: int) -> dict:
    """Shared memory (bytes), registers and spilled bytes per thread (``ptxas -v`` on the kernel's PTX)."""
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as ptx:
        ptx.write(compiled.asm["ptx"])
        ptx.flush()
        report = subprocess.run(
            [
                get_ptxas(arch).path,
                f"-arch=sm_{arch}a" if arch >= 90 else f"-arch=sm_{arch}",
                "-v",
                ptx.name,
                "-o",
                os.devnull,
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stderr
    registers = re.search(r"Used (\d+) registers", report)
    spills = re.search(r"(\d+) bytes spill stores", report)
    return {
        "shared": compiled.metadata.shared,
        "registers": int(registers.group(1)) if registers else -1,
        "spilled": int(spills.group(1)) if spills else 0,
        "wgmma": "wgmma" in compiled.asm["ptx"],
        "cp_async": "cp.async" in compiled.asm["ptx"],
        "tile_buffers": _tile_buffers(compiled),
    }


def _loop_sizes(compiled, arch: int) -> list[int]:
    """SASS instructions per iteration of each loop that does attention math (has an MMA or an exp2), in program
    order (each part's loop over full blocks, then its loop over partly valid ones): a static proxy for the cost of a
    block step. Disassembles the cubin with the nvdisasm beside Triton's ptxas."""
    nvdisasm = Path(get_ptxas(arch).path).with_name("nvdisasm")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        sass = subprocess.run([str(nvdisasm), "-c", cubin.name], capture_output=True, text=True, check=True).stdout
    instructions, labels = [], {}
    for line in sass.splitlines():
        if label := re.match(r"(\.L_x_\d+):", line):
            labels[label.group(1)] = len(instructions)
        elif instruction := re.match(r"\s*/\*[0-9a-f]+\*/\s+([^;]*);", line):
            instructions.append(instruction.group(1))
    sizes = []
    for end, text in enumerate(instructions):  # a loop: a branch back to an earlier label
        target = re.search(r"BRA\b.*?(\.L_x_\d+)", text)
        if target and labels.get(target.group(1), end + 1) <= end:
            body = instructions[labels[target.group(1)] : end + 1]
            if any(re.search(r"\b(HGMMA|HMMA|MUFU\.EX2)\b", op) for op in body):
                sizes.append(len(body))
    return sizes


def _tile_buffers(compiled) -> list[str]:
    """Shared-memory buffers per K/V tile of each loop that does attention math (has a dot), in source order: the
    leading dimension of the multi-buffered (mutable, 3-d) tile allocations the software pipeliner makes for the loop
    (allocated just before it in the TTGIR); 1 when the loop's tiles are not multi-buffered. A loop whose tile loads
    wait on an index loaded in the loop gets one buffer fewer (and a 1 x 1 buffer for the index)."""
    counts, pending, loop_indent, has_dot = [], [], None, False
    for line in compiled.asm["ttgir"].splitlines():
        indent = len(line) - len(line.lstrip())
        if loop_indent is None:
            if "ttg.local_alloc" in line and "mutable" in line:
                shape = re.search(r"memdesc<(\d+)x(\d+)x(\d+)x", line)
                if shape and int(shape.group(2)) > 1 and int(shape.group(3)) > 1:
                    pending.append(int(shape.group(1)))
            elif re.search(r"= scf\.for\b", line):
                loop_indent, has_dot = indent, False
        elif re.match(r"\s*}", line) and indent == loop_indent:
            if has_dot:
                pending = pending or [1]
                counts.append(str(pending[0]) if len(set(pending)) == 1 else "+".join(map(str, pending)))
            pending, loop_indent = [], None
        elif re.search(r"\b(tt\.dot|ttng\.warp_group_dot)\b", line):
            has_dot = True
    return counts


def _inductor_copy(kernel):
    """The kernel as torch.compile launches it: rebuilt from Inductor's copy of its source and dependencies."""
    from torch._inductor.codegen.wrapper import user_defined_triton_kernel_transitive_closure_source_code

    source = user_defined_triton_kernel_transitive_closure_source_code(kernel)
    path = Path(tempfile.mkdtemp()) / f"{kernel.__name__}.py"
    path.write_text(f"import triton\nimport triton.language as tl\n\n\n@triton.jit\n{source}")
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, kernel.__name__)


def _label(kernel, constexprs, options) -> str:
    name = kernel.__name__.strip("_").removesuffix("_kernel")
    tiles = "x".join(str(constexprs[t]) for t in ("BLOCK_M", "BLOCK_N", "BLOCK") if t in constexprs)
    flags = " ".join(
        f"{flag}={constexprs[flag]}"
        for flag in ("SKIP_DROPPED_QUERIES", "GATE_GRAD", "ATOMIC_DQ", "PARTS", "ZERO_DQ", "EVERY_BLOCK")
        if flag in constexprs
    )
    launch = " ".join(f"{key[4]}{value}" for key, value in options.items())  # num_warps -> w4, num_stages -> s3
    return " ".join(part for part in (name, f"[{tiles} {launch}]".replace(" ]", "]"), flags) if part)


def _launches(args, configs):
    """(description, kernel, args, kwargs) of every recorded launch the command line asks for."""
    for family in args.family:
        for dtype_name in args.dtype:
            dtype = DTYPES[dtype_name]
            for head_dim in args.head_dim:
                for cfgs in _config_pairs(family, args.seq_len, head_dim, dtype, args.candidates, configs):
                    for kernel, _, call_args, call_kwargs in FAMILIES[family](*cfgs, args.seq_len, head_dim, dtype):
                        yield f"{family} {dtype_name} D={head_dim}", kernel, call_args, call_kwargs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--dtype", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--head-dim", nargs="+", type=int, default=[64, 80, 128])
    parser.add_argument("--seq-len", type=int, default=197, help="N (masked) or max_seqlen (varlen) for the configs")
    parser.add_argument("--candidates", action="store_true", help="also compile every autotuning candidate config")
    parser.add_argument(
        "--config",
        nargs="+",
        default=[],
        metavar="M,N,W,S",
        help="compile these configs (BLOCK_M,BLOCK_N,num_warps,num_stages) instead of the defaults",
    )
    parser.add_argument("--check", action="store_true", help="exit 1 if a kernel spills or exceeds sm_90 shared memory")
    parser.add_argument("--inductor-source", action="store_true", help="compile Inductor's copy of each kernel")
    parser.add_argument(
        "--sass",
        action="store_true",
        help="also print the SASS instructions per iteration of each attention loop (nvdisasm)",
    )
    args = parser.parse_args()
    configs = [
        dict(zip(("BLOCK_M", "BLOCK_N", "num_warps", "num_stages"), map(int, text.split(",")))) for text in args.config
    ]
    target = GPUTarget("cuda", args.arch, 32)
    print(f"torch {torch.__version__}, triton {triton.__version__}, target sm_{args.arch}", flush=True)
    seen, problems = set(), []
    for what, kernel, call_args, call_kwargs in _launches(args, configs):
        if args.inductor_source:
            kernel = _inductor_copy(kernel)
        source, options, constexprs = _specialise(kernel, call_args, call_kwargs)
        key = (
            kernel.__name__,
            repr(sorted(source.signature.items())),
            repr(source.attrs),
            repr(sorted(constexprs.items())),
            repr(sorted(options.items())),
        )
        if key in seen:
            continue
        seen.add(key)
        compiled = triton.compile(source, target=target, options=options)
        res = _resources(compiled, args.arch)
        label = f"sm_{args.arch} {what} {_label(kernel, constexprs, options)}"
        notes = [
            note
            for note, bad in (
                (f"SPILLS {res['spilled']} B", res["spilled"] > 0),
                ("OVER the sm_90 shared-memory limit", res["shared"] > SM90_SHARED_LIMIT),
            )
            if bad
        ]
        if notes:
            problems.append(label)
        units = "".join(f", {unit}" for unit, used in (("wgmma", res["wgmma"]), ("cp.async", res["cp_async"])) if used)
        sizes = _loop_sizes(compiled, args.arch) if args.sass else []
        loops = f", loops {'/'.join(map(str, sizes))} instr" if sizes else ""
        buffers = f", K/V buffers {'/'.join(res['tile_buffers'])}" if res["tile_buffers"] else ""
        print(
            f"{label}: shared {res['shared']} B, {res['registers']} registers, {res['spilled']} B spilled{units}"
            f"{buffers}{loops}{'  <-- ' + ', '.join(notes) if notes else ''}",
            flush=True,
        )
    print(f"{len(seen)} kernels compiled; {len(problems)} with spills or over the shared-memory limit", flush=True)
    return 1 if args.check and problems else 0


if __name__ == "__main__":
    sys.exit(main())
