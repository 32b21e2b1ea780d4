"""Malformed inputs raise ValueError naming the argument."""
import pytest
import torch

import nsa
from tests.kit import make_inputs, small_config

CFG = small_config()


def good():
    return list(make_inputs(1, 20, 4, 2, 8, 8, CFG, dtype=torch.float32))


def call(inputs, **kw):
    kw.setdefault("config", CFG)
    return nsa.native_sparse_attention(*inputs, **kw)


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda x: x.__setitem__(0, x[0][0]), "q must be 4-D"),
        (lambda x: x.__setitem__(3, x[3][..., 0]), "k_slc must be 4-D"),
        (lambda x: x.__setitem__(0, torch.randn(1, 20, 5, 8)), "heads"),
        (lambda x: x.__setitem__(3, torch.randn(2, 20, 2, 8)), "k_slc batch size"),
        (lambda x: x.__setitem__(5, torch.randn(1, 19, 2, 8)), "k_win length"),
        (lambda x: x.__setitem__(4, torch.randn(1, 20, 2, 8, dtype=torch.float64)), "v_slc must have q's dtype"),
        (lambda x: x.__setitem__(3, torch.randn(1, 20, 2, 6)), "k_slc head dim"),
        (lambda x: (x.__setitem__(1, torch.randn(1, 5, 2, 8)), x.__setitem__(2, torch.randn(1, 5, 2, 8))), "k_cmp must hold 4 compressed tokens"),
        (lambda x: x.__setitem__(7, torch.rand(1, 20, 4, 2)), "gates must be"),
        (lambda x: [x.__setitem__(i, x[i].to(torch.int32)) for i in range(7)], "q must be float16"),
    ],
)
def test_bad_tensors(mutate, match):
    x = good()
    mutate(x)
    with pytest.raises(ValueError, match=match):
        call(x)


@pytest.mark.parametrize(
    "cu,match",
    [
        (torch.tensor([0, 12, 8, 20], dtype=torch.int32), "non-decreasing"),
        (torch.tensor([0, 12, 19], dtype=torch.int32), "end at T=20"),
        (torch.tensor([1, 12, 20], dtype=torch.int32), "start at 0"),
        (torch.tensor([0.0, 20.0]), "int32 or int64"),
        (torch.tensor([[0, 20]], dtype=torch.int32), "1-D"),
    ],
)
def test_bad_cu_seqlens(cu, match):
    with pytest.raises(ValueError, match="cu_seqlens.*" + match if "cu" not in match else match):
        call(good(), cu_seqlens=cu)


def test_cu_seqlens_needs_batch_one():
    x = list(make_inputs(2, 20, 4, 2, 8, 8, CFG, dtype=torch.float32))
    with pytest.raises(ValueError, match="cu_seqlens requires a packed batch of size 1"):
        call(x, cu_seqlens=torch.tensor([0, 20], dtype=torch.int32))


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(cmp_block_size=24, cmp_stride=16), "cmp_stride .* must divide cmp_block_size"),
        (dict(slc_block_size=40, cmp_stride=16), "cmp_stride .* must divide slc_block_size"),
        (dict(cmp_block_size=128), "cmp_block_size .* must be <= slc_block_size"),
        (dict(num_selected=2), "num_selected"),
        (dict(window_size=0), "window_size"),
        (dict(num_init_blocks=-1), "num_init_blocks"),
        (dict(cmp_stride=2.5), "cmp_stride"),
    ],
)
def test_bad_geometry(kw, match):
    with pytest.raises(ValueError, match=match):
        nsa.NSAConfig(**kw)


def test_bad_scalars_and_names():
    x = good()
    with pytest.raises(ValueError, match="config"):
        call(x, config=dict(window_size=4))
    with pytest.raises(ValueError, match="scale"):
        call(x, scale=-1.0)
    with pytest.raises(ValueError, match="backend"):
        call(x, backend="cuda-magic")
    with pytest.raises(ValueError, match="window"):
        nsa.sliding_window_attention(x[0], x[5], x[6], window=0)
    with pytest.raises(ValueError, match="block_size"):
        nsa.compressed_attention(x[0], x[1], x[2], block_size=0, stride=4)


