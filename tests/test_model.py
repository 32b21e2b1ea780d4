"""nsa.models: the small Llama-style decoder with NSA or full attention."""
import dataclasses

import pytest
import torch

import nsa
from nsa.models import KVCache, LlamaLM, ModelConfig, sample
from tests.kit import assert_close, host_read_watch, small_config

GEOM = dataclasses.asdict(small_config())  # l=8, d=4, l'=16, n=4, w=16


def micro(attention, **kw):
    base = dict(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                intermediate_size=48, attention=attention, nsa=GEOM, backend="auto")
    base.update(kw)
    torch.manual_seed(0)
    model = LlamaLM(ModelConfig(**base)).double()
    if attention == "nsa":  # move φ away from its mean-pooling start so its MLP is exercised
        for block in model.blocks:
            torch.nn.init.normal_(block.attn.compress_k.mlp[2].weight, std=0.1)
            torch.nn.init.normal_(block.attn.compress_v.mlp[2].weight, std=0.1)
    return model


def ids(B, T, seed=1, vocab=64):
    return torch.randint(vocab, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("attention", ["nsa", "full"])
def test_shapes_and_loss(attention):
    model = micro(attention)
    x = ids(2, 40)
    assert model(x).shape == (2, 40, 64)
    loss = model.loss(x, x)
    assert 3.0 < loss.item() < 5.5  # about ln(64) = 4.16 at init
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.count_nonzero(p.grad)]
    # φ's first MLP layer and PE only receive gradient through the cmp branch: they must too
    assert not missing, missing


@pytest.mark.parametrize("attention,shift", [("nsa", False), ("full", False), ("nsa", True), ("full", True)])
def test_causal(attention, shift):
    model = micro(attention, token_shift=shift)
    x = ids(1, 70)
    x2 = x.clone()
    x2[:, 41:] = ids(1, 29, seed=5)
    with torch.no_grad():
        assert torch.equal(model(x)[:, :41], model(x2)[:, :41])
        assert not torch.equal(model(x)[:, 41:], model(x2)[:, 41:])


@pytest.mark.parametrize("attention,shift", [("nsa", False), ("full", False), ("nsa", True), ("full", True)])
def test_packed_equals_separate(attention, shift):
    model = micro(attention, token_shift=shift)
    lengths = [37, 0, 5, 50]
    seqs = [ids(1, n, seed=10 + i) for i, n in enumerate(lengths)]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    with torch.no_grad():
        packed = model(torch.cat(seqs, 1), cu_seqlens=cu)
        for s, (a, b) in zip(seqs, zip(cu[:-1].tolist(), cu[1:].tolist())):
            if b > a:
                assert_close(packed[:, a:b], model(s), atol=1e-10, rtol=1e-10, name=f"seq {a}:{b}")


@pytest.mark.parametrize("shift", [False, True])
def test_param_parity_nsa_vs_full(shift):
    """With shared K/V the NSA model has exactly the full model's parameters plus the gates and φ."""
    n_full, n_nsa = micro("full", token_shift=shift).num_params(), micro("nsa", token_shift=shift)
    extra = sum(p.numel() for name, p in n_nsa.named_parameters() if ".compress_" in name or ".g_proj." in name)
    assert n_nsa.num_params() - extra == n_full
    assert extra > 0


def test_config_validation():
    with pytest.raises(ValueError, match="attention"):
        ModelConfig(attention="linear")
    with pytest.raises(ValueError, match="num_kv_heads"):
        ModelConfig(num_heads=4, num_kv_heads=3)
    with pytest.raises(ValueError, match="cmp_stride"):
        ModelConfig(nsa=dict(cmp_block_size=8, cmp_stride=3))
    with pytest.raises(ValueError, match="unknown"):
        ModelConfig.from_dict({"hidden": 3})
    cfg = ModelConfig(nsa=small_config())
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="input_ids"):
        micro("full")(torch.zeros(3, dtype=torch.long))
    import numpy as np

    # unhashable / array values, unknown nsa keys and a non-mapping: ValueError naming the field, not TypeError
    for kw, name in ((dict(compression=["mlp"]), "compression"), (dict(backend=["torch"]), "backend"),
                     (dict(attention=["nsa"]), "attention"), (dict(shared_kv=np.array(["slc_win", "x"])), "shared_kv"),
                     (dict(nsa={"foo": 1}), "foo"), (dict(nsa={1: 1}), "nsa")):
        with pytest.raises(ValueError, match=name):
            ModelConfig(**kw)
    for bad in (None, [("hidden_size", 32)]):
        with pytest.raises(ValueError, match="mapping"):
            ModelConfig.from_dict(bad)
    with pytest.raises(ValueError, match="unknown"):
        ModelConfig.from_dict({1: 2, "x": 3})


