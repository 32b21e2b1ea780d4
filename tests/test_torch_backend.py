"""The "torch" backend against the reference: outputs and every gradient, fp64 to 1e-10 and fp32 to 1e-5, across
odd shapes, GQA group sizes, Dk != Dv, varlen (empty and length-1 sequences), T < l, tiny chunks/tiles, both softmax
paths (shift-free and max-shifted), tie-robust selection, and the short-query-tail entry point."""
import math

import pytest
import torch

import nsa
from nsa.ops import cpu_kernels, dispatch
from nsa.ops import reference as ref
from nsa.ops import torch_backend as tb
from nsa.ops import torch_dense
from tests.kit import assert_close, assert_same_selection, make_inputs, small_config

CFG = small_config()  # l=8, d=4, l'=16, n=4, w=16
TOL = {torch.float64: dict(atol=1e-10, rtol=1e-10), torch.float32: dict(atol=1e-5, rtol=1e-5)}


@pytest.fixture(params=["tiny", "default"])
def chunking(request, monkeypatch):
    """Tiny chunks, score tiles and window tiles, so that every boundary is crossed (chunked path only); or the
    shipped settings (the composed op of these short inputs takes the dense path, `torch_dense`)."""
    if request.param == "tiny":
        monkeypatch.setattr(torch_dense, "DENSE_MAX_LEN", 0)
        monkeypatch.setattr(tb, "CHUNK_SIZE", 7)
        monkeypatch.setattr(tb, "WORK_ELEMS", 1000)
        monkeypatch.setattr(tb, "CMP_WORK_ELEMS", 1000)
        monkeypatch.setattr(tb, "WIN_TILE", 3)
        monkeypatch.setattr(tb, "SMALL_NUMEL", 0)  # chunks on worker threads even for these tiny inputs
        monkeypatch.setattr(tb, "NUM_WORKERS", 3)
    return request.param


def _grads(out, inputs, seed=11):
    g = torch.Generator().manual_seed(seed)
    dout = [torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.dtype) for o in out]
    mask = [torch.isfinite(o) for o in out]
    loss = sum((torch.where(m, o, 0) * d).sum() for o, d, m in zip(out, dout, mask))
    params = [x for x in inputs if x.requires_grad]
    return torch.autograd.grad(loss, params, allow_unused=True)


def _compare(fn, inputs, dtype, names, scaled=False):
    """fn(backend, *inputs) -> tuple of outputs; compares outputs and gradients of torch vs reference.

    scaled (ill-conditioned inputs): the reference runs in float64 and atol is 1e-4 times the tensor's largest
    magnitude -- fp32 rounding is amplified by the large logits in both backends alike."""
    res = {}
    for backend in ("reference", "torch"):
        cast = torch.float64 if scaled and backend == "reference" else dtype
        xs = [x.detach().clone().to(cast).requires_grad_(x.is_floating_point()) for x in inputs]
        out = fn(backend, *xs)
        out = out if isinstance(out, tuple) else (out,)
        res[backend] = (out, _grads(out, xs))
    for i, (a, e) in enumerate(zip(res["torch"][0], res["reference"][0])):
        assert a.dtype == e.dtype or scaled
        assert_close(a, e, **_tol(dtype, e, scaled), name=f"output {i}")
    for name, a, e in zip(names, res["torch"][1], res["reference"][1]):
        e = torch.zeros_like(a) if e is None else e
        a = torch.zeros_like(e) if a is None else a
        assert_close(a, e, **_tol(dtype, e, scaled), name=f"grad {name}")


def _tol(dtype, e, scaled):
    tol = dict(TOL[dtype])
    if scaled:
        finite = e[torch.isfinite(e)]
        tol["atol"] = 1e-4 * max(1.0, finite.abs().max().item() if finite.numel() else 1.0)
    return tol


def test_auto_picks_torch_on_cpu():
    assert dispatch.resolve_backend("auto", torch.device("cpu")) is tb