def test_bad_indices():
    x = good()
    idx = torch.zeros(1, 20, 2, 4, dtype=torch.int64)
    with pytest.raises(ValueError, match="indices must be int32 or int64"):
        nsa.selected_attention(x[0], x[3], x[4], idx.float(), block_size=16)
    with pytest.raises(ValueError, match="indices must be \\[B, T, HKV, n\\]"):
        nsa.selected_attention(x[0], x[3], x[4], idx[:, :10], block_size=16)
    with pytest.raises(ValueError, match="indices must lie in"):
        nsa.selected_attention(x[0], x[3], x[4], idx + 2, block_size=16)
    with pytest.raises(ValueError, match="block_indices must list"):
        call(x, block_indices=idx[..., :3])


def test_layer_bad_input():
    with pytest.raises(ValueError, match="num_kv_heads"):
        nsa.NativeSparseAttention(32, 4, 3, 8)
    with pytest.raises(ValueError, match="compression"):
        nsa.NativeSparseAttention(32, 4, 2, 8, compression="zip")
    layer = nsa.NativeSparseAttention(32, 4, 2, 8, config=CFG)
    with pytest.raises(ValueError, match="x must be"):
        layer(torch.randn(2, 10, 16))


@pytest.mark.parametrize("kw,match", [
    (dict(v_head_dim=0), "v_head_dim"), (dict(v_head_dim=3.5), "v_head_dim"), (dict(hidden_size=True), "hidden_size"),
    (dict(rope_theta=0.0), "rope_theta"), (dict(rope_theta=-1.0), "rope_theta"), (dict(backend="flash"), "backend"),
])
def test_layer_bad_constructor_arguments(kw, match):
    args = dict(hidden_size=32, num_heads=4, num_kv_heads=2, head_dim=8, config=CFG) | kw
    with pytest.raises(ValueError, match=match):
        nsa.NativeSparseAttention(**args)


@pytest.mark.parametrize("cu", [[0, 3, 5], [1, 6], [0, 4, 3, 6], [[0, 6]], [], "list", "float"])
def test_layer_and_model_check_cu_seqlens_before_using_them(cu):
    """The layer and the model slice by the offsets (positions, compressed blocks, per-sequence attention) before
    the op would check them: they must raise the op's ValueError, not an IndexError or a reshape error."""
    from nsa.models import LlamaLM, ModelConfig

    cu = [0, 6] if cu == "list" else torch.tensor([0.0, 6.0]) if cu == "float" else torch.tensor(cu, dtype=torch.long)
    layer = nsa.NativeSparseAttention(32, 4, 2, 8, config=CFG, backend="reference")
    with pytest.raises(ValueError, match="cu_seqlens"):
        layer(torch.randn(1, 6, 32), cu_seqlens=cu)
    for attention in ("nsa", "full"):
        model = LlamaLM(ModelConfig(vocab_size=16, hidden_size=32, num_heads=4, num_kv_heads=2, head_dim=8,
                                    attention=attention, nsa=dict(cmp_block_size=8, cmp_stride=4, slc_block_size=16,
                                                                  num_selected=4, window_size=16)))
        with pytest.raises(ValueError, match="cu_seqlens"):
            model(torch.zeros(1, 6, dtype=torch.long), cu_seqlens=cu)


def test_layer_bad_position_ids_and_empty_input():
    layer = nsa.NativeSparseAttention(32, 4, 2, 8, config=CFG, backend="reference")
    x = torch.randn(2, 5, 32)
    for pos in (torch.arange(4), torch.arange(5.0), torch.zeros(3, 5, dtype=torch.long), [0, 1, 2, 3, 4]):
        with pytest.raises(ValueError, match="position_ids"):
            layer(x, position_ids=pos)
    assert torch.equal(layer(x, position_ids=torch.arange(5)), layer(x))
    # an empty time axis, padded or packed, gives an empty output (spec §9: empty sequences are allowed)
    assert layer(torch.randn(2, 0, 32)).shape == (2, 0, 32)
    assert layer(torch.randn(1, 0, 32), cu_seqlens=torch.tensor([0, 0])).shape == (1, 0, 32)
    assert layer(torch.randn(0, 5, 32)).shape == (0, 5, 32)


