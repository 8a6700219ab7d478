"""torch.compile with dynamic shapes: one compiled graph serves every sequence length and kept fraction.

On CUDA, ``masked_attention`` and ``varlen_attention`` run inside the ``faithful_vit::*_attention_fwd/_bwd``
``triton_op``s. Tracing (here with the ``aot_eager`` backend, which traces as Inductor does but runs the graph
eagerly) runs the launchers' host code on symbolic sizes, and every constexpr a launch receives is specialised to a
plain value (``torch.library.wrap_triton`` guards on it). A constexpr computed from N therefore pins the graph to that
N and the next length recompiles. These tests trace the same ops on CPU tensors: the kernels are never launched (the
launch recorder stands in for them and specialises constexprs as ``wrap_triton`` does), so only the host code runs,
which is what decides the guards. On the CPU the families' autograd Functions call the launchers directly instead of
the ops (Inductor cannot compile a ``triton_op`` for the CPU), so the tests put them on the ops as the CUDA route does.
"""

import sys

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import faithful_vit.kernels  # noqa: F401
from faithful_vit.kernels._attention_core import OPS_AVAILABLE
from faithful_vit.kernels._launch_record import LaunchRecorder

masked = sys.modules["faithful_vit.kernels.masked_attention"]
varlen = sys.modules["faithful_vit.kernels.varlen_attention"]

LENGTHS = (197, 261, 577, 1374)  # ViT-B/16@224, B/14@224 + 4 registers, B/16@384, B/14@518 + 4 registers
KEPT = (0.3, 0.8)
HEADS, HEAD_DIM, BATCH = 2, 16, 2

pytestmark = pytest.mark.skipif(not OPS_AVAILABLE, reason="no triton_op")


@pytest.fixture
def on_registered_ops(monkeypatch):
    """The autograd Functions on the registered ops, as while torch.compile traces them on CUDA."""
    for module in (masked, varlen):
        monkeypatch.setattr(module, "uses_registered_ops", lambda q: True)


def _compile(fn, fullgraph: bool = True):
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    return torch.compile(fn, backend=counter, dynamic=True, fullgraph=fullgraph), counter


@pytest.mark.parametrize("skip_dropped_queries", [True, False])
def test_masked_attention_op_compiles_once_for_every_length_and_kept_fraction(on_registered_ops, skip_dropped_queries):
    def attend(qkv, keep):
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # timm's projection layout
        return masked.MaskedAttentionFunction.apply(q, k, v, keep, None, 0.25, skip_dropped_queries, True)

    compiled, counter = _compile(attend)
    with LaunchRecorder():
        for seq_len in LENGTHS:
            for kept in KEPT:
                qkv = torch.randn(BATCH, seq_len, 3, HEADS, HEAD_DIM, requires_grad=True)
                keep = torch.rand(BATCH, seq_len) < kept
                out = compiled(qkv, keep)
                (grad,) = torch.autograd.grad(out, qkv, torch.ones_like(out))  # traces the backward op too
                assert out.shape == (BATCH, HEADS, seq_len, HEAD_DIM) and grad.shape == qkv.shape
    assert counter.frame_count == 1, f"compiled {counter.frame_count} times for N in {LENGTHS}"


def test_varlen_attention_op_compiles_once_for_every_length_and_kept_fraction(on_registered_ops):
    def attend(qkv, cu_seqlens, max_seqlen: int):
        q, k, v = qkv.unbind(1)  # rows of a packed projection
        return varlen.VarlenAttentionFunction.apply(q, k, v, cu_seqlens, max_seqlen, 0.25, True)

    compiled, counter = _compile(attend)
    with LaunchRecorder():
        for seq_len in LENGTHS:
            for kept in KEPT:
                lengths = (torch.rand(BATCH, seq_len) < kept).sum(1)
                cu_seqlens = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
                qkv = torch.randn(int(cu_seqlens[-1]), 3, HEADS, HEAD_DIM, requires_grad=True)
                out = compiled(qkv, cu_seqlens, seq_len)  # the packed model's bound: max_seqlen = N
                (grad,) = torch.autograd.grad(out, qkv, torch.ones_like(out))
                assert out.shape == (qkv.shape[0], HEADS, HEAD_DIM) and grad.shape == qkv.shape
    assert counter.frame_count == 1, f"compiled {counter.frame_count} times for max_seqlen in {LENGTHS}"


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["masked", "packed"])
def test_sparsified_vit_compiles_once_for_every_image_size_and_kept_fraction(mode):
    """The model around the kernels (embedding, mask, compaction or packing, blocks, pooling) under dynamic shapes, on
    the CPU path torch.compile takes (the reference attention: compiled Triton kernels need CUDA, and the launchers'
    host code is what the op tests above trace)."""
    import timm

    from faithful_vit import forward_kept, sparsify

    model = timm.create_model(
        "vit_base_patch16_224",
        pretrained=False,
        num_classes=0,
        img_size=64,
        pos_embed="none",  # a learned position table would be resampled per size (timm specialises on it)
        dynamic_img_size=True,
        embed_dim=32,
        depth=2,
        num_heads=2,
        mlp_ratio=1.0,
    )
    model = sparsify(model, backend="torch").eval()
    # timm's patch embedding formats the image height into an assertion message, which specialises it; without an
    # img_size the (shape-independent) check is skipped.
    model.patch_embed.img_size = None
    # Graph breaks are allowed (packing reads the kept count on the host); new frames after the first call are not.
    compiled, counter = _compile(lambda x, keep: forward_kept(model, x, keep, mode), fullgraph=False)
    frames = []
    with torch.no_grad():
        for side in (64, 80, 96, 128):  # N = 17, 26, 37, 65 tokens
            grid = side // 16
            for kept in KEPT:
                keep = torch.rand(1, grid * grid) < kept
                keep[:, 0] = True
                features = compiled(torch.randn(1, 3, side, side), keep)
                assert features.shape == (1, 32)
                frames.append(counter.frame_count)
    assert frames[0] >= 1
    assert frames[-1] == frames[0], f"frames compiled after each call: {frames}"