SHAPES = [  # B, T, HQ, HKV, Dk, Dv
    (1, 5, 2, 2, 8, 8),  # T < l: no compressed token at all
    (2, 37, 3, 3, 8, 5),  # G = 1, Dk != Dv
    (1, 53, 4, 2, 6, 10),  # G = 2
    (1, 61, 6, 2, 8, 8),  # G = 3
    (1, 70, 16, 1, 4, 6),  # G = 16
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_composed_matches_reference(shape, dtype, chunking):
    B, T, HQ, HKV, Dk, Dv = shape
    inputs = make_inputs(B, T, HQ, HKV, Dk, Dv, CFG, dtype=dtype, seed=T)
    # fp32 may pick a different block on a near-tie; the selection itself is compared tie-robustly below
    idx = ref.select_blocks(inputs[0].double(), inputs[1].double(), config=CFG)
    names = ["q", "k_cmp", "v_cmp", "k_slc", "v_slc", "k_win", "v_win", "gates"]
    _compare(lambda be, *x: nsa.native_sparse_attention(*x, config=CFG, block_indices=idx, backend=be),
             inputs, dtype, names)
    if dtype == torch.float64:  # own selection inside the fused op
        o = nsa.native_sparse_attention(*inputs, config=CFG, backend="torch")
        assert_close(o, nsa.native_sparse_attention(*inputs, config=CFG, backend="reference"), **TOL[dtype],
                     name="with selection")


@pytest.mark.parametrize("lengths", [[1, 0, 37, 5], [0, 16, 1, 29], [9, 0, 0], [20, 20, 0, 7, 20, 7, 33], [5, 5]])
def test_varlen_matches_reference(lengths, chunking):
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    T = int(cu[-1])
    inputs = make_inputs(1, T, 4, 2, 8, 6, CFG, cu_seqlens=cu, seed=len(lengths) + T)
    names = ["q", "k_cmp", "v_cmp", "k_slc", "v_slc", "k_win", "v_win", "gates"]
    _compare(lambda be, *x: nsa.native_sparse_attention(*x, config=CFG, cu_seqlens=cu, backend=be), inputs,
             torch.float64, names)
    q, k_cmp = inputs[:2]
    assert torch.equal(nsa.select_blocks(q, k_cmp, config=CFG, cu_seqlens=cu, backend="torch"),
                       nsa.select_blocks(q, k_cmp, config=CFG, cu_seqlens=cu, backend="reference"))


def test_equal_length_sequences_run_side_by_side(monkeypatch):
    """A packed batch whose sequences share lengths runs once per length, the sequences side by side along the
    head axis; every op and every gradient still equals the reference (float64), and empty sequences stay empty."""
    lengths = [20, 20, 0, 7, 20, 7, 33, 3]
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    T = int(cu[-1])
    monkeypatch.setattr(torch_dense, "DENSE_MAX_LEN", 0)  # the composed op's chunked path
    calls = []
    real = tb._grouped
    monkeypatch.setattr(tb, "_grouped", lambda *a: (r := real(*a), calls.append(r is not None))[0])
    inputs = make_inputs(1, T, 4, 2, 8, 6, CFG, cu_seqlens=cu, seed=9)
    q, k_cmp, v_cmp, ks, vs, kw, vw, gates = inputs
    idx = ref.select_blocks(q, k_cmp, config=CFG, cu_seqlens=cu)
    kw_ = dict(cu_seqlens=cu)
    _compare(lambda be, *x: nsa.compressed_attention(*x, block_size=CFG.cmp_block_size, stride=CFG.cmp_stride,
                                                       backend=be, **kw_), (q, k_cmp, v_cmp), torch.float64,
             ["q", "k_cmp", "v_cmp"])
    _compare(lambda be, *x: nsa.selected_attention(*x, idx, block_size=CFG.slc_block_size, backend=be, **kw_),
             (q, ks, vs), torch.float64, ["q", "k", "v"])
    _compare(lambda be, *x: nsa.sliding_window_attention(*x, window=CFG.window_size, backend=be, **kw_),
             (q, kw, vw), torch.float64, ["q", "k", "v"])
    _compare(lambda be, *x: nsa.native_sparse_attention(*x, config=CFG, backend=be, block_indices=idx, **kw_),
             inputs, torch.float64, ["q", "k_cmp", "v_cmp", "k_slc", "v_slc", "k_win", "v_win", "gates"])
    assert torch.equal(tb.select_blocks(q, k_cmp, config=CFG, cu_seqlens=cu), idx)
    assert calls == [True] * 5  # the torch side of the four comparisons and the selection took the grouped path


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("T", [3, 8, 45])
def test_compressed_attention_and_lse_gradients(T, dtype, chunking):
    q, k_cmp, v_cmp, *_ = make_inputs(2, T, 6, 2, 8, 5, CFG, dtype=dtype, seed=T + 1)
    _compare(lambda be, *x: nsa.compressed_attention(*x, block_size=8, stride=4, backend=be), (q, k_cmp, v_cmp),
             dtype, ["q", "k_cmp", "v_cmp"])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_selected_attention_odd_indices(dtype, chunking):
    """-1 slots, repeated indices and blocks after the query's own block, against the reference."""
    T, HKV = 50, 2
    q, _, _, k, v, *_ = make_inputs(1, T, 6, HKV, 8, 7, CFG, dtype=dtype, seed=2)
    g = torch.Generator().manual_seed(3)
    idx = torch.randint(-1, math.ceil(T / 16), (1, T, HKV, 5), generator=g)
    idx[0, 20, 1] = torch.tensor([1, 1, 0, -1, 1])
    idx[0, 0] = -1  # a query with no block at all -> zeros
    _compare(lambda be, *x: nsa.selected_attention(*x, idx, block_size=16, backend=be), (q, k, v), dtype,
             ["q", "k", "v"])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_selected_attention_mixed_segment_sizes(dtype, monkeypatch):
    """Blocks whose pair counts leave tails of several sizes: full segments plus 2-, 4- and 8-pair tail segments,
    each size batched on its own, against the reference."""
    monkeypatch.setattr(tb, "SLC_SEGMENT_SIZES", (2, 4, 8, 16))
    monkeypatch.setattr(tb, "WORK_ELEMS", 3000)  # several batches per size
    T, HKV = 120, 2
    q, _, _, k, v, *_ = make_inputs(1, T, 4, HKV, 8, 7, CFG, dtype=dtype, seed=4)
    g = torch.Generator().manual_seed(5)
    idx = torch.randint(0, math.ceil(T / 16), (1, T, HKV, 5), generator=g)
    plan = tb._SlcPlan(idx[0], 0, 16, T)
    assert len({P for P, *_ in plan.groups}) >= 3, plan.groups
    _compare(lambda be, *x: nsa.selected_attention(*x, idx, block_size=16, backend=be), (q, k, v), dtype,
             ["q", "k", "v"])


@pytest.mark.parametrize("window", [1, 3, 16, 100])
def test_sliding_window_matches_reference(window, chunking):
    q, _, _, _, _, k, v, _ = make_inputs(2, 41, 4, 1, 6, 9, CFG, seed=window)
    _compare(lambda be, *x: nsa.sliding_window_attention(*x, window=window, backend=be), (q, k, v), torch.float64,
             ["q", "k", "v"])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_large_logits_take_the_max_shifted_path(dtype, chunking):
    """Scores far beyond the shift-free bound (|q||k|*scale > 60): the max-subtracted softmax must agree too.

    Logits ~100 amplify fp32 rounding in both backends, so fp32 uses an atol relative to each tensor's scale."""
    inputs = list(make_inputs(1, 48, 4, 2, 8, 8, CFG, dtype=dtype, seed=9))
    for i in (0, 1, 3, 5):
        inputs[i] = inputs[i] * 12.0
    qn = torch.linalg.vector_norm(inputs[0] * 8 ** -0.5, dim=-1).max()
    assert qn * torch.linalg.vector_norm(inputs[3], dim=-1).max() > tb._exp_limit(dtype)
    idx = ref.select_blocks(inputs[0].double(), inputs[1].double(), config=CFG)
    names = ["q", "k_cmp", "v_cmp", "k_slc", "v_slc", "k_win", "v_win", "gates"]
    _compare(lambda be, *x: nsa.native_sparse_attention(*x, config=CFG, block_indices=idx, backend=be), inputs,
             dtype, names, scaled=dtype == torch.float32)


@pytest.mark.parametrize("G", [1, 2, 3, 16])
def test_selection_agrees_tie_robustly(G, chunking):
    cfg = small_config(num_selected=5)
    q, k_cmp, *_ = make_inputs(2, 150, 2 * G, 2, 8, 8, cfg, dtype=torch.float32, seed=G)
    idx = nsa.select_blocks(q, k_cmp, config=cfg, backend="torch")
    expected = nsa.select_blocks(q, k_cmp, config=cfg, backend="reference")
    assert_same_selection(idx, expected, ref.block_scores(q, k_cmp, config=cfg), cfg)
    q64, k64 = q.double(), k_cmp.double()
    assert torch.equal(nsa.select_blocks(q64, k64, config=cfg, backend="torch"),
                       nsa.select_blocks(q64, k64, config=cfg, backend="reference"))


def test_exact_ties_go_to_the_lower_block(chunking):
    """Identical compressed keys make many block scores exactly equal: the choice must match the reference. The
    ties must be exact in every backend's arithmetic too: q and k are multiples of 1/4 and the scale 1/sqrt(16) a
    power of two, so every q.k is exact whatever the summation order (with random floats a BLAS may round the same
    dot product differently at different column positions of a tile: that broke this test on an AMD CPU)."""
    cfg = small_config(num_selected=5, num_local_blocks=1)
    q, k_cmp, *_ = make_inputs(1, 160, 4, 2, 16, 8, cfg, seed=4)
    q, k_cmp = (q * 4).round() / 4, (k_cmp * 4).round() / 4
    k_cmp = k_cmp[:, :1].expand_as(k_cmp).contiguous()
    assert torch.equal(nsa.select_blocks(q, k_cmp, config=cfg, backend="torch"),
                       nsa.select_blocks(q, k_cmp, config=cfg, backend="reference"))


@pytest.mark.parametrize("Tq", [1, 5, 8, 9, 13])
def test_query_tail_equals_last_rows(Tq, chunking):
    """Short tails take the per-query gather decode (Tq <= TAIL_DECODE_MAX), longer ones the chunked forward."""
    q, k_cmp, v_cmp, ks, vs, kw, vw, gates = make_inputs(2, 90, 6, 2, 8, 8, CFG, seed=Tq)
    full = nsa.native_sparse_attention(q, k_cmp, v_cmp, ks, vs, kw, vw, gates, config=CFG, backend="reference")
    tail = tb.native_sparse_attention_tail(q[:, -Tq:], k_cmp, v_cmp, ks, vs, kw, vw, gates[:, -Tq:], config=CFG)
    assert_close(tail, full[:, -Tq:], **TOL[torch.float64], name="tail")
    with pytest.raises(ValueError, match="q_tail"):
        tb.native_sparse_attention_tail(q[:, :0], k_cmp, v_cmp, ks, vs, kw, vw, gates[:, :0], config=CFG)


@pytest.mark.parametrize("chunk", [96, 2048, "dense"])
def test_paper_geometry_float32(chunk, monkeypatch):
    """Paper geometry (l=32, d=16, l'=64, n=16, w=512) at T=700, fp32, against the float64 reference: chunked
    (two chunk sizes) and the short-sequence dense path (multi-tile window)."""
    if chunk == "dense":
        monkeypatch.setattr(torch_dense, "WIN_TILE", 64)
    else:
        monkeypatch.setattr(torch_dense, "DENSE_MAX_LEN", 0)
        monkeypatch.setattr(tb, "CHUNK_SIZE", chunk)
    cfg = nsa.NSAConfig()
    inputs = make_inputs(1, 700, 4, 1, 16, 16, cfg, dtype=torch.float64, seed=5)
    idx = ref.select_blocks(inputs[0], inputs[1], config=cfg)
    o64 = ref.native_sparse_attention(*inputs, config=cfg, block_indices=idx)
    o32 = nsa.native_sparse_attention(*[x.float() for x in inputs], config=cfg, block_indices=idx, backend="torch")
    assert_close(o32, o64, atol=1e-5, rtol=1e-5, name="fp32 torch vs fp64 reference")
    sel = nsa.select_blocks(inputs[0].float(), inputs[1].float(), config=cfg, backend="torch")
    assert_same_selection(sel, idx, ref.block_scores(inputs[0], inputs[1], config=cfg), cfg)


def test_concurrent_calls_restore_thread_count(monkeypatch):
    """Ops running at once in several Python threads: each result equals the single-threaded one, and torch's
    thread count (which the op sets to 1 while it runs) reads as before in every thread afterwards."""
    import threading

    monkeypatch.setattr(tb, "SMALL_NUMEL", 0)
    cfg = small_config()
    inputs = make_inputs(1, 600, 4, 2, 8, 8, cfg, dtype=torch.float32, seed=2)
    expect = tb.native_sparse_attention(*inputs, config=cfg)
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        errors, barrier = [], threading.Barrier(4)

        def worker():
            n = torch.get_num_threads()
            barrier.wait()
            for _ in range(3):
                if not torch.equal(tb.native_sparse_attention(*inputs, config=cfg), expect):
                    errors.append("mismatch")
            if torch.get_num_threads() != n:
                errors.append(f"thread count {torch.get_num_threads()} != {n}")

        threads = [threading.Thread(target=worker) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("small", [True, False, "dense"])
def test_autocast_region_does_not_change_results(small, monkeypatch):
    """Inside a CPU bf16 autocast region the op computes exactly as outside it (fp32 accumulation, its own
    precisions), whether the chunks run in the calling thread (small input) or on worker threads, or the composed
    op takes the dense path."""
    monkeypatch.setattr(tb, "SMALL_NUMEL", 1 << 30 if small is True else 0)
    monkeypatch.setattr(torch_dense, "DENSE_MAX_LEN", 1024 if small == "dense" else 0)
    cfg = small_config()
    inputs = make_inputs(1, 200, 4, 2, 8, 8, cfg, dtype=torch.float32, seed=4)
    res = []
    for autocast in (False, True):
        xs = [x.detach().clone().requires_grad_() for x in inputs]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = tb.native_sparse_attention(*xs, config=cfg)
            sel = tb.select_blocks(xs[0], xs[1], config=cfg)
        assert out.dtype == torch.float32
        res.append((out, sel, _grads((out,), xs)))
    (o1, s1, g1), (o2, s2, g2) = res
    assert torch.equal(o1, o2) and torch.equal(s1, s2)
    for a, b in zip(g1, g2):
        assert (a is None and b is None) or torch.equal(a, b)


# ============================================================================= short-sequence dense path
@pytest.fixture
def dense_tiles(monkeypatch):
    """The dense path with small buckets, window tiles, slc tiles and sub-batches, so every split is crossed."""
    monkeypatch.setattr(torch_dense, "BUCKET", 8)
    monkeypatch.setattr(torch_dense, "WIN_TILE", 8)
    monkeypatch.setattr(torch_dense, "SLC_TILES", 3)
    monkeypatch.setattr(torch_dense, "DENSE_MAX_ELEMS", 4 * 48 * 48)


def test_dense_path_is_taken_only_for_short_sequences(monkeypatch):
    """Taken when every sequence has at most min(DENSE_MAX_LEN, 2 (n l' + w)) tokens, packed or not, and the
    compiled float32 CPU kernels do not apply (here: switched off; float64; or no compiler)."""
    monkeypatch.setattr(tb, "USE_FUSED_CPU", False)
    calls = []
    real = torch_dense.native_sparse_attention
    monkeypatch.setattr(torch_dense, "native_sparse_attention", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    limit = torch_dense.max_len(CFG)
    assert limit == 2 * (CFG.num_selected * CFG.slc_block_size + CFG.window_size)
    for lengths, dense in (([limit], True), ([limit + 1], False), ([limit, 3, limit], True), ([5, limit + 1], False)):
        cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
        inputs = make_inputs(1, int(cu[-1]), 4, 2, 8, 8, CFG, cu_seqlens=cu, dtype=torch.float32, seed=1)
        calls.clear()
        tb.native_sparse_attention(*inputs, config=CFG, cu_seqlens=cu)
        assert bool(calls) == dense, lengths
    monkeypatch.setattr(torch_dense, "DENSE_MAX_LEN", 0)
    calls.clear()
    tb.native_sparse_attention(*make_inputs(1, 20, 4, 2, 8, 8, CFG, dtype=torch.float32), config=CFG)
    assert not calls
    monkeypatch.undo()
    if cpu_kernels.load() is not None:  # float32 with the compiled kernels: the chunked path, even when short
        monkeypatch.setattr(torch_dense, "native_sparse_attention", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
        tb.native_sparse_attention(*make_inputs(1, 20, 4, 2, 8, 8, CFG, dtype=torch.float32), config=CFG)
        assert not calls
        tb.native_sparse_attention(*make_inputs(1, 20, 4, 2, 8, 8, CFG), config=CFG)  # float64: dense
        assert calls


@pytest.mark.parametrize("given", [False, True])
@pytest.mark.parametrize("lengths", [[1, 0, 37, 5], [70, 16, 1, 29, 70], [9, 0, 0], [33, 150, 64]])
def test_dense_path_matches_reference(lengths, given, dense_tiles):
    """Packed sequences in several buckets and sub-batches, with its own selection or given block indices
    (including -1 and repeated entries), float64: outputs and every gradient equal the reference's."""
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    T = int(cu[-1])
    inputs = make_inputs(1, T, 6, 2, 8, 5, CFG, cu_seqlens=cu, seed=T)
    idx = None
    if given:
        idx = ref.select_blocks(inputs[0], inputs[1], config=CFG, cu_seqlens=cu).clone()
        idx[..., -1] = -1
        idx[..., 0] = idx[..., 1]
    names = ["q", "k_cmp", "v_cmp", "k_slc", "v_slc", "k_win", "v_win", "gates"]
    _compare(lambda be, *x: nsa.native_sparse_attention(*x, config=CFG, cu_seqlens=cu, block_indices=idx, backend=be),
             inputs, torch.float64, names)


def test_dense_path_rows_that_see_nothing(dense_tiles):
    """Every block index -1 (no selected key at all) and T < l (no compressed token): those branches give 0 and
    no NaN reaches the output or a gradient, as in the reference."""
    inputs = make_inputs(2, 40, 4, 2, 8, 8, CFG, seed=3)
    idx = torch.full((2, 40, 2, CFG.num_selected), -1)
    names = ["q", "k_cmp", "v_cmp", "k_slc", "v_slc", "k_win", "v_win", "gates"]
    _compare(lambda be, *x: nsa.native_sparse_attention(*x, config=CFG, block_indices=idx, backend=be), inputs,
             torch.float64, names)
    short = make_inputs(1, CFG.cmp_block_size - 1, 4, 2, 8, 8, CFG, seed=4)
    _compare(lambda be, *x: nsa.native_sparse_attention(*x, config=CFG, backend=be), short, torch.float64, names)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_queries_are_scaled_in_float32(dtype, monkeypatch):
    """bf16/fp16 inputs: scores are computed in float32 from the inputs as given (spec §1), so the torch backend's
    error against float64 is the reference's on the same inputs. q * scale was once rounded to the input dtype
    first: with a head dim whose scale is not a power of two (12 here) the cmp lse was off by 4.5 and the output by
    0.15 at inputs of magnitude ~30, against 0.02 for the reference. Both the C++ kernels and the pure path."""
    monkeypatch.setattr(torch_dense, "DENSE_MAX_LEN", 0)
    g = torch.Generator().manual_seed(1)
    T, D = 64, 12
    big = 30.0 if dtype == torch.bfloat16 else 8.0  # fp16: keep q·k inside its range

    def mk(*shape, m=big):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * m).to(dtype)

    cfg = nsa.NSAConfig(cmp_block_size=8, cmp_stride=4, slc_block_size=16, num_selected=4, window_size=16)
    x = (mk(1, T, 2, D), mk(1, 15, 1, D), mk(1, 15, 1, D, m=1), mk(1, T, 1, D), mk(1, T, 1, D, m=1), mk(1, T, 1, D),
         mk(1, T, 1, D, m=1), torch.rand(1, T, 2, 3, generator=g, dtype=torch.float64).to(dtype))
    exact = nsa.native_sparse_attention(*[t.double() for t in x], config=cfg, backend="reference")
    _, lse_exact = ref.compressed_attention(x[0].double(), x[1].double(), x[2].double(), block_size=8, stride=4)
    seen = torch.isfinite(lse_exact)
    ref_err = (nsa.native_sparse_attention(*x, config=cfg, backend="reference").double() - exact).abs().max()
    for fused in ([False, True] if cpu_kernels.load() is not None else [False]):
        monkeypatch.setattr(tb, "USE_FUSED_CPU", fused)
        err = (nsa.native_sparse_attention(*x, config=cfg, backend="torch").double() - exact).abs().max()
        assert err <= 1.5 * ref_err + 1e-3, (fused, float(err), float(ref_err))
        _, lse = nsa.compressed_attention(x[0], x[1], x[2], block_size=8, stride=4, backend="torch")
        assert (lse.double()[seen] - lse_exact[seen]).abs().max() < 2e-3, fused


def test_worker_threads_keep_inference_mode(monkeypatch):
    """Chunks on worker threads run in the caller's autograd mode: under torch.inference_mode they write into the
    caller's inference tensors (this raised "Inplace update to inference tensor outside InferenceMode")."""
    monkeypatch.setattr(torch_dense, "DENSE_MAX_LEN", 0)
    monkeypatch.setattr(tb, "CHUNK_SIZE", 16)
    monkeypatch.setattr(tb, "SMALL_NUMEL", 0)
    monkeypatch.setattr(tb, "NUM_WORKERS", 2)
    x = make_inputs(1, 61, 4, 2, 16, 8, CFG, dtype=torch.float32, seed=7)
    with torch.no_grad():
        expected = nsa.native_sparse_attention(*x, config=CFG, backend="torch")
        idx = nsa.select_blocks(x[0], x[1], config=CFG, backend="torch")
    with torch.inference_mode():
        assert torch.equal(nsa.native_sparse_attention(*x, config=CFG, backend="torch"), expected)
        assert torch.equal(nsa.select_blocks(x[0], x[1], config=CFG, backend="torch"), idx)


def test_concurrent_calls_from_threads_equal_serial(monkeypatch):
    """Ops started from several Python threads at once: each result (output and gradients) is bitwise equal to a
    serial call, and every thread keeps its torch thread count. Ops used to read the count of 1 that a running op
    had set: they then grouped their chunks for one worker (another summation order) and left their thread at 1."""
    import threading

    monkeypatch.setattr(torch_dense, "DENSE_MAX_LEN", 0)
    monkeypatch.setattr(tb, "CHUNK_SIZE", 16)
    monkeypatch.setattr(tb, "SMALL_NUMEL", 0)
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        x = make_inputs(1, 97, 4, 2, 16, 8, CFG, dtype=torch.float32, seed=8)
        do = torch.randn(1, 97, 4, 8, generator=torch.Generator().manual_seed(9))

        def run():
            ins = [t.clone().requires_grad_() for t in x]
            o = nsa.native_sparse_attention(*ins, config=CFG, backend="torch")
            o.backward(do)
            return [o.detach()] + [t.grad for t in ins]

        serial = run()
        start, results = threading.Barrier(4), {}

        def worker(i):
            start.wait()
            results[i] = ([all(torch.equal(a, b) for a, b in zip(run(), serial)) for _ in range(4)],
                          torch.get_num_threads())

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        assert len(results) == 4 and all(all(eq) and n == 2 for eq, n in results.values()), results
    finally:
        torch.set_num_threads(old)


def test_cpu_offsets_changed_behind_the_version_counter():
    """A CPU cu_seqlens rewritten through a NumPy view or `.data` (no version bump, e.g. a loader reusing its
    buffer) is used with its new values, not the remembered old ones (the output silently used the old ones)."""
    import numpy as np

    buf = np.array([0, 30, 64], dtype=np.int64)
    cu = torch.from_numpy(buf)
    x = make_inputs(1, 64, 4, 2, 16, 8, CFG, dtype=torch.float64, cu_seqlens=cu, seed=3)
    for backend in ("torch", "reference"):
        buf[1] = 30
        nsa.native_sparse_attention(*x, config=CFG, cu_seqlens=cu, backend=backend)
        buf[1] = 34  # same number of compressed tokens: the shapes stay valid
        got = nsa.native_sparse_attention(*x, config=CFG, cu_seqlens=cu, backend=backend)
        assert torch.equal(got, nsa.native_sparse_attention(*x, config=CFG, cu_seqlens=torch.tensor([0, 34, 64]),
                                                            backend=backend)), backend
        cu.data[1] = 30
        got = nsa.native_sparse_attention(*x, config=CFG, cu_seqlens=cu, backend=backend)
        assert torch.equal(got, nsa.native_sparse_attention(*x, config=CFG, cu_seqlens=torch.tensor([0, 30, 64]),
                                                            backend=backend)), backend
