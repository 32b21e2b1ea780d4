"""Decoding equivalences: prefill + token-by-token decode (and chunked prefill) == one full forward."""
import pytest
import torch

import nsa
from nsa.ops import reference as ref
from nsa.ops.decode import decode_attention
from tests.kit import assert_close, host_read_watch, make_inputs, small_config

CFG = small_config()  # l=8, d=4, l'=16, n=4, w=16
NO_OVERLAP = small_config(cmp_stride=8, window_size=12, num_selected=5)  # l = d, w not a multiple of l'
TOL64 = dict(atol=1e-10, rtol=1e-10)
TOL32 = dict(atol=1e-6, rtol=1e-5)
GROUPS = {1: (2, 2), 4: (8, 2), 16: (16, 1)}  # G -> (HQ, HKV)


def make_layer(G=4, config=CFG, dtype=torch.float64, shared_kv=False, backend="torch", hidden=32, seed=0):
    torch.manual_seed(seed)
    HQ, HKV = GROUPS[G]
    layer = nsa.NativeSparseAttention(hidden, HQ, HKV, 8, v_head_dim=6, config=config, shared_kv=shared_kv,
                                      backend="reference")
    torch.nn.init.normal_(layer.compress_k.mlp[2].weight, std=0.2)  # φ away from plain mean pooling
    torch.nn.init.normal_(layer.compress_v.mlp[2].weight, std=0.2)
    torch.nn.init.normal_(layer.g_proj.bias, std=1.0)
    layer = layer.to(dtype)
    layer.backend = backend
    return layer


def full_forward(layer, x):
    backend, layer.backend = layer.backend, "reference"
    try:
        return layer(x)
    finally:
        layer.backend = backend


def prefill_then_decode(layer, x, T, cache=None):
    cache = cache or nsa.NSACache(1, x.shape[0], x.shape[1])
    ys = [layer(x[:, :T], cache=cache)] if T else []
    for t in range(T, x.shape[1]):
        ys.append(layer(x[:, t:t + 1], cache=cache))
    return torch.cat(ys, 1), cache


# -------------------------------------------------------------------------------------------- op level
@pytest.mark.parametrize("impl", ["reference", "torch"])
@pytest.mark.parametrize("G", [1, 4, 16])
def test_decode_op_matches_full_reference(impl, G):
    """The last Tq queries of sequences of different lengths against the full reference on each prefix, including
    the chosen blocks, with the window read through an offset (win_start) tensor."""
    HQ, HKV = GROUPS[G]
    T, Tq = 45, 3
    lengths = torch.tensor([45, 30, 9, 3])
    B = len(lengths)
    inputs = make_inputs(B, T, HQ, HKV, 8, 6, CFG, seed=G)
    q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates = inputs
    pos = lengths[:, None] - Tq + torch.arange(Tq)
    take = lambda x: torch.stack([x[b, pos[b]] for b in range(B)])  # noqa: E731
    W = 20  # window tensor holds positions L-W .. L-1 of each row (some negative: never read)
    slot = lengths[:, None] - W + torch.arange(W)
    kw = torch.stack([k_win[b, slot[b].clamp(min=0)] for b in range(B)])
    vw = torch.stack([v_win[b, slot[b].clamp(min=0)] for b in range(B)])
    o, idx = decode_attention.__globals__["IMPLS"][impl](
        take(q), k_cmp, v_cmp, k_slc, v_slc, kw, vw, take(gates), lengths=lengths, config=CFG,
        win_start=lengths - W, return_indices=True)
    for b, L in enumerate(lengths.tolist()):
        Tc = CFG.num_compressed(L)
        row = [x[b:b + 1, :L] for x in inputs]
        row[1], row[2] = k_cmp[b:b + 1, :Tc], v_cmp[b:b + 1, :Tc]
        expected = ref.native_sparse_attention(*row, config=CFG)[0, L - Tq:]
        assert_close(o[b], expected, **TOL64, name=f"row {b}")
        sel = ref.select_blocks(row[0], row[1], config=CFG)[0, L - Tq:]
        assert torch.equal(idx[b], sel), f"row {b}: {idx[b].tolist()} vs {sel.tolist()}"


@pytest.mark.parametrize("layout", ["contiguous", "cache_slice", "head_major"])
def test_gather_rows_matches_advanced_indexing(layout):
    """The row gather reads x[b, t, h] through a [rows, D] view where x's memory allows (a whole tensor, a slice of
    a preallocated cache along the length) and falls back to advanced indexing otherwise (head-major memory)."""
    from nsa.ops.decode import _gather_rows
    g = torch.Generator().manual_seed(0)
    base = torch.randn(3, 50, 4, 6, generator=g)
    x = {"contiguous": base, "cache_slice": base[:, 5:37],
         "head_major": base.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)}[layout]
    b = torch.tensor([2, 0, 1])[:, None, None]
    t = torch.randint(0, x.shape[1], (3, 4, 7), generator=g)
    h = torch.arange(4)[None, :, None]
    assert torch.equal(_gather_rows(x, b, t, h), x[b, t, h])


