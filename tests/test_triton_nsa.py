"""The composed Triton NSA op (Eq. 5) vs the reference, plus GPU-only bf16 / wide-head / int64-offset checks."""
import pytest
import torch

import nsa
from nsa.ops import reference as ref
from tests.kit import assert_close, assert_same_selection, make_inputs, small_config

pytest.importorskip("triton")
pytest.importorskip("nsa.ops.triton")

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
CFG = small_config()
gpu_only = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (bf16 tl.dot is wrong in the interpreter)")


def _loss_grads(o, inputs, seed=1):
    g = torch.Generator().manual_seed(seed)
    cot = torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.dtype).to(o.device)
    return torch.autograd.grad((o * cot).sum(), inputs)


@pytest.mark.parametrize("heads,varlen,given", [((6, 2), True, False), ((3, 3), False, True), ((16, 1), True, True)])
def test_native_sparse_attention_matches_reference(heads, varlen, given):
    """Output and gradients of all 8 inputs (q, 3x k/v, gates); selection computed by the kernel or given."""
    HQ, HKV = heads
    cu = torch.tensor([0, 7, 33, 47], dtype=torch.int64, device=DEV) if varlen else None
    B, T = (1, 47) if varlen else (2, 41)
    x = make_inputs(B, T, HQ, HKV, 20, 12, CFG, dtype=torch.float32, cu_seqlens=cu, seed=HQ, device=DEV,
                    requires_grad=True)
    idx = ref.select_blocks(x[0].detach(), x[1].detach(), config=CFG, cu_seqlens=cu) if given else None
    o = nsa.native_sparse_attention(*x, config=CFG, cu_seqlens=cu, block_indices=idx, backend="triton")
    e = nsa.native_sparse_attention(*x, config=CFG, cu_seqlens=cu, block_indices=idx, backend="reference")
    if not given:  # the kernel's own top-n must pick the same blocks up to near-ties
        got = nsa.select_blocks(x[0].detach(), x[1].detach(), config=CFG, cu_seqlens=cu, backend="triton")
        exp = ref.select_blocks(x[0].detach(), x[1].detach(), config=CFG, cu_seqlens=cu)
        assert_same_selection(got, exp, ref.block_scores(x[0].detach(), x[1].detach(), config=CFG, cu_seqlens=cu),
                              CFG)
        assert torch.equal(got, exp), "random fp32 inputs should have no near-ties"
    tol = dict(atol=2e-5, rtol=2e-5) if not CUDA else dict(atol=2e-4, rtol=2e-4)
    assert_close(o, e, name="o", **tol)
    names = ["q", "k_cmp", "v_cmp", "k_slc", "v_slc", "k_win", "v_win", "gates"]
    for n, a, b in zip(names, _loss_grads(o, x), _loss_grads(e, x)):
        assert_close(a, b, name=f"d{n}", **tol)


def test_padded_batch_reads_no_offsets_from_the_device(monkeypatch):
    """A padded batch's offsets are built from host numbers, so the forward and backward never read them back
    from the device (no synchronisation; a CUDA graph can capture the forward). A varlen batch reads its
    cu_seqlens once, in validation, and every kernel reuses those values."""
    from nsa.ops import varlen

    reads = []
    monkeypatch.setattr(varlen, "_read_offsets", lambda cu: reads.append(cu.tolist()) or cu.tolist())
    x = make_inputs(2, 41, 4, 2, 20, 12, CFG, dtype=torch.float32, seed=3, device=DEV, requires_grad=True)
    o = nsa.native_sparse_attention(*x, config=CFG, backend="triton")
    _loss_grads(o, x)
    assert reads == []
    cu = torch.tensor([0, 7, 33, 47], dtype=torch.int32, device=DEV)
    x = make_inputs(1, 47, 4, 2, 20, 12, CFG, dtype=torch.float32, cu_seqlens=cu, seed=4, device=DEV,
                    requires_grad=True)
    cu, reads[:] = cu.clone(), []  # a tensor nothing has read yet (make_inputs read the original)
    o = nsa.native_sparse_attention(*x, config=CFG, cu_seqlens=cu, backend="triton")
    _loss_grads(o, x)
    assert reads == [[0, 7, 33, 47]]  # one read, in validation (to report bad values); every kernel reuses it