@pytest.mark.parametrize("attention", ["nsa", "full"])
def test_token_ids_and_labels_are_checked(attention):
    """Token ids outside [0, vocab), non-integer ids or labels, labels of another shape: ValueError naming
    input_ids / prompt / labels (not an IndexError from the embedding, a device assert on CUDA). Any integer dtype
    works; all labels ignored gives the NaN mean (documented, as torch and HF)."""
    model = micro(attention)
    x = ids(2, 20)
    for bad in (x + 64, x - 100, x.double(), x.bool(), x.tolist(), x[0]):
        with pytest.raises(ValueError, match="input_ids"):
            model(bad)
        with pytest.raises(ValueError, match="input_ids"):
            model.loss(bad, x)
    for bad in (x[:, :5], x + 64, x - 200, x.double(), x.bool(), x.tolist()):
        with pytest.raises(ValueError, match="labels"):
            model.loss(x, bad)
    for bad in (x[:, :5] + 64, x[:, :5] - 64, x[:, :5].double(), x[:, :5].bool()):
        with pytest.raises(ValueError, match="prompt"):
            model.generate(bad, 2)
    with pytest.raises(ValueError, match="prompt"):  # int8 cannot hold ids up to 255
        micro(attention, vocab_size=256).generate(x[:, :5].to(torch.int8), 2)
    with torch.no_grad():
        ref = model(x)
        for dtype in (torch.int32, torch.int16, torch.uint8):
            assert torch.equal(model(x.to(dtype)), ref)
        ignored = x.clone()
        ignored[:, :7] = -100
        assert torch.equal(model.loss(x, ignored.int()), model.loss(x, ignored))
        assert torch.isnan(model.loss(x, torch.full_like(x, -100)))


def test_token_id_range_is_not_read_under_capture(monkeypatch):
    """The range check reads values (a GPU synchronisation): skipped while a CUDA graph is being captured."""
    Watched = host_read_watch()
    model = micro("full")
    x = ids(2, 5).as_subclass(Watched)
    with torch.no_grad():
        model(x)
        assert Watched.reads, "eagerly the ids are read (the watch must see host reads)"
        Watched.reads.clear()
        monkeypatch.setattr("nsa.cache.capturing", lambda: True)
        model(x)
    assert Watched.reads == []


@pytest.mark.parametrize("attention", ["nsa", "full"])
def test_position_ids_are_checked(attention):
    model = micro(attention)
    x = ids(2, 20)
    with pytest.raises(ValueError, match="position_ids cannot be combined with cache"):
        model(x, cache=model.make_cache(2, 40), position_ids=torch.arange(20) + 1000)
    for bad in (torch.arange(7), torch.arange(20.0), torch.arange(20).expand(3, -1), torch.ones(20, dtype=torch.bool),
                list(range(20))):
        with pytest.raises(ValueError, match="position_ids"):
            model(x, position_ids=bad)
    with torch.no_grad():
        assert torch.equal(model(x, position_ids=torch.arange(20).expand(2, -1)), model(x))
        assert torch.equal(model(x, position_ids=torch.arange(20, dtype=torch.int32)), model(x))


