"""Compile the attention kernels (masked and varlen) for a CUDA target without a GPU: catches code-generation errors
and reports shared memory per kernel, for the configs that each family's ``get_fwd_config`` / ``get_bwd_config`` pick
(and, with ``--candidates``, for every config autotuning may time).

With ``--inductor-source`` each kernel is compiled from the source that torch.compile generates for a ``triton_op``
(Inductor copies the kernel with the ``@triton.jit`` functions and ``tl.constexpr`` globals it names into a new
module), which checks that the kernels stay self-contained by name.

Usage: ``python scripts/compile_kernels.py [--family masked varlen] [--arch 90] [--dtype fp16 bf16 fp32]
[--head-dim 64 80 128] [--seq-len 197] [--inductor-source] [--candidates]`` (takes minutes on a small CPU; run it
without ``TRITON_INTERPRET``).
"""

import argparse
import importlib.util
import os
import sys
import tempfile
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("compile_kernels.py compiles for a GPU target: unset TRITON_INTERPRET")

import faithful_vit.kernels  # noqa: E402, F401

masked = sys.modules["faithful_vit.kernels.masked_attention"]
varlen = sys.modules["faithful_vit.kernels.varlen_attention"]
core = sys.modules["faithful_vit.kernels._attention_core"]
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# Pointer arguments of both families that are not in the input dtype; the other pointers are.
FIXED_POINTERS = {
    "KEEP": "*i8", "K_ORDER": "*i32", "K_COUNT": "*i32", "Q_ORDER": "*i32", "Q_COUNT": "*i32", "CuSeqlens": "*i32",
    "LSE": "*fp32", "Lse": "*fp32", "DELTA": "*fp32", "Delta": "*fp32", "DGATE": "*fp32",
}
TYPED_POINTERS = ("Q", "K", "V", "OUT", "Out", "DO", "DOut", "DQ", "DK", "DV")
INT_SCALARS = ("H", "N", "total")
SM90_SHARED_LIMIT = 232448  # bytes of shared memory one H100/H200 block may use (227 KiB)


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


def _compile(kernel, elem, constexprs, options, target):
    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in FIXED_POINTERS:
            signature[name] = FIXED_POINTERS[name]
        elif name in TYPED_POINTERS:
            signature[name] = elem
        else:
            signature[name] = "i32" if name.startswith("stride") or name in INT_SCALARS else "fp32"
    compiled = triton.compile(ASTSource(kernel, signature, constexprs=constexprs), target=target, options=options)
    return compiled.metadata.shared


def _masked_jobs(fwd, bwd, dims, precision):
    jobs = []
    if fwd is not None:
        fwd_opts = {"num_warps": fwd["num_warps"], "num_stages": fwd["num_stages"]}
        jobs += [
            (f"fwd skip={skip} {_label(fwd)}", masked._masked_attn_fwd_kernel,
             dims | {"BLOCK_M": fwd["BLOCK_M"], "BLOCK_N": fwd["BLOCK_N"], "SKIP_DROPPED_QUERIES": skip,
                     "DOT_PRECISION": precision}, fwd_opts)
            for skip in (True, False)
        ]
    if bwd is not None:
        bwd_opts = {"num_warps": bwd["num_warps"], "num_stages": bwd["num_stages"]}
        blocks = {"BLOCK_M": bwd["BLOCK_M"], "BLOCK_N": bwd["BLOCK_N"], "DOT_PRECISION": precision}
        jobs.append((f"bwd preprocess {_label(bwd)}", masked._masked_attn_bwd_preprocess_kernel,
                     dims | {"BLOCK_M": bwd["BLOCK_M"]}, {"num_warps": 4}))
        jobs += [(f"bwd dkdv gate={gate} {_label(bwd)}", masked._masked_attn_bwd_dkdv_kernel,
                  dims | blocks | {"GATE_GRAD": gate}, bwd_opts) for gate in (False, True)]
        jobs.append((f"bwd dq {_label(bwd)}", masked._masked_attn_bwd_dq_kernel, dims | blocks, bwd_opts))
    return jobs


