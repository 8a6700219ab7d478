"""The ``parts`` protocol (faithful_vit/part_metrics.py) and CUB's part keypoints, against direct computations."""

import json
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _tiny import tiny_model
from PIL import Image
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from faithful_vit import engine, evaluate, part_metrics
from faithful_vit.data.class_map import ClassMapped
from faithful_vit.data.datasets import CUB200, DatasetError, read_part_keypoints
from faithful_vit.data.sample import IMAGENET_MEAN, IMAGENET_STD, Sample
from faithful_vit.data.transforms import cub_original
from faithful_vit.kernels import use_backend
from faithful_vit.model import Stage1Output
from faithful_vit.model_spec import SpecError

PATCH, GRID, K = 8, 4, 3  # the tiny model: 32 px, 8 px patches, 3 foreground parts (part 3 is the background)
CROP_LEFT = 4  # images are 40 x 32: cub_original(32) keeps the size and crops 4 columns on each side
RED = (30, 90, 150, 210)  # the red level that paints part k (k = 3: background)
PART_NAMES = ("back", "beak", "belly", "tail")


# ----------------------------------------------------------------------------------------------------------------
# A tiny CUB_200_2011 folder whose images draw the part layout stage 1 will report


def _layouts(count: int, seed: int) -> np.ndarray:
    """``[count, 4, 4]`` part per patch, every foreground part present somewhere in every image."""
    rng = np.random.default_rng(seed)
    layouts = rng.integers(0, K + 1, size=(count, GRID, GRID))
    for layout in layouts:
        cells = rng.choice(GRID * GRID, size=K, replace=False)
        layout.flat[cells] = np.arange(K)
    return layouts