@pytest.mark.parametrize("attention", ["nsa", "full"])
def test_cache_and_shift_state_are_checked(attention):
    """A cache of the wrong kind, batch size or layer count, and a shift_state that is not a dict of [B, 1, C]
    states: ValueError naming cache / shift_state (not an AttributeError or a shape error inside a layer)."""
    model = micro(attention, token_shift=True)
    x = ids(2, 20)
    other = nsa.NSACache(2, 2, 40) if attention == "full" else KVCache(2, 2, 40, 2, 8)
    for bad in (object(), other):
        with pytest.raises(ValueError, match="cache"):
            model(x, cache=bad, shift_state={})
    with pytest.raises(ValueError, match="cache"):
        LlamaLM.reorder_cache(object(), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="batch"):
        model(x, cache=model.make_cache(3, 40), shift_state={})
    fewer = KVCache(1, 2, 40, 2, 8) if attention == "full" else nsa.NSACache(1, 2, 40)
    with pytest.raises(ValueError, match="layers"):
        model(x, cache=fewer, shift_state={})
    if attention == "full":
        with pytest.raises(ValueError, match="cache"):
            model(x, cache=KVCache(2, 2, 40, 1, 8), shift_state={})
    for bad in ([], {0: torch.zeros(3, 1, 32)}, {0: "state"}):
        with pytest.raises(ValueError, match="shift_state"):
            model(x, cache=model.make_cache(2, 40), shift_state=bad)
    cache, state = model.make_cache(2, 40), {}
    with torch.no_grad():
        model(x, cache=cache, shift_state=state)
    before = {i: t.clone() for i, t in state.items()}
    for bad in ([1], {0: torch.zeros(3, 1, 32)}, {0: 1.0}):
        with pytest.raises(ValueError, match="shift_state"):
            LlamaLM.reorder_cache(cache, torch.tensor([1, 0]), shift_state=bad)
    assert all(torch.equal(state[i], before[i]) for i in state)


@pytest.mark.parametrize("static", [False, True])
def test_full_attention_cache_of_another_dtype(static):
    """A full-attention cache of another dtype than the model (as the NSA model accepts): keys/values are stored
    in the cache's dtype and attended in the model's (prefill, ragged prefill, decode steps)."""
    model = micro("full")  # float64
    x, n = ids(2, 12), torch.tensor([12, 7])
    cache, ref_cache = model.make_cache(2, 20, dtype=torch.float32, static=static), model.make_cache(2, 20)
    with torch.no_grad():
        assert_close(model(x, cache=cache, new_lengths=n), model(x, cache=ref_cache, new_lengths=n), atol=1e-5,
                     rtol=1e-5, name="prefill")
        for t in range(3):
            tok = ids(2, 1, seed=30 + t)
            assert_close(model(tok, cache=cache), model(tok, cache=ref_cache), atol=1e-5, rtol=1e-5, name=f"step {t}")
    assert cache.k[0].dtype == torch.float32
    with pytest.raises(ValueError, match="dtype"):
        KVCache(1, 1, 4, 1, 2, dtype=torch.long)


def test_full_kv_cache_prefill_and_decode_match_forward():
    model = micro("full")
    x = ids(2, 30)
    cache = model.make_cache(2, 40)
    assert isinstance(cache, KVCache)
    with torch.no_grad():
        ref = model(x)
        a = model(x[:, :17], cache=cache)
        b = torch.cat([model(x[:, t:t + 1], cache=cache) for t in range(17, 30)], 1)
    assert_close(torch.cat([a, b], 1), ref, atol=1e-10, rtol=1e-10, name="cached logits")
    assert cache.lengths.tolist() == [30, 30] and cache.memory_bytes() > 0
    cache.reset()
    assert cache.lengths.tolist() == [0, 0]
    with pytest.raises(ValueError, match="cache"):
        model(ids(2, 41), cache=cache)


@pytest.mark.parametrize("attention,shift", [("full", False), ("nsa", False), ("full", True), ("nsa", True)])
def test_cached_greedy_generation_equals_uncached(attention, shift):
    if attention == "nsa" and not hasattr(nsa, "NSACache"):
        pytest.skip("nsa.NSACache not available yet")
    model = micro(attention, token_shift=shift)
    prompt = ids(2, 21)
    with torch.no_grad():
        cached = model.generate(prompt, 18, temperature=0, use_cache=True)  # crosses blocks of l, l' and w
        plain = model.generate(prompt, 18, temperature=0, use_cache=False)
    assert cached.shape == (2, 39) and torch.equal(cached[:, :21], prompt)
    assert torch.equal(cached, plain)


