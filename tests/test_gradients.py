"""float64 gradcheck of every branch and of the composed op (fixed indices), per backend."""
import pytest
import torch

import nsa
from tests.kit import CPU_BACKENDS, make_inputs, small_config

CFG = small_config()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gradcheck_compressed_attention(backend):
    q, k_cmp, v_cmp, *_ = make_inputs(1, 23, 4, 2, 4, 3, CFG, requires_grad=True)

    def fn(q, k, v):
        o, lse = nsa.compressed_attention(q, k, v, block_size=8, stride=4, backend=backend)
        return o, lse.masked_fill(torch.isinf(lse), 0.0)

    assert torch.autograd.gradcheck(fn, (q, k_cmp, v_cmp))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gradcheck_selected_attention(backend):
    q, _, _, k, v, *_ = make_inputs(1, 37, 4, 2, 4, 3, CFG, requires_grad=True)
    idx = nsa.select_blocks(q.detach(), torch.randn(1, 8, 2, 4, dtype=torch.float64), config=CFG)
    idx[0, 30, 1, -1] = -1  # an ignored slot
    assert torch.autograd.gradcheck(
        lambda q, k, v: nsa.selected_attention(q, k, v, idx, block_size=16, backend=backend), (q, k, v)
    )


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gradcheck_sliding_window(backend):
    q, _, _, _, _, k, v, _ = make_inputs(2, 21, 3, 1, 4, 5, CFG, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda q, k, v: nsa.sliding_window_attention(q, k, v, window=6, backend=backend), (q, k, v)
    )


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("varlen", [False, True])
def test_gradcheck_composed(backend, varlen):
    cu = torch.tensor([0, 13, 40], dtype=torch.int32) if varlen else None
    inputs = make_inputs(1, 40, 4, 2, 4, 3, CFG, cu_seqlens=cu, requires_grad=True)
    idx = nsa.select_blocks(inputs[0].detach(), inputs[1].detach(), config=CFG, cu_seqlens=cu)
    assert torch.autograd.gradcheck(
        lambda *x: nsa.native_sparse_attention(*x, config=CFG, cu_seqlens=cu, block_indices=idx, backend=backend),
        inputs,
    )


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_selection_passes_no_gradient_but_cmp_branch_does(backend):
    """k_cmp gets gradient only through the cmp output: with g_cmp = 0 its gradient is exactly zero."""
    inputs = make_inputs(1, 48, 4, 2, 4, 4, CFG, requires_grad=True)
    gates = inputs[7].detach().clone()
    gates[..., 0] = 0.0
    o = nsa.native_sparse_attention(*inputs[:7], gates, config=CFG, backend=backend)
    o.square().sum().backward()
    assert torch.count_nonzero(inputs[1].grad) == 0 and torch.count_nonzero(inputs[2].grad) == 0
    for x in (inputs[0], inputs[3], inputs[4], inputs[5], inputs[6]):
        assert torch.count_nonzero(x.grad) > 0