def _write_cub(root, layouts, is_train, rng, *, with_parts=True):
    """Images (red = the patch's part, inside the centre crop), segmentations, part keypoints and boxes."""
    images, labels, split, locs, boxes = [], [], [], [], []
    truth = {}
    for i, (layout, train) in enumerate(zip(layouts, is_train), 1):
        name = f"001.Bird/img{i}.jpg"
        pixels = np.zeros((32, 40, 3), np.uint8)
        pixels[:, :, 0] = RED[K]
        crop = np.repeat(np.repeat(np.asarray(RED)[layout], PATCH, 0), PATCH, 1)
        pixels[:, CROP_LEFT : CROP_LEFT + 32, 0] = crop
        (root / "images" / "001.Bird").mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(root / "images" / name, format="PNG")  # lossless under CUB's file name
        top, left, height, width = rng.integers(0, 12), rng.integers(0, 30), rng.integers(8, 20), rng.integers(8, 10)
        mask = np.zeros((32, 40), np.uint8)
        mask[top : top + height, left : left + width] = 255
        seg = (root.parent / "segmentations" / name).with_suffix(".png")
        seg.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(mask).save(seg)
        box = (
            float(rng.uniform(0, 8)),
            float(rng.uniform(0, 8)),
            float(rng.uniform(16, 30)),
            float(rng.uniform(12, 24)),
        )
        points = np.stack([rng.uniform(0.2, 39.8, len(PART_NAMES)), rng.uniform(0.2, 31.8, len(PART_NAMES))], 1)
        points = np.round(points, 1)
        visible = rng.random(len(PART_NAMES)) < 0.8
        for p, ((x, y), v) in enumerate(zip(points, visible), 1):
            locs.append(f"{i} {p} {x} {y} {int(v)}")
        truth[i] = (points, visible, box, mask[:, CROP_LEFT : CROP_LEFT + 32] > 0)
        images.append(f"{i} {name}")
        labels.append(f"{i} 1")
        split.append(f"{i} {int(train)}")
        boxes.append(f"{i} {box[0]} {box[1]} {box[2]} {box[3]}")
    (root / "images.txt").write_text("\n".join(images) + "\n")
    (root / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    (root / "train_test_split.txt").write_text("\n".join(split) + "\n")
    (root / "classes.txt").write_text("1 001.Bird\n")
    (root / "bounding_boxes.txt").write_text("\n".join(boxes) + "\n")
    if with_parts:
        (root / "parts").mkdir()
        (root / "parts" / "parts.txt").write_text("".join(f"{p} {n}\n" for p, n in enumerate(PART_NAMES, 1)))
        (root / "parts" / "part_locs.txt").write_text("\n".join(locs) + "\n")
    return truth


@pytest.fixture
def cub(tmp_path):
    root = tmp_path / "CUB_200_2011"
    # Enough training images for the regression (6 inputs) to be overdetermined for every keypoint.
    is_train = [index % 3 != 1 for index in range(21)]
    layouts = _layouts(len(is_train), seed=0)
    truth = _write_cub(root, layouts, is_train, np.random.default_rng(1))
    # The official training images less the validation ones carved out of them (img<i>.jpg is image i - 1).
    train = [int(entry.path.stem[3:]) - 1 for entry in _split(root, "train").entries]
    assert 0 < len(train) < sum(is_train)
    test = [i for i, t in enumerate(is_train) if not t]
    return root, layouts, truth, train, test


def _split(root, split, **kwargs):
    return CUB200(root, split, mask_root=True, transform=cub_original(32, train=False), **kwargs)


def _layout_stage1(model):
    """Replace stage 1 of ``model`` by one that reports the layout drawn in the red channel, as one-hot maps."""

    def forward_stage1(images):
        red = images[:, 0] * IMAGENET_STD[0] + IMAGENET_MEAN[0]
        level = F.avg_pool2d(red[:, None], PATCH)[:, 0] * 255
        part = ((level - RED[0]) / (RED[1] - RED[0])).round().long().clamp(0, K)
        one_hot = F.one_hot(part, K + 1).permute(0, 3, 1, 2).float()
        logits = (one_hot - 1) * 1e4  # softmax: exactly one-hot
        batch = images.shape[0]
        return Stage1Output(torch.zeros(batch, 2), logits, logits, one_hot, torch.zeros(batch, 32, K + 1))

    model.forward_stage1 = forward_stage1
    return model


# ----------------------------------------------------------------------------------------------------------------
# The direct computations


def _expected_keypoints(truth, indices):
    """Per image of ``indices`` (0-based ids - 1): points in crop pixels, visibility after the crop, box."""
    points, visible, boxes = [], [], []
    for index in indices:
        xy, vis, (x, y, w, h), _ = truth[index + 1]
        moved = xy - [CROP_LEFT, 0]
        points.append(moved)
        visible.append(vis & (moved[:, 0] >= 0) & (moved[:, 0] < 32))
        boxes.append([min(max(x - CROP_LEFT, 0), 32), y, w, h])
    return np.array(points), np.array(visible), np.array(boxes)


def _upsampled_layout(layout):
    """The best part per pixel of the one-hot layout maps, upsampled bilinearly by hand (half-pixel centres)."""
    maps = np.eye(K + 1)[layout]  # [4, 4, K + 1]
    source = np.maximum((np.arange(GRID * PATCH) + 0.5) / PATCH - 0.5, 0)
    low = np.floor(source).astype(int)
    high, weight = np.minimum(low + 1, GRID - 1), source - low
    rows = maps[low] * (1 - weight)[:, None, None] + maps[high] * weight[:, None, None]  # [32, 4, K + 1]
    pixels = rows[:, low] * (1 - weight)[None, :, None] + rows[:, high] * weight[None, :, None]
    return pixels.argmax(-1)


def _centroids(layout):
    centres = (np.arange(GRID) + 0.5) * PATCH
    out, present = np.zeros((K, 2)), np.zeros(K, bool)
    for k in range(K):
        rows, cols = np.nonzero(layout == k)
        present[k] = len(rows) > 0
        if present[k]:
            out[k] = centres[cols].mean(), centres[rows].mean()
    return out, present


def _reference_regression(fit, evaluated):
    """Standardise, least squares without intercept, absent parts as 0: numpy only."""

    def normalise(xy, boxes):
        return (xy - boxes[:, None, :2]) / boxes[:, None, 2:]

    def standardiser(values):
        mean, std = values.mean(0), values.std(0)
        return mean, np.where(std < 1e-12, 1.0, std)

    total, count = 0.0, 0
    for p in range(fit["points"].shape[1]):
        rows_f, rows_e = fit["visible"][:, p], evaluated["visible"][:, p]
        if not rows_f.any() or not rows_e.any():
            continue
        x_f = normalise(fit["centroids"], fit["boxes"]).reshape(len(rows_f), -1)[rows_f]
        x_e = normalise(evaluated["centroids"], evaluated["boxes"]).reshape(len(rows_e), -1)[rows_e]
        y_f = normalise(fit["points"], fit["boxes"])[rows_f, p]
        y_e = normalise(evaluated["points"], evaluated["boxes"])[rows_e, p]
        (mx, sx), (my, sy) = standardiser(x_f), standardiser(y_f)
        present_f = np.repeat(fit["present"][rows_f], 2, axis=1)
        present_e = np.repeat(evaluated["present"][rows_e], 2, axis=1)
        weights = np.linalg.lstsq(np.where(present_f, (x_f - mx) / sx, 0), (y_f - my) / sy, rcond=None)[0]
        predicted = np.where(present_e, (x_e - mx) / sx, 0) @ weights * sy + my
        errors = np.linalg.norm(predicted - y_e, axis=1)
        total, count = total + errors.sum(), count + len(errors)
    return total / count


def _frame(layouts, truth, indices):
    centroids, present = zip(*(_centroids(layouts[i]) for i in indices))
    points, visible, boxes = _expected_keypoints(truth, indices)
    return {
        "centroids": np.array(centroids),
        "present": np.array(present),
        "points": points,
        "visible": visible,
        "boxes": boxes,
    }


# ----------------------------------------------------------------------------------------------------------------
# CUB's keypoints


def test_cub_keypoints_follow_the_evaluation_transform(cub):
    root, _, truth, train, test = cub
    for split, indices in (("train", train), ("test", test)):
        keypoints = _split(root, split).part_keypoints()
        points, visible, boxes = _expected_keypoints(truth, indices)
        assert keypoints.names == PART_NAMES
        assert torch.equal(keypoints.visible, torch.from_numpy(visible))
        np.testing.assert_allclose(keypoints.points.numpy()[visible], points[visible], atol=1e-9)
        np.testing.assert_allclose(keypoints.boxes.numpy(), boxes, atol=1e-9)


def test_cub_keypoints_are_scaled_with_the_image(cub):
    root, _, truth, train, _ = cub
    keypoints = read_part_keypoints(root, [root / "images/001.Bird/img1.jpg"], cub_original(16, train=False))
    xy, vis, (x, y, w, h), _ = truth[1]
    # 40 x 32 -> 20 x 16, then 2 columns cropped on each side.
    np.testing.assert_allclose(keypoints.points[0].numpy(), xy * 0.5 - [2, 0], atol=1e-9)
    np.testing.assert_allclose(keypoints.boxes[0].numpy(), [max(x * 0.5 - 2, 0), y * 0.5, w * 0.5, h * 0.5])
    unmoved = read_part_keypoints(root, [root / "images/001.Bird/img1.jpg"], None)
    np.testing.assert_allclose(unmoved.points[0].numpy(), xy)
    assert unmoved.visible[0].tolist() == vis.tolist()


@pytest.mark.parametrize(
    "line, message",
    [
        ("1 1 3.0 4.0 2", r"part_locs.txt:1: visible: expected an integer in 0..1, got '2'"),
        ("1 5 3.0 4.0 1", r"part_locs.txt:1: part id: expected an integer in 1..4, got '5'"),
        ("1 1 x 4.0 1", r"part_locs.txt:1: x, y: expected numbers"),
        ("1 1 3.0 4.0", r"part_locs.txt:1: expected 5 fields"),
        ("1 2 3.0 4.0 1", r"part_locs.txt:2: image 1 part 2 already given on .*part_locs.txt:1"),
        (None, r"part_locs.txt: image 1 has no line for part id\(s\) \[1\]"),
    ],
)
def test_cub_keypoints_refuse_bad_lines(cub, line, message):
    root = cub[0]
    path = root / "parts" / "part_locs.txt"
    lines = path.read_text().splitlines()
    lines[0:1] = [] if line is None else [line]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetError, match=message):
        _split(root, "train").part_keypoints()