def test_inference_mode_offsets(monkeypatch):
    """Under torch.inference_mode (tensors without version counters): a padded forward still reads no offsets, and a
    caller's cu_seqlens changed in place between two calls is read again, not taken from memory."""
    from nsa.ops import varlen

    reads = []
    monkeypatch.setattr(varlen, "_read_offsets", lambda cu: reads.append(cu.tolist()) or cu.tolist())
    x = make_inputs(1, 47, 4, 2, 20, 12, CFG, dtype=torch.float32, seed=5, device=DEV)
    with torch.inference_mode():
        o = nsa.native_sparse_attention(*x, config=CFG, backend="triton")
        assert reads == []
        assert_close(o, nsa.native_sparse_attention(*x, config=CFG, backend="reference"), atol=2e-5, rtol=2e-5)
        cu = torch.tensor([0, 7, 33, 47], dtype=torch.int64, device=DEV)
        x = make_inputs(1, 47, 4, 2, 20, 12, CFG, dtype=torch.float32, cu_seqlens=cu, seed=6, device=DEV)
        outs = []
        for bounds in ([0, 7, 33, 47], [0, 15, 30, 47]):  # the same tensor, new values (7 compressed tokens both)
            cu.copy_(torch.tensor(bounds))
            got = nsa.native_sparse_attention(*x, config=CFG, cu_seqlens=cu, backend="triton")
            exp = nsa.native_sparse_attention(*x, config=CFG, cu_seqlens=cu, backend="reference")
            assert_close(got, exp, atol=2e-5, rtol=2e-5, name=str(bounds))
            outs.append(got)
        assert not torch.equal(*outs)


def test_host_offsets_are_remembered_and_invalidated_by_in_place_changes(monkeypatch):
    from nsa.ops import varlen
    from nsa.ops.triton import utils

    reads = []
    monkeypatch.setattr(varlen, "_read_offsets", lambda cu: reads.append(1) or cu.tolist())
    cu = utils.seq_offsets(3, 5, None, DEV)
    assert varlen.host_offsets(cu) == [0, 5, 10, 15] and reads == []
    t1 = utils.tile_table(cu, 4)
    assert t1.tolist() == [[0, 0], [0, 4], [1, 5], [1, 9], [2, 10], [2, 14]]
    assert utils.tile_table(utils.seq_offsets(3, 5, None, DEV), 4) is t1  # same shape: the cached table
    monkeypatch.setattr(utils, "_TILE_TABLES_BYTES", 100)  # a 12-tile table (96 bytes) fits alone, not beside t1
    monkeypatch.setattr(utils, "_CAPTURED", set())
    t2 = utils.tile_table(utils.seq_offsets(1, 12, None, DEV), 1)
    assert list(utils._TILE_TABLES.values()) == [t2] and t2.shape == (12, 2)
    monkeypatch.setattr(utils, "_CAPTURED", {next(iter(utils._TILE_TABLES))})  # as if a CUDA graph had read t2
    t3 = utils.tile_table(utils.seq_offsets(1, 13, None, DEV), 1)
    assert list(utils._TILE_TABLES.values()) == [t2, t3]  # over the budget, but t2 stays
    cu.mul_(2)  # an in-place change bumps the version: the remembered values no longer count
    assert varlen.host_offsets(cu) == [0, 10, 20, 30] and len(reads) == 1
    assert varlen.host_offsets(cu) == [0, 10, 20, 30] and len(reads) == 1
    key = id(cu)
    del cu
    assert key not in varlen._HOST_OFFSETS


def test_float64_is_delegated_to_reference():
    x = make_inputs(1, 20, 2, 1, 8, 8, CFG, dtype=torch.float64, device=DEV)
    o = nsa.native_sparse_attention(*x, config=CFG, backend="triton")
    assert o.dtype == torch.float64
    assert torch.equal(o, nsa.native_sparse_attention(*x, config=CFG, backend="reference"))


# ----------------------------------------------------------------------------------------------- GPU only
@gpu_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dims", [(64, 64), (192, 128), (256, 256)])
def test_gpu_low_precision_vs_reference(dtype, dims):
    """Paper geometry, Dk != Dv up to 256, G = 8: each output against the reference run on the same inputs."""
    cfg = nsa.NSAConfig()
    Dk, Dv = dims
    cu = torch.tensor([0, 300, 1100, 1400], device="cuda")
    x = make_inputs(1, 1400, 16, 2, Dk, Dv, cfg, dtype=dtype, cu_seqlens=cu, device="cuda", requires_grad=True)
    o = nsa.native_sparse_attention(*x, config=cfg, cu_seqlens=cu, backend="triton")
    idx = nsa.select_blocks(x[0].detach(), x[1].detach(), config=cfg, cu_seqlens=cu, backend="triton")
    e = nsa.native_sparse_attention(*x, config=cfg, cu_seqlens=cu, block_indices=idx, backend="reference")
    assert_close(o, e, atol=3e-2, rtol=3e-2, name="o")
    for a, b in zip(_loss_grads(o, x), _loss_grads(e, x)):
        cos = torch.nn.functional.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0)
        assert cos > 0.999, cos


