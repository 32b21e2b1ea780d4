"""NativeSparseAttention layer and φ compressors."""
import pytest
import torch

import nsa
from nsa.compression import compression_blocks
from nsa.ops.varlen import compressed_cu_seqlens
from tests.kit import assert_close, small_config

CFG = small_config()


def make_layer(**kw):
    torch.manual_seed(0)
    kw.setdefault("config", CFG)
    return nsa.NativeSparseAttention(48, 6, 2, 8, **kw).double()


def test_compression_blocks_layout_and_varlen():
    x = torch.arange(2 * 30 * 1 * 1, dtype=torch.float64).view(2, 30, 1, 1)
    blocks = compression_blocks(x, 8, 4)  # Tc = (30 - 8) // 4 + 1 = 6
    assert blocks.shape == (2, 6, 1, 8, 1)
    assert blocks[1, 2, 0, :, 0].tolist() == list(range(30 + 8, 30 + 16))
    cu = torch.tensor([0, 9, 9, 30], dtype=torch.int32)  # lengths 9, 0, 21 -> 1, 0, 4 compressed tokens
    packed = compression_blocks(x[:1], 8, 4, cu)
    assert compressed_cu_seqlens(cu, 8, 4).tolist() == [0, 1, 1, 5]
    assert packed[0, 0, 0, :, 0].tolist() == list(range(0, 8))
    assert packed[0, 1, 0, :, 0].tolist() == list(range(9, 17))
    assert packed[0, 4, 0, :, 0].tolist() == list(range(21, 29))


@pytest.mark.parametrize("name", ["mlp", "linear", "mean"])
def test_compressors_start_as_mean_pooling(name):
    comp = nsa.make_compressor(name, 8, 8, 4, position_embedding=False).double()
    x = torch.randn(2, 20, 3, 8, dtype=torch.float64)
    assert_close(comp(x), compression_blocks(x, 8, 4).mean(-2), atol=1e-12, rtol=1e-12, name=name)


@pytest.mark.parametrize("compression", ["mlp", "linear", "mean"])
@pytest.mark.parametrize("shared_kv", [False, True, "slc_win"])
def test_layer_gradients_reach_everything(compression, shared_kv):
    layer = make_layer(compression=compression, shared_kv=shared_kv, v_head_dim=6)
    if compression == "mlp":  # leave the zero init so the MLP's first layer also receives gradient
        torch.nn.init.normal_(layer.compress_k.mlp[2].weight, std=0.1)
        torch.nn.init.normal_(layer.compress_v.mlp[2].weight, std=0.1)
    x = torch.randn(2, 45, 48, dtype=torch.float64)
    y = layer(x)
    assert y.shape == x.shape
    y.square().mean().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.count_nonzero(p.grad) > 0, name


def test_shared_kv_modes_route_the_projections():
    """slc_win: cmp gets its own K/V, slc and win share one set; True: one set for all; False: three sets."""
    x = torch.randn(1, 20, 48, dtype=torch.float64)
    for mode, sets in ((True, 1), ("slc_win", 2), (False, 3)):
        layer = make_layer(shared_kv=mode)
        assert layer.num_kv_sets == sets and layer.kv_proj.out_features == sets * 2 * (8 + 8)
        _, kc, vc, ks, vs, kw, vw, _ = layer.project_tokens(x, torch.arange(20)[None])
        assert (kw is ks) == (mode is not False) and (vw is vs) == (mode is not False)
        assert torch.equal(vc, vs) == (mode is True)  # cmp has its own set unless everything is shared


@pytest.mark.parametrize("bad", ["yes", 1, None, "win"])
def test_shared_kv_rejects_unknown_modes(bad):
    with pytest.raises(ValueError, match="shared_kv"):
        make_layer(shared_kv=bad)


