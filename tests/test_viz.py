"""viz: the attention rollout of a timm ViT, the baseline's figure panel, the thresholds and remove_parts plots."""

import matplotlib.figure
import pytest
import torch
from PIL import Image
from timm.models.vision_transformer import VisionTransformer

from faithful_vit import engine, viz
from faithful_vit.baseline import FullImageViT, OracleMaskViT
from faithful_vit.data import SpuriousShapes, SpuriousShapesConfig
from faithful_vit.kernels import use_backend
from faithful_vit.sparsify import sparsify

TINY_VIT = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0)


@pytest.fixture(scope="module", autouse=True)
def _backend():
    with use_backend("torch"):
        yield


def tiny_vit(**kwargs) -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(**{**TINY_VIT, "num_classes": 3, **kwargs}).eval()


def timm_attention_probabilities(vit: VisionTransformer, images: torch.Tensor) -> list[torch.Tensor]:
    """Each block's head-mean softmax as timm's unfused attention computes it (the input of its attention dropout)."""
    probabilities = []
    hooks = [
        block.attn.attn_drop.register_forward_hook(lambda _m, inputs, _o: probabilities.append(inputs[0].mean(1)))
        for block in vit.blocks
    ]
    fused = [block.attn.fused_attn for block in vit.blocks]
    try:
        for block in vit.blocks:
            block.attn.fused_attn = False
        with torch.no_grad():
            vit(images)
    finally:
        for hook, block, was_fused in zip(hooks, vit.blocks, fused):
            hook.remove()
            block.attn.fused_attn = was_fused
    return probabilities


def renormalised(matrix: torch.Tensor) -> torch.Tensor:
    return matrix / matrix.sum(-1, keepdim=True)


@pytest.mark.parametrize("kwargs", [{}, {"qk_norm": True, "reg_tokens": 2}])
def test_recorder_gives_timms_attention_and_leaves_the_forward_alone(kwargs):
    vit, images = tiny_vit(**kwargs), torch.randn(3, 3, 16, 16)
    expected = timm_attention_probabilities(vit, images)
    with torch.no_grad():
        plain = vit(images)
        with viz.AttentionRecorder(vit) as recorder:
            recorded = vit(images)
    assert torch.equal(recorded, plain)
    assert len(recorder.attentions) == 2 and len(recorder._hooks) == 0  # hooks removed on exit
    for attention, reference in zip(recorder.attentions, expected):
        assert attention.shape == (3, 16 + vit.num_prefix_tokens, 16 + vit.num_prefix_tokens)
        torch.testing.assert_close(attention, reference, rtol=1e-5, atol=1e-6)


def test_recorder_reads_our_masked_attention_like_timms():
    vit, images = tiny_vit(), torch.randn(2, 3, 16, 16)
    expected = timm_attention_probabilities(vit, images)
    converted = sparsify(vit)
    with torch.no_grad(), viz.AttentionRecorder(converted) as recorder:
        converted(images)
    for attention, reference in zip(recorder.attentions, expected):
        torch.testing.assert_close(attention, reference, rtol=1e-5, atol=1e-6)


def test_rollout_of_one_layer_is_the_cls_row_of_half_attention_half_identity():
    torch.manual_seed(1)
    attention = torch.rand(2, 5, 5).softmax(-1)  # one CLS token, a 2 x 2 grid
    rollout = viz.attention_rollout([attention], num_prefix_tokens=1, grid=(2, 2))
    row = (0.5 * attention + 0.5 * torch.eye(5))[:, 0, 1:]
    torch.testing.assert_close(rollout, renormalised(row).reshape(2, 2, 2))


def test_rollout_of_two_layers_multiplies_them_later_layer_on_the_left():
    torch.manual_seed(2)
    first, second = torch.rand(2, 1, 7, 7).softmax(-1).unbind(0)  # CLS, one register, a 1 x 5 grid
    mixed = [renormalised(0.5 * a + 0.5 * torch.eye(7)) for a in (first, second)]
    product = mixed[1] @ mixed[0]
    rollout = viz.attention_rollout([first, second], num_prefix_tokens=2, grid=(1, 5))
    torch.testing.assert_close(rollout, renormalised(product[:, 0, 2:]).reshape(1, 1, 5))
    pooled = viz.attention_rollout([first, second], num_prefix_tokens=2, grid=(1, 5), from_class_token=False)
    torch.testing.assert_close(pooled, renormalised(product[:, 2:, 2:].mean(1)).reshape(1, 1, 5))
    assert not torch.allclose(pooled, rollout)
    with pytest.raises(ValueError, match=r"grid: expected 7 - 2 prefix tokens = 5 patches, got \(2, 2\)"):
        viz.attention_rollout([first], num_prefix_tokens=2, grid=(2, 2))


def test_recorder_rollout_reads_the_pooled_token_of_the_vit():
    images = torch.randn(2, 3, 16, 16)
    for global_pool, from_class_token in (("token", True), ("avg", False)):
        vit = tiny_vit(global_pool=global_pool)
        with torch.no_grad(), viz.AttentionRecorder(vit) as recorder:
            vit(images)
        expected = viz.attention_rollout(timm_attention_probabilities(vit, images), 1, (4, 4), from_class_token)
        torch.testing.assert_close(recorder.rollout(), expected, rtol=1e-5, atol=1e-6)