@gpu_only
def test_gpu_int64_offsets():
    """q with > 2^31 elements: the last rows of the window branch still match the reference."""
    T, HQ, D, w = (1 << 31) // (128 * 256) + 64, 128, 256, 32
    q = torch.randn(1, T, HQ, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, T, 1, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(1, T, 1, D, device="cuda", dtype=torch.bfloat16)
    assert q.numel() > 2**31
    o = nsa.sliding_window_attention(q, k, v, window=w, backend="triton")[:, -16:]
    tail = slice(T - 16 - w, T)
    e = ref.sliding_window_attention(q[:, tail], k[:, tail], v[:, tail], window=w)[:, -16:]
    assert_close(o, e, atol=3e-2, rtol=3e-2, name="tail rows")


@gpu_only
def test_gpu_padded_forward_captures_in_a_cuda_graph():
    """A padded batch's forward reads nothing back from the device: after one warm-up call (compilation,
    autotuning, tile tables) it runs under torch's sync debug mode set to error and records into a CUDA graph
    (capture fails on a synchronisation), and a replay on new inputs written into the same buffers matches the
    eager forward on them."""
    cfg = nsa.NSAConfig()
    x = make_inputs(2, 700, 16, 2, 192, 128, cfg, dtype=torch.bfloat16, seed=5, device="cuda")
    fn = lambda: nsa.native_sparse_attention(*x, config=cfg, backend="triton")  # noqa: E731
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.set_sync_debug_mode("error")  # raises on any synchronising call
    try:
        fn()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    from nsa.ops.triton import utils

    assert utils._CAPTURED  # the tile tables the graph reads are never evicted
    for buf, new in zip(x, make_inputs(2, 700, 16, 2, 192, 128, cfg, dtype=torch.bfloat16, seed=6, device="cuda")):
        buf.copy_(new)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, fn())


@gpu_only
def test_gpu_padded_backward_reads_the_device_once():
    """The backward of a padded batch synchronises once: the selected branch's reverse-index planning reads its
    four counts in one transfer (torch's sync debug mode, set to warn, reports every synchronising call)."""
    import warnings

    cfg = nsa.NSAConfig()
    x = make_inputs(2, 700, 16, 2, 192, 128, cfg, dtype=torch.bfloat16, seed=7, device="cuda", requires_grad=True)
    _loss_grads(nsa.native_sparse_attention(*x, config=cfg, backend="triton"), x)  # compile, autotune, tables
    o = nsa.native_sparse_attention(*x, config=cfg, backend="triton")
    cot = torch.randn_like(o)
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            torch.autograd.grad((o * cot).sum(), x)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message) for w in seen if "synchroniz" in str(w.message)]
    assert len(syncs) == 1, syncs


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_strided_cu_seqlens(dtype):
    """cu_seqlens as a strided view (every other element of a larger tensor): the kernels index the offsets as a
    flat array, so an int64 view was once read with the wrong stride (garbage indices, NaN outputs)."""
    cu = torch.tensor([0, 17, 22, 40], dtype=dtype, device=DEV)
    strided = torch.stack([cu, torch.full_like(cu, -7)], 1)[:, 0]
    assert not strided.is_contiguous()
    x = make_inputs(1, 40, 4, 2, 16, 16, CFG, dtype=torch.float32, cu_seqlens=cu, seed=6, device=DEV)
    for op in (lambda c, b: nsa.native_sparse_attention(*x, config=CFG, cu_seqlens=c, backend=b),
               lambda c, b: nsa.sliding_window_attention(x[0], x[5], x[6], window=16, cu_seqlens=c, backend=b),
               lambda c, b: nsa.compressed_attention(x[0], x[1], x[2], block_size=8, stride=4, cu_seqlens=c,
                                                     backend=b)[0]):
        assert_close(op(strided, "triton"), op(cu, "reference"), atol=2e-5, rtol=2e-5, name="strided cu_seqlens")
    got = nsa.select_blocks(x[0], x[1], config=CFG, cu_seqlens=strided, backend="triton")
    assert torch.equal(got, nsa.select_blocks(x[0], x[1], config=CFG, cu_seqlens=cu, backend="triton"))
