"""FaithfulViT: output structure, the mask, the three stage-2 modes, the gate gradient, presets, bad inputs."""

from __future__ import annotations

import pytest
import safetensors.torch
import timm
import torch
from _tiny import TINY_BACKBONE, tiny_model

import faithful_vit
from faithful_vit.kernels import use_backend
from faithful_vit.model import STAGE2_MODES
from faithful_vit.morphology import dilate_keep, erode_keep, open_keep


@pytest.fixture(autouse=True)
def _torch_backend():
    with use_backend("torch"):
        yield


def _images(batch=2, size=32, dtype=torch.float32):
    return torch.randn(batch, 3, size, size, dtype=dtype)


def _random_keep(batch, num_patches):
    keep = torch.rand(batch, num_patches) < 0.5
    keep[:, 0] = True  # at least one kept and one dropped patch per image
    keep[:, -1] = False
    return keep


def test_forward_output_structure_in_training():
    model = tiny_model()
    out = model(_images())
    assert out.stage1_logits.shape == out.stage2_logits.shape == (2, 2)
    assert out.part_maps.shape == out.part_logits.shape == out.part_scores.shape == (2, 4, 4, 4)
    assert out.part_logits.dtype == torch.float32
    assert out.keep.shape == (2, 16) and out.keep.dtype == torch.bool
    torch.testing.assert_close(out.kept_fraction, out.keep.float().mean(1))
    torch.testing.assert_close(out.part_maps.sum(1), torch.ones(2, 4, 4))
    assert out.part_embeddings.shape == (2, 32, 4)
    # Training with straight_through: the gate rides along and equals keep exactly in value.
    assert out.gate is not None and torch.equal(out.gate.detach(), out.keep.float())


