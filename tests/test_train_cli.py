"""train.py: --help, YAML config, bad inputs (one line, exit 2), a tiny full run, and resume after a hard kill."""

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# A tiny benchmark and model so that a whole run takes seconds on one CPU thread.
TINY = [
    "--data-kwargs",
    "n_train=96",
    "n_val=32",
    "n_test=32",
    "image_size=32",
    "--model-kwargs",
    "backbone_kwargs={embed_dim: 32, depth: 1, num_heads: 2}",
    "--epochs",
    "1",
    "--batch-size",
    "16",
    "--eval-batch-size",
    "32",
    "--no-progress",
    "--attn-impl",
    "torch",
]


def load_train():
    spec = importlib.util.spec_from_file_location("train_cli", ROOT / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _data_cache(tmp_path_factory, monkeypatch):
    """Generated benchmark splits go to one temporary cache per test session, not the user's cache."""
    monkeypatch.setenv("FAITHFUL_VIT_DATA", str(tmp_path_factory.getbasetemp() / "data_cache"))


def run_cli(args, timeout=300, **kwargs):
    # Same thread count as this process: CPU reductions are bitwise reproducible only for a fixed thread count.
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=ROOT,
        **kwargs,
    )


def test_every_flag_has_help():
    parser = load_train()._build_parser()
    flags = [action for action in parser._actions if action.option_strings and action.dest != "help"]
    assert len(flags) > 30
    for action in flags:
        assert action.help and len(action.help) > 10, action.option_strings
    help_text = parser.format_help()
    for flag in (
        "--model",
        "--data",
        "--epochs",
        "--batch-size",
        "--lr",
        "--output",
        "--resume",
        "--seeds",
        "--checkpoint-every",
        "--amp",
        "--compile",
        "--channels-last",
    ):
        assert flag in help_text


def test_help_runs():
    result = run_cli(["--help"], timeout=120)
    assert result.returncode == 0 and "usage:" in result.stdout and "Data:" in result.stdout


def test_bad_input_is_one_line_and_exit_2():
    result = run_cli(["--model", "faithful_nope"], timeout=120)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and len(lines) == 1 and "--model: unknown model" in lines[0]


def test_bad_input_in_process(tmp_path, capsys):
    train = load_train()
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("epochs: 1\nno_such_flag: 3\n")
    wrong_format = tmp_path / "folder"
    (wrong_format / "train").mkdir(parents=True)  # no class folders: not an ImageFolder
    cases = [
        (["--data", "waterbirds", "--data-dir", "/nonexistent/waterbirds"], "--data-dir: dataset folder not found"),
        (["-c", str(bad_yaml)], "--config: unknown keys ['no_such_flag']"),
        (["--data", "imagefolder", "--data-dir", str(wrong_format)], "--data imagefolder:"),
        (["--data", "waterbirds", "--data-dir", str(wrong_format)], "metadata.csv"),
        (["--data-kwargs", "bogus=1"], "--data synthetic:"),
        (
            [
                "--model",
                "faithful_tiny",
                "--model-kwargs",
                "num_parts=0",
                "--data-kwargs",
                "n_train=8",
                "n_val=8",
                "n_test=8",
                "image_size=32",
                "--output",
                str(tmp_path),
            ],
            "--model-kwargs:",
        ),
    ]
    for argv, message in cases:
        assert train.main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (argv, err)


def test_yaml_config_sets_defaults_and_the_command_line_wins(tmp_path):
    config = tmp_path / "cfg.yaml"
    config.write_text("epochs: 3\nbatch-size: 8\nmodel: baseline\nmodel_kwargs: {num_parts: 2}\n")
    args, text = load_train()._parse_args(["-c", str(config), "--epochs", "5"])
    assert (args.epochs, args.batch_size, args.model, args.model_kwargs) == (5, 8, "baseline", {"num_parts": 2})
    assert "epochs: 5" in text


