"""Folder datasets end to end: train.py on CUB and MetaShift (validation carved from train), and evaluation of the
trained model on other data (ImageNet-9 backgrounds, a CUB model on Waterbirds through a class map)."""

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image
from test_datasets import IMAGENET9_CLASSES, write_cub, write_imagenet9, write_metashift
from test_train_cli import TINY, load_train

import faithful_vit
from faithful_vit import evaluate, model_spec
from faithful_vit.data import normalize
from faithful_vit.data.datasets import IMAGENET9_VARIANTS
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


def test_train_py_runs_on_imagenet9_original_train(tmp_path):
    write_imagenet9(tmp_path / "bg_challenge", per_class=1, train_per_class=4)
    run = train_on("imagenet9", tmp_path / "bg_challenge", tmp_path / "runs")
    model = faithful_vit.load_model(run)
    assert model.spec["data"]["data_kwargs"] == {} and model.spec["data"]["class_names"] == IMAGENET9_CLASSES
    test = json.loads((run / "baseline/seed0/test_metrics.json").read_text())
    assert test["group_count"] == [1] * 9


def write_checkpoint(path, data: dict, class_names, num_classes: int, image_size: int = 16):
    """A checkpoint of an untrained baseline whose predictions differ between images (larger Linear weights than at
    init), with the spec of ``data``: what train.py writes, without training."""
    torch.manual_seed(0)
    small = {"backbone_kwargs": {"embed_dim": 32, "depth": 1, "num_heads": 2}}
    spec = model_spec.model_spec("baseline", num_classes=num_classes, image_size=image_size, model_kwargs=small)
    model = model_spec.build_model(spec)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.normal_(0, 3 / module.in_features**0.5)
    data = {**data, "class_names": list(class_names), "group_names": list(class_names)}
    torch.save({"model": model.state_dict(), "spec": {"model": spec, "data": data}, "epoch": 0}, path)
    return faithful_vit.load_model(path)


def predict_file(model, path) -> int:
    """The model's class for one image file, decoded and normalised here (16 px files: the eval resize and crop
    leave them as they are)."""
    pixels = torch.from_numpy(np.asarray(Image.open(path).convert("RGB")).copy())
    with torch.no_grad():
        return int(model(normalize(pixels.permute(2, 0, 1).float() / 255)[None]).logits.argmax(1))


def evaluate_cli(argv, capsys):
    code = evaluate.main([*argv, "--no-progress", "--backend", "torch"])
    captured = capsys.readouterr()
    return code, captured.out, [line for line in captured.err.splitlines() if line.startswith("evaluate")]


@pytest.fixture(scope="module")
def imagenet9(tmp_path_factory):
    root = tmp_path_factory.mktemp("in9") / "bg_challenge"
    write_imagenet9(root, per_class=3)
    data = model_spec.data_spec("imagenet9", data_dir=str(root), img_size=16)
    model = write_checkpoint(root.parent / "in9.pt", data, IMAGENET9_CLASSES, num_classes=9)
    return root, model


def test_backgrounds_protocol_on_imagenet9_matches_a_direct_computation(imagenet9, capsys, tmp_path):
    root, model = imagenet9
    output = tmp_path / "in9.json"
    argv = [
        model.spec["checkpoint"],
        "--protocol",
        "accuracy,backgrounds",
        "--batch-size",
        "7",
        "--output",
        str(output),
    ]
    code, out, err = evaluate_cli(argv, capsys)
    assert code == 0, err
    report = json.loads(output.read_text())
    expected = {}
    for variant in IMAGENET9_VARIANTS:
        hits = [
            predict_file(model, path) == label
            for label, name in enumerate(IMAGENET9_CLASSES)
            for path in sorted((root / variant / "val" / name).iterdir())
        ]
        expected[variant] = sum(hits) / len(hits)
    backgrounds = report["protocols"]["backgrounds"]
    assert list(backgrounds["variants"]) == list(IMAGENET9_VARIANTS)
    for variant, accuracy in expected.items():
        assert backgrounds["variants"][variant]["accuracy"] == pytest.approx(accuracy, abs=1e-12), variant
        assert backgrounds["variants"][variant]["num_images"] == 27
    assert backgrounds["bg_gap"] == pytest.approx(expected["mixed_same"] - expected["mixed_rand"], abs=1e-12)
    assert report["protocols"]["accuracy"]["accuracy"] == pytest.approx(expected["original"], abs=1e-12)
    assert len(set(expected.values())) > 1  # the variants change this model's predictions
    assert re.search(r"BG-GAP +-?\d+\.\d %", out) and "background mixed_next" in out
    # One variant's accuracy: --data-kwargs variant=.
    only_fg = tmp_path / "only_fg.json"
    argv = [model.spec["checkpoint"], "--data-kwargs", "variant=only_fg", "--output", str(only_fg)]
    assert evaluate_cli(argv, capsys)[0] == 0
    assert json.loads(only_fg.read_text())["protocols"]["accuracy"]["accuracy"] == pytest.approx(expected["only_fg"])


