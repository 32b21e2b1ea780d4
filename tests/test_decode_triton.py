"""The Triton decode kernel (interpreter on CPU, compiled on CUDA) against the decode reference and the layer."""
import pytest
import torch

import nsa
from nsa.ops.decode import decode_attention, reference_decode, torch_decode
from tests.kit import assert_close, make_inputs, small_config
from tests.test_decode import GROUPS, full_forward, make_layer

triton_decode_mod = pytest.importorskip("nsa.ops.triton_decode")
CFG = small_config()  # l=8, d=4, l'=16, n=4, w=16
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def last_queries(inputs, lengths):
    q, *_, gates = inputs
    qd = torch.stack([q[b, L - 1:L] for b, L in enumerate(lengths.tolist())])
    gd = torch.stack([gates[b, L - 1:L] for b, L in enumerate(lengths.tolist())])
    return qd, gd


@pytest.mark.parametrize("G,window", [(1, 16), (4, 16), (16, 16), (4, 40)])
def test_triton_decode_matches_reference(G, window):
    """Rows of different lengths (shorter than l, inside the first selection block, past the window), the window
    read through an offset tensor (a window of 40 spans three l'-chunks, some partly empty); outputs and chosen
    blocks."""
    HQ, HKV = GROUPS[G]
    cfg = small_config(num_selected=5, window_size=window) if G == 4 else CFG
    lengths = torch.tensor([45, 30, 5, 1, 17])
    inputs = make_inputs(5, 45, HQ, HKV, 8, 6, cfg, dtype=torch.float32, seed=G + window, device=DEVICE)
    _, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, _ = inputs
    qd, gd = last_queries(inputs, lengths)
    W = max(24, window)
    ws = lengths - W
    slot = (ws[:, None] + torch.arange(W)).clamp(min=0).to(DEVICE)
    kw = torch.stack([k_win[b, slot[b]] for b in range(5)])
    vw = torch.stack([v_win[b, slot[b]] for b in range(5)])
    kw_args = dict(lengths=lengths.to(DEVICE), config=cfg, win_start=ws.to(DEVICE), return_indices=True)
    o, idx = triton_decode_mod.triton_decode(qd, k_cmp, v_cmp, k_slc, v_slc, kw, vw, gd, **kw_args)
    o_ref, idx_ref = reference_decode(qd, k_cmp, v_cmp, k_slc, v_slc, kw, vw, gd, **kw_args)
    assert torch.equal(idx.cpu(), idx_ref.cpu())
    assert_close(o, o_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("max_len,select_blocks", [(None, 1024), (8400, 1024), (8400, 8)])
def test_triton_decode_many_partials(max_len, select_blocks, monkeypatch):
    """Long contexts split over many programs: 17 compressed-token partials and 13 window chunks, so the lse pass
    and the merge take several steps of partials, the last one partly empty; rows of different lengths. With
    max_len = 2x the longest row (a grid sized for a capacity) each row spreads its own compressed tokens over the
    66 programs; with 8 blocks per top-n chunk the selection merges 33 and 24 chunks per row."""
    monkeypatch.setattr(triton_decode_mod, "SELECT_BLOCKS", select_blocks)
    cfg = small_config(window_size=200)
    lengths = torch.tensor([4200, 3001])
    inputs = make_inputs(2, 4200, 4, 1, 16, 8, cfg, dtype=torch.float32, seed=3, device=DEVICE)
    qd, gd = last_queries(inputs, lengths)
    _, *kv, _ = inputs
    kw = dict(lengths=lengths.to(DEVICE), config=cfg, return_indices=True)
    o, idx = triton_decode_mod.triton_decode(qd, *kv, gd, target_programs=10_000, max_len=max_len, **kw)
    o_ref, idx_ref = reference_decode(qd, *kv, gd, **kw)
    assert torch.equal(idx.cpu(), idx_ref.cpu())
    assert_close(o, o_ref, atol=1e-5, rtol=1e-5)


def test_triton_decode_half_precision_cache():
    """fp16 q and cache: within fp16 rounding of the fp32 torch decode on the same (rounded) values."""
    lengths = torch.tensor([40, 23])
    inputs = make_inputs(2, 40, 16, 1, 16, 16, CFG, dtype=torch.float16, seed=7, device=DEVICE)
    qd, gd = last_queries(inputs, lengths)
    _, *kv, _ = inputs
    o = triton_decode_mod.triton_decode(qd, *kv, gd, lengths=lengths.to(DEVICE), config=CFG)
    o32 = torch_decode(qd.float(), *[x.float() for x in kv], gd.float(), lengths=lengths.to(DEVICE), config=CFG)
    assert o.dtype == torch.float16
    assert_close(o, o32, atol=2e-3, rtol=2e-2)


@pytest.mark.parametrize("G,budget", [(1, None), (4, None), (4, 1)])
def test_triton_chunked_prefill_matches_reference(G, budget, monkeypatch):
    """Tq > 1 (chunked prefill): every query of the chunk is a row over its own prefix, reading its sequence's cache
    row; rows of different lengths, the window through an offset tensor, chunks crossing compressed-block ends and
    the first query shorter than l. Outputs and chosen blocks against the decode reference, and decode_attention's
    impl="triton" takes this path. budget = 1 byte: one query per pass (SCORES_BUDGET splits long chunks)."""
    if budget is not None:
        monkeypatch.setattr(triton_decode_mod, "SCORES_BUDGET", budget)
    HQ, HKV = GROUPS[G]
    cfg = small_config(num_selected=5, window_size=16)
    lengths, Tq = torch.tensor([45, 30, 11]), 7
    inputs = make_inputs(3, 45, HQ, HKV, 8, 6, cfg, dtype=torch.float32, seed=G, device=DEVICE)
    q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates = inputs
    qd = torch.stack([q[b, L - Tq:L] for b, L in enumerate(lengths.tolist())])
    gd = torch.stack([gates[b, L - Tq:L] for b, L in enumerate(lengths.tolist())])
    W = 24  # the window buffer holds positions L - W .. L - 1 of each row
    ws = lengths - W
    slot = (ws[:, None] + torch.arange(W)).clamp(min=0).to(DEVICE)
    kw = torch.stack([k_win[b, slot[b]] for b in range(3)])
    vw = torch.stack([v_win[b, slot[b]] for b in range(3)])
    args = (qd, k_cmp, v_cmp, k_slc, v_slc, kw, vw, gd)
    kw_args = dict(lengths=lengths.to(DEVICE), config=cfg, win_start=ws.to(DEVICE), return_indices=True)
    o, idx = triton_decode_mod.triton_decode(*args, **kw_args)
    o_ref, idx_ref = reference_decode(*args, **kw_args)
    assert o.shape == (3, Tq, HQ, 6) and idx.shape == (3, Tq, HKV, 5)
    assert torch.equal(idx.cpu(), idx_ref.cpu())
    assert_close(o, o_ref, atol=1e-5, rtol=1e-5)
    kw_args.pop("return_indices")
    assert torch.equal(decode_attention(*args, **kw_args, impl="triton"), o)


@pytest.mark.parametrize("shared_kv", [False, True], ids=["sep_kv", "shared_kv"])
def test_layer_decode_with_triton_backend(shared_kv):
    """Prefill with the torch backend, a chunk of 5 and then single tokens with backend="triton" (the chunk through
    the Triton chunked-prefill path): equals the full reference forward."""
    layer = make_layer(G=4, dtype=torch.float32, shared_kv=shared_kv).to(DEVICE)
    x = torch.randn(2, 27, 32, device=DEVICE)
    cache = nsa.NSACache(1, 2, 27)
    ys = [layer(x[:, :14], cache=cache)]
    layer.backend = "triton"
    ys.append(layer(x[:, 14:19], cache=cache))  # crosses the compressed-block end 15 and the selection block at 16
    for t in range(19, 27):  # crosses compressed-block ends 19 and 23
        ys.append(layer(x[:, t:t + 1], cache=cache))
    assert_close(torch.cat(ys, 1), full_forward(layer, x), atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_triton_decode_paper_geometry_gpu(dtype):
    """Paper geometry at 8k with G = 16, head dims 192/128, batch rows of different lengths."""
    cfg = nsa.NSAConfig()
    lengths = torch.tensor([8192, 5000, 700], device="cuda")
    inputs = make_inputs(3, 8192, 16, 1, 192, 128, cfg, dtype=dtype, seed=0, device="cuda")
    qd, gd = last_queries(inputs, lengths.cpu())
    _, *kv, _ = inputs
    o, idx = triton_decode_mod.triton_decode(qd, *kv, gd, lengths=lengths, config=cfg, return_indices=True)
    o_ref, idx_ref = torch_decode(qd, *kv, gd, lengths=lengths, config=cfg, return_indices=True)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=5e-2)
    if dtype == torch.float32:
        assert torch.equal(idx, idx_ref)
    assert_close(o, o_ref, **tol)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("shared_kv", [False, True])
def test_gpu_decode_step_never_waits_for_the_gpu(shared_kv):
    """One-token decode steps through the layer (triton), over rows of different lengths and across compressed-token
    emissions (every d tokens, on different steps per row), run with torch's sync debug mode set to error: no
    device read and no blocking host-to-device copy. (Paper head dims and G = 16 in bf16, so the decode kernels are
    those test_triton_decode_paper_geometry_gpu built; the cache is filled directly, no prefill kernels.)"""
    layer = nsa.NativeSparseAttention(512, 16, 1, 192, v_head_dim=128, config=nsa.NSAConfig(), shared_kv=shared_kv,
                                      backend="triton").to("cuda", torch.bfloat16)
    cache = nsa.NSACache(1, batch_size=2, max_length=2048)
    lc = cache.layer(0, num_kv_heads=1, head_dim=192, v_head_dim=128, config=layer.config,
                     shared_kv=layer.window_reads_slc, device="cuda", dtype=torch.bfloat16)
    for t in lc.tensors().values():
        t.normal_()
    lc.set_lengths(slice(None), torch.tensor([900, 707]))
    steps = [torch.randn(2, 1, 512, device="cuda", dtype=torch.bfloat16) for _ in range(20)]
    layer(steps[0], cache=cache, layer_idx=0)  # compile outside the checked region
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for x in steps[1:]:
            layer(x, cache=cache, layer_idx=0)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert cache.lengths.tolist() == [920, 727]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_decode_graph_captured_once_at_capacity():
    """How a serving loop runs decode steps: `decode_attention(..., max_length=capacity)` captured once in a CUDA
    graph, then replayed while the lengths grow in place (40 steps per row, across compressed-token emissions and
    new selection blocks): every replay matches an eager call sized by the exact lengths (paper geometry, G = 16,
    bf16)."""
    cfg, S = nsa.NSAConfig(), 4096
    q_full, *kv, g_full = make_inputs(2, S, 16, 1, 192, 128, cfg, dtype=torch.bfloat16, seed=3, device="cuda")
    start = [1000, 2490]
    lengths = torch.tensor(start, device="cuda")
    q_buf, g_buf = torch.empty_like(q_full[:, :1]), torch.empty_like(g_full[:, :1])

    def load(step):
        lens = [L + step for L in start]
        lengths.copy_(torch.tensor(lens))
        for b, L in enumerate(lens):
            q_buf[b], g_buf[b] = q_full[b, L - 1:L], g_full[b, L - 1:L]

    def step_fn():
        return nsa.decode_attention(q_buf, *kv, g_buf, lengths=lengths, config=cfg, backend="triton", max_length=S)

    load(0)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compilation outside the capture
        step_fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step_fn()
    for step in range(40):
        load(step)
        graph.replay()
        exact = nsa.decode_attention(q_buf, *kv, g_buf, lengths=lengths, config=cfg, backend="triton")
        assert_close(out, exact, atol=2e-2, rtol=5e-2, name=f"replay {step}")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("shared_kv", [False, True])
def test_gpu_layer_step_captured_once_on_a_static_cache(shared_kv):
    """A layer's decode step on a static NSACache, captured once in a CUDA graph and replayed 40 times over rows of
    different lengths (across compressed-token emissions): each replay matches the same step on an ordinary cache,
    run eagerly, and the lengths advance on the device (paper geometry, G = 16, bf16)."""
    cfg = nsa.NSAConfig()
    layer = nsa.NativeSparseAttention(512, 16, 1, 192, v_head_dim=128, config=cfg, shared_kv=shared_kv,
                                      backend="triton").to("cuda", torch.bfloat16)
    static, eager = nsa.NSACache(1, 2, 4096, static=True), nsa.NSACache(1, 2, 4096)
    g = torch.Generator(device="cuda").manual_seed(0)
    steps = torch.randn(41, 2, 1, 512, device="cuda", dtype=torch.bfloat16, generator=g)
    x_buf = steps[0].clone()
    with torch.no_grad():
        prompt = torch.randn(2, 900, 512, device="cuda", dtype=torch.bfloat16, generator=g)
        for cache in (static, eager):
            layer(prompt, cache=cache, new_lengths=torch.tensor([900, 707]))
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # compilation and cuBLAS set-up outside the capture: one real step
            first = layer(x_buf, cache=static)
        torch.cuda.current_stream().wait_stream(side)
        assert_close(first, layer(steps[0], cache=eager), atol=2e-2, rtol=5e-2, name="warm-up step")
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = layer(x_buf, cache=static)
        for i in range(1, 41):
            x_buf.copy_(steps[i])
            graph.replay()
            assert_close(out, layer(steps[i], cache=eager), atol=2e-2, rtol=5e-2, name=f"replay {i}")
    assert static.lengths.tolist() == eager.lengths.tolist() == [941, 748]


def test_triton_decode_window_cache_in_another_dtype():
    """An fp16 window cache beside fp32 selection / compressed caches (allowed: caches may differ from q): the
    window is cast to the selection cache's dtype instead of failing in the kernel ("Both operands must be same
    dtype"); within fp16 rounding of the torch decode."""
    lengths = torch.tensor([40, 23])
    inputs = make_inputs(2, 40, 8, 2, 16, 16, CFG, dtype=torch.float32, seed=9, device=DEVICE)
    qd, gd = last_queries(inputs, lengths)
    _, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, _ = inputs
    kv = (k_cmp, v_cmp, k_slc, v_slc, k_win.half(), v_win.half())
    o = nsa.decode_attention(qd, *kv, gd, lengths=lengths.to(DEVICE), config=CFG, backend="triton")
    expected = nsa.decode_attention(qd, *kv, gd, lengths=lengths.to(DEVICE), config=CFG, backend="torch")
    assert_close(o, expected, atol=2e-3, rtol=2e-3, name="fp16 window cache")
