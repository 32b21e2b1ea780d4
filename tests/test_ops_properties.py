"""Properties every backend must have: brute-force agreement, causality, dense equivalences, GQA, varlen, shapes."""
import math

import pytest
import torch

import nsa
from nsa.ops import reference as ref
from tests.kit import CPU_BACKENDS, assert_close, brute_force_attention, make_inputs, sdpa_causal, small_config

CFG = small_config()
TOL64 = dict(atol=1e-10, rtol=1e-10)


def nsa_call(inputs, backend, config=CFG, **kw):
    return nsa.native_sparse_attention(*inputs, config=config, backend=backend, **kw)


# ------------------------------------------------------------------------------------------ brute-force oracles
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("T", [1, 7, 8, 9, 37])
def test_compressed_attention_matches_per_query_loop(backend, T):
    q, k_cmp, v_cmp, *_ = make_inputs(1, T, 4, 2, 8, 6, CFG)
    o, lse = nsa.compressed_attention(q, k_cmp, v_cmp, block_size=8, stride=4, backend=backend)
    scale = 8 ** -0.5
    for t in range(T):
        visible = [i for i in range(k_cmp.shape[1]) if i * 4 + 8 - 1 <= t]
        for h in range(4):
            o_bf, lse_bf = brute_force_attention(q[0, t, h], k_cmp[0, visible, h // 2], v_cmp[0, visible, h // 2], scale)
            assert_close(o[0, t, h], o_bf, **TOL64, name=f"o[t={t},h={h}]")
            if visible:
                assert abs(lse[0, t, h].item() - lse_bf) < 1e-10
            else:
                assert lse[0, t, h].item() == -math.inf
    assert not torch.isnan(o).any()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_window_and_selection_match_per_query_loop(backend):
    T, HQ, HKV = 45, 6, 2
    q, _, _, k, v, *_ = make_inputs(1, T, HQ, HKV, 8, 5, CFG, seed=3)
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(-1, math.ceil(T / 16), (1, T, HKV, 3), generator=g)
    o_win = nsa.sliding_window_attention(q, k, v, window=10, backend=backend)
    o_slc = nsa.selected_attention(q, k, v, idx, block_size=16, backend=backend)
    scale = 8 ** -0.5
    for t in range(T):
        for h in range(HQ):
            kv = h // (HQ // HKV)
            win = list(range(max(0, t - 9), t + 1))
            o_bf, _ = brute_force_attention(q[0, t, h], k[0, win, kv], v[0, win, kv], scale)
            assert_close(o_win[0, t, h], o_bf, **TOL64, name="win")
            blocks = {int(j) for j in idx[0, t, kv] if j >= 0}
            keys = [s for s in range(t + 1) if s // 16 in blocks]
            o_bf, _ = brute_force_attention(q[0, t, h], k[0, keys, kv], v[0, keys, kv], scale)
            assert_close(o_slc[0, t, h], o_bf, **TOL64, name="slc")


# ------------------------------------------------------------------------------------------ causality
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("cut", [5, 16, 33])
def test_causality_every_branch(backend, cut):
    """Changing every token after `cut` leaves all outputs at positions <= cut bit-identical."""
    T = 50
    a = make_inputs(1, T, 4, 2, 8, 8, CFG, seed=1)
    b = [x.clone() for x in a]
    Tc_keep = sum(1 for i in range(a[1].shape[1]) if i * 4 + 7 <= cut)  # compressed tokens visible to <= cut
    b[1][:, Tc_keep:] = torch.randn_like(b[1][:, Tc_keep:])
    b[2][:, Tc_keep:] = torch.randn_like(b[2][:, Tc_keep:])
    for i in (0, 3, 4, 5, 6, 7):
        b[i][:, cut + 1:] = torch.randn_like(b[i][:, cut + 1:])
    o_a, o_b = nsa_call(a, backend), nsa_call(b, backend)
    assert torch.equal(o_a[:, : cut + 1], o_b[:, : cut + 1])
    assert not torch.equal(o_a[:, cut + 1:], o_b[:, cut + 1:])
    ia = nsa.select_blocks(a[0], a[1], config=CFG, backend=backend)
    ib = nsa.select_blocks(b[0], b[1], config=CFG, backend=backend)
    assert torch.equal(ia[:, : cut + 1], ib[:, : cut + 1])
    for fn in (lambda x: nsa.compressed_attention(x[0], x[1], x[2], block_size=8, stride=4, backend=backend)[0],
               lambda x: nsa.sliding_window_attention(x[0], x[5], x[6], window=16, backend=backend),
               lambda x: nsa.selected_attention(x[0], x[3], x[4], ia, block_size=16, backend=backend)):
        assert torch.equal(fn(a)[:, : cut + 1], fn(b)[:, : cut + 1])


# ------------------------------------------------------------------------------------------ dense equivalences
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("T", [1, 30, 64])
def test_selection_covering_everything_equals_dense(backend, T):
    cfg = small_config(num_selected=4)  # n*l' = 64 >= T
    q, k_cmp, v_cmp, k, v, kw, vw, gates = make_inputs(2, T, 6, 2, 8, 8, cfg, seed=2)
    gates = torch.zeros_like(gates)
    gates[..., 1] = 1.0
    o = nsa_call((q, k_cmp, v_cmp, k, v, kw, vw, gates), backend, config=cfg)
    assert_close(o, sdpa_causal(q, k, v), **TOL64, name="slc-only NSA vs SDPA")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_window_covering_everything_equals_dense(backend):
    q, k_cmp, v_cmp, ks, vs, k, v, gates = make_inputs(2, 40, 4, 4, 8, 8, CFG, seed=4)
    gates = torch.zeros_like(gates)
    gates[..., 2] = 1.0
    o = nsa_call((q, k_cmp, v_cmp, ks, vs, k, v, gates), backend, config=small_config(window_size=40))
    assert_close(o, sdpa_causal(q, k, v), **TOL64, name="win-only NSA vs SDPA")
    o = nsa.sliding_window_attention(q, k, v, window=1000, backend=backend)
    assert_close(o, sdpa_causal(q, k, v), **TOL64, name="window >= T")


# ------------------------------------------------------------------------------------------ shapes and varlen
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("T,HQ,HKV,Dk,Dv", [(1, 3, 1, 8, 8), (5, 3, 3, 8, 4), (7, 16, 1, 6, 10), (53, 6, 2, 8, 12),
                                           (100, 16, 1, 4, 4)])
def test_odd_shapes_and_groups(backend, T, HQ, HKV, Dk, Dv):
    inputs = make_inputs(2, T, HQ, HKV, Dk, Dv, CFG, seed=T)
    o = nsa_call(inputs, backend)
    assert o.shape == (2, T, HQ, Dv) and torch.isfinite(o).all()
    assert_close(o, nsa_call(inputs, "reference"), **TOL64, name="vs reference")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("lengths", [[1, 40, 7], [16, 16], [3], [70, 0, 33]])
def test_varlen_equals_per_sequence(backend, lengths):
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    T = int(cu[-1])
    packed = make_inputs(1, T, 6, 2, 8, 6, CFG, cu_seqlens=cu, seed=5)
    o = nsa_call(packed, backend, cu_seqlens=cu)
    idx = nsa.select_blocks(packed[0], packed[1], config=CFG, cu_seqlens=cu, backend=backend)
    ccu = nsa.ops.varlen.compressed_cu_seqlens(cu, 8, 4)
    for n in range(len(lengths)):
        s, e, cs, ce = int(cu[n]), int(cu[n + 1]), int(ccu[n]), int(ccu[n + 1])
        if e == s:
            continue
        one = [x[:, s:e] for x in packed]
        one[1], one[2] = packed[1][:, cs:ce], packed[2][:, cs:ce]
        assert_close(o[:, s:e], nsa_call(one, backend), **TOL64, name=f"seq {n}")
        assert torch.equal(idx[:, s:e], nsa.select_blocks(one[0], one[1], config=CFG, backend=backend))


def test_float32_reference_matches_float64():
    inputs = make_inputs(1, 60, 4, 2, 16, 16, CFG, seed=6)
    o64 = nsa_call(inputs, "reference")
    o32 = nsa_call([x.float() for x in inputs], "reference", block_indices=nsa.select_blocks(
        inputs[0], inputs[1], config=CFG, backend="reference"))
    assert o32.dtype == torch.float32
    assert_close(o32, o64, atol=1e-5, rtol=1e-5, name="fp32 vs fp64")


# ---------------------------------------------------------------------- the torch backend's chunked path
# At these lengths the torch backend's composed op takes its dense path; the same properties for the chunked one.
@pytest.mark.parametrize("cut", [5, 33])
def test_causality_chunked_torch_path(cut, monkeypatch):
    from nsa.ops import torch_dense

    monkeypatch.setattr(torch_dense, "DENSE_MAX_LEN", 0)
    test_causality_every_branch("torch", cut)


@pytest.mark.parametrize("lengths", [[30, 1, 17]])
def test_varlen_chunked_torch_path(lengths, monkeypatch):
    from nsa.ops import torch_dense

    monkeypatch.setattr(torch_dense, "DENSE_MAX_LEN", 0)
    test_varlen_equals_per_sequence("torch", lengths)


@pytest.mark.parametrize("backend", CPU_BACKENDS + (["triton"] if "triton" in nsa.available_backends() else []))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_empty_and_cmp_free_batches(backend, dtype):
    """B = 0 and T = 0 return empty outputs (no crash); T < l (no compressed token, k_cmp/v_cmp of length 0) gives
    gradients for all 8 inputs, the empty ones included (the dense torch path once left k_cmp/v_cmp out of the
    graph, and crashed on B = 0)."""
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("float64 runs the reference")
    for B, T in ((2, 0), (0, 5), (0, 40)):
        xs = make_inputs(B, T, 4, 2, 8, 8, CFG, dtype=dtype, seed=B + T, requires_grad=True)
        o = nsa.native_sparse_attention(*xs, config=CFG, backend=backend)
        assert o.shape == (B, T, 4, 8)
        grads = torch.autograd.grad(o.sum(), xs)  # every input in the graph: empty zero gradients, none missing
        assert [g.shape for g in grads] == [x.shape for x in xs] and all(not g.any() for g in grads)
    xs = make_inputs(2, 5, 4, 2, 8, 6, CFG, dtype=dtype, seed=1, requires_grad=True)
    assert xs[1].shape[1] == 0
    o = nsa.native_sparse_attention(*xs, config=CFG, backend=backend)
    grads = torch.autograd.grad(o.square().sum(), xs)
    assert [g.shape for g in grads] == [x.shape for x in xs]
    expected = torch.autograd.grad(nsa.native_sparse_attention(*xs, config=CFG, backend="reference").square().sum(),
                                   xs)
    tol = dict(atol=1e-10, rtol=1e-10) if dtype == torch.float64 else dict(atol=1e-5, rtol=1e-5)
    for g, e in zip(grads, expected):
        assert_close(g, e, name="grad", **tol)