def test_part_logits_are_negative_squared_distances_in_fp32():
    model = tiny_model().eval()
    images = _images()
    out = model.forward_stage1(images)
    z = model.stage1.forward_features(images)[:, model.stage1.num_prefix_tokens :].double()
    expected = -torch.cdist(z, model.prototypes.double()).pow(2)  # (B, G, K+1)
    torch.testing.assert_close(out.part_logits.flatten(2).transpose(1, 2).double(), expected, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(
        out.part_scores.flatten(2).transpose(1, 2).double(), z @ model.prototypes.double().t(), rtol=1e-5, atol=1e-5
    )


def test_eval_is_deterministic_and_keep_is_the_argmax_rule():
    model = tiny_model().eval()
    images = _images()
    first, second = model(images), model(images)
    assert torch.equal(first.keep, second.keep) and torch.equal(first.part_maps, second.part_maps)
    assert torch.equal(first.stage2_logits, second.stage2_logits)
    expected = (first.part_logits.argmax(1) < model.num_parts).flatten(1)
    assert torch.equal(first.keep, expected)
    assert first.gate is None


def test_stochastic_eval_adds_gumbel_noise():
    model = tiny_model(stochastic_eval=True).eval()
    images = _images()
    assert not torch.equal(model.forward_stage1(images).part_maps, model.forward_stage1(images).part_maps)


def test_mask_part_dropout_only_removes_patches():
    model = tiny_model(mask_part_dropout=0.6).eval()
    logits = torch.randn(4, model.num_parts + 1, 4, 4)
    full, _ = model.compute_keep(logits, stochastic=False, part_dropout=False)
    dropped, _ = model.compute_keep(logits, stochastic=False, part_dropout=True)
    assert not (dropped & ~full).any()
    # A token stays kept iff some surviving part still beats the background; with every part dropped nothing is kept.
    model.cfg.mask_part_dropout = 0.999999
    nothing, _ = model.compute_keep(logits, stochastic=False, part_dropout=True)
    assert not nothing.any()


def test_mask_token_dropout_drops_single_kept_patches_in_training_only():
    torch.manual_seed(0)
    model = tiny_model(mask_part_dropout=0.0, mask_token_dropout=0.25).eval()
    logits = torch.randn(256, model.num_parts + 1, 4, 4)
    full, _ = model.compute_keep(logits, stochastic=False, part_dropout=False)
    dropped, _ = model.compute_keep(logits, stochastic=False, part_dropout=True)
    assert not (dropped & ~full).any()
    share = 1 - dropped.sum() / full.sum()
    assert 0.2 < share < 0.3, share  # each kept patch independently, about 2,000 of them
    # Not per image: images keep different numbers of their patches.
    assert len(set((full.sum(1) - dropped.sum(1)).tolist())) > 2
    model.train()
    keep, _ = model.compute_keep(logits, stochastic=False)
    assert keep.sum() < full.sum()
    with pytest.raises(ValueError, match="mask_token_dropout: expected a probability"):
        tiny_model(mask_token_dropout=1.0)


def _split_block_logits(batch: int, num_parts: int) -> torch.Tensor:
    """A 3 x 3 object on a 4 x 4 grid: part 0 wins its columns 0-1, part 1 its column 2, the background the rest."""
    logits = torch.zeros(batch, num_parts + 1, 4, 4)
    logits[:, num_parts] = 1.0
    logits[:, 0, :3, :2] = 2.0
    logits[:, 1, :3, 2] = 2.0
    return logits


def test_mask_part_dropout_after_morphology_removes_whole_parts_of_the_cleaned_mask():
    torch.manual_seed(0)
    logits = _split_block_logits(64, 3)
    plus = torch.zeros(4, 4, dtype=torch.bool)
    plus[1, :3] = plus[:3, 1] = True  # the opening of the 3 x 3 block
    part_one = torch.zeros(4, 4, dtype=torch.bool)
    part_one[:3, 2] = True
    # Before the clean-up, dropping either part leaves a 3 x 2 or 3 x 1 bar with no full cross: the mask is erased.
    before = tiny_model(mask_morphology="open", mask_part_dropout=0.5).eval()
    keep, _ = before.compute_keep(logits, stochastic=False, part_dropout=True)
    assert all(torch.equal(k, plus.flatten()) or not k.any() for k in keep)
    # After it, the dropped part's patches leave the plus and the other part's stay.
    after = tiny_model(mask_morphology="open", mask_part_dropout=0.5, mask_part_dropout_after_morphology=True).eval()
    keep, _ = after.compute_keep(logits, stochastic=False, part_dropout=True)
    allowed = [plus, plus & ~part_one, plus & part_one, torch.zeros_like(plus)]
    seen = [any(torch.equal(k, a.flatten()) for k in keep) for a in allowed]
    assert all(any(torch.equal(k, a.flatten()) for a in allowed) for k in keep)
    assert seen[1] and seen[2]  # either part alone survives in some of the 64 draws
    full, _ = after.compute_keep(logits, stochastic=False, part_dropout=False)
    assert torch.equal(full, plus.flatten().expand(64, -1))


@pytest.mark.parametrize("after_morphology", [False, True])
def test_mask_part_dropout_never_empties_falls_back_to_the_undropped_mask(after_morphology):
    torch.manual_seed(0)
    plus = torch.zeros(4, 4, dtype=torch.bool)
    plus[1, :3] = plus[:3, 1] = True
    one_part = _split_block_logits(64, 3)
    one_part[:, 0, :3, :3] = 2.0  # part 0 wins the whole object: dropping it empties the mask
    options = {"mask_morphology": "open", "mask_part_dropout": 0.5}
    options["mask_part_dropout_after_morphology"] = after_morphology
    plain = tiny_model(**options).eval()
    keep, _ = plain.compute_keep(one_part, stochastic=False, part_dropout=True)
    assert (~keep.any(dim=1)).any()
    never = tiny_model(**options, mask_part_dropout_never_empties=True).eval()
    keep, gate = never.compute_keep(one_part, stochastic=False, part_dropout=True, with_gate=True)
    assert torch.equal(keep, plus.flatten().expand(64, -1))
    assert torch.equal(gate, keep.float())  # the gate's value is the mask, fallback rows included
    # An image whose dropout leaves some patch keeps its dropped mask (after the clean-up: half the plus).
    keep, _ = never.compute_keep(_split_block_logits(64, 3), stochastic=False, part_dropout=True)
    assert keep.any(dim=1).all()
    assert (keep.sum(dim=1) < plus.sum()).any() == after_morphology


def test_erode_keep_is_4_neighbour_erosion():
    keep = torch.zeros(1, 5, 5, dtype=torch.bool)
    keep[0, 1:4, 1:4] = True
    keep[0, 0, 4] = True
    eroded = erode_keep(keep.view(1, 25), (5, 5)).view(5, 5)
    expected = torch.zeros(5, 5, dtype=torch.bool)
    expected[2, 2] = True
    assert torch.equal(eroded, expected)
    model = tiny_model(mask_morphology="erode").eval()
    logits = torch.randn(2, model.num_parts + 1, 4, 4)
    keep, _ = model.compute_keep(logits)
    raw = (logits.argmax(1) < model.num_parts).flatten(1)
    assert torch.equal(keep, erode_keep(raw, (4, 4)))


def test_open_keep_removes_specks_and_keeps_crosses():
    keep = torch.zeros(1, 6, 6, dtype=torch.bool)
    keep[0, 1:4, 1:4] = True  # a 3x3 block: holds a full cross, survives except its corners
    keep[0, 5, 5] = True  # an isolated speck
    keep[0, 0, 5] = keep[0, 1, 5] = True  # a 2-patch bar: no full cross
    opened = open_keep(keep.view(1, 36), (6, 6)).view(6, 6)
    expected = torch.zeros(6, 6, dtype=torch.bool)
    expected[2, 1:4] = expected[1:4, 2] = True
    assert torch.equal(opened, expected)
    dilated = dilate_keep(expected.view(1, 36), (6, 6)).view(6, 6)
    assert dilated.sum() == 5 + 8 and not dilated[0, 0] and dilated[0, 2]
    random_keep = torch.rand(3, 49) > 0.4
    assert not (open_keep(random_keep, (7, 7)) & ~random_keep).any()  # opening never adds a patch
    model = tiny_model(mask_morphology="open").eval()
    logits = torch.randn(2, model.num_parts + 1, 4, 4)
    keep_open, _ = model.compute_keep(logits)
    assert torch.equal(keep_open, open_keep((logits.argmax(1) < model.num_parts).flatten(1), (4, 4)))
    with pytest.raises(ValueError, match="mask_morphology"):
        tiny_model(mask_morphology="close")


def test_dilate_keep_with_8_neighbours_grows_a_square_ring():
    keep = torch.zeros(1, 5, 5, dtype=torch.bool)
    keep[0, 2, 2] = keep[0, 0, 4] = True  # one patch inside, one in a corner (the grid edge clips its ring)
    square = dilate_keep(keep.view(1, 25), (5, 5), connectivity=8).view(5, 5)
    expected = torch.zeros(5, 5, dtype=torch.bool)
    expected[1:4, 1:4] = expected[0:2, 3:5] = True
    assert torch.equal(square, expected)
    cross = dilate_keep(keep.view(1, 25), (5, 5)).view(5, 5)
    assert cross.sum() == 5 + 3 and not cross[1, 1] and (cross <= square).all()
    with pytest.raises(ValueError, match="connectivity: expected 4 or 8, got 6"):
        dilate_keep(keep.view(1, 25), (5, 5), connectivity=6)


def test_three_stage2_modes_agree_logits_and_gradients():
    # fp32: the kernels take fp16/bf16/fp32 only.
    model = tiny_model().eval()
    images = _images(3).requires_grad_()
    keep = _random_keep(3, model.num_patches)
    keep[1] = False  # an image with no kept patch: only the prefix tokens remain
    tol = {"rtol": 1e-4, "atol": 1e-5}
    results = {}
    for mode in STAGE2_MODES:
        logits = model.forward_stage2(images, keep, mode=mode)
        params = [p for p in model.stage2.parameters()] + list(model.head.parameters())
        grads = torch.autograd.grad(logits.pow(2).sum(), [images, *params], allow_unused=True)
        results[mode] = (logits.detach(), grads)
    ref_logits, ref_grads = results["dense"]
    for mode in ("masked", "packed"):
        logits, grads = results[mode]
        torch.testing.assert_close(logits, ref_logits, **tol)
        for got, want in zip(grads, ref_grads):
            if want is None:
                assert got is None or not got.any()
            else:
                torch.testing.assert_close(got, want, **tol)


def test_modes_agree_with_the_default_kernel_backend():
    """The one stage-2 check on the default ("auto") backend: Triton under the interpreter where it can run."""
    model = tiny_model().eval()
    images = _images(1)
    keep = _random_keep(1, model.num_patches)
    with use_backend(None):
        dense = model.forward_stage2(images, keep, mode="dense")
        for mode in ("masked", "packed"):
            logits = model.forward_stage2(images, keep, mode=mode)
            torch.testing.assert_close(logits, dense, rtol=1e-4, atol=1e-5)


def _stage1_grads(model):
    return {n: p.grad for n, p in model.named_parameters() if n.startswith("stage1.") or n == "prototypes"}


@pytest.mark.parametrize("straight_through", [True, False])
def test_gate_gradient_reaches_stage1_only_when_enabled(straight_through):
    model = tiny_model(straight_through=straight_through, mask_part_dropout=0.0).train()
    assert model.default_stage2_mode() == ("masked" if straight_through else "packed")
    out = model(_images(), mode="masked")
    torch.nn.functional.cross_entropy(out.stage2_logits, torch.tensor([0, 1])).backward()
    grads = _stage1_grads(model)
    reached = [n for n, g in grads.items() if g is not None and g.abs().sum() > 0]
    if straight_through:
        assert {"prototypes", "stage1.cls_token", "stage1.blocks.0.attn.qkv.weight"} <= set(reached)
    else:
        assert reached == []
    # The stage-2 loss never reaches the stage-1 classifier or the modulation (not on the mask path).
    assert model.part_classifier.weight.grad is None and model.modulation.weight.grad is None


def test_packed_mode_sends_no_gradient_to_stage1():
    model = tiny_model().train()
    out = model(_images(), mode="packed")
    assert out.gate is None
    out.stage2_logits.sum().backward()
    assert all(g is None or not g.any() for g in _stage1_grads(model).values())


def test_gate_is_only_accepted_in_masked_mode():
    model = tiny_model()
    images = _images()
    keep = _random_keep(2, model.num_patches)
    with pytest.raises(ValueError, match="gate"):
        model.forward_stage2(images, keep, mode="packed", gate=keep.float())


def test_prefix_tokens_are_always_kept_with_registers():
    with pytest.warns(UserWarning, match="freeze_stage1_backbone"):
        model = faithful_vit.create_model(
            "faithful_dinov2_base_reg4_518",
            img_size=28,
            backbone_kwargs={"embed_dim": 32, "depth": 1, "num_heads": 2, "init_values": None},
        )
    model.eval()
    assert model.stage2.num_prefix_tokens == 5 and model.grid_size == (2, 2)
    images = _images(2, size=28)
    nothing = torch.zeros(2, model.num_patches, dtype=torch.bool)
    with torch.no_grad():
        logits = {mode: model.forward_stage2(images, nothing, mode=mode) for mode in STAGE2_MODES}
        assert torch.isfinite(logits["dense"]).all()
        for mode in ("masked", "packed"):
            torch.testing.assert_close(logits[mode], logits["dense"], rtol=1e-4, atol=1e-5)
        # With every patch dropped the prediction is a function of the prefix tokens alone ...
        torch.testing.assert_close(
            model.forward_stage2(torch.randn_like(images), nothing, mode="packed"), logits["packed"], rtol=0, atol=0
        )
        # ... and the register tokens are read.
        model.stage2.reg_token.add_(torch.randn_like(model.stage2.reg_token))
        assert not torch.allclose(model.forward_stage2(images, nothing, mode="packed"), logits["packed"])


def test_frozen_stage1_trains_only_prefix_tokens_and_position_embedding():
    with pytest.warns(UserWarning):
        model = tiny_model(freeze_stage1_backbone=True)
    trainable = {n for n, p in model.stage1.named_parameters() if p.requires_grad}
    assert trainable == {"cls_token", "pos_embed"}
    assert all(p.requires_grad for p in model.stage2.parameters())


def test_param_groups_cover_every_trainable_parameter_once():
    model = tiny_model(lr_factors={"heads": 100.0, "prototypes": 10.0})
    groups = model.param_groups(lr=1e-3, weight_decay=0.05)
    seen = [id(p) for g in groups for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in model.parameters() if p.requires_grad)
    assert len(seen) == len(set(seen))
    by_name = {g["name"]: g for g in groups}
    assert by_name["heads_decay"]["lr"] == pytest.approx(0.1) and by_name["heads_decay"]["weight_decay"] == 0.05
    assert by_name["heads"]["weight_decay"] == 0.0  # the LayerNorm of the stage-2 head
    assert by_name["prototypes"]["lr"] == pytest.approx(1e-2) and by_name["prototypes"]["weight_decay"] == 0.0
    assert by_name["modulation"]["weight_decay"] == 0.0
    assert {id(p) for p in by_name["stage2_tokens"]["params"]} == {
        id(model.stage2.cls_token),
        id(model.stage2.pos_embed),
    }
    for group in groups:
        if group["weight_decay"]:
            assert all(p.ndim >= 2 for p in group["params"])
    torch.optim.AdamW(groups)  # accepted as is


def test_faithful_tiny_trains_stage2_at_a_lower_learning_rate():
    groups = {g["name"]: g["lr"] for g in tiny_model().param_groups(lr=1e-3, weight_decay=0.05)}
    for name in ("stage2_backbone", "stage2_backbone_decay", "stage2_tokens"):
        assert groups[name] == pytest.approx(3e-4), name
    for name in ("stage1_backbone", "stage1_backbone_decay", "stage1_tokens", "heads", "prototypes", "modulation"):
        assert groups[name] == pytest.approx(1e-3), name


def test_paper_presets_use_the_paper_lr_factors():
    assert set(faithful_vit.list_models()) >= {
        "faithful_tiny",
        "faithful_vit_small_patch16_224",
        "faithful_dinov2_base_reg4_518",
    }
    paper = faithful_vit.get_config("faithful_dinov2_base_reg4_518")
    assert paper.lr_factors["heads"] == 1e4 and paper.lr_factors["prototypes"] == 1e3
    assert paper.backbone == "vit_base_patch14_reg4_dinov2" and paper.img_size == 518 and paper.num_parts == 8
    assert faithful_vit.list_models("*dinov2*") == ["faithful_dinov2_base_reg4_518"]


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_backbone_weights_load_from_a_local_file(tmp_path, suffix):
    source = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, num_classes=5, **TINY_BACKBONE)
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        safetensors.torch.save_file(source.state_dict(), str(path))
    else:
        torch.save(source.state_dict(), path)
    model = tiny_model(pretrained_file=str(path))
    for stage in (model.stage1, model.stage2):
        torch.testing.assert_close(stage.blocks[1].mlp.fc2.weight, source.blocks[1].mlp.fc2.weight, rtol=0, atol=0)
        torch.testing.assert_close(stage.pos_embed, source.pos_embed, rtol=0, atol=0)


