"""Run folders: safe checkpoint loading, atomic files, no reuse without --resume, resume rules, damaged folders."""

import os
import shutil

import pytest
import torch
from _helpers import ShellCommand
from test_train_cli import TINY, load_train

from faithful_vit import run_folder

BASELINE = [*TINY, "--model", "baseline"]


@pytest.fixture(scope="module", autouse=True)
def _data_cache(tmp_path_factory):
    """Generated benchmark splits go to the session's temporary cache (as in test_train_cli), not the user's."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FAITHFUL_VIT_DATA", str(tmp_path_factory.getbasetemp() / "data_cache"))
        yield


@pytest.fixture(scope="module")
def finished_run(_data_cache, tmp_path_factory):
    """One finished tiny run (baseline, 1 epoch) and every path that ``os.replace`` wrote while it ran."""
    base = tmp_path_factory.mktemp("finished")
    replaced = set()
    real_replace = os.replace

    def recording_replace(src, dst, *args, **kwargs):
        replaced.add(os.path.realpath(dst))
        return real_replace(src, dst, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(os, "replace", recording_replace)
        assert load_train().main([*BASELINE, "--output", str(base), "--experiment", "run"]) == 0
    return base / "run", replaced


@pytest.fixture
def run_copy(finished_run, tmp_path):
    """A private copy of the finished run, to damage or resume."""
    return shutil.copytree(finished_run[0], tmp_path / "run")


def main_error(capsys, argv) -> tuple[int, list[str]]:
    """train.main's exit code and its stderr lines starting with ``train.py``."""
    code = load_train().main(argv)
    return code, [line for line in capsys.readouterr().err.splitlines() if line.startswith("train.py")]


def test_a_malicious_checkpoint_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "executed"
    path = tmp_path / "last.pt"
    torch.save({"model": {}, "payload": ShellCommand(f"touch {marker}")}, path)
    with pytest.raises(run_folder.RunFolderError, match=r"last\.pt: refused to load: it holds the global .*system"):
        run_folder.load_checkpoint(path)
    assert not marker.exists()


def test_resume_refuses_a_malicious_last_pt_with_exit_2(run_copy, capsys, tmp_path):
    marker = tmp_path / "executed"
    model_dir = run_copy / "baseline" / "seed0"
    (model_dir / "test_metrics.json").unlink()  # unfinished: --resume loads last.pt
    torch.save({"payload": ShellCommand(f"touch {marker}")}, model_dir / "checkpoints" / "last.pt")
    code, err = main_error(capsys, ["--resume", str(run_copy)])
    assert code == 2 and len(err) == 1 and "last.pt: refused to load" in err[0], err
    assert not marker.exists()


def test_checkpoints_hold_only_tensors_and_plain_data(finished_run):
    for name in ("last.pt", "best.pt"):
        state = torch.load(finished_run[0] / "baseline" / "seed0" / "checkpoints" / name, weights_only=True)
        assert state["model"]
    state = run_folder.load_checkpoint(finished_run[0] / "baseline" / "seed0" / "checkpoints" / "last.pt")
    assert isinstance(state["rng"][0]["numpy"]["state"]["key"], torch.Tensor)


def test_rng_states_round_trip_through_a_weights_only_checkpoint(tmp_path):
    import random

    import numpy as np

    run_folder.seed_everything(7)
    run_folder.save_checkpoint(tmp_path / "rng.pt", {"rng": run_folder.rng_states()})
    expected = (random.random(), np.random.rand(), torch.rand(()).item())
    run_folder.seed_everything(8)
    run_folder.set_rng_states(run_folder.load_checkpoint(tmp_path / "rng.pt")["rng"])
    assert (random.random(), np.random.rand(), torch.rand(()).item()) == expected


