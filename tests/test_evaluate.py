"""Self-describing checkpoints, load_model, and ``python -m faithful_vit.evaluate`` (accuracy, faithfulness)."""

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image
from test_train_cli import TINY, load_train

import faithful_vit
from faithful_vit import engine, evaluate, experiment, model_spec
from faithful_vit.baseline import FullImageViT, OracleMaskViT
from faithful_vit.data import backgrounds, normalize
from faithful_vit.data.mask_stats import gt_patch_fraction
from faithful_vit.kernels import use_backend
from faithful_vit.metrics import keep_to_pixels

MODELS = ("faithful_tiny", "baseline", "oracle")
# Keys of test_metrics.json that are not a function of the weights and the data (timings, bookkeeping).
NOT_REPRODUCIBLE = {
    "images_per_second",
    "train_seconds",
    "train_images_per_second",
    "peak_memory_mb",
    "best_epoch",
    "model",
    "seed",
    "skipped_corrupt_train",
}


@pytest.fixture(scope="module", autouse=True)
def _data_cache(tmp_path_factory):
    """The session's temporary benchmark cache (as in test_train_cli) and the PyTorch attention (no interpreter)."""
    with pytest.MonkeyPatch.context() as patch, use_backend("torch"):
        patch.setenv("FAITHFUL_VIT_DATA", str(tmp_path_factory.getbasetemp() / "data_cache"))
        yield


@pytest.fixture(scope="module")
def run_dir(_data_cache, tmp_path_factory):
    """One finished tiny run of the three kinds of model (1 epoch, 32 px)."""
    base = tmp_path_factory.mktemp("evaluate")
    argv = [*TINY, "--model", ",".join(MODELS), "--output", str(base), "--experiment", "run"]
    assert load_train().main([*argv, "--num-figure-samples", "1"]) == 0
    return base / "run"


@pytest.fixture(scope="module")
def data(run_dir):
    """The data spec of the run, as its checkpoints hold it."""
    return faithful_vit.load_model(run_dir, model="baseline", seed=0).spec["data"]


@pytest.fixture(scope="module")
def test_set(data):
    return model_spec.build_dataset(data, "test")


def cli(argv, capsys):
    code = evaluate.main([*argv, "--no-progress", "--backend", "torch"])
    captured = capsys.readouterr()
    return code, captured.out, [line for line in captured.err.splitlines() if line.startswith("evaluate")]


def test_checkpoints_describe_model_and_data_as_plain_data(run_dir):
    for name in MODELS:
        for checkpoint in ("best.pt", "last.pt"):
            state = torch.load(run_dir / name / "seed0" / "checkpoints" / checkpoint, weights_only=True)
            spec = state["spec"]
            assert spec["model"]["name"] == name and spec["model"]["num_classes"] == 2
            assert spec["model"]["image_size"] == 32
            assert spec["model"]["kind"] == ("two_stage" if name == "faithful_tiny" else name)
            assert spec["model"]["preset"] == "faithful_tiny"
            assert spec["data"]["name"] == "synthetic"
            assert spec["data"]["data_kwargs"] == {"n_train": 96, "n_val": 32, "n_test": 32, "image_size": 32}
            assert spec["data"]["class_names"] == ["ellipse", "cross"]
            assert spec["data"]["group_names"] == ["ellipse/land", "ellipse/water", "cross/land", "cross/water"]
    two_stage = torch.load(run_dir / "faithful_tiny/seed0/checkpoints/best.pt", weights_only=True)["spec"]["model"]
    assert two_stage["config"]["backbone_kwargs"]["embed_dim"] == 32 and two_stage["config"]["num_parts"] == 3
    oracle = torch.load(run_dir / "oracle/seed0/checkpoints/best.pt", weights_only=True)["spec"]["model"]
    assert oracle["oracle_threshold"] == 0.5 and oracle["config"]["embed_dim"] == 32


