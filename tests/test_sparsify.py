"""sparsify and forward_kept against timm's own masked forward: features, gradients, state dicts, refusals, compile.

Small random-weight models (depth 2, tiny images, narrow Eva/SigLIP configs) on the PyTorch reference backend; one
tiny case per family on the Triton kernels (interpreted on CPU); the same checks at real sizes are marked gpu. Both
timm families: VisionTransformer (vit, deit, deit3, dinov2, SigLIP's attention pool) and Eva (EVA-02, DINOv3, the
rope ViTs: rotary embeddings, registers, layer scale, SwiGLU, q/k norm, grouped-query attention).
"""

import copy

import pytest
import timm
import torch
from timm.layers import LayerScale
from timm.models.eva import Eva
from timm.models.vision_transformer import ParallelScalingBlock, ResPostBlock, VisionTransformer

from faithful_vit import MaskedAttention, forward_kept, sparsify
from faithful_vit.attention import MaskedRopeAttention

TOL = {"atol": 1e-4, "rtol": 1e-4}  # fp32 (the kernels take fp16/bf16/fp32); summation orders differ
MODES = ("packed", "masked")
NARROW = {"depth": 2, "embed_dim": 64, "num_heads": 2}
# name -> (timm kwargs, image size); depth 2 and tiny images keep CPU time low.
MODELS = {
    "vit_tiny_patch16_224": ({"depth": 2}, 48),
    "deit3_small_patch16_224": ({"depth": 2}, 48),
    "vit_small_patch14_reg4_dinov2": ({"depth": 2}, 42),
    "deit_tiny_distilled_patch16_224": ({"depth": 2}, 48),
    "vit_tiny_patch16_224-avg": ({"depth": 2, "global_pool": "avg", "class_token": False, "fc_norm": True}, 48),
    "vit_tiny_patch16_224-avgmax-reg": ({"depth": 2, "global_pool": "avgmax", "reg_tokens": 2}, 48),
    # SigLIP: no prefix token, attention-pool head (AttentionPoolLatent) over the patch tokens
    "vit_base_patch16_siglip_224": (NARROW, 48),
    # Eva family. EVA-02: rope (interleaved), SwiGLU, fused qkv with separate q/v biases, avg pool + fc_norm
    "eva02_tiny_patch14_224": ({"depth": 2}, 42),
    # EVA-02 base/large layout: separate q/k/v projections, SwiGLU with its norm; plus q/k norm and the scale norm
    "eva02_tiny_patch14_224-qknorm": (
        {"depth": 2, "qkv_fused": False, "scale_mlp": True, "qk_norm": True, "scale_attn_inner": True},
        42,
    ),
    # DINOv3: 4 registers + class token, layer scale, half-rotation rope, avg pooling of the patch tokens (timm's
    # default) and token pooling (DINOv3's own)
    "vit_small_patch16_dinov3": (NARROW, 48),
    "vit_small_patch16_dinov3-token": ({**NARROW, "global_pool": "token"}, 48),
    # timm SBB rope ViT: no class token, 1 register, avg pooling
    "vit_base_patch16_rope_reg1_gap_256": (NARROW, 48),
    # RoPE-ViT: AttentionRope; learnable per-block, per-head frequencies (rope_mixed)
    "vit_small_patch16_rope_mixed_224": (NARROW, 48),
    # AttentionRope with grouped-query attention (separate projections, one key/value head)
    "vit_small_patch16_rope_224-gqa": ({**NARROW, "qkv_fused": False, "num_kv_heads": 1}, 48),
    # Perception Encoder: Eva with an attention pool that reads the class token too, pre-transformer norm
    "vit_pe_core_tiny_patch16_384": (NARROW, 48),
}