def test_a_checkpoint_that_does_not_fit_is_rejected(tmp_path):
    source = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, num_classes=0, **{**TINY_BACKBONE, "depth": 3}
    )
    path = tmp_path / "deeper.safetensors"
    safetensors.torch.save_file(source.state_dict(), str(path))
    with pytest.raises(ValueError, match="does not fit"):
        tiny_model(pretrained_file=str(path))


def test_stage2_pos_embed_sincos_starts_from_the_2d_table_and_leaves_stage1_alone():
    torch.manual_seed(0)
    plain = tiny_model()
    torch.manual_seed(0)
    sincos = tiny_model(stage2_pos_embed_init="sincos")
    table = timm.layers.build_sincos2d_pos_embed([4, 4], 32)
    pos = sincos.stage2.pos_embed[0]
    assert torch.equal(pos[0], torch.zeros(32)) and torch.equal(pos[1:], table)
    # Same draws otherwise: only stage 2's position embedding differs.
    for (name, a), b in zip(plain.state_dict().items(), sincos.state_dict().values()):
        assert torch.equal(a, b) == (name != "stage2.pos_embed"), name
    with pytest.raises(ValueError, match="stage2_pos_embed_init: expected one of"):
        tiny_model(stage2_pos_embed_init="rope")
    with pytest.raises(ValueError, match="stage2_pos_embed_init: 'sincos' expects a learned absolute position"):
        tiny_model(stage2_pos_embed_init="sincos", backbone_kwargs={"pos_embed": "none"})


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="img_size.*multiple of the patch size"):
        tiny_model(img_size=30)
    with pytest.raises(ValueError, match="num_parts"):
        tiny_model(num_parts=0)
    with pytest.raises(ValueError, match="unknown preset"):
        faithful_vit.create_model("faithful_huge")
    with pytest.raises(TypeError, match="unknown FaithfulViTConfig field"):
        tiny_model(num_part=3)
    with pytest.raises(ValueError, match="loss_weights"):
        tiny_model(loss_weights={"presense": 1.0})
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match=f"stage1_epochs: expected None or an int >= 1, got {bad!r}"):
            tiny_model(stage1_epochs=bad)
    model = tiny_model()
    with pytest.raises(ValueError, match="3 channels"):
        model(torch.randn(2, 1, 32, 32))
    with pytest.raises(ValueError, match="spatial size"):
        model(torch.randn(2, 3, 40, 40))
    with pytest.raises(ValueError, match="keep: expected a bool tensor of shape"):
        model.forward_stage2(_images(), torch.ones(2, 15, dtype=torch.bool))
    with pytest.raises(ValueError, match="mode"):
        model.forward_stage2(_images(), torch.ones(2, 16, dtype=torch.bool), mode="sparse")
    with pytest.raises(ValueError, match="remove_parts"):
        model.eval()(_images(), remove_parts=[3])