@pytest.mark.parametrize("attention,shift", [("full", False), ("nsa", False), ("full", True), ("nsa", True)])
def test_ragged_cached_prefill_matches_each_row_alone(attention, shift):
    """Right-padded prompts with new_lengths, then decode steps: each row's logits equal that row run alone."""
    model = micro(attention, token_shift=shift)
    x, n = ids(3, 23, seed=4), torch.tensor([23, 9, 17])
    cache, state = model.make_cache(3, 30), {}
    with torch.no_grad():
        pre = model(x, cache=cache, shift_state=state, new_lengths=n)
        steps = [model(x[:, t:t + 1], cache=cache, shift_state=state) for t in range(4)]
        assert cache.lengths.tolist() == (n + 4).tolist()
        for b in range(3):
            L = int(n[b])
            alone = model(torch.cat([x[b:b + 1, :L], x[b:b + 1, :4]], 1))
            assert_close(pre[b, :L], alone[0, :L], atol=1e-10, rtol=1e-10, name=f"prefill row {b}")
            got = torch.cat([s[b] for s in steps], 0)
            assert_close(got, alone[0, L:], atol=1e-10, rtol=1e-10, name=f"decode row {b}")


@pytest.mark.parametrize("attention,use_cache", [("full", True), ("nsa", True), ("full", False), ("nsa", False)])
def test_ragged_generation_equals_each_prompt_alone(attention, use_cache):
    model = micro(attention, token_shift=True)
    prompt, n = ids(3, 21, seed=2), torch.tensor([21, 6, 13])
    with torch.no_grad():
        out = model.generate(prompt, 14, temperature=0, use_cache=use_cache, prompt_lengths=n, pad_token_id=63)
        assert out.shape == (3, 21 + 14)
        for b in range(3):
            L = int(n[b])
            alone = model.generate(prompt[b:b + 1, :L], 14, temperature=0, use_cache=use_cache)
            assert torch.equal(out[b, :L + 14], alone[0]), b
            assert (out[b, L + 14:] == 63).all()


def test_generation_stops_at_eos_and_pads():
    model = micro("nsa")
    prompt, n = ids(2, 12, seed=3), torch.tensor([12, 7])
    with torch.no_grad():
        free = model.generate(prompt, 10, temperature=0, prompt_lengths=n)
        eos = int(free[1, 7 + 2])  # row 1's third new token
        out = model.generate(prompt, 10, temperature=0, prompt_lengths=n, eos_token_id=eos, pad_token_id=0)
    for b in range(2):
        L = int(n[b])
        new = free[b, L:L + 10].tolist()
        stop = new.index(eos) + 1 if eos in new else 10
        assert out[b, L:L + stop].tolist() == new[:stop]
        assert (out[b, L + stop:] == 0).all()
    row_ends = [int(n[b]) + (free[b, int(n[b]):].tolist().index(eos) + 1 if eos in free[b, int(n[b]):].tolist()
                             else 10) for b in range(2)]
    assert out.shape[1] == max(row_ends)


def test_generation_width_is_the_longest_row():
    """The result is as wide as its longest row (prompt + new tokens up to eos), not max(prompt) + steps."""
    model = micro("full")
    p, n = ids(2, 8, seed=2), torch.tensor([8, 2])
    with torch.no_grad():
        free = model.generate(p, 6, temperature=0, prompt_lengths=n)
        eos = int(free[0, 8])  # the long row's first new token: it stops at once
        out = model.generate(p, 6, temperature=0, prompt_lengths=n, eos_token_id=eos)
    new_short = free[1, 2:8].tolist()
    short_end = 2 + (new_short.index(eos) + 1 if eos in new_short else 6)
    assert out.shape[1] == max(9, short_end)