def test_load_model_rebuilds_every_kind_with_its_weights(run_dir):
    kinds = {"faithful_tiny": faithful_vit.FaithfulViT, "baseline": FullImageViT, "oracle": OracleMaskViT}
    for name, kind in kinds.items():
        model = faithful_vit.load_model(run_dir, model=name, seed=0)
        assert type(model) is kind and not model.training
        stored = torch.load(run_dir / name / "seed0/checkpoints/best.pt", weights_only=True)["model"]
        assert all(torch.equal(value, stored[key]) for key, value in model.state_dict().items())
        assert model.spec["checkpoint"].endswith(f"{name}/seed0/checkpoints/best.pt")
        assert model.spec["train_config"]["eval_batch_size"] == 32 and model.spec["epoch"] == 1
    # A model folder or seed folder holds one candidate; a .pt file is taken as it is.
    assert type(faithful_vit.load_model(run_dir / "oracle")) is OracleMaskViT
    assert type(faithful_vit.load_model(run_dir / "baseline" / "seed0")) is FullImageViT
    last = faithful_vit.load_model(run_dir / "baseline/seed0/checkpoints/last.pt")
    assert last.spec["epoch"] == 1


def test_load_model_asks_which_model_and_names_the_candidates(run_dir, tmp_path):
    several = "several models .*baseline/seed0, faithful_tiny/seed0, oracle/seed0"
    with pytest.raises(model_spec.SpecError, match=several):
        faithful_vit.load_model(run_dir)
    with pytest.raises(model_spec.SpecError, match="no model 'oracle' seed 3 .* it holds baseline/seed0"):
        faithful_vit.load_model(run_dir, model="oracle", seed=3)
    with pytest.raises(model_spec.SpecError, match="no such file or run folder"):
        faithful_vit.load_model(tmp_path / "missing")
    with pytest.raises(model_spec.SpecError, match="holds no checkpoints/best.pt"):
        faithful_vit.load_model(tmp_path)
    old = tmp_path / "old.pt"
    torch.save({"model": {}, "epoch": 1}, old)
    with pytest.raises(model_spec.SpecError, match="old.pt holds no model spec"):
        faithful_vit.load_model(old)


def test_train_and_load_build_through_the_same_spec(run_dir):
    """train.py's build_model (in faithful_vit.experiment) returns the spec it built from; building that spec again
    gives the same model."""
    args = load_train()._parse_args([*TINY])[0]
    args.reference_model = "faithful_tiny"
    for name in MODELS:
        model, spec = experiment.build_model(name, args, num_classes=2, image_size=32)
        stored = torch.load(run_dir / name / "seed0/checkpoints/best.pt", weights_only=True)["spec"]["model"]
        assert spec == stored
        rebuilt = model_spec.build_model(spec)
        assert type(rebuilt) is type(model)
        shapes = {key: value.shape for key, value in model.state_dict().items()}
        assert {key: value.shape for key, value in rebuilt.state_dict().items()} == shapes


def test_evaluating_best_pt_reproduces_the_runs_test_metrics_exactly(run_dir, capsys, tmp_path):
    for name in MODELS:
        output = tmp_path / f"{name}.json"
        code, out, err = cli([str(run_dir), "--model", name, "--seed", "0", "--output", str(output)], capsys)
        assert code == 0, err
        assert "worst-group" in out and f"{name} (" in out
        reported = json.loads((run_dir / name / "seed0" / "test_metrics.json").read_text())
        accuracy = json.loads(output.read_text())["protocols"]["accuracy"]
        for key, value in reported.items():
            if key not in NOT_REPRODUCIBLE:
                assert accuracy[key] == value, (name, key)
        assert ("stage1_accuracy" in accuracy) == (name == "faithful_tiny")
    # Without --output the report goes to the model's folder of the run.
    assert cli([str(run_dir / "baseline")], capsys)[0] == 0
    assert json.loads((run_dir / "baseline/seed0/eval_synthetic_test.json").read_text())["split"] == "test"


def varied(name: str, **model_kwargs):
    """An untrained tiny model whose predictions differ between images (larger Linear weights than at init)."""
    torch.manual_seed(0)
    kwargs = {"backbone_kwargs": {"embed_dim": 32, "depth": 1, "num_heads": 2}, **model_kwargs}
    model = model_spec.build_model(model_spec.model_spec(name, num_classes=2, image_size=32, model_kwargs=kwargs))
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.normal_(0, 3 / module.in_features**0.5)
    return model.eval()


@pytest.fixture(scope="module")
def varied_two_stage():
    return varied("faithful_tiny", mask_morphology="none")


def direct_predictions(model, dataset):
    """Every sample of ``dataset`` in one batch and the model's clean output (evaluation mode)."""
    images, labels, groups, fg_masks = (torch.stack([torch.as_tensor(s[i]) for s in dataset]) for i in range(4))
    with torch.no_grad():
        out = engine.model_forward(model, images, fg_masks)
    return images, labels, groups, fg_masks, out


