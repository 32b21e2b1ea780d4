"""torch.compile: the composed op runs as two custom ops (nsa.ops.library), so a padded layer compiles to one graph
with fullgraph=True, and compiled outputs and gradients equal eager ones."""
import dataclasses

import pytest
import torch
from torch._dynamo.utils import counters

import nsa
from nsa.ops import library, reference
from tests.kit import assert_close, make_inputs, small_config

CFG = small_config()
HAS_TRITON = "triton" in nsa.available_backends()


def _grads(o, xs, seed=1):
    cot = torch.randn(o.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(o.dtype)
    return torch.autograd.grad((o * cot).sum(), xs)


def _op(backend, **kw):
    return lambda *xs: nsa.native_sparse_attention(*xs, config=CFG, backend=backend, **kw)


CASES = [  # (dtype, varlen, given indices)
    (torch.float32, False, False),
    (torch.float32, True, True),
    (torch.float64, True, False),
]


@pytest.mark.parametrize("dtype,varlen,given", CASES)
def test_compiled_op_matches_eager(dtype, varlen, given):
    """fullgraph compile (AOTAutograd, so the fake implementations and the autograd registration are used) of the
    torch backend against the eager op and the reference: output and the 8 input gradients."""
    torch._dynamo.reset()
    cu = torch.tensor([0, 9, 40, 71]) if varlen else None
    B, T = (1, 71) if varlen else (2, 53)
    xs = make_inputs(B, T, 6, 2, 16, 8, CFG, dtype=dtype, cu_seqlens=cu, seed=3, requires_grad=True)
    idx = reference.select_blocks(xs[0].detach(), xs[1].detach(), config=CFG, cu_seqlens=cu) if given else None
    kw = dict(cu_seqlens=cu, block_indices=idx)
    out = torch.compile(_op("torch", **kw), fullgraph=True, backend="aot_eager")(*xs)
    eager = _op("torch", **kw)(*xs)
    expected = _op("reference", **kw)(*xs)
    tol = dict(atol=1e-10, rtol=1e-10) if dtype == torch.float64 else dict(atol=2e-5, rtol=2e-5)
    assert_close(out, eager, name="o vs eager", **tol)
    assert_close(out, expected, name="o vs reference", **tol)
    for name, g, ge, gr in zip(("q", "k_cmp", "v_cmp", "k_slc", "v_slc", "k_win", "v_win", "gates"),
                               _grads(out, xs), _grads(eager, xs), _grads(expected, xs)):
        assert_close(g, ge, name=f"d{name} vs eager", **tol)
        assert_close(g, gr, name=f"d{name} vs reference", **tol)


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
def test_compiled_triton_op_matches_reference(monkeypatch):
    """The triton backend's split pair through the custom ops (interpreter on CPU), fp32, GQA, varlen; the
    backward op reuses the offsets validation read (inside the forward op), as in eager."""
    from nsa.ops import varlen

    torch._dynamo.reset()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    cu = torch.tensor([0, 7, 33, 47], device=dev)
    xs = make_inputs(1, 47, 6, 2, 20, 12, CFG, dtype=torch.float32, cu_seqlens=cu, seed=5, device=dev,
                     requires_grad=True)
    reads = []
    monkeypatch.setattr(varlen, "_read_offsets", lambda c: reads.append(1) or c.tolist())
    cu = cu.clone()  # nothing has read this one yet
    out = torch.compile(_op("triton", cu_seqlens=cu), fullgraph=True, backend="aot_eager")(*xs)
    grads = _grads(out, xs)
    assert reads == [1]  # one read, by validation inside the forward op; the backward op reuses it
    expected = _op("reference", cu_seqlens=cu)(*xs)
    assert_close(out, expected, atol=2e-5, rtol=2e-5, name="o")
    for g, gr in zip(grads, _grads(expected, xs)):
        assert_close(g, gr, atol=5e-5, rtol=5e-5, name="grad")


def test_opcheck_fake_and_autograd_registrations():
    """torch.library.opcheck: schema, fake tensors (shapes, dtypes, strides) and the autograd registration agree
    with the real forward op, padded and varlen, float32 and float64."""
    cu = torch.tensor([0, 20, 45])
    for dtype, c, B, T in ((torch.float32, None, 2, 45), (torch.float64, cu, 1, 45)):
        xs = make_inputs(B, T, 4, 2, 16, 8, CFG, dtype=dtype, cu_seqlens=c, seed=7, requires_grad=True)
        args = (*xs, None, c, [CFG.cmp_block_size, CFG.cmp_stride, CFG.slc_block_size, CFG.num_selected,
                               CFG.num_init_blocks, CFG.num_local_blocks, CFG.window_size], None, "torch")
        torch.library.opcheck(library._nsa_fwd, args, test_utils=("test_schema", "test_faketensor",
                                                                  "test_autograd_registration"))


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_layer_compiles_to_one_graph(compiler):
    """A padded batch through the layer: no graph break (fullgraph=True compiles), same output and gradients."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = nsa.NativeSparseAttention(48, 6, 2, 8, config=CFG).float()
    x = torch.randn(2, 61, 48, generator=torch.Generator().manual_seed(1), requires_grad=True)
    explained = torch._dynamo.explain(layer)(x)
    assert explained.graph_break_count == 0, explained.break_reasons
    out = torch.compile(layer, fullgraph=True, backend=compiler)(x)
    ref = layer(x)
    assert_close(out, ref, atol=1e-5, rtol=1e-5, name="layer output")
    params = [x, *layer.parameters()]
    for g, gr in zip(_grads(out, params), _grads(ref, params)):
        assert_close(g, gr, atol=1e-5, rtol=1e-5, name="layer grad")


def test_packed_layer_stops_recompiling():
    """Packed batches with new cu_seqlens: the compressed-token count changes, which recompiles once as a dynamic
    size, then never again (before, every new offset list recompiled until Dynamo's limit)."""
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    layer = nsa.NativeSparseAttention(48, 6, 2, 8, config=CFG).float()
    compiled = torch.compile(layer, backend="aot_eager")
    graphs = []
    for offsets in ([0, 40, 100], [0, 30, 100], [0, 50, 70, 100], [0, 10, 100], [0, 60, 100], [0, 33, 66, 100]):
        cu = torch.tensor(offsets)
        x = torch.randn(1, 100, 48, generator=torch.Generator().manual_seed(len(graphs)))
        assert_close(compiled(x, cu_seqlens=cu), layer(x, cu_seqlens=cu), atol=1e-5, rtol=1e-5, name="packed")
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[3:] == [graphs[2]] * 3, graphs


def test_compiled_op_checks_values_at_run_time():
    """What tracing cannot check (cu_seqlens' offsets, the range of block_indices) still raises ValueError."""
    torch._dynamo.reset()
    cu = torch.tensor([0, 20, 45])
    xs = make_inputs(1, 45, 4, 2, 16, 8, CFG, dtype=torch.float32, cu_seqlens=cu, seed=2)
    with pytest.raises(ValueError, match="cu_seqlens"):
        torch.compile(_op("torch", cu_seqlens=torch.tensor([0, 20, 44])), fullgraph=True, backend="aot_eager")(*xs)
    idx = torch.full((1, 45, 2, CFG.num_selected), 99)
    with pytest.raises(ValueError, match="indices must lie"):
        torch.compile(_op("torch", cu_seqlens=cu, block_indices=idx), fullgraph=True, backend="aot_eager")(*xs)
    with pytest.raises(ValueError, match="gates must be"):  # while tracing: a graph break, then the eager raise
        torch.compile(_op("torch", cu_seqlens=cu), backend="aot_eager")(*xs[:7], xs[7][..., :2])


@pytest.mark.parametrize("dynamic_shapes", [False, True])
def test_compiled_layer_checks_offsets_before_using_them(dynamic_shapes):
    """A compiled layer slices by cu_seqlens (positions, compressed blocks) before the op: bad offsets must still
    raise the op's ValueError (they gave "repeats can not be negative" or a size mismatch), with or without
    dynamic output shapes, and good offsets after bad ones still work."""
    torch._dynamo.reset()
    layer = nsa.NativeSparseAttention(48, 6, 2, 8, config=CFG).float()
    x = torch.randn(1, 50, 48)
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=dynamic_shapes):
        compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
        good = torch.tensor([0, 20, 50])
        assert_close(compiled(x, cu_seqlens=good), layer(x, cu_seqlens=good), atol=1e-5, rtol=1e-5, name="good")
        for bad, match in (([0, 30, 20, 50], "non-decreasing"), ([0, 20, 49], "end at T=50"),
                           ([1, 20, 50], "start at 0")):
            with pytest.raises(ValueError, match=match):
                compiled(x, cu_seqlens=torch.tensor(bad))
        assert_close(compiled(x, cu_seqlens=good), layer(x, cu_seqlens=good), atol=1e-5, rtol=1e-5, name="again")


@pytest.mark.skipif(not (HAS_TRITON and torch.cuda.is_available()), reason="needs a CUDA GPU")
def test_compiled_triton_op_bf16_matches_eager_on_gpu():
    """bf16 at the paper geometry (AOTAutograd; inductor is covered on CPU): the custom ops launch the eager path's kernels on the same inputs, so
    o and every gradient but dq are bitwise equal; dq sums its three branches in fp32 (eager: bf16 autograd adds)."""
    torch._dynamo.reset()
    cfg = nsa.NSAConfig()
    xs = make_inputs(2, 2048, 16, 1, 128, 128, cfg, dtype=torch.bfloat16, seed=11, device="cuda",
                     requires_grad=True)
    fn = lambda *a: nsa.native_sparse_attention(*a, config=cfg, backend="triton")  # noqa: E731
    out = torch.compile(fn, fullgraph=True, backend="aot_eager")(*xs)
    eager = fn(*xs)
    assert torch.equal(out, eager)
    grads, eager_grads = _grads(out, xs), _grads(eager, xs)
    assert_close(grads[0], eager_grads[0], atol=2e-2, rtol=2e-2, name="dq")
    for g, ge in zip(grads[1:], eager_grads[1:]):
        assert torch.equal(g, ge)


def test_layer_exports():
    """torch.export of a padded layer: one graph that calls the NSA custom op, equal to eager on new inputs."""
    torch.manual_seed(0)
    layer = nsa.NativeSparseAttention(48, 6, 2, 8, config=CFG).float().eval()
    g = torch.Generator().manual_seed(4)
    exported = torch.export.export(layer, (torch.randn(2, 61, 48, generator=g),))
    assert "torch.ops.nsa.native_sparse_attention_fwd" in exported.graph_module.code
    x = torch.randn(2, 61, 48, generator=g)
    with torch.no_grad():
        assert_close(exported.module()(x), layer(x), atol=1e-6, rtol=1e-6, name="exported layer")


def _randomise(module, seed=0):
    """Every parameter moved off its initialisation (φ's MLP starts with a zero last layer, gates at 0.5)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


@pytest.mark.parametrize("compression", ["mlp", "linear", "mean"])
def test_layer_exports_with_a_dynamic_length(compression):
    """torch.export with a dynamic T (min = l + d: one compressed token is a size-1 dimension, which export
    specialises): one program for every length, equal to eager. φ's Linears run as column products while exporting
    (`compression._per_block`); with Linear's own reshape the export failed on divisibility guards."""
    torch.manual_seed(0)
    layer = _randomise(nsa.NativeSparseAttention(48, 6, 2, 8, config=CFG, compression=compression,
                                                 shared_kv="slc_win").float().eval())
    g = torch.Generator().manual_seed(4)
    lo = CFG.cmp_block_size + CFG.cmp_stride
    T = torch.export.Dim("T", min=lo, max=4096)
    exported = torch.export.export(layer, (torch.randn(2, 61, 48, generator=g),), dynamic_shapes=({1: T},))
    for t in (lo, lo + 1, 37, 61, 130):
        x = torch.randn(2, t, 48, generator=g)
        with torch.no_grad():
            assert_close(exported.module()(x), layer(x), atol=2e-6, rtol=2e-6, name=f"exported layer T={t}")


def test_packed_layer_exports_with_dynamic_length_and_sequence_count():
    """A packed layer exports with T and the number of offsets dynamic (at least two sequences: one is a size-1
    dimension); new offsets of any count give eager's output, bad offsets still raise the op's ValueError."""
    torch.manual_seed(0)
    layer = _randomise(nsa.NativeSparseAttention(48, 6, 2, 8, config=CFG).float().eval())
    g = torch.Generator().manual_seed(5)
    Dim = torch.export.Dim
    exported = torch.export.export(
        layer, (torch.randn(1, 100, 48, generator=g),), kwargs={"cu_seqlens": torch.tensor([0, 40, 100])},
        dynamic_shapes={"x": {1: Dim("T", min=CFG.cmp_block_size + CFG.cmp_stride, max=8192)},
                        "cu_seqlens": {0: Dim("N", min=3, max=1024)}})
    for offsets in ([0, 77, 100], [0, 5, 60, 100], [0, 3, 9, 250, 333], [0, 30, 64]):
        x = torch.randn(1, offsets[-1], 48, generator=g)
        cu = torch.tensor(offsets)
        with torch.no_grad():
            assert_close(exported.module()(x, cu_seqlens=cu), layer(x, cu_seqlens=cu), atol=2e-6, rtol=2e-6,
                         name=f"exported packed layer {offsets}")
    with pytest.raises(ValueError, match="cu_seqlens"):
        exported.module()(torch.randn(1, 100, 48), cu_seqlens=torch.tensor([0, 70, 40, 100]))


def test_model_exports_with_a_dynamic_length():
    """The whole small model (NSA layers with token shift and separate K/V sets) exports with a dynamic T."""
    from nsa.models.llama import LlamaLM, ModelConfig
    torch.manual_seed(0)
    geometry = {f.name: getattr(CFG, f.name) for f in dataclasses.fields(CFG)}
    model = _randomise(LlamaLM(ModelConfig(nsa=geometry, token_shift=True, shared_kv=False)).eval(), seed=1)
    g = torch.Generator().manual_seed(2)
    T = torch.export.Dim("T", min=CFG.cmp_block_size + CFG.cmp_stride, max=8192)
    exported = torch.export.export(model, (torch.randint(0, 256, (2, 40), generator=g),), dynamic_shapes=({1: T},))
    for t in (12, 41, 99):
        ids = torch.randint(0, 256, (2, t), generator=g)
        with torch.no_grad():
            assert_close(exported.module()(ids), model(ids), atol=1e-5, rtol=1e-5, name=f"exported model T={t}")


@pytest.mark.parametrize("compression", ["mlp", "linear"])
def test_column_products_equal_linear_rows(compression, monkeypatch):
    """φ's export path (Linears as products over (B, H) with tokens as columns) equals its eager path, float64,
    values and gradients (to x, the position embedding and every weight)."""
    from nsa.compression import make_compressor
    phi = _randomise(make_compressor(compression, 6, 8, 4, position_embedding=True).double())
    x = torch.randn(3, 29, 2, 6, dtype=torch.float64, requires_grad=True)
    wrt = [x, *phi.parameters()]
    eager = phi(x)
    eager_grads = _grads(eager, wrt)
    monkeypatch.setattr(torch.compiler, "is_exporting", lambda: True)
    cols = phi(x)
    assert cols.shape == eager.shape == (3, 6, 2, 6)
    assert_close(cols, eager, atol=1e-12, rtol=1e-12, name="phi")
    for a, b in zip(_grads(cols, wrt), eager_grads):
        assert_close(a, b, atol=1e-12, rtol=1e-12, name="phi grad")


def test_packed_layer_one_graph_with_dynamic_output_shapes():
    """With Dynamo's capture_dynamic_output_shape_ops, a packed batch traces to one graph too: the compressed-block
    starts come from a custom op whose length is a dynamic size; new offsets (same count) do not recompile."""
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    layer = nsa.NativeSparseAttention(48, 6, 2, 8, config=CFG).float()
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        cu = torch.tensor([0, 40, 100])
        x = torch.randn(1, 100, 48, generator=torch.Generator().manual_seed(0), requires_grad=True)
        explained = torch._dynamo.explain(layer)(x, cu_seqlens=cu)
        assert explained.graph_break_count == 0, explained.break_reasons
        torch._dynamo.reset()
        counters.clear()
        compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
        for offsets in ([0, 40, 100], [0, 30, 100], [0, 77, 100], [0, 5, 100]):
            cu = torch.tensor(offsets)
            out = compiled(x, cu_seqlens=cu)
            ref = layer(x, cu_seqlens=cu)
            assert_close(out, ref, atol=1e-5, rtol=1e-5, name="packed output")
            for g, gr in zip(_grads(out, [x]), _grads(ref, [x])):
                assert_close(g, gr, atol=1e-5, rtol=1e-5, name="packed dx")
        assert counters["stats"]["unique_graphs"] == 1


BRANCH_BACKENDS = ["torch"] + (["triton"] if HAS_TRITON else [])


@pytest.mark.parametrize("backend", BRANCH_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_compiled_branch_ops_match_eager(backend, dtype):
    """compressed_attention (o and lse, with a gradient through lse), selected_attention, sliding_window_attention
    and select_blocks under fullgraph compile: equal to eager, outputs and gradients (varlen, GQA)."""
    torch._dynamo.reset()
    dev = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    cu = torch.tensor([0, 9, 40, 71], device=dev)
    x = make_inputs(1, 71, 6, 2, 16, 8, CFG, dtype=dtype, cu_seqlens=cu, seed=13, device=dev, requires_grad=True)
    q, kc, vc, k, v = x[:5]
    idx = reference.select_blocks(q.detach(), kc.detach(), config=CFG, cu_seqlens=cu)

    def ops(q, kc, vc, k, v):
        o_c, lse = nsa.compressed_attention(q, kc, vc, block_size=8, stride=4, cu_seqlens=cu, backend=backend)
        o_s = nsa.selected_attention(q, k, v, idx, block_size=16, cu_seqlens=cu, backend=backend)
        o_w = nsa.sliding_window_attention(q, k, v, window=7, cu_seqlens=cu, backend=backend)
        chosen = nsa.select_blocks(q, kc, config=CFG, cu_seqlens=cu, backend=backend)
        loss_lse = torch.where(torch.isinf(lse), 0.0, lse).sum()
        return o_c, o_s, o_w, chosen, loss_lse

    inputs = (q, kc, vc, k, v)
    compiled = torch.compile(ops, fullgraph=True, backend="aot_eager")(*inputs)
    eager = ops(*inputs)
    tol = dict(atol=1e-10, rtol=1e-10) if dtype == torch.float64 else dict(atol=1e-5, rtol=1e-5)
    assert torch.equal(compiled[3], eager[3])
    for a, b in zip(compiled[:3] + compiled[4:], eager[:3] + eager[4:]):
        assert_close(a, b, name="output", **tol)
    loss = lambda outs: sum((o * (i + 1)).sum() for i, o in enumerate(outs[:3])) + outs[4]  # noqa: E731
    for g, ge in zip(torch.autograd.grad(loss(compiled), inputs), torch.autograd.grad(loss(eager), inputs)):
        assert_close(g, ge, name="grad", **tol)


def test_opcheck_branch_ops():
    """opcheck of each branch op's forward (schema, fake tensors, autograd registration) and of select_blocks."""
    cu = torch.tensor([0, 20, 45])
    q, kc, vc, k, v = make_inputs(1, 45, 4, 2, 16, 8, CFG, cu_seqlens=cu, seed=8, requires_grad=True)[:5]
    idx = reference.select_blocks(q.detach(), kc.detach(), config=CFG, cu_seqlens=cu)
    utils = ("test_schema", "test_faketensor", "test_autograd_registration")
    for args in (("cmp", q, kc, vc, None, cu, [8, 4], None, "torch"), ("slc", q, k, v, idx, cu, [16], 0.3, "torch"),
                 ("win", q, k, v, None, None, [7], None, "torch")):
        torch.library.opcheck(library._branch_fwd, args, test_utils=utils)
    geometry = list(dataclasses.astuple(CFG))
    torch.library.opcheck(library._select_blocks, (q.detach(), kc.detach(), cu, geometry, None, "torch"),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("stack", ["fresh", "deepcopy", "shared"])
def test_two_packed_layers_with_inductor(stack):
    """Two layer calls over one packed batch in one inductor graph (dynamic output sizes on): two new layers, a
    layer and its deep copy, or one layer called twice (weight sharing). Each block-start op carries its layer's id
    and its input, so inductor's CSE does not merge the calls (it lost the merged call's size symbol: "u1 not in
    {u0: ...}"; deep copies shared the id, and a shared layer failed the same way). Output and input gradient
    equal eager."""
    import copy

    torch._dynamo.reset()
    torch.manual_seed(0)
    first = nsa.NativeSparseAttention(32, 4, 2, 8, config=CFG).float()
    second = {"fresh": lambda: nsa.NativeSparseAttention(32, 4, 2, 8, config=CFG).float(),
              "deepcopy": lambda: copy.deepcopy(first), "shared": lambda: first}[stack]()
    layers = [first, second]
    fn = lambda x, cu: layers[1](layers[0](x, cu_seqlens=cu), cu_seqlens=cu)  # noqa: E731
    cu = torch.tensor([0, 30, 70])
    x = torch.randn(1, 70, 32, generator=torch.Generator().manual_seed(5), requires_grad=True)
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        out = torch.compile(fn, fullgraph=True)(x, cu)
    ref = fn(x, cu)
    assert_close(out, ref, atol=1e-5, rtol=1e-5, name="two layers")
    assert_close(_grads(out, [x])[0], _grads(ref, [x])[0], atol=1e-5, rtol=1e-5, name="two layers dx")