def test_tiny_run_writes_the_run_folder(tmp_path, capsys):
    train = load_train()
    code = train.main([*TINY, "--output", str(tmp_path), "--experiment", "run", "--checkpoint-every", "3"])
    assert code == 0
    out = capsys.readouterr().out
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert list(summary["models"]) == ["faithful_tiny", "baseline", "oracle"]
    for name, entry in summary["models"].items():
        for key in (
            "accuracy",
            "worst_group_accuracy",
            "group_accuracy",
            "mask_iou",
            "background_in_kept",
            "kept_fraction",
            "images_per_second",
            "peak_memory_mb",
        ):
            assert entry[key] is not None, (name, key)
        assert len(entry["group_accuracy"]) == 4 and name in out
        folder = run / name / "seed0"
        rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        assert [row["epoch"] for row in rows] == [1] and "val_worst_group_accuracy" in rows[0]
        assert (folder / "metrics.csv").read_text().startswith("epoch,")
        assert (folder / "checkpoints" / "best.pt").exists() and (folder / "checkpoints" / "last.pt").exists()
        assert (run / "figures" / f"masks_{name}_seed0.png").stat().st_size > 1000
    assert summary["models"]["baseline"]["kept_fraction"] == 1.0
    assert summary["models"]["oracle"]["mask_iou_patch"] == pytest.approx(1.0)
    assert (run / "figures" / "training_curves.png").exists() and (run / "args.yaml").exists()
    assert "worst-group" in out and "img/s" in out


@pytest.mark.slow
def test_hard_kill_then_resume_continues_the_same_run(tmp_path):
    args = [*TINY, "--model", "baseline", "--epochs", "3", "--checkpoint-every", "2", "--output", str(tmp_path)]
    args[args.index("n_train=96")] = "n_train=320"
    train = load_train()
    assert train.main([*args, "--experiment", "reference"]) == 0

    # Same thread count as this process: CPU reductions are bitwise reproducible only for a fixed thread count.
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *args, "--experiment", "killed"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    last = tmp_path / "killed" / "baseline" / "seed0" / "checkpoints" / "last.pt"
    deadline = time.monotonic() + 240
    while not last.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert process.poll() is None, "the run ended before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    killed_at = torch.load(last, weights_only=True)["global_step"]
    assert killed_at < 60  # 3 epochs of 20 steps: the kill happened mid-run

    assert train.main(["--resume", str(tmp_path / "killed")]) == 0
    final = [
        torch.load(tmp_path / name / "baseline" / "seed0" / "checkpoints" / "last.pt", weights_only=True)
        for name in ("reference", "killed")
    ]
    assert final[0]["global_step"] == final[1]["global_step"] == 60
    for key, value in final[0]["model"].items():
        assert torch.equal(value, final[1]["model"][key]), key
    metrics = [
        json.loads((tmp_path / name / "summary.json").read_text())["models"]["baseline"]
        for name in ("reference", "killed")
    ]
    assert metrics[0]["accuracy"] == metrics[1]["accuracy"]
    assert metrics[0]["group_accuracy"] == metrics[1]["group_accuracy"]


def test_seeds_give_mean_and_std(tmp_path):
    train = load_train()
    assert (
        train.main(
            [
                *TINY,
                "--model",
                "baseline",
                "--seeds",
                "0,1",
                "--channels-last",
                "--output",
                str(tmp_path),
                "--experiment",
                "seeds",
            ]
        )
        == 0
    )
    entry = json.loads((tmp_path / "seeds" / "summary.json").read_text())["models"]["baseline"]
    assert entry["num_seeds"] == 2 and [run["seed"] for run in entry["per_seed"]] == [0, 1]
    values = torch.tensor([run["worst_group_accuracy"] for run in entry["per_seed"]], dtype=torch.float64)
    assert entry["worst_group_accuracy"] == pytest.approx(values.mean().item())
    assert entry["worst_group_accuracy_std"] == pytest.approx(values.std().item())


def test_nan_loss_is_one_line_and_exit_1(tmp_path, capsys, monkeypatch):
    from faithful_vit.baseline import FullImageViT

    def nan_losses(self, out, images, labels):
        total = out.logits.sum() * float("nan")
        return {"total": total}

    monkeypatch.setattr(FullImageViT, "compute_losses", nan_losses)
    train = load_train()
    code = train.main([*TINY, "--model", "baseline", "--log-interval", "1", "--output", str(tmp_path)])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("train.py")]
    assert code == 1 and len(err) == 1 and "non-finite training loss (total = nan)" in err[0]
