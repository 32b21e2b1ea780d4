"""NSACache: bounded storage, contents, no reallocation, reset, reorder, memory accounting, errors."""
import pytest
import torch

import nsa
from nsa.rope import apply_rope
from tests.kit import assert_close, small_config
from tests.test_decode import full_forward, make_layer

CFG = small_config()  # l=8, d=4, l'=16, n=4, w=16
TOL64 = dict(atol=1e-10, rtol=1e-10)


def raw_kv(layer, x):
    """Un-cached projections of x: raw cmp K/V and rotated slc/win K/V at positions 0..T-1."""
    _, kc, vc, ks, vs, kw, vw, _ = layer.project_tokens(x, torch.arange(x.shape[1]))
    return kc, vc, ks, vs, kw, vw


def test_storage_is_bounded_by_the_geometry():
    layer = make_layer(G=4)
    cache = nsa.NSACache(2, 3, 100)
    assert cache.memory_bytes() == 0  # lazily allocated
    layer(torch.randn(3, 5, 32, dtype=torch.float64), cache=cache, layer_idx=1)
    assert cache.layers[0] is None
    lc = cache.layers[1]
    HKV, Dk, Dv = 2, 8, 6
    assert lc.k_slc.shape == (3, 100, HKV, Dk) and lc.v_slc.shape == (3, 100, HKV, Dv)  # the selection history
    assert lc.k_win.shape == (3, CFG.window_size, HKV, Dk)  # window: w
    assert lc.k_cmp.shape == (3, CFG.num_compressed(100), HKV, Dk)  # compressed: Tc(max_length)
    assert lc.k_tail.shape == (3, CFG.cmp_block_size - 1, HKV, Dk)  # pending raw tail: < l
    per_token = {"k": Dk, "v": Dv}
    expected = sum(3 * n * HKV * per_token[name[0]] * 8 for name, n in
                   [("k_slc", 100), ("v_slc", 100), ("k_win", 16), ("v_win", 16), ("k_cmp", 24), ("v_cmp", 24),
                    ("k_tail", 7), ("v_tail", 7)]) + 3 * 8
    assert cache.memory_bytes() == expected
    shared = nsa.NSACache(1, 1, 10)
    make_layer(G=4, shared_kv=True)(torch.randn(1, 3, 32, dtype=torch.float64), cache=shared)
    assert shared.layers[0].k_win is None  # shared K/V: the window reads the selection cache
    assert shared.layers[0].window_capacity == 10  # never more than max_length


def test_contents_after_prefill_and_decode():
    """slc holds the rotated history, the window ring the last w tokens, cmp the Eq. 7 tokens with RoPE at the
    block's last position, the tail exactly positions Tc*d .. L-1 (at most l - 1 of them)."""
    layer = make_layer(G=4)
    x = torch.randn(2, 45, 32, dtype=torch.float64)
    kc, vc, ks, vs, kw, vw = raw_kv(layer, x)
    l, d = CFG.cmp_block_size, CFG.cmp_stride
    cache = nsa.NSACache(1, 2, 64)
    layer(x[:, :10], cache=cache)
    for L in range(10, 45):
        live = cache.layers[0].live(0)
        Tc = CFG.num_compressed(L)
        assert live["k_tail"].shape[0] == L - Tc * d < l
        assert_close(live["k_tail"], kc[0, Tc * d:L], **TOL64, name="tail")
        assert_close(live["v_tail"], vc[0, Tc * d:L], **TOL64, name="tail v")
        assert_close(live["k_win"], kw[0, max(0, L - 16):L], **TOL64, name="window")
        assert_close(live["v_slc"], vs[0, :L], **TOL64, name="slc")
        assert_close(live["k_slc"], ks[0, :L], **TOL64, name="slc k")
        layer(x[:, L:L + 1], cache=cache)
    live = cache.layers[0].live(1)
    k_cmp, v_cmp = layer.compress_k(kc[1:]), layer.compress_v(vc[1:])
    Tc = CFG.num_compressed(45)
    assert live["k_cmp"].shape[0] == Tc
    rotated = apply_rope(k_cmp, torch.arange(Tc) * d + l - 1)
    assert_close(live["k_cmp"], rotated[0], **TOL64, name="cmp k")
    assert_close(live["v_cmp"], v_cmp[0], **TOL64, name="cmp v")