def test_decode_op_fp32_cache_in_fp16():
    """Cached K/V may be stored in another dtype than q: the math runs in fp32 either way."""
    inputs = make_inputs(2, 40, 8, 2, 8, 6, CFG, dtype=torch.float32, seed=3)
    q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates = inputs
    lengths = torch.tensor([40, 33])
    qd = torch.stack([q[0, 39:40], q[1, 32:33]])
    gd = torch.stack([gates[0, 39:40], gates[1, 32:33]])
    half = [x.half() for x in (k_cmp, v_cmp, k_slc, v_slc, k_win, v_win)]
    a = decode_attention(qd, *half, gd, lengths=lengths, config=CFG, impl="torch")
    b = decode_attention(qd, *half, gd, lengths=lengths, config=CFG, impl="reference")
    assert a.dtype == torch.float32
    assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_decode_op_rejects_bad_input():
    q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates = make_inputs(1, 20, 4, 2, 8, 8, CFG)
    args = (q[:, -1:], k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates[:, -1:])
    with pytest.raises(ValueError, match="lengths"):
        decode_attention(*args, lengths=torch.tensor([21]), config=CFG)
    with pytest.raises(ValueError, match="k_cmp"):
        decode_attention(q[:, -1:], k_cmp[:, :1], *args[2:], lengths=torch.tensor([20]), config=CFG)
    with pytest.raises(ValueError, match="gates"):
        decode_attention(*args[:-1], gates, lengths=torch.tensor([20]), config=CFG)
    with pytest.raises(ValueError, match="impl"):
        decode_attention(*args, lengths=torch.tensor([20]), config=CFG, impl="nope")


# -------------------------------------------------------------------------------------------- layer level
# prompt lengths straddling l (8), d multiples (block ends 11, 15), l' = w (16) and 2l' (32); 0 = decode from scratch
BOUNDARY_T = [0, 1, 7, 8, 9, 11, 12, 13, 15, 16, 17, 31, 32, 33]


@pytest.mark.parametrize("T", BOUNDARY_T)
def test_prefill_then_decode_equals_full_forward(T):
    """float64, G = 4: prefill T tokens, decode up to 40 one token at a time, compare with one reference forward."""
    layer = make_layer(G=4)
    x = torch.randn(2, 40, 32, dtype=torch.float64)
    y, cache = prefill_then_decode(layer, x, T)
    assert_close(y, full_forward(layer, x), **TOL64)
    assert cache.lengths.tolist() == [40, 40]


@pytest.mark.parametrize("T", [11, 12, 13])
def test_prefill_then_decode_at_the_window_boundary(T):
    """w = 12 differs from l' = 16 and l = 8: prompts straddling w, decoded past 2w."""
    layer = make_layer(G=4, config=small_config(window_size=12))
    x = torch.randn(1, 27, 32, dtype=torch.float64)
    y, _ = prefill_then_decode(layer, x, T)
    assert_close(y, full_forward(layer, x), **TOL64)


@pytest.mark.parametrize("G", [1, 4, 16])
@pytest.mark.parametrize("config", [CFG, NO_OVERLAP], ids=["overlap", "l=d"])
@pytest.mark.parametrize("shared_kv", [False, True, "slc_win"], ids=["sep_kv", "shared_kv", "slc_win"])
def test_decode_groups_configs_shared_kv(G, config, shared_kv):
    layer = make_layer(G=G, config=config, shared_kv=shared_kv, seed=G)
    x = torch.randn(2, 37, 32, dtype=torch.float64)
    y, _ = prefill_then_decode(layer, x, 13)
    assert_close(y, full_forward(layer, x), **TOL64)


@pytest.mark.parametrize("G", [1, 16])
@pytest.mark.parametrize("T", [9, 16, 24])
def test_decode_fp32(G, T):
    layer = make_layer(G=G, dtype=torch.float32, seed=T)
    x = torch.randn(2, 36, 32)
    y, _ = prefill_then_decode(layer, x, T)
    assert_close(y, full_forward(layer, x), **TOL32)


def test_decode_reference_impl_through_layer():
    """backend="reference" decodes with the readable per-query reference."""
    layer = make_layer(G=4, backend="reference")
    x = torch.randn(1, 30, 32, dtype=torch.float64)
    y, _ = prefill_then_decode(layer, x, 10)
    assert_close(y, full_forward(layer, x), **TOL64)


@pytest.mark.parametrize("chunks", [[5, 14, 1, 20], [1] * 3 + [37], [16, 16, 8], [40]])
@pytest.mark.parametrize("shared_kv", [False, True, "slc_win"], ids=["sep_kv", "shared_kv", "slc_win"])
def test_chunked_prefill_equals_one_shot(chunks, shared_kv):
    layer = make_layer(G=4, shared_kv=shared_kv)
    x = torch.randn(2, 40, 32, dtype=torch.float64)
    one = nsa.NSACache(1, 2, 48)
    y_one = layer(x, cache=one)
    cache = nsa.NSACache(1, 2, 48)
    ys, s = [], 0
    for c in chunks:
        ys.append(layer(x[:, s:s + c], cache=cache))
        s += c
    assert_close(torch.cat(ys, 1), y_one, **TOL64)
    assert_close(y_one, full_forward(layer, x), **TOL64)
    for b in range(2):  # the caches themselves agree
        live, live1 = cache.layers[0].live(b), one.layers[0].live(b)
        for name, t in live.items():
            assert_close(t, live1[name], **TOL64, name=name)
    nxt = torch.randn(2, 1, 32, dtype=torch.float64)  # and so does the next decode step
    assert_close(layer(nxt, cache=cache), layer(nxt, cache=one), **TOL64)