def test_gate_bias_sets_the_initial_gates():
    layer = make_layer(gate_bias=(2.0, 0.0, -1.0))
    x = torch.randn(1, 5, 48, dtype=torch.float64)
    torch.nn.init.zeros_(layer.g_proj.weight)  # gates = sigmoid(bias) for every token and head
    gates = layer.project_tokens(x, torch.arange(5)[None])[-1]
    assert_close(gates, torch.sigmoid(torch.tensor([2.0, 0.0, -1.0], dtype=torch.float64)).expand_as(gates),
                 atol=1e-15, rtol=0)
    assert torch.equal(make_layer().g_proj.bias, torch.zeros(18, dtype=torch.float64))


@pytest.mark.parametrize("bad", [(1.0, 2.0), (0.0, float("nan"), 0.0), (0.0, float("inf"), 0.0), "abc", 2.0])
def test_gate_bias_rejects_bad_values(bad):
    with pytest.raises(ValueError, match="gate_bias"):
        make_layer(gate_bias=bad)


def test_layer_causal():
    layer = make_layer()
    x = torch.randn(1, 60, 48, dtype=torch.float64)
    x2 = x.clone()
    x2[:, 33:] = torch.randn(1, 27, 48, dtype=torch.float64)
    assert torch.equal(layer(x)[:, :33], layer(x2)[:, :33])


def test_layer_varlen_equals_per_sequence():
    layer = make_layer()
    lengths = [17, 40, 5]
    cu = torch.tensor([0, 17, 57, 62], dtype=torch.int32)
    x = torch.randn(1, 62, 48, dtype=torch.float64)
    y = layer(x, cu_seqlens=cu)
    for n, L in enumerate(lengths):
        s = int(cu[n])
        assert_close(y[:, s:s + L], layer(x[:, s:s + L]), atol=1e-10, rtol=1e-10, name=f"seq {n}")


def test_rope_relative_positions():
    """RoPE enters q, slc/win keys at their positions and compressed keys at their block's last position, so
    shifting every position by a constant leaves the layer output unchanged (to rounding)."""
    layer = make_layer()
    x = torch.randn(2, 50, 48, dtype=torch.float64)
    base = layer(x)
    shifted = layer(x, position_ids=torch.arange(50) + 1234)
    assert_close(shifted, base, atol=1e-9, rtol=1e-9, name="shift invariance")
    # and positions matter: scrambling them changes the output
    assert not torch.allclose(layer(x, position_ids=torch.arange(50).flip(0)), base)


def test_compressed_keys_rotated_at_block_end():
    layer = make_layer(compression="mean")
    x = torch.randn(1, 20, 48, dtype=torch.float64)
    q, k_cmp, *_ = layer.project(x)
    raw = layer.kv_proj(x).view(1, 20, 3, 2, 16)[..., 0, :, :8]
    expected = nsa.rope.apply_rope(compression_blocks(raw, 8, 4).mean(-2), torch.tensor([7, 11, 15, 19]))
    assert_close(k_cmp, expected, atol=1e-12, rtol=1e-12, name="k_cmp")


@pytest.mark.parametrize("varlen", [False, True])
def test_torch_compile_matches_eager(varlen, recwarn):
    """torch.compile(layer): Dynamo traces the projections, RoPE and φ, and the NSA op as its custom ops instead of
    tracing into the backends, which it cannot (it warned about every compiled-kernel call). Same output and
    gradients as eager (more in tests/test_compile.py)."""
    torch._dynamo.reset()
    layer = make_layer().float()  # float32: the compiled CPU kernels, which Dynamo cannot trace
    cu = torch.tensor([0, 40, 100]) if varlen else None
    x = torch.randn(1 if varlen else 2, 100, 48, generator=torch.Generator().manual_seed(1), requires_grad=True)
    ref = layer(x, cu_seqlens=cu)
    (g_ref,) = torch.autograd.grad(ref.square().sum(), x)
    out = torch.compile(layer, backend="eager")(x, cu_seqlens=cu)
    (g,) = torch.autograd.grad(out.square().sum(), x)
    assert torch.equal(out, ref) and torch.equal(g, g_ref)
    assert not [w for w in recwarn if "Dynamo does not know how to trace" in str(w.message)]