# ----------------------------------------------------------------------------------------------------------------
# The measures on tensors


def test_part_centroids_and_presence_match_a_direct_sum():
    maps = torch.softmax(torch.randn(3, K + 1, 5, 6) * 3, dim=1)
    centroids, present = part_metrics.part_centroids(maps, (4, 2))
    for b in range(3):
        for k in range(K):
            weights = maps[b, k].double()
            ys, xs = torch.meshgrid(torch.arange(5) * 4 + 2.0, torch.arange(6) * 2 + 1.0, indexing="ij")
            expected = [(weights * xs).sum() / weights.sum(), (weights * ys).sum() / weights.sum()]
            torch.testing.assert_close(centroids[b, k], torch.stack(expected).double())
            assert present[b, k] == bool(weights.max() > 0.5)


def test_part_at_points_reads_the_upsampled_argmax():
    maps = torch.softmax(torch.randn(2, K + 1, 4, 4) * 3, dim=1)
    parts = part_metrics.upsampled_parts(maps, (32, 32))
    upsampled = F.interpolate(maps, size=(32, 32), mode="bilinear", align_corners=False)
    points = torch.rand(2, 5, 2, dtype=torch.float64) * 32
    found = part_metrics.part_at_points(parts, points)
    for b in range(2):
        for p in range(5):
            x, y = (int(v) for v in points[b, p])
            assert found[b, p] == upsampled[b, :, y, x].argmax()


