"""nsa.unpad_input / pad_input / cu_seqlens_from_position_ids: padded batches and HF-style packing into nsa's
cu_seqlens convention. A left- or right-padded batch through the layer, unpadded, equals each row alone."""
import pytest
import torch

import nsa
from tests.kit import assert_close, small_config


def test_unpad_pad_round_trip_and_layout():
    x = torch.randn(3, 7, 5, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0, 0], [0, 0, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0, 0]])
    packed, indices, cu, max_len = nsa.unpad_input(x, mask)
    assert packed.shape == (1, 8, 5) and cu.tolist() == [0, 3, 8, 8] and cu.dtype == torch.int32 and max_len == 5
    assert torch.equal(packed[0, 3:], x[1, 2:])
    back = nsa.pad_input(packed, indices, 3, 7)
    assert torch.equal(back, x * mask[..., None])
    (g,) = torch.autograd.grad(back.sum(), x)
    assert torch.equal(g, mask[..., None].double().expand_as(x))
    with pytest.raises(ValueError, match="attention_mask"):
        nsa.unpad_input(x, mask[0])
    with pytest.raises(ValueError, match="x must be"):
        nsa.unpad_input(x[:2], mask)
    with pytest.raises(ValueError, match="x_packed"):
        nsa.pad_input(packed[0], indices, 3, 7)
    with pytest.raises(ValueError, match="indices"):
        nsa.pad_input(packed, indices, 1, 7)
    assert torch.equal(nsa.pad_input(packed, indices.int(), 3, 7), back)  # int32 indices too
    with pytest.raises(ValueError, match="NaN"):
        nsa.unpad_input(x, torch.full((3, 7), float("nan")))


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_through_the_layer_equals_each_row(side):
    layer = nsa.NativeSparseAttention(32, 4, 2, 8, config=small_config(), backend="reference").double()
    lengths, T = [19, 6, 26], 26
    x = torch.randn(3, T, 32, dtype=torch.float64)
    ar = torch.arange(T)
    mask = torch.stack([(ar >= T - n) if side == "left" else (ar < n) for n in lengths])
    packed, indices, cu, _ = nsa.unpad_input(x, mask)
    y = nsa.pad_input(layer(packed, cu_seqlens=cu), indices, 3, T)
    for b, n in enumerate(lengths):
        rows = mask[b]
        assert_close(y[b, rows], layer(x[b:b + 1, rows])[0], atol=1e-12, rtol=1e-12, name=f"row {b}")
        assert not y[b, ~rows].any()


def test_cu_seqlens_from_position_ids():
    pos = torch.cat([torch.arange(37), torch.arange(63), torch.arange(1)])
    cu = nsa.cu_seqlens_from_position_ids(pos[None])
    assert cu.tolist() == [0, 37, 100, 101] and cu.dtype == torch.int32
    layer = nsa.NativeSparseAttention(32, 4, 2, 8, config=small_config(), backend="reference").double()
    x = torch.randn(1, 101, 32, dtype=torch.float64)
    # the positions alone only rotate: boundaries need cu_seqlens (spec §9)
    assert_close(layer(x, cu_seqlens=cu)[:, 37:100], layer(x[:, 37:100]), atol=1e-12, rtol=1e-12, name="seq 2")
    for bad in (torch.arange(1, 5), torch.tensor([0, 1, 3, 0]), torch.arange(4.0), torch.zeros(2, 3, dtype=torch.long),
                torch.tensor([False, True, False])):
        with pytest.raises(ValueError, match="position_ids"):
            nsa.cu_seqlens_from_position_ids(bad)