def test_zero_query_heads_are_refused():
    x = good()
    q0 = x[0][:, :, :0]
    for fn in (lambda: call([q0, *x[1:7], x[7][:, :, :0]]),
               lambda: nsa.compressed_attention(q0, x[1], x[2], block_size=8, stride=4),
               lambda: nsa.sliding_window_attention(q0, x[5], x[6], window=4),
               lambda: nsa.select_blocks(q0, x[1], config=CFG)):
        with pytest.raises(ValueError, match="heads"):
            fn()


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_window_longer_than_the_sequence_is_the_sequence(backend):
    """w >= T reads every earlier key: any such w gives the same output as w = T, without buffers sized by w
    (w = 2^31 allocated for 2^31 keys; 2^63 overflowed)."""
    x = good()
    T = x[0].shape[1]
    want = nsa.sliding_window_attention(x[0], x[5], x[6], window=T, backend=backend)
    for w in (T + 1, 2**31, 2**63 - 1):
        got = nsa.sliding_window_attention(x[0], x[5], x[6], window=w, backend=backend)
        assert torch.equal(got, want), w
    import dataclasses

    wide = dataclasses.replace(CFG, window_size=2**40)
    assert torch.equal(call(x, config=wide, backend=backend), call(x, config=dataclasses.replace(CFG, window_size=T),
                                                                   backend=backend))


def test_decode_host_lengths_are_checked():
    q, k_cmp, v_cmp, k, v, k_w, v_w, gates = make_inputs(2, 20, 4, 2, 8, 8, CFG, dtype=torch.float32)
    inputs = (q[:, -1:], k_cmp, v_cmp, k, v, k_w, v_w, gates[:, -1:])
    lengths = torch.tensor([20, 17])
    B = lengths.shape[0]
    for bad in (lengths.tolist(), lengths[:1], lengths.float(), lengths + 1):
        with pytest.raises(ValueError, match="host_lengths"):
            nsa.decode_attention(*inputs, lengths=lengths, config=CFG, host_lengths=bad)
    out = nsa.decode_attention(*inputs, lengths=lengths, config=CFG, host_lengths=lengths.int())
    assert out.shape[0] == B and torch.isfinite(out).all()


def test_layer_checks_x_against_its_parameters_and_flags():
    layer = nsa.NativeSparseAttention(32, 4, 2, 8, config=CFG)
    for x in (torch.randn(2, 5, 32, dtype=torch.float64), torch.ones(2, 5, 32, dtype=torch.long)):
        with pytest.raises(ValueError, match="x must have the layer's dtype"):
            layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast: x float32 into bf16 compute is fine
        assert layer(torch.randn(2, 20, 32)).shape == (2, 20, 32)
    with pytest.raises(ValueError, match="return_aux"):
        layer(torch.randn(2, 5, 32), return_aux="no")
    with pytest.raises(ValueError, match="position_ids"):
        layer(torch.randn(2, 5, 32), position_ids=torch.ones(5, dtype=torch.bool))
    with pytest.raises(ValueError, match="device"):
        nsa.NSACache(1, 2, 10, device="nope")
    with pytest.raises(ValueError, match="device"):
        layer(torch.randn(2, 5, 32), cache=nsa.NSACache(1, 2, 10, device="meta"))


@pytest.mark.parametrize("kw,match", [
    (dict(shared_kv=["slc_win"]), "shared_kv"), (dict(backend=["torch"]), "backend"),
    (dict(gate_bias=(True, 0, 0)), "gate_bias"), (dict(gate_bias=(float("nan"), 0, 0)), "gate_bias"),
])
def test_layer_refuses_unhashable_and_bool_options(kw, match):
    with pytest.raises(ValueError, match=match):
        nsa.NativeSparseAttention(32, 4, 2, 8, config=CFG, **kw)


def test_numpy_scalars_are_accepted_like_floats():
    np = pytest.importorskip("numpy")
    x = good()
    assert torch.equal(call(x, scale=np.float32(0.25)), call(x, scale=0.25))
    layer = nsa.NativeSparseAttention(32, 4, 2, 8, config=CFG, gate_bias=(np.float32(1.0), 0, np.int64(-1)))
    assert layer.g_proj.bias[:3].tolist() == [1.0, 0.0, -1.0]


def test_block_indices_on_another_device_and_named():
    x = good()
    idx = torch.zeros(1, 20, 2, 4, dtype=torch.int64)
    with pytest.raises(ValueError, match="block_indices must be on q's device"):
        call(x, block_indices=idx.to("meta"))
    with pytest.raises(ValueError, match="block_indices must be int32"):
        call(x, block_indices=idx.float())