def test_every_file_of_a_run_is_written_atomically(finished_run):
    run_dir, replaced = finished_run
    files = sorted(path for path in run_dir.rglob("*") if path.is_file())
    assert len(files) >= 9  # args, summary, 2 figures, metrics.jsonl/csv, test metrics, best.pt, last.pt
    written_in_place = [str(path.relative_to(run_dir)) for path in files if os.path.realpath(path) not in replaced]
    assert written_in_place == []
    assert not [path for path in files if ".tmp" in path.name]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "summary.json"
    run_folder.write_text(path, "old")
    with pytest.raises(RuntimeError, match="interrupted"), run_folder.atomic_open(path) as handle:
        handle.write("new, half")
        raise RuntimeError("interrupted")
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["summary.json"]


@pytest.mark.parametrize("experiment", ["../../escaped", "ABSOLUTE", ".."])
def test_experiment_must_be_a_folder_name_inside_output(tmp_path, capsys, experiment):
    output = tmp_path / "a" / "b"
    if experiment == "ABSOLUTE":
        experiment = str(tmp_path / "escaped")
    code, err = main_error(capsys, [*BASELINE, "--output", str(output), "--experiment", experiment])
    assert code == 2 and len(err) == 1 and "--experiment: expected a folder name" in err[0], err
    assert sorted(os.listdir(tmp_path)) == []  # nothing written anywhere, not even --output


def test_reusing_an_experiment_name_without_resume_is_refused(run_copy, capsys):
    before = {path: path.read_bytes() for path in run_copy.rglob("*") if path.is_file()}
    argv = [*BASELINE, "--lr", "0.01", "--output", str(run_copy.parent), "--experiment", run_copy.name]
    code, err = main_error(capsys, argv)
    assert code == 2 and len(err) == 1, err
    assert "--experiment:" in err[0] and f"--resume {run_copy}" in err[0]
    assert {path: path.read_bytes() for path in run_copy.rglob("*") if path.is_file()} == before


@pytest.mark.parametrize(
    "damage, message",
    [
        ("empty args.yaml", "args.yaml is damaged: expected a mapping of every flag to its value, got an empty file"),
        ("truncated args.yaml", "args.yaml is damaged or from another version: expected every flag of train.py"),
        ("no args.yaml", "is not a run folder: it has no args.yaml"),
        ("truncated test_metrics.json", "test_metrics.json is damaged"),
        ("no metrics.jsonl", "metrics.jsonl is missing"),
        ("truncated last.pt", "last.pt: damaged or not a checkpoint"),
    ],
)
def test_a_damaged_run_folder_is_exit_2_naming_the_damage(run_copy, capsys, damage, message):
    model_dir = run_copy / "baseline" / "seed0"
    args_yaml = run_copy / "args.yaml"
    if damage == "empty args.yaml":
        args_yaml.write_text("")
    elif damage == "truncated args.yaml":
        text = args_yaml.read_text()
        args_yaml.write_text(text[: text.index("warmup_epochs")])  # a valid mapping missing its last flags
    elif damage == "no args.yaml":
        args_yaml.unlink()
    elif damage == "truncated test_metrics.json":
        path = model_dir / "test_metrics.json"
        path.write_text(path.read_text()[:40])
    elif damage == "no metrics.jsonl":
        (model_dir / "metrics.jsonl").unlink()
    else:
        (model_dir / "test_metrics.json").unlink()
        path = model_dir / "checkpoints" / "last.pt"
        path.write_bytes(path.read_bytes()[:1000])
    code, err = main_error(capsys, ["--resume", str(run_copy)])
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert not (run_copy / "faithful_tiny").exists()  # the default experiment did not start in the old folder


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--lr", "0.01"], "--lr (run: 0.001, given: 0.01)"),
        (["--batch-size", "8"], "--batch-size (run: 16, given: 8)"),
        (["--data-kwargs", "n_train=64"], "--data-kwargs (run: {"),
        (["--experiment", "other", "--epochs", "2"], "--epochs (run: 1, given: 2), --experiment (run: 'run'"),
    ],
)
def test_resume_refuses_flags_that_change_the_results(run_copy, capsys, flags, named):
    args_yaml = (run_copy / "args.yaml").read_text()
    code, err = main_error(capsys, ["--resume", str(run_copy), *flags])
    assert code == 2 and len(err) == 1 and named in err[0], err
    assert "only --num-workers, --no-progress, --log-interval, --checkpoint-every may differ" in err[0]
    assert (run_copy / "args.yaml").read_text() == args_yaml