def _create(name: str, real_size: bool = False, **overrides) -> torch.nn.Module:
    kwargs, img_size = MODELS[name]
    # real_size: the registered model as timm defines it (full depth, 224 or 518 px images).
    kwargs = {**({} if real_size else {**kwargs, "img_size": img_size}), **overrides}
    model = timm.create_model(name.split("-")[0], num_classes=0, **kwargs)
    with torch.no_grad():
        for module in model.modules():  # layer scale starts near 0 (deit3: 1e-6); make the blocks matter
            if isinstance(module, LayerScale):
                module.gamma.uniform_(0.5, 1.5)
        for param_name, param in model.named_parameters():
            if param_name.endswith(("gamma_1", "gamma_2")):  # Eva's layer scale
                param.uniform_(0.5, 1.5)
            elif param_name.endswith(("q_bias", "v_bias")):  # EVA's separate biases start at zero
                param.normal_(0.0, 0.1)
    return model


def _inputs(model: torch.nn.Module, batch: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    device = next(model.parameters()).device
    images = torch.randn(batch, 3, *model.patch_embed.img_size, device=device)
    keep = torch.rand(batch, model.patch_embed.num_patches, device=device) < 0.5
    if model.num_prefix_tokens:
        keep[-1] = False  # an image with no kept patch: only its prefix tokens take part
    else:
        keep[:, 0] = True  # timm's attention over no key at all is NaN (see test_images_without_any_token_...)
    return images, keep


def _full_mask(model: torch.nn.Module, keep: torch.Tensor) -> torch.Tensor:
    return torch.cat([keep.new_ones(keep.shape[0], model.num_prefix_tokens), keep], dim=1)


def _timm_features(model: torch.nn.Module, images: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """timm's own forward with the key mask; average/max/attention pooling restricted to the kept patch tokens."""
    full_mask = _full_mask(model, keep)
    tokens = model.forward_features(images, attn_mask=full_mask[:, None, None, :])
    if model.global_pool == "token":
        return model.forward_head(tokens, pre_logits=True)
    if model.global_pool == "map":
        # timm's pool(): Eva's attention pool reads every token, a VisionTransformer's the patch tokens only
        if isinstance(model, Eva) or model.pool_include_prefix:
            pooled = model.attn_pool(tokens, attn_mask=full_mask[:, None, None, :])
        else:
            pooled = model.attn_pool(tokens[:, model.num_prefix_tokens :], attn_mask=keep[:, None, None, :])
        return model.fc_norm(pooled)
    patches = tokens[:, model.num_prefix_tokens :]
    count = keep.sum(1, keepdim=True).clamp(min=1)
    mean = (patches * keep[..., None]).sum(1) / count
    amax = patches.masked_fill(~keep[..., None], torch.finfo(patches.dtype).min).amax(1)
    amax = torch.where(keep.any(1, keepdim=True), amax, 0.0)  # no kept patch: zero, like the empty mean
    pooled = {"avg": mean, "max": amax, "avgmax": 0.5 * (mean + amax)}[model.global_pool]
    return model.fc_norm(pooled)


def _assert_close_to_scale(got: torch.Tensor, expected: torch.Tensor, what: str, rel: float = 2e-5) -> None:
    """fp32 gradients sum many terms: compare errors to the tensor's largest entry (both paths sit ~1e-6 from fp64)."""
    error, scale = (got - expected).abs().max().item(), expected.abs().max().item()
    assert error <= rel * scale + 1e-7, f"{what}: max error {error:.3g} for max magnitude {scale:.3g}"


def _check_against_timm(name: str, backend: str, batch: int = 2, device: str = "cpu", real_size: bool = False):
    reference = _create(name, real_size=real_size)
    reference.to(device)
    converted = sparsify(copy.deepcopy(reference), backend=backend)
    images, keep = _inputs(reference, batch)
    expected = _timm_features(reference, images, keep)
    weights = torch.randn_like(expected)
    names = [n for n, _ in reference.named_parameters()]
    expected_grads = torch.autograd.grad((expected * weights).sum(), list(reference.parameters()), allow_unused=True)
    for mode in MODES:
        converted.zero_grad()
        features = forward_kept(converted, images, keep, mode=mode)
        torch.testing.assert_close(features, expected, **TOL, msg=lambda m, mode=mode: f"{name} {mode} features: {m}")
        (features * weights).sum().backward()
        for param_name, param, expected_grad in zip(names, converted.parameters(), expected_grads, strict=True):
            if expected_grad is None:
                assert param.grad is None or not param.grad.any(), param_name
                continue
            _assert_close_to_scale(param.grad, expected_grad, f"{name} {mode} grad {param_name}")


@pytest.mark.parametrize("name", MODELS)
def test_forward_kept_matches_timm_masked_forward_and_gradients(name):
    _check_against_timm(name, backend="torch")


CLASSIC = ("vit_tiny_patch16_224", "deit3_small_patch16_224", "vit_small_patch14_reg4_dinov2")
REAL_SIZE_GPU = [  # the new families on our kernels only, to keep the GPU suite short
    *((name, backend) for name in CLASSIC for backend in ("torch", "triton")),
    *((name, "triton") for name in ("vit_base_patch16_siglip_224", "eva02_tiny_patch14_224")),
    *((name, "triton") for name in ("vit_small_patch16_dinov3", "vit_small_patch16_rope_mixed_224")),
]


@pytest.mark.gpu
@pytest.mark.parametrize("name, backend", REAL_SIZE_GPU)
def test_forward_kept_matches_timm_real_size_gpu(name, backend):
    _check_against_timm(name, backend=backend, batch=4, device="cuda", real_size=True)


@pytest.mark.parametrize(
    "name",
    [
        "vit_small_patch14_reg4_dinov2",
        "eva02_tiny_patch14_224",
        "eva02_tiny_patch14_224-qknorm",
        "vit_small_patch16_dinov3",
        "vit_small_patch16_rope_224-gqa",
        "vit_small_patch16_rope_mixed_224",
    ],
)
def test_state_dict_unchanged_and_parameters_shared(name):
    model = _create(name)
    before = model.state_dict()
    buffers_before = dict(model.named_buffers())  # non-persistent ones too (EVA's zero k_bias)
    params_before = list(model.parameters())
    sparsify(model, backend="torch")
    after = model.state_dict()
    assert list(after) == list(before)
    for key in before:
        assert after[key] is before[key] or torch.equal(after[key], before[key]), key
    assert all(a is b for a, b in zip(model.parameters(), params_before, strict=True))
    assert all(a is b for a, b in zip(dict(model.named_buffers()).values(), buffers_before.values(), strict=True))
    assert list(dict(model.named_buffers())) == list(buffers_before)
    drop_in = MaskedRopeAttention if isinstance(model, Eva) else MaskedAttention
    assert all(type(block.attn) is drop_in for block in model.blocks)
    fresh = _create(name)
    sparsify(fresh).load_state_dict(before, strict=True)  # a timm checkpoint loads into a converted model


@pytest.mark.parametrize(
    "name", ["deit3_small_patch16_224", "vit_small_patch16_dinov3", "vit_small_patch16_rope_mixed_224"]
)
def test_converted_model_gives_timm_results_through_timm_forward(name):
    """timm's own forward on the converted model: unchanged without a mask, equal on every token with a key mask."""
    reference = _create(name)
    converted = sparsify(copy.deepcopy(reference), backend="torch")
    images, keep = _inputs(reference)
    mask = _full_mask(reference, keep)[:, None, None, :]
    torch.testing.assert_close(converted(images), reference(images), **TOL)
    torch.testing.assert_close(
        converted.forward_features(images, attn_mask=mask), reference.forward_features(images, attn_mask=mask), **TOL
    )


def test_rope_attention_adopts_only_the_eva_attentions():
    vit = _create("vit_tiny_patch16_224")
    with pytest.raises(TypeError, match="attn: expected timm.models.eva.EvaAttention or timm.layers.AttentionRope"):
        MaskedRopeAttention.from_timm(vit.blocks[0].attn)


def test_sparsify_sets_backend_and_is_idempotent():
    model = _create("vit_tiny_patch16_224")
    sparsify(model, backend="torch")
    attn = model.blocks[0].attn
    sparsify(model, backend="triton")
    assert model.blocks[0].attn is attn and attn.backend == "triton"


def _overlapping_patches():
    model = VisionTransformer(img_size=32, patch_size=16, depth=1, embed_dim=64, num_heads=2)
    model.patch_embed.proj.stride = (8, 8)
    return model


def _foreign_attention_in_second_block():
    model = VisionTransformer(img_size=32, patch_size=16, depth=2, embed_dim=64, num_heads=2)
    model.blocks[1].attn = torch.nn.MultiheadAttention(64, 2)
    return model


def _eva_with_abs_pos_in_attention_pool():
    model = timm.create_model("vit_pe_core_tiny_patch16_384", **TINY)
    model.attn_pool.pos_embed = torch.nn.Parameter(torch.zeros(model.patch_embed.num_patches + 1, 64))
    return model


TINY = {"img_size": 32, "depth": 1, "embed_dim": 64, "num_heads": 2}
UNSUPPORTED = {
    "relpos": (lambda: timm.create_model("vit_relpos_base_patch16_224", **TINY), "VisionTransformerRelPos"),
    "beit_relative_bias": (lambda: timm.create_model("beit_base_patch16_224", **TINY), "Beit"),
    "windowed_attention": (
        lambda: timm.create_model("samvit_base_patch16", **{**TINY, "window_size": 1, "global_attn_indexes": ()}),
        "VisionTransformerSAM",
    ),
    "hybrid_conv_stem": (lambda: timm.create_model("vit_small_r26_s32_224", **{**TINY, "img_size": 64}), "patch_embed"),
    "overlapping_patches": (_overlapping_patches, "patch_embed.proj"),
    "token_mixing_pool": (lambda: timm.create_model("vit_tiny_patch16_224", global_pool="prr", **TINY), "attn_pool"),
    "pool_position_embedding": (_eva_with_abs_pos_in_attention_pool, "attn_pool"),
    "eva_post_norm_block": (
        lambda: timm.create_model("eva02_tiny_patch14_224", use_post_norm=True, **{**TINY, "img_size": 28}),
        "blocks.0",
    ),
    "post_norm_block": (lambda: VisionTransformer(block_fn=ResPostBlock, **TINY), "blocks.0"),
    "parallel_block": (lambda: VisionTransformer(block_fn=ParallelScalingBlock, **TINY), "blocks.0"),
    "foreign_attention": (_foreign_attention_in_second_block, "blocks.1.attn"),
    "not_a_vit": (lambda: torch.nn.Linear(4, 4), "Linear"),
}


@pytest.mark.parametrize("case", UNSUPPORTED)
def test_unsupported_models_raise_naming_the_module(case):
    build, named = UNSUPPORTED[case]
    model = build()
    before = [type(m) for m in model.modules()]
    with pytest.raises(TypeError, match=named):
        sparsify(model)
    assert [type(m) for m in model.modules()] == before  # nothing converted


def test_forward_kept_gate_gradient_matches_dense_gated_attention():
    reference = _create("deit3_small_patch16_224")
    converted = sparsify(copy.deepcopy(reference), backend="torch")
    images, keep = _inputs(reference)
    gate = keep.float().requires_grad_()
    features = forward_kept(converted, images, keep, mode="masked", gate=gate)
    weights = torch.randn_like(features)
    (grad_gate,) = torch.autograd.grad((features * weights).sum(), gate)

    # Independent spec: every attention weighs key j by gate_j * exp(score), dense over all tokens.
    reference_gate = keep.float().requires_grad_()
    gate_full = torch.cat([torch.ones(keep.shape[0], reference.num_prefix_tokens), reference_gate], dim=1)

    def gated_attention(attn, x, attn_mask=None, is_causal=False):
        batch, seq_len, _ = x.shape
        q, k, v = attn.qkv(x).reshape(batch, seq_len, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        scores = (attn.q_norm(q) @ attn.k_norm(k).transpose(-1, -2)) * attn.scale
        weights = gate_full[:, None, None, :] * torch.exp(scores - scores.amax(-1, keepdim=True).detach())
        out = (weights / weights.sum(-1, keepdim=True)) @ v
        return attn.proj(attn.norm(out.transpose(1, 2).reshape(batch, seq_len, -1)))

    for block in reference.blocks:
        block.attn.forward = gated_attention.__get__(block.attn)
    expected = reference.forward_head(reference.forward_features(images), pre_logits=True)
    (expected_grad,) = torch.autograd.grad((expected * weights).sum(), reference_gate)
    torch.testing.assert_close(features, expected, **TOL)
    _assert_close_to_scale(grad_gate, expected_grad, "gate gradient")
    assert grad_gate[~keep].abs().sum() > 0


def test_packed_mode_refuses_a_gate_that_needs_its_gradient():
    model = _create("vit_tiny_patch16_224")
    sparsify(model, backend="torch")
    images, keep = _inputs(model)
    with pytest.raises(ValueError, match="gate"):
        forward_kept(model, images, keep, mode="packed", gate=keep.float().requires_grad_())
    torch.testing.assert_close(
        forward_kept(model, images, keep, mode="packed", gate=keep.float()),
        forward_kept(model, images, keep, mode="masked"),
        **TOL,
    )


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", ["vit_small_patch14_reg4_dinov2", "vit_small_patch16_dinov3"])
def test_return_tokens_equal_timm_at_kept_positions(name, mode):
    reference = _create(name)
    converted = sparsify(copy.deepcopy(reference), backend="torch")
    images, keep = _inputs(reference)
    keep_full = _full_mask(reference, keep)
    expected = reference.forward_features(images, attn_mask=keep_full[:, None, None, :])
    _, tokens = forward_kept(converted, images, keep, mode=mode, return_tokens=True)
    assert tokens.shape == expected.shape
    torch.testing.assert_close(tokens[keep_full], expected[keep_full], **TOL)
    assert not tokens[~keep_full].any()


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "vit_small_patch16_dinov3"])
def test_drop_path_drops_whole_images_in_both_modes(name):
    reference = _create(name, drop_path_rate=0.5)
    converted = sparsify(copy.deepcopy(reference), backend="torch").train()
    reference.train()
    images, keep = _inputs(reference, batch=4)
    seed = torch.seed()
    torch.manual_seed(seed)
    expected = _timm_features(reference, images, keep)
    for mode in MODES:
        torch.manual_seed(seed)  # the same per-image draws as timm's DropPath
        torch.testing.assert_close(forward_kept(converted, images, keep, mode=mode), expected, **TOL)


def test_bad_inputs_raise_clearly():
    model = _create("vit_tiny_patch16_224")
    images, keep = _inputs(model)
    with pytest.raises(TypeError, match="sparsify"):
        forward_kept(model, images, keep)
    sparsify(model, backend="torch")
    with pytest.raises(ValueError, match=r"keep: expected a bool tensor of shape \(2, 9\)"):
        forward_kept(model, images, keep[:, 1:])
    with pytest.raises(ValueError, match="keep"):
        forward_kept(model, images, keep.float())
    with pytest.raises(ValueError, match="mode"):
        forward_kept(model, images, keep, mode="dense")
    with pytest.raises(ValueError, match="gate"):
        forward_kept(model, images, keep, mode="masked", gate=keep.float()[:1])


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "vit_small_patch16_dinov3"])
def test_patch_dropout_in_training_is_refused(name):
    model = _create(name, patch_drop_rate=0.25)
    sparsify(model, backend="torch").train()
    images, keep = _inputs(model)
    with pytest.raises(NotImplementedError, match="patch_drop"):
        forward_kept(model, images, keep)
    model.eval()
    forward_kept(model, images, keep)


