"""Folder datasets end to end: train.py on CUB and MetaShift (validation carved from train), and evaluation of the
trained model on other data (ImageNet-9 backgrounds, a CUB model on Waterbirds through a class map)."""

import json

import pytest
from test_datasets import write_cub, write_metashift
from test_train_cli import TINY, load_train

import faithful_vit
from faithful_vit.kernels import use_backend

# A run of seconds: the tiny model of test_train_cli on 16 px images (a 2 x 2 patch grid).
FOLDER_RUN = ["--img-size", "16", *TINY[5:], "--batch-size", "8", "--eval-batch-size", "8", "--num-figure-samples", "1"]


@pytest.fixture(scope="module", autouse=True)
def _torch_attention():
    with use_backend("torch"):
        yield


def train_on(data: str, root, output, model: str = "baseline"):
    argv = ["--data", data, "--data-dir", str(root), *FOLDER_RUN, "--model", model, "--output", str(output)]
    assert load_train().main([*argv, "--experiment", data]) == 0
    return output / data


@pytest.fixture(scope="module")
def cub_run(tmp_path_factory):
    """A baseline trained one epoch by train.py on a tiny CUB folder (3 species, 12 training images each)."""
    base = tmp_path_factory.mktemp("cub")
    write_cub(base / "CUB_200_2011", train_per_class=[12, 12, 12], test_per_class=2)
    return train_on("cub", base / "CUB_200_2011", base / "runs")


def test_train_py_runs_on_cub_with_validation_carved_from_train(cub_run):
    summary = json.loads((cub_run / "summary.json").read_text())
    assert summary["data"] == "cub" and list(summary["models"]) == ["baseline"]
    model = faithful_vit.load_model(cub_run)
    assert model.spec["data"]["class_names"] == ["001.Species_1", "002.Species_2", "003.Species_3"]
    rows = [json.loads(line) for line in (cub_run / "baseline/seed0/metrics.jsonl").read_text().splitlines()]
    assert any("val_accuracy" in row for row in rows)
    test = json.loads((cub_run / "baseline/seed0/test_metrics.json").read_text())
    assert test["group_count"] == [2, 2, 2]  # the official test split, whole


def test_train_py_runs_on_the_published_metashift_layout(tmp_path):
    write_metashift(tmp_path / "metashift", per_context=6)
    run = train_on("metashift", tmp_path / "metashift", tmp_path / "runs")
    test = json.loads((run / "baseline/seed0/test_metrics.json").read_text())
    group_names = faithful_vit.load_model(run).spec["data"]["group_names"]
    present = {name: count for name, count in zip(group_names, test["group_count"]) if count}
    assert present == {"cat/shelf": 6, "dog/shelf": 6}