def test_long_chunk_uses_query_chunking():
    """A chunk longer than the torch decode's query_chunk (32) after a non-empty cache."""
    layer = make_layer(G=4)
    x = torch.randn(1, 90, 32, dtype=torch.float64)
    cache = nsa.NSACache(1, 1, 90)
    y = torch.cat([layer(x[:, :7], cache=cache), layer(x[:, 7:], cache=cache)], 1)
    assert_close(y, full_forward(layer, x), **TOL64)


@pytest.mark.parametrize("G", [1, 4, 16])
def test_ragged_batch_prefill_and_decode(G):
    """Rows of different lengths: a right-padded prefill with new_lengths, then batched decode steps (every row at
    its own position), then a step where one row pauses (new_lengths 0). Each row equals its own full forward."""
    layer = make_layer(G=G, seed=G + 1)
    lens = [13, 0, 33, 8]
    steps = 6
    B = len(lens)
    seqs = [torch.randn(1, n + steps + 1, 32, dtype=torch.float64) for n in lens]
    cache = nsa.NSACache(1, B, 48)
    x = torch.zeros(B, max(lens), 32, dtype=torch.float64)
    for b, n in enumerate(lens):
        x[b, :n] = seqs[b][0, :n]
    y0 = layer(x, cache=cache, new_lengths=torch.tensor(lens))
    outs = [[y0[b, :n]] for b, n in enumerate(lens)]
    assert_close(y0[0, 13:], torch.zeros_like(y0[0, 13:]), atol=0, rtol=0, name="padding")
    for s in range(steps):
        step = torch.cat([seqs[b][:, n + s:n + s + 1] for b, n in enumerate(lens)])
        y = layer(step, cache=cache)
        for b in range(B):
            outs[b].append(y[b])
    assert cache.lengths.tolist() == [n + steps for n in lens]
    active = torch.tensor([1, 1, 0, 1])
    step = torch.cat([seqs[b][:, n + steps:n + steps + 1] for b, n in enumerate(lens)])
    y = layer(step, cache=cache, new_lengths=active)
    for b in range(B):
        if active[b]:
            outs[b].append(y[b])
    assert cache.lengths.tolist() == [n + steps + int(a) for n, a in zip(lens, active)]
    for b in range(B):
        got = torch.cat(outs[b])
        want = full_forward(layer, seqs[b][:, :got.shape[0]])[0]
        assert_close(got, want, **TOL64, name=f"row {b}")


def test_decode_under_no_grad_and_two_layers():
    """Two layers share one cache (each tracks its own fill); lengths reports layer 0."""
    l0, l1 = make_layer(G=4, seed=1), make_layer(G=4, seed=2)
    x = torch.randn(1, 30, 32, dtype=torch.float64)
    full = full_forward(l1, full_forward(l0, x))
    cache = nsa.NSACache(2, 1, 30)
    with torch.no_grad():
        h = l1(l0(x[:, :12], cache=cache, layer_idx=0), cache=cache, layer_idx=1)
        ys = [h]
        for t in range(12, 30):
            ys.append(l1(l0(x[:, t:t + 1], cache=cache, layer_idx=0), cache=cache, layer_idx=1))
    assert_close(torch.cat(ys, 1), full, **TOL64)
    assert cache.lengths.tolist() == [30]