def test_accuracy_protocol_matches_a_direct_computation(run_dir, test_set):
    model = faithful_vit.load_model(run_dir, model="faithful_tiny", seed=0)
    cfg = engine.TrainConfig(eval_batch_size=5, progress=False)
    result = evaluate.evaluate_model(model, test_set, ["accuracy"], cfg=cfg)["accuracy"]
    images, labels, groups, _, out = direct_predictions(model, test_set)
    stage2, stage1 = out.stage2_logits.argmax(1), out.stage1_logits.argmax(1)
    assert result["accuracy"] == pytest.approx((stage2 == labels).double().mean().item(), abs=1e-12)
    for label in range(2):
        expected = (stage2 == labels)[labels == label].double().mean().item()
        assert result["class_accuracy"][label] == pytest.approx(expected, abs=1e-12)
    stage1_groups = [(stage1 == labels)[groups == g].double().mean().item() for g in range(4)]
    assert result["stage1_group_accuracy"] == pytest.approx(stage1_groups, abs=1e-12)
    assert result["stage1_worst_group_accuracy"] == pytest.approx(min(stage1_groups), abs=1e-12)
    assert result["stage1_accuracy"] == pytest.approx((stage1 == labels).double().mean().item(), abs=1e-12)
    assert result["kept_fraction"] == pytest.approx(out.keep.double().mean().item(), abs=1e-12)


@pytest.mark.parametrize("name", ["faithful_tiny", "oracle", "varied"])
def test_faithfulness_is_zero_for_models_with_a_hard_mask(run_dir, test_set, varied_two_stage, name):
    model = varied_two_stage if name == "varied" else faithful_vit.load_model(run_dir, model=name, seed=0)
    cfg = engine.TrainConfig(eval_batch_size=8, progress=False)
    result = evaluate.evaluate_model(model, test_set, ["faithfulness"], cfg=cfg)["faithfulness"]
    assert result["num_images"] == len(test_set) and "model's own mask" in result["mask"]
    assert result["prediction_changed"]["noise"] == 0.0
    assert result["prediction_changed"]["other_image"] == 0.0
    assert ("noise_recomputed_mask" in result["prediction_changed"]) == (name != "oracle")
    if name == "varied":  # stage 1 sees the replaced pixels: the recomputed mask does change predictions
        assert result["prediction_changed"]["noise_recomputed_mask"] > 0


@pytest.mark.parametrize("batch_size", [32, 3])
def test_faithfulness_of_the_baseline_matches_a_direct_computation(test_set, batch_size):
    model = varied("baseline")
    cfg = engine.TrainConfig(eval_batch_size=batch_size, progress=False)
    result = evaluate.evaluate_model(model, test_set, ["faithfulness"], cfg=cfg, noise_seed=3)["faithfulness"]
    images, labels, _, fg_masks, out = direct_predictions(model, test_set)
    kept = keep_to_pixels(gt_patch_fraction(fg_masks, 8) > 0.5, (32, 32), 8)
    clean = out.logits.argmax(1)
    with torch.no_grad():
        other = model(torch.where(kept, images, images.roll(1, dims=0))).logits.argmax(1)
    assert "ground-truth object patches" in result["mask"]
    assert result["prediction_changed"]["other_image"] == pytest.approx((other != clean).double().mean().item())
    assert result["accuracy_replaced"]["other_image"] == pytest.approx((other == labels).double().mean().item())
    assert result["accuracy_clean"] == pytest.approx((clean == labels).double().mean().item())
    if batch_size == len(test_set):  # one batch: one noise draw of the whole split's shape
        noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            noisy = model(torch.where(kept, images, noise)).logits.argmax(1)
        assert result["prediction_changed"]["noise"] == pytest.approx((noisy != clean).double().mean().item())
    assert 0 < result["prediction_changed"]["other_image"] < 1  # the baseline reads the background


