"""The compiled float32 CPU kernels (nsa.ops.cpu_kernels) against the pure-PyTorch path of the torch backend and
the reference: random inputs, odd shapes, every G, Dk != Dv, invalid / repeated / future block indices, partial last
blocks, shift-free and max-shifted softmax, NaN propagation. Skipped where the kernels cannot be built."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import nsa
from nsa.ops import cpu_kernels, torch_dense
from nsa.ops import torch_backend as tb
from tests.kit import assert_close, assert_same_selection, make_inputs, small_config

KERNELS = cpu_kernels.load()
pytestmark = pytest.mark.skipif(KERNELS is None, reason="fused CPU kernels not built here (no C++ compiler?)")
TOL32 = dict(atol=2e-6, rtol=1e-5)


@pytest.fixture(autouse=True)
def chunked_path(monkeypatch):
    """The composed op of these short inputs would take the dense path (torch_dense): force the chunked one."""
    monkeypatch.setattr(torch_dense, "DENSE_MAX_LEN", 0)


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
    assert not torch.equal(torch.nan_to_num(fused), torch.nan_to_num(pure))  # two computations, not one path
    assert torch.isnan(fused[0, 41]).any() and not torch.isnan(fused[0, :41]).any()
    assert_close(fused, pure, **TOL32, name="nan row")


@pytest.mark.parametrize("G", [1, 3, 16])
@pytest.mark.parametrize("shift_free", [True, False])
@pytest.mark.parametrize("T,t0,C", [(200, 0, 200), (333, 100, 170), (40, 39, 1), (6, 0, 6)])
def test_compressed_kernel_and_top_n_match_torch_path(G, shift_free, T, t0, C):
    """o, lse and the selected blocks of the fused cmp kernel against _cmp_forward_chunk + _topn. Blocks are
    compared tie-robustly: the sums of the chosen blocks' scores must agree, and the chosen sets wherever the
    n-th and (n+1)-th best scores are not (near-)tied."""
    cfg = small_config(num_selected=5)
    HKV, Dk, Dv = 2, 8, 6
    l, d, lp = cfg.cmp_block_size, cfg.cmp_stride, cfg.slc_block_size
    r = lp // d
    g = torch.Generator().manual_seed(G + T)
    Tc = cfg.num_compressed(T)
    kc, vc = tb._prep_cmp(torch.randn(Tc, HKV, Dk, generator=g), torch.randn(Tc, HKV, Dv, generator=g), r,
                          torch.float32)
    qs = torch.randn(T, HKV * G, Dk, generator=g)
    qflat = tb._scaled_q(qs, t0, t0 + C, HKV, Dk ** -0.5, torch.float32)
    W = tb._overlap_weights(cfg, torch.float32, "cpu")
    nb = (t0 + C - 1) // lp + 1
    o_ref, lse_ref, blk = tb._cmp_forward_chunk(qflat, kc, vc, t0, C, l, d, Tc, (W, r, lp, nb), shift_free)
    idx_ref = tb._topn(blk, t0, cfg)
    o, lse, idx = KERNELS.cmp_fwd(qflat, kc, vc, W, C, t0, l, d, Tc, cfg.num_selected, cfg.num_init_blocks,
                                  cfg.num_local_blocks, shift_free)
    assert_close(o, o_ref, **TOL32, name="o")
    assert_close(lse, lse_ref, **TOL32, name="lse")
    blk = blk.permute(1, 0, 2)  # [C, HKV, nb]
    score = lambda ix: torch.where(ix >= 0, blk.gather(-1, ix.clamp(min=0)), 0.0).sum(-1)  # noqa: E731
    assert_close(score(idx), score(idx_ref), atol=1e-5, rtol=1e-5, name="chosen score sums")
    assert int((idx >= 0).sum()) == int((idx_ref >= 0).sum())
    same = (idx == idx_ref).all(-1)
    assert same.float().mean() > 0.95, f"only {same.float().mean():.2%} of rows chose the same blocks"


def test_compressed_kernel_exact_ties_prefer_lower_blocks():
    """Identical compressed keys tie the interior block scores exactly: the fused top-n must pick the lower
    indices, exactly like _topn."""
    cfg = small_config(num_selected=5, num_local_blocks=1)
    HKV, G, Dk, T = 2, 2, 8, 160
    l, d, lp = cfg.cmp_block_size, cfg.cmp_stride, cfg.slc_block_size
    r = lp // d
    g = torch.Generator().manual_seed(4)
    Tc = cfg.num_compressed(T)
    k_one = torch.randn(1, HKV, Dk, generator=g).expand(Tc, HKV, Dk).contiguous()
    kc, vc = tb._prep_cmp(k_one, torch.randn(Tc, HKV, Dk, generator=g), r, torch.float32)
    qflat = tb._scaled_q(torch.randn(T, HKV * G, Dk, generator=g), 0, T, HKV, Dk ** -0.5, torch.float32)
    W = tb._overlap_weights(cfg, torch.float32, "cpu")
    _, _, blk = tb._cmp_forward_chunk(qflat, kc, vc, 0, T, l, d, Tc, (W, r, lp, (T - 1) // lp + 1), False)
    _, _, idx = KERNELS.cmp_fwd(qflat, kc, vc, W, T, 0, l, d, Tc, cfg.num_selected, cfg.num_init_blocks,
                                cfg.num_local_blocks, False)
    assert torch.equal(idx, tb._topn(blk, 0, cfg))
    assert torch.equal(idx[-1, 0], torch.tensor([0, 1, 2, 3, 9]))  # four lowest, then the own block


@pytest.mark.parametrize("G", [1, 3, 16])
def test_gradients_fused_equal_pure_torch_and_reference(G, monkeypatch):
    """All input gradients of the composed op (q, compressed/selected/window K/V, gates) with the fused backward
    kernels against the pure-PyTorch backward (fp32) and the float64 reference; chunk boundaries inside the
    sequences, a varlen batch with a 1-token sequence, Dk != Dv."""
    cfg = small_config()
    HKV = 2 if G < 16 else 1
    cu = torch.tensor([0, 97, 98, 230])
    x64 = make_inputs(1, 230, HKV * G, HKV, 8, 6, cfg, cu_seqlens=cu, seed=G)
    do = torch.randn(1, 230, HKV * G, 6, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    monkeypatch.setattr(tb, "CHUNK_SIZE", 40)

    def grads(x, backend):
        x = [t.detach().clone().requires_grad_(True) for t in x]
        out = nsa.native_sparse_attention(*x, config=cfg, cu_seqlens=cu, backend=backend)
        return torch.autograd.grad(out, x, do.to(out.dtype))

    fused = grads([t.float() for t in x64], "torch")
    monkeypatch.setattr(tb, "USE_FUSED_CPU", False)
    pure = grads([t.float() for t in x64], "torch")
    ref = grads(x64, "reference")
    names = ["q", "k_cmp", "v_cmp", "k_slc", "v_slc", "k_win", "v_win", "gates"]
    for name, a, b, c in zip(names, fused, pure, ref):
        assert_close(a, b, atol=1e-5, rtol=1e-4, name=f"d{name} fused vs pure")
        assert_close(a, c, atol=1e-5, rtol=1e-4, name=f"d{name} fused vs reference")


def test_fused_backward_is_bitwise_repeatable():
    cfg = small_config()
    x = [t.float().requires_grad_(True) for t in make_inputs(1, 150, 8, 2, 8, 8, cfg, seed=2)]
    runs = []
    for _ in range(2):
        out = nsa.native_sparse_attention(*x, config=cfg, backend="torch")
        runs.append(torch.autograd.grad(out.square().sum(), x))
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_loader_disabled_and_failed_builds_fall_back(monkeypatch, tmp_path):
    """NSA_CPU_KERNELS=0 gives None; a build that fails warns once and gives None (the pure-PyTorch path)."""
    monkeypatch.setattr(cpu_kernels, "_STATE", {})
    monkeypatch.setenv("NSA_CPU_KERNELS", "0")
    assert cpu_kernels.load() is None
    monkeypatch.setenv("NSA_CPU_KERNELS", "1")
    bad = tmp_path / "broken.cpp"
    bad.write_text("this is not C++\n")
    monkeypatch.setattr(cpu_kernels, "_SOURCE", bad)
    monkeypatch.setattr(cpu_kernels, "_cpu_tag", lambda: "broken_build_test")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    with pytest.warns(RuntimeWarning, match="fused CPU kernels unavailable"):
        assert cpu_kernels.load() is None
    assert cpu_kernels.load() is None  # decided once


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_run_the_kernels_in_float32(dtype, monkeypatch):
    """bf16/fp16 CPU inputs: the op computes in float32 (the kernels' path), returns the input dtype, and matches
    the float64 reference on the same (rounded) inputs to the output dtype's precision; gradients too."""
    cfg = small_config()
    x64 = make_inputs(1, 180, 8, 2, 16, 16, cfg, seed=11)
    xs = [t.to(dtype).requires_grad_(True) for t in x64]
    out = nsa.native_sparse_attention(*xs, config=cfg, backend="torch")
    assert out.dtype == dtype
    ref_in = [t.detach().double().requires_grad_(True) for t in xs]
    ref = nsa.native_sparse_attention(*ref_in, config=cfg, backend="reference")
    tol = dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else dict(atol=3e-3, rtol=3e-3)
    assert_close(out, ref, **tol, name="out")
    do = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grads = torch.autograd.grad(out, xs, do.to(dtype))
    grads_ref = torch.autograd.grad(ref, ref_in, do)
    for a, b in zip(grads, grads_ref):
        assert a.dtype == dtype
        assert_close(a, b, **tol, name="grad")


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("NSA_CPU_KERNELS_CFLAGS") is not None, reason="already a variant build")
@pytest.mark.parametrize("flags", ["-mno-avx512f", "-mno-avx512f -mno-avx2"])
def test_other_instruction_sets(flags, tmp_path):
    """The AVX2 and scalar code paths (this machine builds the AVX-512 one): a separate build, checked by the
    kernel-level tests of this file in a subprocess."""
    if "avx512f" not in open("/proc/cpuinfo").read() and flags == "-mno-avx512f":
        pytest.skip("this machine builds the AVX2 path already")
    env = dict(os.environ, NSA_CPU_KERNELS_CFLAGS=flags, TORCH_EXTENSIONS_DIR=str(tmp_path))
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k",
           "match or rows_without or large_scores or exact_ties or gradients_fused"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=Path(__file__).parent.parent)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert " passed" in res.stdout and "skipped" not in res.stdout.strip().splitlines()[-1], res.stdout[-500:]


