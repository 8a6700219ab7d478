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
    # Every kernel of both families was compiled: per head dim 6 masked (2 fwd variants, preprocess, dK/dV x2, dQ)
    # and 4 varlen, plus the masked block lists (independent of the head dim: compiled once per block size).
    attention = [line for line in lines if "block_lists" not in line]
    assert len(attention) == len(head_dims) * (6 + 4), result.stdout
    assert any("block_lists" in line and "EVERY_BLOCK=True" in line for line in lines), result.stdout
    assert any("block_lists" in line and "EVERY_BLOCK=False" in line for line in lines), result.stdout
    # Each attention kernel has two block loops, and the one over fully valid blocks, without per-token masks, is the
    # shorter (the preprocess kernels have none). The masked forward has two loops over full key blocks, one with
    # direct offsets (full blocks 0..n-1) and one through the block list, of which a program runs one.
    for line in attention:
        loops = [int(n) for n in re.findall(r"loops ([\d/]+) instr", line)[0].split("/")] if "loops" in line else []
        assert len(loops) == (0 if "preprocess" in line else 3 if "masked_attn_fwd" in line else 2), line
        assert not loops or loops[0] > max(loops[1:]), line  # listed longest first
    # With direct offsets the masked forward's full-block loop gets as many K/V buffers as the varlen forward's.
    for head_dim in head_dims:
        buffers = {
            kernel: re.findall(r"K/V buffers ([\d+/]+)", line)[0].split("/")
            for line in attention
            for kernel in ("masked_attn_fwd", "varlen_attn_fwd")
            if f" D={head_dim} {kernel} " in line
        }
        assert buffers["masked_attn_fwd"][0] == buffers["varlen_attn_fwd"][0], result.stdout