@pytest.mark.parametrize("backend", ["reference", "torch", "auto"])
def test_public_decode_attention_equals_full_forward(backend):
    """nsa.decode_attention over caches the caller keeps: ragged rows (each the last Tq = 3 positions of its own
    sequence), a window tensor that is a ring slice (win_start per row), float64: the full forward's last rows."""
    T, Tq = 45, 3
    q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates = make_inputs(2, T, 8, 2, 8, 6, CFG, seed=9)
    full = nsa.native_sparse_attention(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, config=CFG,
                                       backend="reference")
    lengths = torch.tensor([T, 37])
    rows = [lengths[b] - Tq + torch.arange(Tq) for b in range(2)]
    qd = torch.stack([q[b, rows[b]] for b in range(2)])
    gd = torch.stack([gates[b, rows[b]] for b in range(2)])
    win_start = lengths - Tq - CFG.window_size + 1  # the window slots cover the last w + Tq - 1 positions
    W = CFG.window_size + Tq - 1
    slot = win_start[:, None] + torch.arange(W)
    kw = torch.stack([k_win[b, slot[b]] for b in range(2)])
    vw = torch.stack([v_win[b, slot[b]] for b in range(2)])
    out = nsa.decode_attention(qd, k_cmp, v_cmp, k_slc, v_slc, kw, vw, gd, lengths=lengths, config=CFG,
                               win_start=win_start, backend=backend)
    # row 1 as a sequence of 37 tokens on its own
    short = [x[1:2, :37] for x in (q, k_slc, v_slc, k_win, v_win, gates)]
    tc = CFG.num_compressed(37)
    full_short = nsa.native_sparse_attention(short[0], k_cmp[1:2, :tc], v_cmp[1:2, :tc], *short[1:], config=CFG,
                                             backend="reference")
    assert_close(out[0], full[0, rows[0]], name="row 0", **TOL64)
    assert_close(out[1], full_short[0, rows[1]], name="row 1", **TOL64)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_decode_attention_is_differentiable(backend):
    """Inputs that require a gradient get it: the kernels (compiled CPU decode, Triton decode) have no backward, so
    under grad mode the pure-PyTorch decode runs (before, the output silently had no grad_fn). Float32 gradients of
    every input against the float64 reference decode; under no_grad the kernel still runs."""
    from nsa.ops import decode

    T, Tq = 45, 2
    x = list(make_inputs(2, T, 8, 2, 8, 6, CFG, dtype=torch.float32, seed=3))
    lengths = torch.tensor([T, 30])
    rows = [lengths[b] - Tq + torch.arange(Tq) for b in range(2)]
    x[0] = torch.stack([x[0][b, rows[b]] for b in range(2)])
    x[7] = torch.stack([x[7][b, rows[b]] for b in range(2)])
    weight = torch.randn(2, Tq, 8, 6)

    def grads(args, fn):
        args = [a.detach().clone().requires_grad_() for a in args]
        out = fn(*args)
        assert out.grad_fn is not None
        return torch.autograd.grad((out * weight.to(out.dtype)).sum(), args)

    got = grads(x, lambda *a: nsa.decode_attention(*a, lengths=lengths, config=CFG, backend=backend))
    want = grads([a.double() for a in x], lambda *a: decode.reference_decode(*a, lengths=lengths, config=CFG))
    for name, g, w in zip(("q", "k_cmp", "v_cmp", "k_slc", "v_slc", "k_win", "v_win", "gates"), got, want):
        assert_close(g, w, atol=1e-5, rtol=1e-4, name=f"d{name}")
    with torch.no_grad():
        out = nsa.decode_attention(*[a.requires_grad_() for a in x], lengths=lengths, config=CFG, backend=backend)
    assert out.grad_fn is None and torch.isfinite(out).all()


def test_public_decode_attention_rejects_bad_input():
    q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates = make_inputs(1, 20, 4, 2, 8, 6, CFG)
    args = [q[:, -1:], k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates[:, -1:]]
    kw = dict(lengths=torch.tensor([20]), config=CFG)
    bad = {
        "backend": (args, dict(backend="nope")),
        "scale": (args, dict(scale=-1.0)),
        "k_win head dim": ([*args[:5], k_win[..., :4], *args[6:]], {}),
        "v_win head dim": ([*args[:6], v_win[..., :4], args[7]], {}),
        "v_slc length": ([*args[:4], v_slc[:, :19], *args[5:]], {}),
        "k_slc must be a floating": ([*args[:3], k_slc.long(), *args[4:]], {}),
        "win_start": (args, dict(win_start=torch.tensor([0.5]))),
        "config": (args, dict(config="paper")),
        "k_win/v_win .* must hold positions 4..19": ([*args[:5], k_win[:, :10], v_win[:, :10], args[7]], {}),
        "must hold positions": (args, dict(win_start=torch.tensor([5]))),
        "head dims must be positive": ([q[:, -1:, :, :0], k_cmp[..., :0], *args[2:3], k_slc[..., :0], *args[4:5],
                                        k_win[..., :0], *args[6:]], {}),
        "both positive": ([q[:, -1:, :0], *args[1:7], gates[:, -1:, :0]], {}),
        "lengths must be .* int32/int64": (args, dict(lengths=torch.tensor([20], dtype=torch.uint8))),
    }
    for match, (a, extra) in bad.items():
        with pytest.raises(ValueError, match=match):
            nsa.decode_attention(*a, **{**kw, **extra})
    empty = nsa.decode_attention(*[x[:0] for x in args], lengths=torch.zeros(0, dtype=torch.long), config=CFG)
    assert empty.shape == (0, 1, 4, 6)


@pytest.mark.parametrize("backend", ["reference", "torch"] + (["triton"] if "triton" in nsa.available_backends()
                                                             else []))