@pytest.mark.parametrize("Tq", [9, 40])
def test_query_tail_float32_uses_the_kernels(Tq, monkeypatch):
    """A float32 query tail longer than TAIL_DECODE_MAX runs the chunked forward with the kernels (positions offset
    by T - Tq): equal to the last rows of the full forward and to the pure-PyTorch tail."""
    cfg = small_config()
    x = [t.float() for t in make_inputs(2, 150, 8, 2, 8, 6, cfg, seed=Tq)]
    q, k_cmp, v_cmp, ks, vs, kw, vw, gates = x
    monkeypatch.setattr(tb, "CHUNK_SIZE", 16)
    full = nsa.native_sparse_attention(*x, config=cfg, backend="torch")
    tail = tb.native_sparse_attention_tail(q[:, -Tq:], k_cmp, v_cmp, ks, vs, kw, vw, gates[:, -Tq:], config=cfg)
    assert_close(tail, full[:, -Tq:], **TOL32, name="tail vs full")
    monkeypatch.setattr(tb, "USE_FUSED_CPU", False)
    pure = tb.native_sparse_attention_tail(q[:, -Tq:], k_cmp, v_cmp, ks, vs, kw, vw, gates[:, -Tq:], config=cfg)
    assert_close(tail, pure, **TOL32, name="tail vs pure tail")