def test_generation_bad_arguments():
    model = micro("full")
    p = ids(2, 5)
    for kw, name in ((dict(prompt_lengths=torch.tensor([5, 0])), "prompt_lengths"),
                     (dict(prompt_lengths=torch.tensor([5, 6])), "prompt_lengths"),
                     (dict(prompt_lengths=torch.tensor([5.0, 2.0])), "prompt_lengths"),
                     (dict(prompt_lengths=torch.tensor([5])), "prompt_lengths"),
                     (dict(eos_token_id=64), "eos_token_id"),
                     (dict(pad_token_id=-1), "pad_token_id"),
                     (dict(max_new_tokens=-1), "max_new_tokens")):
        args = dict(max_new_tokens=2) | kw
        with pytest.raises(ValueError, match=name):
            model.generate(p, **args)
    assert model.generate(p, 0).shape == (2, 5)
    for kw, name in ((dict(pad_token_id=None), "pad_token_id"), (dict(max_new_tokens=True), "max_new_tokens"),
                     (dict(prompt_lengths=torch.tensor([True, True])), "prompt_lengths")):
        with pytest.raises(ValueError, match=name):
            model.generate(p, **(dict(max_new_tokens=2) | kw))
    import numpy as np

    assert model.generate(p, 2, temperature=0, eos_token_id=np.int64(3)).shape[0] == 2  # NumPy ints are token ids
    assert model.generate(p[:0], 3).shape == (0, 8)  # an empty batch
    assert model(p[:, :0]).shape == (2, 0, 64) and model(p[:0]).shape == (0, 5, 64)
    with pytest.raises(ValueError, match="new_lengths"):
        model(p, new_lengths=torch.tensor([5, 5]))
    for kw, name in ((dict(temperature="1"), "temperature"), (dict(temperature=float("nan")), "temperature"),
                     (dict(temperature=-1e-9), "temperature"), (dict(temperature=True), "temperature"),
                     (dict(top_p="0.5"), "top_p"), (dict(top_p=1.5), "top_p"), (dict(top_p=None), "top_p"),
                     (dict(generator=5), "generator"), (dict(use_cache="no"), "use_cache"),
                     (dict(use_cache=1), "use_cache")):
        with pytest.raises(ValueError, match=name):
            model.generate(p, 2, **kw)
    g = torch.Generator().manual_seed(0)
    assert model.generate(p, 2, temperature=np.float32(0.7), top_p=np.float64(0.9), generator=g).shape == (2, 7)


@pytest.mark.parametrize("attention,use_cache", [("nsa", True), ("full", True), ("nsa", False), ("full", False)])
def test_generate_keeps_any_integer_prompt_dtype(attention, use_cache):
    """An int32 (or int16, uint8) prompt: the same tokens as int64, in the prompt's dtype (the int64 samples were
    written into an int32 buffer and failed)."""
    model = micro(attention)
    p, n = ids(2, 9), torch.tensor([9, 4])
    with torch.no_grad():
        ref = model.generate(p, 4, temperature=0, use_cache=use_cache, prompt_lengths=n)
        for dtype in (torch.int32, torch.int16, torch.uint8):
            out = model.generate(p.to(dtype), 4, temperature=0, use_cache=use_cache, prompt_lengths=n)
            assert out.dtype == dtype and torch.equal(out.long(), ref)


@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize("attention,shared_kv", [("nsa", True), ("nsa", False), ("full", True)])
def test_static_cache_decode_equals_ordinary(shift, attention, shared_kv):
    """The model's decode steps over a static cache (what `generate(cuda_graph=True)` captures) give the ordinary
    cache's logits after a ragged prefill; the token-shift states are updated in place (a captured graph keeps
    reading and writing the same buffers), and beam reordering keeps them in place too."""
    model = micro(attention, token_shift=shift, shared_kv=shared_kv)
    x, n = ids(3, 23, seed=4), torch.tensor([23, 9, 17])
    static, ordinary = model.make_cache(3, 60, static=True), model.make_cache(3, 60)
    s_state, o_state = {}, {}
    with torch.no_grad():
        assert_close(model(x, cache=static, shift_state=s_state, new_lengths=n),
                     model(x, cache=ordinary, shift_state=o_state, new_lengths=n), atol=1e-10, rtol=1e-10)
        buffers = {i: t.data_ptr() for i, t in s_state.items()}
        for t in range(25):
            tok = ids(3, 1, seed=10 + t)
            got = model(tok, cache=static, shift_state=s_state)
            assert torch.isfinite(got).all()
            assert_close(got, model(tok, cache=ordinary, shift_state=o_state), atol=1e-10, rtol=1e-10,
                         name=f"step {t}")
            if t == 12:
                beams = torch.tensor([2, 0, 0])
                LlamaLM.reorder_cache(static, beams, s_state)
                LlamaLM.reorder_cache(ordinary, beams, o_state)
    assert {i: t.data_ptr() for i, t in s_state.items()} == buffers
    assert static.lengths.tolist() == ordinary.lengths.tolist()


def test_generate_cuda_graph_needs_cuda():
    for attention, kw in (("nsa", {}), ("nsa", dict(use_cache=False)), ("full", {}), ("nsa", dict(backend="reference"))):
        model = micro(attention, **{k: v for k, v in kw.items() if k == "backend"})
        with pytest.raises(ValueError, match="cuda_graph"):
            model.generate(ids(2, 5), 3, cuda_graph=True, **{k: v for k, v in kw.items() if k != "backend"})
    with pytest.raises(ValueError, match="cuda_graph must be a bool"):
        micro("nsa").generate(ids(2, 5), 3, cuda_graph=1)
    with pytest.raises(ValueError, match="static"):
        micro("full").make_cache(2, 10, static=1)