def test_decode_attention_ignores_slots_past_each_row(backend):
    """A caller's cache may hold anything past a row's length (here NaN, in K and V, selection and compressed
    slots): ragged rows and a 2-token chunk give the output of a clean cache (the torch decode multiplied masked
    slots by probability 0, and 0 * NaN leaked into o)."""
    dtype = torch.float64 if backend != "triton" else torch.float32
    q, k_cmp, v_cmp, k_slc, v_slc, _, _, gates = make_inputs(2, 48, 8, 2, 8, 6, CFG, dtype=dtype, seed=21)
    lengths, Tq = torch.tensor([40, 27]), 2
    rows = [lengths[b] - Tq + torch.arange(Tq) for b in range(2)]
    qd, gd = torch.stack([q[b, rows[b]] for b in range(2)]), torch.stack([gates[b, rows[b]] for b in range(2)])
    dirty = [x.clone() for x in (k_cmp, v_cmp, k_slc, v_slc)]
    for b, L in enumerate(lengths.tolist()):
        tc = CFG.num_compressed(L)
        dirty[0][b, tc:], dirty[1][b, tc:] = float("nan"), float("nan")
        dirty[2][b, L:], dirty[3][b, L:] = float("nan"), float("nan")
    run = lambda kc, vc, ks, vs: nsa.decode_attention(qd, kc, vc, ks, vs, ks, vs, gd, lengths=lengths,  # noqa
                                                      config=CFG, backend=backend)
    clean = run(k_cmp, v_cmp, k_slc, v_slc)
    out = run(*dirty)
    assert torch.isfinite(clean).all()
    assert_close(out, clean, atol=1e-6, rtol=1e-6, name="dirty cache")


BOUNDED_BACKENDS = ["reference", "torch"] + (["triton"] if "triton" in nsa.available_backends() else [])


def _capacity_cache(dtype, seed=21, S=64):
    """A cache of capacity S slots for 2 rows of lengths 40 and 27, NaN past each row (as a reused buffer may be),
    with the last Tq = 2 queries of each row and a window ring of 20 slots starting at win_start."""
    q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates = make_inputs(2, S, 8, 2, 8, 6, CFG, dtype=dtype, seed=seed)
    lengths, Tq = torch.tensor([40, 27]), 2
    rows = [lengths[b] - Tq + torch.arange(Tq) for b in range(2)]
    qd, gd = torch.stack([q[b, rows[b]] for b in range(2)]), torch.stack([gates[b, rows[b]] for b in range(2)])
    for b, L in enumerate(lengths.tolist()):
        tc = CFG.num_compressed(L)
        k_cmp[b, tc:], v_cmp[b, tc:], k_slc[b, L:], v_slc[b, L:] = (float("nan"),) * 4
    win_start = lengths - 20
    slot = win_start[:, None] + torch.arange(20)
    kw, vw = torch.stack([k_win[b, slot[b]] for b in range(2)]), torch.stack([v_win[b, slot[b]] for b in range(2)])
    return (qd, k_cmp, v_cmp, k_slc, v_slc, gd), (kw, vw, win_start), lengths


@pytest.mark.parametrize("backend", BOUNDED_BACKENDS)
def test_decode_attention_sized_by_max_length(backend):
    """max_length (a host bound, e.g. the cache capacity) in place of the lengths' values: the same output as the
    exact call, with the window read from the selection cache and from a ring (win_start), ragged rows, Tq = 2."""
    dtype = torch.float64 if backend != "triton" else torch.float32
    (qd, k_cmp, v_cmp, k_slc, v_slc, gd), (kw, vw, ws), lengths = _capacity_cache(dtype)
    tol = TOL64 if dtype == torch.float64 else dict(atol=1e-6, rtol=1e-6)
    for k_win, v_win, win_start in ((k_slc, v_slc, None), (kw, vw, ws)):
        run = lambda **extra: nsa.decode_attention(qd, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gd,  # noqa: E731
                                                   lengths=lengths, config=CFG, win_start=win_start,
                                                   backend=backend, **extra)
        exact = run()
        assert torch.isfinite(exact).all()
        for bound in (40, 41, 64):
            assert_close(run(max_length=bound), exact, name=f"max_length={bound}", **tol)


@pytest.mark.parametrize("backend", BOUNDED_BACKENDS)
def test_decode_attention_max_length_marks_bad_rows_nan(backend):
    """With max_length nothing is read back, so rows that cannot be served (length past max_length or below Tq, a
    window ring that does not hold the row's window) come out NaN instead of raising; the other rows are exact."""
    dtype = torch.float64 if backend != "triton" else torch.float32
    (qd, k_cmp, v_cmp, k_slc, v_slc, gd), (kw, vw, ws), lengths = _capacity_cache(dtype)
    run = lambda lens, k_win, v_win, win_start, **extra: nsa.decode_attention(  # noqa: E731
        qd, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gd, lengths=lens, config=CFG, win_start=win_start,
        backend=backend, **extra)
    exact = {False: run(lengths, k_slc, v_slc, None), True: run(lengths, kw, vw, ws)}
    cases = [(torch.tensor([40, 50]), k_slc, v_slc, None, 45),   # row 1 past max_length
             (torch.tensor([70, 27]), k_slc, v_slc, None, 64),   # row 0 past the cache's 64 slots
             (torch.tensor([1, 27]), k_slc, v_slc, None, 64),    # row 0 shorter than its Tq = 2 queries
             (lengths, kw, vw, ws - torch.tensor([0, 3]), 64),   # row 1's ring misses its newest 3 positions
             (lengths, kw, vw, ws + torch.tensor([5, 0]), 64)]   # row 0's ring misses its oldest window positions
    far = torch.tensor([0, -2**31 + 1], dtype=torch.int32)  # int32 arithmetic on these would wrap and pass row 1
    cases.append((lengths.int(), kw, vw, torch.where(far < 0, far, ws.int()), 64))
    for lens, k_win, v_win, win_start, bound in cases:
        out = run(lens, k_win, v_win, win_start, max_length=bound)
        bad = (lens != lengths) | (win_start is not None and (win_start.long() != ws))
        for b in range(2):
            if bad[b]:
                assert torch.isnan(out[b]).all(), f"row {b} should be NaN"
            else:
                assert_close(out[b], exact[win_start is not None][b], atol=1e-6, rtol=1e-6, name=f"row {b}")


