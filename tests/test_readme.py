"""The README's Python snippets run as written on the CPU (the quickstart promises it)."""

import re
from pathlib import Path

import torch

import faithful_vit
from faithful_vit.kernels import use_backend

README = Path(__file__).resolve().parent.parent / "README.md"


def _section_snippet(title: str) -> str:
    text = README.read_text()
    section = text[text.index(f"## {title}") :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_dinov3_snippet_runs_and_its_features_ignore_dropped_patches():
    code = _section_snippet("Sparse attention in the timm ViTs you use")
    assert "vit_small_patch16_dinov3" in code
    namespace: dict = {}
    with use_backend("torch"):  # the snippet's "auto" would pick the Triton interpreter that the tests switch on
        exec(compile(code, str(README), "exec"), namespace)
        model, images, keep = namespace["model"], namespace["images"], namespace["keep"]
        assert namespace["features"].shape == (8, model.num_features)
        assert namespace["logits"].shape == (8, 10)
        patches = model.patch_embed.patch_size[0]
        grid = (~keep).view(8, 1, 14, 14).repeat_interleave(patches, 2).repeat_interleave(patches, 3)
        repainted = torch.where(grid, torch.randn_like(images), images)
        torch.testing.assert_close(
            faithful_vit.forward_kept(model, repainted, keep), namespace["features"], rtol=1e-4, atol=1e-4
        )


def test_readme_kernel_snippet_runs_and_matches_the_reference():
    namespace: dict = {}
    with use_backend("torch"):
        exec(compile(_section_snippet("The kernels"), str(README), "exec"), namespace)
    q, k, v, keep = (namespace[name] for name in ("q", "k", "v", "keep"))
    mask = keep[:, None, None, :]
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask) * keep[:, None, :, None]
    torch.testing.assert_close(namespace["out"], expected, rtol=1e-5, atol=1e-5)
    assert namespace["packed"].data.shape == (int(keep.sum()), 384)


def test_readme_two_stage_snippet_runs():
    namespace: dict = {}
    exec(compile(_section_snippet("The two-stage model"), str(README), "exec"), namespace)
    assert namespace["report"].passed
    assert torch.isfinite(namespace["losses"]["total"])