def test_keypoint_regression_error_matches_least_squares():
    rng = np.random.default_rng(0)

    def frame(n):
        centroids = rng.uniform(0, 64, (n, K, 2))
        boxes = np.concatenate([rng.uniform(0, 10, (n, 2)), rng.uniform(20, 50, (n, 2))], 1)
        # Keypoints near a mix of the centroids, so that the regression has something to find.
        points = centroids[:, [0, 1, 2, 0]] + rng.normal(0, 2, (n, 4, 2))
        return {
            "centroids": centroids,
            "present": rng.random((n, K)) < 0.8,
            "points": points,
            "visible": rng.random((n, 4)) < 0.7,
            "boxes": boxes,
        }

    fit, evaluated = frame(60), frame(25)
    evaluated["visible"][:, 3] = False  # a keypoint never visible in the evaluated split has no error
    error, per_part = part_metrics.keypoint_regression_error(
        part_metrics.KeypointFrame(**fit), part_metrics.KeypointFrame(**evaluated)
    )
    assert error == pytest.approx(_reference_regression(fit, evaluated), rel=1e-9)
    assert per_part[3] is None and all(value > 0 for value in per_part[:3])
    # The centroids do predict the keypoints: far better than the fitting split's mean keypoint.
    targets = {
        name: (f["points"] - f["boxes"][:, None, :2]) / f["boxes"][:, None, 2:]
        for name, f in (("fit", fit), ("eval", evaluated))
    }
    mean_errors = [
        np.linalg.norm(
            targets["eval"][evaluated["visible"][:, p], p] - targets["fit"][fit["visible"][:, p], p].mean(0), axis=1
        )
        for p in range(3)
    ]
    assert error < 0.5 * np.concatenate(mean_errors).mean()