def test_recorder_refuses_a_vit_without_timm_style_attention():
    vit = tiny_vit()
    vit.blocks[1].attn = torch.nn.Identity()
    with pytest.raises(TypeError, match=r"block 1's Identity lacks \['qkv'"):
        viz.AttentionRecorder(vit)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    config = SpuriousShapesConfig(n_train=4, n_val=4, n_test=4, image_size=16)
    return SpuriousShapes("test", config=config, cache_dir=tmp_path_factory.mktemp("cache"))


def test_figure_samples_of_the_baseline_carry_its_rollout_and_no_one_elses(shapes):
    torch.manual_seed(0)
    baseline = FullImageViT(2, **TINY_VIT)
    baseline.train()
    samples = engine.predict_samples(baseline, shapes, [0, 1, 2], torch.device("cpu"))
    assert baseline.training  # restored
    images = samples["images"]
    baseline.eval()
    expected = viz.attention_rollout(timm_attention_probabilities(baseline.vit, images), 1, (4, 4))
    torch.testing.assert_close(samples["rollout"], expected, rtol=1e-5, atol=1e-6)
    oracle = OracleMaskViT(2, **TINY_VIT)
    assert engine.predict_samples(oracle, shapes, [0, 1], torch.device("cpu"))["rollout"] is None


def test_rollout_panel_has_a_colour_bar_per_sample(tmp_path, monkeypatch):
    bars = []
    real_colorbar = matplotlib.figure.Figure.colorbar

    def recording_colorbar(self, mappable, *args, **kwargs):
        bars.append(mappable.get_array().copy())
        return real_colorbar(self, mappable, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "colorbar", recording_colorbar)
    rollout = torch.rand(3, 4, 4)
    path = viz.plot_masks(torch.rand(3, 3, 32, 32), tmp_path / "r.png", rollout=rollout, samples_per_row=2)
    assert len(bars) == 3
    for recorded, expected in zip(bars, rollout):
        assert recorded.tolist() == expected.tolist()
    with Image.open(path) as figure:
        assert figure.format == "PNG" and figure.width > 400


THRESHOLDS = {
    "without": {"accuracy": 0.9, "worst_group_accuracy": 0.6, "group_accuracy": [0.9, 0.6], "kept_fraction": 0.5},
    "quantiles": [
        {"quantile": 0.01, "accuracy": 0.85, "worst_group_accuracy": 0.7, "kept_fraction": 0.45, "thresholds": []},
        {"quantile": 0.05, "accuracy": 0.8, "worst_group_accuracy": 0.65, "kept_fraction": 0.4, "thresholds": []},
    ],
}


def test_thresholds_plot_draws_the_protocols_numbers(tmp_path):
    series = viz.thresholds_series(THRESHOLDS)
    assert series == {
        "quantile": [0.01, 0.05],
        "accuracy": [0.85, 0.8],
        "worst_group_accuracy": [0.7, 0.65],
        "kept_fraction": [0.45, 0.4],
        "uncalibrated": {"accuracy": 0.9, "worst_group_accuracy": 0.6, "kept_fraction": 0.5},
    }
    path = viz.plot_thresholds(THRESHOLDS, tmp_path / "figures" / "t.png", title="tiny")
    with Image.open(path) as figure:
        assert figure.format == "PNG" and figure.width > 500
    assert list((tmp_path / "figures").iterdir()) == [path]  # no temporary left behind


def removal(accuracy: float, worst: float, groups: list[float], full: list[float]) -> dict:
    return {
        "accuracy": accuracy,
        "accuracy_drop": 0.9 - accuracy,
        "worst_group_accuracy": worst,
        "group_accuracy": groups,
        "group_accuracy_drop": [before - after for before, after in zip(full, groups)],
    }


def test_remove_parts_plot_draws_each_parts_drops_in_its_colour(tmp_path, monkeypatch):
    full = [1.0, 0.8, 0.6]
    result = {
        "accuracy": 0.9,
        "worst_group_accuracy": 0.6,
        "group_accuracy": full,
        "parts": [
            {"part": 0, **removal(0.7, 0.5, [0.9, 0.7, 0.5], full)},
            {"part": 1, **removal(0.9, 0.6, [1.0, 0.8, 0.6], full)},
        ],
    }
    series = viz.remove_parts_series(result, ["a", "b", "c"])
    assert series["labels"] == ["overall", "worst group", "a", "b", "c"] and series["parts"] == [0, 1]
    assert series["drops"][0] == pytest.approx([0.2, 0.1, 0.1, 0.1, 0.1])
    assert series["drops"][1] == pytest.approx([0.0, 0.0, 0.0, 0.0, 0.0])
    colours = []
    real_bar = matplotlib.axes.Axes.bar

    def recording_bar(self, x, height, *args, color=None, **kwargs):
        colours.append(tuple(color))
        return real_bar(self, x, height, *args, color=color, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "bar", recording_bar)
    path = viz.plot_remove_parts(result, ["a", "b", "c"], tmp_path / "p.png", title="tiny")
    assert colours == [tuple(c) for c in viz.part_colours(2)[:2]]
    with Image.open(path) as figure:
        assert figure.format == "PNG"
    many = [f"class {g}" for g in range(viz.PER_GROUP_LIMIT + 1)]
    wide = {**result, "group_accuracy": [0.9] * len(many)}
    wide["parts"] = [{**part, "group_accuracy_drop": [0.0] * len(many)} for part in result["parts"]]
    assert viz.remove_parts_series(wide, many)["labels"] == ["overall", "worst group"]
    with pytest.raises(ValueError, match="group_names: expected 3 names"):
        viz.remove_parts_series(result, ["a"])
