"""Compile the masked-attention kernels for a CUDA target without a GPU: catches code-generation errors and reports
shared memory per kernel, for the configs that :func:`get_fwd_config` / :func:`get_bwd_config` pick.

Usage: ``python scripts/compile_masked_attention.py [--arch 90] [--dtype fp16 bf16 fp32] [--head-dim 64 80 128]``
(takes minutes on a small CPU; run it without ``TRITON_INTERPRET``).
"""

import argparse
import sys

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

import faithful_vit.kernels  # noqa: F401

impl = sys.modules["faithful_vit.kernels.masked_attention"]
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def _compile(kernel, pointers, constexprs, options, target):
    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in pointers:
            signature[name] = pointers[name]
        else:
            signature[name] = "i32" if name.startswith("stride") or name in ("H", "N") else "fp32"
    compiled = triton.compile(ASTSource(kernel, signature, constexprs=constexprs), target=target, options=options)
    return compiled.metadata.shared


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--dtype", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--head-dim", nargs="+", type=int, default=[64, 80, 128])
    parser.add_argument("--seq-len", type=int, default=197)
    args = parser.parse_args()
    target = GPUTarget("cuda", args.arch, 32)
    device = torch.device("cuda")
    for name in args.dtype:
        dtype, elem = DTYPES[name], "*" + name
        precision = impl._dot_precision(dtype)
        int_ptrs = {"KEEP": "*i8", "K_ORDER": "*i32", "K_COUNT": "*i32", "Q_ORDER": "*i32", "Q_COUNT": "*i32",
                    "LSE": "*fp32", "DELTA": "*fp32", "DGATE": "*fp32"}
        pointers = {p: elem for p in ("Q", "K", "V", "OUT", "DO", "DQ", "DK", "DV")} | int_ptrs
        for head_dim in args.head_dim:
            fwd = impl.get_fwd_config(args.seq_len, head_dim, dtype, device)
            bwd = impl.get_bwd_config(args.seq_len, head_dim, dtype, device)
            dims = {"HEAD_DIM": head_dim, "BLOCK_D": triton.next_power_of_2(head_dim)}
            fwd_opts = {"num_warps": fwd["num_warps"], "num_stages": fwd["num_stages"]}
            bwd_opts = {"num_warps": bwd["num_warps"], "num_stages": bwd["num_stages"]}
            blocks = {"BLOCK_M": bwd["BLOCK_M"], "BLOCK_N": bwd["BLOCK_N"], "DOT_PRECISION": precision}
            jobs = [
                (f"fwd skip={skip}", impl._masked_attn_fwd_kernel,
                 dims | {"BLOCK_M": fwd["BLOCK_M"], "BLOCK_N": fwd["BLOCK_N"], "SKIP_DROPPED_QUERIES": skip,
                         "DOT_PRECISION": precision}, fwd_opts)
                for skip in (True, False)
            ]
            jobs.append(("bwd preprocess", impl._masked_attn_bwd_preprocess_kernel,
                         dims | {"BLOCK_M": bwd["BLOCK_M"]}, {"num_warps": 4}))
            jobs += [(f"bwd dkdv gate={gate}", impl._masked_attn_bwd_dkdv_kernel, dims | blocks | {"GATE_GRAD": gate},
                      bwd_opts) for gate in (False, True)]
            jobs.append(("bwd dq", impl._masked_attn_bwd_dq_kernel, dims | blocks, bwd_opts))
            for label, kernel, constexprs, options in jobs:
                shared = _compile(kernel, pointers, constexprs, options, target)
                print(f"sm_{args.arch} {name} D={head_dim} {label}: shared memory {shared} bytes", flush=True)


if __name__ == "__main__":
    main()
