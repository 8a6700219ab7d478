"""The comparison models take local pretrained weights (``--pretrained-file``) and timm's pooling (``global_pool``)."""

import re

import pytest
import timm
import torch
from _helpers import ShellCommand
from test_train_cli import TINY, load_train
from timm.models.vision_transformer import VisionTransformer

import faithful_vit
from faithful_vit import model_spec
from faithful_vit.baseline import FullImageViT, OracleMaskViT
from faithful_vit.kernels import use_backend

SMALL = {"backbone_kwargs": {"embed_dim": 32, "depth": 1, "num_heads": 2}}


@pytest.fixture(autouse=True)
def _torch_attention():
    with use_backend("torch"):
        yield


def comparison_model(name, pretrained_file=None, **model_kwargs):
    spec = model_spec.model_spec(name, num_classes=3, image_size=32, model_kwargs={**SMALL, **model_kwargs})
    return model_spec.build_model(spec, pretrained_file=pretrained_file), spec


def a_vit_file(tmp_path, name="vit.pth", **kwargs):
    """A token-pooled timm ViT of the tiny comparison size with random weights (and its 1000-class head)."""
    torch.manual_seed(1)
    size = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2, "mlp_ratio": 2.0}
    vit = VisionTransformer(**{**size, **kwargs})
    path = tmp_path / name
    torch.save(vit.state_dict(), path)
    return vit, path


@pytest.mark.parametrize("name", ["baseline", "oracle"])
@pytest.mark.parametrize("pool", ["token", "avg"])
def test_pretrained_file_loads_every_weight_but_the_classifier(tmp_path, name, pool):
    vit, path = a_vit_file(tmp_path)
    model, spec = comparison_model(name, pretrained_file=str(path), global_pool=pool)
    assert isinstance(model, OracleMaskViT if name == "oracle" else FullImageViT)
    assert spec["config"]["global_pool"] == pool
    source, loaded = vit.state_dict(), model.vit.state_dict()
    for key, value in loaded.items():
        if key.startswith(("head.", "fc_norm.")) or (pool == "avg" and key.startswith("norm.")):
            continue
        assert torch.equal(value, source[key]), key
    assert loaded["head.weight"].shape == (3, 32)  # the new classifier, not the file's 1000 classes
    fresh, _ = comparison_model(name, global_pool=pool)
    assert not torch.equal(fresh.vit.blocks[0].attn.qkv.weight, loaded["blocks.0.attn.qkv.weight"])


def test_a_file_that_does_not_fit_names_the_keys(tmp_path):
    _, path = a_vit_file(tmp_path, depth=2)
    with pytest.raises(ValueError, match=r"does not fit the FullImageViT ViT: missing \[\], unexpected \['blocks.1."):
        comparison_model("baseline", pretrained_file=str(path))
    _, path = a_vit_file(tmp_path, embed_dim=64)
    with pytest.raises(RuntimeError, match="size mismatch"):
        comparison_model("baseline", pretrained_file=str(path))


def test_average_pooling_is_timms_mean_patch_token(tmp_path):
    model, spec = comparison_model("baseline", global_pool="avg")
    assert model.vit.global_pool == "avg" and isinstance(model.vit.norm, torch.nn.Identity)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = model.vit.forward_features(images)[:, model.vit.num_prefix_tokens :]
        expected = model.vit.head(model.vit.fc_norm(tokens.mean(1)))
        assert torch.allclose(model(images).logits, expected, atol=1e-6)
    # The spec rebuilds the same model (what load_model does with a checkpoint).
    rebuilt = model_spec.build_model(spec)
    assert rebuilt.vit.global_pool == "avg" and rebuilt.state_dict().keys() == model.state_dict().keys()
    token, _ = comparison_model("baseline")
    assert token.vit.global_pool == "token"


def test_bad_pooling_is_refused_by_name():
    with pytest.raises(ValueError, match=r"global_pool: expected one of \('token', 'avg'.*, got ''"):
        FullImageViT(2, global_pool="")
    with pytest.raises(ValueError, match="global_pool: expected only for baseline and oracle .* for faithful_tiny"):
        model_spec.model_spec("faithful_tiny", num_classes=2, image_size=32, model_kwargs={"global_pool": "avg"})


def test_train_py_gives_the_baseline_a_pretrained_file(tmp_path, capsys):
    vit, fitting = a_vit_file(tmp_path)
    foreign, evil = tmp_path / "foreign.pth", tmp_path / "evil.pth"
    torch.save(timm.create_model("vit_tiny_patch16_224", pretrained=False).state_dict(), foreign)
    marker = tmp_path / "executed"
    torch.save({"payload": ShellCommand(f"touch {marker}")}, evil)
    train = load_train()
    base = [*TINY, "--model", "baseline", "--model-kwargs", "backbone_kwargs={embed_dim: 32, depth: 1, num_heads: 2}"]
    refused = ((foreign, "Error.s. in loading state_dict"), (evil, "Weights only load failed|Unsupported global"))
    for path, message in refused:
        out = tmp_path / f"runs_{path.stem}"
        assert train.main([*base, "--pretrained-file", str(path), "--output", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"--pretrained-file: cannot load {path} into baseline" in err[0], err
        assert re.search(message, err[0]), err
        assert not out.exists()
    assert not marker.exists()
    argv = [*base, "--model-kwargs", "global_pool=avg", "backbone_kwargs={embed_dim: 32, depth: 1, num_heads: 2}"]
    argv += ["--pretrained-file", str(fitting), "--output", str(tmp_path / "runs"), "--experiment", "run"]
    # A vanishing learning rate: the trained weights are the file's.
    assert train.main([*argv, "--lr", "1e-20", "--num-figure-samples", "1"]) == 0
    trained = faithful_vit.load_model(tmp_path / "runs" / "run")
    assert trained.spec["model"]["config"]["global_pool"] == "avg" and trained.vit.global_pool == "avg"
    for key in ("patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "pos_embed", "cls_token"):
        assert torch.allclose(trained.vit.state_dict()[key], vit.state_dict()[key], atol=1e-12), key
