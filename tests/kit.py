"""Shared test kit: a comparator in the spirit of FlashMLA's kernelkit, random inputs, a brute-force oracle."""
from __future__ import annotations

import math

import torch

import nsa
from nsa.ops.varlen import num_compressed_total

# backends the CPU suite runs property tests on (triton kernels have their own interpreter tests)
CPU_BACKENDS = [b for b in nsa.available_backends() if b != "triton"]


HOST_READS = {"item", "tolist", "cpu", "numpy", "nonzero", "_local_scalar_dense", "__int__", "__bool__", "__index__",
              "__float__"}


def host_read_watch():
    """A fresh torch.Tensor subclass recording (in `.reads`) every host read (`HOST_READS`: what would wait for a
    GPU) of its tensors and of every tensor computed from them: wrap with `t.as_subclass(Watched)`."""
    class Watched(torch.Tensor):
        reads: list[str] = []

        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            if getattr(func, "__name__", "") in HOST_READS:
                cls.reads.append(func.__name__)
            return super().__torch_function__(func, types, args, kwargs or {})

    return Watched


def assert_close(actual, expected, *, atol, rtol, name="tensor"):
    """NaN/inf positions must match exactly; finite values within atol + rtol*|expected|.

    On failure the message reports max abs error, max rel error and cosine similarity.
    """
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    nan_a, nan_e = torch.isnan(a), torch.isnan(e)
    assert torch.equal(nan_a, nan_e), f"{name}: NaN positions differ ({int(nan_a.sum())} vs {int(nan_e.sum())})"
    inf_a, inf_e = torch.isinf(a), torch.isinf(e)
    assert torch.equal(inf_a, inf_e) and torch.equal(a[inf_a], e[inf_e]), f"{name}: inf positions/signs differ"
    finite = torch.isfinite(e)
    a, e = a[finite], e[finite]
    if a.numel() == 0:
        return
    err = (a - e).abs()
    bad = err > atol + rtol * e.abs()
    if bool(bad.any()):
        cos = torch.nn.functional.cosine_similarity(a.flatten(), e.flatten(), dim=0, eps=1e-30).item()
        rel = (err / e.abs().clamp_min(1e-30)).max().item()
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{bad.numel()} elements off; max abs {err.max().item():.3e}, "
            f"max rel {rel:.3e}, cosine {cos:.9f} (atol {atol}, rtol {rtol})"
        )


def small_config(**kw):
    """A scaled-down geometry with the paper's ratios: l=8, d=4, l'=16 (weights 1,2,2,2,1), n=4, w=16."""
    base = dict(cmp_block_size=8, cmp_stride=4, slc_block_size=16, num_selected=4, num_init_blocks=1,
                num_local_blocks=2, window_size=16)
    base.update(kw)
    return nsa.NSAConfig(**base)


def make_inputs(B, T, HQ, HKV, Dk, Dv, config, *, dtype=torch.float64, cu_seqlens=None, seed=0, requires_grad=False,
                device="cpu"):
    """Random q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates (never zeros)."""
    g = torch.Generator().manual_seed(seed)
    Tc = num_compressed_total(T, cu_seqlens, config.cmp_block_size, config.cmp_stride)

    def rnd(*shape, scale=1.0):
        x = (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(device)
        return x.requires_grad_(requires_grad)

    q = rnd(B, T, HQ, Dk)
    k_cmp, v_cmp = rnd(B, Tc, HKV, Dk), rnd(B, Tc, HKV, Dv)
    k_slc, v_slc = rnd(B, T, HKV, Dk), rnd(B, T, HKV, Dv)
    k_win, v_win = rnd(B, T, HKV, Dk), rnd(B, T, HKV, Dv)
    gates = torch.sigmoid(torch.randn(B, T, HQ, 3, generator=g, dtype=torch.float64)).to(dtype).to(device)
    gates.requires_grad_(requires_grad)
    return q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates


def brute_force_attention(q_t, keys, values, scale):
    """One query vector against an explicit key list, the textbook way (Eq. 2). Returns (o, lse)."""
    if keys.shape[0] == 0:
        return torch.zeros(values.shape[-1], dtype=q_t.dtype), -math.inf
    s = (keys @ q_t) * scale
    lse = torch.logsumexp(s, 0)
    return torch.softmax(s, 0) @ values, lse.item()


def sdpa_causal(q, k, v):
    """Dense causal attention via SDPA for [B, T, H, D] tensors with GQA."""
    G = q.shape[2] // k.shape[2]
    k = k.repeat_interleave(G, dim=2)
    v = v.repeat_interleave(G, dim=2)
    o = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
    )
    return o.transpose(1, 2)


def assert_same_selection(actual, expected, scores, config, *, atol=1e-5, rtol=1e-5):
    """Tie-robust comparison of two index tensors [B, T, HKV, n].

    Equal where the sets agree; where they differ (near-ties), both must hold the same number of valid blocks and
    the chosen blocks' summed scores (scores [B, T, HKV, Nb], group-summed) must agree within tolerance.
    """
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    diff = (actual.long() != expected.long()).any(-1)
    if not bool(diff.any()):
        return
    s = scores.double().cpu()
    for b, t, h in diff.nonzero().tolist():
        a = [int(j) for j in actual[b, t, h] if j >= 0]
        e = [int(j) for j in expected[b, t, h] if j >= 0]
        assert len(a) == len(e), f"(b={b}, t={t}, h={h}): {a} vs {e}"
        assert len(set(a)) == len(a), f"duplicate blocks at (b={b}, t={t}, h={h}): {a}"
        sa, se = s[b, t, h, a].sum().item(), s[b, t, h, e].sum().item()
        assert abs(sa - se) <= atol + rtol * abs(se), f"(b={b}, t={t}, h={h}): {a} ({sa}) vs {e} ({se})"