@pytest.mark.parametrize("G", [1, 4])
def test_select_blocks_op_uses_the_kernel(G, monkeypatch):
    """The single-branch select_blocks op takes the cmp kernel (no values) in float32: tie-robust agreement with
    the float64 reference, varlen included, and exact ties to the lower blocks."""
    calls = []
    real = tb._fused_kernels
    monkeypatch.setattr(tb, "_fused_kernels", lambda q, acc: (calls.append(1), real(q, acc))[1])
    cfg = small_config(num_selected=5, num_init_blocks=0, num_local_blocks=1)
    cu = torch.tensor([0, 130, 131, 300])
    q, k_cmp, *_ = make_inputs(1, 300, 2 * G, 2, 8, 8, cfg, cu_seqlens=cu, seed=G)
    idx = nsa.select_blocks(q.float(), k_cmp.float(), config=cfg, cu_seqlens=cu, backend="torch")
    assert calls
    assert_same_selection(idx, nsa.select_blocks(q, k_cmp, config=cfg, cu_seqlens=cu, backend="reference"),
                          nsa.ops.reference.block_scores(q, k_cmp, config=cfg, cu_seqlens=cu), cfg)
    q, k_cmp, *_ = make_inputs(1, 300, 2 * G, 2, 8, 8, cfg, seed=G)
    k_tie = k_cmp[:, :1].expand_as(k_cmp).contiguous()
    assert torch.equal(nsa.select_blocks(q.float(), k_tie.float(), config=cfg, backend="torch"),
                       nsa.select_blocks(q, k_tie, config=cfg, backend="reference"))


