"""train.py: --help, YAML config, bad inputs (one line, exit 2), a tiny full run, and resume after a hard kill."""

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from _helpers import ShellCommand
from PIL import Image

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
    "--backend",
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


def test_help_imports_neither_torch_nor_the_datasets():
    """--help stays fast: the flag machinery (faithful_vit.cli) is imported without the package's heavy modules."""
    code = (
        "import runpy, sys\n"
        "sys.argv = ['train.py', '--help']\n"
        "try:\n    runpy.run_path('train.py', run_name='__main__')\n"
        "except SystemExit as stop:\n    assert stop.code == 0\n"
        "heavy = sorted(m for m in sys.modules if m in ('torch', 'faithful_vit.data', 'faithful_vit.model'))\n"
        "assert not heavy, heavy"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0 and "usage:" in result.stdout, result.stderr


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
        (["-c", str(bad_yaml)], f"--config {bad_yaml}: unknown keys ['no_such_flag']"),
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
                "--batch-size",
                "4",
                "--output",
                str(tmp_path / "runs"),
            ],
            "--model-kwargs:",
        ),
    ]
    for argv, message in cases:
        assert train.main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (argv, err)
    assert not (tmp_path / "runs").exists()  # a bad --model-kwargs is found before the run folder is written


# Small data and model: the cases that get as far as building the datasets stop there, in a second.
SMALL = [*TINY, "--model", "faithful_tiny", "--output"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--batch-size", "0"], "argument --batch-size: expected a positive integer, got '0'"),
        (["--eval-batch-size", "-2"], "argument --eval-batch-size: expected a positive integer, got '-2'"),
        (["--epochs", "0"], "argument --epochs: expected a positive integer, got '0'"),
        (["--epochs", "-1"], "argument --epochs: expected a positive integer, got '-1'"),
        (["--epochs", "1.5"], "argument --epochs: expected a positive integer, got '1.5'"),
        (["--log-interval", "0"], "argument --log-interval: expected a positive integer, got '0'"),
        (["--lr", "nan"], "argument --lr: expected a finite number > 0, got 'nan'"),
        (["--lr", "inf"], "argument --lr: expected a finite number > 0, got 'inf'"),
        (["--weight-decay", "-0.1"], "argument --weight-decay: expected a finite number >= 0, got '-0.1'"),
        (
            ["--seeds", "a,b"],
            "argument --seeds: expected distinct comma-separated integers >= 0, e.g. 0,1,2, got 'a,b'",
        ),
        (["--seeds", "0,0"], "argument --seeds: expected distinct comma-separated"),
        (["--seed", "-1"], "argument --seed: expected an integer in 0..2147483647, got '-1'"),
        (["--warmup-epochs", "-3"], "argument --warmup-epochs: expected a finite number >= 0, got '-3'"),
        (["--checkpoint-every", "-5"], "argument --checkpoint-every: expected an integer >= 0, got '-5'"),
        (["--num-workers", "-1"], "argument --num-workers: expected an integer >= 0, got '-1'"),
        (["--oracle-threshold", "1"], "argument --oracle-threshold: expected a number in [0, 1), got '1'"),
        (["--max-corrupt-fraction", "2"], "argument --max-corrupt-fraction: expected a number in [0, 1], got '2'"),
        (["--device", "tpu"], "argument --device: invalid choice: 'tpu' (choose from 'auto', 'cpu', 'cuda')"),
        (["--device", "meta"], "argument --device: invalid choice: 'meta'"),
        (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
        (["--model", "baseline,baseline"], "--model: expected each model once, got 'baseline,baseline'"),
        (
            ["--model-kwargs", "backbone_kwargs={embed_dim:32}"],
            "argument --model-kwargs: YAML reads 'embed_dim:32' as a key without a value; put a space after the "
            "colon: 'embed_dim: 32'",
        ),
        (["--model-kwargs", "depth=[1,"], "argument --model-kwargs: 'depth=[1,' is not valid YAML"),
        (["--model-kwargs", "=1"], "argument --model-kwargs: expected key=value, got '=1'"),
        (["--min-lr", "0.1", "--lr", "0.01"], "--min-lr: expected at most --lr (0.01), got 0.1"),
        (
            ["--data", "nope"],
            "--data: expected one of ['cub', 'imagefolder', 'imagenet9', 'metashift', 'synthetic', 'waterbirds', "
            "'waterbirds_lite'], got 'nope'",
        ),
        (["--data-dir", "somewhere"], "--data-dir: not used by --data synthetic"),
        (["--img-size", "32"], "--img-size: not used by --data synthetic"),
        (["--pretrained-file", "/nonexistent/vit.pth"], "--pretrained-file: no such file: /nonexistent/vit.pth"),
        (["--batch-size", "97"], "--batch-size: expected at most 96, the training images of --data synthetic"),
        (
            ["--data-kwargs", "n_train=8", "n_val=0", "n_test=8", "--batch-size", "4"],
            "--data synthetic: the val split is empty",
        ),
        (
            ["--data-kwargs", "n_train=8", "n_val=8", "n_test=8", "image_size=30", "--batch-size", "4"],
            "--model-kwargs: img_size: expected a multiple of the patch size (8, 8), got 30",
        ),
    ],
)
def test_bad_values_are_one_line_exit_2_and_no_run_folder(tmp_path, capsys, argv, message):
    """Each would otherwise end in a traceback (exit 1), train anyway, or silently do something else."""
    output = tmp_path / "runs"
    assert load_train().main([*SMALL, str(output), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"train.py: error: {message}"] or (len(err) == 1 and message in err[0]), err
    assert not output.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda_is_a_usage_error(tmp_path, capsys):
    assert load_train().main([*SMALL, str(tmp_path / "runs"), "--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "train.py: error: --device: expected a device this machine has, got 'cuda' but CUDA is not available"
    ]
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    "text, message",
    [
        ("epochs: 1\n  batch_size: : 3\n", "not valid YAML: mapping values are not allowed here at line 2"),
        ("epochs: [1, 2]\n", "epochs: expected a positive integer, got [1, 2]"),
        ("epochs: 0\n", "epochs: expected a positive integer, got 0"),
        ("lr: .nan\n", "lr: expected a finite number > 0, got nan"),
        ("amp: 3\n", "amp: expected true or false, got 3"),
        ("sched: linear\n", "sched: expected one of ['cosine', 'constant'], got 'linear'"),
        ("model: [baseline]\n", "model: expected a string, got ['baseline']"),
        ("seeds: [0, 0]\n", "seeds: expected distinct comma-separated integers"),
        ("model_kwargs: [1]\n", "model_kwargs: expected a mapping of names to values, got [1]"),
        ("model_kwargs: {backbone_kwargs: {depth:1}}\n", "model_kwargs: YAML reads 'depth:1' as a key without a value"),
        ("- epochs\n", "expected a YAML mapping of flag names to values"),
    ],
)
def test_bad_yaml_config_is_one_line_exit_2(tmp_path, capsys, text, message):
    config = tmp_path / "cfg.yaml"
    config.write_text(text)
    assert load_train().main(["-c", str(config), "--output", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"train.py: error: --config {config}") and message in err[0], err
    assert not (tmp_path / "runs").exists()


def test_yaml_values_are_parsed_as_their_flags(tmp_path):
    config = tmp_path / "cfg.yaml"
    config.write_text("seeds: [2, 0]\nlr: 1e-3\nepochs: 2\namp: false\nimg_size: null\n")
    args, _ = load_train()._parse_args(["-c", str(config)])
    assert (args.seeds, args.lr, args.epochs, args.amp, args.img_size) == ("2,0", 1e-3, 2, False, None)


def test_create_model_names_a_missing_pretrained_file(tmp_path):
    import faithful_vit

    with pytest.raises(FileNotFoundError, match=r"pretrained_file: no such file: '.*missing\.pth'"):
        faithful_vit.create_model("faithful_tiny", pretrained_file=tmp_path / "missing.pth")


def write_waterbirds(root, n_train=4, n_val=2, n_test=2):
    """A tiny Waterbirds folder (metadata.csv and 16x16 JPEGs), groups cycling through all four."""
    lines = ["img_id,img_filename,y,split,place,place_filename"]
    for split, count in enumerate((n_train, n_val, n_test)):
        for i in range(count):
            name = f"{split}/img{i}.jpg"
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (16, 16), (40 * i % 256, 0, 0)).save(root / name)
            lines.append(f"{len(lines)},{name},{i % 2},{split},{i // 2 % 2},p.jpg")
    (root / "metadata.csv").write_text("\n".join(lines) + "\n")
    return root


WATERBIRDS = ["--data", "waterbirds", "--img-size", "16", *TINY[5:], "--model", "baseline", "--output"]


@pytest.mark.parametrize(
    "row, message",
    [
        ("9,../outside.jpg,0,0,0,p.jpg", "metadata.csv:10: img_filename: expected a path inside the dataset folder"),
        ("9,/etc/passwd,0,1,0,p.jpg", "metadata.csv:10: img_filename: expected a path inside the dataset folder"),
        ("9,0/img0.jpg,2,0,0,p.jpg", "metadata.csv:10: y: expected an integer in 0..1, got '2'"),
        ("9,0/img0.jpg,0,2,3,p.jpg", "metadata.csv:10: place: expected an integer in 0..1, got '3'"),
        ("9,0/gone.jpg,0,0,0,p.jpg", "metadata.csv:10: image file not found:"),
        ("9,0,0,0,0,p.jpg", "metadata.csv:10: image file is a folder, not a file:"),
    ],
)
def test_bad_waterbirds_rows_are_one_line_exit_2(tmp_path, capsys, row, message):
    root = write_waterbirds(tmp_path / "wb")
    (root / "metadata.csv").write_text((root / "metadata.csv").read_text() + row + "\n")
    assert load_train().main([*WATERBIRDS, str(tmp_path / "runs"), "--data-dir", str(root)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("train.py: error: --data waterbirds: ") and message in err[0], err
    assert not (tmp_path / "runs").exists()


def test_empty_validation_split_is_refused(tmp_path, capsys):
    root = write_waterbirds(tmp_path / "wb", n_val=0)
    assert load_train().main([*WATERBIRDS, str(tmp_path / "runs"), "--data-dir", str(root)]) == 2
    assert capsys.readouterr().err.strip() == "train.py: error: --data waterbirds: the val split is empty"


def test_undecodable_images_are_skipped_up_to_a_fraction_then_stop_the_run(tmp_path, capsys):
    root = write_waterbirds(tmp_path / "wb", n_train=8)
    (root / "0/img3.jpg").write_bytes(b"not an image")  # 1 of 8 training images
    argv = [*WATERBIRDS, str(tmp_path / "runs"), "--data-dir", str(root), "--batch-size", "2", "--eval-batch-size", "2"]
    train = load_train()
    with pytest.warns(UserWarning, match="could not be read"):
        assert train.main([*argv, "--experiment", "strict"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("train.py")]
    assert err == [
        "train.py: error: train split: 1 of 8 images could not be decoded (more than 1%; --max-corrupt-fraction); "
        "fix or remove them"
    ]
    assert not (tmp_path / "runs" / "strict" / "summary.json").exists()
    with pytest.warns(UserWarning, match="could not be read"):
        assert train.main([*argv, "--experiment", "lenient", "--max-corrupt-fraction", "0.2"]) == 0
    rows = (tmp_path / "runs" / "lenient" / "baseline" / "seed0" / "metrics.jsonl").read_text().splitlines()
    assert json.loads(rows[-1])["skipped_corrupt_train"] == 1


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
    from faithful_vit import losses

    def nan_losses(model, out, images, labels):
        total = out.logits.sum() * float("nan")
        return {"total": total}

    monkeypatch.setattr(losses, "training_losses", nan_losses)
    train = load_train()
    code = train.main([*TINY, "--model", "baseline", "--log-interval", "1", "--output", str(tmp_path)])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("train.py")]
    assert code == 1 and len(err) == 1 and "non-finite training loss (total = nan)" in err[0]


def test_an_unusable_pretrained_file_is_one_line_before_the_run_folder(tmp_path):
    import timm

    marker = tmp_path / "executed"
    malicious, truncated, foreign, fitting = (tmp_path / f"{n}.pth" for n in ("evil", "cut", "foreign", "fits"))
    torch.save({"payload": ShellCommand(f"touch {marker}")}, malicious)
    torch.save(timm.create_model("vit_tiny_patch16_224", pretrained=False).state_dict(), foreign)
    truncated.write_bytes(foreign.read_bytes()[:1000])
    stage = faithful_vit_stage_of_tiny()
    torch.save(stage.state_dict(), fitting)
    tiny = ["--model", "faithful_tiny", "--data-kwargs", "n_train=32", "n_val=8", "n_test=8", "--batch-size", "8"]
    for path, message in (
        (malicious, "cannot load .*evil.pth into faithful_tiny: .*(Weights only load failed|Unsupported global)"),
        (truncated, "cannot load .*cut.pth into faithful_tiny"),
        (foreign, "cannot load .*foreign.pth into faithful_tiny"),
    ):
        out = tmp_path / f"runs_{path.stem}"
        result = run_cli([*tiny, "--pretrained-file", str(path), "--output", str(out), "--epochs", "1"])
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and re.search(f"--pretrained-file: {message}", lines[0]), result.stderr
        assert not out.exists()
    assert not marker.exists()
    # The same check accepts a file that fits (the model's own stage-1 backbone).
    args, _ = load_train()._parse_args([*tiny, "--pretrained-file", str(fitting), "--output", str(tmp_path / "ok")])
    from faithful_vit import experiment

    splits, data = experiment.build_datasets(args)
    experiment.check_datasets_and_models(args, ["faithful_tiny"], splits, data["image_size"])


def faithful_vit_stage_of_tiny():
    import faithful_vit

    return faithful_vit.create_model("faithful_tiny", num_classes=2).stage1