def test_nmi_ari_are_sklearns():
    ids, parts = np.array([0, 0, 1, 1, 2, 2, 2]), np.array([3, 3, 0, 1, 1, 1, 3])
    assert part_metrics.nmi_ari(ids, parts) == (
        pytest.approx(normalized_mutual_info_score(ids, parts)),
        pytest.approx(adjusted_rand_score(ids, parts)),
    )


# ----------------------------------------------------------------------------------------------------------------
# The protocol


def test_parts_protocol_on_cub_matches_the_direct_computation(cub):
    root, layouts, truth, train, test = cub
    model = _layout_stage1(tiny_model(num_classes=1))
    cfg = engine.TrainConfig(eval_batch_size=2, progress=False)
    result = evaluate.evaluate_model(model, _split(root, "test"), ["parts"], cfg=cfg, fit_set=_split(root, "train"))[
        "parts"
    ]

    pixel_parts = {index: _upsampled_layout(layouts[index]) for index in test}
    assert any((pixel_parts[i] != np.repeat(np.repeat(layouts[i], PATCH, 0), PATCH, 1)).any() for i in test)
    points, visible, _ = _expected_keypoints(truth, test)
    ids, assigned = [], []
    for image, index in enumerate(test):
        for p in np.nonzero(visible[image])[0]:
            x, y = points[image, p]
            ids.append(p)
            assigned.append(pixel_parts[index][int(y), int(x)])
    assert result["num_keypoints"] == len(ids) > 10
    assert result["nmi"] == pytest.approx(normalized_mutual_info_score(ids, assigned))
    assert result["ari"] == pytest.approx(adjusted_rand_score(ids, assigned))
    assert result["keypoints_on_background"] == pytest.approx(np.mean(np.array(assigned) == K))

    expected = _reference_regression(_frame(layouts, truth, train), _frame(layouts, truth, test))
    assert result["keypoint_error"] == pytest.approx(expected, rel=1e-6)
    assert result["regression_fit_images"] == len(train)

    def pooled_iou(found_of, complement=False):
        inter = union = 0
        for index in test:
            found, mask = found_of(index), truth[index + 1][3]
            found, mask = (~found, ~mask) if complement else (found, mask)
            inter, union = inter + (found & mask).sum(), union + (found | mask).sum()
        return inter / union

    foreground = {index: pixel_parts[index] != K for index in test}
    assert result["fg_iou"] == pytest.approx(pooled_iou(foreground.get))
    assert result["bg_iou"] == pytest.approx(pooled_iou(foreground.get, complement=True))
    kept = {index: np.repeat(np.repeat(layouts[index] != K, PATCH, 0), PATCH, 1) for index in test}
    assert result["kept_iou"] == pytest.approx(pooled_iou(kept.get))
    assert result["fg_iou"] != pytest.approx(result["kept_iou"])
    assert result["not_computable"] == {}


def test_parts_protocol_reads_the_keypoints_through_a_class_map(cub):
    root = cub[0]
    model = _layout_stage1(tiny_model(num_classes=2))
    cfg = engine.TrainConfig(eval_batch_size=4, progress=False)
    test, train = _split(root, "test"), _split(root, "train")
    relabelled = ClassMapped(test, [index % 2 for index in range(len(test))], ("a", "b"))
    direct = evaluate.evaluate_model(model, test, ["parts"], cfg=cfg, fit_set=train)["parts"]
    mapped = evaluate.evaluate_model(model, relabelled, ["parts"], cfg=cfg, fit_set=train)["parts"]
    assert mapped == direct and direct["nmi"] is not None and direct["keypoint_error"] is not None