def test_decode_never_reallocates():
    layer = make_layer(G=4)
    cache = nsa.NSACache(1, 2, 40)
    layer(torch.randn(2, 3, 32, dtype=torch.float64), cache=cache)
    ptrs = {n: t.data_ptr() for n, t in cache.layers[0].tensors().items()}
    size = cache.memory_bytes()
    for _ in range(30):
        layer(torch.randn(2, 1, 32, dtype=torch.float64), cache=cache)
    assert {n: t.data_ptr() for n, t in cache.layers[0].tensors().items()} == ptrs
    assert not any(t.requires_grad for t in cache.layers[0].tensors().values())  # no autograd history kept
    assert cache.memory_bytes() == size
    with pytest.raises(ValueError, match="max_length"):
        layer(torch.randn(2, 8, 32, dtype=torch.float64), cache=cache)


def test_reset_reuses_storage():
    layer = make_layer(G=4)
    x = torch.randn(2, 30, 32, dtype=torch.float64)
    cache = nsa.NSACache(1, 2, 30)
    first = layer(x[:, :20], cache=cache)
    layer(torch.randn(2, 10, 32, dtype=torch.float64), cache=cache)
    cache.reset()
    assert cache.lengths.tolist() == [0, 0]
    again = torch.cat([layer(x[:, :20], cache=cache)] + [layer(x[:, t:t + 1], cache=cache) for t in range(20, 30)], 1)
    assert_close(again[:, :20], first, **TOL64)
    assert_close(again, full_forward(layer, x), **TOL64)


def test_reorder_for_beam_search():
    """After reorder(beam), row b continues old row beam[b]: same as a cache built from the reordered prompts."""
    layer = make_layer(G=4)
    x = torch.randn(3, 21, 32, dtype=torch.float64)
    lens = torch.tensor([21, 14, 17])
    cache = nsa.NSACache(1, 3, 40)
    layer(x, cache=cache, new_lengths=lens)
    beam = torch.tensor([2, 0, 0])
    cache.reorder(beam)
    assert cache.lengths.tolist() == lens[beam].tolist()
    fresh = nsa.NSACache(1, 3, 40)
    layer(x[beam], cache=fresh, new_lengths=lens[beam])
    for _ in range(6):
        step = torch.randn(3, 1, 32, dtype=torch.float64)
        assert_close(layer(step, cache=cache), layer(step, cache=fresh), **TOL64)


def test_cache_errors_name_the_argument():
    layer = make_layer(G=4)
    x = torch.randn(2, 4, 32, dtype=torch.float64)
    with pytest.raises(ValueError, match="batch_size"):
        nsa.NSACache(1, 0, 10)
    with pytest.raises(ValueError, match="max_length"):
        nsa.NSACache(1, 2, -1)
    with pytest.raises(ValueError, match="dtype"):
        nsa.NSACache(1, 2, 10, dtype=torch.int32)
    with pytest.raises(ValueError, match="static"):
        nsa.NSACache(1, 2, 10, static=1)
    cache = nsa.NSACache(1, 2, 10)
    with pytest.raises(ValueError, match="batch size"):
        layer(x[:1], cache=cache)
    with pytest.raises(ValueError, match="layer_idx"):
        layer(x, cache=cache, layer_idx=1)
    with pytest.raises(ValueError, match="cu_seqlens"):
        layer(x[:1], cache=nsa.NSACache(1, 1, 10), cu_seqlens=torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="position_ids"):
        layer(x, cache=cache, position_ids=torch.arange(4))
    with pytest.raises(ValueError, match="new_lengths"):
        layer(x, cache=cache, new_lengths=torch.tensor([5, 1]))
    with pytest.raises(ValueError, match="new_lengths"):
        layer(x, new_lengths=torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="cache"):
        layer(x, cache=object())
    layer(x, cache=cache)
    # a ragged call that would overflow one row raises before any row group is written: the cache is unchanged
    layer(x, cache=cache)
    before = cache.lengths.clone()  # [8, 8] of 10
    with pytest.raises(ValueError, match="max_length"):
        layer(x, cache=cache, new_lengths=torch.tensor([1, 4]))  # row 0 fits (9), row 1 does not (12)
    assert torch.equal(cache.lengths, before)
    with pytest.raises(ValueError, match="layer_idx"):  # same slot, another geometry
        make_layer(G=16)(x, cache=cache)
    with pytest.raises(ValueError, match="beam_idx"):
        cache.reorder(torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="beam_idx"):
        cache.reorder(torch.tensor([0.0, 1.0]))


def test_lengths_of_a_hybrid_model_cache():
    """NSA in layer 2 only (a hybrid model): `lengths` reports that layer's fill, not zeros for the unused slot 0."""
    layer = make_layer(G=4)
    cache = nsa.NSACache(3, 2, 12)
    assert cache.lengths.tolist() == [0, 0]
    layer(torch.randn(2, 5, 32, dtype=torch.float64), cache=cache, layer_idx=2)
    assert cache.lengths.tolist() == [5, 5] and cache.layers[0] is None
