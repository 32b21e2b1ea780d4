"""Triton kernels vs the reference, in the Triton interpreter on CPU (compiled on GPU when one is present).

Small odd shapes: T not a multiple of any block, G in {1, 2, 3, 16}, Dk != Dv, varlen with an empty sequence and
sequences shorter than l, fp32 (tight) and fp16 (loose). Outputs, lse, indices (tie-robust) and all gradients.
"""
import subprocess
import sys

import pytest
import torch

import nsa
from nsa.ops import reference as ref
from tests.kit import assert_close, assert_same_selection, make_inputs, small_config

pytest.importorskip("triton")
TB = pytest.importorskip("nsa.ops.triton")

DEV = "cuda" if torch.cuda.is_available() else "cpu"
CFG = small_config()
F32 = dict(atol=2e-5, rtol=2e-5) if DEV == "cpu" else dict(atol=2e-4, rtol=2e-4)
F16 = dict(atol=4e-3, rtol=4e-3)
CU = [0, 5, 5, 31, 44]  # an empty sequence, one shorter than l, ragged ends
HEADS = [(2, 2), (4, 2), (3, 1), (16, 1)]  # G = 1, 2, 3, 16


def _case(heads, varlen, dtype=torch.float32, seed=0, T=None):
    HQ, HKV = heads
    cu = torch.tensor(CU, dtype=torch.int32) if varlen else None
    B, T = (1, CU[-1]) if varlen else (2, T or 37)
    x = make_inputs(B, T, HQ, HKV, 20, 12, CFG, dtype=dtype, cu_seqlens=cu, seed=seed, device=DEV,
                    requires_grad=True)
    return x, (cu.to(DEV) if cu is not None else None)


def _grads(out, inputs, seed=1):
    g = torch.Generator().manual_seed(seed)
    outs = out if isinstance(out, tuple) else (out,)
    cot = [torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.dtype).to(o.device) for o in outs]
    loss = sum((o.masked_fill(torch.isinf(o), 0) * c).sum() for o, c in zip(outs, cot))
    return torch.autograd.grad(loss, inputs)


def _compare(fn, inputs, tol, names):
    out, exp = fn("triton"), fn("reference")
    outs = out if isinstance(out, tuple) else (out,)
    exps = exp if isinstance(exp, tuple) else (exp,)
    for i, (a, e) in enumerate(zip(outs, exps)):
        assert a.dtype == e.dtype, f"output {i} dtype"
        assert_close(a, e, name=f"output {i}", **tol)
    for n, a, e in zip(names, _grads(out, inputs), _grads(exp, inputs)):
        assert_close(a, e, name=f"d{n}", **tol)


# ----------------------------------------------------------------------------------------------- window
@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("varlen", [False, True])
def test_sliding_window_matches_reference(heads, varlen):
    x, cu = _case(heads, varlen)
    q, k, v = x[0], x[5], x[6]
    _compare(lambda b: nsa.sliding_window_attention(q, k, v, window=7, cu_seqlens=cu, backend=b), (q, k, v), F32,
             "qkv")


def test_sliding_window_longer_than_sequence():
    x, _ = _case((4, 2), False, T=21)
    q, k, v = x[0], x[5], x[6]
    _compare(lambda b: nsa.sliding_window_attention(q, k, v, window=40, backend=b), (q, k, v), F32, "qkv")


# ----------------------------------------------------------------------------------------------- compressed
@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("varlen", [False, True])
def test_compressed_attention_matches_reference(heads, varlen):
    """o, lse (-inf before the first full block) and the gradients through both, incl. dlse."""
    x, cu = _case(heads, varlen)
    q, kc, vc = x[0], x[1], x[2]
    _compare(lambda b: nsa.compressed_attention(q, kc, vc, block_size=8, stride=4, cu_seqlens=cu, backend=b),
             (q, kc, vc), F32, "qkv")