def test_bad_input_is_one_line_and_exit_2(run_dir, capsys, tmp_path):
    cases = [
        ([str(tmp_path / "missing")], "no such file or run folder"),
        ([str(run_dir)], "holds several models"),
        ([str(run_dir / "baseline"), "--protocol", "speed"], "--protocol: expected a comma list"),
        ([str(run_dir / "baseline"), "--split", "dev"], "--split: expected one of"),
        ([str(run_dir / "baseline"), "--data", "nope"], "--data: expected one of"),
        ([str(run_dir / "baseline"), "--data-kwargs", "image_size=64"], "image_size: expected 32"),
        ([str(run_dir / "baseline"), "--data-kwargs", "colour=3"], "--data synthetic: .*colour"),
        ([str(run_dir / "baseline"), "--data", "cub", "--data-dir", str(tmp_path / "x")], "--data-dir: dataset"),
        ([str(run_dir / "baseline"), "--batch-size", "0"], "--batch-size: expected a positive int"),
        ([str(run_dir / "baseline"), "--frobnicate"], "unrecognized arguments"),
    ]
    for argv, message in cases:
        code, _, err = cli(argv, capsys)
        assert code == 2 and len(err) == 1, (argv, err)
        assert re.search(message, err[0]), (argv, err)


def accuracy_of(predicted: torch.Tensor, labels: torch.Tensor) -> float:
    return (predicted == labels).double().mean().item()


def test_background_variants_are_composed_from_the_masks(test_set):
    arrays = test_set.arrays
    variants = backgrounds.background_variants(arrays, surround=4, seed=1)
    images, fg, places = arrays["images"], arrays["fg_masks"].astype(bool), arrays["places"]
    region = backgrounds.dilate(fg, 4)
    assert region.sum() > fg.sum() and (region >= fg).all()
    assert np.array_equal(variants["original"], images)
    assert np.array_equal(variants["only_fg"], np.where(fg[..., None], images, 0))
    only_bg = variants["only_bg"]
    assert np.array_equal(only_bg[~region], images[~region]) and not np.array_equal(only_bg[region], images[region])
    for name, same in (("mixed_same", True), ("mixed_next", False)):
        partner = variants["partners"][name]
        assert ((places[partner] == places) == same).all()
        if same:
            assert (partner != np.arange(len(places))).all()
        expected = np.where(region[..., None], images, only_bg[partner])
        assert np.array_equal(variants[name], expected)
    assert np.array_equal(
        variants["mixed_rand"], np.where(region[..., None], images, only_bg[variants["partners"]["mixed_rand"]])
    )


def test_backgrounds_protocol_matches_a_direct_computation(varied_two_stage, test_set):
    cfg = engine.TrainConfig(eval_batch_size=6, progress=False)
    result = evaluate.evaluate_model(varied_two_stage, test_set, ["backgrounds"], cfg=cfg, noise_seed=2)["backgrounds"]
    surround = round(test_set.config.clear_margin * 32 / 64)
    assert result["surround_pixels"] == surround
    variants = backgrounds.background_variants(test_set.arrays, surround=surround, seed=2)
    labels = torch.from_numpy(test_set.arrays["labels"])
    expected = {}
    for name in backgrounds.VARIANTS:
        images = normalize(torch.from_numpy(variants[name]).permute(0, 3, 1, 2).float() / 255)
        with torch.no_grad():
            expected[name] = accuracy_of(varied_two_stage(images).stage2_logits.argmax(1), labels)
        assert result["variants"][name]["accuracy"] == pytest.approx(expected[name], abs=1e-12), name
    assert result["bg_gap"] == pytest.approx(expected["mixed_same"] - expected["mixed_rand"], abs=1e-12)
    assert len(set(expected.values())) > 1  # the variants change the predictions of this model


def test_remove_parts_protocol_matches_a_direct_computation(varied_two_stage, test_set):
    cfg = engine.TrainConfig(eval_batch_size=7, progress=False)
    result = evaluate.evaluate_model(varied_two_stage, test_set, ["remove_parts"], cfg=cfg)["remove_parts"]
    images, labels, groups, _, out = direct_predictions(varied_two_stage, test_set)
    full = accuracy_of(out.stage2_logits.argmax(1), labels)
    assert result["accuracy"] == pytest.approx(full, abs=1e-12)
    assert [part["part"] for part in result["parts"]] == [0, 1, 2]
    in_group = [groups == group for group in range(4)]
    assert all(members.any() for members in in_group)
    full_groups = [accuracy_of(out.stage2_logits.argmax(1)[members], labels[members]) for members in in_group]
    assert result["group_accuracy"] == pytest.approx(full_groups, abs=1e-12)
    for part in result["parts"]:
        with torch.no_grad():
            removed = varied_two_stage(images, remove_parts=[part["part"]])
        accuracy = accuracy_of(removed.stage2_logits.argmax(1), labels)
        assert part["accuracy"] == pytest.approx(accuracy, abs=1e-12)
        assert part["accuracy_drop"] == pytest.approx(full - accuracy, abs=1e-12)
        group_drops = [
            before - accuracy_of(removed.stage2_logits.argmax(1)[members], labels[members])
            for before, members in zip(full_groups, in_group)
        ]
        assert part["group_accuracy_drop"] == pytest.approx(group_drops, abs=1e-12)
        assert part["kept_fraction"] == pytest.approx(removed.keep.double().mean().item(), abs=1e-12)