def test_packed_batches_group_only_many_short_sequences():
    """With the kernels, packed sequences run one by one unless they average < GROUP_MAX_MEAN_LEN tokens; without
    them (float64 here) equal lengths are always grouped. Both layouts give the pure path's result."""
    cfg = small_config()
    cu_short = torch.arange(7) * 20  # 6 x 20 tokens: grouped
    cu_long = torch.tensor([0, 150, 300])  # 2 x 150: one by one
    q = torch.zeros(1, 300, 4, 8)
    assert tb._use_groups(q[:, :120], cu_short) and not tb._use_groups(q, cu_long)
    assert tb._use_groups(q.double(), cu_long)
    for cu in (cu_short, cu_long):
        x = [t.float() for t in make_inputs(1, int(cu[-1]), 4, 2, 8, 6, cfg, cu_seqlens=cu, seed=3)]
        fused = nsa.native_sparse_attention(*x, config=cfg, cu_seqlens=cu, backend="torch")
        tb.USE_FUSED_CPU = False
        try:
            pure = nsa.native_sparse_attention(*x, config=cfg, cu_seqlens=cu, backend="torch")
        finally:
            tb.USE_FUSED_CPU = True
        assert_close(fused, pure, **TOL32, name=f"{len(cu) - 1} sequences")