def test_full_attention_static_step_reads_nothing_on_the_host(monkeypatch):
    """The full-attention baseline's static step (what its CUDA graph captures) reads no length on the host, and
    under capture a row at capacity stores nothing and comes out NaN while the other rows step on; eagerly that
    step raises like an ordinary cache's."""
    Watched = host_read_watch()
    model = micro("full")
    cache = model.make_cache(3, 12, static=True)
    with torch.no_grad():
        model(ids(3, 9), cache=cache, new_lengths=torch.tensor([9, 4, 7]))
        ordinary = model.make_cache(3, 12)
        model(ids(3, 9), cache=ordinary, new_lengths=torch.tensor([9, 4, 7]))
        monkeypatch.setattr("nsa.cache.capturing", lambda: True)
        cache._lengths = [n.as_subclass(Watched) for n in cache._lengths]
        for t in range(4):
            tok = ids(3, 1, seed=20 + t)
            got = model(tok, cache=cache).as_subclass(torch.Tensor)
            if t < 3:
                assert_close(got, model(tok, cache=ordinary), atol=1e-10, rtol=1e-10, name=f"step {t}")
        assert torch.isnan(got[0]).all() and torch.isfinite(got[1:]).all()  # row 0 reached 12 after 3 steps
        assert [n.as_subclass(torch.Tensor).tolist() for n in cache._lengths] == [[12, 8, 11]] * 2
        kept = [torch.Tensor.clone(t[0]) for t in cache.k + cache.v]
        model(ids(3, 1).as_subclass(Watched), cache=cache)  # the token-id range is not read under capture either
        assert Watched.reads == []
        assert all(torch.equal(t[0], old) for t, old in zip(cache.k + cache.v, kept))  # the full row kept its K/V
        assert [n.as_subclass(torch.Tensor).tolist() for n in cache._lengths] == [[12, 9, 12]] * 2
        monkeypatch.setattr("nsa.cache.capturing", lambda: False)
        cache._lengths = [n.as_subclass(torch.Tensor) for n in cache._lengths]
        with pytest.raises(ValueError, match="at most 12 tokens"):
            model(ids(3, 1), cache=cache)


def test_static_cache_eager_step_past_capacity_raises():
    """Outside graph capture a static cache's step checks the room like an ordinary one (before any layer runs)."""
    model = micro("nsa", token_shift=True)
    cache, state = model.make_cache(2, 6, static=True), {}
    with torch.no_grad():
        model(ids(2, 6), cache=cache, shift_state=state)
        with pytest.raises(ValueError, match="max_length 6 exceeded: 7"):
            model(ids(2, 1), cache=cache, shift_state=state)
    assert cache.lengths.tolist() == [6, 6]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("attention,shift", [("nsa", False), ("nsa", True), ("full", True)])
def test_gpu_generate_with_a_cuda_graph_equals_eager(attention, shift):
    """generate(cuda_graph=True): one captured decode step replayed for every token, over ragged prompts; the same
    greedy tokens as eager generation (float32, Triton backend for NSA)."""
    model = micro(attention, token_shift=shift).float().cuda()
    prompt = ids(3, 21).cuda()
    lengths = torch.tensor([21, 8, 15])
    with torch.no_grad():
        eager = model.generate(prompt, 40, temperature=0, prompt_lengths=lengths)
        graph = model.generate(prompt, 40, temperature=0, prompt_lengths=lengths, cuda_graph=True)
    assert torch.equal(graph, eager)