def _compile_case(name: str = "deit3_small_patch16_224"):
    torch._dynamo.reset()
    model = _create(name, depth=1)
    sparsify(model, backend="torch").eval()
    images, keep = _inputs(model)
    return model, images, keep


@pytest.mark.parametrize("name", ["deit3_small_patch16_224", "vit_small_patch16_dinov3"])
def test_forward_kept_masked_mode_compiles_fullgraph_for_training(name):
    """Masked mode has static shapes: one graph, forward and backward (gate included) as in eager mode. Packed mode
    sizes its rows from the keep mask (``nonzero``), a data-dependent shape, so it breaks the graph there and is not
    compiled here. The aot_eager backend checks capture and autograd tracing without minutes of C++ compilation on
    a cold CI cache; the inductor test below is marked slow."""
    model, images, keep = _compile_case(name)
    model.train()

    def step(run):
        model.zero_grad()
        gate = keep.float().requires_grad_()
        features = run(images, keep, gate)
        (features * torch.linspace(-1, 2, features.numel()).view_as(features)).sum().backward()
        return [features.detach(), gate.grad] + [p.grad for p in model.parameters()]

    def kept(x, k, g):
        return forward_kept(model, x, k, mode="masked", gate=g)

    eager = step(kept)
    compiled = step(torch.compile(kept, fullgraph=True, backend="aot_eager"))
    for got, expected in zip(compiled, eager, strict=True):
        _assert_close_to_scale(got, expected, "compiled vs eager", rel=1e-5)