def test_imagenet9_bad_variant_or_missing_folder_is_one_line_exit_2(imagenet9, capsys, tmp_path):
    root, model = imagenet9
    checkpoint = model.spec["checkpoint"]
    code, _, err = evaluate_cli([checkpoint, "--data-kwargs", "variant=mixed"], capsys)
    assert code == 2 and len(err) == 1 and "--data imagenet9: variant: expected one of ('original'" in err[0], err
    code, _, err = evaluate_cli([checkpoint, "--split", "train", "--data-kwargs", "variant=mixed_rand"], capsys)
    assert code == 2 and len(err) == 1 and re.search(r"mixed_rand/train'.*the mixed_rand training data", err[0]), err
    (root / "only_bg_t").rename(root / "only_bg_t_moved")
    try:
        code, _, err = evaluate_cli([checkpoint, "--protocol", "backgrounds"], capsys)
    finally:
        (root / "only_bg_t_moved").rename(root / "only_bg_t")
    assert code == 2 and len(err) == 1 and re.search(r"--protocol backgrounds: .*only_bg_t/val'", err[0]), err


def write_waterbirds(root, species, per_group=3, seed=0):
    """A Waterbirds folder in the published layout (``metadata.csv``, images under CUB species folders): per
    (waterbird, place) group, ``per_group`` test images and one training and validation image, drawn from ``species``
    (random-pixel 16 px JPEGs)."""
    rng = np.random.default_rng(seed)
    lines, image_id = ["img_id,img_filename,y,split,place,place_filename"], 0
    for y in (0, 1):
        for place in (0, 1):
            for split, count in ((0, 1), (1, 1), (2, per_group)):
                for _ in range(count):
                    image_id += 1
                    name = f"{species[image_id % len(species)]}/{species[image_id % len(species)]}_{image_id:04d}.jpg"
                    (root / name).parent.mkdir(parents=True, exist_ok=True)
                    pixels = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
                    Image.fromarray(pixels).save(root / name, format="JPEG")
                    lines.append(f"{image_id},{name},{y},{split},{place},/p/place/{image_id}.jpg")
    (root / "metadata.csv").write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def cub_and_waterbirds(tmp_path_factory):
    base = tmp_path_factory.mktemp("cross")
    species = write_cub(base / "CUB_200_2011", train_per_class=[2, 2, 2])
    write_waterbirds(base / "waterbirds", species)
    data = model_spec.data_spec("cub", data_dir=str(base / "CUB_200_2011"), img_size=16)
    model = write_checkpoint(base / "cub.pt", data, species, num_classes=3)
    return base / "waterbirds", species, model


def test_a_cub_model_on_waterbirds_gives_species_accuracy_per_group(cub_and_waterbirds, capsys, tmp_path):
    root, species, model = cub_and_waterbirds
    output = tmp_path / "cross.json"
    argv = [model.spec["checkpoint"], "--data", "waterbirds", "--data-dir", str(root), "--class-map", "species"]
    code, out, err = evaluate_cli([*argv, "--batch-size", "5", "--output", str(output)], capsys)
    assert code == 0, err
    report = json.loads(output.read_text())
    hits, groups = [], []
    for row in (root / "metadata.csv").read_text().splitlines()[1:]:
        _, name, y, split, place, _ = row.split(",")
        if split == "2":
            hits.append(predict_file(model, root / name) == species.index(name.split("/")[0]))
            groups.append(int(y) * 2 + int(place))
    expected = [np.mean([h for h, g in zip(hits, groups) if g == group]) for group in range(4)]
    accuracy = report["protocols"]["accuracy"]
    assert report["class_map"] == "species" and report["data"]["name"] == "waterbirds"
    assert report["data"]["class_names"] == species
    assert report["data"]["group_names"] == ["landbird/land", "landbird/water", "waterbird/land", "waterbird/water"]
    assert accuracy["group_count"] == [3, 3, 3, 3]
    assert accuracy["group_accuracy"] == pytest.approx(expected, abs=1e-12)
    assert accuracy["worst_group_accuracy"] == pytest.approx(min(expected), abs=1e-12)
    assert accuracy["accuracy"] == pytest.approx(np.mean(hits), abs=1e-12)
    assert 0 < np.mean(hits) < 1  # the model is right on some images and wrong on others
    assert "group waterbird/water" in out