@pytest.mark.parametrize("varlen", [False, True])
def test_compressed_attention_split_query_ranges(varlen, monkeypatch):
    """dK/dV of the compressed keys summed over query-range splits (long sequences) equals the reference, and the
    split backward stays bitwise repeatable."""
    from nsa.ops.triton import flash

    monkeypatch.setattr(flash, "CMP_SPLIT_QUERIES", 16)
    assert flash._query_split(torch.tensor([0, 26, 70]), 1, 16) == (16, 3)
    assert flash._query_split(torch.tensor([0, 26, 70]), 0, 16)[1] == 1  # the window never splits
    assert flash._query_split(torch.tensor([0, 1000]), 1, 16) == (64, 16)  # at most CMP_SPLIT_MAX splits
    assert flash._query_split(torch.tensor([0, 1000]), 1, 16, flash.CMP_SPLIT_BYTES // 4) == (256, 4)  # memory cap
    x, cu = _case((4, 2), varlen, T=45)
    q, kc, vc = x[0], x[1], x[2]
    fn = lambda b: nsa.compressed_attention(q, kc, vc, block_size=8, stride=4, cu_seqlens=cu, backend=b)  # noqa
    _compare(fn, (q, kc, vc), F32, "qkv")
    for a, b in zip(_grads(fn("triton"), (q, kc, vc)), _grads(fn("triton"), (q, kc, vc))):
        assert torch.equal(a, b)


@pytest.mark.parametrize("mode", ["window", "compressed"])
def test_dkv_tiles_differ_from_forward(mode, monkeypatch):
    """dK/dV with its own query step and key tile (as for Dk = 192 or fp32 on a GPU) still matches the reference."""
    from nsa.ops.triton import flash

    monkeypatch.setattr(flash, "_bwd_blocks", lambda dk, dv, dtype: (32, 16))
    x, cu = _case((4, 2), True)
    q = x[0]
    if mode == "window":
        k, v = x[5], x[6]
        fn = lambda b: nsa.sliding_window_attention(q, k, v, window=7, cu_seqlens=cu, backend=b)  # noqa: E731
    else:
        k, v = x[1], x[2]
        fn = lambda b: nsa.compressed_attention(q, k, v, block_size=8, stride=4, cu_seqlens=cu, backend=b)  # noqa
    _compare(fn, (q, k, v), F32, "qkv")


@pytest.mark.parametrize("dk,split", [(16, 0), (20, 0), (20, 1), (40, 0), (40, 1)])  # 16 has no second tile
def test_select_blocks_head_dim_whole_or_in_two_tiles(dk, split, monkeypatch):
    """Top-n with head dims that are (16) and are not (20, 40) a power of two, loaded as one padded tile (SPLIT = 0)
    or as two power-of-two tiles where there are two (SPLIT = 1; the GPU autotunes between them): same selection
    as the reference."""
    import triton

    from nsa.ops.triton import topk

    monkeypatch.setattr(topk._topn_kernel, "configs", [triton.Config({"SPLIT": split}, num_warps=4, num_stages=1)])
    x = make_inputs(2, 136, 4, 2, dk, 12, CFG, dtype=torch.float32, seed=dk, device=DEV)  # 9 blocks, n = 4
    q, kc = x[0], x[1]
    idx = nsa.select_blocks(q, kc, config=CFG, backend="triton")
    assert_same_selection(idx, ref.select_blocks(q, kc, config=CFG), ref.block_scores(q, kc, config=CFG), CFG)


@pytest.mark.parametrize("dk", [16, 20, 40])
@pytest.mark.parametrize("mode", ["window", "compressed", "selected"])
def test_head_dim_whole_or_in_two_tiles(dk, mode, monkeypatch):
    """Dk as one tile (16) or as two power-of-two tiles (20 -> 16 + 16, 40 -> 32 + 16, like 192 -> 128 + 64 on a
    GPU): outputs and every gradient match the reference (selected: with dK/dV lists split into partials too)."""
    from nsa.ops.triton import flash, selection

    assert flash.split_head_dim(dk) == {16: (16, 0), 20: (16, 16), 40: (32, 16)}[dk]
    monkeypatch.setattr(selection, "MAX_SEGMENT", 2)
    x = make_inputs(2, 29, 4, 2, dk, 12, CFG, dtype=torch.float32, seed=dk, device=DEV, requires_grad=True)
    q = x[0]
    if mode == "window":
        k, v = x[5], x[6]
        fn = lambda b: nsa.sliding_window_attention(q, k, v, window=7, backend=b)  # noqa: E731
    elif mode == "compressed":
        k, v = x[1], x[2]
        fn = lambda b: nsa.compressed_attention(q, k, v, block_size=8, stride=4, backend=b)  # noqa: E731
    else:
        k, v = x[3], x[4]
        idx = _messy_indices(q, x[1], None, seed=dk)
        fn = lambda b: nsa.selected_attention(q, k, v, idx, block_size=16, backend=b)  # noqa: E731
    _compare(fn, (q, k, v), F32, "qkv")


def test_compressed_attention_sequence_shorter_than_block():
    """T < l: no compressed token at all; o = 0, lse = -inf, zero gradient for q, never NaN."""
    q = torch.randn(1, 6, 2, 16, device=DEV, requires_grad=True)
    kc = torch.randn(1, 0, 1, 16, device=DEV, requires_grad=True)
    vc = torch.randn(1, 0, 1, 16, device=DEV, requires_grad=True)
    o, lse = nsa.compressed_attention(q, kc, vc, block_size=8, stride=4, backend="triton")
    assert torch.equal(o, torch.zeros_like(o)) and bool(torch.isneginf(lse).all())
    (dq,) = torch.autograd.grad(o.sum(), (q,))
    assert torch.equal(dq, torch.zeros_like(dq))


# ----------------------------------------------------------------------------------------------- selected
def _messy_indices(q, k_cmp, cu, seed=0):
    """Reference selection plus edits: ignored -1 slots, a repeated index, and a block after the query's own."""
    idx = ref.select_blocks(q.detach(), k_cmp.detach(), config=CFG, cu_seqlens=cu).clone()
    g = torch.Generator().manual_seed(seed)
    B, T, HKV, n = idx.shape
    nb = -(-T // CFG.slc_block_size)
    rnd = torch.randint(-1, nb, idx.shape, generator=g).to(idx.device)
    pick = torch.rand(idx.shape, generator=g).to(idx.device) < 0.3
    idx = torch.where(pick, rnd, idx)
    idx[..., -1] = idx[..., 0]  # a repeated block counts once
    return idx


@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("varlen", [False, True])
def test_selected_attention_matches_reference(heads, varlen):
    x, cu = _case(heads, varlen, T=45)
    q, kc, k, v = x[0], x[1], x[3], x[4]
    idx = _messy_indices(q, kc, cu)
    _compare(lambda b: nsa.selected_attention(q, k, v, idx, block_size=16, cu_seqlens=cu, backend=b), (q, k, v),
             F32, "qkv")


@pytest.mark.parametrize("packed", [False, True])
def test_selected_attention_padded_and_packed_tiles_agree(packed, monkeypatch):
    """The padded (one position per tile) and packed (several positions per tile) kernels give the same result."""
    from nsa.ops.triton import selection

    monkeypatch.setattr(selection, "PACK_SMALL_GROUPS", packed)
    assert selection.tile_shape(2)[1] == (8 if packed else 1) and selection.tile_shape(16)[1] == 1
    x, cu = _case((4, 2), True)
    q, kc, k, v = x[0], x[1], x[3], x[4]
    idx = _messy_indices(q, kc, cu, seed=3)
    _compare(lambda b: nsa.selected_attention(q, k, v, idx, block_size=16, cu_seqlens=cu, backend=b), (q, k, v),
             F32, "qkv")


def test_selected_attention_split_reverse_lists(monkeypatch):
    """dK/dV programs cover at most MAX_SEGMENT query tiles; longer lists are split, reduced in order, repeatable."""
    from nsa.ops.triton import selection

    monkeypatch.setattr(selection, "MAX_SEGMENT", 2)
    x, cu = _case((4, 2), True)
    q, kc, k, v = x[0], x[1], x[3], x[4]
    idx = _messy_indices(q, kc, cu, seed=4)
    _compare(lambda b: nsa.selected_attention(q, k, v, idx, block_size=16, cu_seqlens=cu, backend=b), (q, k, v),
             F32, "qkv")
    o = lambda: nsa.selected_attention(q, k, v, idx, block_size=16, cu_seqlens=cu, backend="triton")  # noqa: E731
    for a, b in zip(_grads(o(), (q, k, v)), _grads(o(), (q, k, v))):
        assert torch.equal(a, b)


def test_selected_attention_block_not_multiple_of_tile():
    """l' = 12 (not a power of two): key tiles are masked at the block edge."""
    x, _ = _case((3, 1), False, T=41)
    q, k, v = x[0], x[3], x[4]
    cfg = small_config(cmp_block_size=4, cmp_stride=4, slc_block_size=12)
    kc = torch.randn(2, cfg.num_compressed(41), 1, 20, device=DEV)
    idx = ref.select_blocks(q.detach(), kc, config=cfg)
    _compare(lambda b: nsa.selected_attention(q, k, v, idx, block_size=12, backend=b), (q, k, v), F32, "qkv")



@pytest.mark.parametrize("heads", [(4, 2), (16, 1)])
def test_selected_attention_block_over_several_key_tiles(heads):
    """l' = 40 spans three 16-key sub-tiles (the last one part-masked): the flat (block, sub-tile) loop of the
    forward and dQ kernels and the per-sub-tile dK/dV programs, padded (G = 16) and packed (G = 2) tiles."""
    from nsa.ops.triton import selection

    assert selection._block_n(40, 16, 20, torch.float32) < 40 or DEV != "cpu"
    x, _ = _case(heads, False, T=93)
    q, k, v = x[0], x[3], x[4]
    cfg = small_config(cmp_block_size=8, cmp_stride=8, slc_block_size=40, num_selected=2, num_local_blocks=1)
    kc = torch.randn(2, cfg.num_compressed(93), heads[1], 20, device=DEV)
    idx = ref.select_blocks(q.detach(), kc, config=cfg)
    _compare(lambda b: nsa.selected_attention(q, k, v, idx, block_size=40, backend=b), (q, k, v), F32, "qkv")

# ----------------------------------------------------------------------------------------------- determinism, fp16
def test_backward_is_bitwise_repeatable():
    x, cu = _case((6, 2), True)
    q, kc, vc, ks, vs, kw, vw, _ = x
    idx = _messy_indices(q, kc, cu)

    def run():
        o_s = nsa.selected_attention(q, ks, vs, idx, block_size=16, cu_seqlens=cu, backend="triton")
        o_w = nsa.sliding_window_attention(q, kw, vw, window=7, cu_seqlens=cu, backend="triton")
        o_c, _ = nsa.compressed_attention(q, kc, vc, block_size=8, stride=4, cu_seqlens=cu, backend="triton")
        return _grads(o_s + o_w + o_c, (q, kc, vc, ks, vs, kw, vw))

    for a, b in zip(run(), run()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("branch", ["window", "compressed", "selected"])
def test_fp16(branch):
    x, cu = _case((4, 2), True, dtype=torch.float16)
    q, kc, vc, ks, vs, kw, vw, _ = x
    if branch == "window":
        fn, inp = (lambda b: nsa.sliding_window_attention(q, kw, vw, window=7, cu_seqlens=cu, backend=b)), (q, kw, vw)
    elif branch == "compressed":
        fn = lambda b: nsa.compressed_attention(q, kc, vc, block_size=8, stride=4, cu_seqlens=cu, backend=b)  # noqa
        inp = (q, kc, vc)
    else:
        idx = _messy_indices(q, kc, cu)
        fn = lambda b: nsa.selected_attention(q, ks, vs, idx, block_size=16, cu_seqlens=cu, backend=b)  # noqa
        inp = (q, ks, vs)
    _compare(fn, inp, F16, "qkv")


# ----------------------------------------------------------------------------------------------- top-n
@pytest.mark.parametrize("heads", [(2, 2), (3, 1), (8, 1), (16, 1)])  # G = 1, 3 remap by dot; 8, 16 by sum
@pytest.mark.parametrize("varlen", [False, True])
def test_select_blocks_matches_reference(heads, varlen):
    x, cu = _case(heads, varlen, T=50)
    q, kc = x[0].detach(), x[1].detach()
    idx = nsa.select_blocks(q, kc, config=CFG, cu_seqlens=cu, backend="triton")
    exp = ref.select_blocks(q, kc, config=CFG, cu_seqlens=cu)
    assert idx.dtype == torch.int64
    assert_same_selection(idx, exp, ref.block_scores(q, kc, config=CFG, cu_seqlens=cu), CFG)


@pytest.mark.parametrize("cfg", [
    small_config(cmp_block_size=16, cmp_stride=16, slc_block_size=16),  # l = l' = d: Eq. 9 is the identity
    small_config(num_selected=6, num_init_blocks=0, num_local_blocks=1),  # n > valid blocks: -1 padding
    small_config(cmp_block_size=8, cmp_stride=8, slc_block_size=8, num_selected=3),  # many chunks
    # several chunks of BJ blocks with free choices: the running top-n merge and the token carried between chunks
    small_config(num_init_blocks=0, num_local_blocks=1),  # l'/d = 4, 1 token carried
    small_config(cmp_block_size=12, cmp_stride=4, slc_block_size=12, num_selected=3, num_init_blocks=0,
                 num_local_blocks=1),  # l'/d = 3, 2 tokens carried
    small_config(cmp_block_size=16, cmp_stride=4, slc_block_size=16, num_selected=3, num_init_blocks=0,
                 num_local_blocks=1),  # l = l', 3 tokens carried
])
def test_select_blocks_geometries(cfg):
    T = 290  # more than 16 blocks (BJ >= 16 blocks per chunk): several chunks in every geometry
    g = torch.Generator().manual_seed(5)
    q = torch.randn(1, T, 4, 16, generator=g).to(DEV)
    kc = torch.randn(1, cfg.num_compressed(T), 2, 16, generator=g).to(DEV)
    idx = nsa.select_blocks(q, kc, config=cfg, backend="triton")
    exp = ref.select_blocks(q, kc, config=cfg)
    assert_same_selection(idx, exp, ref.block_scores(q, kc, config=cfg), cfg)


def test_select_blocks_falls_back_when_the_tile_is_too_large(monkeypatch):
    """Tiles over the shared-memory budget (fp32, Dk = 256, G = 128 on a GPU) use the torch backend's selection."""
    from nsa.ops.triton import topk

    x, cu = _case((4, 2), True, T=50)
    q, kc = x[0].detach(), x[1].detach()
    monkeypatch.setattr(topk, "SMEM_BUDGET", 0)
    idx = nsa.select_blocks(q, kc, config=CFG, cu_seqlens=cu, backend="triton")
    assert_same_selection(idx, ref.select_blocks(q, kc, config=CFG, cu_seqlens=cu),
                          ref.block_scores(q, kc, config=CFG, cu_seqlens=cu), CFG)


def test_select_blocks_exact_ties_go_to_lower_index():
    """q = 0: every visible compressed token gets the same probability; equal block scores pick lower indices."""
    cfg = small_config(cmp_block_size=16, cmp_stride=16, slc_block_size=16, num_selected=3, num_local_blocks=1)
    T = 80
    q = torch.zeros(1, T, 2, 16, device=DEV)
    kc = torch.randn(1, cfg.num_compressed(T), 1, 16, device=DEV)
    idx = nsa.select_blocks(q, kc, config=cfg, backend="triton")
    assert torch.equal(idx.cpu(), ref.select_blocks(q, kc, config=cfg).cpu())
    assert idx[0, 79, 0].tolist() == [0, 1, 4]  # init 0, local 4, tie among 1..3 -> 1


# ----------------------------------------------------------------------------------------------- import contract
_IMPORT_CHECK = """
import os, sys
os.environ.pop("TRITON_INTERPRET", None)
sys.modules["triton"] = None
try:
    import nsa.ops.triton
except ImportError:
    print("IE")
del sys.modules["triton"]
import torch
import nsa.ops.triton as tb
x = torch.randn(1, 4, 1, 16)
try:
    tb.sliding_window_attention(x, x, x, window=2)
except ValueError as e:
    print("VE", "TRITON_INTERPRET" in str(e))
"""


def test_import_contract():
    """No triton: ImportError. Triton but CPU tensors without the interpreter: a ValueError that says what to do."""
    out = subprocess.run([sys.executable, "-c", _IMPORT_CHECK], capture_output=True, text=True, timeout=300)
    assert out.stdout.split() == ["IE", "VE", "True"], out.stderr[-2000:]


def test_autotune_lists(monkeypatch):
    """GPU autotune lists: the selected-attention kernels only get software-pipelined configs (>= 3 stages; with 2
    the loop waits for its own loads), NSA_TRITON_AUTOTUNE=0 keeps the first, the interpreter a single config."""
    from nsa.ops.triton import utils

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert len(utils.autotune_configs(utils.PIPELINED_CONFIGS)) == 1
    monkeypatch.delenv("TRITON_INTERPRET")
    monkeypatch.delenv("NSA_TRITON_AUTOTUNE", raising=False)
    cfgs = utils.autotune_configs(utils.PIPELINED_CONFIGS)
    assert [(c.num_warps, c.num_stages) for c in cfgs] == list(utils.PIPELINED_CONFIGS)
    assert all(c.num_stages >= 3 for c in cfgs)
    from nsa.ops.triton import topk

    split = topk._split_configs()
    assert sorted((c.kwargs["SPLIT"], c.num_warps, c.num_stages) for c in split) == sorted(
        (sp, w, st) for sp in (0, 1) for w, st in utils.DEFAULT_CONFIGS)
    assert [c.kwargs["SPLIT"] for c in topk._prune_split(split, {}, DK_B=0)] == [0] * len(utils.DEFAULT_CONFIGS)
    assert len(topk._prune_split(split, {}, DK_B=64)) == len(split)
    monkeypatch.setenv("NSA_TRITON_AUTOTUNE", "0")
    assert [(c.num_warps, c.num_stages) for c in utils.autotune_configs()] == [utils.DEFAULT_CONFIGS[0]] == [(8, 2)]
    assert [c.kwargs for c in topk._split_configs()] == [{"SPLIT": 0}]


def test_tile_tables_from_several_threads():
    """Ops in several threads meeting new offset layouts at once: the tile-table cache insert and eviction hold a
    lock ("dictionary changed size during iteration" and KeyError before), and every table is right."""
    import threading

    from nsa.ops.triton import utils
    from nsa.ops.varlen import remember_offsets

    errors = []

    def worker(seed):
        try:
            for i in range(400):
                T = seed * 100000 + i + 10
                table = utils.tile_table(remember_offsets(torch.tensor([0, 7, T]), [0, 7, T]), 64)
                assert table[:, 1].tolist() == [0] + list(range(7, T, 64)), T
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert errors == []
    assert len(utils._TILE_TABLES) <= utils._TILE_TABLES_MAX