def test_thresholds_protocol_calibrates_on_one_split_and_applies_on_another(varied_two_stage, data, test_set):
    val_set = model_spec.build_dataset(data, "val")
    cfg = engine.TrainConfig(eval_batch_size=5, progress=False)
    result = evaluate.evaluate_model(varied_two_stage, test_set, ["thresholds"], cfg=cfg, calibration_set=val_set)
    result = result["thresholds"]
    assert torch.isinf(varied_two_stage.part_thresholds).all()  # restored
    val_images = torch.stack([sample.image for sample in val_set])
    images, labels, _, _, out = direct_predictions(varied_two_stage, test_set)
    assert result["without"]["accuracy"] == pytest.approx(accuracy_of(out.stage2_logits.argmax(1), labels))
    assert [row["quantile"] for row in result["quantiles"]] == list(evaluate.THRESHOLD_QUANTILES)
    changed = False
    try:
        for row in result["quantiles"]:
            thresholds = faithful_vit.calibrate_part_thresholds(varied_two_stage, [val_images], row["quantile"])
            assert row["thresholds"] == pytest.approx(thresholds.tolist())
            with torch.no_grad():
                after = varied_two_stage(images)
            assert row["accuracy"] == pytest.approx(accuracy_of(after.stage2_logits.argmax(1), labels), abs=1e-12)
            assert row["kept_fraction"] == pytest.approx(after.keep.double().mean().item(), abs=1e-12)
            changed |= row["kept_fraction"] != result["without"]["kept_fraction"]
    finally:
        varied_two_stage.set_part_thresholds(None)
    assert changed  # the thresholds drop some patches


def test_thresholds_and_remove_parts_are_plotted_beside_the_json(run_dir, capsys, tmp_path):
    output = tmp_path / "evaluation" / "tiny.json"
    argv = [str(run_dir), "--model", "faithful_tiny", "--protocol", "remove_parts,thresholds", "--output", str(output)]
    code, printed, err = cli(argv, capsys)
    assert code == 0, err
    report = json.loads(output.read_text())
    expected = {name: str(tmp_path / "evaluation" / f"tiny_{name}.png") for name in ("thresholds", "remove_parts")}
    assert report["figures"] == expected
    for path in expected.values():
        with Image.open(path) as figure:
            assert figure.format == "PNG" and figure.width > 500
    parts = report["protocols"]["remove_parts"]["parts"]
    assert len(re.findall(r"without part \d+ .*\(drop [+-]\d+\.\d pp, worst-group", printed)) == len(parts)
    assert len(re.findall(r"drop in group cross/water +[+-]\d+\.\d pp", printed)) == len(parts)
    assert len(re.findall(r"thresholds (none|q=0\.\d+) .*\(worst-group .*, kept 0\.\d+\)", printed)) == 1 + len(
        evaluate.THRESHOLD_QUANTILES
    )


def test_protocols_refuse_models_and_data_they_do_not_apply_to(run_dir, test_set):
    baseline = faithful_vit.load_model(run_dir, model="baseline", seed=0)
    cfg = engine.TrainConfig(progress=False)
    for protocol in ("remove_parts", "thresholds"):
        with pytest.raises(model_spec.SpecError, match=f"--protocol {protocol}: needs a two-stage model"):
            evaluate.evaluate_model(baseline, test_set, [protocol], cfg=cfg, calibration_set=test_set)
    plain = backgrounds.VariantDataset(test_set.arrays["images"], test_set)
    with pytest.raises(model_spec.SpecError, match="--protocol backgrounds: needs a generated dataset"):
        evaluate.evaluate_model(baseline, plain, ["backgrounds"], cfg=cfg)