def test_decode_attention_max_length_reads_no_values(monkeypatch):
    """With max_length the entry point reads neither the lengths nor win_start on the host (a CUDA graph can capture
    it), and sizes the kernels by max_length."""
    from nsa.ops import decode

    Watched = host_read_watch()
    seen = {}
    monkeypatch.setitem(decode.IMPLS, "torch", lambda *a, **kw: seen.update(kw) or a[0][..., :6].clone())
    (qd, k_cmp, v_cmp, k_slc, v_slc, gd), (kw, vw, ws), lengths = _capacity_cache(torch.float64)
    out = nsa.decode_attention(qd, k_cmp, v_cmp, k_slc, v_slc, kw, vw, gd, lengths=lengths.as_subclass(Watched),
                               win_start=ws.as_subclass(Watched), config=CFG, backend="torch", max_length=64)
    assert Watched.reads == [] and seen["max_len"] == 64 and out.shape == (2, 2, 8, 6)
    nsa.decode_attention(qd, k_cmp, v_cmp, k_slc, v_slc, kw, vw, gd, lengths=lengths.as_subclass(Watched),
                         win_start=ws.as_subclass(Watched), config=CFG, backend="torch")
    assert Watched.reads, "the exact call reads the lengths (the watch must see host reads)"


@pytest.mark.parametrize("backend", BOUNDED_BACKENDS)
def test_decode_attention_empty_chunk(backend):
    """Tq = 0 (no new queries) gives an empty output on every backend (the torch decode indexed an empty list)."""
    (qd, k_cmp, v_cmp, k_slc, v_slc, gd), _, lengths = _capacity_cache(torch.float32)
    for bound in (None, 64):
        out = nsa.decode_attention(qd[:, :0], k_cmp, v_cmp, k_slc, v_slc, k_slc, v_slc, gd[:, :0], lengths=lengths,
                                   config=CFG, backend=backend, max_length=bound)
        assert out.shape == (2, 0, 8, 6)


def test_decode_attention_max_length_rejects_bad_bounds():
    (qd, k_cmp, v_cmp, k_slc, v_slc, gd), (kw, vw, ws), lengths = _capacity_cache(torch.float64)
    run = lambda bound, kc=k_cmp, vc=v_cmp, k_win=k_slc, v_win=v_slc: nsa.decode_attention(  # noqa: E731
        qd, kc, vc, k_slc, v_slc, k_win, v_win, gd, lengths=lengths, config=CFG, max_length=bound)
    for bound, match in ((1, "max_length must be an int >= 2"), (True, "max_length must be"),
                         (40.0, "max_length must be"), (65, "k_slc to hold 65 slots")):
        with pytest.raises(ValueError, match=match):
            run(bound)
    with pytest.raises(ValueError, match="k_win 64"):
        run(64, k_win=kw, v_win=vw)  # no win_start: the window is indexed by position, up to max_length
    with pytest.raises(ValueError, match="compressed tokens"):
        run(64, kc=k_cmp[:, :CFG.num_compressed(60)], vc=v_cmp[:, :CFG.num_compressed(60)])
    with pytest.raises(ValueError, match="max_length must be"):  # checked for an empty batch too
        nsa.decode_attention(*[x[:0] for x in (qd, k_cmp, v_cmp, k_slc, v_slc, k_slc, v_slc, gd)],
                             lengths=lengths[:0], config=CFG, max_length=0)
    with pytest.raises(ValueError, match="host_lengths"):
        nsa.decode_attention(qd, k_cmp, v_cmp, k_slc, v_slc, k_slc, v_slc, gd, lengths=lengths, config=CFG,
                             max_length=64, host_lengths=lengths)


STATIC_GEOMETRIES = [CFG, NO_OVERLAP, small_config(cmp_block_size=4, cmp_stride=4, slc_block_size=4, window_size=8)]