def test_single_branch_ops_use_the_kernels(monkeypatch):
    """compressed_attention, selected_attention and sliding_window_attention in float32 run the kernels: outputs,
    lse and input gradients against the float64 reference, varlen included."""
    calls = []
    real = tb._fused_kernels
    monkeypatch.setattr(tb, "_fused_kernels", lambda q, acc: (calls.append(1), real(q, acc))[1])
    monkeypatch.setattr(tb, "CHUNK_SIZE", 48)
    cfg = small_config()
    cu = torch.tensor([0, 90, 91, 200])
    x = make_inputs(1, 200, 6, 2, 8, 6, cfg, cu_seqlens=cu, seed=8)
    q, k_cmp, v_cmp, ks, vs, kw, vw, _ = x
    idx = nsa.ops.reference.select_blocks(q, k_cmp, config=cfg, cu_seqlens=cu)
    ops = {
        "cmp": (lambda q_, k_, v_, backend: nsa.compressed_attention(
            q_, k_, v_, block_size=cfg.cmp_block_size, stride=cfg.cmp_stride, cu_seqlens=cu, backend=backend),
            (q, k_cmp, v_cmp)),
        "slc": (lambda q_, k_, v_, backend: nsa.selected_attention(
            q_, k_, v_, idx, block_size=cfg.slc_block_size, cu_seqlens=cu, backend=backend), (q, ks, vs)),
        "win": (lambda q_, k_, v_, backend: nsa.sliding_window_attention(
            q_, k_, v_, window=cfg.window_size, cu_seqlens=cu, backend=backend), (q, kw, vw)),
    }
    do = torch.randn(1, 200, 6, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    for name, (op, inputs) in ops.items():
        calls.clear()
        x32 = [t.detach().float().requires_grad_(True) for t in inputs]
        x64 = [t.detach().clone().requires_grad_(True) for t in inputs]
        out32, out64 = op(*x32, backend="torch"), op(*x64, backend="reference")
        o32 = out32[0] if isinstance(out32, tuple) else out32
        o64 = out64[0] if isinstance(out64, tuple) else out64
        assert calls, name
        assert_close(o32, o64, **TOL32, name=f"{name} o")
        if isinstance(out32, tuple):
            assert_close(out32[1], out64[1], **TOL32, name=f"{name} lse")
        for a, b in zip(torch.autograd.grad(o32, x32, do.float()), torch.autograd.grad(o64, x64, do)):
            assert_close(a, b, atol=1e-5, rtol=1e-4, name=f"{name} grad")


def test_ninja_from_the_wheel_when_path_has_none(monkeypatch, tmp_path):
    """An un-activated venv without a system ninja: the loader puts the PyPI wheel's ninja on PATH."""
    ninja = pytest.importorskip("ninja")
    import shutil
    monkeypatch.setenv("PATH", str(tmp_path))
    assert shutil.which("ninja") is None
    cpu_kernels._ensure_ninja()
    assert os.environ["PATH"].split(os.pathsep)[0] == ninja.BIN_DIR and shutil.which("ninja")


# ------------------------------------------------------------------------------------------------ decode
DECODE_GEOMETRIES = [small_config(), small_config(cmp_block_size=8, cmp_stride=8, slc_block_size=8, window_size=8),
                     small_config(cmp_block_size=16, cmp_stride=4, slc_block_size=16, num_local_blocks=0,
                                  num_init_blocks=0, window_size=5)]


def _decode_case(G, cfg, Tq, seed, strided):
    """A ragged batch over caches that may be strided views (a slice of a wider head axis and of a longer time
    axis), NaN in every slot past a row's length, and a window ring (win_start) for k/v_win."""
    from nsa.ops.decode import query_positions

    B, S, HKV, Dk, Dv = 4, 150, 2, 16, 8
    q, k_cmp, v_cmp, ks, vs, _, _, gates = make_inputs(B, S, G * HKV, HKV, Dk, Dv, cfg, dtype=torch.float32,
                                                       seed=seed)
    lengths = torch.tensor([150, 77, 9, max(Tq, 2)])
    if strided:  # the caches as views into bigger buffers: head stride 2 D, position stride 4 D
        def widen(x):
            big = torch.full((B, x.shape[1] + 7, 2 * HKV, x.shape[3]), float("nan"))
            big[:, :x.shape[1], ::2] = x
            return big[:, :x.shape[1], ::2]
        k_cmp, v_cmp, ks, vs = map(widen, (k_cmp, v_cmp, ks, vs))
    for b, L in enumerate(lengths.tolist()):
        tc = cfg.num_compressed(L)
        for x in (k_cmp, v_cmp):
            x[b, tc:] = float("nan")
        for x in (ks, vs):
            x[b, L:] = float("nan")
    # the window ring: slot s holds position win_start[b] + s, W = w + Tq - 1 slots
    W = cfg.window_size + Tq - 1
    win_start = (lengths - W).clamp(min=0)
    pos = win_start[:, None] + torch.arange(W)
    kw = torch.stack([ks[b, pos[b].clamp(max=S - 1)] for b in range(B)])
    vw = torch.stack([vs[b, pos[b].clamp(max=S - 1)] for b in range(B)])
    rows = query_positions(lengths, Tq)
    qq = torch.stack([q[b, rows[b]] for b in range(B)])
    gg = torch.stack([gates[b, rows[b]] for b in range(B)])
    return (qq, k_cmp, v_cmp, ks, vs, kw, vw, gg), lengths, win_start


@pytest.mark.parametrize("G", [1, 2, 3, 16])
@pytest.mark.parametrize("cfg", DECODE_GEOMETRIES, ids=["overlap", "l_eq_d_eq_lp", "no_forced"])
@pytest.mark.parametrize("Tq", [1, 5])
def test_decode_kernel_matches_vectorised_path_and_reference(G, cfg, Tq, monkeypatch):
    """decode_fwd (one compiled call, caches read in place) against the pure-PyTorch gather decode and the float64
    reference decode: ragged rows (one shorter than l), chunked queries, strided caches, a window ring, NaN past
    every row's length; the same selected blocks (tie-robustly) and outputs."""
    from nsa.ops import decode

    calls, real = [], KERNELS.decode_fwd
    monkeypatch.setattr(KERNELS, "decode_fwd", lambda *a: calls.append(a) or real(*a))
    for strided in (False, True):
        x, lengths, ws = _decode_case(G, cfg, Tq, seed=G + Tq, strided=strided)
        kw = dict(lengths=lengths, config=cfg, win_start=ws, return_indices=True)
        o, idx = decode.torch_decode(*x, **kw)
        monkeypatch.setattr(decode, "USE_FUSED_DECODE", False)
        o_vec, idx_vec = decode.torch_decode(*x, **kw)
        monkeypatch.setattr(decode, "USE_FUSED_DECODE", True)
        assert torch.isfinite(o).all()
        assert_close(o, o_vec, **TOL32, name=f"fused vs vectorised (strided={strided})")
        assert torch.equal(idx, idx_vec), strided
        ref = decode.reference_decode(*[t.double() for t in x], lengths=lengths, config=cfg, win_start=ws)
        assert_close(o, ref, atol=1e-5, rtol=1e-5, name="fused vs float64 reference")
    assert len(calls) == 2
    assert not calls[1][2].is_contiguous()  # the strided k_cmp view went in as it is: read in place, not copied


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("G", [1, 3, 16])
def test_decode_kernel_reads_16bit_caches(dtype, G, monkeypatch):
    """bfloat16 / float16 caches go through decode_fwd too (converted to float32 tile by tile on their way to the
    BLAS): with float32 queries the arithmetic is float32 on both paths, so the outputs match the vectorised path
    and the float64 reference as tightly as the float32 case; with 16-bit queries the output is 16-bit and equals
    the vectorised path's up to its rounding. Strided caches, a window ring, NaN past every row's length."""
    from nsa.ops import decode

    calls, real = [], KERNELS.decode_fwd
    monkeypatch.setattr(KERNELS, "decode_fwd", lambda *a: calls.append(a) or real(*a))
    cfg = DECODE_GEOMETRIES[0]
    for strided, Tq in ((False, 1), (True, 5)):
        x, lengths, ws = _decode_case(G, cfg, Tq, seed=10 + G, strided=strided)
        x = [x[0]] + [t.to(dtype) for t in x[1:7]] + [x[7]]  # float32 q and gates, 16-bit caches
        kw = dict(lengths=lengths, config=cfg, win_start=ws, return_indices=True)
        o, idx = decode.torch_decode(*x, **kw)
        monkeypatch.setattr(decode, "USE_FUSED_DECODE", False)
        o_vec, idx_vec = decode.torch_decode(*x, **kw)
        o16_vec = decode.torch_decode(x[0].to(dtype), *x[1:7], x[7].to(dtype), **kw)[0]
        monkeypatch.setattr(decode, "USE_FUSED_DECODE", True)
        assert o.dtype == torch.float32 and torch.isfinite(o).all()
        assert_close(o, o_vec, **TOL32, name=f"{dtype} caches: fused vs vectorised")
        assert torch.equal(idx, idx_vec)
        ref = decode.reference_decode(*[t.double() for t in x], lengths=lengths, config=cfg, win_start=ws)
        assert_close(o, ref, atol=1e-5, rtol=1e-5, name=f"{dtype} caches: fused vs float64 reference")
        o16 = decode.torch_decode(x[0].to(dtype), *x[1:7], x[7].to(dtype), **kw)[0]
        assert o16.dtype == dtype
        assert_close(o16, o16_vec, atol=1e-2, rtol=1e-2, name=f"{dtype} queries: fused vs vectorised")
    assert len(calls) == 4 and calls[0][2].dtype == dtype  # every call took the kernel, caches unconverted


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_decode_kernel_long_runs(dtype):
    """Runs of more than one conversion tile (512 positions) in every branch: 600+ compressed tokens, a selection
    block of 520 positions and a 700-token window, against the vectorised path and the float64 reference."""
    from nsa.ops import decode

    cfg = nsa.NSAConfig(cmp_block_size=4, cmp_stride=2, slc_block_size=520, num_selected=2, num_init_blocks=1,
                        num_local_blocks=1, window_size=700)
    q, k_cmp, v_cmp, ks, vs, _, _, gates = make_inputs(2, 1300, 6, 2, 24, 16, cfg, dtype=torch.float32, seed=5)
    caches = [t.to(dtype) for t in (k_cmp, v_cmp, ks, vs, ks, vs)]
    args = (q[:, -1:], *caches, gates[:, -1:])
    lengths = torch.tensor([1300, 1100])
    o = decode.torch_decode(*args, lengths=lengths, config=cfg)
    decode.USE_FUSED_DECODE = False
    try:
        want = decode.torch_decode(*args, lengths=lengths, config=cfg)
    finally:
        decode.USE_FUSED_DECODE = True
    assert_close(o, want, **TOL32, name=f"{dtype}: fused vs vectorised")
    ref = decode.reference_decode(*[t.double() for t in args], lengths=lengths, config=cfg)
    assert_close(o, ref, atol=1e-5, rtol=1e-5, name=f"{dtype}: fused vs float64 reference")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_kernel_normalises_before_the_values(dtype):
    """Values near the float32 limit: the probabilities are normalised before they weight V, so four keys of
    v = 1e38 give 1e38 (as the reference does), not an overflowed sum 4e38 = inf, then NaN through 0 * inf."""
    from nsa.ops import decode

    cfg = nsa.NSAConfig(cmp_block_size=4, cmp_stride=4, slc_block_size=4, num_selected=2, num_init_blocks=1,
                        num_local_blocks=1, window_size=4)
    k = torch.zeros(1, 4, 1, 1, dtype=dtype)
    v = torch.full((1, 4, 1, 1), 1e38, dtype=dtype)
    kc = torch.zeros(1, 1, 1, 1, dtype=dtype)
    for gates in ([0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [0.5, 0.0, 0.0]):
        args = (torch.zeros(1, 1, 1, 1), kc, kc, k, v, k, v, torch.tensor([[[gates]]]))
        kw = dict(lengths=torch.tensor([4]), config=cfg)
        got = nsa.decode_attention(*args, **kw)
        want = decode.reference_decode(*args, **kw)
        assert torch.isfinite(got).all(), gates
        assert_close(got, want, atol=0, rtol=1e-6, name=f"{gates}")


def test_decode_kernel_through_the_public_op_and_max_length():
    """nsa.decode_attention (float32, CPU) takes the kernel: with max_length a row out of range comes out NaN and
    the others equal the exact call."""
    cfg = DECODE_GEOMETRIES[0]
    x, lengths, ws = _decode_case(4, cfg, 1, seed=3, strided=False)
    exact = nsa.decode_attention(*x, lengths=lengths, config=cfg, win_start=ws)
    bad = lengths.clone()
    bad[2] = 151  # past max_length
    o = nsa.decode_attention(*x, lengths=bad, config=cfg, win_start=ws, max_length=150)
    assert torch.isnan(o[2]).all()
    keep = torch.tensor([0, 1, 3])
    assert_close(o[keep], exact[keep], **TOL32, name="valid rows")


def test_decode_kernel_nan_in_a_visible_slot_propagates():
    """A NaN the query does read (not a slot past its length) gives NaN, as in the torch path; not a silent 0."""
    cfg = DECODE_GEOMETRIES[0]
    x, lengths, ws = _decode_case(2, cfg, 1, seed=4, strided=False)
    x[3][0, 3] = float("nan")  # k_slc of row 0 at position 3: in block 0, which is always selected
    o = nsa.decode_attention(*x, lengths=lengths, config=cfg, win_start=ws)
    assert torch.isnan(o[0]).all() and torch.isfinite(o[1:]).all()


@pytest.mark.parametrize("shared_kv", [False, True])
def test_layer_decode_float32_with_the_kernel_equals_the_full_forward(shared_kv):
    """Prefill + 30 float32 decode steps through the layer (the cache's own window ring, rows of different
    lengths) equal one full forward."""
    cfg = DECODE_GEOMETRIES[0]
    torch.manual_seed(0)
    layer = nsa.NativeSparseAttention(32, 8, 2, 16, config=cfg, shared_kv=shared_kv, backend="torch")
    torch.nn.init.normal_(layer.compress_k.mlp[2].weight, std=0.2)
    x = torch.randn(2, 70, 32)
    cache = nsa.NSACache(1, 2, 70)
    with torch.no_grad():
        steps = [layer(x[:, :40], cache=cache)] + [layer(x[:, t:t + 1], cache=cache) for t in range(40, 70)]
        assert_close(torch.cat(steps, 1), layer(x), atol=1e-5, rtol=1e-4, name="prefill + steps vs full")


def test_decode_kernel_odd_layouts_huge_geometry_and_gates():
    """Review findings, each against the vectorised path: caches whose odd strides torch still calls contiguous
    (an empty head-dim-major k_cmp; one position with position stride < D), a geometry whose n * l' overflows
    int64 (l = d = l' = 2^60: the score buffer must still cover every selected token), and a NaN gate on a branch
    with no key (g * 0 = NaN, not 0)."""
    from nsa.ops import decode

    def both(*args, **kw):
        decode.USE_FUSED_DECODE = False
        try:
            want = nsa.decode_attention(*args, backend="torch", **kw)
        finally:
            decode.USE_FUSED_DECODE = True
        return nsa.decode_attention(*args, backend="torch", **kw), want

    cfg = nsa.NSAConfig(cmp_block_size=4, cmp_stride=2, slc_block_size=4, num_selected=2, num_init_blocks=1,
                        num_local_blocks=1, window_size=4)
    store = lambda: torch.randn(1, 8, 4, 2).transpose(2, 3)  # noqa: E731 - [B, S, HKV, D], head-dim-major
    ks, vs = store()[:, :3], store()[:, :3]
    args = (torch.randn(1, 1, 4, 4), store()[:, :0], store()[:, :0], ks, vs, ks, vs, torch.rand(1, 1, 4, 3))
    got, want = both(*args, lengths=torch.tensor([3]), config=cfg)
    assert_close(got, want, **TOL32, name="empty strided k_cmp")
    one = torch.randn(1, 1, 4, 1).permute(0, 3, 1, 2)  # [1, 1, 1, 4], position stride 1
    cfg1 = nsa.NSAConfig(cmp_block_size=1, cmp_stride=1, slc_block_size=1, num_selected=1, num_init_blocks=0,
                         num_local_blocks=1, window_size=1)
    got, want = both(torch.randn(1, 1, 2, 4), one, one, one, one, one, one, torch.rand(1, 1, 2, 3),
                     lengths=torch.tensor([1]), config=cfg1)
    assert_close(got, want, **TOL32, name="one position, stride < D")
    big = 2 ** 60
    cfg_big = nsa.NSAConfig(cmp_block_size=big, cmp_stride=big, slc_block_size=big, num_selected=8,
                            num_init_blocks=0, num_local_blocks=1, window_size=1)
    ks, vs = torch.randn(1, 200, 1, 8), torch.randn(1, 200, 1, 8)
    kc = torch.randn(1, 0, 1, 8)
    args = (torch.randn(1, 1, 1, 8), kc, kc, ks, vs, ks, vs, torch.rand(1, 1, 1, 3))
    got = nsa.decode_attention(*args, lengths=torch.tensor([200]), config=cfg_big, backend="torch")
    want = decode.reference_decode(*[a.double() for a in args], lengths=torch.tensor([200]), config=cfg_big)
    assert_close(got, want, atol=1e-5, rtol=1e-5, name="n * l' past int64")  # (the gather path cannot size it)
    gates = torch.rand(1, 1, 4, 3)
    gates[0, 0, 1, 0] = float("nan")  # head 1's cmp gate; position 2 < l - 1 sees no compressed token
    ks, vs = torch.randn(1, 3, 2, 4), torch.randn(1, 3, 2, 4)
    got, want = both(torch.randn(1, 1, 4, 4), kc[..., :4].expand(1, 0, 2, 4), kc[..., :4].expand(1, 0, 2, 4),
                     ks, vs, ks, vs, gates, lengths=torch.tensor([3]), config=cfg)
    assert torch.isnan(got[0, 0, 1]).all() and torch.isfinite(got[0, 0, [0, 2, 3]]).all()
    assert_close(got, want, **TOL32, name="NaN gate on an empty branch")
