"""python -m faithful_vit.pretrain: the MAE loss learns, the checkpoint loads through --pretrained-file, bad flags."""

import json

import pytest
import torch
from _tiny import TINY_BACKBONE
from safetensors.torch import load_file

import faithful_vit
from faithful_vit import pretrain

TINY_MODEL_KWARGS = ["--model-kwargs", "backbone_kwargs={embed_dim: 32, depth: 2, num_heads: 2, mlp_ratio: 2.0}"]
TINY_DATA = ["--data", "synthetic", "--data-kwargs", "n_train=24", "n_val=8", "n_test=8", "image_size=32"]


@pytest.fixture(autouse=True)
def _data_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("FAITHFUL_VIT_DATA", str(tmp_path_factory.getbasetemp() / "data_cache"))


def test_loss_decreases_on_a_fixed_batch():
    torch.manual_seed(0)
    model = pretrain.build_autoencoder(
        "faithful_tiny_wblite", {"backbone_kwargs": TINY_BACKBONE}, 32, decoder_dim=32, decoder_depth=1
    )
    images = torch.randn(4, 3, 32, 32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        torch.manual_seed(1)  # the same hidden patches every step: the batch is fixed
        loss = model(images, 0.75)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def test_only_hidden_patches_count():
    torch.manual_seed(0)
    model = pretrain.build_autoencoder(
        "faithful_tiny_wblite", {"backbone_kwargs": TINY_BACKBONE}, 32, decoder_dim=32, decoder_depth=1
    )
    images = torch.randn(2, 3, 32, 32)
    torch.manual_seed(3)
    loss = model(images, 0.5)
    assert torch.isfinite(loss) and loss > 0
    # With no patch hidden there is nothing to predict: the visible patches never enter the loss.
    torch.manual_seed(3)
    assert model(images, 0.0).item() == 0.0


def test_checkpoint_loads_into_the_preset_through_pretrained_file(tmp_path, capsys):
    out = tmp_path / "mae"
    argv = [*TINY_DATA, *TINY_MODEL_KWARGS, "--epochs", "2", "--batch-size", "8", "--output", str(out)]
    assert pretrain.main([*argv, "--no-progress", "--decoder-dim", "32", "--decoder-depth", "1"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [0, 1] and all(row["loss"] > 0 for row in rows)
    assert "epochs: 2" in (out / "args.yaml").read_text()
    weights = out / pretrain.BACKBONE_FILE
    state = load_file(weights)
    model = faithful_vit.create_model(
        "faithful_tiny_wblite", pretrained_file=str(weights), img_size=32, backbone_kwargs=TINY_BACKBONE
    )
    for stage in (model.stage1, model.stage2):
        own = stage.state_dict()
        assert set(state) == set(own)
        assert all(torch.equal(own[key], value) for key, value in state.items())
    # train.py's own check of --pretrained-file (it loads the file into every preset of --model) accepts it.
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("train_cli", Path(__file__).resolve().parents[1] / "train.py")
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    from faithful_vit import experiment

    args, _ = train._parse_args(
        [
            *TINY_DATA,
            *TINY_MODEL_KWARGS,
            "--model",
            "faithful_tiny_wblite",
            "--pretrained-file",
            str(weights),
            "--batch-size",
            "8",
            "--output",
            str(tmp_path / "runs"),
        ]
    )
    names = experiment.check_args(args)
    splits, data = experiment.build_datasets(args)
    experiment.check_datasets_and_models(args, names, splits, data["image_size"])


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--epochs", "0"], "--epochs: expected a positive integer, got '0'"),
        (["--mask-ratio", "1"], r"--mask-ratio: expected a number in \[0, 1\), got '1'"),
        (["--model", "resnet50"], "--model: expected a two-stage preset"),
        (["--batch-size", "25"], "--batch-size: expected at most 24"),
        (["--data", "nope"], "--data: expected one of"),
        (["--model-kwargs", "num_parts=0"], "--model-kwargs: num_parts"),
    ],
)
def test_bad_flags_are_one_line_and_exit_2(tmp_path, capsys, extra, message):
    import re

    out = tmp_path / "mae"
    code = pretrain.main([*TINY_DATA, *TINY_MODEL_KWARGS, "--batch-size", "8", "--output", str(out), *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and re.search(message, err[0]), err
    assert not out.exists()


def test_a_used_output_folder_is_refused(tmp_path, capsys):
    out = tmp_path / "mae"
    out.mkdir()
    (out / "backbone.safetensors").write_bytes(b"x")
    assert pretrain.main([*TINY_DATA, "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already exists and is not empty" in err[0]
    assert (out / "backbone.safetensors").read_bytes() == b"x"