def _static_and_eager(G=4, config=CFG, shared_kv=False, S=70, backend="torch"):
    """A layer, a static and an ordinary cache (3 rows, capacity S), both after the same ragged prefill."""
    layer = make_layer(G=G, config=config, shared_kv=shared_kv, backend=backend)
    x = torch.randn(3, 17, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    caches = nsa.NSACache(1, 3, S, static=True), nsa.NSACache(1, 3, S)
    for cache in caches:
        layer(x, cache=cache, new_lengths=torch.tensor([9, 0, 17]))
    return layer, caches


@pytest.mark.parametrize("shared_kv", [False, True, "slc_win"])
@pytest.mark.parametrize("config", STATIC_GEOMETRIES, ids=["overlap", "no_overlap", "l_eq_lp"])
@pytest.mark.parametrize("G", [1, 16])
def test_static_cache_steps_equal_ordinary_steps(shared_kv, config, G):
    """Decode steps on a static cache (no host lengths, every row's candidate block through φ, attention sized by
    the capacity) give the ordinary steps' outputs and cache contents: ragged rows (one starting empty), 50 steps
    across compressed-token emissions, window wrap-around and new selection blocks (float64)."""
    layer, (static, eager) = _static_and_eager(G, config, shared_kv)
    g = torch.Generator().manual_seed(2)
    for step in range(50):
        x = torch.randn(3, 1, 32, dtype=torch.float64, generator=g)
        a, b = layer(x, cache=static), layer(x, cache=eager)
        assert torch.isfinite(a).all(), f"step {step}"
        assert_close(a, b, name=f"step {step}", **TOL64)
    assert static.lengths.tolist() == eager.lengths.tolist() == [59, 50, 67]
    for row in range(3):
        mine, theirs = static.layers[0].live(row), eager.layers[0].live(row)
        for name in theirs:
            assert torch.equal(mine[name], theirs[name]), (row, name)


def test_static_step_reads_no_lengths_on_the_host(monkeypatch):
    """A static step never reads the lengths (or anything computed from them) on the host: no synchronisation, no
    host decision, so a CUDA graph captured once replays every later step."""
    from nsa.cache import LayerCache
    from nsa.ops import decode

    Watched = host_read_watch()
    layer, (static, _) = _static_and_eager()
    lc = static.layers[0]
    lc.lengths = lc.lengths.as_subclass(Watched)
    monkeypatch.setattr("nsa.cache.capturing", lambda: True)  # as under CUDA-graph capture: no room check either
    real = decode.IMPLS["torch"]  # the CPU torch decode reads min(lengths) itself (free on the CPU, skipped on GPU)
    unwrap = lambda a: a.as_subclass(torch.Tensor) if isinstance(a, torch.Tensor) else a  # noqa: E731
    monkeypatch.setitem(decode.IMPLS, "torch", lambda *a, **kw: real(*map(unwrap, a),
                                                                      **{k: unwrap(v) for k, v in kw.items()}))
    monkeypatch.setattr(LayerCache, "host_lengths", property(lambda self: pytest.fail("host_lengths read")))
    for _ in range(20):
        layer(torch.randn(3, 1, 32, dtype=torch.float64), cache=static)
    assert Watched.reads == []
    assert torch.Tensor.tolist(lc.lengths) == [29, 20, 37]


def test_static_cache_full_row_is_nan_and_keeps_its_cache(monkeypatch):
    """Eagerly, a static step into a full row raises like an ordinary one. While a CUDA graph is captured it cannot
    (no read of the lengths): a row at capacity keeps its cache and its output is NaN; the other rows step on."""
    layer, (static, eager) = _static_and_eager(S=18)
    step = torch.randn(3, 1, 32, dtype=torch.float64)
    layer(step, cache=static)
    with pytest.raises(ValueError, match="max_length 18 exceeded: 19"):
        layer(step, cache=static)
    layer, (static, eager) = _static_and_eager(S=18)
    monkeypatch.setattr("nsa.cache.capturing", lambda: True)
    x = torch.randn(3, 2, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    for t in range(2):
        out = layer(x[:, t:t + 1], cache=static)
        if t == 0:
            assert_close(out, layer(x[:, :1], cache=eager), name="first step", **TOL64)
            before = {k: v.clone() for k, v in static.layers[0].tensors().items()}
    assert static.lengths.tolist() == [11, 2, 18]
    assert torch.isnan(out[2]).all() and torch.isfinite(out[:2]).all()
    for name, t in static.layers[0].tensors().items():
        assert torch.equal(t[2], before[name][2]), name
    with pytest.raises(ValueError, match="max_length"):
        layer(x, cache=static)  # a 2-token call takes the eager path, which checks the room on the host


def test_static_cache_first_call_under_capture_is_refused(monkeypatch):
    """Storage allocated inside a CUDA graph would be zeroed by every replay: a static cache's first call for a
    layer must run before capture (a ValueError says so)."""
    layer = make_layer()
    cache = nsa.NSACache(1, 2, 30, static=True)
    monkeypatch.setattr("nsa.cache.capturing", lambda: True)
    with pytest.raises(ValueError, match="before capturing"):
        layer(torch.randn(2, 1, 32, dtype=torch.float64), cache=cache)
    monkeypatch.setattr("nsa.cache.capturing", lambda: False)
    layer(torch.randn(2, 1, 32, dtype=torch.float64), cache=cache)
    assert cache.lengths.tolist() == [1, 1]


@pytest.mark.skipif("triton" not in nsa.available_backends(), reason="needs triton")
def test_static_cache_steps_with_the_triton_decode():
    """The static step through the Triton decode kernels (interpreter on CPU, float32): the ordinary steps' output."""
    layer, (static, eager) = _static_and_eager(G=4, shared_kv="slc_win", backend="triton")
    layer.float()
    static, eager = nsa.NSACache(1, 3, 40, static=True), nsa.NSACache(1, 3, 40)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 17, 32, generator=g)
    for cache in (static, eager):
        layer(x, cache=cache, new_lengths=torch.tensor([9, 0, 17]))
    for step in range(6):
        x = torch.randn(3, 1, 32, generator=g)
        a, b = layer(x, cache=static), layer(x, cache=eager)
        assert torch.isfinite(a).all()
        assert_close(a, b, atol=1e-5, rtol=1e-5, name=f"step {step}")


def test_static_cache_chunk_after_steps():
    """After static steps, a multi-token chunk (the eager path, reading the lengths from the device) continues
    each row exactly as on an ordinary cache."""
    layer, (static, eager) = _static_and_eager()
    g = torch.Generator().manual_seed(4)
    for T in (1, 1, 5, 1, 3):
        x = torch.randn(3, T, 32, dtype=torch.float64, generator=g)
        assert_close(layer(x, cache=static), layer(x, cache=eager), name=f"T={T}", **TOL64)
    assert static.lengths.tolist() == eager.lengths.tolist()


def test_serving_loop_with_own_caches_equals_the_full_forward():
    """A serving engine keeping its own caches: per token `project_tokens`, a compressed token by `compress` when
    a block completes, then `nsa.decode_attention`: equal to one full forward (float64)."""
    cfg = nsa.NSAConfig(cmp_block_size=8, cmp_stride=4, slc_block_size=16, num_selected=4, window_size=16)
    torch.manual_seed(0)
    layer = nsa.NativeSparseAttention(64, 4, 2, 16, config=cfg, shared_kv=True).double().eval()
    torch.nn.init.normal_(layer.compress_k.mlp[2].weight, std=0.1)
    B, T, S, l, d = 2, 45, 64, cfg.cmp_block_size, cfg.cmp_stride
    x = torch.randn(B, T, 64, dtype=torch.float64)
    k_slc, v_slc = torch.zeros(B, S, 2, 16, dtype=torch.float64), torch.zeros(B, S, 2, 16, dtype=torch.float64)
    k_cmp = torch.zeros(B, cfg.num_compressed(S), 2, 16, dtype=torch.float64)
    v_cmp, raw_k, raw_v = torch.zeros_like(k_cmp), torch.zeros_like(k_slc), torch.zeros_like(k_slc)
    outs = []
    with torch.no_grad():
        full = layer(x)
        for t in range(T):
            q, kc_raw, vc_raw, ks, vs, _, _, g = layer.project_tokens(x[:, t:t + 1], torch.full((B, 1), t))
            k_slc[:, t], v_slc[:, t], raw_k[:, t], raw_v[:, t] = ks[:, 0], vs[:, 0], kc_raw[:, 0], vc_raw[:, 0]
            if t + 1 >= l and (t + 1 - l) % d == 0:
                i = (t + 1 - l) // d
                kc, vc = layer.compress(raw_k[:, i * d:i * d + l], raw_v[:, i * d:i * d + l], torch.tensor([t]))
                k_cmp[:, i], v_cmp[:, i] = kc[:, 0], vc[:, 0]
            o = nsa.decode_attention(q, k_cmp, v_cmp, k_slc, v_slc, k_slc, v_slc, g, lengths=torch.full((B,), t + 1),
                                     config=cfg)
            outs.append(layer.o_proj(o.reshape(B, 1, -1)))
    assert_close(torch.cat(outs, 1), full, atol=1e-10, rtol=1e-10, name="serving loop")


def test_chunk_queries_do_not_read_a_later_querys_nan():
    """Causality with NaN: in a chunk of Tq queries, a compressed token only a later query sees may hold NaN (it
    came from that query's own tokens); the earlier queries' outputs stay finite and equal to decoding them alone
    (vectorised torch path, float64; it leaked 0 * NaN before)."""
    from nsa.ops import decode

    cfg = CFG
    q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates = make_inputs(2, 60, 8, 2, 8, 6, cfg, seed=31)
    lengths, Tq = torch.tensor([60, 45]), 6
    last = [cfg.num_compressed(int(L)) - 1 for L in lengths]  # the newest compressed token of each row
    for b, i in enumerate(last):
        v_cmp[b, i] = float("nan")
    rows = decode.query_positions(lengths, Tq)
    qq = torch.stack([q[b, rows[b]] for b in range(2)])
    gg = torch.stack([gates[b, rows[b]] for b in range(2)])
    o = decode.torch_decode(qq, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gg, lengths=lengths, config=cfg)
    for b, L in enumerate(lengths.tolist()):
        for j in range(Tq):
            t = L - Tq + j
            sees_nan = last[b] * cfg.cmp_stride + cfg.cmp_block_size - 1 <= t
            assert bool(torch.isnan(o[b, j]).all()) == sees_nan, (b, j)
            if not sees_nan:
                alone = decode.torch_decode(qq[b:b + 1, j:j + 1], k_cmp[b:b + 1], v_cmp[b:b + 1], k_slc[b:b + 1],
                                            v_slc[b:b + 1], k_win[b:b + 1], v_win[b:b + 1], gg[b:b + 1, j:j + 1],
                                            lengths=torch.tensor([t + 1]), config=cfg)
                assert_close(o[b, j], alone[0, 0], **TOL64, name=f"row {b} query {j}")