def test_a_class_map_file_relabels_by_class_name(cub_and_waterbirds, capsys, tmp_path):
    root, species, model = cub_and_waterbirds
    mapping = tmp_path / "map.json"
    mapping.write_text(json.dumps({"landbird": species[2], "waterbird": species[0]}))
    output = tmp_path / "mapped.json"
    argv = [model.spec["checkpoint"], "--data", "waterbirds", "--data-dir", str(root), "--class-map", str(mapping)]
    assert evaluate_cli([*argv, "--output", str(output)], capsys)[0] == 0
    hits = []
    for row in (root / "metadata.csv").read_text().splitlines()[1:]:
        _, name, y, split, _, _ = row.split(",")
        if split == "2":
            hits.append(predict_file(model, root / name) == (0 if y == "1" else 2))
    assert json.loads(output.read_text())["protocols"]["accuracy"]["accuracy"] == pytest.approx(np.mean(hits))


def test_a_class_map_that_does_not_fit_is_one_line_exit_2(cub_and_waterbirds, capsys, tmp_path):
    root, species, model = cub_and_waterbirds
    checkpoint, on_waterbirds = model.spec["checkpoint"], ["--data", "waterbirds", "--data-dir", str(root)]
    partial, wrong, broken = tmp_path / "partial.json", tmp_path / "wrong.json", tmp_path / "broken.json"
    partial.write_text(json.dumps({"landbird": species[0]}))
    wrong.write_text(json.dumps({"landbird": species[0], "waterbird": "999.Dodo"}))
    broken.write_text("{landbird")
    cases = [
        ([*on_waterbirds], r"--data waterbirds: expected 3 classes \(the model's\), got 2"),
        (
            [*on_waterbirds, "--class-map", str(partial)],
            r"expected a model class for every class .*none for \['waterbird'\]",
        ),
        (
            [*on_waterbirds, "--class-map", str(wrong)],
            r"expected classes of the model .*got \{'waterbird': '999.Dodo'\}",
        ),
        ([*on_waterbirds, "--class-map", str(broken)], r"--class-map: expected one of \('species',\) or a JSON file"),
        ([*on_waterbirds, "--class-map", "genus"], r"--class-map: expected one of \('species',\) .*got 'genus'"),
        (["--class-map", "species"], "--class-map species: expected --data waterbirds .*, got --data cub"),
    ]
    for argv, message in cases:
        code, _, err = evaluate_cli([checkpoint, *argv], capsys)
        assert code == 2 and len(err) == 1 and re.search(message, err[0]), (argv, err)
    # A species the model does not know.
    other = tmp_path / "waterbirds"
    write_waterbirds(other, [*species, "150.Sage_Thrasher"])
    code, _, err = evaluate_cli(
        [checkpoint, "--data", "waterbirds", "--data-dir", str(other), "--class-map", "species"], capsys
    )
    assert code == 2 and len(err) == 1, err
    assert re.search(
        r"expected every species folder of the data among the model's 3 classes .*'150.Sage_Thrasher'", err[0]
    )


def test_the_trained_cub_model_evaluates_on_waterbirds(cub_run, capsys, tmp_path):
    """A checkpoint of train.py --data cub (not a written one) takes the class map as well."""
    species = faithful_vit.load_model(cub_run).spec["data"]["class_names"]
    write_waterbirds(tmp_path / "waterbirds", species, per_group=2)
    argv = [str(cub_run), "--data", "waterbirds", "--data-dir", str(tmp_path / "waterbirds"), "--class-map", "species"]
    code, _, err = evaluate_cli([*argv, "--output", str(tmp_path / "out.json")], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "out.json").read_text())["protocols"]["accuracy"]["group_count"] == [2, 2, 2, 2]
