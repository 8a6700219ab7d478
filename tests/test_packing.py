"""pack_tokens / PackedTokens: round trips, gradients both ways, order, empty images and batches, bad input."""

import pytest
import torch

from faithful_vit.kernels import PackedTokens, pack_tokens, reference

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _keep(batch, seq_len, fraction=0.5, device="cpu"):
    return torch.rand(batch, seq_len, device=device) < fraction


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("max_seqlen", [None, "N"])
def test_pack_matches_reference_and_round_trips(device, max_seqlen):
    x = torch.randn(3, 11, 5, device=device)
    keep = _keep(3, 11, device=device)
    keep[1] = False  # an empty image in the middle
    keep[2, -1] = True
    packed = pack_tokens(x, keep, max_seqlen=11 if max_seqlen == "N" else None)
    data_ref, cu_ref = reference.pack_tokens_ref(x, keep)
    assert torch.equal(packed.data, data_ref)
    assert packed.cu_seqlens.dtype == torch.int32 and torch.equal(packed.cu_seqlens, cu_ref)
    assert torch.equal(packed.seqlens, keep.sum(1).to(torch.int32))
    assert packed.max_seqlen == (11 if max_seqlen == "N" else int(keep.sum(1).max()))
    assert (packed.batch_size, packed.seq_len) == (3, 11)
    assert torch.equal(packed.index, torch.nonzero(keep.reshape(-1)).squeeze(1))
    for fill in (0.0, -3.5):
        assert torch.equal(packed.unpack(fill), reference.unpack_tokens_ref(packed.data, keep, fill))
    assert torch.equal(packed.unpack()[keep], x[keep])


def test_order_within_each_image_is_preserved():
    # Tokens carry their own position, so the packed rows must read 0..N-1 in increasing order per image.
    batch, seq_len = 4, 17
    x = torch.arange(seq_len, dtype=torch.float32).expand(batch, seq_len)[..., None].clone()
    keep = _keep(batch, seq_len, 0.6)
    packed = pack_tokens(x, keep)
    bounds = packed.cu_seqlens.tolist()
    for b, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        rows = packed.data[start:end, 0]
        assert torch.equal(rows, torch.nonzero(keep[b]).squeeze(1).float())


def test_gradients_flow_both_ways():
    x = torch.randn(2, 9, 4, dtype=torch.float64, requires_grad=True)
    keep = _keep(2, 9)
    keep[0, 0] = True
    packed = pack_tokens(x, keep)
    weight = torch.randn_like(packed.data)
    (packed.data * weight).sum().backward()
    expected = torch.zeros_like(x)
    expected[keep] = weight
    assert torch.equal(x.grad, expected)  # dropped tokens get exactly zero gradient

    data = packed.data.detach().requires_grad_()
    unpacked = packed.with_data(data).unpack(fill=7.0)
    upstream = torch.randn_like(unpacked)
    (unpacked * upstream).sum().backward()
    assert torch.equal(data.grad, upstream[keep])

    # Round trip x -> pack -> unpack is the identity on kept tokens, and its gradient is the keep mask.
    x.grad = None
    pack_tokens(x, keep).unpack().sum().backward()
    assert torch.equal(x.grad, keep[..., None].to(x.dtype).expand_as(x))
    assert torch.autograd.gradcheck(lambda t: pack_tokens(t, keep).unpack(fill=1.0), (x.detach().requires_grad_(),))


def test_strided_input():
    base = torch.randn(5, 2, 8, 3)
    x = base[:, 1].permute(1, 0, 2)  # (8, 5, 3), non-contiguous
    assert not x.is_contiguous()
    keep = _keep(8, 5)
    packed = pack_tokens(x, keep)
    assert torch.equal(packed.data, x[keep])


def test_all_dropped_and_empty_batches():
    x = torch.randn(3, 6, 4, requires_grad=True)
    packed = pack_tokens(x, torch.zeros(3, 6, dtype=torch.bool))
    assert packed.data.shape == (0, 4) and packed.max_seqlen == 0
    assert packed.cu_seqlens.tolist() == [0, 0, 0, 0]
    assert torch.equal(packed.unpack(fill=2.0), torch.full((3, 6, 4), 2.0))
    packed.unpack().sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))

    empty = pack_tokens(torch.randn(0, 6, 4), torch.zeros(0, 6, dtype=torch.bool), max_seqlen=6)
    assert empty.data.shape == (0, 4) and empty.cu_seqlens.tolist() == [0] and empty.max_seqlen == 6
    assert empty.unpack().shape == (0, 6, 4)


def test_all_kept():
    x = torch.randn(2, 7, 3)
    packed = pack_tokens(x, torch.ones(2, 7, dtype=torch.bool))
    assert torch.equal(packed.data, x.reshape(14, 3)) and packed.cu_seqlens.tolist() == [0, 7, 14]


def test_with_data_keeps_layout():
    packed = pack_tokens(torch.randn(2, 5, 3), _keep(2, 5, 0.7))
    wider = torch.randn(packed.data.shape[0], 8)
    other = packed.with_data(wider)
    assert isinstance(other, PackedTokens) and other.data is wider
    assert other.cu_seqlens is packed.cu_seqlens and other.index is packed.index
    assert other.unpack().shape == (2, 5, 8)
    with pytest.raises(ValueError, match="data"):
        packed.with_data(torch.randn(packed.data.shape[0] + 1, 3))
    with pytest.raises(ValueError, match="data"):
        packed.with_data(torch.randn(packed.data.shape[0], 3, 1))


@pytest.mark.parametrize(
    ("x", "keep", "kwargs", "error", "match"),
    [
        (torch.randn(2, 5), torch.ones(2, 5, dtype=torch.bool), {}, ValueError, r"x: expected a 3-d"),
        (torch.randn(2, 5, 3), torch.ones(2, 5), {}, TypeError, r"keep: expected dtype"),
        (torch.randn(2, 5, 3), torch.ones(2, 4, dtype=torch.bool), {}, ValueError, r"keep: expected shape \(2, 5\)"),
        (torch.randn(2, 5, 3), torch.ones(2, 5, 1, dtype=torch.bool), {}, ValueError, r"keep: expected a 2-d"),
        ("x", torch.ones(2, 5, dtype=torch.bool), {}, TypeError, r"x: expected a torch.Tensor"),
        (torch.randn(2, 5, 3), torch.ones(2, 5, dtype=torch.bool), {"max_seqlen": -1}, ValueError, "max_seqlen"),
        (torch.randn(2, 5, 3), torch.ones(2, 5, dtype=torch.bool), {"max_seqlen": 2.0}, ValueError, "max_seqlen"),
        (
            torch.randn(2, 5, 3),
            torch.ones(2, 5, dtype=torch.bool),
            {"max_seqlen": 4},
            ValueError,
            r"max_seqlen: expected an upper bound .*>= 5",
        ),
    ],
)
def test_bad_input_names_the_argument(x, keep, kwargs, error, match):
    with pytest.raises(error, match=match):
        pack_tokens(x, keep, **kwargs)
