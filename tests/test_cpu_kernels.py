"""The compiled float32 CPU kernels (nsa.ops.cpu_kernels) against the pure-PyTorch path of the torch backend and
the reference: random inputs, odd shapes, every G, Dk != Dv, invalid / repeated / future block indices, partial last
blocks, shift-free and max-shifted softmax, NaN propagation. Skipped where the kernels cannot be built."""
import pytest
import torch

import nsa
from nsa.ops import cpu_kernels
from nsa.ops import torch_backend as tb
from tests.kit import assert_close, make_inputs, small_config

KERNELS = cpu_kernels.load()
pytestmark = pytest.mark.skipif(KERNELS is None, reason="fused CPU kernels not built here (no C++ compiler?)")
TOL32 = dict(atol=2e-6, rtol=1e-5)


def _inputs(L, HKV, G, Dk, Dv, t0, C, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(L * HKV, Dk, generator=g) * scale
    v = torch.randn(L * HKV, Dv, generator=g)
    qs = torch.randn(L, HKV * G, Dk, generator=g) * scale
    qflat = tb._scaled_q(qs, t0, t0 + C, HKV, Dk ** -0.5, torch.float32)
    return qflat, k, v, g


@pytest.mark.parametrize("G", [1, 2, 3, 16])
@pytest.mark.parametrize("shift_free", [True, False])
@pytest.mark.parametrize("L,t0,C", [(100, 0, 100), (150, 37, 90), (64, 63, 1)])
def test_selected_kernel_matches_torch_path(G, shift_free, L, t0, C):
    HKV, Dk, Dv, lp, n = 2, 8, 6, 16, 5
    qflat, k, v, g = _inputs(L, HKV, G, Dk, Dv, t0, C, seed=G + L)
    own = (torch.arange(t0, t0 + C) // lp)[:, None, None]
    idx = (torch.rand(C, HKV, n, generator=g) * (own + 3)).long() - 1  # -1, valid, repeated and future blocks
    idx[..., 0] = own[..., 0]  # every row has its own (partially causal) block
    plan = tb._SlcPlan(idx, t0, lp, L)
    o_ref, lse_ref = tb._slc_forward_chunk(qflat, k, v, plan, G, Dv, shift_free)
    o, lse = KERNELS.slc_fwd(qflat, k, v, idx.contiguous(), t0, lp, G, shift_free)
    assert_close(o, o_ref, **TOL32, name="o")
    assert_close(lse, lse_ref, **TOL32, name="lse")


def test_selected_kernel_rows_without_blocks():
    """A query with no valid block gets o = 0 and lse = -inf, like the torch path."""
    L, HKV, G, Dk, Dv, lp = 40, 1, 2, 8, 8, 16
    qflat, k, v, _ = _inputs(L, HKV, G, Dk, Dv, 0, L, seed=1)
    idx = torch.full((L, HKV, 3), -1, dtype=torch.long)
    idx[::2, :, 0] = 0
    o, lse = KERNELS.slc_fwd(qflat, k, v, idx, 0, lp, G, False)
    assert torch.all(o[1::2] == 0) and torch.all(torch.isneginf(lse[1::2]))
    o_ref, lse_ref = tb._slc_forward_chunk(qflat, k, v, tb._SlcPlan(idx, 0, lp, L), G, Dv, False)
    assert_close(o, o_ref, **TOL32, name="o")
    assert_close(lse, lse_ref, **TOL32, name="lse")


@pytest.mark.parametrize("G", [1, 3, 16])
@pytest.mark.parametrize("shift_free", [True, False])
@pytest.mark.parametrize("L,t0,C,w", [(200, 0, 200, 33), (300, 71, 150, 512), (90, 0, 90, 1), (129, 128, 1, 64)])
def test_window_kernel_matches_torch_path(G, shift_free, L, t0, C, w):
    HKV, Dk, Dv = 2, 8, 12
    qflat, k, v, _ = _inputs(L, HKV, G, Dk, Dv, t0, C, seed=G + w)
    plan = tb._WinPlan(w, L, C, "cpu", torch.float32)
    o_ref, lse_ref = tb._win_forward_chunk(qflat, k.view(L, HKV, Dk), v.view(L, HKV, Dv), t0, C, plan, G, shift_free)
    o, lse = KERNELS.win_fwd(qflat, k, v, C, HKV, t0, w, G, shift_free)
    assert_close(o, o_ref, **TOL32, name="o")
    assert_close(lse, lse_ref, **TOL32, name="lse")


def test_large_scores_need_the_max_shift():
    """Scores far beyond exp's range: the max-shifted kernels stay finite and match the torch path."""
    L, HKV, G, Dk, Dv, lp = 80, 1, 4, 16, 16, 16
    qflat, k, v, g = _inputs(L, HKV, G, Dk, Dv, 0, L, seed=5, scale=30.0)
    idx = torch.stack([torch.zeros(L, dtype=torch.long), torch.arange(L) // lp], -1)[:, None, :].contiguous()
    o, lse = KERNELS.slc_fwd(qflat, k, v, idx, 0, lp, G, False)
    o_ref, lse_ref = tb._slc_forward_chunk(qflat, k, v, tb._SlcPlan(idx, 0, lp, L), G, Dv, False)
    assert torch.isfinite(o).all() and lse.abs().max() > 100
    assert_close(o, o_ref, atol=1e-5, rtol=1e-4, name="o")
    o, lse = KERNELS.win_fwd(qflat, k, v, L, HKV, 0, 24, G, False)
    plan = tb._WinPlan(24, L, L, "cpu", torch.float32)
    o_ref, _ = tb._win_forward_chunk(qflat, k.view(L, HKV, Dk), v.view(L, HKV, Dv), 0, L, plan, G, False)
    assert_close(o, o_ref, atol=1e-5, rtol=1e-4, name="o")


@pytest.mark.parametrize("G", [1, 4])
def test_composed_op_fused_equals_pure_torch_and_reference(G, monkeypatch):
    """The composed op with the fused kernels against the pure-PyTorch path (fp32) and the float64 reference,
    with chunk boundaries inside the sequence and a varlen batch."""
    cfg = small_config()
    HKV = 2
    cu = torch.tensor([0, 70, 71, 200])
    x = make_inputs(1, 200, HKV * G, HKV, 8, 6, cfg, cu_seqlens=cu, seed=G)
    x32 = [t.float() for t in x]
    monkeypatch.setattr(tb, "CHUNK_SIZE", 48)
    fused = nsa.native_sparse_attention(*x32, config=cfg, cu_seqlens=cu, backend="torch")
    monkeypatch.setattr(tb, "USE_FUSED_CPU", False)
    pure = nsa.native_sparse_attention(*x32, config=cfg, cu_seqlens=cu, backend="torch")
    ref = nsa.native_sparse_attention(*x, config=cfg, cu_seqlens=cu, backend="reference")
    assert_close(fused, pure, **TOL32, name="fused vs pure")
    assert_close(fused, ref, **TOL32, name="fused vs reference")


def test_nan_in_a_query_stays_in_its_row():
    """A NaN query gives NaN in its own output row only, in the same positions as the pure-PyTorch path."""
    cfg = small_config()
    x = [t.float() for t in make_inputs(1, 60, 4, 2, 8, 8, cfg, seed=3)]
    x[0][0, 41, 1, 3] = float("nan")
    fused = nsa.native_sparse_attention(*x, config=cfg, backend="torch")
    tb.USE_FUSED_CPU = False
    try:
        pure = nsa.native_sparse_attention(*x, config=cfg, backend="torch")
    finally:
        tb.USE_FUSED_CPU = True
    assert torch.isnan(fused[0, 41]).any() and not torch.isnan(fused[0, :41]).any()
    assert_close(fused, pure, **TOL32, name="nan row")