def test_parts_protocol_says_what_it_cannot_compute(cub, tmp_path):
    root = tmp_path / "no_parts" / "CUB_200_2011"
    _write_cub(root, _layouts(3, 1), [True, False, False], np.random.default_rng(2), with_parts=False)
    model = _layout_stage1(tiny_model(num_classes=1))
    cfg = engine.TrainConfig(eval_batch_size=2, progress=False)
    test = CUB200(root, "test", transform=cub_original(32, train=False))
    result = evaluate.evaluate_model(model, test, ["parts"], cfg=cfg, fit_set=test)["parts"]
    assert result["nmi"] is result["keypoint_error"] is result["fg_iou"] is None
    assert "part_locs.txt" in result["not_computable"]["nmi_ari"]
    assert set(result["not_computable"]) == {"nmi_ari", "keypoint_error", "fg_iou"}

    class Benchmark(torch.utils.data.Dataset):  # generated data: masks, no keypoints
        group_names = ("a", "b")

        def __len__(self):
            return 3

        def __getitem__(self, index):
            return Sample(torch.zeros(3, 32, 32), 0, index % 2, torch.ones(1, 32, 32))

    result = evaluate.evaluate_model(model, Benchmark(), ["parts"], cfg=cfg)["parts"]
    assert result["nmi"] is result["keypoint_error"] is None
    assert "no part keypoint annotations" in result["not_computable"]["keypoint_error"]
    # Its black images read as part 2 everywhere: all foreground, as the masks are.
    assert result["fg_iou"] == pytest.approx(1.0) and set(result["not_computable"]) == {"nmi_ari", "keypoint_error"}


def test_parts_protocol_needs_a_two_stage_model_and_sound_files(cub):
    root = cub[0]
    from faithful_vit.baseline import FullImageViT

    with pytest.raises(SpecError, match="--protocol parts: needs a two-stage model"):
        evaluate.evaluate_model(FullImageViT(num_classes=1, img_size=32), _split(root, "test"), ["parts"])
    (root / "parts" / "parts.txt").write_text("1 back\n1 beak\n")
    with pytest.raises(SpecError, match="--protocol parts: .*parts.txt:2: id 1 already given"):
        evaluate.evaluate_model(_layout_stage1(tiny_model(num_classes=1)), _split(root, "test"), ["parts"])


@pytest.mark.slow
def test_parts_protocol_from_the_command_line_on_the_benchmark(tmp_path, capsys, monkeypatch):
    """SpuriousShapes has masks and no keypoints: fg IoU is computed, NMI/ARI and the regression say why not."""
    from test_train_cli import TINY, load_train

    monkeypatch.setenv("FAITHFUL_VIT_DATA", str(tmp_path / "data_cache"))
    with use_backend("torch"):
        argv = [*TINY, "--model", "faithful_tiny,baseline", "--output", str(tmp_path), "--experiment", "run"]
        assert load_train().main(argv) == 0
        output = tmp_path / "parts.json"
        code = evaluate.main(
            [str(tmp_path / "run"), "--model", "faithful_tiny", "--protocol", "accuracy,parts", "--output", str(output)]
            + ["--no-progress", "--backend", "torch"]
        )
        out = capsys.readouterr().out
        assert code == 0
        report = json.loads(output.read_text())["protocols"]
        parts = report["parts"]
        assert 0 < parts["fg_iou"] < 1 and 0 < parts["bg_iou"] < 1
        assert parts["kept_iou"] == pytest.approx(report["accuracy"]["mask_iou"])
        assert parts["nmi"] is parts["ari"] is parts["keypoint_error"] is None
        assert set(parts["not_computable"]) == {"nmi_ari", "keypoint_error"}
        assert "(SpuriousShapes) has no part keypoint annotations" in parts["not_computable"]["nmi_ari"]
        assert re.search(r"parts fg iou +0\.\d{3}\n", out) and "not computed: nmi_ari" in out

        code = evaluate.main([str(tmp_path / "run"), "--model", "baseline", "--protocol", "parts", "--no-progress"])
        errors = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(errors) == 1 and "--protocol parts: needs a two-stage model" in errors[0]