def test_resume_refuses_a_config_file_that_changes_the_results(run_copy, capsys, tmp_path):
    config = tmp_path / "other.yaml"
    config.write_text("weight-decay: 0.1\n")
    code, err = main_error(capsys, ["--resume", str(run_copy), "-c", str(config)])
    assert code == 2 and len(err) == 1 and "--weight-decay (run: 0.05, given: 0.1)" in err[0], err


def test_resume_allows_harmless_flags_keeps_args_yaml_and_removes_stale_temporaries(run_copy, capsys):
    args_yaml = (run_copy / "args.yaml").read_text()
    checkpoints = run_copy / "baseline" / "seed0" / "checkpoints"
    stale = [checkpoints / ".last.pt.tmp4242", run_copy / ".summary.json.tmp17"]
    for path in stale:
        path.write_bytes(b"left by a kill")
    kept = [run_copy / "notes.tmp1", run_copy / ".notes"]  # not ours: the cleanup leaves them
    for path in kept:
        path.write_text("user file")
    argv = ["--resume", str(run_copy), "--num-workers", "0", "--log-interval", "5", "--checkpoint-every", "7"]
    assert load_train().main([*argv, "--no-progress"]) == 0
    assert "removed 2 temporary file(s)" in capsys.readouterr().err
    assert not any(path.exists() for path in stale) and all(path.exists() for path in kept)
    assert (run_copy / "args.yaml").read_text() == args_yaml  # it describes the flags that produced the results


def test_nan_before_the_first_checkpoint_says_no_checkpoint_exists(tmp_path, capsys, monkeypatch):
    from faithful_vit import losses

    def nan_losses(model, out, images, labels):
        return {"total": out.logits.sum() * float("nan")}

    monkeypatch.setattr(losses, "training_losses", nan_losses)
    argv = [*BASELINE, "--log-interval", "1", "--output", str(tmp_path), "--experiment", "nan"]
    code, err = main_error(capsys, argv)
    assert code == 1 and len(err) == 1 and "non-finite training loss (total = nan)" in err[0], err
    assert "no checkpoint was written before it" in err[0] and "last.pt" not in err[0]
    assert not list((tmp_path / "nan").rglob("*.pt"))


def test_a_malicious_pretrained_file_is_refused_and_runs_nothing(tmp_path):
    import faithful_vit

    marker = tmp_path / "executed"
    path = tmp_path / "vit.pth"
    torch.save({"payload": ShellCommand(f"touch {marker}")}, path)
    with pytest.raises(RuntimeError, match="weights_only=True blocked"):  # timm's load_state_dict
        faithful_vit.create_model("faithful_tiny", pretrained_file=str(path))
    assert not marker.exists()


def test_resume_retests_a_model_whose_test_metrics_were_deleted_and_rewrites_its_history(run_copy, finished_run):
    import json

    model_dir = run_copy / "baseline" / "seed0"
    (model_dir / "test_metrics.json").unlink()
    (model_dir / "metrics.jsonl").unlink()  # as after a kill between last.pt and the metrics files
    assert load_train().main(["--resume", str(run_copy)]) == 0
    original = finished_run[0] / "baseline" / "seed0"
    assert (model_dir / "metrics.jsonl").read_text() == (original / "metrics.jsonl").read_text()
    again, before = (json.loads((d / "test_metrics.json").read_text()) for d in (model_dir, original))
    assert (again["accuracy"], again["group_accuracy"]) == (before["accuracy"], before["group_accuracy"])