def test_forward_kept_packed_mode_compiles_with_graph_breaks():
    """Packed mode on an Eva with rope and an attention pool, compiled (aot_eager; the row count is read on the
    host, so the graph breaks there): forward and parameter gradients equal eager mode."""
    model, images, keep = _compile_case("vit_pe_core_tiny_patch16_384")
    weights = torch.randn(images.shape[0], model.num_features)

    def step(run):
        model.zero_grad()
        features = run(images, keep)
        (features * weights).sum().backward()
        return [features.detach()] + [p.grad for p in model.parameters() if p.grad is not None]

    eager = step(lambda x, k: forward_kept(model, x, k, mode="packed"))
    compiled = step(torch.compile(lambda x, k: forward_kept(model, x, k, mode="packed"), backend="aot_eager"))
    assert len(compiled) == len(eager)
    for got, expected in zip(compiled, eager, strict=True):
        _assert_close_to_scale(got, expected, "compiled vs eager (packed)", rel=1e-5)


@pytest.mark.parametrize("name", ["deit3_small_patch16_224", "vit_small_patch16_dinov3"])
def test_converted_model_compiles_through_timm_forward(name):
    """timm's own forward_features with a key mask, compiled: our attention's kernel route inside timm's blocks."""
    model, images, keep = _compile_case(name)
    mask = _full_mask(model, keep)[:, None, None, :]
    with torch.no_grad():
        compiled = torch.compile(model.forward_features, fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(
            compiled(images, attn_mask=mask), model.forward_features(images, attn_mask=mask), **TOL
        )


@pytest.mark.slow
def test_forward_kept_compiles_with_inductor():
    """The default torch.compile backend (C++ code generation on CPU) on masked mode, inference."""
    model, images, keep = _compile_case()
    model.eval()
    with torch.no_grad():
        compiled = torch.compile(lambda x, k: forward_kept(model, x, k, mode="masked"), fullgraph=True)
        torch.testing.assert_close(compiled(images, keep), forward_kept(model, images, keep, mode="masked"), **TOL)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "vit_small_patch16_dinov3", "vit_small_patch16_rope_224-gqa"])