def test_sampling():
    logits = torch.tensor([[0.0, 3.0, 1.0, -1.0], [2.0, 0.0, 0.0, 0.0]])
    assert sample(logits, 0, 1.0).tolist() == [1, 0]
    g = torch.Generator().manual_seed(0)
    # tiny top_p keeps only the most likely token
    assert all(sample(logits, 1.0, 1e-6, g).tolist() == [1, 0] for _ in range(20))
    # probs of row 0: [0.041, 0.831, 0.112, 0.015]; top_p = 0.9 keeps tokens 1 and 2 only
    draws = torch.stack([sample(logits[:1], 1.0, 0.9, g) for _ in range(300)])
    assert set(draws.flatten().tolist()) <= {1, 2} and len(set(draws.flatten().tolist())) == 2
    model = micro("full")
    with pytest.raises(ValueError, match="top_p"):
        model.generate(ids(1, 3), 2, top_p=0)
    with pytest.raises(ValueError, match="prompt"):
        model.generate(torch.zeros(1, 0, dtype=torch.long), 2)
    # tiny valid temperature / top_p act as greedy (logits / T overflowed to NaN; top_p rounded to 0 kept nothing)
    big = torch.tensor([[0.0, 30.0, 29.9, -5.0], [1e30, 0.0, 1e30 * (1 - 1e-6), -1e30]])
    for t, p in ((1e-39, 1.0), (1e-300, 1.0), (5e-45, 1.0), (1.0, 1e-300), (1e-39, 1e-300)):
        assert sample(big, t, p, g).tolist() == [1, 0], (t, p)
        assert sample(big[:1].half(), t, p, g).tolist() == [1], (t, p)
    prompt = ids(2, 5)
    greedy = model.generate(prompt, 4, temperature=0)
    for kw in (dict(temperature=1e-39), dict(top_p=1e-300)):
        assert torch.equal(model.generate(prompt, 4, generator=g, **kw), greedy), kw


def test_token_shift_reads_previous_token_only_within_sequence():
    model = micro("full", token_shift=True)
    x = ids(1, 20)
    with pytest.raises(ValueError, match="shift_state"):
        model(x, cache=model.make_cache(1, 20))
    x2 = x.clone()
    x2[0, 9] = (x2[0, 9] + 1) % 64
    cu = torch.tensor([0, 10, 20])
    with torch.no_grad():
        a, b = model(x, cu_seqlens=cu), model(x2, cu_seqlens=cu)
    assert torch.equal(a[:, 10:], b[:, 10:])  # token 9 ends sequence 0: it must not leak into token 10
    assert not torch.equal(a[:, 9], b[:, 9])


@pytest.mark.parametrize("attention", ["nsa", "full"])
def test_meta_device_model_initialisation(attention):
    """LlamaLM built on the meta device, `to_empty()`, `reset_parameters()`: every parameter initialised as in a
    new model (same statistics; the NSA layers' gate bias and φ exactly), and a finite forward."""
    cfg = dict(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
               intermediate_size=48, attention=attention, nsa=GEOM, token_shift=True, gate_bias=(0.5, 0.0, -0.5))
    fresh = LlamaLM(ModelConfig(**cfg))
    with torch.device("meta"):
        model = LlamaLM(ModelConfig(**cfg))
    model = model.to_empty(device="cpu")
    model.reset_parameters()
    ref = dict(fresh.named_parameters())
    for name, p in model.named_parameters():
        assert torch.isfinite(p).all(), name
        if name.endswith(("g_proj.bias", "mlp.2.weight", "mlp.2.bias", "norm.weight", "shift_mix")):
            assert torch.equal(p, ref[name]), name
        elif p.numel() > 100:
            std, ref_std = float(p.detach().std()), float(ref[name].detach().std())
            assert abs(std - ref_std) < 0.3 * ref_std, name
    assert torch.isfinite(model(ids(2, 20))).all()


@pytest.mark.parametrize("attention", ["nsa", "full"])
def test_beam_reorder_with_token_shift(attention):
    """Beam search step: LlamaLM.reorder_cache reorders the cache and the token-shift states, so continuing the
    reordered rows equals recomputing them (reordering the cache alone left token shift on the old rows)."""
    model = micro(attention, token_shift=True)
    x = ids(3, 20, seed=6)
    cache, state = model.make_cache(3, 30), {}
    beam = torch.tensor([2, 0, 0])
    with torch.no_grad():
        model(x[:, :15], cache=cache, shift_state=state)
        model.reorder_cache(cache, beam, state)
        got = torch.cat([model(x[beam, t:t + 1], cache=cache, shift_state=state) for t in range(15, 20)], 1)
        ref = model(torch.cat([x[beam, :15], x[beam, 15:20]], 1))[:, 15:]
    assert_close(got, ref, atol=1e-10, rtol=1e-10, name="beam rows")


