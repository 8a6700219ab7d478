"""The attention kernels compile for the H100/H200 (sm_90) as a GPU launch compiles them, without a GPU.

``scripts/compile_kernels.py --check`` records real launches of both families on CPU tensors, specialises their
arguments as Triton's JIT does, compiles each kernel for sm_90 with the ptxas that ships in the Triton wheel, and
fails when a default config spills registers or needs more shared memory than a block may use. This catches
code-generation errors and register-pressure regressions before a GPU session spends its time on them.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from faithful_vit.kernels._attention_core import bwd_parts

masked = sys.modules["faithful_vit.kernels.masked_attention"]
varlen = sys.modules["faithful_vit.kernels.varlen_attention"]
SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "compile_kernels.py"


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
def test_default_configs_compile_for_sm90_without_spills(dtype):
    head_dims = ["64", "128"]
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    result = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--check",
            "--sass",
            "--dtype",
            dtype,
            "--head-dim",
            *head_dims,
            "--seq-len",
            "1374",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = [line for line in result.stdout.splitlines() if " registers, " in line]
    attention = [line for line in lines if "block_lists" not in line]
    assert len(attention) == sum(_kernels_per_head_dim(dtype, int(d)) for d in head_dims), result.stdout
    assert any("block_lists" in line and "EVERY_BLOCK=True" in line for line in lines), result.stdout
    assert any("block_lists" in line and "EVERY_BLOCK=False" in line for line in lines), result.stdout
    # Each part of an attention kernel has two block loops, in program order: the one over fully valid blocks,
    # without per-token masks, then the longer one over partly valid blocks (the preprocess kernels have none). The
    # masked forward has two loops over full key blocks, one with direct offsets (full blocks 0..n-1) and one through
    # the block list, of which a program runs one, before its loop over partly kept blocks.
    for line in attention:
        loops = [int(n) for n in re.findall(r"loops ([\d/]+) instr", line)[0].split("/")] if "loops" in line else []
        if "masked_attn_fwd" in line:
            assert len(loops) == 3 and max(loops[:2]) < loops[2], line
            continue
        parts = 0 if "preprocess" in line else 2 if "PARTS=dkdv+dq" in line else 1
        assert len(loops) == 2 * parts, line
        assert all(full < partial for full, partial in zip(loops[::2], loops[1::2])), line
    # With direct offsets the masked forward's full-block loop gets as many K/V buffers as the varlen forward's.
    for head_dim in head_dims:
        buffers = {
            kernel: re.findall(r"K/V buffers ([\d+/]+)", line)[0].split("/")
            for line in attention
            for kernel in ("masked_attn_fwd", "varlen_attn_fwd")
            if f" D={head_dim} {kernel} " in line
        }
        assert buffers["masked_attn_fwd"][0] == buffers["varlen_attn_fwd"][0], result.stdout


def _kernels_per_head_dim(dtype: str, head_dim: int) -> int:
    """Attention kernels the script compiles per head dim: per family the forward (masked: with and without dropped
    queries), the preprocess, each launch of the deterministic backward and, where it exists (not fp32), the atomic-dQ
    one with its preprocess (masked: with and without the gate gradient)."""
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    total = 0
    for module, variants in ((masked, 2), (varlen, 1)):
        cfg = module.get_bwd_config(1374, head_dim, torch_dtype, torch.device("cuda"))
        atomic = module.get_atomic_bwd_config(1374, head_dim, torch_dtype, torch.device("cuda")) is not None
        total += variants + 1 + variants * len(bwd_parts(cfg, True)) + atomic * (1 + variants)
    return total