def test_torch_compile_decodes_eagerly():
    """A compiled layer's cached steps (prefill, then tokens) match the eager layer's: the cache bookkeeping runs
    eagerly under torch.compile instead of being traced (and recompiled at every new length)."""
    torch._dynamo.reset()
    layer = make_layer().float()
    compiled = torch.compile(layer, backend="eager")
    x = torch.randn(2, 60, 48, generator=torch.Generator().manual_seed(2))
    caches = nsa.NSACache(1, 2, 64), nsa.NSACache(1, 2, 64)
    for chunk in (x[:, :57], x[:, 57:58], x[:, 58:59], x[:, 59:60]):
        assert torch.equal(compiled(chunk, cache=caches[0], layer_idx=0), layer(chunk, cache=caches[1], layer_idx=0))


def test_inference_mode_cu_seqlens_changed_in_place():
    """An inference tensor has no version counter, so the host copy of a caller's cu_seqlens is not remembered under
    torch.inference_mode: new values written into the same tensor are used (compression blocks included)."""
    layer = make_layer().float()
    x = torch.randn(1, 47, 48, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        cu = torch.tensor([0, 7, 33, 47])
        layer(x, cu_seqlens=cu)
        cu.copy_(torch.tensor([0, 15, 30, 47]))
        assert torch.equal(layer(x, cu_seqlens=cu), layer(x, cu_seqlens=torch.tensor([0, 15, 30, 47])))


def test_layer_reads_packed_offsets_once(monkeypatch):
    """A packed layer call reads its cu_seqlens from the device once (a synchronisation on a GPU), when it checks
    them, and every later use (positions, compressed blocks, the op) takes the remembered values; also under
    torch.inference_mode, where the caller's tensor cannot be remembered (the layer remembers its own copy)."""
    from nsa.ops import varlen

    reads = []
    monkeypatch.setattr(varlen, "_read_offsets", lambda cu: reads.append(cu.tolist()) or cu.tolist())
    layer = make_layer().float()
    x = torch.randn(1, 47, 48, generator=torch.Generator().manual_seed(3))
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            reads.clear()
            layer(x, cu_seqlens=torch.tensor([0, 7, 33, 47]))
            assert reads == [[0, 7, 33, 47]], (mode.__name__, reads)


@pytest.mark.parametrize("compression", ["mlp", "linear", "mean"])
def test_meta_device_initialisation(compression):
    """Built on the meta device, then `to_empty()` and `reset_parameters()` (or a post-order `apply`, as FSDP2 /
    torchtitan-style code does): the layer's own initialisation comes back (gate bias, φ as mean pooling plus
    mean(PE), PE ~ N(0, 0.02²)); `to_empty` alone leaves garbage there."""
    kw = dict(config=CFG, compression=compression, gate_bias=(1.0, -0.5, 0.25), backend="reference")
    fresh = nsa.NativeSparseAttention(48, 6, 2, 8, **kw)
    for reset in ("method", "apply"):
        with torch.device("meta"):
            layer = nsa.NativeSparseAttention(48, 6, 2, 8, **kw)
        layer = layer.to_empty(device="cpu")
        if reset == "method":
            layer.reset_parameters()
        else:
            layer.apply(lambda m: m.reset_parameters() if hasattr(m, "reset_parameters") else None)
        assert torch.equal(layer.g_proj.bias, fresh.g_proj.bias), reset
        x = torch.randn(2, 6, 3, 8, 8)  # [B, Tc, H, l=8, D=8] blocks: φ starts as mean pooling (+ mean(PE) on keys)
        for got, ref in ((layer.compress_k, fresh.compress_k), (layer.compress_v, fresh.compress_v)):
            assert_close(got.compress(x), ref.compress(x), atol=1e-6, rtol=1e-6, name=f"φ {reset}")
            if got.pos_emb is not None:
                assert 0.005 < float(got.pos_emb.detach().std()) < 0.05
        assert all(torch.isfinite(p).all() for p in layer.parameters())
    assert "l=8" in repr(fresh) and "shared_kv=False" in repr(fresh)


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("varlen", [False, True])
def test_return_aux_gives_the_selection_and_gates(backend, varlen):
    """forward(..., return_aux=True): the same output (and gradients), plus the selected blocks the op used (equal
    to select_blocks on the layer's own q and compressed keys) and the gates."""
    torch.manual_seed(0)
    layer = nsa.NativeSparseAttention(48, 6, 2, 8, config=CFG, backend=backend).double()
    torch.nn.init.normal_(layer.compress_k.mlp[2].weight, std=0.1)
    cu = torch.tensor([0, 21, 70]) if varlen else None
    x = torch.randn(1 if varlen else 2, 70, 48, dtype=torch.float64, requires_grad=True)
    y, aux = layer(x, cu_seqlens=cu, return_aux=True)
    ref = layer(x, cu_seqlens=cu)
    assert_close(y, ref, atol=1e-12, rtol=1e-12, name="output")
    g, gr = torch.autograd.grad(y.sum(), x)[0], torch.autograd.grad(ref.sum(), x)[0]
    assert_close(g, gr, atol=1e-12, rtol=1e-12, name="dx")
    q, k_cmp, *_, gates = layer.project(x, cu)
    assert torch.equal(aux["block_indices"], nsa.select_blocks(q, k_cmp, config=CFG, cu_seqlens=cu, backend=backend))
    assert torch.equal(aux["gates"], gates) and aux["block_indices"].shape == (x.shape[0], 70, 2, CFG.num_selected)


@pytest.mark.parametrize("shared_kv", [False, True, "slc_win"])
def test_load_dense_attention(shared_kv):
    """Dense weights copied in (every K/V set), the window gate open, the others shut, a window as long as the
    sequence: the NSA layer computes the dense causal attention it came from (float64)."""
    from nsa.models.llama import FullAttention

    torch.manual_seed(0)
    dense = FullAttention(48, 6, 2, 8, rope_theta=10000.0).double()
    cfg = nsa.NSAConfig(cmp_block_size=8, cmp_stride=4, slc_block_size=16, num_selected=4, window_size=64)
    layer = nsa.NativeSparseAttention(48, 6, 2, 8, config=cfg, shared_kv=shared_kv, gate_bias=(-60.0, -60.0, 60.0),
                                      backend="reference").double()
    k_w, v_w = dense.kv_proj.weight.view(2, 2 * 8, 48).unbind(0)
    layer.load_dense_attention(dense.q_proj.weight, k_w, v_w, dense.o_proj.weight)
    x = torch.randn(2, 40, 48, dtype=torch.float64)
    assert_close(layer(x), dense(x), atol=1e-12, rtol=1e-12, name="dense equivalence")
    with pytest.raises(ValueError, match="k_weight"):
        layer.load_dense_attention(dense.q_proj.weight, k_w[:8], v_w, dense.o_proj.weight)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_rope_tables_rotate_like_positions(dtype):
    """One rope table shared by q and the keys (the layer builds it once per call) rotates exactly as positions."""
    from nsa.rope import apply_rope, rope_dtype, rope_tables
    x = torch.randn(2, 5, 3, 8, generator=torch.Generator().manual_seed(0)).to(dtype)
    for pos in (torch.tensor([0, 3, 7, 70000, 9]), torch.tensor([[1, 2, 3, 4, 5], [9, 8, 7, 6, 100000]])):
        tables = rope_tables(pos, 8, 500.0, x.device, rope_dtype(dtype))
        assert torch.equal(apply_rope(x, None, tables=tables), apply_rope(x, pos, 500.0))
    with pytest.raises(ValueError, match="exactly one"):
        apply_rope(x, None)
