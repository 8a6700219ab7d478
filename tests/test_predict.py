"""python -m faithful_vit.predict: predictions, per-image figures with a part legend, contact sheets, bad input."""

import json
import math

import matplotlib.figure
import pytest
import torch
from PIL import Image

import faithful_vit
from faithful_vit import model_spec, predict, run_folder, viz
from faithful_vit.data import SpuriousShapes, SpuriousShapesConfig, load_image, normalize
from faithful_vit.kernels import use_backend

TINY_KWARGS = {"backbone_kwargs": {"embed_dim": 32, "depth": 1, "num_heads": 2}}
DATA = {"name": "synthetic", "data_dir": None, "mask_dir": None, "image_size": 32, "data_kwargs": {}}


@pytest.fixture(scope="module", autouse=True)
def _backend():
    with use_backend("torch"):
        yield


def save_model(path, name: str):
    """A checkpoint of an untrained tiny model with its spec, as train.py writes one (seeded weights)."""
    torch.manual_seed(0)
    spec = model_spec.model_spec(name, num_classes=2, image_size=32, model_kwargs=TINY_KWARGS)
    model = model_spec.build_model(spec)
    data = {**DATA, "class_names": ["ellipse", "cross"], "group_names": ["a", "b", "c", "d"]}
    run_folder.save_checkpoint(path, {"model": model.state_dict(), "epoch": 1, "spec": {"model": spec, "data": data}})
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Five benchmark images as PNG files (two in a sub-folder) and one file that is not an image."""
    folder = tmp_path_factory.mktemp("images")
    (folder / "sub").mkdir()
    config = SpuriousShapesConfig(n_train=8, n_val=8, n_test=8, image_size=32)
    dataset = SpuriousShapes("test", config=config, cache_dir=tmp_path_factory.mktemp("cache"))
    for index in range(5):
        Image.fromarray(dataset.arrays["images"][index]).save(folder / ("sub" if index >= 3 else "") / f"im{index}.png")
    (folder / "broken.png").write_bytes(b"not a png")
    return folder


def run_predict(argv, capsys):
    code = predict.main([*argv, "--no-progress"])
    captured = capsys.readouterr()
    return code, captured.out, [line for line in captured.err.splitlines() if line.startswith("predict")]


def test_predictions_figures_and_contact_sheets(tmp_path, images, capsys):
    checkpoint = save_model(tmp_path / "two_stage.pt", "faithful_tiny")
    out = tmp_path / "out"
    code, printed, err = run_predict([str(checkpoint), str(images), "--out", str(out), "--sheet-size", "2"], capsys)
    assert code == 0, err
    report = json.loads((out / "predictions.json").read_text())
    assert [p["file"].rsplit("/", 1)[1] for p in report["predictions"]] == [f"im{i}.png" for i in range(5)]
    assert len(report["skipped"]) == 1 and report["skipped"][0]["file"].endswith("broken.png")
    assert len(report["contact_sheets"]) == math.ceil(5 / 2)
    model = faithful_vit.load_model(checkpoint)
    for prediction in report["predictions"]:
        image = normalize(load_image(prediction["file"]))[None]
        with torch.no_grad():
            out_direct = model(image)
        probabilities = out_direct.stage2_logits.softmax(1)[0]
        assert prediction["label"] == int(probabilities.argmax())
        assert prediction["class"] == ["ellipse", "cross"][prediction["label"]]
        assert prediction["confidence"] == pytest.approx(float(probabilities.max()), abs=1e-6)
        assert prediction["kept_fraction"] == pytest.approx(out_direct.keep.float().mean().item())
        with Image.open(prediction["figure"]) as figure:
            assert figure.format == "PNG" and figure.width > 300
        assert prediction["class"] in printed
    for sheet in report["contact_sheets"]:
        with Image.open(sheet) as figure:
            assert figure.format == "PNG"


def test_the_baselines_figures_show_its_attention_rollout(tmp_path, images, capsys, monkeypatch):
    drawn = []
    real_plot_masks = viz.plot_masks

    def recording_plot_masks(pictures, path, **kwargs):
        drawn.append(kwargs)
        return real_plot_masks(pictures, path, **kwargs)

    monkeypatch.setattr(viz, "plot_masks", recording_plot_masks)
    checkpoint = save_model(tmp_path / "baseline.pt", "baseline")
    code, _, err = run_predict([str(checkpoint), str(images / "sub"), "--out", str(tmp_path / "out")], capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert len(report["predictions"]) == 2 and all(p["kept_fraction"] == 1.0 for p in report["predictions"])
    model = faithful_vit.load_model(checkpoint)
    pictures = torch.stack([normalize(load_image(p["file"])) for p in report["predictions"]])
    with viz.AttentionRecorder(model.vit) as recorder, torch.no_grad():
        model(pictures)
    expected = recorder.rollout()
    assert len(drawn) == 3  # two figures, one contact sheet
    for index, kwargs in enumerate(drawn[:2]):
        assert kwargs["keep"] is None and kwargs["part_maps"] is None
        torch.testing.assert_close(kwargs["rollout"], expected[index : index + 1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(drawn[2]["rollout"], expected, rtol=1e-5, atol=1e-6)
    for prediction in report["predictions"]:
        with Image.open(prediction["figure"]) as figure:
            assert figure.format == "PNG"


def test_figures_carry_a_legend_of_the_parts_and_the_background(tmp_path, monkeypatch):
    labels = []
    real_legend = matplotlib.figure.Figure.legend

    def recording_legend(self, *args, handles=None, **kwargs):
        labels.append([handle.get_label() for handle in handles])
        return real_legend(self, *args, handles=handles, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "legend", recording_legend)
    part_maps = torch.rand(2, 4, 4, 4)
    keep = torch.rand(2, 16) > 0.5
    viz.plot_masks(torch.rand(2, 3, 32, 32), tmp_path / "m.png", keep=keep, part_maps=part_maps, patch_size=8)
    assert labels == [["part 0", "part 1", "part 2", "background"]]
    colours = viz.part_colours(3)
    assert colours.shape == (4, 3) and len({tuple(c) for c in colours}) == 4
    assert tuple(colours[-1]) == pytest.approx(viz.BACKGROUND_COLOUR)


def test_bad_input_is_one_line_and_exit_2(tmp_path, images, capsys):
    two_stage = save_model(tmp_path / "two_stage.pt", "faithful_tiny")
    oracle = save_model(tmp_path / "oracle.pt", "oracle")
    (tmp_path / "empty").mkdir()
    out = ["--out", str(tmp_path / "out")]
    cases = [
        ([str(two_stage), str(tmp_path / "nothing.png"), *out], "no such file or folder"),
        ([str(two_stage), str(tmp_path / "empty"), *out], "no image files"),
        ([str(oracle), str(images), *out], "the oracle needs ground-truth masks"),
        ([str(two_stage), str(images), "--batch-size", "0", *out], "--batch-size: expected a positive int"),
        ([str(tmp_path / "missing.pt"), str(images), *out], "no such file or run folder"),
        ([str(two_stage), str(images)], "--out"),
    ]
    for argv, message in cases:
        code, _, err = run_predict(argv, capsys)
        assert code == 2 and len(err) == 1 and message in err[0], (argv, err)