def test_forward_kept_triton_backend_matches_torch(name, mode):
    """One tiny case per family on the Triton kernels (interpreted on CPU): features and gradients equal the torch
    backend's."""
    model = _create(name, depth=1, img_size=32)
    images, keep = _inputs(model)
    weights = torch.randn(images.shape[0], model.num_features)
    results = []
    for backend in ("torch", "triton"):
        sparsify(model, backend=backend).zero_grad()
        features = forward_kept(model, images, keep, mode=mode)
        (features * weights).sum().backward()
        results.append((features, [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    (torch_features, torch_grads), (triton_features, triton_grads) = results
    torch.testing.assert_close(triton_features, torch_features, **TOL)
    for triton_grad, torch_grad in zip(triton_grads, torch_grads, strict=True):
        _assert_close_to_scale(triton_grad, torch_grad, f"{mode} triton gradient")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "name", ["vit_tiny_patch16_224-avg", "vit_small_patch16_dinov3", "vit_base_patch16_siglip_224"]
)
def test_pooled_features_ignore_dropped_patches_unlike_timm_forward_head(name, mode):
    """Average and attention pooling over the kept tokens only: new pixels in dropped patches leave the features
    unchanged, while timm's forward_head after the same masked forward_features (pooling every token) changes."""
    model = sparsify(_create(name), backend="torch")
    images, keep = _inputs(model)
    repainted = torch.where(_dropped_pixels(model, keep), torch.randn_like(images), images)
    torch.testing.assert_close(
        forward_kept(model, repainted, keep, mode=mode), forward_kept(model, images, keep, mode=mode), **TOL
    )
    mask = _full_mask(model, keep)[:, None, None, :]

    def timm_head(x):
        return model.forward_head(model.forward_features(x, attn_mask=mask), pre_logits=True)

    assert (timm_head(repainted) - timm_head(images)).abs().max() > 1e-3


def _dropped_pixels(model: torch.nn.Module, keep: torch.Tensor) -> torch.Tensor:
    (gh, gw), (ph, pw) = model.patch_embed.grid_size, model.patch_embed.patch_size
    grid = (~keep).view(-1, 1, gh, gw)
    return grid.repeat_interleave(ph, dim=2).repeat_interleave(pw, dim=3)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "name, backend",
    [
        ("vit_tiny_patch16_224", "torch"),
        ("vit_small_patch16_dinov3", "torch"),
        ("vit_base_patch16_siglip_224", "torch"),
        ("vit_small_patch16_dinov3-triton", "triton"),
    ],
)
def test_non_finite_dropped_pixels_give_the_clean_gradients_bitwise(name, backend, mode):
    """NaN and Inf pixels in dropped patches: features and every parameter gradient bitwise equal to the clean run's
    (the dropped patches' pixels are zeroed before the patch embedding, which does not overlap; the Triton case is
    one block at 32 px, interpreted on CPU)."""
    if backend == "triton":
        model = sparsify(_create(name.removesuffix("-triton"), depth=1, img_size=32), backend="triton")
    else:
        model = sparsify(_create(name), backend="torch")
    images, keep = _inputs(model)
    dropped = _dropped_pixels(model, keep)
    poison = torch.full_like(images, float("nan"))
    poison[..., ::2, :] = float("inf")
    poison[..., 1::4, :] = -float("inf")
    weights = torch.randn(images.shape[0], model.num_features)
    runs = []
    for x in (images, torch.where(dropped, poison, images)):
        model.zero_grad()
        features = forward_kept(model, x, keep, mode=mode)
        (features * weights).sum().backward()
        runs.append([features.detach()] + [p.grad.clone() for p in model.parameters() if p.grad is not None])
    clean, poisoned = runs
    assert len(clean) == len(poisoned)
    for index, (got, expected) in enumerate(zip(poisoned, clean, strict=True)):
        assert torch.isfinite(got).all(), f"entry {index} not finite"
        assert torch.equal(got, expected), f"entry {index}: max difference {(got - expected).abs().max().item():.3g}"


def test_non_finite_dropped_pixels_with_a_gate_give_finite_gradients():
    """With a gradient-carrying gate (masked mode) dropped rows are computed; their non-finite pixels are zeroed, so
    the parameter and gate gradients stay finite, and the features equal the clean run's."""
    model = sparsify(_create("vit_small_patch16_dinov3"), backend="torch")
    images, keep = _inputs(model)
    poisoned = torch.where(_dropped_pixels(model, keep), float("nan"), images)
    gate = keep.float().requires_grad_()
    features = forward_kept(model, poisoned, keep, mode="masked", gate=gate)
    torch.testing.assert_close(features, forward_kept(model, images, keep, mode="masked"), **TOL)
    features.square().sum().backward()
    assert torch.isfinite(gate.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("mode", MODES)
def test_images_without_any_token_pool_to_the_empty_attention_output(mode):
    """SigLIP has no prefix token: an image with no kept patch has nothing to attend to in any block or in the pool
    (timm's SDPA gives NaN). Ours gives the pool's output for a zero attention result, the same in both modes."""
    model = sparsify(_create("vit_base_patch16_siglip_224"), backend="torch")
    images, keep = _inputs(model)
    keep[-1] = False
    features = forward_kept(model, images, keep, mode=mode)
    pool = model.attn_pool
    empty = pool.proj(torch.zeros(1, pool.latent_len, model.num_features))
    empty = (empty + pool.mlp(pool.norm(empty)))[:, 0]
    torch.testing.assert_close(features[-1:], model.fc_norm(empty), **TOL)
    expected_rest = _timm_features(model, images[:-1], keep[:-1])
    torch.testing.assert_close(features[:-1], expected_rest, **TOL)