def _varlen_jobs(fwd, bwd, dims, precision):
    jobs = []
    if fwd is not None:
        fwd_opts = {"num_warps": fwd["num_warps"], "num_stages": fwd["num_stages"]}
        jobs.append((f"fwd {_label(fwd)}", varlen._varlen_attn_fwd_kernel,
                     dims | {"BLOCK_M": fwd["BLOCK_M"], "BLOCK_N": fwd["BLOCK_N"], "INPUT_PRECISION": precision},
                     fwd_opts))
    if bwd is not None:
        bwd_opts = {"num_warps": bwd["num_warps"], "num_stages": bwd["num_stages"]}
        blocks = {"BLOCK_M": bwd["BLOCK_M"], "BLOCK_N": bwd["BLOCK_N"], "INPUT_PRECISION": precision}
        jobs += [
            # The launcher leaves the preprocess at Triton's default launch options.
            (f"bwd preprocess {_label(bwd)}", varlen._varlen_attn_bwd_preprocess_kernel,
             dims | {"BLOCK_M": bwd["BLOCK_PRE"]}, {}),
            (f"bwd dkdv {_label(bwd)}", varlen._varlen_attn_bwd_dkdv_kernel, dims | blocks, bwd_opts),
            (f"bwd dq {_label(bwd)}", varlen._varlen_attn_bwd_dq_kernel, dims | blocks, bwd_opts),
        ]
    return jobs


def _label(cfg: dict) -> str:
    return f"[{cfg['BLOCK_M']}x{cfg['BLOCK_N']} w{cfg['num_warps']} s{cfg['num_stages']}]"


def _config_pairs(family, seq_len, head_dim, dtype, candidates: bool):
    """(fwd, bwd) configs to compile: the defaults, then (with ``candidates``) every autotuning candidate alone."""
    device = torch.device("cuda")
    if family == "masked":
        default = (masked.get_fwd_config(seq_len, head_dim, dtype, device),
                   masked.get_bwd_config(seq_len, head_dim, dtype, device))
        others = (masked.fwd_candidates(head_dim, dtype, device), masked.bwd_candidates(head_dim, dtype, device))
    else:
        default = (varlen.get_fwd_config(seq_len, head_dim, dtype), varlen.get_bwd_config(seq_len, head_dim, dtype))
        others = (varlen.fwd_candidates(seq_len, head_dim, dtype, device),
                  varlen.bwd_candidates(seq_len, head_dim, dtype, device))
    pairs = [default]
    if candidates:
        pairs += [(cfg, None) for cfg in others[0] if cfg != default[0]]
        pairs += [(None, cfg) for cfg in others[1] if cfg != default[1]]
    return pairs


FAMILIES = {"masked": _masked_jobs, "varlen": _varlen_jobs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--dtype", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--head-dim", nargs="+", type=int, default=[64, 80, 128])
    parser.add_argument("--seq-len", type=int, default=197, help="N (masked) or max_seqlen (varlen) for the configs")
    parser.add_argument("--inductor-source", action="store_true", help="compile Inductor's copy of each kernel")
    parser.add_argument("--candidates", action="store_true", help="also compile every autotuning candidate config")
    args = parser.parse_args()
    target = GPUTarget("cuda", args.arch, 32)
    print(f"torch {torch.__version__}, triton {triton.__version__}, target sm_{args.arch}", flush=True)
    for family in args.family:
        for name in args.dtype:
            dtype = DTYPES[name]
            precision = core.dot_precision(dtype)
            for head_dim in args.head_dim:
                dims = {"HEAD_DIM": head_dim, "BLOCK_D": triton.next_power_of_2(head_dim)}
                pairs = _config_pairs(family, args.seq_len, head_dim, dtype, args.candidates)
                jobs = [job for fwd, bwd in pairs for job in FAMILIES[family](fwd, bwd, dims, precision)]
                for label, kernel, constexprs, options in jobs:
                    if args.inductor_source:
                        kernel = _inductor_copy(kernel)
                    shared = _compile(kernel, "*" + name, constexprs, options, target)
                    flag = "  OVER the sm_90 limit (autotuning skips it)" if shared > SM90_SHARED_LIMIT else ""
                    print(f"sm_{args.arch} {family} {name} D={head_dim} {label}: shared memory {shared} bytes{flag}",
                          flush=True)


if __name__ == "__main__":
    main()