@pytest.mark.parametrize("attention", ["nsa", "full"])
def test_failed_cached_call_changes_nothing(attention):
    """A cached call that overflows the cache raises before any layer runs: neither the cache nor the token-shift
    states change (layer 0's shift state used to move on), so continuing equals never having made the call."""
    model = micro(attention, token_shift=True)
    prompt, nxt = ids(2, 6, seed=3), ids(2, 1, seed=4)

    def run(bad_call):
        cache, state = model.make_cache(2, 10), {}
        with torch.no_grad():
            model(prompt, cache=cache, shift_state=state)
            if bad_call:
                with pytest.raises(ValueError, match="10"):
                    model(ids(2, 8, seed=5), cache=cache, shift_state=state)  # 6 + 8 > 10
            return model(nxt, cache=cache, shift_state=state)

    assert torch.equal(run(False), run(True))


@pytest.mark.parametrize("attention", ["nsa", "full"])
def test_ragged_generation_ignores_what_the_padding_holds(attention):
    """The slots after prompt_lengths[b] may hold anything (-1 here): the cached prefill reads the prompt with its
    padding replaced (it embedded the raw -1 and failed), and cached equals recomputed."""
    model = micro(attention)
    prompt, n = ids(2, 9, seed=7), torch.tensor([9, 4])
    padded = prompt.clone()
    padded[1, 4:] = -1
    with torch.no_grad():
        cached = model.generate(padded, 5, temperature=0, prompt_lengths=n)
        plain = model.generate(padded, 5, temperature=0, prompt_lengths=n, use_cache=False)
        ref = model.generate(prompt, 5, temperature=0, prompt_lengths=n)
    assert torch.equal(cached, plain) and torch.equal(cached, ref)


def test_generate_checks_the_prompt_once(monkeypatch):
    """generate checks the prompt's ids, then feeds its own samples without a range check per step (each would be
    a GPU synchronisation); a direct forward still checks."""
    import nsa.models.llama as llama

    model, reads = micro("nsa"), []
    real = llama._check_token_ids
    monkeypatch.setattr(llama, "_check_token_ids", lambda *a, **kw: reads.append(kw.get("check_range", True))
                        or real(*a, **kw))
    model.generate(ids(2, 9), 5, temperature=0)
    assert reads[0] is True and reads[1:] == [False] * 5  # the prompt, then the prefill and four steps
    model(ids(2, 3))
    assert reads[-1] is True
    with pytest.raises(ValueError, match="input_ids"):
        model(ids(2, 3) + 64)


def test_kv_cache_prefill_on_an_empty_cache_is_plain_causal(monkeypatch):
    """A prefill into an empty (non-static) KVCache returns its T slots and runs causal SDPA, not a [T, 2T] mask:
    the lengths the layer read before the append must not move under it."""
    import nsa.models.llama as llama

    model, calls = micro("full"), []
    real = llama._attend
    monkeypatch.setattr(llama, "_attend", lambda q, k, v, mask=None, is_causal=False: calls.append(
        (k.shape[1], mask is None, is_causal)) or real(q, k, v, mask, is_causal))
    cache = model.make_cache(2, 40)
    with torch.no_grad():
        got = model(ids(2, 9), cache=cache)
        assert calls == [(9, True, True)] * 2  # both layers
        assert_close(got, model(ids(2, 9)), atol=1e-10, rtol=1e-10)
        model(ids(2, 3, seed=2), cache=cache)  # a chunk after it: the masked path over 12 slots
    assert calls[4:] == [(12, False, False)] * 2 and cache.lengths.tolist() == [12, 12]  # [2:4]: the uncached run


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")  # torch.ao.quantization's
def test_layer_runs_after_dynamic_quantization():
    """The layer's x checks read q_proj.weight only where it is a tensor (a dynamically quantized Linear has a
    method there)."""
    layer = nsa.NativeSparseAttention(32, 4, 2, 8, config=small_config(), backend="torch").eval()
    try:
        quant = torch.ao.quantization.quantize_dynamic(layer, {torch.nn.Linear}, dtype=torch.qint8)
    except (RuntimeError, AssertionError, AttributeError) as exc:  # no quantized engine here (or no torch.ao)
        pytest.skip(f"quantize_dynamic unavailable: {exc}")
    x = torch.randn(2, 40, 32)
    with torch.no_grad():
        assert_close(quant(x), layer(x), atol=0.1, rtol=0.1, name="quantized vs float")
