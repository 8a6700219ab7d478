"""Two-process DistributedDataParallel run on CPU (gloo) through torchrun, on 127.0.0.1 only."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_torchrun_two_processes_gloo(tmp_path):
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "GLOO_SOCKET_IFNAME": "lo",
        "FAITHFUL_VIT_DATA": str(tmp_path / "data"),
    }
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "1",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        str(ROOT / "train.py"),
        "--device",
        "cpu",
        "--backend",
        "torch",
        "--no-progress",
        "--model",
        "faithful_tiny,baseline",
        "--data-kwargs",
        "n_train=64",
        "n_val=24",
        "n_test=21",
        "image_size=32",
        "--model-kwargs",
        "backbone_kwargs={embed_dim: 32, depth: 1, num_heads: 2}",
        "stage1_epochs=1",  # epoch 2 leaves stage 1 without gradients: DDP must allow unused parameters
        "--epochs",
        "2",
        "--batch-size",
        "8",
        "--eval-batch-size",
        "8",
        "--checkpoint-every",
        "3",
        "--output",
        str(tmp_path),
        "--experiment",
        "ddp",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=420, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("run folder:") == 1  # only rank 0 prints the table
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert list(summary["models"]) == ["faithful_tiny", "baseline"]
    for name, entry in summary["models"].items():
        run = entry["per_seed"][0]
        # Uneven evaluation shards (21 = 11 + 10 images) are summed over both ranks, each image counted once.
        assert run["num_images"] == 21, name
        assert 0 <= run["worst_group_accuracy"] <= run["accuracy"] <= 1
        rows = [json.loads(line) for line in (tmp_path / "ddp" / name / "seed0" / "metrics.jsonl").open()]
        assert [row["epoch"] for row in rows] == [1, 2]
        assert sum(row["val_group_count"][0] for row in rows[:1]) + sum(rows[0]["val_group_count"][1:]) == 24
        # 64 samples over 2 ranks with batch 8: 4 steps per epoch per rank.
        state = torch.load(tmp_path / "ddp" / name / "seed0" / "checkpoints" / "last.pt", weights_only=True)
        assert state["world_size"] == 2 and state["global_step"] == 8 and len(state["rng"]) == 2
    two_stage = [json.loads(line) for line in (tmp_path / "ddp" / "faithful_tiny" / "seed0" / "metrics.jsonl").open()]
    assert "train_equivariance" in two_stage[0] and "train_equivariance" not in two_stage[1]
